"""Soak test of the watched folder: a camera drops N photos, some with reused names, some slowly, some unreadable.

Usage:
    .venv/bin/python scripts/soak_watch.py --photos 2000 --out /tmp/soak

Fits a tiny model (efficientnet_lite0 at 64 px, on 24 synthetic photos) unless ``--model`` is
given, starts ``inference.py --watch`` as its own process with ``--jsonl`` and ``--sort-into``,
and writes the photos into its folder: most at once, ``--reused`` of them under a name already used
(``frame.png``, written again once the previous one has left the folder, as a camera whose counter
reset), ``--slow`` of them in four pieces with 1 s pauses (longer than the 0.5 s settle time), and
``--unreadable`` of them as text named ``.png``. It then waits until every photo has its record
and has been sorted, and checks: exactly N records, N sorted files, each name recorded as often
as it was written, every unreadable file in ``unreadable/`` and no slow photo there. The watcher's
resident memory is sampled each second; the report gives it after the first tenth of the photos
and at the end. Exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import fail, run_cli  # noqa: E402


def synthetic_photo(rng: np.random.Generator, size: int = 96) -> bytes:
    """A dark elongated part on a light, noisy table, as PNG bytes."""
    image = np.full((size, size, 3), 200, np.uint8)
    centre = (int(rng.integers(size // 3, 2 * size // 3)), int(rng.integers(size // 3, 2 * size // 3)))
    cv2.ellipse(image, centre, (size // 3, size // 8), float(rng.uniform(0, 180)), 0, 360, (60, 60, 70), -1)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def fit_tiny_model(folder: Path) -> Path:
    from config import Config
    from models.patchcore import PatchCore

    rng = np.random.default_rng(0)
    good = folder / "train"
    good.mkdir(parents=True, exist_ok=True)
    for index in range(24):
        (good / f"{index:03d}.png").write_bytes(synthetic_photo(rng))
    config = Config(backbone="efficientnet_lite0", image_size=64, batch_size=16, preprocess="off", device="cpu")
    model = PatchCore(config)
    model.fit(sorted(good.iterdir()), progress=False)
    path = folder / "tiny.pkl"
    model.save(path)
    return path


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def photo_records(path: Path) -> list[dict]:
    """The per-photo records of a JSON-lines file (drift warnings and model updates are ``event`` lines)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    return [record for record in map(json.loads, lines) if "event" not in record]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, checked before the tiny model is fitted and the watcher started."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the inbox, results and sorted photos")
    parser.add_argument("--model", type=Path, help="model file (default: a tiny one fitted here)")
    parser.add_argument("--reused", type=float, default=0.05, help="share of photos written as frame.png")
    parser.add_argument("--slow", type=float, default=0.02, help="share written in pieces with 1 s pauses")
    parser.add_argument("--unreadable", type=float, default=0.02, help="share that are text named .png")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    args = parser.parse_args(argv)
    shares = (args.reused, args.slow, args.unreadable)
    if args.photos < 1:
        parser.error("--photos must be at least 1")
    if not all(0 <= share <= 1 for share in shares) or sum(shares) > 1:  # written so that NaN fails too
        parser.error("--reused, --slow and --unreadable must be shares from 0 to 1, together at most 1")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        parser.error("--timeout must be a positive number of seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.exists():
        fail(f"{args.out}: already exists; --out must be a new folder")
    args.out.mkdir(parents=True)
    model = args.model or fit_tiny_model(args.out / "model")
    inbox, sorted_dir, jsonl = args.out / "inbox", args.out / "sorted", args.out / "results.jsonl"
    inbox.mkdir()
    command = [sys.executable, str(ROOT / "inference.py"), "--model", str(model), "--watch", str(inbox),
               "--jsonl", str(jsonl), "--sort-into", str(sorted_dir), "--retry-seconds", "5", "--runtime", "torch"]
    log = open(args.out / "watcher.log", "w")
    watcher = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    while "watching" not in (args.out / "watcher.log").read_text():
        if watcher.poll() is not None:  # e.g. a bad --model: its one error line, and its exit status (2)
            print((args.out / "watcher.log").read_text(), file=sys.stderr, end="")
            return watcher.returncode or 1
        time.sleep(0.5)

    memory: list[tuple[int, float]] = []  # (records so far, resident MiB)
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(1.0):
            memory.append((len(photo_records(jsonl)), resident_mib(watcher.pid)))

    threading.Thread(target=sample, daemon=True).start()

    rng, choose = np.random.default_rng(1), random.Random(1)
    written: Counter[str] = Counter()
    kinds: dict[str, str] = {}
    slow_writers = []
    started = time.monotonic()
    for index in range(args.photos):
        roll = choose.random()
        if roll < args.unreadable:
            name, data, kind = f"bad_{index:05d}.png", b"not a photo " * 50, "unreadable"
        elif roll < args.unreadable + args.slow:
            name, data, kind = f"slow_{index:05d}.png", synthetic_photo(rng), "slow"
        elif roll < args.unreadable + args.slow + args.reused:
            name, data, kind = "frame.png", synthetic_photo(rng), "reused"
            while (inbox / name).exists():  # a camera reuses the name once the last photo under it is gone
                time.sleep(0.05)
        else:
            name, data, kind = f"IMG_{index:05d}.png", synthetic_photo(rng), "plain"
        written[name] += 1
        kinds[name] = kind
        if kind == "slow":
            def write_slowly(path: Path = inbox / name, data: bytes = data) -> None:
                step = len(data) // 4 + 1
                with open(path, "wb") as handle:
                    for start in range(0, len(data), step):
                        handle.write(data[start : start + step])
                        handle.flush()
                        time.sleep(1.0)
            slow_writers.append(threading.Thread(target=write_slowly))
            slow_writers[-1].start()
        else:
            (inbox / name).write_bytes(data)
        time.sleep(0.002)
    for writer in slow_writers:
        writer.join()
    written_s = time.monotonic() - started
    deadline = started + args.timeout
    while (len(photo_records(jsonl)) < args.photos or any(inbox.iterdir())) and time.monotonic() < deadline:
        if watcher.poll() is not None:
            break
        time.sleep(0.5)
    finished_s = time.monotonic() - started
    time.sleep(3)  # time enough for a duplicate to appear
    sampling.set()
    watcher.terminate()
    watcher.wait(timeout=60)
    log.close()

    records = photo_records(jsonl)
    events = len(jsonl.read_text().splitlines()) - len(records)
    recorded = Counter(Path(record["path"]).name for record in records)
    files = [path for path in sorted_dir.glob("*/*") if path.is_file()]
    unreadable = {path.name for path in (sorted_dir / "unreadable").glob("*")}
    steady = [mib for count, mib in memory if count >= args.photos // 10]
    report = {
        "photos_written": args.photos,
        "records": len(records),
        "sorted_files": len(files),
        "names_recorded_as_often_as_written": recorded == written,
        "reused_name_writes": written["frame.png"],
        "slow_photos": sum(1 for kind in kinds.values() if kind == "slow"),
        "slow_photos_unreadable": sum(1 for name in unreadable if kinds.get(name) == "slow"),
        "unreadable_written": sum(1 for kind in kinds.values() if kind == "unreadable"),
        "unreadable_records": sum("error" in record for record in records),
        "left_in_inbox": len(list(inbox.iterdir())),
        "event_lines": events,
        "seconds_writing": round(written_s, 1),
        "seconds_until_all_recorded_and_sorted": round(finished_s, 1),
        "resident_mib_after_first_tenth": round(steady[0], 1) if steady else None,
        "resident_mib_max_after_first_tenth": round(max(steady), 1) if steady else None,
        "resident_mib_at_end": round(steady[-1], 1) if steady else None,
        "watcher_exit_status": watcher.returncode,
    }
    print(json.dumps(report, indent=2))
    checks = [
        report["records"] == report["sorted_files"] == args.photos,
        report["names_recorded_as_often_as_written"],
        report["slow_photos_unreadable"] == 0,
        report["unreadable_records"] == report["unreadable_written"],
        report["left_in_inbox"] == 0,
    ]
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
