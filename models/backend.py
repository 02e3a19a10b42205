"""Which feature extractor scores: the one place that chooses between the torch and ONNX back ends.

Both take (B, H, W, 3) uint8 photos and return (B, H/8, W/8, D) float32 NumPy patch features, and
carry ``device`` and ``weights_identity``. This module imports neither torch nor onnxruntime: the
chosen back end is imported when it is opened, so scoring through ONNX never loads torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
from pathlib import Path

from config import Config, UserError
from models.backbones import PatchFeatureExtractor
from models.onnx_extractor import OnnxFeatureExtractor, onnxruntime_installed

RUNTIMES = ("auto", "torch", "onnx")
RUNTIME_HELP = ("feature extractor back end; auto = ONNX Runtime on the CPU when <model>.onnx lies beside the "
                "model (a fit writes it), torch on a GPU or without the export")
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
    """Where a model's exported extractor lies (``PatchCore.save``, scripts/export_onnx.py): beside it,
    suffix .onnx. A model file named so itself would be written over its own export, or read as one."""
    export = Path(model_path).with_suffix(".onnx")
    if export == Path(model_path):
        raise UserError(f"{model_path}: a model file cannot end in .onnx, the name of its network's export "
                        "beside it; name it .pkl")
    return export


def torch_installed() -> bool:
    """Whether torch can be imported here, known without importing it (seconds); the line PC's
    requirements-runtime.txt does not install it."""
    return importlib.util.find_spec("torch") is not None


def gpu_present() -> bool:
    """Whether torch is installed and an NVIDIA driver loaded, known without importing torch."""
    return Path("/proc/driver/nvidia/version").is_file() and torch_installed()


def resolve_runtime(runtime: str, onnx_file: Path | None, device: str) -> str:
    """``auto`` is ONNX Runtime on the CPU when the export exists (and is installed), torch otherwise,
    and torch where the network can run on a GPU (``device`` auto or cuda, a GPU and torch present):
    ONNX Runtime here runs on the CPU only. A model fitted with ``device: cuda`` still scores through
    its export on a line PC without a GPU."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime != "auto":
        return runtime
    on_gpu = device != "cpu" and gpu_present()
    if not on_gpu and onnx_file is not None and onnx_file.is_file() and onnxruntime_installed():
        return "onnx"
    return "torch"


def open_extractor(config: Config, runtime: str = "torch", onnx_file: Path | None = None) -> PatchFeatureExtractor:
    keep_freed_memory()  # every fit and every scoring path opens an extractor first
    if resolve_runtime(runtime, onnx_file, config.device) == "onnx":
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
