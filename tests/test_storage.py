"""Storage by URI: the same calls for S3 (a real S3 server over HTTP), file:// URIs and plain paths."""

import pytest

from catversion import storage


def test_local_paths_and_file_uris_round_trip(tmp_path):
    path = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(path, b"one")
    assert storage.read_bytes(path) == b"one" and storage.exists(path)
    uri = f"file://{tmp_path}/a/b.bin"
    storage.write_bytes(uri, b"two")
    assert storage.read_bytes(path) == b"two"
    assert storage.list_uris(str(tmp_path), ".bin") == [path]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"], "no temporary files left behind"
    with pytest.raises(storage.NotFoundError, match="does not exist"):
        storage.read_bytes(str(tmp_path / "missing"))
    assert not storage.exists(str(tmp_path / "missing"))


def test_s3_round_trip_listing_and_clear_errors(s3_bucket):
    prefix = f"s3://{s3_bucket}/run"
    storage.write_bytes(storage.join(prefix, "residuals", "a.safetensors"), b"A")
    storage.write_bytes(storage.join(prefix, "residuals", "b.safetensors"), b"B")
    storage.write_bytes(storage.join(prefix, "notes.txt"), b"x")
    assert storage.read_bytes(f"{prefix}/residuals/a.safetensors") == b"A"
    assert storage.list_uris(f"{prefix}/residuals", ".safetensors") == [
        f"{prefix}/residuals/a.safetensors", f"{prefix}/residuals/b.safetensors"]
    assert storage.exists(f"{prefix}/notes.txt") and not storage.exists(f"{prefix}/nothing")
    with pytest.raises(storage.NotFoundError, match="does not exist"):
        storage.read_bytes(f"{prefix}/nothing")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        storage.read_bytes("s3://no-such-bucket-x/key")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        storage.write_bytes("s3://no-such-bucket-x/key", b"data")


def test_references_resolve_against_the_manifest_location():
    assert storage.resolve("photos/1.jpg", "s3://b/manifests/m.parquet") == "s3://b/manifests/photos/1.jpg"
    assert storage.resolve("photos/1.jpg", "/data/m.parquet") == "/data/photos/1.jpg"
    assert storage.resolve("s3://other/x.jpg", "/data/m.parquet") == "s3://other/x.jpg"
    with pytest.raises(storage.StorageError, match="unsupported URI scheme"):
        storage.read_bytes("https://example.invalid/x.jpg")
