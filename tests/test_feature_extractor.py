from __future__ import annotations

import copy
import shutil

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from config import Config
from models.feature_extractor import (
    BackboneWeightsError,
    FeatureExtractor,
    build_backbone,
    feature_width,
    fold_batch_norms,
)

# ImageNet classes of scikit-image's sample photos: Chelsea is a cat, coffee is an espresso cup.
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


def network_input(extractor: FeatureExtractor, images: np.ndarray) -> torch.Tensor:
    """The tensor the extractor's module feeds its network for ``images``: its own normalisation, captured."""
    captured = []
    handle = extractor.module.network.register_forward_pre_hook(lambda _module, inputs: captured.append(inputs[0].clone()))
    try:
        with torch.inference_mode():
            extractor.module(torch.from_numpy(images))
    finally:
        handle.remove()
    return captured[0]


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "wide_resnet50_2"])
def test_imagenet_weights_are_real_through_the_extractors_own_normalisation(backbone):
    """The photos are normalised by the extractor exactly as fastener photos are, then classified."""
    try:
        extractor = FeatureExtractor(Config(backbone=backbone, device="cpu"))
    except BackboneWeightsError:
        pytest.skip(f"{backbone} ImageNet weights not available offline here")
    classifier, identity = build_backbone(backbone)
    assert identity == extractor.weights_identity
    photos = np.stack(
        [cv2.resize(photo, (224, 224), interpolation=cv2.INTER_AREA) for photo in (data.chelsea(), data.coffee())]
    )
    with torch.inference_mode():
        cat, coffee = classifier(network_input(extractor, photos).contiguous()).argmax(dim=1).tolist()
    assert cat in CAT_CLASSES and coffee in COFFEE_CLASSES


def test_wide_resnet_without_weights_names_every_remedy(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache
    from torchvision.models import Wide_ResNet50_2_Weights

    def offline(*_args, **_kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(Wide_ResNet50_2_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(BackboneWeightsError) as raised:
        build_backbone("wide_resnet50_2")
    message = str(raised.value)
    assert "--weights" in message and "efficientnet_lite0" in message and "internet" in message


def test_local_weights_file_is_used_and_a_bad_one_is_refused(tmp_path):
    model, _ = build_backbone("efficientnet_lite0", pretrained=False)
    weights = tmp_path / "lite0.pth"
    torch.save(model.state_dict(), weights)
    loaded, identity = build_backbone("efficientnet_lite0", weights_path=str(weights))
    assert identity.startswith("sha256:")
    assert torch.equal(loaded.state_dict()["_conv_stem.weight"], model.state_dict()["_conv_stem.weight"])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not weights")
    with pytest.raises(BackboneWeightsError, match="garbage.pth"):
        build_backbone("efficientnet_lite0", weights_path=str(garbage))


def test_the_weights_identity_follows_the_files_content_not_its_name(tmp_path):
    """A model file records which weights it was fitted with: fine-tuned weights saved under the
    same name must read as other weights, and a copy of the file under another name as the same."""
    model, _ = build_backbone("efficientnet_lite0", pretrained=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save(model.state_dict(), tmp_path / "a" / "lite0.pth")
    shutil.copyfile(tmp_path / "a" / "lite0.pth", tmp_path / "b" / "renamed.pth")
    tuned = {name: value + 0.01 if value.is_floating_point() else value for name, value in model.state_dict().items()}
    torch.save(tuned, tmp_path / "b" / "lite0.pth")
    identity = {path: build_backbone("efficientnet_lite0", weights_path=str(tmp_path / path))[1]
                for path in ("a/lite0.pth", "b/renamed.pth", "b/lite0.pth")}
    assert identity["a/lite0.pth"] == identity["b/renamed.pth"] != identity["b/lite0.pth"]


@pytest.mark.parametrize(
    "backbone, target_dim, dim",
    [("efficientnet_lite0", 1024, 152), ("wide_resnet50_2", 1024, 1024), ("wide_resnet50_2", 4096, 1536)],
)
def test_patch_grid_is_stride_8_and_reduced_to_target_dim(backbone, target_dim, dim, monkeypatch):
    config = Config(backbone=backbone, target_dim=target_dim, device="cpu")
    monkeypatch.setattr("models.feature_extractor.build_backbone",
                        lambda name, path, pretrained: build_backbone(name, path, pretrained=False))
    features = FeatureExtractor(config)(np.zeros((2, 128, 96, 3), dtype=np.uint8))
    assert tuple(features.shape) == (2, 16, 12, dim)
    assert feature_width(config) == dim  # what a model file's memory bank is checked against on load


def test_channels_beyond_target_dim_are_averaged_in_adjacent_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """wide_resnet50_2's 1536 channels reach 1024 by adaptive average pooling along channels (PatchCore):
    a max or a cut instead gives other features than the models already fitted, for the same photos."""
    random_weights(monkeypatch)
    image = np.random.default_rng(0).integers(0, 256, (1, 32, 48, 3), dtype=np.uint8)
    features = {}
    for target_dim in (4096, 1024):  # all 1536, then reduced; the same random weights each time
        torch.manual_seed(0)
        config = Config(backbone="wide_resnet50_2", target_dim=target_dim, device="cpu")
        features[target_dim] = FeatureExtractor(config)(image)
    bins = [(i * 1536 // 1024, -(-(i + 1) * 1536 // 1024)) for i in range(1024)]
    expected = np.stack([features[4096][..., start:end].mean(-1) for start, end in bins], axis=-1)
    np.testing.assert_allclose(features[1024], expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_features_are_local():
    """A change in one corner of the photo moves that corner's patch features far more than the
    opposite corner's (squeeze-excitation gives EfficientNet a little global context)."""
    extractor = FeatureExtractor(Config(backbone="efficientnet_lite0", device="cpu"))
    image = np.full((1, 128, 128, 3), 128, dtype=np.uint8)
    changed = image.copy()
    changed[0, :16, :16] = 255
    before, after = extractor(image)[0], extractor(changed)[0]
    near = np.linalg.norm(before[0, 0] - after[0, 0])
    far = np.linalg.norm(before[-1, -1] - after[-1, -1])
    assert near > 10 * far


def random_weights(monkeypatch) -> None:
    monkeypatch.setattr("models.feature_extractor.build_backbone",
                        lambda name, path, pretrained: build_backbone(name, path, pretrained=False))


# What each backbone was trained on: lite0 on [-1, 1], the ResNets on ImageNet mean/std of [0, 1] pixels.
NORMALISATION = {
    "efficientnet_lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "wide_resnet50_2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@pytest.mark.parametrize("backbone", NORMALISATION)
def test_the_network_sees_pixels_normalised_as_in_its_imagenet_training(backbone, monkeypatch):
    random_weights(monkeypatch)
    extractor = FeatureExtractor(Config(backbone=backbone, device="cpu"))
    image = np.zeros((1, 32, 48, 3), np.uint8)
    image[0, :, :, 0] = 255  # red full on, green ramps, blue off: every channel and level is distinct
    image[0, :, :, 1] = np.arange(48) * 5
    seen = network_input(extractor, image)[0].numpy()
    mean, std = (np.array(values)[:, None, None] for values in NORMALISATION[backbone])
    expected = (image[0].transpose(2, 0, 1) / 255 - mean) / std
    assert seen.shape == (3, 32, 48)
    np.testing.assert_allclose(seen, expected, atol=1e-5)
    if backbone == "efficientnet_lite0":  # 0 -> -1, 255 -> +1 written out, in case both tables above slip
        assert seen[0].min() == pytest.approx(1.0) and seen[2].max() == pytest.approx(-1.0)


def mean_3x3(grid: np.ndarray) -> np.ndarray:
    """(C, H, W) -> each position the mean over its 3x3 neighbourhood, zeros beyond the border."""
    padded = np.pad(grid, ((0, 0), (1, 1), (1, 1)))
    height, width = grid.shape[1:]
    return sum(padded[:, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)) / 9


@pytest.mark.parametrize("fine_aggregation", [3, 1])
def test_patch_features_are_3x3_means_of_both_stages_on_the_stride_8_grid(fine_aggregation):
    """Pins the local aggregation (paper, Eq. 2) against the raw stage outputs, computed independently;
    with ``fine_aggregation: 1`` the fine stage's patches are kept as they are, the coarse stage's still
    averaged."""
    extractor = FeatureExtractor(Config(backbone="efficientnet_lite0", device="cpu", fine_aggregation=fine_aggregation))
    raw = {}
    modules = dict(extractor.module.network.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda _module, _inputs, output, name=name: raw.__setitem__(name, output[0].numpy().copy()),
            prepend=True,  # before the extractor's own hook, which stops the network at the last stage
        )
        for name in extractor.module.layers
    ]
    image = np.random.default_rng(0).integers(0, 256, (1, 64, 96, 3), dtype=np.uint8)
    try:
        with torch.inference_mode():
            extractor.module(torch.from_numpy(image))  # the torch module, where hooks see the stages
    finally:
        for handle in handles:
            handle.remove()
    features = extractor(image)[0]  # what fitting and scoring get (on the CPU through ONNX Runtime)
    fine, coarse = (raw[name] for name in extractor.module.layers)
    assert fine.shape[1:] == (8, 12) and coarse.shape[1:] == (4, 6)  # stride 8 and stride 16
    upsampled = np.stack([cv2.resize(channel, (12, 8), interpolation=cv2.INTER_LINEAR) for channel in mean_3x3(coarse)])
    expected = np.concatenate([mean_3x3(fine) if fine_aggregation == 3 else fine, upsampled]).transpose(1, 2, 0)
    assert features.shape == (8, 12, 152)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)  # through ONNX Runtime: float32 sums


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "wide_resnet50_2"])
def test_folding_batch_norms_into_convolutions_keeps_the_network_the_same_function(backbone):
    """The extractor's network (BatchNorms folded, padding moved) classifies exactly as the plain one."""
    plain, _ = build_backbone(backbone, pretrained=backbone == "efficientnet_lite0")
    generator = torch.Generator().manual_seed(0)
    for module in plain.modules():  # random running statistics, so that folding them is not a no-op
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.normal_(1, 0.3, generator=generator)
            module.bias.data.normal_(0, 0.3, generator=generator)
    folded = fold_batch_norms(copy.deepcopy(plain))
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.modules())
    photos = torch.rand(2, 3, 96, 128, generator=generator) * 2 - 1
    with torch.inference_mode():
        expected, got = plain(photos), folded(photos)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))


@pytest.mark.parametrize("compiled", [True, False], ids=["onnx-runtime", "eager-torch"])
def test_cpu_features_in_micro_batches_are_the_torch_modules_for_any_batch_and_size(compiled):
    """On the CPU lite0 runs through an in-memory ONNX Runtime session (eager torch where the graph does
    not export), a few photos at a time: every photo, the last odd one too, at any photo size, gets
    the features the torch module gives the whole batch at once."""
    extractor = FeatureExtractor(Config(backbone="efficientnet_lite0", device="cpu"))
    assert extractor.session is not None  # lite0's graph exports: the CPU path is ONNX Runtime
    if not compiled:
        extractor.session = None
    for shape in [(5, 64, 96, 3), (3, 256, 256, 3)]:
        photos = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        with torch.inference_mode():
            whole = extractor.module(torch.from_numpy(photos))
        got = extractor.tensor(photos)
        assert got.shape == whole.shape == (shape[0], shape[1] // 8, shape[2] // 8, 152)
        torch.testing.assert_close(got, whole, rtol=1e-4, atol=1e-4 * float(whole.abs().max()))


def test_the_backbone_reuses_its_working_memory_instead_of_faulting_in_new_pages():
    """Once warm, a batch costs (almost) no page faults: glibc keeps the freed layer outputs for
    the next batch. Returning them to the kernel cost ~4,000-10,000 faults and half the CPU per photo."""
    import resource

    from models.backend import open_extractor

    extractor = open_extractor(Config(backbone="efficientnet_lite0", device="cpu"))  # as fitting and scoring open it
    extractor.session = None  # eager torch, as wide_resnet50_2 runs (ONNX Runtime keeps its own arena)
    photos = np.random.default_rng(0).integers(0, 256, (8, 256, 256, 3), dtype=np.uint8)
    extractor.tensor(photos)  # warm-up: the heap grows once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        extractor.tensor(photos)
    faults_per_photo = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (3 * len(photos))
    assert faults_per_photo < 500, f"{faults_per_photo:.0f} page faults per photo"


def test_openmp_threads_sleep_while_waiting_unless_the_user_chose_otherwise():
    """Importing the model package before torch makes idle OpenMP threads sleep, so they leave the
    cores to the preprocessing workers; a policy already in the environment is kept."""
    import os
    import subprocess
    import sys

    probe = "import models.patchcore, os, sys; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    environment = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    unset = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True, check=True)
    assert unset.stdout.split() == ["PASSIVE", "False"]  # set before torch (and its OpenMP) was loaded
    chosen = subprocess.run(
        [sys.executable, "-c", probe], env={**environment, "OMP_WAIT_POLICY": "ACTIVE"},
        capture_output=True, text=True, check=True,
    )
    assert chosen.stdout.split()[0] == "ACTIVE"
