"""Reading and decoding user images safely: bounded in bytes before reading, in pixels before decoding, and
in the memory that decodes running at once may take; EXIF orientation and RGB conversion.

The bounds are catversion/limits.py's (README and docs/contracts.md, "The manifest"). torch is imported
by the tensor conversions only: the batch driver checks manifests with this module and must not pay
torch's start-up to plan a run.
"""

from __future__ import annotations

import collections
import io
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import storage
from .limits import DECODE_MEMORY_ENV, DEFAULT_DECODE_MEMORY_BYTES, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from .recipe import ImageSource

if TYPE_CHECKING:
    import torch

# Peak bytes per pixel of one decode_image call, measured (ru_maxrss) on 20 MP images with Pillow 13: 4 for
# an RGB JPEG or PNG (the decoded image itself), 5 for greyscale, 8 while an EXIF rotation copies it, 12
# for RGBA, LA or palette-with-transparency PNGs composited onto white. The budget charges the worst.
DECODE_BYTES_PER_PIXEL = 12


class ImageError(ValueError):
    """An input image that cannot be used; the message names it and says why."""


def fetch_image(uri: str, name: str | None = None, *,
                budget: storage.RetryBudget | None = None) -> tuple[bytes, storage.ObjectInfo]:
    """An image file's bytes and stamp, refused (ImageError, naming it) when missing, unreadable, not a
    regular file, or over MAX_IMAGE_BYTES, which is decided before a byte of it is read."""
    label = name or uri
    try:
        return storage.read_object(uri, budget=budget, max_bytes=MAX_IMAGE_BYTES)
    except storage.NotFoundError:
        raise ImageError(f"image {label} does not exist") from None
    except storage.TooLargeError as exc:
        raise ImageError(f"image {label}: {exc} (MAX_IMAGE_BYTES in catversion/limits.py); downscale or "
                         "recompress it") from None
    except storage.StorageError as exc:
        raise ImageError(f"image {label}: {exc}") from None


def read_source(source: ImageSource, name: str | None = None) -> tuple[bytes, str]:
    """The raw bytes of an image source (a path, file:// or s3:// URI, or bytes) and a name for messages;
    inline bytes are held to MAX_IMAGE_BYTES too."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<image bytes>"
        if len(source) > MAX_IMAGE_BYTES:
            raise ImageError(f"image {label} is {len(source):,} bytes, over the limit of {MAX_IMAGE_BYTES:,} "
                             "(MAX_IMAGE_BYTES in catversion/limits.py); downscale or recompress it")
        return bytes(source), label
    label = name or str(source)
    return fetch_image(str(source), label)[0], label


class DecodeMemory:
    """The bytes that decodes running at once in this process may take together, handed out first come,
    first served. A decode larger than the whole budget runs alone rather than never."""

    def __init__(self, limit: int):
        if limit <= 0:
            raise ValueError(f"the decode memory budget must be > 0 bytes, got {limit}")
        self.limit, self.used = limit, 0
        self._changed = threading.Condition()
        self._waiting: collections.deque[object] = collections.deque()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        nbytes = min(nbytes, self.limit)
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            self._changed.wait_for(lambda: self._waiting[0] is ticket and self.used + nbytes <= self.limit)
            self._waiting.popleft()
            self.used += nbytes
            self._changed.notify_all()  # the next in line may fit as well
        try:
            yield
        finally:
            with self._changed:
                self.used -= nbytes
                self._changed.notify_all()


_decode_memory: DecodeMemory | None = None
_decode_memory_lock = threading.Lock()


def decode_memory() -> DecodeMemory:
    """This process's decode budget: DEFAULT_DECODE_MEMORY_BYTES, or $CATVERSION_DECODE_MEMORY bytes."""
    global _decode_memory
    with _decode_memory_lock:
        if _decode_memory is None:
            text = os.environ.get(DECODE_MEMORY_ENV, "").strip()
            try:
                limit = int(text) if text else DEFAULT_DECODE_MEMORY_BYTES
                _decode_memory = DecodeMemory(limit)
            except ValueError:
                raise ValueError(f"{DECODE_MEMORY_ENV}={text!r}: give the decode memory budget as a whole number "
                                 "of bytes > 0, e.g. 2147483648") from None
        return _decode_memory


def decode_image(data: bytes, name: str = "<image bytes>", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode to an upright RGB image, refusing undecodable or oversized input by name. The header is read
    first: the pixel count is checked, and the decode waits for its share of the decode memory budget."""
    memory = decode_memory()  # a bad CATVERSION_DECODE_MEMORY is its own error, not an undecodable image
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces PIL's warning (PIL still refuses above twice its limit).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"image {name} is {width}x{height} = {width * height:,} pixels, above the limit of "
                f"{max_pixels:,} (decompression-bomb guard); downscale it first"
            )
        with memory.hold(width * height * DECODE_BYTES_PER_PIXEL):
            ImageOps.exif_transpose(image, in_place=True)  # loads the pixels; no copy when upright
            return _to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image {name} is too large to decode safely (decompression-bomb guard: {exc})") from None
    except UnidentifiedImageError:
        raise ImageError(f"image {name} is not a decodable image (PIL cannot identify its format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        # Never PIL's text: it can quote the file's first bytes (a file that starts like a PPM header).
        raise ImageError(f"image {name} is not a decodable image (PIL failed with {type(exc).__name__}: it is "
                         "corrupt, truncated, or not the format its first bytes claim)") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white, the way viewers show it, rather than onto black."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        if rgba is not image:
            image.close()  # each copy is freed as soon as the next exists: the peak stays at three
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        rgba.close()
    return image if image.mode == "RGB" else image.convert("RGB")


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
