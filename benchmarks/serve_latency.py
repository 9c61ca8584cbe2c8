"""Serving latency under open-loop load: the step scheduler against the static one, over real HTTP.

The Ray Serve app from serve/app.py is deployed twice in turn, with identical settings except
`scheduler` (one Generator and one Ingress replica, max_batch_size --max-batch-size, default 16):

  step      a sample of any concept, step count or guidance joins the running UNet batch at a
            denoising step and leaves it when done; joiners wait only while they would make older
            running work overdue (the fairness policy, catversion/scheduler.py)
  static    a batch of samples sharing step count and guidance runs all its steps before the
            next batch starts (the old scheduler)

For each, after a warm-up (each concept requested once, so its residual is cached) and a
single-request service time (one 20- and one 50-step request alone):

  join      a 150-step request, then 0.3 s later a 3-step request (--join-trials times, default 3).
            Reported: the short request's latency / the long one's. The step scheduler lets the
            short one in at the next step (target <= 0.10); static makes it wait for the long one
            (about 1.0).
  load      open-loop Poisson arrivals at each of three rates: exponential inter-arrival times
            from a seeded numpy RNG, every request fired on schedule from a thread pool whatever
            the server has answered. Each request takes 20 or 50 steps with equal odds and one
            of --concepts concepts, both drawn from the same RNG; n=1, native size, PNG as
            b64_json. Latency runs
            from each request's scheduled time to its full response. Throughput is images
            returned / (last response - start of the arrivals): below saturation it follows the
            offered rate, above it the server's capacity.

Both schedulers get exactly the same arrival times, step counts, concepts and seeds. Unless
--rates is given, the rates are --fractions (default 0.3,0.6,0.9) of the step scheduler's
capacity, estimated from one untimed burst of 2 x max_batch_size mixed requests on the step
deployment (which therefore runs first). Prints a table per scheduler and rate, then step/static
ratios, then the two fairness figures with their targets (ok or MISS): the 50-step requests' p50
under step / under static at the highest rate (target <= 1.10: step's fairness policy keeps a long
request from being slowed by the short ones joining its steps, catversion/scheduler.py), and the
join case's short/long under step (target <= 0.10). Residuals are random tensors of the right
shape, read from a local folder. No assertions: it prints numbers.

Run (CPU, tiny model, about 3 minutes on a 2-core machine; --quick: about 1.5 minutes, most of it
Ray start-up and the two deployments):
    .venv/bin/python benchmarks/serve_latency.py
    .venv/bin/python benchmarks/serve_latency.py --quick
Run (GPU, SD v1.5 shapes with random weights):
    .venv/bin/python benchmarks/serve_latency.py --model sd15-random --device cuda --json serve_latency.json
Explicit rates (requests/s): --rates 2,4,8
"""

from __future__ import annotations

import argparse
import os
import sys
import time
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
from ray import serve

from serve_throughput import deploy, finish, model_parser, progress, run_serving

ORDER = ("step", "static")  # step first: its deployment measures the capacity the default rates come from
MAX_QUEUED = 4096  # nothing is shed (429) at the rates run here; an overloaded server shows as latency
JOIN_STEPS = (150, 3)
JOIN_DELAY_S = 0.3
MIX_STEPS = (20, 50)
LONG_P50_TARGET = 1.10  # step / static, 50-step requests' p50 at the highest rate
JOIN_TARGET = 0.10  # step's short / long in the join case


def parse_args() -> argparse.Namespace:
    parser = model_parser(__doc__)
    parser.add_argument("--max-batch-size", type=int, default=16, help="max_batch_size of both configs")
    parser.add_argument("--concepts", type=int, default=None, help="concepts the requests draw from (default 32; 8 with --quick)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of arrivals per rate (default 15; 4 with --quick)")
    parser.add_argument("--rates", type=str, default=None, help="comma-separated arrival rates in requests/s, e.g. 2,4,8 "
                                                                "(default: --fractions of the measured capacity)")
    parser.add_argument("--fractions", type=str, default="0.3,0.6,0.9",
                        help="rates as fractions of the step scheduler's estimated capacity, when --rates is not given")
    parser.add_argument("--join-trials", type=int, default=None, help="repeats of the join case (default 3; 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times, step counts and concepts")
    parser.add_argument("--quick", action="store_true", help="a smoke run (~1.5 minutes on 2 CPU cores): shorter and fewer of everything")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    args.concepts = args.concepts or (8 if args.quick else 32)
    args.duration = args.duration or (4.0 if args.quick else 15.0)
    args.join_trials = args.join_trials or (1 if args.quick else 3)
    try:
        args.rates = None if args.rates is None else [float(r) for r in args.rates.split(",")]
        args.fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        parser.error("--rates and --fractions are comma-separated numbers, e.g. 2,4,8")
    if any(r <= 0 for r in (args.rates or [])) or any(f <= 0 for f in args.fractions):
        parser.error("--rates and --fractions must be > 0")
    if len(set(args.rates or [])) != len(args.rates or []) or len(set(args.fractions)) != len(args.fractions):
        parser.error("--rates and --fractions must not repeat a value")
    if args.max_batch_size < 1 or args.concepts < 2 or args.duration <= 0 or args.join_trials < 1:
        parser.error("need --max-batch-size >= 1, --concepts >= 2, --duration > 0 and --join-trials >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu")
    return args


def body(concept: tuple[str, str], steps: int, seed: int) -> dict:
    concept_id, word = concept
    return {"model": concept_id, "prompt": f"a photo of a {word} on a beach", "n": 1,
            "response_format": "b64_json", "num_inference_steps": steps, "seed": seed}


def post(url: str, request: dict, timeout_s: float) -> tuple[float, str | None]:
    """(the response's perf_counter time, None) or (that time, what went wrong); never raises."""
    try:
        response = requests.post(f"{url}/v1/images/generations", json=request, timeout=timeout_s)
        if response.status_code != 200:
            return time.perf_counter(), f"HTTP {response.status_code}: {response.text[:300]}"
        if len(response.json()["data"]) != request["n"]:
            return time.perf_counter(), f"{len(response.json()['data'])} images for n={request['n']}"
        return time.perf_counter(), None
    except Exception as exc:  # a timeout, a refused or reset connection, a malformed body
        return time.perf_counter(), f"{type(exc).__name__}: {str(exc)[:300]}"


def timed(url: str, request: dict, timeout_s: float = 600.0) -> float:
    """One request's latency in seconds; raises with the server's error."""
    started = time.perf_counter()
    done, error = post(url, request, timeout_s)
    if error is not None:
        raise RuntimeError(f"POST {url}/v1/images/generations (model {request['model']}, "
                           f"{request['num_inference_steps']} steps): {error}")
    return done - started


def workload(args: argparse.Namespace, concepts: list[tuple[str, str]], rate: float, index: int,
             mix: tuple[int, ...] = MIX_STEPS) -> list[tuple[float, dict]]:
    """(arrival offset in s, request) pairs of a Poisson process at `rate` over --duration, each request's steps
    drawn from `mix` with equal odds; seeded per rate."""
    rng = np.random.default_rng([args.seed, index])
    arrivals, offset = [], float(rng.exponential(1 / rate))
    while offset < args.duration:
        concept = concepts[int(rng.integers(len(concepts)))]
        steps = mix[int(rng.integers(len(mix)))]
        arrivals.append((offset, body(concept, steps, seed=len(arrivals))))
        offset += float(rng.exponential(1 / rate))
    return arrivals


def open_loop(url: str, pool: ThreadPoolExecutor, arrivals: list[tuple[float, dict]], duration: float,
              drain_s: float) -> dict:
    """Fire each request at its offset whatever has come back; wait up to drain_s after the last."""
    results: list[tuple[float, float, str | None] | None] = [None] * len(arrivals)  # (latency, done at, error)
    lags = []

    def one(i: int, due: float, request: dict) -> None:
        lags.append(time.perf_counter() - due)
        done, error = post(url, request, drain_s)
        results[i] = (done - due, done, error)

    start = time.perf_counter() + 0.1
    futures = []
    for i, (offset, request) in enumerate(arrivals):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        futures.append(pool.submit(one, i, start + offset, request))
    wait(futures, timeout=drain_s + 5)
    ok = [r for r in results if r is not None and r[2] is None]
    errors = [r[2] if r is not None else "no response before the benchmark stopped waiting" for r in results
              if r is None or r[2] is not None]
    latencies = [r[0] for r in ok]
    wall = max(r[1] for r in ok) - start if ok else float("nan")
    pct = (lambda q: float(np.percentile(latencies, q))) if latencies else (lambda q: float("nan"))
    steps = [request["num_inference_steps"] for _, request in arrivals]
    p50_by_steps = {}
    for count in MIX_STEPS:
        these = [r[0] for r, n in zip(results, steps) if n == count and r is not None and r[2] is None]
        if these:
            p50_by_steps[str(count)] = float(np.median(these))
    return {"sent": len(arrivals), "completed": len(ok), "errors": len(errors), "error_samples": sorted(set(errors))[:5],
            "offered_per_s": len(arrivals) / duration,
            "steps_mix": {str(s): steps.count(s) for s in MIX_STEPS},
            "images_per_s": len(ok) / wall if ok else 0.0, "wall_s": wall,
            "p50_s": pct(50), "p95_s": pct(95), "p99_s": pct(99), "mean_s": float(np.mean(latencies)) if ok else float("nan"),
            "max_send_lag_s": max(lags) if lags else 0.0,
            "p50_by_steps_s": p50_by_steps, "latencies_s": latencies}


def join_case(url: str, pool: ThreadPoolExecutor, concepts: list[tuple[str, str]], trials: int) -> dict:
    """A long request, then JOIN_DELAY_S later a short one; the short one's latency / the long one's."""
    runs = []
    for trial in range(trials):
        long_request = body(concepts[0], JOIN_STEPS[0], seed=7000 + trial)
        short_request = body(concepts[1], JOIN_STEPS[1], seed=8000 + trial)
        started = time.perf_counter()
        long_future = pool.submit(timed, url, long_request)
        time.sleep(max(0.0, started + JOIN_DELAY_S - time.perf_counter()))
        short_future = pool.submit(timed, url, short_request)
        long_s, short_s = long_future.result(), short_future.result()
        runs.append({"long_s": long_s, "short_s": short_s, "ratio": short_s / long_s})
    return {"runs": runs, "long_s": float(np.median([r["long_s"] for r in runs])),
            "short_s": float(np.median([r["short_s"] for r in runs])),
            "ratio": float(np.median([r["ratio"] for r in runs]))}


def measure(scheduler: str, args: argparse.Namespace, residuals: Path, concepts: list[tuple[str, str]],
            pool: ThreadPoolExecutor) -> dict:
    deployed = time.perf_counter()
    url = deploy(scheduler, args, residuals, args.max_batch_size, scheduler, MAX_QUEUED)
    progress(f"{scheduler}: deployed in {time.perf_counter() - deployed:.1f} s (model load included); warming up")
    out: dict = {"scheduler": scheduler}
    try:
        # Each concept once (its residual is then cached), all at once: also warms up batched UNet calls.
        list(pool.map(lambda i: timed(url, body(concepts[i], MIX_STEPS[0], seed=10**6 + i)), range(len(concepts))))
        out["service_s"] = {str(steps): float(np.median([timed(url, body(concepts[0], steps, seed=2 * 10**6 + k))
                                                         for k in range(2)])) for steps in MIX_STEPS}
        progress(f"{scheduler}: one request alone takes "
                 + ", ".join(f"{v:.2f} s at {k} steps" for k, v in out["service_s"].items()))
        if args.rates is None:  # step runs first: its capacity sets the rates both schedulers get
            burst = [body(concepts[i % len(concepts)], MIX_STEPS[i % len(MIX_STEPS)], seed=3 * 10**6 + i)
                     for i in range(2 * args.max_batch_size)]
            started = time.perf_counter()
            list(pool.map(lambda request: timed(url, request), burst))
            capacity = len(burst) / (time.perf_counter() - started)
            args.rates = [round(f * capacity, 2) for f in args.fractions]
            out["capacity_per_s"] = capacity
            progress(f"{scheduler}: estimated capacity {capacity:.2f} requests/s (a burst of {len(burst)}); rates "
                     + ", ".join(f"{r:g}" for r in args.rates) + " requests/s")
        out["join"] = join_case(url, pool, concepts, args.join_trials)
        progress(f"{scheduler}: join case short/long {out['join']['ratio']:.2f}")
        out["rates"] = {}
        for index, rate in enumerate(args.rates):
            arrivals = workload(args, concepts, rate, index)
            row = open_loop(url, pool, arrivals, args.duration, drain_s=max(60.0, 4 * args.duration))
            out["rates"][str(rate)] = row
            progress(f"{scheduler}: {rate:g}/s: {row['completed']}/{row['sent']} done, {row['errors']} errors, "
                     f"{row['images_per_s']:.2f} images/s, p50 {row['p50_s']:.2f} s, p99 {row['p99_s']:.2f} s")
    finally:
        serve.delete(scheduler)
    return out


def report(args: argparse.Namespace, results: dict) -> None:
    env = results["environment"]
    print(f"\nmodel {args.model} on {env['device_name']}; torch {env['torch']}, ray {env['ray']}; "
          f"max_batch_size {args.max_batch_size}, one Generator and one Ingress replica")
    print(f"load: Poisson arrivals for {args.duration:g} s per rate, 50/50 {MIX_STEPS[0]}/{MIX_STEPS[1]} steps, "
          f"{args.concepts} concepts, n=1; latency from scheduled arrival to full response")

    print(f"\njoin: a {JOIN_STEPS[0]}-step request, {JOIN_DELAY_S:g} s later a {JOIN_STEPS[1]}-step one "
          f"(median of {args.join_trials}; target for step <= {JOIN_TARGET:.2f})")
    header = f"{'scheduler':<10}{'long s':>9}{'short s':>9}{'short/long':>12}"
    print(header + "\n" + "-" * len(header))
    for name in ORDER:
        join = results[name]["join"]
        print(f"{name:<10}{join['long_s']:9.2f}{join['short_s']:9.2f}{join['ratio']:12.2f}")

    by_steps = "".join(f"{f'p50 {n}st':>9}" for n in MIX_STEPS)
    header = (f"{'scheduler':<10}{'rate/s':>8}{'sent':>6}{'offered/s':>10}{'done':>6}{'errors':>7}{'images/s':>10}"
              f"{'p50 s':>8}{'p95 s':>8}{'p99 s':>8}" + by_steps)
    print("\nopen-loop load (p50 Nst: median latency of the N-step requests only)\n" + header + "\n" + "-" * len(header))
    for name in ORDER:
        for rate, row in results[name]["rates"].items():
            print(f"{name:<10}{float(rate):8.2f}{row['sent']:6d}{row['offered_per_s']:10.2f}{row['completed']:6d}{row['errors']:7d}"
                  f"{row['images_per_s']:10.2f}{row['p50_s']:8.2f}{row['p95_s']:8.2f}{row['p99_s']:8.2f}"
                  + "".join(f"{row['p50_by_steps_s'].get(str(n), float('nan')):9.2f}" for n in MIX_STEPS))

    header = f"{'rate/s':>8}{'images/s':>10}{'p50':>8}{'p95':>8}{'p99':>8}" + by_steps
    print("\nstep / static (images/s: higher is better; latency: lower is better)\n" + header + "\n" + "-" * len(header))
    for rate, ratio in results["ratios"].items():
        print(f"{float(rate):8.2f}{ratio['images_per_s']:10.2f}{ratio['p50_s']:8.2f}{ratio['p95_s']:8.2f}{ratio['p99_s']:8.2f}"
              + "".join(f"{ratio['p50_by_steps_s'].get(str(n), float('nan')):9.2f}" for n in MIX_STEPS))
    print(f"join short/long: step {results['step']['join']['ratio']:.2f}, static {results['static']['join']['ratio']:.2f}")
    fairness = results["fairness"]
    print(f"\nfairness\n50-step p50 step/static at the highest rate ({fairness['rate']:g}/s): "
          f"{fairness['long_p50_ratio']:.2f} (target <= {LONG_P50_TARGET:.2f}) {verdict(fairness['long_p50_ok'])}")
    print(f"join short/long: {fairness['join_ratio']:.2f} (target <= {JOIN_TARGET:.2f}) {verdict(fairness['join_ok'])}")
    errors = [(name, rate, row["error_samples"]) for name in ORDER for rate, row in results[name]["rates"].items()
              if row["errors"]]
    for name, rate, samples in errors:
        print(f"errors ({name}, {float(rate):g}/s): {samples}")


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def fairness_figures(results: dict) -> dict:
    """The two figures the step scheduler's fairness policy is held to (a NaN figure is a MISS)."""
    highest = max(results["ratios"], key=float)
    long_ratio = results["ratios"][highest]["p50_by_steps_s"][str(MIX_STEPS[-1])]
    join_ratio = results["step"]["join"]["ratio"]
    return {"rate": float(highest), "long_p50_ratio": long_ratio, "long_p50_ok": bool(long_ratio <= LONG_P50_TARGET),
            "join_ratio": join_ratio, "join_ok": bool(join_ratio <= JOIN_TARGET)}


def main() -> int:
    args = parse_args()
    pool = ThreadPoolExecutor(512)  # open loop: enough threads that a slow server never delays a send
    results = run_serving(args, "serve-latency", lambda workdir, concepts: {  # one at a time: never sharing a GPU
        scheduler: measure(scheduler, args, workdir, concepts, pool) for scheduler in ORDER}, pool)
    if results is None:
        return 130

    ratio = lambda a, b: a / b if a is not None and b else float("nan")  # noqa: E731
    results["ratios"] = {}
    for rate, step in results["step"]["rates"].items():
        static = results["static"]["rates"][rate]
        results["ratios"][rate] = {key: ratio(step[key], static[key]) for key in ("images_per_s", "p50_s", "p95_s", "p99_s")}
        results["ratios"][rate]["p50_by_steps_s"] = {str(n): ratio(step["p50_by_steps_s"].get(str(n)),
                                                                   static["p50_by_steps_s"].get(str(n))) for n in MIX_STEPS}
    results["fairness"] = fairness_figures(results)
    finish(args, results, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
