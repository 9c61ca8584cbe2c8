"""What every Ray Train worker of a batch run does (`train_worker`), and its input and output sides.

Input (a background thread, ahead of training): lease a few concepts from the run's dispatcher,
fetch their images concurrently (the only time in the run they are fetched), hash them into the
training fingerprint, skip a concept whose residual is already up to date, claim the concept
against concurrent runs, load its saved training state if it has one, then decode and VAE-encode
(in `ResidualTrainer`'s prefetch thread). Training: `ResidualTrainer` packs concepts into one UNet
batch and takes each new one in the step after another leaves. Output (a writer thread): training
states every `state_every` steps, residuals as they finish, result rows as part files; storage
calls there retry for minutes, and a concept that still cannot be read or written fails alone with
the storage error as its reason.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from catversion import layout, storage, telemetry
from catversion.recipe import Concept, TrainConfig, image_digest, training_fingerprint
from catversion.cluster import ray_metric

from .claims import Claims
from .manifest import ConceptSpec

FAULT_KILL_ENV = "CATVERSION_FAULT_KILL_AFTER_WRITES"  # test hook: a worker process dies after N writes
FAULT_STATE_KILL_ENV = "CATVERSION_FAULT_KILL_AFTER_STATES"  # ... or after N saved training states
FAULT_MARKER_ENV = "CATVERSION_FAULT_MARKER"  # ... once: the marker file records that it happened
FETCH_THREADS = 8
PART_EVERY_S = 10.0  # result part files: at most this old ...
PART_ROWS = 500  # ... or this many rows
CLAIM_RETRY_S = 5.0
WRITE_THREADS = 4  # a concept claimed by another run is looked at again after this long

RESULT_SCHEMA = pa.schema([
    ("concept_id", pa.string()), ("status", pa.string()), ("error", pa.string()), ("detail", pa.string()),
    ("residual_uri", pa.string()), ("sha256", pa.string()), ("fingerprint", pa.string()), ("steps", pa.int64()),
    ("final_loss", pa.float64()), ("seconds", pa.float64()), ("residual_stamp", pa.string()),
    ("image_uris", pa.list_(pa.string())), ("image_stamps", pa.list_(pa.string())),
    ("image_sha256s", pa.list_(pa.string())), ("image_problems", pa.list_(pa.string())),
])
RESULT_COLUMNS = tuple(RESULT_SCHEMA.names)


def result_row(concept_id: str, status: str, **values) -> dict:
    row = dict.fromkeys(RESULT_COLUMNS)
    row.update(concept_id=concept_id, status=status, **values)
    return row


def results_parquet(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in RESULT_COLUMNS} for r in rows], schema=RESULT_SCHEMA),
                   sink)
    return sink.getvalue().to_pybytes()


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


class _FaultInjector:
    """Test hook: after N residual writes (or N saved states), this worker process dies once
    (os._exit: no cleanup, like a lost node). The marker file makes it happen once per test."""

    def __init__(self):
        self.limits = {"residual": int(os.environ.get(FAULT_KILL_ENV, "0") or 0),
                       "state": int(os.environ.get(FAULT_STATE_KILL_ENV, "0") or 0)}
        self.marker = os.environ.get(FAULT_MARKER_ENV)
        self.counts = {"residual": 0, "state": 0}

    def after(self, what: str) -> None:
        self.counts[what] += 1
        limit = self.limits[what]
        if limit and self.marker and self.counts[what] >= limit and not os.path.exists(self.marker):
            with open(self.marker, "w") as handle:
                handle.write(f"killed pid {os.getpid()} after {self.counts[what]} {what} writes\n")
            os._exit(1)


class Stopped(Exception):
    """The driver asked the run to stop (Ctrl-C, SIGTERM): in-flight concepts keep their saved state."""


@dataclass
class _Inflight:
    index: int
    row: dict  # the result row so far (images, fingerprint)
    fingerprint: str
    stale_states: list[str]
    has_state: bool = False  # a state was loaded or saved: delete it once the concept is done


class Writer:
    """Background threads for every write of this worker. A concept's writes all go to one thread, in
    order, so its last state never lands after its residual; different concepts' writes overlap.
    Bounded: training waits when writes fall far behind."""

    def __init__(self, output: str, run_id: str, worker: str, dispatcher, claims: Claims, budget, tags: dict,
                 threads: int = WRITE_THREADS):
        self.output, self.run_id, self.worker = output, run_id, worker
        self.dispatcher, self.claims, self.budget, self.tags = dispatcher, claims, budget, tags
        self.queues: list[queue.Queue] = [queue.Queue(maxsize=64) for _ in range(threads)]
        self.lock = threading.Lock()
        self.rows: list[dict] = []
        self.sent: list = []  # dispatcher calls not yet confirmed
        self.parts = 0
        self.last_part = time.monotonic()
        self.fault = _FaultInjector()
        self.counts = {"ok": 0, "failed": 0, "skipped": 0}
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._run, args=(q,), name=f"batch-writer-{n}", daemon=True)
                        for n, q in enumerate(self.queues)]
        for thread in self.threads:
            thread.start()

    def put(self, key: str, task) -> None:
        if self.error is not None:
            raise RuntimeError(f"the writer thread failed: {self.error}") from self.error
        self.queues[hash(key) % len(self.queues)].put(task)

    def _run(self, tasks: queue.Queue) -> None:
        while True:
            task = tasks.get()
            if task is None:
                return
            try:
                task()
                self._flush()
            except BaseException as exc:  # noqa: BLE001  (reported on the training thread)
                self.error = exc
                return

    def finish(self, index: int, row: dict) -> None:
        """Record one concept's outcome (on a writer thread)."""
        import ray

        with self.lock:
            self.sent.append(self.dispatcher.finish.remote(index, row))
            self.rows.append(row)
            self.counts[row["status"]] = self.counts.get(row["status"], 0) + 1
            sent = self.sent if len(self.sent) >= 64 else []
            if sent:
                self.sent = []
        if sent:
            ray.get(sent)
        metric = {"ok": telemetry.CONCEPTS_DONE, "failed": telemetry.CONCEPTS_FAILED,
                  "skipped": telemetry.CONCEPTS_SKIPPED}.get(row["status"])
        if metric is not None:
            ray_metric(metric).inc(1, self.tags)
        if row["status"] == "ok" and row.get("seconds"):
            ray_metric(telemetry.CONCEPT_SECONDS).observe(row["seconds"], self.tags)

    def confirm(self) -> None:
        """Wait until the dispatcher has every outcome sent so far."""
        import ray

        with self.lock:
            sent, self.sent = self.sent, []
        ray.get(sent)

    def _flush(self, force: bool = False) -> None:
        with self.lock:
            if not self.rows or (not force and len(self.rows) < PART_ROWS
                                 and time.monotonic() - self.last_part < PART_EVERY_S):
                return
            rows, self.rows = self.rows, []
            name, self.parts, self.last_part = f"{self.worker}-{self.parts:05d}", self.parts + 1, time.monotonic()
        try:
            storage.write_bytes(layout.part_uri(self.output, self.run_id, name), results_parquet(rows),
                                budget=self.budget)
        except storage.StorageError:
            with self.lock:  # the dispatcher has these rows too; the next flush retries them
                self.rows = rows + self.rows

    def close(self) -> None:
        for tasks in self.queues:
            tasks.put(None)
        for thread in self.threads:
            thread.join()
        if self.error is None:
            self._flush(force=True)
            self.confirm()
        if self.error is not None:
            raise RuntimeError(f"the writer thread failed: {self.error}") from self.error


def train_worker(cfg: dict) -> None:
    """Runs on every Ray Train worker: load the model once, train leased concepts until none is left."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from catversion.models import load_base_model
    from catversion.residual import Residual, ResidualFormatError
    from catversion.training import ResidualTrainer

    context = ray.train.get_context()
    rank = context.get_world_rank()
    worker = f"{rank}-{uuid.uuid4().hex[:8]}"
    dispatcher, run_id, output = cfg["dispatcher"], cfg["run_id"], cfg["output"]
    budget = storage.RetryBudget(cfg["storage_retry_s"])
    # One token per worker group: rank 0 draws it and the group shares it, so the dispatcher can
    # tell a restarted or resized group from the one before it.
    token = [uuid.uuid4().hex if rank == 0 else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    ray.get(dispatcher.join.remote(token[0]))
    # Keep-alive for the driver's watchdog: a worker loading a large model is alive, not starved.
    finished = threading.Event()

    def keep_alive() -> None:
        while not finished.wait(10.0):
            dispatcher.alive.remote()

    threading.Thread(target=keep_alive, name="keep-alive", daemon=True).start()

    use_gpu = cfg["gpus_per_worker"] > 0
    device = ray.train.torch.get_device() if use_gpu else "cpu"
    if not use_gpu:
        # Use exactly the CPUs Ray reserved for this worker: more threads would fight the other workers.
        torch.set_num_threads(max(1, int(cfg["cpus_per_worker"])))
    base = load_base_model(cfg["model"], device=device, precision=cfg["precision"])
    trainer = ResidualTrainer(base, pack=cfg["pack"], resolution=cfg["resolution"], compile=cfg["compile"])
    prefetch = cfg["prefetch"] or trainer.pack
    lease = max(1, prefetch)
    if rank == 0:
        print(f"[worker {rank}] {base.model_id} on {base.device}: UNet/VAE {base.precision}, text encoder fp32, pack "
              f"{trainer.pack}{', UNet compiled' if trainer.compiled else ''}", flush=True)
    tags = {"run_id": run_id}
    claims = Claims(output, run_id, cfg["claim_ttl_s"], budget)
    claims.start()
    writer = Writer(output, run_id, worker, dispatcher, claims, budget, tags)
    inflight: dict[str, _Inflight] = {}
    writing: dict[str, str] = {}  # concept id -> fingerprint, while its residual is being written
    resume_states: dict[str, bytes] = {}
    # Claims are taken only while another run is active on the output (the dispatcher says so).
    mode = {"claiming": False}
    switch_lock = threading.Lock()

    def start_claiming() -> None:
        """Another run appeared: claim everything this worker holds in flight or is still writing."""
        with switch_lock:
            if mode["claiming"]:
                return
            mode["claiming"] = True
            held = {**{c: job.fingerprint for c, job in list(inflight.items())}, **dict(writing)}
            for concept_id, fingerprint in held.items():
                try:
                    claims.acquire(concept_id, fingerprint)
                except storage.StorageError:
                    pass  # the claim could not be written: the other run's claim check then finds ours missing

    fetch_pool = ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="fetch")

    def existing_residual(row: dict, fingerprint: str) -> tuple[Residual, str] | None:
        """The residual already written for this concept when it is up to date, with its stamp.

        Called while holding the concept's claim: a residual a concurrent run wrote before
        releasing its claim is seen here, so the concept is never trained twice.
        """
        uri = layout.residual_uri(output, row["concept_id"])
        info = storage.stat(uri, budget=budget)
        if info is None:
            return None
        if info.stamp == row["residual_stamp"] and row["residual_fingerprint"] not in (None, fingerprint):
            return None  # unchanged since planning, and known to be out of date
        try:
            data, info = storage.read_object(uri, budget=budget)
            residual = Residual.load(data)
        except (storage.NotFoundError, ResidualFormatError):
            return None
        return (residual, info.stamp) if residual.meta.get("training_fingerprint") == fingerprint else None

    def record(index: int, row: dict) -> None:
        writer.put(row["concept_id"], lambda: writer.finish(index, row))

    def prepare(row: dict) -> Concept | None:
        """Everything before decoding, for one leased concept (on a fetch thread): fetch and hash its
        images, claim it, check for an up-to-date residual, find its saved state. None when it is
        settled here (its outcome is recorded) or left to another run."""
        index, concept_id = row["index"], row["concept_id"]
        spec = ConceptSpec.from_row(row)
        try:
            config = concept_config(spec, cfg["steps"], cfg["prefix_logit_bias"])
        except ValueError as exc:
            record(index, result_row(concept_id, "failed", error=str(exc)))
            return None
        images, stamps = [], []
        for ref in spec.images:
            if ref.data is not None:
                images.append(ref.data)
                stamps.append(None)
                continue
            try:
                data, info = storage.read_object(ref.uri, budget=budget)
            except storage.NotFoundError:
                record(index, result_row(concept_id, "failed", error=f"image {ref.name} does not exist"))
                return None
            except storage.StorageError as exc:
                record(index, result_row(concept_id, "failed", error=f"image {ref.name}: {exc}"))
                return None
            images.append(data)
            stamps.append(info.stamp)
        concept = to_concept(spec, config, images)
        digests = [ref.digest or image_digest(data) for ref, data in zip(spec.images, images)]
        fingerprint = training_fingerprint(concept, digests, trainer.target)
        facts = {"fingerprint": fingerprint, "image_uris": [ref.uri for ref in spec.images], "image_stamps": stamps,
                 "image_sha256s": digests}

        def claim() -> bool:
            """Claim the concept; False when another run holds it (then it is deferred or reported)."""
            held = claims.acquire(concept_id, fingerprint)
            if held is None:
                return True
            waited = row["deferred_for_s"]
            if waited >= row["claim_wait_s"]:
                record(index, result_row(concept_id, "skipped", error=None, detail=(
                    f"claimed by run {held.owner}, which was still training it after {waited:.0f} s"), **facts))
            else:
                dispatcher.defer.remote(index, held.owner, CLAIM_RETRY_S, time.time() - waited)
            return False

        try:
            claiming = mode["claiming"]
            if claiming and not claim():
                return None
            # Solo, a residual can only exist where planning saw one (or this run wrote it before a
            # restart); with another run active, one may have landed since: look after claiming.
            may_exist = claiming or row["residual_stamp"] is not None or row["attempt"] > 0 or row["deferred_owner"]
            found = existing_residual(row, fingerprint) if may_exist else None
            if found is not None:
                claims.release(concept_id)
                residual, stamp = found
                trained_by = residual.meta.get("run_id")
                status = "ok" if trained_by == run_id else "skipped"  # ours: written just before a worker restart
                detail = "up to date" if trained_by in (None, run_id) else f"up to date (trained by run {trained_by})"
                record(index, result_row(concept_id, status, detail=detail,
                                         residual_uri=layout.residual_uri(output, concept_id), sha256=residual.sha256,
                                         steps=residual.meta.get("steps"), final_loss=residual.meta.get("final_loss"),
                                         residual_stamp=stamp, **facts))
                if trained_by == run_id:
                    # Written by this run's worker that died before deleting the concept's saved state (a
                    # lost node): the state is of no use now.
                    for uri in {layout.state_uri(output, concept_id, fingerprint), *(row["states"] or [])}:
                        try:
                            storage.delete(uri, budget=budget)
                        except storage.StorageError:
                            pass
                return None
            state_uri = layout.state_uri(output, concept_id, fingerprint)
            stale = [uri for uri in row["states"] or [] if uri != state_uri]
            if row["attempt"] > 0 or state_uri in (row["states"] or []):
                try:
                    resume_states[concept_id] = storage.read_bytes(state_uri, budget=budget)
                except storage.NotFoundError:
                    pass
        except storage.StorageError as exc:
            claims.release(concept_id)
            record(index, result_row(concept_id, "failed", error=str(exc), **facts))
            return None
        inflight[concept_id] = _Inflight(index, facts, fingerprint, stale, has_state=concept_id in resume_states)
        if mode["claiming"] and not claims.holds(concept_id):
            # Claiming began while this concept was being prepared: claim it now, or leave it.
            try:
                if not claim() or existing_residual(row, fingerprint) is not None:
                    inflight.pop(concept_id, None)
                    resume_states.pop(concept_id, None)
                    if claims.holds(concept_id):
                        claims.release(concept_id)
                        dispatcher.defer.remote(index, run_id, 0.0, time.time())  # look again: now up to date
                    return None
            except storage.StorageError as exc:
                inflight.pop(concept_id, None)
                record(index, result_row(concept_id, "failed", error=str(exc), **facts))
                return None
        return concept

    def source():
        """Leased concepts, ready to decode (runs on the trainer's prefetch thread)."""
        while True:
            answer = ray.get(dispatcher.lease.remote(token[0], lease, worker))
            if answer.get("claiming") and not mode["claiming"]:
                start_claiming()
            rows = answer["rows"]
            if not rows:
                if "wait" in answer:
                    time.sleep(answer["wait"])
                    continue
                return
            for future in [fetch_pool.submit(prepare, row) for row in rows]:
                concept = future.result()
                if concept is not None:
                    yield concept

    def resume(concept: Concept, fingerprint: str) -> bytes | None:
        return resume_states.pop(concept.concept_id, None)

    def on_state(concept_id: str, fingerprint: str, step: int, data: bytes) -> None:
        uri = layout.state_uri(output, concept_id, fingerprint)

        def save() -> None:
            try:
                storage.write_bytes(uri, data, budget=budget)
            except storage.StorageError:
                return  # the next state, or the residual, is written later; resuming then redoes more steps
            writer.fault.after("state")
        job = inflight.get(concept_id)
        if job is not None:
            job.has_state = True
        writer.put(concept_id, save)

    def on_result(result) -> None:
        job = inflight.get(result.concept_id)
        if job is None:  # cannot happen: every concept handed to the trainer is recorded in flight first
            return
        concept_id, index = result.concept_id, job.index
        writing[concept_id] = job.fingerprint  # first: a switch to claiming must see it in one of the two
        inflight.pop(concept_id, None)

        def done() -> None:
            with switch_lock:  # after this, a switch to claiming no longer claims it
                writing.pop(concept_id, None)
            claims.release(concept_id)

        def write() -> None:
            if result.status != "ok":
                # An image that does not decode is remembered (with its stamp) so reruns reject it unfetched.
                problems = [result.error if result.error and result.error.startswith(f"image {uri} ") else None
                            for uri in job.row["image_uris"]]
                writer.finish(index, result_row(concept_id, "failed", error=result.error, seconds=result.seconds,
                                                steps=result.steps, image_problems=problems, **job.row))
                _cleanup()
                return
            uri = layout.residual_uri(output, concept_id)
            residual = result.residual
            residual.meta["run_id"] = run_id
            try:
                info = storage.write_bytes(uri, residual.to_bytes(), budget=budget)
            except storage.StorageError as exc:
                writer.finish(index, result_row(concept_id, "failed", error=str(exc), seconds=result.seconds, **job.row))
                done()
                return
            writer.finish(index, result_row(concept_id, "ok", residual_uri=uri, sha256=residual.sha256,
                                            steps=residual.meta.get("steps"), final_loss=residual.meta.get("final_loss"),
                                            seconds=result.seconds, residual_stamp=info.stamp, **job.row))
            if writer.fault.limits["residual"]:
                writer.confirm()  # the test hook kills the process next: the outcome must have arrived
            writer.fault.after("residual")
            _cleanup()

        def _cleanup() -> None:
            own = [layout.state_uri(output, concept_id, job.fingerprint)] if job.has_state else []
            for uri in own + job.stale_states:
                try:
                    storage.delete(uri, budget=budget)
                except storage.StorageError:
                    pass
            done()

        writer.put(concept_id, write)

    steps_metric, speed = ray_metric(telemetry.TRAIN_STEPS), ray_metric(telemetry.TRAIN_IMAGES_PER_SECOND)
    last = {"t": 0.0, "steps": 0, "ips": 0.0}

    def on_progress(progress) -> None:
        now = time.monotonic()
        last["ips"] = progress.images_per_s
        if now - last["t"] < 1.0:
            return
        steps_metric.inc(progress.steps_done - last["steps"], tags)
        speed.set(progress.images_per_s, {**tags, "worker": str(rank)})
        answer = ray.get(dispatcher.report.remote(worker, {"steps": progress.steps_done, "active": progress.active,
                                                            "images_per_s": progress.images_per_s}))
        last.update(t=now, steps=progress.steps_done)
        if answer["claiming"] and not mode["claiming"]:
            start_claiming()
        if answer["stop"]:
            raise Stopped(answer["stop"])

    stopped = None
    try:
        trainer.train(source(), on_result=on_result, on_progress=on_progress, prefetch=prefetch,
                      state_every=cfg["state_every"], on_state=on_state, resume=resume)
    except Stopped as exc:
        stopped = str(exc)
    finally:
        finished.set()
        fetch_pool.shutdown(wait=False, cancel_futures=True)
        writer.close()
        claims.stop()
        if stopped:
            for concept_id in list(inflight):
                claims.release(concept_id)  # a later run resumes them from their saved state
    if base.device.type == "cuda":
        compiled = f", compiling took {trainer.compile_seconds:.0f} s" if trainer.compiled else ""
        print(f"[worker {rank}] peak GPU memory {torch.cuda.max_memory_allocated(base.device) / 2**30:.1f} GiB "
              f"(pack {trainer.pack}){compiled}", flush=True)
    ray.train.report({"worker": rank, "concepts_done": writer.counts["ok"], "concepts_failed": writer.counts["failed"],
                      "concepts_skipped": writer.counts["skipped"], "images_per_s": last["ips"],
                      "stopped": stopped or ""})
