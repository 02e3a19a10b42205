"""A watched folder (``inference.py --watch DIR``): score each photo a camera writes there, exactly once.

A photo is known by what it is, not by its name: its device, inode, size and modification time
(``identity``). A camera that reuses a name (``frame.jpg``, a counter reset) writes a new photo,
and it is scored; restarting on the same folder under another spelling (a symlink, a relative
path) scores nothing twice. A recorded photo counts as seen only while its recorded name still
holds it (a rename seen while watching moves the name along): a file system hands a deleted
photo's inode to the next new file, a camera's uncompressed photos share one size and copies keep
their times (``cp -p``, ``rsync -t``), so a new photo may carry a deleted one's identity under
another name, and it is scored. A photo renamed while the watcher is down is scored again.

A photo is read once it has kept the same identity for ``settle_s`` seconds. A photo that cannot
be read or decoded is read again each time it changes (a camera writing over FTP or SMB pauses
between pieces) and gets its error record only once it has stayed unchanged for ``retry_s``.
Photos go through the one scoring path (``inspection.scoring.score_batch``) in batches.

Each batch is journalled in a state file before its records are appended: the records, and where
``--jsonl``/``--csv`` ended before them. A crash or a failed write (full disk, read-only folder)
is repaired by cutting the result files back to that point and appending the batch again, so
every photo ends with exactly one record. A write that fails is retried every ``RETRY_WRITE_S``
with an ``error:`` line each time, and scoring waits meanwhile; the watcher never exits on it.
With ``--sort-into OUT`` each photo then moves to ``OUT/ok``, ``OUT/anomalous`` or
``OUT/unreadable``, under a free name (``frame_2.jpg``) when one is taken; a move that fails is
retried the same way, and photos recorded but not yet moved are moved at the next start. With
``--visualize`` each photo's heatmap overlay is written before its record, under a free name too,
so a reused name never draws over an earlier photo's heatmap; one that cannot be written is a
warning on the record, never a stop.

Learning on the line: photos an operator moves into ``OUT/confirmed_good`` are added to the model
(``PatchCore.add_good``), which is saved over its file (the file it replaces kept beside it) and
scores from the next batch on; they then move to ``OUT/learned``, or to ``OUT/not_learned`` when
they score too far above the threshold to be taken as good. A rolling window of verdicts warns of
drift (runtime.drift). Updates and drift warnings are JSON lines with an ``event`` field in
``--jsonl``, journalled with the batch that raised them.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config import printable, say
from inspection.scoring import Photo, error_record, heatmap_path, records_csv, score_batch
from models.patchcore import learn_on_a_copy
from output_files import (
    NAME_MAX_BYTES, OutputError, check_output_folder, check_writable, cut_to_bytes, encoded, write_atomically
)
from preprocessing.io import IMAGE_SUFFIXES, ImageReadError, read_photo_bytes
from runtime.drift import DriftMonitor

VERDICTS = ("ok", "anomalous", "unreadable")
CONFIRMED, LEARNED, NOT_LEARNED = "confirmed_good", "learned", "not_learned"  # folders under --sort-into
RETRY_WRITE_S = 5.0  # how often a failed write or move is tried again


@dataclass
class WatchOutputs:
    """Where results go (at least one of jsonl, csv, sort_into) and the state file that makes restarts safe.

    The state file defaults to ``<jsonl>.state``, else ``<csv>.state``, else ``OUT/.watch-state``.
    """

    jsonl: Path | None = None
    csv: Path | None = None
    sort_into: Path | None = None
    heatmaps: Path | None = None  # a heatmap overlay per photo, named as the photo
    state: Path | None = None

    def __post_init__(self) -> None:
        if not (self.jsonl or self.csv or self.sort_into):
            raise ValueError("--watch needs somewhere to put results: --jsonl, --csv and/or --sort-into")
        if self.state is None:
            first = self.jsonl or self.csv
            self.state = first.with_name(first.name + ".state") if first else self.sort_into / ".watch-state"

    def check(self, folder: Path) -> None:
        """Refuse, before the model scores anything, an output that cannot be written (OutputError), or a
        file named for two outputs (by any spelling): one would write over the other's records."""
        files = [(flag, path) for flag, path in (("--jsonl", self.jsonl), ("--csv", self.csv), ("--state", self.state))
                 if path]
        for (flag, path), (other_flag, other) in itertools.combinations(files, 2):
            if path.resolve() == other.resolve():
                raise OutputError(f"{path}: named by both {flag} and {other_flag}; give each its own file")
        for _, path in files:
            check_writable(path)
        if self.heatmaps:
            check_output_folder(self.heatmaps)
        if self.sort_into:
            for verdict in VERDICTS:
                check_output_folder(self.sort_into / verdict)
            if not os.access(folder, os.W_OK):  # moving a photo out removes its name from the folder
                raise PermissionError(13, "cannot move photos out of it (read-only)", str(folder))


def identity(path: Path) -> str | None:
    """What the name ``path`` holds now: device, inode, size and modification time (a symbolic link:
    its own device and inode, its target's size and time); None when nothing is there."""
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        return None
    try:
        target = os.stat(path)
    except OSError:  # a broken link or a loop: the link itself
        target = link
    return f"{link.st_dev}:{link.st_ino}:{target.st_size}:{target.st_mtime_ns}"


def verdict_of(record: dict[str, Any]) -> str:
    return "unreadable" if "error" in record else "anomalous" if record["is_anomalous"] else "ok"


def _write_at(path: Path, offset: int, text: str) -> int:
    """Cut ``path`` back to ``offset`` bytes and append ``text``, synced; returns the new size.

    Whatever a failed or interrupted earlier attempt left after ``offset`` is dropped, so writing
    a batch again never doubles it or leaves half a line.
    """
    data = encoded(text)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        os.ftruncate(descriptor, offset)
        os.lseek(descriptor, offset, os.SEEK_SET)
        written = 0
        while written < len(data):
            written += os.write(descriptor, data[written:])
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return offset + len(data)


def _size(path: Path | None) -> int | None:
    return None if path is None else path.stat().st_size if path.is_file() else 0


def _ensure_line_start(path: Path) -> None:
    """A line torn outside the journal (an edit, an older writer) must not swallow the next record."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")


@dataclass
class _Batch:
    """Records of photos scored together, where the result files ended before them, and each photo's identity."""

    records: list[dict[str, Any]]
    photos: list[dict[str, str]]  # {"id", "path", "verdict"}
    events: list[dict[str, Any]] = field(default_factory=list)  # model updates and drift warnings (JSON lines only)
    jsonl: int | None = None
    csv: int | None = None
    journalled: bool = False
    recorded: bool = False


@dataclass
class _Pending:
    """A name the watcher keeps looking at until its photo is recorded."""

    identity: str | None = None
    changed_at: float = 0.0
    failed: dict[str, Any] | None = None  # the error record of the last read, while the photo stays as it was
    failed_identity: str | None = None


@dataclass(frozen=True)
class _Recorded:
    """A photo recorded while in the watched folder: the file name it had there, and its verdict."""

    name: str
    verdict: str


@dataclass
class _Unsorted:
    identity: str
    verdict: str
    since: float = field(default_factory=time.monotonic)


class FolderWatcher:
    """Scores the photos that appear in ``folder`` (not its subfolders) with ``model``."""

    def __init__(self, model: Any, folder: Path, outputs: WatchOutputs, settle_s: float = 0.5,
                 poll_s: float = 0.1, on_record: Callable[[dict[str, Any]], None] | None = None,
                 retry_s: float = 30.0, model_path: Path | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder to watch")
        outputs.check(folder)
        self.model, self.folder, self.outputs = model, folder, outputs
        self.settle_s, self.poll_s, self.retry_s = settle_s, poll_s, retry_s
        self.on_record = on_record or (lambda record: None)
        self.on_event = on_event or (lambda event: None)
        self.drift = DriftMonitor(model)
        self.model_path = model_path  # where learnt photos are saved; no learning without it
        self.confirmed = outputs.sort_into / CONFIRMED if outputs.sort_into and model_path else None
        self.done: dict[str, _Recorded] = {}  # identity -> every recorded photo still in the folder
        self._pending: dict[Path, _Pending] = {}
        self._unsorted: dict[Path, _Unsorted] = {}
        self._outbox: _Batch | None = None
        self._retry_at = 0.0  # when a failed write is tried again
        self._sort_retry_at = 0.0  # when a failed move is tried again
        self._lock = threading.Lock()
        self._state_size = 0
        self._folders_told: set[Path] = set()  # folders put into a watched folder, said once each
        self._recover()

    # ------------------------------------------------------------------------- the state file
    def _recover(self) -> None:
        """Read the journal, finish a batch a crash or a failed write left half done, move what was
        recorded but not sorted, and rewrite the journal with the photos still in the folder."""
        state = self.outputs.state
        unfinished: _Batch | None = None
        journal = state.read_bytes() if state.is_file() else b""
        self._state_size = journal.rfind(b"\n") + 1  # a torn last line is written over
        if journal:
            for line in journal.decode("utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:  # a torn last line: its batch was never appended
                    continue
                if "batch" in entry:
                    unfinished = _Batch(**entry["batch"], journalled=True)
                elif entry.get("written") and unfinished is not None:
                    self._finish(unfinished)
                    unfinished = None
        if unfinished is not None:
            self._write_batch(unfinished)
            self._finish(unfinished)
        for path in (self.outputs.jsonl, self.outputs.csv):
            if path:
                _ensure_line_start(path)
        self.done = {photo_id: seen for photo_id, seen in self.done.items() if self._recorded_already(photo_id)}
        if self.outputs.sort_into:
            for photo_id, seen in list(self.done.items()):
                self._unsorted[self.folder / seen.name] = _Unsorted(photo_id, seen.verdict)
            self._sort_waiting()
        kept = [{"id": photo_id, "path": str(self.folder / seen.name), "verdict": seen.verdict}
                for photo_id, seen in self.done.items()]
        lines = json.dumps({"batch": {"records": [], "photos": kept}}) + "\n" + json.dumps({"written": True}) + "\n"
        write_atomically(state, lines)
        self._state_size = state.stat().st_size

    def _finish(self, batch: _Batch) -> None:
        for photo in batch.photos:
            self.done[photo["id"]] = _Recorded(Path(photo["path"]).name, photo["verdict"])

    def _recorded_already(self, photo_id: str) -> bool:
        """Whether the photo ``photo_id`` names was recorded and its recorded name still holds it (the
        identity alone may be a deleted photo's, handed on to a new file)."""
        seen = self.done.get(photo_id)
        return seen is not None and identity(self.folder / seen.name) == photo_id

    def _write_batch(self, batch: _Batch) -> None:
        """Journal the batch, append its records at the recorded ends of the result files, mark it written.

        Each step starts again from a known size, so calling this again after any failure is safe.
        """
        if not batch.journalled:
            batch.jsonl, batch.csv = _size(self.outputs.jsonl), _size(self.outputs.csv)
            entry = {"batch": {"records": batch.records, "photos": batch.photos, "events": batch.events,
                               "jsonl": batch.jsonl, "csv": batch.csv}}
            self._state_size = _write_at(self.outputs.state, self._state_size, json.dumps(entry) + "\n")
            batch.journalled = True
        if not batch.recorded:  # a result file given only since the batch was journalled is left alone
            if self.outputs.jsonl and batch.jsonl is not None:
                lines = [json.dumps(line) + "\n" for line in (*batch.records, *batch.events)]
                _write_at(self.outputs.jsonl, batch.jsonl, "".join(lines))
            if self.outputs.csv and batch.csv is not None and batch.records:
                rows = records_csv(batch.records)  # header line first: only a new file gets it
                _write_at(self.outputs.csv, batch.csv, rows if batch.csv == 0 else rows.split("\n", 1)[1])
            self._state_size = _write_at(self.outputs.state, self._state_size, json.dumps({"written": True}) + "\n")
            batch.recorded = True

    # ------------------------------------------------------------------------- watching
    def _is_photo(self, path: Path) -> bool:
        """A photo in the watched folder, or one an operator confirmed good (learning on the line)."""
        watched = path.parent == self.folder or (self.confirmed is not None and path.parent == self.confirmed)
        return watched and path.suffix.lower() in IMAGE_SUFFIXES

    def notice(self, path: Path) -> None:
        """Something happened to ``path``: look at it again until its photo is recorded. A folder put into a
        watched folder (a camera's dated folder) is said once: its photos would otherwise wait there unseen."""
        if self._is_photo(path):
            with self._lock:
                self._pending.setdefault(path, _Pending())
        elif (path.parent in (self.folder, self.confirmed) and path not in self._folders_told
              and path not in (self.outputs.sort_into, self.outputs.heatmaps) and path.is_dir()):
            self._folders_told.add(path)
            say(f"warning: {path}: a folder; only the photos directly in {path.parent} are read, not those in "
                "folders within it: move its photos up")

    def renamed(self, source: Path, target: Path) -> None:
        """A recorded photo renamed within the folder stays recorded, under its new name."""
        if source.parent != self.folder or target.parent != self.folder:
            return
        photo_id = identity(target)
        with self._lock:
            seen = self.done.get(photo_id)  # None when the target is gone already
            if seen is not None and seen.name == source.name:
                self.done[photo_id] = _Recorded(target.name, seen.verdict)
            if source in self._unsorted:  # recorded, not yet moved: it moves from its new name
                self._unsorted[target] = self._unsorted.pop(source)

    def run(self, stop: threading.Event | StopFlag) -> None:
        """Watch until ``stop`` is set; photos already there when it starts are scored first."""
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class Handler(FileSystemEventHandler):
            """Writes only: the watcher's own reads of a photo (opened, closed unwritten) are no news."""

            def on_created(self, event: FileSystemEvent) -> None:
                self.written(event.src_path)

            def on_modified(self, event: FileSystemEvent) -> None:
                self.written(event.src_path)

            def on_closed(self, event: FileSystemEvent) -> None:
                self.written(event.src_path)

            def on_moved(self, event: FileSystemEvent) -> None:
                if not event.is_directory:
                    watcher.renamed(Path(os.fsdecode(event.src_path)), Path(os.fsdecode(event.dest_path)))
                self.written(event.dest_path)

            @staticmethod
            def written(path: str | bytes) -> None:
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
                self.step()
                stop.wait(self.poll_s)
        finally:
            observer.stop()
            observer.join()

    def step(self) -> None:
        """One look at the folder: retry what failed to be written or moved, then score what is ready."""
        if self._outbox is not None and (time.monotonic() < self._retry_at or not self._deliver(self._outbox)):
            return  # nothing new is scored while a batch waits to be written
        self._sort_waiting()
        ready, given_up = self._look()
        self._record(given_up)
        photos = [(path, photo_id) for path, photo_id in ready if path.parent == self.folder]
        size = max(1, self.model.config.batch_size)
        for start in range(0, len(photos), size):
            if self._outbox is not None:
                return
            self._score(photos[start : start + size])
        confirmed = [path for path, _ in ready if path.parent != self.folder]
        if confirmed and self._outbox is None:
            self._learn(confirmed)

    def _look(self) -> tuple[list[tuple[Path, str]], list[tuple[Path, str, dict[str, Any]]]]:
        """(photos to read now, photos whose error record is final) among the pending names."""
        now, ready, given_up = time.monotonic(), [], []
        with self._lock:
            for path, seen in list(self._pending.items()):
                current = identity(path)
                if current is None or self._recorded_already(current):  # gone, or recorded already
                    del self._pending[path]
                elif current != seen.identity:
                    seen.identity, seen.changed_at = current, now
                elif now - seen.changed_at < self.settle_s:
                    continue
                elif seen.failed_identity != current:
                    ready.append((path, current))
                elif now - seen.changed_at >= self.retry_s:  # unreadable, and unchanged for retry_s
                    given_up.append((path, current, seen.failed))
        return sorted(ready), given_up

    def _score(self, ready: list[tuple[Path, str]]) -> None:
        """Read each photo once, check it is still the one that settled, score the batch, record the results."""
        max_pixels = self.model.config.max_image_pixels
        photos, sources = [], []
        for path, photo_id in ready:
            try:
                source: bytes | ImageReadError = read_photo_bytes(path, max_pixels)
            except ImageReadError as error:
                source = error
            if identity(path) != photo_id:  # changed while it was read: look again once it settles
                continue
            photos.append((path, photo_id))
            sources.append(source)
        drawn: set[str] = set()  # heatmap names taken in this batch, before any is written
        readable = [Photo(self._heatmap_name(path.name, drawn), source, origin=str(path))
                    for (path, _), source in zip(photos, sources) if isinstance(source, bytes)]
        scored = iter(score_batch(self.model, readable, self.outputs.heatmaps))
        records = [error_record(str(path), source) if isinstance(source, ImageReadError) else next(scored).record
                   for (path, _), source in zip(photos, sources)]
        finished = []
        with self._lock:
            for (path, photo_id), record in zip(photos, records):
                seen = self._pending.get(path)
                if "error" in record and seen is not None and time.monotonic() - seen.changed_at < self.retry_s:
                    seen.failed, seen.failed_identity = record, photo_id  # read again when it changes
                else:
                    finished.append((path, photo_id, record))
        self._record(finished)

    def _heatmap_name(self, name: str, drawn: set[str]) -> str:
        """The name a photo's overlay is drawn under, added to ``drawn``: a reused name (a camera's
        ``frame.png``) gets ``frame_2.png_heatmap.png``, so each record's heatmap stays the photo it scored."""
        heatmaps = self.outputs.heatmaps
        if heatmaps is None:
            return name
        free = _free_name(name, lambda other: other in drawn or os.path.lexists(heatmap_path(heatmaps, other)))
        drawn.add(free)
        return free

    def _record(self, finished: list[tuple[Path, str, dict[str, Any]]]) -> None:
        if not finished:
            return
        with self._lock:
            for path, _, _ in finished:
                self._pending.pop(path, None)
        records = [record for _, _, record in finished]
        batch = _Batch(
            records=records,
            photos=[{"id": photo_id, "path": str(path), "verdict": verdict_of(record)} for path, photo_id, record in finished],
            events=[event for record in records for event in self.drift.observe(record)],
        )
        for path, photo_id, record in finished:
            self.done[photo_id] = _Recorded(path.name, verdict_of(record))
            if self.outputs.sort_into:
                self._unsorted[path] = _Unsorted(photo_id, verdict_of(record))
        if self._deliver(batch):
            self._sort_waiting()

    def _deliver(self, batch: _Batch) -> bool:
        """Write the batch; on failure keep it to retry, say so loudly, and report False."""
        try:
            self._write_batch(batch)
        except OSError as error:
            self._outbox, self._retry_at = batch, time.monotonic() + RETRY_WRITE_S
            where = f"{error.filename}: " if error.filename else ""
            say(f"error: {where}results cannot be written ({error.strerror or error}); "
                f"{len(batch.records)} records kept, retrying in {RETRY_WRITE_S:g} s")
            return False
        if self._outbox is batch:
            say(f"results written again after a failed write ({len(batch.records)} records)")
        self._outbox = None
        for record in batch.records:
            self.on_record(record)
        for event in batch.events:
            self.on_event(event)
        return True

    def _learn(self, paths: list[Path]) -> None:
        """Add photos confirmed good to the model, save it (keeping the file it replaces), score on with it."""
        assert self.confirmed is not None and self.model_path is not None and self.outputs.sort_into is not None
        with self._lock:
            for path in paths:
                self._pending.pop(path, None)
        updated, update = learn_on_a_copy(self.model, self.model_path, paths, [path.name for path in paths],
                                          str(self.confirmed))
        if updated is not None:
            self.model = updated
            self.drift.reset(updated)
        refused = set(update["refused"])
        for path in paths:
            try:
                _move_to_free_name(path, self.outputs.sort_into / (NOT_LEARNED if path.name in refused else LEARNED))
            except OSError as error:
                say(f"error: {path}: cannot be moved out of {CONFIRMED}/ ({error.strerror or error})")
        self._deliver(_Batch(records=[], photos=[], events=[{"event": "update", "model_file": str(self.model_path),
                                                             **update}]))

    def _sort_waiting(self) -> None:
        """Move each recorded photo into OUT/<verdict>, unless the name now holds another photo."""
        if time.monotonic() < self._sort_retry_at:
            return
        failed = False
        for path, unsorted in list(self._unsorted.items()):
            if identity(path) != unsorted.identity:  # moved away, or replaced by a new photo: nothing to move
                del self._unsorted[path]
                continue
            try:
                _move_to_free_name(path, self.outputs.sort_into / unsorted.verdict)
            except OSError as error:
                failed = True
                say(f"error: {path}: cannot be moved to {self.outputs.sort_into / unsorted.verdict} "
                    f"({error.strerror or error}); its record is written, retrying in {RETRY_WRITE_S:g} s")
                continue
            del self._unsorted[path]
            self.done.pop(unsorted.identity, None)  # out of the folder: only the journal remembers it
        if failed:
            self._sort_retry_at = time.monotonic() + RETRY_WRITE_S


def _free_name(name: str, taken: Callable[[str], bool]) -> str:
    """``name``, or ``<stem>_2<suffix>``, ``<stem>_3<suffix>``, ...: the first that is not ``taken``; the
    stem is cut where a number would take the name past the 255 bytes file systems allow."""
    stem, suffix = Path(name).stem, Path(name).suffix

    def numbered(number: int) -> str:
        ending = f"_{number}{suffix}"
        return cut_to_bytes(stem, NAME_MAX_BYTES - len(os.fsencode(ending))) + ending

    candidates = itertools.chain([name], map(numbered, itertools.count(2)))
    return next(candidate for candidate in candidates if not taken(candidate))


def _move_to_free_name(path: Path, folder: Path) -> Path:
    """Move ``path`` into ``folder`` under its own name, or ``<stem>_2<suffix>``, ... when that is taken."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / _free_name(path.name, lambda name: os.path.lexists(folder / name))  # only the watcher writes here
    shutil.move(str(path), str(target))
    return target


class StopFlag:
    """What SIGINT and SIGTERM set to end ``watch_until_stopped``: a plain attribute, safe to set from a
    signal handler. Not a ``threading.Event``: the handler runs on the main thread between any two of its
    steps, also inside ``Event.wait`` while that holds the Event's lock (the watch loop waits on it ten
    times a second), and ``Event.set`` would then wait for that lock for ever: the watcher never exited."""

    def __init__(self) -> None:
        self.stopped = False

    def set(self) -> None:
        self.stopped = True

    def is_set(self) -> bool:
        return self.stopped

    def wait(self, timeout: float) -> bool:
        time.sleep(timeout)  # a signal cuts no wait short: the loop looks again within ``timeout``
        return self.stopped


def watch_until_stopped(model: Any, folder: Path, outputs: WatchOutputs, settle_s: float, retry_s: float,
                        model_path: Path | None = None) -> int:
    """``inference.py --watch``: print one line per photo until Ctrl-C or SIGTERM; exit status 0."""
    import signal

    stop = StopFlag()
    for stopping in (signal.SIGINT, signal.SIGTERM):  # finish the batch in hand, then stop
        signal.signal(stopping, lambda *_: stop.set())

    def show(record: dict[str, Any]) -> None:  # names with their control characters escaped (printable)
        if "error" in record:
            say(f"error: {record['error']}")
        else:
            verdict = "ANOMALOUS" if record["is_anomalous"] else "ok"
            print(printable(f"{record['path']}  {record['score']:.3f}  {verdict}"), flush=True)

    def tell(event: dict[str, Any]) -> None:
        if event["event"] == "drift":
            say(f"warning: {event['warning']}")
        elif "error" in event:
            say(f"error: nothing learnt from {CONFIRMED}/: {event['error']}")
        else:
            refused = f"; not learnt (too far above the threshold): {', '.join(event['refused'])}" if event["refused"] else ""
            again = event.get("already_learnt")
            repeated = f"; learnt already, not added again: {', '.join(again)}" if again else ""
            if event["photos"]:
                say(f"learnt {event['photos']} photos confirmed good: threshold {event['threshold_before']:.3f} -> "
                    f"{event['threshold_after']:.3f}, saved to {event['model_file']}{refused}{repeated}")
            else:
                say(f"learnt nothing from {CONFIRMED}/, {event['model_file']} is unchanged{refused}{repeated}")

    model.prepare_to_score()
    watcher = FolderWatcher(model, folder, outputs, settle_s, on_record=show, retry_s=retry_s, model_path=model_path,
                            on_event=tell)
    if watcher.confirmed is not None and (reason := model.why_learning_fails_here()):
        say(f"warning: photos moved into {watcher.confirmed} cannot be learnt here, they go to {NOT_LEARNED}/: "
            f"learning needs torch (requirements.txt): {reason}")
    print(f"watching {folder} (Ctrl-C to stop); state: {outputs.state}", file=sys.stderr, flush=True)
    watcher.run(stop)
    return 0
