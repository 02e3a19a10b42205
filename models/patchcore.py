"""PatchCore (Roth et al., CVPR 2022): a memory bank of healthy patches and nearest-neighbour scoring.

``PatchCore`` is the whole model a user handles: ``fit`` on healthy photos, ``predict`` verdicts and
heatmaps on the original photos, ``save`` / ``load`` a model file that holds plain data only.

Scoring needs only NumPy, OpenCV, FAISS and a feature extractor back end (models/backend.py); torch
is imported by fitting and by the torch back end alone, so a model scored through ONNX Runtime
runs without it.
"""

from __future__ import annotations

import copy
import importlib.metadata
import math
import platform
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import faiss
import numpy as np
from tqdm import tqdm

from config import Config, UserError, first_few
from models.backbones import PatchFeatureExtractor
from models.backend import onnx_path_for, open_extractor, resolve_runtime, torch_installed
from models.calibration import (
    fewest_photos,
    fit_tail,
    promised_threshold,
    rate_interval,
    read_at,
    too_few_photos,
    unlike_the_rest,
)
from models.knn_index import CellIndex, build_index
from models.model_file import (
    FORMAT_VERSION,
    FileIdentity,
    ModelFileError,
    check_fitted_values,
    check_projection,
    check_state,
    check_unchanged,
    checked_calibration,
    checked_fingerprints,
    checked_updates,
    file_identity,
    keep_previous,
    pack_array,
    read_state,
    unpack_array,
    write_state,
)
from output_files import OutputError, write_atomically
from preprocessing.io import DIGEST_BYTES, ImageReadError, check_photo, pixel_digest, read_image, unusable_photos
from preprocessing.pipeline import Preprocessed, preprocess, to_original

MAX_CALIBRATION_PHOTOS = 500  # more add little to a percentile and would hold all their patches in memory
CORESET_BACKLOG = 3  # batches the coreset worker may be behind the backbone (each holds its features)
CALIBRATION_BATCH = 32  # photos per k-NN search while calibrating (bounds the queries held at once)
KEPT_MAPS = 10  # held-out maps kept for the highest-scoring training photos, to show those listed as unlike the rest
SPREAD_FLOOR = 0.01  # the healthy spread is never below this share of the bank's patch spacing
_NO_PIXELS = np.empty((0, 0), dtype=np.uint8)  # calibration keeps a photo's transform, not its pixels
# FAISS computes exact L2 distances as one matrix product (BLAS) only above this threshold; its
# default (128,000 in 1.15) sends a photo's few hundred patches down a loop 4x slower (measured:
# 52 vs 14 ms for 400 patches against an 11k bank on 2 cores). The results are the same distances.
faiss.cvar.distance_compute_blas_threshold = 20


@dataclass
class Prediction:
    """The verdict on one photo, with its heatmap in the photo's own pixel coordinates.

    ``score`` is the maximum of ``anomaly_map``: the photo is flagged exactly when some pixel of
    the map it is shown with lies above the threshold, so every flagged photo shows where.
    """

    score: float  # feature distance to the nearest healthy patch; its scale depends on the model
    threshold: float  # the threshold the verdict was taken against
    anomaly_map: np.ndarray  # (H, W) float32, same units as score
    is_anomalous: bool  # score > threshold
    sigma: float  # how far the score lies above the healthy median, in robust spreads of the healthy scores
    anomaly_confidence: float  # how unusual the score is for a healthy part: 1σ -> 0.68, 2σ -> 0.95, 3σ -> 0.997
    warnings: list[str] = field(default_factory=list)

    @property
    def normalized_score(self) -> float:
        """The score in units of the threshold (1.0 = threshold), comparable across models."""
        return self.score / self.threshold


def photo_names(images: Sequence[str | Path | np.ndarray]) -> list[str]:
    """What each photo is called in listings and records: its path, or "photo N" for one given as an array
    (an array's text is no name, and two would collide in the list of photos unlike the rest)."""
    return [str(image) if isinstance(image, (str, Path)) else f"photo {number}" for number, image in enumerate(images)]


def fingerprint(item: Preprocessed) -> bytes:
    """What tells the same photo confirmed twice: the digest of its model input (the same file, or the same
    pixels in another file, give the same input under the model's settings)."""
    return pixel_digest(item.image)


def anomaly_confidence_from_sigma(sigma: float) -> float:
    """The share of healthy scores within ±sigma of their centre: 1σ -> 68%, 2σ -> 95%, 3σ -> 99.7%;
    0 at or below it. It says how unusual a score is for a healthy part, not how sure the verdict
    is (a part can be 'ok' with 94%: unusual, yet still under the threshold)."""
    return math.erf(max(sigma, 0.0) / math.sqrt(2))


PROJECTION_MISSING = "the model file predates the coreset projection models keep: one update with torch adds it"


class PatchCore:
    """Fit on healthy photos; score new ones by their distance to the nearest healthy patch."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.memory_bank: np.ndarray | None = None
        self.threshold = math.nan
        self.calibration_scores = np.empty(0, dtype=np.float32)
        self.calibration: dict[str, Any] = {}  # method, photo count, spread floor, warnings
        self.preprocessing: dict[str, Any] = {}  # what 'auto' decided and the numbers behind it
        self.n_train = 0
        self.fit_seconds = math.nan
        self.coverage_radius = math.nan  # how far a training patch may be from the bank (same units as scores)
        # the random projection the bank's coreset measured distances in (None: the features as they
        # are); kept so that add_good continues the same coreset without torch
        self.coreset_projection: np.ndarray | None = None
        self.weights_identity = ""
        self.runtime = "torch"  # feature extractor back end: torch | onnx | auto (models/backend.py)
        self.onnx_file: Path | None = None
        self.model_file: Path | None = None  # the file it was loaded from, named in its errors
        self.file_identity: FileIdentity | None = None  # that file as loaded or last saved
        self.updates: list[dict[str, Any]] = []  # confirmed-good photos added since the fit (add_good)
        self.learnt_photos: frozenset[bytes] = frozenset()  # fingerprints of the photos in the bank (fit and updates)
        # ... and of the photos a recalibration scored, outside the bank: their scores are among the healthy ones
        self.calibration_photos: frozenset[bytes] = frozenset()
        # Seconds per stage, summed since the last fit started: the fit's own stages, and predict_*
        # over the predict calls since; scripts/benchmark.py reads them.
        self.timings: dict[str, float] = {}
        self.held_out_maps: dict[str, np.ndarray] = {}  # photo -> its map from a bank without it (fit-time only)
        self._extractor: PatchFeatureExtractor | None = None
        self._index: faiss.Index | CellIndex | None = None

    # ----------------------------------------------------------------------------- fitting
    def fit(self, images: Sequence[str | Path], progress: bool = True, calibrate: bool = True) -> None:
        """Build the memory bank from every healthy photo and calibrate on all of them by cross-fitting.

        ``calibrate=False`` builds the bank alone (no threshold), for models only ranked by their
        scores, such as the candidates of ``preprocess: auto``.

        With ``preprocess: auto`` the steps are first decided from these photos alone
        (models.pipeline_selection). Calibration: the photos (a seeded sample of at most
        ``MAX_CALIBRATION_PHOTOS``) are split into seeded folds, each fold gets its own coreset, and
        every photo is scored against the coresets of the other folds (with the bank's patches from
        photos outside the sample), so each healthy score comes from a bank that never saw that photo.
        """
        import torch

        from models.coreset import StreamingCoreset

        start = time.perf_counter()
        self.timings = {}
        if len(images) < 2:
            raise UserError(
                f"fitting needs at least 2 healthy photos (got {len(images)}): each one is scored "
                "by a memory bank built from the others to set the threshold"
            )
        torch.manual_seed(self.config.seed)
        if self.config.preprocess == "auto":
            from models.pipeline_selection import choose_preprocessing

            stage = time.perf_counter()
            self.config, self.preprocessing = choose_preprocessing(images, self.config, PatchCore, progress)
            self._clock("preprocess_choice", stage)
        config = self.config
        n_folds = min(config.calibration_folds, len(images))
        order = np.random.default_rng(config.seed).permutation(len(images))
        folds = order % n_folds
        scored = (order < MAX_CALIBRATION_PHOTOS) & calibrate  # a seeded sample bounds the memory of very large sets
        stage = time.perf_counter()
        extractor = self._feature_extractor()  # building the backbone counts as feature extraction
        self._clock("features", stage)

        def new_coreset(ratio: float, seed: int) -> StreamingCoreset:
            return StreamingCoreset(
                ratio,
                config.coreset_projection_dim,
                config.coreset_chunk_size,
                seed,
                config.coreset_oversampling,
            )

        # Each photo is scored by the other folds' coresets together; picking a share n/(n-1) larger
        # per fold gives that union as many patches as the final bank, so calibration scores are as
        # low as a new healthy photo's against the final bank, not inflated by a sparser bank.
        # Photos outside the calibration sample (sets over MAX_CALIBRATION_PHOTOS) join no fold: the
        # bank's patches from them are shared by every fold's scoring bank, so each of them costs
        # one coreset, not two, and a long fit does not pay twice for a graph that keeps growing.
        fold_ratio = min(1.0, config.coreset_sampling_ratio * n_folds / (n_folds - 1))
        whole = new_coreset(config.coreset_sampling_ratio, config.seed)
        by_fold = [new_coreset(fold_ratio, config.seed + 1 + fold) for fold in range(n_folds)] if calibrate else []
        patches_of: list[tuple[np.ndarray, np.ndarray, Preprocessed] | None] = []  # what a scored photo's map needs
        patch_counts: list[int] = []  # patches each photo gave the bank's coreset, in order
        learnt: set[bytes] = set()

        def take(batch: list[Preprocessed], features: torch.Tensor) -> None:
            """Hand one batch's object patches to the coresets, in photo order."""
            features = features.cpu().numpy()  # on the CPU, the same memory
            n, h, w, d = features.shape
            keep = self._object_patches(batch, h, w)
            kept = features.reshape(n, h * w, d)[keep]
            whole.add(kept)
            per_photo = np.split(kept, np.cumsum(keep.sum(axis=1))[:-1])
            for item, seen, photo_patches in zip(batch, keep, per_photo):
                photo = len(patches_of)
                patch_counts.append(len(photo_patches))
                if scored[photo]:  # only when calibrating; the folds hold the calibration sample alone
                    by_fold[folds[photo]].add(photo_patches)
                where = replace(item, image=_NO_PIXELS, mask=_NO_PIXELS)  # the transform back to the photo
                patches_of.append((photo_patches, seen.reshape(h, w), where) if scored[photo] else None)

        # The coresets run on a thread of their own, up to CORESET_BACKLOG batches behind the
        # backbone, so that their mostly single-threaded steps overlap the network instead of
        # leaving a core idle. A backlog of 3 (~4 MB of features at batch 8) lets a slow chunk
        # catch up while the network goes on, so the backbone rarely waits. One worker takes the
        # batches in order: the bank is the same as if they ran in line. The "coreset" clock is
        # the time the backbone waits for them.
        with ThreadPoolExecutor(max_workers=1) as coreset_worker:
            waiting: deque[Future[None]] = deque()
            for batch in self._clocked(self._batches(images, progress, "memory bank"), "load_preprocess"):
                learnt.update(fingerprint(item) for item in batch)
                stage = time.perf_counter()
                features = extractor.tensor(np.stack([item.image for item in batch]))
                self._clock("features", stage)
                waiting.append(coreset_worker.submit(take, batch, features))
                stage = time.perf_counter()
                while len(waiting) > CORESET_BACKLOG or (waiting and waiting[0].done()):
                    waiting.popleft().result()
                self._clock("coreset", stage)
            stage = time.perf_counter()
            while waiting:
                waiting.popleft().result()
            self._clock("coreset", stage)
        stage = time.perf_counter()
        self.memory_bank = whole.result()
        self.coreset_projection = whole.projection
        self.coverage_radius = whole.covering_radius
        self._clock("coreset", stage)
        self._index = None
        self.n_train = len(images)
        self.learnt_photos = frozenset(learnt)
        if calibrate:
            owner = np.repeat(np.arange(len(images)), patch_counts)[whole.kept_indices]  # photo of each bank patch
            shared = self.memory_bank[~scored[owner]]
            self._cross_fit_calibration(by_fold, shared, folds, scored, patches_of, photo_names(images))
        self.fit_seconds = time.perf_counter() - start
        self.timings["fit"] = self.fit_seconds

    def _cross_fit_calibration(
        self,
        by_fold: list[Any],
        shared: np.ndarray,
        folds: np.ndarray,
        scored: np.ndarray,
        patches_of: list[tuple[np.ndarray, np.ndarray, Preprocessed] | None],
        names: list[str],
    ) -> None:
        """Score each scored photo against the other folds' coresets and the ``shared`` bank patches
        (those of photos that are not scored) together, and calibrate on those scores.

        The held-out maps of the highest-scoring photos are kept, so that a photo listed as unlike
        the rest can be shown with the heatmap of a bank that never saw it.
        """
        stage = time.perf_counter()
        n_folds = len(by_fold)
        fold_banks = [coreset.result() for coreset in by_fold]
        scores = np.empty(len(folds), dtype=np.float32)
        highest: list[tuple[float, int, np.ndarray]] = []  # (score, photo, held-out map), at most KEPT_MAPS
        for fold in range(n_folds):
            scorer = PatchCore(self.config)
            others = [bank for other, bank in enumerate(fold_banks) if other != fold]
            scorer.memory_bank = np.concatenate([shared, *others])
            members = np.flatnonzero((folds == fold) & scored)
            for group in np.array_split(members, max(1, math.ceil(len(members) / CALIBRATION_BATCH))):
                maps = scorer._anomaly_maps([patches_of[photo] for photo in group])
                scores[group] = [anomaly_map.max() for anomaly_map in maps]
                highest = sorted([*highest, *zip(scores[group].tolist(), group.tolist(), maps)],
                                 key=lambda kept: -kept[0])[:KEPT_MAPS]
        calibrated = np.flatnonzero(scored)
        self.set_calibration(
            scores[calibrated],
            f"{n_folds}-fold cross-fitting, {int(scored.sum())} of {len(folds)} training photos scored",
            [names[photo] for photo in calibrated],
        )
        listed = {entry["photo"] for entry in self.calibration["unlike_the_rest"]}
        self.held_out_maps = {names[photo]: kept for _, photo, kept in highest if names[photo] in listed}
        self._clock("calibration", stage)

    def set_calibration(
        self, scores: np.ndarray, method: str, photos: Sequence[str] = (), carried: Sequence[str] = ()
    ) -> None:
        """Threshold from healthy scores that their own photos did not help to make (models/calibration.py).

        The threshold is read off a Gumbel law fitted through the scores' lower quartile and 90th
        percentile where it flags ``false_alarm_rate`` of healthy parts on average over sets of this
        many photos (``read_at``), the law's scale never below a small share of the memory bank's
        own patch spacing (nearly identical photos must not give a zero-width law). The
        calibration record states the rate, a 95 % interval for it from the number of photos,
        a warning when they are too few for the rate, and the photos (of ``photos``, the names in
        score order) scoring so far above the rest that they should be looked at. The ``carried`` keys
        of the old record stay as they were: what it says of the bank (the photos a fit left out) or of
        scores that are kept.
        """
        kept = {key: self.calibration[key] for key in carried if key in self.calibration}
        scores = np.asarray(scores, dtype=np.float32)
        rate = self.config.false_alarm_rate
        floor = SPREAD_FLOOR * self._patch_spacing()
        tail = fit_tail(scores, floor)
        exceedance, expected_rate = read_at(scores.size, rate)
        # Too few photos to hold the rate: their spread says little, and an interval leaning on the floor
        # under it came out narrow and far below both the stated and the real rate
        low, high = rate_interval(scores, rate, floor if expected_rate <= rate else 0.0, self.config.seed)
        unlike = [
            {"photo": str(photos[index]), "score": float(scores[index])}
            for index in unlike_the_rest(scores, tail)
            if index < len(photos)
        ]
        warning = too_few_photos(scores.size, rate)
        self.calibration_scores = scores
        self.calibration = {
            "method": method,
            "count": int(scores.size),
            "false_alarm_rate": rate,
            "rule": "Gumbel law through the lower quartile and 90th percentile of the healthy scores, read where "
                    "it flags the rate on average over calibration sets of this many photos",
            "location": tail.location,
            "scale": tail.scale,
            "spread_floor": floor,
            "false_alarms_per_1000": round(1000 * expected_rate, 1),
            "interval_per_1000": [1000 * low, 1000 * high],
            "unlike_the_rest": unlike,
            "warnings": [warning] if warning else [],
            "added_on_the_line": 0,  # of these scores, how many photos confirmed good on the line gave (add_good)
            **kept,
        }
        self.threshold = tail.threshold(exceedance)

    def set_false_alarm_rate(self, false_alarm_rate: float) -> None:
        """Read the threshold for another rate off the held-out scores the model keeps: no photos are needed,
        and what the record says of them (their source, the photos it listed or left out) stays true."""
        self.config = self.config.replace(false_alarm_rate=false_alarm_rate)
        self.set_calibration(self.calibration_scores, self.calibration_method,
                             carried=("unlike_the_rest", "left_out", "added_on_the_line"))

    def threshold_for(self, false_alarm_rate: float) -> float:
        """The threshold this model's healthy scores give another false-alarm rate (same rule, same floor)."""
        law = fit_tail(self.calibration_scores, float(self.calibration.get("spread_floor", 0.0)))
        return promised_threshold(law, self.calibration_scores.size, false_alarm_rate)

    def recalibrate(self, images: Sequence[str | Path], progress: bool = True, source: str = "") -> None:
        """Move the threshold to new healthy photos (a new camera, new light) without touching the memory bank.

        The photos are scored against the existing bank, exactly as production would score them,
        and become the calibration set; the bank, and so every score, stays the same.
        """
        rate = self.config.false_alarm_rate
        if len(images) < (needed := fewest_photos(rate)):  # a fit, which can only warn, has its own photos
            raise UserError(
                f"re-calibration needs at least {needed} healthy photos for a false-alarm rate of {rate:g} (got "
                f"{len(images)}): the threshold is read off the spread of their scores, and from fewer it flags "
                "more healthy parts than that even on average; add photos, or set a larger --false-alarm-rate"
            )
        scores, in_bank, marks = [], [], set()
        for name, (item, prediction) in zip(photo_names(images), self._scored(images, progress, "re-calibration")):
            scores.append(prediction.score)
            marks.add(mark := fingerprint(item))
            if mark in self.learnt_photos:
                in_bank.append(name)
        if in_bank:
            raise UserError(
                f"{len(in_bank)} of {len(images)} photos are in the memory bank already (the model was fitted on "
                "them or learnt them): a bank scores its own photos low, so the threshold would drop and flag "
                "healthy parts; re-calibrate on healthy photos the model has not seen, or change only the rate "
                f"with --false-alarm-rate and no --data-dir: {first_few(in_bank)}"
            )
        origin = f" from {source}" if source else ""
        self.set_calibration(  # the bank still lacks the photos the fit left out
            np.asarray(scores), f"re-calibrated on {len(scores)} healthy photos{origin}", photo_names(images),
            carried=("left_out",),
        )
        self.calibration_photos = frozenset(marks)

    def add_good(
        self,
        images: Sequence[str | Path | np.ndarray],
        progress: bool = True,
        source: str = "",
        force: bool = False,
        skip_refused: bool = False,
        labels: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Fold photos confirmed good into the memory bank without a refit, and re-calibrate.

        Only the new photos go through the network, each read once and checked like a training
        photo (unreadable, tiny, blank): if any fails, the update is refused naming every one, at
        every door alike. Each is first scored against the bank as it is, which never saw it: that
        is its held-out healthy score. One above ``good_score_limit``
        thresholds is refused (an operator's wrong click must not teach the bank a defect) unless
        ``force``; ``skip_refused`` leaves such photos out instead of raising. The others' patches
        join the bank by the fit's coreset rule with the bank's patches counted as already kept, so
        the bank grows by ``coreset_sampling_ratio`` of the new patches. The threshold is set from
        the held-out scores the model holds and the new ones together (``set_calibration``); the new
        ones were taken against the smaller bank, so it errs high. A photo the bank holds already (its
        ``fingerprint``: confirmed twice, or sent again) is not added again, for its second score, taken
        by a bank that holds it, would pull the threshold down; the record lists it as ``already_learnt``.
        Returns the update's record, which ``updates`` (saved in the model file) gains; ``labels`` name
        the photos in it.
        """
        from models.coreset import StreamingCoreset

        if self.memory_bank is None or not self.calibration_scores.size:
            raise RuntimeError("add_good needs a fitted, calibrated model")
        if reason := self.why_learning_fails_here():
            raise UserError(f"adding photos needs torch (requirements.txt) here: {reason}")
        if not images:
            raise UserError("adding confirmed-good photos needs at least one photo")
        names = [str(label) for label in labels] if labels is not None else photo_names(images)
        start = time.perf_counter()
        config = self.config
        extractor = self._feature_extractor()  # refuses other backbone weights than the fit's
        limit = config.good_score_limit * self.threshold
        coreset = StreamingCoreset(
            config.coreset_sampling_ratio, config.coreset_projection_dim, config.coreset_chunk_size, config.seed,
            config.coreset_oversampling, known=self.memory_bank, projection=self.coreset_projection,
        )
        scores: list[float] = []
        far: list[str] = []  # above the limit: refused
        forced: list[str] = []  # above the limit, added because of ``force``
        unusable: list[str] = []  # unreadable, or failing a training photo's checks: the update is refused
        repeated: list[str] = []  # in the bank already: not added again
        first_of: dict[bytes, str] = {}  # fingerprint -> the photo of this update that carries it first
        copies: list[tuple[str, str]] = []  # (a photo, the earlier one of this update it repeats): the same outcome
        marks: list[bytes] = []  # fingerprints of the photos this update adds
        position = 0
        for batch in self._batches(images, progress, "adding good photos", checked_labels=names):
            batch_names, position = names[position : position + len(batch)], position + len(batch)
            unusable += [str(item) for item in batch if isinstance(item, ImageReadError)]
            usable = [(name, item) for name, item in zip(batch_names, batch) if not isinstance(item, ImageReadError)]
            if not usable or unusable:  # nothing joins a bank the update will not keep
                continue
            fresh = []
            for name, item in usable:
                mark = fingerprint(item)
                if mark in self.learnt_photos:
                    repeated.append(name)
                elif mark in first_of:
                    copies.append((name, first_of[mark]))
                else:
                    first_of[mark] = name
                    fresh.append((name, item, mark))
            if not fresh:
                continue
            items = [item for _, item, _ in fresh]
            photos = self._seen_patches(items, extractor(np.stack([item.image for item in items])))
            for (name, _, mark), (patches, _, _), anomaly_map in zip(fresh, photos, self._anomaly_maps(photos)):
                score = float(anomaly_map.max())
                if not math.isfinite(score):
                    raise UserError(f"{name}: its score is not a finite number; it cannot join the bank")
                if score > limit:
                    (forced if force else far).append(name)
                    if not force:
                        continue
                if mark not in self.calibration_photos:  # a recalibration's photo has its score in already
                    scores.append(score)
                marks.append(mark)
                coreset.add(patches)
        for name, first in copies:
            (far if first in far else repeated).append(name)
        if unusable:
            raise UserError(unusable_photos(unusable, len(images), "photos confirmed good"))
        if far and not skip_refused:
            raise UserError(
                f"{len(far)} of {len(images)} photos score above {config.good_score_limit:g} x the threshold "
                f"({limit:.3f}) and look defective, not good; check them, or pass --force to add them anyway: "
                + "; ".join(far)
            )
        record: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "photos": len(marks),
            "source": source,
            "refused": far,
            "forced": forced,
            "already_learnt": repeated,
            "threshold_before": float(self.threshold),
            "bank_before": int(len(self.memory_bank)),
        }
        if not marks:
            return {**record, "threshold_after": record["threshold_before"], "bank_after": record["bank_before"]}
        added = coreset.result()
        old_scores, old_method = self.calibration_scores, self.calibration_method
        self.memory_bank = np.concatenate([self.memory_bank, added])
        self.coreset_projection = coreset.projection  # an older file's, drawn once, is kept from now on
        self._index = None
        self.coverage_radius = max(self.coverage_radius, coreset.covering_radius)
        self.n_train += len(marks)
        self.learnt_photos = self.learnt_photos | frozenset(marks)
        earlier = self.calibration.get("added_on_the_line")  # files written before it was kept: every update's
        total = len(scores) + (sum(int(update["photos"]) for update in self.updates) if earlier is None else earlier)
        self.set_calibration(  # the fit's record of the photos it left out stays true
            np.concatenate([old_scores, np.asarray(scores, dtype=np.float32)]),
            f"{old_method.split(' + ')[0]} + {total} photos added on the line, each scored by the bank before it joined",
            carried=("left_out",),
        )
        self.calibration["added_on_the_line"] = total
        record.update(threshold_after=float(self.threshold), bank_after=int(len(self.memory_bank)),
                      seconds=round(time.perf_counter() - start, 2))
        self.updates = [*self.updates, record]
        return record

    def why_learning_needs_torch(self) -> str | None:
        """Why ``add_good`` would import torch, or None where it runs without (ONNX Runtime, NumPy, FAISS)."""
        if self._projection_missing():
            return PROJECTION_MISSING
        if resolve_runtime(self.runtime, self.onnx_file, self.config.device) == "torch":
            if self.onnx_file is None or not self.onnx_file.is_file():
                return "the network runs through torch: no ONNX export of it lies beside the model file"
            return "the network runs through torch here (--runtime torch, or on a GPU)"
        return None

    def why_learning_fails_here(self) -> str | None:
        """Why ``add_good`` cannot run in this environment (it needs torch, and torch is not installed),
        or None: what the line's doors check at start, so a line PC is told before an operator confirms a photo."""
        reason = self.why_learning_needs_torch()
        return reason if reason and not torch_installed() else None

    def _projection_missing(self) -> bool:
        width = self.memory_bank.shape[1] if self.memory_bank is not None else 0
        return self.coreset_projection is None and width > self.config.coreset_projection_dim

    def copy(self) -> PatchCore:
        """A second model sharing this one's feature extractor and arrays, for ``add_good`` to update
        while this one goes on scoring (``add_good`` replaces the arrays, never writes into them)."""
        twin = copy.copy(self)
        twin.timings, twin._index = {}, self._index
        return twin

    @property
    def calibration_method(self) -> str:
        """Where the healthy scores came from (fit-time cross-fitting, or a re-calibration)."""
        return str(self.calibration.get("method", ""))

    def _patch_spacing(self) -> float:
        """Median distance from a memory-bank patch to its nearest other one: the bank's unit of length."""
        bank = self.memory_bank
        if bank is None or len(bank) < 2:
            return 0.0
        sample = bank[np.random.default_rng(self.config.seed).permutation(len(bank))[:1000]]
        distances, _ = self.index.search(np.ascontiguousarray(sample), 2)
        return float(np.median(np.sqrt(np.maximum(distances[:, 1], 0))))

    @property
    def calibration_median(self) -> float:
        return float(np.median(self.calibration_scores))

    @property
    def calibration_std(self) -> float:
        """The robust spread of the healthy scores: 1.4826 x their median absolute deviation (the standard
        deviation, for normal scores, but not pulled by a few odd photos), with a floor. One sigma."""
        scores = self.calibration_scores
        mad = float(np.median(np.abs(scores - np.median(scores))))
        return max(1.4826 * mad, float(self.calibration.get("spread_floor", 0.0)), 1e-12)

    # ----------------------------------------------------------------------------- scoring
    def predict(
        self, images: Sequence[str | Path | np.ndarray], progress: bool = False, description: str = "scoring"
    ) -> list[Prediction]:
        """Score photos (paths or 8-bit RGB arrays); maps come back at each photo's own size."""
        return [prediction for _, prediction in self._scored(images, progress, description)]

    def _scored(
        self, images: Sequence[str | Path | np.ndarray], progress: bool, description: str
    ) -> Iterator[tuple[Preprocessed, Prediction]]:
        """Each photo as the network took it, with its verdict: ``recalibrate`` tells by the first whether the
        bank holds the photo already."""
        if self.memory_bank is None:
            raise RuntimeError("the model is not fitted: call fit() or PatchCore.load() first")
        extractor = self._feature_extractor()
        for batch in self._clocked(self._batches(images, progress, description), "predict_load_preprocess"):
            stage = time.perf_counter()
            features = extractor(np.stack([item.image for item in batch]))
            self._clock("predict_features", stage)
            stage = time.perf_counter()
            photos = self._seen_patches(batch, features)
            scored = [(item, self._prediction(item.warnings, anomaly_map))
                      for item, anomaly_map in zip(batch, self._anomaly_maps(photos))]
            self._clock("predict_knn_map", stage)
            yield from scored

    def prepare_to_score(self) -> None:
        """Open the network and build the index now, by scoring a black photo: an always-on door (the
        service, the watcher) finds a broken export at start rather than at its first photo, and that
        photo does not wait for the start-up."""
        size = self.config.image_size
        self.predict([np.zeros((size, size, 3), np.uint8)])

    def _seen_patches(
        self, batch: list[Preprocessed], features: np.ndarray
    ) -> list[tuple[np.ndarray, np.ndarray, Preprocessed]]:
        """Each photo of a batch as ``_anomaly_maps`` takes it, from its (n, h, w, d) features: the
        features of the patches that see the part, which patches those are (h, w), and the photo."""
        n, h, w, d = features.shape
        keep = self._object_patches(batch, h, w)
        return [
            (patches[seen], seen.reshape(h, w), item)
            for item, patches, seen in zip(batch, features.reshape(n, h * w, d), keep)
        ]

    def _object_patches(self, batch: list[Preprocessed], height: int, width: int) -> np.ndarray:
        """(n, height*width) bool: the patches that see the part, one patch of margin included.

        With the background zeroed, a patch that sees only black carries no information, yet it
        would cost a share of every greedy pass and every k-NN search; on a screw that is over half
        of the input. Where the pipeline did not zero the background (switched off, or no object
        found in that photo) every patch counts.
        """
        every_patch = np.ones(height * width, dtype=bool)
        kernel = np.ones((3, 3), np.uint8)
        keep = []
        for item in batch:
            if not (self.config.object_patches_only and item.background_zeroed):
                keep.append(every_patch)
                continue
            seen = cv2.resize(item.mask.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA) > 0
            seen = cv2.dilate(seen.astype(np.uint8), kernel) > 0
            keep.append(seen.ravel() if seen.any() else every_patch)
        return np.stack(keep)

    def _score_patches(self, photos: Sequence[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """Each photo's patch distances to their nearest healthy patch, and its Eq. 7 weight (1.0 when off).

        All photos go to FAISS in one search: a few hundred queries at a time cost several times
        more per query than a few thousand. The weight is taken at each photo's worst patch
        (paper, Eq. 7): a test patch whose nearest healthy patch sits in a sparse part of the bank
        is less trustworthy evidence of normality, so the photo's map is scaled up; in a dense part, down.
        """
        if not photos:
            return []
        counts = [len(patches) for patches in photos]
        queries = np.ascontiguousarray(np.concatenate(photos), dtype=np.float32)
        distances, neighbours = self.index.search(queries, 1)
        all_scores = np.sqrt(np.maximum(distances[:, 0], 0)).astype(np.float32)
        starts = np.cumsum([0, *counts[:-1]])
        per_photo = np.split(all_scores, starts[1:])
        if not self.config.score_reweighting or len(self.memory_bank) < 2:
            return [(scores, 1.0) for scores in per_photo]
        worst = np.array([start + int(np.argmax(scores)) for start, scores in zip(starts, per_photo)])
        nearest_healthy = self.memory_bank[neighbours[worst, 0]]
        k = min(self.config.num_neighbors, len(self.memory_bank))
        _, neighbourhoods = self.index.search(np.ascontiguousarray(nearest_healthy), k)
        to_neighbours = np.linalg.norm(self.memory_bank[neighbourhoods] - queries[worst][:, None], axis=2)
        # softmax(to_neighbours)[0] = 1 / sum(exp(d_i - d_0)), written out: importing SciPy for it
        # would cost a second of start-up (an overflow to inf gives 0, softmax's own limit)
        with np.errstate(over="ignore"):
            sums = np.exp(to_neighbours.astype(np.float64) - to_neighbours[:, :1]).sum(axis=1)
        return [(scores, float(1.0 - 1.0 / total)) for scores, total in zip(per_photo, sums)]

    def _anomaly_maps(self, photos: Sequence[tuple[np.ndarray, np.ndarray, Preprocessed]]) -> list[np.ndarray]:
        """Each photo's heatmap from (its seen patches' features, which patches it sees, its transform):
        patch distances (0 where the part is not seen), Eq. 7-weighted, upsampled, smoothed and
        mapped onto the original photo. A map's maximum is its photo's score."""
        maps = []
        for (scores, weight), (_, seen, item) in zip(self._score_patches([p for p, _, _ in photos]), photos):
            grid = np.zeros(seen.shape, dtype=np.float32)  # zeroed background: a perfect match
            grid[seen] = scores
            size = self.config.image_size
            anomaly_map = cv2.resize(weight * grid, (size, size), interpolation=cv2.INTER_LINEAR)
            if self.config.heatmap_sigma > 0:
                anomaly_map = cv2.GaussianBlur(anomaly_map, (0, 0), self.config.heatmap_sigma)
            maps.append(to_original(anomaly_map, item))
        return maps

    def prediction_from_map(self, anomaly_map: np.ndarray) -> Prediction:
        """The verdict a photo with this map gets (used to show the held-out maps of training photos)."""
        return self._prediction([], anomaly_map)

    def _prediction(self, warnings: Sequence[str], anomaly_map: np.ndarray) -> Prediction:
        """The verdict read off the map the overlay draws: flagged exactly when some pixel is above the threshold."""
        score = float(anomaly_map.max())
        sigma = (score - self.calibration_median) / self.calibration_std if self.calibration_scores.size else 0.0
        return Prediction(
            score=score,
            threshold=self.threshold,
            anomaly_map=anomaly_map,
            is_anomalous=bool(score > self.threshold),
            sigma=float(sigma),
            anomaly_confidence=anomaly_confidence_from_sigma(sigma),
            warnings=list(warnings),
        )

    # ----------------------------------------------------------------------------- plumbing
    def _clock(self, stage: str, since: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - since

    def _clocked(self, batches: Iterator[list[Preprocessed]], stage: str) -> Iterator[list[Preprocessed]]:
        """The batches, with the time spent waiting for each (decoding, preprocessing) clocked as ``stage``."""
        while True:
            since = time.perf_counter()
            batch = next(batches, None)
            self._clock(stage, since)
            if batch is None:
                return
            yield batch

    def _feature_extractor(self) -> PatchFeatureExtractor:
        if self._extractor is None:
            self._extractor = open_extractor(self.config, self.runtime, self.onnx_file)
            if self.weights_identity and self.weights_identity != self._extractor.weights_identity:
                where = f"{self.model_file}: " if self.model_file else ""
                raise ModelFileError(
                    f"{where}the backbone weights differ from those the model was fitted with "
                    f"({self._extractor.weights_identity} != {self.weights_identity})"
                )
            self.weights_identity = self._extractor.weights_identity
        return self._extractor

    @property
    def index(self) -> faiss.Index | CellIndex:
        """Nearest-neighbour index over the memory bank, built from the bank (models/knn_index.py)."""
        if self._index is None:
            self._index = build_index(self.memory_bank, self.config)
        return self._index

    def _batches(
        self,
        images: Sequence[str | Path | np.ndarray],
        progress: bool,
        description: str,
        checked_labels: Sequence[str] | None = None,
    ) -> Iterator[list[Preprocessed | ImageReadError]]:
        """Preprocessed images in batches; decoding and OpenCV steps run on a thread pool.

        The next batch is prepared while the caller runs the backbone on the current one, and no
        more than two batches are ever in flight, so memory does not grow with the image count.
        Without ``checked_labels`` a photo that cannot be read raises. With them (one per photo), each
        photo also passes the checks every training photo passes (``check_photo``), and
        one that fails either comes back as its ``ImageReadError`` in its place, so that the caller
        can name every unusable photo while reading each file once.
        """

        def prepare(position: int) -> Preprocessed | ImageReadError:
            image = images[position]
            try:
                is_file = isinstance(image, (str, Path))
                photo = read_image(image, self.config.max_image_pixels, keep_grey=True) if is_file else image
                if checked_labels is not None:
                    check_photo(photo, checked_labels[position])
            except ImageReadError as error:
                if checked_labels is None:
                    raise
                return error
            return preprocess(photo, self.config)

        size = self.config.batch_size
        starts = iter(range(0, len(images), size))
        with ThreadPoolExecutor(max_workers=max(1, self.config.num_workers)) as pool, tqdm(
            total=len(images), desc=description, unit="img", disable=not progress, leave=False
        ) as bar:
            in_flight: deque[list[Future[Preprocessed | ImageReadError]]] = deque()

            def submit_next() -> None:
                start = next(starts, None)
                if start is not None:
                    positions = range(start, min(start + size, len(images)))
                    in_flight.append([pool.submit(prepare, position) for position in positions])

            submit_next()
            while in_flight:
                futures = in_flight.popleft()
                submit_next()
                batch = [future.result() for future in futures]
                yield batch
                bar.update(len(batch))

    # ----------------------------------------------------------------------------- model files
    def save(self, path: str | Path) -> Path | None:
        """Write the model as plain data (models/model_file.py), atomically, with its network's ONNX
        export beside it (``<model>.onnx``) where it exports; returns that export's path, or None.

        With the export, every later load scores and learns without importing torch (a line PC
        with requirements-runtime.txt alone, or the cheaper start of any command); it is the graph
        the bank was built through, not a re-export. It is written first, so a model file never
        lies beside the export of another network; one that does not export removes an earlier
        model's export from beside it, which it could never use.
        """
        if self.memory_bank is None:
            raise RuntimeError("cannot save an unfitted model")
        export = self._save_export(Path(path))
        state = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "memory_bank": pack_array(self.memory_bank),
            "coreset_projection": None if self.coreset_projection is None else pack_array(self.coreset_projection),
            "calibration_scores": pack_array(self.calibration_scores),
            "calibration": self.calibration,
            "preprocessing": self.preprocessing,
            "threshold": self.threshold,
            "n_train": self.n_train,
            "fit_seconds": self.fit_seconds,
            "coverage_radius": self.coverage_radius,
            "weights_identity": self.weights_identity,
            "updates": self.updates,
            "learnt_photos": b"".join(sorted(self.learnt_photos)),
            "calibration_photos": b"".join(sorted(self.calibration_photos)),
            "seed": self.config.seed,
            "versions": {
                "python": platform.python_version(),
                "torch": _installed_version("torch"),
                "faiss": faiss.__version__,
                "numpy": np.__version__,
                "opencv": cv2.__version__,
            },
        }
        write_state(path, state)
        return export

    def _save_export(self, path: Path) -> Path | None:
        if self._extractor is None:  # never opened: nothing is known of the network
            return None
        export, graph = onnx_path_for(path), self._extractor.graph()
        if graph is None:
            export.unlink(missing_ok=True)
            return None
        if not (export.is_file() and export.read_bytes() == graph):
            write_atomically(export, graph)
        return export

    def save_update(self, path: str | Path, since: FileIdentity | None) -> Path | None:
        """Save over ``path`` after an update, first keeping the file it replaces as
        ``<name>.before-update-<n>.pkl`` so the update can be undone; returns that copy (None when
        ``path`` did not exist).

        ``since`` is the file at ``path`` as the update found it (``file_identity``): a file changed
        since is never saved over (``check_unchanged``), or one of two updates made at once is lost.
        """
        check_unchanged(path, since)
        kept = keep_previous(path, len(self.updates), self.config.update_copies_kept)
        self.save(path)
        self.file_identity = file_identity(path)
        return kept

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, runtime: str = "auto") -> PatchCore:
        """Read and check a model file. Only plain data is accepted: a file that names any Python
        object is refused, and so is every value a fitted model could not have written.

        ``runtime`` picks the feature extractor back end; ``auto`` scores through ONNX Runtime when
        the network's export ``<model>.onnx`` lies beside the file (``save`` writes it), through torch otherwise.
        A link to a model file (a line's ``current.pkl``) finds the export beside the file it points to.
        """
        path = Path(path)
        onnx_file = onnx_path_for(path)  # refuses a model file named like its own export before reading it
        if not onnx_file.exists() and path.is_symlink() and path.is_file():  # not a loop or a dangling link
            onnx_file = onnx_path_for(path.resolve())
        identity = file_identity(path)  # before reading: a file replaced meanwhile reads as replaced later
        state = read_state(path)
        try:
            model = cls._from_state(state, device)
        except (ValueError, TypeError, KeyError) as error:
            raise ModelFileError(f"{path}: {error}") from None
        model.runtime = runtime
        model.model_file = path
        model.file_identity = identity
        model.onnx_file = onnx_file
        if resolve_runtime(runtime, model.onnx_file, model.config.device) == "onnx" and not model.onnx_file.is_file():
            raise ModelFileError(
                f"{model.onnx_file}: no ONNX export of this model; write it with "
                f"scripts/export_onnx.py --model {path}"
            )
        return model

    @classmethod
    def _from_state(cls, state: Any, device: str | None) -> PatchCore:
        """A model from an unpickled state, refusing anything missing, mistyped or not finite."""
        check_state(state)
        config_values = dict(state["config"])
        if device is not None:
            config_values["device"] = device
        model = cls(Config.from_dict(config_values))
        model.memory_bank = unpack_array(state["memory_bank"], "memory_bank")
        if state.get("coreset_projection") is not None:  # absent from older files
            model.coreset_projection = unpack_array(state["coreset_projection"], "coreset_projection")
        model.calibration_scores = unpack_array(state["calibration_scores"], "calibration_scores")
        legacy = {"method": "held-out photos", "warnings": []}  # files written before the record held more
        model.calibration = checked_calibration(state.get("calibration", legacy))
        model.preprocessing = dict(state.get("preprocessing", {}))
        model.threshold = float(state["threshold"])
        model.n_train = state["n_train"]
        model.fit_seconds = float(state["fit_seconds"])
        model.coverage_radius = float(state.get("coverage_radius", math.nan))  # absent from older files
        model.weights_identity = state["weights_identity"]
        model.updates = checked_updates(state.get("updates", []))  # absent from files written before any update
        for field in ("learnt_photos", "calibration_photos"):  # absent from older files
            setattr(model, field, checked_fingerprints(state.get(field, b""), DIGEST_BYTES, field))
        check_fitted_values(
            model.config, model.threshold, model.memory_bank, model.calibration_scores, model.calibration, model.n_train
        )
        check_projection(model.coreset_projection, model.memory_bank.shape[1], model.config.coreset_projection_dim)
        return model


def _installed_version(package: str) -> str:
    """A package's version as installed, without importing it (an update through ONNX never loads torch)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def learn_on_a_copy(
    model: PatchCore, model_path: Path, photos: Sequence[str | Path], labels: Sequence[str], source: str,
    force: bool = False,
) -> tuple[PatchCore | None, dict[str, Any]]:
    """Photos confirmed good on the line (the service's /feedback, the watcher's confirmed_good/),
    added to a copy of ``model`` and saved over ``model_path``, keeping the file it replaces.

    Returns the copy to score with from now on (None when nothing was learnt) and the update's
    record. ``model`` itself is never changed, so scoring goes on with it meanwhile. Photos that
    look defective are left out (``skip_refused``); an unreadable one leaves the whole batch out.
    A model file replaced on disk since ``model`` was loaded (a new fit put in place) is never
    saved over: nothing is learnt, and the update's record says to restart on the new file. A save
    that fails (a full disk) learns nothing either, and its record says why.
    """

    def refused(error: Exception) -> dict[str, Any]:  # when and from where, as a record of an update that went in
        return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": source, "photos": 0, "refused": list(labels),
                "error": str(error)}

    try:
        check_unchanged(model_path, model.file_identity)  # before the work of adding photos
        candidate = model.copy()
        update = candidate.add_good(photos, progress=False, source=source, force=force, skip_refused=True,
                                    labels=labels)
    except (UserError, ValueError, OSError) as error:
        return None, refused(error)
    if not update["photos"]:
        return None, update
    try:
        candidate.save_update(model_path, model.file_identity)
    except (ModelFileError, OutputError) as error:  # replaced while the photos were added, or a full disk
        return None, refused(error)
    return candidate, update


