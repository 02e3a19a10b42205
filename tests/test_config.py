from __future__ import annotations

import argparse

import pytest

from config import Config, add_config_arguments, config_from_args


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


def test_unknown_yaml_key_is_an_error(tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("image_sise: 320\n")
    with pytest.raises(ValueError, match="unknown config key.*image_sise"):
        config_from_args(parse(["--config", str(settings)]))


def test_yaml_must_be_a_mapping(tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        config_from_args(parse(["--config", str(settings)]))


@pytest.mark.parametrize(
    "bad", [{"backbone": "resnet9000"}, {"coreset_sampling_ratio": 0}, {"image_size": 100}, {"device": "tpu"}]
)
def test_invalid_values_are_refused(bad):
    with pytest.raises(ValueError):
        Config(**bad)


def test_round_trip_through_dict():
    config = Config(seed=5, layers=["layer1", "layer2"])
    assert Config.from_dict(config.to_dict()) == config
