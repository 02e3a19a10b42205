"""What the coreset ratio costs: accuracy, time, size and covering radius per ratio and coreset scheme.

Usage:
    .venv/bin/python benchmarks/coreset_curve.py --backbone efficientnet_lite0 --preprocess false \\
        --ratios 0.005 0.01 --schemes default exact
    .venv/bin/python benchmarks/coreset_curve.py --backbone efficientnet_lite0 --scale 3000

Schemes: ``default`` (the model's coreset: chunks that each continue greedy from the patches kept
so far, one exact pass where chunks would get under 64 picks), ``oversampled`` (``coreset_oversampling`` 8: candidates per chunk and a global greedy pass
where the bank is small) and ``exact`` (one greedy pass over every patch: slow, memory O(patches)).

The backbone runs once per photo batch: its features are kept (keyed by the batch's bytes) and
reused by every fit, calibration and evaluation of the same preprocessing setting, so a row costs
its coreset, its k-NN scoring and its metrics. Rows are appended to outputs/coreset_curve.jsonl as
they finish; the table of every row so far is printed and written to outputs/coreset_curve.md.

``--scale N`` replays the object patches of the training photos, with fresh noise on every pass, as
an N-photo stream through the bank's coreset alone (default ratio; kept-so-far search exact
throughout, and as the model runs it) and reports its photos/s over the first and the last 300 photos,
its covering radius and its resident memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models.patchcore as patchcore  # noqa: E402
from config import CATEGORY_DEFAULTS, Config, fail, run_cli  # noqa: E402
from evaluation.report import evaluate  # noqa: E402
import models.coreset as coreset  # noqa: E402
from models.coreset import StreamingCoreset  # noqa: E402
from evaluation.mvtec import train_images  # noqa: E402
from output_files import write_atomically  # noqa: E402

DEFAULT_DATA_DIR = ROOT / "data" / "mvtec_ad" / "screw"
SCHEMES = {
    "default": {},
    "oversampled": {"coreset_oversampling": 8.0},
    "exact": {"coreset_chunk_size": 1_000_000},  # one chunk: every patch of a set up to a million
}
SCALE_WINDOW = 300  # photos at the start and at the end of the scale run whose rate is compared


class CachedExtractor:
    """The real feature extractor, run once per distinct input batch."""

    def __init__(self, extractor: Any) -> None:
        self.extractor = extractor
        self.device = extractor.device
        self.weights_identity = extractor.weights_identity
        self.seconds = 0.0
        self._features: dict[bytes, torch.Tensor] = {}

    def tensor(self, images: np.ndarray) -> torch.Tensor:
        """The features as fitting takes them (a tensor on the extractor's device)."""
        key = hashlib.blake2b(np.ascontiguousarray(images).data, digest_size=16).digest() + bytes(str(images.shape), "ascii")
        if key not in self._features:
            start = time.perf_counter()
            self._features[key] = self.extractor.tensor(images)
            self.seconds += time.perf_counter() - start
        return self._features[key]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """The features as scoring takes them (NumPy)."""
        return self.tensor(images).cpu().numpy()

    def graph(self) -> bytes | None:
        return self.extractor.graph()


class TimedCoreset(StreamingCoreset):
    """The model's coreset, timed, and keeping what it was fed when asked (for the scale run)."""

    seconds = 0.0
    recorded: list[np.ndarray] | None = None
    recorded_seed = -1  # the seed of the coreset whose input is recorded (the calibration folds' differ)

    def add(self, features: np.ndarray) -> None:
        if TimedCoreset.recorded is not None and self.seed == TimedCoreset.recorded_seed:  # the bank's own coreset
            TimedCoreset.recorded.append(torch.from_numpy(np.array(features)))
        start = time.perf_counter()
        super().add(features)
        TimedCoreset.seconds += time.perf_counter() - start

    def result(self) -> np.ndarray:
        start = time.perf_counter()
        bank = super().result()
        TimedCoreset.seconds += time.perf_counter() - start
        return bank


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--preprocess", choices=["true", "false"], nargs="+", default=["true", "false"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.001, 0.005, 0.01, 0.05, 0.1, 0.25])
    parser.add_argument("--schemes", choices=list(SCHEMES), nargs="+", default=["default", "exact"])
    parser.add_argument("--exact-max-ratio", type=float, default=0.01, help="exact greedy costs O(patches x bank): skip it above")
    parser.add_argument("--scale", type=int, metavar="N", help="instead: an N-photo stream through the coreset alone")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "coreset_curve")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace, preprocess: bool, **changes: Any) -> Config:
    defaults = CATEGORY_DEFAULTS.get(args.data_dir.resolve().name, CATEGORY_DEFAULTS["custom"])
    return Config(**{**defaults, "backbone": args.backbone, "preprocess": preprocess, **changes})


def curve_row(config: Config, extractor: CachedExtractor, args: argparse.Namespace, scheme: str) -> dict[str, Any]:
    """Fit with ``config`` on cached features, evaluate on the test split, return one table row."""
    model = patchcore.PatchCore(config)
    model._extractor = extractor
    TimedCoreset.seconds = 0.0
    backbone_before, start = extractor.seconds, time.perf_counter()
    model.fit(train_images(args.data_dir), progress=False)
    fit_seconds = time.perf_counter() - start - (extractor.seconds - backbone_before)
    coreset_seconds = TimedCoreset.seconds
    with tempfile.TemporaryDirectory() as scratch:
        metrics = evaluate(model, args.data_dir, scratch, fit_seconds=fit_seconds, quiet=True)
        model.save(Path(scratch) / "model.pkl")
        file_mib = (Path(scratch) / "model.pkl").stat().st_size / 2**20
    return {
        "preprocess": config.preprocess,
        "ratio": config.coreset_sampling_ratio,
        "scheme": scheme,
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics["pixel_auroc"],
        "aupro": metrics["aupro"],
        "coreset_s": coreset_seconds,
        "fit_s_without_backbone": fit_seconds,
        "bank": len(model.memory_bank),
        "model_mib": file_mib,
        "covering_radius": model.coverage_radius,
        "threshold": model.threshold,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| preprocess | ratio | scheme | image AUROC | pixel AUROC | AUPRO | coreset s | bank | model MiB | covering radius |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in sorted(rows, key=lambda r: (r["preprocess"] != "on", r["ratio"], r["scheme"])):
        lines.append(
            f"| {row['preprocess']} | {row['ratio']} | {row['scheme']} | {row['image_auroc']:.3f} "
            f"| {row['pixel_auroc']:.3f} | {row['aupro']:.3f} | {row['coreset_s']:.1f} | {row['bank']:,} "
            f"| {row['model_mib']:.1f} | {row['covering_radius']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scale_run(args: argparse.Namespace, n_photos: int) -> list[dict[str, Any]]:
    """Stream ``n_photos`` photos' worth of real object patches (noised replays) through the bank's coreset,
    with the kept-so-far search exact throughout and as the model runs it (an inverted file past
    ``EXACT_UP_TO`` kept patches; 0, so from the first one)."""
    config = settings(args, preprocess=True)
    model = patchcore.PatchCore(config)
    TimedCoreset.recorded, TimedCoreset.recorded_seed = [], config.seed
    model.fit(train_images(args.data_dir), progress=False)
    batches, TimedCoreset.recorded = TimedCoreset.recorded, None
    spread = float(torch.cat(batches).std())
    photos_per_batch = config.batch_size
    rows = []
    now = coreset.EXACT_UP_TO
    now_label = f"inverted file past {now:,} (the model's)" if now else "inverted file throughout (the model's)"
    for search, exact_up_to in (("exact throughout", 2**62), (now_label, now)):
        coreset.EXACT_UP_TO = exact_up_to
        streaming = StreamingCoreset(
            config.coreset_sampling_ratio, config.coreset_projection_dim, config.coreset_chunk_size, config.seed
        )
        generator = torch.Generator().manual_seed(0)
        seconds_per_batch, photos, rss_start = [], 0, math.nan
        while photos < n_photos:
            features = batches[(photos // photos_per_batch) % len(batches)]
            noisy = features + 0.05 * spread * torch.randn(features.shape, generator=generator)
            start = time.perf_counter()
            streaming.add(noisy.numpy())
            seconds_per_batch.append(time.perf_counter() - start)
            photos += photos_per_batch
            if math.isnan(rss_start) and photos >= SCALE_WINDOW:
                rss_start = resident_mib()
        streaming.result()
        coreset.EXACT_UP_TO = now
        window = math.ceil(SCALE_WINDOW / photos_per_batch)  # batches; rates are over their photos
        rows.append(
            {
                "kept_so_far_search": search,
                "photos": photos,
                "patches": streaming._seen,
                "bank": len(streaming.kept_indices),
                "coreset_photos_per_s_first": window * photos_per_batch / sum(seconds_per_batch[:window]),
                "coreset_photos_per_s_last": window * photos_per_batch / sum(seconds_per_batch[-window:]),
                "coreset_s": sum(seconds_per_batch),
                "covering_radius": streaming.covering_radius,
                "rss_mib_after_first": rss_start,
                "rss_mib_end": resident_mib(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scale is not None and args.scale < 2 * SCALE_WINDOW:
        fail(f"--scale must be at least {2 * SCALE_WINDOW} photos (the first and last {SCALE_WINDOW} are compared)")
    coreset.StreamingCoreset = TimedCoreset  # what PatchCore.fit builds its coresets from
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.scale:
        rows = scale_run(args, args.scale)
        write_atomically(args.out.with_name(args.out.name + "_scale.json"), json.dumps(rows, indent=2))
        return 0
    jsonl = args.out.with_suffix(".jsonl")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    for preprocess in (value == "true" for value in args.preprocess):
        extractor = CachedExtractor(patchcore.PatchCore(settings(args, preprocess))._feature_extractor())
        for ratio in args.ratios:
            for scheme in args.schemes:
                if scheme == "exact" and ratio > args.exact_max_ratio:
                    continue
                config = settings(args, preprocess, coreset_sampling_ratio=ratio, **SCHEMES[scheme])
                row = curve_row(config, extractor, args, scheme)
                row["backbone_s_so_far"] = extractor.seconds
                rows.append(row)
                with open(jsonl, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
        del extractor
    table = markdown(rows)
    write_atomically(args.out.with_suffix(".md"), table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
