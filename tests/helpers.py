"""Small input makers shared by tests (photos are generated, never downloaded)."""

import io

import numpy as np
from PIL import Image


def png_bytes(seed: int, size=(80, 64), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = (rng.random((size[1], size[0], channels)) * 255).astype(np.uint8)
    image = Image.fromarray(array[..., 0] if channels == 1 else array, mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
