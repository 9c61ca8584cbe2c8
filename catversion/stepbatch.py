"""Step-level (continuous) batching of diffusion sampling: jobs join and leave a UNet batch at any step.

Each job keeps its own DDIM schedule, seed noise, guidance and residual, so its image does not
depend on what shares its UNet calls. One ``step()`` runs one UNet call for one image size;
``run()`` loops it on one thread while other threads ``submit()`` and ``cancel()``.
No Ray and no HTTP here: the serving replica and the benchmarks build on this.

A step's UNet call holds its running samples' rows (two per guided sample, one at guidance 1),
padded by the generator's `UNetRunner` to its bucket, so with a compiled runner the step-level
scheduler's UNet calls are exactly the runner's buckets (each a recorded CUDA graph on CUDA). The
DDIM update of every sample of a call is one vectorized `ddim_step`, each sample at its own
timestep. Finished jobs are VAE-decoded together.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from .generation import GenerationRequest, ImageGenerator
from .limits import DEFAULT_GUIDANCE, DEFAULT_STEPS

logger = logging.getLogger(__name__)

MAX_PARTIAL_IMAGES = 3
IDLE_POLL_S = 0.1  # run() looks at its stop event this often while there is no work
MODES = ("step", "static")

Bucket = tuple[int, int]  # (height, width) in pixels
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def vectorizable(config) -> bool:
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


@dataclass
class Job(GenerationRequest):
    """One image to make: a generation request with its own sampling settings.

    ``height``/``width`` None mean the model's native resolution. ``partial_images`` previews
    (0..3) are decoded from the predicted clean latent at evenly spaced steps.
    """

    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    height: int | None = None
    width: int | None = None
    partial_images: int = 0


class JobCancelled(Exception):
    """The job was cancelled before it finished."""


class Ticket:
    """A submitted job's handle; ``cancel()`` may be called from any thread."""

    def __init__(self, job: Job, wake: Callable[[], None]):
        self.job = job
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None  # when its first UNet step ran
        self.done = False  # on_done or on_error has been called (or is being called)
        self.cancelled = False
        self._wake = wake

    def cancel(self) -> None:
        """Make the job leave at the next step; its on_error then gets JobCancelled."""
        if not self.done:
            self.cancelled = True
            self._wake()


class _Sample:
    """A job's sampling state; owned by the stepping thread once admitted."""

    def __init__(self, ticket: Ticket, bucket: Bucket, on_done, on_partial, on_error):
        self.ticket = ticket
        self.job = ticket.job
        self.bucket = bucket
        self.on_done, self.on_partial, self.on_error = on_done, on_partial, on_error
        self.scheduler: DDIMScheduler | None = None
        self.latents: torch.Tensor | None = None  # [1, C, h, w]
        self.cond: torch.Tensor | None = None  # [1, 77, D]
        self.uncond: torch.Tensor | None = None  # [1, 77, D]; None when guidance is 1 (no CFG rows)
        self.index = 0  # UNet steps done
        steps, k = self.job.steps, self.job.partial_images
        due = sorted({round(steps * i / (k + 1)) for i in range(1, k + 1)} - {0, steps})
        self.previews = {step: n for n, step in enumerate(due)}  # step index -> preview index


class StepBatcher:
    """Runs many jobs through one ImageGenerator, batching their UNet calls step by step.

    ``mode="step"``: a size bucket admits waiting jobs at every step, up to ``max_batch_size``
    running samples. ``mode="static"``: a bucket admits jobs only when it runs none, and then only
    jobs sharing the first waiting job's (steps, guidance) — the old scheduler, for benchmarks.
    A full batch of guided samples is ``2 * max_batch_size`` UNet rows, which must fit the
    generator's largest UNet bucket (the default 16 fills the default buckets' 32; build the
    generator with ``buckets=unetrun.buckets_for(max_batch_size)`` for more), so that every step
    is one UNet call of one bucket.
    ``on_unet_step(seconds, samples, (height, width))`` reports each UNet call; ``on_start(wait_s)``
    each job's queue wait at its first UNet step. ``warm_up()``, ``step()``, ``run()`` and
    ``generate()`` must be called from one thread at a time (the same one, with a compiled
    generator on CUDA: its CUDA graphs belong to the thread that recorded them); ``submit()`` and
    ``Ticket.cancel()`` from any thread.
    """

    def __init__(self, generator: ImageGenerator, max_batch_size: int = 16, mode: str = "step",
                 on_unet_step: Callable[[float, int, tuple[int, int]], None] | None = None,
                 on_start: Callable[[float], None] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        largest = generator.unet_runner.buckets[-1]
        if 2 * max_batch_size > largest:
            raise ValueError(
                f"max_batch_size {max_batch_size} makes UNet calls of up to {2 * max_batch_size} rows (two per guided "
                f"sample), more than the generator's largest UNet bucket ({largest}); use max_batch_size <= "
                f"{largest // 2}, or build the ImageGenerator with buckets=catversion.unetrun.buckets_for({max_batch_size})")
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.mode = mode
        self.on_unet_step = on_unet_step
        self.on_start = on_start
        self._cond = threading.Condition()
        self._waiting: dict[Bucket, deque[_Sample]] = {}
        self._running: dict[Bucket, list[_Sample]] = {}
        self._last_bucket: Bucket | None = None
        self._schedulers: dict[int, DDIMScheduler] = {}
        self._timesteps: dict[int, list[int]] = {}  # step count -> its DDIM timesteps, on the host
        reference = DDIMScheduler.from_config(generator.base.scheduler_config)
        self._vectorized = vectorizable(reference.config)
        self._prediction_type = reference.config.prediction_type
        self._train_timesteps = reference.config.num_train_timesteps
        self._alphas_cumprod = reference.alphas_cumprod.to(generator.base.device)
        self._final_alpha_cumprod = reference.final_alpha_cumprod.to(generator.base.device)

    # ---- public API ----------------------------------------------------------------------------
    @property
    def running(self) -> int:
        with self._cond:
            return sum(len(samples) for samples in self._running.values())

    @property
    def waiting(self) -> int:
        with self._cond:
            return sum(len(queue) for queue in self._waiting.values())

    def warm_up(self) -> float:
        """Compile and record the UNet's buckets (ImageGenerator.warm_up), and run the text encoder
        and one VAE decode once, so that the first job pays none of it; seconds. Call it on the
        thread that will step."""
        started = time.perf_counter()
        self.generator.warm_up()
        with torch.no_grad():
            self.generator.encode([GenerationRequest("")])
            native = self.generator.unet_runner.latent_size
            channels = self.generator.base.unet.config.in_channels
            self._decode(torch.zeros((1, channels, *native), device=self.generator.base.device))
        return time.perf_counter() - started

    def validate(self, job: Job) -> None:
        """Raise ValueError naming a bad parameter, or IncompatibleResidualError; changes nothing."""
        self.generator.check_settings(job.steps, job.guidance, self._bucket(job))
        self.generator.check_request(job)
        if not isinstance(job.partial_images, int) or not 0 <= job.partial_images <= MAX_PARTIAL_IMAGES:
            raise ValueError(f"partial_images must be an integer in 0..{MAX_PARTIAL_IMAGES}, "
                             f"got {job.partial_images!r}")

    def submit(self, job: Job, on_done: Callable[[torch.Tensor], None] | None = None,
               on_partial: Callable[[int, torch.Tensor], None] | None = None,
               on_error: Callable[[BaseException], None] | None = None) -> Ticket:
        """Queue a job (validated first: a bad one raises here and queues nothing).

        Callbacks run on the stepping thread: ``on_partial(index, image)`` per preview, then
        exactly one of ``on_done(image)`` or ``on_error(exc)``; images are [3, H, W] float32 CPU
        tensors in [-1, 1]. A callback that raises is logged and ignored.
        """
        self.validate(job)
        ticket = Ticket(job, self._wake)
        bucket = self._bucket(job)
        with self._cond:
            self._waiting.setdefault(bucket, deque()).append(_Sample(ticket, bucket, on_done, on_partial, on_error))
            self._cond.notify_all()
        return ticket

    def step(self) -> bool:
        """Admit waiting jobs to one size bucket, run at most one UNet call for it and deliver the
        jobs that finished; False when there was nothing to do."""
        with self._cond:
            cancelled = self._take_cancelled()
            bucket = self._next_bucket()
            joiners = self._admit(bucket) if bucket is not None else []
        for sample in cancelled:
            self._fail(sample, JobCancelled(f"job {sample.job.prompt!r} was cancelled"))
        if bucket is None:
            return bool(cancelled)
        joined = self._prepare(joiners)
        with self._cond:
            self._running.setdefault(bucket, []).extend(joined)
            samples = list(self._running[bucket])
        if samples:
            self._denoise(bucket, samples)
        return True

    def run(self, stop: threading.Event) -> None:
        """Step while there is work, otherwise sleep until a submit (looking at ``stop`` every
        IDLE_POLL_S); return once ``stop`` is set."""
        while not stop.is_set():
            try:
                worked = self.step()
            except Exception:  # step() fails a broken call's jobs itself; anything else is a bug, not fatal
                logger.exception("step failed")
                worked = True
            if not worked:
                with self._cond:
                    if not self._has_work():
                        self._cond.wait(IDLE_POLL_S)

    def generate(self, jobs: Sequence[Job]) -> list[torch.Tensor]:
        """Run ``jobs`` to completion on this thread; their images in order (raises the first error)."""
        for job in jobs:
            self.validate(job)
        results: list[torch.Tensor | BaseException | None] = [None] * len(jobs)

        def keep(i: int):
            return lambda outcome: results.__setitem__(i, outcome)

        tickets = [self.submit(job, on_done=keep(i), on_error=keep(i)) for i, job in enumerate(jobs)]
        while not all(ticket.done for ticket in tickets):
            self.step()
        for outcome in results:
            if isinstance(outcome, BaseException):
                raise outcome
        return results

    # ---- scheduling (called with the lock held) --------------------------------------------------
    def _has_work(self) -> bool:
        return any(self._waiting.values()) or any(self._running.values())

    def _take_cancelled(self) -> list[_Sample]:
        cancelled = []
        for pool in (*self._waiting.values(), *self._running.values()):
            keep, gone = [], []
            for sample in pool:  # one read of each flag: cancel() sets it from other threads
                (gone if sample.ticket.cancelled else keep).append(sample)
            if gone:
                cancelled += gone
                pool.clear()
                pool.extend(keep)
        return cancelled

    def _next_bucket(self) -> Bucket | None:
        """Round-robin over the buckets with work, in (height, width) order."""
        for pool in (self._waiting, self._running):
            for bucket in [b for b, samples in pool.items() if not samples]:
                del pool[bucket]
        active = sorted({*self._waiting, *self._running})
        if not active:
            return None
        later = [b for b in active if self._last_bucket is not None and b > self._last_bucket]
        self._last_bucket = later[0] if later else active[0]
        return self._last_bucket

    def _admit(self, bucket: Bucket) -> list[_Sample]:
        queue = self._waiting.get(bucket, deque())
        running = len(self._running.get(bucket, ()))
        room = self.max_batch_size - running
        if self.mode == "step":
            return [queue.popleft() for _ in range(min(room, len(queue)))]
        if running or not queue:
            return []
        first = queue[0].job
        chosen = [s for s in queue if (s.job.steps, s.job.guidance) == (first.steps, first.guidance)][:room]
        for sample in chosen:
            queue.remove(sample)
        return chosen

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- compute (called without the lock) -------------------------------------------------------
    def _bucket(self, job: Job) -> Bucket:
        native = self.generator.base.resolution
        return (native if job.height is None else job.height, native if job.width is None else job.width)

    def _scheduler(self, steps: int) -> DDIMScheduler:
        if steps not in self._schedulers:
            scheduler = DDIMScheduler.from_config(self.generator.base.scheduler_config)
            scheduler.set_timesteps(steps, device=self.generator.base.device)
            self._schedulers[steps] = scheduler
            self._timesteps[steps] = [int(t) for t in scheduler.timesteps.tolist()]
        return self._schedulers[steps]

    def _prepare(self, joiners: list[_Sample]) -> list[_Sample]:
        """Encode the joiners' prompts and make their noise, together; if that fails, one by one,
        and only those that fail alone get on_error."""
        if not joiners:
            return []
        try:
            self._start(joiners)
            return joiners
        except Exception:
            logger.warning("preparing %d joining job(s) together failed; retrying one by one", len(joiners))
        ready = []
        for sample in joiners:
            try:
                self._start([sample])
                ready.append(sample)
            except Exception as exc:
                self._fail(sample, exc)
        return ready

    def _start(self, samples: list[_Sample]) -> None:
        cond, uncond = self.generator.encode([s.job for s in samples])
        noise = self.generator.initial_latents([s.job.seed for s in samples], samples[0].bucket)
        for i, sample in enumerate(samples):
            sample.scheduler = self._scheduler(sample.job.steps)
            sample.latents = noise[i : i + 1] * sample.scheduler.init_noise_sigma
            sample.cond = cond[i : i + 1]
            sample.uncond = uncond[i : i + 1] if sample.job.guidance != 1.0 else None

    @torch.no_grad()
    def _denoise(self, bucket: Bucket, samples: list[_Sample]) -> None:
        """One UNet call over ``samples``, their DDIM updates, then previews and finished images."""
        now = time.monotonic()
        for sample in samples:
            if sample.ticket.started_at is None:
                sample.ticket.started_at = now
                if self.on_start is not None:
                    _call(self.on_start, now - sample.ticket.submitted_at)
        try:
            started = time.perf_counter()
            eps = self._unet(samples)
            seconds = time.perf_counter() - started
            latents, originals = self._ddim(samples, eps)
        except Exception as exc:
            logger.exception("UNet step over %d sample(s) of size %s failed", len(samples), bucket)
            self._leave(bucket, samples)
            for sample in samples:
                self._fail(sample, exc)
            return
        if self.on_unet_step is not None:
            _call(self.on_unet_step, seconds, len(samples), bucket)

        previews, finished = [], []
        for i, sample in enumerate(samples):
            sample.latents = latents[i : i + 1]
            sample.index += 1
            if sample.index == sample.job.steps:
                finished.append(sample)
            elif sample.index in sample.previews:
                previews.append((sample, originals[i : i + 1]))
        self._leave(bucket, finished)
        decode = [latent for _, latent in previews] + [s.latents for s in finished]
        if not decode:
            return
        try:
            images = self._decode(torch.cat(decode))
        except Exception as exc:
            logger.exception("VAE decode of %d image(s) of size %s failed", len(decode), bucket)
            failed = [s for s, _ in previews] + finished
            self._leave(bucket, failed)
            for sample in failed:
                self._fail(sample, exc)
            return
        for (sample, _), image in zip(previews, images):
            if sample.on_partial is not None:
                _call(sample.on_partial, sample.previews[sample.index], image)
        for sample, image in zip(finished, images[len(previews):]):
            sample.ticket.done = True
            if sample.on_done is not None:
                _call(sample.on_done, image)

    def _timestep(self, sample: _Sample) -> int:
        return self._timesteps[sample.job.steps][sample.index]

    def _unet(self, samples: list[_Sample]) -> torch.Tensor:
        """Guided noise predictions [S, C, h, w] (float32), one per sample, from one UNet call of
        the samples' rows: [uncond, cond] for a guided sample, [cond] at guidance 1."""
        latents, timesteps, embeddings, uncond_rows, cond_rows, guided, scales = [], [], [], [], [], [], []
        for i, sample in enumerate(samples):
            # DDIM's scale_model_input is the identity: the latents go in as they are.
            rows = [sample.uncond, sample.cond] if sample.uncond is not None else [sample.cond]
            if sample.uncond is not None:
                uncond_rows.append(len(embeddings))
                guided.append(i)
                scales.append(sample.job.guidance)
            cond_rows.append(len(embeddings) + len(rows) - 1)
            for embedding in rows:
                latents.append(sample.latents)
                timesteps.append(self._timestep(sample))
                embeddings.append(embedding)
        device = self.generator.base.device
        eps = self.generator.unet_runner(torch.cat(latents), torch.tensor(timesteps, device=device),
                                         torch.cat(embeddings))
        if eps.device.type == "cuda" and self.on_unet_step is not None:
            torch.cuda.synchronize(eps.device)  # so that the reported time is the call's
        out = eps[torch.tensor(cond_rows, device=device)]
        if guided:
            cond = out[torch.tensor(guided, device=device)]
            uncond = eps[torch.tensor(uncond_rows, device=device)]
            scale = torch.tensor(scales, dtype=eps.dtype, device=device).reshape(-1, 1, 1, 1)
            out[torch.tensor(guided, device=device)] = uncond + scale * (cond - uncond)
        return out

    def _ddim(self, samples: list[_Sample], eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sample's DDIM step (eta 0) from its own timestep: (latents, predicted clean latents)."""
        latents = torch.cat([sample.latents for sample in samples])
        if not self._vectorized:  # thresholding or clip_sample: the scheduler's own step, sample by sample
            outputs = [sample.scheduler.step(eps[i : i + 1], sample.scheduler.timesteps[sample.index],
                                             latents[i : i + 1], eta=0.0) for i, sample in enumerate(samples)]
            return (torch.cat([o.prev_sample for o in outputs]), torch.cat([o.pred_original_sample for o in outputs]))
        device = self.generator.base.device
        timesteps = [self._timestep(sample) for sample in samples]
        prev = [t - self._train_timesteps // sample.job.steps for t, sample in zip(timesteps, samples)]
        return ddim_step(eps, torch.tensor(timesteps, device=device), torch.tensor(prev, device=device), latents,
                         self._alphas_cumprod, self._final_alpha_cumprod, self._prediction_type)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] (float32, CPU), decoded in chunks of 4 as generate_tensors does."""
        base, vae = self.generator.base, self.generator.base.vae
        chunks = (latents / base.vae_scaling_factor).split(4)
        return torch.cat([vae.decode(chunk.to(vae.dtype)).sample.float().cpu() for chunk in chunks]).clamp(-1, 1)

    def _leave(self, bucket: Bucket, samples: list[_Sample]) -> None:
        if not samples:
            return
        with self._cond:
            leaving = {id(s) for s in samples}
            self._running[bucket] = [s for s in self._running.get(bucket, ()) if id(s) not in leaving]

    def _fail(self, sample: _Sample, exc: BaseException) -> None:
        sample.ticket.done = True
        if sample.on_error is not None:
            _call(sample.on_error, exc)


def _call(callback: Callable, *args) -> None:
    try:
        callback(*args)
    except Exception:
        logger.exception("callback %r raised; ignored", callback)
