"""Photos per second of a fit's memory-bank pass, block by block: does a long fit slow down as its bank grows?

Usage:
    .venv/bin/python scripts/download_datasets.py --synthetic --out /tmp/synthetic_3000 --n-train 3000
    .venv/bin/python scripts/fit_rate.py --data-dir /tmp/synthetic_3000 --backbone efficientnet_lite0

Fits a model on the folder's healthy photos with the given settings (nothing is saved) and clocks
each batch as the memory-bank pass hands it on: photos/s over every block of ``--block`` photos,
the last block's rate over the first's, the fit's own stage timings, the bank size and the peak
resident memory of this process. The first batch (backbone warm-up) is not in the first block's
rate. On a shared machine a block's rate varies by ±10%; run it more than once.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import CATEGORY_DEFAULTS, add_config_arguments, config_from_args, fail, run_cli  # noqa: E402
from preprocessing.io import train_images  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="any folder with train/good")
    parser.add_argument("--block", type=int, default=300, help="photos per measured block (default 300)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.block < 1:
        parser.error("--block must be at least 1")
    return args


def block_rates(stamps: Sequence[tuple[float, int]], block: int) -> list[tuple[int, int, float]]:
    """(first photo, last photo, photos/s) per block, from (time handed on, photos in batch) per batch.

    A block's rate is the photos handed on after its first batch over the time since that batch.
    """
    times = np.array([stamp for stamp, _ in stamps])
    done = np.cumsum([count for _, count in stamps])  # photos handed on when each stamp was taken
    rates = []
    for first in range(0, int(done[-1]), block):
        start = int(np.searchsorted(done, max(first, int(done[0]))))  # the batch the block starts after
        end = int(np.searchsorted(done, min(first + block, int(done[-1]))))
        if end > start:
            rates.append((first, int(done[end]) - 1, float((done[end] - done[start]) / (times[end] - times[start]))))
    return rates


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from models.patchcore import PatchCore

    name = args.data_dir.resolve().name
    config = config_from_args(args, name if name in CATEGORY_DEFAULTS else "custom")
    paths = train_images(args.data_dir)
    if len(paths) < 2 * args.block:
        fail(f"{args.data_dir}: {len(paths)} training photos; at least two blocks of {args.block} are needed")
    stamps: list[tuple[float, int]] = []

    class ClockedFit(PatchCore):
        """Stamps each batch of the memory-bank pass as the fit takes it."""

        def _batches(self, images: Sequence[str | Path], progress: bool, description: str) -> Iterator:
            for batch in super()._batches(images, progress, description):
                yield batch
                if description == "memory bank":
                    stamps.append((time.perf_counter(), len(batch)))

    model = ClockedFit(config)
    model.fit(paths, progress=not args.quiet)
    rates = block_rates(stamps, args.block)
    for first, last, rate in rates:
        print(f"photos {first + 1:>6}-{last + 1:<6} {rate:7.2f} photos/s")
    print(f"last block / first block: {rates[-1][2] / rates[0][2]:.2f}")
    stages = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in model.timings.items())
    print(f"fit: {stages}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"bank {len(model.memory_bank):,} patches, covering radius {model.coverage_radius:.3f}, "
          f"peak resident memory {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
