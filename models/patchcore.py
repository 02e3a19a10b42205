"""PatchCore (Roth et al., CVPR 2022): a memory bank of healthy patches and nearest-neighbour scoring.

``PatchCore`` is the whole model a user handles: ``fit`` on healthy photos, ``predict`` verdicts and
heatmaps on the original photos, ``save`` / ``load`` a model file that holds plain data only.

Scoring needs only NumPy, OpenCV, FAISS and a feature extractor back end (models/backend.py); torch
is imported by fitting and by the torch back end alone, so a model scored through ONNX Runtime
runs without it.
"""

from __future__ import annotations

import math
import pickle
import platform
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import cv2
import faiss
import numpy as np
from tqdm import tqdm

from config import Config, UserError
from models.backend import PatchFeatureExtractor, onnx_path_for, open_extractor, resolve_runtime
from preprocessing.io import read_image, write_atomically
from preprocessing.pipeline import Preprocessed, preprocess, to_original

FORMAT_VERSION = 1
MIN_CALIBRATION_PHOTOS = 30  # below this the 99th percentile of healthy scores is little more than their maximum
MAX_CALIBRATION_PHOTOS = 500  # more add little to a percentile and would hold all their patches in memory
SPREAD_FLOOR = 0.01  # the healthy spread is never below this share of the bank's patch spacing


class ModelFileError(UserError, ValueError):
    """A model file that cannot be loaded; the message names the file and the reason."""


@dataclass
class Prediction:
    """The verdict on one photo, with its heatmap in the photo's own pixel coordinates."""

    score: float
    anomaly_map: np.ndarray  # (H, W) float32, same units as score
    is_anomalous: bool
    sigma: float  # distance of the score from healthy, in calibration standard deviations
    confidence: float  # 0..1 that the part is anomalous: 1σ -> 0.68, 2σ -> 0.95, 3σ -> 0.997
    warnings: list[str] = field(default_factory=list)


def confidence_from_sigma(sigma: float) -> float:
    """Confidence that a part is anomalous: the share of healthy scores within ±sigma of their mean,
    so 1σ -> 68%, 2σ -> 95%, 3σ -> 99.7%; at or below the healthy mean, 0."""
    return math.erf(max(sigma, 0.0) / math.sqrt(2))


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
        self.weights_identity = ""
        self.runtime = "torch"  # feature extractor back end: torch | onnx | auto (models/backend.py)
        self.onnx_file: Path | None = None
        # Seconds per stage, summed since the last fit started: fit's own stages, and predict_* for
        # scoring (which includes the fit's calibration); scripts/benchmark.py reads them.
        self.timings: dict[str, float] = {}
        self._extractor: PatchFeatureExtractor | None = None
        self._index: faiss.Index | None = None

    # ----------------------------------------------------------------------------- fitting
    def fit(self, images: Sequence[str | Path], progress: bool = True) -> None:
        """Build the memory bank from every healthy photo and calibrate on all of them by cross-fitting.

        With ``preprocess: auto`` the steps are first decided from these photos alone
        (models.pipeline_selection). Calibration: the photos are split into seeded folds, each fold
        gets its own coreset, and every photo is scored against the coresets of the other folds, so
        each healthy score comes from a bank that never saw that photo, and all photos count.
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
            self.config, self.preprocessing = choose_preprocessing(images, self.config, progress)
            self._clock("preprocess_choice", stage)
        config = self.config
        n_folds = min(config.calibration_folds, len(images))
        order = np.random.default_rng(config.seed).permutation(len(images))
        folds = order % n_folds
        scored = order < MAX_CALIBRATION_PHOTOS  # a seeded sample bounds the memory of very large sets
        extractor = self._feature_extractor()

        def new_coreset(ratio: float, seed: int) -> StreamingCoreset:
            return StreamingCoreset(
                ratio, config.coreset_projection_dim, config.coreset_chunk_size, seed, extractor.device
            )

        # Each photo is scored by the other folds' coresets together; picking a share n/(n-1) larger
        # per fold gives that union as many patches as the final bank, so calibration scores are as
        # low as a new healthy photo's against the final bank, not inflated by a sparser bank.
        fold_ratio = min(1.0, config.coreset_sampling_ratio * n_folds / (n_folds - 1))
        whole = new_coreset(config.coreset_sampling_ratio, config.seed)
        by_fold = [new_coreset(fold_ratio, config.seed + 1 + fold) for fold in range(n_folds)]
        patches_of: list[np.ndarray | None] = []  # each scored photo's patches, kept until the fold banks exist
        for batch in self._clocked(self._batches(images, progress, "memory bank"), "load_preprocess"):
            stage = time.perf_counter()
            features = extractor.tensor(np.stack([item.image for item in batch]))
            self._clock("features", stage)
            stage = time.perf_counter()
            n, h, w, d = features.shape
            keep = torch.from_numpy(self._object_patches(batch, h, w)).to(features.device)
            kept = features.reshape(n, h * w, d)[keep]
            whole.add(kept)
            per_photo = torch.split(kept, keep.sum(dim=1).tolist())
            for photo_patches in per_photo:
                photo = len(patches_of)
                by_fold[folds[photo]].add(photo_patches)
                patches_of.append(photo_patches.cpu().numpy() if scored[photo] else None)
            self._clock("coreset", stage)
        stage = time.perf_counter()
        self.memory_bank = whole.result()
        self._clock("coreset", stage)
        self._index = None
        self.n_train = len(images)

        stage = time.perf_counter()
        fold_banks = [coreset.result() for coreset in by_fold]
        scores = np.empty(len(images), dtype=np.float32)
        for fold in range(n_folds):
            scorer = PatchCore(config)
            scorer.memory_bank = np.concatenate([bank for other, bank in enumerate(fold_banks) if other != fold])
            for photo in np.flatnonzero((folds == fold) & scored):
                scores[photo] = scorer._score_patches(patches_of[photo])[1]
        self.set_calibration(
            scores[scored], f"{n_folds}-fold cross-fitting, {int(scored.sum())} of {len(images)} training photos scored"
        )
        self._clock("calibration", stage)
        self.fit_seconds = time.perf_counter() - start
        self.timings["fit"] = self.fit_seconds

    def set_calibration(self, scores: np.ndarray, method: str) -> None:
        """Threshold and healthy spread from healthy scores that their own photos did not help to make.

        Both are robust, so one odd healthy photo cannot move them: the centre is the median, the
        spread 1.4826 x the median absolute deviation (the standard deviation, for normal scores),
        never below a small share of the memory bank's own patch spacing so that nearly identical
        photos cannot turn a healthy part into a 10^5-sigma outlier. The threshold is where the
        ``threshold_percentile`` of healthy scores lies on that robust normal fit (99 -> median +
        2.33 spreads); an empirical 99th percentile of a few dozen photos is just their maximum.
        """
        scores = np.asarray(scores, dtype=np.float32)
        self.calibration_scores = scores
        warnings = []
        if scores.size < MIN_CALIBRATION_PHOTOS:
            warnings.append(
                f"the threshold rests on only {scores.size} healthy photos and is uncertain; "
                f"fit on at least {MIN_CALIBRATION_PHOTOS} (ideally 100+) for a threshold you can rely on"
            )
        self.calibration = {
            "method": method,
            "count": int(scores.size),
            "spread_floor": SPREAD_FLOOR * self._patch_spacing(),
            "warnings": warnings,
        }
        z = NormalDist().inv_cdf(self.config.threshold_percentile / 100)
        self.threshold = self.calibration_median + z * self.calibration_std

    def _patch_spacing(self) -> float:
        """Median distance from a memory-bank patch to its nearest other one: the bank's unit of length."""
        bank = self.memory_bank
        if bank is None or len(bank) < 2:
            return 0.0
        sample = bank[np.random.default_rng(self.config.seed).permutation(len(bank))[:1000]]
        distances, _ = self.index.search(np.ascontiguousarray(sample), 2)
        return float(np.median(np.sqrt(np.maximum(distances[:, 1], 0))))

    @property
    def calibration_mean(self) -> float:
        return float(self.calibration_scores.mean())

    @property
    def calibration_median(self) -> float:
        return float(np.median(self.calibration_scores))

    @property
    def calibration_std(self) -> float:
        """Healthy spread, estimated robustly (1.4826 x MAD estimates the standard deviation), with a floor."""
        scores = self.calibration_scores
        mad = float(np.median(np.abs(scores - np.median(scores))))
        return max(1.4826 * mad, float(self.calibration.get("spread_floor", 0.0)), 1e-12)

    # ----------------------------------------------------------------------------- scoring
    def predict(
        self, images: Sequence[str | Path | np.ndarray], progress: bool = False, description: str = "scoring"
    ) -> list[Prediction]:
        """Score photos (paths or 8-bit RGB arrays); maps come back at each photo's own size."""
        if self.memory_bank is None:
            raise RuntimeError("the model is not fitted: call fit() or PatchCore.load() first")
        extractor = self._feature_extractor()
        predictions = []
        for batch in self._clocked(self._batches(images, progress, description), "predict_load_preprocess"):
            stage = time.perf_counter()
            features = extractor(np.stack([item.image for item in batch]))
            self._clock("predict_features", stage)
            stage = time.perf_counter()
            n, h, w, d = features.shape
            patches = features.reshape(n, h * w, d)
            keep = self._object_patches(batch, h, w)
            for item, image_patches, seen in zip(batch, patches, keep):
                grid = np.zeros(h * w, dtype=np.float32)  # zeroed background: a perfect match
                grid[seen], score = self._score_patches(image_patches[seen])
                predictions.append(self._prediction(item, grid.reshape(h, w), score))
            self._clock("predict_knn_map", stage)
        return predictions

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

    def _score_patches(self, patches: np.ndarray) -> tuple[np.ndarray, float]:
        """Each patch's distance to its nearest healthy patch, and the image score.

        The image score is the worst patch's distance, optionally re-weighted by its neighbourhood
        (paper, Eq. 7): a test patch whose nearest healthy patch sits in a sparse part of the bank
        is less trustworthy evidence of normality, so its score is scaled up; in a dense part, down.
        """
        distances, neighbours = self.index.search(np.ascontiguousarray(patches, dtype=np.float32), 1)
        patch_scores = np.sqrt(np.maximum(distances[:, 0], 0)).astype(np.float32)
        worst = int(np.argmax(patch_scores))
        score = float(patch_scores[worst])
        if not self.config.score_reweighting or len(self.memory_bank) < 2:
            return patch_scores, score
        nearest_healthy = self.memory_bank[neighbours[worst, 0]][None]
        k = min(self.config.num_neighbors, len(self.memory_bank))
        _, neighbourhood = self.index.search(nearest_healthy, k)
        to_neighbours = np.linalg.norm(self.memory_bank[neighbourhood[0]] - patches[worst], axis=1)
        # softmax(to_neighbours)[0] = 1 / sum(exp(d_i - d_0)), written out: importing SciPy for it
        # would cost a second of start-up (an overflow to inf gives 0, softmax's own limit)
        with np.errstate(over="ignore"):
            weight = 1.0 - 1.0 / np.exp(to_neighbours.astype(np.float64) - to_neighbours[0]).sum()
        return patch_scores, float(weight * score)

    def _prediction(self, item: Preprocessed, grid: np.ndarray, score: float) -> Prediction:
        size = self.config.image_size
        anomaly_map = cv2.resize(grid.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
        if self.config.heatmap_sigma > 0:
            anomaly_map = cv2.GaussianBlur(anomaly_map, (0, 0), self.config.heatmap_sigma)
        sigma = (score - self.calibration_median) / self.calibration_std if self.calibration_scores.size else 0.0
        return Prediction(
            score=score,
            anomaly_map=to_original(anomaly_map, item),
            is_anomalous=bool(score > self.threshold),
            sigma=float(sigma),
            confidence=confidence_from_sigma(sigma),
            warnings=list(item.warnings),
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
                raise ModelFileError(
                    f"the backbone weights differ from those the model was fitted with "
                    f"({self._extractor.weights_identity} != {self.weights_identity})"
                )
            self.weights_identity = self._extractor.weights_identity
        return self._extractor

    @property
    def index(self) -> faiss.Index:
        """L2 nearest-neighbour index over the memory bank, rebuilt from the bank (on the GPU when FAISS can).

        ``flat`` is exact. ``ivf`` searches only the ``ivf_nprobe`` nearest of ~4·√N k-means cells:
        much faster on very large banks, at a small measured accuracy cost (README, Performance).
        """
        if self._index is None:
            dim = self.memory_bank.shape[1]
            if self.config.knn_index == "ivf":
                n_cells = max(1, min(int(4 * math.sqrt(len(self.memory_bank))), len(self.memory_bank) // 39))
                index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, n_cells)
                index.cp.seed = self.config.seed
                index.train(self.memory_bank)
                index.nprobe = self.config.ivf_nprobe
            else:
                index = faiss.IndexFlatL2(dim)
            if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and self.config.device != "cpu":
                index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            index.add(self.memory_bank)
            self._index = index
        return self._index

    def _batches(
        self, images: Sequence[str | Path | np.ndarray], progress: bool, description: str
    ) -> Iterator[list[Preprocessed]]:
        """Preprocessed images in batches; decoding and OpenCV steps run on a thread pool.

        The next batch is prepared while the caller runs the backbone on the current one, and no
        more than two batches are ever in flight, so memory does not grow with the image count.
        """

        def prepare(image: str | Path | np.ndarray) -> Preprocessed:
            return preprocess(read_image(image) if isinstance(image, (str, Path)) else image, self.config)

        size = self.config.batch_size
        starts = iter(range(0, len(images), size))
        with ThreadPoolExecutor(max_workers=max(1, self.config.num_workers)) as pool, tqdm(
            total=len(images), desc=description, unit="img", disable=not progress, leave=False
        ) as bar:
            in_flight: deque[list[Future[Preprocessed]]] = deque()

            def submit_next() -> None:
                start = next(starts, None)
                if start is not None:
                    in_flight.append([pool.submit(prepare, image) for image in images[start : start + size]])

            submit_next()
            while in_flight:
                futures = in_flight.popleft()
                submit_next()
                batch = [future.result() for future in futures]
                yield batch
                bar.update(len(batch))

    # ----------------------------------------------------------------------------- model files
    def save(self, path: str | Path) -> None:
        """Write the model atomically: a crash never leaves a half-written file under ``path``."""
        if self.memory_bank is None:
            raise RuntimeError("cannot save an unfitted model")
        import torch  # a fitted model has it loaded already

        state = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "memory_bank": _pack_array(self.memory_bank),
            "calibration_scores": _pack_array(self.calibration_scores),
            "calibration": self.calibration,
            "preprocessing": self.preprocessing,
            "threshold": self.threshold,
            "n_train": self.n_train,
            "fit_seconds": self.fit_seconds,
            "weights_identity": self.weights_identity,
            "seed": self.config.seed,
            "versions": {
                "python": platform.python_version(),
                "torch": str(torch.__version__),
                "faiss": faiss.__version__,
                "numpy": np.__version__,
                "opencv": cv2.__version__,
            },
        }
        write_atomically(path, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, runtime: str = "auto") -> PatchCore:
        """Read a model file. Only plain data is accepted: a file that names any Python object is refused.

        ``runtime`` picks the feature extractor back end; ``auto`` scores through ONNX Runtime when
        ``scripts/export_onnx.py`` has written ``<model>.onnx`` beside the file, through torch otherwise.
        """
        path = Path(path)
        try:
            with open(path, "rb") as handle:
                state = _PlainDataUnpickler(handle).load()
        except FileNotFoundError:
            raise ModelFileError(f"{path}: model file not found") from None
        except pickle.UnpicklingError as error:
            raise ModelFileError(f"{path}: refused, {error}") from None
        except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as error:
            raise ModelFileError(f"{path}: not a model file or truncated ({error})") from None
        if not isinstance(state, dict) or "format_version" not in state:
            raise ModelFileError(f"{path}: not a fastener-anomaly-detection model file")
        if state["format_version"] != FORMAT_VERSION:
            raise ModelFileError(
                f"{path}: model format version {state['format_version']} is not supported by this "
                f"version (expects {FORMAT_VERSION}); refit the model with train.py"
            )
        config_values = dict(state["config"])
        if device is not None:
            config_values["device"] = device
        model = cls(Config.from_dict(config_values))
        model.memory_bank = _unpack_array(state["memory_bank"])
        model.calibration_scores = _unpack_array(state["calibration_scores"])
        model.calibration = dict(state.get("calibration", {"method": "held-out photos", "warnings": []}))
        model.preprocessing = dict(state.get("preprocessing", {}))
        model.threshold = float(state["threshold"])
        model.n_train = int(state["n_train"])
        model.fit_seconds = float(state["fit_seconds"])
        model.weights_identity = str(state["weights_identity"])
        model.runtime = runtime
        model.onnx_file = onnx_path_for(path)
        if resolve_runtime(runtime, model.onnx_file) == "onnx" and not model.onnx_file.is_file():
            raise ModelFileError(
                f"{model.onnx_file}: no ONNX export of this model; write it with "
                f"scripts/export_onnx.py --model {path}"
            )
        return model


def _pack_array(array: np.ndarray) -> dict[str, Any]:
    """An array as builtins only, so the pickle never has to name a NumPy function."""
    array = np.ascontiguousarray(array)
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}


def _unpack_array(packed: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(packed["dtype"])
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed in a model file")
    return np.frombuffer(packed["data"], dtype=dtype).reshape(packed["shape"]).copy()


class _PlainDataUnpickler(pickle.Unpickler):
    """Refuses every global: a model file holds dicts, lists, strings, numbers and bytes only."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"the file asks to load {module}.{name}; model files hold plain data only")
