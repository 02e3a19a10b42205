"""What a verdict and its heatmap are: strictly above the threshold, read off the smoothed map."""

from __future__ import annotations

import numpy as np
import pytest

from models.patchcore import PatchCore
from evaluation.mvtec import load_test_split


@pytest.fixture()
def model_copy(fitted_model, tmp_path) -> PatchCore:
    """The shared model, loaded afresh so that a test may change its threshold or settings."""
    fitted_model.save(tmp_path / "copy.pkl")
    return PatchCore.load(tmp_path / "copy.pkl")


def test_a_score_equal_to_the_threshold_passes_and_one_above_it_is_flagged(model_copy, small_screw_dir):
    photo = load_test_split(small_screw_dir)[0].path
    (first,) = model_copy.predict([photo])
    model_copy.threshold = first.score
    (at,) = model_copy.predict([photo])
    assert at.score == first.score and at.is_anomalous is False and at.normalized_score == 1.0
    model_copy.threshold = float(np.nextafter(np.float32(first.score), np.float32(0)))
    assert model_copy.predict([photo])[0].is_anomalous is True


def test_the_heatmap_is_smoothed_by_heatmap_sigma_and_the_score_is_the_smoothed_maximum(model_copy, small_screw_dir):
    photo = next(s.path for s in load_test_split(small_screw_dir) if s.is_defective)
    (smooth,) = model_copy.predict([photo])
    model_copy.config = model_copy.config.replace(heatmap_sigma=0.0)
    (raw,) = model_copy.predict([photo])
    assert smooth.score == pytest.approx(float(smooth.anomaly_map.max()))
    assert smooth.score < raw.score  # blurring lowers the peak
    roughness = [float(np.abs(np.diff(p.anomaly_map, axis=1)).mean()) for p in (smooth, raw)]
    assert roughness[0] < 0.8 * roughness[1]
