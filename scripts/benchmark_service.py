"""Measure serve.py as a line uses it: latency one request at a time, throughput under concurrent
clients, and a bounded soak with the server's memory sampled throughout.

    .venv/bin/python scripts/benchmark_service.py --model saved_models/patchcore_screw.pkl

Starts its own ``serve.py`` on a free port of 127.0.0.1, posts the screw test photos (read once into
memory, cycled) over HTTP with httpx, prints the figures and writes them to
outputs/benchmark_service.json (atomically). Latency is client-side wall time per request, from
the first byte sent to the last byte of the JSON record received.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import fail, run_cli  # noqa: E402
from output_files import check_writable, write_atomically  # noqa: E402
from preprocessing.io import find_images  # noqa: E402

DEFAULT_PHOTOS = ROOT / "data" / "mvtec_ad" / "screw" / "test"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model file written by train.py")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of photos to post (recursive)")
    parser.add_argument("--runtime", choices=("auto", "torch", "onnx"), default="auto")
    parser.add_argument("--sequential", type=int, default=50, metavar="N", help="requests one at a time")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients for throughput and soak")
    parser.add_argument("--throughput-seconds", type=float, default=30.0)
    parser.add_argument("--soak-seconds", type=float, default=300.0, help="the bounded soak (issue: 5 minutes)")
    parser.add_argument("--json-out", type=Path, default=ROOT / "outputs" / "benchmark_service.json")
    args = parser.parse_args(argv)
    durations = (args.throughput_seconds, args.soak_seconds)
    if min(args.sequential, args.clients) < 1 or not all(math.isfinite(s) and s > 0 for s in durations):
        parser.error("--sequential and --clients must be at least 1, the durations positive")  # nan, inf too
    return args


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_service(model: Path, runtime: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "serve.py"), "--model", str(model), "--port", str(port), "--runtime", runtime],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            fail(f"serve.py exited with {process.returncode}; its error is printed above")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    fail("serve.py did not answer /health within 600 s")


def post(client: Any, url: str, name: str, data: bytes) -> tuple[float, int]:
    start = time.perf_counter()
    response = client.post(f"{url}/score", files={"file": (name, data, "image/png")})
    return time.perf_counter() - start, response.status_code


def load(url: str, photos: list[tuple[str, bytes]], clients: int, seconds: float,
         on_tick: Any = None) -> dict[str, Any]:
    """``clients`` threads posting back to back for ``seconds``; statuses counted, 503s retried."""
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock, stop = threading.Lock(), threading.Event()

    def client(offset: int) -> None:
        with httpx.Client(timeout=120) as session:
            i = offset
            while not stop.is_set():
                name, data = photos[i % len(photos)]
                seconds_taken, status = post(session, url, name, data)
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(seconds_taken)
                i += clients

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    while time.perf_counter() - start < seconds:
        time.sleep(min(1.0, seconds))
        if on_tick:
            on_tick(time.perf_counter() - start)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return {
        "clients": clients, "seconds": elapsed, "scored": len(latencies), "photos_per_s": len(latencies) / elapsed,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": sum(v for k, v in statuses.items() if k != 200),
        "latency_ms_p50": 1000 * float(np.median(latencies)) if latencies else None,
        "latency_ms_p95": 1000 * float(np.percentile(latencies, 95)) if latencies else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import httpx

    if not args.model.is_file():
        fail(f"{args.model}: model file not found")
    check_writable(args.json_out)  # before the runs (minutes), not after them
    paths = find_images(args.photos)
    if not paths:
        fail(f"{args.photos}: no photos to post")
    photos = [(path.name, path.read_bytes()) for path in paths]
    process, url = start_service(args.model, args.runtime)
    try:
        model_info = httpx.get(f"{url}/model", timeout=30).json()
        with httpx.Client(timeout=120) as session:
            for name, data in photos[:5]:  # warm-up
                post(session, url, name, data)
            sequential = [post(session, url, *photos[i % len(photos)]) for i in range(args.sequential)]
        times = [seconds for seconds, status in sequential if status == 200]
        if not times:  # no figures to give: say why instead of failing on empty lists
            statuses = ", ".join(str(status) for status in sorted({status for _, status in sequential}))
            fail(f"{args.photos}: none of the {args.sequential} requests one at a time was scored "
                 f"(HTTP status {statuses}); are the photos readable?")
        one_at_a_time = {
            "requests": args.sequential, "errors": sum(status != 200 for _, status in sequential),
            "latency_ms_p50": 1000 * float(np.median(times)), "latency_ms_p95": 1000 * float(np.percentile(times, 95)),
        }
        concurrent = load(url, photos, args.clients, args.throughput_seconds)
        memory: list[tuple[float, float]] = [(0.0, rss_mib(process.pid))]
        soak = load(url, photos, args.clients, args.soak_seconds,
                    on_tick=lambda t: memory.append((t, rss_mib(process.pid))) if t - memory[-1][0] >= 10 else None)
        soak["rss_mib_start"], soak["rss_mib_end"] = memory[0][1], memory[-1][1]
        soak["rss_mib_max"] = max(value for _, value in memory)
        soak["rss_samples"] = memory
    finally:
        process.terminate()
        process.wait(timeout=60)
    report = {
        "model": str(args.model), "runtime": model_info.get("runtime"), "cpu_cores": os.cpu_count(),
        "load_average_end": list(os.getloadavg()), "one_at_a_time": one_at_a_time,
        "concurrent": concurrent, "soak": soak,
    }
    write_atomically(args.json_out, json.dumps(report, indent=2) + "\n")
    print(f"service benchmark: {args.model} ({report['runtime']} back end), {len(photos)} photos cycled")
    print(f"  1 request at a time: p50 {one_at_a_time['latency_ms_p50']:.0f} ms, p95 "
          f"{one_at_a_time['latency_ms_p95']:.0f} ms, {one_at_a_time['errors']} errors")
    print(f"  {args.clients} concurrent clients: {concurrent['photos_per_s']:.1f} photos/s, p50 "
          f"{concurrent['latency_ms_p50']:.0f} ms, statuses {concurrent['statuses']}")
    print(f"  soak {soak['seconds']:.0f} s, {args.clients} clients: {soak['scored']} photos, {soak['errors']} errors, "
          f"server RSS {soak['rss_mib_start']:.0f} -> {soak['rss_mib_end']:.0f} MiB (max {soak['rss_mib_max']:.0f})")
    print(f"  load average at the end: {report['load_average_end'][0]:.1f} on {report['cpu_cores']} cores")
    print(f"figures: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
