"""Shared fixtures: the real MVTec AD screw data (read in place, never copied) and a small fitted model."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from config import Config

ROOT = Path(__file__).resolve().parents[1]


def data_roots() -> list[Path]:
    """Where the tests look for MVTec AD, in order: $FASTENER_DATA when set, the project's data/ (where
    the README puts it), then a data folder shared beside the project."""
    roots = [Path(os.environ["FASTENER_DATA"])] if os.environ.get("FASTENER_DATA") else []
    return roots + [ROOT / "data", ROOT.parent / "shared" / "data"]


def find_screw_dir() -> Path | None:
    """The first ``<root>/mvtec_ad/screw`` with training photos, or None."""
    return next((root / "mvtec_ad" / "screw" for root in data_roots()
                 if (root / "mvtec_ad" / "screw" / "train" / "good").is_dir()), None)


@pytest.fixture(scope="session")
def screw_dir() -> Path:
    found = find_screw_dir()
    if found is None:
        looked = ", ".join(str(root / "mvtec_ad" / "screw") for root in data_roots())
        pytest.skip(f"MVTec AD screw data not found (looked in {looked}; set FASTENER_DATA to the folder "
                    "holding mvtec_ad/)")
    return found


def link_subset(source: Path, target: Path, n_train: int, n_test_per_kind: int) -> Path:
    """A small MVTec-layout folder of symlinks into the real data (no copy of the data set)."""
    for image in sorted((source / "train" / "good").glob("*.png"))[:n_train]:
        (target / "train" / "good").mkdir(parents=True, exist_ok=True)
        os.symlink(image, target / "train" / "good" / image.name)
    for kind_dir in sorted((source / "test").iterdir()):
        for image in sorted(kind_dir.glob("*.png"))[:n_test_per_kind]:
            (target / "test" / kind_dir.name).mkdir(parents=True, exist_ok=True)
            os.symlink(image, target / "test" / kind_dir.name / image.name)
            mask = source / "ground_truth" / kind_dir.name / f"{image.stem}_mask.png"
            if mask.is_file():
                (target / "ground_truth" / kind_dir.name).mkdir(parents=True, exist_ok=True)
                os.symlink(mask, target / "ground_truth" / kind_dir.name / mask.name)
    return target


@pytest.fixture(scope="session")
def small_screw_dir(screw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return link_subset(screw_dir, tmp_path_factory.mktemp("screw_small"), n_train=12, n_test_per_kind=2)


def small_config(**changes) -> Config:
    """The offline backbone at a small size: seconds to fit on a dozen images (the eight steps as switched)."""
    return Config(**{"backbone": "efficientnet_lite0", "image_size": 128, "batch_size": 8, "preprocess": "on", **changes})


@pytest.fixture(scope="session")
def fitted_model(small_screw_dir: Path):
    from models.patchcore import PatchCore
    from evaluation.mvtec import train_images

    model = PatchCore(small_config())
    model.fit(train_images(small_screw_dir), progress=False)
    return model


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Runs a command-line tool as on a line PC set up from requirements-runtime.txt: the packages that
# only fitting needs cannot be imported.
WITHOUT_FITTING_PACKAGES = """
import runpy, sys
for name in ("torch", "torchvision", "sklearn", "scipy", "matplotlib", "skimage"):
    sys.modules[name] = None
sys.argv = sys.argv[1:]
sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])  # as running the script itself would
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def part_photo(elongation: float = 2.0, degrees: float = 0.0, short: float = 40, size: int = 200,
               centre: tuple[float, float] = (100, 100), colour: tuple[int, int, int] = (170, 170, 170),
               table: tuple[int, int, int] = (40, 40, 40)) -> np.ndarray:
    """A flat rectangular part of a given axis ratio, angle and size on a plain table."""
    image = np.full((size, size, 3), table, np.uint8)
    box = cv2.boxPoints((centre, (short * elongation, short), degrees)).astype(np.int32)
    cv2.fillPoly(image, [box], colour)
    return image


def save_as_older_file(model: Any, path: Path) -> None:
    """``model`` saved as a file from before models kept their coreset projection (its export beside it)."""
    model.save(path)
    state = pickle.loads(path.read_bytes())
    del state["coreset_projection"]
    path.write_bytes(pickle.dumps(state))


def pretend_torch_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process, torch looks as it does on the line PC (requirements-runtime.txt): not installed."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "torch" else find_spec(name, *rest))


@contextmanager
def running_service(*args: str, line_pc: bool = False) -> Iterator[int]:
    """serve.py with ``args`` on a free local port, once it answers /health; stopped afterwards.
    ``line_pc``: as the line PC runs it, without the packages only fitting needs."""
    port = free_port()
    python = [sys.executable, "-c", WITHOUT_FITTING_PACKAGES] if line_pc else [sys.executable]
    process = subprocess.Popen([*python, str(ROOT / "serve.py"), *args, "--port", str(port)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"serve.py exited with {process.returncode}: {process.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("serve.py did not answer /health within 300 s")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=60)


def json_lines(path: Path) -> list[dict]:
    """The records of a JSON-lines file, skipping a torn last line."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def wait_for_lines(path: Path, count: int, timeout: float = 240) -> list[dict]:
    """Every JSON line of ``path`` once there are at least ``count``, or a test failure after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = json_lines(path)
        if len(records) >= count:
            return records
        time.sleep(0.2)
    pytest.fail(f"{path}: {len(json_lines(path))} records after {timeout} s, expected {count}")


def wait_until(done: Callable[[], bool], timeout: float) -> None:
    """Return once ``done()`` holds, or after ``timeout`` s (the assertions that follow say what went wrong)."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.1)


@contextmanager
def watching(model, folder: Path, outputs, retry_s: float = 3.0, on_record=None,
             settle_s: float = 0.5, model_path: Path | None = None) -> Iterator:
    """A FolderWatcher on ``folder`` running on a thread for the length of the block, then stopped
    (learning from ``confirmed_good/`` into ``model_path`` when given)."""
    from runtime.watcher import FolderWatcher

    stop = threading.Event()
    watcher = FolderWatcher(model, folder, outputs, settle_s=settle_s, retry_s=retry_s, on_record=on_record,
                            model_path=model_path)
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    try:
        yield watcher
    finally:
        stop.set()
        thread.join(timeout=60)
