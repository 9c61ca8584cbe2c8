"""The server's residual cache and models listing against real stores: a local folder and moto's S3
server over HTTP.

Time is a fake clock (no sleeping for the TTL) and background checks run when the test says so,
except in the tests that measure what a request waits for; an unreachable store is a TcpProxy taken
down (connections refused) or black-holed (connections accepted, never answered).
"""

import asyncio
import threading
import time
import uuid
from collections import Counter

import pytest
import torch

from catversion import layout, storage
from catversion.residual import IncompatibleResidualError, Residual
from polling import wait_until
from serve.cache import CacheEvents, ListingUnavailableError, ModelListing, ResidualCache
from serve.errors import (InvalidParameterError, RequestError, ServiceUnavailableError, UnknownConceptError,
                          UnusableResidualError)

TTL = 5.0
DEADLINE = 1.0
FAST = storage.deadline(DEADLINE)


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


class Background:
    """The cache's background checks, held until the test runs them."""

    def __init__(self):
        self.tasks = []

    def __call__(self, task):
        self.tasks.append(task)

    def run(self) -> int:
        """Run the checks queued so far; how many there were."""
        tasks, self.tasks = self.tasks, []
        for task in tasks:
            task()
        return len(tasks)


class Harness:
    """A cache over ``prefix`` with recorded events, a fake clock and held background checks; every client
    error checked for leaks."""

    def __init__(self, prefix: str, secrets: list[str], **kwargs):
        self.prefix, self.secrets = prefix, secrets
        self.events, self.clock, self.background = Events(), Clock(), Background()
        kwargs.setdefault("capacity", 8)
        self.cache = ResidualCache(prefix, check=kwargs.pop("check", fits), ttl_s=TTL, budget=FAST,
                                   events=self.events, clock=self.clock, background=self.background, **kwargs)

    def checks(self) -> int:
        return self.background.run()

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
    assert h.cache.get("dog") is first and h.events.revalidations == [], "served at once, checked in the background"
    assert h.cache.get("dog") is first and h.checks() == 1, "one check however many requests find it due"
    assert h.events.revalidations == ["unchanged"] and h.events.counts == {"miss": 1, "hit": 3}, "a stat, no download"
    assert h.cache.get("dog") is first and h.checks() == 0, "checked_at was refreshed"
    assert h.cache.revalidate("dog") is first and h.events.revalidations == ["unchanged"] * 2


def test_a_residual_replaced_in_place_is_served_after_the_ttl_or_at_once_by_revalidate(harness):
    h = harness()
    old = h.put("dog", make_residual(1))
    assert same(h.cache.get("dog"), old)
    new = h.put("dog", make_residual(2))
    assert same(h.cache.get("dog"), old), "within the TTL the cached copy is served"
    h.clock.advance()
    assert same(h.cache.get("dog"), old), "after it, too, while the check runs in the background"
    assert h.checks() == 1 and h.events.revalidations == ["changed"]
    assert same(h.cache.get("dog"), new), "the requests after the check get the new residual"
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
    assert same(h.cache.get("dog"), good) and h.checks() == 1, "the verified copy, until the check finds it corrupt"
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
    assert h.cache.get("dog") is not None and h.checks() == 1, "until the check finds it gone"
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
        assert h.cache.get("dog") is first and proxy.refused == 0, "served without asking the store"
        assert h.checks() == 1
    assert proxy.refused > 0 and h.events.revalidations == ["unreachable"]
    warning = [r for r in caplog.records if r.name == "catversion.serve" and r.levelname == "WARNING"]
    assert len(warning) == 1 and "'dog'" in warning[0].getMessage() and "unreachable" in warning[0].getMessage()
    assert f"s3://{bucket}/outage/residuals/dog.safetensors" in warning[0].getMessage(), "the log names the URI"

    refused = proxy.refused
    assert h.cache.get("dog") is first and h.checks() == 0 and proxy.refused == refused, \
        "tried again only after the next TTL"
    error = h.refused("cat", ServiceUnavailableError)
    assert error.status == 503 and "unreachable" in error.message and "retry" in error.message, error.message
    h.clock.advance()
    assert h.cache.get(f"pinned@{hexsha(old)[:8]}") is pinned, "a cached old version needs no storage"
    assert h.refused(f"cat@{other_than(hexsha(stored))}", ServiceUnavailableError).status == 503

    proxy.up()
    h.clock.advance()
    assert h.cache.get("dog") is first and h.checks() == 2, "dog's check, and the current 'pinned' one's, due since"
    assert h.events.revalidations[-1] == "unchanged"
    assert same(h.cache.get("cat"), make_residual(2))


def test_past_the_maximum_staleness_a_copy_the_store_cannot_confirm_is_503_until_it_can(bucket, proxy, tmp_path,
                                                                                          caplog):
    h = Harness(f"s3://{bucket}/stale", [bucket, str(tmp_path)], max_stale_s=60.0)
    first = h.cache.get("dog") if h.put("dog", make_residual(1)) else None
    proxy.down()
    h.clock.advance(59.0)  # 59 s since storage last confirmed it: still served, and checked in the background
    assert h.cache.get("dog") is first and h.checks() == 1 and h.events.revalidations == ["unreachable"]
    h.clock.advance(1.0)  # 60 s: the store has not confirmed it for max_stale_s
    with caplog.at_level("WARNING", logger="catversion.serve"):
        error = h.refused("dog", ServiceUnavailableError)
    assert error.status == 503 and h.background.tasks == [], "the request checked the store itself, then refused"
    assert any("past residual_max_stale_s (60 s)" in r.getMessage() and "'dog'" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert len(h.cache) == 1, "kept: it is served again the moment the store confirms it"
    misses = h.events.counts["miss"]
    proxy.up()
    assert h.cache.get("dog") is first and h.events.counts["miss"] == misses, "confirmed by a stat, not downloaded"
    assert h.events.revalidations[-1] == "unchanged" and h.background.tasks == []
    with pytest.raises(ValueError, match="max_stale_s"):
        ResidualCache(h.prefix, 1, fits, ttl_s=10.0, max_stale_s=5.0)


def test_a_black_holed_store_costs_cached_residuals_nothing_and_cold_ones_one_deadline(bucket, proxy):
    """Real threads and a real clock: what a request waits for while the store accepts connections and
    never answers them (botocore alone would wait 30 s per attempt). The deadline is long enough that a
    request which waited on the store cannot pass for one that did not, on a busy machine too."""
    prefix, deadline_s = f"s3://{bucket}/black-hole", 3.0
    events = Events()
    cache = ResidualCache(prefix, 8, fits, ttl_s=0.2, budget=storage.deadline(deadline_s), events=events)
    for concept, seed in (("warm", 1), ("cold", 2), ("later", 3)):
        storage.write_bytes(layout.residual_uri(prefix, concept), make_residual(seed).to_bytes())
    warm = cache.get("warm")
    proxy.black_hole()
    started = time.monotonic()
    slowest = 0.0
    while not events.revalidations.count("unreachable") >= 2:  # two background checks ran into the black hole
        request = time.monotonic()
        assert cache.get("warm") is warm
        slowest = max(slowest, time.monotonic() - request)
        assert time.monotonic() - started < 10 * deadline_s, "the background checks never ended"
    assert proxy.swallowed > 0 and slowest < deadline_s / 3, f"a cached residual waited {slowest:.2f} s for the store"

    request = time.monotonic()
    with pytest.raises(ServiceUnavailableError):
        cache.get("cold")
    waited = time.monotonic() - request
    assert deadline_s * 0.9 <= waited < deadline_s + 1.5, f"a cold load waited {waited:.2f} s, not its deadline"
    swallowed = proxy.swallowed
    request = time.monotonic()
    with pytest.raises(ServiceUnavailableError):
        cache.get("later")  # within a deadline of the failed load: 503 at once, the store is not asked
    assert time.monotonic() - request < deadline_s / 3 and proxy.swallowed == swallowed

    proxy.up()
    wait_until(lambda: cache.get("warm") is warm and events.revalidations[-1] == "unchanged", 5 * deadline_s,
               "a background check that reaches the store again")
    assert same(cache.get("cold"), make_residual(2)) and same(cache.get("later"), make_residual(3))


# ---- the models listing ------------------------------------------------------------------------


def test_the_models_listing_is_served_from_the_last_good_one_and_is_503_only_before_the_first(bucket, proxy,
                                                                                              caplog):
    prefix = f"s3://{bucket}/listing"
    clock = Clock()
    listing = ModelListing(lambda: layout.list_concepts(prefix, budget=storage.deadline(DEADLINE)),
                           ttl_s=TTL, wait_s=DEADLINE / 2, clock=clock)
    storage.write_bytes(layout.residual_uri(prefix, "dog"), make_residual(1).to_bytes())

    def logged(text: str) -> bool:
        return any(text in r.getMessage() for r in caplog.records if r.name == "catversion.serve")

    async def timed() -> tuple[float, list[str] | ListingUnavailableError]:
        started = time.monotonic()
        try:
            result = await listing.get()
        except ListingUnavailableError as exc:
            result = exc
        return time.monotonic() - started, result

    async def until(condition, what: str) -> None:
        """Poll ``condition()`` (a bool, or a coroutine giving one) until it holds."""
        deadline = time.monotonic() + 10 * DEADLINE
        while True:
            value = condition()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return
            assert time.monotonic() < deadline, f"{what} did not happen within {10 * DEADLINE:g} s"
            await asyncio.sleep(0.05)

    async def listed(names: list[str]) -> bool:
        return (await timed())[1] == names

    async def scenario():
        proxy.black_hole()
        waited, error = await timed()  # never listed: waits wait_s for the refresh, then 503
        assert isinstance(error, ListingUnavailableError) and error.status == 503 and error.param is None, error
        assert DEADLINE / 2 * 0.9 <= waited < DEADLINE / 2 + 1.0, waited
        assert "storage" not in error.message and bucket not in error.message
        await until(lambda: logged("never listed yet"), "the failed refresh's warning")
        assert isinstance((await timed())[1], ListingUnavailableError), "still never listed"
        proxy.up()
        await until(lambda: listed(["dog"]), "the listing once the store answers")

        storage.write_bytes(layout.residual_uri(prefix, "cat"), make_residual(2).to_bytes())
        proxy.black_hole()
        clock.advance()
        for _ in range(3):  # past the TTL, the store silent: the last listing at once, every time
            waited, names = await timed()
            assert names == ["dog"] and waited < DEADLINE / 2, (waited, names)
        await until(lambda: logged("serving the listing from 5 s ago"), "the failed refresh's warning")
        proxy.up()
        await until(lambda: listed(["cat", "dog"]), "the new listing once the store answers")

    with caplog.at_level("WARNING", logger="catversion.serve"):
        asyncio.run(scenario())


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
    assert h.checks() == 1, "the current residual's check, due since the TTL passed"
    assert h.cache.get(f"dog@{hexsha(v1)[:6]}") is pinned, "the current residual is gone, its old version is not"
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
