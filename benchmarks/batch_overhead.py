"""What the Ray batch job costs on top of training: wall time of `run_batch` against pure training.

Both sides train the same concepts for the same steps. The baseline is `ResidualTrainer.train` in
this process (model already loaded, images already in memory), i.e. the sum of pure training time.
The job is `pipelines.batch.run_batch` end to end: manifest validation, planning from listings,
Ray Train start-up, a model load per worker, images fetched and hashed from S3, residuals and results written
to S3. Prints the overhead ratio (job wall time / pure training time). A local S3 server (moto) on
127.0.0.1 stands in for S3.

    .venv/bin/python benchmarks/batch_overhead.py                      # tiny, CPU, 1 worker
    .venv/bin/python benchmarks/batch_overhead.py --concepts 8 --steps 300 --workers 1

With --workers 1 both sides use one process's compute, so the ratio is pure overhead; with more
workers the job also gains parallelism (on a machine with the cores or GPUs for it).
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from catversion import storage
from catversion.models import load_base_model
from catversion.samples import SAMPLE_CONCEPTS, concept_jpegs
from catversion.training import Concept, ResidualTrainer, TrainConfig
from pipelines.batch import BatchConfig, run_batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def make_concepts(n: int, images: int, size: int) -> list[tuple[str, str, list[bytes]]]:
    ids = list(SAMPLE_CONCEPTS)
    out = []
    for i in range(n):
        sample = SAMPLE_CONCEPTS[ids[i % len(ids)]]
        out.append((f"{sample.concept_id}-{i}", sample.class_word, concept_jpegs(sample.concept_id, n=images, size=size, seed=i)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--concepts", type=int, default=6)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--pack", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--images-per-concept", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the baseline and per Ray worker (default: 1)")
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        base = load_base_model(args.model)
        concepts = make_concepts(args.concepts, args.images_per_concept, base.resolution)
        rows = []
        for concept_id, word, images in concepts:
            for i, data in enumerate(images):
                uri = f"s3://bench/photos/{concept_id}/{i}.jpg"
                storage.write_bytes(uri, data)
                rows.append({"concept_id": concept_id, "class_word": word, "image_uri": uri})
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        storage.write_bytes("s3://bench/manifest.parquet", sink.getvalue())

        # Baseline: pure training in this process, model loaded, images in memory, the worker's thread count.
        import torch

        torch.set_num_threads(args.threads)
        config = TrainConfig(steps=args.steps, save_steps=())
        batch = [Concept(cid, images, word, config=config) for cid, word, images in concepts]
        started = time.perf_counter()
        ResidualTrainer(base, pack=args.pack).train(batch)
        pure = time.perf_counter() - started

        with tempfile.TemporaryDirectory() as ray_dir:
            job = BatchConfig(manifest="s3://bench/manifest.parquet", output="s3://bench/out", model=args.model,
                              workers=args.workers, cpus_per_worker=args.threads, pack=args.pack, steps=args.steps,
                              storage_path=ray_dir)
            started = time.perf_counter()
            summary = run_batch(job, log=lambda _: None)
            wall = time.perf_counter() - started
        if summary.counts.get("ok") != args.concepts:
            print(summary.format(), file=sys.stderr)
            return 1
    finally:
        server.stop()

    print(f"model {args.model}, {args.concepts} concepts × {args.steps} steps, pack {args.pack}, {args.workers} worker(s), "
          f"{args.threads} thread(s) each")
    print(f"pure training (one process, model loaded):  {pure:8.1f} s")
    print(f"Ray batch job (end to end, incl. Ray start): {wall:8.1f} s")
    print(f"overhead ratio (job / pure training):        {wall / pure:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
