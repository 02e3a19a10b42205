"""The HTTP scoring service behind ``serve.py``: one model, one bounded queue, micro-batches.

Every upload goes through the one scoring path (``inspection.scoring.score_batch``): it is written to
a private scratch file and read, checked, scored and drawn exactly as ``inference.py`` reads a
photo, so a corrupt file or a decompression bomb gets the same error record (answered 422). One
thread scores: requests that arrive within ``batch_wait_ms`` of each other share a batch of up to
the model's ``batch_size``; the queue holds at most ``queue_size`` photos, and a full queue answers
503 with ``Retry-After`` instead of growing. The service keeps no state but the model file, so any
number of replicas can stand behind a load balancer.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import queue
import secrets
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
from fastapi.responses import JSONResponse

import numpy as np

from config import UserError
from models.backend import resolve_runtime
from models.calibration import promise
from models.patchcore import PatchCore
from preprocessing.io import IMAGE_SUFFIXES
from inspection.scoring import Photo, score_batch
from runtime.drift import DriftMonitor
from runtime.learning import EventLog, Learner, add_feedback_route

SETTINGS_ENV = "FASTENER_SERVICE_SETTINGS"  # how serve.py hands its settings to each worker process
API_KEY_HEADER = "X-API-Key"


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
    learn: bool = False  # POST /feedback: photos confirmed good update the model file (runtime.learning)
    learn_batch: int = 16
    learn_wait_s: float = 60.0
    keep_scored: int = 256  # recent uploads /feedback can name
    events_jsonl: str | None = None  # drift warnings and model updates, one JSON line each

    def __post_init__(self) -> None:
        if self.max_upload_mb <= 0 or self.queue_size < 1 or self.batch_wait_ms < 0 or self.retry_after_s < 1:
            raise ValueError("--max-upload-mb must be > 0, --queue-size >= 1, --batch-wait-ms >= 0, --retry-after >= 1")
        if self.learn_batch < 1 or self.learn_wait_s < 0 or self.keep_scored < 1:
            raise ValueError("--learn-batch must be >= 1, --learn-wait-s >= 0, --keep-scored >= 1")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


@dataclass
class _Job:
    name: str
    path: Path
    heatmap: bool
    done: Future = field(default_factory=Future)


class Busy(Exception):
    """The queue is full; the client should retry later."""


class Batcher:
    """One scoring thread fed by a bounded queue; photos that arrive together are scored as one batch."""

    def __init__(self, model: PatchCore, queue_size: int, batch_wait_s: float, scratch: Path) -> None:
        self.model = model
        self.queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self.batch_wait_s = batch_wait_s
        self.scratch = scratch
        self.scored = 0
        # called with (upload name, scratch file, record) after each photo's answer, before its file is removed
        self.on_scored: Callable[[str, Path, dict[str, Any]], None] | None = None
        self._thread = threading.Thread(target=self._run, name="scoring", daemon=True)
        self._thread.start()

    def submit(self, name: str, data: bytes, heatmap: bool) -> Future:
        """Queue one uploaded photo; raises Busy when the queue is full (nothing is written then)."""
        if self.queue.full():
            raise Busy
        suffix = PurePath(name).suffix.lower()
        handle, path = tempfile.mkstemp(dir=self.scratch, suffix=suffix if suffix in IMAGE_SUFFIXES else ".img")
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        job = _Job(name, Path(path), heatmap)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            job.path.unlink(missing_ok=True)
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
            try:
                results = score_batch(
                    model, [Photo(job.path.name, job.path) for job in jobs], self.scratch if heatmap else None
                )
                for job, result in zip(jobs, results):
                    record = self._record(job, result.record)
                    job.done.set_result(record)
                    if self.on_scored is not None:
                        self.on_scored(job.name, job.path, record)
            except Exception as error:  # a bug must fail these requests, never the scoring thread
                for job in jobs:
                    if not job.done.done():
                        job.done.set_exception(error)
            finally:
                for job in jobs:
                    job.path.unlink(missing_ok=True)
            self.scored += len(jobs)

    @staticmethod
    def _record(job: _Job, record: dict[str, Any]) -> dict[str, Any]:
        """The scoring record, named by the upload's file name, with the overlay inlined as base64 PNG."""
        record = {**record, "path": job.name}
        if "error" in record:
            record["error"] = record["error"].replace(str(job.path), job.name)
        if "heatmap" in record:
            overlay = Path(record.pop("heatmap"))
            record["heatmap_png_base64"] = base64.b64encode(overlay.read_bytes()).decode("ascii")
            overlay.unlink(missing_ok=True)
        return record


def model_summary(model: PatchCore, path: Path) -> dict[str, Any]:
    """What GET /model answers: enough to know which model decides, and how."""
    config = model.config
    return {
        "model_file": str(path),
        "model_file_modified": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(path.stat().st_mtime)),
        "backbone": config.backbone,
        "weights_identity": model.weights_identity,
        "runtime": resolve_runtime(model.runtime, model.onnx_file),
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
    size = model.config.image_size
    model.predict([np.zeros((size, size, 3), np.uint8)])  # open the extractor and build the index before serving
    scratch = tempfile.TemporaryDirectory(prefix="fastener_service_")
    batcher = Batcher(model, settings.queue_size, settings.batch_wait_ms / 1000, Path(scratch.name))
    drift, learner = watch_the_line(batcher, settings, model_path, Path(scratch.name))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        batcher.stop()
        if learner is not None:
            learner.stop()
        scratch.cleanup()

    app = FastAPI(title="fastener-anomaly-detection", lifespan=lifespan)

    def refused(request: Request) -> JSONResponse | None:
        """401 for a missing or wrong API key (when the service has one)."""
        if settings.api_key and not secrets.compare_digest(
            request.headers.get(API_KEY_HEADER, "").encode(), settings.api_key.encode()
        ):
            return JSONResponse({"error": f"missing or wrong {API_KEY_HEADER} header"}, status_code=401)
        return None

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "queued": batcher.queue.qsize(), "queue_size": settings.queue_size,
                "scored": batcher.scored, "drift": drift.status()}

    @app.get("/model")
    def model_info(request: Request) -> Any:
        return refused(request) or json.loads(json.dumps(model_summary(batcher.model, model_path), default=str))

    @app.post("/score")
    async def score(request: Request, heatmap: bool = False) -> JSONResponse:
        """Score one photo: a multipart upload (any field name) or the raw image bytes as the body."""
        if (answer := refused(request)) is not None:
            return answer
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            return JSONResponse({"error": "send the photo with a Content-Length"}, status_code=411)
        if int(length) > settings.max_upload_bytes:
            return JSONResponse(
                {"error": f"upload of {int(length):_} bytes is over the limit of {settings.max_upload_bytes:_}"},
                status_code=413,
            )
        name, data = await _upload(request)
        if not data:
            return JSONResponse({"path": name, "error": f"{name}: empty upload"}, status_code=400)
        try:
            done = batcher.submit(name, data, heatmap)
        except Busy:
            return JSONResponse({"error": "busy: the scoring queue is full, retry later"}, status_code=503,
                                headers={"Retry-After": str(settings.retry_after_s)})
        record = await asyncio.wrap_future(done)
        return JSONResponse(record, status_code=422 if "error" in record else 200)

    if learner is not None:
        add_feedback_route(app, learner, refused, _upload, settings.max_upload_bytes)
    return app


def watch_the_line(
    batcher: Batcher, settings: ServiceSettings, model_path: Path, scratch: Path
) -> tuple[DriftMonitor, Learner | None]:
    """Drift warnings on every scored photo and, with ``learn``, the learner behind POST /feedback."""
    if settings.learn and importlib.util.find_spec("torch") is None:
        raise UserError("--learn needs torch (requirements.txt) to add photos to the memory bank")
    drift, events = DriftMonitor(batcher.model), EventLog(settings.events_jsonl)
    learner = Learner(batcher, model_path, drift, events, scratch, settings.keep_scored, settings.learn_batch,
                      settings.learn_wait_s) if settings.learn else None

    def scored(name: str, path: Path, record: dict[str, Any]) -> None:
        for event in drift.observe(record):
            events(event)
        if learner is not None:
            learner.remember(name, path, record)

    batcher.on_scored = scored
    return drift, learner


async def _upload(request: Request) -> tuple[str, bytes]:
    """(file name, bytes) of the photo in a multipart form or a raw body (``?name=`` names a raw one)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        for value in form.values():
            if hasattr(value, "read"):
                return value.filename or "upload", await value.read()
        return "upload", b""
    return request.query_params.get("name", "upload"), await request.body()


def create_app_from_env() -> FastAPI:
    """Entry point of each uvicorn worker process (``--workers N``): settings come from serve.py."""
    return create_app(ServiceSettings(**json.loads(os.environ[SETTINGS_ENV])))


def settings_env(settings: ServiceSettings) -> str:
    return json.dumps(asdict(settings))
