"""Denoising execution: one step for a set of samples (UNet, guidance, DDIM update, previews) and the VAE decode.

`ImageGenerator` (a whole batch, every step) and `StepBatcher` (whichever samples catversion/scheduler.py
puts together) both sample through an `Executor`, so this module is the one place in catversion that
mixes classifier-free guidance (`guide`) and the one that turns latents into images (`Executor.decode`).
It decides nothing about which samples share a step.

A step's UNet call holds each sample's rows, ``[uncond, cond]`` for a guided sample and ``[cond]`` at
guidance 1, made through the generator's `UNetRunner` (catversion/unetrun.py), which pads them to its
row buckets. Each sample keeps its own DDIM schedule, so samples at different timesteps share a call;
their DDIM updates are one vectorized `ddim_step` (diffusers' own ``step``, sample by sample, for the
configs `vectorizable` refuses).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler

from .models import BaseModel
from .unetrun import UNetRunner

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
DECODE_CHUNK = 4  # latents per VAE call: bounds the decoder's activation memory at 512 px


def vectorizable(config: Mapping) -> bool:
    """Whether ``ddim_step`` computes what ``DDIMScheduler.step`` does for this scheduler config
    (no thresholding, no clipping of the predicted sample, a known prediction type)."""
    return (not config.get("thresholding", False) and not config.get("clip_sample", False)
            and config.get("prediction_type", "epsilon") in PREDICTION_TYPES)


def ddim_step(model_output: torch.Tensor, timesteps: torch.Tensor, prev_timesteps: torch.Tensor, sample: torch.Tensor,
              alphas_cumprod: torch.Tensor, final_alpha_cumprod: torch.Tensor | float,
              prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """``DDIMScheduler.step(eta=0)`` for a batch whose samples are at different timesteps.

    Row i of ``model_output`` and ``sample`` [B, C, h, w] steps from ``timesteps[i]`` to
    ``prev_timesteps[i]`` (diffusers: ``t - num_train_timesteps // num_inference_steps``; negative
    means the end of the schedule, ``final_alpha_cumprod``). ``alphas_cumprod`` is the scheduler's,
    on ``sample``'s device. Returns (prev_sample, pred_original_sample), each [B, C, h, w], with the
    scheduler's arithmetic in its order, so each row equals what ``step`` gives that sample alone.
    Thresholding and clip_sample are not done here (see ``vectorizable``).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} must be one of {', '.join(PREDICTION_TYPES)}")
    shape = (-1,) + (1,) * (sample.dim() - 1)
    alpha_prod_t = alphas_cumprod[timesteps].reshape(shape)
    final = torch.as_tensor(final_alpha_cumprod, dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
    alpha_prod_t_prev = torch.where(prev_timesteps >= 0, alphas_cumprod[prev_timesteps.clamp(min=0)], final).reshape(shape)
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
    else:
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    pred_sample_direction = (1 - alpha_prod_t_prev) ** (0.5) * pred_epsilon  # eta = 0: no variance term
    prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    return prev_sample, pred_original_sample


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance: the unconditional prediction moved ``scale`` times towards the
    conditional one (Ho & Salimans; ``scale`` [S, 1, 1, 1] or a number)."""
    return uncond + scale * (cond - uncond)


def preview_steps(steps: int, count: int) -> dict[int, int]:
    """{steps done: preview index} for ``count`` previews evenly spaced over ``steps`` steps (none
    at the start or at the end, where the finished image comes)."""
    due = sorted({round(steps * i / (count + 1)) for i in range(1, count + 1)} - {0, steps})
    return {step: n for n, step in enumerate(due)}


@dataclass(eq=False)
class Sample:
    """One image's denoising state; an `Executor` advances it one step at a time."""

    latents: torch.Tensor  # [1, C, h, w]: the noisy latent after ``index`` steps
    cond: torch.Tensor  # [1, 77, D]: the prompt's embedding (with the residual)
    uncond: torch.Tensor | None  # [1, 77, D]: the negative prompt's (no residual); None at guidance 1
    guidance: float
    steps: int
    previews: dict[int, int] = field(default_factory=dict)  # steps done -> preview index (preview_steps)
    index: int = 0  # steps done
    # SDXL's added conditioning rows [1, P + 6] (pooled embeds, time ids) of each branch; None for other families
    added: torch.Tensor | None = None
    uncond_added: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.index >= self.steps


@dataclass
class StepResult:
    """What one ``Executor.step`` produced besides the samples' new latents."""

    previews: list[tuple[int, int, torch.Tensor]]  # (position in the step's samples, preview index,
    #                                                  predicted clean latent [1, C, h, w])
    unet_seconds: float  # the UNet call's wall time (the device's time only when the step synchronized)


class Executor:
    """Runs denoising steps for `Sample`s of one base model through its `UNetRunner`.

    Not thread-safe: one thread steps at a time (with a compiled runner on CUDA, the thread that
    warmed it up: its CUDA graphs belong to that thread).
    """

    def __init__(self, base: BaseModel, runner: UNetRunner):
        self.base = base
        self.runner = runner
        reference = DDIMScheduler.from_config(base.scheduler_config)
        self.vectorized = vectorizable(reference.config)
        self._prediction_type = reference.config.prediction_type
        self._train_timesteps = reference.config.num_train_timesteps
        self._alphas_cumprod = reference.alphas_cumprod.to(base.device)
        self._final_alpha_cumprod = reference.final_alpha_cumprod.to(base.device)
        self._schedules: dict[int, tuple[DDIMScheduler, list[int]]] = {}  # steps -> (scheduler, timesteps)

    def sample(self, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float,
               steps: int, partial_images: int = 0, added: torch.Tensor | None = None,
               uncond_added: torch.Tensor | None = None) -> Sample:
        """A sample at step 0 from its seed noise [1, C, h, w] and embeddings [1, 77, D]; ``uncond`` is
        ignored at guidance 1 (that sample's UNet call has no unconditional row). ``added`` and
        ``uncond_added`` [1, P + 6]: each branch's added conditioning (SDXL; catversion/conditioning.py)."""
        scheduler, _ = self._schedule(steps)
        unguided = guidance == 1.0
        return Sample(latents=noise * scheduler.init_noise_sigma, cond=cond,
                      uncond=None if unguided else uncond, guidance=guidance, steps=steps,
                      previews=preview_steps(steps, partial_images), added=added,
                      uncond_added=None if unguided else uncond_added)

    @torch.no_grad()
    def step(self, samples: Sequence[Sample], synchronize: bool = False) -> StepResult:
        """One denoising step of every sample (each at its own timestep), in one UNet call.

        The samples' latents and indexes change only when the whole step succeeded. ``synchronize``
        waits for the device so that ``unet_seconds`` is the call's own time.
        """
        if any(sample.finished for sample in samples):
            raise ValueError("a finished sample cannot take another step")
        started = time.perf_counter()
        eps = self._guided_eps(samples)
        if synchronize and eps.device.type == "cuda":
            torch.cuda.synchronize(eps.device)
        seconds = time.perf_counter() - started
        latents, originals = self._ddim(samples, eps)
        previews = []
        for i, sample in enumerate(samples):
            sample.latents = latents[i : i + 1]
            sample.index += 1
            if sample.index in sample.previews:
                previews.append((i, sample.previews[sample.index], originals[i : i + 1]))
        return StepResult(previews, seconds)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] (float32, CPU) of latents [B, C, h, w], DECODE_CHUNK at a time."""
        base, vae = self.base, self.base.vae
        chunks = (latents / base.vae_scaling_factor).split(DECODE_CHUNK)
        return torch.cat([vae.decode(chunk.to(vae.dtype)).sample.float().cpu() for chunk in chunks]).clamp(-1, 1)

    def _schedule(self, steps: int) -> tuple[DDIMScheduler, list[int]]:
        if steps not in self._schedules:
            scheduler = DDIMScheduler.from_config(self.base.scheduler_config)
            scheduler.set_timesteps(steps, device=self.base.device)
            self._schedules[steps] = (scheduler, [int(t) for t in scheduler.timesteps.tolist()])
        return self._schedules[steps]

    def _timestep(self, sample: Sample) -> int:
        return self._schedule(sample.steps)[1][sample.index]

    def _guided_eps(self, samples: Sequence[Sample]) -> torch.Tensor:
        """Guided noise predictions [S, C, h, w] (float32), one per sample, from one UNet call."""
        latents, timesteps, embeddings, uncond_rows, cond_rows, guided, scales = [], [], [], [], [], [], []
        added = []
        for i, sample in enumerate(samples):
            # DDIM's scale_model_input is the identity: the latents go in as they are.
            rows = [sample.cond] if sample.uncond is None else [sample.uncond, sample.cond]
            added += [sample.added] if sample.uncond is None else [sample.uncond_added, sample.added]
            if sample.uncond is not None:
                uncond_rows.append(len(embeddings))
                guided.append(i)
                scales.append(sample.guidance)
            cond_rows.append(len(embeddings) + len(rows) - 1)
            for embedding in rows:
                latents.append(sample.latents)
                timesteps.append(self._timestep(sample))
                embeddings.append(embedding)
        device = self.base.device
        extra = [] if added[0] is None else [torch.cat(added)]  # SDXL's added conditioning rows
        eps = self.runner(torch.cat(latents), torch.tensor(timesteps, device=device), torch.cat(embeddings), *extra)
        out = eps[torch.tensor(cond_rows, device=device)]
        if guided:
            index = torch.tensor(guided, device=device)
            scale = torch.tensor(scales, dtype=eps.dtype, device=device).reshape(-1, 1, 1, 1)
            out[index] = guide(eps[torch.tensor(uncond_rows, device=device)], out[index], scale)
        return out

    def _ddim(self, samples: Sequence[Sample], eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sample's DDIM step (eta 0) from its own timestep: (latents, predicted clean latents)."""
        latents = torch.cat([sample.latents for sample in samples])
        if not self.vectorized:  # thresholding or clip_sample: the scheduler's own step, sample by sample
            outputs = []
            for i, sample in enumerate(samples):
                scheduler, timesteps = self._schedule(sample.steps)
                outputs.append(scheduler.step(eps[i : i + 1], timesteps[sample.index], latents[i : i + 1], eta=0.0))
            return (torch.cat([o.prev_sample for o in outputs]), torch.cat([o.pred_original_sample for o in outputs]))
        device = self.base.device
        timesteps = [self._timestep(sample) for sample in samples]
        prev = [t - self._train_timesteps // sample.steps for t, sample in zip(timesteps, samples)]
        return ddim_step(eps, torch.tensor(timesteps, device=device), torch.tensor(prev, device=device), latents,
                         self._alphas_cumprod, self._final_alpha_cumprod, self._prediction_type)
