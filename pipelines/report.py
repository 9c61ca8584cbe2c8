"""Writing an evaluation's folder: score tables, summary.json, images with their masks, matplotlib
plots, and report.html rendered from templates/report.html.j2 (layout described in evaluate.DESCRIPTION).

It knows scores and settings, not how they were computed: `pipelines.evaluate` feeds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import numpy as np
from PIL import Image

from catversion import metrics
from catversion.limits import (BUILTIN_MODELS, METRIC_DESCRIPTIONS, METRIC_LABELS, METRIC_TITLES, METRICS,
                               SAVED_REFERENCE_SIDE)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TEMPLATES = Path(__file__).with_name("templates")
REPORT_TEMPLATE = "report.html.j2"
THUMBNAIL = 176  # px, the generated images' size in the report (its CSS img.main)
SHORT_LABELS = {**METRIC_LABELS, "masked_clip_i": "mCLIP-I"}  # under each thumbnail
SCORER_SETTINGS = {"clip_model": "CLIP", "seg_model": "CLIPSeg", "dino_model": "DINO"}

# Plots: one colour per metric, fixed sizes in inches at a fixed DPI, so a plot's pixel size depends on
# the number of concepts only.
COLOURS = {"clip_t": "#3465a4", "clip_i": "#e67e22", "masked_clip_i": "#2e8b57", "dino": "#8e44ad"}
DPI = 100
PANEL_HEIGHT = 2.5  # in
HISTOGRAM_WIDTH = 3.3  # in, one metric's panel
BOX_WIDTH = 0.86  # in per concept in the overview's panels
HISTOGRAM_BINS = 10


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

    concept_id: str
    class_word: str
    prompts: list[str]
    references: list[dict]  # {"image", "mask", "masked", "mask_area"}
    rows: list[dict]  # the concept's scores.parquet rows, plus "mask", "masked"
    means: dict[str, float]
    plot: str
    image_size: int  # the generated images' width in px


class ReportWriter:
    """Writes each scored concept's images as it arrives (`add`), then the tables, plots and report
    (`finish`). DIR is created; files already in it are replaced.

    ``settings`` are the evaluation's (``dataclasses.asdict(EvalConfig)``): summary.json records them,
    the report shows them, and n_per_prompt, seed and masked_crop say how to read the scores.
    """

    def __init__(self, out: Path, settings: dict):
        self.out, self.settings = out, settings
        self.pages: list[_ConceptPage] = []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, concept_id: str, class_word: str, prompts: list[str], references: list[Image.Image],
            generated: list[Image.Image], scores: metrics.Scores) -> None:
        """Write one concept's images, masks and histograms. ``generated`` is prompt-major (prompt p,
        sample s at p * n_per_prompt + s) and ``scores`` are its scores against ``references``."""
        n, crop = self.settings["n_per_prompt"], self.settings["masked_crop"]
        saved_references = []
        # The masked copies are remade here, exactly as the scorer made them, rather than shipped from workers.
        masked = metrics.mask_out(references, scores.reference_masks, crop=crop)
        for i, (image, mask, cut) in enumerate(zip(references, scores.reference_masks, masked)):
            stem = f"references/{concept_id}/r{i:02d}"
            small = _shrink(image, SAVED_REFERENCE_SIDE)
            saved_references.append({
                "image": self._save(small, f"{stem}.png"),
                "mask": self._save(_mask_image(mask).resize(small.size, Image.Resampling.NEAREST), f"{stem}-mask.png"),
                "masked": self._save(_shrink(cut, SAVED_REFERENCE_SIDE), f"{stem}-masked.png"),
                "mask_area": float(mask.mean()),
            })
        masked = metrics.mask_out(generated, scores.generated_masks, crop=crop)
        rows = []
        for index, (image, mask, cut) in enumerate(zip(generated, scores.generated_masks, masked)):
            prompt_index, sample = divmod(index, n)
            stem = f"images/{concept_id}/p{prompt_index:02d}-s{sample:02d}"
            rows.append({
                "concept_id": concept_id, "class_word": class_word, "prompt_index": prompt_index,
                "prompt": prompts[prompt_index], "sample": sample, "seed": self.settings["seed"] + sample,
                "image": self._save(image, f"{stem}.png"), "mask_area": float(mask.mean()),
                **{metric: float(getattr(scores, metric)[index]) for metric in METRICS},
                "mask": self._save(_mask_image(mask), f"{stem}-mask.png"),
                "masked": self._save(cut, f"{stem}-masked.png"),
            })
        plot = f"plots/{concept_id}.png"
        _save_figure(_histograms({m: [row[m] for row in rows] for m in METRICS}, f"{concept_id}: score histograms"),
                     self.out / plot)
        self.pages.append(_ConceptPage(concept_id, class_word, prompts, saved_references, rows, scores.means(), plot,
                                       generated[0].width))

    def finish(self, statuses: dict[str, dict], overall: dict[str, float]) -> None:
        """scores.parquet, concept_means.parquet, summary.json, plots/overview.png and report.html.
        ``statuses``: every concept's, in the order to show them (those not added are listed as not scored)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        score_schema, means_schema = _schemas()
        order = {concept_id: i for i, concept_id in enumerate(statuses)}
        self.pages.sort(key=lambda page: order[page.concept_id])  # Ray returns concepts as they finish
        rows = [{name: row[name] for name in score_schema.names} for page in self.pages for row in page.rows]
        pq.write_table(pa.Table.from_pylist(rows, schema=score_schema), self.out / "scores.parquet")
        means = [{"concept_id": page.concept_id, "class_word": page.class_word, "images": len(page.rows),
                  "references": len(page.references), **page.means} for page in self.pages]
        pq.write_table(pa.Table.from_pylist(means, schema=means_schema), self.out / "concept_means.parquet")
        report = {"settings": self.settings, "overall": overall, "concepts": statuses}
        (self.out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
        overview = None
        if self.pages:
            overview = "plots/overview.png"
            groups = {metric: [(page.concept_id, [row[metric] for row in page.rows]) for page in self.pages]
                      for metric in METRICS}
            _save_figure(_box_plots(groups), self.out / overview)
        scored = {page.concept_id for page in self.pages}
        not_scored = {concept_id: s for concept_id, s in statuses.items() if concept_id not in scored}
        (self.out / "report.html").write_text(_render_report(self.settings, self.pages, overall, not_scored, overview))

    def _save(self, image: Image.Image, relative: str) -> str:
        path = self.out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
        return relative


def _shrink(image: Image.Image, side: int) -> Image.Image:
    if max(image.size) <= side:
        return image
    copy = image.copy()
    copy.thumbnail((side, side), Image.Resampling.LANCZOS)
    return copy


def _mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")


# ---- report.html ---------------------------------------------------------------------------------

def _render_report(settings: dict, pages: list[_ConceptPage], overall: dict[str, float],
                  not_scored: dict[str, dict], overview: str | None) -> str:
    """report.html from templates/report.html.j2; every value is HTML-escaped by the template engine."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    environment = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    environment.filters["score"] = lambda value: f"{value:.3f}"
    environment.filters["percent"] = lambda value: f"{value:.0%}"
    n = settings["n_per_prompt"]
    concepts = []
    for page in pages:
        prompts = []  # rows of the concept's per-prompt table, each with its images
        for p, prompt in enumerate(page.prompts):
            rows = page.rows[p * n:(p + 1) * n]
            prompts.append({"href": None, "label": f"p{p:02d}", "extra": prompt, "prompt": prompt, "rows": rows,
                            "means": {m: float(np.mean([row[m] for row in rows])) for m in METRICS}})
        concepts.append({"id": page.concept_id, "anchor": f"c-{quote(page.concept_id)}",
                         "class_word": page.class_word, "references": page.references, "generated": len(page.rows),
                         "means": page.means, "plot": page.plot, "prompts": prompts,
                         # Small (test-size) images are scaled up sharp rather than blurred.
                         "pixelated": page.image_size < THUMBNAIL})
    manifest = settings["manifest"]
    return environment.get_template(REPORT_TEMPLATE).render(
        settings=settings,
        manifest=manifest if isinstance(manifest, str) else ", ".join(manifest),
        metrics=[{"key": m, "label": METRIC_LABELS[m], "title": METRIC_TITLES[m], "short": SHORT_LABELS[m],
                  "description": METRIC_DESCRIPTIONS[m]} for m in METRICS],
        concepts=concepts,
        summary_rows=[{"href": f"#{c['anchor']}", "label": c["id"], "means": c["means"],
                       "extra": f"{c['class_word']} · {_count(c['generated'], 'generated image')} · "
                                f"{_count(len(c['references']), 'reference photo')}"} for c in concepts],
        overall=overall,
        overview=overview,
        not_scored=[{"id": c, **s} for c, s in not_scored.items()],
        # Random weights: such scores check the pipeline, and say nothing about the images.
        random_scorers=[name for key, name in SCORER_SETTINGS.items() if settings[key] == metrics.TINY],
        random_base_model=settings["model"] in BUILTIN_MODELS,
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# ---- plots (matplotlib's Agg canvas; no pyplot, so no global figure state) ---------------------------

def _save_figure(figure: Figure, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_png(path, metadata={"Software": None})  # no version stamp: reruns compare equal


def _value_range(values: list[float]) -> tuple[float, float]:
    lo, hi = float(min(values)), float(max(values))
    pad = max((hi - lo) * 0.08, 0.02)
    return max(-1.0, lo - pad), min(1.0, hi + pad)


def _histograms(values: dict[str, list[float]], title: str) -> Figure:
    """One panel per metric: a histogram of the concept's per-image scores, its mean marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(HISTOGRAM_WIDTH * len(values), PANEL_HEIGHT + 0.3), dpi=DPI,  # + the title
                    layout="constrained")
    figure.suptitle(title, x=0.01, horizontalalignment="left")
    for axes, (metric, scores) in zip(figure.subplots(1, len(values), squeeze=False)[0], values.items()):
        lo, hi = _value_range(scores)
        counts, _, _ = axes.hist(scores, bins=HISTOGRAM_BINS, range=(lo, hi), color=COLOURS[metric],
                                 edgecolor="white")
        mean = float(np.mean(scores))
        axes.axvline(mean, color="#282828", linewidth=2)
        axes.set_title(f"{METRIC_TITLES[metric]} · mean {mean:.3f}", fontsize=10)
        axes.set_xlim(lo, hi)
        axes.set_xlabel(f"{_count(len(scores), 'generated image')}; tallest bar {int(counts.max())}", fontsize=8,
                        color="#6e6e6e")
        axes.yaxis.get_major_locator().set_params(integer=True)
        axes.tick_params(labelsize=8)
        axes.grid(axis="x", color="#e1e1e1")
        axes.set_axisbelow(True)
    return figure


def _box_plots(groups: dict[str, list[tuple[str, list[float]]]]) -> Figure:
    """One panel per metric, one box per concept (quartiles, whiskers to 1.5 IQR, every image a dot)."""
    from matplotlib.figure import Figure

    concepts = max(len(by_concept) for by_concept in groups.values())
    width = max(HISTOGRAM_WIDTH, 0.66 + BOX_WIDTH * concepts)
    columns = 2 if width < 7.0 else 1
    rows = -(-len(groups) // columns)
    figure = Figure(figsize=(width * columns, PANEL_HEIGHT * rows), dpi=DPI, layout="constrained")
    jitter = np.random.default_rng(0)  # the same dots on every run
    for axes, (metric, by_concept) in zip(figure.subplots(rows, columns, squeeze=False).flat, groups.items()):
        labels = [label for label, _ in by_concept]
        values = [scores for _, scores in by_concept]
        positions = np.arange(1, len(values) + 1)
        boxes = axes.boxplot(values, positions=positions, widths=0.5, whis=1.5, showfliers=False, patch_artist=True,
                             medianprops={"color": COLOURS[metric], "linewidth": 2.5})
        for box in boxes["boxes"]:
            box.set(facecolor=COLOURS[metric], alpha=0.3, edgecolor="#282828")
        for position, scores in zip(positions, values):
            axes.scatter(position + jitter.uniform(-0.17, 0.17, len(scores)), scores, s=8, color=COLOURS[metric],
                         zorder=3)
        axes.set_title(METRIC_TITLES[metric], fontsize=10)
        axes.set_ylim(*_value_range([v for scores in values for v in scores]))
        slanted = max(map(len, labels)) > 10  # long concept ids would run into each other
        axes.set_xticks(positions, labels, fontsize=8, rotation=20 if slanted else 0,
                        horizontalalignment="right" if slanted else "center")
        axes.tick_params(axis="y", labelsize=8)
        axes.grid(axis="y", color="#e1e1e1")
        axes.set_axisbelow(True)
    return figure
