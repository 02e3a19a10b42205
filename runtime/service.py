"""The HTTP scoring service behind ``serve.py``: one model, one bounded queue, micro-batches.

Every upload goes through the one scoring path (``inspection.scoring.score_batch``): its bytes are
checked, decoded, scored and drawn exactly as ``inference.py`` reads a photo, so a corrupt file or
a decompression bomb gets the same error record (answered 422). Uploads are held in memory; a
multipart file part over 1 MB is also kept in the temporary folder while the form is read (507 when
it cannot be). One thread scores: requests that arrive within ``batch_wait_ms`` of each other share
a batch of up to the model's ``batch_size``; the queue holds at most ``queue_size`` photos.

Memory is bounded before a body is read: a full queue answers 503 with ``Retry-After`` at once,
a body is read as a stream that stops at ``max_upload_mb`` whatever its headers claim (413) or
after ``body_timeout_s`` (408; runtime.connections gives its headers as long), and all bodies
being read or waiting to be scored share a budget of ``queue_size`` x ``max_upload_mb`` (503
beyond it). The service keeps no state but the model file, so any number of replicas can stand
behind a load balancer. Drift warnings and, with ``learn``, POST /feedback (runtime.learning)
watch every scored photo.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from config import UserError, say
from inspection.scoring import Photo, score_batch
from models.backend import resolve_runtime
from models.calibration import promise
from models.patchcore import PatchCore
from output_files import process_alive
from preprocessing.io import IMAGE_SUFFIXES
from runtime.drift import DriftMonitor
from runtime.learning import EventLog, Learner, add_feedback_route

SETTINGS_ENV = "FASTENER_SERVICE_SETTINGS"  # how serve.py hands its settings to each worker process
API_KEY_HEADER = "X-API-Key"
SCRATCH_PREFIX = "fastener_service_"  # scratch folders are named fastener_service_<pid>_<random>


@dataclass(frozen=True)
class ServiceSettings:
    """What serve.py's flags set; plain data, so it can travel to worker processes as JSON."""

    model: str
    runtime: str = "auto"
    device: str | None = None
    api_key: str | None = None
    max_upload_mb: float = 20.0
    queue_size: int = 32
    batch_wait_ms: float = 5.0
    retry_after_s: int = 1
    body_timeout_s: float = 15.0
    learn: bool = False  # POST /feedback: photos confirmed good update the model file (runtime.learning)
    learn_batch: int = 16
    learn_wait_s: float = 60.0
    keep_scored: int = 256  # recent uploads /feedback can name
    events_jsonl: str | None = None  # drift warnings and model updates, one JSON line each

    def __post_init__(self) -> None:
        if not (self.max_upload_mb > 0 and self.queue_size >= 1 and self.batch_wait_ms >= 0
                and self.retry_after_s >= 1 and 0 < self.body_timeout_s < float("inf")):
            raise ValueError("--max-upload-mb must be > 0, --queue-size >= 1, --batch-wait-ms >= 0, --retry-after >= 1, "
                             "--body-timeout > 0")
        if self.learn_batch < 1 or self.learn_wait_s < 0 or self.keep_scored < 1:
            raise ValueError("--learn-batch must be >= 1, --learn-wait-s >= 0, --keep-scored >= 1")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty; an empty key would turn authentication off. Unset it or give one")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


@dataclass
class _Job:
    name: str  # as the client named it
    data: bytes
    heatmap: bool
    done: Future = field(default_factory=Future)  # (HTTP status, record)


class Busy(Exception):
    """The queue (or the memory budget for bodies) is full; the client should retry later."""


class UploadRefused(Exception):
    """A request body refused while it was read (too large, too slow, no room); carries the answer."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


class ByteBudget:
    """Bytes of request bodies held at once, being read or waiting to be scored; taking more than is left fails."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._lock = threading.Lock()

    def take(self, amount: int) -> bool:
        with self._lock:
            if self.held + amount > self.limit:
                return False
            self.held += amount
            return True

    def give(self, amount: int) -> None:
        with self._lock:
            self.held -= amount


class Batcher:
    """One scoring thread fed by a bounded queue; photos that arrive together are scored as one batch."""

    def __init__(self, model: PatchCore, queue_size: int, batch_wait_s: float, scratch: Path) -> None:
        self.model = model
        self.queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self.batch_wait_s = batch_wait_s
        self.scratch = scratch  # heatmap overlays only, each removed once it is in the answer
        self.scored = 0
        # called with (upload name, its bytes, record) for each photo, before its answer is given
        self.on_scored: Callable[[str, bytes, dict[str, Any]], None] | None = None
        self._thread = threading.Thread(target=self._run, name="scoring", daemon=True)
        self._thread.start()

    def submit(self, name: str, data: bytes, heatmap: bool) -> Future:
        """Queue one uploaded photo; raises Busy when the queue is full."""
        job = _Job(name, data, heatmap)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Busy from None
        return job.done

    def stop(self) -> None:
        self.queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch, deadline = [first], time.monotonic() + self.batch_wait_s
            while len(batch) < self.model.config.batch_size:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.queue.put(None)  # stop after this batch
                    break
                batch.append(job)
            self._score(batch)

    def _score(self, batch: list[_Job]) -> None:
        model = self.model  # a model update swaps self.model; it takes effect from the next batch
        for heatmap in (False, True):
            jobs = [job for job in batch if job.heatmap == heatmap]
            if not jobs:
                continue
            # a private name per job: two uploads called part.png in one batch get two overlays
            tokens = [f"{secrets.token_hex(8)}{_suffix(job.name)}" for job in jobs]
            try:
                results = score_batch(
                    model, [Photo(token, job.data) for token, job in zip(tokens, jobs)],
                    self.scratch if heatmap else None,
                )
                for job, token, result in zip(jobs, tokens, results):
                    record = self._record(job, token, result.record)
                    self._watch(job, record)  # before the answer: a /feedback naming the photo may follow at once
                    self.scored += "error" not in record  # what /health calls scored: photos with a verdict
                    job.done.set_result((422 if "error" in record else 200, record))
            except Exception as error:  # a bug must fail these requests with a JSON answer, never the scoring thread
                for job in jobs:
                    if not job.done.done():
                        job.done.set_result((500, {"path": job.name, "error": f"internal error while scoring: "
                                                                              f"{type(error).__name__}"}))

    def _watch(self, job: _Job, record: dict[str, Any]) -> None:
        """Hand a scored photo to ``on_scored`` (drift, /feedback): whatever fails there is one error line,
        never the verdict the photo has already earned."""
        if self.on_scored is None:
            return
        try:
            self.on_scored(job.name, job.data, record)
        except Exception as error:
            say(f"error: {job.name}: scored and answered, but not watched for drift or kept for /feedback "
                f"({type(error).__name__}: {error})")

    @staticmethod
    def _record(job: _Job, token: str, record: dict[str, Any]) -> dict[str, Any]:
        """The scoring record, named by the upload's file name, with the overlay inlined as base64 PNG."""
        record = {**record, "path": job.name}
        if "error" in record:
            record["error"] = record["error"].replace(token, job.name)
        if "heatmap" in record:
            overlay = Path(record.pop("heatmap"))
            record["heatmap_png_base64"] = base64.b64encode(overlay.read_bytes()).decode("ascii")
            overlay.unlink(missing_ok=True)
        return record


def _suffix(name: str) -> str:
    suffix = PurePath(name).suffix.lower()
    return suffix if suffix in IMAGE_SUFFIXES else ".img"


def remove_stale_scratch(parent: Path) -> None:
    """Remove the scratch folders of service processes that are gone (killed before they could clean up)."""
    for folder in parent.glob(f"{SCRATCH_PREFIX}*"):
        match = re.fullmatch(rf"{SCRATCH_PREFIX}(\d+)_.*", folder.name)
        if match and folder.is_dir() and not folder.is_symlink() and not process_alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


def model_summary(model: PatchCore, path: Path) -> dict[str, Any]:
    """What GET /model answers: enough to know which model decides, and how. The time is that of the file
    the model in use was loaded from or last saved to, not of whatever lies at ``path`` now (a copy put back
    while the service runs, or nothing)."""
    config = model.config
    loaded = model.file_identity[3] / 1e9 if model.file_identity else None
    return {
        "model_file": str(path),
        "model_file_modified": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(loaded)) if loaded else None,
        "backbone": config.backbone,
        "weights_identity": model.weights_identity,
        "runtime": resolve_runtime(model.runtime, model.onnx_file, config.device),
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "threshold": model.threshold,
        "promise": promise(model.calibration),
        "calibration": {
            "median": model.calibration_median,
            "robust_spread": model.calibration_std,
            **getattr(model, "calibration", {}),
        },
        "n_train": model.n_train,
        "fit_seconds": model.fit_seconds,
        "decisions": getattr(model, "preprocessing", None),
        "updates": getattr(model, "updates", []),
        "config": config.to_dict(),
    }


def create_app(settings: ServiceSettings) -> FastAPI:
    """The service for one model file: loaded once here, before the first request."""
    model_path = Path(settings.model)
    model = PatchCore.load(model_path, device=settings.device, runtime=settings.runtime)
    model.prepare_to_score()
    remove_stale_scratch(Path(tempfile.gettempdir()))
    scratch = tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}_")
    batcher = Batcher(model, settings.queue_size, settings.batch_wait_ms / 1000, Path(scratch.name))
    drift, learner = watch_the_line(batcher, settings, model_path, Path(scratch.name))
    bodies = ByteBudget(settings.queue_size * settings.max_upload_bytes)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        batcher.stop()
        if learner is not None:
            learner.stop()
        scratch.cleanup()

    app = FastAPI(title="fastener-anomaly-detection", lifespan=lifespan)
    app.add_exception_handler(UploadRefused, lambda _request, refusal: refusal.response)
    app.add_exception_handler(HTTPException, _framework_refusal)
    app.add_exception_handler(RequestValidationError, _invalid_query)

    def refused(request: Request) -> JSONResponse | None:
        """401 for a missing or wrong API key (when the service has one)."""
        if settings.api_key and not secrets.compare_digest(
            request.headers.get(API_KEY_HEADER, "").encode(), settings.api_key.encode()
        ):
            return JSONResponse({"error": f"missing or wrong {API_KEY_HEADER} header"}, status_code=401)
        return None

    def busy() -> JSONResponse:
        return JSONResponse({"error": "busy: the scoring queue is full, retry later"}, status_code=503,
                            headers={"Retry-After": str(settings.retry_after_s)})

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "queued": batcher.queue.qsize(), "queue_size": settings.queue_size,
                "scored": batcher.scored, "drift": drift.status()}

    @app.get("/model")
    def model_info(request: Request) -> Any:
        return refused(request) or json.loads(json.dumps(model_summary(batcher.model, model_path), default=str))

    async def read_upload(request: Request) -> tuple[str, bytes, int]:
        """(name, bytes, bytes held in the budget) of the photo, read as a stream: at most
        ``max_upload_mb`` whatever the headers claim, within ``body_timeout_s``; UploadRefused otherwise.
        The caller gives the held bytes back once it lets go of the photo."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_upload_bytes:
            raise UploadRefused(too_large(f"upload of {int(length):_} bytes"))
        held, chunks = 0, []
        try:
            async with asyncio.timeout(settings.body_timeout_s):
                async for chunk in request.stream():  # counted as it arrives
                    if held + len(chunk) > settings.max_upload_bytes:
                        raise UploadRefused(too_large("upload"))
                    if not bodies.take(len(chunk)):
                        raise UploadRefused(busy())
                    held += len(chunk)
                    chunks.append(chunk)
            name, data = await _upload(request, b"".join(chunks))
        except TimeoutError:
            bodies.give(held)
            raise UploadRefused(JSONResponse({"error": f"the upload took longer than {settings.body_timeout_s:g} s"},
                                             status_code=408, headers={"Connection": "close"})) from None
        except ClientDisconnect:
            bodies.give(held)
            raise UploadRefused(JSONResponse({"error": "the client went away"}, status_code=400)) from None
        except BaseException:
            bodies.give(held)
            raise
        return name, data, held

    @app.post("/score")
    async def score(request: Request, heatmap: bool = False) -> JSONResponse:
        """Score one photo: a multipart upload (any field name) or the raw image bytes as the body."""
        if (answer := refused(request)) is not None:
            return answer
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_upload_bytes:
            return too_large(f"upload of {int(length):_} bytes")
        if batcher.queue.full():  # before a byte of the body is read
            return busy()
        name, data, held = await read_upload(request)
        try:
            if not data:
                return JSONResponse({"path": name, "error": f"{name}: empty upload"}, status_code=400)
            try:
                done = batcher.submit(name, data, heatmap)
            except Busy:
                return busy()
            del data
            status, record = await asyncio.wrap_future(done)
            return JSONResponse(record, status_code=status)
        finally:
            bodies.give(held)

    async def upload_for_feedback(request: Request) -> tuple[str, bytes]:
        """A confirmed photo is written to the learner's folder at once: its bytes leave the budget as soon as read."""
        name, data, held = await read_upload(request)
        bodies.give(held)
        return name, data

    def too_large(what: str) -> JSONResponse:
        return JSONResponse({"error": f"{what} is over the limit of {settings.max_upload_bytes:_} bytes"},
                            status_code=413, headers={"Connection": "close"})

    if learner is not None:
        add_feedback_route(app, learner, refused, upload_for_feedback, settings.max_upload_bytes)
    return app


def watch_the_line(
    batcher: Batcher, settings: ServiceSettings, model_path: Path, scratch: Path
) -> tuple[DriftMonitor, Learner | None]:
    """Drift warnings on every scored photo and, with ``learn``, the learner behind POST /feedback."""
    if settings.learn and (reason := batcher.model.why_learning_fails_here()):
        raise UserError(f"--learn needs torch (requirements.txt) here: {reason}")
    drift, events = DriftMonitor(batcher.model), EventLog(settings.events_jsonl)
    learner = Learner(batcher, model_path, drift, events, scratch, settings.keep_scored, settings.learn_batch,
                      settings.learn_wait_s) if settings.learn else None

    def scored(name: str, data: bytes, record: dict[str, Any]) -> None:
        for event in drift.observe(record):
            events(event)
        if learner is not None:
            learner.remember(name, data, record)

    batcher.on_scored = scored
    return drift, learner


def _framework_refusal(_request: Request, error: HTTPException) -> JSONResponse:
    """What the framework itself refuses (a malformed multipart body, too many files or fields, an
    unknown route) in the service's one answer shape, ``{"error": ...}``, that clients read."""
    return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)


def _invalid_query(_request: Request, error: RequestValidationError) -> JSONResponse:
    """A query value of the wrong type (``heatmap=maybe``) is the client's mistake: 400 with the
    service's answer shape, not the framework's 422, which here means a photo that cannot be read."""
    problems = "; ".join(
        f"{'.'.join(str(part) for part in problem['loc'][1:])}: {problem['msg']}" for problem in error.errors()
    )
    return JSONResponse({"error": problems}, status_code=400)


async def _upload(request: Request, body: bytes) -> tuple[str, bytes]:
    """(file name, bytes) of the photo in a multipart form or a raw body (``?name=`` names a raw one)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()  # case-insensitive
    if media_type == "multipart/form-data":
        sent = False

        async def replay() -> dict[str, Any]:  # the body already read, handed to Starlette's form parser
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=100)
        except OSError as error:  # the framework keeps a file part over 1 MB in the temporary folder
            raise HTTPException(507, f"upload: the service's temporary folder {tempfile.gettempdir()} cannot hold "
                                     f"the file part ({error.strerror}); free space there or send the photo as "
                                     "the raw body") from None
        try:
            for value in form.values():
                if hasattr(value, "read"):
                    return value.filename or "upload", await value.read()
            if form:  # `curl -F "file=<photo.png"` sends the photo's bytes as text, not as a file
                fields = ", ".join(sorted(form.keys()))
                raise HTTPException(400, f"upload: the form holds text ({fields}) but no file; send the photo as a "
                                         "file part (curl -F file=@photo.png) or as the raw body")
        finally:
            await form.close()
        if body:  # the parser drops a part that no boundary line ends: a client that stopped mid-upload
            raise HTTPException(400, "upload: the multipart form holds no whole part; it is cut short or malformed "
                                     "(each part ends at a --BOUNDARY line, the form at --BOUNDARY--)")
        return "upload", b""
    return request.query_params.get("name", "upload"), body


def create_app_from_env() -> FastAPI:
    """Entry point of each uvicorn worker process (``--workers N``): settings come from serve.py."""
    return create_app(ServiceSettings(**json.loads(os.environ[SETTINGS_ENV])))


def settings_env(settings: ServiceSettings) -> str:
    return json.dumps(asdict(settings))
