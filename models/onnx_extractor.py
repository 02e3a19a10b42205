"""The ONNX Runtime back end: the exported feature extractor, run without importing torch.

``scripts/export_onnx.py`` writes ``<model>.onnx`` beside a model file; its metadata records what
the graph was exported from (backbone, weights identity, input size, layers, target_dim), so a
graph that does not match the model file is refused instead of giving wrong scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from config import Config, UserError

INPUT_NAME = "images"
OUTPUT_NAME = "features"


class OnnxExtractorError(UserError, ValueError):
    """An ONNX export that cannot be used with this model file; the message says why."""


def export_metadata(config: Config, weights_identity: str) -> dict[str, str]:
    """What an exported graph must agree on with the model file that scores through it."""
    return {
        "backbone": config.backbone,
        "weights_identity": weights_identity,
        "image_size": str(config.image_size),
        "layers": ",".join(config.layers),
        "target_dim": str(config.target_dim),
    }


class OnnxFeatureExtractor:
    """Same interface as the torch ``FeatureExtractor``: (B, H, W, 3) uint8 -> (B, H/8, W/8, D) float32."""

    device = "cpu"

    def __init__(self, path: str | Path, config: Config) -> None:
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise OnnxExtractorError(f"{path}: no ONNX export here; write it with scripts/export_onnx.py --model M")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initialisers are noise to a user
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for a bad file
            raise OnnxExtractorError(f"{path}: not a usable ONNX model ({error})") from None
        recorded = self.session.get_modelmeta().custom_metadata_map
        self.weights_identity = recorded.get("weights_identity", "")
        expected = export_metadata(config, self.weights_identity)
        differing = sorted(key for key, value in expected.items() if recorded.get(key) != value)
        if differing:
            raise OnnxExtractorError(
                f"{path}: exported for other settings than this model ({', '.join(differing)} differ); "
                "export it again with scripts/export_onnx.py"
            )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)})[0]
