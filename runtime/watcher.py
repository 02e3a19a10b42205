"""A watched folder (``inference.py --watch DIR``): score each photo a camera writes there, once.

A photo is scored only once it is completely written: watchdog reports that something changed,
and the file must then keep the same size and modification time for ``settle_s`` seconds. Photos go
through the one scoring path (``inspection.scoring.score_batch``) in batches; each gets one JSON line
in ``--jsonl`` and/or one CSV row in ``--csv``, appended and flushed to disk before the photo
counts as done, and with ``--sort-into OUT`` it is moved to ``OUT/ok``, ``OUT/anomalous`` or
``OUT/unreadable``; with ``--visualize`` its heatmap overlay is written before its record. Restart-safe: the photos named in the result files are not scored again, and
photos that arrived while the watcher was down are found by a scan at start.

Learning on the line: photos an operator moves into ``OUT/confirmed_good`` are added to the model
(``PatchCore.add_good``), which is saved over its file (the file it replaces kept beside it) and
scores from the next batch on; they then move to ``OUT/learned``, or to ``OUT/not_learned`` when
they score too far above the threshold to be taken as good. A rolling window of verdicts warns of
drift (runtime.drift). Updates and drift warnings are JSON lines with an ``event`` field in ``--jsonl``.
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

from config import UserError
from models.patchcore import keep_previous
from preprocessing.io import IMAGE_SUFFIXES
from inspection.scoring import Photo, records_csv, score_batch
from runtime.drift import DriftMonitor

CONFIRMED, LEARNED, NOT_LEARNED = "confirmed_good", "learned", "not_learned"  # folders under --sort-into


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
                 poll_s: float = 0.1, on_record: Callable[[dict[str, Any]], None] | None = None,
                 model_path: Path | None = None, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder to watch")
        self.model, self.folder, self.outputs = model, folder, outputs
        self.settle_s, self.poll_s = settle_s, poll_s
        self.on_record = on_record or (lambda record: None)
        self.on_event = on_event or (lambda event: None)
        self.drift = DriftMonitor(model)
        self.model_path = model_path  # where learnt photos are saved; no learning without it
        self.confirmed = outputs.sort_into / CONFIRMED if outputs.sort_into and model_path else None
        self.done = already_scored(outputs)
        self._pending: dict[Path, _Seen | None] = {}
        self._lock = threading.Lock()
        for path in (outputs.jsonl, outputs.csv):
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                _ensure_line_start(path)

    def notice(self, path: Path) -> None:
        """Something happened to ``path``: look at it again until it has settled."""
        watched = path.parent == self.folder or (self.confirmed is not None and path.parent == self.confirmed)
        if watched and path.suffix.lower() in IMAGE_SUFFIXES and str(path) not in self.done:
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
        folders = [self.folder]
        if self.confirmed is not None:
            self.confirmed.mkdir(parents=True, exist_ok=True)
            folders.append(self.confirmed)
        for folder in folders:
            observer.schedule(Handler(), str(folder), recursive=False)
        observer.start()
        try:
            for folder in folders:
                for path in sorted(folder.iterdir()):  # what arrived while the watcher was down
                    self.notice(path)
            while not stop.is_set():
                ready = self._settled()
                photos = [path for path in ready if path.parent == self.folder]
                for start in range(0, len(photos), self.model.config.batch_size):
                    self._score(photos[start : start + self.model.config.batch_size])
                confirmed = [path for path in ready if path.parent != self.folder]
                if confirmed:
                    self._learn(confirmed)
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
            for event in self.drift.observe(record):
                self._event(event)

    def _learn(self, paths: list[Path]) -> None:
        """Add photos confirmed good to the model, save it (keeping the file it replaces), score on with it."""
        assert self.confirmed is not None and self.model_path is not None and self.outputs.sort_into is not None
        candidate = self.model.copy()
        try:
            update = candidate.add_good(paths, progress=False, source=str(self.confirmed), skip_refused=True,
                                        labels=[path.name for path in paths])
        except (UserError, ValueError, OSError) as error:  # an unreadable photo: nothing is learnt from the batch
            update = {"photos": 0, "refused": [path.name for path in paths], "error": str(error)}
        if update["photos"]:
            keep_previous(self.model_path, len(candidate.updates))
            candidate.save(self.model_path)
            self.model = candidate
            self.drift.reset(candidate)
        refused = set(update["refused"])
        for path in paths:
            folder = self.outputs.sort_into / (NOT_LEARNED if path.name in refused else LEARNED)
            folder.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(folder / path.name))
        self._event({"event": "update", "model_file": str(self.model_path), **update})

    def _event(self, event: dict[str, Any]) -> None:
        """A model update or a drift warning: one JSON line in --jsonl, and the caller's on_event."""
        if self.outputs.jsonl:
            _append(self.outputs.jsonl, json.dumps(event) + "\n")
        self.on_event(event)


def watch_until_stopped(model: Any, folder: Path, outputs: WatchOutputs, settle_s: float,
                        model_path: Path | None = None) -> int:
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

    def tell(event: dict[str, Any]) -> None:
        if event["event"] == "drift":
            print(f"warning: {event['warning']}", file=sys.stderr, flush=True)
        elif "error" in event:
            print(f"error: nothing learnt from {CONFIRMED}/: {event['error']}", file=sys.stderr, flush=True)
        else:
            refused = f"; not learnt (too far above the threshold): {', '.join(event['refused'])}" if event["refused"] else ""
            print(f"learnt {event['photos']} photos confirmed good: threshold {event['threshold_before']:.3f} -> "
                  f"{event['threshold_after']:.3f}, saved to {event['model_file']}{refused}", file=sys.stderr, flush=True)

    watcher = FolderWatcher(model, folder, outputs, settle_s, on_record=show, model_path=model_path, on_event=tell)
    print(f"watching {folder} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    watcher.run(stop)
    return 0
