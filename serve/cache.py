"""Residuals read from the residual prefix, verified, and kept in an LRU cache that stays fresh.

A model is ``<concept_id>`` (the current residual) or ``<concept_id>@<sha256 hex prefix>`` (one
version of it). A current residual is served from memory for ``ttl_s`` after it was last checked;
after that one HEAD (``storage.stat``) tells whether it changed. Pinned versions are content-addressed
and never rechecked; older versions are found only in a versioned S3 bucket.

Messages for clients never name storage paths: those go to the ``catversion.serve`` log.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from catversion import layout, storage
from catversion.residual import IncompatibleResidualError, Residual, ResidualFormatError

from .errors import InvalidParameterError, ServiceUnavailableError, UnknownConceptError, UnusableResidualError

log = logging.getLogger("catversion.serve")

PIN_RE = re.compile(r"[0-9a-f]{4,64}\Z")
PIN_FORM = "concept@<sha256 hex prefix, 4..64 chars>"  # "sha256:" before the hex is accepted too
MAX_VERSIONS_SCANNED = 50


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
        """A cached residual checked against storage: unchanged, changed, deleted, invalid or unreachable."""

    def size(self, entries: int) -> None:
        """The number of entries, after it may have changed."""


@dataclass
class _Entry:
    residual: Residual
    stamp: str | None = None  # the object's stamp when loaded; None for a pinned version
    checked_at: float = 0.0


@dataclass
class _Flight:
    """One load in progress; requests for the same key wait for it instead of loading again."""

    done: threading.Event = field(default_factory=threading.Event)
    result: Residual | None = None
    error: BaseException | None = None


def _hex(residual: Residual) -> str:
    return residual.sha256.split(":")[-1]


class ResidualCache:
    """Thread-safe LRU of verified residuals; ``check`` raises IncompatibleResidualError for one that does not fit.

    Entries are keyed ``(concept, None)`` for a current residual and ``(concept, sha256 hex)`` for a
    pinned version; ``capacity`` counts both. Storage is never touched while the lock is held.
    """

    def __init__(self, prefix: str, capacity: int, check: Callable[[Residual], None], *, ttl_s: float = 5.0,
                 budget: storage.RetryBudget = storage.SHORT_BUDGET, events: CacheEvents | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, got {capacity}")
        self.prefix, self.capacity, self.ttl_s, self.budget = prefix, capacity, ttl_s, budget
        self._check, self._clock = check, clock
        self._events = events or CacheEvents()
        self._entries: OrderedDict[tuple[str, str | None], _Entry] = OrderedDict()
        self._flights: dict[tuple, _Flight] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> Residual:
        """The residual for ``model``; checks storage only when the cached copy is older than ``ttl_s``."""
        return self._resolve(model, force=False)

    def revalidate(self, model: str) -> Residual:
        """Like :meth:`get`, but checks storage now whatever the TTL."""
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

        def fresh() -> Residual | None:
            entry = self._entries.get(key)
            if force or entry is None or self._clock() - entry.checked_at >= self.ttl_s:
                return None
            self._entries.move_to_end(key)
            return entry.residual

        return self._once(key, fresh, lambda: self._refresh(concept))

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
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            with self._lock:
                self._events.hit()
            return flight.result
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

    def _refresh(self, concept: str) -> Residual:
        """Check a cached current residual against storage, or load it; the caller holds the key's flight."""
        uri = layout.residual_uri(self.prefix, concept)
        key = (concept, None)
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None:
            try:
                info = storage.stat(uri, budget=self.budget)
            except storage.StorageError as exc:
                return self._stale(concept, entry, exc)
            if info is None:
                raise self._gone(concept, uri, entry)
            if info.stamp == entry.stamp:
                with self._lock:
                    entry.checked_at = self._clock()
                    self._events.revalidation("unchanged")
                    self._events.hit()
                return entry.residual
        started = time.perf_counter()
        try:
            data, info = storage.read_object(uri, budget=self.budget)
        except storage.NotFoundError:
            raise self._gone(concept, uri, entry) from None
        except storage.StorageError as exc:
            if entry is not None:
                return self._stale(concept, entry, exc)
            log.warning("residual store unreachable: cannot load model %r from %s: %s", concept, uri, exc)
            raise ServiceUnavailableError(f"the residual store is unreachable, so model {concept!r} cannot be "
                                          "loaded now; retry in a few seconds") from None
        self._events.miss(time.perf_counter() - started)
        try:
            residual = self._verify(concept, data)
        except UnusableResidualError as exc:
            log.info("model %r at %s (stamp %s) is unusable: %s", concept, uri, info.stamp, exc)
            self._drop(key, "invalid" if entry is not None else None)
            raise
        self._store(key, _Entry(residual, info.stamp, self._clock()), "changed" if entry is not None else None)
        return residual

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
        """Storage unreachable: keep serving the verified copy, and try again after ``ttl_s``."""
        log.warning("residual store unreachable while rechecking model %r (%s); serving the cached copy %s "
                    "and trying again in %g s: %s", concept, type(exc).__name__, entry.residual.sha256[:19],
                    self.ttl_s, exc)
        with self._lock:
            entry.checked_at = self._clock()
            self._events.revalidation("unreachable")
            self._events.hit()
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
