"""Does the threshold keep its promise on healthy photos the model never saw? Measured on training photos.

The healthy training photos are split into seeded folds; for each fold a model is fitted on the
others with the user's settings, and the photos of that fold (and ``test/good``, when the folder
has one) are scored against it. Every training photo is held out exactly once, so the count of
held-out photos flagged at each false-alarm rate is a count over distinct photos: the observed rate
and its 95 % Wilson interval can be set beside the promised one. No label of ``test/`` is read
but "good".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from config import Config
from evaluation.metrics import wilson_interval
from models.patchcore import PatchCore


@dataclass
class HeldOutFold:
    """One fold's fitted model and the scores of the healthy photos it never saw."""

    model: PatchCore
    held_out: np.ndarray  # training photos of this fold
    test_good: np.ndarray  # test/good photos (empty when there are none)


def held_out_folds(
    photos: Sequence[Path],
    test_good: Sequence[Path],
    config: Config,
    folds: int,
    progress: bool = True,
    fit_photos: int | None = None,
) -> list[HeldOutFold]:
    """Fit one model per fold on the other folds' photos and score the held-out ones.

    With ``fit_photos``, each of the ``folds`` models is fitted on that many seeded photos instead
    and scores all the others: how the promise holds for a set that small. A photo may then be
    held out by several models, so the counts are over scorings, not distinct photos.
    """
    if fit_photos is None:
        if folds < 2 or folds > len(photos) // 2:
            raise ValueError(f"folds must be 2 to {len(photos) // 2} for {len(photos)} training photos, got {folds}")
        fold_of = np.random.default_rng(config.seed).permutation(len(photos)) % folds
        splits = [fold_of != fold for fold in range(folds)]
    else:
        if not 2 <= fit_photos < len(photos):
            raise ValueError(
                f"fit_photos must be 2 to {len(photos) - 1} for {len(photos)} training photos, got {fit_photos}"
            )
        if folds < 1:
            raise ValueError(f"folds must be at least 1, got {folds}")
        splits = [np.random.default_rng(config.seed + split).permutation(len(photos)) < fit_photos
                  for split in range(folds)]
    results = []
    for fitted in tqdm(splits, desc="calibration check", unit="fold", disable=not progress):
        model = PatchCore(config)
        model.fit([photo for photo, fit in zip(photos, fitted) if fit], progress=False)
        held_out = [photo for photo, fit in zip(photos, fitted) if not fit]
        results.append(HeldOutFold(
            model=model,
            held_out=np.array([p.score for p in model.predict(held_out)]),
            test_good=np.array([p.score for p in model.predict(list(test_good))]) if test_good else np.empty(0),
        ))
    return results


def _flagged(folds: list[HeldOutFold], rate: float, scores_of: str, distinct: int) -> dict[str, Any]:
    """Scores above each model's threshold for ``rate``, over all models' scorings; the interval is as wide as
    ``distinct`` photos allow (every model scores the same test/good photos: five scorings of 15 photos are
    not 75 photos' worth of evidence)."""
    flagged = sum(int((getattr(fold, scores_of) > fold.model.threshold_for(rate)).sum()) for fold in folds)
    total = sum(getattr(fold, scores_of).size for fold in folds)
    return {"flagged": flagged, "photos": total, "rate": flagged / total if total else None,
            "interval": wilson_interval(int(flagged * distinct / total + 0.5), distinct) if total else None}


def score_gap(folds: list[HeldOutFold]) -> dict[str, float]:
    """How new healthy photos score against the calibration scores that set each model's threshold:
    the mean over the models of (held-out - calibration) at the median and at the 90th percentile.

    Near 0 when the calibration imitates a new photo against the final bank; below 0 the threshold
    errs towards fewer false alarms than promised (and more escapes), above 0 towards more. The
    counts of ``promised_and_observed`` test the same thing at the threshold, but a few flagged
    photos move them; this gap is read from the whole body of the scores.
    """
    gaps = np.array([
        np.quantile(fold.held_out, [0.5, 0.9]) - np.quantile(fold.model.calibration_scores, [0.5, 0.9])
        for fold in folds
    ])
    median, upper = gaps.mean(axis=0)
    return {"median": float(median), "percentile_90": float(upper)}


def promised_and_observed(folds: list[HeldOutFold], rates: Sequence[float]) -> list[dict[str, Any]]:
    """Per promised false-alarm rate: held-out training photos flagged and test/good photos flagged."""
    held_out = sum(fold.held_out.size for fold in folds)  # each photo once (with fit_photos, scorings: see above)
    test_good = max((fold.test_good.size for fold in folds), default=0)  # the same photos, scored by every model
    return [
        {"promised": rate, "held_out_training": _flagged(folds, rate, "held_out", held_out),
         "test_good": _flagged(folds, rate, "test_good", test_good)}
        for rate in rates
    ]
