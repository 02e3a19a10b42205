"""A watched folder (``inference.py --watch DIR``): score each photo a camera writes there, once.

A photo is scored only once it is completely written: watchdog reports that something changed,
and the file must then keep the same size and modification time for ``settle_s`` seconds. Photos go
through the one scoring path (``inspection.scoring.score_batch``) in batches; each gets one JSON line
in ``--jsonl`` and/or one CSV row in ``--csv``, appended and flushed to disk before the photo
counts as done, and with ``--sort-into OUT`` it is moved to ``OUT/ok``, ``OUT/anomalous`` or
``OUT/unreadable``; with ``--visualize`` its heatmap overlay is written before its record. Restart-safe: the photos named in the result files are not scored again, and
photos that arrived while the watcher was down are found by a scan at start.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preprocessing.io import IMAGE_SUFFIXES
from inspection.scoring import Photo, records_csv, score_batch


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    stable_since: float


@dataclass
class WatchOutputs:
    """Where results go; at least one of jsonl, csv and sort_into must be given."""

    jsonl: Path | None = None
    csv: Path | None = None
    sort_into: Path | None = None
    heatmaps: Path | None = None  # a heatmap overlay per photo, named as the photo

    def __post_init__(self) -> None:
        if not (self.jsonl or self.csv or self.sort_into):
            raise ValueError("--watch needs somewhere to put results: --jsonl, --csv and/or --sort-into")


def _ensure_line_start(path: Path) -> None:
    """A crash mid-append can leave a last line without its newline; start the next one on a fresh line."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")


def already_scored(outputs: WatchOutputs) -> set[str]:
    """Paths named in earlier results (a torn last line is ignored): these are not scored again."""
    done: set[str] = set()
    if outputs.jsonl and outputs.jsonl.is_file():
        for line in outputs.jsonl.read_text(encoding="utf-8").splitlines():
            try:
                done.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                continue
    if outputs.csv and outputs.csv.is_file():
        with open(outputs.csv, encoding="utf-8", newline="") as handle:
            done.update(row["path"] for row in csv.DictReader(handle) if row.get("path"))
    return done


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


class FolderWatcher:
    """Scores the photos that appear in ``folder`` (not its subfolders) with ``model``."""

    def __init__(self, model: Any, folder: Path, outputs: WatchOutputs, settle_s: float = 0.5,
                 poll_s: float = 0.1, on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder to watch")
        self.model, self.folder, self.outputs = model, folder, outputs
        self.settle_s, self.poll_s = settle_s, poll_s
        self.on_record = on_record or (lambda record: None)
        self.done = already_scored(outputs)
        self._pending: dict[Path, _Seen | None] = {}
        self._lock = threading.Lock()
        for path in (outputs.jsonl, outputs.csv):
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                _ensure_line_start(path)

    def notice(self, path: Path) -> None:
        """Something happened to ``path``: look at it again until it has settled."""
        if path.parent == self.folder and path.suffix.lower() in IMAGE_SUFFIXES and str(path) not in self.done:
            with self._lock:
                self._pending[path] = None

    def run(self, stop: threading.Event) -> None:
        """Watch until ``stop`` is set; photos already there when it starts are scored first."""
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class Handler(FileSystemEventHandler):
            """Writes only: the watcher's own reads of a photo (opened, closed unwritten) are no news."""

            def on_created(self, event: FileSystemEvent) -> None:
                self.written(event.src_path, event.is_directory)

            def on_modified(self, event: FileSystemEvent) -> None:
                self.written(event.src_path, event.is_directory)

            def on_closed(self, event: FileSystemEvent) -> None:
                self.written(event.src_path, event.is_directory)

            def on_moved(self, event: FileSystemEvent) -> None:
                self.written(event.dest_path, event.is_directory)

            @staticmethod
            def written(path: str | bytes, is_directory: bool) -> None:
                if not is_directory:
                    watcher.notice(Path(os.fsdecode(path)))

        observer = Observer()
        observer.schedule(Handler(), str(self.folder), recursive=False)
        observer.start()
        try:
            for path in sorted(self.folder.iterdir()):  # what arrived while the watcher was down
                self.notice(path)
            while not stop.is_set():
                ready = self._settled()
                for start in range(0, len(ready), self.model.config.batch_size):
                    self._score(ready[start : start + self.model.config.batch_size])
                stop.wait(self.poll_s)
        finally:
            observer.stop()
            observer.join()

    def _settled(self) -> list[Path]:
        """Pending photos whose size and modification time have not changed for ``settle_s``."""
        now, ready = time.monotonic(), []
        with self._lock:
            for path, seen in list(self._pending.items()):
                try:
                    stat = path.stat()
                except FileNotFoundError:  # moved away or deleted before it settled
                    del self._pending[path]
                    continue
                if seen is None or (stat.st_size, stat.st_mtime_ns) != (seen.size, seen.mtime_ns):
                    self._pending[path] = _Seen(stat.st_size, stat.st_mtime_ns, now)
                elif stat.st_size and now - seen.stable_since >= self.settle_s:
                    del self._pending[path]
                    ready.append(path)
        return sorted(ready)

    def _score(self, paths: list[Path]) -> None:
        results = score_batch(self.model, [Photo(path.name, path) for path in paths], self.outputs.heatmaps)
        records = [result.record for result in results]
        if self.outputs.jsonl:
            _append(self.outputs.jsonl, "".join(json.dumps(record) + "\n" for record in records))
        if self.outputs.csv:
            rows = records_csv(records)  # header line first: only a new file gets it
            fresh = not (self.outputs.csv.is_file() and self.outputs.csv.stat().st_size)
            _append(self.outputs.csv, rows if fresh else rows.split("\n", 1)[1])
        for path, record in zip(paths, records):
            self.done.add(str(path))
            if self.outputs.sort_into:
                verdict = "unreadable" if "error" in record else "anomalous" if record["is_anomalous"] else "ok"
                (self.outputs.sort_into / verdict).mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), str(self.outputs.sort_into / verdict / path.name))
            self.on_record(record)


def watch_until_stopped(model: Any, folder: Path, outputs: WatchOutputs, settle_s: float) -> int:
    """``inference.py --watch``: print one line per photo until Ctrl-C or SIGTERM; exit status 0."""
    import signal
    import sys

    stop = threading.Event()
    for stopping in (signal.SIGINT, signal.SIGTERM):  # finish the batch in hand, then stop
        signal.signal(stopping, lambda *_: stop.set())

    def show(record: dict[str, Any]) -> None:
        if "error" in record:
            print(f"{record['path']}  error: {record['error']}", file=sys.stderr, flush=True)
        else:
            verdict = "ANOMALOUS" if record["is_anomalous"] else "ok"
            print(f"{record['path']}  {record['score']:.3f}  {verdict}", flush=True)

    watcher = FolderWatcher(model, folder, outputs, settle_s, on_record=show)
    print(f"watching {folder} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    watcher.run(stop)
    return 0
