"""Node loss on a real multi-node Ray cluster (ray.cluster_utils.Cluster on this machine).

Each case runs tests/cluster_job.py in its own process, since a driver joins one Ray cluster at a
time and the session's shared Ray stays up. The S3 server is the session's, over HTTP.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batch_inputs import put, versions
from catversion.samples import concept_jpegs

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ["red-teapot", "blue-mug", "green-vase", "yellow-duck"]
CONCEPTS = {f"thing-{n}": word for n, word in enumerate(["teapot", "mug", "vase", "toy", "teapot", "mug"])}


@pytest.fixture
def cluster_manifest(s3_bucket):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for n, (concept_id, word) in enumerate(CONCEPTS.items()):
        for i, data in enumerate(concept_jpegs(SAMPLES[n % 4], n=2, size=64, seed=n)):
            put(s3_bucket, f"photos/{concept_id}/{i}.jpg", data)
            rows.append({"concept_id": concept_id, "class_word": word,
                         "image_uri": f"s3://{s3_bucket}/photos/{concept_id}/{i}.jpg"})
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    put(s3_bucket, "manifest.parquet", sink.getvalue())
    return s3_bucket, f"s3://{s3_bucket}/manifest.parquet"


@pytest.mark.parametrize("mode", ["replace", "shrink"])
def test_a_lost_worker_node_costs_no_concept_and_no_double_write(cluster_manifest, tmp_path, mode):
    """replace: a fixed group of 2 restarts on a new node; shrink: an elastic group (1..2) goes on with one worker."""
    bucket, manifest = cluster_manifest
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cluster_job.py"), manifest, f"s3://{bucket}/out", f"loss-{mode}", mode,
         "60", str(tmp_path / "ray-train"), str(tmp_path / "summary.json")],
        capture_output=True, text=True, timeout=420, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    print(json.dumps(summary, indent=1))
    assert summary["events"][0] == "removed a worker node", summary
    assert summary["statuses"] == dict.fromkeys(CONCEPTS, "ok"), summary
    assert summary["error"] is None, summary
    for concept_id in CONCEPTS:
        assert len(versions(bucket, f"out/residuals/{concept_id}.safetensors")) == 1, f"{concept_id} written twice"


def test_a_group_that_never_gets_its_resources_ends_the_job_and_says_what_is_missing(cluster_manifest, tmp_path):
    """A GPU per worker on a CPU-only machine: no endless wait; the job ends after --resources-timeout,
    names what is missing, and writes results.parquet with every concept "interrupted"."""
    bucket, manifest = cluster_manifest
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "catversion.cli", "batch", "--manifest", manifest, "--output", f"s3://{bucket}/gpu",
         "--model", "tiny", "--gpus-per-worker", "1", "--resources-timeout", "5", "--run-id", "nogpu",
         "--storage-path", str(tmp_path / "ray-train")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "already been shutdown" not in done.stderr, "the Train run must be aborted, not left behind"
    assert "needs 1 worker(s) with 1 CPU, 1 GPU each" in done.stdout and "0 GPU in all" in done.stdout, done.stdout
    from pipelines.batch import read_results

    rows = read_results(f"s3://{bucket}/gpu/runs/nogpu/results.parquet")
    assert {r["status"] for r in rows} == {"interrupted"} and len(rows) == len(CONCEPTS)
