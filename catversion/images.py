"""Decoding user images safely: EXIF orientation, RGB conversion, and a decompression-bomb limit.

torch is imported by the tensor conversions only: the batch driver checks manifests with this module
and must not pay torch's start-up to plan a run.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import storage
from .recipe import ImageSource

if TYPE_CHECKING:
    import torch

# Well above any camera (a 100 MP photo is 1e8 px) but far below what would exhaust memory.
MAX_IMAGE_PIXELS = 120_000_000


class ImageError(ValueError):
    """An input image that cannot be used; the message names it and says why."""


def read_source(source: ImageSource, name: str | None = None) -> tuple[bytes, str]:
    """The raw bytes of an image source (a path, file:// or s3:// URI, or bytes) and a name for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), name or "<image bytes>"
    label = name or str(source)
    try:
        return storage.read_bytes(str(source)), label
    except storage.NotFoundError:
        raise ImageError(f"image {label} does not exist") from None
    except storage.StorageError as exc:
        raise ImageError(f"image {label}: {exc}") from None


def decode_image(data: bytes, name: str = "<image bytes>", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode to an upright RGB image, refusing undecodable or oversized input by name."""
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces PIL's warning (PIL still refuses above twice its limit).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
        with probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise ImageError(
                    f"image {name} is {width}x{height} = {width * height:,} pixels, above the limit of "
                    f"{max_pixels:,} (decompression-bomb guard); downscale it first"
                )
            image = ImageOps.exif_transpose(probe)
            image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image {name} is too large to decode safely (decompression-bomb guard: {exc})") from None
    except UnidentifiedImageError:
        raise ImageError(f"image {name} is not a decodable image (PIL cannot identify its format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"image {name} is not a decodable image (PIL: {exc})") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency onto white, the way viewers show it, rather than onto black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(source: ImageSource, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    data, label = read_source(source, name)
    return decode_image(data, label, max_pixels)


def to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Bicubic resize to a square (no crop, as the reference code does), scaled to [-1, 1], [3, H, W]."""
    import torch

    resized = image.resize((resolution, resolution), resample=Image.Resampling.BICUBIC)
    array = np.asarray(resized, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] → PIL images."""
    import torch

    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]
