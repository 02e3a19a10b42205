"""Score photos over HTTP: ``python serve.py --model saved_models/patchcore_screw.pkl --port 8000``.

    curl -F file=@part.png http://127.0.0.1:8000/score              # the inference.py --json record
    curl --data-binary @part.png 'http://127.0.0.1:8000/score?heatmap=true&name=part.png'
    curl http://127.0.0.1:8000/health ; curl http://127.0.0.1:8000/model   # docs: /docs

Binds to 127.0.0.1 unless ``--host`` opens it; give an API key before opening it to a network:
``--api-key-file FILE`` or ``$FASTENER_API_KEY`` (never on the command line, where ``ps`` shows
it); clients send it as the X-API-Key header. The model is loaded once per worker process; one bounded
queue per process scores requests in micro-batches and answers 503 + Retry-After when full.
Stateless apart from the model file: run N replicas behind any load balancer, or ``--workers N``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from config import DEVICE_OVERRIDE_HELP, DEVICES, fail, run_cli
from models.backend import RUNTIME_HELP, RUNTIMES
from models.model_file import check_not_the_model
from output_files import check_writable
from runtime.connections import http_protocol
from runtime.service import SETTINGS_ENV, ServiceSettings, create_app, settings_env

WORKER_START_S = 300  # how long a worker process may take to load the model on a busy machine


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # no abbreviations: "--api-key SECRET" must never be taken as --api-key-file (and a key never typed on the line)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", type=Path, required=True, help="model file written by train.py")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="processes, each with its own model and queue")
    parser.add_argument("--api-key-file", type=Path, metavar="FILE",
                        help="require the key in FILE (its first line) as the X-API-Key header on /score and /model; "
                             "default: $FASTENER_API_KEY")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto", help=RUNTIME_HELP)
    parser.add_argument("--device", choices=DEVICES, help=DEVICE_OVERRIDE_HELP)
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads are refused (413)")
    parser.add_argument("--queue-size", type=int, default=32, help="photos waiting at most; beyond, 503")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for company")
    parser.add_argument("--retry-after", type=int, default=1, metavar="S",
                        help="seconds a 503 (queue full) asks the client to wait before it tries again")
    parser.add_argument("--learn", action="store_true",
                        help="POST /feedback?verdict=good adds photos confirmed good to the model and saves it over "
                             "--model, keeping the file it replaces (docs/learning-on-the-line.md); one worker only")
    parser.add_argument("--learn-batch", type=int, default=16, help="with --learn: confirmed photos per update")
    parser.add_argument("--learn-wait-s", type=float, default=60.0,
                        help="with --learn: an update waits at most this long after the first confirmed photo")
    parser.add_argument("--keep-scored", type=int, default=256,
                        help="with --learn: recent uploads that /feedback can name")
    parser.add_argument("--events-jsonl", type=Path, metavar="FILE",
                        help="append drift warnings and model updates to FILE, one JSON line each")
    parser.add_argument("--body-timeout", type=float, default=15.0, metavar="S",
                        help="a request's headers, then its upload, must each arrive within S seconds (408 after); "
                             "trickling clients hold nothing longer")
    return parser.parse_args(argv)


def api_key(key_file: Path | None) -> str | None:
    """The key from ``--api-key-file`` (first line) or ``$FASTENER_API_KEY``; set but empty is an error, never "no auth"."""
    if key_file is not None:
        try:
            lines = key_file.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            fail(f"{key_file}: cannot read the API key file ({error.strerror})")
        key = lines[0].strip() if lines else ""
        if not key:
            fail(f"{key_file}: the API key file is empty")
        check_private(key_file)
        return key
    key = os.environ.get("FASTENER_API_KEY")
    if key is not None and not key.strip():
        fail("FASTENER_API_KEY is set but empty; an empty key would turn authentication off. Unset it or give a key")
    return key


def check_private(key_file: Path) -> None:
    """Refuse a key file every user of the PC may read or replace, as ssh refuses such a private key: anyone
    holding the key can score photos and, with --learn, teach the model that a defect is a good part.
    Windows keeps access in ACLs, not mode bits, so the check is for POSIX systems."""
    if os.name != "posix":
        return
    mode = key_file.stat().st_mode & 0o777
    if mode & 0o006:
        fail(f"{key_file}: every user of this PC may read or change the API key file (mode {mode:o}); "
             f"make it yours alone: chmod 600 {key_file}")


def check_address(host: str, port: int, keyed: bool = False) -> None:
    """Bind the address once before the model loads, as uvicorn will (with SO_REUSEADDR): a port out of
    range, in use or not ours to take, or a host this machine does not have, is one ``error:`` line at
    once instead of a traceback or a log line after the start. An address other machines can reach
    needs a key (``keyed``): anyone on the network could otherwise score photos and, with --learn,
    teach the model that a defect is a good part."""
    if not 0 <= port <= 65535:
        fail(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:  # socket.gaierror too: a host name that does not resolve
        fail(f"cannot listen on {host}:{port}: {error.strerror or error}")
    if not keyed and not ipaddress.ip_address(address[0].split("%")[0]).is_loopback:
        fail(f"--host {host} lets other machines reach the service: set a key (--api-key-file FILE or "
             "$FASTENER_API_KEY) so that only the line's clients can score photos and teach the model")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn

    if not args.model.is_file():
        fail(f"{args.model}: model file not found")
    if args.workers < 1:
        fail("--workers must be at least 1")
    if args.learn and args.workers > 1:
        fail("--learn updates one model in one process; run it with --workers 1")
    key = api_key(args.api_key_file)
    check_address(args.host, args.port, keyed=key is not None)
    if args.events_jsonl is not None:
        check_writable(args.events_jsonl)  # before the model loads, not at the first drift warning or update
        check_not_the_model(args.events_jsonl, args.model)
    settings = ServiceSettings(
        model=str(args.model), runtime=args.runtime, device=args.device, api_key=key,
        max_upload_mb=args.max_upload_mb, queue_size=args.queue_size, batch_wait_ms=args.batch_wait_ms,
        retry_after_s=args.retry_after, learn=args.learn, learn_batch=args.learn_batch,
        learn_wait_s=args.learn_wait_s, keep_scored=args.keep_scored,
        events_jsonl=str(args.events_jsonl) if args.events_jsonl else None,
        body_timeout_s=args.body_timeout,
    )
    connections = http_protocol(settings.body_timeout_s)
    if args.workers == 1:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, http=connections, access_log=False)
    else:
        os.environ[SETTINGS_ENV] = settings_env(settings)
        # each worker loads the model before it answers uvicorn's health check (5 s by default)
        uvicorn.run("runtime.service:create_app_from_env", factory=True, host=args.host, port=args.port,
                    workers=args.workers, http=connections, access_log=False,
                    timeout_worker_healthcheck=WORKER_START_S)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
