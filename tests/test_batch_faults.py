"""Batch runs under faults: an S3 outage, two runs on one output at once, Ctrl-C, a manifest with every kind
of bad row, an output that cannot be written (read-only, or a path through a file), a dead run's marker, a
missing model; and --validate-only on Ray.

Real parts: the session's Ray, moto's S3 server over HTTP, a TCP proxy in front of it that the outage
test takes down and brings back, and a read-only tmpfs where the machine lets tests mount one.
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
import pytest

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


# ---- hostile manifests, unwritable outputs, dead runs, a missing model ------------------------


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels and that holds none."""
    import struct
    import zlib

    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    end = b"IEND"
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
            + struct.pack(">I", 0) + end + struct.pack(">I", zlib.crc32(end)))


def _hostile_manifest(folder: Path) -> tuple[Path, list[str], dict[str, str]]:
    """Two good concepts next to every kind of bad row, images in ``folder``: (manifest, good ids, a phrase
    each bad concept's reason must hold). A row without a concept id is keyed by its prefix ``<row``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from catversion.limits import MAX_IMAGE_BYTES
    from catversion.samples import concept_jpegs

    photos = folder / "photos"
    photos.mkdir(parents=True)
    jpegs = iter(concept_jpegs("red-teapot", n=40, size=64, seed=5))

    def photo(name: str, data: bytes | None = None) -> str:
        (photos / name).write_bytes(next(jpegs) if data is None else data)
        return f"photos/{name}"

    rows, expected = [], {}

    def bad(concept_id, phrase, **row):
        rows.append({"concept_id": concept_id, "class_word": "object", **row})
        expected[concept_id if concept_id is not None else "<row"] = phrase

    good = ["good-a", "good-b"]
    for concept_id in good:
        rows += [{"concept_id": concept_id, "class_word": "teapot", "image_uri": photo(f"{concept_id}-{i}.jpg")}
                 for i in range(2)]
    # Rejected by the manifest checks: no image is fetched, and no path is ever built from the id.
    bad("../escape", "is not valid", image_uri=photo("escape.jpg"))
    bad(None, "has no concept_id", image_uri=photo("no-id.jpg"))
    bad("no-word", "class_word is empty", class_word="", image_uri=photo("no-word.jpg"))
    bad("long-word", "the limit is", class_word="w" * 10_000, image_uri=photo("long-word.jpg"))
    rows.append({"concept_id": "two-words", "class_word": "cat", "image_uri": photo("two-words-0.jpg")})
    bad("two-words", "class_word differs", class_word="dog", image_uri=photo("two-words-1.jpg"))
    bad("both-images", "has both image_uri and image_bytes", image_uri=photo("both.jpg"), image_bytes=next(jpegs))
    bad("no-image", "has neither image_uri nor image_bytes")
    bad("web-image", "unsupported scheme", image_uri="https://example.com/photo.jpg")
    rows.append({"concept_id": "twice", "class_word": "object", "image_uri": photo("twice.jpg")})
    bad("twice", "is listed twice", image_uri="photos/twice.jpg")
    bad("zero-steps", "steps must be", image_uri=photo("zero-steps.jpg"), steps=0)
    bad("nan-rate", "learning_rate is nan", image_uri=photo("nan-rate.jpg"), learning_rate=float("nan"))
    bad("system-file", "outside the manifest's folder", image_uri="/etc/passwd")
    bad("escaping-path", "outside the manifest's folder", image_uri="../../../../etc/passwd")
    # Valid rows whose images fail when planned or fetched: each fails alone, nothing hangs or balloons.
    bad("missing-file", "photos/nowhere.jpg does not exist", image_uri="photos/nowhere.jpg")
    bad("not-an-image", "is not a decodable image", image_uri=photo("garbage.jpg", b"\xff\xd8\xff not a jpeg"))
    bad("pixel-bomb", "decompression-bomb guard", image_uri=photo("bomb.png", _png_claiming(11_000, 11_000)))
    with open(photos / "huge.jpg", "wb") as handle:
        handle.truncate(MAX_IMAGE_BYTES + 1)  # sparse: it takes no disk, and reading it would take 64 MiB
    bad("too-many-bytes", f"over the limit of {MAX_IMAGE_BYTES:,}", image_uri="photos/huge.jpg")
    os.mkfifo(photos / "pipe.jpg")  # opening it to read would block forever
    bad("a-fifo", "photos/pipe.jpg", image_uri="photos/pipe.jpg")
    bad("a-folder", "photos/sub", image_uri="photos/sub")
    (photos / "sub").mkdir()
    bad("bad-inline", "is not a decodable image", image_bytes=b"GIF89a but nothing after")
    schema = pa.schema([("concept_id", pa.string()), ("class_word", pa.string()), ("image_uri", pa.string()),
                        ("image_bytes", pa.binary()), ("steps", pa.int64()), ("learning_rate", pa.float64())])
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), manifest)
    return manifest, good, expected


def test_a_manifest_with_every_kind_of_bad_row_next_to_good_concepts(ray_session, s3_bucket, tmp_path, capsys):
    """A real run: the good concepts train and are written once; every bad row's concept has a failed row
    naming why; no path is built from a rejected id; exit status 3. A dead run's marker on the output is
    reported and removed, not taken for a run that is active."""
    import json

    manifest, good, expected = _hostile_manifest(tmp_path / "inputs")
    output = f"s3://{s3_bucket}/hostile"
    dead = {"run_id": "crashed-yesterday", "heartbeat": time.time() - 86_400, "ttl_s": 120}
    storage.write_bytes(layout.active_uri(output, "crashed-yesterday"), json.dumps(dead).encode())
    capsys.readouterr()
    status = main(["batch", "--manifest", str(manifest), "--output", output, "--model", "tiny", "--workers", "1",
                   "--pack", "2", "--steps", "2", "--run-id", "hostile", "--storage-path", str(tmp_path / "ray-train"),
                   "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert status == 3, err[-3000:]
    summary = json.loads(out)
    rows = {r["concept_id"]: r for r in read_results(layout.results_uri(output, "hostile"))}
    keyed = {("<row" if cid.startswith("<row") else cid): row for cid, row in rows.items()}
    assert set(keyed) == set(good) | set(expected), sorted(keyed)
    for concept_id in good:
        assert keyed[concept_id]["status"] == "ok", keyed[concept_id]
        assert len(versions(s3_bucket, f"hostile/residuals/{concept_id}.safetensors")) == 1, "written once"
    for concept_id, phrase in expected.items():
        row = keyed[concept_id]
        assert row["status"] == "failed" and phrase in (row["error"] or ""), (concept_id, row["error"])
    assert summary["counts"] == {"ok": 2, "skipped": 0, "failed": len(expected), "interrupted": 0}, summary
    assert summary["error"] is None and summary["results_error"] is None, summary
    keys = [o["Key"] for o in _direct_client().list_objects_v2(Bucket=s3_bucket, Prefix="hostile/").get("Contents", [])]
    assert sorted(k for k in keys if "/residuals/" in k) == [f"hostile/residuals/{c}.safetensors" for c in good]
    assert not [k for k in keys if "escape" in k or "passwd" in k or "<row" in k], keys
    assert "run crashed-yesterday is dead" in err and "marker removed" in err, err[-3000:]
    assert "other run(s) active" not in err
    assert not storage.list_uris(layout.active_folder(output)), "the dead marker is gone, and so is the run's own"


def test_dead_run_markers_are_reported_once_and_removed_and_live_ones_are_counted(tmp_path):
    import json

    from pipelines.claims import RunMarker

    output = str(tmp_path / "out")
    now = time.time()
    for run_id, age in (("live", 10.0), ("dead", 600.0)):
        storage.write_bytes(layout.active_uri(output, run_id),
                            json.dumps({"run_id": run_id, "heartbeat": now - age, "ttl_s": 120}).encode())
    lines = []
    marker = RunMarker(output, "me", ttl_s=120, budget=storage.SHORT_BUDGET, log=lines.append)
    marker.start()
    try:
        assert marker.others() == ["live"]
        assert marker.others() == ["live"]
    finally:
        marker.stop()
    assert [line for line in lines if "dead" in line] == [
        f"[batch me] run dead is dead: its marker {layout.active_uri(output, 'dead')} had no heartbeat for 600 s "
        "(TTL 120 s); not counted as active, marker removed"]
    assert storage.list_uris(layout.active_folder(output)) == [layout.active_uri(output, "live")]


def test_a_residuals_folder_that_cannot_be_written_fails_each_concept_alone_with_the_cause(ray_session, tmp_path):
    """A read-only (or, without mount rights, a path-through-a-file) residuals folder: the workers record
    each concept as failed with the file system's error, the worker group does not crash-loop, and
    results.parquet is written next to it (exit status 3 from the command)."""
    from mounts import tmpfs_if_allowed

    manifest, good, _ = _hostile_manifest(tmp_path / "inputs")
    output = tmp_path / "out"
    with tmpfs_if_allowed(output / "residuals", "ro,size=64k") as read_only:
        cause = "Read-only file system (EROFS)"
        if read_only is None:  # no mount rights on this machine: a file stands where the folder goes
            (output / "residuals").rmdir()
            (output / "residuals").write_bytes(b"not a folder")
            cause = "Not a directory (ENOTDIR)"
        summary = run_batch(BatchConfig(manifest=str(manifest), output=str(output), model="tiny", workers=1, pack=2,
                                        steps=2, state_every=1, max_failures=0, run_id="ro",
                                        storage_path=str(tmp_path / "ray-train")), log=lambda _: None)
    assert summary.error is None and summary.results_error is None, summary.format()  # no worker crash
    rows = {r["concept_id"]: r for r in read_results(str(output / "runs" / "ro" / "results.parquet"))}
    for concept_id in good:
        assert rows[concept_id]["status"] == "failed", rows[concept_id]
        assert f"{concept_id}.safetensors: {cause}" in rows[concept_id]["error"], rows[concept_id]["error"]
    # Their saved training states stay: a rerun once the folder is writable resumes them.
    assert {layout.state_concept(str(output), uri) for uri in storage.list_uris(layout.state_folder(str(output)))} \
        == set(good)


def _batch_command(manifest: Path, output: Path, tmp_path: Path, *more: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "catversion.cli", "batch", "--manifest", str(manifest), "--output",
                           str(output), "--model", "tiny", "--run-id", "nowhere", "--json", *more],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("kind", ["read-only file system", "a path through a file"])
def test_an_output_where_nothing_can_be_written_is_one_clear_error_and_the_summary_is_the_record(tmp_path, kind):
    """Exit 1 with one line naming the output and the cause, no traceback, no Ray started; --json still
    prints the summary, which lists every concept since results.parquet could not be written."""
    import json
    from contextlib import nullcontext

    from mounts import tmpfs

    manifest, good, expected = _hostile_manifest(tmp_path / "inputs")
    if kind == "read-only file system":
        place, cause = tmpfs(tmp_path / "ro", "ro,size=64k"), "Read-only file system (EROFS)"
        output = tmp_path / "ro" / "out"
    else:
        (tmp_path / "a-file").write_bytes(b"x")
        place, cause, output = nullcontext(), "Not a directory (ENOTDIR)", tmp_path / "a-file" / "out"
    with place:
        done = _batch_command(manifest, output, tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("catversion batch: error: run nowhere ended early: cannot write under --output "
                           f"{output}: ") and cause in last, last
    summary = json.loads(done.stdout)
    assert not summary["ok"] and cause in summary["error"] and cause in summary["results_error"], summary
    listed = {r["concept_id"]: r["status"] for r in summary["results"]}
    assert len(listed) == len(good) + len(expected) and set(listed.values()) == {"failed", "interrupted"}, listed
    assert listed["good-a"] == listed["good-b"] == "interrupted" and listed["../escape"] == "failed", listed


def test_a_missing_model_is_one_line_with_the_fix_and_json_still_prints_its_object(tmp_path, capsys):
    import json

    manifest, good, _ = _hostile_manifest(tmp_path / "inputs")
    output = tmp_path / "out"
    argv = ["batch", "--manifest", str(manifest), "--output", str(output), "--model", str(tmp_path / "no-model"),
            "--run-id", "modelless", "--json", "--quiet"]
    capsys.readouterr()
    assert main(argv) == 1
    out, err = capsys.readouterr()
    error_lines = [line for line in err.splitlines() if line.startswith("catversion batch: error:")]
    assert len(error_lines) == 1 and "no-model" in error_lines[0] and "does not exist" in error_lines[0], err
    assert "Traceback" not in err
    summary = json.loads(out)
    assert summary["ok"] is False and "no-model" in summary["error"], summary
    rows = {r["concept_id"]: r for r in read_results(summary["results_uri"])}  # the run's record, still written
    assert all(rows[c]["status"] == "interrupted" and "not started" in rows[c]["error"] for c in good), rows
