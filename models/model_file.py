"""The model file: plain data on disk, read without running any code from it.

A model file is a pickle of builtins only (dicts, lists, strings, numbers, bytes): arrays are packed
as bytes with their dtype and shape, and the unpickler refuses every global, so loading a file never
executes code. What it reads is then checked against what a fit can write (types, shapes, finite
values, a threshold that can flag something); anything else is a ``ModelFileError`` naming the file.
Updates made on the line keep the file they replace beside it, so an update can be undone.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from config import Config, UserError, brief, check_plain_data
from models.backbones import feature_width
from models.backend import onnx_path_for
from output_files import check_not_an_input, write_atomically

FORMAT_VERSION = 2  # 2: the image score is read off the anomaly map


class ModelFileError(UserError, ValueError):
    """A model file that cannot be loaded; the message names the file and the reason."""


def write_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write a model's plain-data state atomically: a crash never leaves a half-written file under ``path``."""
    write_atomically(path, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))


def check_not_the_model(output: str | Path, model: str | Path) -> None:
    """Refuse a results file that is the model file or its network's export, by any spelling: results
    written or appended there would ruin the model, with no copy kept."""
    exports = {onnx_path_for(model), onnx_path_for(Path(model).resolve())}  # a link's, and the one load finds
    check_not_an_input(output, [model, *exports], "the model file or its ONNX export")


def check_state(state: Any) -> dict[str, Any]:
    """An unpickled state whose format version, keys and value types are those a fit writes, or ValueError."""
    if not isinstance(state, dict) or "format_version" not in state:
        raise ValueError("not a fastener-anomaly-detection model file")
    version = state["format_version"]
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(
            f"model format version {brief(version)} is not supported by this version "
            f"(expects {FORMAT_VERSION}); refit the model with train.py"
        )
    missing = sorted(set(STATE_TYPES) - set(state))
    if missing:
        raise ValueError(f"incomplete model file, missing {', '.join(missing)}")
    optional = {key: types for key, types in OPTIONAL_STATE_TYPES.items() if key in state}
    for key, types in {**STATE_TYPES, **optional}.items():
        if not isinstance(state[key], types) or isinstance(state[key], bool):
            raise ValueError(f"{key} has the wrong type ({type(state[key]).__name__})")
    return state


STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "config": dict,
    "memory_bank": dict,
    "calibration_scores": dict,
    "threshold": (int, float),
    "n_train": int,
    "fit_seconds": (int, float),
    "weights_identity": str,
}
OPTIONAL_STATE_TYPES: dict[str, type | tuple[type, ...]] = {  # keys older files lack
    "coreset_projection": (dict, type(None)),
    "learnt_photos": bytes,
    "calibration_photos": bytes,
}


_UPDATE_VALUE_TYPES = (str, int, float, bool, list)


def checked_updates(updates: Any) -> list[dict[str, Any]]:
    """The update history as add_good writes it: a list of records of plain values, or ValueError."""
    if not isinstance(updates, list) or not all(
        isinstance(update, dict)
        and all(isinstance(key, str) and isinstance(value, _UPDATE_VALUE_TYPES) for key, value in update.items())
        and isinstance(update.get("photos"), int)
        and all(isinstance(update.get(key, ""), str) for key in ("source", "time"))
        and all(isinstance(name, str) for key in ("refused", "forced", "already_learnt") for name in update.get(key, []))
        for update in updates
    ):
        raise ValueError("updates must be a list of update records")
    return [dict(update) for update in updates]


def checked_fingerprints(packed: bytes, size: int, name: str) -> frozenset[bytes]:
    """Photos' fingerprints stored one after another, ``size`` bytes each, or ValueError naming the field."""
    if len(packed) % size:
        raise ValueError(f"{name} must hold whole {size}-byte fingerprints, not {len(packed)} bytes")
    return frozenset(packed[start : start + size] for start in range(0, len(packed), size))


_NUMBER = (int, float)
_CALIBRATION_KINDS: dict[str, tuple[type, ...]] = {  # what the promise, reports and GET /model read, by key
    "method": (str,), "rule": (str,), "count": (int,), "false_alarm_rate": _NUMBER, "false_alarms_per_1000": _NUMBER,
    "interval_per_1000": (list,), "unlike_the_rest": (list,), "warnings": (list,), "left_out": (list,),
    "added_on_the_line": (int,),
}  # spread_floor: check_fitted_values


def checked_calibration(record: Any) -> dict[str, Any]:
    """The calibration record as a fit writes it, or ValueError naming the field: a record missing what
    the promise reads (a stated rate without its interval) would load and then fail a report."""
    if not isinstance(record, dict) or not all(isinstance(key, str) for key in record):
        raise ValueError("calibration must be a record of named values")
    for key, kinds in _CALIBRATION_KINDS.items():
        if key in record and (isinstance(record[key], bool) or not isinstance(record[key], kinds)):
            raise ValueError(f"calibration {key} has the wrong type ({type(record[key]).__name__})")
    if "false_alarms_per_1000" in record:
        interval = record.get("interval_per_1000")
        if not (isinstance(interval, list) and len(interval) == 2
                and all(isinstance(end, _NUMBER) and math.isfinite(end) for end in interval)):
            raise ValueError("calibration interval_per_1000 must be two finite numbers, low and high")
        if not isinstance(record.get("count"), int) or not isinstance(record.get("method"), str):
            raise ValueError("calibration states a rate without the count and method it rests on")
    if not all(isinstance(text, str) for key in ("warnings", "left_out") for text in record.get(key, [])):
        raise ValueError("calibration warnings and left_out must be lists of text")
    listed = record.get("unlike_the_rest", [])
    if not all(isinstance(entry, dict) and isinstance(entry.get("photo"), str) for entry in listed):
        raise ValueError("calibration unlike_the_rest must list records naming a photo")
    return dict(record)


FileIdentity = tuple[int, int, int, int]


def file_identity(path: str | Path) -> FileIdentity | None:
    """What the file at ``path`` is now (device, inode, size, modification time), None when absent:
    tells whether a model file was replaced on disk since it was loaded."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def check_unchanged(path: str | Path, since: FileIdentity | None) -> None:
    """Refuse (ModelFileError) to save an update over ``path`` when the file there is no longer the
    one the update started from (``since``, None: nothing to compare): a new fit or another update
    saved there meanwhile would be lost."""
    if since is not None and file_identity(path) != since:
        raise ModelFileError(
            f"{path}: replaced on disk since it was loaded (a new fit, an update or a re-calibration saved there); "
            "that file is kept and nothing is saved over it: load it again (restart a service or watcher), then "
            "add these photos or re-calibrate again"
        )


def keep_previous(path: str | Path, update: int, copies_kept: int) -> Path | None:
    """Copy the model file about to be replaced by update number ``update`` to
    ``<name>.before-update-<n>.pkl`` (atomically, with the file's own mode: a private model
    stays private), so the update can be undone; None when there is no file to keep.

    ``n`` is ``update``, or past the highest number a copy holds: a copy is never overwritten, as
    one of them may hold the only copy of the fit, and the newest copy has the highest number (after
    an undo, ``update`` restarts low). Of the copies, the ``copies_kept`` newest and the oldest (the
    fit) stay; the others are removed, or a line that learns all day fills its disk with them."""
    path = Path(path)
    if not path.is_file():
        return None
    numbered = re.compile(rf"{re.escape(path.stem)}\.before-update-([1-9][0-9]*){re.escape(path.suffix)}")
    taken = [int(match[1]) for name in os.listdir(path.parent) if (match := numbered.fullmatch(name))]
    update = max([update, *(number + 1 for number in taken)])
    kept = path.with_name(f"{path.stem}.before-update-{update}{path.suffix}")
    write_atomically(kept, path.read_bytes(), mode=stat.S_IMODE(path.stat().st_mode))
    copies = sorted((number, path.with_name(f"{path.stem}.before-update-{number}{path.suffix}"))
                    for number in [*taken, update])
    for _, old in copies[1:-copies_kept]:
        with contextlib.suppress(OSError):  # a copy that cannot be removed costs disk, never the update
            old.unlink()
    return kept


def read_state(path: Path) -> Any:
    """Unpickle a model file's plain data, or ModelFileError naming the file and what is wrong with it."""
    try:
        status = path.stat()
    except FileNotFoundError:
        reason = "broken symbolic link" if path.is_symlink() else "model file not found"
        raise ModelFileError(f"{path}: {reason}") from None
    except OSError as error:  # a symlink loop, a folder on the way that cannot be entered
        raise ModelFileError(f"{path}: cannot be opened ({error.strerror})") from None
    if stat.S_ISDIR(status.st_mode):
        raise ModelFileError(f"{path}: is a folder, not a model file")
    if not stat.S_ISREG(status.st_mode):  # opening a FIFO would wait for a writer forever
        raise ModelFileError(f"{path}: not a regular file (a device, FIFO or socket)")
    try:
        with open(path, "rb") as handle:
            state = _PlainDataUnpickler(handle).load()
    except PermissionError:
        raise ModelFileError(f"{path}: permission denied") from None
    except OSError as error:
        raise ModelFileError(f"{path}: cannot be read ({error.strerror})") from None
    except _GlobalRefused as error:
        raise ModelFileError(f"{path}: refused, {error}") from None
    except (MemoryError, OverflowError):  # a length field claiming far more than the file holds
        raise ModelFileError(f"{path}: corrupt, it declares a value larger than the whole file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as error:
        raise ModelFileError(f"{path}: not a model file or truncated ({brief(str(error))})") from None
    try:  # before anything walks it: a few hundred bytes of shared references can expand to billions
        check_plain_data(state, "the file")
    except ValueError as error:
        raise ModelFileError(f"{path}: refused, {error}") from None
    return state


# A backbone's features are of order 1 to 100; up to a million, every squared distance between
# patches stays finite in float32, so no score can overflow to infinity or NaN.
MAX_FEATURE_MAGNITUDE = 1e6
THRESHOLD_SPAN = 1000  # a threshold more than this many times the largest healthy score is no calibration


def check_fitted_values(
    config: Config, threshold: float, bank: np.ndarray, scores: np.ndarray, calibration: dict[str, Any], n_train: int
) -> None:
    """Refuse what no fit writes: a NaN or zero threshold, an empty bank, values so large that scores overflow.

    Types are not enough: a bank with one patch of 3e38 loads as floats, yet every distance to it
    overflows and every photo would score NaN, which is below no threshold and so "ok".
    """
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold is {threshold:g}, not a finite number above 0")
    if bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] == 0:
        raise ValueError(f"memory_bank must be a non-empty (patches, features) array, got shape {bank.shape}")
    if not np.isfinite(bank).all():
        raise ValueError("memory_bank holds NaN or infinite values")
    largest = float(np.abs(bank).max())
    if largest > MAX_FEATURE_MAGNITUDE:
        raise ValueError(
            f"memory_bank holds a value of {largest:.3g}; a backbone's features stay below "
            f"{MAX_FEATURE_MAGNITUDE:g}, and distances to it would overflow"
        )
    width = feature_width(config)
    if width is not None and bank.shape[1] != width:
        raise ValueError(
            f"memory_bank has {bank.shape[1]} features per patch, but {config.backbone} with "
            f"target_dim {config.target_dim} gives {width}"
        )
    if scores.ndim != 1 or scores.size == 0 or not np.isfinite(scores).all() or scores.min() < 0:
        raise ValueError("calibration_scores must be a non-empty list of finite distances (0 or more)")
    if scores.max() == 0:  # 1000 x 0 would bound no threshold
        raise ValueError("calibration_scores are all 0; no fit scores every held-out healthy photo 0")
    if threshold > THRESHOLD_SPAN * scores.max():
        raise ValueError(
            f"threshold {threshold:.4g} is over {THRESHOLD_SPAN} times the largest healthy calibration "
            f"score ({scores.max():.4g}); it would pass every defect"
        )
    floor = calibration.get("spread_floor", 0.0)
    if not (isinstance(floor, (int, float)) and not isinstance(floor, bool) and math.isfinite(floor) and floor >= 0):
        raise ValueError(f"calibration spread_floor is {brief(floor)}, not a finite number of 0 or more")
    if n_train < 1:
        raise ValueError(f"n_train must be at least 1, got {n_train}")


MAX_PROJECTION_MAGNITUDE = 100.0  # a Gaussian projection's entries are a few over sqrt(its width)


def check_projection(projection: np.ndarray | None, bank_width: int, projection_dim: int) -> None:
    """Refuse a coreset projection the bank was not picked in: an update would measure distances in
    a space of the wrong shape, or one where every distance overflows."""
    if projection is None:
        return
    if projection.shape != (bank_width, projection_dim):
        raise ValueError(
            f"coreset_projection has shape {projection.shape}; the bank's {bank_width} features to "
            f"coreset_projection_dim {projection_dim} needs ({bank_width}, {projection_dim})"
        )
    if not np.isfinite(projection).all() or float(np.abs(projection).max()) > MAX_PROJECTION_MAGNITUDE:
        raise ValueError(f"coreset_projection holds values that are not finite or above {MAX_PROJECTION_MAGNITUDE:g}")


def pack_array(array: np.ndarray) -> dict[str, Any]:
    """An array as builtins only, so the pickle never has to name a NumPy function."""
    array = np.ascontiguousarray(array)
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}


def unpack_array(packed: dict[str, Any], name: str) -> np.ndarray:
    """A float32 array from ``pack_array``'s dict, checking that shape and data length agree."""
    if set(packed) != {"dtype", "shape", "data"} or not isinstance(packed["data"], bytes):
        raise ValueError(f"{name} is not a packed array")
    if packed["dtype"] != np.dtype(np.float32).str:
        raise ValueError(f"{name} must be float32, got dtype {brief(packed['dtype'])}")
    shape = packed["shape"]
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"{name} has an invalid shape {brief(shape)}")
    if math.prod(shape) * 4 != len(packed["data"]):
        raise ValueError(f"{name}: shape {brief(shape)} does not match its {len(packed['data'])} bytes")
    return np.frombuffer(packed["data"], dtype=np.float32).reshape(shape).copy()


class _GlobalRefused(pickle.UnpicklingError):
    """The file names a Python object: loading it could run code."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Refuses every global: a model file holds dicts, lists, strings, numbers and bytes only."""

    def find_class(self, module: str, name: str) -> Any:
        raise _GlobalRefused(f"the file asks to load {f'{module}.{name}'[:100]}; model files hold plain data only")
