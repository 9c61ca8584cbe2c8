"""The batch run's work queue: which concepts are pending, leased to a worker, deferred or finished.

One `Dispatcher` per run lives in a Ray actor on the driver's node, so it outlives every worker
group Ray Train starts, restarts or resizes. Workers lease a few concepts at a time (a fast worker
takes more). Each worker group shares a token (rank 0 draws it, the group broadcasts it); when a
worker of a new group joins, the concepts leased to the previous group go back to the front of
the queue: they resume from their saved training state, and one whose residual was written just
before the failure is found up to date instead of being trained again.

Plain Python (no Ray import): the driver wraps it with `ray.remote`, and tests can use it directly.
"""

from __future__ import annotations

import time
from collections import deque


class Dispatcher:
    def __init__(self, rows: list[dict], claim_wait_s: float = 600.0, claiming: bool = False, hold_s: float = 0.0):
        self.rows = rows
        self.claim_wait_s = float(claim_wait_s)
        self.pending: deque[int] = deque(range(len(rows)))
        self.leases: dict[int, str] = {}  # row index -> group token
        self.attempts = [0] * len(rows)
        self.deferred: dict[int, list] = {}  # row index -> [retry_at, owner run, first deferred at]
        self.results: dict[str, dict] = {}
        self.token: str | None = None
        self.groups = 0
        self.progress: dict[str, dict] = {}
        self.stopping: str | None = None
        self.seen = time.time()  # the last call from any worker (the driver's watchdog reads it)
        self.claiming = claiming  # another run is active on the output: claim every concept
        self.hold_until = time.time() + hold_s  # hand nothing out before (so the other run can start claiming)
        self.events: list[str] = []  # for the driver's log: worker groups starting, first leases
        self.leasing: set[str] = set()  # workers of the current group that have leased

    # ---- worker groups -----------------------------------------------------------------------
    def join(self, token: str) -> int:
        """A worker of group ``token`` starts; a new token means the previous group is gone."""
        self.seen = time.time()
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
    def lease(self, token: str, n: int, worker: str = "") -> dict:
        """Up to ``n`` concepts for a worker of group ``token``.

        Returns {"rows": [...]} with each row's index, attempt and deferral facts; an empty list
        means nothing is left for this worker. {"rows": [], "wait": s} asks it to come back later
        (only concepts claimed by another run remain, and it is not their time yet).
        """
        now = self.seen = time.time()
        if token != self.token or self.stopping:
            return {"rows": [], "claiming": self.claiming}
        if now < self.hold_until:
            return {"rows": [], "wait": self.hold_until - now, "claiming": self.claiming}
        if worker and worker not in self.leasing:
            self.leasing.add(worker)
            self.events.append(f"worker {worker} of group {self.groups} is training (model loaded)")
        taken = []
        while len(taken) < n and self.pending:
            taken.append(self.pending.popleft())
        for i, (retry_at, _, _) in list(self.deferred.items()):
            if len(taken) >= n:
                break
            if retry_at <= now:
                taken.append(i)
        rows = []
        for i in taken:
            self.leases[i] = token
            defer = self.deferred.pop(i, None)
            rows.append({**self.rows[i], "index": i, "attempt": self.attempts[i],
                         "deferred_owner": defer[1] if defer else None,
                         "deferred_for_s": now - defer[2] if defer else 0.0,
                         "claim_wait_s": self.claim_wait_s})
        if not rows and self.deferred:
            return {"rows": [], "wait": max(0.2, min(5.0, min(d[0] for d in self.deferred.values()) - now)),
                    "claiming": self.claiming}
        return {"rows": rows, "claiming": self.claiming}

    def defer(self, index: int, owner: str, retry_in_s: float, first_deferred_at: float | None = None) -> None:
        """Another run holds this concept's claim: offer it again in ``retry_in_s`` seconds."""
        self.leases.pop(index, None)
        now = self.seen = time.time()
        self.deferred[index] = [now + retry_in_s, owner, first_deferred_at or now]

    def finish(self, index: int, row: dict) -> None:
        """The outcome of one concept (ok, skipped or failed). An "ok" is never overwritten."""
        self.seen = time.time()
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
    def report(self, worker: str, info: dict) -> dict:
        """Live progress from a worker; returns {"stop": why or None, "claiming": bool}."""
        self.seen = time.time()
        self.progress[worker] = info
        return {"stop": self.stopping, "claiming": self.claiming}

    def set_controller(self, controller) -> None:
        """The Ray Train controller's handle (registered from inside it), so the driver can abort it."""
        self._controller = controller

    def controller(self):
        return getattr(self, "_controller", None)

    def alive(self) -> None:
        """A worker's keep-alive (sent while it loads the model, and throughout)."""
        self.seen = time.time()

    def start_claiming(self, others: list[str]) -> None:
        if not self.claiming:
            self.claiming = True
            self.events.append(f"another run is active on this output ({', '.join(others)}): claiming every "
                               "concept from now on")

    def stop(self, reason: str) -> None:
        self.stopping = reason

    def snapshot(self) -> dict:
        return {"results": self.results, "progress": self.progress, "pending": len(self.pending),
                "leased": len(self.leases), "deferred": len(self.deferred), "groups": self.groups,
                "idle_s": time.time() - self.seen, "events": list(self.events)}
