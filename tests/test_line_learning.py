"""Learning on the line: drift warnings, the watcher's confirmed_good/ folder and the service's POST /feedback."""

from __future__ import annotations

import errno
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from conftest import (
    ROOT,
    WITHOUT_FITTING_PACKAGES,
    json_lines,
    pretend_torch_is_not_installed,
    running_service,
    save_as_older_file,
    wait_for_lines,
    wait_until,
    watching,
)
from evaluation.mvtec import train_images
from inspection.scoring import Photo, score_batch
from models.patchcore import PatchCore
from output_files import OutputError
from preprocessing.io import read_image
from runtime.drift import DriftMonitor
from runtime.watcher import FolderWatcher, WatchOutputs

@pytest.fixture(scope="module")
def unseen(screw_dir) -> list[Path]:
    """Healthy screw photos the small fitted model (the first 12) never saw."""
    return train_images(screw_dir)[12:32]


def brighter(photo: np.ndarray, shift: int = 60) -> np.ndarray:
    """The same part under stronger lamps."""
    return np.clip(photo.astype(np.int16) + shift, 0, 255).astype(np.uint8)


def drift_events(model: PatchCore, photos: list[np.ndarray]) -> tuple[list[dict], DriftMonitor]:
    monitor = DriftMonitor(model)
    events = []
    for result in score_batch(model, [Photo(f"{n}.png", photo) for n, photo in enumerate(photos)]):
        events += monitor.observe(result.record)
    return events, monitor


@pytest.fixture(scope="module")
def small_window_model(fitted_model) -> PatchCore:
    model = fitted_model.copy()
    model.config = model.config.replace(drift_window=10)
    return model


def test_a_steady_stream_raises_no_drift_warning(small_window_model, unseen):
    events, monitor = drift_events(small_window_model, [read_image(path) for path in unseen])
    assert events == []
    status = monitor.status()
    assert status["photos"] == 10 and not status["drift"]
    assert status["median_passed_score"] < status["healthy_limit"]


def test_a_brightness_shift_raises_the_drift_warning_once(small_window_model, unseen):
    events, monitor = drift_events(small_window_model, [brighter(read_image(path)) for path in unseen])
    kinds = [event["kind"] for event in events]
    assert kinds.count("scores") == 1  # raised when it starts, not on every photo
    scores = next(event for event in events if event["kind"] == "scores")
    assert scores["median_passed_score"] > scores["healthy_limit"]
    assert "drift" in scores["warning"] and "--add-good" in scores["warning"]
    assert f"{scores['median_passed_score']:.3f}" in scores["warning"]  # the warning quotes the window's median
    assert monitor.status()["drift"]


def test_flagged_photos_raise_the_flag_share_not_the_median_of_passed_ones(small_window_model):
    """A run of defective parts is flagged: the share warns, but the healthy ones between them are steady."""
    monitor = DriftMonitor(small_window_model)
    healthy = float(np.median(small_window_model.calibration_scores))
    far = 10 * small_window_model.threshold
    events = []
    for number in range(40):
        flagged = number % 2 == 1
        events += monitor.observe({"score": far if flagged else healthy, "is_anomalous": flagged})
    assert [event["kind"] for event in events] == ["flagged"]
    assert monitor.status()["median_passed_score"] == pytest.approx(healthy)


def test_a_drift_warning_waits_for_a_full_window_and_error_records_do_not_count(small_window_model):
    monitor = DriftMonitor(small_window_model)
    high = (monitor.healthy_limit + small_window_model.threshold) / 2  # above the healthy range, still passed
    assert monitor.healthy_limit < high < small_window_model.threshold
    assert monitor.observe({"path": "broken.png", "error": "cannot be read"}) == []
    for _ in range(9):
        assert monitor.observe({"score": high, "is_anomalous": False}) == []
    assert monitor.status()["photos"] == 9 and not monitor.status()["drift"]
    (event,) = monitor.observe({"score": high, "is_anomalous": False})
    assert event["kind"] == "scores" and monitor.status()["drift"]


def passed(score: float) -> dict:
    return {"score": score, "is_anomalous": False}


def test_a_warning_lasts_while_the_scores_stay_high_ends_when_they_recover_and_is_raised_again(small_window_model):
    """One event when drift starts; the warning stays in status() while the rolling window is high,
    goes when healthy photos fill the window, and a new drift is a new event. A new model starts clean."""
    monitor = DriftMonitor(small_window_model)
    healthy = float(np.median(small_window_model.calibration_scores))
    high = (monitor.healthy_limit + small_window_model.threshold) / 2
    assert [event["kind"] for _ in range(10) for event in monitor.observe(passed(high))] == ["scores"]
    assert [event for _ in range(5) for event in monitor.observe(passed(high))] == []
    assert monitor.status()["drift"] and len(monitor.status()["warnings"]) == 1  # still high: still in force
    assert [event for _ in range(10) for event in monitor.observe(passed(healthy))] == []
    assert not monitor.status()["drift"] and monitor.status()["warnings"] == []
    assert [event["kind"] for _ in range(10) for event in monitor.observe(passed(high))] == ["scores"]
    monitor.reset(small_window_model)
    assert not monitor.status()["drift"] and monitor.status()["warnings"] == [] and monitor.status()["photos"] == 0


def test_status_shows_the_sentence_of_the_warning_in_force_and_a_new_model_keeps_none_of_the_old_scores(
        small_window_model):
    """/health lists the warning as the event worded it; after a model change the old model's high scores
    are gone: one healthy photo is the whole window, and it warns of nothing."""
    monitor = DriftMonitor(small_window_model)
    healthy = float(np.median(small_window_model.calibration_scores))
    high = (monitor.healthy_limit + small_window_model.threshold) / 2
    (event,) = [event for _ in range(10) for event in monitor.observe(passed(high))]
    assert monitor.status()["warnings"] == [event["warning"]]
    monitor.reset(small_window_model)
    assert monitor.status()["median_passed_score"] is None
    assert monitor.observe(passed(healthy)) == []
    assert monitor.status()["median_passed_score"] == pytest.approx(healthy)


def test_the_score_warning_follows_the_median_so_a_few_high_passed_photos_raise_none(small_window_model):
    """Three passed photos just under the threshold among seven typical ones leave the median typical;
    a window whose median sits exactly at the healthy limit is still healthy ("above" it warns)."""
    monitor = DriftMonitor(small_window_model)
    healthy = float(np.median(small_window_model.calibration_scores))
    near_threshold = 0.99 * small_window_model.threshold
    scores = [healthy] * 7 + [near_threshold] * 3
    assert np.mean(scores) > monitor.healthy_limit  # a mean would warn
    assert [event for score in scores for event in monitor.observe(passed(score))] == []
    assert monitor.status()["median_passed_score"] == pytest.approx(healthy)
    at_limit = DriftMonitor(small_window_model)
    assert [event for _ in range(10) for event in at_limit.observe(passed(at_limit.healthy_limit))] == []


def test_flags_within_drift_flag_factor_times_the_expected_false_alarms_raise_no_warning(fitted_model):
    model = fitted_model.copy()
    model.config = model.config.replace(drift_window=100)  # 3 x 1 % false alarms: up to 3 of 100 flagged
    monitor = DriftMonitor(model)
    healthy = float(np.median(model.calibration_scores))
    events = []
    for number in range(100):
        flagged = number in (10, 60)
        events += monitor.observe({"score": 10 * model.threshold if flagged else healthy, "is_anomalous": flagged})
    assert events == [] and monitor.status()["flagged_share"] == pytest.approx(0.02)
    assert monitor.status()["photos"] == 100  # flagged photos count in the window too
    flag = {"score": 10 * model.threshold, "is_anomalous": True}
    assert monitor.observe(flag) == []  # 3 of the last 100: exactly the limit, not above it
    (event,) = monitor.observe(flag)  # 4 of the last 100
    assert event["kind"] == "flagged" and event["window"] == 100
    assert event["flagged_share"] == pytest.approx(0.04)
    assert "4 of the last 100 photos flagged (4.0%)" in event["warning"]
    stated = model.calibration["false_alarms_per_1000"] / 1000  # 12 photos: a little over the 1 % asked for
    assert f"3 x the {stated:.1%} false alarms" in event["warning"]


def test_the_flag_limit_scales_with_the_false_alarm_rate_the_threshold_was_calibrated_for(fitted_model):
    """A threshold calibrated to flag 5 % of healthy parts may flag 3 x 5 % = 3 of 20 before drift warns."""
    model = fitted_model.copy()
    model.config = model.config.replace(drift_window=20)
    model.set_false_alarm_rate(0.05)
    monitor = DriftMonitor(model)
    healthy = float(np.median(model.calibration_scores))
    flags = [number in (3, 9, 15) for number in range(20)]
    events = [e for flagged in flags for e in monitor.observe({"score": healthy, "is_anomalous": flagged})]
    assert events == [] and monitor.status()["expected_false_alarm_rate"] == pytest.approx(0.05)
    (event,) = monitor.observe({"score": 10 * model.threshold, "is_anomalous": True})  # 4 of the last 20
    assert event["kind"] == "flagged" and "3 x the 5.0% false alarms" in event["warning"]


def test_photos_moved_into_confirmed_good_are_learnt_by_the_watcher(fitted_model, unseen, tmp_path):
    fitted_model.save(tmp_path / "line.pkl")
    original = (tmp_path / "line.pkl").read_bytes()
    model = PatchCore.load(tmp_path / "line.pkl")
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    (inbox / "before.png").symlink_to(unseen[4])
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", sort_into=out)
    # moved in while the watcher was down: its start-up scan takes the three as one update
    (out / "confirmed_good").mkdir(parents=True)
    for path in unseen[:2]:
        (out / "confirmed_good" / path.name).symlink_to(path)
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    cv2.imwrite(str(out / "confirmed_good" / "noise.png"), cv2.resize(noise, (1024, 1024), interpolation=cv2.INTER_NEAREST))
    watcher = FolderWatcher(model, inbox, outputs, settle_s=0.3, model_path=tmp_path / "line.pkl")
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    try:
        first = wait_for_lines(outputs.jsonl, 2, timeout=240)
        (update,) = [line for line in first if line.get("event") == "update"]
        updated = (tmp_path / "line.pkl").read_bytes()
        (inbox / "after.png").symlink_to(unseen[5])
        after = wait_for_lines(outputs.jsonl, 3, timeout=240)[2]
        # moved in while it runs: refused, and an update that learns nothing leaves the files as they are
        (out / "confirmed_good" / "noise2.png").write_bytes((out / "not_learned" / "noise.png").read_bytes())
        again = wait_for_lines(outputs.jsonl, 4, timeout=240)[3]
        # a learnt photo confirmed again (another copy of it): not learnt twice, sorted with the learnt ones
        (out / "confirmed_good" / "copy.png").write_bytes(unseen[0].read_bytes())
        repeated = wait_for_lines(outputs.jsonl, 5, timeout=240)[4]
    finally:
        stop.set()
        thread.join(timeout=60)
    assert update["event"] == "update" and update["photos"] == 2 and update["refused"] == ["noise.png"]
    assert update["source"] == str(out / "confirmed_good")
    assert sorted(path.name for path in (out / "learned").iterdir()) == sorted(["copy.png", *(p.name for p in unseen[:2])])
    assert sorted(path.name for path in (out / "not_learned").iterdir()) == ["noise.png", "noise2.png"]
    assert again["event"] == "update" and again["photos"] == 0 and again["refused"] == ["noise2.png"]
    assert repeated["photos"] == 0 and repeated["already_learnt"] == ["copy.png"] and repeated["refused"] == []
    assert (tmp_path / "line.before-update-1.pkl").read_bytes() == original
    assert (tmp_path / "line.pkl").read_bytes() == updated and not (tmp_path / "line.before-update-2.pkl").exists()
    saved = PatchCore.load(tmp_path / "line.pkl")
    assert [u["photos"] for u in saved.updates] == [2] and saved.n_train == fitted_model.n_train + 2
    assert after["path"].endswith("after.png")
    assert after["threshold"] == pytest.approx(saved.threshold, abs=1e-4)  # scored by the updated model
    assert watcher.drift.status()["photos"] == 1  # the drift window starts again with the updated model


def test_feedback_round_trip(fitted_model, unseen, tmp_path):
    """Score a photo, confirm it and a sent one as good; the service updates, saves and scores with the
    new model. It runs as on the line PC: torch and the other fitting packages cannot be imported."""
    model_file = tmp_path / "served.pkl"
    fitted_model.save(model_file)
    original = model_file.read_bytes()
    with running_service("--model", str(model_file), "--learn", "--learn-batch", "2", "--learn-wait-s", "1",
                         "--events-jsonl", str(tmp_path / "events.jsonl"), line_pc=True) as port:
        url = f"http://127.0.0.1:{port}"
        health = httpx.get(f"{url}/health", timeout=30)
        assert health.json()["drift"]["drift"] is False
        scored = httpx.post(f"{url}/score?name=a.png", content=unseen[0].read_bytes(), timeout=120)
        assert scored.status_code == 200
        assert httpx.post(f"{url}/feedback?verdict=bad&name=a.png", timeout=30).status_code == 400
        assert httpx.post(f"{url}/feedback?verdict=good&name=never.png", timeout=30).status_code == 404
        named = httpx.post(f"{url}/feedback?verdict=good&name=a.png", timeout=30)
        assert named.status_code == 202 and named.json()["queued"] == "a.png"
        sent = httpx.post(f"{url}/feedback?verdict=good&name=b.png", content=unseen[1].read_bytes(), timeout=30)
        assert sent.status_code == 202
        deadline = time.monotonic() + 240
        while not (updates := httpx.get(f"{url}/model", timeout=30).json()["updates"]):
            assert time.monotonic() < deadline, "no update within 240 s"
            time.sleep(0.5)
        assert updates[0]["photos"] == 2 and updates[0]["source"] == "POST /feedback"
        threshold = httpx.get(f"{url}/model", timeout=30).json()["threshold"]
        assert threshold == pytest.approx(updates[0]["threshold_after"])
        again = httpx.post(f"{url}/score?name=c.png", content=unseen[2].read_bytes(), timeout=120).json()
        assert again["threshold"] == pytest.approx(threshold, abs=1e-4)
    assert PatchCore.load(model_file).updates == updates
    assert (tmp_path / "served.before-update-1.pkl").read_bytes() == original
    (event,) = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert event["event"] == "update" and event["photos"] == 2


def test_a_named_photo_that_looks_defective_is_refused_as_good(fitted_model, tmp_path):
    """An operator's wrong click: the service answers 409 and learns nothing without force=true."""
    from fastapi.testclient import TestClient

    from runtime.service import ServiceSettings, create_app

    fitted_model.save(tmp_path / "served.pkl")
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    ok, png = cv2.imencode(".png", cv2.resize(noise, (1024, 1024), interpolation=cv2.INTER_NEAREST))
    app = create_app(ServiceSettings(model=str(tmp_path / "served.pkl"), learn=True, learn_wait_s=0))
    with TestClient(app) as client:
        assert client.post("/score?name=noise.png", content=png.tobytes()).status_code == 200
        answer = client.post("/feedback?verdict=good&name=noise.png")
        assert answer.status_code == 409 and "looks defective" in answer.json()["error"]
        assert client.get("/model").json()["updates"] == []


def noise_png(seed: int = 1) -> bytes:
    """Coarse colour noise at a screw photo's size, as PNG bytes: it scores far above the threshold."""
    noise = np.random.default_rng(seed).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    return cv2.imencode(".png", cv2.resize(noise, (1024, 1024), interpolation=cv2.INTER_NEAREST))[1].tobytes()


def no_space(*_args: Any) -> None:
    """In place of os.fdopen: the disk is full."""
    raise OSError(errno.ENOSPC, "No space left on device")


def learning_service(model: PatchCore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> Any:
    """The service app on ``model`` saved as tmp_path/served.pkl, learning confirmed photos, its events in
    tmp_path/events.jsonl and its kept uploads under tmp_path."""
    import tempfile

    from runtime.service import ServiceSettings, create_app

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model.save(tmp_path / "served.pkl")
    return create_app(ServiceSettings(model=str(tmp_path / "served.pkl"), learn=True,
                                      events_jsonl=str(tmp_path / "events.jsonl"), **settings))


def test_feedback_names_only_the_last_photos_kept_each_once_and_answers_busy_when_the_queue_is_full(
    fitted_model, unseen, tmp_path, monkeypatch
):
    """keep_scored=2: the two latest names are kept (a name scored again is the latest), a confirmed one is
    queued once, force=true overrides the limit, and a full queue answers 503 without keeping the upload."""
    from fastapi.testclient import TestClient

    app = learning_service(fitted_model, tmp_path, monkeypatch, keep_scored=2, learn_wait_s=600)
    with TestClient(app) as client:
        for name, data in [("a.png", unseen[0].read_bytes()), ("b.png", unseen[1].read_bytes()),
                           ("a.png", unseen[2].read_bytes()), ("noise.png", noise_png())]:
            assert client.post(f"/score?name={name}", content=data).status_code == 200
        assert client.post("/score?name=broken.png", content=b"not a photo").status_code == 422
        assert client.post("/feedback?verdict=good&name=b.png").status_code == 404  # the oldest, gone
        assert client.post("/feedback?verdict=good&name=broken.png").status_code == 404
        assert client.post("/feedback?verdict=good&name=a.png").json() == {"queued": "a.png", "waiting": 1}
        assert client.post("/feedback?verdict=good&name=a.png").status_code == 404  # queued already
        assert client.post("/feedback?verdict=good&name=noise.png").status_code == 409
        assert client.post("/feedback?verdict=good&name=noise.png&force=true").json() == {"queued": "noise.png",
                                                                                         "waiting": 2}
        empty = client.post("/feedback?verdict=good", files={"photo": ("e.png", b"", "image/png")})
        assert empty.status_code == 400 and "empty" in empty.json()["error"]
        busy = client.post("/feedback?verdict=good&name=d.png", content=unseen[3].read_bytes())
        assert busy.status_code == 503
        assert client.post("/score?name=e.png", content=unseen[4].read_bytes()).status_code == 200
        for _ in range(2):  # a named photo stays kept while the queue is full: the retry a 503 asks for can name it
            assert client.post("/feedback?verdict=good&name=e.png").status_code == 503
        (folder,) = tmp_path.glob("fastener_service_*/feedback_*")
        assert len(list(folder.iterdir())) == 3  # the two queued photos and e.png; the refused upload is not kept
        assert client.get("/model").json()["updates"] == []


def test_photos_sent_with_feedback_leave_the_upload_budget_once_kept(fitted_model, unseen, tmp_path, monkeypatch):
    """A queue of 1 x 1 MiB of bodies: a confirmed photo is written to disk at once, so its bytes must stop counting
    against that budget, or three confirmations of 400 kB photos would leave every later upload answered 'busy'."""
    from fastapi.testclient import TestClient

    app = learning_service(fitted_model, tmp_path, monkeypatch, queue_size=1, max_upload_mb=1, learn_wait_s=600)
    with TestClient(app) as client:
        for photo in unseen[:3]:
            sent = client.post(f"/feedback?verdict=good&name={photo.name}", content=photo.read_bytes())
            assert sent.status_code == 202, sent.text
        assert client.post("/score?name=after.png", content=unseen[3].read_bytes()).status_code == 200


def test_feedback_updates_at_once_when_the_batch_is_full_learns_forced_photos_and_restarts_the_drift_window(
    fitted_model, unseen, tmp_path, monkeypatch
):
    """learn_batch=1: each confirmation is an update of its own, without waiting learn_wait_s. A refused
    photo leaves the model file as it is; a forced one is learnt and its update names it."""
    from fastapi.testclient import TestClient

    app = learning_service(fitted_model, tmp_path, monkeypatch, learn_batch=1, learn_wait_s=600)
    model_file, events = tmp_path / "served.pkl", tmp_path / "events.jsonl"
    original = model_file.read_bytes()
    with TestClient(app) as client:
        assert client.post("/score?name=before.png", content=unseen[0].read_bytes()).status_code == 200
        assert client.get("/health").json()["drift"]["photos"] == 1
        sent = client.post("/feedback?verdict=good&name=noise.png", files={"photo": ("camera-1.png", noise_png())})
        assert sent.json() == {"queued": "noise.png", "waiting": 1}
        (refused,) = wait_for_lines(events, 1, timeout=60)
        assert refused["photos"] == 0 and refused["refused"] == ["noise.png"]
        assert model_file.read_bytes() == original and list(tmp_path.glob("served.before-update-*")) == []
        forced = client.post("/feedback?verdict=good&name=forced.png&force=true", content=noise_png(2))
        assert forced.status_code == 202
        update = wait_for_lines(events, 2, timeout=60)[1]
        assert update["photos"] == 1 and update["forced"] == ["forced.png"]
        saved = PatchCore.load(model_file)
        drift = client.get("/health").json()["drift"]
        assert drift["photos"] == 0  # a new window for the new model
        assert drift["healthy_limit"] == pytest.approx(
            np.percentile(saved.calibration_scores, saved.config.drift_percentile))
        (folder,) = tmp_path.glob("fastener_service_*/feedback_*")
        assert len(list(folder.iterdir())) == 1  # before.png, kept for /feedback; the learnt uploads are gone
    assert (tmp_path / "served.before-update-1.pkl").read_bytes() == original


def watcher_start_lines(model_file: Path, tmp_path: Path, line_pc: bool = True) -> list[str]:
    """What ``inference.py --watch --sort-into`` prints before it watches; ``line_pc``: run as on the
    line PC, without torch."""
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    python = [sys.executable, "-c", WITHOUT_FITTING_PACKAGES] if line_pc else [sys.executable]
    command = [*python, str(ROOT / "inference.py"), "--model", str(model_file),
               "--watch", str(inbox), "--sort-into", str(tmp_path / "sorted")]
    log = tmp_path / "stderr"
    with open(log, "w") as stderr:
        watcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while "watching" not in log.read_text():
            assert watcher.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        watcher.terminate()
        watcher.wait(timeout=60)
    return log.read_text().splitlines()


def test_on_the_line_pc_the_watcher_says_at_start_when_confirmed_photos_cannot_be_learnt(fitted_model, tmp_path):
    """An older file needs torch for its first update: the watcher scores on, and says so before the
    first photo is confirmed. Where torch is installed, or with a current file, nothing is said."""
    save_as_older_file(fitted_model, tmp_path / "older.pkl")
    warning, watching = watcher_start_lines(tmp_path / "older.pkl", tmp_path)
    assert warning.startswith(f"warning: photos moved into {tmp_path / 'sorted' / 'confirmed_good'} cannot be learnt "
                              "here, they go to not_learned/: learning needs torch")
    assert "predates the coreset projection" in warning and watching.startswith("watching")
    (watching,) = watcher_start_lines(tmp_path / "older.pkl", tmp_path, line_pc=False)
    assert watching.startswith("watching")
    fitted_model.save(tmp_path / "current.pkl")
    (watching,) = watcher_start_lines(tmp_path / "current.pkl", tmp_path)
    assert watching.startswith("watching")


def test_on_the_line_pc_an_older_model_file_is_served_but_refused_for_learning_at_start(
    fitted_model, unseen, tmp_path, monkeypatch
):
    """A file from before models kept their coreset projection needs torch for its first update: the
    service says so when it starts with --learn, not at the first confirmation; scoring needs no torch."""
    import tempfile

    from fastapi.testclient import TestClient

    from config import UserError
    from runtime.service import ServiceSettings, create_app

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    save_as_older_file(fitted_model, tmp_path / "served.pkl")
    pretend_torch_is_not_installed(monkeypatch)
    with pytest.raises(UserError, match="--learn needs torch .*predates the coreset projection"):
        create_app(ServiceSettings(model=str(tmp_path / "served.pkl"), learn=True))
    with TestClient(create_app(ServiceSettings(model=str(tmp_path / "served.pkl")))) as client:
        assert client.post("/score?name=a.png", content=unseen[0].read_bytes()).status_code == 200


def test_a_drift_warning_is_logged_and_appended_to_the_events_file(tmp_path, caplog):
    from runtime.learning import EventLog

    warning = {"event": "drift", "kind": "scores", "warning": "drift: passed photos score higher than before"}
    events = EventLog(str(tmp_path / "events.jsonl"))
    with caplog.at_level(logging.WARNING, logger="fastener.service"):
        events(warning)
    assert caplog.messages == [warning["warning"]]
    assert json_lines(tmp_path / "events.jsonl") == [warning]


def test_an_event_that_cannot_be_written_is_an_error_line_and_the_next_one_is_tried_again(tmp_path, capsys):
    """A drift warning on a full disk must not raise into scoring, where it cost the photo its verdict."""
    from runtime.learning import EventLog

    warning = {"event": "drift", "kind": "scores", "warning": "drift: passed photos score higher than before"}
    events = EventLog(str(tmp_path / "later" / "events.jsonl"))
    events(warning)
    assert capsys.readouterr().err == (f"error: {tmp_path / 'later' / 'events.jsonl'}: the drift event cannot be "
                                       "written (No such file or directory)\n")
    (tmp_path / "later").mkdir()
    events(warning)
    assert json_lines(tmp_path / "later" / "events.jsonl") == [warning]


def test_drift_seen_by_the_service_reaches_its_events_file(small_window_model, unseen, tmp_path, monkeypatch):
    """Photos sent to /score under stronger lamps: the drift warning is appended to the service's events file,
    where the line's monitoring reads it, not only shown in /health."""
    from fastapi.testclient import TestClient

    app = learning_service(small_window_model, tmp_path, monkeypatch, learn_wait_s=600)
    with TestClient(app) as client:
        for number, path in enumerate(unseen):
            photo = cv2.imencode(".png", cv2.cvtColor(brighter(read_image(path)), cv2.COLOR_RGB2BGR))[1].tobytes()
            assert client.post(f"/score?name={number}.png", content=photo).status_code == 200
        assert client.get("/health").json()["drift"]["drift"]
    drift = [event for event in json_lines(tmp_path / "events.jsonl") if event["event"] == "drift"]
    assert [event["kind"] for event in drift].count("scores") == 1


def test_a_lone_confirmed_photo_is_learnt_learn_wait_s_after_it_without_waiting_for_a_full_batch(
    fitted_model, unseen, tmp_path, monkeypatch
):
    from fastapi.testclient import TestClient

    app = learning_service(fitted_model, tmp_path, monkeypatch, learn_batch=16, learn_wait_s=0.2)
    events = tmp_path / "events.jsonl"
    with TestClient(app) as client:
        assert client.post("/feedback?verdict=good&name=a.png", content=unseen[0].read_bytes()).status_code == 202
        (update,) = wait_for_lines(events, 1, timeout=60)
        assert update["photos"] == 1 and client.get("/model").json()["updates"][0]["photos"] == 1


def test_an_update_that_fails_is_an_error_event_naming_its_photos_and_the_next_update_still_learns(
    fitted_model, unseen, tmp_path, monkeypatch
):
    """A bug in one update costs that update, said in the events file, never the learning thread."""
    from fastapi.testclient import TestClient

    import runtime.learning

    real_learn = runtime.learning.learn_on_a_copy
    calls: list[int] = []

    def fails_the_first_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated failure")
        return real_learn(*args, **kwargs)

    monkeypatch.setattr(runtime.learning, "learn_on_a_copy", fails_the_first_time)
    app = learning_service(fitted_model, tmp_path, monkeypatch, learn_batch=1, learn_wait_s=600)
    events = tmp_path / "events.jsonl"
    with TestClient(app) as client:
        assert client.post("/feedback?verdict=good&name=a.png", content=unseen[0].read_bytes()).status_code == 202
        (failed,) = wait_for_lines(events, 1, timeout=60)
        assert failed == {"event": "update", "photos": 0, "error": "simulated failure", "refused": ["a.png"]}
        assert client.post("/feedback?verdict=good&name=b.png", content=unseen[1].read_bytes()).status_code == 202
        update = wait_for_lines(events, 2, timeout=60)[1]
    assert update["photos"] == 1 and "error" not in update
    assert [u["photos"] for u in PatchCore.load(tmp_path / "served.pkl").updates] == [1]


def test_a_model_that_cannot_be_saved_learns_nothing_and_the_watch_goes_on(fitted_model, unseen, tmp_path,
                                                                           monkeypatch, capsys):
    """A full disk where the model lives: the update says why, the confirmed photo goes to not_learned/, the
    model file stays the one scored with, and the next photo is scored (the watch stopped, and stopped again
    at every restart on the photo still waiting)."""
    fitted_model.save(tmp_path / "line.pkl")
    original = (tmp_path / "line.pkl").read_bytes()
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    (out / "confirmed_good").mkdir(parents=True)
    (out / "confirmed_good" / unseen[0].name).symlink_to(unseen[0])

    def disk_full(self: PatchCore, path: Path, since: object) -> None:
        raise OutputError(f"{path}: cannot be written (No space left on device); any previous file is unchanged")

    monkeypatch.setattr(PatchCore, "save_update", disk_full)
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", sort_into=out)
    model_path = tmp_path / "line.pkl"
    with watching(PatchCore.load(model_path), inbox, outputs, settle_s=0.3, model_path=model_path):
        (update,) = wait_for_lines(outputs.jsonl, 1, timeout=240)
        (inbox / "next.png").symlink_to(unseen[1])
        scored = wait_for_lines(outputs.jsonl, 2, timeout=240)[1]
    assert update["photos"] == 0 and "No space left on device" in update["error"]
    assert [path.name for path in (out / "not_learned").iterdir()] == [unseen[0].name]
    assert (tmp_path / "line.pkl").read_bytes() == original
    assert scored["path"].endswith("next.png") and "score" in scored


def bare_learner(model_path: Path, tmp_path: Path, events: str | None = None, **settings: Any) -> Any:
    """A Learner on the model in ``model_path``, without the service around it; ``stop()`` it after."""
    from runtime.learning import EventLog, Learner

    class Scorer:
        model = PatchCore.load(model_path)

    return Learner(Scorer(), model_path, DriftMonitor(Scorer.model), EventLog(events), tmp_path,
                   **{"keep": 8, "batch": 1, "wait_s": 0.0, **settings})


def test_a_scored_photo_that_cannot_be_kept_is_one_error_line_and_its_name_then_names_no_photo(
    fitted_model, unseen, tmp_path, capsys, monkeypatch
):
    """A full temporary folder: the photo is reported once, and /feedback naming it finds no photo, not an
    older one of the same name that it would learn in its place."""
    import os

    fitted_model.save(tmp_path / "served.pkl")
    learner = bare_learner(tmp_path / "served.pkl", tmp_path)
    try:
        learner.remember("a.png", unseen[0].read_bytes(), {"normalized_score": 0.5})
        with monkeypatch.context() as full:
            full.setattr(os, "fdopen", no_space)
            learner.remember("a.png", unseen[1].read_bytes(), {"normalized_score": 0.5})
        with pytest.raises(KeyError):
            learner.confirm_scored("a.png", force=False)
        assert list(learner.folder.iterdir()) == []  # the older a.png is gone, and nothing of the newer is left
    finally:
        learner.stop()
    assert capsys.readouterr().err == ("error: a.png: cannot be kept for POST /feedback to name (No space left on "
                                       "device); to confirm it good, send the photo\n")


def test_the_learning_thread_goes_on_learning_when_its_events_file_cannot_be_written(
    fitted_model, unseen, tmp_path, capsys
):
    """Each update's event fails: it is an error line, and the next confirmed photo is still learnt (the
    thread died at the first one, and /feedback went on answering 202 for photos never learnt)."""
    fitted_model.save(tmp_path / "served.pkl")
    (tmp_path / "a-file").write_text("")
    events = tmp_path / "a-file" / "events.jsonl"
    learner = bare_learner(tmp_path / "served.pkl", tmp_path, events=str(events))
    try:
        for number, photo in enumerate(unseen[:2], 1):
            learner.confirm_upload(photo.name, photo.read_bytes(), force=False)
            wait_until(lambda: len(learner.scorer.model.updates) == number, timeout=120)
            assert len(learner.scorer.model.updates) == number, f"photo {number} was not learnt"
    finally:
        learner.stop()
    assert capsys.readouterr().err == f"error: {events}: the update event cannot be written (Not a directory)\n" * 2


def test_a_learnt_photo_that_cannot_be_moved_out_of_confirmed_good_says_so_and_stays_there(
        fitted_model, unseen, tmp_path, capsys):
    fitted_model.save(tmp_path / "line.pkl")
    inbox, out = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    (out / "confirmed_good").mkdir(parents=True)
    confirmed = out / "confirmed_good" / unseen[0].name
    confirmed.symlink_to(unseen[0])
    (out / "learned").write_bytes(b"")  # a stray file where the folder should be
    outputs = WatchOutputs(jsonl=tmp_path / "results.jsonl", sort_into=out)
    model_path = tmp_path / "line.pkl"
    with watching(PatchCore.load(model_path), inbox, outputs, settle_s=0.3, model_path=model_path):
        (update,) = wait_for_lines(outputs.jsonl, 1, timeout=240)
    assert update["event"] == "update" and update["photos"] == 1
    assert confirmed.is_symlink()  # not lost: still where the operator put it
    errors = capsys.readouterr().err.splitlines()
    assert f"error: {confirmed}: cannot be moved out of confirmed_good/ (File exists)" in errors


def test_a_confirmed_photo_the_temporary_folder_cannot_keep_is_a_507_answer_and_the_next_is_queued(
    fitted_model, unseen, tmp_path, monkeypatch
):
    """A photo sent with its confirmation waits on disk for the next update: a full temporary folder is told in
    the service's answer shape, naming the photo and the folder (not a plain-text 500), and learns nothing."""
    import os

    from fastapi.testclient import TestClient

    app = learning_service(fitted_model, tmp_path, monkeypatch, learn_wait_s=600)
    with TestClient(app, raise_server_exceptions=False) as client:
        with monkeypatch.context() as full:
            full.setattr(os, "fdopen", no_space)
            refused = client.post("/feedback?verdict=good&name=a.png", content=unseen[0].read_bytes())
        queued = client.post("/feedback?verdict=good&name=b.png", content=unseen[1].read_bytes())
        (folder,) = tmp_path.glob("fastener_service_*/feedback_*")
        assert len(list(folder.iterdir())) == 1  # b.png; nothing of a.png is left behind
    assert refused.status_code == 507, refused.text
    assert refused.json() == {"error": f"a.png: the service's temporary folder {folder} cannot keep the photo until "
                                       "the next update (No space left on device); free space there and send it again"}
    assert queued.json() == {"queued": "b.png", "waiting": 1}


def test_photos_are_kept_for_feedback_after_a_cleaner_removes_the_temporary_folder(fitted_model, unseen, tmp_path,
                                                                                   monkeypatch):
    """systemd-tmpfiles or tmpreaper removes old folders from /tmp on a quiet line: every later confirmation was
    refused until a restart."""
    import shutil

    from fastapi.testclient import TestClient

    app = learning_service(fitted_model, tmp_path, monkeypatch, learn_wait_s=600)
    with TestClient(app) as client:
        (scratch,) = tmp_path.glob("fastener_service_*")
        shutil.rmtree(scratch)
        sent = client.post("/feedback?verdict=good&name=a.png", content=unseen[0].read_bytes())
        assert client.post("/score?name=b.png", content=unseen[1].read_bytes()).status_code == 200
        named = client.post("/feedback?verdict=good&name=b.png")
    assert sent.json() == {"queued": "a.png", "waiting": 1}, sent.text
    assert named.json() == {"queued": "b.png", "waiting": 2}, named.text


def test_photos_confirmed_before_the_service_stops_are_learnt_at_the_stop(fitted_model, unseen, tmp_path, monkeypatch):
    """A restart for the night while confirmed photos wait for their batch: each was answered 202, so each is learnt
    before the service ends, not deleted with its temporary folder."""
    from fastapi.testclient import TestClient

    app = learning_service(fitted_model, tmp_path, monkeypatch, learn_batch=16, learn_wait_s=600)
    with TestClient(app) as client:
        for photo in unseen[:2]:
            assert client.post(f"/feedback?verdict=good&name={photo.name}", content=photo.read_bytes()).status_code == 202
    (update,) = PatchCore.load(tmp_path / "served.pkl").updates
    assert update["photos"] == 2 and update["source"] == "POST /feedback"
    (event,) = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert event["event"] == "update" and event["photos"] == 2


def test_the_flag_limit_follows_the_rate_the_promise_states_when_the_set_was_too_small_for_the_one_asked(
        fitted_model, monkeypatch):
    """Eight photos at 1 %: the promise says 16.3 in 1,000, and drift must not warn at what the threshold flags
    by design."""
    model = fitted_model.copy()
    model.calibration = {**model.calibration, "false_alarms_per_1000": 16.3}
    assert DriftMonitor(model).status()["expected_false_alarm_rate"] == pytest.approx(0.0163)
