"""The Ray jobs' commands, registered into `catversion` (entry point group `catversion.commands`):
`catversion batch` trains every concept of a parquet manifest on Ray Train, residuals to S3 or disk;
`catversion evaluate` generates with each residual and scores it into a report.

Building the parser imports neither torch nor Ray; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse

from catversion import layout, progress
from catversion.errors import CLIError, PartialFailure, UsageError
from catversion.limits import (BUILTIN_MODELS, DEFAULT_PRECISION, DEVICE_HELP, PRECISION_CHOICES, PRECISION_HELP,
                               device_arg)
from catversion.recipe import REFERENCE_PREFIX_LOGIT_BIAS, TrainConfig

DESCRIPTION = f"""\
Train one CatVersion residual per concept of a parquet manifest (one row per image: concept_id,
image_uri or image_bytes, class_word, optional caption/steps/learning_rate/batch_size/seed/layers) on a
Ray cluster. Writes {layout.RESIDUAL_PATTERN} as each concept finishes and
{layout.RESULTS_PATTERN} at the end. Concepts that break the manifest schema are
reported by name and never stop the others. A rerun skips concepts whose residual is up to date
(decided from listings and PREFIX/index/, without fetching images) and retrains those whose inputs
changed. In-flight concepts save their training state every --state-every steps: a worker failure, a
lost node, Ctrl-C or a crash costs at most that many steps per concept, and the next attempt or rerun
resumes them. Concurrent runs on one output never train a concept twice.

Every concept is trained with the reference recipe unless the manifest overrides it: AdamW
(lr 1e-2, weight decay 0.01), batch 2, {TrainConfig().steps} steps, N(0, 1) init, random flips,
caption = the class word, residual logit bias +{REFERENCE_PREFIX_LOGIT_BIAS:g} (as the reference code).

Runs on a local Ray by default; --address joins a running cluster. To run it on a remote
cluster as a Ray Job:  ray job submit --working-dir . -- catversion batch --manifest ... --output ...
"""


def register_batch(sub) -> None:
    from .options import add_arguments

    p = sub.add_parser("batch", help="train every concept of a parquet manifest on Ray Train", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)  # every option of the run, from BatchConfig's fields (pipelines/options.py)
    p.add_argument("--validate-only", action="store_true",
                   help="check the manifest and fetch, decode and hash every image (as Ray tasks across the cluster), "
                        "print the report, train nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar (events and errors are still logged)")
    p.add_argument("--json", action="store_true",
                   help="print the summary (or, with --validate-only, the report) as one JSON object on stdout; "
                        "progress and logs stay on stderr")
    p.set_defaults(func=run_batch_command)


class _BatchBar:
    """The batch's progress bar: concepts finished of those to train, with trained/failed, workers,
    images/s and tqdm's ETA. Created at the first report (the count to train is known after planning)."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def __call__(self, stats: dict) -> None:
        if self.quiet:
            return
        if self.bar is None:
            self.bar = progress.bar(stats["total"], "batch", "concept")
        self.bar.set_postfix(trained=stats["trained"], failed=stats["failed"], workers=stats["workers"],
                             img_s=f"{stats['images_per_s']:.1f}", refresh=False)
        self.bar.update(stats["done"] - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_batch_command(args: argparse.Namespace) -> None:
    import json

    from catversion.modelsource import ModelNotAvailableError
    from catversion.storage import StorageError

    from .batch import run_batch
    from .manifest import ManifestError
    from .options import BatchConfigError, from_args

    manifest = args.manifest if len(args.manifest) > 1 else args.manifest[0]
    try:
        if args.validate_only:
            report = _validate_on_cluster(manifest, args)
            print(json.dumps(report.to_dict(), indent=2) if args.json else report.format(), flush=True)
            if not report.concepts and not report.problems:
                raise CLIError("the manifest lists no concept")
            if report.rejected:
                raise PartialFailure(f"{len(report.rejected)} concept(s) rejected; fix them and validate again")
            return
        if not args.output:
            raise UsageError("--output PREFIX is required (unless --validate-only)")
        try:
            config = from_args(args)
        except BatchConfigError as exc:
            raise UsageError(exc.for_command_line()) from None
        bar = _BatchBar(args.quiet)
        try:
            summary = run_batch(config, log=progress.write, progress=bar)
        finally:
            bar.close()
    except (ManifestError, ModelNotAvailableError, StorageError) as exc:
        if args.json and not args.validate_only:  # --json always prints its object, also when no run started
            print(json.dumps(_no_run(str(exc)), indent=2), flush=True)
        raise CLIError(str(exc)) from None
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.format(), flush=True)
    if summary.interrupted:
        raise KeyboardInterrupt
    if summary.error:
        raise CLIError(f"run {summary.run_id} ended early: {summary.error}; " + (
            "its results could not be written either (the summary on stdout lists every concept)"
            if summary.results_error else f"see {summary.results_uri}"))
    if summary.results_error:
        raise CLIError(f"run {summary.run_id}: its results could not be written: {summary.results_error}; the "
                       "summary on stdout lists every concept")
    if not summary.ok:
        raise PartialFailure(f"run {summary.run_id} finished with {summary.counts.get('failed', 0)} failed or "
                             f"rejected concept(s); see {summary.results_uri}")


def _no_run(error: str) -> dict:
    """`batch --json`'s object when the run never started (the manifest or a first storage call failed):
    the keys of a run's summary (pipelines.batch.BatchSummary.to_dict), with nothing done."""
    from .results import STATUSES

    return {"run_id": None, "results_uri": None, "ok": False, "counts": dict.fromkeys(STATUSES, 0),
            "rejected": {}, "failed": [], "interrupted": False, "error": error, "results_error": None,
            "seconds": 0.0, "planning_seconds": 0.0}


def _validate_on_cluster(manifest, args: argparse.Namespace):
    """The manifest report with every image checked by Ray tasks (a local Ray unless --address)."""
    import ray

    from .batch import BatchConfig, _init_ray
    from .imagecheck import ray_checker
    from .manifest import validate_manifest

    started = _init_ray(BatchConfig(manifest=manifest, output="", address=args.address))
    try:
        return validate_manifest(manifest, checker=ray_checker(quiet=args.quiet),
                                 allowed_roots=args.allow_images_under, strict=args.strict)
    finally:
        if started:
            ray.shutdown()


def register_evaluate(sub) -> None:
    from catversion.limits import (DEFAULT_CLIP, DEFAULT_DINO, DEFAULT_GUIDANCE, DEFAULT_MASK_THRESHOLD,
                                   DEFAULT_SEG, DEFAULT_STEPS)

    from .evaluate import DEFAULT_BATCH_SIZE, DEFAULT_N_PER_PROMPT, DESCRIPTION as EVALUATE_DESCRIPTION

    p = sub.add_parser("evaluate",
                       help="generate with each residual and score it (the paper's CLIP-T, CLIP-I, masked CLIP-I; "
                            "DreamBooth's DINO)",
                       description=EVALUATE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--residuals", required=True, metavar="PREFIX",
                   help=f"the batch output prefix holding {layout.RESIDUAL_PATTERN} (s3:// or a folder)")
    p.add_argument("--manifest", required=True, nargs="+", metavar="URI",
                   help="the concepts' parquet manifest(s); their images are the reference photos")
    p.add_argument("--prompts", required=True, metavar="FILE", help="prompt templates, one per line, {} = class word")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files in it are replaced)")
    p.add_argument("--n-per-prompt", type=int, default=DEFAULT_N_PER_PROMPT,
                   help="images per prompt and concept (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of each prompt's first image (default: 0)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale (default: %(default)s)")
    p.add_argument("--model", help=f"base model: {' | '.join(BUILTIN_MODELS)} | a diffusers folder | a hub id "
                                   "(default: the one recorded in the residuals)")
    p.add_argument("--clip-model", default=DEFAULT_CLIP,
                   help="CLIP for CLIP-T/CLIP-I: hub id, folder or 'tiny' (default: %(default)s)")
    p.add_argument("--seg-model", default=DEFAULT_SEG,
                   help="CLIPSeg for the masks of masked CLIP-I: hub id, folder or 'tiny' (default: %(default)s)")
    p.add_argument("--dino-model", default=DEFAULT_DINO,
                   help="DINO ViT for DINO, DreamBooth's metric: hub id, folder or 'tiny' (default: %(default)s)")
    p.add_argument("--mask-threshold", type=float, default=DEFAULT_MASK_THRESHOLD,
                   help="segmentation mask = sigmoid(CLIPSeg logit) > this (default: %(default)s)")
    p.add_argument("--masked-crop", action="store_true",
                   help="crop each masked image to its object's box, centred on a grey square (scores then ignore "
                        "the object's size and position; not the paper's protocol)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="images per generation and scoring batch (default: %(default)s)")
    p.add_argument("--concepts", type=lambda text: [c.strip() for c in text.split(",") if c.strip()],
                   metavar="ID,ID", help="evaluate only these concepts (default: every concept of the manifest)")
    p.add_argument("--device", type=device_arg, default="auto",
                   help=f"{DEVICE_HELP} (default: auto; Ray actors with GPUs use their GPU)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=DEFAULT_PRECISION,
                   help=f"{PRECISION_HELP} (default: %(default)s)")
    p.add_argument("--address", help="Ray cluster address: evaluate concepts on a pool of Ray actors "
                                     "(default: one local process, no Ray)")
    p.add_argument("--replicas", type=int, help="actors in the Ray pool (default: one per GPU of the cluster, or 1)")
    p.add_argument("--gpus-per-replica", type=float,
                   help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_evaluate_command)


def run_evaluate_command(args: argparse.Namespace) -> None:
    from pathlib import Path

    from catversion.models import ModelNotAvailableError

    from .evaluate import EvalConfig, WorkerError, read_prompts, run_evaluation

    prompts = read_prompts(args.prompts)  # a bad prompts file is an input error (status 1), naming the file
    try:
        config = EvalConfig(
            residuals=args.residuals, manifest=args.manifest if len(args.manifest) > 1 else args.manifest[0],
            prompts=prompts, out=args.out, n_per_prompt=args.n_per_prompt, seed=args.seed,
            steps=args.steps, guidance=args.guidance, model=args.model, clip_model=args.clip_model,
            seg_model=args.seg_model, dino_model=args.dino_model, device=args.device, concepts=args.concepts,
            precision=args.precision,
            batch_size=args.batch_size, mask_threshold=args.mask_threshold, masked_crop=args.masked_crop,
            address=args.address, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
        )
        config.check()
    except ValueError as exc:  # the flags' values
        raise UsageError(str(exc)) from None
    try:
        summary = run_evaluation(config, log=progress.write, quiet=args.quiet)
    except (ModelNotAvailableError, WorkerError) as exc:
        raise CLIError(str(exc)) from None
    print(summary.format())
    if summary.failed:
        raise PartialFailure(f"{len(summary.failed)} concept(s) failed: {', '.join(summary.failed)}; see "
                             f"{Path(args.out) / 'summary.json'}")
    if not summary.scored:
        raise CLIError(f"no concept was scored: each was skipped (no residual at {layout.RESIDUAL_PATTERN} with "
                       f"PREFIX {args.residuals}, or rejected by the manifest check); see "
                       f"{Path(args.out) / 'report.html'}")
