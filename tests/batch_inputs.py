"""Inputs for the batch tests: a manifest in S3 with good and bad concepts, and a job config."""

import io

import boto3
import pyarrow as pa
import pyarrow.parquet as pq

from catversion.samples import concept_jpegs
from pipelines.batch import BatchConfig, run_batch

GOOD = {"red-teapot": "teapot", "blue-mug": "mug", "green-vase": "vase", "yellow-duck": "toy"}


def put(bucket, key, data):
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)


def versions(bucket, key):
    listed = boto3.client("s3").list_object_versions(Bucket=bucket, Prefix=key).get("Versions", [])
    return [v for v in listed if v["Key"] == key]


def write_manifest(bucket):
    """Four good concepts (S3 URIs, keys relative to the manifest, inline bytes) and two bad ones."""
    rows = []
    for n, (concept_id, word) in enumerate(GOOD.items()):
        for i, data in enumerate(concept_jpegs(concept_id, n=3, size=96, seed=n)):
            if concept_id == "yellow-duck":
                rows.append({"concept_id": concept_id, "class_word": word, "image_bytes": data})
                continue
            if concept_id == "green-vase":  # a key relative to the manifest's own location
                put(bucket, f"manifests/photos/{concept_id}/{i}.jpg", data)
                uri = f"photos/{concept_id}/{i}.jpg"
            else:
                key = f"photos/{concept_id}/{i}.jpg"
                put(bucket, key, data)
                uri = f"s3://{bucket}/{key}"
            rows.append({"concept_id": concept_id, "class_word": word, "image_uri": uri})
    put(bucket, "photos/broken/0.jpg", concept_jpegs("red-teapot", n=1, size=96)[0])
    put(bucket, "photos/broken/1.jpg", b"\xff\xd8\xff\xe0 truncated jpeg")
    rows += [
        {"concept_id": "broken", "class_word": "teapot", "image_uri": f"s3://{bucket}/photos/broken/0.jpg"},
        {"concept_id": "broken", "class_word": "teapot", "image_uri": f"s3://{bucket}/photos/broken/1.jpg"},
        {"concept_id": "missing", "class_word": "mug", "image_uri": f"s3://{bucket}/photos/nowhere/0.jpg"},
    ]
    schema = pa.schema([("concept_id", pa.string()), ("class_word", pa.string()), ("image_uri", pa.string()),
                        ("image_bytes", pa.binary())])
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    put(bucket, "manifests/concepts.parquet", sink.getvalue())
    return f"s3://{bucket}/manifests/concepts.parquet"


def config(bucket, manifest, output, tmp_path, **overrides):
    values = dict(manifest=manifest, output=f"s3://{bucket}/{output}", model="tiny", workers=2, pack=2, steps=3,
                  max_failures=2, storage_path=str(tmp_path / "ray-train"))
    values.update(overrides)
    return BatchConfig(**values)


def first_batch_run(tmp_path_factory):
    bucket = "batch-module"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    manifest = write_manifest(bucket)
    tmp_path = tmp_path_factory.mktemp("batch")
    summary = run_batch(config(bucket, manifest, "run1", tmp_path, run_id="first"), log=lambda _: None)
    return bucket, manifest, tmp_path, summary


SAMPLES = ("red-teapot", "blue-mug", "green-vase", "yellow-duck")


def small_manifest(bucket, n, prefix="small"):
    """``n`` good concepts of 2 small photos each; returns the manifest URI and the concept ids."""
    rows = []
    for k in range(n):
        concept_id = f"{prefix}-{k}"
        for i, data in enumerate(concept_jpegs(SAMPLES[k % 4], n=2, size=64, seed=100 + k)):
            put(bucket, f"{prefix}/photos/{concept_id}/{i}.jpg", data)
            rows.append({"concept_id": concept_id, "class_word": "object",
                         "image_uri": f"s3://{bucket}/{prefix}/photos/{concept_id}/{i}.jpg"})
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    put(bucket, f"{prefix}/manifest.parquet", sink.getvalue())
    return f"s3://{bucket}/{prefix}/manifest.parquet", [f"{prefix}-{k}" for k in range(n)]


def layers_manifest(bucket, prefix, layers: dict[str, str | None]):
    """One concept of 2 small photos per entry of ``layers`` (concept id -> its layers column value, None: empty);
    returns the manifest URI."""
    rows = []
    for k, (concept_id, value) in enumerate(layers.items()):
        for i, data in enumerate(concept_jpegs(SAMPLES[k % 4], n=2, size=64, seed=200 + k)):
            put(bucket, f"{prefix}/photos/{concept_id}/{i}.jpg", data)
            rows.append({"concept_id": concept_id, "class_word": "object", "layers": value,
                         "image_uri": f"s3://{bucket}/{prefix}/photos/{concept_id}/{i}.jpg"})
    schema = pa.schema([("concept_id", pa.string()), ("class_word", pa.string()), ("layers", pa.string()),
                        ("image_uri", pa.string())])
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    put(bucket, f"{prefix}/manifest.parquet", sink.getvalue())
    return f"s3://{bucket}/{prefix}/manifest.parquet"
