"""Serving throughput: cross-concept batching against one image at a time, over real HTTP.

N concurrent requests (n=1 each) spread over M concepts hit the Ray Serve app from serve/app.py,
deployed twice in turn with the same server code, model and device:

  batched   max_batch_size = --max-batch-size (default 16), scheduler --scheduler (default step,
            as in serve/config.yaml): requests for different concepts share one UNet batch
  single    max_batch_size = 1: the generator runs one image at a time

Every request has the same step count and guidance, so the step and static schedulers batch a
burst alike; benchmarks/serve_latency.py compares them under mixed, staggered arrivals. Each
config gets one Generator and one Ingress replica, and is deployed alone: on a one-GPU machine
the two never share the device. Residuals are random (right shape, no training) and are
read from a local folder. Before timing, each concept is requested once (so its residual is
cached) and one untimed burst runs. Then --rounds bursts of N requests are timed from the first
POST to the last response. Prints images/s, p50/p95 request latency and batched / single.

Run (CPU, tiny model, about a minute on an idle 2-core machine):
    .venv/bin/python benchmarks/serve_throughput.py
Run (GPU, SD v1.5 shapes with random weights):
    .venv/bin/python benchmarks/serve_throughput.py --model sd15-random --device cuda --steps 25
Add --json results.json to keep the numbers.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Set before Ray and the hub libraries are imported: built-in models only, no telemetry, no auth files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import ray
import requests
import torch
from PIL import Image
from ray import serve

from catversion import Residual, layout
from catversion.encoder import patched_layers
from catversion.models import load_base_model
from catversion.samples import SAMPLE_CONCEPTS
from serve.app import build_app
from serve.config import SCHEDULERS, ServeSettings

HOST = "127.0.0.1"
REQUEST_TIMEOUT_S = 600
DEFAULT_STEPS = {"tiny": 20, "sd15-random": 25}
SERVE_DEFAULTS = ServeSettings(residuals="unused")
STARTED = time.perf_counter()


def progress(line: str) -> None:
    """A progress line, stamped with the seconds since the benchmark started."""
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {line}", flush=True)


def model_parser(doc: str) -> argparse.ArgumentParser:
    """The serving benchmarks' parser: the docstring's first paragraph, --model and --device."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "sd15-random"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def parse_args() -> argparse.Namespace:
    parser = model_parser(__doc__)
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests per burst (n=1 each)")
    parser.add_argument("--concepts", type=int, default=4, help="concepts the requests cycle through")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps per image (default: 20 tiny, 25 sd15-random)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="max_batch_size of the batched config")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=SERVE_DEFAULTS.scheduler,
                        help="scheduler of the batched config (single runs one image at a time either way)")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default: the model's native size)")
    parser.add_argument("--rounds", type=int, default=3, help="timed bursts per config")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    args.steps = DEFAULT_STEPS[args.model] if args.steps is None else args.steps
    for name in ("requests", "concepts", "steps", "max_batch_size", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps > SERVE_DEFAULTS.max_steps:
        parser.error(f"--steps must be <= the server's max_steps ({SERVE_DEFAULTS.max_steps}), got {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu")
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_serve(workdir: Path) -> int:
    """A local Ray (files under `workdir`, loopback only, small object store) and Serve's HTTP proxy
    on a free port; returns the port."""
    os.environ["RAY_TMPDIR"] = str(workdir / "ray")  # this run's Ray files go away with it
    # Ray on the loopback address too, so nothing in the run listens on or dials another interface.
    ray.init(_node_ip_address=HOST, object_store_memory=100 * 1024**2, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": HOST, "port": port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    return port


def stop_serve() -> None:
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"


def write_residuals(model: str, prefix: Path, count: int) -> list[tuple[str, str]]:
    """`count` random residuals shaped for `model`'s text encoder; returns (concept id, class word) pairs.

    Random values cost the server exactly what trained ones do. No base fingerprint is recorded:
    sd15-random's weights depend on the device they are built on, so a CPU-made one would not match.
    """
    encoder = load_base_model(model, "cpu", components=("text_encoder",)).text_encoder.config
    layers = patched_layers(encoder.num_hidden_layers)
    words = [sample.class_word for sample in SAMPLE_CONCEPTS.values()]
    concepts = []
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        concept_id, word = f"concept-{i}", words[i % len(words)]
        tensor = torch.randn((len(layers), 2, 1, encoder.hidden_size), generator=generator)
        Residual(tensor, layers, meta={"class_word": word, "base_model": model}).save(layout.residual_uri(str(prefix), concept_id))
        concepts.append((concept_id, word))
    return concepts


def deploy(name: str, args: argparse.Namespace, residuals: Path, max_batch_size: int, scheduler: str,
           max_queued_requests: int) -> str:
    """Deploy one config as its own Serve app (one Generator, one Ingress replica); returns its base URL.

    `args` needs model, device and port (Serve's HTTP port). Nothing is shed (`max_queued_work` has no
    practical limit): these benchmarks measure batching and scheduling with every request queued, and
    load shedding is serve_overload.py's to measure.
    """
    app = build_app({
        "residuals": str(residuals), "model": args.model, "device": args.device,
        "gpus_per_replica": 1 if args.device == "cuda" else 0,
        "max_batch_size": max_batch_size, "scheduler": scheduler,
        "max_queued_requests": max_queued_requests, "max_queued_work": 10**9,
        "deployment_options": {
            "Generator": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                          "max_ongoing_requests": max(64, max_batch_size)},
            "Ingress": {"num_replicas": 1},
        },
    })
    serve.run(app, name=name, route_prefix=f"/{name}")
    return f"http://{HOST}:{args.port}/{name}"


def post(url: str, body: dict) -> tuple[float, list[dict]]:
    """One generation request; (latency in seconds, the response's images), or raises with the server's error."""
    started = time.perf_counter()
    response = requests.post(f"{url}/v1/images/generations", json=body, timeout=REQUEST_TIMEOUT_S)
    latency = time.perf_counter() - started
    where = f"POST {url}/v1/images/generations (model {body['model']})"
    if response.status_code != 200:
        raise RuntimeError(f"{where} -> {response.status_code}: {response.text[:500]}")
    data = response.json()["data"]
    if len(data) != body["n"]:
        raise RuntimeError(f"{where} returned {len(data)} images, asked for {body['n']}")
    return latency, data


def bodies(args: argparse.Namespace, concepts: list[tuple[str, str]], first_seed: int, count: int) -> list[dict]:
    """`count` requests cycling through the concepts, one image each, distinct seeds."""
    out = []
    for i in range(count):
        concept_id, word = concepts[i % len(concepts)]
        body = {"model": concept_id, "prompt": f"a photo of a {word} on a beach", "n": 1,
                "response_format": "b64_json", "num_inference_steps": args.steps, "seed": first_seed + i}
        if args.size is not None:
            body["size"] = f"{args.size}x{args.size}"
        out.append(body)
    return out


def burst(pool: ThreadPoolExecutor, url: str, batch: list[dict]) -> tuple[float, list[float]]:
    """All requests at once; (wall seconds from first POST to last response, per-request latencies)."""
    started = time.perf_counter()
    latencies = list(pool.map(lambda body: post(url, body)[0], batch))
    return time.perf_counter() - started, latencies


def measure(name: str, max_batch_size: int, args: argparse.Namespace, residuals: Path,
            concepts: list[tuple[str, str]], pool: ThreadPoolExecutor) -> dict:
    deployed = time.perf_counter()
    # A burst is queued, never shed (429), and a batch can always fill.
    url = deploy(name, args, residuals, max_batch_size, args.scheduler,
                 max(SERVE_DEFAULTS.max_queued_requests, args.requests))
    print(f"{name}: deployed in {time.perf_counter() - deployed:.1f} s (model load included); warming up", flush=True)
    try:
        # Warm-up: load each residual into the replica's cache, then one full burst (allocator, kernels).
        for body in bodies(args, concepts, 10**6, len(concepts)):
            _, data = post(url, body)
        side = Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))).width
        burst(pool, url, bodies(args, concepts, 2 * 10**6, args.requests))
        seconds, latencies = 0.0, []
        for round_ in range(args.rounds):
            wall, round_latencies = burst(pool, url, bodies(args, concepts, round_ * args.requests, args.requests))
            seconds += wall
            latencies += round_latencies
    finally:
        serve.delete(name)
    images = args.requests * args.rounds
    return {"max_batch_size": max_batch_size, "scheduler": args.scheduler, "image_px": side, "images": images,
            "seconds": seconds, "images_per_s": images / seconds,
            "p50_latency_s": float(np.percentile(latencies, 50)), "p95_latency_s": float(np.percentile(latencies, 95)),
            "latencies_s": latencies}


def report(args: argparse.Namespace, results: dict) -> None:
    env = results["environment"]
    side = results["batched"]["image_px"]
    print(f"\nmodel {args.model} at {side}x{side} px on {env['device_name']}; torch {env['torch']}, "
          f"ray {env['ray']}")
    print(f"{args.requests} concurrent requests (n=1) over {args.concepts} concepts, {args.steps} steps, "
          f"{args.rounds} timed bursts per config after a warm-up burst; scheduler {args.scheduler}")
    header = (f"{'config':<10}{'max batch':>10}{'images':>8}{'seconds':>10}{'images/s':>10}"
              f"{'p50 s':>9}{'p95 s':>9}")
    print("\n" + header)
    print("-" * len(header))
    for name in ("batched", "single"):
        row = results[name]
        print(f"{name:<10}{row['max_batch_size']:>10}{row['images']:>8}"
              f"{row['seconds']:10.2f}{row['images_per_s']:10.2f}{row['p50_latency_s']:9.2f}{row['p95_latency_s']:9.2f}")
    print(f"\nbatched / single: {results['speedup']:.2f}x images/s")


def main() -> int:
    args = parse_args()
    pool = ThreadPoolExecutor(args.requests)

    def both(workdir: Path, concepts: list[tuple[str, str]]) -> dict:
        # One config deployed at a time, so on one GPU neither shares the device with the other.
        return {"batched": measure("batched", args.max_batch_size, args, workdir, concepts, pool),
                "single": measure("single", 1, args, workdir, concepts, pool)}

    results = run_serving(args, "serve-bench", both, pool)
    if results is None:
        return 130
    results["speedup"] = results["batched"]["images_per_s"] / results["single"]["images_per_s"]
    finish(args, results, report)
    return 0


def run_serving(args: argparse.Namespace, name: str, measure: Callable[[Path, list[tuple[str, str]]], dict],
                pool: ThreadPoolExecutor | None = None) -> dict | None:
    """Write --concepts random residuals to a temporary folder, start a local Ray with Serve (its port in
    ``args.port``), return ``measure(folder, concepts)``, and stop it all whatever happens (``pool`` too);
    None when Ctrl-C stopped it."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no per-deployment INFO lines between results
    workdir = Path(tempfile.mkdtemp(prefix=f"cv-{name}-"))
    try:
        concepts = write_residuals(args.model, workdir, args.concepts)
        args.port = start_serve(workdir)
        progress("Ray and Serve started")
        return measure(workdir, concepts)
    except KeyboardInterrupt:
        print("interrupted; shutting down Serve and Ray", file=sys.stderr)
        return None
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        stop_serve()
        shutil.rmtree(workdir, ignore_errors=True)


def finish(args: argparse.Namespace, results: dict, report) -> None:
    """Add the run's config and environment to ``results``, print them with ``report`` and write --json."""
    results["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "port"}
    results["environment"] = {
        "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": args.device, "device_name": device_name(args.device)}
    report(args, results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
