"""Step-level (continuous) batching of diffusion sampling: jobs join and leave a UNet batch at any step.

Each job keeps its own DDIM schedule, seed noise, guidance and residual, so its image does not
depend on what shares its UNet calls. A `StepBatcher` is a `Scheduler` (catversion/scheduler.py:
which jobs share the next call, with its fairness policy) and the generator's `Executor`
(catversion/executor.py: the call itself, guidance, DDIM, previews and decode), plus what joins
them to callers: a lock, the thread that steps, and the jobs' callbacks. One ``step()`` runs one
UNet call for one image size; ``run()`` loops it on one thread while other threads ``submit()``
and ``cancel()``. No Ray and no HTTP here: the serving replica and the benchmarks build on this.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .executor import Sample
from .generation import GenerationRequest, ImageGenerator
from .limits import DEFAULT_GUIDANCE, DEFAULT_STEPS
from .scheduler import Bucket, Entry, Fairness, Scheduler

logger = logging.getLogger(__name__)

MAX_PARTIAL_IMAGES = 3
WARM_UP_STEPS = 3  # a lone sample's steps timed by warm_up (their median is the fairness policy's first pace)
IDLE_POLL_S = 0.1  # run() looks at its stop event this often while there is no work


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


class QueueFull(Exception):
    """A job refused at submit: the work outstanding ahead of it is past the bound it was submitted with.

    ``retry_after_s``: about when enough of the work ahead will have run for it to be admitted (None before
    the first measured step).
    """

    def __init__(self, work: int, job_work: int, max_work: int, retry_after_s: float | None):
        super().__init__(f"{work} row-steps of UNet work are outstanding, past the bound of {max_work} on the work "
                         f"ahead of a new job (this one's is {job_work})")
        self.retry_after_s = retry_after_s


class Ticket:
    """A submitted job's handle; ``cancel()`` may be called from any thread."""

    def __init__(self, job: Job, wake: Callable[[], None]):
        self.job = job
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None  # when its first UNet step ran
        self.done = False  # on_done or on_error has been called (or is being called)
        self._entry: Entry | None = None  # the scheduler's view of the job, set by StepBatcher.submit
        self._wake = wake

    @property
    def cancelled(self) -> bool:
        return self._entry is not None and self._entry.cancelled

    def cancel(self) -> None:
        """Make the job leave at the next step; its on_error then gets JobCancelled."""
        if not self.done and self._entry is not None:
            self._entry.cancelled = True
            self._wake()


@dataclass(eq=False)
class _Work:
    """A job's payload in the scheduler: its ticket, callbacks and, once admitted, its sample."""

    ticket: Ticket
    on_done: Callable[[torch.Tensor], None] | None
    on_partial: Callable[[int, torch.Tensor], None] | None
    on_error: Callable[[BaseException], None] | None
    sample: Sample | None = None  # owned by the stepping thread


class StepBatcher:
    """Runs many jobs through one ImageGenerator, batching their UNet calls step by step.

    ``mode="step"``: a size bucket admits waiting jobs at every step, up to ``max_batch_size``
    running samples, under the ``fairness`` policy (catversion/scheduler.py; None: whenever there
    is room). ``mode="static"``: a bucket admits jobs only when it runs none, and then only jobs
    sharing the first waiting job's (steps, guidance): the old scheduler, for benchmarks.
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
                 on_start: Callable[[float], None] | None = None, fairness: Fairness | None = Fairness()):
        self.scheduler = Scheduler(max_batch_size, mode, fairness)
        largest = generator.unet_runner.buckets[-1]
        if 2 * max_batch_size > largest:
            raise ValueError(
                f"max_batch_size {max_batch_size} makes UNet calls of up to {2 * max_batch_size} rows (two per guided "
                f"sample), more than the generator's largest UNet bucket ({largest}); use max_batch_size <= "
                f"{largest // 2}, or build the ImageGenerator with buckets=catversion.unetrun.buckets_for({max_batch_size})")
        self.generator = generator
        self.executor = generator.executor
        self.on_unet_step = on_unet_step
        self.on_start = on_start
        self._cond = threading.Condition()  # guards the scheduler
        self._progress_at = time.monotonic()  # when the stepping thread last finished a step or found nothing to do

    # ---- public API ----------------------------------------------------------------------------
    @property
    def max_batch_size(self) -> int:
        return self.scheduler.max_batch_size

    @property
    def mode(self) -> str:
        return self.scheduler.mode

    @property
    def running(self) -> int:
        with self._cond:
            return self.scheduler.running

    @property
    def waiting(self) -> int:
        with self._cond:
            return self.scheduler.waiting

    @property
    def work(self) -> int:
        """Outstanding UNet work in row-steps (Scheduler.work)."""
        with self._cond:
            return self.scheduler.work()

    def stalled_s(self) -> float:
        """Seconds since the stepping thread last finished a step while there is work; 0 when it has none.
        A liveness check: a UNet call that hangs (a wedged device) shows here, and nowhere else."""
        with self._cond:
            busy = self.scheduler.has_work()
        return time.monotonic() - self._progress_at if busy else 0.0

    def warm_up(self) -> float:
        """Compile and record the UNet's buckets (ImageGenerator.warm_up), run the text encoder and
        one VAE decode once, so that the first job pays none of it, and time a lone sample's step
        at the native size for the fairness policy; seconds. Call it on the thread that will step."""
        started = time.perf_counter()
        self.generator.warm_up()
        with torch.no_grad():
            native = self.generator.unet_runner.latent_size
            channels = self.generator.base.unet.config.in_channels
            noise = torch.zeros((1, channels, *native), device=self.generator.base.device)
            self.executor.decode(noise)
            factor = self.generator.base.vae_scale_factor
            sample = self.generator.samples([GenerationRequest("")], DEFAULT_GUIDANCE, WARM_UP_STEPS,
                                            (native[0] * factor, native[1] * factor), noise=noise)[0]
            seconds = []
            for _ in range(WARM_UP_STEPS):
                step_started = time.perf_counter()
                self.executor.step([sample])
                seconds.append(time.perf_counter() - step_started)
        with self._cond:
            self.scheduler.observe(self._bucket(Job("")), 2, statistics.median(seconds))  # [uncond, cond] rows
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
               on_error: Callable[[BaseException], None] | None = None, max_work: int | None = None) -> Ticket:
        """Queue a job (validated first: a bad one raises here and queues nothing).

        ``max_work`` bounds the wait: a job is admitted while the outstanding work ahead of it (``work``,
        row-steps) is at most ``max_work``, else it raises QueueFull and queues nothing. Its own work does not
        count, so the bound is on its wait alone and a long job is not refused where a short one is taken
        (an idle batcher takes any valid job).

        Callbacks run on the stepping thread: ``on_partial(index, image)`` per preview, then
        exactly one of ``on_done(image)`` or ``on_error(exc)``; images are [3, H, W] float32 CPU
        tensors in [-1, 1]. A callback that raises is logged and ignored.
        """
        self.validate(job)
        ticket = Ticket(job, self._wake)
        entry = ticket._entry = Entry(_Work(ticket, on_done, on_partial, on_error), self._bucket(job), job.steps,
                                      rows=1 if job.guidance == 1.0 else 2, group=(job.steps, job.guidance))
        with self._cond:  # the check and the add under one lock: concurrent submits cannot both pass the bound
            work, job_work = self.scheduler.work(), entry.steps * entry.rows
            if max_work is not None and work > max_work:
                raise QueueFull(work, job_work, max_work, self.scheduler.seconds_for(work - max_work))
            self.scheduler.add(entry)
            self._cond.notify_all()
        return ticket

    def step(self) -> bool:
        """Admit waiting jobs to one size bucket, run at most one UNet call for it and deliver the
        jobs that finished; False when there was nothing to do."""
        with self._cond:
            plan = self.scheduler.plan()
        for entry in plan.cancelled:
            self._fail(entry, JobCancelled(f"job {entry.payload.ticket.job.prompt!r} was cancelled"))
        if plan.bucket is None:
            return bool(plan.cancelled)
        joined = self._prepare(plan.joiners)
        with self._cond:
            self.scheduler.start(plan.bucket, joined)
            batch = self.scheduler.batch(plan.bucket)
        if batch:
            self._denoise(plan.bucket, batch)
        self._progress_at = time.monotonic()
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
                    if not self.scheduler.has_work():
                        self._progress_at = time.monotonic()
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

    # ---- stepping (called without the lock) ------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _bucket(self, job: Job) -> Bucket:
        native = self.generator.base.resolution
        return (native if job.height is None else job.height, native if job.width is None else job.width)

    def _prepare(self, joiners: list[Entry]) -> list[Entry]:
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
        for entry in joiners:
            try:
                self._start([entry])
                ready.append(entry)
            except Exception as exc:
                self._fail(entry, exc)
        return ready

    def _start(self, entries: list[Entry]) -> None:
        jobs = [entry.payload.ticket.job for entry in entries]
        made = self.generator.samples(jobs, 0.0, 0, entries[0].bucket, guidances=[job.guidance for job in jobs],
                                      step_counts=[job.steps for job in jobs],
                                      previews=[job.partial_images for job in jobs])
        for entry, sample in zip(entries, made):
            entry.payload.sample = sample

    def _denoise(self, bucket: Bucket, batch: list[Entry]) -> None:
        """One executor step over ``batch``, then its previews and finished images."""
        now = time.monotonic()
        for entry in batch:
            ticket = entry.payload.ticket
            if ticket.started_at is None:
                ticket.started_at = now
                if self.on_start is not None:
                    _call(self.on_start, now - ticket.submitted_at)
        started = time.perf_counter()
        try:
            result = self.executor.step([entry.payload.sample for entry in batch],
                                        synchronize=self.on_unet_step is not None)
        except Exception as exc:
            logger.exception("UNet step over %d sample(s) of size %s failed", len(batch), bucket)
            self._drop(bucket, batch, exc)
            return
        seconds = time.perf_counter() - started
        if self.on_unet_step is not None:
            _call(self.on_unet_step, result.unet_seconds, len(batch), bucket)
        with self._cond:
            finished = self.scheduler.stepped(bucket, batch, seconds)
        previews = [(batch[position], index, latent) for position, index, latent in result.previews]
        if previews or finished:
            self._deliver(bucket, previews, finished)

    def _deliver(self, bucket: Bucket, previews: list[tuple[Entry, int, torch.Tensor]], finished: list[Entry]) -> None:
        """Decode previews and finished images in one batch and hand them to the jobs' callbacks."""
        latents = [latent for _, _, latent in previews] + [entry.payload.sample.latents for entry in finished]
        try:
            images = self.executor.decode(torch.cat(latents))
        except Exception as exc:
            logger.exception("VAE decode of %d image(s) of size %s failed", len(latents), bucket)
            self._drop(bucket, [entry for entry, _, _ in previews] + finished, exc)
            return
        for (entry, index, _), image in zip(previews, images):
            if entry.payload.on_partial is not None:
                _call(entry.payload.on_partial, index, image)
        for entry, image in zip(finished, images[len(previews):]):
            entry.payload.ticket.done = True
            if entry.payload.on_done is not None:
                _call(entry.payload.on_done, image)

    def _drop(self, bucket: Bucket, entries: list[Entry], exc: BaseException) -> None:
        """Take failed entries out of the running batch and give each its on_error."""
        with self._cond:
            self.scheduler.remove(bucket, entries)
        for entry in entries:
            self._fail(entry, exc)

    def _fail(self, entry: Entry, exc: BaseException) -> None:
        work = entry.payload
        work.ticket.done = True
        if work.on_error is not None:
            _call(work.on_error, exc)


def _call(callback: Callable, *args) -> None:
    try:
        callback(*args)
    except Exception:
        logger.exception("callback %r raised; ignored", callback)
