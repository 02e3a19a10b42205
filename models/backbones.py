"""What every feature extractor back end shares: the backbones' stages, widths and input
normalisation, the CPU micro-batch, and the interface (models/backend.py chooses the back end)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from config import Config

# On the CPU a network runs on this many photos at a time, whatever the batch: each layer's output
# then stays under glibc's largest heap allocation (MMAP_THRESHOLD), so its memory is reused
# (keep_freed_memory), and it stays in cache (lite0 at 256 px: 15 against 35 ms per photo at 8).
CPU_MICRO_BATCH = 2


@dataclass(frozen=True)
class BackboneSpec:
    """What differs between backbones: their stride-8/16 stages and input normalisation."""

    layers: tuple[str, str]
    channels: int  # of the two stages together, before any reduction to target_dim
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPECS = {
    "wide_resnet50_2": BackboneSpec(("layer2", "layer3"), 512 + 1024, IMAGENET_MEAN, IMAGENET_STD),
    # The lite models were trained on inputs scaled to [-1, 1].
    "efficientnet_lite0": BackboneSpec(("_blocks.4", "_blocks.10"), 40 + 112, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def feature_width(config: Config) -> int | None:
    """Features per patch the extractor gives for ``config``, known without building it (None for custom layers)."""
    if config.layers:
        return None
    return min(SPECS[config.backbone].channels, config.target_dim)


class PatchFeatureExtractor(Protocol):
    device: Any
    weights_identity: str

    def __call__(self, images: np.ndarray) -> np.ndarray: ...

    def graph(self) -> bytes | None:
        """The network as the ONNX graph a model file's export holds (None where it does not export)."""
        ...
