"""How the Ray batch job scales with the number of concepts: a fresh run, an up-to-date rerun, and pure training.

N concepts (default 1000) of a few small synthetic JPEGs each go to a local S3 server (moto, on
127.0.0.1), with a parquet manifest (concept_id, class_word, image_uri). One local Ray is started
first and timed on its own; both job runs share it, so neither pays for Ray start-up. Then:

1. fresh run: `pipelines.batch.run_batch` trains every concept (every one must end "ok"). Reports
   its wall time, its planning time per concept (`BatchSummary.planning_seconds` / N) and the job's
   training images/s: ok concepts x steps x batch 2 / (wall time - planning time).
2. up-to-date rerun with a new run id: every concept must be "skipped", decided from listings and
   index files alone. Reports its wall time and planning time per concept.
3. in-process baseline, no Ray: `ResidualTrainer(load_base_model(model), pack=pack).train(concepts)`
   on one torch thread (as each CPU worker of the job runs), over up to 200 of the same concepts
   whose photos were fetched from the same S3 into memory first (not timed). Its images/s against
   the job's gives the ratio job / in-process; the job runs --workers workers, so the ratio per
   worker is printed too (1.0 would mean that each worker trains as fast as the bare trainer).

The last lines check the issue's targets: the fresh run within 50 s and the up-to-date rerun
within 8 s (Ray start-up excluded from both; it is printed separately).

--cli-rerun measures instead what a user waits for when nothing needs training: `catversion batch`
run from the command line, as a subprocess, on the same manifest with every concept up to date, so
no Ray starts; the whole command is timed (interpreter start, imports, planning, results), 3 times,
and the median is compared with the bare start-up of the same command line (`catversion batch
--help`, 3 times, median) measured in the same run. No training happens: for every concept the
benchmark writes what a finished run leaves (a residual file, placeholder zero vectors that
planning lists but never reads, and the image and residual index entries), with the training
fingerprint computed from the loaded base model as the trainer computes it, and every timed run
must report all N concepts skipped. A first run comes before the timed ones and is printed apart:
like the first run on a machine, it computes the base model's fingerprint (catversion.modelinfo
caches it, here in a fresh temporary CATVERSION_CACHE_DIR). Target: <= 5 s.

    .venv/bin/python benchmarks/batch_scale.py                       # 1000 concepts x 3 photos, 1 step, 2 workers
    .venv/bin/python benchmarks/batch_scale.py --concepts 20 --json  # a quick check, plus one JSON object
    .venv/bin/python benchmarks/batch_scale.py --cli-rerun           # the up-to-date 1000-concept rerun, command line

The photos are generated (in parallel, before anything is timed) and uploaded by a thread pool.
The job's log goes to stderr (--quiet hides it); the "planned in ..." lines are always shown.
The machine is noisy (other processes share its cores, and moto serves S3 from the same CPUs), so
absolute seconds move a lot from run to run: compare the ratios printed by one run, and compare
runs only from the same idle machine.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BUCKET = "bench"
BATCH_SIZE = 2  # rows per concept per training step (the recipe's batch size)
BASELINE_MAX_CONCEPTS = 200
FRESH_TARGET_S = 50.0
RERUN_TARGET_S = 8.0
CLI_RERUN_TARGET_S = 5.0
CLI_REPEATS = 3
CLI_TIMEOUT_S = 900.0  # a rerun that (wrongly) trains would start Ray and train N concepts
ROOT = Path(__file__).resolve().parents[1]
UPLOAD_THREADS = 16
REQUESTS_RE = re.compile(r"\((\d+) listing/index requests\)")


def concept_list(n: int) -> list[tuple[str, str, str, int]]:
    """(concept_id, class_word, sample id, seed): the four sample objects in turn, each concept its own seed."""
    from catversion.samples import SAMPLE_CONCEPTS

    ids = list(SAMPLE_CONCEPTS)
    out = []
    for i in range(n):
        sample = SAMPLE_CONCEPTS[ids[i % len(ids)]]
        out.append((f"{sample.concept_id}-{i:05d}", sample.class_word, sample.concept_id, i))
    return out


def _render(job: tuple[str, int, int, int]) -> list[bytes]:
    from catversion.samples import concept_jpegs

    sample_id, images, size, seed = job
    return concept_jpegs(sample_id, n=images, size=size, seed=seed)


def render_all(concepts: list[tuple[str, str, str, int]], images: int, size: int) -> list[list[bytes]]:
    """Every concept's JPEGs; distinct per concept (the seed is the concept's index). Runs on all cores."""
    jobs = [(sample_id, images, size, seed) for _, _, sample_id, seed in concepts]
    # fork: the benchmark has started no threads yet, and the children only render images.
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_render, jobs, chunksize=max(1, len(jobs) // 64)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def upload(client, concepts, jpegs) -> str:
    """Put every photo under photos/<concept_id>/<i>.jpg and the manifest; returns the manifest's URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    puts, rows = [], []
    for (concept_id, word, _, _), images in zip(concepts, jpegs):
        for i, data in enumerate(images):
            key = f"photos/{concept_id}/{i}.jpg"
            puts.append((key, data))
            rows.append({"concept_id": concept_id, "class_word": word, "image_uri": f"s3://{BUCKET}/{key}"})
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=BUCKET, Key=item[0], Body=item[1]), puts))
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    client.put_object(Bucket=BUCKET, Key="manifest.parquet", Body=sink.getvalue())
    return f"s3://{BUCKET}/manifest.parquet"


def fetch(client, concepts, images: int) -> list[list[bytes]]:
    """The photos of `concepts`, read back from S3 (for the in-process baseline)."""
    def get(concept_id: str) -> list[bytes]:
        return [client.get_object(Bucket=BUCKET, Key=f"photos/{concept_id}/{i}.jpg")["Body"].read() for i in range(images)]

    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        return list(pool.map(get, [c[0] for c in concepts]))


class JobLog:
    """run_batch's log: kept, echoed to stderr unless quiet; remembers the planning line."""

    def __init__(self, quiet: bool):
        self.quiet, self.lines, self.started = quiet, [], time.perf_counter()

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if not self.quiet or "planned in" in line:
            print(f"  {time.perf_counter() - self.started:7.1f}s {line}", file=sys.stderr, flush=True)

    def requests(self) -> int | None:
        for line in self.lines:
            if "planned in" in line and (match := REQUESTS_RE.search(line)):
                return int(match.group(1))
        return None


def timed_run(config, quiet: bool):
    from pipelines.batch import run_batch

    log = JobLog(quiet)
    started = time.perf_counter()
    summary = run_batch(config, log=log)
    return summary, time.perf_counter() - started, log.requests()


def baseline(model: str, pack: int, steps: int, concepts, jpegs) -> float:
    """Seconds `ResidualTrainer.train` takes for these concepts in this process, on one torch thread."""
    import torch

    from catversion.models import load_base_model
    from catversion.training import Concept, ResidualTrainer, TrainConfig

    torch.set_num_threads(1)
    trainer = ResidualTrainer(load_base_model(model), pack=pack)
    config = TrainConfig(steps=steps, save_steps=())
    batch = [Concept(cid, images, word, config=config) for (cid, word, _, _), images in zip(concepts, jpegs)]
    started = time.perf_counter()
    results = trainer.train(batch)
    seconds = time.perf_counter() - started
    bad = [r for r in results if r.status != "ok"]
    if bad:
        raise RuntimeError(f"in-process baseline: {len(bad)} concept(s) failed, e.g. {bad[0].concept_id}: {bad[0].error}")
    return seconds


def write_up_to_date(client, output: str, model: str, steps: int, concepts, jpegs) -> None:
    """Leave under `output` what a finished run of this manifest leaves, without training: a residual
    file per concept (zero vectors: planning lists residuals, it never reads them) and the image and
    residual index entries, with each concept's training fingerprint computed as the trainer does."""
    import hashlib

    import torch

    from catversion import layout, storage
    from catversion.models import load_base_model
    from catversion.recipe import Concept, TrainConfig, image_digest, training_fingerprint
    from catversion.residual import Residual
    from catversion.training import training_target
    from pipelines import plan

    base = load_base_model(model, device="cpu", components=("text_encoder",))
    target = training_target(base, precision="fp32")  # what CPU workers (--gpus-per-worker 0) train at
    width = base.text_encoder.config.hidden_size
    stamps = {info.uri: info.stamp for info in storage.list_objects(f"s3://{BUCKET}/photos/")}
    config = TrainConfig(steps=steps, save_steps=())

    def finished(item) -> dict:
        (concept_id, word, _, _), images = item
        uris = [f"s3://{BUCKET}/photos/{concept_id}/{i}.jpg" for i in range(len(images))]
        digests = [image_digest(data) for data in images]
        fingerprint = training_fingerprint(Concept(concept_id, uris, word, config=config), digests, target)
        residual = Residual(torch.zeros(len(target.layers), 2, target.tokens, width), target.layers,
                            config.prefix_logit_bias, meta={"concept_id": concept_id, "class_word": word,
                                                            "base_fingerprint": target.base_fingerprint})
        data = residual.to_bytes()
        info = storage.write_bytes(layout.residual_uri(output, concept_id), data)
        return {"concept_id": concept_id, "status": "ok", "residual_stamp": info.stamp, "fingerprint": fingerprint,
                "sha256": hashlib.sha256(data).hexdigest(), "steps": steps, "final_loss": 0.0,
                "image_uris": uris, "image_stamps": [stamps[uri] for uri in uris], "image_sha256s": digests}

    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        rows = list(pool.map(finished, zip(concepts, jpegs)))
    plan.update_indexes(output, plan.Listing(), rows, storage.RetryBudget(60.0))


def run_command(argv: list[str], env: dict) -> tuple[float, str]:
    """Wall seconds of one command and its stdout; a failure ends the benchmark with its stderr."""
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def cli_rerun(args, manifest: str, tmp: str, client, concepts, jpegs) -> dict:
    """The up-to-date rerun from the command line against the command line's bare start-up."""
    output = f"s3://{BUCKET}/cli-out"
    started = time.perf_counter()
    write_up_to_date(client, output, args.model, args.steps, concepts, jpegs)
    print(f"wrote {len(concepts)} up-to-date residuals and the indexes in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    env = {**os.environ, "CATVERSION_CACHE_DIR": os.path.join(tmp, "catversion-cache")}
    cli = [sys.executable, "-m", "catversion.cli", "batch"]
    rerun = [*cli, "--manifest", manifest, "--output", output, "--model", args.model, "--steps", str(args.steps),
             "--quiet", "--json"]

    def timed_rerun() -> tuple[float, dict]:
        seconds, stdout = run_command(rerun, env)
        summary = json.loads(stdout)
        if summary["counts"]["skipped"] != len(concepts):
            raise RuntimeError(f"the rerun was not up to date: {summary['counts']} (expected {len(concepts)} "
                               f"skipped); see {summary['results_uri']}")
        return seconds, summary

    first, _ = timed_rerun()
    print(f"first run (computes the base model's fingerprint): {first:.1f} s", file=sys.stderr)
    help_times = [run_command([*cli, "--help"], env)[0] for _ in range(CLI_REPEATS)]
    reruns = [timed_rerun() for _ in range(CLI_REPEATS)]
    rerun_times = [seconds for seconds, _ in reruns]
    median = statistics.median(rerun_times)
    baseline = statistics.median(help_times)
    return {"first_run_s": first, "help_s": help_times, "help_median_s": baseline, "rerun_s": rerun_times,
            "rerun_median_s": median, "rerun_planning_s": [summary["planning_seconds"] for _, summary in reruns],
            "ratio_rerun_over_help": median / baseline, "rerun_within_target": median <= CLI_RERUN_TARGET_S}


def print_cli_rerun(args, numbers: dict) -> None:
    def seconds(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values) + " s"

    rows = [
        ("concepts (N)", f"{args.concepts} x {args.images} photos, all up to date"),
        ("model", args.model),
        ("first run", f"{numbers['first_run_s']:.2f} s (computes and caches the base model's fingerprint)"),
        ("`catversion batch --help`", f"median {numbers['help_median_s']:.2f} s ({seconds(numbers['help_s'])})"),
        ("up-to-date rerun", f"median {numbers['rerun_median_s']:.2f} s ({seconds(numbers['rerun_s'])})"),
        ("  of which planning", seconds(numbers["rerun_planning_s"])),
        ("rerun / --help", f"{numbers['ratio_rerun_over_help']:.2f}x"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print()
    print(f"up-to-date rerun from the command line <= {CLI_RERUN_TARGET_S:g} s: "
          f"{'yes' if numbers['rerun_within_target'] else 'no'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", type=int, default=1000, help="concepts in the manifest (default: 1000)")
    parser.add_argument("--images", type=int, default=3, help="photos per concept (default: 3)")
    parser.add_argument("--image-size", type=int, default=96, help="photo size in px (default: 96)")
    parser.add_argument("--steps", type=int, default=1, help="training steps per concept (default: 1)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers, 1 CPU each (default: 2)")
    parser.add_argument("--pack", type=int, default=16, help="concepts per UNet batch (default: 16)")
    parser.add_argument("--model", default="tiny", help="base model (default: tiny)")
    parser.add_argument("--json", action="store_true", help="also print one JSON object with every number at the end")
    parser.add_argument("--quiet", action="store_true", help="hide the job's log (except its planning lines)")
    parser.add_argument("--cli-rerun", action="store_true",
                        help="instead: time `catversion batch` from the command line on an up-to-date output "
                             f"(median of {CLI_REPEATS}) against `catversion batch --help`; nothing trains")
    args = parser.parse_args()
    if args.concepts < 1 or args.images < 1 or args.steps < 1:
        parser.error("--concepts, --images and --steps must be >= 1")

    n = args.concepts
    concepts = concept_list(n)
    started = time.perf_counter()
    jpegs = render_all(concepts, args.images, args.image_size)
    print(f"rendered {n * args.images} JPEGs ({args.image_size} px) in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)

    import ray
    from moto.server import ThreadedMotoServer

    from pipelines.batch import BatchConfig

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    tmp = tempfile.mkdtemp(prefix="batch-scale-")
    server.start()
    try:
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        os.environ["RAY_TMPDIR"] = os.path.join(tmp, "ray")
        os.makedirs(os.environ["RAY_TMPDIR"])
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", config=Config(max_pool_connections=UPLOAD_THREADS))
        client.create_bucket(Bucket=BUCKET)
        started = time.perf_counter()
        manifest = upload(client, concepts, jpegs)
        print(f"uploaded {n * args.images} photos and the manifest in {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
        if args.cli_rerun:
            numbers = cli_rerun(args, manifest, tmp, client, concepts, jpegs)
            print_cli_rerun(args, numbers)
            if args.json:
                print(json.dumps({"concepts": n, "images": args.images, "model": args.model, "cpus": os.cpu_count(),
                                  **numbers}))
            return 0

        started = time.perf_counter()
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_start = time.perf_counter() - started
        print(f"Ray started in {ray_start:.1f} s", file=sys.stderr)

        def config(run_id: str) -> BatchConfig:
            return BatchConfig(manifest=manifest, output=f"s3://{BUCKET}/out", model=args.model, workers=args.workers,
                               pack=args.pack, steps=args.steps, storage_path=os.path.join(tmp, "train"), run_id=run_id)

        print("fresh run ...", file=sys.stderr)
        fresh, fresh_wall, fresh_requests = timed_run(config("scale-fresh"), args.quiet)
        if fresh.counts.get("ok") != n:
            print(f"fresh run: expected {n} ok, got {fresh.counts}", file=sys.stderr)
            print(fresh.format(), file=sys.stderr)
            return 1

        print("up-to-date rerun ...", file=sys.stderr)
        rerun, rerun_wall, rerun_requests = timed_run(config("scale-rerun"), args.quiet)
        if rerun.counts.get("skipped") != n:
            print(f"rerun: expected {n} skipped, got {rerun.counts}", file=sys.stderr)
            print(rerun.format(), file=sys.stderr)
            for row in rerun.results:
                if row["status"] != "skipped":
                    print(f"  {row['status']} {row['concept_id']}: {row.get('error') or row.get('detail')}", file=sys.stderr)
            return 1
        ray.shutdown()  # an idle Ray would still share the cores with the baseline

        subset = concepts[:min(n, BASELINE_MAX_CONCEPTS)]
        photos = fetch(client, subset, args.images)
        print(f"in-process baseline: {len(subset)} concepts ...", file=sys.stderr)
        pure = baseline(args.model, args.pack, args.steps, subset, photos)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    job_train_s = fresh_wall - fresh.planning_seconds
    job_ips = fresh.counts["ok"] * args.steps * BATCH_SIZE / job_train_s
    pure_ips = len(subset) * args.steps * BATCH_SIZE / pure
    ratio = job_ips / pure_ips
    numbers = {
        "concepts": n, "images": args.images, "image_size": args.image_size, "steps": args.steps,
        "workers": args.workers, "pack": args.pack, "model": args.model, "cpus": os.cpu_count(),
        "ray_start_s": ray_start, "fresh_s": fresh_wall, "rerun_s": rerun_wall,
        "fresh_planning_s": fresh.planning_seconds, "rerun_planning_s": rerun.planning_seconds,
        "fresh_planning_ms_per_concept": 1000 * fresh.planning_seconds / n,
        "rerun_planning_ms_per_concept": 1000 * rerun.planning_seconds / n,
        "fresh_planning_requests": fresh_requests, "rerun_planning_requests": rerun_requests,
        "fresh_counts": fresh.counts, "rerun_counts": rerun.counts,
        "job_train_s": job_train_s, "job_images_per_s": job_ips,
        "inprocess_concepts": len(subset), "inprocess_s": pure, "inprocess_images_per_s": pure_ips,
        "ratio_job_over_inprocess": ratio, "ratio_per_worker": ratio / args.workers,
        "fresh_within_target": fresh_wall <= FRESH_TARGET_S, "rerun_within_target": rerun_wall <= RERUN_TARGET_S,
    }

    def req(value) -> str:
        return "?" if value is None else str(value)

    rows = [
        ("concepts (N)", f"{n}"),
        ("photos per concept", f"{args.images} ({args.image_size} px)"),
        ("steps per concept", f"{args.steps}"),
        ("workers x CPUs", f"{args.workers} x 1 (Ray has {os.cpu_count()} CPUs)"),
        ("pack", f"{args.pack}"),
        ("model", args.model),
        ("Ray start", f"{ray_start:.1f} s (not in the runs below)"),
        ("fresh run", f"{fresh_wall:.1f} s ({fresh.counts['ok']} ok)"),
        ("up-to-date rerun", f"{rerun_wall:.1f} s ({rerun.counts['skipped']} skipped)"),
        ("planning, fresh", f"{numbers['fresh_planning_ms_per_concept']:.2f} ms/concept "
                            f"({fresh.planning_seconds:.1f} s, {req(fresh_requests)} listing/index requests)"),
        ("planning, rerun", f"{numbers['rerun_planning_ms_per_concept']:.2f} ms/concept "
                            f"({rerun.planning_seconds:.1f} s, {req(rerun_requests)} listing/index requests)"),
        ("job training", f"{job_ips:.1f} images/s (fresh run minus planning: {job_train_s:.1f} s)"),
        ("in-process training", f"{pure_ips:.1f} images/s ({len(subset)} concepts in {pure:.1f} s, 1 thread)"),
        ("job / in-process", f"{ratio:.2f}x"),
        (f"job / in-process per worker (/{args.workers})", f"{ratio / args.workers:.2f}x"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print()
    print(f"fresh run <= {FRESH_TARGET_S:g} s: {'yes' if numbers['fresh_within_target'] else 'no'}")
    print(f"up-to-date rerun <= {RERUN_TARGET_S:g} s: {'yes' if numbers['rerun_within_target'] else 'no'}")
    if args.json:
        print(json.dumps(numbers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
