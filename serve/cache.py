"""Residuals loaded on first use from the residual prefix, verified, and kept in an LRU cache."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from catversion import layout
from catversion.residual import IncompatibleResidualError, Residual, ResidualFormatError, ResidualNotFoundError

from .errors import UnknownConceptError, UnusableResidualError


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
        if not layout.is_concept_id(concept_id):
            raise UnknownConceptError(f"model {concept_id!r} is not a valid concept id ({layout.CONCEPT_ID_RULE})")
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
        uri = layout.residual_uri(self.prefix, concept_id)
        try:
            residual = Residual.load(uri)
            self._check(residual)
        except ResidualNotFoundError:
            raise UnknownConceptError(f"model {concept_id!r} does not exist (no residual at {uri})") from None
        except (ResidualFormatError, IncompatibleResidualError) as exc:
            # Not cached: a retrained residual is picked up on the next request.
            raise UnusableResidualError(f"model {concept_id!r} cannot be used: {exc}") from None
        return residual

    def __len__(self) -> int:
        return len(self._items)
