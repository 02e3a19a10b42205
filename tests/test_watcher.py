"""The watched folder: photos dropped while it runs, one written slowly, one corrupt; restarts."""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import pytest

from conftest import json_lines, part_photo, wait_for_lines, wait_until, watching
from evaluation.mvtec import load_test_split
from output_files import OutputError
from runtime.watcher import WatchOutputs, identity


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


def one_photo_recorded(model, photos, tmp_path: Path) -> tuple[Path, WatchOutputs, dict]:
    """A watch of a fresh ``inbox`` that recorded one healthy photo (``first.png``), then stopped."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl")
    with watching(model, inbox, outputs):
        shutil.copy(photos["good"], inbox / "first.png")
        (record,) = wait_for_lines(outputs.jsonl, 1)
    return inbox, outputs, record


def test_dropped_photos_are_scored_once_written_and_sorted(fitted_model, photos, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    shutil.copy(photos["other"], inbox / "before_start.png")  # arrived while the watcher was down
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", csv=tmp_path / "results.csv", sort_into=out)
    with watching(fitted_model, inbox, outputs):
        shutil.copy(photos["good"], inbox / "good.png")
        (inbox / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 100)
        write_slowly(photos["defect"], inbox / "slow.png")
        records = {Path(r["path"]).name: r for r in wait_for_lines(outputs.jsonl, 4)}
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
    inbox, outputs, _ = one_photo_recorded(fitted_model, photos, tmp_path)
    shutil.copy(photos["defect"], inbox / "while_down.png")
    with open(outputs.jsonl, "a") as handle:
        handle.write('{"path": "torn')  # a crash in the middle of an append
    with watching(fitted_model, inbox, outputs):
        wait_for_lines(outputs.jsonl, 2)
        time.sleep(2)  # time enough to (wrongly) score first.png again
    assert [Path(record["path"]).name for record in json_lines(outputs.jsonl)] == ["first.png", "while_down.png"]


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
        (record,) = wait_for_lines(outputs.jsonl, 1)
    assert record["heatmap"] == str(tmp_path / "heatmaps" / "part.png_heatmap.png")
    assert Path(record["heatmap"]).read_bytes().startswith(b"\x89PNG")


def test_a_reused_name_is_a_new_photo_and_a_folder_spelled_otherwise_scores_nothing_twice(fitted_model, photos, tmp_path):
    """A camera that overwrites frame.png writes a new photo each time; a restart through a symlink
    to the same folder knows the photos by what they are, not by how the path is spelled."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl")
    with watching(fitted_model, inbox, outputs):
        shutil.copy(photos["good"], inbox / "frame.png")
        wait_for_lines(outputs.jsonl, 1)
        shutil.copy(photos["defect"], inbox / "frame.png")  # the same name, another photo
        first, second = wait_for_lines(outputs.jsonl, 2)
    assert Path(first["path"]).name == Path(second["path"]).name == "frame.png"
    (defect,) = fitted_model.predict([photos["defect"]])
    assert second["score"] == pytest.approx(defect.score, abs=2e-4) != first["score"]
    (tmp_path / "alias").symlink_to(inbox)
    with watching(fitted_model, tmp_path / "alias", outputs):
        time.sleep(3)  # time enough to (wrongly) score frame.png again
    assert len(json_lines(outputs.jsonl)) == 2


def test_a_photo_replaced_after_scoring_is_scored_and_the_new_one_never_sorted_under_the_old_verdict(
        fitted_model, photos, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", sort_into=out)
    replaced = []

    def camera_overwrites(record: dict) -> None:  # between the record and the move: the overwrite race
        if not replaced:
            shutil.copy(photos["defect"], inbox / "frame.png")
            replaced.append(record)

    with watching(fitted_model, inbox, outputs, on_record=camera_overwrites):
        shutil.copy(photos["good"], inbox / "frame.png")
        first, second = wait_for_lines(outputs.jsonl, 2)
        wait_until(lambda: not any(inbox.iterdir()), timeout=30)
    (defect,) = fitted_model.predict([photos["defect"]])
    assert second["score"] == pytest.approx(defect.score, abs=2e-4)
    sorted_files = list(out.glob("*/frame*.png"))
    assert len(sorted_files) == 1 and sorted_files[0].read_bytes() == photos["defect"].read_bytes()
    assert sorted_files[0].parent.name == ("anomalous" if second["is_anomalous"] else "ok")


def test_reused_names_are_sorted_side_by_side_never_over_each_other(fitted_model, photos, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", sort_into=out)
    with watching(fitted_model, inbox, outputs):
        for count, kind in enumerate(("good", "good", "good"), start=1):
            shutil.copy(photos[kind], inbox / "IMG_0001.png")
            wait_for_lines(outputs.jsonl, count)
            wait_until(lambda: not (inbox / "IMG_0001.png").exists(), timeout=30)
    assert sorted(path.name for path in out.glob("*/*.png")) == ["IMG_0001.png", "IMG_0001_2.png", "IMG_0001_3.png"]


@pytest.mark.parametrize("through_link", [False, True], ids=["file", "link"])
def test_a_photo_written_in_pieces_with_pauses_longer_than_the_settle_time_is_scored_whole(
        fitted_model, photos, tmp_path, through_link: bool) -> None:
    """FTP and SMB cameras pause between pieces: 1 s pauses against a 0.5 s settle time. A photo linked into the
    folder is watched as its target is written, not as the link that stays the same."""
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    written = inbox / "slow.png"
    if through_link:
        written = tmp_path / "camera.png"
        (inbox / "slow.png").symlink_to(written)
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", sort_into=out)
    with watching(fitted_model, inbox, outputs, retry_s=10):
        write_slowly(photos["defect"], written, pieces=4, pause=1.0)
        (record,) = wait_for_lines(outputs.jsonl, 1)
        time.sleep(1)
    (slow,) = fitted_model.predict([photos["defect"]])
    assert "error" not in record and record["score"] == pytest.approx(slow.score, abs=2e-4)
    assert not (out / "unreadable").exists() or not any((out / "unreadable").iterdir())
    assert len(json_lines(outputs.jsonl)) == 1


def test_links_to_a_fifo_or_a_device_and_empty_files_each_get_one_error_record(fitted_model, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    os.mkfifo(tmp_path / "pipe")
    (inbox / "pipe.png").symlink_to(tmp_path / "pipe")
    (inbox / "zero.png").symlink_to("/dev/zero")
    (inbox / "empty.png").write_bytes(b"")
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", sort_into=out)
    with watching(fitted_model, inbox, outputs, retry_s=1):
        records = {Path(r["path"]).name: r for r in wait_for_lines(outputs.jsonl, 3, timeout=60)}
        time.sleep(2)
    assert set(records) == {"pipe.png", "zero.png", "empty.png"} and len(json_lines(outputs.jsonl)) == 3
    assert "not a regular file" in records["pipe.png"]["error"] and "not a regular file" in records["zero.png"]["error"]
    assert sorted(path.name for path in (out / "unreadable").iterdir()) == ["empty.png", "pipe.png", "zero.png"]


ROOT = Path(__file__).resolve().parents[1]


def watch_refused(tmp_path: Path, read_only: str) -> list[str]:
    """The error lines of ``inference.py --watch inbox --sort-into sorted`` with ``read_only`` unwritable;
    the model file is never read: the folders are checked first."""
    from test_io import without_root_powers

    model_file = tmp_path / "model.pkl"
    model_file.write_bytes(b"never read: the folders are checked first")
    for folder in ("inbox", "sorted"):
        (tmp_path / folder).mkdir()
    (tmp_path / read_only).chmod(0o555)
    command = [sys.executable, str(ROOT / "inference.py"), "--model", str(model_file), "--watch", "inbox",
               "--sort-into", "sorted"]
    result = subprocess.run(without_root_powers(command), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    return result.stderr.splitlines()


def test_a_read_only_sort_folder_is_refused_before_the_model_loads(tmp_path):
    (line,) = watch_refused(tmp_path, "sorted")
    assert line.startswith("error: sorted/") and line.endswith(": cannot be written (Permission denied); any previous file is unchanged")


def test_a_broken_export_beside_the_model_stops_the_watcher_at_start_not_at_its_first_photo(fitted_model, tmp_path):
    """The watcher opens the network before it watches, as the service does: a photo that arrives is
    never the first to meet a model that cannot score."""
    fitted_model.save(tmp_path / "model.pkl")
    (tmp_path / "model.onnx").write_bytes(b"not an ONNX graph")
    (tmp_path / "inbox").mkdir()
    command = [sys.executable, str(ROOT / "inference.py"), "--model", "model.pkl", "--watch", "inbox",
               "--jsonl", "results.jsonl"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: model.onnx: not a usable ONNX model")
    assert line.endswith("export it again with scripts/export_onnx.py, or score with --runtime torch")


def test_a_full_disk_is_retried_loudly_and_every_photo_still_gets_exactly_one_record(fitted_model, photos, tmp_path):
    """The file-size limit refuses writes as a full disk would; once it is lifted, the watcher carries on."""
    model_file = tmp_path / "model.pkl"
    fitted_model.save(model_file)
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    jsonl = tmp_path / "results.jsonl"

    def survive_full_files() -> None:  # a write past the limit fails with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    command = [sys.executable, str(ROOT / "inference.py"), "--model", str(model_file), "--watch", str(inbox),
               "--jsonl", str(jsonl), "--sort-into", str(out), "--retry-seconds", "2", "--runtime", "torch"]
    with open(tmp_path / "stderr", "w") as stderr:
        watcher = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=survive_full_files)
    try:
        deadline = time.monotonic() + 300
        while "watching" not in (tmp_path / "stderr").read_text() and time.monotonic() < deadline:
            assert watcher.poll() is None, (tmp_path / "stderr").read_text()
            time.sleep(0.5)
        # the disk fills up once it runs: in the watcher's process, writes past 1.5 KB fail from now on
        resource.prlimit(watcher.pid, resource.RLIMIT_FSIZE, (1500, resource.RLIM_INFINITY))
        names = [f"p{index:02d}.png" for index in range(12)]
        for index, name in enumerate(names):
            shutil.copy(photos[("good", "defect", "other")[index % 3]], inbox / name)
        full_until = time.monotonic() + 60
        while "cannot be written" not in (tmp_path / "stderr").read_text() and time.monotonic() < full_until:
            time.sleep(0.5)
        time.sleep(6)  # at least one retry fails too
        assert watcher.poll() is None, "the watcher exited on a full disk"
        resource.prlimit(watcher.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        wait_for_lines(jsonl, len(names), timeout=120)
        while any(inbox.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)
    finally:
        watcher.terminate()
        watcher.wait(timeout=60)
    log = (tmp_path / "stderr").read_text()
    assert log.count("results cannot be written (File too large)") >= 2 and "written again after a failed write" in log
    assert sorted(Path(record["path"]).name for record in json_lines(jsonl)) == names  # exactly once each
    assert sorted(path.name for path in out.glob("*/*.png")) == names
    assert jsonl.read_text().endswith("\n") and len(jsonl.read_text().splitlines()) == len(names)


def test_a_batch_cut_short_by_a_crash_is_written_once_at_the_next_start(fitted_model, photos, tmp_path):
    """Killed after journalling a batch and appending part of it: the restart cuts the torn tail off,
    writes the batch's records once, and does not score its photo again."""
    inbox, outputs, first = one_photo_recorded(fitted_model, photos, tmp_path)
    shutil.copy(photos["defect"], inbox / "second.png")
    second = {**first, "path": str(inbox / "second.png"), "score": 1.2345}  # what the journal says was scored
    batch = {"records": [second], "photos": [{"id": identity(inbox / "second.png"), "path": second["path"],
                                              "verdict": "ok"}], "jsonl": outputs.jsonl.stat().st_size, "csv": None}
    with open(outputs.state, "a") as journal:
        journal.write(json.dumps({"batch": batch}) + "\n")
    with open(outputs.jsonl, "a") as results:  # the kill came mid-append, after a longer torn write
        results.write(json.dumps(second)[:40] + "x" * 2000)
    with watching(fitted_model, inbox, outputs):
        time.sleep(3)  # time enough to (wrongly) score second.png again
    assert [record["score"] for record in json_lines(outputs.jsonl)] == [first["score"], 1.2345]
    assert outputs.jsonl.read_text().count("\n") == 2


def test_a_disk_that_fails_the_start_up_rewrite_of_the_journal_leaves_the_journal_whole(
        fitted_model, photos, tmp_path, monkeypatch):
    """The start rewrites the journal with the photos still in the folder. A disk that fails in that instant
    must stop the start with the journal as it was: a journal cut short would let the next start score
    recorded photos again and record them twice."""
    from runtime.watcher import FolderWatcher

    inbox, outputs, _ = one_photo_recorded(fitted_model, photos, tmp_path)
    journal = outputs.state.read_bytes()

    def failing_disk(source: object, target: object) -> None:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patch:  # the output check before it passes: the disk fails at the rewrite
        patch.setattr(os, "replace", failing_disk)
        with pytest.raises(OutputError, match="Input/output error"):
            FolderWatcher(fitted_model, inbox, outputs)
    assert outputs.state.read_bytes() == journal
    assert sorted(path.name for path in tmp_path.iterdir()) == ["inbox", "results.jsonl", "results.jsonl.state"]
    with watching(fitted_model, inbox, outputs):
        time.sleep(2)  # time enough to (wrongly) score first.png again
    assert len(json_lines(outputs.jsonl)) == 1


def test_a_new_photo_that_inherits_a_deleted_photos_inode_size_and_time_is_scored(fitted_model, tmp_path):
    """A recorded photo deleted by another program frees its inode for the next file; a camera's
    uncompressed photos share one size and a copy that keeps times (cp -p, rsync -t) shares the time,
    so a new photo under another name carries the deleted one's identity: it is scored, not skipped."""
    inbox, stage = tmp_path / "inbox", tmp_path / "stage"
    inbox.mkdir()
    stage.mkdir()
    cv2.imwrite(str(stage / "a.bmp"), part_photo())
    cv2.imwrite(str(stage / "b.bmp"), part_photo(degrees=45))
    for path in stage.iterdir():
        os.utime(path, ns=(1_767_261_600_000_000_000,) * 2)
    jsonl = tmp_path / "results.jsonl"
    with watching(fitted_model, inbox, WatchOutputs(jsonl=jsonl)):
        shutil.copy2(stage / "a.bmp", inbox / "frame.bmp")
        recorded = identity(inbox / "frame.bmp")
        wait_for_lines(jsonl, 1, timeout=60)
        (inbox / "frame.bmp").unlink()
        shutil.copy2(stage / "b.bmp", inbox / "frame2.bmp")
        if identity(inbox / "frame2.bmp") != recorded:
            pytest.skip("this file system did not give the new photo the deleted one's inode")
        records = wait_for_lines(jsonl, 2, timeout=30)
    assert [Path(record["path"]).name for record in records] == ["frame.bmp", "frame2.bmp"]


def test_a_recorded_photo_renamed_within_the_folder_is_not_recorded_again(fitted_model, photos, tmp_path):
    """An operator renames a recorded photo (to mark it, or a camera's tool renumbers): it is the same photo."""
    inbox, outputs, _ = one_photo_recorded(fitted_model, photos, tmp_path)
    with watching(fitted_model, inbox, outputs):
        time.sleep(1)  # the start-up scan is done
        os.rename(inbox / "first.png", inbox / "first_checked.png")
        time.sleep(2)  # time enough to (wrongly) score it again
    assert len(json_lines(outputs.jsonl)) == 1


def test_a_reused_name_draws_each_photos_own_heatmap(fitted_model, photos, tmp_path):
    """A camera writing every photo as frame.png: each record's heatmap is the photo it scored, and an
    earlier photo's overlay is never drawn over."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", sort_into=tmp_path / "sorted",
                           heatmaps=tmp_path / "heatmaps")
    with watching(fitted_model, inbox, outputs):
        shutil.copy(photos["defect"], inbox / "frame.png")
        (first,) = wait_for_lines(outputs.jsonl, 1, timeout=60)
        first_overlay = Path(first["heatmap"]).read_bytes()
        wait_until(lambda: not (inbox / "frame.png").exists(), timeout=30)
        shutil.copy(photos["good"], inbox / "frame.png")
        second = wait_for_lines(outputs.jsonl, 2, timeout=60)[1]
    assert [Path(record["heatmap"]).name for record in (first, second)] == [
        "frame.png_heatmap.png", "frame_2.png_heatmap.png"]
    assert Path(first["heatmap"]).read_bytes() == first_overlay


def test_photos_of_one_batch_never_share_a_heatmap(fitted_model, photos, tmp_path):
    """frame.png's overlay is there from an earlier run, so a new frame.png is drawn as frame_2.png; a
    photo really named frame_2.png, scored in the same batch, must get its own overlay, not that one."""
    inbox, heatmaps = tmp_path / "inbox", tmp_path / "heatmaps"
    inbox.mkdir()
    heatmaps.mkdir()
    (heatmaps / "frame.png_heatmap.png").write_bytes(b"yesterday's overlay")
    shutil.copy(photos["good"], inbox / "frame.png")  # both there at the start: one batch
    shutil.copy(photos["defect"], inbox / "frame_2.png")
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", heatmaps=heatmaps)
    with watching(fitted_model, inbox, outputs):
        records = wait_for_lines(outputs.jsonl, 2, timeout=60)
    overlays = [Path(record["heatmap"]) for record in records]
    assert len(set(overlays)) == 2 and all(overlay.is_file() for overlay in overlays)
    assert (heatmaps / "frame.png_heatmap.png").read_bytes() == b"yesterday's overlay"


def test_a_heatmap_that_cannot_be_written_never_stops_the_watch(fitted_model, photos, tmp_path):
    """A photo whose overlay cannot be written (its name leaves no room for "_heatmap.png"; a full disk
    alike) is recorded and sorted with a warning, and the photos after it are scored."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", sort_into=tmp_path / "sorted",
                           heatmaps=tmp_path / "heatmaps")
    long_name = "p" * 246 + ".png"
    with watching(fitted_model, inbox, outputs):
        shutil.copy(photos["good"], inbox / long_name)
        wait_for_lines(outputs.jsonl, 1, timeout=60)
        shutil.copy(photos["defect"], inbox / "next.png")
        records = wait_for_lines(outputs.jsonl, 2, timeout=60)
        wait_until(lambda: not any(inbox.iterdir()), timeout=10)
    assert [Path(record["path"]).name for record in records] == [long_name, "next.png"]
    assert "heatmap" not in records[0] and records[0]["warnings"][0].startswith("no heatmap: ")
    assert Path(records[1]["heatmap"]).is_file()


def test_a_reused_name_too_long_to_take_a_number_is_sorted_under_a_shortened_one(fitted_model, photos, tmp_path):
    """A 255-byte name arriving a second time cannot become name_2.png (past the 255 bytes a name may have):
    it is sorted as a shortened name with the number, not left in the folder for ever."""
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    long_name = "p" * 251 + ".png"
    with watching(fitted_model, inbox, WatchOutputs(jsonl=tmp_path / "results.jsonl", sort_into=out)):
        for _ in range(2):  # the same healthy part twice: both go to ok/
            shutil.copy(photos["good"], inbox / long_name)
            wait_until(lambda: not any(inbox.iterdir()), timeout=60)
    assert sorted(path.name for path in (out / "ok").iterdir()) == sorted([long_name, "p" * 249 + "_2.png"])


def test_photos_recorded_before_sorting_was_asked_for_are_sorted_at_the_next_start_and_never_recorded_twice(
        fitted_model, photos, tmp_path):
    """The journal remembers what was recorded: a restart with --sort-into moves those photos at once.
    Cameras that write upper-case suffixes (CAM1.PNG) are watched like any other."""
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    jsonl = tmp_path / "results.jsonl"
    with watching(fitted_model, inbox, WatchOutputs(jsonl=jsonl)):
        shutil.copy(photos["defect"], inbox / "CAM1.PNG")
        (record,) = wait_for_lines(jsonl, 1, timeout=60)
    assert (inbox / "CAM1.PNG").is_file()  # recorded, not sorted: no --sort-into yet
    with watching(fitted_model, inbox, WatchOutputs(jsonl=jsonl, sort_into=out)):  # the same journal, <jsonl>.state
        wait_until(lambda: not (inbox / "CAM1.PNG").exists(), timeout=10)
    verdict = "anomalous" if record["is_anomalous"] else "ok"
    assert (out / verdict / "CAM1.PNG").read_bytes() == photos["defect"].read_bytes()
    assert not any(inbox.iterdir()) and len(json_lines(jsonl)) == 1


def test_a_photo_overwritten_while_it_is_read_is_scored_as_it_ends_up_once(fitted_model, photos, tmp_path, monkeypatch):
    """The camera writes the next frame under the name while the watcher reads the first: the bytes read
    belong to neither photo that settled, so the photo is read again, and recorded once."""
    import runtime.watcher as watcher_module

    real_read = watcher_module.read_photo_bytes
    overwritten: list[Path] = []

    def read_then_overwrite(path: Path, max_pixels: int) -> bytes:
        data = real_read(path, max_pixels)
        if not overwritten:
            overwritten.append(path)
            shutil.copy(photos["defect"], path)
        return data

    monkeypatch.setattr(watcher_module, "read_photo_bytes", read_then_overwrite)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl")
    with watching(fitted_model, inbox, outputs):
        shutil.copy(photos["good"], inbox / "frame.png")
        wait_for_lines(outputs.jsonl, 1, timeout=60)
        time.sleep(1.5)  # three settle times: time enough to (wrongly) record the new frame a second time
    (defect,) = fitted_model.predict([photos["defect"]])
    (record,) = json_lines(outputs.jsonl)
    assert overwritten and record["score"] == pytest.approx(defect.score, abs=2e-4)


def test_a_read_only_watched_folder_is_refused_before_the_model_loads_when_photos_are_to_be_sorted(tmp_path):
    """Sorting moves each photo out of the folder, which needs write permission on it."""
    assert watch_refused(tmp_path, "inbox") == ["error: inbox: cannot move photos out of it (read-only)"]

def test_a_photo_name_that_is_not_utf8_is_recorded_and_sorted_not_the_end_of_the_watch(fitted_model, photos, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    odd = os.fsencode(inbox) + b"/frame\xff.png"  # a camera writing Latin-1 names: not UTF-8
    shutil.copy(photos["good"], odd)
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", csv=tmp_path / "results.csv", sort_into=out)
    with watching(fitted_model, inbox, outputs) as watcher:
        (record,) = wait_for_lines(outputs.jsonl, 1, timeout=60)
        shutil.copy(photos["other"], inbox / "next.png")
        wait_for_lines(outputs.jsonl, 2, timeout=60)
    assert record["path"] == os.fsdecode(odd) and "error" not in record
    assert odd in outputs.csv.read_bytes()
    verdict = "anomalous" if record["is_anomalous"] else "ok"
    assert os.path.isfile(os.fsencode(out / verdict) + b"/frame\xff.png")
    assert not watcher.done


def test_a_photo_renamed_into_the_folder_from_a_temporary_name_is_scored_and_sorted(fitted_model, photos, tmp_path):
    """FTP servers and many cameras write a photo under a temporary name and rename it once it is whole."""
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", sort_into=out)
    with watching(fitted_model, inbox, outputs):
        shutil.copy(photos["good"], inbox / "first.png")
        wait_for_lines(outputs.jsonl, 1, timeout=60)  # watching for certain: the rename is news, not a start-up scan
        shutil.copy(photos["defect"], inbox / "frame.png.part")
        os.rename(inbox / "frame.png.part", inbox / "frame.png")
        records = wait_for_lines(outputs.jsonl, 2, timeout=30)
        wait_until(lambda: not any(inbox.iterdir()), timeout=10)
    assert [Path(record["path"]).name for record in records] == ["first.png", "frame.png"]
    assert sorted(path.name for path in out.glob("*/*.png")) == ["first.png", "frame.png"]


def test_a_photo_overwritten_by_one_of_the_same_size_is_scored_again(fitted_model, photos, tmp_path):
    """A camera writing uncompressed frames (BMP) under one name writes the same number of bytes each time."""
    frames = [cv2.imencode(".bmp", cv2.imread(str(photos[kind])))[1].tobytes() for kind in ("good", "defect")]
    assert len(frames[0]) == len(frames[1]) and frames[0] != frames[1]
    (tmp_path / "defect.bmp").write_bytes(frames[1])
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl")
    with watching(fitted_model, inbox, outputs):
        (inbox / "frame.bmp").write_bytes(frames[0])
        wait_for_lines(outputs.jsonl, 1, timeout=60)
        (inbox / "frame.bmp").write_bytes(frames[1])  # the same name, the same size, another photo
        first, second = wait_for_lines(outputs.jsonl, 2, timeout=30)
    (defect,) = fitted_model.predict([tmp_path / "defect.bmp"])
    assert Path(first["path"]).name == Path(second["path"]).name == "frame.bmp"
    assert second["score"] == pytest.approx(defect.score, abs=2e-4) != first["score"]


def test_a_photo_that_cannot_be_moved_is_moved_once_it_can_with_an_error_line_per_retry(
        fitted_model, photos, tmp_path, monkeypatch, capsys):
    """A stray file where OUT/ok should be: the photo stays, its record is written once, the move is
    tried again every RETRY_WRITE_S (said each time, not at every look) and succeeds once the folder is back."""
    import runtime.watcher as watcher_module

    monkeypatch.setattr(watcher_module, "RETRY_WRITE_S", 0.5)
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", sort_into=out)
    with watching(fitted_model, inbox, outputs):
        for verdict in ("ok", "anomalous"):
            (out / verdict).rmdir()
            (out / verdict).write_bytes(b"")
        shutil.copy(photos["good"], inbox / "part.png")
        (record,) = wait_for_lines(outputs.jsonl, 1, timeout=60)
        said: list[tuple[float, str]] = []  # (when, line) of each refusal, as it is printed
        deadline = time.monotonic() + 10
        while len(said) < 3 and time.monotonic() < deadline:  # the first try and two retries, all refused
            time.sleep(0.05)
            lines = capsys.readouterr().err.splitlines()
            said += [(time.monotonic(), line) for line in lines if "cannot be moved" in line]
        assert (inbox / "part.png").is_file()
        for verdict in ("ok", "anomalous"):
            (out / verdict).unlink()
            (out / verdict).mkdir()
        wait_until(lambda: not (inbox / "part.png").exists(), timeout=10)
    verdict = "anomalous" if record["is_anomalous"] else "ok"
    assert (out / verdict / "part.png").read_bytes() == photos["good"].read_bytes()
    assert not any(inbox.iterdir()) and len(json_lines(outputs.jsonl)) == 1
    assert len(said) == 3, said
    gaps = [later - earlier for (earlier, _), (later, _) in zip(said, said[1:])]
    assert min(gaps) > 0.3, gaps  # every RETRY_WRITE_S (0.5 s), not at every look (0.1 s)
    assert said[0][1].startswith(f"error: {inbox / 'part.png'}: cannot be moved to {out / verdict}")


@contextmanager
def watch_command(model_file: Path, inbox: Path, jsonl: Path) -> Iterator[tuple[Path, Path]]:
    """``inference.py --watch inbox --jsonl jsonl`` (settle 0.2 s, retry 1 s) running for the block, then
    stopped by SIGTERM, on which it exits 0; yields the files its stdout and stderr go to."""
    command = [sys.executable, str(ROOT / "inference.py"), "--model", str(model_file), "--watch", str(inbox),
               "--jsonl", str(jsonl), "--settle-seconds", "0.2", "--retry-seconds", "1", "--runtime", "torch"]
    stdout, stderr = jsonl.with_name("stdout"), jsonl.with_name("stderr")
    with open(stdout, "w") as out, open(stderr, "w") as err:
        watcher = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err)
    try:
        yield stdout, stderr
    finally:
        watcher.terminate()
        assert watcher.wait(timeout=60) == 0


def test_the_watch_command_prints_a_line_per_photo_and_an_error_line_for_an_unreadable_one(
        fitted_model, photos, tmp_path):
    model_file = tmp_path / "model.pkl"
    fitted_model.save(model_file)
    inbox, jsonl = tmp_path / "inbox", tmp_path / "results.jsonl"
    inbox.mkdir()
    shutil.copy(photos["good"], inbox / "good.png")
    (inbox / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 100)
    with watch_command(model_file, inbox, jsonl) as (stdout, stderr):
        records = {Path(r["path"]).name: r for r in wait_for_lines(jsonl, 2, timeout=120)}
        # each line is printed just after its record is written
        wait_until(lambda: bool(stdout.read_text()) and "error: " in stderr.read_text(), timeout=10)
    assert f"watching {inbox} (Ctrl-C to stop); state: {jsonl}.state" in stderr.read_text().splitlines()
    good = records["good.png"]
    assert stdout.read_text().splitlines() == [
        f"{good['path']}  {good['score']:.3f}  {'ANOMALOUS' if good['is_anomalous'] else 'ok'}"]
    assert f"error: {records['corrupt.png']['error']}" in stderr.read_text().splitlines()


def test_the_watch_command_prints_a_drift_warning_once_the_window_is_full(
        fitted_model: object, photos: dict[str, Path], tmp_path: Path) -> None:
    """Every photo flagged over a window of 5: one 'warning: drift: ...' line, as the --jsonl event says."""
    model_file = tmp_path / "model.pkl"
    strict = fitted_model.copy()
    strict.threshold, strict.config = 1e-3, strict.config.replace(drift_window=5)
    strict.save(model_file)
    inbox, jsonl = tmp_path / "inbox", tmp_path / "results.jsonl"
    inbox.mkdir()
    for index in range(6):
        shutil.copy(photos["good"], inbox / f"part{index}.png")
    with watch_command(model_file, inbox, jsonl) as (_, stderr):
        wait_for_lines(jsonl, 7, timeout=120)
        wait_until(lambda: "warning: " in stderr.read_text(), timeout=10)
    (drift,) = [record for record in json_lines(jsonl) if record.get("event") == "drift"]
    assert [line for line in stderr.read_text().splitlines() if line.startswith("warning: ")] == [
        f"warning: {drift['warning']}"]
    assert drift["warning"].startswith("drift: ")


def test_a_photo_written_again_within_the_settle_time_is_scored_once_as_it_ends_up(
        fitted_model: object, photos: dict[str, Path], tmp_path: Path) -> None:
    """A camera that writes a preview and then the full photo under one name: one record, of the photo it ends up."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl")
    with watching(fitted_model, inbox, outputs, settle_s=5):
        shutil.copy(photos["good"], inbox / "frame.png")
        time.sleep(2)  # the camera's second write, well within the settle time
        shutil.copy(photos["defect"], inbox / "frame.png")
        wait_for_lines(outputs.jsonl, 1, timeout=120)
        time.sleep(1)  # time enough for a (wrong) second record
    (defect,) = fitted_model.predict([photos["defect"]])
    (record,) = json_lines(outputs.jsonl)
    assert record["score"] == pytest.approx(defect.score, abs=2e-4)


@pytest.mark.parametrize("named", [("jsonl", "csv"), ("jsonl", "state"), ("csv", "state")], ids="+".join)
def test_one_file_named_for_two_watch_outputs_is_refused_at_start(named, tmp_path):
    """--jsonl R --csv R would write CSV rows over the JSON lines; --state R would rewrite the records as a
    journal at the next start: refused before anything is scored, whatever the spelling."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (tmp_path / "link").symlink_to(tmp_path)
    first, second = named
    outputs = WatchOutputs(**{first: tmp_path / "results", second: tmp_path / "link" / "results"})
    with pytest.raises(OutputError, match=f"results: named by both --{first} and --{second}; give each its own file"):
        outputs.check(inbox)


def test_the_journal_is_beside_the_jsonl_file_else_the_csv_file_else_in_the_sort_folder(tmp_path: Path) -> None:
    """Adding --csv or --sort-into to a watch that had --jsonl keeps its journal: nothing recorded is scored again."""
    jsonl, csv_file, out = tmp_path / "results.jsonl", tmp_path / "results.csv", tmp_path / "sorted"
    assert WatchOutputs(jsonl=jsonl, csv=csv_file, sort_into=out).state == tmp_path / "results.jsonl.state"
    assert WatchOutputs(csv=csv_file, sort_into=out).state == tmp_path / "results.csv.state"
    assert WatchOutputs(sort_into=out).state == out / ".watch-state"
    assert WatchOutputs(jsonl=jsonl, state=tmp_path / "journal").state == tmp_path / "journal"


@pytest.mark.parametrize("stray", ["sorted/ok", "sorted/anomalous", "sorted/unreadable", "heatmaps"])
def test_each_output_folder_that_cannot_be_written_stops_the_watch_at_start(tmp_path: Path, stray: str) -> None:
    """A stray file where a verdict's folder or the heatmap folder should be: the watch stops at start, naming it."""
    inbox = tmp_path / "inbox"
    (tmp_path / "sorted").mkdir(parents=True)
    inbox.mkdir()
    (tmp_path / stray).write_bytes(b"")
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", sort_into=tmp_path / "sorted",
                           heatmaps=tmp_path / "heatmaps")
    with pytest.raises(OutputError) as raised:
        outputs.check(inbox)
    assert str(raised.value).startswith(f"{tmp_path / stray}: cannot be written")


def test_a_result_file_that_cannot_be_written_is_retried_every_retry_write_s_and_its_photo_printed_once(
        fitted_model: object, photos: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A folder where results.jsonl should be: an error line every RETRY_WRITE_S (not at every look) while the
    record waits, then one line saying it is written, and the photo's own line printed once, after that."""
    import runtime.watcher as watcher_module

    monkeypatch.setattr(watcher_module, "RETRY_WRITE_S", 1.0)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl")
    printed: list[dict] = []
    said: list[str] = []

    def printed_line(text: str) -> bool:
        said.extend(capsys.readouterr().err.splitlines())
        return any(text in line for line in said)

    with watching(fitted_model, inbox, outputs, on_record=printed.append):
        outputs.jsonl.mkdir()  # started: the file could be written then
        shutil.copy(photos["good"], inbox / "part.png")
        wait_until(lambda: printed_line("results cannot be written"), timeout=60)
        time.sleep(3)  # the window in which the refusals are counted: a retry each second, 3 to 5 lines
        printed_line("")
        refusals = [line for line in said if "results cannot be written" in line]
        assert not printed
        outputs.jsonl.rmdir()
        (record,) = wait_for_lines(outputs.jsonl, 1, timeout=60)
        wait_until(lambda: printed_line("written again") and bool(printed), timeout=10)
    assert 2 <= len(refusals) <= 5, refusals
    assert refusals[0] == (f"error: {outputs.jsonl}: results cannot be written (Is a directory); 1 records kept, "
                           "retrying in 1 s")
    assert "results written again after a failed write (1 records)" in said
    assert printed == [record]


def test_a_photo_sorted_where_a_broken_link_holds_its_name_goes_beside_it(fitted_model: object, tmp_path: Path) -> None:
    """A link sorted earlier whose target is gone still holds its name in OUT/<verdict>: never overwritten."""
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    (out / "unreadable").mkdir(parents=True)
    (out / "unreadable" / "frame.png").symlink_to(tmp_path / "gone.png")
    (inbox / "frame.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 100)
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", sort_into=out)
    with watching(fitted_model, inbox, outputs, retry_s=1):
        wait_for_lines(outputs.jsonl, 1, timeout=60)
        wait_until(lambda: not any(inbox.iterdir()), timeout=30)
    assert (out / "unreadable" / "frame.png").is_symlink()
    assert (out / "unreadable" / "frame_2.png").read_bytes().startswith(b"\x89PNG")


STOPPED_BY_SIGNALS = """
import signal, sys
sys.path.insert(0, sys.argv[1])
from runtime.watcher import StopFlag
stop, caught = StopFlag(), []
def handler(*_):
    caught.append(1)
    stop.set()
    signal.setitimer(signal.ITIMER_REAL, 0.0001)  # the next signal, once this one is handled
signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0001)
while len(caught) < 1000:
    stop.wait(0)
signal.setitimer(signal.ITIMER_REAL, 0)
"""


def test_the_watch_stop_can_be_set_by_a_signal_at_any_point_of_its_waits():
    """SIGTERM stops ``inference.py --watch`` through a flag its handler sets. With a threading.Event the
    process now and then never exited: a signal handled inside Event.wait, while it held the Event's lock,
    made Event.set wait for that lock for ever. A thousand signals, each landing anywhere in a loop of
    waits, must each be handled (with an Event this hangs every time)."""
    subprocess.run([sys.executable, "-c", STOPPED_BY_SIGNALS, str(ROOT)], timeout=60, check=True)


def test_a_folder_put_into_the_watched_folder_is_said_once(fitted_model: object, photos: dict[str, Path],
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A camera that writes dated folders: their photos are not read, so the watcher says so (once), instead of
    leaving them unseen in silence; the sort folder inside the watched folder is its own, and not named."""
    inbox = tmp_path / "inbox"
    (inbox / "2026-12-06").mkdir(parents=True)  # there before the start
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", sort_into=inbox / "sorted")
    with watching(fitted_model, inbox, outputs):
        (inbox / "2026-12-07").mkdir()  # made while it runs
        shutil.copy(photos["good"], inbox / "2026-12-07" / "part.png")
        shutil.copy(photos["good"], inbox / "part.png")
        wait_for_lines(outputs.jsonl, 1, timeout=60)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert sorted(said) == [f"warning: {inbox / day}: a folder; only the photos directly in {inbox} are read, not "
                            "those in folders within it: move its photos up" for day in ("2026-12-06", "2026-12-07")]
    assert (inbox / "2026-12-07" / "part.png").exists()  # left where it is
