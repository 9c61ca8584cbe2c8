"""`make demo`: the whole service end to end on embedded defaults, then a clean shutdown.

1. an S3 server on 127.0.0.1 (moto) and a local Ray with its dashboard and metrics endpoint;
2. synthetic photos of three objects and a parquet manifest, written to S3;
3. `catversion batch` trains every concept on Ray Train (built-in tiny model), residuals to S3;
4. `catversion evaluate` scores the residuals (CLIP-T, CLIP-I, masked CLIP-I; DreamBooth's DINO) into an HTML report;
5. `catversion serve` serves them; one image per concept is fetched over HTTP (OpenAI Images API);
6. the metrics endpoint is read, a summary printed, and everything stopped (on Ctrl-C too).
Each command is printed as run; results are copied to demo-output/.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import requests
from prometheus_client.parser import text_string_to_metric_families

from catversion import layout, storage
from catversion.telemetry import BATCH_SIZE, CONCEPTS_DONE, REQUESTS
from catversion.samples import SAMPLE_CONCEPTS, concept_jpegs

# Everything stays on this machine's loopback interface (Ray binds the host's IP without this).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONCEPTS = ("red-teapot", "blue-mug", "yellow-duck")
BUCKET = "catversion-demo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(argv: list[str]) -> None:
    print(f"\n$ {shlex.join(argv)}", flush=True)
    subprocess.run(argv, check=True)


def write_inputs(photos_per_concept: int, out: Path) -> str:
    """Photos and a manifest (one row per image) in the demo bucket; returns the manifest URI.

    A local copy (out/manifest.parquet with paths relative to it) outlives the demo's S3 server.
    """
    rows, local_rows = [], []
    for n, concept_id in enumerate(CONCEPTS):
        word = SAMPLE_CONCEPTS[concept_id].class_word
        for i, data in enumerate(concept_jpegs(concept_id, n=photos_per_concept, size=256, seed=n)):
            uri = f"s3://{BUCKET}/photos/{concept_id}/{i}.jpg"
            storage.write_bytes(uri, data)
            storage.write_bytes(str(out / "photos" / concept_id / f"{i}.jpg"), data)
            rows.append({"concept_id": concept_id, "image_uri": uri, "class_word": word})
            local_rows.append({**rows[-1], "image_uri": f"photos/{concept_id}/{i}.jpg"})
    for uri, table in ((f"s3://{BUCKET}/manifests/demo.parquet", rows), (str(out / "manifest.parquet"), local_rows)):
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(table), sink)
        storage.write_bytes(uri, sink.getvalue())
    return f"s3://{BUCKET}/manifests/demo.parquet"


def wait_for(url: str, seconds: float, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} before answering {url}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


def catversion_series(metrics_url: str, seconds: float, expect: tuple[str, ...]) -> list[str]:
    """The catversion_* series names on Ray's Prometheus endpoint, once `expect` are reported (or time is up)."""
    deadline = time.monotonic() + seconds
    names: set[str] = set()
    while time.monotonic() < deadline and not set(expect) <= names:
        try:
            text = requests.get(metrics_url, timeout=5).text
        except requests.RequestException:
            text = ""
        # Prometheus's own parser: sample names (with _bucket/_sum/_count/_total) as a scraper sees them.
        names = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples
                 if sample.name.startswith("ray_catversion_")}
        if not set(expect) <= names:
            time.sleep(1)
    return sorted(names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-output", help="local folder for copies of the results (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per concept (default: %(default)s)")
    parser.add_argument("--keep-running", action="store_true",
                        help="keep S3, Ray (dashboard, metrics) and the HTTP API up after the summary until Ctrl-C")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    started = time.perf_counter()
    catversion = str(Path(sys.executable).with_name("catversion"))
    # Ctrl-C or a kill ends the demo through the same cleanup path (also when started in the background,
    # where the shell would otherwise have SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    from moto.server import ThreadedMotoServer

    s3_port, serve_port, metrics_port = free_port(), free_port(), free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    server: subprocess.Popen | None = None
    ray_started = False
    try:
        s3.start()
        # A real deployment points these at its S3 (or leaves the endpoint unset for AWS); the demo server takes any key.
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}", AWS_ACCESS_KEY_ID="demo",
                          AWS_SECRET_ACCESS_KEY="demo", AWS_DEFAULT_REGION="us-east-1")
        import boto3
        import ray

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        print(f"S3 server: http://127.0.0.1:{s3_port} (bucket {BUCKET})", flush=True)
        context = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", _metrics_export_port=metrics_port,
                           _system_config={"metrics_report_interval_ms": 2000}, log_to_driver=False)
        ray_started = True
        address = context.address_info["gcs_address"]
        dashboard = f"http://{context.dashboard_url}" if context.dashboard_url else "(dashboard not available)"
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        print(f"Ray: {address}, dashboard {dashboard}, metrics {metrics_url}", flush=True)

        manifest = write_inputs(photos_per_concept=5, out=out)
        output = f"s3://{BUCKET}/run"
        run([catversion, "batch", "--manifest", manifest, "--output", output, "--model", "tiny", "--workers", "2",
             "--pack", "2", "--steps", str(args.steps), "--run-id", "demo", "--address", address,
             "--storage-path", str(out / "ray")])

        residuals = []
        for concept_id in CONCEPTS:
            uri, local = layout.residual_uri(output, concept_id), layout.residual_uri(str(out), concept_id)
            storage.write_bytes(local, storage.read_bytes(uri))
            residuals.append((uri, local))
        prompts = out / "prompts.txt"
        prompts.write_text("a {} on the beach\na {} in the snow\na red {}\n")
        run([catversion, "evaluate", "--residuals", str(out), "--manifest", str(out / "manifest.parquet"),
             "--prompts", str(prompts), "--out", str(out / "evaluation"), "--n-per-prompt", "2", "--steps", "25",
             "--model", "tiny", "--clip-model", "tiny", "--seg-model", "tiny", "--dino-model", "tiny", "--quiet"])

        serve_cmd = [catversion, "serve", "--residuals", output, "--model", "tiny", "--host", "127.0.0.1",
                     "--port", str(serve_port), "--address", address]
        print(f"\n$ {shlex.join(serve_cmd)} &", flush=True)
        server = subprocess.Popen(serve_cmd)
        base_url = f"http://127.0.0.1:{serve_port}"
        wait_for(f"{base_url}/healthz", 180, server)
        models = [m["id"] for m in requests.get(f"{base_url}/v1/models", timeout=30).json()["data"]]
        print(f"GET {base_url}/v1/models -> {models}", flush=True)

        images = []
        for concept_id in CONCEPTS:
            word = SAMPLE_CONCEPTS[concept_id].class_word
            body = {"model": concept_id, "prompt": f"a {word} on a beach", "n": 1, "size": "64x64",
                    "response_format": "b64_json", "num_inference_steps": 25, "seed": 0}
            print(f"POST {base_url}/v1/images/generations {body}", flush=True)
            response = requests.post(f"{base_url}/v1/images/generations", json=body, timeout=300)
            response.raise_for_status()
            image = out / "images" / f"{concept_id}.png"
            storage.write_bytes(str(image), base64.b64decode(response.json()["data"][0]["b64_json"]))
            images.append(image)
        results = out / layout.RESULTS_FILE
        storage.write_bytes(str(results), storage.read_bytes(layout.results_uri(output, "demo")))
        series = catversion_series(metrics_url, 30, expect=(CONCEPTS_DONE.prometheus_name, REQUESTS.prometheus_name,
                                                            BATCH_SIZE.prometheus_name + "_count"))


        print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
        print(f"  concepts trained: {len(residuals)} ({', '.join(CONCEPTS)}), manifest {manifest}")
        for uri, local in residuals:
            print(f"  residual:  {uri} -> {local}")
        for image in images:
            print(f"  image:     {image} (over HTTP from {base_url}/v1/images/generations)")
        print(f"  results:   {results}")
        print(f"  report:    {out / 'evaluation' / 'report.html'} (CLIP-T, CLIP-I, masked CLIP-I and DreamBooth's DINO; tiny scorers)")
        print(f"  dashboard: {dashboard} (while the demo runs)")
        shown = [n for n in series if not n.endswith(("_bucket", "_sum"))]
        print(f"  metrics:   {metrics_url}: {len(series)} catversion series, incl. {', '.join(shown)}")
        if args.keep_running:
            print(f"\nstill running: API {base_url}/v1 (docs at {base_url}/docs), dashboard {dashboard}; Ctrl-C stops",
                  flush=True)
            signal.pause()
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; shutting down", file=sys.stderr)
        return 130
    except (subprocess.CalledProcessError, RuntimeError, requests.RequestException) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)  # `catversion serve` shuts Serve down on SIGINT
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        if ray_started:
            import ray

            ray.shutdown()
        s3.stop()
        print("stopped: serve, Ray, S3 server", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
