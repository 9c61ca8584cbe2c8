"""The server's residual cache against real stores: a local folder and moto's S3 server over HTTP.

Time is a fake clock (no sleeping for the TTL); an unreachable store is a TcpProxy taken down.
"""

import threading
import uuid
from collections import Counter

import pytest
import torch

from catversion import layout, storage
from catversion.residual import IncompatibleResidualError, Residual
from serve.cache import CacheEvents, ResidualCache
from serve.errors import (InvalidParameterError, RequestError, ServiceUnavailableError, UnknownConceptError,
                          UnusableResidualError)

TTL = 5.0
FAST = storage.RetryBudget(0.5, first_delay=0.05, max_delay=0.1)


class Events(CacheEvents):
    def __init__(self):
        self.counts = Counter()
        self.revalidations: list[str] = []
        self.sizes: list[int] = []

    def hit(self):
        self.counts["hit"] += 1

    def miss(self, seconds):
        assert seconds >= 0
        self.counts["miss"] += 1

    def eviction(self):
        self.counts["eviction"] += 1

    def revalidation(self, result):
        self.revalidations.append(result)

    def size(self, entries):
        self.sizes.append(entries)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds=TTL + 0.1):
        self.now += seconds


def make_residual(seed: int, hidden: int = 768) -> Residual:
    tensor = torch.randn(3, 2, 1, hidden, generator=torch.Generator().manual_seed(seed))
    return Residual(tensor, (9, 10, 11), meta={"class_word": f"thing{seed}"})


def fits(residual: Residual) -> None:
    """The base model's check: a hidden size of 768."""
    if residual.hidden_size != 768:
        raise IncompatibleResidualError(f"residual has hidden size {residual.hidden_size} but the text encoder has 768")


def hexsha(residual: Residual) -> str:
    return residual.sha256.split(":")[1]


def other_than(sha: str) -> str:
    """A pin that ``sha`` does not start with."""
    return "00000000" if not sha.startswith("00000000") else "ffffffff"


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    """One versioned bucket for this file."""
    import boto3

    name = f"serve-cache-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


@pytest.fixture(params=["folder", "s3"])
def prefix(request, tmp_path):
    if request.param == "folder":
        return str(tmp_path / "out")
    return f"s3://{request.getfixturevalue('bucket')}/{uuid.uuid4().hex[:8]}"


class Harness:
    """A cache over ``prefix`` with recorded events and a fake clock; every client error checked for leaks."""

    def __init__(self, prefix: str, secrets: list[str], **kwargs):
        self.prefix, self.secrets = prefix, secrets
        self.events, self.clock = Events(), Clock()
        kwargs.setdefault("capacity", 8)
        self.cache = ResidualCache(prefix, check=kwargs.pop("check", fits), ttl_s=TTL, budget=FAST,
                                   events=self.events, clock=self.clock, **kwargs)

    def put(self, concept: str, residual: Residual | bytes) -> Residual | bytes:
        data = residual if isinstance(residual, bytes) else residual.to_bytes()
        storage.write_bytes(layout.residual_uri(self.prefix, concept), data)
        return residual

    def remove(self, concept: str) -> None:
        storage.delete(layout.residual_uri(self.prefix, concept))

    def refused(self, model: str, error: type[RequestError], *, revalidate: bool = False) -> RequestError:
        with pytest.raises(error) as failure:
            (self.cache.revalidate if revalidate else self.cache.get)(model)
        message = failure.value.message
        for secret in self.secrets + ["s3://", "file://", "/residuals/", ".safetensors"]:
            assert secret not in message, f"client message leaks {secret!r}: {message}"
        return failure.value


@pytest.fixture
def harness(prefix, tmp_path, request):
    secrets = [str(tmp_path)] + ([request.getfixturevalue("bucket")] if prefix.startswith("s3://") else [])
    return lambda **kwargs: Harness(prefix, secrets, **kwargs)


def same(a: Residual, b: Residual) -> bool:
    return a.sha256 == b.sha256 and torch.equal(a.tensor, b.tensor)


# ---- freshness -------------------------------------------------------------------------------


def test_miss_then_hits_then_an_unchanged_revalidation_without_a_download(harness):
    h = harness()
    stored = h.put("dog", make_residual(1))
    first = h.cache.get("dog")
    assert same(first, stored) and len(h.cache) == 1
    assert h.events.counts == {"miss": 1} and h.events.sizes == [1]
    h.clock.advance(TTL - 0.1)
    assert h.cache.get("dog") is first and h.events.counts == {"miss": 1, "hit": 1}
    assert h.events.revalidations == [], "within the TTL storage is not asked"
    h.clock.advance()
    assert h.cache.get("dog") is first
    assert h.events.revalidations == ["unchanged"] and h.events.counts == {"miss": 1, "hit": 2}, "a stat, no download"
    assert h.cache.get("dog") is first and h.events.revalidations == ["unchanged"], "checked_at was refreshed"
    assert h.cache.revalidate("dog") is first and h.events.revalidations == ["unchanged"] * 2


def test_a_residual_replaced_in_place_is_served_after_the_ttl_or_at_once_by_revalidate(harness):
    h = harness()
    old = h.put("dog", make_residual(1))
    assert same(h.cache.get("dog"), old)
    new = h.put("dog", make_residual(2))
    assert same(h.cache.get("dog"), old), "within the TTL the cached copy is served"
    h.clock.advance()
    assert same(h.cache.get("dog"), new) and h.events.revalidations == ["changed"]
    newer = h.put("dog", make_residual(3))
    assert same(h.cache.revalidate("dog"), newer) and h.events.revalidations == ["changed", "changed"]
    assert h.events.counts["miss"] == 3 and len(h.cache) == 1


def test_a_residual_corrupted_in_place_is_refused_not_served_from_the_cache(harness):
    h = harness()
    good = h.put("dog", make_residual(1))
    assert same(h.cache.get("dog"), good)
    data = bytearray(good.to_bytes())
    data[-8:] = b"\x00\x00\x80\x3f" * 2  # two tensor values changed: the header's sha256 no longer matches
    h.put("dog", bytes(data))
    h.clock.advance()
    error = h.refused("dog", UnusableResidualError)
    assert error.status == 422 and "model 'dog' cannot be used: sha256 mismatch" in error.message, error.message
    assert h.events.revalidations == ["invalid"] and len(h.cache) == 0 and h.events.sizes[-1] == 0
    h.refused("dog", UnusableResidualError)  # still refused (loaded again: nothing cached)
    repaired = h.put("dog", make_residual(4))
    assert same(h.cache.get("dog"), repaired)


def test_an_incompatible_or_unreadable_residual_is_422_naming_the_model_not_the_path(harness):
    h = harness()
    h.put("wide", make_residual(1, hidden=1024))
    error = h.refused("wide", UnusableResidualError)
    assert error.message == "model 'wide' cannot be used: residual has hidden size 1024 but the text encoder has 768"
    h.put("junk", b"not a residual at all")
    error = h.refused("junk", UnusableResidualError)
    assert error.message.startswith("model 'junk' cannot be used: not a safetensors file"), error.message
    assert len(h.cache) == 0 and h.events.revalidations == []


def test_a_deleted_residual_is_404_and_dropped(harness):
    h = harness()
    h.put("dog", make_residual(1))
    h.cache.get("dog")
    h.remove("dog")
    assert h.cache.get("dog") is not None, "within the TTL"
    h.clock.advance()
    error = h.refused("dog", UnknownConceptError)
    assert error.status == 404 and error.message == "model 'dog' does not exist; GET /v1/models lists the available ones"
    assert h.events.revalidations == ["deleted"] and len(h.cache) == 0 and h.events.sizes == [1, 0]
    assert h.refused("never-there", UnknownConceptError).message.startswith("model 'never-there' does not exist")
    error = h.refused("../etc/passwd", UnknownConceptError)
    assert layout.CONCEPT_ID_RULE in error.message


# ---- an unreachable store ----------------------------------------------------------------------


def test_an_unreachable_store_serves_the_verified_copy_with_a_warning_else_503(bucket, proxy, tmp_path, caplog):
    h = Harness(f"s3://{bucket}/outage", [bucket, str(tmp_path)])
    stored = h.put("dog", make_residual(1))
    h.put("cat", make_residual(2))
    old = h.put("pinned", make_residual(3))
    h.put("pinned", make_residual(4))
    first = h.cache.get("dog")
    assert same(first, stored)
    pinned = h.cache.get(f"pinned@{hexsha(old)[:8]}")
    assert same(pinned, old)
    proxy.down()
    h.clock.advance()
    with caplog.at_level("WARNING", logger="catversion.serve"):
        assert h.cache.get("dog") is first
    assert proxy.refused > 0 and h.events.revalidations == ["unreachable"]
    warning = [r for r in caplog.records if r.name == "catversion.serve" and r.levelname == "WARNING"]
    assert len(warning) == 1 and "'dog'" in warning[0].getMessage() and "unreachable" in warning[0].getMessage()
    assert f"s3://{bucket}/outage/residuals/dog.safetensors" in warning[0].getMessage(), "the log names the URI"

    refused = proxy.refused
    assert h.cache.get("dog") is first and proxy.refused == refused, "tried again only after the next TTL"
    error = h.refused("cat", ServiceUnavailableError)
    assert error.status == 503 and "unreachable" in error.message and "retry" in error.message, error.message
    h.clock.advance()
    assert h.cache.get(f"pinned@{hexsha(old)[:8]}") is pinned, "a cached old version needs no storage"
    assert h.refused(f"cat@{other_than(hexsha(stored))}", ServiceUnavailableError).status == 503

    proxy.up()
    h.clock.advance()
    assert h.cache.get("dog") is first and h.events.revalidations[-1] == "unchanged"
    assert same(h.cache.get("cat"), make_residual(2))


# ---- pinned versions -------------------------------------------------------------------------


def test_a_pin_of_the_current_version_is_served_and_malformed_pins_are_400(harness):
    h = harness()
    current = h.put("dog", make_residual(1))
    full = hexsha(current)
    for pin in (full[:4], full[:12], full, f"sha256:{full[:8]}"):  # also as GET /v1/models/{id} shows it
        assert same(h.cache.get(f"dog@{pin}"), current)
    assert len(h.cache) == 1, "the current version needs no pinned entry"
    for model in ("dog@", "dog@abc", f"dog@{full.upper()[:8]}", f"dog@{full}0", "dog@xyz123", "dog@sha256:"):
        error = h.refused(model, InvalidParameterError)
        assert error.status == 400 and error.param == "model"
        assert "concept@<sha256 hex prefix, 4..64 chars>" in error.message, error.message
    pin = other_than(full)
    error = h.refused(f"dog@{pin}", UnknownConceptError)
    assert error.message == f"model 'dog' has no version whose sha256 starts with '{pin}' (current: {full[:12]})"


def test_older_versions_are_found_only_in_a_versioned_bucket(harness, prefix):
    h = harness()
    old = h.put("dog", make_residual(1))
    current = h.put("dog", make_residual(2))
    if prefix.startswith("s3://"):
        assert same(h.cache.get(f"dog@{hexsha(old)[:10]}"), old)
    else:  # a folder keeps only the current file
        error = h.refused(f"dog@{hexsha(old)[:10]}", UnknownConceptError)
        assert error.message.endswith(f"(current: {hexsha(current)[:12]})")


def test_a_pin_finds_an_old_version_once_and_survives_the_current_objects_deletion(bucket, tmp_path):
    h = Harness(f"s3://{bucket}/versions", [bucket, str(tmp_path)])
    v1 = h.put("dog", make_residual(1))
    h.put("dog", b"a corrupt version in between")
    v3 = h.put("dog", make_residual(3))
    assert same(h.cache.get("dog"), v3)
    misses = h.events.counts["miss"]
    pinned = h.cache.get(f"dog@{hexsha(v1)[:6]}")
    assert same(pinned, v1) and h.events.counts["miss"] == misses + 1 and len(h.cache) == 2
    assert h.cache.get(f"dog@{hexsha(v1)}") is pinned and h.cache.get(f"dog@{hexsha(v1)[:8]}") is pinned
    assert h.events.counts["miss"] == misses + 1, "a resolved prefix is not scanned again"

    h.clock.advance()
    h.remove("dog")  # a delete marker: the old versions stay
    assert h.cache.get(f"dog@{hexsha(v1)[:6]}") is pinned
    h.clock.advance()
    assert h.refused("dog", UnknownConceptError).status == 404, "the unpinned name is gone"
    error = h.refused(f"dog@{other_than(hexsha(v1))}", UnknownConceptError)
    assert error.message.endswith("(current: none)"), error.message
    fresh = Harness(h.prefix, h.secrets)  # nothing cached: the deleted current, then the versions
    assert same(fresh.cache.get(f"dog@{hexsha(v3)[:6]}"), v3) and same(fresh.cache.get(f"dog@{hexsha(v1)}"), v1)


def test_an_incompatible_old_version_is_422_when_pinned(bucket, tmp_path):
    h = Harness(f"s3://{bucket}/wide", [bucket, str(tmp_path)])
    wide = h.put("dog", make_residual(1, hidden=1024))
    h.put("dog", make_residual(2))
    error = h.refused(f"dog@{hexsha(wide)[:8]}", UnusableResidualError)
    assert error.message == "model 'dog' cannot be used: residual has hidden size 1024 but the text encoder has 768"


# ---- concurrency and capacity ----------------------------------------------------------------


def test_concurrent_misses_for_one_concept_do_one_load(harness):
    """16 requests for two concepts arrive together: each concept is loaded once, while the others wait for
    that load, and the two loads run side by side (neither waits for the other)."""
    threads = 16
    arrived, arrival = 0, threading.Condition()
    both_loading = threading.Barrier(2)

    def slow_check(residual):
        # Keep the load in flight until every request has reached the cache, so the others find it there...
        with arrival:
            assert arrival.wait_for(lambda: arrived == threads, timeout=30), \
                f"only {arrived} of {threads} requests reached the cache within 30 s"
        # ...and finish it only once the other concept's load is running too.
        try:
            both_loading.wait(timeout=30)
        except threading.BrokenBarrierError:
            raise AssertionError("the two concepts were not loading at the same time: one load waited for the other")
        fits(residual)

    h = harness(check=slow_check)
    stored = h.put("dog", make_residual(1))
    h.put("cat", make_residual(2))
    results, errors = [], []

    def request(model):
        nonlocal arrived
        with arrival:
            arrived += 1
            arrival.notify_all()
        try:
            results.append((model, h.cache.get(model)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=request, args=("dog" if i % 4 else "cat",)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors and len(results) == threads, errors
    assert h.events.counts == {"miss": 2, "hit": threads - 2}, "one load per concept, the others waited for it"
    dogs = {id(r) for model, r in results if model == "dog"}
    assert len(dogs) == 1 and same(next(r for m, r in results if m == "dog"), stored)


def test_least_recently_used_entries_are_evicted_at_capacity(harness):
    h = harness(capacity=2)
    for i, concept in enumerate(("a", "b", "c")):
        h.put(concept, make_residual(i))
    h.cache.get("a")
    h.cache.get("b")
    h.cache.get("a")  # now b is the least recently used
    h.cache.get("c")
    assert len(h.cache) == 2 and h.events.counts["eviction"] == 1 and h.events.sizes == [1, 2, 2]
    misses = h.events.counts["miss"]
    h.cache.get("a")
    h.cache.get("c")
    assert h.events.counts["miss"] == misses, "a and c stayed"
    h.cache.get("b")
    assert h.events.counts["miss"] == misses + 1 and h.events.counts["eviction"] == 2
    with pytest.raises(ValueError, match="capacity"):
        ResidualCache(h.prefix, 0, fits)
