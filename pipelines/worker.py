"""What every Ray Train worker of a batch run does: load the model once, then train leased concepts until
none is left. This function only wires the worker's parts together; each part is a module:

- intake (pipelines/intake.py): lease, fetch, fingerprint, claim, up-to-date check, saved state;
- training (catversion/training.py `ResidualTrainer`): decode and VAE-encode ahead, packed training; one
  trainer per layer set the worker's concepts patch (`Trainers`), each round training one set's concepts;
- outcomes (pipelines/outcomes.py): states and residuals to storage, result rows, metrics;
- control (pipelines/control.py): what the worker holds and the claim mode, keep-alive, progress, stop.
"""

from __future__ import annotations

import dataclasses
import uuid

from catversion import storage, telemetry

from .calls import RayCalls
from .claims import Claims
from .control import Holdings, Stopped, WorkerControl
from .intake import DONE, Intake
from .outcomes import OutcomeSink, concept_metrics
from .work import WorkerConfig


def train_worker(config: WorkerConfig) -> None:
    """Runs on every Ray Train worker (TorchTrainer's train_loop_per_worker, with ``config`` bound)."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    worker = f"{rank}-{uuid.uuid4().hex[:8]}"
    batch, run_id = config.batch, config.run_id
    calls = RayCalls(config.dispatcher)
    token = _group_token(rank)
    calls.join(token)
    budget = storage.RetryBudget(batch.storage_retry_s)
    claims = Claims(batch.output, run_id, batch.claim_ttl_s, budget)
    holdings = Holdings(claims)
    control = WorkerControl(calls, worker, holdings, metrics=_progress_metrics(run_id, rank))
    control.start_keep_alive()  # before the model loads: a worker loading a large model is alive, not starved
    base, trainers = _load_trainer(config, rank)
    trainer = trainers.default
    prefetch = batch.prefetch or trainer.pack
    claims.start()
    sink = OutcomeSink(batch.output, run_id, worker, calls, holdings, budget, metrics=concept_metrics(run_id))
    intake = Intake(config, calls, token, worker, trainer.target, claims, holdings, sink, control, prefetch, budget)
    stopped = None
    progress = _RoundsProgress(control.on_progress)
    try:
        # One round per layer set: its concepts share that set's trainer (and its packs).
        while (layers := intake.next_layers()) is not DONE:
            trainer = trainers.get(layers)
            trainer.train(intake.concepts(layers), on_result=sink.on_result, on_progress=progress, prefetch=prefetch,
                          state_every=batch.state_every, on_state=sink.on_state, resume=intake.resume)
            progress.next_round()
    except Stopped as exc:
        stopped = str(exc)
    finally:
        control.close()
        intake.close()
        sink.close()
        claims.stop()
        if stopped:
            for concept_id in holdings.training():
                claims.release(concept_id)  # a later run resumes them from their saved state
    _print_peak_memory(base, trainer, rank)
    ray.train.report({"worker": rank, "concepts_done": sink.counts["ok"], "concepts_failed": sink.counts["failed"],
                      "concepts_skipped": sink.counts["skipped"], "images_per_s": control.images_per_s,
                      "stopped": stopped or ""})


def _group_token(rank: int) -> str:
    """One token per worker group: rank 0 draws it and the group shares it, so the dispatcher can tell a
    restarted or resized group from the one before it."""
    import torch.distributed as dist

    token = [uuid.uuid4().hex if rank == 0 else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return token[0]


class Trainers:
    """The worker's trainers on its one base model, one per layer set, made when a set is first leased: the
    first (``default``, the run's --layers or the family's) sizes the pack for all of them."""

    def __init__(self, base, batch, default):
        self.base, self.batch, self.default = base, batch, default
        self._made = {default.encoder.layer_sets: default}

    def get(self, layers):
        """The trainer of ``layers`` (a `PlannedConcept.layers` value; None: the default's)."""
        from catversion.training import ResidualTrainer

        if layers is None:
            return self.default
        key = tuple(tuple(group) for group in layers)
        if key not in self._made:
            self._made[key] = ResidualTrainer(self.base, pack=self.default.pack, layers=key,
                                              resolution=self.batch.resolution, compile=self.batch.compiled)
        return self._made[key]


class _RoundsProgress:
    """The trainer's progress callback across rounds: steps keep counting up from one round to the next."""

    def __init__(self, on_progress):
        self.on_progress, self.offset, self.last = on_progress, 0, 0

    def __call__(self, progress) -> None:
        self.last = progress.steps_done
        self.on_progress(dataclasses.replace(progress, steps_done=self.offset + progress.steps_done))

    def next_round(self) -> None:
        self.offset, self.last = self.offset + self.last, 0


def _load_trainer(config: WorkerConfig, rank: int):
    """The base model (once per worker) and its trainers (`Trainers`), on this worker's GPU or CPUs."""
    import ray.train.torch
    import torch

    from catversion.models import load_base_model
    from catversion.training import ResidualTrainer

    batch = config.batch
    use_gpu = batch.gpus_per_worker > 0
    device = ray.train.torch.get_device() if use_gpu else "cpu"
    if not use_gpu:
        # Use exactly the CPUs Ray reserved for this worker: more threads would fight the other workers.
        torch.set_num_threads(max(1, int(batch.cpus_per_worker)))
    base = load_base_model(batch.model, device=device, precision=batch.training_precision)
    trainer = ResidualTrainer(base, pack=batch.pack, layers=batch.layers, resolution=batch.resolution,
                              compile=batch.compiled)
    if rank == 0:
        print(f"[worker {rank}] {base.model_id} on {base.device}: UNet/VAE {base.precision}, text encoder fp32, pack "
              f"{trainer.pack}{', UNet compiled' if trainer.compiled else ''}", flush=True)
    return base, Trainers(base, batch, trainer)


def _progress_metrics(run_id: str, rank: int):
    """The training-speed metrics, updated with each progress report: (new steps, images/s)."""
    from catversion.cluster import ray_metric

    steps, speed = ray_metric(telemetry.TRAIN_STEPS), ray_metric(telemetry.TRAIN_IMAGES_PER_SECOND)
    tags = {"run_id": run_id}

    def update(new_steps: int, images_per_s: float) -> None:
        if new_steps > 0:  # Ray counters refuse increments of 0
            steps.inc(new_steps, tags)
        speed.set(images_per_s, {**tags, "worker": str(rank)})

    return update


def _print_peak_memory(base, trainer, rank: int) -> None:
    import torch

    if base.device.type == "cuda":
        compiled = f", compiling took {trainer.compile_seconds:.0f} s" if trainer.compiled else ""
        print(f"[worker {rank}] peak GPU memory {torch.cuda.max_memory_allocated(base.device) / 2**30:.1f} GiB "
              f"(pack {trainer.pack}){compiled}", flush=True)
