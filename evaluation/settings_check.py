"""Which settings suit a part? Compared on its own training photos, with synthetic defects painted on.

For each seeded split the healthy training photos are divided 70/30. Every candidate setting fits a
model on the 70 % (calibrated as ``train.py`` would), then scores the held-out 30 % and a copy of
each with a synthetic defect painted on the part (rust, corrosion, a scratch, a chip, a dent, in
turn; ``synthetic.defects``), where the part has room for it. Each candidate meets the same photos
and the same painted copies, so the differences are the settings'. Counted at each model's own
threshold: painted copies caught, healthy photos flagged, and how well the scores separate the two
(AUROC). Nothing under ``test/`` is read: a choice made this way is not tuned to the exam.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from config import Config
from evaluation.metrics import is_flagged, wilson_interval
from models.patchcore import PatchCore
from models.pipeline_selection import paint_defects
from preprocessing.io import read_image
from synthetic.defects import MAX_SCALE

HELD_OUT_SHARE = 0.3


@dataclass
class Trial:
    """What one candidate setting did, summed over the splits."""

    painted_caught: int = 0
    healthy_flagged: int = 0
    photos: int = 0  # held-out healthy photos
    painted: int = 0  # their painted copies: one each, where the part has room for its defect
    aurocs: list[float] = field(default_factory=list)  # one per split
    cpu_seconds: float = 0.0  # fitting and scoring, all splits

    def summary(self) -> dict[str, Any]:
        return {
            "painted_caught": self.painted_caught,
            "healthy_flagged": self.healthy_flagged,
            "photos": self.photos,
            "painted": self.painted,
            "recall": self.painted_caught / self.painted if self.painted else None,
            "recall_interval": wilson_interval(self.painted_caught, self.painted),
            "false_alarm_rate": self.healthy_flagged / self.photos if self.photos else None,
            "auroc": float(np.mean(self.aurocs)) if self.aurocs else None,
            "cpu_seconds": self.cpu_seconds,
        }


def compare_settings(
    photos: Sequence[Path],
    candidates: dict[str, Config],
    splits: int,
    defect_scale: float,
    seed: int,
    progress: bool = True,
    segmentation_method: str = "otsu",
) -> dict[str, dict[str, Any]]:
    """Each candidate's summary over ``splits`` seeded 70/30 splits of ``photos`` (see the module doc);
    ``segmentation_method`` finds the part the defects are painted on."""
    held_count = round(HELD_OUT_SHARE * len(photos))
    if splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    if held_count < 2 or len(photos) - held_count < 2:
        raise ValueError(f"comparing settings needs at least 5 training photos, got {len(photos)}")
    if not defect_scale > 0:
        raise ValueError(f"the defect scale must be above 0, got {defect_scale}")
    if not defect_scale <= MAX_SCALE:  # larger sizes overflow the painting (an OverflowError, a cv2.error)
        raise ValueError(f"the defect scale must be at most {MAX_SCALE:g}, got {defect_scale}")
    trials = {name: Trial() for name in candidates}
    steps = tqdm(total=splits * len(candidates), desc="comparing settings", unit="fit", disable=not progress)
    for split in range(splits):
        rng = np.random.default_rng(seed + split)
        order = rng.permutation(len(photos))
        fitted = [photos[i] for i in sorted(order[held_count:])]
        healthy = [read_image(photos[i]) for i in sorted(order[:held_count])]
        painted, _ = paint_defects(healthy, segmentation_method, rng, defect_scale)
        if not painted:
            raise ValueError(f"no synthetic defect at {defect_scale:g} x its usual size fits the parts of split "
                             f"{split + 1}: nothing to compare; give a --defect-scale nearer 1")
        labels = np.r_[np.zeros(len(healthy)), np.ones(len(painted))]
        for name, config in candidates.items():
            started = time.process_time()
            model = PatchCore(config)
            model.fit(fitted, progress=False)
            scores = np.array([prediction.score for prediction in model.predict(healthy + painted)])
            flagged = is_flagged(scores, model.threshold)
            trial = trials[name]
            trial.cpu_seconds += time.process_time() - started
            trial.healthy_flagged += int(flagged[: len(healthy)].sum())
            trial.painted_caught += int(flagged[len(healthy) :].sum())
            trial.photos += len(healthy)
            trial.painted += len(painted)
            trial.aurocs.append(float(roc_auc_score(labels, scores)))
            steps.update()
    steps.close()
    return {name: trial.summary() for name, trial in trials.items()}
