"""serve.py as a line talks to it: a real uvicorn process on a free local port and a real HTTP client."""

from __future__ import annotations

import base64
import errno
import http.client
import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

import serve
from config import UserError, run_cli
from conftest import running_service, wait_until
from evaluation.mvtec import load_test_split
from runtime.service import SETTINGS_ENV, ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
KEY = "line-7-secret"


@pytest.fixture(scope="module")
def service(fitted_model, tmp_path_factory) -> Iterator[str]:
    """The service on 127.0.0.1 with an API key, a 1 MiB upload limit, a 3 s body timeout and a queue of 4
    photos whose overflow is told to retry after 2 s."""
    model_file = tmp_path_factory.mktemp("service") / "patchcore_small.pkl"
    fitted_model.save(model_file)
    key_file = model_file.with_name("api-key")
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    with running_service("--model", str(model_file), "--api-key-file", str(key_file), "--max-upload-mb", "1",
                         "--queue-size", "4", "--body-timeout", "3", "--retry-after", "2") as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def photos(small_screw_dir) -> dict[str, Path]:
    samples = load_test_split(small_screw_dir)
    good = next(sample.path for sample in samples if sample.kind == "good")
    defect = next(sample.path for sample in samples if sample.kind == "manipulated_front")
    return {"good": good, "defect": defect}


def post(url: str, photo: Path, key: str | None = KEY, **params: str) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    files = {"file": (photo.name, photo.read_bytes(), "image/png")}
    return httpx.post(f"{url}/score", files=files, params=params, headers=headers, timeout=300)


def test_good_and_defect_photos_get_the_same_record_as_inference(service, photos, fitted_model):
    records = {kind: post(service, path) for kind, path in photos.items()}
    for kind, response in records.items():
        assert response.status_code == 200, response.text
        record = response.json()
        (expected,) = fitted_model.predict([photos[kind]])
        assert record["path"] == photos[kind].name
        assert record["score"] == pytest.approx(round(expected.score, 4), abs=2e-4)
        assert record["is_anomalous"] == expected.is_anomalous
        assert "heatmap_png_base64" not in record  # an overlay only when asked for: it is slow to draw and large
    assert records["defect"].json()["score"] > records["good"].json()["score"]


def test_raw_bytes_and_a_heatmap(service, photos):
    response = httpx.post(
        f"{service}/score", content=photos["defect"].read_bytes(), params={"heatmap": "true", "name": "p.png"},
        headers={"X-API-Key": KEY}, timeout=300,
    )
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["path"] == "p.png"
    assert base64.b64decode(record["heatmap_png_base64"]).startswith(b"\x89PNG\r\n\x1a\n")


def test_what_the_framework_refuses_is_answered_in_the_services_error_shape(service, photos):
    """A client reads "error" from every refusal: the framework's own answers ({"detail": ...}) said
    nothing to it, and a bad query value got 422, which here means a photo that cannot be read. The
    framework's headers stay: a wrong method's 405 names the one to use."""
    key = {"X-API-Key": KEY}
    bad_query = httpx.post(f"{service}/score", content=photos["good"].read_bytes(),
                           params={"heatmap": "maybe", "name": "p.png"}, headers=key, timeout=60)
    assert bad_query.status_code == 400 and bad_query.json()["error"].startswith("heatmap: "), bad_query.text
    no_boundary = httpx.post(f"{service}/score", content=b"--x\r\n", timeout=60,
                             headers={**key, "Content-Type": "multipart/form-data"})
    assert no_boundary.status_code == 400 and no_boundary.json()["error"], no_boundary.text
    two_files = httpx.post(f"{service}/score", headers=key, timeout=60, files=[
        ("a", ("a.png", photos["good"].read_bytes(), "image/png")), ("b", ("b.png", b"x", "image/png"))])
    assert two_files.status_code == 400 and "files" in two_files.json()["error"], two_files.text
    unknown = httpx.get(f"{service}/nowhere", timeout=60)
    assert unknown.status_code == 404 and unknown.json() == {"error": "Not Found"}
    wrong_method = httpx.get(f"{service}/score", headers=key, timeout=60)  # the framework's Allow header names POST
    assert wrong_method.status_code == 405 and wrong_method.headers.get("Allow") == "POST", wrong_method.headers
    assert wrong_method.json() == {"error": "Method Not Allowed"}
    assert post(service, photos["good"]).status_code == 200  # and it carries on


def test_corrupt_upload_is_a_422_record_and_the_service_carries_on(service, photos):
    broken = httpx.post(f"{service}/score", files={"file": ("broken.png", b"\x89PNG not really", "image/png")},
                        headers={"X-API-Key": KEY}, timeout=300)
    assert broken.status_code == 422
    assert broken.json()["path"] == "broken.png" and "broken.png" in broken.json()["error"]
    assert post(service, photos["good"]).status_code == 200


FILE_PART = 'Content-Disposition: form-data; name="file"; filename="part.png"\r\nContent-Type: image/png'


def post_one_part(service: str, part_headers: str, photo: Path, media_type: str = "multipart/form-data",
                  end: bytes = b"\r\n--part--\r\n") -> httpx.Response:
    """The photo POSTed to /score as a multipart form of one part written by hand under ``part_headers``
    and ended by ``end`` (clients differ there, and httpx writes only the usual form)."""
    body = f"--part\r\n{part_headers}\r\n\r\n".encode() + photo.read_bytes() + end
    return httpx.post(f"{service}/score", content=body, timeout=300,
                      headers={"X-API-Key": KEY, "Content-Type": f"{media_type}; boundary=part"})


def test_a_file_sent_with_an_empty_file_name_is_scored_as_upload(service, photos) -> None:
    """A multipart file part with filename="" (as some camera clients send it) is scored, and its record is
    named "upload", as a raw body without ?name= is, never an empty path."""
    response = post_one_part(
        service, 'Content-Disposition: form-data; name="file"; filename=""\r\nContent-Type: image/png', photos["good"])
    assert response.status_code == 200 and response.json()["path"] == "upload", response.text


def test_a_photo_sent_as_a_text_field_is_told_how_to_send_it(service, photos) -> None:
    """``curl -F "file=<photo.png"`` sends the photo as a text field with no file name: the answer says so and
    how to send it, not "empty upload" for a body that held the photo."""
    response = post_one_part(service, 'Content-Disposition: form-data; name="file"', photos["good"])
    assert response.status_code == 400 and response.json() == {
        "error": "upload: the form holds text (file) but no file; send the photo as a file part "
                 "(curl -F file=@photo.png) or as the raw body"}, response.text
    assert post(service, photos["good"]).status_code == 200  # and it carries on


def test_a_form_cut_short_before_its_closing_boundary_is_told_so_not_empty(service, photos) -> None:
    """A client that stopped mid-upload sent a form whose one part no boundary line ends: the answer says the
    form is cut short, not that the upload was empty."""
    response = post_one_part(service, FILE_PART, photos["good"], end=b"")
    assert response.status_code == 400 and "cut short" in response.json()["error"], response.text
    assert "empty" not in response.json()["error"]


def test_a_multipart_media_type_in_any_letter_case_is_read_as_a_form(service, photos) -> None:
    """Media types are case-insensitive: ``Multipart/Form-Data`` is a form, its file part scored under its
    file name, not the whole form taken for a raw photo that cannot be read."""
    response = post_one_part(service, FILE_PART, photos["good"], media_type="Multipart/Form-Data")
    assert response.status_code == 200 and response.json()["path"] == "part.png", response.text


def test_oversize_upload_is_refused_before_reading(service):
    """413 before the body is read, closing the connection: a client must not send its next photo down a
    connection that still holds the unread rest of this one."""
    response = httpx.post(f"{service}/score", content=b"\0" * (2 * 2**20), headers={"X-API-Key": KEY}, timeout=60)
    assert response.status_code == 413 and "limit" in response.json()["error"]
    assert response.headers.get("Connection") == "close", response.headers


def test_wrong_or_missing_key_is_401_but_health_is_open(service, photos):
    assert post(service, photos["good"], key="guess").status_code == 401
    assert post(service, photos["good"], key=None).status_code == 401
    assert httpx.get(f"{service}/model", timeout=30).status_code == 401
    assert httpx.get(f"{service}/health", timeout=30).status_code == 200
    model = httpx.get(f"{service}/model", headers={"X-API-Key": KEY}, timeout=30).json()
    # the network runs through the export the model was saved with, not torch
    assert model["backbone"] == "efficientnet_lite0" and model["runtime"] == "onnx" and "threshold" in model
    promise = model["promise"]
    assert promise.startswith("expect ") and "false alarms per 1,000 healthy parts (95 % interval" in promise
    assert model["calibration"]["false_alarm_rate"] == 0.01
    assert set(model["calibration"]) >= {"median", "robust_spread"} and not {"mean", "std"} & set(model["calibration"])


def test_a_key_that_only_starts_with_the_services_key_is_refused(service, photos) -> None:
    """The whole key must match: a client sending the key with more after it scores nothing and reads no model."""
    assert post(service, photos["good"], key=KEY + "-and-more").status_code == 401
    assert httpx.get(f"{service}/model", headers={"X-API-Key": KEY + "x"}, timeout=30).status_code == 401


def test_a_concurrent_burst_is_bounded_and_every_photo_is_scored_once_retried(service, photos, fitted_model):
    """24 clients at once against a queue of 4: the overflow is told 503 + Retry-After, never queued
    without bound; clients that retry as told all get the right record, and /health shows the queue filling
    up to its size of 4, which stays 4."""
    expected = round(fitted_model.predict([photos["defect"]])[0].score, 4)
    statuses: list[int] = []

    def client(_: int) -> dict:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            response = post(service, photos["defect"])
            statuses.append(response.status_code)
            if response.status_code != 503:
                return response.json()
            assert response.headers["Retry-After"] == "2"  # serve.py --retry-after
            time.sleep(0.2)  # sooner than told: the queue of 4 frees up within a batch
        pytest.fail("still 503 after 120 s of retries: the queue or the upload budget never frees up")

    def monitor(stop: threading.Event) -> None:  # what a dashboard polling /health sees during the burst
        while not stop.is_set():
            health = httpx.get(f"{service}/health", timeout=30).json()
            seen.append((health["queued"], health["queue_size"]))
            time.sleep(0.05)

    seen: list[tuple[int, int]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=monitor, args=(stop,))
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=24) as pool:
            records = list(pool.map(client, range(24)))
    finally:
        stop.set()
        watcher.join()
    assert set(statuses) <= {200, 503}
    assert all(size == 4 and 0 <= queued <= 4 for queued, size in seen) and max(seen)[0] > 0, seen
    assert 503 in statuses  # the queue of 4 refused the overflow
    assert all(record["score"] == pytest.approx(expected, abs=2e-4) for record in records)


def raw_request(url: str, head: str, body_pieces, pause: float = 0.0, timeout: float = 30) -> bytes:
    """Send ``head`` and the body pieces over one socket, as an attacker's client would; return what comes back."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        connection.sendall(head.encode())
        try:
            for piece in body_pieces:
                connection.sendall(piece)
                time.sleep(pause)
        except OSError:  # the service stopped reading and closed the connection
            pass
        return rest_of(connection)


def rest_of(connection: socket.socket) -> bytes:
    """What comes back on ``connection`` until the service closes it (or the socket's timeout passes)."""
    answer = b""
    try:
        while chunk := connection.recv(65536):
            answer += chunk
    except OSError:
        pass
    return answer


def test_a_request_whose_headers_never_end_is_closed_at_the_deadline_while_others_are_answered(service, photos):
    """A slow-loris client sends half a request head and then nothing: past the 3 s --body-timeout it is told 408
    and its connection closed, so a few hundred such clients cannot hold every file descriptor; a photo sent
    meanwhile on another connection is scored."""
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        stalled = pool.submit(raw_request, service, "POST /score HTTP/1.1\r\nHost: x\r\n", [], timeout=10)
        assert post(service, photos["good"]).status_code == 200
        answer = stalled.result()
    assert time.monotonic() - started < 8, answer
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert answer.endswith(b'{"error": "the request headers took longer than 3 s"}'), answer


def test_a_kept_alive_connection_whose_next_request_stops_mid_head_is_closed_at_the_deadline(service):
    """The deadline starts again after each answer: a client that reuses its connection and sends half of its
    next request head is told 408 and closed, as on a new connection."""
    host, port = service.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", "/health")
        assert connection.getresponse().read()  # the connection stays open for the next request
        started = time.monotonic()
        connection.sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        answer = rest_of(connection.sock)
    finally:
        connection.close()
    assert time.monotonic() - started < 8 and answer.startswith(b"HTTP/1.1 408 "), answer


def test_a_request_that_cannot_be_parsed_is_answered_in_the_services_error_shape(service, photos):
    """A request line that is not HTTP gets a JSON 400, as every refusal does, and the connection is closed."""
    answer = raw_request(service, "NOT HTTP AT ALL\r\n\r\n", [], timeout=10)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in answer.lower(), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"].startswith("malformed HTTP request"), answer
    assert post(service, photos["good"]).status_code == 200


def test_a_chunked_body_under_a_small_content_length_is_cut_off_at_the_limit(service):
    """Content-Length: 10 with Transfer-Encoding: chunked: the bytes are counted as they come, whatever the headers say."""
    head = (f"POST /score HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Length: 10\r\n"
            "Transfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n")
    chunk = b"\0" * 65536
    pieces = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(48)] + [b"0\r\n\r\n"]  # 3 MiB
    answer = raw_request(service, head, pieces)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"over the limit of 1_048_576 bytes" in answer


def test_a_trickling_upload_is_dropped_after_the_body_timeout(service):
    head = (f"POST /score?name=slow.png HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Length: 100000\r\n"
            "Content-Type: application/octet-stream\r\n\r\n")
    started = time.monotonic()
    answer = raw_request(service, head, (b"x" for _ in range(40)), pause=0.25)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert time.monotonic() - started < 8  # the 3 s timeout, not the 10 s the client would take
    assert httpx.get(f"{service}/health", timeout=30).json()["status"] == "ok"


def test_an_empty_api_key_is_refused_never_taken_as_no_authentication(tmp_path):
    model_file = tmp_path / "model.pkl"
    model_file.write_bytes(b"not read: the key is checked first")
    result = subprocess.run([sys.executable, "serve.py", "--model", str(model_file)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "FASTENER_API_KEY": ""})
    assert result.returncode == 2 and result.stderr.startswith("error: FASTENER_API_KEY is set but empty"), result.stderr
    (tmp_path / "key").write_text("\n")
    result = subprocess.run([sys.executable, "serve.py", "--model", str(model_file), "--api-key-file", str(tmp_path / "key")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {tmp_path / 'key'}: the API key file is empty"


def test_a_port_in_use_or_out_of_range_is_one_error_line_before_the_model_loads(tmp_path):
    import socket

    model_file = tmp_path / "model.pkl"
    model_file.write_bytes(b"not read: the address is checked first")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for bad_port, says in ((str(port), f"error: cannot listen on 127.0.0.1:{port}: Address already in use"),
                               ("70000", "error: --port must be between 0 and 65535, got 70000")):
            result = subprocess.run([sys.executable, "serve.py", "--model", str(model_file), "--port", bad_port],
                                    cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert result.returncode == 2 and result.stderr.strip() == says, result.stderr


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> dict:
    """serve.main with the model and uvicorn left out: what it would start (the service's settings and
    uvicorn's arguments) is recorded instead, in-process and in milliseconds."""
    import uvicorn

    seen: dict = {}
    monkeypatch.delenv("FASTENER_API_KEY", raising=False)
    monkeypatch.setenv(SETTINGS_ENV, "")  # so what --workers writes there is removed afterwards
    monkeypatch.setattr(serve, "create_app", lambda settings: seen.setdefault("settings", settings))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    return seen


def model_file_in(folder: Path) -> Path:
    """A model file that passes serve.py's own checks; nothing reads it once create_app is left out."""
    path = folder / "model.pkl"
    path.write_bytes(b"not read: no model is loaded")
    return path


def test_every_flag_reaches_the_service_on_this_machine_only(started, tmp_path, monkeypatch):
    """What a line sets on the command line is what the service enforces: each limit, learning, the device and
    runtime reach its settings, the key comes from $FASTENER_API_KEY, it binds 127.0.0.1 when no --host is
    given, and a clean stop is exit 0."""
    model = model_file_in(tmp_path)
    monkeypatch.setenv("FASTENER_API_KEY", "line-7-secret")
    argv = ["--model", str(model), "--port", "0", "--runtime", "onnx", "--device", "cpu", "--max-upload-mb", "3",
            "--queue-size", "7", "--batch-wait-ms", "2", "--retry-after", "4", "--body-timeout", "9", "--learn",
            "--learn-batch", "5", "--learn-wait-s", "6", "--keep-scored", "8", "--events-jsonl", str(tmp_path / "e.jsonl")]
    assert run_cli(lambda: serve.main(argv)) == 0
    assert started["settings"] == ServiceSettings(
        model=str(model), runtime="onnx", device="cpu", api_key="line-7-secret", max_upload_mb=3, queue_size=7,
        batch_wait_ms=2, retry_after_s=4, body_timeout_s=9, learn=True, learn_batch=5, learn_wait_s=6, keep_scored=8,
        events_jsonl=str(tmp_path / "e.jsonl"))
    assert started["app"] is started["settings"] and (started["host"], started["port"]) == ("127.0.0.1", 0)
    assert started["http"].keywords == {"headers_timeout_s": 9}  # a request's headers have as long as its body


def test_each_worker_process_builds_the_service_from_the_same_settings(started, tmp_path):
    """--workers 2 starts two processes, and each reads the settings serve.py hands them, limits included, and
    builds its connections with the same deadline on request headers (uvicorn pickles them to each process)."""
    model = model_file_in(tmp_path)
    argv = ["--model", str(model), "--port", "0", "--workers", "2", "--queue-size", "3", "--body-timeout", "4"]
    assert run_cli(lambda: serve.main(argv)) == 0
    assert started["app"] == "runtime.service:create_app_from_env" and started["workers"] == 2
    assert ServiceSettings(**json.loads(os.environ[SETTINGS_ENV])) == ServiceSettings(model=str(model), queue_size=3,
                                                                                     body_timeout_s=4)
    assert pickle.loads(pickle.dumps(started["http"])).keywords == {"headers_timeout_s": 4}


@pytest.mark.parametrize("args, says", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--learn", "--workers", "2"], "--learn updates one model in one process; run it with --workers 1"),
    (["--api-key-file", "{tmp}/absent"], "{tmp}/absent: cannot read the API key file (No such file or directory)"),
    (["--port", "65536"], "--port must be between 0 and 65535, got 65536"),
    (["--port", "-1"], "--port must be between 0 and 65535, got -1"),
    (["--host", "0.0.0.0"], "--host 0.0.0.0 lets other machines reach the service: set a key (--api-key-file FILE "
                            "or $FASTENER_API_KEY) so that only the line's clients can score photos and teach the model"),
    (["--events-jsonl", "{tmp}/model.pkl/events.jsonl"],
     "{tmp}/model.pkl/events.jsonl: cannot be written (Not a directory); any previous file is unchanged"),
    (["--events-jsonl", "{tmp}/model.pkl"],
     "{tmp}/model.pkl: is {tmp}/model.pkl, the model file or its ONNX export; give another file name"),
    (["--events-jsonl", "{tmp}/model.onnx"],
     "{tmp}/model.onnx: is {tmp}/model.onnx, the model file or its ONNX export; give another file name"),
], ids=["workers-0", "learn-with-2-workers", "absent-key-file", "port-65536", "port-minus-1", "open-without-a-key",
        "events-file-in-a-file", "events-file-is-the-model", "events-file-is-its-export"])
def test_a_usage_problem_is_one_error_line_and_nothing_starts(started, args, says, tmp_path, capsys):
    """Each refusal names what to change, exits 2, and starts nothing (two learning workers would overwrite
    each other's model file)."""
    argv = ["--model", str(model_file_in(tmp_path)), "--port", "0", *(arg.format(tmp=tmp_path) for arg in args)]
    assert run_cli(lambda: serve.main(argv)) == 2
    assert capsys.readouterr().err == f"error: {says.format(tmp=tmp_path)}\n"
    assert started == {}


def test_a_service_other_machines_can_reach_starts_with_a_key(started, tmp_path, monkeypatch):
    """--host 0.0.0.0 with $FASTENER_API_KEY set: it binds every interface, and every request needs the key."""
    monkeypatch.setenv("FASTENER_API_KEY", "line-7-secret")
    assert run_cli(lambda: serve.main(["--model", str(model_file_in(tmp_path)), "--port", "0", "--host", "0.0.0.0"])) == 0
    assert started["host"] == "0.0.0.0" and started["settings"].api_key == "line-7-secret"


@pytest.mark.parametrize("port", [0, 65535])
def test_the_ends_of_the_port_range_are_never_refused_as_out_of_range(port):
    """0 (any free port) and 65535 are ports a service may take."""
    try:
        serve.check_address("127.0.0.1", port)
    except UserError as error:  # 65535 held by another program here: a different refusal, and a fair one
        assert "must be between" not in str(error)


def test_the_key_is_the_first_line_of_the_key_file_without_its_spaces(tmp_path, monkeypatch):
    """A key file an editor wrote (a trailing space, a line of notes below) gives the key clients send; the file
    wins over $FASTENER_API_KEY, which is read when no file is given."""
    key_file = tmp_path / "api-key"
    key_file.write_text("  line-7-secret \nrotated 2026-01 by the line lead\n")
    key_file.chmod(0o640)  # a service group may read it
    monkeypatch.setenv("FASTENER_API_KEY", "from-the-environment")
    assert serve.api_key(key_file) == "line-7-secret"
    assert serve.api_key(None) == "from-the-environment"


@pytest.mark.parametrize("mode", [0o644, 0o602])
def test_a_key_file_every_user_may_read_or_change_is_refused(tmp_path, mode):
    """As ssh refuses an open private key: whoever reads the key can score photos and teach the model."""
    key_file = tmp_path / "api-key"
    key_file.write_text("line-7-secret\n")
    key_file.chmod(mode)
    with pytest.raises(UserError) as refused:
        serve.api_key(key_file)
    assert str(refused.value) == (
        f"{key_file}: every user of this PC may read or change the API key file (mode {mode:o}); "
        f"make it yours alone: chmod 600 {key_file}"
    )


def test_the_api_key_is_never_a_command_line_argument(tmp_path):
    """``ps`` shows every process's arguments to every user of the machine."""
    result = subprocess.run([sys.executable, "serve.py", "--model", "m.pkl", "--api-key", "secret"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unrecognized arguments: --api-key secret" in result.stderr


def test_scratch_folders_of_a_killed_service_are_removed_at_the_next_start(tmp_path):
    from runtime.service import SCRATCH_PREFIX, remove_stale_scratch

    finished = subprocess.Popen(["true"])
    finished.wait()
    stale, live = tmp_path / f"{SCRATCH_PREFIX}{finished.pid}_abc", tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}_def"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "overlay.png").write_bytes(b"a photo's overlay")
    other = tmp_path / "fastener_other"
    other.mkdir()
    remove_stale_scratch(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([live.name, other.name])


@pytest.mark.parametrize("setting", [{"max_upload_mb": 0}, {"queue_size": 0}, {"batch_wait_ms": -1}, {"retry_after_s": 0},
                                     {"body_timeout_s": 0}, {"body_timeout_s": float("inf")}, {"learn_batch": 0},
                                     {"keep_scored": 0}], ids=str)
def test_settings_that_would_disable_a_limit_are_refused(setting):
    from runtime.service import ServiceSettings

    with pytest.raises(ValueError, match="must be"):
        ServiceSettings(model="m.pkl", **setting)


def test_the_body_budget_holds_up_to_its_limit_and_what_is_given_back_is_free_again():
    from runtime.service import ByteBudget

    budget = ByteBudget(100)
    assert budget.take(60) and budget.take(40)  # exactly the limit
    assert not budget.take(1) and budget.held == 100  # a refusal takes nothing
    budget.give(60)
    assert budget.take(60) and not budget.take(1)


def test_heatmap_overlays_leave_nothing_in_the_scratch_folder_and_every_photo_is_counted(fitted_model, photos, tmp_path):
    """The overlay travels in the answer, so the scratch folder stays empty; /health counts every photo scored."""
    from runtime.service import Batcher

    batcher = Batcher(fitted_model, queue_size=4, batch_wait_s=0.005, scratch=tmp_path)
    try:
        answers = [batcher.submit(name, photos["defect"].read_bytes(), heatmap=True).result(timeout=120)
                   for name in ("a.png", "a.png")]  # one after the other: two batches
    finally:
        batcher.stop()
    assert [status for status, _ in answers] == [200, 200] and batcher.scored == 2
    assert all(record["heatmap_png_base64"] and "heatmap" not in record for _, record in answers)
    assert list(tmp_path.rglob("*")) == []


def test_a_photo_is_remembered_before_its_answer_so_feedback_can_name_it_at_once(fitted_model, photos, tmp_path):
    """A client that gets its verdict and at once sends /feedback naming the photo must find it remembered."""
    from runtime.service import Batcher

    remembered: list[str] = []

    def slow_remember(name: str, data: bytes, record: dict) -> None:
        time.sleep(0.5)  # a busy machine
        remembered.append(name)

    batcher = Batcher(fitted_model, queue_size=4, batch_wait_s=0.005, scratch=tmp_path)
    batcher.on_scored = slow_remember
    try:
        status, _ = batcher.submit("part.png", photos["good"].read_bytes(), heatmap=False).result(timeout=120)
        assert status == 200 and remembered == ["part.png"]
    finally:
        batcher.stop()


def test_a_scored_photo_gets_its_verdict_when_keeping_it_for_feedback_fails(fitted_model, photos, tmp_path, capsys):
    """With --learn and a full temporary folder, remembering the photo fails after it is scored: the client
    still gets its verdict, and the failure is one error line, not a 500."""
    from runtime.service import Batcher

    def full_disk(name: str, data: bytes, record: dict) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    batcher = Batcher(fitted_model, queue_size=4, batch_wait_s=0.005, scratch=tmp_path)
    batcher.on_scored = full_disk
    try:
        status, record = batcher.submit("part.png", photos["good"].read_bytes(), heatmap=False).result(timeout=120)
    finally:
        batcher.stop()
    assert status == 200 and record["is_anomalous"] is False
    assert capsys.readouterr().err == ("error: part.png: scored and answered, but not watched for drift or kept for "
                                       "/feedback (OSError: [Errno 28] No space left on device)\n")


def test_health_tells_a_monitor_how_full_the_queue_is_and_counts_every_photo_scored(service, photos):
    """A load balancer or dashboard reads /health: the queue's size and fill, and one more photo scored per
    photo answered with a verdict, a photo without a heatmap too; an unreadable upload is not one."""
    before = httpx.get(f"{service}/health", timeout=30).json()
    assert post(service, photos["good"]).status_code == 200
    assert httpx.post(f"{service}/score?name=broken.png", content=b"not a photo", headers={"X-API-Key": KEY},
                      timeout=30).status_code == 422
    after = httpx.get(f"{service}/health", timeout=30).json()
    assert after["status"] == "ok" and after["queue_size"] == 4 and after["queued"] == 0
    assert after["scored"] == before["scored"] + 1


def test_bodies_being_read_share_one_memory_budget_that_a_client_going_away_gives_back(fitted_model, photos, tmp_path):
    """A queue of 1 x 1 MiB: while a slow client holds 900 kB of an unfinished upload, a photo that would take
    the service past that budget is told 503 + Retry-After (memory stays bounded); once that client hangs up,
    its bytes are free again and photos are scored, never 'busy' for good."""
    model_file = tmp_path / "model.pkl"
    fitted_model.save(model_file)
    with running_service("--model", str(model_file), "--queue-size", "1", "--max-upload-mb", "1",
                         "--body-timeout", "120") as port:
        url = f"http://127.0.0.1:{port}"
        head = (f"POST /score?name=slow.png HTTP/1.1\r\nHost: x\r\nContent-Length: {2**20}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
            slow.sendall(head.encode() + b"\0" * 900_000)
            wait_until(lambda: post(url, photos["good"], key=None).status_code == 503, timeout=30)
            refused = post(url, photos["good"], key=None)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
            assert refused.json()["error"].startswith("busy")
        wait_until(lambda: post(url, photos["good"], key=None).status_code == 200, timeout=30)
        assert post(url, photos["good"], key=None).status_code == 200


def test_a_body_refused_while_it_is_read_gives_its_bytes_back_to_the_budget(fitted_model, photos, tmp_path) -> None:
    """A queue of 1 x 1 MiB: an upload cut off at the limit (413) and one that stalls past the body timeout (408)
    each held most of the budget; once refused, their bytes are free again, so the next photo is scored, not
    answered 'busy' for good."""
    model_file = tmp_path / "model.pkl"
    fitted_model.save(model_file)
    with running_service("--model", str(model_file), "--queue-size", "1", "--max-upload-mb", "1",
                         "--body-timeout", "2") as port:
        url = f"http://127.0.0.1:{port}"
        chunked = ("POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                   "Content-Type: application/octet-stream\r\n\r\n")
        chunk = b"\0" * 65536
        pieces = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(20)] + [b"0\r\n\r\n"]
        assert raw_request(url, chunked, pieces).startswith(b"HTTP/1.1 413 ")
        assert post(url, photos["good"], key=None).status_code == 200
        stalled = (f"POST /score?name=stalled.png HTTP/1.1\r\nHost: x\r\nContent-Length: {2**20}\r\n"
                   "Content-Type: application/octet-stream\r\n\r\n")
        assert raw_request(url, stalled, [b"\0" * 900_000]).startswith(b"HTTP/1.1 408 ")
        assert post(url, photos["good"], key=None).status_code == 200


def test_a_bug_while_scoring_is_a_500_answer_and_the_next_photo_is_still_scored(fitted_model, photos, tmp_path,
                                                                                 monkeypatch):
    """A bug in one batch fails that batch's requests with an answer the client can read; it must not end the
    scoring thread, which would leave this and every later request waiting for good."""
    import runtime.service
    from runtime.service import Batcher

    real_score_batch = runtime.service.score_batch

    def breaks_on_a_bad_batch(model: object, batch: list, heatmap_dir: Path | None) -> list:
        if batch[0].source == b"bug":
            raise RuntimeError("simulated bug")
        return real_score_batch(model, batch, heatmap_dir)

    monkeypatch.setattr(runtime.service, "score_batch", breaks_on_a_bad_batch)
    batcher = Batcher(fitted_model, queue_size=4, batch_wait_s=0.005, scratch=tmp_path)
    try:
        failed = batcher.submit("a.png", b"bug", heatmap=False).result(timeout=30)
        status, record = batcher.submit("b.png", photos["good"].read_bytes(), heatmap=False).result(timeout=120)
    finally:
        batcher.stop()
    assert failed == (500, {"path": "a.png", "error": "internal error while scoring: RuntimeError"})
    assert status == 200 and record["path"] == "b.png" and "score" in record


def test_a_file_part_the_temporary_folder_cannot_hold_is_a_507_answer_and_the_next_photo_is_scored(
        fitted_model, tmp_path, monkeypatch):
    """The framework keeps a multipart file part over 1 MB in the temporary folder while it reads the form:
    when that folder is full, the client is told so in the service's answer shape (not a plain-text 500),
    and once there is room again the same photo is scored."""
    from fastapi.testclient import TestClient

    from runtime.service import create_app

    def full_disk(_file: tempfile.SpooledTemporaryFile) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    model_file = tmp_path / "model.pkl"
    fitted_model.save(model_file)
    noise = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    big = {"file": ("big.png", cv2.imencode(".png", noise)[1].tobytes(), "image/png")}  # about 3 MB
    with TestClient(create_app(ServiceSettings(model=str(model_file))), raise_server_exceptions=False) as client:
        with monkeypatch.context() as full:
            full.setattr(tempfile.SpooledTemporaryFile, "rollover", full_disk)
            refused = client.post("/score", files=big)
        scored = client.post("/score", files=big)
    assert refused.status_code == 507 and refused.json() == {
        "error": f"upload: the service's temporary folder {tempfile.gettempdir()} cannot hold the file part "
                 "(No space left on device); free space there or send the photo as the raw body"}, refused.text
    assert scored.status_code == 200 and scored.json()["path"] == "big.png", scored.text


@pytest.mark.parametrize("setting", [{"batch_wait_ms": 0}, {"queue_size": 1}, {"retry_after_s": 1}, {"learn_batch": 1},
                                     {"learn_wait_s": 0}, {"keep_scored": 1}], ids=str)
def test_the_smallest_value_of_each_setting_is_accepted(setting):
    """``--batch-wait-ms 0`` scores each photo at once, ``--queue-size 1`` takes one photo at a time: settings
    a line may choose, not errors."""
    from runtime.service import ServiceSettings

    assert ServiceSettings(model="m.pkl", **setting)


def test_a_stop_while_a_batch_gathers_scores_the_batch_and_ends_the_scoring_thread(fitted_model, photos, tmp_path):
    """The service stops its batcher on shutdown: a stop that arrives while photos gather for a batch must still
    answer them and end the thread, not leave shutdown waiting for good."""
    from runtime.service import Batcher

    batcher = Batcher(fitted_model, queue_size=4, batch_wait_s=600, scratch=tmp_path)  # gathers until told to stop
    answer = batcher.submit("a.png", photos["good"].read_bytes(), heatmap=False)
    stopping = threading.Thread(target=batcher.stop, daemon=True)
    stopping.start()
    status, record = answer.result(timeout=120)
    stopping.join(timeout=30)  # the answer is in: only the thread's end is left
    assert not stopping.is_alive(), "stop() still waits for the scoring thread"
    assert status == 200 and record["path"] == "a.png"


def test_photos_that_arrive_together_share_batches_of_the_models_size_and_each_gets_its_answer(
    fitted_model, photos, tmp_path, monkeypatch
) -> None:
    """Three photos at once, batch_size 2: every client gets its own record (a photo left out of a full batch
    would never be answered), no batch is larger than the model was sized for, and /health counts all three."""
    import copy

    import runtime.service
    from runtime.service import Batcher

    model = copy.copy(fitted_model)
    model.config = fitted_model.config.replace(batch_size=2)
    sizes: list[int] = []
    real_score_batch = runtime.service.score_batch

    def counted(model: object, batch: list, heatmap_dir: Path | None) -> list:
        sizes.append(len(batch))
        return real_score_batch(model, batch, heatmap_dir)

    monkeypatch.setattr(runtime.service, "score_batch", counted)
    batcher = Batcher(model, queue_size=4, batch_wait_s=1, scratch=tmp_path)
    try:
        photo = photos["good"].read_bytes()
        answers = [batcher.submit(name, photo, heatmap=False) for name in ("a.png", "b.png", "c.png")]
        results = [answer.result(timeout=30) for answer in answers]
    finally:
        batcher.stop()
    assert [(status, record["path"]) for status, record in results] == [(200, "a.png"), (200, "b.png"), (200, "c.png")]
    assert sorted(sizes) == [1, 2] and batcher.scored == 3


def test_a_photo_beyond_a_full_queue_is_refused_at_once_never_left_waiting(fitted_model, photos, tmp_path) -> None:
    """While a batch is scored and the queue of 1 holds the next photo, a third is refused at once (the client
    gets 503 + Retry-After); waiting for room would hold the request, and the service, until the batch ends."""
    from runtime.service import Batcher, Busy

    scoring, release = threading.Event(), threading.Event()

    def slow_line(name: str, data: bytes, record: dict) -> None:
        scoring.set()
        release.wait(timeout=10)

    batcher = Batcher(fitted_model, queue_size=1, batch_wait_s=0, scratch=tmp_path)
    batcher.on_scored = slow_line
    photo = photos["good"].read_bytes()
    try:
        first = batcher.submit("a.png", photo, heatmap=False)
        assert scoring.wait(timeout=120)
        second = batcher.submit("b.png", photo, heatmap=False)  # the queue of 1 is full now
        with pytest.raises(Busy):
            batcher.submit("c.png", photo, heatmap=False)
        release.set()
        assert [first.result(timeout=60)[0], second.result(timeout=60)[0]] == [200, 200]
    finally:
        release.set()
        batcher.stop()


def test_get_model_describes_the_model_in_use_whatever_lies_at_its_path_now(fitted_model, tmp_path):
    """A copy put back over the file while the service runs (an undo) is not the model in use, and a file moved
    away is no reason for a 500: the answer comes from the model the service loaded."""
    import time as clock

    from fastapi.testclient import TestClient

    from runtime.service import create_app

    model_file = tmp_path / "model.pkl"
    fitted_model.save(model_file)
    loaded = clock.strftime("%Y-%m-%dT%H:%M:%S%z", clock.localtime(model_file.stat().st_mtime))
    with TestClient(create_app(ServiceSettings(model=str(model_file)))) as client:
        model_file.rename(tmp_path / "moved.pkl")
        moved = client.get("/model")
        os.utime(tmp_path / "moved.pkl", (0, 0))
        (tmp_path / "moved.pkl").rename(model_file)  # another file, as far as its time goes
        put_back = client.get("/model")
    assert moved.status_code == 200 and moved.json()["model_file_modified"] == loaded
    assert put_back.json()["model_file_modified"] == loaded and put_back.json()["threshold"] == fitted_model.threshold
