"""Residual optimization for one or many concepts: the reference recipe, packed into one UNet batch.

Read top to bottom (the recipe, TrainConfig, is in recipe.py): a concept's cached data (latents of each image and
its flip, encoded once) and its resumable state, the background preparation of concepts, the trainer (sizing,
preparation, one packed step), then ``_PackedRun``, the loop of one ``train()`` call. Packing is exact: a
concept's loss depends only on its own residual and its own random stream, so training it in a pack or alone,
joining the pack early or late, gives the same result.

Resuming: ``_ConceptState.state_bytes()`` is everything a concept needs to continue exactly where it
stopped (residual, AdamW moments, step, losses, its RNG and its shuffled image order), tied to its concept
id and training fingerprint. ``train(state_every=k, on_state=...)`` hands it out every k of a concept's own
steps; ``train(resume=...)`` (or ``prepare(concept, resume=bytes)``) continues from it. A state that does
not belong to the concept (other fingerprint or id, other format, unreadable) is a ``StateMismatchError``;
``train()`` then starts that concept at step 0. Each ``TrainResult`` says which happened:
``resumed_from_step`` (0 = started fresh) and ``resume_problem`` (why an offered state was not used).

Prefetch: ``train(prefetch=n)`` reads, decodes and VAE-encodes up to n concepts ahead on a background
thread (a CUDA side stream on GPUs), so the packed loop refills from ready concepts and never waits for
input while it has work.

Speed (GPU): one fused AdamW step over every residual in the pack, each with its own moments, step count
and hyper-parameters (exactly what one ``torch.optim.AdamW(fused=True)`` per concept computes);
``compile=True`` runs the UNet through ``torch.compile`` with static shapes: the UNet batch is padded
with rows that no loss sees up to a bucket (powers of two and the full pack), so concepts joining,
leaving or having other batch sizes never trigger more than a handful of compiles. On CUDA the UNet
runs channels-last, and ``pack=None`` picks the pack from the GPU's free memory.

Precision: the residual path (the residual, its AdamW moments, the cached latents, the noise and the
loss) runs in the text encoder's dtype, which is float32 for every model a loader builds (models.py);
exactness tests build a float64 copy of the tiny model instead (tests/exactness.py), so packed = alone
and resumed = uninterrupted can be compared to float64 rounding. The UNet and VAE run in the base
model's precision (``BaseModel.precision``), which is recorded in each residual and is part of its
training fingerprint. Under fp16 the loss is scaled by FP16_LOSS_SCALE so that small gradients survive
the UNet's backward pass.
"""

from __future__ import annotations

import io
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from torch.optim.adamw import adamw as adamw_step  # the functional form of torch.optim.AdamW

from . import __version__
from .conditioning import Conditioner, added_cond_kwargs, added_width
from .images import ImageError, decode_image, read_source, to_tensor
from .models import BaseModel
from .recipe import (  # noqa: F401  (the recipe's names are part of this module's API too)
    Concept,
    ImageSource,
    TrainConfig,
    TrainingTarget,
    image_digest,
    layers_key,
    training_fingerprint,
)
from .residual import Residual
from .unetrun import quiet_known_compile_warnings

LOSS_WINDOW = 50  # final_loss is the mean of the last LOSS_WINDOW steps (single steps are noisy)
SYNC_EVERY = 10  # steps between loss read-backs when no concept ends or checkpoints
STATE_FORMAT = 1  # version of _ConceptState.state_bytes(); a state of another version is not resumed
CPU_PACK = 4  # pack=None on the CPU
MAX_AUTO_PACK = 16  # pack=None on a GPU never goes beyond this (SD1.5: 32 rows is at the GPU's ceiling)
AUTO_PACK_MEMORY = 0.85  # share of the GPU's free memory pack=None plans to use
FP16_LOSS_SCALE = 2.0**12  # fp16 only: a static loss scale (bf16 and fp32 need none)
# Relative gradient error allowed between the compiled and the eager UNet (rounding differs with the precision);
# fp64 is the exactness tests' float64 model (models.TEST_DTYPES), held to fp32's bound.
COMPILE_CHECK_TOLERANCE = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.05, "fp64": 1e-3}

log = logging.getLogger(__name__)


class StateMismatchError(ValueError):
    """A saved training state that cannot continue this concept (the message says why): ignore and delete it."""


@dataclass
class TrainResult:
    concept_id: str
    status: str  # "ok" | "failed"
    residual: Residual | None = None
    error: str | None = None
    steps: int = 0
    final_loss: float | None = None
    seconds: float = 0.0
    resumed_from_step: int = 0  # the step its restored training state was at; 0 = started fresh
    resume_problem: str | None = None  # why a saved state offered by resume() was not used (it started at step 0)


@dataclass
class Progress:
    """Reported after every packed step."""

    steps_done: int  # concept-steps finished, summed over concepts
    steps_total: int | None  # None while concepts are still arriving (resumed concepts count only what is left)
    concepts_done: int
    concepts_failed: int
    active: int  # concepts in the current pack
    loss: float  # mean over the pack of this step's per-concept losses
    images_per_s: float  # training rows per second since the start


def training_target(base: BaseModel, resolution: int | None = None, layers: Sequence | None = None,
                    tokens: int = 1, precision: str | None = None) -> TrainingTarget:
    """What residuals trained on ``base`` are trained against (for the training fingerprint).

    Needs only the base model's text encoders, so the batch driver can call it without the UNet;
    ``precision`` (default: the base model's) is the UNet/VAE precision the training runs at. ``layers``
    as `Conditioner` takes them (None: the family's default).
    """
    family = base.family
    depths = [base.text_encoders[spec.name].config.num_hidden_layers for spec in family.encoders]
    sets = family.resolve_layers(layers, depths)
    return TrainingTarget(base.fingerprint, resolution or base.resolution, layers_key(sets), int(tokens),
                          precision or base.precision)


class _ConceptState:
    """A concept in a pack: cached latents, its residual and AdamW moments, and its own RNG stream."""

    def __init__(self, concept: Concept, mean: torch.Tensor, std: torch.Tensor,
                 prefix: tuple[list[torch.Tensor], list[torch.Tensor]], fingerprint: str,
                 residual_shape: tuple[int, ...], device: torch.device, sizes: torch.Tensor | None = None):
        cfg = concept.config
        self.concept, self.cfg = concept, cfg
        self.mean, self.std = mean, std  # [N, 2 (flip), C, h, w] posterior of each image and its flip
        # Per text encoder: [1, S, D] states entering its first patched layer, and the caption's token ids [1, S]
        self.prefix_hidden, self.prefix_ids = prefix
        self.sizes = sizes  # [N, 2] each image's original (height, width): SDXL's time ids
        self.fingerprint = fingerprint
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        # The residual path's dtype is the text encoder's (that of its cached states): see the module docstring.
        # Random numbers are drawn in float32 whatever that dtype (_draw), so a float64 run is the same computation.
        init = _draw(residual_shape, self.generator, self.prefix_hidden[0].dtype)
        self.residual = torch.nn.Parameter(init * cfg.init_std)
        # AdamW state as torch.optim.AdamW(fused=True) keeps it: {"step", "exp_avg", "exp_avg_sq"},
        # created at the first step (the trainer's one fused update serves every concept in the pack).
        self.moments: dict[str, torch.Tensor] = {}
        self.step = 0
        self.losses: list[float] = []
        self.unread: list[torch.Tensor] = []  # this concept's losses not yet copied to the host
        self.order = torch.empty(0, dtype=torch.long, device=self.generator.device)
        self.started = time.perf_counter()
        self.ready: torch.cuda.Event | None = None  # set when prepared on a CUDA side stream (prefetch)
        self.resumed_from = 0  # the step train() continued this concept from (set by _prepare_to_train)
        self.resume_problem: str | None = None  # why an offered saved state was not used

    def sample(self, scheduler: DDPMScheduler, scaling: float):
        """This step's rows: noisy latents, timesteps, the target (the noise, or for a v-prediction model the
        velocity) and the images' indexes, all from this concept's RNG."""
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
        latents = (mean + std * _draw(mean.shape, g, mean.dtype)) * scaling
        noise = _draw(latents.shape, g, mean.dtype)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g, device=g.device)
        target = noise
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        return scheduler.add_noise(latents, noise, timesteps), timesteps, target, index

    def result(self, status: str, residual: Residual | None = None, error: str | None = None) -> TrainResult:
        """This concept's outcome as train() reports it, at its current step."""
        return TrainResult(self.concept.concept_id, status, residual=residual, error=error, steps=self.step,
                           final_loss=residual.meta["final_loss"] if residual is not None else None,
                           seconds=time.perf_counter() - self.started, resumed_from_step=self.resumed_from,
                           resume_problem=self.resume_problem)

    @property
    def optimizer_group(self) -> tuple:
        """Concepts with equal AdamW hyper-parameters share one fused update."""
        cfg = self.cfg
        return (cfg.learning_rate, tuple(cfg.adam_betas), cfg.adam_eps, cfg.weight_decay)

    def snapshot(self, base: BaseModel, conditioner: Conditioner, final: bool) -> Residual:
        window = self.losses[-LOSS_WINDOW:]
        meta = {
            "concept_id": self.concept.concept_id,
            "class_word": self.concept.class_word,
            "caption": self.concept.prompt,
            "base_model": base.model_id,
            "base_family": base.family.name,
            "base_fingerprint": base.fingerprint,
            "precision": base.precision,
            **self.cfg.hyperparameters(),
            "steps": self.step,
            "final_loss": sum(window) / len(window) if window else None,
            "training_fingerprint": self.fingerprint,
            "trainer": f"catversion {__version__}",
        }
        if not final:
            meta["checkpoint_of_steps"] = self.cfg.steps
        return conditioner.residual(self.residual.detach(), self.cfg.prefix_logit_bias, meta)

    # ---- resumable state -----------------------------------------------------------------------
    def state_bytes(self) -> bytes:
        """Everything needed to continue this concept exactly (a host sync: call it at save steps only).

        Tensors and plain Python values only, so ``torch.load(..., weights_only=True)`` reads it.
        """
        if self.unread:
            self.losses += torch.stack(self.unread).cpu().tolist()
            self.unread.clear()
        moments = self.moments
        payload = {
            "format": STATE_FORMAT,
            "concept_id": self.concept.concept_id,
            "fingerprint": self.fingerprint,
            "step": int(self.step),
            "losses": torch.tensor(self.losses, dtype=torch.float64),  # float64 holds each host float exactly
            "residual": _host(self.residual.detach()),
            "optimizer": {key: _host(value) if isinstance(value, torch.Tensor) else value
                          for key, value in moments.items()},
            "generator": self.generator.get_state(),
            "order": _host(self.order),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

    def restore(self, data: bytes) -> None:
        """Continue from ``state_bytes()`` output; StateMismatchError (and no change) when it does not fit."""
        try:
            payload = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, not a torch file, or not weights-only: all just unreadable
            raise StateMismatchError(f"unreadable training state ({type(exc).__name__}: {exc})") from exc
        if not isinstance(payload, dict):
            raise StateMismatchError(f"unreadable training state (a {type(payload).__name__}, not a dict)")
        name = self.concept.concept_id
        if payload.get("format") != STATE_FORMAT:
            raise StateMismatchError(f"training state format {payload.get('format')!r} is not {STATE_FORMAT}")
        if payload.get("concept_id") != name:
            raise StateMismatchError(f"training state is for concept {payload.get('concept_id')!r}, not {name!r}")
        if payload.get("fingerprint") != self.fingerprint:
            raise StateMismatchError(f"training state has fingerprint {payload.get('fingerprint')!r}, but concept "
                                     f"{name!r} now has {self.fingerprint!r} (its images or recipe changed)")
        try:
            step, losses, residual = payload["step"], payload["losses"], payload["residual"]
            moments, rng, order = payload["optimizer"], payload["generator"], payload["order"]
            problem = _state_problem(self, step, losses, residual, moments, order)
            scratch = torch.Generator(device=self.generator.device)
            scratch.set_state(rng)  # checks the RNG state before ours is touched
        except StateMismatchError:
            raise
        except Exception as exc:
            raise StateMismatchError(f"malformed training state ({type(exc).__name__}: {exc})") from exc
        if problem:
            raise StateMismatchError(f"malformed training state: {problem}")
        # Checked: from here on nothing fails, so the state is either fully restored or untouched.
        with torch.no_grad():
            self.residual.copy_(residual)
        device = self.residual.device
        # The fused update keeps its step count as a float32 tensor beside the residual.
        self.moments = {key: moments[key].to(device=device, dtype=torch.float32 if key == "step" else self.residual.dtype)
                        for key in ("step", "exp_avg", "exp_avg_sq") if moments}
        self.generator.set_state(rng)
        self.order = order.to(self.generator.device)
        self.step = step
        self.losses = losses.tolist()
        self.unread = []

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Tell the CUDA allocator that ``stream`` uses this state's tensors (they were made on a side stream)."""
        tensors = [self.mean, self.std, *self.prefix_hidden, *self.prefix_ids, self.residual.data, self.order]
        tensors += [] if self.sizes is None else [self.sizes]
        tensors += [v for v in self.moments.values() if isinstance(v, torch.Tensor)]
        for tensor in tensors:
            if tensor.is_cuda:
                tensor.record_stream(stream)


def _draw(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal numbers from ``generator``, drawn in float32 (torch draws other values in another dtype)
    and converted exactly: the float64 exactness tests see the very numbers a float32 run sees."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(dtype)


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """A compact CPU copy (a view, such as the remaining image order, would otherwise save its whole storage)."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def _state_problem(state: _ConceptState, step, losses, residual, moments, order) -> str | None:
    """Why a loaded state's contents cannot be this concept's state, or None."""
    steps, shape = state.cfg.steps, tuple(state.residual.shape)
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < steps:
        return f"step {step!r} is not in 0..{steps - 1}"
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() != step:
        return f"expected {step} losses"
    if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != shape or not residual.is_floating_point():
        return f"residual is not a float tensor of shape {shape}"
    if not isinstance(moments, dict):
        return "optimizer state is not a dict"
    if step == 0 and moments:
        return "optimizer moments at step 0"
    if step > 0:
        for key in ("exp_avg", "exp_avg_sq"):
            value = moments.get(key)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                return f"optimizer {key} is not a tensor of shape {shape}"
        if not isinstance(moments.get("step"), torch.Tensor) or int(moments["step"]) != step:
            return f"optimizer step is not {step}"
    n = state.mean.shape[0]
    if not isinstance(order, torch.Tensor) or order.dim() != 1 or order.dtype != torch.long:
        return "image order is not a 1-d long tensor"
    if order.numel() > n or (order.numel() and not (0 <= int(order.min()) and int(order.max()) < n)):
        return f"image order does not index {n} images"
    return None


class _Raised:
    """An exception from the prefetch thread, carried to the training loop to be raised there."""

    def __init__(self, error: BaseException):
        self.error = error


class _Prefetcher:
    """Pulls concepts from ``source`` and prepares them on a background thread, at most ``depth`` ahead.

    ``take`` hands over, in source order, prepared states and the failed results of concepts that could
    not be prepared; an exception of the source itself (or an unexpected one while preparing) is raised
    by ``take``. ``close`` stops the thread and joins it (after the item it is working on, if any).
    """

    _END = object()

    def __init__(self, source: Iterator[Concept], prepare: Callable[[Concept], _ConceptState], depth: int):
        self._source, self._prepare = source, prepare
        self._slots = threading.Semaphore(depth)  # prepared (or being prepared) and not yet taken
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="catversion-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while self._take_slot():
                try:
                    concept = next(self._source)  # may be slow: images can come over the network
                except StopIteration:
                    break
                try:
                    item: object = self._prepare(concept)
                except (ImageError, ValueError) as exc:
                    item = TrainResult(concept.concept_id, "failed", error=str(exc))
                self._ready.put(item)
        except BaseException as exc:  # the source's own failure: the caller of train() gets it
            self._ready.put(_Raised(exc))
            return
        self._ready.put(self._END)

    def _take_slot(self) -> bool:
        while not self._stop.is_set():
            if self._slots.acquire(timeout=0.05):
                return not self._stop.is_set()
        return False

    def take(self, block: bool) -> _ConceptState | TrainResult | None:
        """The next prepared item; None when none is ready (``block=False``) or the source is exhausted."""
        while not self._finished:
            try:
                item = self._ready.get(timeout=0.1) if block else self._ready.get_nowait()
            except queue.Empty:
                if not block:
                    return None
                if not self._thread.is_alive() and self._ready.empty():
                    raise RuntimeError("the prefetch thread ended without finishing the source")
                continue
            if item is self._END:
                self._finished = True
            elif isinstance(item, _Raised):
                self._finished = True
                raise item.error
            else:
                self._slots.release()
                return item
        return None

    def close(self) -> None:
        """Stop and join the thread. It stops between concepts: a source blocked inside ``next()`` is waited for."""
        self._stop.set()
        waited = 0
        self._thread.join(timeout=30)
        while self._thread.is_alive():
            waited += 30
            log.warning("train() is ending, but the concept source has not returned for %d s; waiting for it", waited)
            self._thread.join(timeout=30)


class ResidualTrainer:
    """Trains residuals against one frozen base model, ``pack`` concepts per UNet batch.

    The base model is loaded once by the caller and shared by every concept. ``resolution`` is the
    training image size (default: the model's native size, 512 for SD1.x). ``pack`` None picks it:
    CPU_PACK on the CPU; on a GPU as many concepts (of ``batch_size`` rows, up to MAX_AUTO_PACK) as
    AUTO_PACK_MEMORY of its free memory holds, measured with one UNet forward/backward.
    ``compile`` runs the UNet through ``torch.compile`` (static shapes, padded to row buckets);
    ``compile_seconds`` then adds up the steps that compiled. On CUDA the base model's UNet is
    switched to channels-last memory format (the same numbers, faster convolutions).
    """

    def __init__(self, base: BaseModel, *, pack: int | None = None, layers: Sequence | None = None,
                 tokens: int = 1, resolution: int | None = None, compile: bool = False, batch_size: int = 2):
        for part in ("tokenizer", "text_encoder", "unet", "vae"):
            if getattr(base, part) is None:
                raise ValueError(f"training needs the base model's {part}; load it with that component")
        if pack is not None and (not isinstance(pack, int) or isinstance(pack, bool) or pack < 1):
            raise ValueError(f"pack must be an integer >= 1 (or None to choose), got {pack!r}")
        self.base = base
        self.encoder = Conditioner(base, layers=layers, tokens=tokens)
        self.scheduler = DDPMScheduler.from_config(base.scheduler_config)
        self.resolution = resolution or base.resolution
        if self.resolution % base.vae_scale_factor:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the VAE factor {base.vae_scale_factor}")
        self.device = base.device
        self.target = training_target(base, self.resolution, self.encoder.layer_sets, self.encoder.tokens)
        self._prefix_cache: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._added_width = added_width(base.unet)  # SDXL: pooled embeds + time ids per row
        self._side_stream: torch.cuda.Stream | None = None  # background preparation's stream on CUDA
        self._channels_last = self.device.type == "cuda"
        if self._channels_last:
            base.unet.to(memory_format=torch.channels_last)
        self.pack = pack if pack is not None else self._auto_pack(batch_size)
        self.compiled = bool(compile)
        # The UNet as this trainer calls it (compiled or not); its inputs are padded when compiled.
        # Inductor's layout optimization is off: on torch 2.13 (CPU) it made the gradient to the
        # conditioning wrong; the UNet is channels-last on CUDA anyway. Every new bucket's first
        # compiled step is checked against eager (_compiled_gradients_match).
        if compile:
            quiet_known_compile_warnings()
        self.unet = (torch.compile(base.unet, dynamic=False, options={"layout_optimization": False})
                     if compile else base.unet)
        self._buckets_seen: set[int] = set()
        self._full_rows = 0  # the largest pack seen, in rows: a bucket of its own
        self.compile_seconds = 0.0  # steps that compiled a new row bucket (the first of each)
        self._loss_scale = FP16_LOSS_SCALE if base.unet.dtype == torch.float16 else 1.0

    # ---- sizing ----------------------------------------------------------------------------------
    def _auto_pack(self, batch_size: int) -> int:
        """Concepts per pack for this device: measured on CUDA, CPU_PACK elsewhere."""
        if self.device.type != "cuda":
            return CPU_PACK
        per_row = self.row_memory()
        free, _total = torch.cuda.mem_get_info(self.device)
        pack = max(1, min(MAX_AUTO_PACK, int(AUTO_PACK_MEMORY * free / (per_row * max(1, batch_size)))))
        log.info("pack %d: %.1f GiB free on %s, a training row takes about %.2f GiB", pack, free / 2**30,
                 torch.cuda.get_device_name(self.device), per_row / 2**30)
        return pack

    def row_memory(self, rows: int = 2) -> float:
        """Bytes of GPU memory one UNet row of training takes (peak over one eager forward/backward)."""
        unet, base = self.base.unet, self.base
        side = self.resolution // base.vae_scale_factor
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        latents = torch.randn(rows, unet.config.in_channels, side, side, device=self.device, dtype=unet.dtype)
        cond = torch.randn(rows, self.base.tokenizer.model_max_length, unet.config.cross_attention_dim,
                           device=self.device, dtype=unet.dtype, requires_grad=True)
        timesteps = torch.zeros(rows, dtype=torch.long, device=self.device)
        extra = added_cond_kwargs(self._zero_added(rows, unet.dtype))
        unet(latents, timesteps, encoder_hidden_states=cond, **extra).sample.float().square().mean().backward()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del latents, cond
        torch.cuda.empty_cache()
        return peak / rows

    def _bucket(self, rows: int) -> int:
        """The padded UNet batch for ``rows`` rows: the full pack, or the next power of two below it."""
        self._full_rows = max(self._full_rows, rows)
        bucket = 1 << (rows - 1).bit_length()
        return min(bucket, self._full_rows)

    # ---- per-concept preparation (once per concept, not per step) -------------------------------
    def fingerprint(self, concept: Concept, image_bytes: Sequence[bytes]) -> str:
        return training_fingerprint(concept, [image_digest(b) for b in image_bytes], self.target)

    def _zero_added(self, rows: int, dtype: torch.dtype) -> torch.Tensor | None:
        return torch.zeros(rows, self._added_width, device=self.device, dtype=dtype) if self._added_width else None

    def _prefix_hidden(self, caption: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per text encoder, the caption's states entering the first patched layer, and its token ids."""
        if caption not in self._prefix_cache:
            with torch.no_grad():
                ids = self.encoder.tokenize([caption])
                self._prefix_cache[caption] = (self.encoder.pre_patch_states(ids), ids)
        return self._prefix_cache[caption]

    @torch.no_grad()
    def _encode_latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior mean/std of each image and its horizontal flip: [N, 2, C, h, w] each."""
        both = torch.stack([pixels, pixels.flip(-1)], dim=1).flatten(0, 1)
        means, stds = [], []
        vae, dtype = self.base.vae, self.encoder.dtype  # latents are kept in the residual path's dtype
        for chunk in both.split(8):
            dist = vae.encode(chunk.to(self.device, vae.dtype)).latent_dist
            means.append(dist.mean.to(dtype))
            stds.append(dist.std.to(dtype))
        shape = (pixels.shape[0], 2) + means[0].shape[1:]
        return torch.cat(means).view(shape), torch.cat(stds).view(shape)

    def _fresh_state(self, concept: Concept) -> _ConceptState:
        if not concept.images:
            raise ImageError(f"concept {concept.concept_id!r} has no images")
        names = list(concept.image_names or [None] * len(concept.images))
        raw = [read_source(src, name) for src, name in zip(concept.images, names)]
        images = [decode_image(data, label) for data, label in raw]
        pixels = torch.stack([to_tensor(image, self.resolution) for image in images])
        mean, std = self._encode_latents(pixels)
        fingerprint = self.fingerprint(concept, [data for data, _ in raw])
        # SDXL's original size: each photo's (height, width) before the resize (no crop: images.to_tensor)
        sizes = (torch.tensor([[image.height, image.width] for image in images], dtype=torch.float32,
                              device=self.device) if self.base.family.time_ids else None)
        return _ConceptState(concept, mean, std, self._prefix_hidden(concept.prompt), fingerprint,
                             self.encoder.residual_shape, self.device, sizes)

    def prepare(self, concept: Concept, resume: bytes | None = None) -> _ConceptState:
        """Read, decode and encode a concept's images; ``resume`` (``state_bytes()`` output) continues it.

        Raises ImageError for unreadable images and StateMismatchError when ``resume`` is not a state
        of this concept as it is now (other fingerprint or id, other format, unreadable).
        """
        state = self._fresh_state(concept)
        if resume is not None:
            state.restore(resume)
        return state

    def _prepare_to_train(self, concept: Concept, resume: Callable[[Concept, str], bytes | None] | None) -> _ConceptState:
        """``prepare`` with the state ``resume`` returns for it; a state that does not fit is reported in
        ``resume_problem`` (and logged), and the concept starts at step 0."""
        state = self._fresh_state(concept)
        data = resume(concept, state.fingerprint) if resume is not None else None
        if data is not None:
            try:
                state.restore(data)
            except StateMismatchError as exc:  # restore() left the fresh state untouched
                log.warning("concept %r: not resuming its saved training state: %s", concept.concept_id, exc)
                state.resume_problem = str(exc)
        state.resumed_from = state.step
        return state

    def _prepare_in_background(self, concept: Concept,
                               resume: Callable[[Concept, str], bytes | None] | None) -> _ConceptState:
        """Runs on the prefetch thread: on CUDA, its own stream, and an event the loop waits for."""
        if self.device.type != "cuda":
            return self._prepare_to_train(concept, resume)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(self._side_stream):
            state = self._prepare_to_train(concept, resume)
            state.ready = torch.cuda.Event()
            state.ready.record(self._side_stream)
        return state

    def _adopt(self, state: _ConceptState) -> None:
        """Make a background-prepared state safe to use on the training (current) stream."""
        if state.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(state.ready)
            state.record_stream(stream)
            state.ready = None
        state.started = time.perf_counter()  # its seconds count from joining the pack

    # ---- the packed loop -----------------------------------------------------------------------
    def train(
        self,
        concepts: Iterable[Concept],
        on_result: Callable[[TrainResult], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        on_checkpoint: Callable[[str, int, Residual], None] | None = None,
        *,
        state_every: int = 0,
        on_state: Callable[[str, str, int, bytes], None] | None = None,
        resume: Callable[[Concept, str], bytes | None] | None = None,
        prefetch: int = 0,
    ) -> list[TrainResult]:
        """Train every concept; a concept that fails (bad image, diverged loss) never stops the others.

        ``concepts`` may be a lazy iterator: a slot is refilled from it as soon as a concept ends.
        ``on_result`` is called the moment each concept finishes (write its residual there).

        ``state_every`` > 0: every that many of a concept's own steps (not at its last step, where it
        finishes instead) ``on_state(concept_id, fingerprint, step, state_bytes)`` gets its resumable
        state. ``resume(concept, fingerprint)`` is asked for a saved state while preparing a concept
        (None: start at step 0); a state that does not match is logged and ignored, and the concept
        starts at step 0 (its next state replaces it). A resumed concept ends exactly as an
        uninterrupted one would. Each result says which happened: ``resumed_from_step`` is the step
        its restored state was at (0: started fresh), ``resume_problem`` why an offered state was not used.

        ``prefetch`` > 0: a background thread pulls concepts from ``concepts`` and prepares them (images,
        VAE latents, fingerprint, ``resume``), at most ``prefetch`` ahead; the loop takes ready ones
        without waiting and waits only when its pack is empty. Results are the same as without it. An
        exception raised by ``concepts`` itself is raised here; the thread ends before train() returns.
        Callbacks other than ``resume`` (and ``concepts`` itself) run on the calling thread.
        """
        if not isinstance(state_every, int) or isinstance(state_every, bool) or state_every < 0:
            raise ValueError(f"state_every must be an integer >= 0, got {state_every!r}")
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
            raise ValueError(f"prefetch must be an integer >= 0, got {prefetch!r}")
        callbacks = _Callbacks(on_result, on_progress, on_checkpoint, on_state, resume)
        return _PackedRun(self, concepts, callbacks, state_every, prefetch).run()

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
        first = bucket = None
        if self.compiled:
            bucket = self._bucket(sum(s.cfg.batch_size for s in active))
            if bucket not in self._buckets_seen:
                self._buckets_seen.add(bucket)
                first = time.perf_counter()
        losses = self._forward_backward(active, bucket, check=first is not None)
        self._adamw(active)
        if first is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - first
            self.compile_seconds += seconds
            log.info("compiled the UNet for %d training rows in %.1f s", bucket, seconds)
        return losses

    def _forward_backward(self, active: list[_ConceptState], bucket: int | None = None,
                          check: bool = False) -> list[torch.Tensor]:
        """The pack's losses, with the gradients in each residual; ``bucket``: pad the UNet batch to it."""
        noisy, timesteps, targets, residuals, biases, sizes, times = [], [], [], [], [], [], []
        hidden = [[] for _ in self.encoder.parts]
        ids = [[] for _ in self.encoder.parts]
        for state in active:
            x, t, target, index = state.sample(self.scheduler, self.base.vae_scaling_factor)
            b = x.shape[0]
            noisy.append(x)
            timesteps.append(t)
            targets.append(target)
            residuals += [state.residual] * b
            biases += [state.cfg.prefix_logit_bias] * b
            for part in range(len(hidden)):
                hidden[part].append(state.prefix_hidden[part].expand(b, -1, -1))
                ids[part].append(state.prefix_ids[part].expand(b, -1))
            if state.sizes is not None:
                times.append(self._time_ids(state.sizes[index]))
            sizes.append(b)
        dtype = self.base.unet.dtype
        # Conditioning from the cached pre-patch states: only the patched layers run per step, in the text
        # encoder's dtype (float32).
        conditioning = self.encoder.encode_patched([torch.cat(h) for h in hidden], [torch.cat(i) for i in ids],
                                                   residuals, prefix_logit_bias=biases)
        cond = conditioning.embeds.to(dtype)
        added = conditioning.added(torch.cat(times)) if times else None
        inputs = [cond] + ([] if added is None else [added.to(dtype)])
        latents, steps = torch.cat(noisy).to(dtype), torch.cat(timesteps)
        rows = latents.shape[0]
        if bucket is not None and bucket > rows:
            # Static shapes: pad to the bucket with rows that no loss sees (every UNet op is per sample).
            pad = bucket - rows
            latents = torch.cat([latents, latents.new_zeros((pad, *latents.shape[1:]))])
            steps = torch.cat([steps, steps.new_zeros(pad)])
            inputs = [torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) for x in inputs]
        # One memory format whatever the VAE handed back (strides are part of a compiled graph's guards).
        latents = latents.contiguous(memory_format=torch.channels_last if self._channels_last else torch.contiguous_format)
        cond, extra = inputs[0].contiguous(), added_cond_kwargs(inputs[1].contiguous() if len(inputs) > 1 else None)
        if check and not self._compiled_gradients_match(latents, steps, cond, extra):
            self.compiled, self.unet = False, self.base.unet
        pred = self.unet(latents, steps, encoder_hidden_states=cond, **extra).sample[:rows]
        per_row = (pred.to(self.encoder.dtype) - torch.cat(targets)).square().mean(dim=(1, 2, 3))
        per_concept = torch.stack([rows.mean() for rows in per_row.split(sizes)])
        # loss = sum of per-concept means: each residual gets exactly the gradient it gets alone. A
        # diverged concept is masked out of the sum (its NaNs stay in its own rows) and dropped once read.
        loss = per_concept.nan_to_num(0.0, 0.0, 0.0).sum()
        (loss * self._loss_scale if self._loss_scale != 1.0 else loss).backward()
        return list(per_concept.detach().unbind())

    def _time_ids(self, original: torch.Tensor) -> torch.Tensor:
        """SDXL's time ids [b, 6] for images of these original sizes [b, 2], resized whole (no crop) to the
        training resolution, as diffusers' SDXL training scripts compute them."""
        rows = original.shape[0]
        crop = original.new_zeros(rows, 2)
        target = original.new_tensor([self.resolution, self.resolution]).expand(rows, 2)
        return torch.cat([original, crop, target], dim=1)

    def _compiled_gradients_match(self, latents: torch.Tensor, steps: torch.Tensor, cond: torch.Tensor,
                                  extra: dict) -> bool:
        """Compare the compiled UNet's gradient to the conditioning with the eager one on this step's
        inputs (once per bucket, where it compiles); a mismatch is logged and training goes on eager.

        A guard against compiler bugs: Inductor's channels-last layout optimization once computed a
        gradient 40 % off on the CPU (so it is switched off for this compile, see __init__).
        """
        def gradient(unet) -> torch.Tensor:
            leaf = cond.detach().requires_grad_()
            out = unet(latents, steps, encoder_hidden_states=leaf, **extra).sample.float()
            return torch.autograd.grad(out.square().mean() * self._loss_scale, leaf)[0].float()

        expected, got = gradient(self.base.unet), gradient(self.unet)
        error = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
        tolerance = COMPILE_CHECK_TOLERANCE[self.base.precision]
        if math.isfinite(error) and error <= tolerance:
            return True
        log.warning("the compiled UNet's gradient differs from the eager one by %.3g (relative; tolerance %g) "
                    "for a batch of %d rows: training eager instead (torch %s)", error, tolerance,
                    latents.shape[0], torch.__version__)
        return False

    def _adamw(self, active: list[_ConceptState]) -> None:
        """One fused AdamW update per group of equal hyper-parameters (usually one for the whole pack).

        Each concept keeps its own moments and step count, so this is exactly what one
        ``torch.optim.AdamW(fused=True)`` per concept computes.
        """
        groups: dict[tuple, list[_ConceptState]] = {}
        for state in active:
            if state.residual.grad is not None:  # as torch.optim does, a parameter without a gradient is left alone
                groups.setdefault(state.optimizer_group, []).append(state)
        for (lr, (beta1, beta2), eps, weight_decay), states in groups.items():
            for state in states:
                if not state.moments:
                    zeros = torch.zeros_like(state.residual, memory_format=torch.preserve_format)
                    state.moments = {"step": torch.zeros((), dtype=torch.float32, device=state.residual.device),
                                     "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
                if self._loss_scale != 1.0:
                    state.residual.grad.div_(self._loss_scale)
            params = [s.residual for s in states]
            adamw_step(params, [p.grad for p in params], [s.moments["exp_avg"] for s in states],
                       [s.moments["exp_avg_sq"] for s in states], [], [s.moments["step"] for s in states],
                       fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay,
                       eps=eps, maximize=False)
            for param in params:
                param.grad = None


@dataclass(frozen=True)
class _Callbacks:
    """What one train() call reports to and asks for saved states (see ResidualTrainer.train)."""

    on_result: Callable[[TrainResult], None] | None
    on_progress: Callable[[Progress], None] | None
    on_checkpoint: Callable[[str, int, Residual], None] | None
    on_state: Callable[[str, str, int, bytes], None] | None
    resume: Callable[[Concept, str], bytes | None] | None


class _PackedRun:
    """One train() call: keep the pack full, step it, and at due steps settle each concept and report.

    Each iteration is one packed step (``_advance``). The host reads the losses back only at a due step
    (``_due``: a concept ends, checkpoints or saves its state) or every SYNC_EVERY steps; it then settles
    each concept (``_settle``: failed, finished, checkpoint, state), refills the pack and reports progress.
    """

    def __init__(self, trainer: ResidualTrainer, concepts: Iterable[Concept], callbacks: _Callbacks,
                 state_every: int, prefetch: int):
        self.trainer, self.callbacks = trainer, callbacks
        self.pending: Iterator[Concept] = iter(concepts)
        # None while concepts are still arriving; a resumed concept's earlier steps are taken off as it joins.
        self.total = sum(c.config.steps for c in concepts) if isinstance(concepts, Sequence) else None
        self.saving = state_every if callbacks.on_state is not None else 0
        self.results: list[TrainResult] = []
        self.active: list[_ConceptState] = []
        self.steps_done, self.rows_done, self.started = 0, 0, time.perf_counter()
        self.feed = (_Prefetcher(self.pending, lambda c: trainer._prepare_in_background(c, callbacks.resume), prefetch)
                     if prefetch else None)

    def run(self) -> list[TrainResult]:
        try:
            self._refill()
            iteration = 0
            while self.active:
                self._advance()
                iteration += 1
                # Losses stay on the device until something needs them (a concept's end, checkpoint or
                # state, or every SYNC_EVERY steps for progress and divergence), so the GPU never waits
                # for the host.
                if not self._due() and iteration % SYNC_EVERY:
                    if self.feed is not None and len(self.active) < self.trainer.pack:
                        self._refill()  # a concept prepared since the last refill joins now (no host sync)
                    continue
                latest = self.trainer._read_losses(self.active)
                self._settle()
                self._refill()
                self._report(latest)
        finally:
            if self.feed is not None:
                self.feed.close()
        return self.results

    def _finish(self, result: TrainResult) -> None:
        self.results.append(result)
        if self.callbacks.on_result is not None:
            self.callbacks.on_result(result)

    def _join(self, state: _ConceptState) -> None:
        self.active.append(state)
        if self.total is not None:
            self.total -= state.step  # a resumed concept's earlier steps are not done by this run

    def _refill(self) -> None:
        """Fill the pack's free slots from the prefetcher (what is ready) or the source (prepared here)."""
        while len(self.active) < self.trainer.pack:
            if self.feed is not None:
                # Take what is ready; wait only when nothing is left to train meanwhile.
                item = self.feed.take(block=not self.active)
                if item is None:
                    return
                if isinstance(item, TrainResult):
                    self._finish(item)
                else:
                    self.trainer._adopt(item)
                    self._join(item)
                continue
            concept = next(self.pending, None)
            if concept is None:
                return
            try:
                self._join(self.trainer._prepare_to_train(concept, self.callbacks.resume))
            except (ImageError, ValueError) as exc:
                self._finish(TrainResult(concept.concept_id, "failed", error=str(exc)))

    def _advance(self) -> None:
        """One packed step; each concept's loss stays on the device, in its ``unread``."""
        losses = self.trainer._step(self.active)
        self.rows_done += sum(s.cfg.batch_size for s in self.active)
        for state, loss in zip(self.active, losses):
            state.step += 1
            state.unread.append(loss)
            self.steps_done += 1

    def _due(self) -> bool:
        """Whether a concept ends, checkpoints or saves its state at this step (its losses are needed)."""
        saving = self.saving
        return any(s.step >= s.cfg.steps or s.step in s.cfg.save_steps or (saving and s.step % saving == 0)
                   for s in self.active)

    def _settle(self) -> None:
        """With the losses on the host: drop diverged concepts, finish complete ones, hand out checkpoints and states."""
        base, layers, callbacks = self.trainer.base, self.trainer.encoder, self.callbacks
        for state in list(self.active):
            bad = next((i for i, x in enumerate(state.losses) if not math.isfinite(x)), None)
            if bad is not None:
                self.active.remove(state)
                self._finish(state.result("failed", error=f"loss became non-finite at step {bad + 1} (learning rate "
                                                          f"{state.cfg.learning_rate} too high?)"))
                continue
            if state.step >= state.cfg.steps:
                self.active.remove(state)
                self._finish(state.result("ok", residual=state.snapshot(base, layers, True)))
                continue
            if state.step in state.cfg.save_steps and callbacks.on_checkpoint:
                callbacks.on_checkpoint(state.concept.concept_id, state.step, state.snapshot(base, layers, False))
            if self.saving and state.step % self.saving == 0:
                callbacks.on_state(state.concept.concept_id, state.fingerprint, state.step, state.state_bytes())

    def _report(self, latest: list[float]) -> None:
        if self.callbacks.on_progress is None:
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        finite = [x for x in latest if math.isfinite(x)]
        self.callbacks.on_progress(Progress(
            steps_done=self.steps_done, steps_total=self.total,
            concepts_done=sum(r.status == "ok" for r in self.results),
            concepts_failed=sum(r.status == "failed" for r in self.results),
            active=len(self.active), loss=sum(finite) / len(finite) if finite else math.nan,
            images_per_s=self.rows_done / elapsed,
        ))


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
