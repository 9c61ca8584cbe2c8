"""The batch run's work queue: which concepts are pending, leased to a worker, deferred or finished.

One `Dispatcher` per run lives in a Ray actor on the driver's node, so it outlives every worker
group Ray Train starts, restarts or resizes. Workers lease a few concepts at a time (a fast worker
takes more). Each worker group shares a token (rank 0 draws it, the group broadcasts it); when a
worker of a new group joins, the concepts leased to the previous group go back to the front of
the queue: they resume from their saved training state, and one whose residual was written just
before the failure is found up to date instead of being trained again.

A worker trains one layer set at a time (one trainer's patched layers, `PlannedConcept.layers`), so every
lease answer holds concepts of one layer set; the driver queues each layer set's concepts together.

Plain Python (no Ray import, an injectable clock): the driver wraps it with `ray.remote`, and tests
use it directly.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .work import Control, Deferral, Lease, LeaseAnswer, PlannedConcept, Snapshot, WorkerProgress


@dataclass
class _Deferred:
    retry_at: float
    owner: str
    since: float  # when it was first deferred


class Dispatcher:
    def __init__(self, concepts: list[PlannedConcept], claiming: bool = False, hold_s: float = 0.0,
                 clock: Callable[[], float] = time.time):
        self.concepts = concepts
        self.clock = clock
        self.pending: deque[int] = deque(range(len(concepts)))
        self.leases: dict[int, str] = {}  # concept index -> group token
        self.attempts = [0] * len(concepts)
        self.deferred: dict[int, _Deferred] = {}
        self.results: dict[str, dict] = {}
        self.token: str | None = None
        self.groups = 0
        self.progress: dict[str, WorkerProgress] = {}
        self.stopping: str | None = None
        self.seen = clock()  # the last call from any worker (the driver's watchdog reads it)
        self.claiming = claiming  # another run is active on the output: claim every concept
        self.hold_until = self.seen + hold_s  # hand nothing out before (so the other run can start claiming)
        self.events: list[str] = []  # for the driver's log: worker groups starting, first leases
        self.leasing: set[str] = set()  # workers of the current group that have leased
        self._controller = None

    # ---- worker groups -----------------------------------------------------------------------
    def join(self, token: str) -> int:
        """A worker of group ``token`` starts; a new token means the previous group is gone."""
        self.seen = self.clock()
        if token != self.token:
            requeued = sorted(i for i, t in self.leases.items() if t != token)
            for i in reversed(requeued):
                del self.leases[i]
                self.attempts[i] += 1
                self.pending.appendleft(i)
            self.token = token
            self.groups += 1
            self.progress = {}
            self.leasing = set()
            self.events.append(f"worker group {self.groups} started" + (
                f"; {len(requeued)} unfinished concept(s) go back to the queue and resume from their saved state"
                if requeued else ""))
        return self.groups

    # ---- leasing ----------------------------------------------------------------------------
    def lease(self, token: str, n: int, worker: str = "") -> LeaseAnswer:
        """Up to ``n`` concepts of one layer set for a worker of group ``token``: pending ones first, then
        deferred ones whose time has come. No leases and a ``wait_s`` ask the worker to come back later (only
        concepts held by another run remain, or the run holds back at its start)."""
        now = self.seen = self.clock()
        if token != self.token or self.stopping:
            return LeaseAnswer([], self.claiming)
        if now < self.hold_until:
            return LeaseAnswer([], self.claiming, wait_s=self.hold_until - now)
        if worker and worker not in self.leasing:
            self.leasing.add(worker)
            self.events.append(f"worker {worker} of group {self.groups} is training (model loaded)")
        taken = []
        while len(taken) < n and self.pending and (not taken or self._layers(self.pending[0]) == self._layers(taken[0])):
            taken.append(self.pending.popleft())
        for i, deferred in list(self.deferred.items()):
            if len(taken) >= n:
                break
            if deferred.retry_at <= now and (not taken or self._layers(i) == self._layers(taken[0])):
                taken.append(i)
        leases = []
        for i in taken:
            self.leases[i] = token
            deferred = self.deferred.pop(i, None)
            leases.append(Lease(i, self.concepts[i], self.attempts[i],
                                Deferral(deferred.owner, now - deferred.since) if deferred else None))
        if not leases and self.deferred:
            soonest = min(d.retry_at for d in self.deferred.values())
            return LeaseAnswer([], self.claiming, wait_s=max(0.2, min(5.0, soonest - now)))
        return LeaseAnswer(leases, self.claiming)

    def _layers(self, index: int):
        return self.concepts[index].layers

    def defer(self, index: int, owner: str, retry_in_s: float, first_deferred_at: float | None = None) -> None:
        """Another run holds this concept's claim: offer it again in ``retry_in_s`` seconds."""
        self.leases.pop(index, None)
        now = self.seen = self.clock()
        self.deferred[index] = _Deferred(now + retry_in_s, owner, first_deferred_at or now)

    def finish(self, index: int, row: dict) -> None:
        """The outcome of one concept (ok, skipped or failed). An "ok" is never overwritten."""
        self.seen = self.clock()
        self.leases.pop(index, None)
        self.deferred.pop(index, None)
        if self.results.get(row["concept_id"], {}).get("status") != "ok":
            self.results[row["concept_id"]] = row

    def count_settled(self, run_id: str, failed: int, skipped: int) -> None:
        """Concepts the driver settled before training (rejected, up to date) count in the metrics too."""
        from catversion import telemetry
        from catversion.cluster import ray_metric

        tags = {"run_id": run_id}
        if failed:
            ray_metric(telemetry.CONCEPTS_FAILED).inc(failed, tags)
        if skipped:
            ray_metric(telemetry.CONCEPTS_SKIPPED).inc(skipped, tags)

    # ---- progress and stopping ---------------------------------------------------------------
    def report(self, worker: str, progress: WorkerProgress) -> Control:
        """Live progress from a worker; the answer says whether to stop and whether to claim."""
        self.seen = self.clock()
        self.progress[worker] = progress
        return Control(self.stopping, self.claiming)

    def set_controller(self, controller) -> None:
        """The Ray Train controller's handle (registered from inside it), so the driver can abort it."""
        self._controller = controller

    def controller(self):
        return self._controller

    def alive(self) -> None:
        """A worker's keep-alive (sent while it loads the model, and throughout)."""
        self.seen = self.clock()

    def start_claiming(self, others: list[str]) -> None:
        if not self.claiming:
            self.claiming = True
            self.events.append(f"another run is active on this output ({', '.join(others)}): claiming every "
                               "concept from now on")

    def stop(self, reason: str) -> None:
        self.stopping = reason

    def snapshot(self) -> Snapshot:
        return Snapshot(dict(self.results), dict(self.progress), len(self.pending), len(self.leases),
                        len(self.deferred), self.groups, self.clock() - self.seen, list(self.events))
