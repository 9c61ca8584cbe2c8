"""The sampling path's resident memory over many requests, in one process: no Ray, no HTTP.

Tells a leak in the library's sampling (StepBatcher, the executor, ImageGenerator's caches, the
patched text encoder) from memory that a serving replica's Ray and HTTP layers hold. Batches of
--batch requests (a new prompt each, 10 or 30 steps, guided) go through one StepBatcher; the
process's VmRSS, RssAnon (heap) and RssFile (mapped files) are printed after the warm-up and
every --every requests.

Run (CPU, tiny model; a few minutes):
    .venv/bin/python benchmarks/sampling_memory.py --requests 1200
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from catversion.generation import ImageGenerator  # noqa: E402
from catversion.models import load_base_model  # noqa: E402
from catversion.stepbatch import Job, StepBatcher  # noqa: E402


def memory() -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of this process in MiB (Linux /proc)."""
    status = Path("/proc/self/status").read_text()
    return {name: int(kb) // 1024 for name, kb in re.findall(r"^(VmRSS|RssAnon|RssFile):\s+(\d+) kB", status, re.M)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (default), sd15-random, or a diffusers folder")
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=8, help="requests submitted together")
    parser.add_argument("--every", type=int, default=200, help="print memory every this many requests")
    args = parser.parse_args()
    if min(args.requests, args.batch, args.every) < 1:
        parser.error("--requests, --batch and --every must be >= 1")
    base = load_base_model(args.model, "cuda" if torch.cuda.is_available() else "cpu")
    batcher = StepBatcher(ImageGenerator(base), max_batch_size=4)
    rng = random.Random(0)

    def run(first_seed: int, count: int) -> None:
        jobs = [Job(f"a photo of thing number {first_seed + i}", seed=first_seed + i, steps=rng.choice((10, 30)))
                for i in range(count)]
        batcher.generate(jobs)

    run(0, args.batch)
    start = memory()
    print(f"after warm-up: {start}", flush=True)
    done = 0
    while done < args.requests:
        count = min(args.batch, args.requests - done)
        run(10**6 + done, count)
        done += count
        if done % args.every < count or done == args.requests:
            print(f"{done} requests: {memory()}", flush=True)
    end = memory()
    print(f"RssAnon {start['RssAnon']} -> {end['RssAnon']} MiB over {args.requests} requests", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
