"""The light runtime: an ONNX export of the feature extractor scores like torch, without importing torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.onnx_extractor import OnnxExtractorError
from models.model_file import ModelFileError
from models.patchcore import PatchCore
from conftest import WITHOUT_FITTING_PACKAGES, pretend_torch_is_not_installed, small_config
from evaluation.mvtec import load_test_split, train_images

ROOT = Path(__file__).resolve().parents[1]

# Scores every photo given on the command line through the model's default back end (auto: the
# ONNX export beside it), then reports the scores and whether torch was ever imported.
SCORE_WITHOUT_TORCH = """
import json, sys
from models.patchcore import PatchCore
model = PatchCore.load(sys.argv[1])
scores = [p.score for p in model.predict(sys.argv[2:])]
print(json.dumps({"scores": scores, "torch_imported": "torch" in sys.modules}))
"""


@pytest.fixture(scope="module")
def exported_model(fitted_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "patchcore_small.pkl"
    fitted_model.save(path)
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_onnx.py"), "--model", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    assert path.with_suffix(".onnx").is_file()
    return path


def test_onnx_scores_equal_torch_on_every_screw_test_photo_without_importing_torch(
    exported_model, fitted_model, screw_dir
):
    photos = [str(sample.path) for sample in load_test_split(screw_dir)]
    assert len(photos) == 160  # the whole MVTec AD screw test split
    completed = subprocess.run(
        [sys.executable, "-c", SCORE_WITHOUT_TORCH, str(exported_model), *photos],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["torch_imported"] is False
    torch_scores = np.array([p.score for p in fitted_model.predict(photos)])
    onnx_scores = np.array(result["scores"])
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=1e-3)


@pytest.mark.parametrize("change", ["image_size", "fine_aggregation"])
def test_an_export_for_other_settings_is_refused(exported_model, fitted_model, small_screw_dir, tmp_path, change):
    """A graph exported for another input size or another fine-stage aggregation would give other
    features than the bank holds: refused, naming the setting."""
    other = tmp_path / "other_settings.pkl"
    config = fitted_model.config
    changed = PatchCore(config.replace(image_size=config.image_size + 16) if change == "image_size"
                        else config.replace(fine_aggregation=1))
    changed.memory_bank, changed.calibration_scores = fitted_model.memory_bank, fitted_model.calibration_scores
    changed.threshold, changed.weights_identity = fitted_model.threshold, fitted_model.weights_identity
    changed.n_train = fitted_model.n_train
    changed.save(other)
    shutil.copy(exported_model.with_suffix(".onnx"), other.with_suffix(".onnx"))
    model = PatchCore.load(other, runtime="onnx")
    with pytest.raises(OnnxExtractorError, match=f"\\({change} differ\\)"):
        model.predict([load_test_split(small_screw_dir)[0].path])


def test_an_export_from_before_fine_aggregation_was_recorded_scores_its_model(exported_model, tmp_path):
    """Graphs exported before the setting existed all averaged the fine stage over 3x3: such a graph
    still serves a model with the default, and gives the same scores."""
    import onnx

    graph = onnx.load(exported_model.with_suffix(".onnx"))
    kept = [prop for prop in graph.metadata_props if prop.key != "fine_aggregation"]
    assert len(kept) == len(graph.metadata_props) - 1
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    older = tmp_path / exported_model.name
    shutil.copy(exported_model, older)
    onnx.save(graph, older.with_suffix(".onnx"))
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    scores = [PatchCore.load(path, runtime="onnx").predict([image])[0].score for path in (older, exported_model)]
    assert scores[0] == pytest.approx(scores[1])


def test_runtime_onnx_without_an_export_says_how_to_make_one(fitted_model, tmp_path):
    path = tmp_path / "not_exported.pkl"
    fitted_model.save(path)
    path.with_suffix(".onnx").unlink()  # as from a GPU fit's copy, or a file from before exports were kept
    with pytest.raises(ModelFileError, match="export_onnx.py"):
        PatchCore.load(path, runtime="onnx")
    completed = subprocess.run(
        [sys.executable, "inference.py", "--model", str(path), "--image", "x.png", "--runtime", "onnx"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert completed.returncode == 2
    assert completed.stderr.startswith("error:") and "export_onnx.py" in completed.stderr


def test_a_saved_model_keeps_the_graph_its_bank_was_built_through_beside_it(fitted_model, small_screw_dir, tmp_path):
    path = tmp_path / "model.pkl"
    assert fitted_model.save(path) == path.with_suffix(".onnx")
    loaded = PatchCore.load(path)  # runtime auto: the export beside it
    photos = [str(sample.path) for sample in load_test_split(small_screw_dir)]
    np.testing.assert_array_equal([p.score for p in loaded.predict(photos)], [p.score for p in fitted_model.predict(photos)])
    assert type(loaded._extractor).__name__ == "OnnxFeatureExtractor"
    before = path.with_suffix(".onnx").stat().st_mtime_ns
    loaded.save(path)  # the same graph is not written again
    assert path.with_suffix(".onnx").stat().st_mtime_ns == before


class _NetworkThatDoesNotExport:
    """What a backbone the exporter cannot write (wide_resnet50_2 at target_dim 1024) gives a model to save."""

    def graph(self) -> None:
        return None


def test_runtime_auto_runs_the_network_on_a_gpu_through_torch_and_on_the_cpu_through_the_export(
    exported_model, monkeypatch
):
    """ONNX Runtime runs on the CPU only here: where torch and a GPU are present, auto keeps the GPU,
    unless the model is set to the CPU; without a GPU (a line PC), even a model fitted with cuda scores
    through its export."""
    import models.backend as backend

    export = exported_model.with_suffix(".onnx")
    for gpu, device, runtime in [(True, "auto", "torch"), (True, "cuda", "torch"), (True, "cpu", "onnx"),
                                 (False, "auto", "onnx"), (False, "cuda", "onnx")]:
        monkeypatch.setattr(backend, "gpu_present", lambda gpu=gpu: gpu)
        assert backend.resolve_runtime("auto", export, device) == runtime, (gpu, device)
        assert PatchCore.load(exported_model, device=device).why_learning_needs_torch() == (
            None if runtime == "onnx" else "the network runs through torch here (--runtime torch, or on a GPU)")
    assert backend.resolve_runtime("onnx", export, "cuda") == "onnx"  # as asked


def test_a_line_pc_with_an_nvidia_driver_but_no_torch_scores_through_the_export(
    exported_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU driver alone is no GPU back end: without torch (requirements-runtime.txt) auto must not pick
    torch, which is not there to import, but the export beside the model."""
    import models.backend as backend

    is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: str(self) == "/proc/driver/nvidia/version" or is_file(self))
    export = exported_model.with_suffix(".onnx")
    assert backend.resolve_runtime("auto", export, "auto") == "torch"  # the driver and torch: the GPU
    pretend_torch_is_not_installed(monkeypatch)
    assert not backend.gpu_present()
    assert backend.resolve_runtime("auto", export, "auto") == "onnx"


def test_the_torch_back_end_without_torch_is_one_error_line_saying_how_to_score_through_onnx(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a line PC ``--runtime torch`` (or a model without its export) must end in the remedy, not an
    ImportError traceback."""
    from config import run_cli
    from models.backend import open_extractor

    monkeypatch.setitem(sys.modules, "models.feature_extractor", None)  # its import of torch fails
    assert run_cli(lambda: open_extractor(small_config(), "torch")) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: the torch back end is not installed") and "export_onnx.py" in line


def test_a_misspelt_runtime_is_refused_rather_than_run_through_torch() -> None:
    """``runtime="onxx"`` from the API or a service setting would otherwise quietly score through torch."""
    from models.backend import resolve_runtime

    with pytest.raises(ValueError, match="runtime must be one of auto, torch, onnx, got 'onxx'"):
        resolve_runtime("onxx", None, "cpu")


def test_a_link_to_a_model_file_scores_through_the_export_beside_the_file_it_points_to(exported_model, tmp_path):
    """A line points its service at ``current.pkl``, a link to the fit it runs: that fit's export is found."""
    (tmp_path / "current.pkl").symlink_to(exported_model)
    linked = PatchCore.load(tmp_path / "current.pkl")
    assert linked.onnx_file == exported_model.with_suffix(".onnx") and linked.why_learning_needs_torch() is None
    (tmp_path / "current.onnx").symlink_to(exported_model.with_suffix(".onnx"))  # one beside the link comes first
    assert PatchCore.load(tmp_path / "current.pkl").onnx_file == tmp_path / "current.onnx"


def test_a_model_file_named_like_its_export_is_neither_saved_nor_read(fitted_model, exported_model, tmp_path):
    """``m.onnx`` as a model file would be written over its own export, then read as the network."""
    from config import UserError

    with pytest.raises(UserError, match="a model file cannot end in .onnx"):
        fitted_model.save(tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
    with pytest.raises(UserError, match="a model file cannot end in .onnx"):
        PatchCore.load(exported_model.with_suffix(".onnx"))


def test_a_model_whose_network_does_not_export_leaves_no_other_models_export_beside_it(fitted_model, tmp_path):
    path = tmp_path / "model.pkl"
    fitted_model.save(path)
    replacing = fitted_model.copy()
    replacing._extractor = _NetworkThatDoesNotExport()
    assert replacing.save(path) is None
    assert not path.with_suffix(".onnx").exists()
    assert PatchCore.load(path).why_learning_needs_torch() is not None


def test_the_line_pc_set_scores_a_folder_with_report_csv_and_overlays(exported_model, small_screw_dir, tmp_path):
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-c", WITHOUT_FITTING_PACKAGES, str(ROOT / "inference.py"), "--model", str(exported_model),
         "--dir", str(small_screw_dir / "test"), "--report", "--csv", str(out / "results.csv"), "--visualize",
         "--output-dir", str(out), "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    photos = len(load_test_split(small_screw_dir))
    assert len((out / "results.csv").read_text().splitlines()) == photos + 1
    assert (out / "batch_report.html").is_file() and len(list((out / "heatmaps").rglob("*.png"))) == photos
    verified = subprocess.run([sys.executable, "-c", WITHOUT_FITTING_PACKAGES, str(ROOT / "verify_setup.py"),
                               "--runtime"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert verified.returncode == 0, verified.stdout[-2000:]


def test_the_export_refuses_an_unwritable_output_before_exporting(tmp_path, monkeypatch, capsys):
    import scripts.export_onnx as script
    from config import run_cli

    (tmp_path / "model.pkl").write_bytes(b"")
    monkeypatch.setattr(script, "export", lambda *args: pytest.fail("no export may start"))
    argv = ["--model", str(tmp_path / "model.pkl"), "--output", str(tmp_path)]
    assert run_cli(lambda: script.main(argv)) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: is a folder; give a file name"


@pytest.mark.parametrize("spelling", ["the model's name", "through a link to its folder", "the file its link names",
                                      "a .pkl name"])
def test_the_export_is_never_written_over_the_model_file(tmp_path, monkeypatch, capsys, spelling):
    """--output M.pkl wrote the graph over the model file: the fit was gone."""
    import scripts.export_onnx as script
    from config import run_cli

    (tmp_path / "v3.pkl").write_bytes(b"the fit")
    (tmp_path / "current.pkl").symlink_to(tmp_path / "v3.pkl")
    (tmp_path / "folder").symlink_to(tmp_path)
    output = {"the model's name": "current.pkl", "through a link to its folder": "folder/current.pkl",
              "the file its link names": "v3.pkl", "a .pkl name": "other.pkl"}[spelling]
    monkeypatch.setattr(script, "export", lambda *args: pytest.fail("no export may start"))
    argv = ["--model", str(tmp_path / "current.pkl"), "--output", str(tmp_path / output)]
    assert run_cli(lambda: script.main(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / output}: ") and err.count("\n") == 1
    assert (tmp_path / "v3.pkl").read_bytes() == b"the fit" and not (tmp_path / "other.pkl").exists()


def test_the_line_pc_set_learns_confirmed_good_photos_like_the_full_set(fitted_model, screw_dir, tmp_path):
    path = tmp_path / "model.pkl"
    fitted_model.save(path)
    good = tmp_path / "confirmed"  # photos the model was not fitted on
    good.mkdir()
    for image in train_images(screw_dir)[-4:]:
        (good / image.name).symlink_to(image.resolve())
    completed = subprocess.run(
        [sys.executable, "-c", WITHOUT_FITTING_PACKAGES, str(ROOT / "train.py"), "--add-good", "--model", str(path),
         "--data-dir", str(good), "--output", str(tmp_path / "added.pkl"), "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    with_torch = fitted_model.copy()
    with_torch.add_good(sorted(good.iterdir()), progress=False)
    added = PatchCore.load(tmp_path / "added.pkl")
    assert len(added.memory_bank) > len(fitted_model.memory_bank)
    np.testing.assert_array_equal(added.memory_bank, with_torch.memory_bank)
    assert added.threshold == with_torch.threshold


def test_a_save_replaces_an_export_of_another_network_beside_it(fitted_model, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"the export an earlier model left here")
    fitted_model.save(tmp_path / "model.pkl")
    fitted_model.save(tmp_path / "reference.pkl")
    assert (tmp_path / "model.onnx").read_bytes() == (tmp_path / "reference.onnx").read_bytes()


def test_a_save_whose_export_cannot_be_written_leaves_the_model_file_as_it_was(fitted_model, tmp_path):
    """The export is written first: a model file never lies beside another network's export, or none."""
    from output_files import OutputError

    path = tmp_path / "model.pkl"
    path.write_bytes(b"the model file before")
    path.with_suffix(".onnx").mkdir()  # where the export goes, taken
    with pytest.raises(OutputError, match="model.onnx: is a folder"):
        fitted_model.save(path)
    assert path.read_bytes() == b"the model file before"


def test_a_model_whose_network_does_not_export_is_saved_without_one_and_the_export_script_says_why(
    small_screw_dir, tmp_path, capsys
):
    """lite0 pooled from 152 features down to 64 does not export (models/feature_extractor.exports_to_onnx)."""
    import scripts.export_onnx as script
    from config import run_cli
    from conftest import small_config

    model = PatchCore(small_config(target_dim=64))
    model.fit(train_images(small_screw_dir)[:4], progress=False)
    assert model._extractor.graph() is None
    path = tmp_path / "model.pkl"
    assert model.save(path) is None and not path.with_suffix(".onnx").exists()
    assert run_cli(lambda: script.main(["--model", str(path)])) == 2
    assert "efficientnet_lite0 at target_dim 64 does not export to ONNX" in capsys.readouterr().err
    assert not path.with_suffix(".onnx").exists()


def test_an_export_that_cannot_be_read_is_reported_as_unreadable(exported_model, fitted_model, monkeypatch):
    """Not as "not a usable ONNX model": exporting again would not help, the file's permissions would."""
    from models.onnx_extractor import OnnxFeatureExtractor

    read_bytes = Path.read_bytes

    def refused(self):
        if self.suffix == ".onnx":
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refused)
    with pytest.raises(OnnxExtractorError, match=r"cannot be read \(Permission denied\)"):
        OnnxFeatureExtractor(exported_model.with_suffix(".onnx"), fitted_model.config)


def test_an_export_missing_when_the_network_is_opened_names_the_script_that_writes_it(tmp_path: Path) -> None:
    """A model opens its network on first use, and the benchmark opens an export by name: a missing file
    must say how to write it, not only that it cannot be read."""
    from models.onnx_extractor import OnnxFeatureExtractor

    with pytest.raises(OnnxExtractorError, match="no ONNX export here; write it with scripts/export_onnx.py"):
        OnnxFeatureExtractor(tmp_path / "model.onnx", small_config())
