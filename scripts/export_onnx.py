"""Export a model's feature extractor to ONNX, so the line PC can score without torch.

    python scripts/export_onnx.py --model saved_models/patchcore_screw.pkl

writes ``saved_models/patchcore_screw.onnx``: the whole image-to-patch-features graph (input
normalisation, both backbone stages, 3x3 aggregation, upsampling, channel reduction) as one ONNX
graph taking (B, image_size, image_size, 3) uint8 photos, any batch size. ``inference.py`` and
``serve.py`` then score through ONNX Runtime automatically (``--runtime`` to choose). The export is
checked against torch on a few random photos before it is written.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import UserError, run_cli  # noqa: E402
from models.backend import onnx_path_for  # noqa: E402
from models.onnx_extractor import OnnxFeatureExtractor  # noqa: E402
from output_files import check_not_an_input, check_writable, write_atomically  # noqa: E402

CHECK_TOLERANCE = 1e-3  # largest difference from torch, relative to the largest feature value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model file written by train.py")
    parser.add_argument("--output", type=Path, help="a file ending in .onnx; default: the model path with suffix .onnx")
    return parser.parse_args(argv)


def export(model_path: Path, output: Path) -> float:
    """Write the ONNX graph of the model's extractor to ``output``; return its largest relative
    difference from the torch extractor on random photos."""
    import torch

    from models.feature_extractor import FeatureExtractor
    from models.model_file import ModelFileError
    from models.patchcore import PatchCore

    model = PatchCore.load(model_path, device="cpu", runtime="torch")
    extractor = FeatureExtractor(model.config)
    if extractor.weights_identity != model.weights_identity:
        raise ModelFileError(
            f"the backbone weights differ from those the model was fitted with "
            f"({extractor.weights_identity} != {model.weights_identity})"
        )
    size = model.config.image_size
    photos = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as scratch:
        graph_path = Path(scratch) / "extractor.onnx"
        graph = extractor.graph()
        if graph is None:
            raise UserError(f"{model.config.backbone} at target_dim {model.config.target_dim} does not export to ONNX")
        graph_path.write_bytes(graph)
        with torch.inference_mode():  # the torch module itself, not the extractor (which may run ONNX already)
            expected = extractor.module(torch.from_numpy(photos)).numpy()
        got = OnnxFeatureExtractor(graph_path, model.config)(photos)
        difference = float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12))
        if difference > CHECK_TOLERANCE:
            raise RuntimeError(f"the ONNX graph differs from torch by {difference:.2e} (relative); not written")
        write_atomically(output, graph)
    return difference


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = args.output or onnx_path_for(args.model)
    check_not_an_input(output, [args.model], "the model file to export")
    if args.model.exists():  # (a missing model is reported at once; the check would create its folder)
        check_writable(output)  # before loading, exporting and checking the graph, not after
    if output.suffix != ".onnx":  # a .pkl name may be the model file itself, or the next one saved there
        raise UserError(f"{output}: the export's name must end in .onnx")
    difference = export(args.model, output)
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB; largest difference from torch "
          f"{difference:.1e} relative)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
