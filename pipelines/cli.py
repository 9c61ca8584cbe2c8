"""`catversion batch`: train every concept of a parquet manifest on Ray Train, residuals to S3 or disk."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Train one CatVersion residual per concept of a parquet manifest (one row per image: concept_id,
image_uri or image_bytes, class_word, optional caption/steps/learning_rate/batch_size/seed) on a
Ray cluster. Writes PREFIX/residuals/<concept_id>.safetensors as each concept finishes and
PREFIX/runs/<run_id>/results.parquet at the end. Concepts that break the manifest schema are
reported by name and never stop the others. A rerun skips concepts whose residual is up to date
and retrains those whose inputs changed.

Runs on a local Ray by default; --address joins a running cluster. To run it on a remote
cluster as a Ray Job:  ray job submit --working-dir . -- catversion batch --manifest ... --output ...
"""


def register(sub) -> None:
    from catversion.models import BUILTIN_MODELS, DEFAULT_MODEL

    p = sub.add_parser("batch", help="train every concept of a parquet manifest on Ray Train", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, nargs="+", metavar="URI",
                   help="parquet file(s) or a prefix/folder of them: s3://bucket/key, file://..., or a path")
    p.add_argument("--output", metavar="PREFIX", help="where residuals and run results go: s3://bucket/prefix or a folder")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"base model: {' | '.join(BUILTIN_MODELS)} | a diffusers folder | a hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (default: 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker; 0 trains on CPU (default: 0)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default: 1)")
    p.add_argument("--pack", type=int, default=4, help="concepts trained together in one UNet batch per worker (default: 4)")
    p.add_argument("--steps", type=int, help="training steps per concept unless the manifest says otherwise (default: 1000)")
    p.add_argument("--resolution", type=int, help="training image size in px (default: the model's native size)")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from (default: 2)")
    p.add_argument("--address", help="Ray cluster address (default: start or join a local Ray)")
    p.add_argument("--run-id", help="name of this run under PREFIX/runs/ (default: timestamp + random suffix)")
    p.add_argument("--storage-path", help="Ray Train run state location (default: ~/ray_results)")
    p.add_argument("--validate-only", action="store_true", help="check the manifest and its images, print the report, train nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from catversion.cli import CLIError

    from .batch import BatchConfig, run_batch
    from .manifest import ManifestError, validate_manifest

    manifest = args.manifest if len(args.manifest) > 1 else args.manifest[0]
    try:
        if args.validate_only:
            report = validate_manifest(manifest)
            print(report.format())
            if report.rejected:
                raise CLIError(f"{len(report.rejected)} concept(s) rejected; fix them and validate again")
            return
        if not args.output:
            raise CLIError("--output PREFIX is required (unless --validate-only)")
        for name in ("workers", "pack"):
            if getattr(args, name) < 1:
                raise CLIError(f"--{name} must be >= 1")
        config = BatchConfig(
            manifest=manifest, output=args.output, model=args.model, workers=args.workers,
            gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker, pack=args.pack, steps=args.steps,
            max_failures=args.max_failures, run_id=args.run_id, resolution=args.resolution, address=args.address,
            storage_path=args.storage_path,
        )
        summary = run_batch(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    except ManifestError as exc:
        raise CLIError(str(exc)) from None
    print(summary.format())
    if not summary.ok:
        raise CLIError(f"run {summary.run_id} finished with failures; see {summary.results_uri}")
