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


def save_components(base, folder) -> None:
    """A loaded base model saved one component per subfolder, as a diffusers Stable Diffusion folder lays
    them out (without model_index.json)."""
    from diffusers import DDIMScheduler

    base.tokenizer.save_pretrained(folder / "tokenizer")
    base.text_encoder.save_pretrained(folder / "text_encoder")
    base.unet.save_pretrained(folder / "unet")
    base.vae.save_pretrained(folder / "vae")
    DDIMScheduler.from_config(base.scheduler_config).save_pretrained(folder / "scheduler")


def stop(process, timeout: float = 30) -> None:
    """Terminate a server the test started, and kill it if it does not end within ``timeout`` s."""
    import subprocess

    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
