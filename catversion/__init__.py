"""CatVersion personalization as a library: residual files, the patched CLIP text encoder, base models,
training and generation; `pipelines/` and `serve/` build on it. No HTTP here, and no Ray outside the
`catversion.cluster` subpackage (joining Ray, resource checks, Ray metrics, and the one module that
touches Ray's private internals), which the batch jobs and the server share.

`import catversion` is cheap: the public names below load their modules (and torch) on first use
(PEP 562), so the command line and light tools start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_LAZY = {
    "Residual": "residual",
    "ResidualFormatError": "residual",
    "ResidualNotFoundError": "residual",
    "IncompatibleResidualError": "residual",
    "ResidualTextEncoder": "encoder",
}

__all__ = [*_LAZY, "__version__"]

if TYPE_CHECKING:
    from .encoder import ResidualTextEncoder
    from .residual import IncompatibleResidualError, Residual, ResidualFormatError, ResidualNotFoundError


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'catversion' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
