"""Residuals read from the residual prefix, verified, and kept in an LRU cache that stays fresh
without making a request wait on storage for what it holds; and the cached listing of models.

A model is ``<concept_id>`` (the current residual) or ``<concept_id>@<sha256 hex prefix>`` (one
version of it). A cached current residual is served from memory at once (stale-while-revalidate):
once ``ttl_s`` has passed since it was last checked, the request that finds it so is served the
cached copy and starts one background check, a HEAD (``storage.stat``) that tells whether it
changed; a changed one is reloaded and verified, a deleted one dropped (then 404), a corrupted one
dropped (then 422), each for the requests that come after the check. While the store cannot be
reached the verified copy keeps serving, with a warning logged at each failed check, for at most
``max_stale_s`` since storage last confirmed it; past that the copy is refused with 503 until the
store answers (a residual deleted or replaced during a long outage is not served for ever), though
it stays cached and is served again the moment a check confirms it. A model with nothing cached is
loaded by the request (one load per concept however many requests wait for it), within the
storage ``budget`` (serving passes a ``storage.deadline``): past it, 503; and for one deadline after
that, other cold loads are 503 at once instead of each holding a thread for a deadline of its own.
Pinned versions are content-addressed and never rechecked; older versions are found only in a
versioned S3 bucket.

Messages for clients never name storage paths: those go to the ``catversion.serve`` log.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from catversion import layout, storage
from catversion.residual import IncompatibleResidualError, Residual, ResidualFormatError

from .errors import (InvalidParameterError, RequestError, ServiceUnavailableError, UnknownConceptError,
                     UnusableResidualError)

log = logging.getLogger("catversion.serve")

PIN_RE = re.compile(r"[0-9a-f]{4,64}\Z")
PIN_FORM = "concept@<sha256 hex prefix, 4..64 chars>"  # "sha256:" before the hex is accepted too
MAX_VERSIONS_SCANNED = 50
REVALIDATION_THREADS = 8  # background checks running at once (each bounded by the storage budget)
# A listing reads 1,000 names per request: a background refresh may take this long (100,000 residuals
# from a slow store); requests never wait for it beyond the storage deadline.
LISTING_DEADLINE_S = 30.0


class CacheEvents:
    """What the cache reports (for metrics); each method does nothing here. Some are called under the cache's lock:
    be quick, and do not call the cache."""

    def hit(self) -> None:
        """An entry served from memory (also after waiting for another request's load)."""

    def miss(self, seconds: float) -> None:
        """An entry read from storage (the current object's GET, or a scan of old versions), and how long it took."""

    def eviction(self) -> None:
        """The least recently used entry was dropped to stay within capacity."""

    def revalidation(self, result: str) -> None:
        """A cached residual checked against storage: unchanged, changed, deleted, invalid or unreachable
        (served stale while it is younger than max_stale_s, refused past it)."""

    def size(self, entries: int) -> None:
        """The number of entries, after it may have changed."""


@dataclass
class _Entry:
    residual: Residual
    stamp: str | None = None  # the object's stamp when loaded; None for a pinned version
    checked_at: float = 0.0  # when storage last confirmed this copy (how stale it is)
    tried_at: float = 0.0  # when it was last checked, confirmed or not (the next check comes ttl_s later)


@dataclass
class _Flight:
    """One load in progress; requests for the same key wait for it instead of loading again."""

    done: threading.Event = field(default_factory=threading.Event)
    result: Residual | None = None
    error: BaseException | None = None


def _hex(residual: Residual) -> str:
    return residual.sha256.split(":")[-1]


def _unavailable(concept: str) -> ServiceUnavailableError:
    return ServiceUnavailableError(f"the residual store is unreachable, so model {concept!r} cannot be loaded now; "
                                   "retry in a few seconds")


class ResidualCache:
    """Thread-safe LRU of verified residuals; ``check`` raises IncompatibleResidualError for one that does not fit.

    Entries are keyed ``(concept, None)`` for a current residual and ``(concept, sha256 hex)`` for a
    pinned version; ``capacity`` counts both. Storage is never touched while the lock is held.
    ``background(task)`` runs a revalidation off the request's thread (default: a pool of
    REVALIDATION_THREADS threads).
    """

    def __init__(self, prefix: str, capacity: int, check: Callable[[Residual], None], *, ttl_s: float = 5.0,
                 max_stale_s: float = 300.0, budget: storage.RetryBudget = storage.SHORT_BUDGET,
                 events: CacheEvents | None = None, clock: Callable[[], float] = time.monotonic,
                 background: Callable[[Callable[[], None]], object] | None = None):
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, got {capacity}")
        if not max_stale_s >= ttl_s:
            raise ValueError(f"max_stale_s ({max_stale_s}) must be at least ttl_s ({ttl_s})")
        self.prefix, self.capacity, self.ttl_s, self.budget = prefix, capacity, ttl_s, budget
        self.max_stale_s = max_stale_s
        self._check, self._clock = check, clock
        self._events = events or CacheEvents()
        self._entries: OrderedDict[tuple[str, str | None], _Entry] = OrderedDict()
        self._flights: dict[tuple, _Flight] = {}
        self._queued: set[tuple] = set()  # keys whose background check waits for a thread
        self._down_until = float("-inf")  # until then a cold load is 503 at once (the store just failed one)
        self._lock = threading.Lock()
        if background is None:
            pool = ThreadPoolExecutor(REVALIDATION_THREADS, thread_name_prefix="catversion-revalidate")
            background = pool.submit
        self._background = background
        storage.prepare(prefix, budget)

    def get(self, model: str) -> Residual:
        """The residual for ``model``: a cached copy at once (checked in the background once ``ttl_s`` old),
        else loaded from storage within the budget."""
        return self._resolve(model, force=False)

    def revalidate(self, model: str) -> Residual:
        """Like :meth:`get`, but checks storage now (within the budget) whatever the TTL."""
        return self._resolve(model, force=True)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # ---- lookups ---------------------------------------------------------------------------------

    def _resolve(self, model: str, force: bool) -> Residual:
        concept, at, pin = model.partition("@") if isinstance(model, str) else (model, "", "")
        pin = pin.removeprefix("sha256:")  # the form GET /v1/models/{id} shows is accepted too
        if not layout.is_concept_id(concept):
            raise UnknownConceptError(f"model {model!r} is not a valid concept id ({layout.CONCEPT_ID_RULE})")
        if at and not PIN_RE.match(pin):
            raise InvalidParameterError(f"model {model!r}: pin a version as {PIN_FORM}", param="model")
        if not at:
            return self._current(concept, force)
        with self._lock:  # a cached version of a concept whose current residual is not cached: no storage
            pinned = None if force or (concept, None) in self._entries else self._cached_pin(concept, pin)
            if pinned is not None:
                self._events.hit()
                return pinned
        current, unreachable = None, None
        try:
            current = self._current(concept, force)
        except ServiceUnavailableError as exc:
            unreachable = exc  # a cached pinned version is still served
        except (UnknownConceptError, UnusableResidualError):
            pass  # an older version may still match
        if current is not None and _hex(current).startswith(pin):
            return current

        def scan() -> Residual:
            if unreachable is not None:
                raise unreachable
            return self._scan(concept, pin, current)

        return self._once((concept, "@" + pin), lambda: self._cached_pin(concept, pin), scan)

    def _current(self, concept: str, force: bool) -> Residual:
        key = (concept, None)
        spawn = False  # whether this request found the copy due for a check and queued one

        def servable() -> Residual | None:
            """The cached copy while it may be served without asking storage first (call with the lock held)."""
            nonlocal spawn
            entry = self._entries.get(key)
            now = self._clock()
            if force or entry is None or now - entry.checked_at >= self.max_stale_s:
                return None
            self._entries.move_to_end(key)
            if now - entry.tried_at >= self.ttl_s and key not in self._flights and key not in self._queued:
                self._queued.add(key)
                spawn = True
            return entry.residual

        def load() -> Residual:
            residual, downloaded = self._refresh(concept)
            if not downloaded:
                with self._lock:
                    self._events.hit()
            return residual

        residual = self._once(key, servable, load)
        if spawn:
            self._background(lambda: self._recheck(concept))
        return residual

    def _recheck(self, concept: str) -> None:
        """The background check of a cached current residual; what it finds, the next requests get."""
        key = (concept, None)
        with self._lock:
            self._queued.discard(key)
            entry = self._entries.get(key)
            if key in self._flights or entry is None or self._clock() - entry.tried_at < self.ttl_s:
                return  # being checked, dropped, evicted or checked meanwhile
            flight = self._flights[key] = _Flight()
        try:
            self._fly(key, flight, lambda: self._refresh(concept)[0])
        except RequestError:
            pass  # logged where found; the entry was dropped (deleted, unusable) or kept (unreachable)
        except Exception:
            log.exception("checking model %r against the residual store failed", concept)

    def _cached_pin(self, concept: str, pin: str) -> Residual | None:
        """A cached pinned version of ``concept`` whose sha256 starts with ``pin`` (call with the lock held)."""
        for key, entry in self._entries.items():
            if key[0] == concept and key[1] and key[1].startswith(pin):
                self._entries.move_to_end(key)
                return entry.residual
        return None

    def _once(self, key: tuple, cached: Callable[[], Residual | None], load: Callable[[], Residual]) -> Residual:
        """``cached()`` under the lock, else ``load()``: run once per key at a time, the others wait for it."""
        with self._lock:
            found = cached()
            if found is not None:
                self._events.hit()
                return found
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()  # a load or check in progress: bounded by its storage calls' deadlines
            if flight.error is not None:
                raise flight.error
            with self._lock:
                self._events.hit()
            return flight.result
        return self._fly(key, flight, load)

    def _fly(self, key: tuple, flight: _Flight, load: Callable[[], Residual]) -> Residual:
        """Run ``load`` as the key's flight (registered by the caller) and hand its outcome to the waiters."""
        try:
            flight.result = load()
            return flight.result
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    # ---- storage ---------------------------------------------------------------------------------

    def _refresh(self, concept: str) -> tuple[Residual, bool]:
        """Check a cached current residual against storage, or load it: the residual, and whether it was
        downloaded. The caller holds the key's flight."""
        uri = layout.residual_uri(self.prefix, concept)
        key = (concept, None)
        with self._lock:
            entry = self._entries.get(key)
            down = entry is None and self._clock() < self._down_until
        if down:
            raise _unavailable(concept)
        if entry is not None:
            try:
                info = storage.stat(uri, budget=self.budget)
            except storage.StorageError as exc:
                return self._stale(concept, entry, exc), False
            if info is None:
                raise self._gone(concept, uri, entry)
            if info.stamp == entry.stamp:
                with self._lock:
                    entry.checked_at = entry.tried_at = self._clock()
                    self._down_until = float("-inf")
                    self._events.revalidation("unchanged")
                return entry.residual, False
        started = time.perf_counter()
        try:
            data, info = storage.read_object(uri, budget=self.budget)
        except storage.NotFoundError:
            raise self._gone(concept, uri, entry) from None
        except storage.StorageError as exc:
            if entry is not None:
                return self._stale(concept, entry, exc), False
            log.warning("residual store unreachable: cannot load model %r from %s: %s", concept, uri, exc)
            if isinstance(exc, storage.StorageUnavailableError):
                with self._lock:
                    self._down_until = self._clock() + self.budget.seconds
            raise _unavailable(concept) from None
        self._events.miss(time.perf_counter() - started)
        with self._lock:
            self._down_until = float("-inf")
        try:
            residual = self._verify(concept, data)
        except UnusableResidualError as exc:
            log.info("model %r at %s (stamp %s) is unusable: %s", concept, uri, info.stamp, exc)
            self._drop(key, "invalid" if entry is not None else None)
            raise
        now = self._clock()
        self._store(key, _Entry(residual, info.stamp, now, now), "changed" if entry is not None else None)
        return residual, True

    def _scan(self, concept: str, pin: str, current: Residual | None) -> Residual:
        """Find the newest stored version whose sha256 starts with ``pin`` (versioned S3 buckets only)."""
        uri = layout.residual_uri(self.prefix, concept)
        with self._lock:
            entry = self._entries.get((concept, None))
        known = entry.stamp if entry is not None else None  # the current version: already known not to match
        started = time.perf_counter()
        try:
            for version in storage.list_versions(uri, budget=self.budget)[:MAX_VERSIONS_SCANNED]:
                if version.stamp == known:
                    continue
                try:
                    data, _ = storage.read_object(uri, budget=self.budget, version_id=version.version_id)
                    residual = Residual.load(data, name=f"model {concept!r}")
                except storage.NotFoundError:
                    continue  # deleted since the listing
                except ResidualFormatError as exc:
                    log.info("skipping version %s of %s: %s", version.version_id, uri, exc)
                    continue
                if _hex(residual).startswith(pin):
                    residual = self._verify(concept, residual)
                    self._store((concept, _hex(residual)), _Entry(residual))
                    return residual
        except storage.StorageError as exc:
            log.warning("residual store unreachable: cannot look through the versions of %s: %s", uri, exc)
            raise ServiceUnavailableError(f"the residual store is unreachable, so model '{concept}@{pin}' cannot be "
                                          "looked up now; retry in a few seconds") from None
        finally:
            self._events.miss(time.perf_counter() - started)
        now = _hex(current)[:12] if current is not None else "none"
        raise UnknownConceptError(f"model {concept!r} has no version whose sha256 starts with {pin!r} (current: {now})")

    def _verify(self, concept: str, source: bytes | Residual) -> Residual:
        """The residual (read from ``source`` bytes) once it passed ``check``, else UnusableResidualError."""
        name = f"model {concept!r}"
        try:
            residual = source if isinstance(source, Residual) else Residual.load(source, name=name)
            self._check(residual)
        except (ResidualFormatError, IncompatibleResidualError) as exc:
            reason = str(exc).removeprefix(f"{name}: ")
            raise UnusableResidualError(f"model {concept!r} cannot be used: {reason}") from None
        return residual

    def _stale(self, concept: str, entry: _Entry, exc: Exception) -> Residual:
        """Storage unreachable: keep serving the verified copy until it is ``max_stale_s`` old (then 503),
        and try again after ``ttl_s``."""
        with self._lock:
            now = self._clock()
            entry.tried_at = now
            self._events.revalidation("unreachable")
        age = now - entry.checked_at
        if age >= self.max_stale_s:
            log.warning("residual store unreachable while rechecking model %r (%s): its cached copy %s was last "
                        "confirmed %.0f s ago, past residual_max_stale_s (%g s), so it is refused (503) until the "
                        "store answers: %s", concept, type(exc).__name__, entry.residual.sha256[:19], age,
                        self.max_stale_s, exc)
            raise _unavailable(concept)
        log.warning("residual store unreachable while rechecking model %r (%s); serving the cached copy %s, last "
                    "confirmed %.0f s ago (refused past residual_max_stale_s, %g s), and trying again in %g s: %s",
                    concept, type(exc).__name__, entry.residual.sha256[:19], age, self.max_stale_s, self.ttl_s, exc)
        return entry.residual

    def _gone(self, concept: str, uri: str, entry: _Entry | None) -> UnknownConceptError:
        """Forget a deleted residual; the error to raise."""
        log.info("model %r: no residual at %s", concept, uri)
        self._drop((concept, None), "deleted" if entry is not None else None)
        return UnknownConceptError(f"model {concept!r} does not exist; GET /v1/models lists the available ones")

    # ---- entries ---------------------------------------------------------------------------------

    def _store(self, key: tuple, entry: _Entry, revalidation: str | None = None) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
                self._events.eviction()
            if revalidation:
                self._events.revalidation(revalidation)
            self._events.size(len(self._entries))

    def _drop(self, key: tuple, revalidation: str | None) -> None:
        with self._lock:
            dropped = self._entries.pop(key, None) is not None
            if revalidation:
                self._events.revalidation(revalidation)
            if dropped:
                self._events.size(len(self._entries))


class ListingUnavailableError(ServiceUnavailableError):
    """No listing of the models could be read yet (503); it names no model."""

    param = None


class ModelListing:
    """The concept ids behind ``GET /v1/models``: the last good listing at once, refreshed in the background.

    ``load()`` lists the store (a blocking call, run on a thread; it should carry a storage deadline).
    Once ``ttl_s`` has passed since the last good listing, a request starts one refresh and is
    answered from the last good listing, however old: a listing only names models, and each request
    checks its own residual. A refresh that fails is logged and tried again by the next request (one
    at a time). Only when there has never been a good listing does a request wait for one, at most
    ``wait_s``: then ServiceUnavailableError (503). Use it from one event loop.
    """

    def __init__(self, load: Callable[[], list[str]], *, ttl_s: float, wait_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self._load, self.ttl_s, self.wait_s, self._clock = load, ttl_s, wait_s, clock
        self._names: list[str] | None = None
        self._listed_at = float("-inf")
        self._refreshing: asyncio.Task | None = None

    async def get(self) -> list[str]:
        """The concept ids, sorted; raises ServiceUnavailableError when none could ever be listed."""
        if self._clock() - self._listed_at >= self.ttl_s and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        if self._names is None:
            # shield: a request that stops waiting leaves the refresh running for the next one.
            await asyncio.wait([asyncio.shield(self._refreshing)], timeout=self.wait_s)
        if self._names is None:
            raise ListingUnavailableError("the residual store is unreachable, so the models cannot be listed now; "
                                          "retry in a few seconds")
        return self._names

    async def _refresh(self) -> None:
        try:
            names = await asyncio.to_thread(self._load)
        except storage.StorageError as exc:
            if self._names is None:
                log.warning("cannot list the models (never listed yet: GET /v1/models answers 503): %s", exc)
            else:
                log.warning("cannot list the models; serving the listing from %.0f s ago: %s",
                            self._clock() - self._listed_at, exc)
            return
        self._names, self._listed_at = names, self._clock()
