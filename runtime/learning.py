"""Learning on the line for the HTTP service: ``POST /feedback`` and drift warnings.

An operator confirms a flagged part as good, naming a photo the service scored (it keeps the last
``keep_scored`` uploads) or sending the photo. Confirmed photos wait in a bounded queue; a
background thread folds them in (``PatchCore.add_good``) on a copy of the model, once
``learn_batch`` have gathered or ``learn_wait_s`` after the first, saves it over the model file
(keeping the file it replaces, ``models.patchcore.learn_on_a_copy``) and hands it to the scorer,
which takes it up at its next batch: no photo is ever scored by half an update. Every scored photo
also feeds a ``DriftMonitor``. Updates and drift warnings are logged and, with ``events_jsonl``,
appended to a JSON-lines file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePath
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from config import UserError, say
from models.patchcore import PatchCore, learn_on_a_copy
from preprocessing.io import IMAGE_SUFFIXES
from runtime.drift import DriftMonitor

log = logging.getLogger("fastener.service")


class Scorer(Protocol):
    """The part of the service's batcher learning needs: the model it scores with, swappable."""

    model: PatchCore


class Busy(Exception):
    """Too many confirmed photos wait for the next update."""


@dataclass
class _Confirmed:
    name: str
    path: Path
    force: bool


class EventLog:
    """Drift warnings and model updates: a log line each, and a JSON line when a file is given.

    A line that cannot be appended (a full disk) is an error line on stderr and is not tried again; the next
    event tries the file anew. Events are side outputs: they never cost a verdict nor the learning thread."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        if event["event"] == "drift":
            log.warning(event["warning"])
        else:
            log.warning("model update: %s", json.dumps(event))
        if self.path is None:
            return
        try:
            with self._lock, open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(event) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            say(f"error: {self.path}: the {event['event']} event cannot be written ({error.strerror or error})")


class Learner:
    """Keeps recent uploads, queues confirmed ones and folds them into the model on its own thread."""

    def __init__(self, scorer: Scorer, model_path: Path, drift: DriftMonitor, events: EventLog, scratch: Path,
                 keep: int, batch: int, wait_s: float) -> None:
        self.scorer, self.model_path, self.drift, self.events = scorer, model_path, drift, events
        self.keep, self.batch, self.wait_s = keep, batch, wait_s
        self.folder = Path(tempfile.mkdtemp(prefix="feedback_", dir=scratch))
        self._kept: OrderedDict[str, tuple[Path, float]] = OrderedDict()  # upload name -> (file, score)
        self._pending: list[_Confirmed] = []
        self._first_at = 0.0
        self._changed = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="learning", daemon=True)
        self._thread.start()

    def remember(self, name: str, data: bytes, record: dict[str, Any]) -> None:
        """Keep a scored upload on disk, so that /feedback can name it (called on the scoring thread).

        One that cannot be kept (a full temporary folder) is one error line and leaves its name naming no
        photo: an older photo of the same name must never be learnt in its place."""
        if "error" in record:
            return
        try:
            kept = self._write(name, data)
        except OSError as error:
            kept = None
            say(f"error: {name}: cannot be kept for POST /feedback to name ({error.strerror or error}); "
                "to confirm it good, send the photo")
        with self._changed:
            replaced = self._kept.pop(name, None)  # the latest photo of a name is the one it names
            if kept is not None:
                self._kept[name] = (kept, float(record["normalized_score"]))
            evicted = [self._kept.popitem(last=False)[1] for _ in range(len(self._kept) - self.keep)]
        for old, _ in filter(None, [replaced, *evicted]):
            old.unlink(missing_ok=True)

    def confirm_scored(self, name: str, force: bool) -> int:
        """Queue a photo the service scored; KeyError when it is not (or no longer) kept, UserError when it
        scored too far above the threshold to be taken as good without ``force``."""
        with self._changed:
            path, normalized = self._kept[name]
            limit = self.scorer.model.config.good_score_limit
            if normalized > limit and not force:
                raise UserError(
                    f"{name} scored {normalized:.2f} x the threshold, above the {limit:g} x a photo confirmed "
                    "good may score: it looks defective; check it, or send force=true to add it anyway"
                )
            waiting = self._queue(_Confirmed(name, path, force))  # on Busy the photo stays kept, to name again
            del self._kept[name]
            return waiting

    def confirm_upload(self, name: str, data: bytes, force: bool) -> int:
        """Queue a photo sent with the confirmation (the update itself checks how far above the threshold it scores)."""
        path = self._write(name, data)
        with self._changed:
            try:
                return self._queue(_Confirmed(name, path, force))
            except Busy:
                path.unlink(missing_ok=True)
                raise

    def stop(self) -> None:
        """Learn what waits, then end the thread: a photo answered 202 is never dropped by a restart."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join()

    def _queue(self, confirmed: _Confirmed) -> int:
        """Add to the queue (the caller holds the lock); the number waiting, or Busy when it is full."""
        if len(self._pending) >= self.keep:
            raise Busy
        if not self._pending:
            self._first_at = time.monotonic()
        self._pending.append(confirmed)
        self._changed.notify_all()
        return len(self._pending)

    def _write(self, name: str, data: bytes) -> Path:
        """A new file in the learner's folder holding ``data``; OSError (with no file left behind) when it cannot be.
        The folder is made again when it is gone: a cleaner of old temporary files removes it on a quiet line."""
        self.folder.mkdir(parents=True, exist_ok=True)
        suffix = PurePath(name).suffix.lower()
        handle, path = tempfile.mkstemp(dir=self.folder, suffix=suffix if suffix in IMAGE_SUFFIXES else ".img")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
        except OSError:
            os.unlink(path)
            raise
        return Path(path)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._stopping and (
                    not self._pending
                    or (len(self._pending) < self.batch and time.monotonic() - self._first_at < self.wait_s)
                ):
                    self._changed.wait(timeout=None if not self._pending else
                                       max(0.0, self._first_at + self.wait_s - time.monotonic()))
                if not self._pending:  # stopping, with nothing left to learn
                    return
                taken, self._pending = self._pending, []
            done = []  # the updates' events, told once their photos are gone: an event means the update is over
            try:
                for force in (False, True):
                    group = [item for item in taken if item.force == force]
                    if group:
                        done.append(self._learn(group, force))
            except Exception as error:  # a bug must cost this update, never the learning thread
                log.exception("model update failed: %s", error)
                done.append({"event": "update", "photos": 0, "error": str(error),
                             "refused": [item.name for item in taken]})
            finally:
                for item in taken:
                    item.path.unlink(missing_ok=True)
            for event in done:
                self.events(event)

    def _learn(self, group: list[_Confirmed], force: bool) -> dict[str, Any]:
        """One update on a copy of the model: saved, then swapped in for the scorer's next batch; its event."""
        updated, update = learn_on_a_copy(self.scorer.model, self.model_path, [item.path for item in group],
                                          [item.name for item in group], "POST /feedback", force)
        if updated is not None:
            self.scorer.model = updated
            self.drift.reset(updated)
        return {"event": "update", "model_file": str(self.model_path), **update}


def add_feedback_route(
    app: FastAPI,
    learner: Learner,
    refused: Callable[[Request], JSONResponse | None],
    read_upload: Callable[[Request], Awaitable[tuple[str, bytes]]],
    max_bytes: int,
) -> None:
    """``POST /feedback?verdict=good``: a photo the service scored (``name=``) or the photo itself, confirmed good.

    ``refused`` answers a request without the API key, ``read_upload`` reads a photo as /score does.
    """

    @app.post("/feedback")
    async def feedback(request: Request, verdict: str = "", name: str = "", force: bool = False) -> JSONResponse:
        if (answer := refused(request)) is not None:
            return answer
        if verdict != "good":
            return JSONResponse({"error": "verdict must be 'good': only photos confirmed good are learnt"},
                                status_code=400)
        length = request.headers.get("content-length", "0")
        if length.isdigit() and int(length) > max_bytes:
            return JSONResponse({"error": f"upload of {int(length):_} bytes is over the limit of {max_bytes:_}"},
                                status_code=413)
        try:
            if length not in ("", "0"):
                upload_name, data = await read_upload(request)
                if not data:
                    return JSONResponse({"error": f"{upload_name}: empty upload"}, status_code=400)
                name = name or upload_name
                waiting = learner.confirm_upload(name, data, force)
            elif name:
                waiting = learner.confirm_scored(name, force)
            else:
                return JSONResponse({"error": "send the photo, or name= a photo the service scored"}, status_code=400)
        except KeyError:
            return JSONResponse({"error": f"{name}: not among the last {learner.keep} photos scored; send the photo"},
                                status_code=404)
        except UserError as error:
            return JSONResponse({"error": str(error)}, status_code=409)
        except Busy:
            return JSONResponse({"error": "busy: too many confirmed photos wait for the next update"}, status_code=503)
        except OSError as error:  # the photo waits for the update on disk: a full temporary folder refuses it
            return JSONResponse({"error": f"{name}: the service's temporary folder {learner.folder} cannot keep the "
                                          f"photo until the next update ({error.strerror or error}); free space "
                                          "there and send it again"}, status_code=507)
        return JSONResponse({"queued": name, "waiting": waiting}, status_code=202)
