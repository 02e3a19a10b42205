"""Measure where PatchCore spends time and memory: fit stages, latency, throughput, peak RSS, AUROC.

Usage:
    .venv/bin/python scripts/benchmark.py --backbone efficientnet_lite0
    .venv/bin/python scripts/benchmark.py --backbone wide_resnet50_2 --random-weights --limit-train 40
    .venv/bin/python scripts/benchmark.py --backbone efficientnet_lite0 --limit-train 40 --profile

The fit and the inference phases each run in a child process of their own, so each peak resident
memory figure (VmHWM, read inside the child) belongs to that phase alone. The stages of the fit and
of each prediction are the ones the model clocks itself (``PatchCore.timings``); the rows add up to
the fit's wall time. Inference is timed end to end from decoded RGB arrays (preprocess, features,
kNN, map back onto the photo), after warm-up, once per feature extractor back end in
``--runtimes`` (``onnx`` exports the fitted model with scripts/export_onnx.py first). Cold start
is ``inference.py --image`` run as a fresh process: wall time, CPU time and peak memory. Image
AUROC on the test split is reported next to the speed figures so that a speed change can be
checked against accuracy.

``--random-weights`` builds wide_resnet50_2 (or lite0) with random weights when the ImageNet weights
are not available offline: the timings are real, the AUROC is meaningless (timing only).

The table is printed and the figures written to outputs/benchmark_<backbone>.json (atomically).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import CATEGORY_DEFAULTS, Config, add_config_arguments, config_from_args, fail, run_cli  # noqa: E402
from evaluation.mvtec import LabelledImage, auroc_problem, load_test_split, train_images  # noqa: E402
from output_files import check_writable, write_atomically  # noqa: E402
from preprocessing.io import read_image  # noqa: E402

DEFAULT_DATA_DIR = ROOT / "data" / "mvtec_ad" / "screw"
PHASES = ("fit", "infer", "profile")
PROFILE_TOP = 25
PROFILE_POOL_TOP = 15
LATENCY_POOL = 8  # distinct decoded photos cycled through by the batch-1 latency runs

COLD_START_RUNS = 3  # fresh inference.py processes per back end; the median is reported


# ============================================================================ fit stages
def fit_stages(timings: dict[str, float]) -> dict[str, float]:
    """The fit's wall time split into the stages the model clocked itself (``PatchCore.timings``)."""
    stages = {
        "preprocess_choice_s": timings.get("preprocess_choice", 0.0),
        "load_preprocess_s": timings.get("load_preprocess", 0.0),
        "feature_extraction_s": timings.get("features", 0.0),
        "coreset_s": timings.get("coreset", 0.0),
        "calibration_s": timings.get("calibration", 0.0),
    }
    stages["other_s"] = max(0.0, timings["fit"] - sum(stages.values()))
    return stages


# ============================================================================ machine and memory
def memory_status_mib() -> dict[str, float]:
    """This process's resident memory now and its peak (VmRSS / VmHWM), in MiB."""
    values: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    if "VmHWM" not in values:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        values["VmHWM"] = peak / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return values


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    import cv2
    import faiss
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": str(torch.__version__),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ============================================================================ shared helpers
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="MVTec-layout folder (train/good, optionally test/)"
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="backbone with random weights (no download needed): timings are real, AUROC is meaningless",
    )
    parser.add_argument("--limit-train", type=int, metavar="N", help="fit on the first N healthy photos only")
    parser.add_argument("--limit-test", type=int, metavar="N", help="AUROC on N test photos spread over the split")
    parser.add_argument("--no-auroc", action="store_true", help="skip the test-split evaluation")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32], metavar="B")
    parser.add_argument("--throughput-images", type=int, default=64, metavar="N", help="images timed per batch size")
    parser.add_argument("--latency-runs", type=int, default=50, metavar="N", help="timed batch-1 predictions")
    parser.add_argument("--warmup", type=int, default=5, metavar="N", help="untimed predictions before timing")
    parser.add_argument(
        "--runtimes", nargs="+", choices=("torch", "onnx"), default=["torch"],
        help="feature extractor back ends to time inference and cold start with (onnx: exported first)",
    )
    parser.add_argument(
        "--cold-start-runs", type=int, default=COLD_START_RUNS, metavar="N",
        help="fresh inference.py --image processes per back end (0: skip)",
    )
    parser.add_argument("--profile", action="store_true", help=f"also cProfile a fit; print the top {PROFILE_TOP}")
    parser.add_argument("--json-out", type=Path, help="default outputs/benchmark_<backbone>.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only the table")
    parser.add_argument("--_phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--_workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--runtime", default="torch", help=argparse.SUPPRESS)  # the infer phase's back end
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("limit_train", "limit_test", "throughput_images", "latency_runs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.cold_start_runs < 0 or any(size < 1 for size in args.batch_sizes):
        parser.error("--warmup and --cold-start-runs must be >= 0 and every batch size >= 1")
    if args.random_weights and "onnx" in args.runtimes:
        parser.error("--runtimes onnx exports the model's real backbone weights; it cannot go with --random-weights")
    return args


def settings(args: argparse.Namespace) -> Config:
    name = args.data_dir.resolve().name
    return config_from_args(args, name if name in CATEGORY_DEFAULTS else "custom")


def fit_paths(args: argparse.Namespace) -> list[Path]:
    paths = train_images(args.data_dir)
    return paths[: args.limit_train] if args.limit_train else paths


def spread(items: Sequence[Any], n: int | None) -> list[Any]:
    """``n`` items evenly spread over the list (all of them when n is None or large enough)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def make_extractor(config: Config, random_weights: bool, runtime: str = "torch", onnx_file: Path | None = None):
    if runtime == "onnx":
        from models.backend import open_extractor

        return open_extractor(config, "onnx", onnx_file)
    from models.feature_extractor import FeatureExtractor

    return FeatureExtractor(config, pretrained=not random_weights)


def attach_extractor(model: Any, extractor: Any) -> None:
    """Give the model a ready extractor (so its build is timed apart from the fit)."""
    model._extractor = extractor
    model.weights_identity = extractor.weights_identity


def gpu_peak_mib(device: Any) -> float | None:
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomically(path, json.dumps(data, indent=2, default=str) + "\n")


# ============================================================================ child phases
def phase_fit(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Fit once, split into stages; save the model for the inference phase and measure its file."""
    config = settings(args)
    paths = fit_paths(args)
    from models.patchcore import PatchCore

    baseline = memory_status_mib()  # interpreter + torch, faiss, OpenCV imported

    start = time.perf_counter()
    extractor = make_extractor(config, args.random_weights)
    backbone_seconds = time.perf_counter() - start
    model = PatchCore(config)
    attach_extractor(model, extractor)

    start = time.perf_counter()
    model.fit(paths, progress=not args.quiet)
    fit_seconds = time.perf_counter() - start
    peak = memory_status_mib()["VmHWM"]

    model_path = workdir / "model.pkl"
    start = time.perf_counter()
    model.save(model_path)
    save_seconds = time.perf_counter() - start
    bank = model.memory_bank
    return {
        "device": str(extractor.device),
        "knn_index": type(model.index).__name__,  # CellIndex (exact), or a FAISS index class
        "weights_identity": model.weights_identity,
        "n_train_images": len(paths),
        "n_bank_images": model.n_train,
        "n_calibration_images": int(model.calibration_scores.size),
        "backbone_load_s": backbone_seconds,
        "fit_total_s": fit_seconds,
        "stages": fit_stages(model.timings),
        "memory_bank_patches": int(bank.shape[0]),
        "memory_bank_dims": int(bank.shape[1]),
        "memory_bank_mib": bank.nbytes / 2**20,
        "model_file_mib": model_path.stat().st_size / 2**20,
        "model_save_s": save_seconds,
        "threshold": model.threshold,
        "rss_baseline_mib": baseline.get("VmRSS"),
        "rss_peak_mib": peak,
        "gpu_peak_mib": gpu_peak_mib(extractor.device),
    }


def phase_profile(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """A second fit under cProfile (kept apart so that the timed figures carry no profiler overhead)."""
    config = settings(args)
    paths = fit_paths(args)
    from models.patchcore import PatchCore

    import models.patchcore as patchcore

    model = PatchCore(config)
    attach_extractor(model, make_extractor(config, args.random_weights))
    # cProfile sees one thread only: the photos decoded and preprocessed on the pool get a
    # profiler per worker thread, merged and listed apart from the main thread's.
    workers: list[cProfile.Profile] = []
    local, lock = threading.local(), threading.Lock()

    def profiled(function: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is threading.main_thread():
                return function(*args, **kwargs)
            if not hasattr(local, "profiler"):
                local.profiler = cProfile.Profile()
                with lock:
                    workers.append(local.profiler)
            local.profiler.enable()
            try:
                return function(*args, **kwargs)
            finally:
                local.profiler.disable()

        return run

    saved = patchcore.read_image, patchcore.preprocess
    patchcore.read_image, patchcore.preprocess = profiled(saved[0]), profiled(saved[1])
    profiler = cProfile.Profile()
    start = time.perf_counter()
    try:
        profiler.enable()
        model.fit(paths, progress=not args.quiet)
        profiler.disable()
    finally:
        patchcore.read_image, patchcore.preprocess = saved
    seconds = time.perf_counter() - start
    profiler.dump_stats(str(workdir / "fit.prof"))
    figures = {"fit_under_profiler_s": seconds, "top_cumulative": top_functions(profiler, PROFILE_TOP)}
    if workers:
        pool_stats = pstats.Stats(workers[0])
        for extra in workers[1:]:
            pool_stats.add(extra)
        figures["pool_threads"] = len(workers)
        figures["pool_top_cumulative"] = top_functions(pool_stats, PROFILE_POOL_TOP)
    return figures


def top_functions(source: cProfile.Profile | pstats.Stats, count: int) -> str:
    text = io.StringIO()
    stats = pstats.Stats(source, stream=text) if isinstance(source, cProfile.Profile) else source
    stats.stream = text
    stats.strip_dirs().sort_stats("cumulative").print_stats(count)
    body = text.getvalue()
    return body[body.find("   ncalls") :] if "   ncalls" in body else body  # drop the file-list preamble


def evaluation_split(args: argparse.Namespace) -> tuple[list[LabelledImage], str | None]:
    """The labelled test photos to evaluate, or none with the reason."""
    if args.no_auroc:
        return [], "skipped (--no-auroc)"
    samples = spread(load_test_split(args.data_dir), args.limit_test)
    problem = auroc_problem(args.data_dir, samples)
    return ([], f"skipped: {problem}") if problem else (samples, None)


# The stages of one prediction as PatchCore.timings names them, and as the report names them.
PREDICT_STAGES = {"preprocess": "predict_load_preprocess", "features": "predict_features", "knn_score_map": "predict_knn_map"}


def phase_infer(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Load the fitted model with one back end; batch-1 latency, throughput per batch size, peaks; then AUROC."""
    from models.patchcore import PatchCore

    result: dict[str, Any] = {"runtime": args.runtime}
    start = time.perf_counter()
    model = PatchCore.load(workdir / "model.pkl", runtime=args.runtime)
    result["model_load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    attach_extractor(model, make_extractor(model.config, args.random_weights, args.runtime, model.onnx_file))
    result["backbone_load_s"] = time.perf_counter() - start
    device = model._extractor.device
    base_config = model.config

    samples, auroc_note = evaluation_split(args)
    source = [sample.path for sample in load_test_split(args.data_dir)] or fit_paths(args)
    largest = max(args.batch_sizes)
    chosen = spread(source, max(LATENCY_POOL, largest))

    def decode(paths: Sequence[Path]) -> list[np.ndarray]:
        return [read_image(path) for path in paths]

    # ---- batch-1 latency, from decoded arrays
    pool = decode(spread(chosen, LATENCY_POOL))
    result["inference_photo_size"] = list(pool[0].shape)
    result["rss_peak_reset"] = reset_peak_rss()  # from here on, peaks of inference alone
    for i in range(args.warmup):
        model.predict([pool[i % len(pool)]])
    latencies, cpu_seconds, parts = [], [], defaultdict(list)
    for i in tqdm(range(args.latency_runs), desc="latency, batch 1", unit="run", disable=args.quiet, leave=False):
        before = dict(model.timings)
        begin, cpu_begin = time.perf_counter(), time.process_time()
        model.predict([pool[i % len(pool)]])
        latencies.append(time.perf_counter() - begin)
        cpu_seconds.append(time.process_time() - cpu_begin)
        for name, key in PREDICT_STAGES.items():
            parts[name].append(model.timings.get(key, 0.0) - before.get(key, 0.0))
    result["rss_peak_batch1_mib"] = memory_status_mib()["VmHWM"]
    result["latency_ms"] = {
        "runs": len(latencies),
        "warmup": args.warmup,
        "median": 1000 * float(np.median(latencies)),
        "p95": 1000 * float(np.percentile(latencies, 95)),
        "min": 1000 * float(np.min(latencies)),
        # CPU time of all this process's threads: what a photo costs, whatever else runs on the machine
        "cpu_median": 1000 * float(np.median(cpu_seconds)),
        "mean": 1000 * float(np.mean(latencies)),
        "median_parts": {name: 1000 * float(np.median(values)) for name, values in parts.items()},
    }

    # ---- throughput per batch size (each predict call is one batch; results dropped at once)
    arrays = decode(chosen)
    throughput = {}
    sizes = sorted(set(args.batch_sizes))
    for size in tqdm(sizes, desc="throughput", unit="batch size", disable=args.quiet, leave=False):
        model.config = base_config.replace(batch_size=size)
        n_batches = max(1, math.ceil(args.throughput_images / size))
        batches = [[arrays[(b * size + j) % len(arrays)] for j in range(size)] for b in range(n_batches + 1)]
        model.predict(batches[0])  # warm-up at this shape
        batch_seconds = []
        for batch in batches[1:]:
            begin = time.perf_counter()
            model.predict(batch)
            batch_seconds.append(time.perf_counter() - begin)
        seconds = float(np.sum(batch_seconds))
        throughput[str(size)] = {
            "images": n_batches * size,
            "seconds": seconds,
            "images_per_s": n_batches * size / seconds,
            "ms_per_batch": 1000 * seconds / n_batches,
            # robust to other load on the machine: from the median batch time
            "images_per_s_median_batch": size / float(np.median(batch_seconds)),
        }
    model.config = base_config
    del arrays
    best = max(throughput, key=lambda key: throughput[key]["images_per_s"])
    result["throughput"] = throughput
    result["best_batch_size"] = int(best)
    result["rss_peak_mib"] = memory_status_mib()["VmHWM"]
    result["gpu_peak_mib"] = gpu_peak_mib(device)

    # ---- accuracy (after the memory figures; photos decoded batch by batch, only scores kept)
    result["auroc_note"] = auroc_note
    result["image_auroc"] = None
    if samples:
        from sklearn.metrics import roc_auc_score

        start = time.perf_counter()
        scores: list[float] = []
        size = base_config.batch_size
        for offset in tqdm(
            range(0, len(samples), size), desc="test split", unit="batch", disable=args.quiet, leave=False
        ):
            chunk = [sample.path for sample in samples[offset : offset + size]]
            scores.extend(prediction.score for prediction in model.predict(chunk))
        labels = [sample.is_defective for sample in samples]
        result["image_auroc"] = float(roc_auc_score(labels, scores))
        result["n_test_images"] = len(samples)
        result["n_test_defective"] = int(sum(labels))
        result["eval_s"] = time.perf_counter() - start
    return result


PHASE_FUNCTIONS = {"fit": phase_fit, "infer": phase_infer, "profile": phase_profile}


def run_phase(args: argparse.Namespace) -> int:
    """Child process entry: run one phase, write its figures to <workdir>/<phase>.json."""
    figures = PHASE_FUNCTIONS[args._phase](args, args._workdir)
    write_json_atomic(args._workdir / f"{args._phase}.json", figures)
    return 0


def export_onnx(workdir: Path) -> float:
    """Export the fitted model's extractor beside it (scripts/export_onnx.py); seconds taken."""
    start = time.perf_counter()
    command = [sys.executable, str(ROOT / "scripts" / "export_onnx.py"), "--model", str(workdir / "model.pkl")]
    if subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).returncode != 0:
        fail("the ONNX export failed; its error is printed above")
    return time.perf_counter() - start


def cold_start(workdir: Path, photo: Path, runtime: str, runs: int) -> dict[str, Any]:
    """``inference.py --image`` as a line PC runs it: a fresh process each time (median wall time,
    mean CPU time and the largest peak of ``runs``)."""
    walls, peaks = [], []
    cpu_before = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])
    command = [sys.executable, str(ROOT / "inference.py"), "--model", str(workdir / "model.pkl"),
               "--image", str(photo), "--json", "--runtime", runtime]
    for _ in range(runs):
        start = time.perf_counter()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        peak = 0.0
        # ru_maxrss of a child forked from this (large) process starts at our own size, so the
        # child's peak is read from its /proc status while it runs (Linux; 0 elsewhere).
        while process.poll() is None:
            peak = max(peak, child_peak_mib(process.pid))
            time.sleep(0.02)
        walls.append(time.perf_counter() - start)
        if process.returncode != 0:
            fail(f"inference.py --runtime {runtime} failed in the cold-start measurement")
        peaks.append(peak)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"runs": runs, "wall_s": float(np.median(walls)), "rss_peak_mib": float(np.max(peaks)),
            "cpu_s": (usage.ru_utime + usage.ru_stime - cpu_before) / runs}


def child_peak_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def spawn(phase: str, argv: list[str], workdir: Path) -> dict[str, Any]:
    """Run one phase in a fresh interpreter (its peak memory is its own) and read its figures."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--_phase", phase, "--_workdir", str(workdir)]
    completed = subprocess.run(command, stdin=subprocess.DEVNULL)
    if completed.returncode == 2:  # the phase's own error line (run_cli) says what to fix: no second guess
        raise SystemExit(2)
    if completed.returncode != 0:
        fail(f"the {phase} phase failed (exit code {completed.returncode}); its error is printed above")
    with open(workdir / f"{phase}.json", encoding="utf-8") as handle:
        return json.load(handle)


# ============================================================================ report
def seconds_text(seconds: float, total: float | None = None) -> str:
    text = f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"
    if total:
        text += f"  ({100 * seconds / total:.0f}%)"
    return text


def format_table(rows: Sequence[tuple[str, str]], title: str = "stage / figure") -> str:
    """Two aligned columns; a row whose value is None-like ('') with a name ending ':' is a heading."""
    width = max([len(title), *(len(name) for name, _ in rows)])
    lines = [f"{title:<{width}} | value", f"{'-' * width}-+-{'-' * 30}"]
    for name, value in rows:
        lines.append(f"{name:<{width}} | {value}" if value != "" else f"{name}")
    return "\n".join(lines)


def table_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    fit, machine = report["fit"], report["machine"]
    stages, total = fit["stages"], fit["fit_total_s"]
    weights = " [RANDOM WEIGHTS: timing only]" if report["random_weights"] else ""
    config = report["config"]
    load = machine.get("load_average_start")
    load_text = f"{load[0]:.2f} / {machine['load_average_end'][0]:.2f}" if load else "n/a"
    rows: list[tuple[str, str]] = [
        ("backbone", f"{report['config']['backbone']}{weights}"),
        ("device", f"{fit['device']}; kNN {fit['knn_index']}"),
        (
            "machine",
            f"{machine['cpu_model']}, {machine['cpu_cores_usable']} cores, torch {machine['torch']} "
            f"({machine['torch_threads']} threads), faiss {machine['faiss']}, GPU {machine['gpu'] or 'none'}",
        ),
        ("load average (1 min) start / end", load_text),
        ("image size / coreset ratio", f"{config['image_size']} px / {config['coreset_sampling_ratio']}"),
        ("FIT:", ""),
        (
            "  photos",
            f"{fit['n_train_images']} (all in the memory bank; {fit['n_calibration_images']} scored by cross-fitting "
            "to calibrate)",
        ),
        ("  backbone build (not in fit total)", seconds_text(fit["backbone_load_s"])),
        ("  preprocessing choice (preprocess: auto)", seconds_text(stages["preprocess_choice_s"], total)),
        ("  image loading + preprocessing (waited for)", seconds_text(stages["load_preprocess_s"], total)),
        ("  feature extraction", seconds_text(stages["feature_extraction_s"], total)),
        ("  coreset", seconds_text(stages["coreset_s"], total)),
        ("  calibration (cross-fitted fold banks, scoring)", seconds_text(stages["calibration_s"], total)),
        ("  other (fit bookkeeping)", seconds_text(stages["other_s"], total)),
        ("  fit total", seconds_text(total)),
        (
            "  memory bank",
            f"{fit['memory_bank_patches']} patches x {fit['memory_bank_dims']} dims ({fit['memory_bank_mib']:.1f} MiB)",
        ),
        ("  model file", f"{fit['model_file_mib']:.1f} MiB (saved in {1000 * fit['model_save_s']:.0f} ms)"),
        ("  peak RSS (fit process)", f"{fit['rss_peak_mib']:.0f} MiB (imports {fit['rss_baseline_mib']:.0f} MiB)"),
    ]
    if fit.get("gpu_peak_mib") is not None:
        rows.append(("  peak GPU memory (fit)", f"{fit['gpu_peak_mib']:.0f} MiB"))
    if report.get("onnx_export_s") is not None:
        rows.append(("  ONNX export (scripts/export_onnx.py)", seconds_text(report["onnx_export_s"])))
    for runtime, infer in report["inference"].items():
        rows += inference_rows(runtime, infer, report["random_weights"])
    if report.get("cold_start"):
        rows.append(("COLD START (inference.py --image, fresh process, median):", ""))
        for runtime, cold in report["cold_start"].items():
            rows.append((
                f"  {runtime}",
                f"{cold['wall_s']:.2f} s wall, {cold['cpu_s']:.2f} s CPU (mean), peak RSS {cold['rss_peak_mib']:.0f} MiB "
                f"({cold['runs']} runs)",
            ))
    return rows


def inference_rows(runtime: str, infer: dict[str, Any], random_weights: bool) -> list[tuple[str, str]]:
    latency = infer["latency_ms"]
    parts = latency["median_parts"]
    rows = [
        (f"INFERENCE, {runtime} back end (from decoded RGB arrays):", ""),
        ("  photo size", "x".join(str(v) for v in infer["inference_photo_size"])),
        ("  model load / backbone build", f"{infer['model_load_s']:.3f} s / {infer['backbone_load_s']:.3f} s"),
        (
            "  latency, batch 1, median / p95",
            f"{latency['median']:.1f} ms / {latency['p95']:.1f} ms  "
            f"({latency['runs']} runs after {latency['warmup']} warm-up; CPU time {latency['cpu_median']:.1f} ms)",
        ),
        (
            "    median preprocess / features / kNN+score+map",
            f"{parts['preprocess']:.1f} / {parts['features']:.1f} / {parts['knn_score_map']:.1f} ms",
        ),
    ]
    for size, figures in infer["throughput"].items():
        value = (
            f"{figures['images_per_s']:.2f} images/s ({figures['ms_per_batch']:.0f} ms/batch; "
            f"median batch: {figures['images_per_s_median_batch']:.2f} images/s)"
        )
        rows.append((f"  throughput, batch {size}", value))
    best = infer["best_batch_size"]
    rows += [
        ("  best throughput", f"{infer['throughput'][str(best)]['images_per_s']:.2f} images/s at batch {best}"),
        ("  peak RSS, batch-1 latency", f"{infer['rss_peak_batch1_mib']:.0f} MiB"),
        (f"  peak RSS, batch sweep (<= {max(map(int, infer['throughput']))})", f"{infer['rss_peak_mib']:.0f} MiB"),
    ]
    if infer.get("gpu_peak_mib") is not None:
        rows.append(("  peak GPU memory (inference)", f"{infer['gpu_peak_mib']:.0f} MiB"))
    if infer["image_auroc"] is not None:
        caveat = "  [random weights: meaningless]" if random_weights else ""
        rows.append(
            (
                "  image AUROC (test split)",
                f"{infer['image_auroc']:.4f} on {infer['n_test_images']} photos "
                f"({infer['n_test_defective']} defective; {infer['eval_s']:.1f} s){caveat}",
            )
        )
    else:
        rows.append(("  image AUROC (test split)", infer["auroc_note"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args._phase:
        return run_phase(args)

    config = settings(args)  # validate settings and data before starting children
    paths = fit_paths(args)
    if len(paths) < 2:
        fail(f"{args.data_dir}: fitting needs at least 2 healthy photos, found {len(paths)}")
    json_out = args.json_out or ROOT / "outputs" / f"benchmark_{config.backbone}.json"
    for output in (json_out, json_out.with_suffix(".prof")) if args.profile else (json_out,):
        check_writable(output)  # before the phases (minutes), not after them
    _, note = evaluation_split(args)
    if note and not args.quiet:
        print(f"note: image AUROC {note}", file=sys.stderr)
    if args.random_weights and not args.quiet:
        print("note: --random-weights: timings are real, accuracy figures are meaningless", file=sys.stderr)

    from models.feature_extractor import resolve_device

    resolve_device(config.device)  # a GPU asked for but not there: the same error line as every door
    machine = machine_info()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with tempfile.TemporaryDirectory(prefix="patchcore_benchmark_") as workdir:
        fit = spawn("fit", argv, Path(workdir))
        export_s = export_onnx(Path(workdir)) if "onnx" in args.runtimes else None
        inference = {runtime: spawn("infer", [*argv, "--runtime", runtime], Path(workdir)) for runtime in args.runtimes}
        photo = (load_test_split(args.data_dir) or [LabelledImage(paths[0], "good", None)])[0].path
        cold = {
            runtime: cold_start(Path(workdir), photo, runtime, args.cold_start_runs)
            for runtime in args.runtimes if args.cold_start_runs
        }
        profile = spawn("profile", argv, Path(workdir)) if args.profile else None
        if profile:
            prof_path = json_out.with_suffix(".prof")
            prof_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(prof_path, (Path(workdir) / "fit.prof").read_bytes())  # never half a profile
            profile["stats_file"] = str(prof_path)
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    report = {
        "started": started,
        "data_dir": str(args.data_dir.resolve()),
        "random_weights": args.random_weights,
        "config": config.to_dict(),
        "limit_train": args.limit_train,
        "machine": machine,
        "device": fit["device"],
        "fit": fit,
        "onnx_export_s": export_s,
        "inference": inference,
        "cold_start": cold,
        "profile": profile,
    }
    write_json_atomic(json_out, report)

    print(f"PatchCore benchmark: {args.data_dir}")
    print(format_table(table_rows(report)))
    load = machine.get("load_average_start")
    if load and max(load[0], machine["load_average_end"][0]) > machine["cpu_cores_usable"]:
        cores = machine["cpu_cores_usable"]
        print(f"warning: the machine was busy (load average above {cores} cores): timings are noisy")
    if profile:
        print(
            f"\ncProfile of a separate fit ({profile['fit_under_profiler_s']:.1f} s under the profiler), main thread "
            f"(the pool's decode/preprocess work shows here as waiting), top {PROFILE_TOP} by cumulative time:"
        )
        print(profile["top_cumulative"].rstrip())
        if profile.get("pool_top_cumulative"):
            print(f"\npreprocessing pool ({profile['pool_threads']} worker threads, seconds summed over threads), "
                  f"top {PROFILE_POOL_TOP} by cumulative time:")
            print(profile["pool_top_cumulative"].rstrip())
        print(f"profile data: {profile['stats_file']}")
    print(f"figures: {json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
