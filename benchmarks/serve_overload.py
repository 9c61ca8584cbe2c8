"""Overload is shed, not queued: open-loop arrivals at 0.8x and 2x one generator replica's capacity.

The Ray Serve app from serve/app.py is deployed once with the shipped configuration's application
settings and deployment options (serve/config-cpu.yaml on a CPU, serve/config.yaml on a GPU), but
exactly one Generator and one Ingress replica, so the replica's own bound on queued work
(`max_queued_work`, in UNet row-steps) is what sheds load. Residuals are random tensors of the
right shape read from a local folder; each concept is requested once first (cached).

  capacity  max_batch_size + 1 closed-loop clients of the mix for max(10 s, duration / 4): requests/s
            the replica completes with its batch kept full
  0.8x      Poisson arrivals at 0.8 x capacity for --duration s (default 60): the baseline
  2x        Poisson arrivals at 2 x capacity for --duration s

Requests take 10 or 30 steps with equal odds (a mix of short and default-ish requests), one of
--concepts concepts, n=1. Every request is fired on schedule from a thread pool whatever has come
back; latency runs from its scheduled time to its full response. Printed per phase: status counts,
admitted (200) requests' p50/p95/p99, the slowest 429 and whether every 429 carried Retry-After.
Then the three figures with their targets (ok or MISS): admitted p95 at 2x / p95 at 0.8x (<= 2.0),
the slowest 429 (<= 1 s) and 5xx responses (0). No assertions: it prints numbers.

Run (CPU, tiny model, about 3 minutes on a 2-core machine):
    .venv/bin/python benchmarks/serve_overload.py
Run (GPU, SD v1.5 shapes with random weights):
    .venv/bin/python benchmarks/serve_overload.py --model sd15-random --device cuda --json serve_overload.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

# Set before Ray and the hub libraries are imported: built-in models only, no telemetry, no auth files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness, also when run from elsewhere

import numpy as np
import requests
import torch
import yaml
from ray import serve

from serve.app import build_app
from serve_latency import body, workload
from serve_throughput import finish, model_parser, progress, run_serving

ROOT = Path(__file__).resolve().parent.parent
MIX_STEPS = (10, 30)
FRACTIONS = {"0.8x": 0.8, "2x": 2.0}
P95_TARGET = 2.0  # admitted p95 at 2x / at 0.8x
SHED_TARGET_S = 1.0  # the slowest 429
def parse_args() -> argparse.Namespace:
    parser = model_parser(__doc__)
    parser.add_argument("--config", type=Path, default=None,
                        help="the Serve config whose application settings and deployment options are used "
                             "(default: serve/config-cpu.yaml on a CPU, serve/config.yaml on a GPU)")
    parser.add_argument("--concepts", type=int, default=16, help="concepts the requests draw from")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per phase")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times, step counts and concepts")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.concepts < 1 or args.duration <= 0:
        parser.error("need --concepts >= 1 and --duration > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu")
    args.config = args.config or ROOT / "serve" / ("config.yaml" if args.device == "cuda" else "config-cpu.yaml")
    return args


def deploy(args: argparse.Namespace, residuals: Path) -> tuple[str, dict]:
    """The config's application with one replica of each deployment; (base URL, its settings)."""
    app = yaml.safe_load(args.config.read_text())["applications"][0]
    settings = {**app["args"], "residuals": str(residuals), "model": args.model, "device": args.device,
                "gpus_per_replica": 1 if args.device == "cuda" else 0}
    options = {}
    for deployment in app.get("deployments", []):
        name = deployment.pop("name")
        scaling = deployment.get("autoscaling_config") or {}
        deployment["autoscaling_config"] = {**scaling, "min_replicas": 1, "max_replicas": 1}
        options[name] = deployment
    serve.run(build_app({**settings, "deployment_options": options}), name="overload", route_prefix="/overload")
    return f"http://127.0.0.1:{args.port}/overload", settings


def post(url: str, request: dict, timeout_s: float = 600.0) -> dict:
    """One request's outcome: status (or the exception's name), the time it came back, Retry-After; never raises."""
    try:
        response = requests.post(f"{url}/v1/images/generations", json=request, timeout=timeout_s)
        openai_body = response.headers.get("content-type", "").startswith("application/json") and (
            response.status_code == 200 or "error" in response.json())
        return {"status": response.status_code, "done": time.perf_counter(), "openai_body": bool(openai_body),
                "retry_after": response.headers.get("retry-after")}
    except Exception as exc:  # a timeout, a refused or reset connection
        return {"status": type(exc).__name__, "done": time.perf_counter(), "openai_body": False, "retry_after": None}


def open_loop(url: str, pool: ThreadPoolExecutor, arrivals: list[tuple[float, dict]], duration: float) -> dict:
    """Fire each request at its offset whatever has come back; summarise the outcomes."""
    outcomes: list[dict | None] = [None] * len(arrivals)

    def one(i: int, due: float, request: dict) -> None:
        outcome = post(url, request)
        outcome["latency_s"] = outcome["done"] - due
        outcomes[i] = outcome

    start = time.perf_counter() + 0.1
    futures = []
    for i, (offset, request) in enumerate(arrivals):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        futures.append(pool.submit(one, i, start + offset, request))
    wait(futures, timeout=600)
    done = [o for o in outcomes if o is not None]
    admitted = [o["latency_s"] for o in done if o["status"] == 200]
    shed = [o for o in done if o["status"] == 429]
    pct = (lambda q: float(np.percentile(admitted, q))) if admitted else (lambda q: float("nan"))
    statuses = Counter(str(o["status"]) for o in done)
    statuses.update({"no answer": len(arrivals) - len(done)})
    return {"sent": len(arrivals), "offered_per_s": len(arrivals) / duration, "statuses": dict(statuses),
            "admitted_per_s": len(admitted) / duration,
            "p50_s": pct(50), "p95_s": pct(95), "p99_s": pct(99), "max_s": max(admitted, default=float("nan")),
            "slowest_429_s": max((o["latency_s"] for o in shed), default=0.0),
            "429_without_retry_after": sum(1 for o in shed if not o["retry_after"]),
            "non_openai_errors": sum(1 for o in done if o["status"] != 200 and not o["openai_body"]),
            "5xx": sum(1 for o in done if isinstance(o["status"], int) and o["status"] >= 500)}


def saturated_rate(url: str, concepts: list[tuple[str, str]], pool: ThreadPoolExecutor, clients: int,
                   seconds: float) -> tuple[float, Counter]:
    """Requests/s the replica completes with its batch kept full: `clients` closed-loop clients (each posts its
    next request as soon as one comes back; a 429 is retried 50 ms later) for `seconds`, counted from the
    first answer. One client more than a batch holds keeps the batch full across HTTP round trips while
    the work ahead of a request stays about one batch's."""
    statuses: Counter = Counter()
    answers: list[float] = []
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            outcome = post(url, body(concepts[(k + n) % len(concepts)], MIX_STEPS[(k + n) % len(MIX_STEPS)],
                                     seed=2 * 10**6 + 1000 * k + n))
            statuses[outcome["status"]] += 1
            n += 1
            if outcome["status"] == 200:
                answers.append(outcome["done"])
            elif outcome["status"] == 429:
                time.sleep(0.05)
    wait([pool.submit(client, k) for k in range(clients)])
    answers.sort()
    return (len(answers) - 1) / (answers[-1] - answers[0]), statuses


def measure(args: argparse.Namespace, residuals: Path, concepts: list[tuple[str, str]], pool: ThreadPoolExecutor) -> dict:
    deployed = time.perf_counter()
    url, settings = deploy(args, residuals)
    progress(f"deployed in {time.perf_counter() - deployed:.1f} s (model load included); warming up")
    out: dict = {"settings": {k: settings.get(k) for k in ("max_batch_size", "max_queued_work", "max_queued_requests", "scheduler")}}
    try:
        for i, concept in enumerate(concepts):  # each residual into the replica's cache
            if (status := post(url, body(concept, MIX_STEPS[0], seed=10**6 + i))["status"]) != 200:
                raise RuntimeError(f"warm-up request for {concept[0]} answered {status}")
        capacity, statuses = saturated_rate(url, concepts, pool, clients=int(settings["max_batch_size"]) + 1,
                                            seconds=max(10.0, args.duration / 4))
        out["capacity_per_s"] = capacity
        progress(f"capacity {capacity:.2f} requests/s (closed loop of max_batch_size + 1 clients: {dict(statuses)})")
        out["phases"] = {}
        for index, (name, fraction) in enumerate(FRACTIONS.items()):
            row = open_loop(url, pool, workload(args, concepts, fraction * capacity, index, mix=MIX_STEPS), args.duration)
            out["phases"][name] = row
            progress(f"{name} ({row['offered_per_s']:.2f}/s offered): {row['statuses']}; admitted p50 {row['p50_s']:.2f} s, "
                     f"p95 {row['p95_s']:.2f} s; slowest 429 {row['slowest_429_s']:.2f} s")
    finally:
        serve.delete("overload")
    return out


def report(args: argparse.Namespace, results: dict) -> None:
    env = results["environment"]
    print(f"\nmodel {args.model} on {env['device_name']}; torch {env['torch']}, ray {env['ray']}; "
          f"settings of {args.config.name}: {results['settings']}, one generator replica")
    print(f"capacity {results['capacity_per_s']:.2f} requests/s; {args.duration:g} s of Poisson arrivals per phase, "
          f"{'/'.join(map(str, MIX_STEPS))}-step mix")
    header = f"{'phase':<7}{'offered/s':>10}{'admitted/s':>11}{'p50 s':>8}{'p95 s':>8}{'p99 s':>8}{'slowest 429 s':>15}  statuses"
    print("\n" + header)
    print("-" * len(header))
    for name, row in results["phases"].items():
        print(f"{name:<7}{row['offered_per_s']:10.2f}{row['admitted_per_s']:11.2f}{row['p50_s']:8.2f}{row['p95_s']:8.2f}"
              f"{row['p99_s']:8.2f}{row['slowest_429_s']:15.2f}  {row['statuses']}")
    figures = results["figures"]
    print(f"\nadmitted p95 at 2x / at 0.8x: {figures['p95_ratio']:.2f} (target <= {P95_TARGET}) "
          f"{'ok' if figures['p95_ok'] else 'MISS'}")
    print(f"slowest 429 at 2x: {figures['slowest_429_s']:.2f} s (target <= {SHED_TARGET_S} s), "
          f"{figures['429_without_retry_after']} without Retry-After "
          f"{'ok' if figures['shed_ok'] else 'MISS'}")
    print(f"5xx: {figures['5xx']}, errors without an OpenAI body: {figures['non_openai_errors']} "
          f"(target 0) {'ok' if figures['errors_ok'] else 'MISS'}")


def main() -> int:
    args = parse_args()
    pool = ThreadPoolExecutor(512)  # open loop: enough threads that a slow server never delays a send
    results = run_serving(args, "serve-overload", lambda workdir, concepts: measure(args, workdir, concepts, pool), pool)
    if results is None:
        return 130

    base, over = results["phases"]["0.8x"], results["phases"]["2x"]
    phases = list(results["phases"].values())
    results["figures"] = {
        "p95_ratio": over["p95_s"] / base["p95_s"], "p95_ok": bool(over["p95_s"] / base["p95_s"] <= P95_TARGET),
        "slowest_429_s": over["slowest_429_s"], "429_without_retry_after": over["429_without_retry_after"],
        "shed_ok": bool(over["slowest_429_s"] <= SHED_TARGET_S and over["429_without_retry_after"] == 0
                        and over["statuses"].get("429", 0) > 0),
        "5xx": sum(p["5xx"] for p in phases), "non_openai_errors": sum(p["non_openai_errors"] for p in phases),
    }
    results["figures"]["errors_ok"] = results["figures"]["5xx"] == 0 and results["figures"]["non_openai_errors"] == 0
    finish(args, results, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
