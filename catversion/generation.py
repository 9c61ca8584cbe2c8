"""Text-to-image generation with residuals: many concepts in one UNet batch, one seed per sample.

The conditional branch is encoded with each sample's residual; the unconditional / negative branch
without it, as the reference code does (docs/method.md). The denoising itself is catversion/executor.py's,
the one loop that `StepBatcher` (catversion/stepbatch.py) also samples through: every UNet call goes
through a `UNetRunner` (catversion/unetrun.py): batch buckets, channels-last on CUDA and, with
``compile=True``, one compile with a CUDA graph per bucket.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .encoder import ResidualTextEncoder
from .executor import Executor
from .images import to_pil
from .limits import DEFAULT_GUIDANCE, DEFAULT_STEPS, MAX_GUIDANCE, MAX_IMAGE_SIDE, MAX_RESIDUAL_SCALE, MAX_SEED, MAX_STEPS
from .models import BaseModel
from .residual import Residual
from .unetrun import DEFAULT_BUCKETS, UNetRunner

Size = int | tuple[int, int]  # a square side, or (height, width), in pixels


def image_size(size: Size) -> tuple[int, int]:
    """(height, width) of a square side or of a (height, width) pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _in_range(value: object, low: float, high: float) -> bool:
    return isinstance(value, numbers.Real) and low <= value <= high


@dataclass
class GenerationRequest:
    """One image to make. ``residual`` None means the plain base model."""

    prompt: str
    residual: Residual | None = None
    seed: int = 0
    residual_scale: float = 1.0
    negative_prompt: str = ""


class ImageGenerator:
    """Holds one frozen base model and its patched text encoder; reuse it for every request.

    Unconditional embeddings are cached per negative prompt (the empty prompt is the usual one),
    so a batch pays the text encoder once for its conditional rows only. ``compile`` and
    ``buckets`` configure ``self.unet_runner`` (catversion/unetrun.py), which makes every UNet call
    for ``self.executor`` (catversion/executor.py), which runs every denoising step; call
    ``warm_up()`` before the first request, on the thread that will sample, to compile and record
    CUDA graphs then rather than during a request.
    """

    def __init__(self, base: BaseModel, layers: Sequence[int] | None = None, tokens: int = 1, uncond_cache_size: int = 64,
                 compile: bool = False, buckets: Sequence[int] = DEFAULT_BUCKETS):
        for part in ("tokenizer", "text_encoder", "unet", "vae"):
            if getattr(base, part) is None:
                raise ValueError(f"generation needs the base model's {part}; load it with that component")
        self.base = base
        self.encoder = ResidualTextEncoder(base.text_encoder, layers=layers, tokens=tokens)
        self._uncond: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._uncond_cache_size = uncond_cache_size
        unet_levels = len(base.unet.config.block_out_channels) - 1
        self.size_multiple = base.vae_scale_factor * 2**unet_levels
        native = base.resolution // base.vae_scale_factor
        self.executor = Executor(base, UNetRunner(base.unet, compile=compile, buckets=buckets,
                                                  latent_size=(native, native)))

    @property
    def unet_runner(self) -> UNetRunner:
        """The runner that makes every UNet call (the executor's)."""
        return self.executor.runner

    def warm_up(self) -> float:
        """Compile and record the UNet's buckets at the native size now (see UNetRunner.warm_up); seconds."""
        return self.unet_runner.warm_up()

    def check(self, requests: Sequence[GenerationRequest], steps: int, guidance: float, size: Size) -> None:
        """Raise ValueError naming the first bad argument (before any compute is spent)."""
        if not requests:
            raise ValueError("no generation requests given")
        self.check_settings(steps, guidance, size)
        for i, request in enumerate(requests):
            self.check_request(request, f"request {i}: ")

    def check_settings(self, steps: int, guidance: float, size: Size) -> None:
        """Raise ValueError naming a bad step count, guidance scale or image size."""
        if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
        if not _in_range(guidance, 0.0, MAX_GUIDANCE):
            raise ValueError(f"guidance scale must be in [0, {MAX_GUIDANCE:g}], got {guidance!r}")
        if isinstance(size, int):
            sides = {"size": size}
        elif isinstance(size, (tuple, list)) and len(size) == 2:
            sides = {"height": size[0], "width": size[1]}
        else:
            raise ValueError(f"size must be an integer or a (height, width) pair, got {size!r}")
        multiple = self.size_multiple
        for name, side in sides.items():
            if not isinstance(side, int) or side % multiple or not multiple <= side <= MAX_IMAGE_SIDE:
                raise ValueError(
                    f"{name} {side!r} must be a multiple of {multiple} between {multiple} and {MAX_IMAGE_SIDE} "
                    f"for this model (native size {self.base.resolution})"
                )

    def check_request(self, request: GenerationRequest, label: str = "") -> None:
        """Raise IncompatibleResidualError for a residual that does not fit, ValueError for a bad
        residual_scale or seed; ``label`` prefixes the message."""
        if request.residual is not None:
            request.residual.check_compatible(
                self.base.text_encoder, fingerprint=self.base.fingerprint, layers=self.encoder.layers,
                tokens=self.encoder.tokens, base_model=self.base.model_id,
            )
        if not _in_range(request.residual_scale, 0.0, MAX_RESIDUAL_SCALE):
            raise ValueError(f"{label}residual_scale must be in [0, {MAX_RESIDUAL_SCALE:g}], "
                             f"got {request.residual_scale!r}")
        if not isinstance(request.seed, int) or not 0 <= request.seed <= MAX_SEED:
            raise ValueError(f"{label}seed must be an integer in 0..{MAX_SEED}, got {request.seed!r}")

    @torch.no_grad()
    def encode(self, requests: Sequence[GenerationRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional embeddings (with residuals) and unconditional ones (without), [B, 77, D] each."""
        ids = self.base.tokenize([r.prompt for r in requests])
        cond = self.encoder(ids, [r.residual for r in requests], residual_scale=[r.residual_scale for r in requests])
        uncond = torch.cat([self._unconditional(r.negative_prompt) for r in requests])
        return cond, uncond

    def _unconditional(self, negative_prompt: str) -> torch.Tensor:
        if negative_prompt in self._uncond:
            self._uncond.move_to_end(negative_prompt)
        else:
            ids = self.base.tokenize([negative_prompt])
            self._uncond[negative_prompt] = self.encoder(ids)  # no residual: the base model's embedding
            if len(self._uncond) > self._uncond_cache_size:
                self._uncond.popitem(last=False)
        return self._uncond[negative_prompt]

    def initial_latents(self, seeds: Sequence[int], size: Size) -> torch.Tensor:
        """Per-sample noise from each sample's own seed (on CPU, so it is the same on every device)."""
        height, width = image_size(size)
        factor = self.base.vae_scale_factor
        shape = (1, self.base.unet.config.in_channels, height // factor, width // factor)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.cat(noise).to(self.base.device)

    @torch.no_grad()
    def generate_tensors(self, requests: Sequence[GenerationRequest], steps: int = DEFAULT_STEPS,
                         guidance: float = DEFAULT_GUIDANCE, size: Size | None = None,
                         on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] (float32, CPU) for a batch of requests sharing one UNet batch.

        DDIM with eta 0, so an image depends only on its request, steps, guidance and size.
        ``size`` is a square side or (height, width) in pixels; None is the model's native resolution.
        ``on_step(done, total)`` is called after each denoising step (for progress bars).
        """
        size = size or self.base.resolution
        self.check(requests, steps, guidance, size)
        cond, uncond = self.encode(requests)
        noise = self.initial_latents([r.seed for r in requests], size)
        executor = self.executor
        samples = [executor.sample(noise[i : i + 1], cond[i : i + 1], uncond[i : i + 1], guidance, steps)
                   for i in range(len(requests))]
        for done in range(1, steps + 1):
            executor.step(samples)
            if on_step is not None:
                on_step(done, steps)
        return executor.decode(torch.cat([sample.latents for sample in samples]))

    def generate(self, requests: Sequence[GenerationRequest], steps: int = DEFAULT_STEPS,
                 guidance: float = DEFAULT_GUIDANCE, size: Size | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        """``generate_tensors`` as PIL images."""
        return to_pil(self.generate_tensors(requests, steps, guidance, size, on_step))
