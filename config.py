"""Every tunable of the toolkit in one dataclass.

Values come, in increasing priority, from the dataclass defaults, the per-category defaults below
(chosen from measurements, see README), a YAML file (``--config``) and command-line flags. Unknown
keys are an error so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import reprlib
import stat
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn, get_args, get_type_hints

import yaml

BACKBONES = ("wide_resnet50_2", "efficientnet_lite0")
PREPROCESS_MODES = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda")
DEVICE_OVERRIDE_HELP = "override the model's device"  # --device of the scripts that load a fitted model
FLAG_ALIASES = {"weights_path": ["--weights"]}  # short spellings the README uses


def _percentile_as_rate(percentile: Any) -> Any:
    """threshold_percentile P (older files) is the false-alarm rate 1 - P/100."""
    if isinstance(percentile, (int, float)) and not isinstance(percentile, bool):
        return round(1.0 - percentile / 100.0, 12)  # 99 -> 0.01, not 0.010000000000000009
    return percentile  # a mistyped value is refused by validation under the new name


# old name -> (new name, conversion): settings renamed since model files were first written
RENAMED_SETTINGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "threshold_percentile": ("false_alarm_rate", _percentile_as_rate),
}


class ConfigError(ValueError):
    """One or more settings out of their allowed range or of the wrong type; the message names each."""


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 3, 60, 60, 40


def brief(value: Any) -> str:
    """``repr`` cut to a few dozen characters: an error message never formats an unbounded value
    (a megabyte string, or a structure of shared references that expands to billions of items)."""
    return _BRIEF.repr(value)


# C0 and C1 control characters, and the marks that turn text's direction (which would show the rest of a
# line, its score and verdict, reversed)
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with its control characters written as escapes (``\\n``, ``\\x1b``, ``\\u202e``): a photo's
    name printed in a table or an error line can neither break the line, send the terminal an escape
    sequence (clear the screen, or overwrite a verdict) nor turn the rest of the line around."""
    return _CONTROL_CHARACTERS.sub(lambda found: found.group().encode("unicode_escape").decode("ascii"), text)


def first_few(items: Sequence[str], most: int = 5) -> str:
    """The first ``most`` items joined by '; ', then how many more: a line that names hundreds stays readable."""
    return "; ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def say(message: str) -> None:
    """One line on stderr, printable: what a long-running process (the watcher, the service) reports and goes on."""
    print(printable(message), file=sys.stderr, flush=True)


MAX_PLAIN_ITEMS = 1_000_000  # values and characters of text in a settings or model file, counted as written out
MAX_PLAIN_DEPTH = 64  # nesting of lists and mappings; a model file's state is four deep


def check_plain_data(value: Any, what: str, max_items: int = MAX_PLAIN_ITEMS, max_depth: int = MAX_PLAIN_DEPTH) -> None:
    """Refuse data whose written-out size or nesting is beyond any settings or model file.

    YAML aliases and pickle's memo let a few hundred bytes name the same list a billion times
    over; anything that walks the value (formatting, JSON, a deep copy) would then run for hours.
    The size is counted as if every shared reference were written out, in time linear in the
    distinct objects (each one's size is computed once), and a value that contains itself is refused.
    Bytes count as one item: they are array data, never walked.
    """
    sizes: dict[int, tuple[int, int]] = {}  # id -> (items, depth) of a finished container
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    keep_alive = []  # ids stay unique only while their objects live
    while stack:
        node, children_done = stack.pop()
        if not isinstance(node, (dict, list, tuple, set, frozenset)):
            continue
        key = id(node)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else list(node)
        if children_done:
            on_path.discard(key)
            items, depth = 1, 1
            for child in children:
                child_items, child_depth = _plain_size(child, sizes)
                items, depth = items + child_items, max(depth, child_depth + 1)
            if items > max_items:
                raise ValueError(
                    f"{what} holds more than {max_items:_} values once its shared references are written out; "
                    "no settings or model file is that large"
                )
            if depth > max_depth:
                raise _too_deep(what, max_depth)
            sizes[key] = (items, depth)
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise ValueError(f"{what} holds a list or mapping that contains itself")
        if len(on_path) >= max_depth:
            raise _too_deep(what, max_depth)
        on_path.add(key)
        keep_alive.append(node)
        stack.append((node, True))
        stack.extend((child, False) for child in children)


def _too_deep(what: str, max_depth: int) -> ValueError:
    return ValueError(f"{what} holds lists or mappings nested more than {max_depth} deep, deeper than any settings or model file")


def _plain_size(value: Any, sizes: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(items, depth) of a value whose containers ``check_plain_data`` has sized already."""
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        return sizes[id(value)]
    return (1 + len(value), 0) if isinstance(value, str) else (1, 0)


def _number(value: float | None) -> str:
    """A bound as a user would type it: 4096, 100_000_000, 0.5 (empty for no bound)."""
    if value is None:
        return ""
    if float(value).is_integer():
        return f"{int(value):_}" if abs(value) >= 100_000 else str(int(value))
    return f"{value:g}"


@dataclass(frozen=True)
class Rule:
    """What a setting means and which values it takes: the one source of ``--help`` and of validation."""

    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None  # exclusive lower bound
    below: float | None = None  # exclusive upper bound
    multiple_of: int | None = None
    lengths: tuple[int, ...] | None = None  # allowed list lengths
    normalise: Callable[[Any], Any] | None = None  # older spellings rewritten before checking

    def describe(self) -> str:
        """The allowed values in words, e.g. '32 to 1024, a multiple of 16'."""
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(map(str, self.choices)))
        low, high = _number(self.minimum), _number(self.maximum)
        if self.above is not None and self.below is not None:
            parts.append(f"between {_number(self.above)} and {_number(self.below)}, both excluded")
        elif self.above is not None:
            parts.append(f"above {_number(self.above)}" + (f", at most {high}" if high else ""))
        elif self.below is not None:
            parts.append(f"below {_number(self.below)}" + (f", at least {low}" if low else ""))
        elif low and high:
            parts.append(f"{low} to {high}")
        elif low:
            parts.append(f"at least {low}")
        elif high:
            parts.append(f"at most {high}")
        if self.multiple_of:
            parts.append(f"a multiple of {self.multiple_of}")
        if self.lengths is not None:
            parts.append(" or ".join(map(str, self.lengths)) + " names")
        return ", ".join(parts)

    def violation(self, value: Any) -> str | None:
        """Why ``value`` (already of the right type) is not allowed, or None."""
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}"
        if self.lengths is not None and len(value) not in self.lengths:
            return f"must name {' or '.join(map(str, self.lengths))} items"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        out_of_range = (
            (self.minimum is not None and value < self.minimum)
            or (self.maximum is not None and value > self.maximum)
            or (self.above is not None and value <= self.above)
            or (self.below is not None and value >= self.below)
            or (self.multiple_of is not None and value % self.multiple_of)
        )
        return f"must be {self.describe()}" if out_of_range else None


def _on_off(value: Any) -> Any:
    """true/false (--preprocess false, or a model file or YAML file that spells it so) mean on/off."""
    switch = str(value).lower()
    return {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(switch, switch)


def setting(default: Any, help: str, **rule: Any) -> Any:
    """A Config field whose help text and allowed values live beside its default (see ``Rule``)."""
    metadata = {"rule": Rule(help, **rule)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Config:
    """All settings of fitting, scoring and preprocessing."""

    # --- model -----------------------------------------------------------------------------
    backbone: str = setting("wide_resnet50_2", "feature network, with ImageNet weights", choices=BACKBONES)
    weights_path: str | None = setting(None, "local state-dict file; unset = the backbone's normal source")
    layers: list[str] = setting(
        [], "two backbone stages (stride 8 and 16); empty = the backbone's own pair", lengths=(0, 2)
    )
    target_dim: int = setting(
        1024, "feature channels after reduction (kept as is when the backbone has fewer)", minimum=1, maximum=8192
    )
    image_size: int = setting(256, "side of the model input in pixels", minimum=32, maximum=1024, multiple_of=16)
    fine_aggregation: int = setting(
        3, "patches a side averaged into each fine-stage feature (1: each patch its own, finer heatmaps)",
        choices=(1, 3),
    )
    coreset_sampling_ratio: float = setting(0.1, "share of healthy patches kept in the memory bank", above=0, maximum=1)
    coreset_projection_dim: int = setting(
        128, "random-projection width the greedy coreset measures distances in", minimum=1, maximum=4096
    )
    coreset_chunk_size: int = setting(
        4096, "patches per greedy chunk; bounds fit memory and time", minimum=1, maximum=1_000_000
    )
    coreset_oversampling: float = setting(
        1.0, "candidates kept per chunk, x its share of a small bank, before one global greedy pass (1 = none)",
        minimum=1, maximum=1000,
    )
    object_patches_only: bool = setting(True, "with a zeroed background, store and search only patches near the part")
    knn_index: str = setting(
        "flat", "nearest-neighbour index: flat (exact) or ivf (approximate, for very large banks)",
        choices=("flat", "ivf"),
    )
    ivf_nprobe: int = setting(8, "cells an ivf index searches per query", minimum=1, maximum=65536)
    num_neighbors: int = setting(
        9, "neighbourhood size of the paper's score re-weighting (Eq. 7)", minimum=1, maximum=1024
    )
    score_reweighting: bool = setting(
        True, "re-weight the image score by the nearest healthy patch's neighbourhood (Eq. 7)"
    )
    heatmap_sigma: float = setting(
        4.0, "Gaussian blur of the anomaly map, in model-input pixels (0 = none)", minimum=0, maximum=64
    )
    batch_size: int = setting(
        8, "photos decoded, preprocessed and searched together (the CPU runs the network 2 at a time)",
        minimum=1, maximum=1024
    )
    device: str = setting("auto", "where the backbone runs", choices=DEVICES)
    num_workers: int = setting(2, "threads that decode and preprocess photos", minimum=1, maximum=64)
    seed: int = setting(
        0, "seed of the calibration folds, coreset and projections (recorded in the model file)",
        minimum=0, maximum=2**32 - 1,
    )
    max_image_pixels: int = setting(
        100_000_000, "largest photo read, in 8-bit RGB pixels (width x height; a 16-bit or four-channel photo "
        "counts in proportion to its bytes); larger ones are refused before decoding",
        minimum=1, maximum=2**30,
    )
    # --- calibration ---------------------------------------------------------------------------
    false_alarm_rate: float = setting(
        0.01, "share of healthy parts the threshold may flag (0.01 = at most 1 in 100)", above=0, below=0.5
    )
    calibration_folds: int = setting(
        5, "folds of the cross-fitted calibration: each photo is scored by a bank fitted without its fold",
        minimum=2, maximum=100,
    )
    # --- learning on the line (train.py --add-good, /feedback, drift warnings) -----------------
    good_score_limit: float = setting(
        1.5, "a photo confirmed good that scores above this many thresholds is refused unless forced",
        minimum=1, maximum=1000,
    )
    update_copies_kept: int = setting(
        10, "copies of the model file an update keeps beside it to undo it: the newest ones, and always the fit's",
        minimum=1, maximum=1_000_000,
    )
    drift_window: int = setting(
        200, "recent passed photos whose scores the drift check watches", minimum=5, maximum=1_000_000
    )
    drift_percentile: float = setting(
        90.0, "drift: warn when the window's median score is above this percentile of the calibration scores",
        above=50, below=100,
    )
    drift_flag_factor: float = setting(
        3.0, "drift: warn when the share flagged in the window is above this many times the expected false alarms",
        above=1, maximum=1000,
    )
    # --- preprocessing (the eight-step pipeline) -----------------------------------------------
    preprocess: str = setting(
        "auto", "auto: steps decided from the training photos at fit time; on: the switches below; off: a plain resize",
        choices=PREPROCESS_MODES, normalise=_on_off,
    )
    white_balance: bool = setting(True, "gray-world white balance")
    inpaint_specular: bool = setting(True, "fill saturated glare from its surroundings")
    specular_threshold: int = setting(250, "brightness from which a pixel counts as glare", minimum=0, maximum=255)
    clahe: bool = setting(True, "CLAHE contrast equalisation on the L channel")
    clahe_clip_limit: float = setting(2.0, "CLAHE clip limit", above=0, maximum=100)
    clahe_tile_grid: int = setting(8, "CLAHE tiles per side", minimum=1, maximum=64)
    segment: bool = setting(True, "object mask")
    segmentation_method: str = setting(
        "otsu", "how the mask is found: otsu (part darker or lighter than the table) or grabcut (colour models)",
        choices=("otsu", "grabcut"),
    )
    crop: bool = setting(True, "crop to the largest contour")
    crop_padding: float = setting(
        0.1, "fraction of the object's size added on each side of the crop", minimum=0, maximum=1
    )
    align_rotation: bool = setting(True, "rotate the part to a canonical orientation")
    min_elongation: float = setting(
        1.5, "axis ratio below which the rotation is left alone (nuts); 0 = always align", minimum=0, maximum=100
    )
    normalize_scale: bool = setting(True, "scale the part's long side to fill the input")
    zero_background: bool = setting(True, "black out everything outside the dilated object mask")
    mask_fill: str = setting(
        "contour", "object mask: the part's outline filled (contour) or its convex hull (hull, keeps shiny edges)",
        choices=("contour", "hull"),
    )
    mask_dilation: int = setting(15, "dilation of the object mask, in model-input pixels", minimum=0, maximum=255)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Build a config, refusing keys that are not settings (typos must not pass silently).

        A renamed setting in an older model or YAML file is read under its new name and meaning.
        """
        values = dict(values)
        for old_name, (new_name, convert) in RENAMED_SETTINGS.items():
            if old_name in values and new_name not in values:
                values[new_name] = convert(values.pop(old_name))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known, key=str)
        if unknown:
            names = ", ".join(key if isinstance(key, str) and len(key) <= 60 else brief(key) for key in unknown[:10])
            raise ConfigError(f"unknown config key(s): {names}{', ...' if len(unknown) > 10 else ''}")
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        return self.from_dict({**self.to_dict(), **changes})


def rule_of(item: dataclasses.Field) -> Rule:
    return item.metadata["rule"]


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """``value`` as the setting's type, or ConfigError: no string, float or None slips in as a number or switch."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {brief(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be a whole number, got {brief(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{name} must be a finite number, got {brief(value)}")
    if hint == list[str]:
        if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
            return list(value)
        raise ConfigError(f"{name} must be a list of names, got {brief(value)}")
    if value is None and type(None) in get_args(hint):
        return None
    if isinstance(value, str):
        return value
    raise ConfigError(f"{name} must be text, got {brief(value)}")


def validate(config: Config) -> None:
    """Check every setting's type and range against its Rule; one ConfigError naming all the bad ones."""
    problems = []
    hints = get_type_hints(Config)
    for item in fields(config):
        value = getattr(config, item.name)
        if rule_of(item).normalise is not None:
            value = rule_of(item).normalise(value)
        try:
            value = _coerce(item.name, hints[item.name], value)
        except ConfigError as error:
            problems.append(str(error))
            continue
        setattr(config, item.name, value)
        violation = None if value is None else rule_of(item).violation(value)
        if violation:
            problems.append(f"{item.name} {violation}, got {brief(value)}")
    if problems:
        raise ConfigError("invalid settings: " + "; ".join(problems))


# Per-category defaults, decided on training photos with synthetic defects painted on
# (scripts/compare_settings.py; docs/preprocessing.md, "Defaults"): on MVTec screw CLAHE catches fewer
# painted defects (AUROC 0.695 against 0.747; it amplifies the table's texture), and the full
# pipeline ('on') measures the same as 'auto' (0.739 against 0.747) without the fit-time trial.
# Every other folder (metal_nut included: no data here to measure it) gets 'auto': the steps are
# decided from its own training photos at fit time (preprocessing/auto.py).
CATEGORY_DEFAULTS: dict[str, dict[str, Any]] = {
    "screw": {"preprocess": "on", "clahe": False},
    "metal_nut": {"clahe": False},
    "custom": {"clahe": False},
}


MAX_YAML_BYTES = 2**20  # a config file is a few dozen lines


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as the number a user means.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so ``1e-3`` (or
    ``5E-2``) would arrive as text and a rate written that way would be refused. YAML 1.2 reads it
    as a number; this loader adds that one rule and otherwise stays PyYAML's safe loader.
    A key given twice is an error, as YAML 1.2 has it: PyYAML keeps the last in silence, so one of
    two values written for a setting would be dropped unseen.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            if key.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key.value!r} is given twice (line {key.start_mark.line + 1})")
            seen.add(key.value)
        return super().construct_mapping(node, deep)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


YAML_PROBLEM_CHARACTERS = 300  # a problem quotes the file (a tag, a key): bounded, cut between words


def yaml_problem(error: yaml.YAMLError) -> str:
    """What PyYAML found wrong, and where, in one line: the problem at its line and column, or the
    byte or character its reader refused at its position. Its own text spans lines, and shows a byte
    that is not UTF-8 as a character (``#x00e9``), which cut short reads as if the file held a NUL."""
    if isinstance(error, yaml.reader.ReaderError):
        if error.encoding == "unicode":  # decoded, but a control character YAML does not allow
            return f"position {error.position}: character U+{error.character:04X}: {error.reason}"
        return f"position {error.position}: byte 0x{error.character:02X} is not {error.encoding}: {error.reason}"
    problem = str(getattr(error, "problem", None) or error)
    problem = textwrap.shorten(problem, YAML_PROBLEM_CHARACTERS, placeholder=" ...")  # also one line
    mark = getattr(error, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def yaml_value(text: str) -> Any:
    """One value as a config file reads it; ValueError, naming it, when YAML cannot read it."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader: plain data, no Python objects
    except RecursionError:
        raise ValueError(f"{brief(text)} is not a value YAML can read (nested too deeply)") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{brief(text)} is not a value YAML can read ({yaml_problem(error)})") from None


def settings_from_pairs(pairs: Sequence[str]) -> dict[str, Any]:
    """``SETTING=VALUE`` texts (the scripts' options) as config overrides, each value read as a
    config file reads it and ``-`` in a name read as ``_``; ValueError names a text without ``=``."""
    changes: dict[str, Any] = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or not name.strip():
            raise ValueError(f"{brief(pair)}: expected SETTING=VALUE")
        changes[name.strip().replace("-", "_")] = yaml_value(value.strip())
    return changes


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config overrides; anything but a small, plain mapping is an error."""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):  # a FIFO or a device never ends
                raise ValueError(f"{path}: a config file must be a regular file")
            text = handle.read(MAX_YAML_BYTES + 1)
        if len(text) > MAX_YAML_BYTES:
            raise ValueError(f"{path}: more than {MAX_YAML_BYTES:_} bytes; a config file is a few dozen lines")
        data = yaml.load(text, Loader=ConfigLoader) or {}  # a SafeLoader: plain data, no Python objects
    except OSError as error:
        raise ValueError(f"{path}: cannot read config file ({error.strerror})") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a config file") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({yaml_problem(error)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of setting: value")
    check_plain_data(data, str(path))
    return data


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _shown(value: Any) -> str:
    """A default as a user types it on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "unset"
    if isinstance(value, list):
        return " ".join(value) or "empty"
    return _number(value) if isinstance(value, int) else str(value)


def help_text(item: dataclasses.Field) -> str:
    """'what it does (default X, per-category defaults; allowed values)', from the field's Rule."""
    rule = rule_of(item)
    default = item.default_factory() if item.default is dataclasses.MISSING else item.default
    by_category: dict[str, list[str]] = {}
    for category, overrides in CATEGORY_DEFAULTS.items():
        if item.name in overrides:
            by_category.setdefault(_shown(overrides[item.name]), []).append(category)
    text = f"{rule.help} (default {_shown(default)}"
    text += "".join(f", {value} for {', '.join(names)}" for value, names in by_category.items())
    allowed = rule.describe()
    text += f"; {allowed})" if allowed else ")"
    return text.replace("%", "%%")  # argparse formats help with %


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Expose every Config field as ``--field-name`` (default: not given), plus ``--config``."""
    parser.add_argument("--config", help="YAML file of settings (see README, 'Configuration')")
    group = parser.add_argument_group("settings (override the YAML file and the defaults)")
    hints = get_type_hints(Config)
    for item in fields(Config):
        flags = ["--" + item.name.replace("_", "-"), *FLAG_ALIASES.get(item.name, [])]
        hint, help = hints[item.name], help_text(item)
        if hint is bool:
            group.add_argument(*flags, dest=item.name, type=_parse_bool, metavar="BOOL", default=None, help=help)
        elif hint == list[str]:
            group.add_argument(*flags, dest=item.name, nargs="+", metavar="NAME", default=None, help=help)
        elif hint in (int, float):
            metavar = "N" if hint is int else "X"
            group.add_argument(*flags, dest=item.name, type=hint, metavar=metavar, default=None, help=help)
        else:  # text: the choices, when there are some, are in the help
            metavar = "NAME" if rule_of(item).choices else "TEXT"
            group.add_argument(*flags, dest=item.name, type=str, metavar=metavar, default=None, help=help)


def config_from_args(args: argparse.Namespace, category: str | None = None) -> Config:
    """Merge defaults < category defaults < YAML file < command-line flags."""
    values: dict[str, Any] = dict(CATEGORY_DEFAULTS.get(category or "custom", {}))
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    for item in fields(Config):
        given = getattr(args, item.name, None)
        if given is not None:
            values[item.name] = given
    return Config.from_dict(values)


class UserError(Exception):
    """A problem the user can fix (bad file, missing data or weights); shown as one line, no traceback."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def run_cli(main: Callable[[], int]) -> int:
    """Run a script's main, turning expected failures into one 'error:' line and exit code 2.

    Expected: what the user can fix (settings, files, data, weights) and what the system refuses
    (permissions, a full or read-only disk). Anything else is a bug and keeps its traceback.
    A file name that is not UTF-8 is printed as the bytes it has on disk: a terminal whose locale
    encodes strictly would otherwise stop a table (or a watcher) at the first such photo.
    """
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    try:
        return main()
    except (UserError, ValueError) as error:
        print(f"error: {printable(str(error))}", file=sys.stderr)
        return 2
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print(printable(f"error: {where}{error.strerror or error}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
