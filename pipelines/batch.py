"""The batch job: validate a manifest, skip up-to-date concepts, train the rest on Ray Train, write results.

The driver validates and plans; one Ray Train `TorchTrainer` runs `_train_worker` on N workers.
Concepts are a Ray Dataset split dynamically (`equal=False`), so a faster worker takes more. Each
worker loads the frozen base model once and trains its concepts packed (catversion.training),
writing every residual the moment it is done. A worker restarted after a failure skips residuals
already written, so each concept is written exactly once.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq

from catversion import layout, storage, telemetry
from catversion.telemetry import ray_metric
from catversion.limits import DEFAULT_MODEL
from catversion.recipe import REFERENCE_PREFIX_LOGIT_BIAS, Concept, TrainConfig, training_fingerprint
from catversion.residual import Residual, ResidualFormatError, ResidualNotFoundError

from .manifest import ConceptSpec, ManifestReport, validate_manifest

RESULT_COLUMNS = ("concept_id", "status", "error", "residual_uri", "sha256", "steps", "final_loss", "seconds")
# Forwarded to the Train workers so they reach the same S3 endpoint and model cache as the driver.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
                 "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE")
# Credentials are forwarded only to a Ray the job starts itself; a cluster's workers use their own role.
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
FAULT_KILL_ENV = "CATVERSION_FAULT_KILL_AFTER_WRITES"  # test hook: a worker process dies after N writes
FAULT_MARKER_ENV = "CATVERSION_FAULT_MARKER"  # ... once: the marker file records that it happened


@dataclass
class BatchConfig:
    manifest: str | list[str]
    output: str
    model: str = DEFAULT_MODEL
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    pack: int = 4
    steps: int | None = None  # job-wide default; a manifest's per-concept `steps` wins
    prefix_logit_bias: float = REFERENCE_PREFIX_LOGIT_BIAS  # the reference recipe's +1; 0.0 = the paper's equation
    max_failures: int = 2
    run_id: str | None = None
    resolution: int | None = None
    address: str | None = None  # None: a local Ray (or the one this process already joined)
    storage_path: str | None = None  # where Ray Train keeps its run state (default ~/ray_results)


@dataclass
class BatchSummary:
    run_id: str
    results_uri: str
    results: list[dict]
    report: ManifestReport
    seconds: float
    error: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.counts.get("failed", 0) == 0

    def format(self) -> str:
        lines = [
            f"run {self.run_id}: {self.counts.get('ok', 0)} trained, {self.counts.get('skipped', 0)} skipped (up to date), "
            f"{self.counts.get('failed', 0)} failed, in {self.seconds:.1f} s",
            f"results: {self.results_uri}",
        ]
        for row in self.results:
            if row["status"] == "failed":
                lines.append(f"  failed {row['concept_id']}: {row['error']}")
        if self.error:
            lines.append(f"job error: {self.error}")
        return "\n".join(lines)


def concept_config(spec: ConceptSpec, job_steps: int | None, prefix_logit_bias: float) -> TrainConfig:
    """The recipe for one concept: defaults, then the job's options, then the manifest's overrides."""
    values: dict = {"prefix_logit_bias": prefix_logit_bias}
    if job_steps:
        values["steps"] = job_steps
    values.update(spec.overrides)
    return TrainConfig(save_steps=(), **values)


def to_concept(spec: ConceptSpec, config: TrainConfig, images: list | None = None) -> Concept:
    """The library's Concept for a manifest concept; ``images`` default to the manifest's references."""
    sources = images if images is not None else [ref.data if ref.data is not None else ref.uri for ref in spec.images]
    return Concept(spec.concept_id, sources, spec.class_word, spec.caption, config,
                   image_names=[ref.name for ref in spec.images])


def _existing_residual(uri: str) -> Residual | None:
    try:
        return Residual.load(uri)
    except ResidualNotFoundError:
        return None
    except ResidualFormatError:
        return None  # a corrupt or foreign object is retrained and overwritten


def _result_row(concept_id: str, status: str, **values) -> dict:
    row = dict.fromkeys(RESULT_COLUMNS)
    row.update(concept_id=concept_id, status=status, **values)
    return row


def _ok_row(concept_id: str, uri: str, residual: Residual, status: str = "ok", seconds: float = 0.0) -> dict:
    return _result_row(concept_id, status, residual_uri=uri, sha256=residual.sha256, steps=residual.meta.get("steps"),
                       final_loss=residual.meta.get("final_loss"), seconds=seconds)


# ---- the Ray side ----------------------------------------------------------------------------


def _collector_class():
    import ray

    @ray.remote(num_cpus=0)
    class ResultCollector:
        """Per-concept outcomes and live progress, kept by the driver across worker restarts."""

        def __init__(self):
            self.rows: dict[str, dict] = {}
            self.progress: dict[int, dict] = {}

        def record(self, row: dict) -> None:
            # A concept done before a restart stays done; a later attempt never overwrites "ok".
            if self.rows.get(row["concept_id"], {}).get("status") != "ok":
                self.rows[row["concept_id"]] = row

        def report_progress(self, worker: int, info: dict) -> None:
            self.progress[worker] = info

        def snapshot(self) -> tuple[dict, dict]:
            return self.rows, self.progress

        def count_planned(self, run_id: str, failed: int, skipped: int) -> None:
            """Concepts the driver settled before training (rejected, up to date) also count in the metrics."""
            tags = {"run_id": run_id}
            if failed:
                ray_metric(telemetry.CONCEPTS_FAILED).inc(failed, tags)
            if skipped:
                ray_metric(telemetry.CONCEPTS_SKIPPED).inc(skipped, tags)

    return ResultCollector


def _dynamic_split_config():
    from ray.train import DataConfig

    class DynamicSplit(DataConfig):
        """Split concepts dynamically: each worker pulls the next concept when it has room."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, dataset in datasets.items():
                for rank, split in enumerate(dataset.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                    output[rank][name] = split
            return output

    return DynamicSplit()


class _FaultInjector:
    """Test hook: after N residual writes, this worker process dies once (os._exit, no cleanup)."""

    def __init__(self):
        self.kill_after = int(os.environ.get(FAULT_KILL_ENV, "0") or 0)
        self.marker = os.environ.get(FAULT_MARKER_ENV)
        self.writes = 0

    def after_write(self) -> None:
        self.writes += 1
        if self.kill_after and self.marker and self.writes >= self.kill_after and not os.path.exists(self.marker):
            with open(self.marker, "w") as handle:
                handle.write(f"killed pid {os.getpid()} after {self.writes} writes\n")
            os._exit(1)


def _train_worker(cfg: dict) -> None:
    """Runs on every Ray Train worker: load the model once, train this worker's share of concepts."""
    import ray.train
    import ray.train.torch

    from catversion.models import load_base_model
    from catversion.training import ResidualTrainer

    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device() if cfg["gpus_per_worker"] > 0 else "cpu"
    if device == "cpu":
        import torch

        # Use exactly the CPUs Ray reserved for this worker: more threads would fight the other workers.
        torch.set_num_threads(max(1, int(cfg["cpus_per_worker"])))
    base = load_base_model(cfg["model"], device=device)
    trainer = ResidualTrainer(base, pack=cfg["pack"], resolution=cfg["resolution"])
    collector, run_id, output = cfg["collector"], cfg["run_id"], cfg["output"]
    tags = {"run_id": run_id}
    done, failed, skipped, steps = (ray_metric(s) for s in (telemetry.CONCEPTS_DONE, telemetry.CONCEPTS_FAILED,
                                                               telemetry.CONCEPTS_SKIPPED, telemetry.TRAIN_STEPS))
    speed, duration = ray_metric(telemetry.TRAIN_IMAGES_PER_SECOND), ray_metric(telemetry.CONCEPT_SECONDS)
    fault = _FaultInjector()
    counts = {"ok": 0, "failed": 0, "skipped": 0}

    def fail(concept_id: str, error: str, seconds: float = 0.0) -> None:
        collector.record.remote(_result_row(concept_id, "failed", error=error, seconds=seconds))
        failed.inc(1, tags)
        counts["failed"] += 1

    def concepts():
        for row in ray.train.get_dataset_shard("concepts").iter_rows():
            spec = ConceptSpec.from_row(row)
            uri = layout.residual_uri(output, spec.concept_id)
            existing = _existing_residual(uri)
            if existing is not None and existing.meta.get("training_fingerprint") == row["fingerprint"]:
                # Written by this run before a worker restart: never train or write it twice.
                collector.record.remote(_ok_row(spec.concept_id, uri, existing))
                skipped.inc(1, tags)
                counts["skipped"] += 1
                continue
            try:
                images = [ref.data if ref.data is not None else storage.read_bytes(ref.uri) for ref in spec.images]
            except storage.StorageError as exc:
                fail(spec.concept_id, str(exc))
                continue
            yield to_concept(spec, concept_config(spec, cfg["steps"], cfg["prefix_logit_bias"]), images)

    def on_result(result) -> None:
        if result.status != "ok":
            fail(result.concept_id, result.error, result.seconds)
            return
        uri = layout.residual_uri(output, result.concept_id)
        try:
            storage.write_bytes(uri, result.residual.to_bytes())
        except storage.StorageError as exc:
            fail(result.concept_id, str(exc), result.seconds)
            return
        collector.record.remote(_ok_row(result.concept_id, uri, result.residual, seconds=result.seconds))
        done.inc(1, tags)
        duration.observe(result.seconds, tags)
        counts["ok"] += 1
        fault.after_write()

    last = {"t": 0.0, "steps": 0, "ips": 0.0}

    def on_progress(progress) -> None:
        now = time.monotonic()
        last["ips"] = progress.images_per_s
        if now - last["t"] < 1.0:
            return
        steps.inc(progress.steps_done - last["steps"], tags)
        speed.set(progress.images_per_s, {**tags, "worker": str(rank)})
        collector.report_progress.remote(rank, {"steps": progress.steps_done, "images_per_s": progress.images_per_s,
                                                "active": progress.active})
        last.update(t=now, steps=progress.steps_done)

    trainer.train(concepts(), on_result=on_result, on_progress=on_progress)
    # report() is a barrier across workers, so each worker reports once, at its end.
    ray.train.report({"worker": rank, "concepts_done": counts["ok"], "concepts_failed": counts["failed"],
                      "concepts_skipped_after_restart": counts["skipped"], "images_per_s": last["ips"]})


def _init_ray(config: BatchConfig) -> bool:
    """Join or start Ray; returns True when this call started it (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if config.address is None:
        env.update({k: os.environ[k] for k in CREDENTIAL_ENV if k in os.environ})
    ray.init(address=config.address, runtime_env={"env_vars": env} if env else None, log_to_driver=False)
    return True


def _run_training(config: BatchConfig, run_id: str, plan: list[tuple[ConceptSpec, str]], settled: dict[str, dict],
                  log: Callable[[str], None]) -> tuple[dict, str | None]:
    import ray
    import ray.data
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    collector = _collector_class().remote()
    collector.count_planned.remote(run_id, sum(r["status"] == "failed" for r in settled.values()),
                                   sum(r["status"] == "skipped" for r in settled.values()))
    rows = [{**spec.to_row(), "fingerprint": fingerprint} for spec, fingerprint in plan]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))  # one concept per block: fine-grained split
    env = {k: v for k, v in os.environ.items() if k.startswith("CATVERSION_")}
    use_gpu = config.gpus_per_worker > 0
    resources = {"CPU": config.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = config.gpus_per_worker
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "model": config.model, "pack": config.pack, "resolution": config.resolution, "steps": config.steps,
            "prefix_logit_bias": config.prefix_logit_bias,
            "output": config.output, "run_id": run_id, "collector": collector, "gpus_per_worker": config.gpus_per_worker,
            "cpus_per_worker": config.cpus_per_worker,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=min(config.workers, len(rows)), use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"catversion-{run_id}", storage_path=config.storage_path,
            failure_config=FailureConfig(max_failures=config.max_failures),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
        datasets={"concepts": dataset},
        dataset_config=_dynamic_split_config(),
    )
    stop = threading.Event()

    def watch() -> None:  # live progress on the driver while fit() blocks
        while not stop.wait(5.0):
            try:
                rows_now, progress = ray.get(collector.snapshot.remote(), timeout=5)
            except Exception:
                continue
            ok = sum(r["status"] == "ok" for r in rows_now.values())
            bad = sum(r["status"] == "failed" for r in rows_now.values())
            speed = sum(p.get("images_per_s", 0.0) for p in progress.values())
            log(f"[batch {run_id}] {ok + bad}/{len(plan)} concepts finished ({bad} failed), {speed:.1f} images/s")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    error = None
    try:
        trainer.fit()
    except Exception as exc:  # TrainingFailedError after max_failures; results so far are still written
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        stop.set()
        watcher.join()
    rows_done, _ = ray.get(collector.snapshot.remote())
    ray.kill(collector)
    return rows_done, error


# ---- the driver ----------------------------------------------------------------------------


def run_batch(config: BatchConfig, log: Callable[[str], None] = print) -> BatchSummary:
    started = time.perf_counter()
    # Workers run in their own folders: relative local paths must mean what they mean here.
    config = replace(config, manifest=storage.absolute(config.manifest), output=storage.absolute(config.output),
                     storage_path=storage.absolute(config.storage_path) if config.storage_path else None)
    run_id = config.run_id or time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    report = validate_manifest(config.manifest)
    log(f"[batch {run_id}] manifest: {len(report.concepts)} valid concepts, {len(report.rejected)} rejected, {report.rows} rows")

    results: dict[str, dict] = {cid: _result_row(cid, "failed", error="; ".join(reasons)) for cid, reasons in report.problems.items()}
    plan: list[tuple[ConceptSpec, str]] = []
    if report.concepts:
        from catversion.models import load_base_model
        from catversion.training import training_target

        target = training_target(load_base_model(config.model, device="cpu", components=("text_encoder",)),
                                 config.resolution)
        for spec in report.concepts:
            try:
                concept = to_concept(spec, concept_config(spec, config.steps, config.prefix_logit_bias))
            except ValueError as exc:
                results[spec.concept_id] = _result_row(spec.concept_id, "failed", error=str(exc))
                continue
            fingerprint = training_fingerprint(concept, [ref.digest for ref in spec.images], target)
            uri = layout.residual_uri(config.output, spec.concept_id)
            existing = _existing_residual(uri)
            if existing is not None and existing.meta.get("training_fingerprint") == fingerprint:
                results[spec.concept_id] = _ok_row(spec.concept_id, uri, existing, status="skipped")
            else:
                plan.append((spec, fingerprint))
    log(f"[batch {run_id}] {len(plan)} to train, {sum(r['status'] == 'skipped' for r in results.values())} up to date")

    error = None
    if plan:
        started_ray = _init_ray(config)
        try:
            trained, error = _run_training(config, run_id, plan, results, log)
        finally:
            if started_ray:
                import ray

                ray.shutdown()
        for spec, _ in plan:
            results[spec.concept_id] = trained.get(spec.concept_id) or _result_row(
                spec.concept_id, "failed", error=f"not trained: {error or 'the job ended before reaching it'}"
            )
    rows = [results[cid] for cid in _ordered_ids(report, results)]
    uri = layout.results_uri(config.output, run_id)
    storage.write_bytes(uri, _results_parquet(rows))
    counts = {status: sum(r["status"] == status for r in rows) for status in ("ok", "skipped", "failed")}
    return BatchSummary(run_id, uri, rows, report, time.perf_counter() - started, error, counts)


def _ordered_ids(report: ManifestReport, results: dict) -> list[str]:
    order = [spec.concept_id for spec in report.concepts] + list(report.problems)
    return [cid for cid in dict.fromkeys(order) if cid in results]


def _results_parquet(rows: list[dict]) -> bytes:
    schema = pa.schema([("concept_id", pa.string()), ("status", pa.string()), ("error", pa.string()),
                        ("residual_uri", pa.string()), ("sha256", pa.string()), ("steps", pa.int64()),
                        ("final_loss", pa.float64()), ("seconds", pa.float64())])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    return sink.getvalue().to_pybytes()


def read_results(uri: str) -> list[dict]:
    import io

    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()
