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
        """Build the memory bank from healthy photos and calibrate the threshold on held-out ones.

        A seeded ``validation_fraction`` of the photos never enters the memory bank: their scores
        are what a healthy part scores, which sets the threshold without touching test data.
        """
        import torch

        from models.coreset import StreamingCoreset

        start = time.perf_counter()
        self.timings = {}
        config = self.config
        torch.manual_seed(config.seed)
        if len(images) < 2:
            raise ValueError("fitting needs at least 2 healthy images (1 for the bank, 1 to calibrate)")
        order = np.random.default_rng(config.seed).permutation(len(images))
        n_holdout = min(len(images) - 1, max(1, round(config.validation_fraction * len(images))))
        holdout = [images[i] for i in sorted(order[:n_holdout])]
        bank_images = [images[i] for i in sorted(order[n_holdout:])]

        extractor = self._feature_extractor()
        coreset = StreamingCoreset(
            config.coreset_sampling_ratio,
            config.coreset_projection_dim,
            config.coreset_chunk_size,
            config.seed,
            extractor.device,
        )
        for batch in self._clocked(self._batches(bank_images, progress, "memory bank"), "load_preprocess"):
            stage = time.perf_counter()
            features = extractor.tensor(np.stack([item.image for item in batch]))
            self._clock("features", stage)
            stage = time.perf_counter()
            n, h, w, d = features.shape
            keep = torch.from_numpy(self._object_patches(batch, h, w)).to(features.device)
            coreset.add(features.reshape(n, h * w, d)[keep])
            self._clock("coreset", stage)
        stage = time.perf_counter()
        self.memory_bank = coreset.result()
        self._clock("coreset", stage)
        self._index = None
        self.n_train = len(bank_images)

        stage = time.perf_counter()
        scores = [p.score for p in self.predict(holdout, progress=progress, description="calibration")]
        self._clock("calibration", stage)
        self.calibration_scores = np.asarray(scores, dtype=np.float32)
        self.threshold = float(np.percentile(self.calibration_scores, config.threshold_percentile))
        self.fit_seconds = time.perf_counter() - start
        self.timings["fit"] = self.fit_seconds

    @property
    def calibration_mean(self) -> float:
        return float(self.calibration_scores.mean())

    @property
    def calibration_std(self) -> float:
        """Spread of healthy scores; floored so one held-out image cannot make sigma infinite."""
        return max(float(self.calibration_scores.std()), 1e-6 * max(1.0, abs(self.calibration_mean)))

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
            distances, neighbours = self.index.search(patches[keep], 1)
            patch_scores = np.zeros((n, h * w), dtype=np.float32)  # zeroed background: a perfect match
            patch_scores[keep] = np.sqrt(np.maximum(distances[:, 0], 0))
            nearest = np.full((n, h * w), -1, dtype=np.int64)
            nearest[keep] = neighbours[:, 0]
            for item, scores, bank_ids, image_patches in zip(batch, patch_scores, nearest, patches):
                score = self._image_score(scores, bank_ids, image_patches)
                predictions.append(self._prediction(item, scores.reshape(h, w), score))
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

    def _image_score(self, patch_scores: np.ndarray, bank_ids: np.ndarray, patches: np.ndarray) -> float:
        """The worst patch's distance, optionally re-weighted by its neighbourhood (paper, Eq. 7).

        A test patch whose nearest healthy patch sits in a sparse part of the bank is less
        trustworthy evidence of normality, so its score is scaled up; in a dense part, down.
        """
        worst = int(np.argmax(patch_scores))
        score = float(patch_scores[worst])
        if not self.config.score_reweighting or len(self.memory_bank) < 2 or bank_ids[worst] < 0:
            return score
        nearest_healthy = self.memory_bank[bank_ids[worst]][None]
        k = min(self.config.num_neighbors, len(self.memory_bank))
        _, neighbourhood = self.index.search(nearest_healthy, k)
        to_neighbours = np.linalg.norm(self.memory_bank[neighbourhood[0]] - patches[worst], axis=1)
        # softmax(to_neighbours)[0], written out: importing SciPy for it would cost a second of start-up
        weight = 1.0 - 1.0 / np.exp(to_neighbours[0] - to_neighbours).sum()
        return float(weight * score)

    def _prediction(self, item: Preprocessed, grid: np.ndarray, score: float) -> Prediction:
        size = self.config.image_size
        anomaly_map = cv2.resize(grid.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
        if self.config.heatmap_sigma > 0:
            anomaly_map = cv2.GaussianBlur(anomaly_map, (0, 0), self.config.heatmap_sigma)
        sigma = (score - self.calibration_mean) / self.calibration_std if self.calibration_scores.size else 0.0
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
