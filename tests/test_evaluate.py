"""`catversion evaluate` end to end on tiny models: residuals + manifest + prompts -> scores and report."""

import contextlib
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from catversion import layout, storage
from catversion.cli import main
from catversion.limits import METRIC_TITLES, METRICS
from catversion.metrics import Scorer
from catversion.models import load_base_model
from catversion.samples import SAMPLE_CONCEPTS, write_concept_images
from catversion.training import TrainConfig, train_residual
from pipelines.evaluate import EvalConfig, run_evaluation
from pipelines.report import ReportWriter

TRAINED = ("red-teapot", "blue-mug")
UNTRAINED = "green-vase"  # in the manifest, but no residual
TINY_METRICS = ["--clip-model", "tiny", "--seg-model", "tiny", "--dino-model", "tiny"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A batch-style output prefix with two tiny residuals, a manifest of three concepts, a prompts file."""
    root = tmp_path_factory.mktemp("evaluate-inputs")
    base = load_base_model("tiny")
    rows = []
    for concept_id in (*TRAINED, UNTRAINED):
        word = SAMPLE_CONCEPTS[concept_id].class_word
        photos = write_concept_images(concept_id, root / "photos", n=2, size=64)
        rows += [{"concept_id": concept_id, "class_word": word, "image_uri": str(p)} for p in photos]
        if concept_id in TRAINED:
            residual = train_residual(base, photos, word, TrainConfig(steps=2, save_steps=()))
            residual.save(layout.residual_uri(str(root / "run"), concept_id))
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    (root / "prompts.txt").write_text("# evaluation prompts\na {} on the beach\n\nin the snow\n")
    return root


def evaluate(inputs: Path, out: Path, *extra: str) -> int:
    return main(["evaluate", "--residuals", str(inputs / "run"), "--manifest", str(inputs / "manifest.parquet"),
                 "--prompts", str(inputs / "prompts.txt"), "--out", str(out), "--model", "tiny", *TINY_METRICS,
                 "--n-per-prompt", "2", "--steps", "2", "--quiet", *extra])


class ReportChecker(HTMLParser):
    """Collects every link and image source, the text of each <section> (by id) and of the whole page,
    and every tag that is closed out of order."""

    VOID = {"meta", "img", "br", "link", "hr", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.targets = [], [], []
        self.text, self.sections, self._section = [], {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.targets.append(attrs.get("src"))
        if tag == "a":
            self.targets.append(attrs.get("href"))
        if tag == "section":
            self._section = attrs["id"]
            self.sections[self._section] = ""
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self._section is not None:
            self.sections[self._section] += data


def read_report(out: Path) -> ReportChecker:
    """The parsed report, after checking that it is well-formed HTML whose links all resolve; its
    ``targets`` are then the local files it shows (relative to ``out``)."""
    text = (out / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    checker = ReportChecker()
    checker.feed(text)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    files = []
    for target in checker.targets:
        assert target, "an <img> or <a> without a target"
        if target.startswith("#"):
            assert f'id="{target[1:]}"' in text, target
            continue
        assert not urlparse(target).scheme and not target.startswith("/"), f"{target} is not a relative path"
        assert (out / unquote(target)).is_file(), f"report links {target}, which does not exist"
        files.append(unquote(target))
    checker.targets = files
    return checker


@pytest.fixture(scope="module")
def evaluated(inputs, tmp_path_factory):
    """One `catversion evaluate` run over the inputs: (its folder, its stderr)."""
    out = tmp_path_factory.mktemp("evaluate") / "eval"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert evaluate(inputs, out) == 0, err.getvalue()
    return out, err.getvalue()


def test_evaluate_writes_scores_images_and_a_report(evaluated):
    out, err = evaluated
    assert f"skipped concept '{UNTRAINED}': no residual at" in err

    scores = pq.read_table(out / "scores.parquet").to_pylist()
    assert len(scores) == len(TRAINED) * 2 * 2  # concepts x prompts x samples
    assert {(r["concept_id"], r["prompt_index"], r["sample"]) for r in scores} == {
        (c, p, s) for c in TRAINED for p in range(2) for s in range(2)}
    assert {r["prompt"] for r in scores if r["concept_id"] == "red-teapot"} == {
        "a teapot on the beach", "a photo of a teapot in the snow"}
    for row in scores:
        assert row["seed"] == row["sample"] and 0.0 <= row["mask_area"] <= 1.0
        assert (out / row["image"]).is_file()

    means = {r["concept_id"]: r for r in pq.read_table(out / "concept_means.parquet").to_pylist()}
    assert set(means) == set(TRAINED)
    teapot_rows = [r for r in scores if r["concept_id"] == "red-teapot"]
    assert means["red-teapot"]["clip_i"] == pytest.approx(sum(r["clip_i"] for r in teapot_rows) / len(teapot_rows))
    assert means["red-teapot"]["references"] == 2

    summary = json.loads((out / "summary.json").read_text())
    assert summary["concepts"][UNTRAINED]["status"] == "skipped"
    assert [summary["concepts"][c]["status"] for c in TRAINED] == ["ok", "ok"]
    assert summary["overall"]["dino"] == pytest.approx(sum(means[c]["dino"] for c in TRAINED) / 2)

    files = read_report(out).targets
    for concept_id in TRAINED:
        assert f"references/{concept_id}/r00-mask.png" in files
        assert f"images/{concept_id}/p01-s01.png" in files
        # The paper's masked CLIP-I: the masked copies keep their image's frame.
        for stem in (f"references/{concept_id}/r00", f"images/{concept_id}/p01-s01"):
            with Image.open(out / f"{stem}.png") as image, Image.open(out / f"{stem}-masked.png") as masked:
                assert masked.size == image.size, stem
    assert "plots/overview.png" in files
    assert UNTRAINED in (out / "report.html").read_text()  # listed under "Not scored"


def test_each_score_is_the_metric_of_the_images_the_report_shows(evaluated):
    """Every row's scores, recomputed from the files the report links (its image, the concept's reference
    photos, and the masked copies of both): a score written on the wrong row or made from other images fails."""
    out, _ = evaluated
    scorer = Scorer.load(clip="tiny", seg="tiny", dino="tiny")

    def opened(relative):
        with Image.open(out / relative) as image:
            return image.convert("RGB")

    for concept_id in TRAINED:
        stems = sorted(p.name.removesuffix(".png") for p in (out / "references" / concept_id).glob("r??.png"))
        references = [opened(f"references/{concept_id}/{stem}.png") for stem in stems]
        masked_references = [opened(f"references/{concept_id}/{stem}-masked.png") for stem in stems]
        for row in pq.read_table(out / "scores.parquet").to_pylist():
            if row["concept_id"] != concept_id:
                continue
            image = opened(row["image"])
            masked = opened(row["image"].removesuffix(".png") + "-masked.png")
            expected = {"clip_t": scorer.clip_t(row["prompt"], [image])[0],
                        "clip_i": scorer.clip_i(references, [image]).mean,
                        "masked_clip_i": scorer.clip_i(masked_references, [masked]).mean,
                        "dino": scorer.dino(references, [image]).mean}
            # float32 embeddings, batched differently here: equal to a few units in the 7th digit
            assert {m: row[m] for m in METRICS} == pytest.approx(expected, abs=1e-5), row["image"]


def test_the_report_counts_what_it_counts_and_says_tiny_scores_mean_nothing(evaluated, tmp_path):
    out, _ = evaluated
    report = read_report(out)
    text = " ".join(" ".join(report.text).split())
    # 2 prompts x 2 samples generated, scored against the concept's 2 photos
    assert text.count("4 generated images · 2 reference photos") == len(TRAINED)
    for concept_id in TRAINED:
        assert "2 reference photos, 4 generated images" in " ".join(report.sections[f"c-{concept_id}"].split())
    assert "These scores mean nothing. They come from the built-in tiny CLIP, CLIPSeg, DINO (random weights" in text

    # The same settings with the real scorers: no warning; one of them tiny: the warning names it alone.
    settings = json.loads((out / "summary.json").read_text())["settings"]
    real = {**settings, "clip_model": "openai/clip-vit-base-patch32", "seg_model": "CIDAS/clipseg-rd64-refined",
            "dino_model": "facebook/dino-vits16"}
    for name, chosen, warned in (("real", real, None), ("one-tiny", {**real, "dino_model": "tiny"}, "tiny DINO (")):
        ReportWriter(tmp_path / name, chosen).finish({}, {})
        shown = " ".join(" ".join(read_report(tmp_path / name).text).split())
        assert ("These scores mean nothing" in shown) == (warned is not None), name
        if warned:
            assert warned in shown


def test_report_is_rendered_from_its_template_with_real_plots(evaluated):
    out, _ = evaluated
    report = read_report(out)
    # The page's stylesheet is written only in the template file.
    template = (Path(__file__).parents[1] / "pipelines" / "templates" / "report.html.j2").read_text()
    style = re.search(r"<style>.*?</style>", template, re.S).group(0)
    assert style in (out / "report.html").read_text()

    text = " ".join(report.text)
    assert METRIC_TITLES["dino"] == "DINO (DreamBooth's metric)" and METRIC_TITLES["dino"] in text
    assert set(report.sections) == {f"c-{concept_id}" for concept_id in TRAINED}
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    for concept_id in TRAINED:
        section = report.sections[f"c-{concept_id}"]
        assert f"a {SAMPLE_CONCEPTS[concept_id].class_word} on the beach" in section
        for row in scores:  # every image's scores, under its thumbnail
            if row["concept_id"] == concept_id:
                assert f"{row['masked_clip_i']:.3f}" in section and f"seed {row['seed']}" in section

    plots = sorted(p.relative_to(out).as_posix() for p in (out / "plots").iterdir())
    assert plots == sorted(["plots/overview.png", *(f"plots/{c}.png" for c in TRAINED)])
    assert set(plots) <= set(report.targets)
    sizes = {}
    for plot in plots:
        with Image.open(out / plot) as image:
            assert image.format == "PNG"
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 24)) > 16, f"{plot} is blank"
            sizes[plot] = image.size
    assert len({sizes[f"plots/{c}.png"] for c in TRAINED}) == 1  # one size for every concept's histograms


def test_masked_crop_is_an_option_recorded_with_the_results(inputs, evaluated, tmp_path):
    default, _ = evaluated
    assert json.loads((default / "summary.json").read_text())["settings"]["masked_crop"] is False
    assert "full frame, background replaced" in " ".join(read_report(default).text)

    out = tmp_path / "crop"
    assert evaluate(inputs, out, "--masked-crop", "--concepts", "red-teapot", "--n-per-prompt", "1") == 0
    assert json.loads((out / "summary.json").read_text())["settings"]["masked_crop"] is True
    assert "cropped to the object's box" in " ".join(read_report(out).text)


def test_a_broken_residual_fails_its_concept_only(inputs, tmp_path, capsys):
    run = tmp_path / "run"
    storage.write_bytes(layout.residual_uri(str(run), "red-teapot"),
                        storage.read_bytes(layout.residual_uri(str(inputs / "run"), "red-teapot")))
    storage.write_bytes(layout.residual_uri(str(run), "blue-mug"), b"not a residual")
    out = tmp_path / "eval"
    code = main(["evaluate", "--residuals", str(run), "--manifest", str(inputs / "manifest.parquet"),
                 "--prompts", str(inputs / "prompts.txt"), "--out", str(out), "--model", "tiny", *TINY_METRICS,
                 "--n-per-prompt", "1", "--steps", "2", "--concepts", "red-teapot,blue-mug", "--quiet"])
    assert code == 3  # finished, with a failed concept
    err = capsys.readouterr().err
    assert "failed concept 'blue-mug'" in err and "1 concept(s) failed: blue-mug" in err
    assert {r["concept_id"] for r in pq.read_table(out / "scores.parquet").to_pylist()} == {"red-teapot"}
    assert json.loads((out / "summary.json").read_text())["concepts"]["blue-mug"]["status"] == "failed"
    read_report(out)


@pytest.mark.parametrize("content, message", [
    ("a {0} on the beach\n", "line 1: 'a {0} on the beach' has a brace"),
    ("# only a comment\n\n", "has no prompts"),
])
def test_bad_prompts_file_is_a_clear_error(inputs, tmp_path, capsys, content, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(content)
    code = main(["evaluate", "--residuals", str(inputs / "run"), "--manifest", str(inputs / "manifest.parquet"),
                 "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 1
    assert message in capsys.readouterr().err


def test_unknown_concept_and_missing_prompts_are_refused(inputs, tmp_path, capsys):
    assert evaluate(inputs, tmp_path / "out", "--concepts", "red-teapot,nope") == 1
    assert "--concepts nope: not in the manifest" in capsys.readouterr().err
    code = main(["evaluate", "--residuals", str(inputs / "run"), "--manifest", str(inputs / "manifest.parquet"),
                 "--prompts", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "out")])
    assert code == 1
    assert "absent.txt does not exist" in capsys.readouterr().err


def test_ray_actor_pool_scores_like_one_process(inputs, tmp_path, ray_session, s3_bucket, monkeypatch):
    """Residuals and manifest in S3, two actors on the session's Ray: the same scores as in-process."""
    # The manifest names local photos: a manifest in S3 may do so only for folders the operator allows.
    monkeypatch.setenv("CATVERSION_ALLOW_IMAGES_UNDER", str(inputs / "photos"))
    prefix = f"s3://{s3_bucket}/run"
    for concept_id in TRAINED:
        trained = layout.residual_uri(str(inputs / "run"), concept_id)
        storage.write_bytes(layout.residual_uri(prefix, concept_id), storage.read_bytes(trained))
    manifest = f"s3://{s3_bucket}/manifest.parquet"
    storage.write_bytes(manifest, (inputs / "manifest.parquet").read_bytes())
    common = dict(residuals=prefix, manifest=manifest, prompts=["a {} on the beach"], n_per_prompt=2, steps=2,
                  model="tiny", clip_model="tiny", seg_model="tiny", dino_model="tiny", device="cpu",
                  concepts=list(TRAINED))

    on_ray = run_evaluation(EvalConfig(out=str(tmp_path / "ray"), address="auto", replicas=2, **common))
    # A num_cpus=1 actor runs torch on one thread; so does this process here, so that both sum in the
    # same order (with more threads a pixel can round the other way, moving a score by ~1e-5).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run_evaluation(EvalConfig(out=str(tmp_path / "local"), **common))
    finally:
        torch.set_num_threads(threads)
    assert on_ray.scored == local.scored == list(TRAINED)
    for concept_id in TRAINED:
        for metric in METRICS:
            assert on_ray.statuses[concept_id][metric] == local.statuses[concept_id][metric], (concept_id, metric)
    tables = [pq.read_table(tmp_path / name / "scores.parquet") for name in ("ray", "local")]
    assert tables[0].equals(tables[1])
    read_report(tmp_path / "ray")


def test_an_sdxl_residual_of_its_own_layers_is_evaluated_on_its_recorded_base_model(inputs, tmp_path):
    """A residual of one block per text encoder (tiny-sdxl), with layers other than the default: the evaluator
    generates with its layers in every encoder, on the base model the residual records (no --model)."""
    from catversion.recipe import Concept
    from catversion.training import ResidualTrainer

    base = load_base_model("tiny-sdxl")
    photos = sorted((inputs / "photos").glob("red-teapot*"))  # write_concept_images' files of the concept
    assert photos
    concept = Concept("red-teapot", photos, "teapot", config=TrainConfig(steps=1, save_steps=()))
    (result,) = ResidualTrainer(base, pack=1, layers=[[0, 2], [3]]).train([concept])
    assert result.status == "ok", result.error
    assert result.residual.layer_sets == ((0, 2), (3,)) and result.residual.meta["base_model"] == "tiny-sdxl"
    run = tmp_path / "run"
    result.residual.save(layout.residual_uri(str(run), "red-teapot"))
    out = tmp_path / "eval"
    code = main(["evaluate", "--residuals", str(run), "--manifest", str(inputs / "manifest.parquet"),
                 "--prompts", str(inputs / "prompts.txt"), "--out", str(out), *TINY_METRICS, "--n-per-prompt", "1",
                 "--steps", "2", "--concepts", "red-teapot", "--quiet"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["model"] == "tiny-sdxl" and summary["concepts"]["red-teapot"]["status"] == "ok"
    assert len(pq.read_table(out / "scores.parquet")) == 2  # 2 prompts x 1 image
    read_report(out)  # the report is written, with its figures
    # On another family's model it fails that concept alone, naming the encoders.
    code = main(["evaluate", "--residuals", str(run), "--manifest", str(inputs / "manifest.parquet"),
                 "--prompts", str(inputs / "prompts.txt"), "--out", str(tmp_path / "wrong"), "--model", "tiny",
                 *TINY_METRICS, "--n-per-prompt", "1", "--steps", "2", "--concepts", "red-teapot", "--quiet"])
    assert code == 3
    reason = json.loads((tmp_path / "wrong" / "summary.json").read_text())["concepts"]["red-teapot"]["reason"]
    assert "the residual patches text_encoder, text_encoder_2, but base model 'tiny' (Stable Diffusion 1.x)" in reason
