from __future__ import annotations

import argparse
import errno
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import pytest

from config import (
    MAX_YAML_BYTES,
    Config,
    ConfigError,
    UserError,
    add_config_arguments,
    check_plain_data,
    config_from_args,
    fail,
    help_text,
    load_yaml,
    printable,
    rule_of,
    run_cli,
    settings_from_pairs,
    yaml_value,
)

ROOT = Path(__file__).resolve().parents[1]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(argv)


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("image_size: 320\nseed: 7\nclahe: false\n")
    config = config_from_args(parse(["--config", str(settings), "--seed", "11", "--backbone", "efficientnet_lite0"]))
    assert (config.image_size, config.seed, config.clahe, config.backbone) == (320, 11, False, "efficientnet_lite0")
    assert config.coreset_sampling_ratio == Config().coreset_sampling_ratio


def test_weights_alias_and_boolean_flags():
    config = config_from_args(parse(["--weights", "w.pth", "--score-reweighting", "off"]))
    assert config.weights_path == "w.pth"
    assert config.score_reweighting is False
    assert config_from_args(parse(["--clahe", "on"])).clahe is True


@pytest.mark.parametrize("spelling, value", [("True", True), ("YES", True), ("On", True), ("1", True),
                                             ("FALSE", False), ("No", False), ("off", False), ("0", False)])
def test_a_switch_flag_takes_true_and_false_in_any_of_their_spellings_and_cases(spelling: str, value: bool) -> None:
    """--clahe True, --clahe YES or --clahe no: what a user types for a switch, in any case, is read as meant."""
    assert parse(["--clahe", spelling]).clahe is value


def test_a_list_flag_given_no_names_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--layers alone is a mistake, never a silent request for the backbone's own pair."""
    with pytest.raises(SystemExit):
        parse(["--layers"])
    assert "--layers" in capsys.readouterr().err


def from_yaml(tmp_path, text: str) -> Config:
    settings = tmp_path / "settings.yaml"
    settings.write_text(text)
    return config_from_args(parse(["--config", str(settings)]))


def test_unknown_yaml_key_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*image_sise"):
        from_yaml(tmp_path, "image_sise: 320\n")


def test_unknown_keys_are_named_in_order_ten_at_most() -> None:
    """Eleven typos: the first ten named, sorted, and '...' for the rest."""
    names = [f"typo{index:02d}" for index in range(11)]
    with pytest.raises(ConfigError) as raised:
        Config.from_dict(dict.fromkeys(reversed(names), 1))
    assert str(raised.value) == "unknown config key(s): " + ", ".join(names[:10]) + ", ..."


def test_yaml_must_be_a_mapping(tmp_path):
    with pytest.raises(ValueError, match="mapping"):
        from_yaml(tmp_path, "- 1\n- 2\n")


def test_a_rate_written_with_an_exponent_is_a_number(tmp_path):
    """``1e-3`` is text to YAML 1.1 (PyYAML), so a rate written the way engineers write it was refused."""
    config = from_yaml(tmp_path, "false_alarm_rate: 1e-3\ncoreset_sampling_ratio: 5E-2\nheatmap_sigma: 1.5e+0\n"
                                 "drift_flag_factor: 5e1\n")  # the exponent's sign is optional, as in YAML 1.2
    assert (config.false_alarm_rate, config.coreset_sampling_ratio, config.heatmap_sigma) == (0.001, 0.05, 1.5)
    assert config.drift_flag_factor == 50.0


@pytest.mark.parametrize("text", ["e5", "-e5", "1e", "1e-3x"])
def test_text_that_only_looks_like_an_exponent_stays_text(tmp_path, text):
    with pytest.raises(ValueError, match=f"false_alarm_rate must be a finite number, got '{text}'"):
        from_yaml(tmp_path, f"false_alarm_rate: {text}\n")


def test_setting_pairs_read_a_dash_as_an_underscore_and_refuse_a_pair_without_a_name() -> None:
    """compare_settings.py --try and ablate_preprocessing.py --set: image-size=320 is image_size; =320 names nothing."""
    assert settings_from_pairs(["image-size=320", " clahe = false "]) == {"image_size": 320, "clahe": False}
    for pair in ("=320", " =320", "image_size"):
        with pytest.raises(ValueError) as raised:
            settings_from_pairs([pair])
        assert str(raised.value) == f"{pair!r}: expected SETTING=VALUE"


@pytest.mark.parametrize("text", ["", "# every setting at its default\n"], ids=["empty", "comments-only"])
def test_an_empty_settings_file_gives_the_defaults(tmp_path, text):
    assert from_yaml(tmp_path, text) == config_from_args(parse([]))


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: None, "cannot read config file (No such file or directory)"),
        (lambda p: p.mkdir(), "cannot read config file (Is a directory)"),
        (lambda p: os.mkfifo(p), "a config file must be a regular file"),  # reading it would wait or read nothing
        (lambda p: p.write_text("# padding\n" * 200_000), "more than 1_048_576 bytes; a config file is a few dozen lines"),
    ],
    ids=["missing", "folder", "fifo", "huge"],
)
def test_a_settings_file_that_cannot_be_one_is_refused_naming_it(tmp_path, make, reason):
    path = tmp_path / "settings.yaml"
    make(path)
    with pytest.raises(ValueError) as raised:
        config_from_args(parse(["--config", str(path)]))
    assert str(raised.value) == f"{path}: {reason}"


@pytest.mark.parametrize(
    "bad", [{"backbone": "resnet9000"}, {"coreset_sampling_ratio": 0}, {"image_size": 100}, {"device": "tpu"}]
)
def test_invalid_values_are_refused(bad):
    with pytest.raises(ValueError):
        Config(**bad)


def test_round_trip_through_dict():
    config = Config(seed=5, layers=["layer1", "layer2"])
    assert Config.from_dict(config.to_dict()) == config


# ----------------------------------------------------------------------------- types and ranges
@pytest.mark.parametrize(
    "setting, value, reason",
    [
        ("clahe", "no", "clahe must be true or false, got 'no'"),
        ("image_size", "big", "image_size must be a whole number, got 'big'"),
        ("image_size", 320.0, "image_size must be a whole number, got 320.0"),
        ("image_size", 64000, "image_size must be 32 to 1024, a multiple of 16, got 64000"),
        ("target_dim", 0, "target_dim must be 1 to 8192, got 0"),
        ("batch_size", 0, "batch_size must be 1 to 1024, got 0"),
        ("batch_size", -4, "batch_size must be 1 to 1024, got -4"),
        ("mask_dilation", -5, "mask_dilation must be 0 to 255, got -5"),
        ("crop_padding", -0.1, "crop_padding must be 0 to 1, got -0.1"),
        ("num_neighbors", 0, "num_neighbors must be 1 to 1024, got 0"),
        ("false_alarm_rate", 0.5, "false_alarm_rate must be between 0 and 0.5, both excluded, got 0.5"),
        ("false_alarm_rate", 0, "false_alarm_rate must be between 0 and 0.5, both excluded, got 0.0"),
        ("heatmap_sigma", -0.5, "heatmap_sigma must be 0 to 64, got -0.5"),
        ("calibration_folds", 1, "calibration_folds must be 2 to 100, got 1"),
        ("preprocess", "maybe", "preprocess must be one of auto, on, off, got 'maybe'"),
        ("num_workers", 0, "num_workers must be 1 to 64, got 0"),
        ("ivf_nprobe", 0, "ivf_nprobe must be 1 to 65536, got 0"),
        ("coreset_sampling_ratio", float("nan"), "coreset_sampling_ratio must be a finite number, got nan"),
        ("seed", -1, "seed must be 0 to 4_294_967_295, got -1"),
        ("max_image_pixels", 0, "max_image_pixels must be 1 to 1_073_741_824, got 0"),
        ("layers", ["layer2"], "layers must name 0 or 2 items, got ['layer2']"),
        ("layers", "layer2", "layers must be a list of names, got 'layer2'"),
        ("layers", ["_blocks.3", 7], "layers must be a list of names, got ['_blocks.3', 7]"),
        ("backbone", "resnet9000", "backbone must be one of wide_resnet50_2, efficientnet_lite0, got 'resnet9000'"),
        ("knn_index", 1, "knn_index must be text, got 1"),
        ("object_patches_only", 1, "object_patches_only must be true or false, got 1"),
        ("batch_size", True, "batch_size must be a whole number, got True"),
        ("weights_path", 5, "weights_path must be text, got 5"),
    ],
)
def test_every_setting_is_checked_for_type_and_range(setting, value, reason):
    with pytest.raises(ConfigError) as raised:
        Config.from_dict({setting: value})
    assert str(raised.value) == f"invalid settings: {reason}"


@pytest.mark.parametrize(
    "setting, value, choices",
    [
        ("knn_index", "hnsw", "flat, ivf"),
        ("segmentation_method", "watershed", "otsu, grabcut"),
        ("mask_fill", "convex", "contour, hull"),
        ("device", "mps", "auto, cpu, cuda"),
        ("backbone", "resnet18", "wide_resnet50_2, efficientnet_lite0"),
    ],
)
def test_a_choice_the_toolkit_does_not_implement_is_refused(setting, value, choices):
    """Only the choices the code acts on are offered: any other (knn_index hnsw would quietly search a
    flat index) is refused up front, and the message lists exactly the choices there are."""
    with pytest.raises(ConfigError) as raised:
        Config.from_dict({setting: value})
    assert str(raised.value) == f"invalid settings: {setting} must be one of {choices}, got {value!r}"


def test_all_bad_settings_are_named_in_one_message():
    with pytest.raises(ConfigError, match="target_dim .*; batch_size .*") as raised:
        Config.from_dict({"target_dim": 0, "batch_size": 0})
    assert "\n" not in str(raised.value)


def test_a_whole_number_for_a_decimal_setting_becomes_a_float():
    config = Config.from_dict({"heatmap_sigma": 4, "false_alarm_rate": 0.05})
    assert config.heatmap_sigma == 4.0 and isinstance(config.heatmap_sigma, float)
    assert Config.from_dict(config.to_dict()) == config


def test_a_model_file_percentile_is_read_as_the_false_alarm_rate_it_meant():
    """Model and YAML files that name threshold_percentile P keep working: it is the rate 1 - P/100."""
    assert Config.from_dict({"threshold_percentile": 99}).false_alarm_rate == 0.01  # not 0.010000000000000009
    assert Config.from_dict({"threshold_percentile": 95.0}).to_dict()["false_alarm_rate"] == 0.05
    assert "threshold_percentile" not in Config().to_dict()


def test_an_old_percentile_beside_the_new_rate_or_not_a_number_is_refused():
    """Both names at once is ambiguous: neither silently wins. A switch is no percentile."""
    with pytest.raises(ConfigError, match="unknown config key.*threshold_percentile"):
        Config.from_dict({"threshold_percentile": 99, "false_alarm_rate": 0.05})
    with pytest.raises(ConfigError, match="false_alarm_rate must be a finite number, got True"):
        Config.from_dict({"threshold_percentile": True})


def test_replace_goes_through_the_same_validation():
    with pytest.raises(ConfigError, match="target_dim"):
        Config().replace(target_dim=0)


@pytest.mark.parametrize("item", fields(Config), ids=lambda item: item.name)
def test_help_and_validation_come_from_the_same_rule(item):
    """Each bound the help text states is the bound validation enforces: on it passes, past it fails."""
    rule = rule_of(item)
    assert rule.help
    assert rule.describe() in help_text(item).replace("%%", "%")
    is_int = get_type_hints(Config)[item.name] is int
    step = 1 if is_int else 1e-6
    for bound, inside, outside in (
        (rule.minimum, rule.minimum, None if rule.minimum is None else rule.minimum - step),
        (rule.maximum, rule.maximum, None if rule.maximum is None else rule.maximum + step),
        (rule.above, None, rule.above),
        (rule.below, None, rule.below),
    ):
        if bound is None:
            continue
        if inside is not None and not (rule.multiple_of and inside % rule.multiple_of):
            Config.from_dict({item.name: int(inside) if is_int else float(inside)})
        with pytest.raises(ConfigError, match=item.name):
            Config.from_dict({item.name: int(outside) if is_int else float(outside)})
    for choice in rule.choices or ():
        Config.from_dict({item.name: choice})


def test_help_lists_every_setting_with_its_default_and_allowed_values():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = " ".join(parser.format_help().split())
    for item in fields(Config):
        assert "--" + item.name.replace("_", "-") in text
        assert " ".join(help_text(item).replace("%%", "%").split()) in text
    assert "(default 256; 32 to 1024, a multiple of 16)" in text
    assert "(default true, false for screw, metal_nut, custom)" in text  # clahe's category defaults
    assert "(default auto, on for screw; one of auto, on, off)" in text
    assert "one of flat, ivf" in text
    assert "(default 0.1; above 0, at most 1)" in text  # coreset_sampling_ratio: both its bounds
    assert "(default empty; 0 or 2 names)" in text  # layers


def documented_defaults() -> dict[str, object]:
    """Each setting of docs/configuration.md's table with its default there, read as a config file reads it."""
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    table = text.split("| setting | default | meaning |", 1)[1].split("\n\n", 1)[0]
    defaults: dict[str, object] = {}
    for row in table.splitlines()[2:]:
        names_cell, default_cell = row.split("|")[1:3]
        names = re.findall(r"`(\w+)`", names_cell)
        values = re.split(r" / |, ", re.sub(r"\(.*?\)", "", default_cell).replace("`", "").strip())
        assert len(names) == len(values), row
        for name, value in zip(names, values):
            defaults[name] = {"on": True, "off": False, "none": None}.get(value, yaml_value(value))
    return defaults


def test_the_defaults_the_documentation_states_are_the_defaults() -> None:
    """docs/configuration.md's table is what a user reads to know a setting's value when it is not set."""
    documented = documented_defaults()
    assert len(documented) >= 20
    assert {name: getattr(Config(), name) for name in documented} == documented


def test_bad_flag_values_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="false_alarm_rate must be between 0 and 0.5, both excluded, got 1.5"):
        config_from_args(parse(["--false-alarm-rate", "1.5"]))
    with pytest.raises(ConfigError, match="clahe must be true or false, got 'no'"):
        from_yaml(tmp_path, 'clahe: "no"\n')


def test_yaml_python_tags_run_nothing(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match="not valid YAML"):
        from_yaml(tmp_path, f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    assert not marker.exists()


# ----------------------------------------------------------------------------- run_cli
def test_run_cli_turns_expected_failures_into_one_line(capsys):
    def disk_full() -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/model.pkl")

    assert run_cli(disk_full) == 2
    assert capsys.readouterr().err == "error: /data/model.pkl: No space left on device\n"
    assert run_cli(lambda: fail("the folder has no photos")) == 2
    assert capsys.readouterr().err == "error: the folder has no photos\n"

    def no_file_named() -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    assert run_cli(no_file_named) == 2
    assert capsys.readouterr().err == "error: No space left on device\n"


def test_run_cli_says_interrupted_and_exits_130_on_ctrl_c(capsys: pytest.CaptureFixture[str]) -> None:
    """130 is what a shell script sees of a command stopped by Ctrl-C (128 + SIGINT)."""
    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_cli(interrupted) == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("content, reason", [
    (b"seed: !!python/object/apply:os.system ['true']\n",
     "line 1, column 7: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    (b"layers: [a\nseed: 2\n", "line 2, column 5: expected ',' or ']', but got ':'"),
    (b"backbone: caf\xe9\n", "position 13: byte 0xE9 is not utf-8: invalid continuation byte"),  # Latin-1
    (b"backbone: \x07\n", "position 10: character U+0007: special characters are not allowed"),
])
def test_a_yaml_file_yaml_cannot_read_gives_the_parsers_problem_and_where_in_one_line(
    content, reason, tmp_path, capsys
):
    """Was PyYAML's message cut to a few dozen characters mid-word, a Latin-1 byte reading as '#x00...' (a NUL)."""
    path = tmp_path / "settings.yaml"
    path.write_bytes(content)
    assert run_cli(lambda: load_yaml(path) and 0) == 2
    assert capsys.readouterr().err == f"error: {path}: not valid YAML ({reason})\n"


def test_run_cli_lets_a_bug_show_its_traceback():
    def bug() -> int:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(bug)


LAUGHS = "a: &a [ha, ha, ha, ha, ha, ha, ha, ha, ha]\n" + "".join(
    f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]\n" for previous, name in zip("abcdefgh", "bcdefghi")
) + "layers: *i\n"


@pytest.mark.parametrize("text, reason", [
    (LAUGHS, "holds more than 1_000_000 values once its shared references are written out"),
    ("layers: " + "[" * 300_000 + "]" * 300_000 + "\n", "nested too deeply to be a config file"),
], ids=["shared-references", "deep-nesting"])
def test_a_small_yaml_file_that_expands_without_bound_is_one_line(tmp_path, text, reason):
    """A billion-laughs YAML (1 KB, 387 million items written out) or 300,000-deep brackets: one line, at once."""
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    code = f"from config import load_yaml, run_cli\nimport sys\nsys.exit(run_cli(lambda: load_yaml({str(path)!r}) and 0))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {path}") and reason in line


def test_a_small_yaml_file_repeating_a_long_text_counts_every_character_written_out(tmp_path: Path) -> None:
    """A 4 KB file naming one 1,000-character text a thousand times is a million characters once written out."""
    path = tmp_path / "repeats.yaml"
    path.write_text(f"text: &text {'a' * 1000}\nlayers: [{', '.join(['*text'] * 1000)}]\n")
    with pytest.raises(ValueError, match="holds more than 1_000_000 values once its shared references are written out"):
        load_yaml(path)


def test_the_limits_the_refusals_name_are_themselves_accepted(tmp_path: Path) -> None:
    """'more than 1_048_576 bytes', 'more than N values', 'nested more than N deep': a file right at a limit is read."""
    path = tmp_path / "settings.yaml"
    path.write_text("#" * (MAX_YAML_BYTES - 1) + "\n")
    assert load_yaml(path) == {}
    check_plain_data(["a", "b"], "settings", max_items=5)  # the list and two texts of one character: 1 + 2 + 2
    with pytest.raises(ValueError, match="holds more than 4 values"):
        check_plain_data(["a", "b"], "settings", max_items=4)
    check_plain_data([[[]]], "settings", max_depth=3)
    with pytest.raises(ValueError, match="nested more than 2 deep"):
        check_plain_data([[[]]], "settings", max_depth=2)


def test_an_error_never_formats_an_unbounded_value():
    with pytest.raises(ConfigError) as raised:
        Config.from_dict({"backbone": "x" * 10_000_000, "layers": [["deep"] * 1000] * 1000})
    assert len(str(raised.value)) < 600


def test_a_setting_given_twice_in_yaml_is_an_error_not_one_value_dropped(tmp_path):
    """A BOM and CRLF line ends are read as YAML reads them; a merged mapping may still override its keys."""
    with pytest.raises(ValueError, match=r"'false_alarm_rate' is given twice \(line 3\)"):
        from_yaml(tmp_path, "\ufefffalse_alarm_rate: 0.01\r\nimage_size: 256\r\nfalse_alarm_rate: 0.001\r\n")
    assert from_yaml(tmp_path, "\ufeffimage_size: 256\r\n").image_size == 256
    merged = from_yaml(tmp_path, "<<: {image_size: 128, seed: 3}\nimage_size: 256\n")
    assert (merged.image_size, merged.seed) == (256, 3)


def test_printable_escapes_control_characters_and_keeps_every_other_character():
    """What a table or an error line prints of a photo's name: one line, no terminal commands."""
    assert printable("a\nb\x1b[2Jc\td\x7f\x85é\udcff.png") == "a\\nb\\x1b[2Jc\\td\\x7f\\x85é\udcff.png"
    # the marks that turn the text's direction: a name would show the score and verdict after it reversed
    assert printable("rtl\u202egnp.exe\u2066\u200f\u061c.png") == "rtl\\u202egnp.exe\\u2066\\u200f\\u061c.png"


def test_an_error_line_stays_one_line_whatever_the_file_name(capsys):
    def failing() -> int:
        raise UserError("frame\n1 scored, 0 anomalous.png: not a readable image")

    assert run_cli(failing) == 2
    assert capsys.readouterr().err == "error: frame\\n1 scored, 0 anomalous.png: not a readable image\n"
