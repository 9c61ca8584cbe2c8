"""A batch worker's outcome side: training states and residuals to storage, result rows to the dispatcher
and to part files, metrics.

Every write goes through `Writer`'s background threads: a concept's writes all go to one thread, in
order, so its last state never lands after its residual; different concepts' writes overlap. Storage
calls retry for minutes (the run's retry budget); a concept whose residual still cannot be written fails
alone with the storage error as its reason.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable

from catversion import layout, storage, telemetry

from .control import Holdings
from .results import result_row, results_parquet

FAULT_KILL_ENV = "CATVERSION_FAULT_KILL_AFTER_WRITES"  # test hook: a worker process dies after N writes
FAULT_STATE_KILL_ENV = "CATVERSION_FAULT_KILL_AFTER_STATES"  # ... or after N saved training states
FAULT_MARKER_ENV = "CATVERSION_FAULT_MARKER"  # ... once: the marker file records that it happened
PART_EVERY_S = 10.0  # result part files: at most this old ...
PART_ROWS = 500  # ... or this many rows
WRITE_THREADS = 4
CONFIRM_EVERY = 64  # outcomes sent to the dispatcher before waiting for them to arrive


class FaultInjector:
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


class Writer:
    """Background threads for every write of one worker, and its result rows (to the dispatcher at once, to
    part files every PART_EVERY_S or PART_ROWS). Bounded: training waits when writes fall far behind."""

    def __init__(self, output: str, run_id: str, worker: str, calls, budget: storage.RetryBudget,
                 on_outcome: Callable[[dict], None] = lambda row: None, threads: int = WRITE_THREADS):
        self.output, self.run_id, self.worker, self.calls, self.budget = output, run_id, worker, calls, budget
        self.on_outcome = on_outcome
        self.queues: list[queue.Queue] = [queue.Queue(maxsize=64) for _ in range(threads)]
        self.lock = threading.Lock()
        self.rows: list[dict] = []
        self.sent: list = []  # dispatcher calls not yet confirmed
        self.parts = 0
        self.last_part = time.monotonic()
        self.counts = {"ok": 0, "failed": 0, "skipped": 0}
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._run, args=(q,), name=f"batch-writer-{n}", daemon=True)
                        for n, q in enumerate(self.queues)]
        for thread in self.threads:
            thread.start()

    def put(self, key: str, task: Callable[[], None]) -> None:
        """Run ``task`` on the thread of ``key`` (a concept id), after that key's earlier tasks."""
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
        with self.lock:
            self.sent.append(self.calls.finish(index, row))
            self.rows.append(row)
            self.counts[row["status"]] = self.counts.get(row["status"], 0) + 1
            sent = self.sent if len(self.sent) >= CONFIRM_EVERY else []
            if sent:
                self.sent = []
        if sent:
            self.calls.confirm(sent)
        self.on_outcome(row)

    def confirm(self) -> None:
        """Wait until the dispatcher has every outcome sent so far."""
        with self.lock:
            sent, self.sent = self.sent, []
        self.calls.confirm(sent)

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


class OutcomeSink:
    """Where a worker's outcomes go: the trainer's ``on_state`` and ``on_result`` callbacks, and ``record``
    for concepts settled before training (failed inputs, up to date, left to another run)."""

    def __init__(self, output: str, run_id: str, worker: str, calls, holdings: Holdings,
                 budget: storage.RetryBudget, metrics: Callable[[dict], None] = lambda row: None):
        self.output, self.run_id, self.holdings, self.budget = output, run_id, holdings, budget
        self.writer = Writer(output, run_id, worker, calls, budget, on_outcome=metrics)
        self.fault = FaultInjector()

    @property
    def counts(self) -> dict[str, int]:
        return self.writer.counts

    def record(self, index: int, row: dict) -> None:
        """A concept's outcome, decided without training it."""
        self.writer.put(row["concept_id"], lambda: self.writer.finish(index, row))

    def on_state(self, concept_id: str, fingerprint: str, step: int, data: bytes) -> None:
        """A training state to save (the trainer's callback); a failed save only means more steps redone."""
        uri = layout.state_uri(self.output, concept_id, fingerprint)

        def save() -> None:
            try:
                storage.write_bytes(uri, data, budget=self.budget)
            except storage.StorageError:
                return  # the next state, or the residual, is written later; resuming then redoes more steps
            self.fault.after("state")

        held = self.holdings.get(concept_id)
        if held is not None:
            held.has_state = True
        self.writer.put(concept_id, save)

    def on_result(self, result) -> None:
        """A concept the trainer finished (catversion.training.TrainResult): write it on its writer thread."""
        held = self.holdings.start_writing(result.concept_id)
        if held is None:  # cannot happen: every concept handed to the trainer is held first
            return
        self.writer.put(result.concept_id, lambda: self._write(result, held))

    def _write(self, result, held) -> None:
        concept_id, index = result.concept_id, held.lease.index
        resumed = _resume_note(result)
        if result.status != "ok":
            # An image that does not decode is remembered (with its stamp) so reruns reject it unfetched.
            problems = [result.error if result.error and result.error.startswith(f"image {uri} ") else None
                        for uri in held.facts["image_uris"]]
            self.writer.finish(index, result_row(concept_id, "failed", error=result.error, detail=resumed,
                                                 seconds=result.seconds, steps=result.steps, image_problems=problems,
                                                 **held.facts))
            self._delete_states(held)
            return
        uri = layout.residual_uri(self.output, concept_id)
        residual = result.residual
        residual.meta["run_id"] = self.run_id
        try:
            info = storage.write_bytes(uri, residual.to_bytes(), budget=self.budget)
        except storage.StorageError as exc:  # its saved state stays: a rerun resumes it
            self.writer.finish(index, result_row(concept_id, "failed", error=str(exc), detail=resumed,
                                                 seconds=result.seconds, **held.facts))
            self.holdings.written(concept_id)
            return
        self.writer.finish(index, result_row(concept_id, "ok", detail=resumed, residual_uri=uri, sha256=residual.sha256,
                                             steps=residual.meta.get("steps"), final_loss=residual.meta.get("final_loss"),
                                             seconds=result.seconds, residual_stamp=info.stamp, **held.facts))
        if self.fault.limits["residual"]:
            self.writer.confirm()  # the test hook kills the process next: the outcome must have arrived
        self.fault.after("residual")
        self._delete_states(held)

    def _delete_states(self, held) -> None:
        concept_id = held.lease.concept.concept_id
        own = [layout.state_uri(self.output, concept_id, held.fingerprint)] if held.has_state else []
        for uri in own + held.stale_states:
            try:
                storage.delete(uri, budget=self.budget)
            except storage.StorageError:
                pass
        self.holdings.written(concept_id)

    def close(self) -> None:
        self.writer.close()


def _resume_note(result) -> str | None:
    """The result row's detail about resuming: from which step, or why a saved state was not used."""
    if result.resume_problem:
        return f"saved training state not used ({result.resume_problem}); trained from step 0"
    if result.resumed_from_step:
        return f"resumed from step {result.resumed_from_step}"
    return None


def concept_metrics(run_id: str) -> Callable[[dict], None]:
    """The Ray metrics of each recorded outcome (concepts done/failed/skipped, seconds per concept)."""
    from catversion.cluster import ray_metric

    tags = {"run_id": run_id}
    counters = {"ok": ray_metric(telemetry.CONCEPTS_DONE), "failed": ray_metric(telemetry.CONCEPTS_FAILED),
                "skipped": ray_metric(telemetry.CONCEPTS_SKIPPED)}
    seconds = ray_metric(telemetry.CONCEPT_SECONDS)

    def observe(row: dict) -> None:
        counter = counters.get(row["status"])
        if counter is not None:
            counter.inc(1, tags)
        if row["status"] == "ok" and row.get("seconds"):
            seconds.observe(row["seconds"], tags)

    return observe
