"""Evaluation of a batch run's residuals: its settings, the plan (which concepts, which prompts), and
running it in one process or on a Ray actor pool. `pipelines.report` writes what it scores.

Importing this module loads neither torch nor Ray (the command line reads its defaults for --help);
the models are loaded by the evaluator, in the process that uses them.
"""

from __future__ import annotations

import os
import statistics
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from catversion import layout, progress, storage
from catversion.limits import (DEFAULT_CLIP, DEFAULT_DINO, DEFAULT_GUIDANCE, DEFAULT_MASK_THRESHOLD, DEFAULT_SEG,
                               DEFAULT_STEPS, METRIC_DESCRIPTIONS, METRIC_LABELS, METRIC_TITLES, METRICS,
                               PRECISION_CHOICES, SAVED_REFERENCE_SIDE)

if TYPE_CHECKING:
    from PIL import Image

    from catversion.metrics import Scores

PLACEHOLDER = "{}"
# A prompt line without "{}" is a context for the class word: "on the beach" -> "a photo of a teapot on the beach".
DEFAULT_TEMPLATE = "a photo of a {} "
DEFAULT_N_PER_PROMPT = 4
DEFAULT_BATCH_SIZE = 8


def _metric_list() -> str:
    lines = []
    for metric in METRICS:
        text = f"{METRIC_TITLES[metric]}: {METRIC_DESCRIPTIONS[metric]}"
        lines += textwrap.wrap(text, width=98, initial_indent=f"  {metric:<14} ", subsequent_indent=" " * 17)
    return "\n".join(lines)


DESCRIPTION = f"""\
Score the residuals of a `catversion batch` run: for each concept of the manifest that has a
residual at {layout.RESIDUAL_PATTERN}, generate --n-per-prompt images for every prompt
(seeds SEED, SEED+1, ...; the same seeds for every prompt) and score them against the concept's
manifest photos with the paper's metrics, CLIP-T, CLIP-I and masked CLIP-I (its own), and with
DINO, which is DreamBooth's metric, not this paper's, for comparison:
{_metric_list()}
Masked CLIP-I sees full-frame images whose background is replaced by CLIP's mean colour, the
object left in place at its size, as in the paper; --masked-crop crops each to its object instead.
A concept without a residual, or rejected by the manifest check, is reported and skipped.

Prompts file: one prompt per line, "{{}}" standing for the concept's class word, e.g.
  a {{}} on the beach
  a red {{}} in the snow
A line without "{{}}" is a context for the class word: "on the beach" becomes "a photo of a
teapot on the beach". Blank lines and lines starting with "#" are ignored.

Output under --out DIR:
  scores.parquet         one row per concept x prompt x sample: concept_id, class_word, prompt_index,
                         prompt, sample, seed, image, mask_area and the four metrics
  concept_means.parquet  one row per scored concept: images, references and the mean of each metric
  summary.json           settings, overall means (the mean of the concept means), every concept's status
  images/<concept>/p<PP>-s<SS>.png       generated images (+ -mask.png, -masked.png)
  references/<concept>/r<RR>.png         reference photos, longest side <= {SAVED_REFERENCE_SIDE} px
                                         (+ -mask.png, -masked.png)
  plots/*.png, report.html               score distributions and the report (open it in a browser)

One process by default; --address joins a Ray cluster and evaluates concepts on a pool of actors
(one per GPU unless --replicas says otherwise), each loading the models once.
"""


class PromptsError(ValueError):
    """The prompts file is missing, empty or malformed; the message names the line."""


class WorkerError(RuntimeError):
    """A Ray evaluation actor could not start or died (e.g. a metric model it cannot load)."""


@dataclass
class EvalConfig:
    residuals: str  # the batch output PREFIX holding layout.RESIDUAL_PATTERN
    manifest: str | list[str]
    prompts: list[str]  # templates, "{}" = the class word (see read_prompts)
    out: str
    n_per_prompt: int = DEFAULT_N_PER_PROMPT
    seed: int = 0
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    model: str | None = None  # None: the base model recorded in the residuals
    clip_model: str = DEFAULT_CLIP
    seg_model: str = DEFAULT_SEG
    dino_model: str = DEFAULT_DINO
    device: str = "auto"
    precision: str = "auto"  # the generating UNet/VAE's (limits.PRECISION_CHOICES); the text encoder is fp32
    concepts: list[str] | None = None  # None: every concept of the manifest
    batch_size: int = DEFAULT_BATCH_SIZE  # images per generation batch and per scoring batch
    mask_threshold: float = DEFAULT_MASK_THRESHOLD
    masked_crop: bool = False  # masked CLIP-I on images cropped to the object (not the paper's protocol)
    address: str | None = None  # a Ray cluster: evaluate on an actor pool
    replicas: int | None = None  # actors in the pool (default: one per GPU of the cluster, or 1)
    gpus_per_replica: float | None = None  # default: 1 when the cluster has GPUs, else 0

    def check(self) -> None:
        for name in ("n_per_prompt", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}")
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if not self.prompts:
            raise PromptsError("no prompts given")
        if "://" in self.out:
            raise ValueError(f"--out {self.out}: the report is written to a local folder; give a path")


@dataclass
class ConceptJob:
    """What a worker needs to evaluate one concept. It carries URIs, not bytes: the worker fetches the
    residual and photos itself, so the driver never holds a whole manifest's images (and Ray ships little)."""

    concept_id: str
    class_word: str
    residual_uri: str
    references: list[tuple[str, str | bytes]]  # (name, URI or the manifest's inline image bytes)
    prompts: list[str]  # the templates filled with the class word


@dataclass
class ConceptResult:
    concept_id: str
    generated: list[Image.Image] = field(default_factory=list)  # prompt-major: prompt p, sample s at p * n + s
    references: list[Image.Image] = field(default_factory=list)  # the concept's photos, decoded
    scores: Scores | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class EvalSummary:
    out: str
    statuses: dict[str, dict]  # concept_id -> {"status": ok | skipped | failed, "reason", metric means, "seconds"}
    overall: dict[str, float]

    @property
    def scored(self) -> list[str]:
        return [c for c, s in self.statuses.items() if s["status"] == "ok"]

    @property
    def failed(self) -> list[str]:
        return [c for c, s in self.statuses.items() if s["status"] == "failed"]

    def format(self) -> str:
        header = f"{'concept':<24} {'status':<8} " + " ".join(f"{METRIC_LABELS[m]:>13}" for m in METRICS)
        lines = [header]
        for concept_id, status in self.statuses.items():
            if status["status"] == "ok":
                values = " ".join(f"{status[m]:>13.4f}" for m in METRICS)
            else:
                values = status["reason"]
            lines.append(f"{concept_id:<24} {status['status']:<8} {values}")
        if self.overall:
            lines.append(f"{'overall':<24} {'':<8} " + " ".join(f"{self.overall[m]:>13.4f}" for m in METRICS))
        lines.append(f"report: {Path(self.out) / 'report.html'}")
        return "\n".join(lines)


# ---- prompts ---------------------------------------------------------------------------------

def read_prompts(uri: str) -> list[str]:
    """Prompt templates from a text file (a path, file:// or s3:// URI): see DESCRIPTION."""
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except storage.NotFoundError:
        raise PromptsError(f"prompts file {uri} does not exist") from None
    except UnicodeDecodeError as exc:
        raise PromptsError(f"prompts file {uri} is not UTF-8 text ({exc})") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line.replace(PLACEHOLDER, "") or "}" in line.replace(PLACEHOLDER, ""):
            raise PromptsError(f"prompts file {uri}, line {number}: {line!r} has a brace that is not the "
                               f"class-word placeholder {PLACEHOLDER}; write e.g. 'a {{}} on the beach'")
        prompts.append(line)
    if not prompts:
        raise PromptsError(f"prompts file {uri} has no prompts: write one per line, with {PLACEHOLDER} for the "
                           "class word, e.g. 'a {} on the beach'")
    return prompts


def fill_prompt(template: str, class_word: str) -> str:
    if PLACEHOLDER not in template:
        template = DEFAULT_TEMPLATE + template
    return template.replace(PLACEHOLDER, class_word)


# ---- planning (driver) -------------------------------------------------------------------------

def plan(config: EvalConfig, log: Callable[[str], None]) -> tuple[list[ConceptJob], dict[str, dict]]:
    """The concepts to evaluate (those with a residual), and every selected concept's status in manifest
    order: "pending" for those to evaluate, else skipped/failed with the reason."""
    from .manifest import validate_manifest

    report = validate_manifest(config.manifest, check_images=False)
    specs = {spec.concept_id: spec for spec in report.concepts}
    if config.concepts:
        unknown = [c for c in config.concepts if c not in specs and c not in report.problems]
        if unknown:
            raise ValueError(f"--concepts {', '.join(unknown)}: not in the manifest (its concepts: "
                             f"{', '.join([*specs, *report.problems]) or 'none'})")
    wanted = set(config.concepts or [*specs, *report.problems])
    statuses = {}
    for concept_id in [*specs, *report.problems]:  # valid ones first, each group in manifest order
        if concept_id in wanted:
            statuses[concept_id] = _status("pending")
    for concept_id, reasons in report.problems.items():
        if concept_id in wanted:
            statuses[concept_id] = _status("skipped", "rejected by the manifest check: " + "; ".join(reasons))
    try:
        trained = set(layout.list_concepts(config.residuals))
    except storage.StorageError as exc:
        raise storage.StorageError(f"--residuals {config.residuals}: cannot list its residuals ({exc})") from None
    jobs = []
    for concept_id, spec in specs.items():
        if concept_id not in wanted:
            continue
        uri = layout.residual_uri(config.residuals, concept_id)
        if concept_id not in trained:
            statuses[concept_id] = _status("skipped", f"no residual at {uri}")
            continue
        # A broken residual or photo fails this concept in the worker, with its message.
        references = [(ref.name, ref.data if ref.data is not None else ref.uri) for ref in spec.images]
        prompts = [fill_prompt(template, spec.class_word) for template in config.prompts]
        jobs.append(ConceptJob(concept_id, spec.class_word, uri, references, prompts))
    for concept_id, status in statuses.items():
        if status["status"] != "pending":
            log(f"{status['status']} concept {concept_id!r}: {status['reason']}")
    return jobs, statuses


def _status(status: str, reason: str | None = None, means: dict[str, float] | None = None) -> dict:
    return {"status": status, "reason": reason, **(means or {})}


def choose_base_model(config: EvalConfig, jobs: Sequence[ConceptJob]) -> str:
    """--model, else the base model the first readable residual records."""
    from catversion.residual import Residual

    if config.model:
        return config.model
    for job in jobs:
        try:
            recorded = Residual.load(job.residual_uri).meta.get("base_model")
        except (ValueError, storage.StorageError):
            continue  # that concept fails on its own in the worker
        if recorded:
            return recorded
    raise ValueError("the residuals do not record their base model (imported from the reference code?); "
                     "pass --model with the Stable Diffusion (1.x, 2.x or XL) folder or hub id they were trained on")


# ---- evaluating (worker) -----------------------------------------------------------------------

class ConceptEvaluator:
    """Loads the base model and the metric models once, then evaluates concepts one after another.

    Also the Ray actor class: ``ray.remote(ConceptEvaluator)``.
    """

    def __init__(self, config: EvalConfig):
        from catversion.metrics import Scorer
        from catversion.models import load_base_model, resolve_device

        device = resolve_device(config.device)
        self.config = config
        self.base = load_base_model(config.model, device=device, precision=config.precision)
        self.scorer = Scorer.load(config.clip_model, config.seg_model, config.dino_model, device=device,
                                  batch_size=config.batch_size, mask_threshold=config.mask_threshold,
                                  masked_crop=config.masked_crop)
        self._generators: dict[tuple, object] = {}

    def evaluate(self, job: ConceptJob, on_images: Callable[[int], None] | None = None) -> ConceptResult:
        """Generate and score one concept; a failure is returned as the result's error, never raised."""
        started = time.perf_counter()
        try:
            generated, references, scores = self._evaluate(job, on_images)
        except Exception as exc:  # one concept's failure (bad residual, OOM, ...) must not stop the others
            return ConceptResult(job.concept_id, error=f"{type(exc).__name__}: {exc}",
                                 seconds=time.perf_counter() - started)
        return ConceptResult(job.concept_id, generated, references, scores, seconds=time.perf_counter() - started)

    def _evaluate(self, job: ConceptJob, on_images) -> tuple[list[Image.Image], list[Image.Image], Scores]:
        from catversion.generation import GenerationRequest, ImageGenerator
        from catversion.images import load_image
        from catversion.residual import Residual

        cfg = self.config
        residual = Residual.load(job.residual_uri)
        references = [load_image(source, name) for name, source in job.references]
        family = self.base.family
        if residual.encoders != family.encoder_names:
            raise ValueError(f"the residual patches {', '.join(residual.encoders)}, but base model {self.base.model_id!r} "
                             f"({family.title}) reads {', '.join(family.encoder_names)}: evaluate it with the base "
                             "model it was trained on (--model)")
        # One generator per patch: every text encoder's layers (a residual has one block per encoder) and tokens.
        key = (residual.encoders, residual.layer_sets, residual.tokens)
        if key not in self._generators:
            self._generators[key] = ImageGenerator(self.base, layers=residual.layer_sets, tokens=residual.tokens)
        generator = self._generators[key]
        requests = [GenerationRequest(prompt, residual, cfg.seed + i) for prompt in job.prompts
                    for i in range(cfg.n_per_prompt)]
        generator.check(requests, cfg.steps, cfg.guidance, self.base.resolution)
        generated = []
        for start in range(0, len(requests), cfg.batch_size):
            chunk = requests[start:start + cfg.batch_size]
            generated += generator.generate(chunk, steps=cfg.steps, guidance=cfg.guidance)
            if on_images is not None:
                on_images(len(chunk))
        scores = self.scorer.score(references, generated, [r.prompt for r in requests], job.class_word)
        return generated, references, scores


def _evaluate_locally(config: EvalConfig, jobs: list[ConceptJob], quiet: bool) -> Iterator[ConceptResult]:
    evaluator = ConceptEvaluator(config)
    total = sum(len(job.prompts) for job in jobs) * config.n_per_prompt
    with progress.bar(total, "evaluate", "img", quiet) as bar:
        for job in jobs:
            bar.set_postfix(concept=job.concept_id, refresh=False)
            yield evaluator.evaluate(job, on_images=bar.update)


def _evaluate_on_ray(config: EvalConfig, jobs: list[ConceptJob], quiet: bool) -> Iterator[ConceptResult]:
    import ray
    from ray.util import ActorPool

    from catversion.cluster import Request, check_resources, connect

    from .batch import FORWARDED_ENV

    started_ray = connect(config.address, {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    actors = []
    try:
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
        gpus = config.gpus_per_replica if config.gpus_per_replica is not None else (1.0 if cluster_gpus else 0.0)
        replicas = min(config.replicas or (max(1, int(cluster_gpus // gpus)) if gpus else 1), len(jobs))
        # Every actor of the pool must start: work handed to one that cannot would wait forever.
        check_resources(Request("evaluation actor", replicas, {"CPU": 1.0, "GPU": gpus},
                                flags={"GPU": "--gpus-per-replica 0"}, count_flag="--replicas"))
        device = "cuda" if gpus else config.device
        actor_class = ray.remote(num_cpus=1, num_gpus=gpus)(ConceptEvaluator)
        actors = [actor_class.remote(replace(config, device=device)) for _ in range(replicas)]
        pool = ActorPool(actors)
        with progress.bar(len(jobs), f"evaluate ({len(actors)} actors)", "concept", quiet) as bar:
            try:
                for result in pool.map_unordered(lambda actor, job: actor.evaluate.remote(job), jobs):
                    bar.update(1)
                    yield result
            except ray.exceptions.RayActorError as exc:
                if exc.actor_init_failed:  # the message ends with the constructor's "module.Type: message"
                    raise WorkerError("a Ray evaluation actor could not start: "
                                      + str(exc).strip().splitlines()[-1]) from None
                raise WorkerError(f"a Ray evaluation actor died: {exc}") from None
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_ray:
            ray.shutdown()


# ---- the whole evaluation ------------------------------------------------------------------------

def run_evaluation(config: EvalConfig, log: Callable[[str], None] = lambda line: None,
                   quiet: bool = True) -> EvalSummary:
    """Plan, evaluate every concept, write DIR (see DESCRIPTION); returns each concept's status."""
    from .report import ReportWriter

    config.check()
    # Ray actors run in their own folders: relative local paths must mean what they mean here.
    config = replace(config, manifest=storage.absolute(config.manifest), residuals=storage.absolute(config.residuals),
                     model=storage.absolute_model(config.model), clip_model=storage.absolute_model(config.clip_model),
                     seg_model=storage.absolute_model(config.seg_model),
                     dino_model=storage.absolute_model(config.dino_model))
    jobs, statuses = plan(config, log)
    if jobs:
        config = replace(config, model=choose_base_model(config, jobs))
        log(f"evaluating {len(jobs)} concept(s) x {len(config.prompts)} prompt(s) x {config.n_per_prompt} "
            f"image(s) with base model {config.model!r}" + (f" on Ray ({config.address})" if config.address else ""))
    writer = ReportWriter(Path(config.out), asdict(config))
    evaluate = _evaluate_on_ray if config.address else _evaluate_locally
    by_id = {job.concept_id: job for job in jobs}
    for result in (evaluate(config, jobs, quiet) if jobs else ()):
        if result.error is not None:
            statuses[result.concept_id] = {**_status("failed", result.error), "seconds": result.seconds}
            log(f"failed concept {result.concept_id!r}: {result.error}")
            continue
        job = by_id[result.concept_id]
        writer.add(job.concept_id, job.class_word, job.prompts, result.references, result.generated, result.scores)
        statuses[result.concept_id] = {**_status("ok", means=result.scores.means()), "seconds": result.seconds}
    overall = _overall(statuses)
    writer.finish(statuses, overall)
    return EvalSummary(config.out, statuses, overall)


def _overall(statuses: dict[str, dict]) -> dict[str, float]:
    """Each metric's mean over the scored concepts' means (every concept weighs the same)."""
    scored = [status for status in statuses.values() if status["status"] == "ok"]
    return {metric: statistics.fmean(status[metric] for status in scored) for metric in METRICS} if scored else {}
