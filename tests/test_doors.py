"""The line's doors from the outside: where the service listens, its upload limit whatever the request
says about its length, and the model's own pixel limit at the service and at inference.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import pytest

from conftest import running_service, wait_for_lines, watching
from models.patchcore import PatchCore
from evaluation.mvtec import train_images
from preprocessing.io import read_image

PIXEL_LIMIT = 500_000  # the model's own max_image_pixels: a 1024 x 1024 screw photo is over it, 512 x 512 under
UPLOAD_LIMIT = 2**20  # --max-upload-mb 1


@pytest.fixture(scope="module")
def limited_model(fitted_model, tmp_path_factory) -> Path:
    """The shared small model, saved with a pixel limit of its own."""
    path = tmp_path_factory.mktemp("doors") / "limited.pkl"
    fitted_model.save(path)
    model = PatchCore.load(path)
    model.config = model.config.replace(max_image_pixels=PIXEL_LIMIT)
    model.save(path)
    return path


@pytest.fixture(scope="module")
def photos(small_screw_dir, tmp_path_factory) -> dict[str, Path]:
    """A 1024 x 1024 screw photo (over the model's pixel limit) and the same photo at 512 x 512 (under it)."""
    large = train_images(small_screw_dir)[0]
    small = tmp_path_factory.mktemp("photos") / "small.png"
    image = read_image(large)
    assert image.shape[0] * image.shape[1] > PIXEL_LIMIT
    cv2.imwrite(str(small), cv2.cvtColor(cv2.resize(image, (512, 512), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR))
    assert small.stat().st_size < UPLOAD_LIMIT
    return {"large": large, "small": small}


@pytest.fixture(scope="module")
def service(limited_model) -> Iterator[int]:
    """serve.py with nothing but a model, a port and a 1 MiB upload limit: the address is its default."""
    with running_service("--model", str(limited_model), "--max-upload-mb", "1") as port:
        yield port


def reaches(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def test_by_default_the_service_answers_this_machine_only(service):
    """Bound to 127.0.0.1, it is not reachable at another address of the machine (127.0.0.2 stands
    in for the network card: a socket bound to every interface answers there)."""
    with socket.socket() as everywhere:
        everywhere.bind(("0.0.0.0", 0))
        everywhere.listen()
        if not reaches("127.0.0.2", everywhere.getsockname()[1]):
            pytest.skip("this machine does not route 127.0.0.2 to its loopback")
    assert reaches("127.0.0.1", service)
    assert not reaches("127.0.0.2", service)


def test_a_body_without_content_length_cannot_pass_the_upload_limit(service):
    """A chunked upload states no length: it is refused (411 or 413), never read past the limit and scored."""

    def chunks() -> Iterator[bytes]:
        for _ in range(32):
            yield b"\0" * (UPLOAD_LIMIT // 16)

    response = httpx.post(f"http://127.0.0.1:{service}/score", content=chunks(), timeout=120)
    assert response.status_code in (411, 413), response.text
    assert "error" in response.json() and "score" not in response.json()


def test_the_upload_limit_is_in_mebibytes_and_a_photo_under_it_is_scored(service, photos):
    url = f"http://127.0.0.1:{service}/score"
    over = httpx.post(url, content=b"\0" * (UPLOAD_LIMIT + 1), timeout=120)
    assert over.status_code == 413 and "limit" in over.json()["error"]
    at_limit = httpx.post(url, content=b"\0" * UPLOAD_LIMIT, params={"name": "zeros.png"}, timeout=300)
    assert at_limit.status_code == 422 and "zeros.png" in at_limit.json()["error"]  # read, then found unreadable
    under = httpx.post(url, content=photos["small"].read_bytes(), params={"name": "small.png"}, timeout=300)
    assert under.status_code == 200, under.text
    assert under.json()["score"] > 0


def test_the_service_holds_the_models_own_pixel_limit(service, photos):
    url = f"http://127.0.0.1:{service}/score"
    large = httpx.post(url, files={"file": ("large.png", photos["large"].read_bytes(), "image/png")}, timeout=300)
    assert large.status_code == 422, large.text
    assert "max_image_pixels" in large.json()["error"] and "score" not in large.json()


def test_inference_holds_the_models_own_pixel_limit(limited_model, photos, capsys):
    import inference
    from config import run_cli

    assert run_cli(lambda: inference.main(["--model", str(limited_model), "--image", str(photos["small"]), "--quiet"])) == 0
    capsys.readouterr()
    code = run_cli(lambda: inference.main(["--model", str(limited_model), "--image", str(photos["large"]), "--json"]))
    assert code == 1
    assert '"unreadable": 1' in capsys.readouterr().out


def test_overlays_start_their_colour_scale_at_the_healthy_median(fitted_model, tmp_path):
    """Every door draws through one overlay: a map at the healthy median is drawn exactly like a map at
    zero (a healthy part looks calm), while a map at the threshold is not."""
    import numpy as np

    from models.patchcore import Prediction
    from inspection.scoring import write_overlay

    image = np.full((96, 96, 3), 90, np.uint8)

    def overlay(level: float, name: str) -> np.ndarray:
        anomaly_map = np.full((96, 96), level, np.float32)
        prediction = Prediction(score=5.0, threshold=fitted_model.threshold, anomaly_map=anomaly_map,
                                is_anomalous=False, sigma=0.0, anomaly_confidence=0.0)
        return cv2.imread(str(write_overlay(fitted_model, image, prediction, tmp_path / name)))

    at_zero = overlay(0.0, "zero.png")
    assert np.array_equal(overlay(fitted_model.calibration_median, "median.png"), at_zero)
    assert not np.array_equal(overlay(fitted_model.threshold, "threshold.png"), at_zero)


def test_an_empty_upload_is_a_400_naming_it(service):
    response = httpx.post(f"http://127.0.0.1:{service}/score", content=b"", params={"name": "nothing.png"}, timeout=60)
    assert response.status_code == 400
    assert response.json() == {"path": "nothing.png", "error": "nothing.png: empty upload"}


def test_get_model_describes_the_model_file_that_decides(service, limited_model):
    model = PatchCore.load(limited_model)
    summary = httpx.get(f"http://127.0.0.1:{service}/model", timeout=60).json()
    assert summary["model_file"] == str(limited_model)  # the full path: two lines' files may share a name
    assert summary["threshold"] == pytest.approx(model.threshold)
    assert summary["weights_identity"] == model.weights_identity and summary["backbone"] == model.config.backbone
    assert summary["n_train"] == model.n_train and summary["config"]["max_image_pixels"] == PIXEL_LIMIT
    assert summary["calibration"]["median"] == pytest.approx(model.calibration_median)
    assert (summary["image_size"], summary["batch_size"]) == (model.config.image_size, model.config.batch_size)


def test_the_watched_folder_waits_for_an_empty_file_to_be_written_and_sorts_flagged_photos(
    fitted_model, photos, tmp_path
):
    """A camera that creates its file first and writes it later gets its photo scored, not an error
    for the empty file; a flagged photo goes to anomalous/; a photo in a subfolder is left alone."""
    import shutil

    from runtime.watcher import WatchOutputs

    saved = tmp_path / "strict.pkl"
    fitted_model.save(saved)
    strict = PatchCore.load(saved)
    strict.threshold = 1e-3  # every photo is flagged
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    (inbox / "line2").mkdir(parents=True)
    shutil.copy(photos["small"], inbox / "line2" / "elsewhere.png")
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", sort_into=out)
    with watching(strict, inbox, outputs):
        (inbox / "late.png").touch()
        time.sleep(1.5)  # three times the settle time: an empty file is not a photo yet
        (inbox / "late.png").write_bytes(photos["small"].read_bytes())
        (record,) = wait_for_lines(outputs.jsonl, 1)
        time.sleep(1.0)
    assert "error" not in record and record["is_anomalous"] is True
    assert (out / "anomalous" / "late.png").is_file()
    assert (inbox / "line2" / "elsewhere.png").is_file() and len(wait_for_lines(outputs.jsonl, 1)) == 1
