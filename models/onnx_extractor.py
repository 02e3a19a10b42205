"""The ONNX Runtime back end: the exported feature extractor, run without importing torch.

``PatchCore.save`` (and ``scripts/export_onnx.py``) write ``<model>.onnx`` beside a model file; its
metadata records what the graph was exported from (backbone, weights identity, input size, layers,
target_dim), so a graph that does not match the model file is refused instead of giving wrong scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from config import Config, UserError
from models.backbones import CPU_MICRO_BATCH

INPUT_NAME = "images"
OUTPUT_NAME = "features"
OPSET = 17  # the ONNX operator set graphs are exported in


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
        "fine_aggregation": str(config.fine_aggregation),
    }


def onnxruntime_installed() -> bool:
    """Whether ONNX Runtime imports here (the full and the runtime-only environments both list it)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_session(graph: str | bytes) -> Any:
    """An ONNX Runtime CPU session over a graph file or in-memory graph, set up for the line PC.

    Its worker threads sleep while waiting rather than spin: photos are decoded and preprocessed
    on other threads at the same time, and spinning would take their cores.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are noise to a user
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def run_in_micro_batches(session: Any, images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, H/8, W/8, D) float32, ``CPU_MICRO_BATCH`` photos per run (faster on a CPU)."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    parts = [
        session.run([OUTPUT_NAME], {INPUT_NAME: images[start : start + CPU_MICRO_BATCH]})[0]
        for start in range(0, len(images), CPU_MICRO_BATCH)
    ]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class OnnxFeatureExtractor:
    """Same interface as the torch ``FeatureExtractor``: (B, H, W, 3) uint8 -> (B, H/8, W/8, D) float32."""

    device = "cpu"

    def __init__(self, path: str | Path, config: Config) -> None:
        path = Path(path)
        if not path.is_file():
            raise OnnxExtractorError(f"{path}: no ONNX export here; write it with scripts/export_onnx.py --model M")
        try:
            self._graph = path.read_bytes()
            self.session = cpu_session(self._graph)
        except OSError as error:
            raise OnnxExtractorError(f"{path}: cannot be read ({error.strerror or error})") from None
        except Exception as error:  # onnxruntime raises its own exception types for a bad file
            raise OnnxExtractorError(
                f"{path}: not a usable ONNX model ({error}); export it again with scripts/export_onnx.py, "
                "or score with --runtime torch"
            ) from None
        # graphs exported before fine_aggregation was a setting all averaged over 3x3
        recorded = {"fine_aggregation": "3", **self.session.get_modelmeta().custom_metadata_map}
        self.weights_identity = recorded.get("weights_identity", "")
        expected = export_metadata(config, self.weights_identity)
        differing = sorted(key for key, value in expected.items() if recorded.get(key) != value)
        if differing:
            raise OnnxExtractorError(
                f"{path}: exported for other settings than this model ({', '.join(differing)} differ); "
                "export it again with scripts/export_onnx.py"
            )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return run_in_micro_batches(self.session, images)

    def graph(self) -> bytes:
        """The graph as read, for the export a model saved from this one keeps beside it."""
        return self._graph
