"""Secrets and files stay with their owner, through a real `catversion batch` run.

A command joins an existing Ray only when told to (--address or RAY_ADDRESS), credentials reach no Ray
runtime environment and no log, and a hostile manifest cannot make a run read, hash or quote a file outside
the folders it may use (README, "Running on a Ray cluster"; docs/contracts.md, "The manifest").
"""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import free_port
from polling import wait_until
from catversion.samples import concept_jpegs

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")


@pytest.fixture
def other_ray(tmp_path_factory):
    """Another Ray already running on this machine, started with `ray start --head` as another user or an
    earlier session would, on ports of its own, in the Ray temp folder the command will use too: so Ray's
    own discovery ("Connecting to latest cluster") finds it."""
    temp = tmp_path_factory.mktemp("rt")  # short: Ray's socket paths must stay under 108 characters
    env = {**os.environ, "RAY_TMPDIR": str(temp)}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    ports = {f"--{name}-port": free_port() for name in (
        "ray-client-server", "dashboard", "dashboard-agent-listen", "dashboard-agent-grpc", "metrics-export",
        "runtime-env-agent", "node-manager", "object-manager")}
    log = temp / "ray-start.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
             "--disable-usage-stats", *(f"{flag}={value}" for flag, value in ports.items())],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # its own group: stopped whole
    try:
        current = temp / "ray" / "ray_current_cluster"
        wait_until(lambda: current.exists() or process.poll() is not None, 180, "the other Ray's start")
        assert process.poll() is None, log.read_text()[-3000:]
        [session] = (temp / "ray").glob("session_2*")
        yield SimpleNamespace(temp=temp, address=f"127.0.0.1:{port}", session=session)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # its whole process group: `ray stop` would stop every Ray here
        process.wait()


def _write_inputs(folder: Path) -> tuple[str, dict, Path]:
    """A local manifest with two good concepts next to hostile rows: /etc/passwd (absolute and file://) and a
    file outside the manifest's folder that starts like a PPM header (PIL's own error text would quote it)."""
    token = f"LEAKTOKEN{uuid.uuid4().hex}"
    secret = folder / "private" / "notes.ppm"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(f"P6\n{token} 1\n255\n".encode() + b"\0" * 64)
    batch = folder / "batch"
    rows = []
    for n, (concept_id, word) in enumerate({"red-teapot": "teapot", "blue-mug": "mug"}.items()):
        for i, data in enumerate(concept_jpegs(concept_id, n=2, size=64, seed=n)):
            path = batch / "photos" / concept_id / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            rows.append({"concept_id": concept_id, "class_word": word, "image_uri": f"photos/{concept_id}/{i}.jpg"})
    hostile = {"etc-passwd": "/etc/passwd", "etc-passwd-uri": "file:///etc/passwd",
               "escape": "../private/notes.ppm", "escape-uri": f"file://{secret}"}
    rows += [{"concept_id": cid, "class_word": "thing", "image_uri": uri} for cid, uri in hostile.items()]
    pq.write_table(pa.Table.from_pylist(rows), batch / "m.parquet")
    return str(batch / "m.parquet"), hostile, secret


def _files_text(folder: Path, since: float = 0.0) -> dict[Path, bytes]:
    found = {}
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_mtime >= since:
                found[path] = path.read_bytes()
        except OSError:  # a socket, or a file Ray removed meanwhile
            continue
    return found


def _s3_text(bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under the prefix, parquet files as the JSON of their rows (their pages are compressed)."""
    s3, found = boto3.client("s3"), {}
    for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        data = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        if item["Key"].endswith(".parquet"):
            data = json.dumps(pq.read_table(io.BytesIO(data)).to_pylist(), default=str).encode()
        found[item["Key"]] = data
    return found


def test_batch_starts_its_own_ray_beside_another_logs_no_credential_and_reads_nothing_outside(
        other_ray, s3_bucket, tmp_path):
    """`catversion batch` without --address, with another Ray running on the machine: it starts a Ray of its
    own (the other gets no driver), its workers still reach S3 with the inherited credentials, no Ray log
    anywhere holds them, and the hostile rows are rejected by the confinement rule with nothing about their
    files (sha256, size, mtime, bytes) in the summary, results, indexes, residuals or logs."""
    started = time.time()
    manifest, hostile, secret = _write_inputs(tmp_path / "data")
    key_id, key = f"AKIA{uuid.uuid4().hex[:16].upper()}", f"secret-{uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(other_ray.temp),
           "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": key}  # the S3 server accepts any key
    env.pop("RAY_ADDRESS", None)
    env.pop("CATVERSION_ALLOW_IMAGES_UNDER", None)
    done = subprocess.run(
        [sys.executable, "-m", "catversion.cli", "batch", "--manifest", manifest, "--output", f"s3://{s3_bucket}/out",
         "--model", "tiny", "--steps", "2", "--workers", "1", "--pack", "2", "--run-id", "sec", "--json", "--quiet",
         "--storage-path", str(tmp_path / "ray-train")],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-6000:]  # finished, some concepts rejected
    summary = json.loads(done.stdout)
    assert summary["counts"]["ok"] == 2 and summary["error"] is None, (summary["error"], done.stderr[-6000:])

    # Its own Ray: a second session in the shared temp folder; the other Ray never saw a driver.
    sessions = sorted((other_ray.temp / "ray").glob("session_2*"))
    assert len(sessions) == 2 and other_ray.session in sessions, sessions
    [own] = [s for s in sessions if s != other_ray.session]
    assert list((own / "logs").glob("python-core-driver-*")), "the command's driver logs in its own session"
    assert not list((other_ray.session / "logs").glob("python-core-driver-*")), "the command joined the other Ray"
    assert "Connecting to" not in done.stderr and "multiple active Ray" not in done.stderr, done.stderr[-3000:]

    # Hostile rows: rejected by name, by the confinement rule, before their files are touched.
    folder = str(Path(manifest).parent)
    for n, (concept_id, uri) in enumerate(hostile.items(), start=4):
        assert summary["rejected"][concept_id][0] == (
            f"image_uri {uri!r} on row {n} of {manifest} is outside the manifest's folder ({folder}) and the folders "
            "allowed with --allow-images-under (none); move the image there, or allow its folder with "
            "--allow-images-under DIR (or CATVERSION_ALLOW_IMAGES_UNDER)"), summary["rejected"]

    outputs = {**_s3_text(s3_bucket, "out/"), "stdout": done.stdout.encode(), "stderr": done.stderr.encode()}
    assert any(name.endswith("results.parquet") for name in outputs) and any(
        name.endswith("red-teapot.safetensors") for name in outputs), sorted(outputs)
    logs = {**_files_text(other_ray.temp), **_files_text(tmp_path / "ray-train")}
    if Path("/tmp/ray").is_dir():
        logs.update(_files_text(Path("/tmp/ray"), since=started))
    passwd = Path("/etc/passwd").read_bytes()
    about_files = [hashlib.sha256(passwd).hexdigest(), passwd.splitlines()[0].decode(),
                   hashlib.sha256(secret.read_bytes()).hexdigest(), secret.read_bytes()[3:44].decode(),
                   *(str(Path(p).stat().st_mtime_ns) for p in ("/etc/passwd", secret))]
    for name, data in {**outputs, **logs}.items():
        for value in (key, key_id, *about_files):
            assert value.encode() not in data, f"{value[:20]}… found in {name}"


def test_connect_joins_only_the_ray_it_is_told_to(other_ray, tmp_path):
    """catversion.cluster.connect, used by batch, evaluate --address and serve: without an address it starts
    a Ray of its own whose processes know its address (Ray Train's cleaner would otherwise look up the other
    one); RAY_ADDRESS (how `ray job submit` and KubeRay tell a driver) joins that cluster; a credential
    offered for a joined cluster's runtime environment is refused before anything is logged."""
    script = tmp_path / "job.py"
    script.write_text(
        "import json, os, sys, ray\n"
        "from catversion.cluster import connect\n"
        "out = {}\n"
        "assert connect(None, {'AWS_ENDPOINT_URL': 'http://s3.example'}, num_cpus=1, include_dashboard=False)\n"
        "out['own'] = ray.get_runtime_context().gcs_address\n"
        "out['tasks_see'] = ray.get(ray.remote(lambda: os.environ.get('RAY_ADDRESS')).remote())\n"
        "out['driver_env'] = os.environ.get('RAY_ADDRESS')\n"
        "ray.shutdown()\n"
        "os.environ['RAY_ADDRESS'] = sys.argv[1]\n"
        "assert connect(None)\n"
        "out['told'] = ray.get_runtime_context().gcs_address\n"
        "ray.shutdown()\n"
        "try:\n"
        "    connect(sys.argv[1], {'AWS_ENDPOINT_URL': 'http://s3.example', 'AWS_SECRET_ACCESS_KEY': 'x'})\n"
        "except ValueError as exc:\n"
        "    out['refused'] = str(exc)\n"
        "print(json.dumps(out))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(other_ray.temp)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, str(script), other_ray.address], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])

    assert out["own"] != other_ray.address and out["tasks_see"] == out["own"], out
    assert out["driver_env"] is None, "the command's own environment is left as it was"
    assert out["told"] == other_ray.address, out
    assert out["refused"] == ("AWS_SECRET_ACCESS_KEY would be written in plain text into Ray's logs through the "
                              "job's runtime environment; a Ray the command starts inherits its environment, and a "
                              "cluster's workers use their nodes' own credentials")
    assert "multiple active Ray" not in done.stderr, done.stderr[-3000:]


def test_a_training_worker_refuses_an_image_swapped_outside_after_the_manifest_check(ray_session, s3_bucket, tmp_path):
    """Defence in depth: a symlink inside the manifest's folder that points outside by the time a worker reads
    it (swapped right after the driver's check) fails its concept with the folder rule, unread; the other
    concept of the run trains."""
    from pipelines.batch import BatchConfig, read_results, run_batch

    batch = tmp_path / "batch"
    batch.mkdir()
    outside = tmp_path / "outside.ppm"
    token = f"LEAKTOKEN{uuid.uuid4().hex}"
    outside.write_bytes(f"P6\n{token} 1\n255\n".encode())
    photos = concept_jpegs("red-teapot", n=2, size=64, seed=1)
    for i, data in enumerate(photos):
        (batch / f"{i}.jpg").write_bytes(data)
    (batch / "swapped.jpg").symlink_to(batch / "0.jpg")
    pq.write_table(pa.Table.from_pylist([
        {"concept_id": "good", "class_word": "teapot", "image_uri": "0.jpg"},
        {"concept_id": "good", "class_word": "teapot", "image_uri": "1.jpg"},
        {"concept_id": "swapped", "class_word": "teapot", "image_uri": "swapped.jpg"}]), batch / "m.parquet")

    def log(line: str) -> None:
        if "] manifest:" in line:  # logged right after the driver's check, before any worker starts
            (batch / "swapped.jpg").unlink()
            (batch / "swapped.jpg").symlink_to(outside)

    summary = run_batch(BatchConfig(manifest=str(batch / "m.parquet"), output=f"s3://{s3_bucket}/out", model="tiny",
                                    steps=2, workers=1, pack=2, run_id="swap",
                                    storage_path=str(tmp_path / "ray-train")), log=log)

    rows = {row["concept_id"]: row for row in read_results(summary.results_uri)}
    assert rows["good"]["status"] == "ok", rows["good"]
    assert rows["swapped"]["status"] == "failed" and rows["swapped"]["error"] == (
        f"image {batch}/swapped.jpg now resolves outside {batch}, the folder it was allowed under when the "
        "manifest was checked; it was not read"), rows["swapped"]
    assert not any(rows["swapped"][k] for k in ("image_stamps", "image_sha256s", "fingerprint")), rows["swapped"]
    recorded = json.dumps(list(rows.values()), default=str)
    assert token not in recorded and hashlib.sha256(outside.read_bytes()).hexdigest() not in recorded
