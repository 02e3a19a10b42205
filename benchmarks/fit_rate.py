"""Photos per second of a fit's memory-bank pass, block by block: does a long fit slow down as its bank grows?

Usage:
    .venv/bin/python scripts/download_datasets.py --synthetic --out /tmp/synthetic_3000 --n-train 3000
    .venv/bin/python benchmarks/fit_rate.py --data-dir /tmp/synthetic_3000 --backbone efficientnet_lite0

Fits a model on the folder's healthy photos with the given settings (nothing is saved) and clocks
each batch as the memory-bank pass hands it on: photos/s over every block of ``--block`` photos,
the last block's rate over the first's, the fit's own stage timings, the bank size and the peak
resident memory of this process. The first batch (backbone warm-up) is not in the first block's
rate. On a shared machine a block's rate varies by ±10%; run it more than once. Each block also
shows the process's CPU time per photo (every thread: backbone, photo workers, coresets) and its
CPU use: a block slowed down by the fit's own work takes more CPU per photo, one that got less of
the cores shows a lower CPU use. On a shared host CPU time per photo varies between runs too
(the same first block took 24-41 ms here). ``--runs N`` fits N times in a row and prints every
run's ratio and their median: on a shared host one run's ratio moves by ±0.1 or more. Its peak
memory then covers every run, with what the allocator kept from the earlier fits (3,000 photos:
2.7-3.1 GiB over five runs, 1.71-1.77 GiB for one); take one fit's peak from a single run.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import CATEGORY_DEFAULTS, Config, add_config_arguments, config_from_args, fail, run_cli  # noqa: E402
from evaluation.mvtec import train_images  # noqa: E402

if TYPE_CHECKING:
    from models.patchcore import PatchCore


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="any folder with train/good")
    parser.add_argument("--block", type=int, default=300, help="photos per measured block (default 300)")
    parser.add_argument("--runs", type=int, default=1, help="fits in a row; the ratios' median is printed (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.block < 1:
        parser.error("--block must be at least 1")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


class BlockRate(NamedTuple):
    first: int  # first photo of the block, from 0
    last: int
    photos_per_second: float
    cpu_ms_per_photo: float  # CPU time of every thread of the process over the block, per photo
    cpu_use: float  # CPU seconds per second: 2.0 keeps two cores busy


def block_rates(stamps: Sequence[tuple[float, float, int]], block: int) -> list[BlockRate]:
    """One ``BlockRate`` per block, from (time, process CPU time, photos in batch) as each batch is handed on.

    A block's figures cover the photos handed on after its first batch, over the time since that batch.
    """
    times, cpu, counts = np.array(stamps, dtype=np.float64).T
    done = np.cumsum(counts.astype(np.int64))  # photos handed on when each stamp was taken
    rates = []
    for first in range(0, int(done[-1]), block):
        start = int(np.searchsorted(done, max(first, int(done[0]))))  # the batch the block starts after
        end = int(np.searchsorted(done, min(first + block, int(done[-1]))))
        if end > start:
            photos, seconds, cpu_seconds = done[end] - done[start], times[end] - times[start], cpu[end] - cpu[start]
            rates.append(BlockRate(first, int(done[end]) - 1, float(photos / seconds),
                                   float(1e3 * cpu_seconds / photos), float(cpu_seconds / seconds)))
    return rates


def clocked_fit(paths: Sequence[Path], config: Config, block: int, progress: bool) -> tuple[list[BlockRate], PatchCore]:
    """Fit once, stamping each batch of the memory-bank pass as the fit takes it; the block rates and the model."""
    from models.patchcore import PatchCore

    stamps: list[tuple[float, float, int]] = []

    class ClockedFit(PatchCore):
        def _batches(self, images: Sequence[str | Path], progress: bool, description: str) -> Iterator:
            for batch in super()._batches(images, progress, description):
                yield batch
                if description == "memory bank":
                    stamps.append((time.perf_counter(), sum(os.times()[:2]), len(batch)))

    model = ClockedFit(config)
    model.fit(paths, progress=progress)
    return block_rates(stamps, block), model


def runs_summary(ratios: Sequence[float], cpu_ratios: Sequence[float]) -> str:
    """Every run's last-over-first ratio and their median, which one slow or fast block cannot swing."""
    listed = ", ".join(f"{ratio:.2f}" for ratio in ratios)
    return (f"last block / first block over {len(ratios)} runs: {listed} (median {np.median(ratios):.2f}; "
            f"CPU per photo, last / first: median {np.median(cpu_ratios):.2f})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = args.data_dir.resolve().name
    config = config_from_args(args, name if name in CATEGORY_DEFAULTS else "custom")
    paths = train_images(args.data_dir)
    if len(paths) < 2 * args.block:
        fail(f"{args.data_dir}: {len(paths)} training photos; at least two blocks of {args.block} are needed")
    ratios, cpu_ratios = [], []
    for run in range(args.runs):
        if args.runs > 1:
            print(f"run {run + 1} of {args.runs}")
        rates, model = clocked_fit(paths, config, args.block, progress=not args.quiet)
        for rate in rates:
            print(f"photos {rate.first + 1:>6}-{rate.last + 1:<6} {rate.photos_per_second:7.2f} photos/s "
                  f"{rate.cpu_ms_per_photo:6.1f} CPU ms/photo ({rate.cpu_use:.0%} CPU)")
        ratios.append(rates[-1].photos_per_second / rates[0].photos_per_second)
        cpu_ratios.append(rates[-1].cpu_ms_per_photo / rates[0].cpu_ms_per_photo)
        print(f"last block / first block: {ratios[-1]:.2f} (CPU per photo, last / first: {cpu_ratios[-1]:.2f})")
        stages = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in model.timings.items())
        print(f"fit: {stages}")
        bank = f"bank {len(model.memory_bank):,} patches, covering radius {model.coverage_radius:.3f}"
        del model  # the next run's peak memory must not include this one's model
    if args.runs > 1:
        print(runs_summary(ratios, cpu_ratios))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    over_runs = f" over the {args.runs} runs (the fits run one after another in this process)" if args.runs > 1 else ""
    print(f"{bank}, peak resident memory{over_runs} {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
