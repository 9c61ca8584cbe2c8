"""Sampling UNet calls at the GPU ceiling: row buckets, channels-last, and one compile with CUDA graphs.

`UNetRunner` makes every inference call of the UNet. Rows are padded up to the smallest *bucket*
(1, 2, 4, 8, 16, 32 by default) that holds them, so the UNet only ever sees a handful of batch
sizes; more rows than the largest bucket run in chunks of it. Padding rows are zeros (latents and
embeddings) at timestep 0; every UNet op is per row, so they never change the real rows.

With ``compile=True`` the UNet goes through ``torch.compile(mode="reduce-overhead")``: Inductor
kernels, and on CUDA a CUDA graph per bucket (CUDA graph trees), which removes the per-kernel
launch cost that dominates small sampling batches. Only the model's native latent size
(``latent_size``) goes through the compiled module; other sizes run eager, unpadded, so an odd
request size never triggers a compile in the middle of serving.

One compile for every bucket: the batch dimension is marked dynamic, not compiled per bucket.
  - A compile of SD1.5's UNet costs 60-90 s on an H100. Static shapes (``dynamic=False``) would
    compile once per bucket: 6 buckets are 6-9 minutes before a replica can serve, more than the
    project's whole 6-minute GPU benchmark, and each one also counts against Dynamo's recompile
    limit (8 per function) that a training compile in the same process shares.
  - What static shapes would buy is little here. CUDA graph trees record one graph per distinct
    concrete shape whatever the compile's shapes are, so each bucket still replays its own graph
    with zero launch overhead. The heavy ops (convolutions, matmuls, attention) are cuDNN/cuBLAS/
    SDPA calls that see the concrete sizes at run time; only Inductor's fused pointwise and
    normalization kernels take the batch as an argument instead of a constant.
  - Dynamo specializes a dimension of size 1 (its 0/1 specialization: marking it dynamic does not
    help), so a batch of 1 would be a second full compile. A compiled runner therefore has no
    bucket 1: one row runs in bucket 2 (a lone guided request is two rows anyway; only a lone
    guidance-1 request pays for one padding row, a few milliseconds in a CUDA graph).
  - On the CPU, Inductor's convolution backend choice (mkldnn or not) depends on the batch size,
    so a CPU compile splits the buckets into two graphs (below 16 rows and from 16 on); on CUDA
    the backend is cuDNN for every batch size.

CUDA graph trees keep thread-local state: the graphs ``warm_up()`` records belong to the thread
that ran it, so warm up on the thread that will make the calls (another thread records its own).
``warm_up()`` runs every bucket at the native size (twice on CUDA: a graph is recorded on a shape's
second call), so the first request replays recorded graphs. Calls are inference only (no grad).
"""

from __future__ import annotations

import bisect
import time
import warnings
from collections.abc import Sequence

import torch

from .conditioning import added_cond_kwargs, added_width
from .sd_v1 import MAX_LENGTH

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)  # UNet rows per call; a guided (CFG) sample is two rows
MIN_COMPILED_ROWS = 2  # a compiled batch of 1 would be a compile of its own (Dynamo's 0/1 specialization)


def quiet_known_compile_warnings() -> None:
    """Silence Dynamo's warning about diffusers' ``functools.lru_cache``-wrapped version checks in its
    up-sampling blocks: harmless (a constant version comparison), and it fills a user's terminal."""
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`-wrapped function",
                            category=UserWarning)


def buckets_for(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two from 1 up to the first that holds ``max_batch_size`` guided samples (two rows each):
    16 samples → (1, 2, 4, 8, 16, 32), the default."""
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    buckets = [1]
    while buckets[-1] < 2 * max_batch_size:
        buckets.append(2 * buckets[-1])
    return tuple(buckets)


class UNetRunner:
    """Runs a diffusers UNet2DConditionModel for sampling: ``runner(latents, timesteps, embeddings)``.

    ``buckets``: the batch sizes (in rows) a padded call may have; a compiled runner drops bucket 1
    (see the module docstring), ``self.buckets`` lists those in use. ``latent_size``: the native
    (height, width) of the latents; only that size runs compiled (None: every size does).
    ``pad``: None (default) pads exactly the calls that run compiled, because a fixed set of shapes
    is what compiled code and CUDA graphs need and an eager call gains nothing from padding rows;
    True pads eager calls too. On CUDA the UNet is switched to channels-last (in place: it is the
    base model's UNet) and inputs are made channels-last.
    """

    def __init__(self, unet, *, compile: bool = False, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 latent_size: tuple[int, int] | None = None, pad: bool | None = None):
        chosen = sorted({int(b) for b in buckets})
        if not chosen or chosen[0] < 1:
            raise ValueError(f"buckets must be row counts >= 1, got {tuple(buckets)!r}")
        if pad is False and compile:
            raise ValueError("a compiled runner always pads its calls to the buckets (one CUDA graph per bucket)")
        if compile:
            chosen = sorted({max(b, MIN_COMPILED_ROWS) for b in chosen})
        self.unet = unet
        self.buckets: tuple[int, ...] = tuple(chosen)
        self.latent_size = None if latent_size is None else (int(latent_size[0]), int(latent_size[1]))
        self.compiled = bool(compile)
        self.pad_eager = bool(pad)
        self.device = unet.device
        self.channels_last = self.device.type == "cuda"
        self.warm_up_seconds: float | None = None
        self.added_width = added_width(unet)  # SDXL: pooled text embeds + time ids per row; 0: none
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)
        if compile:
            quiet_known_compile_warnings()
        self._compiled = torch.compile(unet, mode="reduce-overhead") if compile else None

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def bucket(self, rows: int) -> int:
        """The smallest bucket that holds ``rows`` (the largest for more)."""
        index = bisect.bisect_left(self.buckets, rows)
        return self.buckets[min(index, len(self.buckets) - 1)]

    def runs_compiled(self, latent_size: tuple[int, int]) -> bool:
        """Whether a call with latents of this (height, width) goes through the compiled module."""
        return self._compiled is not None and (self.latent_size is None or tuple(latent_size) == self.latent_size)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor,
                 added: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's prediction, float32 [R, C, h, w], for latents [R, C, h, w], timesteps [R],
        embeddings [R, 77, D] and, for a UNet with added conditioning (SDXL), ``added`` [R, P + 6]
        (catversion/conditioning.py); a new tensor the caller may keep."""
        rows = latents.shape[0]
        if timesteps.shape != (rows,) or embeddings.shape[0] != rows:
            raise ValueError(f"one timestep and one embedding per latent row: got latents {tuple(latents.shape)}, "
                             f"timesteps {tuple(timesteps.shape)}, embeddings {tuple(embeddings.shape)}")
        if (added is None) != (self.added_width == 0) or (added is not None and added.shape != (rows, self.added_width)):
            raise ValueError(f"this UNet takes added conditioning rows of width {self.added_width} (0: none), got "
                             f"{None if added is None else tuple(added.shape)} for {rows} rows")
        out = torch.empty(latents.shape, dtype=torch.float32, device=self.device)
        compiled = self.runs_compiled(latents.shape[-2:])
        largest = self.buckets[-1]
        for start in range(0, rows, largest):
            stop = min(start + largest, rows)
            part = None if added is None else added[start:stop]
            out[start:stop] = self._run(latents[start:stop], timesteps[start:stop], embeddings[start:stop], part,
                                        compiled)
        return out

    def _run(self, latents: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor,
             added: torch.Tensor | None, compiled: bool) -> torch.Tensor:
        """One UNet call over at most the largest bucket's rows; the result's first rows are theirs."""
        rows = latents.shape[0]
        device, dtype = self.device, self.dtype
        latents = latents.to(device=device, dtype=dtype)
        timesteps = timesteps.to(device=device, dtype=torch.long)
        inputs = [embeddings] + ([] if added is None else [added])
        inputs = [x.to(device=device, dtype=dtype) for x in inputs]
        pad = self.bucket(rows) - rows if compiled or self.pad_eager else 0
        if pad > 0:
            latents = torch.cat([latents, latents.new_zeros((pad, *latents.shape[1:]))])
            timesteps = torch.cat([timesteps, timesteps.new_zeros(pad)])
            inputs = [torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) for x in inputs]
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        if compiled and pad == 0:
            # Fresh tensors, never views of the caller's: Dynamo guards on whether an input is a view,
            # so a view here (warm-up's full-bucket slices) and a padded copy (a request's) would be
            # two compiles, the second one in the middle of serving.
            latents, timesteps = latents.clone(memory_format=layout), timesteps.clone()
            inputs = [x.clone() for x in inputs]
        latents = latents.contiguous(memory_format=layout)
        timesteps, inputs = timesteps.contiguous(), [x.contiguous() for x in inputs]
        extra = added_cond_kwargs(inputs[1] if len(inputs) > 1 else None)
        if not compiled:
            return self.unet(latents, timesteps, encoder_hidden_states=inputs[0], return_dict=False, **extra)[0][:rows]
        for tensor in (latents, timesteps, *inputs):
            torch._dynamo.mark_dynamic(tensor, 0)  # one graph for every bucket (see the module docstring)
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs were copied out already
        return self._compiled(latents, timesteps, encoder_hidden_states=inputs[0], return_dict=False, **extra)[0][:rows]

    @torch.no_grad()
    def warm_up(self) -> float:
        """Run every bucket once at ``latent_size`` (compiling, and on CUDA recording each bucket's
        graph); an eager runner makes one call of the smallest bucket. Returns (and keeps in
        ``warm_up_seconds``) the seconds it took. Call it on the thread that will make the calls."""
        if self.latent_size is None:
            raise ValueError("warm_up needs the runner's latent_size (the native latent height and width)")
        started = time.perf_counter()
        config = self.unet.config
        cuda = self.device.type == "cuda"
        for rows in self.buckets if self.compiled else self.buckets[:1]:
            latents = torch.zeros((rows, config.in_channels, *self.latent_size), device=self.device)
            timesteps = torch.zeros(rows, dtype=torch.long, device=self.device)
            embeddings = torch.zeros((rows, MAX_LENGTH, config.cross_attention_dim), device=self.device)
            added = torch.zeros((rows, self.added_width), device=self.device) if self.added_width else None
            for _ in range(2 if cuda and self.compiled else 1):  # CUDA graph trees record a shape's second call
                self(latents, timesteps, embeddings, added)
        if cuda:
            torch.cuda.synchronize(self.device)
        self.warm_up_seconds = time.perf_counter() - started
        return self.warm_up_seconds
