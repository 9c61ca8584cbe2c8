"""`catversion batch` for every base-model family, and layers as a choice: the --layers flag and the manifest's
`layers` column, checked against the model's encoders at planning, part of each concept's training fingerprint,
and never mixed in one pack (the dispatcher leases one layer set at a time, a worker trains one set per round).

One Ray Train fit (tiny-sdxl, two concepts of different layers, one worker training both sets in turn);
everything else runs without Ray.
"""

from dataclasses import replace

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_inputs import config, layers_manifest
from catversion import Residual, storage
from catversion.cli import main
from catversion.recipe import TrainingTarget, image_digest, training_fingerprint
from catversion.samples import concept_jpegs
from pipelines.batch import _plan, read_results, run_batch
from pipelines.calls import LocalCalls
from pipelines.claims import Claims
from pipelines.control import Holdings, WorkerControl
from pipelines.dispatch import Dispatcher
from pipelines.intake import DONE, Intake
from pipelines.manifest import ConceptSpec, ImageRef, validate_manifest
from pipelines.options import BatchConfig, BatchConfigError
from pipelines.outcomes import OutcomeSink
from pipelines.work import PlannedConcept, WorkerConfig, concept_config, to_concept

SDXL_DEFAULT = ((1, 2, 3), (1, 2, 3))  # tiny-sdxl's: the last three layers feeding hidden_states[-2] of each encoder
CUSTOM = ((0, 2), (3,))


def planned(layer_sets) -> list[PlannedConcept]:
    return [PlannedConcept(ConceptSpec(f"c{i}", "mug", [ImageRef(f"#row{i}", None, b"image-%d" % i, f"d{i}")]),
                           layers=layers) for i, layers in enumerate(layer_sets)]


def test_the_dispatcher_leases_one_layer_set_at_a_time():
    dispatcher = Dispatcher(planned([SDXL_DEFAULT, SDXL_DEFAULT, CUSTOM, CUSTOM, SDXL_DEFAULT]))
    dispatcher.join("group-1")
    taken = [[lease.concept.concept_id for lease in dispatcher.lease("group-1", 4, "w0").leases] for _ in range(3)]
    assert taken == [["c0", "c1"], ["c2", "c3"], ["c4"]]
    assert dispatcher.lease("group-1", 4, "w0").exhausted

    # A deferred concept comes back only with concepts of its own layers.
    dispatcher = Dispatcher(planned([SDXL_DEFAULT, CUSTOM, CUSTOM]))
    dispatcher.join("group-1")
    first = dispatcher.lease("group-1", 1, "w0").leases[0]
    dispatcher.defer(first.index, "run-b", 0.0)
    assert [lease.concept.concept_id for lease in dispatcher.lease("group-1", 4, "w0").leases] == ["c1", "c2"]
    assert [lease.concept.concept_id for lease in dispatcher.lease("group-1", 4, "w0").leases] == ["c0"]


def test_the_intake_ends_a_round_at_another_layer_set_and_fingerprints_each_with_its_layers(tmp_path):
    target = TrainingTarget("sha256:base", 64, SDXL_DEFAULT, 1, "fp32")
    concepts = planned([SDXL_DEFAULT, SDXL_DEFAULT, CUSTOM, None])
    dispatcher = Dispatcher(concepts)
    batch = BatchConfig(manifest="m", output=str(tmp_path), steps=3)
    calls = LocalCalls(dispatcher)
    calls.join("group-1")
    budget = storage.RetryBudget(5)
    claims = Claims(str(tmp_path), "run-a", 60.0, budget)
    holdings = Holdings(claims)
    control = WorkerControl(calls, "w0", holdings)
    sink = OutcomeSink(str(tmp_path), "run-a", "w0", calls, holdings, budget)
    intake = Intake(WorkerConfig(batch, "run-a", dispatcher=None), calls, "group-1", "w0", target, claims, holdings,
                    sink, control, 4, budget)
    rounds = []
    while (layers := intake.next_layers()) is not DONE:
        rounds.append((layers, [c.concept_id for c in intake.concepts(layers)]))
    intake.close()
    sink.close()
    assert rounds == [(SDXL_DEFAULT, ["c0", "c1"]), (CUSTOM, ["c2"]), (None, ["c3"])]
    for item, layers in zip(concepts, [SDXL_DEFAULT, SDXL_DEFAULT, CUSTOM, SDXL_DEFAULT]):
        concept = to_concept(item.spec, concept_config(item.spec, 3, batch.prefix_logit_bias))
        expected = training_fingerprint(concept, ["d" + item.concept_id[1:]], replace(target, layers=layers))
        assert holdings.get(item.concept_id).fingerprint == expected, item.concept_id


def test_layers_that_do_not_fit_the_model_fail_only_their_concept_naming_the_column_the_value_and_the_range(tmp_path):
    """Checked at planning, from the model's description (no model load): concepts that all fail there start no
    Ray. A --layers value that does not fit the model ends the run before anything trains, naming the flag."""
    rows = []
    for concept_id, layers in (("one-group", "1,2,3"), ("too-deep", "0,1;4"), ("repeated", "1,1;2")):
        for i, data in enumerate(concept_jpegs("blue-mug", n=1, size=64, seed=len(rows))):
            (tmp_path / f"{concept_id}-{i}.jpg").write_bytes(data)
            rows.append({"concept_id": concept_id, "class_word": "mug", "image_uri": f"{concept_id}-{i}.jpg",
                         "layers": layers})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    common = dict(manifest=str(tmp_path / "manifest.parquet"), output=str(tmp_path / "out"), model="tiny-sdxl", steps=2)

    summary = run_batch(BatchConfig(**common), log=lambda _: None)
    errors = {row["concept_id"]: row["error"] for row in summary.results}
    assert summary.counts == {"ok": 0, "skipped": 0, "failed": 3, "interrupted": 0}
    valid = "valid: text_encoder 0..3, text_encoder_2 0..3 (default '1,2,3;1,2,3')"
    assert errors == {
        "one-group": "column 'layers' '1,2,3' does not fit base model 'tiny-sdxl': Stable Diffusion XL patches 2 text "
                     f"encoder(s) (text_encoder, text_encoder_2); got layers for 1; {valid}",
        "too-deep": "column 'layers' '0,1;4' does not fit base model 'tiny-sdxl': layers [4] of text_encoder_2: choose "
                    "distinct layers in 0..3 (it has 5 layers; layer 4 does not reach the hidden state the UNet reads); "
                    f"{valid}",
        "repeated": "column 'layers' '1,1;2' does not fit base model 'tiny-sdxl': layers [1, 1] of text_encoder: choose "
                    f"distinct layers in 0..3 (it has 5 layers; layer 4 does not reach the hidden state the UNet reads); "
                    f"{valid}",
    }

    summary = run_batch(BatchConfig(**common, layers="9,10,11"), log=lambda _: None)
    assert summary.error.startswith("--layers '9,10,11' does not fit base model 'tiny-sdxl': Stable Diffusion XL "
                                    "patches 2 text encoder(s)") and summary.error.endswith(valid), summary.error
    assert {row["status"] for row in summary.results} == {"interrupted"}
    with pytest.raises(BatchConfigError, match="layers must be layer indices: layers '9;ten': write comma-sep"):
        BatchConfig(**common, layers="9;ten")
    argv = ["batch", "--manifest", common["manifest"], "--output", common["output"], "--model", "tiny-sdxl", "--quiet"]
    assert main([*argv, "--layers", "9,10,11"]) == 1  # the run's error, after planning
    assert main([*argv, "--layers", "nine"]) == 2  # a usage error, naming the flag


def test_tiny_sdxl_trains_two_block_residuals_with_each_concepts_layers(ray_session, s3_bucket, tmp_path):
    """Two concepts of different layers on tiny-sdxl, one worker: it trains one layer set, then the other (two
    trainers on its one model). Each residual has a block per text encoder with its concept's layers; a rerun is
    up to date from listings alone, and other --layers make the default-layers concept out of date, not the other."""
    manifest = layers_manifest(s3_bucket, "sdxl", {"sdxl-default": None, "sdxl-custom": "0,2;3"})
    lines = []
    summary = run_batch(config(s3_bucket, manifest, "out", tmp_path, model="tiny-sdxl", workers=1, steps=2,
                               run_id="sdxl"), log=lines.append)
    assert summary.error is None and summary.counts["ok"] == 2, summary.format() + "\n".join(lines)
    results = {r["concept_id"]: r for r in read_results(f"s3://{s3_bucket}/out/runs/sdxl/results.parquet")}
    assert {c: r["status"] for c, r in results.items()} == {"sdxl-default": "ok", "sdxl-custom": "ok"}
    for concept_id, layers in (("sdxl-default", SDXL_DEFAULT), ("sdxl-custom", CUSTOM)):
        body = boto3.client("s3").get_object(Bucket=s3_bucket, Key=f"out/residuals/{concept_id}.safetensors")["Body"]
        residual = Residual.load(body.read())
        assert residual.encoders == ("text_encoder", "text_encoder_2") and residual.layer_sets == layers
        assert residual.meta["base_family"] == "sdxl" and residual.meta["base_model"] == "tiny-sdxl"
        assert residual.meta["steps"] == 2 and residual.sha256 == results[concept_id]["sha256"]
        assert residual.meta["training_fingerprint"] == results[concept_id]["fingerprint"]
    assert results["sdxl-default"]["fingerprint"] != results["sdxl-custom"]["fingerprint"]

    # The rerun: up to date from listings and the index, no Ray.
    lines = []
    again = run_batch(config(s3_bucket, manifest, "out", tmp_path, model="tiny-sdxl", workers=1, steps=2,
                             run_id="sdxl-again"), log=lines.append)
    assert {r["concept_id"]: r["status"] for r in again.results} == {"sdxl-default": "skipped", "sdxl-custom": "skipped"}
    assert any("0 to train or check, 2 up to date" in line for line in lines), lines

    # Other default layers: the concept that uses the default is out of date, the one with its own layers is not.
    other = config(s3_bucket, manifest, "out", tmp_path, model="tiny-sdxl", workers=1, steps=2, layers="1,2;2,3")
    rows: dict = {}
    todo, _ = _plan(other, validate_manifest(manifest, check_images=False), rows, storage.RetryBudget(30),
                    lambda _: None)
    assert [(item.concept_id, item.layers) for item in todo] == [("sdxl-default", ((1, 2), (2, 3)))]
    assert rows["sdxl-custom"]["status"] == "skipped"
    digests = results["sdxl-custom"]["image_sha256s"]
    assert digests == [image_digest(data) for data in concept_jpegs("blue-mug", n=2, size=64, seed=201)]
