"""The watched folder: photos dropped while it runs, one written slowly, one corrupt; restarts."""

from __future__ import annotations

import csv
import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from evaluation.mvtec import load_test_split
from runtime.watcher import FolderWatcher, WatchOutputs


@contextmanager
def watching(model, folder: Path, outputs: WatchOutputs) -> Iterator[None]:
    stop = threading.Event()
    watcher = FolderWatcher(model, folder, outputs, settle_s=0.5)
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)


def lines(path: Path) -> list[dict]:
    """The records of a JSON-lines file, skipping a torn line."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def wait_for(path: Path, count: int, timeout: float = 240) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = lines(path)
        if len(records) >= count:
            return records
        time.sleep(0.2)
    pytest.fail(f"{path}: {len(lines(path))} records after {timeout} s, expected {count}")


def write_slowly(source: Path, target: Path, pieces: int = 6, pause: float = 0.3) -> None:
    """A camera that needs ~2 s to write a photo: half a PNG sits in the folder meanwhile."""
    data = source.read_bytes()
    step = len(data) // pieces + 1
    with open(target, "wb") as handle:
        for start in range(0, len(data), step):
            handle.write(data[start : start + step])
            handle.flush()
            time.sleep(pause)


@pytest.fixture()
def photos(small_screw_dir) -> dict[str, Path]:
    samples = load_test_split(small_screw_dir)
    return {
        "good": next(s.path for s in samples if s.kind == "good"),
        "defect": next(s.path for s in samples if s.kind == "manipulated_front"),
        "other": next(s.path for s in samples if s.kind == "scratch_head"),
    }


def test_dropped_photos_are_scored_once_written_and_sorted(fitted_model, photos, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    shutil.copy(photos["other"], inbox / "before_start.png")  # arrived while the watcher was down
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", csv=tmp_path / "results.csv", sort_into=out)
    with watching(fitted_model, inbox, outputs):
        shutil.copy(photos["good"], inbox / "good.png")
        (inbox / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 100)
        write_slowly(photos["defect"], inbox / "slow.png")
        records = {Path(r["path"]).name: r for r in wait_for(outputs.jsonl, 4)}
    assert set(records) == {"before_start.png", "good.png", "corrupt.png", "slow.png"}
    assert "error" in records["corrupt.png"]
    (slow,) = fitted_model.predict([photos["defect"]])  # the whole photo, not the half first seen
    assert "error" not in records["slow.png"] and records["slow.png"]["score"] == pytest.approx(slow.score, abs=2e-4)
    assert (out / "unreadable" / "corrupt.png").is_file()
    for name in ("before_start.png", "good.png", "slow.png"):
        verdict = "anomalous" if records[name]["is_anomalous"] else "ok"
        assert (out / verdict / name).is_file()
    assert not any(inbox.iterdir())
    with open(outputs.csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(Path(row["path"]).name for row in rows) == sorted(records)


def test_a_restart_scores_what_arrived_meanwhile_and_nothing_twice(fitted_model, photos, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl")
    with watching(fitted_model, inbox, outputs):
        shutil.copy(photos["good"], inbox / "first.png")
        wait_for(outputs.jsonl, 1)
    shutil.copy(photos["defect"], inbox / "while_down.png")
    with open(outputs.jsonl, "a") as handle:
        handle.write('{"path": "torn')  # a crash in the middle of an append
    with watching(fitted_model, inbox, outputs):
        wait_for(outputs.jsonl, 2)
        time.sleep(2)  # time enough to (wrongly) score first.png again
    assert [Path(record["path"]).name for record in lines(outputs.jsonl)] == ["first.png", "while_down.png"]


def test_watch_needs_somewhere_to_put_results():
    with pytest.raises(ValueError, match="--jsonl"):
        WatchOutputs()


def test_watch_with_visualize_writes_each_photos_heatmap_before_its_record(fitted_model, photos, tmp_path):
    import inference

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    args = inference.parse_args(["--model", "m.pkl", "--watch", str(inbox), "--jsonl", "r.jsonl", "--visualize"])
    assert args.visualize  # the command line accepts the pair
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", heatmaps=tmp_path / "heatmaps")
    with watching(fitted_model, inbox, outputs):
        shutil.copy(photos["defect"], inbox / "part.png")
        (record,) = wait_for(outputs.jsonl, 1)
    assert record["heatmap"] == str(tmp_path / "heatmaps" / "part.png_heatmap.png")
    assert Path(record["heatmap"]).read_bytes().startswith(b"\x89PNG")
