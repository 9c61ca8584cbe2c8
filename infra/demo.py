"""`make demo`: the main job end to end on embedded defaults.

Starts an S3 server on 127.0.0.1 (moto), puts synthetic photos of three objects and a parquet
manifest in it, trains every concept with `catversion batch` on a local Ray (built-in tiny model),
generates an image per concept from the residuals in S3 with `catversion generate`, copies the
results to demo-output/ and shuts everything down, on Ctrl-C too. Each command is printed as run.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from catversion import storage
from catversion.samples import SAMPLE_CONCEPTS, concept_jpegs

CONCEPTS = ("red-teapot", "blue-mug", "yellow-duck")
BUCKET = "catversion-demo"


def run(argv: list[str]) -> None:
    print(f"\n$ {shlex.join(argv)}", flush=True)
    subprocess.run(argv, check=True)


def start_s3() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def write_inputs(photos_per_concept: int) -> str:
    """Photos and a manifest (one row per image) in the demo bucket; returns the manifest URI."""
    rows = []
    for n, concept_id in enumerate(CONCEPTS):
        word = SAMPLE_CONCEPTS[concept_id].class_word
        for i, data in enumerate(concept_jpegs(concept_id, n=photos_per_concept, size=256, seed=n)):
            uri = f"s3://{BUCKET}/photos/{concept_id}/{i}.jpg"
            storage.write_bytes(uri, data)
            rows.append({"concept_id": concept_id, "image_uri": uri, "class_word": word})
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    manifest = f"s3://{BUCKET}/manifests/demo.parquet"
    storage.write_bytes(manifest, sink.getvalue())
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-output", help="local folder for copies of the results (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per concept (default: %(default)s)")
    args = parser.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    catversion = str(Path(sys.executable).with_name("catversion"))

    server, endpoint = start_s3()
    # A real deployment sets these to its S3 (or leaves the endpoint unset for AWS); the demo's server takes any key.
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="demo", AWS_SECRET_ACCESS_KEY="demo",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        print(f"S3 server: {endpoint} (bucket {BUCKET})")
        manifest = write_inputs(photos_per_concept=5)
        output = f"s3://{BUCKET}/run"
        run([catversion, "batch", "--manifest", manifest, "--output", output, "--model", "tiny", "--workers", "2",
             "--pack", "2", "--steps", str(args.steps), "--run-id", "demo", "--storage-path", str(out.resolve() / "ray")])

        images, residuals = [], []
        for concept_id in CONCEPTS:
            uri = f"{output}/residuals/{concept_id}.safetensors"
            local = out / "residuals" / f"{concept_id}.safetensors"
            storage.write_bytes(str(local), storage.read_bytes(uri))
            residuals.append((uri, local))
            image = out / "images" / f"{concept_id}.png"
            prompt = f"a {SAMPLE_CONCEPTS[concept_id].class_word} on a beach"
            run([catversion, "generate", "--residual", uri, "--prompt", prompt, "--out", str(image), "--steps", "25",
                 "--device", "cpu", "--quiet"])
            images.append(image)
        storage.write_bytes(str(out / "results.parquet"), storage.read_bytes(f"{output}/runs/demo/results.parquet"))
    except KeyboardInterrupt:
        print("\ninterrupted; shutting down", file=sys.stderr)
        return 130
    except subprocess.CalledProcessError as exc:
        print(f"\ndemo failed: {shlex.join(exc.cmd)} exited with {exc.returncode}", file=sys.stderr)
        return 1
    finally:
        server.stop()

    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    print(f"  manifest:  {manifest} ({len(CONCEPTS)} concepts, 5 synthetic photos each)")
    for uri, local in residuals:
        print(f"  residual:  {uri} -> {local}")
    for image in images:
        print(f"  image:     {image}")
    print(f"  results:   {out / 'results.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
