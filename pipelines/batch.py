"""The batch job: plan a manifest cheaply, train what is out of date on Ray Train, write results.

The driver reads the parquet manifest and checks it without fetching any image (pipelines.manifest),
then decides what to train from listings and index files in O(N/1000) requests (pipelines.plan).
A concept already up to date is skipped with no Ray at all. The rest go into a work queue (a
`Dispatcher` actor on the driver's node) that Ray Train workers lease from (pipelines.worker): each
worker fetches, hashes and decodes its concepts' images in the background while it trains packed
concepts, saves each concept's training state every `state_every` steps, and writes each residual
the moment it is done. A worker group that Ray Train restarts or resizes (`min_workers` makes it
elastic) gets the unfinished concepts back and resumes them from their saved state. Claims keep two
runs on the same output from training a concept twice. Result rows land as part files while the
run goes, and results.parquet is written at the end, also after an interruption.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from catversion import layout, storage
from catversion.errors import InsufficientResources
from catversion.limits import DEFAULT_STORAGE_RETRY_S

from . import claims
from . import plan as planning
from .manifest import ManifestReport, validate_manifest
from .options import BatchConfig, BatchConfigError  # noqa: F401  (part of this module's API)
from .outcomes import FAULT_KILL_ENV, FAULT_MARKER_ENV, FAULT_STATE_KILL_ENV  # noqa: F401  (test hooks)
from .results import STATUSES, read_results, result_row, results_parquet  # noqa: F401  (read_results: API)
from .work import PlannedConcept, concept_config, to_concept

# Forwarded to the workers of a joined cluster so they reach the same S3 endpoint and model cache as the
# driver. Never credentials: a cluster's workers use their nodes' own (README, "Running on a Ray cluster").
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
                 "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE")
START_ATTEMPT_S = 15.0  # each try to place the worker group waits this long for resources
ABORT_WAIT_S = 30.0


@dataclass
class BatchSummary:
    run_id: str
    results_uri: str
    results: list[dict]
    report: ManifestReport
    seconds: float
    error: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    planning_seconds: float = 0.0
    interrupted: bool = False
    results_error: str | None = None  # why results.parquet could not be written (the summary is then the record)

    @property
    def ok(self) -> bool:
        return (self.error is None and self.results_error is None and not self.interrupted
                and self.counts.get("failed", 0) == 0)

    def to_dict(self) -> dict:
        """The machine-readable summary (`catversion batch --json`)."""
        return {
            "run_id": self.run_id, "results_uri": self.results_uri, "ok": self.ok,
            "counts": {status: self.counts.get(status, 0) for status in STATUSES},
            "rejected": dict(self.report.problems),
            "failed": [{"concept_id": r["concept_id"], "error": r["error"]} for r in self.results
                       if r["status"] == "failed" and r["concept_id"] not in self.report.problems],
            "interrupted": self.interrupted, "error": self.error, "results_error": self.results_error,
            "seconds": round(self.seconds, 3), "planning_seconds": round(self.planning_seconds, 3),
            # results.parquet could not be written: every concept's outcome is here instead.
            **({"results": [{k: r[k] for k in ("concept_id", "status", "error", "detail", "residual_uri")}
                            for r in self.results]} if self.results_error else {}),
        }

    def format(self) -> str:
        lines = [
            f"run {self.run_id}: {self.counts.get('ok', 0)} trained, {self.counts.get('skipped', 0)} skipped, "
            f"{self.counts.get('failed', 0)} failed, {self.counts.get('interrupted', 0)} interrupted, "
            f"in {self.seconds:.1f} s",
            f"results: {self.results_uri}",
        ]
        for row in self.results:
            if self.results_error:  # results.parquet is not there: this summary is the run's record
                lines.append(f"  {row['status']} {row['concept_id']}" + "".join(
                    f": {row[k]}" for k in ("error", "detail") if row[k]))
            elif row["status"] == "failed":
                lines.append(f"  failed {row['concept_id']}: {row['error']}")
        if self.results_error:
            lines.append(f"results not written: {self.results_error}")
        if self.counts.get("interrupted"):
            lines.append(f"  {self.counts['interrupted']} concept(s) not finished: run again to finish them (one "
                         "with a saved state resumes from it)")
        if self.error:
            lines.append(f"job error: {self.error}")
        return "\n".join(lines)


# ---- the Ray side ----------------------------------------------------------------------------


def _init_ray(config: BatchConfig) -> bool:
    """Start a local Ray, or join the one named by --address (or RAY_ADDRESS); returns True when this call
    connected (and so must shut Ray down). A Ray started here runs the workers with this process's
    environment, credentials included; a joined cluster gets only FORWARDED_ENV (catversion.cluster.output)."""
    from catversion.cluster import connect

    return connect(config.address, {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})


def _group_size(config: BatchConfig, concepts: int) -> tuple[int, int]:
    """(fewest, most) workers of the group: at most one per concept; fewest = most unless elastic."""
    most = max(1, min(config.workers, concepts))
    return (min(config.min_workers, most) if config.min_workers else most), most


def check_worker_resources(config: BatchConfig, concepts: int) -> None:
    """Fail in seconds, naming what is missing, when the cluster (and its autoscaler) can never run the
    worker group: its minimum when elastic, else all of it."""
    from catversion.cluster import Request, check_resources

    count = _group_size(config, concepts)[0]
    count_flag = "--min-workers" if config.min_workers else "--workers (or let the group shrink with --min-workers)"
    check_resources(Request("worker", count, config.resources,
                            flags={"GPU": "--gpus-per-worker 0", "CPU": "a lower --cpus-per-worker"},
                            count_flag=count_flag))


def _abort(dispatcher, fit_done: threading.Event, wait_s: float = ABORT_WAIT_S) -> None:
    """End the Train run through its controller, then wait for fit() to return.

    The controller's graceful abort can wait behind a placement-group wait of START_ATTEMPT_S, so
    after a short grace it is killed (Ray Train's placement group cleaner then frees its resources).
    A controller that has not registered yet (an interrupt while the run starts) is waited for:
    Ray must never be shut down under a live fit(), whose next call into Ray would end the process.
    """
    import ray

    deadline = time.monotonic() + wait_s
    controller = None
    while controller is None and not fit_done.is_set() and time.monotonic() < deadline:
        try:
            controller = ray.get(dispatcher.controller.remote(), timeout=10)
        except Exception:  # noqa: BLE001
            controller = None
        if controller is None:
            fit_done.wait(0.5)
    if controller is not None and not fit_done.is_set():
        try:
            ray.get(controller.abort.remote(), timeout=5)
        except Exception:  # noqa: BLE001  (busy, or already gone)
            pass
        if not fit_done.wait(5):
            ray.kill(controller, no_restart=True)
    fit_done.wait(wait_s)


def _missing_resources(config: BatchConfig, error: str) -> str:
    """The job error for a worker group that never got its resources: what was asked, what there is."""
    import ray

    wanted = config.min_workers or config.workers
    each = ", ".join(f"{v:g} {k}" for k, v in config.resources.items())
    try:
        total = ray.cluster_resources()
        has = ", ".join(f"{total.get(k, 0):g} {k}" for k in config.resources)
    except Exception:  # noqa: BLE001
        has = "unknown"
    return (f"the worker group could not get its resources for {config.resources_timeout_s:g} s: it needs "
            f"{wanted} worker(s) with {each} each; the cluster has {has} in all. Add nodes, or lower --workers, "
            f"--cpus-per-worker or --gpus-per-worker (or let it shrink with --min-workers) [{error}]")


def _trainer(config: BatchConfig, run_id: str, dispatcher, concepts: int):
    """The TorchTrainer of the run: every worker runs train_worker with the run's WorkerConfig."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from catversion.cluster.output import SECRET_NAME, check_no_secrets
    from catversion.cluster.ray_internals import controller_callback

    from .work import WorkerConfig
    from .worker import train_worker

    # Test hooks and any extra settings the caller asks the workers to see (the S3 endpoint and the model
    # cache reach them as _init_ray says). Ray logs a runtime environment in plain text: no secrets here.
    check_no_secrets(config.worker_env or {}, "the Train workers' runtime environment")
    env = {k: v for k, v in os.environ.items() if k.startswith("CATVERSION_") and not SECRET_NAME.search(k)}
    env.update(config.worker_env or {})
    use_gpu = config.gpus_per_worker > 0
    fewest, most = _group_size(config, concepts)
    # The controller hands its handle to the dispatcher (the driver aborts the run through it) and tries
    # to place the group for START_ATTEMPT_S at a time; the supervisor's watchdog ends the run after
    # resources_timeout_s without any worker.
    start_timeout = min(START_ATTEMPT_S, config.resources_timeout_s)
    on_start = controller_callback(lambda controller: dispatcher.set_controller.remote(controller),
                                   env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(start_timeout)})
    return TorchTrainer(
        functools.partial(train_worker, WorkerConfig(config, run_id, dispatcher)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=(fewest, most) if config.min_workers else most, use_gpu=use_gpu,
                                     resources_per_worker=config.resources,
                                     elastic_resize_monitor_interval_s=config.resize_interval_s),
        run_config=RunConfig(
            name=f"catversion-{run_id}", storage_path=config.storage_path,
            failure_config=FailureConfig(max_failures=config.max_failures, controller_failure_limit=-1),
            worker_runtime_env={"env_vars": env} if env else None, callbacks=[on_start]),
    )


def _run_training(config: BatchConfig, run_id: str, planned: list[PlannedConcept], settled: dict[str, dict],
                  marker: claims.RunMarker, others: list[str], log: Callable[[str], None],
                  progress: Callable[[dict], None] | None = None) -> tuple[dict, str | None, bool]:
    """Train the planned concepts; returns (results by concept id, job error, interrupted)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .dispatch import Dispatcher
    from .supervisor import RayDriverCalls, Supervisor

    here = ray.get_runtime_context().get_node_id()
    dispatcher = ray.remote(num_cpus=0, max_restarts=0)(Dispatcher).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(
            planned, claiming=bool(others), hold_s=claims.CLAIM_GRACE_S if others else 0.0)
    dispatcher.count_settled.remote(run_id, sum(r["status"] == "failed" for r in settled.values()),
                                    sum(r["status"] == "skipped" for r in settled.values()))
    if others:
        log(f"[batch {run_id}] other run(s) active on this output ({', '.join(others)}): every concept is claimed, "
            "and one they are training is left to them")
    trainer = _trainer(config, run_id, dispatcher, len(planned))
    outcome: dict = {}
    # fit() ends by setting this event. Thread.is_alive() is not used for that: after a join() that a
    # Ctrl-C interrupted, CPython (3.11) may report a running thread as dead.
    fit_done = threading.Event()

    def fit() -> None:
        try:
            trainer.fit()
        except Exception as exc:  # noqa: BLE001  (TrainingFailedError after max_failures; results so far stand)
            outcome["error"] = exc
        finally:
            fit_done.set()

    threading.Thread(target=fit, name="batch-fit", daemon=True).start()
    verdict = Supervisor(
        RayDriverCalls(dispatcher), fit_done, run_id=run_id, total=len(planned),
        resources_timeout_s=config.resources_timeout_s, others=lambda: _others(marker),
        abort=lambda: _abort(dispatcher, fit_done),
        missing_resources=lambda idle: _missing_resources(config, f"no worker ran for {idle:.0f} s"),
        claiming=bool(others), log=log, progress=progress).watch()
    try:
        results = ray.get(dispatcher.snapshot.remote(), timeout=30).results
    except Exception:  # noqa: BLE001
        results = {}
    ray.kill(dispatcher)
    error = verdict.starved
    if error is None and "error" in outcome:
        error = _root_cause(outcome["error"])
    return results, error, verdict.interrupted


def _others(marker: claims.RunMarker) -> list[str]:
    try:
        return marker.others()
    except storage.StorageError:
        return []


def _root_cause(exc: BaseException) -> str:
    """The first line a user can act on: Ray wraps worker errors (WorkerGroupError) around the real one."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        first = next(iter(failures.values()))
        cause = getattr(first, "cause", None) or first
        text = str(cause).strip().splitlines()
        return f"{type(exc).__name__}: worker failed: {text[-1] if text else type(cause).__name__}"
    cause = getattr(exc, "controller_failure", None)
    if cause is not None:
        return f"{type(exc).__name__}: {type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ---- the driver ----------------------------------------------------------------------------


def run_batch(config: BatchConfig, log: Callable[[str], None] = print,
              progress: Callable[[dict], None] | None = None) -> BatchSummary:
    """Plan and train every concept of the manifest; `log` gets each event line, `progress` the run's
    counts every few seconds (dict: total, done, trained, skipped, failed, workers, images_per_s; without
    it they are logged as a line)."""
    started = time.perf_counter()
    # Workers run in their own folders: relative local paths must mean what they mean here.
    config = replace(config, manifest=storage.absolute(config.manifest), output=storage.absolute(config.output),
                     model=storage.absolute_model(config.model),
                     storage_path=storage.absolute(config.storage_path) if config.storage_path else None)
    run_id = config.run_id or time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    budget = storage.RetryBudget(config.storage_retry_s)
    report = validate_manifest(config.manifest, check_images=False, allowed_roots=config.allow_images_under,
                               strict=config.strict)
    log(f"[batch {run_id}] manifest: {len(report.concepts)} valid concepts, {len(report.rejected)} rejected, "
        f"{report.rows} rows")
    for warning in report.warnings:
        log(f"warning: {warning}")
    # This run's marker goes up before planning: a run that starts later sees it and claims; one
    # already running is seen here (and notices this one within seconds).
    marker = claims.RunMarker(config.output, run_id, config.claim_ttl_s, budget, log=log)
    results = _rejected_rows(report)
    try:
        marker.start()
    except storage.StorageError as exc:
        # Where its marker cannot be written, nothing of the run can be: it ends before planning, saying why.
        error = f"cannot write under --output {config.output}: {exc}"
        log(f"[batch {run_id}] error: {error}")
        _not_started(report, results, error)
        return _record(config, run_id, report, results, planning.Listing(), started, 0.0, error, False, log)
    try:
        return _run_batch(config, run_id, budget, report, results, marker, started, log, progress)
    finally:
        marker.stop()


def _rejected_rows(report: ManifestReport) -> dict[str, dict]:
    """The failed rows of the concepts the manifest checks rejected (their ids may be anything: never a path)."""
    return {cid: result_row(cid, "failed", error="; ".join(reasons)) for cid, reasons in report.problems.items()}


def _not_started(report: ManifestReport, results: dict[str, dict], error: str) -> None:
    """An ``interrupted`` row, naming ``error``, for every valid concept the run did not reach."""
    for spec in report.concepts:
        results.setdefault(spec.concept_id, result_row(spec.concept_id, "interrupted", error=f"not started: {error}"))


def _run_batch(config: BatchConfig, run_id: str, budget: storage.RetryBudget, report: ManifestReport,
               results: dict[str, dict], marker: claims.RunMarker, started: float, log: Callable[[str], None],
               progress: Callable[[dict], None] | None) -> BatchSummary:
    from catversion.families import UnknownFamilyError
    from catversion.modelsource import ModelNotAvailableError

    try:
        others = marker.others()
        planned, listing = _plan(config, report, results, budget, log) if report.concepts else ([], planning.Listing())
    except (storage.StorageError, ModelNotAvailableError, UnknownFamilyError, BatchConfigError) as exc:
        # The store, the model, or --layers for this model: nothing can train.
        error = exc.for_command_line() if isinstance(exc, BatchConfigError) else str(exc)
        log(f"[batch {run_id}] error: cannot plan the run: {error}")
        _not_started(report, results, error)
        return _record(config, run_id, report, results, planning.Listing(), started, time.perf_counter() - started,
                       error, False, log)
    planning_seconds = time.perf_counter() - started
    skipped = sum(r["status"] == "skipped" for r in results.values())
    log(f"[batch {run_id}] planned in {planning_seconds:.1f} s ({listing.requests} listing/index requests): "
        f"{len(planned)} to train or check, {skipped} up to date")
    error, interrupted = None, False
    if planned:
        error, interrupted = _train(config, run_id, planned, results, marker, others, budget, log, progress)
    return _record(config, run_id, report, results, listing, started, planning_seconds, error, interrupted, log)


def _record(config: BatchConfig, run_id: str, report: ManifestReport, results: dict[str, dict],
            listing: planning.Listing, started: float, planning_seconds: float, error: str | None,
            interrupted: bool, log: Callable[[str], None]) -> BatchSummary:
    """The run's end: results.parquet, then the index files, each failing alone (and said so in the log)."""
    ordered = [results[cid] for cid in _ordered_ids(report, results)]
    uri = layout.results_uri(config.output, run_id)
    # The run's record: worth waiting for through a long outage, whatever the per-call budget.
    final = storage.RetryBudget(max(config.storage_retry_s, DEFAULT_STORAGE_RETRY_S))
    results_error = None
    try:
        storage.write_bytes(uri, results_parquet(ordered), budget=final)
    except storage.StorageError as exc:
        results_error = str(exc)
        log(f"[batch {run_id}] error: could not write the run's results ({exc}); the summary lists every concept")
    try:
        planning.update_indexes(config.output, listing, ordered, final, run_id)
    except Exception as exc:  # noqa: BLE001  (a cache: losing it costs the next run time, never this run's record)
        log(f"[batch {run_id}] warning: could not update the index files under {config.output} "
            f"({type(exc).__name__}: {exc}); the next run plans slower")
    counts = {status: sum(r["status"] == status for r in ordered) for status in STATUSES}
    return BatchSummary(run_id, uri, ordered, report, time.perf_counter() - started, error, counts,
                        planning_seconds=planning_seconds, interrupted=interrupted, results_error=results_error)


def _plan(config: BatchConfig, report: ManifestReport, results: dict[str, dict], budget: storage.RetryBudget,
          log: Callable[[str], None]) -> tuple[list[PlannedConcept], planning.Listing]:
    """Settle what listings and indexes can (missing or known-bad images, up-to-date residuals, layers that do
    not fit the model) into ``results``; the rest is planned for the workers, each layer set's concepts together."""
    from catversion.modelinfo import describe, training_target_for
    from catversion.recipe import format_layers, layers_key

    # The base model's family, encoders and fingerprint from its files (cached by their stamps): planning
    # loads no model.
    info = describe(config.model)
    try:
        default_layers = info.layer_sets(config.layers)
    except ValueError as exc:
        raise BatchConfigError([("layers", f"{format_layers(config.layers)!r} does not fit base model "
                                           f"{config.model!r}: {exc}; valid: {info.layers_help()}")]) from None
    target = training_target_for(config.model, config.resolution, default_layers, precision=config.training_precision)
    listing = planning.gather(config.output, report.concepts, budget, log)
    planned = []
    for spec in report.concepts:
        cid = spec.concept_id
        try:
            concept = to_concept(spec, concept_config(spec, config.steps, config.prefix_logit_bias))
        except ValueError as exc:
            results[cid] = result_row(cid, "failed", error=str(exc))
            continue
        layers = default_layers
        if spec.layers is not None:
            try:
                layers = info.layer_sets(spec.layers)
            except ValueError as exc:
                results[cid] = result_row(cid, "failed", error=(
                    f"column 'layers' {format_layers(spec.layers)!r} does not fit base model {config.model!r}: {exc}; "
                    f"valid: {info.layers_help()}"))
                continue
        concept_target = target if layers == default_layers else replace(target, layers=layers_key(layers))
        missing = [ref.name for ref in spec.images if ref.uri is not None and listing.image_missing(ref.uri)]
        known_bad = [problem for ref in spec.images if (problem := listing.image_problem(ref))]
        if missing or known_bad:
            results[cid] = result_row(cid, "failed", error="; ".join(
                [f"image {name} does not exist" for name in missing] if missing else known_bad))
            continue
        fingerprint = planning.fingerprint_of(concept, spec, listing, concept_target)
        known = listing.residual_fingerprint(cid)
        if fingerprint is not None and known == fingerprint:
            results[cid] = planning.up_to_date_row(config.output, cid, listing, fingerprint)
            continue
        planned.append(PlannedConcept(spec, listing.residuals.get(cid), known, tuple(listing.states.get(cid, [])),
                                      layers=layers))
    # A worker trains one layer set at a time: queue each set's concepts together, sets in order of first use.
    first_use: dict = {}
    planned.sort(key=lambda item: first_use.setdefault(item.layers, len(first_use)))
    return planned, listing


def _train(config: BatchConfig, run_id: str, planned: list[PlannedConcept], results: dict[str, dict],
           marker: claims.RunMarker, others: list[str], budget: storage.RetryBudget, log: Callable[[str], None],
           progress: Callable[[dict], None] | None) -> tuple[str | None, bool]:
    """Train the planned concepts on Ray; their rows go into ``results``. Returns (job error, interrupted)."""
    try:
        trained, error, interrupted = _train_on_ray(config, run_id, planned, results, marker, others, log, progress)
    except Exception as exc:  # noqa: BLE001  (Ray failed, or a bug: the run's record is written all the same)
        trained, error, interrupted = {}, _root_cause(exc), False
        log(f"[batch {run_id}] error: the training job failed: {error}\n" + "".join(traceback.format_exception(exc)))
    stopped = "interrupted" if interrupted else (f"not finished: {error}" if error else "the job ended before reaching it")
    for item in planned:
        cid = item.concept_id
        results[cid] = trained.get(cid) or result_row(cid, "interrupted", error=stopped)
    # Only planned concepts can hold claims (a rejected concept's id may not even be a valid key).
    unfinished = [item.concept_id for item in planned if results[item.concept_id]["status"] in ("failed", "interrupted")]
    problems = claims.release_leftovers(config.output, run_id, unfinished, budget)
    if problems:
        log(f"[batch {run_id}] warning: {len(problems)} claim(s) of this run could not be released (first: "
            f"{problems[0]}); they expire after {config.claim_ttl_s:g} s")
    return error, interrupted


def _train_on_ray(config: BatchConfig, run_id: str, planned: list[PlannedConcept], results: dict[str, dict],
                  marker: claims.RunMarker, others: list[str], log: Callable[[str], None],
                  progress: Callable[[dict], None] | None) -> tuple[dict, str | None, bool]:
    """Start or join Ray, check the cluster can run the workers, train; (results by id, job error, interrupted)."""
    started_ray = _init_ray(config)
    try:
        try:
            check_worker_resources(config, len(planned))
        except InsufficientResources as exc:  # nothing can start: the run's record says why
            log(f"[batch {run_id}] cannot start: {exc}")
            return {}, str(exc), False
        return _run_training(config, run_id, planned, results, marker, others, log, progress)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _ordered_ids(report: ManifestReport, results: dict) -> list[str]:
    order = [spec.concept_id for spec in report.concepts] + list(report.problems)
    return [cid for cid in dict.fromkeys(order) if cid in results]
