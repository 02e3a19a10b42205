"""``preprocess: auto``: choose the preprocessing of a data set by evidence from its training photos.

First the measurements of preprocessing.auto decide each step for the whole set. Where that leaves
a real choice (run the decided pipeline, or feed the photos to the network unprocessed; and, where a
little of the part is saturated, inpaint that glare or not), the candidates are fitted on part of
the training photos and ranked by how well they separate the remaining healthy photos from copies
of those photos with synthetic defects painted on the part (rust, corrosion, scratches, dents,
missing material). Only training photos are ever read: the test split of a data set plays no part
in any decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from config import Config
from evaluation.metrics import downsample_for_eval, pixel_roc
from preprocessing.auto import decide
from preprocessing.io import read_image
from preprocessing.pipeline import STEP_FLAGS
from preprocessing.segmentation import segment_object
from synthetic.defects import DEFECT_KINDS, paint_defect

MIN_PHOTOS_TO_RANK = 6  # fewer cannot be split into a bank and a meaningful evaluation
MAX_BANK_PHOTOS = 30  # per candidate: keeps the whole choice within two or three extra fits
MAX_EVAL_PHOTOS = 15  # healthy photos scored per candidate; each also gets a defective copy
PIXEL_EVAL_SIDE = 128  # maps and masks are compared at this long side
CANDIDATE_WORDS = {
    "decided": "the measured steps",
    "inpainted": "the measured steps with glare inpainting",
    "off": "no preprocessing",
}


class Candidate(Protocol):
    """What ranking needs of a model (models.patchcore.PatchCore, passed in by its ``fit``)."""

    def fit(self, images: Sequence[np.ndarray], progress: bool = True, calibrate: bool = True) -> None: ...

    def predict(self, images: Sequence[np.ndarray]) -> list[Any]: ...


def choose_preprocessing(
    images: Sequence[str | Path | np.ndarray],
    config: Config,
    new_model: Callable[[Config], Candidate],
    progress: bool = False,
) -> tuple[Config, dict[str, Any]]:
    """The config with 'auto' resolved into switches, and what was decided and why (plain data).

    ``new_model`` builds a model for a candidate config: the model class is handed in by its caller,
    so this module sits below the model and never imports it.
    """
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(images))
    n_bank = min(len(images) // 2, MAX_BANK_PHOTOS)
    n_eval = min(len(images) - n_bank, MAX_EVAL_PHOTOS)
    chosen = sorted(order[: n_bank + n_eval]) if len(images) >= MIN_PHOTOS_TO_RANK else list(range(len(images)))
    photos = {i: _as_array(images[i], config.max_image_pixels) for i in chosen}

    decision = decide(list(photos.values()), config)
    decided = config.replace(**decision.changes)  # glare left to the trial is not inpainted unless it wins
    record: dict[str, Any] = {"mode": "auto", "reasons": list(decision.reasons), "numbers": decision.numbers}
    if len(images) < MIN_PHOTOS_TO_RANK:
        record["reasons"].append(f"pipeline: the measured steps ({len(images)} photos are too few to compare pipelines)")
        return decided, _finish(record, decided, "decided")

    bank = [photos[i] for i in order[:n_bank]]
    healthy = [photos[i] for i in order[n_bank : n_bank + n_eval]]
    defective, masks = paint_defects(healthy, decided.segmentation_method, rng)
    if not defective:
        record["reasons"].append("pipeline: the measured steps (no synthetic defect fits these parts to compare pipelines)")
        return decided, _finish(record, decided, "decided")
    candidates = {"decided": decided, "off": config.replace(preprocess="off")}
    if decision.try_inpainting:
        candidates["inpainted"] = decided.replace(inpaint_specular=True)
    results = {
        name: _separation(new_model(candidate), bank, healthy, defective, masks)
        for name, candidate in tqdm(candidates.items(), desc="auto: comparing pipelines", disable=not progress, leave=False)
    }
    record["candidates"] = results
    winner = max(results, key=lambda name: (results[name]["rank_score"], name == "decided"))
    record["reasons"].append(
        f"pipeline: {CANDIDATE_WORDS[winner]} (a trial on {n_eval} training photos with synthetic defects painted "
        f"on, each model built from {n_bank} others: " + ", ".join(
            f"{CANDIDATE_WORDS[name]} scored the defective copy higher in {r['image_auroc']:.0%} of pairs"
            for name, r in results.items()
        ) + ")"
    )
    return candidates[winner], _finish(record, candidates[winner], winner)


def _finish(record: dict[str, Any], config: Config, chosen: str) -> dict[str, Any]:
    record["chosen"] = chosen
    record["switches"] = {
        name: getattr(config, name)
        for name in ("preprocess", *STEP_FLAGS, "segmentation_method", "mask_fill", "min_elongation")
    }
    return record


def _as_array(image: str | Path | np.ndarray, max_pixels: int) -> np.ndarray:
    return read_image(image, max_pixels) if isinstance(image, (str, Path)) else image


def paint_defects(
    photos: Sequence[np.ndarray], method: str, rng: np.random.Generator, scale: float = 1.0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A defective copy of each photo (kinds taken in turn, ``scale`` times their usual size), on the
    part where one is found, with its defect's mask. A photo whose part has no room for its defect
    gets no copy: an unchanged copy counted as defective would read as a missed defect."""
    defective, masks = [], []
    for number, photo in enumerate(photos):
        part = segment_object(photo, method=method).mask
        if part is None:  # no part found: paint within the central half of the frame
            part = np.zeros(photo.shape[:2], bool)
            height, width = part.shape
            part[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = True
        image, mask = paint_defect(photo, part, DEFECT_KINDS[number % len(DEFECT_KINDS)], rng, scale)
        if mask.any():
            defective.append(image)
            masks.append(mask)
    return defective, masks


def _separation(
    model: Candidate,
    bank: Sequence[np.ndarray],
    healthy: Sequence[np.ndarray],
    defective: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
) -> dict[str, float]:
    """Fit a candidate on ``bank``; how well do its scores and maps tell healthy from painted defects?"""
    model.fit(list(bank), progress=False, calibrate=False)  # ranked by its scores alone: no threshold needed
    predictions = model.predict(list(healthy) + list(defective))
    labels = [0] * len(healthy) + [1] * len(defective)
    image_auroc = float(roc_auc_score(labels, [p.score for p in predictions]))
    painted = zip(predictions[len(healthy) :], masks)
    shrunk = [downsample_for_eval(prediction.anomaly_map, mask, PIXEL_EVAL_SIDE) for prediction, mask in painted]
    roc = pixel_roc([small_map for small_map, _ in shrunk], [regions for _, regions in shrunk])
    pixel_auroc = math.nan if roc is None else roc[0]
    rank_score = (image_auroc + (pixel_auroc if not math.isnan(pixel_auroc) else image_auroc)) / 2
    return {"image_auroc": image_auroc, "pixel_auroc": pixel_auroc, "rank_score": rank_score}
