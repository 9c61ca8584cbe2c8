"""Residuals loaded on first use from the residual prefix, verified, and kept in an LRU cache."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from catversion import storage
from catversion.residual import IncompatibleResidualError, Residual, ResidualFormatError
from pipelines.manifest import CONCEPT_ID_RE

RESIDUALS_FOLDER = "residuals"
SUFFIX = ".safetensors"


class UnknownConceptError(LookupError):
    """No residual exists for this concept id."""


class UnusableResidualError(ValueError):
    """A residual exists but is corrupt or does not fit the loaded base model."""


def residual_uri(prefix: str, concept_id: str) -> str:
    return storage.join(prefix, RESIDUALS_FOLDER, f"{concept_id}{SUFFIX}")


def list_concepts(prefix: str) -> list[str]:
    folder = storage.join(prefix, RESIDUALS_FOLDER)
    names = [uri.rsplit("/", 1)[-1][: -len(SUFFIX)] for uri in storage.list_uris(folder, SUFFIX)]
    return sorted(name for name in names if CONCEPT_ID_RE.match(name))


class ResidualCache:
    """Thread-safe LRU of verified residuals. ``check`` raises if a residual does not fit the base model."""

    def __init__(self, prefix: str, capacity: int, check: Callable[[Residual], None],
                 on_hit: Callable[[], None] = lambda: None, on_miss: Callable[[float], None] = lambda seconds: None):
        self.prefix = prefix
        self.capacity = capacity
        self._check = check
        self._on_hit, self._on_miss = on_hit, on_miss
        self._items: OrderedDict[str, Residual] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, concept_id: str) -> Residual:
        if not CONCEPT_ID_RE.match(concept_id or ""):
            raise UnknownConceptError(f"model {concept_id!r} is not a valid concept id")
        with self._lock:
            residual = self._items.get(concept_id)
            if residual is not None:
                self._items.move_to_end(concept_id)
                self._on_hit()
                return residual
        started = time.perf_counter()
        residual = self._load(concept_id)
        self._on_miss(time.perf_counter() - started)
        with self._lock:
            self._items[concept_id] = residual
            self._items.move_to_end(concept_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return residual

    def _load(self, concept_id: str) -> Residual:
        uri = residual_uri(self.prefix, concept_id)
        try:
            data = storage.read_bytes(uri)
        except storage.NotFoundError:
            raise UnknownConceptError(f"model {concept_id!r} does not exist (no residual at {uri})") from None
        try:
            residual = Residual.load(data, name=uri)
            self._check(residual)
        except (ResidualFormatError, IncompatibleResidualError) as exc:
            # Not cached: a retrained residual is picked up on the next request.
            raise UnusableResidualError(f"model {concept_id!r} cannot be used: {exc}") from None
        return residual

    def __len__(self) -> int:
        return len(self._items)
