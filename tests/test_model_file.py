"""The model file: what a fit writes loads back unchanged, and nothing else loads (models/model_file.py)."""

from __future__ import annotations

import math
import os
import pickle
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evaluation.mvtec import load_test_split
from models.model_file import FORMAT_VERSION, ModelFileError
from models.patchcore import PatchCore


def test_a_saved_and_loaded_model_gives_the_same_predictions(fitted_model, small_screw_dir, tmp_path):
    """Everything a user sees survives the model file: score, verdict, threshold, sigma, confidence, map."""
    path = tmp_path / "model.pkl"
    fitted_model.save(path)
    loaded = PatchCore.load(path)
    assert np.array_equal(loaded.memory_bank, fitted_model.memory_bank)
    assert loaded.config == fitted_model.config and loaded.config.seed == fitted_model.config.seed
    assert loaded.threshold == fitted_model.threshold
    assert np.array_equal(loaded.calibration_scores, fitted_model.calibration_scores)
    assert loaded.calibration == fitted_model.calibration  # method, spread floor, warnings
    # arrays of its own: torch warns of undefined behaviour on read-only ones when an update reads the bank
    assert loaded.memory_bank.flags.writeable and loaded.calibration_scores.flags.writeable
    test_paths = [s.path for s in load_test_split(small_screw_dir)[:2]]
    for before, after in zip(fitted_model.predict(test_paths), loaded.predict(test_paths), strict=True):
        assert after.score == before.score
        assert after.is_anomalous == before.is_anomalous
        assert after.sigma == before.sigma and after.sigma != 0.0  # 0 = the calibration was lost
        assert after.anomaly_confidence == before.anomaly_confidence
        assert np.array_equal(after.anomaly_map, before.anomaly_map)
        assert after.warnings == before.warnings
    assert not list(tmp_path.glob(".model.pkl.*")), "no temporary file is left behind"


# Hand-written pickles (protocol 0 opcodes) that run code if the unpickler lets one global through.
def _global(target: str) -> bytes:
    module, name = target.rsplit(".", 1)
    return f"c{module}\n{name}\n".encode()


def _text(value: str | Path) -> bytes:
    return b"V" + str(value).encode("raw-unicode-escape") + b"\n"


def _call(function: bytes, *args: bytes) -> bytes:
    return function + b"(" + b"".join(args) + b"tR"


def _list(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"l"


MARKER_MODULE = "fastener_test_marker_module"  # importing it touches the marker (see the test)


def _payloads(marker: Path) -> dict[str, bytes]:
    """For each global an attacker could ask for, a call through it that touches ``marker``."""
    touch = _text(f"touch {marker}")
    python = _text(f"open({str(marker)!r}, 'w').close()")
    os_module = _call(_global("importlib.import_module"), _text("os"))
    return {
        "builtins.eval": _call(_global("builtins.eval"), python),
        "builtins.exec": _call(_global("builtins.exec"), python),
        "builtins.open": _call(_global("builtins.open"), _text(marker), _text("w")),
        "builtins.getattr": _call(
            _call(_global("builtins.getattr"), _call(_global("builtins.__import__"), _text("os")), _text("system")),
            touch,
        ),
        "builtins.__import__": _call(_global("builtins.__import__"), _text(MARKER_MODULE)),
        "os.system": _call(_global("os.system"), touch),
        "posix.system": _call(_global("posix.system"), touch),
        "subprocess.Popen": _call(_global("subprocess.Popen"), _list(_text("touch"), _text(marker))),
        "subprocess.run": _call(_global("subprocess.run"), _list(_text("touch"), _text(marker))),
        "importlib.import_module": _call(_global("importlib.import_module"), _text(MARKER_MODULE)),
        "functools.partial": _call(_call(_global("functools.partial"), _global("os.system"), touch)),
        # NumPy's own modules are no safer: a test helper there runs any code it is given
        "numpy.testing._private.utils.runstring": _call(
            _global("numpy.testing._private.utils.runstring"), python, b"(d"  # exec(code, {})
        ),
        "operator.methodcaller": _call(_call(_global("operator.methodcaller"), _text("system"), touch), os_module),
        # any module will do: from protocol 4 on, a global may be an attribute path to eval through a harmless function
        "functools.wraps.__builtins__.get": b"\x80\x04" + _call(_call(b"cfunctools\nwraps.__builtins__.get\n", _text("exec")), python),
    }


GLOBALS = list(_payloads(Path("marker")))


def _model_file_with(payload: bytes) -> bytes:
    """A model file of the right format version whose config is the payload: only the unpickler stands guard."""
    return b"}" + _text("format_version") + f"I{FORMAT_VERSION}\n".encode() + b"s" + _text("config") + payload + b"s."


@pytest.mark.parametrize("target", GLOBALS)
def test_a_model_file_that_asks_for_any_global_is_refused_and_runs_nothing(target, tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    (tmp_path / f"{MARKER_MODULE}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MARKER_MODULE, raising=False)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(_model_file_with(_payloads(marker)[target]))
    with pytest.raises(ModelFileError, match="plain data only"):
        PatchCore.load(evil)
    time.sleep(0.05)  # a child process started by the file would have touched the marker by now
    assert not marker.exists()

    # The payload is live: the stock unpickler runs it, so it was the refusal above that stopped it.
    result = pickle.loads(evil.read_bytes())["config"]
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert marker.exists()


def test_what_preprocess_auto_decided_and_the_covering_radius_come_back_from_the_file(fitted_model, tmp_path):
    """inference.py's report lists the reasons an auto fit chose its steps, from the model it loads; the
    covering radius a fit measured stays with the model through its updates."""
    path = tmp_path / "model.pkl"
    fitted_model.save(path)
    model = PatchCore.load(path)
    model.preprocessing = {"changes": {"clahe": False}, "reasons": ["CLAHE off: the light is even"]}
    model.save(path)
    loaded = PatchCore.load(path)
    assert loaded.preprocessing == model.preprocessing
    assert math.isfinite(fitted_model.coverage_radius) and loaded.coverage_radius == fitted_model.coverage_radius


def test_wrong_format_version_and_truncated_files_are_clear_errors(fitted_model, tmp_path):
    path = tmp_path / "model.pkl"
    fitted_model.save(path)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="truncated.pkl"):
        PatchCore.load(truncated)
    old = tmp_path / "old.pkl"
    old.write_bytes(pickle.dumps({"format_version": 0}))
    with pytest.raises(ModelFileError, match="version 0 is not supported"):
        PatchCore.load(old)
    with pytest.raises(ModelFileError, match="not found"):
        PatchCore.load(tmp_path / "missing.pkl")


def test_a_failed_save_leaves_the_previous_model_file_and_its_export_intact(fitted_model, tmp_path, monkeypatch):
    """Neither file is half-written or replaced alone: the previous model would otherwise lie beside the
    export of another network (here the earlier export stands for a model of other weights)."""
    path = tmp_path / "model.pkl"
    fitted_model.save(path)
    before = path.read_bytes()
    export = tmp_path / "model.onnx"
    export.write_bytes(b"the export the previous model file was saved with")

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("output_files.os.replace", disk_full)
    with pytest.raises(OSError):
        fitted_model.save(path)
    assert path.read_bytes() == before
    assert export.read_bytes() == b"the export the previous model file was saved with"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pkl"]  # no temporary left


def test_a_kept_copy_cut_short_by_a_full_disk_is_not_left_behind(tmp_path):
    """Undoing an update restores ``<name>.before-update-<n>.pkl``: half of one would be a broken model.

    The disk fills up (a file size limit of 64 KiB) while the 256 KiB model file is being copied."""
    from test_io import ROOT

    path = tmp_path / "line.pkl"
    path.write_bytes(os.urandom(256 * 1024))
    code = (
        "import resource, sys\n"
        "from models.model_file import keep_previous\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))\n"
        f"try:\n    keep_previous({str(path)!r}, 1, 10)\nexcept OSError as error:\n    sys.exit(f'refused: {{error}}')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.stderr.startswith("refused: ") and "File too large" in result.stderr, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["line.pkl"]


def test_a_kept_copy_never_overwrites_an_earlier_one(tmp_path):
    """Two updates saved from one loaded file both number their copy 1; the first copy holds the fit."""
    from models.model_file import keep_previous

    path = tmp_path / "line.pkl"
    path.write_bytes(b"the fit")
    assert keep_previous(path, 1, 10) == tmp_path / "line.before-update-1.pkl"
    path.write_bytes(b"the first update")
    assert keep_previous(path, 1, 10) == tmp_path / "line.before-update-2.pkl"
    assert (tmp_path / "line.before-update-1.pkl").read_bytes() == b"the fit"
    assert (tmp_path / "line.before-update-2.pkl").read_bytes() == b"the first update"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["line.before-update-1.pkl", "line.before-update-2.pkl",
                                                          "line.pkl"]  # no temporary left


def test_updates_keep_the_newest_copies_and_the_fits_and_remove_the_others(tmp_path):
    """A line that learns all day must not fill its disk with copies; the fit's copy is the one to fall back on."""
    from models.model_file import keep_previous

    path = tmp_path / "line.pkl"
    (tmp_path / "line.before-update-x.pkl").write_bytes(b"not one of ours")
    (tmp_path / "other.before-update-1.pkl").write_bytes(b"another model's")
    for update in range(1, 7):
        path.write_bytes(b"the fit" if update == 1 else f"update {update - 1}".encode())
        assert keep_previous(path, update, 3) == tmp_path / f"line.before-update-{update}.pkl"
    assert sorted(p.name for p in tmp_path.glob("line.before-update-*")) == [
        "line.before-update-1.pkl", "line.before-update-4.pkl", "line.before-update-5.pkl", "line.before-update-6.pkl",
        "line.before-update-x.pkl"]
    assert (tmp_path / "line.before-update-1.pkl").read_bytes() == b"the fit"
    assert (tmp_path / "line.before-update-6.pkl").read_bytes() == b"update 5"
    assert (tmp_path / "other.before-update-1.pkl").exists()
    # undone to the fit (its model has no updates again): the next copy is still the newest, and kept
    path.write_bytes(b"the fit, restored, then updated once")
    assert keep_previous(path, 1, 3) == tmp_path / "line.before-update-7.pkl"
    assert (tmp_path / "line.before-update-7.pkl").read_bytes() == b"the fit, restored, then updated once"
    assert sorted(p.name for p in tmp_path.glob("line.before-update-[0-9]*")) == [
        "line.before-update-1.pkl", "line.before-update-5.pkl", "line.before-update-6.pkl", "line.before-update-7.pkl"]


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_a_kept_copy_has_the_mode_of_the_file_it_keeps(tmp_path, umask):
    """A model made private (0600) must not gain a world-readable copy beside it, nor become one when restored."""
    from models.model_file import keep_previous

    path = tmp_path / "line.pkl"
    path.write_bytes(b"the model before the update")
    path.chmod(0o600 if umask == 0o022 else 0o644)
    previous = os.umask(umask)
    try:
        kept = keep_previous(path, 1, 10)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(kept.stat().st_mode) == stat.S_IMODE(path.stat().st_mode)
    assert kept.read_bytes() == path.read_bytes()


# ----------------------------------------------------------------------------- model files refused on load
def saved_state(model: PatchCore, tmp_path) -> dict:
    path = tmp_path / "good.pkl"
    model.save(path)
    return pickle.loads(path.read_bytes())  # our own file: trusted here


def packed(array: np.ndarray) -> dict:
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}


def nan_in(array: np.ndarray) -> np.ndarray:
    spoiled = array.copy()
    spoiled.flat[len(spoiled.flat) // 2] = np.nan
    return spoiled


CORRUPTIONS = {
    "NaN threshold": (lambda s: s.update(threshold=float("nan")), "threshold is nan, not a finite number"),
    "infinite threshold": (lambda s: s.update(threshold=float("inf")), "threshold is inf"),
    "negative infinite threshold": (lambda s: s.update(threshold=float("-inf")), "threshold is -inf"),
    "empty bank": (lambda s: s.update(memory_bank=packed(np.empty((0, 152), np.float32))), "non-empty"),
    "NaN in bank": (lambda s: s.update(memory_bank=packed(nan_in(np.ones((10, 152), np.float32)))), "NaN or infinite"),
    "infinity in bank": (lambda s: s.update(memory_bank=packed(np.full((10, 152), np.inf, np.float32))), "NaN or infinite"),
    "bank of another width": (
        lambda s: s.update(memory_bank=packed(np.ones((10, 151), np.float32))),
        "memory_bank has 151 features per patch, but efficientnet_lite0 with target_dim 1024 gives 152",
    ),
    "bank of another dtype": (lambda s: s.update(memory_bank=packed(np.ones((10, 152)))), "must be float32"),
    "bank shape lies": (lambda s: s["memory_bank"].update(shape=[10**6, 152]), "does not match its"),
    "NaN calibration": (lambda s: s.update(calibration_scores=packed(np.array([1.0, np.nan], np.float32))), "finite"),
    "no calibration": (lambda s: s.update(calibration_scores=packed(np.empty(0, np.float32))), "non-empty"),
    "missing threshold": (lambda s: s.pop("threshold"), "missing threshold"),
    "missing memory bank": (lambda s: s.pop("memory_bank"), "missing memory_bank"),
    "missing config": (lambda s: s.pop("config"), "missing config"),
    "missing weights identity": (lambda s: s.pop("weights_identity"), "missing weights_identity"),
    "no format version": (lambda s: s.pop("format_version"), "not a fastener-anomaly-detection model file"),
    "fractional format version": (lambda s: s.update(format_version=2.0), "version 2.0 is not supported"),
    "text format version": (lambda s: s.update(format_version="1"), "version '1' is not supported"),
    "boolean format version": (lambda s: s.update(format_version=True), "version True is not supported"),
    # a file from a newer release may mean its values otherwise: refit rather than misread it
    "newer format version": (
        lambda s: s.update(format_version=FORMAT_VERSION + 1), f"version {FORMAT_VERSION + 1} is not supported"
    ),
    "text threshold": (lambda s: s.update(threshold="0.5"), "threshold has the wrong type"),
    "boolean photo count": (lambda s: s.update(n_train=True), "n_train has the wrong type (bool)"),
    "fractional photo count": (lambda s: s.update(n_train=11.5), "n_train has the wrong type (float)"),
    "no training photos": (lambda s: s.update(n_train=0), "n_train must be at least 1, got 0"),
    "packed array with another field": (lambda s: s["memory_bank"].update(order="F"), "memory_bank is not a packed array"),
    "bad setting inside": (lambda s: s["config"].update(target_dim=0), "invalid settings: target_dim must be"),
    "unknown setting inside": (lambda s: s["config"].update(tuning=1), "unknown config key"),
    # finite values no fit writes: every photo would score NaN (judged "ok"), or divide by zero
    "one huge finite patch": (
        lambda s: s.update(memory_bank=packed(np.vstack([np.ones((9, 152)), np.full((1, 152), 3e38)]).astype(np.float32))),
        "memory_bank holds a value of 3e+38",
    ),
    "a feature over a million": (
        lambda s: s.update(memory_bank=packed(np.full((10, 152), 2e6, np.float32))), "memory_bank holds a value of 2e+06"
    ),
    "zero threshold": (lambda s: s.update(threshold=0.0), "threshold is 0, not a finite number above 0"),
    "negative threshold": (lambda s: s.update(threshold=-1.0), "threshold is -1, not a finite number above 0"),
    "threshold far above every healthy score": (lambda s: s.update(threshold=1e30), "over 1000 times the largest healthy"),
    # 1000 x 0 bounds no threshold; twelve copies of one photo still score 11 to 14 held out
    "every healthy score 0": (
        lambda s: s.update(calibration_scores=packed(np.zeros(12, np.float32))), "calibration_scores are all 0"
    ),
    "every healthy score 0 under a threshold of 1e30": (
        lambda s: s.update(calibration_scores=packed(np.zeros(12, np.float32)), threshold=1e30),
        "calibration_scores are all 0",
    ),
    # the healthy spread's floor: a NaN one would turn every threshold_for() and sigma into NaN
    "NaN spread floor": (lambda s: s["calibration"].update(spread_floor=float("nan")), "spread_floor is nan"),
    "negative spread floor": (lambda s: s["calibration"].update(spread_floor=-1.0), "spread_floor is -1.0"),
    "text spread floor": (lambda s: s["calibration"].update(spread_floor="0.1"), "spread_floor is '0.1'"),
    "boolean spread floor": (lambda s: s["calibration"].update(spread_floor=True), "spread_floor is True"),
    # the next update counts the photos of those before it
    "update without a photo count": (lambda s: s.update(updates=[{"photos": "6"}]), "updates must be a list of update"),
    # what a report prints of the updates and the promise: a hand-edited file must not load and then fail it
    "update naming its source by a number": (
        lambda s: s.update(updates=[{"photos": 1, "source": 5}]), "updates must be a list of update"
    ),
    "update refusing a number": (lambda s: s.update(updates=[{"photos": 1, "refused": [3]}]), "updates must be a list"),
    "update naming a photo learnt already by a number": (
        lambda s: s.update(updates=[{"photos": 1, "already_learnt": [3]}]), "updates must be a list"
    ),
    # the fingerprints that keep a photo from being learnt twice
    "photos added counted in text": (
        lambda s: s["calibration"].update(added_on_the_line="3"), "calibration added_on_the_line has the wrong type"
    ),
    "fingerprints cut short": (lambda s: s.update(learnt_photos=bytes(17)), "learnt_photos must hold whole 16-byte"),
    "calibration fingerprints cut short": (
        lambda s: s.update(calibration_photos=bytes(33)), "calibration_photos must hold whole 16-byte"
    ),
    "fingerprints that are text": (lambda s: s.update(learnt_photos="ab" * 8), "learnt_photos has the wrong type"),
    "stated rate without its interval": (
        lambda s: s["calibration"].pop("interval_per_1000"), "calibration interval_per_1000 must be two finite numbers"
    ),
    "interval of one number": (
        lambda s: s["calibration"].update(interval_per_1000=[1.0]), "calibration interval_per_1000 must be two"
    ),
    "calibration warnings that are no text": (
        lambda s: s["calibration"].update(warnings=[1]), "calibration warnings and left_out must be lists of text"
    ),
    "photo count as text": (lambda s: s["calibration"].update(count="320"), "calibration count has the wrong type (str)"),
    "calibration that is no record": (lambda s: s.update(calibration=[1, 2]), "calibration must be a record"),
    # the space an update's coreset measures distances in: of the bank's width, finite, not overflowing
    "projection of another width": (
        lambda s: s.update(coreset_projection=packed(np.ones((151, 128), np.float32))),
        "coreset_projection has shape (151, 128); the bank's 152 features to coreset_projection_dim 128 needs (152, 128)",
    ),
    "projection to another dimension": (
        lambda s: s.update(coreset_projection=packed(np.ones((152, 64), np.float32))),
        "coreset_projection has shape (152, 64); the bank's 152 features to coreset_projection_dim 128 needs (152, 128)",
    ),
    "empty projection": (
        lambda s: s.update(coreset_projection=packed(np.ones((0, 128), np.float32))), "coreset_projection has shape (0, 128)"
    ),
    "NaN in projection": (
        lambda s: s.update(coreset_projection=packed(nan_in(np.ones((152, 128), np.float32)))), "not finite or above 100"
    ),
    "huge projection": (
        lambda s: s.update(coreset_projection=packed(np.full((152, 128), 1e30, np.float32))), "not finite or above 100"
    ),
    "hugely negative projection": (
        lambda s: s.update(coreset_projection=packed(np.full((152, 128), -1e30, np.float32))), "not finite or above 100"
    ),
    "projection not packed": (lambda s: s.update(coreset_projection=[1.0, 2.0]), "coreset_projection has the wrong type"),
    "negative calibration score": (
        lambda s: s.update(calibration_scores=packed(np.array([1.0, -2.0], np.float32))), "finite distances (0 or more)"
    ),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_model_file_no_fit_could_write_is_refused_on_load(fitted_model, tmp_path, name):
    corrupt, reason = CORRUPTIONS[name]
    state = saved_state(fitted_model, tmp_path)
    corrupt(state)
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(state))
    with pytest.raises(ModelFileError) as raised:
        PatchCore.load(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert reason in str(raised.value)


def lowest_score_zero(state: dict) -> None:
    scores = np.frombuffer(state["calibration_scores"]["data"], np.float32).copy()
    scores[scores.argmin()] = 0.0
    state["calibration_scores"] = packed(scores)


# Values a fit can write at the edges of the checks above: refusing them would refuse a good model.
EDGE_VALUES = {
    "a feature of exactly a million": lambda s: s.update(memory_bank=packed(np.full((10, 152), 1e6, np.float32))),
    "a healthy score of 0 (a duplicate photo)": lowest_score_zero,
    "no spread floor (a file written before it was recorded)": lambda s: s["calibration"].pop("spread_floor"),
}


@pytest.mark.parametrize("name", EDGE_VALUES)
def test_values_at_the_edge_of_what_a_fit_writes_still_load(fitted_model, tmp_path, name):
    state = saved_state(fitted_model, tmp_path)
    EDGE_VALUES[name](state)
    path = tmp_path / "edge.pkl"
    path.write_bytes(pickle.dumps(state))
    assert PatchCore.load(path).threshold == fitted_model.threshold


@pytest.mark.parametrize("length", [1 << 40, 2**64 - 1], ids=["terabyte", "beyond-any-size"])
@pytest.mark.parametrize(
    "opcode", [b"\x8e", b"\x95", b"\x8d", b"\x96"], ids=["BINBYTES8", "FRAME", "BINUNICODE8", "BYTEARRAY8"]
)
def test_a_length_claiming_a_terabyte_or_more_is_one_error_not_a_memory_error(tmp_path, opcode, length):
    path = tmp_path / "huge.pkl"
    path.write_bytes(b"\x80\x05" + opcode + length.to_bytes(8, "little") + b"abc")
    with pytest.raises(ModelFileError, match="huge.pkl: "):
        PatchCore.load(path)


def load_in_thread(path) -> str:
    """The error message of loading ``path``; fails instead of hanging when loading would block."""
    import threading

    outcome: list[str] = []

    def attempt() -> None:
        try:
            PatchCore.load(path)
            outcome.append("loaded")
        except ModelFileError as error:
            outcome.append(str(error))

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert outcome, f"loading {path} hung"
    return outcome[0]


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.mkdir(), "is a folder, not a model file"),
        (lambda p: os.mkfifo(p), "not a regular file (a device, FIFO or socket)"),
        (lambda p: p.symlink_to(p), "cannot be opened (Too many levels of symbolic links)"),
        (lambda p: p.symlink_to(p.parent / "gone.pkl"), "broken symbolic link"),
    ],
    ids=["folder", "fifo", "link-loop", "broken-link"],
)
def test_a_model_path_that_is_not_a_file_is_one_line(tmp_path, make, reason):
    path = tmp_path / "model.pkl"
    make(path)
    assert load_in_thread(path) == f"{path}: {reason}"


def test_an_unreadable_model_file_says_permission_denied(fitted_model, tmp_path):
    from test_io import ROOT, without_root_powers

    path = tmp_path / "model.pkl"
    fitted_model.save(path)
    path.chmod(0)
    code = (
        "from models.patchcore import PatchCore\n"
        f"try:\n    PatchCore.load({str(path)!r})\nexcept Exception as e:\n    print(e)"
    )
    result = subprocess.run(without_root_powers([sys.executable, "-c", code]), cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == f"{path}: permission denied", result.stderr


def load_in_subprocess(path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """``inference.py`` loading ``path`` as a user runs it, killed if it runs longer than ``timeout``."""
    from test_io import ROOT

    command = [sys.executable, "inference.py", "--model", str(path), "--image", str(path)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def billion_laughs(levels: int = 40) -> list:
    """A list that names one list twice, that one names another twice, ...: 2**40 items once written out."""
    laughs: list = ["ha"]
    for _ in range(levels):
        laughs = [laughs, laughs]
    return laughs


DEEP = "<300,000 nested lists>"  # written into the pickle as opcodes: pickle.dumps itself would recurse


def deeply_nested() -> str:
    return DEEP


def pickled(state: dict) -> bytes:
    data = pickle.dumps(state, protocol=3)  # no frames, whose lengths the splice would break
    text = DEEP.encode()
    return data.replace(b"X" + len(text).to_bytes(4, "little") + text, b"(" * 300_000 + b"l" * 300_000)


@pytest.mark.parametrize("where", ["layers", "calibration"])
@pytest.mark.parametrize("shape, reason", [
    (billion_laughs, "holds more than 1_000_000 values once its shared references are written out"),
    (deeply_nested, "nested more than 64 deep"),
], ids=["shared-references", "deep-nesting"])
def test_a_small_model_file_that_expands_without_bound_is_refused_at_once(fitted_model, tmp_path, where, shape, reason):
    """A few hundred bytes of pickle: refused in seconds with one line, not minutes of formatting or a RecursionError."""
    state = saved_state(fitted_model, tmp_path)
    if where == "layers":
        state["config"]["layers"] = shape()
    else:
        state["calibration"] = {**state["calibration"], "method": shape()}
    path = tmp_path / "bomb.pkl"
    path.write_bytes(pickled(state))
    started = time.monotonic()
    result = load_in_subprocess(path)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: refused, the file ") and reason in line
    assert "Traceback" not in result.stderr and time.monotonic() - started < 60
