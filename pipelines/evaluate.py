"""`catversion evaluate`: generate images with every concept's residual and score them against the
concept's manifest photos (CLIP-T, CLIP-I, masked CLIP-I, DINO); writes tables, images, plots and an
HTML report. One process by default; with --address, a Ray actor pool over the concepts.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from catversion import metrics, storage
from catversion.images import load_image
from catversion.metrics import METRIC_LABELS, METRICS
from catversion.models import resolve_device
from catversion.residual import Residual

PLACEHOLDER = "{}"
# A prompt line without "{}" is a context for the class word: "on the beach" -> "a photo of a teapot on the beach".
DEFAULT_TEMPLATE = "a photo of a {} "
DEFAULT_N_PER_PROMPT = 4
DEFAULT_BATCH_SIZE = 8
SAVED_REFERENCE_SIDE = 512  # reference copies under DIR/references/ are shrunk to this longest side

DESCRIPTION = """\
Score the residuals of a `catversion batch` run: for each concept of the manifest that has
PREFIX/residuals/<concept_id>.safetensors, generate --n-per-prompt images for every prompt (seeds
SEED, SEED+1, ...; the same seeds for every prompt) and score them against the concept's manifest
photos with the paper's metrics:
  clip_t         cosine between the prompt's CLIP text embedding and the image's CLIP embedding
  clip_i         mean CLIP image cosine to the reference photos
  masked_clip_i  the same with the background removed from both sides (CLIPSeg mask of the class word)
  dino           mean DINO ViT CLS-token cosine to the reference photos
A concept without a residual, or rejected by the manifest check, is reported and skipped.

Prompts file: one prompt per line, "{}" standing for the concept's class word, e.g.
  a {} on the beach
  a red {} in the snow
A line without "{}" is a context for the class word: "on the beach" becomes "a photo of a
teapot on the beach". Blank lines and lines starting with "#" are ignored.

Output under --out DIR:
  scores.parquet         one row per concept x prompt x sample: concept_id, class_word, prompt_index,
                         prompt, sample, seed, image, mask_area and the four metrics
  concept_means.parquet  one row per scored concept: images, references and the mean of each metric
  summary.json           settings, overall means (the mean of the concept means), every concept's status
  images/<concept>/p<PP>-s<SS>.png       generated images (+ -mask.png, -masked.png)
  references/<concept>/r<RR>.png         reference photos, longest side <= 512 (+ -mask.png, -masked.png)
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
    residuals: str  # the batch output prefix holding residuals/<concept_id>.safetensors
    manifest: str | list[str]
    prompts: list[str]  # templates, "{}" = the class word (see read_prompts)
    out: str
    n_per_prompt: int = DEFAULT_N_PER_PROMPT
    seed: int = 0
    steps: int = 50
    guidance: float = 10.0
    model: str | None = None  # None: the base model recorded in the residuals
    clip_model: str = metrics.DEFAULT_CLIP
    seg_model: str = metrics.DEFAULT_SEG
    dino_model: str = metrics.DEFAULT_DINO
    device: str = "auto"
    concepts: list[str] | None = None  # None: every concept of the manifest
    batch_size: int = DEFAULT_BATCH_SIZE  # images per generation batch and per scoring batch
    mask_threshold: float = metrics.DEFAULT_MASK_THRESHOLD
    address: str | None = None  # a Ray cluster: evaluate on an actor pool
    replicas: int | None = None  # actors in the pool (default: one per GPU of the cluster, or 1)
    gpus_per_replica: float | None = None  # default: 1 when the cluster has GPUs, else 0

    def check(self) -> None:
        for name in ("n_per_prompt", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
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
    scores: metrics.Scores | None = None
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
    from .batch import residual_uri
    from .manifest import validate_manifest

    report = validate_manifest(config.manifest, check_images=False)
    specs = {spec.concept_id: spec for spec in report.concepts}
    if config.concepts:
        unknown = [c for c in config.concepts if c not in specs and c not in report.problems]
        if unknown:
            raise ValueError(f"--concepts {', '.join(unknown)}: not in the manifest (its concepts: "
                             f"{', '.join([*specs, *report.problems]) or 'none'})")
    wanted = set(config.concepts or [*specs, *report.problems])
    jobs, statuses = [], {}
    for concept_id in [*specs, *report.problems]:  # valid ones first, each group in manifest order
        if concept_id in wanted:
            statuses[concept_id] = _status("pending")
    for concept_id, reasons in report.problems.items():
        if concept_id in wanted:
            statuses[concept_id] = _status("skipped", "rejected by the manifest check: " + "; ".join(reasons))
    for concept_id, spec in specs.items():
        if concept_id not in wanted:
            continue
        uri = residual_uri(config.residuals, concept_id)
        try:
            if not storage.exists(uri):
                statuses[concept_id] = _status("skipped", f"no residual at {uri}")
                continue
        except storage.StorageError as exc:
            statuses[concept_id] = _status("failed", str(exc))
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
    """--model, else the base model the first residual records."""
    if config.model:
        return config.model
    for job in jobs:
        try:
            recorded = Residual.load(storage.read_bytes(job.residual_uri), name=job.residual_uri).meta.get("base_model")
        except (ValueError, storage.StorageError):
            continue  # that concept fails on its own in the worker
        if recorded:
            return recorded
    raise ValueError("the residuals do not record their base model (imported from the reference code?); "
                     "pass --model with a Stable Diffusion v1.x folder or hub id")


# ---- evaluating (worker) -----------------------------------------------------------------------

class ConceptEvaluator:
    """Loads the base model and the metric models once, then evaluates concepts one after another.

    Also the Ray actor class: ``ray.remote(ConceptEvaluator)``.
    """

    def __init__(self, config: EvalConfig):
        from catversion.models import load_base_model

        device = resolve_device(config.device)
        self.config = config
        self.base = load_base_model(config.model, device=device)
        self.scorer = metrics.Scorer.load(config.clip_model, config.seg_model, config.dino_model, device=device,
                                          batch_size=config.batch_size, mask_threshold=config.mask_threshold)
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

    def _evaluate(self, job: ConceptJob, on_images) -> tuple[list[Image.Image], list[Image.Image], metrics.Scores]:
        from catversion.generation import GenerationRequest, ImageGenerator

        cfg = self.config
        residual = Residual.load(storage.read_bytes(job.residual_uri), name=job.residual_uri)
        references = [load_image(source, name) for name, source in job.references]
        key = (residual.layers, residual.tokens)
        if key not in self._generators:
            self._generators[key] = ImageGenerator(self.base, layers=residual.layers, tokens=residual.tokens)
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
    from tqdm import tqdm

    evaluator = ConceptEvaluator(config)
    total = sum(len(job.prompts) for job in jobs) * config.n_per_prompt
    with tqdm(total=total, unit="img", desc="evaluate", disable=quiet, file=sys.stderr, mininterval=0.5) as bar:
        for job in jobs:
            bar.set_postfix(concept=job.concept_id, refresh=False)
            yield evaluator.evaluate(job, on_images=bar.update)


def _evaluate_on_ray(config: EvalConfig, jobs: list[ConceptJob], quiet: bool) -> Iterator[ConceptResult]:
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    from .batch import FORWARDED_ENV

    started_ray = not ray.is_initialized()
    if started_ray:
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        ray.init(address=config.address, runtime_env={"env_vars": env} if env else None, log_to_driver=False)
    actors = []
    try:
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
        gpus = config.gpus_per_replica if config.gpus_per_replica is not None else (1.0 if cluster_gpus else 0.0)
        replicas = config.replicas or (max(1, int(cluster_gpus // gpus)) if gpus else 1)
        device = "cuda" if gpus else config.device
        actor_class = ray.remote(num_cpus=1, num_gpus=gpus)(ConceptEvaluator)
        actors = [actor_class.remote(replace(config, device=device)) for _ in range(min(replicas, len(jobs)))]
        pool = ActorPool(actors)
        with tqdm(total=len(jobs), unit="concept", desc=f"evaluate ({len(actors)} actors)", disable=quiet,
                  file=sys.stderr, mininterval=0.5) as bar:
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


# ---- the whole command ---------------------------------------------------------------------------

def run_evaluation(config: EvalConfig, log: Callable[[str], None] = lambda line: None,
                   quiet: bool = True) -> EvalSummary:
    """Plan, evaluate every concept, write DIR (see DESCRIPTION); returns each concept's status."""
    config.check()
    # Ray actors run in their own folders: relative local paths must mean what they mean here.
    config = replace(config, manifest=storage.absolute(config.manifest), residuals=storage.absolute(config.residuals))
    jobs, statuses = plan(config, log)
    if jobs:
        config = replace(config, model=choose_base_model(config, jobs))
        log(f"evaluating {len(jobs)} concept(s) x {len(config.prompts)} prompt(s) x {config.n_per_prompt} "
            f"image(s) with base model {config.model!r}" + (f" on Ray ({config.address})" if config.address else ""))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    writer = _Writer(out, config)
    evaluate = _evaluate_on_ray if config.address else _evaluate_locally
    by_id = {job.concept_id: job for job in jobs}
    for result in (evaluate(config, jobs, quiet) if jobs else ()):
        if result.error is not None:
            statuses[result.concept_id] = {**_status("failed", result.error), "seconds": result.seconds}
            log(f"failed concept {result.concept_id!r}: {result.error}")
            continue
        means = writer.add(by_id[result.concept_id], result)
        statuses[result.concept_id] = {**_status("ok", means=means), "seconds": result.seconds}
    summary = EvalSummary(str(out), statuses, writer.overall())
    writer.finish(summary)
    return summary


# ---- writing DIR ---------------------------------------------------------------------------------

def _schemas():
    """(scores.parquet, concept_means.parquet) schemas; pyarrow is imported only when writing."""
    import pyarrow as pa

    metric_columns = [(metric, pa.float64()) for metric in METRICS]
    scores = pa.schema([
        ("concept_id", pa.string()), ("class_word", pa.string()), ("prompt_index", pa.int32()),
        ("prompt", pa.string()), ("sample", pa.int32()), ("seed", pa.int64()), ("image", pa.string()),
        ("mask_area", pa.float64()), *metric_columns])
    means = pa.schema([("concept_id", pa.string()), ("class_word", pa.string()), ("images", pa.int32()),
                       ("references", pa.int32()), *metric_columns])
    return scores, means


@dataclass
class _ConceptPage:
    """What the report shows of one scored concept (paths relative to DIR)."""

    job: ConceptJob
    references: list[dict]  # {"image", "mask", "masked", "mask_area"}
    rows: list[dict]  # the concept's scores.parquet rows, plus "mask", "masked"
    means: dict[str, float]
    plot: str
    image_size: int  # the generated images' width in px


class _Writer:
    def __init__(self, out: Path, config: EvalConfig):
        self.out, self.config = out, config
        self.pages: list[_ConceptPage] = []

    def _save(self, image: Image.Image, relative: str) -> str:
        path = self.out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
        return relative

    def add(self, job: ConceptJob, result: ConceptResult) -> dict[str, float]:
        """Write one concept's images, masks and plot; returns its metric means."""
        scores, n = result.scores, self.config.n_per_prompt
        concept = job.concept_id
        references = []
        decoded = result.references
        masked = metrics.mask_out(decoded, scores.reference_masks)
        for i, (image, mask, cut) in enumerate(zip(decoded, scores.reference_masks, masked)):
            stem = f"references/{concept}/r{i:02d}"
            small = _shrink(image, SAVED_REFERENCE_SIDE)
            references.append({
                "image": self._save(small, f"{stem}.png"),
                "mask": self._save(_mask_image(mask).resize(small.size, Image.Resampling.NEAREST), f"{stem}-mask.png"),
                "masked": self._save(_shrink(cut, SAVED_REFERENCE_SIDE), f"{stem}-masked.png"),
                "mask_area": float(mask.mean()),
            })
        masked = metrics.mask_out(result.generated, scores.generated_masks)
        rows = []
        for index, (image, mask, cut) in enumerate(zip(result.generated, scores.generated_masks, masked)):
            prompt_index, sample = divmod(index, n)
            stem = f"images/{concept}/p{prompt_index:02d}-s{sample:02d}"
            rows.append({
                "concept_id": concept, "class_word": job.class_word, "prompt_index": prompt_index,
                "prompt": job.prompts[prompt_index], "sample": sample, "seed": self.config.seed + sample,
                "image": self._save(image, f"{stem}.png"), "mask_area": float(mask.mean()),
                **{metric: float(getattr(scores, metric)[index]) for metric in METRICS},
                "mask": self._save(_mask_image(mask), f"{stem}-mask.png"),
                "masked": self._save(cut, f"{stem}-masked.png"),
            })
        means = scores.means()
        plot = self._save(_histograms({m: [row[m] for row in rows] for m in METRICS}, f"{concept}: score histograms"),
                          f"plots/{concept}.png")
        self.pages.append(_ConceptPage(job, references, rows, means, plot, result.generated[0].width))
        return means

    def overall(self) -> dict[str, float]:
        """Each metric's mean over the concepts' means (every concept weighs the same)."""
        if not self.pages:
            return {}
        return {metric: float(np.mean([page.means[metric] for page in self.pages])) for metric in METRICS}

    def finish(self, summary: EvalSummary) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        score_schema, means_schema = _schemas()
        order = {concept_id: i for i, concept_id in enumerate(summary.statuses)}
        self.pages.sort(key=lambda page: order[page.job.concept_id])
        rows = [{name: row[name] for name in score_schema.names} for page in self.pages for row in page.rows]
        pq.write_table(pa.Table.from_pylist(rows, schema=score_schema), self.out / "scores.parquet")
        means = [{"concept_id": page.job.concept_id, "class_word": page.job.class_word, "images": len(page.rows),
                  "references": len(page.references), **page.means} for page in self.pages]
        pq.write_table(pa.Table.from_pylist(means, schema=means_schema), self.out / "concept_means.parquet")
        report = {"settings": asdict(self.config), "overall": summary.overall, "concepts": summary.statuses}
        (self.out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
        overview = None
        if self.pages:
            groups = {metric: [(page.job.concept_id, [row[metric] for row in page.rows]) for page in self.pages]
                      for metric in METRICS}
            overview = self._save(_box_plots(groups), "plots/overview.png")
        (self.out / "report.html").write_text(_report_html(self.config, summary, self.pages, overview))


def _shrink(image: Image.Image, side: int) -> Image.Image:
    if max(image.size) <= side:
        return image
    copy = image.copy()
    copy.thumbnail((side, side), Image.Resampling.LANCZOS)
    return copy


def _mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")


# ---- plots (PIL; no plotting library) ------------------------------------------------------------

COLOURS = {"clip_t": (52, 101, 164), "clip_i": (230, 126, 34), "masked_clip_i": (46, 139, 87), "dino": (142, 68, 173)}
INK, GRID, FAINT, PAPER = (40, 40, 40), (225, 225, 225), (110, 110, 110), (255, 255, 255)
PANEL_HEIGHT = 250
MARGIN = dict(left=52, right=14, top=34, bottom=46)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _value_range(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = float(min(values)), float(max(values))
    pad = max((hi - lo) * 0.08, 0.02)
    return max(-1.0, lo - pad), min(1.0, hi + pad)


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    raw = (hi - lo) / count
    step = min((s * 10.0 ** np.floor(np.log10(raw)) for s in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    first = np.ceil(lo / step) * step
    return [float(t) + 0.0 for t in np.arange(first, hi + step * 1e-6, step)]  # + 0.0: no "-0.00" label


@dataclass
class _Panel:
    """One plot's box inside a figure; ``scale`` maps a value to a pixel along the value axis."""

    left: float
    top: float
    right: float
    bottom: float
    scale: Callable[[float], float]


def _panel(draw: ImageDraw.ImageDraw, origin: tuple[int, int], width: int, title: str, lo: float, hi: float,
           vertical: bool) -> _Panel:
    """Title, value axis with grid lines and a frame."""
    x0, y0 = origin
    left, top = x0 + MARGIN["left"], y0 + MARGIN["top"]
    right, bottom = x0 + width - MARGIN["right"], y0 + PANEL_HEIGHT - MARGIN["bottom"]
    draw.text(((left + right) / 2, y0 + 10), title, fill=INK, font=_font(15), anchor="mt")
    if vertical:  # values go up the y axis
        def scale(v):
            return bottom - (v - lo) / (hi - lo) * (bottom - top)
    else:  # values go along the x axis
        def scale(v):
            return left + (v - lo) / (hi - lo) * (right - left)
    for tick in _ticks(lo, hi):
        at = scale(tick)
        if vertical:
            draw.line([(left, at), (right, at)], fill=GRID)
            draw.text((left - 6, at), f"{tick:.2f}", fill=INK, font=_font(12), anchor="rm")
        else:
            draw.line([(at, top), (at, bottom)], fill=GRID)
            draw.text((at, bottom + 6), f"{tick:.2f}", fill=INK, font=_font(12), anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=(170, 170, 170))
    return _Panel(left, top, right, bottom, scale)


def _canvas(panels: int, columns: int, width: int) -> tuple[Image.Image, list[tuple[int, int]]]:
    rows = -(-panels // columns)
    image = Image.new("RGB", (width * columns, PANEL_HEIGHT * rows), PAPER)
    return image, [((i % columns) * width, (i // columns) * PANEL_HEIGHT) for i in range(panels)]


def _box_plots(groups: dict[str, list[tuple[str, list[float]]]]) -> Image.Image:
    """One panel per metric, one box per concept (quartiles, whiskers to 1.5 IQR, every image a dot)."""
    concepts = max(len(by_concept) for by_concept in groups.values())
    width = max(330, MARGIN["left"] + MARGIN["right"] + 86 * concepts)
    image, origins = _canvas(len(groups), 2 if width < 700 else 1, width)
    draw = ImageDraw.Draw(image)
    jitter = np.random.default_rng(0)
    for (metric, by_concept), origin in zip(groups.items(), origins):
        lo, hi = _value_range([v for _, values in by_concept for v in values])
        panel = _panel(draw, origin, width, METRIC_LABELS[metric], lo, hi, vertical=True)
        slot = (panel.right - panel.left) / len(by_concept)
        box = min(44.0, slot * 0.5)
        light = tuple(c + (255 - c) * 2 // 3 for c in COLOURS[metric])
        for i, (label, values) in enumerate(by_concept):
            centre = panel.left + slot * (i + 0.5)
            q1, median, q3 = np.percentile(values, [25, 50, 75])
            reach = 1.5 * (q3 - q1)
            low = min(v for v in values if v >= q1 - reach)
            high = max(v for v in values if v <= q3 + reach)
            y = panel.scale
            draw.line([(centre, y(low)), (centre, y(q1))], fill=INK)
            draw.line([(centre, y(q3)), (centre, y(high))], fill=INK)
            for end in (low, high):
                draw.line([(centre - box / 4, y(end)), (centre + box / 4, y(end))], fill=INK)
            draw.rectangle([centre - box / 2, y(q3), centre + box / 2, y(q1)], fill=light, outline=INK)
            draw.line([(centre - box / 2, y(median)), (centre + box / 2, y(median))], fill=COLOURS[metric], width=3)
            for value in values:
                x = centre + jitter.uniform(-box / 3, box / 3)
                draw.ellipse([x - 2, y(value) - 2, x + 2, y(value) + 2], fill=COLOURS[metric])
            chars = max(2, int(slot / 7))
            text = label if len(label) <= chars else label[:chars - 1] + "…"
            draw.text((centre, panel.bottom + 8), text, fill=INK, font=_font(12), anchor="mt")
    return image


def _histograms(values: dict[str, list[float]], title: str, bins: int = 10) -> Image.Image:
    """One panel per metric: a histogram of the concept's per-image scores, its mean marked."""
    width = 330
    image, origins = _canvas(len(values), 4, width)
    draw = ImageDraw.Draw(image)
    for (metric, scores), origin in zip(values.items(), origins):
        lo, hi = _value_range(scores)
        counts, edges = np.histogram(scores, bins=bins, range=(lo, hi))
        mean = float(np.mean(scores))
        panel = _panel(draw, origin, width, f"{METRIC_LABELS[metric]} · mean {mean:.3f}", lo, hi, vertical=False)
        top = panel.top + 8
        for count, a, b in zip(counts, edges[:-1], edges[1:]):
            if count:
                height = count / counts.max() * (panel.bottom - top)
                draw.rectangle([panel.scale(a) + 1, panel.bottom - height, panel.scale(b) - 1, panel.bottom],
                               fill=COLOURS[metric])
        draw.line([(panel.scale(mean), panel.top), (panel.scale(mean), panel.bottom)], fill=INK, width=2)
        draw.text((panel.left, panel.bottom + 24), f"{len(scores)} images; tallest bar {counts.max()}",
                  fill=FAINT, font=_font(12), anchor="lt")
    framed = Image.new("RGB", (image.width, image.height + 30), PAPER)
    framed.paste(image, (0, 30))
    ImageDraw.Draw(framed).text((12, 8), title, fill=INK, font=_font(16), anchor="lt")
    return framed


# ---- report.html -----------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1320px;
       color: #222; padding: 0 16px; line-height: 1.4; }
h1 { margin-bottom: 4px; } h2 { margin-top: 40px; border-bottom: 2px solid #ddd; padding-bottom: 4px; }
h2 small, h4 small { color: #777; font-weight: normal; }
.settings { color: #555; font-size: 14px; }
.settings code { background: #f3f3f3; padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
th { background: #f5f5f5; } th.text { text-align: left; } tr.overall td { font-weight: bold; background: #fafafa; }
.pixelated img.main { image-rendering: pixelated; }
img.plot { max-width: 100%; image-rendering: auto; border: 1px solid #eee; }
.strip { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; background: #fafafa; border: 1px solid #e4e4e4; border-radius: 6px; padding: 6px; }
figure .trio { display: flex; gap: 4px; }
figure .trio img { width: 112px; height: 112px; object-fit: contain; background: #fff; }
figure img.main { width: 176px; height: 176px; object-fit: contain; }
figure .pair { display: flex; gap: 4px; align-items: flex-end; }
figure .pair img.aside { width: 80px; height: 80px; object-fit: contain; background: #fff; }
figcaption { font-size: 12px; color: #444; margin-top: 4px; font-variant-numeric: tabular-nums; }
figcaption .scores { display: grid; grid-template-columns: auto auto; column-gap: 12px; }
figcaption b { display: inline-block; min-width: 52px; color: #333; }
.failed { color: #a33; } .skipped { color: #886600; }
nav a { margin-right: 12px; }
"""


THUMBNAIL = 176  # px, the generated images' size in the report (CSS img.main)
SHORT_LABELS = {**METRIC_LABELS, "masked_clip_i": "mCLIP-I"}  # under each thumbnail


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def _src(path: str) -> str:
    return html.escape(quote(path), quote=True)


def _means_table(headers: tuple[str, str], rows: list[tuple[str, str, dict[str, float]]],
                 overall: dict[str, float] | None) -> str:
    """Rows of (first cell as HTML, second cell as text, means); the overall row last when given."""
    head = "".join(f"<th>{METRIC_LABELS[m]}</th>" for m in METRICS)
    body = "".join(f"<tr><td>{label}</td><td class=\"text\">{html.escape(extra)}</td>"
                   + "".join(f"<td>{_fmt(means[m])}</td>" for m in METRICS) + "</tr>" for label, extra, means in rows)
    if overall:
        body += ("<tr class=\"overall\"><td>overall</td><td class=\"text\">mean of concept means</td>"
                 + "".join(f"<td>{_fmt(overall[m])}</td>" for m in METRICS) + "</tr>")
    first = "".join(f"<th class=\"text\">{header}</th>" for header in headers)
    return f"<table><tr>{first}{head}</tr>{body}</table>"


def _concept_section(page: _ConceptPage, n: int) -> str:
    job, concept = page.job, html.escape(page.job.concept_id)
    # Small (test-size) images are scaled up sharp rather than blurred.
    pixelated = " class=\"pixelated\"" if page.image_size < THUMBNAIL else ""
    parts = [f"<section id=\"c-{_src(job.concept_id)}\"{pixelated}><h2>{concept} <small>class word "
             f"“{html.escape(job.class_word)}”, {len(page.references)} references, {len(page.rows)} images"
             "</small></h2>"]
    per_prompt = []
    for p, prompt in enumerate(job.prompts):
        rows = page.rows[p * n:(p + 1) * n]
        per_prompt.append((f"p{p:02d}", prompt, {m: float(np.mean([r[m] for r in rows])) for m in METRICS}))
    parts.append(_means_table(("", "prompt"), per_prompt, None))
    parts.append(f"<img class=\"plot\" src=\"{_src(page.plot)}\" alt=\"score histograms of {concept}\">")
    parts.append("<h3>Reference images <small>(photo · segmentation mask · what masked CLIP-I sees)</small></h3>"
                 "<div class=\"strip\">")
    for i, ref in enumerate(page.references):
        parts.append(
            "<figure><div class=\"trio\">"
            + "".join(f"<a href=\"{_src(ref[k])}\"><img src=\"{_src(ref[k])}\" alt=\"reference {i} {k}\"></a>"
                      for k in ("image", "mask", "masked"))
            + f"</div><figcaption>r{i:02d} · mask covers {ref['mask_area']:.0%}</figcaption></figure>")
    parts.append("</div><h3>Generated images <small>(image · masked copy; scores against the references)</small></h3>")
    for p, (_, prompt, means) in enumerate(per_prompt):
        summary = " · ".join(f"{METRIC_LABELS[m]} {_fmt(means[m])}" for m in METRICS)
        parts.append(f"<h4>“{html.escape(prompt)}” <small>{summary}</small></h4><div class=\"strip\">")
        for row in page.rows[p * n:(p + 1) * n]:
            caption = "".join(f"<span><b>{SHORT_LABELS[m]}</b> {_fmt(row[m])}</span>" for m in METRICS)
            parts.append(
                f"<figure><div class=\"pair\"><a href=\"{_src(row['image'])}\"><img class=\"main\" "
                f"src=\"{_src(row['image'])}\" alt=\"seed {row['seed']}\"></a><a href=\"{_src(row['masked'])}\">"
                f"<img class=\"aside\" src=\"{_src(row['masked'])}\" alt=\"masked\"></a></div>"
                f"<figcaption>seed {row['seed']} · mask {row['mask_area']:.0%}<div class=\"scores\">{caption}</div>"
                "</figcaption></figure>")
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


def _report_html(config: EvalConfig, summary: EvalSummary, pages: list[_ConceptPage], overview: str | None) -> str:
    esc = html.escape
    manifest = config.manifest if isinstance(config.manifest, str) else ", ".join(config.manifest)
    settings = (
        f"residuals <code>{esc(config.residuals)}</code> · manifest <code>{esc(manifest)}</code><br>"
        f"base model <code>{esc(str(config.model))}</code> · {config.steps} DDIM steps · "
        f"guidance {config.guidance} · "
        f"{config.n_per_prompt} image(s) per prompt, seeds {config.seed}…{config.seed + config.n_per_prompt - 1}<br>"
        f"CLIP <code>{esc(config.clip_model)}</code> · segmenter <code>{esc(config.seg_model)}</code> "
        f"(mask = sigmoid &gt; {config.mask_threshold}) · DINO <code>{esc(config.dino_model)}</code>"
    )
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
             "<title>CatVersion evaluation</title>", f"<style>{CSS}</style></head><body>",
             "<h1>CatVersion evaluation</h1>", f"<p class=\"settings\">{settings}</p>"]
    if pages:
        parts.append("<nav>" + "".join(f"<a href=\"#c-{_src(p.job.concept_id)}\">{esc(p.job.concept_id)}</a>"
                                       for p in pages) + "</nav>")
    parts.append("<h2>Summary</h2>")
    if pages:
        rows = [(f"<a href=\"#c-{_src(p.job.concept_id)}\">{esc(p.job.concept_id)}</a>",
                 f"{p.job.class_word} · {len(p.rows)} images", p.means) for p in pages]
        parts.append(_means_table(("concept", "class word · images"), rows, summary.overall))
        parts.append("<p class=\"settings\">Each concept's value is the mean over its generated images; CLIP-I, "
                     "masked CLIP-I and DINO average every (reference, generated) pair.</p>")
    else:
        parts.append("<p>No concept was scored.</p>")
    if overview:
        parts.append(f"<img class=\"plot\" src=\"{_src(overview)}\" alt=\"score distributions per concept\">")
    missing = {c: s for c, s in summary.statuses.items() if s["status"] != "ok"}
    if missing:
        parts.append("<h2>Not scored</h2><table><tr><th class=\"text\">concept</th><th class=\"text\">status</th>"
                     "<th class=\"text\">reason</th></tr>")
        parts += [f"<tr><td>{esc(c)}</td><td class=\"text {s['status']}\">{s['status']}</td>"
                  f"<td class=\"text\">{esc(s['reason'] or '')}</td></tr>" for c, s in missing.items()]
        parts.append("</table>")
    parts += [_concept_section(page, config.n_per_prompt) for page in pages]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---- CLI -------------------------------------------------------------------------------------------

def register(sub) -> None:
    from catversion.models import BUILTIN_MODELS

    p = sub.add_parser("evaluate",
                       help="generate with each residual and score it (CLIP-T, CLIP-I, masked CLIP-I, DINO)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--residuals", required=True, metavar="PREFIX",
                   help="the batch output prefix holding residuals/<concept_id>.safetensors (s3:// or a folder)")
    p.add_argument("--manifest", required=True, nargs="+", metavar="URI",
                   help="the concepts' parquet manifest(s); their images are the reference photos")
    p.add_argument("--prompts", required=True, metavar="FILE", help="prompt templates, one per line, {} = class word")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files in it are replaced)")
    p.add_argument("--n-per-prompt", type=int, default=DEFAULT_N_PER_PROMPT,
                   help="images per prompt and concept (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of each prompt's first image (default: 0)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50)")
    p.add_argument("--guidance", type=float, default=10.0, help="classifier-free guidance scale (default: 10)")
    p.add_argument("--model", help=f"base model: {' | '.join(BUILTIN_MODELS)} | a diffusers folder | a hub id "
                                   "(default: the one recorded in the residuals)")
    p.add_argument("--clip-model", default=metrics.DEFAULT_CLIP,
                   help="CLIP for CLIP-T/CLIP-I: hub id, folder or 'tiny' (default: %(default)s)")
    p.add_argument("--seg-model", default=metrics.DEFAULT_SEG,
                   help="CLIPSeg for the masks of masked CLIP-I: hub id, folder or 'tiny' (default: %(default)s)")
    p.add_argument("--dino-model", default=metrics.DEFAULT_DINO,
                   help="DINO ViT: hub id, folder or 'tiny' (default: %(default)s)")
    p.add_argument("--mask-threshold", type=float, default=metrics.DEFAULT_MASK_THRESHOLD,
                   help="segmentation mask = sigmoid(CLIPSeg logit) > this (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="images per generation and scoring batch (default: %(default)s)")
    p.add_argument("--concepts", type=lambda text: [c.strip() for c in text.split(",") if c.strip()],
                   metavar="ID,ID", help="evaluate only these concepts (default: every concept of the manifest)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto; Ray actors with GPUs "
                                                    "use their GPU)")
    p.add_argument("--address", help="Ray cluster address: evaluate concepts on a pool of Ray actors "
                                     "(default: one local process, no Ray)")
    p.add_argument("--replicas", type=int, help="actors in the Ray pool (default: one per GPU of the cluster, or 1)")
    p.add_argument("--gpus-per-replica", type=float,
                   help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from catversion.cli import CLIError
    from catversion.models import ModelNotAvailableError

    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        config = EvalConfig(
            residuals=args.residuals, manifest=args.manifest if len(args.manifest) > 1 else args.manifest[0],
            prompts=read_prompts(args.prompts), out=args.out, n_per_prompt=args.n_per_prompt, seed=args.seed,
            steps=args.steps, guidance=args.guidance, model=args.model, clip_model=args.clip_model,
            seg_model=args.seg_model, dino_model=args.dino_model, device=args.device, concepts=args.concepts,
            batch_size=args.batch_size, mask_threshold=args.mask_threshold, address=args.address,
            replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
        )
        summary = run_evaluation(config, log=log, quiet=args.quiet)
    except (ModelNotAvailableError, WorkerError) as exc:
        raise CLIError(str(exc)) from None
    print(summary.format())
    if summary.failed:
        raise CLIError(f"{len(summary.failed)} concept(s) failed: {', '.join(summary.failed)}; see "
                       f"{Path(args.out) / 'summary.json'}")
    if not summary.scored:
        raise CLIError("no concept was scored (none has a residual under "
                       f"{args.residuals}/residuals/?); see {Path(args.out) / 'report.html'}")
