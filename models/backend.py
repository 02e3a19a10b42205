"""Which feature extractor scores: the one place that chooses between the torch and ONNX back ends.

Both take (B, H, W, 3) uint8 photos and return (B, H/8, W/8, D) float32 NumPy patch features, and
carry ``device`` and ``weights_identity``. This module imports neither torch nor onnxruntime: the
chosen back end is imported when it is opened, so scoring through ONNX never loads torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

from config import Config, UserError
from models.backbones import PatchFeatureExtractor
from models.onnx_extractor import OnnxFeatureExtractor, onnxruntime_installed

RUNTIMES = ("auto", "torch", "onnx")
MMAP_THRESHOLD = 32 << 20  # glibc's maximum: larger blocks are always mapped afresh
TRIM_THRESHOLD = 256 << 20  # free memory kept at the heap's top for the next batch, not handed back


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed layer outputs and maps for the next batch instead of unmapping them.

    By default glibc maps each large block afresh and returns it to the kernel on free, so every
    batch touches new pages that the kernel must fault in and zero: measured on lite0 at 256 px,
    4,000-10,000 page faults and over half the backbone's CPU time per photo; the 1024² maps and
    photos of scoring fault the same way. A fixed mmap threshold and a larger trim threshold
    (process-wide; what PyTorch's CPU tuning guide gets from jemalloc) remove them. Returns False
    where the C library has no ``mallopt`` (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


def onnx_path_for(model_path: str | Path) -> Path:
    """Where a model's exported extractor lies (``PatchCore.save``, scripts/export_onnx.py): beside it, suffix .onnx."""
    return Path(model_path).with_suffix(".onnx")


def resolve_runtime(runtime: str, onnx_file: Path | None) -> str:
    """``auto`` is ONNX Runtime when the export exists (and is installed), torch otherwise."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime != "auto":
        return runtime
    if onnx_file is not None and onnx_file.is_file() and onnxruntime_installed():
        return "onnx"
    return "torch"


def open_extractor(config: Config, runtime: str = "torch", onnx_file: Path | None = None) -> PatchFeatureExtractor:
    keep_freed_memory()  # every fit and every scoring path opens an extractor first
    if resolve_runtime(runtime, onnx_file) == "onnx":
        if onnx_file is None:
            raise ValueError("the ONNX runtime needs the path of the exported extractor")
        return OnnxFeatureExtractor(onnx_file, config)
    try:
        from models.feature_extractor import FeatureExtractor
    except ImportError as error:  # a runtime-only environment (requirements-runtime.txt) has no torch
        raise UserError(
            f"the torch back end is not installed ({error}); score through ONNX Runtime: export the "
            "extractor with scripts/export_onnx.py in the full environment and put the .onnx beside the model"
        ) from None
    return FeatureExtractor(config)
