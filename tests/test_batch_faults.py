"""Batch runs under faults: an S3 outage, two runs on one output at once, Ctrl-C; and --validate-only on Ray.

Real parts: the session's Ray, moto's S3 server over HTTP, and (for the outage) a TCP proxy in
front of it that the test takes down and brings back.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import boto3

from batch_inputs import small_manifest, versions, write_manifest
from catversion import layout, storage
from catversion.cli import main
from pipelines.batch import BatchConfig, read_results, run_batch
from tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parent.parent


def _direct_client():
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def _wait_for_residual(client, bucket, prefix, thread, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (thread is None or thread.is_alive()):
        listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/residuals/").get("Contents", [])
        if listed:
            return
        time.sleep(0.1)
    raise AssertionError("no residual appeared")


def _run_through_outage(bucket, manifest, tmp_path, monkeypatch, output, retry_s, outage_s):
    """A run whose S3 traffic (driver and workers) goes through a proxy that is down for ``outage_s``
    seconds once the first residual has landed."""
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    moto = urlparse(endpoint)
    direct = _direct_client()
    with TcpProxy(moto.hostname, moto.port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        config = BatchConfig(manifest=manifest, output=f"s3://{bucket}/{output}", model="tiny", workers=2, pack=1,
                             steps=25, state_every=5, storage_retry_s=retry_s, run_id=output,
                             storage_path=str(tmp_path / "ray-train"), worker_env={"AWS_ENDPOINT_URL": proxy.endpoint})
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(summary=run_batch(config, log=lambda _: None)))
        thread.start()
        _wait_for_residual(direct, bucket, output, thread)
        proxy.down()
        time.sleep(outage_s)
        proxy.up()
        thread.join(300)
        assert proxy.refused > 0, "the outage must really have turned connections away"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    return outcome["summary"]


def test_an_s3_outage_within_the_retry_budget_loses_nothing(ray_session, s3_bucket, tmp_path, monkeypatch):
    manifest, concepts = small_manifest(s3_bucket, 6)
    summary = _run_through_outage(s3_bucket, manifest, tmp_path, monkeypatch, "short", retry_s=60, outage_s=6)
    assert summary.error is None, summary.format()
    assert summary.counts["ok"] == 6, summary.format()
    for concept_id in concepts:
        assert len(versions(s3_bucket, f"short/residuals/{concept_id}.safetensors")) == 1
    assert not storage.list_uris(layout.claims_folder(f"s3://{s3_bucket}/short"))


def test_an_outage_longer_than_the_budget_fails_concepts_alone_with_the_storage_error(ray_session, s3_bucket, tmp_path,
                                                                                       monkeypatch):
    manifest, concepts = small_manifest(s3_bucket, 6)
    summary = _run_through_outage(s3_bucket, manifest, tmp_path, monkeypatch, "long", retry_s=2, outage_s=15)
    statuses = {r["concept_id"]: r for r in read_results(summary.results_uri)}  # written once the store is back
    assert set(statuses) == set(concepts)
    failed = [r for r in statuses.values() if r["status"] == "failed"]
    assert failed, summary.format()
    for row in failed:  # the root cause, not a wrapped worker error
        assert "unreachable" in row["error"] and "WorkerGroupError" not in row["error"], row["error"]
    assert {r["status"] for r in statuses.values()} <= {"ok", "failed"}
    for concept_id in concepts:
        assert len(versions(s3_bucket, f"long/residuals/{concept_id}.safetensors")) <= 1
    assert not storage.list_uris(layout.claims_folder(f"s3://{s3_bucket}/long")), "claims of failed concepts released"


def test_two_runs_on_one_output_at_once_train_each_concept_once(ray_session, s3_bucket, tmp_path):
    manifest, concepts = small_manifest(s3_bucket, 6)
    summaries = {}

    def run(run_id):
        config = BatchConfig(manifest=manifest, output=f"s3://{s3_bucket}/both", model="tiny", workers=1, pack=1,
                             steps=15, run_id=run_id, storage_path=str(tmp_path / run_id))
        summaries[run_id] = run_batch(config, log=lambda _: None)

    first = threading.Thread(target=run, args=("run-a",))
    first.start()
    _wait_for_residual(_direct_client(), s3_bucket, "both", first)  # staggered: the second starts mid-run
    second = threading.Thread(target=run, args=("run-b",))
    second.start()
    first.join(300)
    second.join(300)
    a = {r["concept_id"]: r for r in summaries["run-a"].results}
    b = {r["concept_id"]: r for r in summaries["run-b"].results}
    for concept_id in concepts:
        assert len(versions(s3_bucket, f"both/residuals/{concept_id}.safetensors")) == 1, f"{concept_id} trained twice"
        pair = sorted([a[concept_id]["status"], b[concept_id]["status"]])
        assert pair == ["ok", "skipped"], (concept_id, a[concept_id], b[concept_id])
        skipped = a[concept_id] if a[concept_id]["status"] == "skipped" else b[concept_id]
        owner = "run-b" if skipped is a[concept_id] else "run-a"
        assert owner in (skipped["detail"] or ""), skipped  # names the run that trained it
    assert not storage.list_uris(layout.claims_folder(f"s3://{s3_bucket}/both"))


def test_ctrl_c_writes_results_and_a_rerun_resumes_the_unfinished(ray_session, s3_bucket, tmp_path):
    manifest, concepts = small_manifest(s3_bucket, 4)
    output = f"s3://{s3_bucket}/stop"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "catversion.cli", "batch", "--manifest", manifest, "--output", output, "--model", "tiny",
         "--workers", "1", "--pack", "1", "--steps", "150", "--state-every", "10", "--run-id", "stopped",
         "--storage-path", str(tmp_path / "ray-train")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        # As from a terminal, whatever started pytest: a shell's background job (`make test &`) inherits
        # SIGINT ignored, and Python then never turns it into KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        client, deadline = _direct_client(), time.monotonic() + 240
        while not client.list_objects_v2(Bucket=s3_bucket, Prefix="stop/state/").get("Contents"):
            assert process.poll() is None and time.monotonic() < deadline, "no training state was saved"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        # Within seconds (about 8 s here, 20 s is the promise); the bound leaves room for a loaded CI
        # machine, and fails the old behaviour (waiting a minute or more for workers).
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, out[-2000:] + "\n".join(l for l in err.splitlines() if "concepts finished" not in l)[-6000:]
    rows = {r["concept_id"]: r for r in read_results(layout.results_uri(output, "stopped"))}
    assert set(rows) == set(concepts) and "interrupted" in {r["status"] for r in rows.values()}, rows
    saved = {layout.state_concept(output, uri) for uri in storage.list_uris(layout.state_folder(output))}
    assert saved, "unfinished concepts keep their saved state"
    assert not storage.list_uris(layout.claims_folder(output)), "an interrupted run leaves no claim behind"
    again = run_batch(BatchConfig(manifest=manifest, output=output, model="tiny", workers=1, pack=2, steps=150,
                                  state_every=10, run_id="resumed", storage_path=str(tmp_path / "ray-train")),
                      log=lambda _: None)
    rerun = {r["concept_id"]: r for r in again.results}
    statuses = {c: r["status"] for c, r in rerun.items()}
    assert all(statuses[c] == ("skipped" if rows[c]["status"] == "ok" else "ok") for c in concepts), statuses
    # The rerun continued each saved concept from its state (a restart from step 0 would end the same:
    # training is seeded), and started the others fresh.
    for concept_id in concepts:
        detail = rerun[concept_id]["detail"] or ""
        if concept_id in saved:
            step = re.fullmatch(r"resumed from step (\d+)", detail)
            assert step and int(step.group(1)) % 10 == 0 and 0 < int(step.group(1)) < 150, (concept_id, detail)
        elif rows[concept_id]["status"] != "ok":
            assert "resumed" not in detail, (concept_id, detail)
    assert not storage.list_uris(layout.state_folder(output)), "states are removed once their residual is written"


def test_validate_only_checks_every_image_as_ray_tasks(ray_session, s3_bucket, capsys):
    manifest = write_manifest(s3_bucket)
    assert main(["batch", "--manifest", manifest, "--validate-only", "--quiet"]) == 3
    out = capsys.readouterr().out
    assert "images: fetched and decoded" in out
    assert "rejected concept 'broken'" in out and "photos/broken/1.jpg is not a decodable image" in out
    assert "rejected concept 'missing'" in out and "does not exist" in out
    assert "REJECTED 2 of 6 concepts" in out
