"""Batch personalization on Ray Train: manifest in S3, residuals in S3, failures isolated, reruns, worker death.

Real parts only: a local Ray (2 CPU workers) and moto's S3 server on 127.0.0.1 over HTTP.
Each Ray Train fit costs ~20 s, so the session runs few: the first run (the `batch_run` fixture),
the changed-image rerun, and the fault-injection run. The unchanged rerun needs no fit at all.
"""

import json

import boto3
import torch

from batch_inputs import GOOD, config, put, versions
from catversion import Residual, layout, storage
from catversion.cli import main
from catversion.samples import concept_jpegs
from pipelines.batch import FAULT_MARKER_ENV, FAULT_STATE_KILL_ENV, BatchConfig, read_results, run_batch


def _residual(bucket, key):
    return Residual.load(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())


def test_good_residuals_land_and_bad_concepts_are_reported(batch_run):
    first_run = batch_run
    bucket, _, _, summary = first_run
    assert summary.error is None
    results = {r["concept_id"]: r for r in read_results(f"s3://{bucket}/run1/runs/first/results.parquet")}
    assert set(results) == set(GOOD) | {"broken", "missing"}
    for concept_id, word in GOOD.items():
        row = results[concept_id]
        assert row["status"] == "ok" and row["steps"] == 3
        key = f"run1/residuals/{concept_id}.safetensors"
        assert row["residual_uri"] == f"s3://{bucket}/{key}"
        residual = Residual.load(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())
        assert residual.sha256 == row["sha256"] and residual.meta["class_word"] == word
        assert residual.meta["base_model"] == "tiny" and residual.meta["concept_id"] == concept_id
        assert len(versions(bucket, key)) == 1, "written exactly once"
    assert results["broken"]["status"] == "failed"
    assert "photos/broken/1.jpg is not a decodable image" in results["broken"]["error"]
    assert results["missing"]["status"] == "failed" and "photos/nowhere/0.jpg does not exist" in results["missing"]["error"]
    for bad in ("broken", "missing"):
        assert not versions(bucket, f"run1/residuals/{bad}.safetensors")
    assert summary.counts == {"ok": 4, "skipped": 0, "failed": 2, "interrupted": 0}
    # Nothing of the run's machinery is left behind: no claims, no training states.
    assert not storage.list_uris(layout.claims_folder(f"s3://{bucket}/run1"))
    assert not storage.list_uris(layout.state_folder(f"s3://{bucket}/run1"))
    # The indexes that make the next run cheap: every fetched image's hash, every residual's fingerprint.
    assert storage.exists(layout.image_index_uri(f"s3://{bucket}/run1"))
    assert storage.exists(layout.residual_index_uri(f"s3://{bucket}/run1"))
    assert storage.list_uris(layout.parts_folder(f"s3://{bucket}/run1", "first")), "results written as the run went"


def test_rerun_skips_up_to_date_concepts_and_retrains_changed_ones(batch_run):
    first_run = batch_run
    bucket, manifest, tmp_path, _ = first_run
    lines = []
    again = run_batch(config(bucket, manifest, "run1", tmp_path, run_id="again"), log=lines.append)
    assert {r["concept_id"]: r["status"] for r in again.results} == {**dict.fromkeys(GOOD, "skipped"), "broken": "failed",
                                                                     "missing": "failed"}
    assert any("0 to train or check, 4 up to date" in line for line in lines), lines  # decided from listings
    # ... and named for the run that trained them (so is a concurrent run that plans after this one's index)
    assert {r["detail"] for r in again.results if r["status"] == "skipped"} == {"up to date (trained by run first)"}
    for concept_id in GOOD:
        assert len(versions(bucket, f"run1/residuals/{concept_id}.safetensors")) == 1

    put(bucket, "photos/blue-mug/1.jpg", concept_jpegs("blue-mug", n=1, size=96, seed=99)[0])
    changed = run_batch(config(bucket, manifest, "run1", tmp_path, run_id="changed"), log=lambda _: None)
    statuses = {r["concept_id"]: r["status"] for r in changed.results}
    assert statuses["blue-mug"] == "ok"
    assert [c for c, s in statuses.items() if s == "skipped"] == ["red-teapot", "green-vase", "yellow-duck"]
    assert len(versions(bucket, "run1/residuals/blue-mug.safetensors")) == 2
    assert len(versions(bucket, "run1/residuals/red-teapot.safetensors")) == 1


def test_an_up_to_date_rerun_from_the_command_line_loads_no_model_and_starts_no_ray(batch_run, tmp_path):
    """What a user waits for when nothing needs training: planning needs the base model's fingerprint, not the
    model (catversion.modelinfo caches it by its files' stamps), so torch, diffusers, transformers and Ray
    are never imported."""
    import os
    import subprocess
    import sys

    from catversion import modelinfo

    bucket, manifest, _, _ = batch_run
    env = {**os.environ, "CATVERSION_CACHE_DIR": str(tmp_path / "cache")}
    os.environ["CATVERSION_CACHE_DIR"] = env["CATVERSION_CACHE_DIR"]
    try:
        modelinfo.describe("tiny")  # the first run on a machine computes the fingerprint once
    finally:
        del os.environ["CATVERSION_CACHE_DIR"]
    argv = ["batch", "--manifest", manifest, "--output", f"s3://{bucket}/run1", "--model", "tiny", "--steps", "3",
            "--workers", "2", "--pack", "2", "--run-id", "cheap", "--json", "--quiet"]
    probe = (f"import sys\nfrom catversion.cli import main\nstatus = main({argv!r})\n"
             "print('LOADED', sorted(m for m in ('torch', 'diffusers', 'transformers', 'ray') if m in sys.modules))\n"
             "sys.exit(status)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 3, done.stderr[-3000:]  # the manifest's two bad concepts: status 3
    summary, loaded = done.stdout.rsplit("LOADED", 1)
    assert loaded.strip() == "[]", f"the up-to-date rerun imported {loaded.strip()}"
    assert json.loads(summary)["counts"] == {"ok": 0, "skipped": 4, "failed": 2, "interrupted": 0}


def test_a_worker_killed_mid_training_resumes_from_its_saved_state_exactly(batch_run, tmp_path, monkeypatch, capsys):
    """A worker dies (os._exit, as on a lost node) right after saving a concept's state at step 2 of 3.

    Ray Train restarts the group; the concepts in flight resume from their saved state and end equal
    to the uninterrupted first run's residuals; every residual is written exactly once.
    """
    bucket, manifest, _, _ = batch_run
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_STATE_KILL_ENV, "1")
    monkeypatch.setenv(FAULT_MARKER_ENV, str(marker))
    argv = ["batch", "--manifest", manifest, "--output", f"s3://{bucket}/run2", "--model", "tiny", "--workers", "2",
            "--pack", "2", "--steps", "3", "--state-every", "2", "--max-failures", "3", "--run-id", "faulty",
            "--storage-path", str(tmp_path / "ray-train"), "--json"]
    assert main(argv) == 3  # two concepts in the manifest are bad: status 3, but everything else is done
    assert "after 1 state writes" in marker.read_text(), "the fault hook must really have killed a worker"
    results = {r["concept_id"]: r for r in read_results(f"s3://{bucket}/run2/runs/faulty/results.parquet")}
    # Training is seeded: starting over would end with the same tensor, so equality alone cannot tell a
    # resume from a restart. The result row says which happened: the concept whose state was saved at
    # step 2 before the kill continued from it (and so ran 1 of its 3 steps in the restarted group).
    resumed = {c: results[c]["detail"] for c in GOOD if results[c]["detail"]}
    assert resumed and set(resumed.values()) == {"resumed from step 2"}, resumed
    for concept_id in GOOD:
        assert results[concept_id]["status"] == "ok" and results[concept_id]["steps"] == 3
        key = f"run2/residuals/{concept_id}.safetensors"
        assert len(versions(bucket, key)) == 1, f"{concept_id} written more than once"
        resumed, uninterrupted = _residual(bucket, key), _residual(bucket, f"run1/residuals/{concept_id}.safetensors")
        assert torch.allclose(resumed.tensor, uninterrupted.tensor, atol=1e-5), concept_id
        assert resumed.meta["training_fingerprint"] == uninterrupted.meta["training_fingerprint"]
    assert not storage.list_uris(layout.state_folder(f"s3://{bucket}/run2")), "states are removed once done"
    summary = json.loads(capsys.readouterr().out)  # --json: stdout is one JSON object, logs are on stderr
    assert summary["counts"]["ok"] == 4 and summary["run_id"] == "faulty" and summary["error"] is None, summary
    assert {f["concept_id"] for f in summary["failed"]} == {"broken", "missing"}, summary
    assert summary["results_uri"] == f"s3://{bucket}/run2/runs/faulty/results.parquet" and not summary["ok"]


def test_relative_local_paths_mean_the_same_to_the_workers(ray_session, tmp_path, monkeypatch):
    """Workers run in their own folders: a relative manifest, image and output path still work."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    rows = []
    for i, data in enumerate(concept_jpegs("blue-mug", n=2, size=64)):
        (tmp_path / "photos" / f"{i}.jpg").write_bytes(data)
        rows.append({"concept_id": "mug", "class_word": "mug", "image_uri": f"photos/{i}.jpg"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    summary = run_batch(BatchConfig(manifest="manifest.parquet", output="out", model="tiny", workers=1, pack=1, steps=2,
                                    storage_path="ray-train"), log=lambda _: None)
    assert summary.counts["ok"] == 1, summary.format()
    residual = Residual.load(tmp_path / "out" / "residuals" / "mug.safetensors")
    assert residual.meta["class_word"] == "mug"
    assert read_results(str(tmp_path / "out" / "runs" / summary.run_id / "results.parquet"))[0]["residual_uri"] == str(
        tmp_path / "out" / "residuals" / "mug.safetensors")
