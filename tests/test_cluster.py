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


def test_a_gpu_request_on_a_cpu_machine_fails_fast_naming_gpus(cluster_manifest, tmp_path):
    """A GPU per worker on this CPU-only machine (a Ray the command starts itself, so no autoscaler):
    the resources are compared before Ray Train starts, so the job ends at once (not after
    --resources-timeout, 600 s by default) with status 1, names the GPUs and the flag to change, and
    writes results.parquet with every concept "interrupted"."""
    bucket, manifest = cluster_manifest
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "catversion.cli", "batch", "--manifest", manifest, "--output", f"s3://{bucket}/gpu",
         "--model", "tiny", "--gpus-per-worker", "1", "--run-id", "nogpu", "--storage-path", str(tmp_path / "ray-train")],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert ("each worker needs 1 GPU; this cluster has 0 GPUs (add GPU nodes or use --gpus-per-worker 0)"
            in done.stderr), done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    from pipelines.batch import read_results

    rows = read_results(f"s3://{bucket}/gpu/runs/nogpu/results.parquet")
    assert {r["status"] for r in rows} == {"interrupted"} and len(rows) == len(CONCEPTS)
    assert all("each worker needs 1 GPU" in r["error"] for r in rows), rows


def test_on_a_joined_cluster_a_missing_gpu_waits_resources_timeout_then_says_what_is_missing(cluster_manifest,
                                                                                              tmp_path):
    """On a cluster the driver joined, an autoscaler it cannot see may still add GPU nodes: the run waits,
    and after --resources-timeout ends the Train run (not left behind), naming what is missing."""
    bucket, manifest = cluster_manifest
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cluster_job.py"), manifest, f"s3://{bucket}/gpu-joined", "nogpu-joined",
         "nogpu", "5", str(tmp_path / "ray-train"), str(tmp_path / "summary.json")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "needs 2 worker(s) with 1 CPU, 1 GPU each" in summary["error"], summary
    assert "0 GPU in all" in summary["error"], summary
    assert set(summary["statuses"].values()) == {"interrupted"}, summary
    assert "already been shutdown" not in done.stderr, "the Train run must be aborted, not left behind"
