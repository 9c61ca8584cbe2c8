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

from .conditioning import Conditioner, Conditioning, time_ids
from .executor import Executor, Sample
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
    """Holds one frozen base model and its patched text encoders; reuse it for every request.

    Any family (catversion/families.py): the conditioning is the family's (catversion/conditioning.py),
    SDXL's added conditioning (pooled embeds, time ids of the image size) goes with each sample, and the
    unconditional branch follows the family's convention (SDXL: an empty negative prompt is all zeros);
    it never carries the residual. ``layers``: None (the family's default), per encoder, or one flat
    sequence for a one-encoder family.
    Unconditional embeddings are cached per negative prompt (the empty prompt is the usual one),
    so a batch pays the text encoder once for its conditional rows only. ``compile`` and
    ``buckets`` configure ``self.unet_runner`` (catversion/unetrun.py), which makes every UNet call
    for ``self.executor`` (catversion/executor.py), which runs every denoising step; call
    ``warm_up()`` before the first request, on the thread that will sample, to compile and record
    CUDA graphs then rather than during a request.
    """

    def __init__(self, base: BaseModel, layers: Sequence | None = None, tokens: int = 1, uncond_cache_size: int = 64,
                 compile: bool = False, buckets: Sequence[int] = DEFAULT_BUCKETS):
        for part in ("tokenizer", "text_encoder", "unet", "vae"):
            if getattr(base, part) is None:
                raise ValueError(f"generation needs the base model's {part}; load it with that component")
        self.base = base
        self.encoder = Conditioner(base, layers=layers, tokens=tokens)
        self._uncond: OrderedDict[str, Conditioning] = OrderedDict()
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
                self.base.text_encoders, fingerprint=self.base.fingerprint, layers=self.encoder.layer_sets,
                tokens=self.encoder.tokens, base_model=self.base.model_id, family=self.base.family.name,
            )
        if not _in_range(request.residual_scale, 0.0, MAX_RESIDUAL_SCALE):
            raise ValueError(f"{label}residual_scale must be in [0, {MAX_RESIDUAL_SCALE:g}], "
                             f"got {request.residual_scale!r}")
        if not isinstance(request.seed, int) or not 0 <= request.seed <= MAX_SEED:
            raise ValueError(f"{label}seed must be an integer in 0..{MAX_SEED}, got {request.seed!r}")

    @torch.no_grad()
    def encode(self, requests: Sequence[GenerationRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional embeddings (with residuals) and unconditional ones (without), [B, 77, D] each."""
        cond, uncond = self.conditioning(requests)
        return cond.embeds, uncond.embeds

    @torch.no_grad()
    def conditioning(self, requests: Sequence[GenerationRequest]) -> tuple[Conditioning, Conditioning]:
        """The conditional branch (with residuals) and the unconditional one (without) of each request."""
        cond = self.encoder([r.prompt for r in requests], [r.residual for r in requests],
                            residual_scale=[r.residual_scale for r in requests])
        parts = [self._unconditional(r.negative_prompt) for r in requests]
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return cond, Conditioning(torch.cat([p.embeds for p in parts]), pooled)

    def _unconditional(self, negative_prompt: str) -> Conditioning:
        if negative_prompt in self._uncond:
            self._uncond.move_to_end(negative_prompt)
        else:
            made = self.encoder([negative_prompt])  # no residual: the base model's conditioning
            if negative_prompt == "" and self.base.zero_empty_negative:  # SDXL's force_zeros_for_empty_prompt
                made = Conditioning(torch.zeros_like(made.embeds),
                                    None if made.pooled is None else torch.zeros_like(made.pooled))
            self._uncond[negative_prompt] = made
            if len(self._uncond) > self._uncond_cache_size:
                self._uncond.popitem(last=False)
        return self._uncond[negative_prompt]

    def time_ids(self, size: Size) -> torch.Tensor | None:
        """SDXL's time ids [6] for an image of ``size`` (no crop, original = target); None for other families."""
        if not self.base.family.time_ids:
            return None
        return time_ids(image_size(size)).to(self.base.device)

    @torch.no_grad()
    def samples(self, requests: Sequence[GenerationRequest], guidance: float, steps: int, size: Size,
                partial_images: int = 0, noise: torch.Tensor | None = None,
                guidances: Sequence[float] | None = None, step_counts: Sequence[int] | None = None,
                previews: Sequence[int] | None = None) -> list[Sample]:
        """Each request as an executor `Sample` at step 0: its seed noise, both branches' conditioning and the
        family's added conditioning. ``guidances``/``step_counts``/``previews`` give per-request values."""
        cond, uncond = self.conditioning(requests)
        ids = self.time_ids(size)
        added, uncond_added = cond.added(ids), uncond.added(ids)
        noise = self.initial_latents([r.seed for r in requests], size) if noise is None else noise
        made = []
        for i in range(len(requests)):
            row = slice(i, i + 1)
            made.append(self.executor.sample(
                noise[row], cond.embeds[row], uncond.embeds[row],
                guidance if guidances is None else guidances[i], steps if step_counts is None else step_counts[i],
                partial_images if previews is None else previews[i],
                added=None if added is None else added[row], uncond_added=None if uncond_added is None else uncond_added[row]))
        return made

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

        DDIM with eta 0 (v-prediction models too: the executor steps by the scheduler config's prediction
        type), so an image depends only on its request, steps, guidance and size.
        ``size`` is a square side or (height, width) in pixels; None is the model's native resolution.
        ``on_step(done, total)`` is called after each denoising step (for progress bars).
        """
        size = size or self.base.resolution
        self.check(requests, steps, guidance, size)
        executor = self.executor
        samples = self.samples(requests, guidance, steps, size)
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
