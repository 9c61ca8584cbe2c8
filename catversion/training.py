"""Residual optimization for one or many concepts: the reference recipe, packed into one UNet batch.

Read top to bottom (the recipe, TrainConfig, is in recipe.py): a concept's cached data (latents of each image and
its flip, encoded once), then the packed loop. Packing is exact: a concept's loss depends only on
its own residual and its own random stream, so training it in a pack or alone gives the same result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from . import __version__
from .encoder import ResidualTextEncoder, patched_layers
from .images import ImageError, decode_image, read_source, to_tensor
from .models import BaseModel
from .recipe import (  # noqa: F401  (the recipe's names are part of this module's API too)
    Concept,
    ImageSource,
    TrainConfig,
    TrainingTarget,
    image_digest,
    training_fingerprint,
)
from .residual import Residual

LOSS_WINDOW = 50  # final_loss is the mean of the last LOSS_WINDOW steps (single steps are noisy)
SYNC_EVERY = 10  # steps between loss read-backs when no concept ends or checkpoints


@dataclass
class TrainResult:
    concept_id: str
    status: str  # "ok" | "failed"
    residual: Residual | None = None
    error: str | None = None
    steps: int = 0
    final_loss: float | None = None
    seconds: float = 0.0


@dataclass
class Progress:
    """Reported after every packed step."""

    steps_done: int  # concept-steps finished, summed over concepts
    steps_total: int | None  # None while concepts are still arriving
    concepts_done: int
    concepts_failed: int
    active: int  # concepts in the current pack
    loss: float  # mean over the pack of this step's per-concept losses
    images_per_s: float  # training rows per second since the start


def training_target(base: BaseModel, resolution: int | None = None, layers: Sequence[int] | None = None,
                    tokens: int = 1) -> TrainingTarget:
    """What residuals trained on ``base`` are trained against (for the training fingerprint).

    Needs only the base model's text encoder, so the batch driver can call it without the UNet.
    """
    depth = base.text_encoder.config.num_hidden_layers
    return TrainingTarget(base.fingerprint, resolution or base.resolution, patched_layers(depth, layers), int(tokens))


class _ConceptState:
    """A concept in a pack: cached latents, its residual and optimizer, and its own RNG stream."""

    def __init__(self, concept: Concept, mean: torch.Tensor, std: torch.Tensor, prefix_hidden: torch.Tensor,
                 fingerprint: str, residual_shape: tuple[int, ...], device: torch.device):
        cfg = concept.config
        self.concept, self.cfg = concept, cfg
        self.mean, self.std = mean, std  # [N, 2 (flip), C, h, w] posterior of each image and its flip
        self.prefix_hidden = prefix_hidden  # [1, S, D] states entering the first patched layer
        self.fingerprint = fingerprint
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        init = torch.randn(residual_shape, generator=self.generator, device=device, dtype=torch.float32)
        self.residual = torch.nn.Parameter(init * cfg.init_std)
        self.optimizer = torch.optim.AdamW(
            [self.residual], lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        self.step = 0
        self.losses: list[float] = []
        self.unread: list[torch.Tensor] = []  # this concept's losses not yet copied to the host
        self.order = torch.empty(0, dtype=torch.long)
        self.started = time.perf_counter()

    def sample(self, scheduler: DDPMScheduler, scaling: float):
        """This step's rows: noisy latents, timesteps and target noise, all from this concept's RNG."""
        g, n, b = self.generator, self.mean.shape[0], self.cfg.batch_size
        picks = []
        while len(picks) < b:  # epochs of shuffled images, as the reference data loader does
            if self.order.numel() == 0:
                self.order = torch.randperm(n, generator=g, device=g.device)
            picks.append(self.order[0])
            self.order = self.order[1:]
        index = torch.stack(picks)
        flip = (torch.rand(b, generator=g, device=g.device) < self.cfg.flip_p).long()
        mean, std = self.mean[index, flip], self.std[index, flip]
        latents = (mean + std * torch.randn(mean.shape, generator=g, device=g.device)) * scaling
        noise = torch.randn(latents.shape, generator=g, device=g.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g, device=g.device)
        return scheduler.add_noise(latents, noise, timesteps), timesteps, noise

    def snapshot(self, base: BaseModel, layers: Sequence[int], final: bool) -> Residual:
        window = self.losses[-LOSS_WINDOW:]
        meta = {
            "concept_id": self.concept.concept_id,
            "class_word": self.concept.class_word,
            "caption": self.concept.prompt,
            "base_model": base.model_id,
            "base_fingerprint": base.fingerprint,
            **self.cfg.hyperparameters(),
            "steps": self.step,
            "final_loss": sum(window) / len(window) if window else None,
            "training_fingerprint": self.fingerprint,
            "trainer": f"catversion {__version__}",
        }
        if not final:
            meta["checkpoint_of_steps"] = self.cfg.steps
        return Residual(self.residual.detach(), layers, self.cfg.prefix_logit_bias, meta)


class ResidualTrainer:
    """Trains residuals against one frozen base model, ``pack`` concepts per UNet batch.

    The base model is loaded once by the caller and shared by every concept. ``resolution`` is the
    training image size (default: the model's native size, 512 for SD1.x).
    """

    def __init__(self, base: BaseModel, *, pack: int = 4, layers: Sequence[int] | None = None, tokens: int = 1,
                 resolution: int | None = None):
        for part in ("tokenizer", "text_encoder", "unet", "vae"):
            if getattr(base, part) is None:
                raise ValueError(f"training needs the base model's {part}; load it with that component")
        if pack < 1:
            raise ValueError(f"pack must be >= 1, got {pack}")
        self.base = base
        self.pack = pack
        self.encoder = ResidualTextEncoder(base.text_encoder, layers=layers, tokens=tokens)
        self.scheduler = DDPMScheduler.from_config(base.scheduler_config)
        self.resolution = resolution or base.resolution
        if self.resolution % base.vae_scale_factor:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the VAE factor {base.vae_scale_factor}")
        self.device = base.device
        self.target = training_target(base, self.resolution, self.encoder.layers, self.encoder.tokens)
        self._prefix_cache: dict[str, torch.Tensor] = {}

    # ---- per-concept preparation (once per concept, not per step) -------------------------------
    def fingerprint(self, concept: Concept, image_bytes: Sequence[bytes]) -> str:
        return training_fingerprint(concept, [image_digest(b) for b in image_bytes], self.target)

    def _prefix_hidden(self, caption: str) -> torch.Tensor:
        if caption not in self._prefix_cache:
            with torch.no_grad():
                ids = self.base.tokenize([caption])
                self._prefix_cache[caption] = self.encoder.pre_patch_states(ids)
        return self._prefix_cache[caption]

    @torch.no_grad()
    def _encode_latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior mean/std of each image and its horizontal flip: [N, 2, C, h, w] each."""
        both = torch.stack([pixels, pixels.flip(-1)], dim=1).flatten(0, 1)
        means, stds = [], []
        vae = self.base.vae
        for chunk in both.split(8):
            dist = vae.encode(chunk.to(self.device, vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        shape = (pixels.shape[0], 2) + means[0].shape[1:]
        return torch.cat(means).view(shape), torch.cat(stds).view(shape)

    def prepare(self, concept: Concept) -> _ConceptState:
        if not concept.images:
            raise ImageError(f"concept {concept.concept_id!r} has no images")
        names = list(concept.image_names or [None] * len(concept.images))
        raw = [read_source(src, name) for src, name in zip(concept.images, names)]
        pixels = torch.stack([to_tensor(decode_image(data, label), self.resolution) for data, label in raw])
        mean, std = self._encode_latents(pixels)
        fingerprint = self.fingerprint(concept, [data for data, _ in raw])
        return _ConceptState(concept, mean, std, self._prefix_hidden(concept.prompt), fingerprint,
                             self.encoder.residual_shape, self.device)

    # ---- the packed loop -----------------------------------------------------------------------
    def train(
        self,
        concepts: Iterable[Concept],
        on_result: Callable[[TrainResult], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        on_checkpoint: Callable[[str, int, Residual], None] | None = None,
    ) -> list[TrainResult]:
        """Train every concept; a concept that fails (bad image, diverged loss) never stops the others.

        ``concepts`` may be a lazy iterator: a slot is refilled from it as soon as a concept ends.
        ``on_result`` is called the moment each concept finishes (write its residual there).
        """
        pending: Iterator[Concept] = iter(concepts)
        total = sum(c.config.steps for c in concepts) if isinstance(concepts, Sequence) else None
        results: list[TrainResult] = []
        active: list[_ConceptState] = []
        steps_done, rows_done, started = 0, 0, time.perf_counter()

        def finish(result: TrainResult) -> None:
            results.append(result)
            if on_result is not None:
                on_result(result)

        def refill() -> None:
            while len(active) < self.pack:
                concept = next(pending, None)
                if concept is None:
                    return
                try:
                    active.append(self.prepare(concept))
                except (ImageError, ValueError) as exc:
                    finish(TrainResult(concept.concept_id, "failed", error=str(exc)))

        refill()
        iteration = 0
        while active:
            losses = self._step(active)
            iteration += 1
            rows_done += sum(s.cfg.batch_size for s in active)
            for state, loss in zip(active, losses):
                state.step += 1
                state.unread.append(loss)
                steps_done += 1
            # Losses stay on the device until something needs them (a concept's end or checkpoint, or
            # every SYNC_EVERY steps for progress and divergence), so the GPU never waits for the host.
            due = any(s.step >= s.cfg.steps or s.step in s.cfg.save_steps for s in active)
            if not due and iteration % SYNC_EVERY:
                continue
            latest = self._read_losses(active)
            for state in list(active):
                bad = next((i for i, x in enumerate(state.losses) if not math.isfinite(x)), None)
                if bad is not None:
                    active.remove(state)
                    finish(TrainResult(
                        state.concept.concept_id, "failed", steps=state.step,
                        error=f"loss became non-finite at step {bad + 1} (learning rate "
                        f"{state.cfg.learning_rate} too high?)", seconds=time.perf_counter() - state.started,
                    ))
                    continue
                if state.step in state.cfg.save_steps and state.step < state.cfg.steps and on_checkpoint:
                    on_checkpoint(state.concept.concept_id, state.step, state.snapshot(self.base, self.encoder.layers, False))
                if state.step >= state.cfg.steps:
                    active.remove(state)
                    residual = state.snapshot(self.base, self.encoder.layers, True)
                    finish(TrainResult(state.concept.concept_id, "ok", residual=residual, steps=state.step,
                                       final_loss=residual.meta["final_loss"],
                                       seconds=time.perf_counter() - state.started))
            refill()
            if on_progress is not None:
                elapsed = max(time.perf_counter() - started, 1e-9)
                finite = [x for x in latest if math.isfinite(x)]
                on_progress(Progress(
                    steps_done=steps_done, steps_total=total,
                    concepts_done=sum(r.status == "ok" for r in results),
                    concepts_failed=sum(r.status == "failed" for r in results),
                    active=len(active), loss=sum(finite) / len(finite) if finite else math.nan,
                    images_per_s=rows_done / elapsed,
                ))
        return results

    @staticmethod
    def _read_losses(active: list["_ConceptState"]) -> list[float]:
        """Move every concept's unread losses to the host in one transfer; returns each one's latest."""
        unread = [loss for state in active for loss in state.unread]
        values = torch.stack(unread).cpu().tolist() if unread else []
        latest = []
        for state in active:
            taken, values = values[: len(state.unread)], values[len(state.unread):]
            state.losses += taken
            state.unread.clear()
            latest.append(taken[-1] if taken else (state.losses[-1] if state.losses else math.nan))
        return latest

    def _step(self, active: list[_ConceptState]) -> list[torch.Tensor]:
        """One optimizer step for every concept in the pack, through one UNet forward/backward."""
        noisy, timesteps, noise, residuals, biases, hidden, sizes = [], [], [], [], [], [], []
        for state in active:
            x, t, n = state.sample(self.scheduler, self.base.vae_scaling_factor)
            b = x.shape[0]
            noisy.append(x)
            timesteps.append(t)
            noise.append(n)
            residuals += [state.residual] * b
            biases += [state.cfg.prefix_logit_bias] * b
            hidden.append(state.prefix_hidden.expand(b, -1, -1))
            sizes.append(b)
        unet = self.base.unet
        # Conditioning from the cached pre-patch states: only the patched layers run per step.
        cond = self.encoder.forward_patched(torch.cat(hidden), residuals, prefix_logit_bias=biases)
        pred = unet(torch.cat(noisy).to(unet.dtype), torch.cat(timesteps), encoder_hidden_states=cond.to(unet.dtype)).sample
        per_row = (pred.float() - torch.cat(noise)).square().mean(dim=(1, 2, 3))
        per_concept = torch.stack([rows.mean() for rows in per_row.split(sizes)])
        # loss = sum of per-concept means: each residual gets exactly the gradient it gets alone. A
        # diverged concept is masked out of the sum (its NaNs stay in its own rows) and dropped once read.
        per_concept.nan_to_num(0.0, 0.0, 0.0).sum().backward()
        for state in active:
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
        return list(per_concept.detach().unbind())


def train_residual(base: BaseModel, images: Sequence[ImageSource], class_word: str, config: TrainConfig | None = None,
                   *, caption: str | None = None, concept_id: str = "concept",
                   on_progress: Callable[[Progress], None] | None = None,
                   on_checkpoint: Callable[[str, int, Residual], None] | None = None) -> Residual:
    """Train one concept; raises ValueError (ImageError included) when it cannot be trained."""
    concept = Concept(concept_id, list(images), class_word, caption, config or TrainConfig())
    result = ResidualTrainer(base, pack=1).train([concept], on_progress=on_progress, on_checkpoint=on_checkpoint)[0]
    if result.status != "ok":
        raise ValueError(f"concept {concept_id!r}: {result.error}")
    return result.residual
