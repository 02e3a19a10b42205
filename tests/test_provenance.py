"""A model file or an ONNX export whose provenance does not match is refused, not scored wrongly."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from models.onnx_extractor import OnnxExtractorError, OnnxFeatureExtractor, export_metadata
from models.model_file import ModelFileError
from models.patchcore import PatchCore
from evaluation.mvtec import train_images


def with_weights_identity(model: PatchCore, path: Path, identity: str) -> Path:
    """The model saved to ``path`` as if it had been fitted with the backbone weights ``identity``."""
    model.save(path)
    state = pickle.loads(path.read_bytes())  # plain data only: dicts, strings, numbers, bytes
    state["weights_identity"] = identity
    path.write_bytes(pickle.dumps(state))
    return path


def test_a_model_fitted_with_other_backbone_weights_is_refused(fitted_model, small_screw_dir, tmp_path, capsys):
    import inference
    from config import run_cli

    photo = train_images(small_screw_dir)[0]
    same = PatchCore.load(with_weights_identity(fitted_model, tmp_path / "same.pkl", fitted_model.weights_identity))
    assert same.predict([photo])[0].score == pytest.approx(fitted_model.predict([photo])[0].score)
    other = with_weights_identity(fitted_model, tmp_path / "other.pkl", "sha256:fine-tuned-elsewhere")
    with pytest.raises(ModelFileError, match="backbone weights differ"):
        PatchCore.load(other).predict([photo])
    assert run_cli(lambda: inference.main(["--model", str(other), "--image", str(photo), "--quiet"])) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {other}: ") and "weights differ" in line


def test_a_model_file_fitted_on_no_photos_is_refused(fitted_model, tmp_path):
    fitted_model.save(tmp_path / "model.pkl")
    state = pickle.loads((tmp_path / "model.pkl").read_bytes())
    state["n_train"] = 0
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(state))
    with pytest.raises(ModelFileError, match="n_train"):
        PatchCore.load(tmp_path / "model.pkl")


def tiny_graph(path: Path, metadata: dict[str, str]) -> Path:
    """A valid ONNX graph named as the extractor's (``images`` in, ``features`` out) carrying ``metadata``."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node("Cast", ["images"], ["features"], to=TensorProto.FLOAT)
    graph = helper.make_graph(
        [node], "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, [None, None, None, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, None, None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    return path


def test_an_onnx_graph_without_its_settings_metadata_is_refused_for_any_model(fitted_model, tmp_path):
    config = fitted_model.config
    complete = export_metadata(config, fitted_model.weights_identity)
    OnnxFeatureExtractor(tiny_graph(tmp_path / "complete.onnx", complete), config)  # the matching export opens
    with pytest.raises(OnnxExtractorError, match="differ"):
        OnnxFeatureExtractor(tiny_graph(tmp_path / "bare.onnx", {}), config)
    for key in set(complete) - {"fine_aggregation"}:
        partial = {name: value for name, value in complete.items() if name != key}
        with pytest.raises(OnnxExtractorError, match=key):
            OnnxFeatureExtractor(tiny_graph(tmp_path / f"without_{key}.onnx", partial), config)


def test_an_onnx_graph_from_before_fine_aggregation_was_recorded_serves_the_3x3_models_alone(fitted_model, tmp_path):
    """Exports written before the setting existed all averaged the fine stage over 3x3."""
    config = fitted_model.config
    older = {name: value for name, value in export_metadata(config, fitted_model.weights_identity).items()
             if name != "fine_aggregation"}
    graph = tiny_graph(tmp_path / "older.onnx", older)
    OnnxFeatureExtractor(graph, config.replace(fine_aggregation=3))
    with pytest.raises(OnnxExtractorError, match=r"\(fine_aggregation differ\)"):
        OnnxFeatureExtractor(graph, config.replace(fine_aggregation=1))


@pytest.mark.parametrize("setting, value", [("backbone", "wide_resnet50_2"), ("image_size", 96), ("target_dim", 64),
                                            ("layers", ["_blocks.2", "_blocks.10"]), ("fine_aggregation", 1)])
def test_an_onnx_graph_exported_for_other_settings_is_refused(fitted_model, tmp_path, setting, value):
    config = fitted_model.config
    assert getattr(config, setting) != value
    exported_for = export_metadata(config.replace(**{setting: value}), fitted_model.weights_identity)
    with pytest.raises(OnnxExtractorError, match=setting):
        OnnxFeatureExtractor(tiny_graph(tmp_path / "other.onnx", exported_for), config)


def test_an_onnx_export_of_other_weights_is_refused_beside_the_model(fitted_model, small_screw_dir, tmp_path):
    model_file = tmp_path / "line2.pkl"
    fitted_model.save(model_file)
    metadata = export_metadata(fitted_model.config, "sha256:other-weights")
    tiny_graph(model_file.with_suffix(".onnx"), metadata)
    model = PatchCore.load(model_file, runtime="onnx")
    with pytest.raises(ModelFileError, match="backbone weights differ"):
        model.predict([train_images(small_screw_dir)[0]])


def test_a_bank_wider_than_its_target_dim_is_refused(fitted_model, tmp_path):
    """lite0 gives 152 features per patch, reduced to target_dim when that is smaller."""
    fitted_model.save(tmp_path / "model.pkl")
    state = pickle.loads((tmp_path / "model.pkl").read_bytes())
    state["config"]["target_dim"] = 64
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(state))
    with pytest.raises(ModelFileError, match="152 features per patch, but efficientnet_lite0 with target_dim 64 gives 64"):
        PatchCore.load(tmp_path / "model.pkl")


def test_runtime_auto_scores_through_the_export_beside_the_model_and_torch_without_one(
    fitted_model, small_screw_dir, tmp_path
):
    """The export beside the model decides (here one of other weights, so using it is refused)."""
    model_file = tmp_path / "line4.pkl"
    fitted_model.save(model_file)
    photo = train_images(small_screw_dir)[0]
    assert PatchCore.load(model_file).predict([photo])[0].score == pytest.approx(fitted_model.predict([photo])[0].score)
    tiny_graph(tmp_path / "line4.onnx", export_metadata(fitted_model.config, "sha256:other-weights"))
    with pytest.raises(ModelFileError, match="backbone weights differ"):
        PatchCore.load(model_file).predict([photo])
    assert PatchCore.load(model_file, runtime="torch").predict([photo])[0].score > 0


def test_a_link_to_a_model_file_scores_through_the_export_beside_the_file_it_points_to(
    fitted_model, small_screw_dir, tmp_path
):
    """A line's current.pkl links to the model in use elsewhere: runtime auto finds that model's export beside
    the file linked to (here one of other weights, so using it is refused), not beside the link."""
    (tmp_path / "models").mkdir()
    model_file = tmp_path / "models" / "line4.pkl"
    fitted_model.save(model_file)
    tiny_graph(tmp_path / "models" / "line4.onnx", export_metadata(fitted_model.config, "sha256:other-weights"))
    (tmp_path / "current.pkl").symlink_to(model_file)
    with pytest.raises(ModelFileError, match="backbone weights differ"):
        PatchCore.load(tmp_path / "current.pkl").predict([train_images(small_screw_dir)[0]])
