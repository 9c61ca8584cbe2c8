"""Storage by URI: the same calls for S3 (a real S3 server over HTTP), file:// URIs and plain paths."""

import hashlib
import threading
import time

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


# ---- stamps, listings with metadata, conditional writes, retry budgets ------------------------


def s3_calls(client) -> list[str]:
    """The names of the S3 operations ``client`` sends from now on."""
    calls = []
    client.meta.events.register("before-call.s3", lambda model, **kwargs: calls.append(model.name))
    return calls


def test_one_client_per_thread_with_botocore_retries_turned_down(s3_endpoint):
    client = storage.s3_client()
    assert storage.s3_client() is client
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 2}
    assert client.meta.config.connect_timeout == 5 and client.meta.config.read_timeout == 30
    other = []
    thread = threading.Thread(target=lambda: other.append(storage.s3_client()))
    thread.start()
    thread.join()
    assert other[0] is not client
    storage.reset_clients()
    fresh = storage.s3_client()
    assert fresh is not client and storage.s3_client() is fresh


def test_s3_stamps_and_listings_with_metadata(s3_bucket):
    prefix = f"s3://{s3_bucket}/many"
    written = {}
    for i in range(30):
        uri = f"{prefix}/obj{i:02d}.bin"
        written[uri] = storage.write_bytes(uri, bytes([i]) * (i + 1))
    storage.write_bytes(f"{prefix}/notes.txt", b"not listed")
    calls = s3_calls(storage.s3_client())
    listed = storage.list_objects(prefix, ".bin")
    assert calls == ["ListObjectsV2"], "size and stamp come from the listing itself"
    assert [info.uri for info in listed] == sorted(written)
    assert storage.list_uris(prefix, ".bin") == sorted(written)
    for info in listed:
        data, read_info = storage.read_object(info.uri)
        assert info == written[info.uri] == storage.stat(info.uri) == read_info
        assert info.size == len(data) and info.stamp == hashlib.md5(data).hexdigest() and '"' not in info.stamp

    uri = sorted(written)[3]
    assert storage.write_bytes(uri, storage.read_bytes(uri)).stamp == written[uri].stamp, "same bytes, same ETag"
    changed = storage.write_bytes(uri, b"other bytes")
    assert changed.stamp != written[uri].stamp and storage.stat(uri) == changed == storage.ObjectInfo(uri, 11, changed.stamp)
    assert storage.stat(f"{prefix}/absent") is None and not storage.exists(f"{prefix}/absent")


def test_file_stamps_change_when_the_file_is_rewritten(tmp_path):
    uri = str(tmp_path / "d" / "x.bin")
    first = storage.write_bytes(uri, b"same size 1")
    assert first == storage.stat(uri) == storage.read_object(uri)[1]
    st = (tmp_path / "d" / "x.bin").stat()
    assert first == storage.ObjectInfo(uri, 11, f"{st.st_size}-{st.st_mtime_ns}")
    stamps = {first.stamp}
    for i in range(2, 6):  # same size, written quicker than a coarse file clock ticks
        info = storage.write_bytes(uri, f"same size {i}".encode())
        assert info == storage.stat(uri) and info.stamp not in stamps
        stamps.add(info.stamp)
    file_uri = f"file://{tmp_path}/d/x.bin"
    storage.write_bytes(f"file://{tmp_path}/d/sub/y.bin", b"y")
    listed = storage.list_objects(f"file://{tmp_path}", ".bin")
    assert [i.uri for i in listed] == [f"file://{tmp_path}/d/sub/y.bin", file_uri]
    assert listed[1] == storage.stat(file_uri) and listed[1].size == 11
    assert storage.stat(str(tmp_path / "d")) is None and storage.stat(str(tmp_path / "nothing")) is None
    assert [p.name for p in (tmp_path / "d").iterdir() if p.name.startswith(".")] == [], "no temporary files left"


def test_s3_conditional_create_and_replace(s3_bucket):
    uri = f"s3://{s3_bucket}/claims/a"
    won = storage.write_bytes(uri, b"first writer", if_absent=True)
    # (moto does not serialize concurrent conditional PUTs, so the two writers take turns here.)
    with pytest.raises(storage.AlreadyExistsError, match=f"{uri}.*already exists"):
        storage.write_bytes(uri, b"second writer", if_absent=True)
    assert storage.read_object(uri) == (b"first writer", won)

    replaced = storage.write_bytes(uri, b"update", if_match=won.stamp)
    assert storage.read_object(uri) == (b"update", replaced)
    with pytest.raises(storage.ConditionFailedError, match=uri):
        storage.write_bytes(uri, b"lost update", if_match=won.stamp)
    with pytest.raises(storage.ConditionFailedError, match=uri):
        storage.write_bytes(f"s3://{s3_bucket}/claims/absent", b"x", if_match=won.stamp)
    assert storage.read_bytes(uri) == b"update" and not storage.exists(f"s3://{s3_bucket}/claims/absent")


def test_file_conditional_create_and_replace(tmp_path):
    uri = str(tmp_path / "claims" / "a")
    barrier = threading.Barrier(8)
    outcomes = []

    def writer(n):
        barrier.wait()
        try:
            outcomes.append((n, storage.write_bytes(uri, f"writer {n}".encode(), if_absent=True)))
        except storage.AlreadyExistsError:
            outcomes.append((n, None))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [(n, info) for n, info in outcomes if info is not None]
    assert len(outcomes) == 8 and len(winners) == 1, outcomes
    n, won = winners[0]
    assert storage.read_object(uri) == (f"writer {n}".encode(), won)
    assert sorted(p.name for p in (tmp_path / "claims").iterdir()) == ["a"], "temporary files removed"

    replaced = storage.write_bytes(uri, b"update", if_match=won.stamp)
    with pytest.raises(storage.ConditionFailedError, match="changed since"):
        storage.write_bytes(uri, b"lost update", if_match=won.stamp)
    with pytest.raises(storage.ConditionFailedError):
        storage.write_bytes(str(tmp_path / "claims" / "absent"), b"x", if_match=won.stamp)
    assert storage.read_object(uri) == (b"update", replaced)
    assert sorted(p.name for p in (tmp_path / "claims").iterdir()) == ["a"]


class LosesFirstAnswer:
    """A client whose first PutObject reaches S3 but whose answer is lost (the connection drops)."""

    def __init__(self, client):
        self.client, self.lost = client, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def put_object(self, **kwargs):
        from botocore.exceptions import ConnectionClosedError

        response = self.client.put_object(**kwargs)
        if not self.lost:
            self.lost += 1
            raise ConnectionClosedError(endpoint_url="http://lost.invalid")
        return response


def test_a_retried_conditional_write_recognises_its_own_first_attempt(s3_bucket, monkeypatch):
    client = LosesFirstAnswer(storage.s3_client())
    monkeypatch.setattr(storage, "s3_client", lambda: client)
    fast = storage.RetryBudget(10, first_delay=0.01)
    uri = f"s3://{s3_bucket}/claims/retried"
    info = storage.write_bytes(uri, b"mine", if_absent=True, budget=fast)
    assert client.lost == 1 and storage.read_object(uri) == (b"mine", info)
    versions = client.list_object_versions(Bucket=s3_bucket, Prefix="claims/retried")["Versions"]
    assert len(versions) == 1, "written once"

    client.lost = 0
    replaced = storage.write_bytes(uri, b"mine, updated", if_match=info.stamp, budget=fast)
    assert client.lost == 1 and storage.read_object(uri) == (b"mine, updated", replaced)

    client.lost = 0
    other = f"s3://{s3_bucket}/claims/other"
    storage.write_bytes(other, b"theirs")
    with pytest.raises(storage.AlreadyExistsError):  # a retry that meets someone else's object
        storage.write_bytes(other, b"mine", if_absent=True, budget=fast)


def test_transient_s3_errors_are_retried_and_permanent_ones_are_not(s3_bucket, monkeypatch):
    from botocore.exceptions import ClientError

    uri = f"s3://{s3_bucket}/flaky"
    storage.write_bytes(uri, b"data")
    real = storage.s3_client()
    failures, limit = [], [3]

    class Throttled:
        def __getattr__(self, name):
            return getattr(real, name)

        def get_object(self, **kwargs):
            if len(failures) < limit[0]:
                failures.append(kwargs)
                raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                                   "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
            return real.get_object(**kwargs)

    monkeypatch.setattr(storage, "s3_client", Throttled)
    assert storage.read_bytes(uri, budget=storage.RetryBudget(10, first_delay=0.01)) == b"data"
    assert len(failures) == 3
    limit[0] = 10**9  # throttled for good
    with pytest.raises(storage.StorageUnavailableError, match=f"cannot read {uri}: .*SlowDown.*retrying for 0.1 s"):
        storage.read_bytes(uri, budget=storage.RetryBudget(0.1, first_delay=0.05))

    monkeypatch.undo()
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        storage.read_bytes("s3://no-such-bucket-x/key", budget=storage.LONG_BUDGET)
    with pytest.raises(storage.NotFoundError):
        storage.read_bytes(f"s3://{s3_bucket}/absent", budget=storage.LONG_BUDGET)
    assert time.monotonic() - started < 10, "permanent errors are not retried"


def _during_outage(proxy, seconds, call):
    """``call()`` started with the proxy down; the proxy comes back up after ``seconds``."""
    refused = proxy.refused
    proxy.down()
    timer = threading.Timer(seconds, proxy.up)
    timer.start()
    try:
        result = call()
    finally:
        timer.cancel()
        timer.join()
        proxy.up()
    assert proxy.refused > refused, "the call met the outage"
    return result


def test_an_outage_shorter_than_the_budget_is_ridden_out(s3_bucket, proxy):
    uri = f"s3://{s3_bucket}/outage/a.bin"
    storage.write_bytes(uri, b"before")
    budget = storage.RetryBudget(20)
    assert _during_outage(proxy, 2.0, lambda: storage.read_bytes(uri, budget=budget)) == b"before"
    info = _during_outage(proxy, 2.0, lambda: storage.write_bytes(uri, b"after", budget=budget))
    assert storage.read_object(uri) == (b"after", info)
    created = _during_outage(proxy, 2.0, lambda: storage.write_bytes(f"{uri}.new", b"n", if_absent=True, budget=budget))
    assert storage.stat(f"{uri}.new") == created


def test_an_outage_longer_than_the_budget_names_the_uri_and_the_cause(s3_bucket, proxy):
    uri = f"s3://{s3_bucket}/outage/b.bin"
    storage.write_bytes(uri, b"data")
    proxy.down()
    for action, call in (("read", lambda: storage.read_bytes(uri, budget=storage.RetryBudget(1))),
                         ("write", lambda: storage.write_bytes(uri, b"x", budget=storage.RetryBudget(1))),
                         ("list", lambda: storage.list_objects(f"s3://{s3_bucket}/outage", budget=storage.RetryBudget(1)))):
        started = time.monotonic()
        with pytest.raises(storage.StorageUnavailableError) as failure:
            call()
        assert time.monotonic() - started < 20
        message = str(failure.value)
        assert f"cannot {action} s3://{s3_bucket}/outage" in message and "unreachable" in message, message
        assert "retrying for 1 s" in message and isinstance(failure.value, storage.StorageError)
    proxy.up()
    assert storage.read_bytes(uri) == b"data"


def test_delete_is_idempotent_and_can_be_conditional(s3_bucket, tmp_path):
    for prefix in (f"s3://{s3_bucket}/del", str(tmp_path / "del"), f"file://{tmp_path}/del2"):
        uri = storage.join(prefix, "x")
        first = storage.write_bytes(uri, b"one")
        storage.delete(uri)
        storage.delete(uri)  # absent: fine
        assert not storage.exists(uri) and storage.stat(uri) is None
        first = storage.write_bytes(uri, b"one")
        second = storage.write_bytes(uri, b"two!")
        with pytest.raises(storage.ConditionFailedError, match="changed since"):
            storage.delete(uri, if_match=first.stamp)
        assert storage.read_bytes(uri) == b"two!"
        storage.delete(uri, if_match=second.stamp)
        assert not storage.exists(uri)
        storage.delete(uri, if_match=second.stamp)  # gone already: fine


def test_s3_versions_are_listed_newest_first_and_read_by_id(s3_bucket, tmp_path):
    import boto3

    uri = f"s3://{s3_bucket}/versions/x.bin"
    written = [storage.write_bytes(uri, f"version {i}".encode()) for i in range(3)]
    storage.write_bytes(f"{uri}.other", b"another key under the same prefix")
    versions = storage.list_versions(uri)
    assert [v.stamp for v in versions] == [w.stamp for w in reversed(written)], "newest first, this key only"
    assert [v.is_latest for v in versions] == [True, False, False] and {v.size for v in versions} == {9}
    assert len({v.version_id for v in versions}) == 3 and all(v.last_modified for v in versions)
    for i, version in zip((2, 1, 0), versions):
        assert storage.read_object(uri, version_id=version.version_id) == (f"version {i}".encode(), written[i])
        assert storage.read_bytes(uri, version_id=version.version_id) == f"version {i}".encode()
    storage.delete(uri)
    after = storage.list_versions(uri)
    assert [v.version_id for v in after] == [v.version_id for v in versions], "delete markers are left out"
    assert not any(v.is_latest for v in after) and storage.read_bytes(uri, version_id=after[0].version_id) == b"version 2"
    with pytest.raises(storage.NotFoundError, match="has no version"):
        storage.read_object(uri, version_id=versions[0].version_id[::-1])
    assert storage.list_versions(f"s3://{s3_bucket}/versions/absent") == []

    plain = f"plain-{s3_bucket}"
    boto3.client("s3").create_bucket(Bucket=plain)  # never versioned: only the current object is kept
    storage.write_bytes(f"s3://{plain}/x", b"one")
    current = storage.write_bytes(f"s3://{plain}/x", b"two")
    assert [(v.version_id, v.stamp, v.is_latest) for v in storage.list_versions(f"s3://{plain}/x")] == [
        ("null", current.stamp, True)]

    path = str(tmp_path / "x.bin")
    storage.write_bytes(path, b"file")
    assert storage.list_versions(path) == [] and storage.list_versions(f"file://{path}") == []
    with pytest.raises(ValueError, match="only S3 objects have versions"):
        storage.read_object(path, version_id="v1")


def test_listing_versions_rides_out_a_short_outage_and_names_the_uri_after_a_long_one(s3_bucket, proxy):
    uri = f"s3://{s3_bucket}/outage/versions.bin"
    storage.write_bytes(uri, b"one")
    storage.write_bytes(uri, b"two")
    versions = _during_outage(proxy, 1.0, lambda: storage.list_versions(uri, budget=storage.RetryBudget(20)))
    assert len(versions) == 2
    proxy.down()
    with pytest.raises(storage.StorageUnavailableError, match=f"cannot list {uri}: .*unreachable"):
        storage.list_versions(uri, budget=storage.RetryBudget(0.5))
    with pytest.raises(storage.StorageUnavailableError, match=f"cannot read {uri}: .*unreachable"):
        storage.read_object(uri, version_id=versions[1].version_id, budget=storage.RetryBudget(0.5))
    proxy.up()
    assert storage.read_bytes(uri, version_id=versions[1].version_id) == b"one"


def test_s3_timestamps_read_fast_are_the_timestamps_botocore_reads():
    """Listings parse each object's LastModified with the fast ISO reader; every form S3 sends (ISO 8601 in
    XML bodies, RFC 1123 in headers, epoch seconds) gives botocore's own (timezone-aware) result."""
    from botocore.utils import parse_timestamp

    for text in ("2026-12-03T18:15:32.000Z", "2026-12-03T18:15:32Z", "2026-12-03T18:15:32.123456+02:00",
                 "Thu, 03 Dec 2026 18:15:32 GMT", "1733250932"):
        fast = storage._s3_timestamp(text)
        assert fast == parse_timestamp(text) and fast.utcoffset() is not None, text


# ---- local file errors, files that are not files, and a byte cap -----------------------------


def test_a_local_file_error_names_the_path_the_cause_and_the_fix(tmp_path):
    """Every OSError of a local file is a StorageError (a batch run then fails one concept, not a worker)."""
    (tmp_path / "file").write_bytes(b"x")
    through_a_file = str(tmp_path / "file" / "out" / "r.bin")
    with pytest.raises(storage.StorageError, match=r"cannot write .*/file/out/r\.bin: Not a directory \(ENOTDIR\); "
                                                    r"a part of the path is a file, not a folder"):
        storage.write_bytes(through_a_file, b"data")
    with pytest.raises(storage.NotFoundError):
        storage.read_bytes(through_a_file)
    assert storage.stat(through_a_file) is None and not storage.exists(through_a_file)
    storage.delete(through_a_file)  # absent either way
    with pytest.raises(storage.NotAFileError, match="is a directory, not a regular file"):
        storage.read_bytes(str(tmp_path))


def test_a_read_only_or_full_file_system_is_a_storage_error_and_leaves_no_temporary_file(tmp_path):
    from mounts import remount_read_only, tmpfs

    with tmpfs(tmp_path / "ro", "ro,size=64k") as read_only:
        with pytest.raises(storage.StorageError, match=r"Read-only file system \(EROFS\); the file system is read-only"):
            storage.write_bytes(str(read_only / "out" / "x.bin"), b"x")
    with tmpfs(tmp_path / "tiny", "size=64k") as tiny:
        storage.write_bytes(str(tiny / "small.bin"), b"x" * 1000)
        with pytest.raises(storage.StorageError, match=r"big\.bin: No space left on device \(ENOSPC\); the device is full"):
            storage.write_bytes(str(tiny / "big.bin"), b"x" * 200_000)
        assert [p.name for p in tiny.iterdir()] == ["small.bin"], "no temporary file left behind"
        remount_read_only(tiny)
        with pytest.raises(storage.StorageError, match=r"cannot delete .*small\.bin: Read-only file system \(EROFS\)"):
            storage.delete(str(tiny / "small.bin"))
        assert storage.read_bytes(str(tiny / "small.bin")) == b"x" * 1000  # reading still works


def test_only_regular_files_are_read_and_a_fifo_never_blocks(tmp_path):
    import os

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    outcome = {}

    def read() -> None:
        try:
            outcome["data"] = storage.read_bytes(str(fifo))
        except storage.StorageError as exc:
            outcome["error"] = exc

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)  # opening a FIFO blocks until a writer comes: the refusal must come from a stat, before
    if reader.is_alive():
        open(fifo, "wb").close()  # let the blocked reader go, so the failure is reported, not hung
        reader.join(10)
        pytest.fail("reading a FIFO blocked")
    assert isinstance(outcome.get("error"), storage.NotAFileError), outcome
    assert "is a FIFO (named pipe), not a regular file" in str(outcome["error"])
    with pytest.raises(storage.NotAFileError, match="/dev/null is a character device, not a regular file"):
        storage.read_bytes("/dev/null")
    assert storage.stat(str(fifo)) is None and storage.list_uris(str(tmp_path)) == []


def test_a_byte_cap_refuses_a_larger_object_from_its_size_before_reading_it(tmp_path, s3_bucket):
    sparse = tmp_path / "huge.jpg"
    with open(sparse, "wb") as handle:
        handle.truncate(3 * 1024**3)  # 3 GiB that use no disk: reading them would take 3 GiB of memory
    with pytest.raises(storage.TooLargeError, match="huge.jpg is 3,221,225,472 bytes, over the limit of 1,048,576"):
        storage.read_object(str(sparse), max_bytes=1024**2)
    uri = f"s3://{s3_bucket}/big.bin"
    storage.write_bytes(uri, b"x" * (2 * 1024**2))
    with pytest.raises(storage.TooLargeError, match="big.bin is 2,097,152 bytes, over the limit of 1,048,576"):
        storage.read_object(uri, max_bytes=1024**2)
    data, info = storage.read_object(uri, max_bytes=2 * 1024**2)  # at the cap: read whole
    assert len(data) == info.size == 2 * 1024**2


def test_an_immutable_folder_is_a_storage_error_naming_the_likely_lock(tmp_path):
    """EPERM (chattr +i, which stops root too): the cause and the likely lock are named."""
    import subprocess

    locked = tmp_path / "locked"
    locked.mkdir()
    done = subprocess.run(["chattr", "+i", str(locked)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make a folder immutable here ({done.stderr.strip()}): needs chattr, "
                    "CAP_LINUX_IMMUTABLE and a file system that supports it")
    try:
        with pytest.raises(storage.StorageError, match=r"Operation not permitted \(EPERM\); the file or its folder may "
                                                        r"be immutable or locked"):
            storage.write_bytes(str(locked / "r.bin"), b"data")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
