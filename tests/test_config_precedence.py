"""Which value a setting gets: per-category defaults under the YAML file under the flags, and the
older true/false spelling of ``preprocess``."""

from __future__ import annotations

import argparse

import pytest

from config import Config, add_config_arguments, config_from_args


def settings_for(argv: list[str], category: str | None) -> Config:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv), category)


def test_screw_gets_its_measured_defaults_and_any_other_folder_auto_without_clahe():
    screw = settings_for([], "screw")
    assert (screw.preprocess, screw.clahe) == ("on", False)
    for category in ("custom", "metal_nut", None):
        other = settings_for([], category)
        assert (other.preprocess, other.clahe) == ("auto", False)
    assert Config().clahe is True  # the dataclass default the categories override


def test_a_yaml_file_overrides_the_category_and_a_flag_overrides_the_yaml(tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("clahe: true\npreprocess: auto\n")
    from_yaml = settings_for(["--config", str(settings)], "screw")
    assert (from_yaml.preprocess, from_yaml.clahe) == ("auto", True)
    flagged = settings_for(["--config", str(settings), "--clahe", "false", "--preprocess", "off"], "screw")
    assert (flagged.preprocess, flagged.clahe) == ("off", False)


@pytest.mark.parametrize("spelling, mode", [("true", "on"), ("yes", "on"), (True, "on"), (1, "on"), ("false", "off"),
                                            ("no", "off"), (False, "off"), (0, "off"), ("AUTO", "auto")])
def test_preprocess_takes_the_older_true_false_spelling(spelling, mode):
    assert Config(preprocess=spelling).preprocess == mode
    assert Config.from_dict({"preprocess": spelling}).preprocess == mode
