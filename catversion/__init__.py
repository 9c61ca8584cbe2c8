"""CatVersion personalization as a library: residual files, the patched CLIP text encoder, base models,
training and generation. No Ray and no HTTP here; `pipelines/` and `serve/` build on it."""

from .encoder import ResidualTextEncoder
from .residual import IncompatibleResidualError, Residual, ResidualFormatError

__version__ = "0.1.0"

__all__ = ["Residual", "ResidualTextEncoder", "ResidualFormatError", "IncompatibleResidualError", "__version__"]
