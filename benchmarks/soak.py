"""Soak: residual churn with corrupt versions plus steady load for N minutes, watching the generator's memory.

The Ray Serve app from serve/app.py is deployed with serve/config-cpu.yaml's application settings
(serve/config.yaml's with --device cuda) and one Generator and one Ingress replica, serving
--concepts random residuals from a local folder. For --minutes:

  load    --clients closed-loop clients: each sends a generation request for a random concept
          (10 or 30 steps, n=1, b64_json) and, one time in ten, GET /v1/models instead; after a
          429 (shed load) it waits as Retry-After says
  churn   --churn-per-s times a second a random concept's residual is replaced (written to a
          temporary name, then renamed over the old one, as `catversion batch` writes). One
          replacement in --corrupt-every is corrupt, of one of these kinds in turn, and the next
          replacement of that concept is good again:
            truncated   the first half of a good file
            garbage     random bytes
            empty       zero bytes
            wrong-shape a valid residual for another hidden size
            torn        a good file overwritten in place, cut short (a writer that does not rename)

Every minute it prints the generator and ingress replicas' resident memory (VmRSS, and of it
RssAnon: heap; RssFile: mapped libraries and files), the status counts so far and that minute's
p50/p99 of the answered generation requests. At the end: RSS at start (after the warm-up), at the
end and at its peak, status counts, p50/p99 over the whole run, 5xx count (target 0), and the
statuses of requests for concepts that were never corrupted (target: 200, or 429 for shed load).

With --malloc-arena-max N the Ray processes run with MALLOC_ARENA_MAX=N (glibc's limit on malloc
arenas; the default is 8 per core), to tell allocator arenas from a leak. benchmarks/README.md has
the figures of a 10-minute run and what they say about the generator's memory.

Run (CPU, tiny model; --minutes 10 takes 11 minutes):
    .venv/bin/python benchmarks/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import threading
import time
from collections import Counter
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

from catversion import Residual, layout
from catversion.encoder import patched_layers
from catversion.models import load_base_model
from serve.app import build_app
from serve_throughput import finish, model_parser, progress, run_serving

ROOT = Path(__file__).resolve().parent.parent
APP = "soak"
MIX_STEPS = (10, 30)
CORRUPT_KINDS = ("truncated", "garbage", "empty", "wrong-shape", "torn")
def parse_args() -> argparse.Namespace:
    parser = model_parser(__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long load and churn run")
    parser.add_argument("--concepts", type=int, default=32, help="concepts served (and churned)")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--churn-per-s", type=float, default=5.0, help="residual replacements per second")
    parser.add_argument("--corrupt-every", type=int, default=7, help="one replacement in this many is corrupt")
    parser.add_argument("--stable", type=int, default=4,
                        help="of the concepts, this many are never churned (their requests must all be 200)")
    parser.add_argument("--malloc-arena-max", type=int, default=None,
                        help="run Ray's processes with MALLOC_ARENA_MAX set to this (glibc malloc arenas)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.minutes <= 0 or args.clients < 1 or args.churn_per_s < 0 or args.corrupt_every < 1:
        parser.error("need --minutes > 0, --clients >= 1, --churn-per-s >= 0 and --corrupt-every >= 1")
    if not 0 <= args.stable < args.concepts:
        parser.error("--stable must be >= 0 and below --concepts")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu")
    return args


def memory(pattern: str) -> dict[str, float]:
    """VmRSS, RssAnon and RssFile in MiB of the one process whose command line matches `pattern` (Linux /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not re.search(pattern, cmdline):
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        fields = dict(re.findall(r"^(VmRSS|RssAnon|RssFile):\s+(\d+) kB", status, re.M))
        return {name: int(kb) / 1024 for name, kb in fields.items()} | {"pid": int(pid)}
    return {}


def replica_memory() -> dict[str, dict]:
    return {name: memory(rf"ServeReplica:{APP}:{name}\b") for name in ("Generator", "Ingress")}


class Churn(threading.Thread):
    """Replaces residuals at a steady rate; every `corrupt_every`-th replacement is corrupt (kinds in turn)."""

    def __init__(self, args: argparse.Namespace, folder: Path, concepts: list[tuple[str, str]], stop: threading.Event):
        super().__init__(daemon=True)
        self.args, self.folder, self.stop = args, folder, stop
        self.churned = concepts[args.stable:]
        encoder = load_base_model(args.model, "cpu", components=("text_encoder",)).text_encoder.config
        self.layers, self.hidden = patched_layers(encoder.num_hidden_layers), encoder.hidden_size
        self.counts: Counter = Counter()
        self.rng = random.Random(1)

    def _residual_bytes(self, concept_id: str, word: str, hidden: int) -> bytes:
        tmp = self.folder / f".soak-{concept_id}.safetensors"
        tensor = torch.randn((len(self.layers), 2, 1, hidden))
        Residual(tensor, self.layers, meta={"class_word": word, "base_model": self.args.model}).save(str(tmp))
        data = tmp.read_bytes()
        tmp.unlink()
        return data

    def replace(self, concept_id: str, word: str, kind: str) -> None:
        path = Path(layout.residual_uri(str(self.folder), concept_id))
        good = self._residual_bytes(concept_id, word, self.hidden)
        if kind == "torn":  # in place, no rename: readers may see it half written
            with open(path, "r+b") as f:
                f.write(good[: len(good) // 3])
                f.truncate()
            return
        data = {"good": good, "truncated": good[: len(good) // 2], "garbage": os.urandom(len(good)), "empty": b"",
                "wrong-shape": self._residual_bytes(concept_id, word, self.hidden + 8)}[kind]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def run(self) -> None:
        corrupt: set[str] = set()
        interval = 1.0 / self.args.churn_per_s if self.args.churn_per_s else None
        next_at = time.perf_counter()
        while interval is not None and not self.stop.is_set():
            concept_id, word = self.rng.choice(self.churned)
            n = sum(self.counts.values()) + 1
            if concept_id in corrupt:
                kind = "good"
                corrupt.discard(concept_id)
            elif n % self.args.corrupt_every == 0:
                kind = CORRUPT_KINDS[(n // self.args.corrupt_every) % len(CORRUPT_KINDS)]
                corrupt.add(concept_id)
            else:
                kind = "good"
            self.replace(concept_id, word, kind)
            self.counts[kind] += 1
            next_at += interval
            self.stop.wait(max(0.0, next_at - time.perf_counter()))


class Load:
    """Closed-loop clients; records (time, path kind, concept, status, latency)."""

    def __init__(self, url: str, args: argparse.Namespace, concepts: list[tuple[str, str]], stop: threading.Event):
        self.url, self.args, self.concepts, self.stop = url, args, concepts, stop
        self.records: list[tuple[float, str, str, str, float]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(args.clients)]

    def client(self, index: int) -> None:
        rng = random.Random(100 + index)
        session = requests.Session()
        seed = index * 10**7
        while not self.stop.is_set():
            seed += 1
            started = time.perf_counter()
            if rng.random() < 0.1:
                kind, concept_id = "models", ""
                call = lambda: session.get(f"{self.url}/v1/models", timeout=120)  # noqa: E731
            else:
                kind = "generate"
                concept_id, word = rng.choice(self.concepts)
                request = {"model": concept_id, "prompt": f"a photo of a {word} in the snow", "n": 1,
                           "response_format": "b64_json", "num_inference_steps": rng.choice(MIX_STEPS), "seed": seed}
                call = lambda: session.post(f"{self.url}/v1/images/generations", json=request, timeout=120)  # noqa: E731
            retry_after = None
            try:
                response = call()
                status, retry_after = str(response.status_code), response.headers.get("retry-after")
            except Exception as exc:  # a timeout, a refused or reset connection
                status = type(exc).__name__
            with self.lock:
                self.records.append((time.perf_counter(), kind, concept_id, status, time.perf_counter() - started))
            if status == "429":  # shed load: a well-behaved client waits as told (at most 5 s here)
                self.stop.wait(min(5.0, float(retry_after or 1)))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=130)

    def since(self, t: float) -> list[tuple]:
        with self.lock:
            return [r for r in self.records if r[0] >= t]


def percentiles(latencies: list[float]) -> tuple[float, float]:
    if not latencies:
        return float("nan"), float("nan")
    return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


def deploy(args: argparse.Namespace, residuals: Path) -> str:
    config = ROOT / "serve" / ("config.yaml" if args.device == "cuda" else "config-cpu.yaml")
    app = yaml.safe_load(config.read_text())["applications"][0]
    settings = {**app["args"], "residuals": str(residuals), "model": args.model, "device": args.device,
                "gpus_per_replica": 1 if args.device == "cuda" else 0}
    options = {}
    for deployment in app.get("deployments", []):
        name = deployment.pop("name")
        deployment["autoscaling_config"] = {**(deployment.get("autoscaling_config") or {}), "min_replicas": 1, "max_replicas": 1}
        options[name] = deployment
    serve.run(build_app({**settings, "deployment_options": options}), name=APP, route_prefix=f"/{APP}")
    return f"http://127.0.0.1:{args.port}/{APP}"


def soak(args: argparse.Namespace, folder: Path, concepts: list[tuple[str, str]]) -> dict:
    url = deploy(args, folder)
    for concept_id, word in concepts:  # each residual cached once, so the start figure is a warm replica
        requests.post(f"{url}/v1/images/generations", timeout=120, json={
            "model": concept_id, "prompt": f"a {word}", "n": 1, "num_inference_steps": MIX_STEPS[0], "seed": 0})
    start_memory = replica_memory()
    progress(f"warm; generator {start_memory['Generator']}, ingress {start_memory['Ingress']} (MiB)")
    stop = threading.Event()
    churn, load = Churn(args, folder, concepts, stop), Load(url, args, concepts, stop)
    samples = [{"minute": 0, **{k: v for k, v in start_memory["Generator"].items() if k != "pid"}}]
    started = time.perf_counter()
    churn.start()
    load.start()
    try:
        minute = 0
        while minute < args.minutes:
            stop.wait(max(0.0, started + 60 * min(minute + 1, args.minutes) - time.perf_counter()))
            minute = min(minute + 1, args.minutes)
            recent = [r for r in load.since(started + 60 * (minute - 1)) if r[1] == "generate" and r[3] == "200"]
            p50, p99 = percentiles([r[4] for r in recent])
            mem = replica_memory()
            samples.append({"minute": minute, **{k: v for k, v in mem["Generator"].items() if k != "pid"}})
            progress(f"minute {minute:g}: generator RSS {mem['Generator'].get('VmRSS', float('nan')):.0f} MiB "
                     f"(anon {mem['Generator'].get('RssAnon', float('nan')):.0f}, file {mem['Generator'].get('RssFile', float('nan')):.0f}), "
                     f"ingress {mem['Ingress'].get('VmRSS', float('nan')):.0f} MiB; statuses so far "
                     f"{dict(Counter(r[3] for r in load.since(0)))}; this minute p50 {p50:.2f} s, p99 {p99:.2f} s")
    finally:
        stop.set()
        churn.join(timeout=30)
        load.join()
    end_memory = replica_memory()
    records = load.since(0)
    generate = [r for r in records if r[1] == "generate"]
    stable_ids = {c for c, _ in concepts[:args.stable]}
    p50, p99 = percentiles([r[4] for r in generate if r[3] == "200"])
    peak = max(samples, key=lambda s: s.get("VmRSS", 0))
    return {"memory": {"start": start_memory, "end": end_memory, "peak_generator": peak, "per_minute_generator": samples},
            "churn": dict(churn.counts),
            "statuses": {"generate": dict(Counter(r[3] for r in generate)),
                         "models": dict(Counter(r[3] for r in records if r[1] == "models")),
                         "never_corrupted_concepts": dict(Counter(r[3] for r in generate if r[2] in stable_ids))},
            "5xx": sum(1 for r in records if r[3].isdigit() and int(r[3]) >= 500),
            "p50_s": p50, "p99_s": p99, "seconds": time.perf_counter() - started}


def report(args: argparse.Namespace, results: dict) -> None:
    env, mem = results["environment"], results["memory"]
    gen_start, gen_end = mem["start"]["Generator"], mem["end"]["Generator"]
    print(f"\nsoak: {args.minutes:g} min, model {args.model} on {env['device_name']}; {args.clients} clients, "
          f"{args.concepts} concepts ({args.stable} never churned), {args.churn_per_s:g} replacements/s "
          f"(one in {args.corrupt_every} corrupt); MALLOC_ARENA_MAX={args.malloc_arena_max or 'unset'}")
    print(f"replacements: {results['churn']}")
    for name in ("VmRSS", "RssAnon", "RssFile"):
        print(f"generator {name:<8} start {gen_start.get(name, float('nan')):7.0f} MiB, end {gen_end.get(name, float('nan')):7.0f} MiB, "
              f"peak sample {mem['peak_generator'].get(name, float('nan')):7.0f} MiB")
    print(f"generator RSS per minute (MiB): " + ", ".join(f"{s.get('VmRSS', float('nan')):.0f}" for s in mem["per_minute_generator"]))
    print(f"ingress VmRSS start {mem['start']['Ingress'].get('VmRSS', float('nan')):.0f} MiB, "
          f"end {mem['end']['Ingress'].get('VmRSS', float('nan')):.0f} MiB")
    print(f"statuses: generations {results['statuses']['generate']}, GET /v1/models {results['statuses']['models']}")
    print(f"never-corrupted concepts: {results['statuses']['never_corrupted_concepts']} (target: only 200, or 429 "
          f"for shed load)")
    print(f"answered generations: p50 {results['p50_s']:.2f} s, p99 {results['p99_s']:.2f} s; 5xx: {results['5xx']} (target 0)")


def main() -> int:
    args = parse_args()
    if args.malloc_arena_max is not None:  # before Ray starts: its processes inherit the driver's environment
        os.environ["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
    results = run_serving(args, "soak", lambda workdir, concepts: soak(args, workdir, concepts))
    if results is None:
        return 130
    finish(args, results, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
