"""How a batch worker calls its run's Dispatcher: through its Ray actor handle, or directly in tests.

Both classes have the same methods; the worker's parts (pipelines/intake.py, outcomes.py, control.py)
take either, so they run without Ray in unit tests.
"""

from __future__ import annotations

from .dispatch import Dispatcher
from .work import Control, LeaseAnswer, WorkerProgress


class RayCalls:
    """Calls on the Dispatcher actor. Deferrals and keep-alives are sent without waiting; outcomes are
    sent without waiting and confirmed in batches (`confirm`)."""

    def __init__(self, handle):
        self.handle = handle

    def join(self, token: str) -> int:
        import ray

        return ray.get(self.handle.join.remote(token))

    def lease(self, token: str, n: int, worker: str) -> LeaseAnswer:
        import ray

        return ray.get(self.handle.lease.remote(token, n, worker))

    def defer(self, index: int, owner: str, retry_in_s: float, first_deferred_at: float | None = None) -> None:
        self.handle.defer.remote(index, owner, retry_in_s, first_deferred_at)

    def finish(self, index: int, row: dict):
        """Send one outcome; returns what `confirm` waits for."""
        return self.handle.finish.remote(index, row)

    def confirm(self, sent: list) -> None:
        import ray

        ray.get(sent)

    def report(self, worker: str, progress: WorkerProgress) -> Control:
        import ray

        return ray.get(self.handle.report.remote(worker, progress))

    def alive(self) -> None:
        self.handle.alive.remote()


class LocalCalls:
    """The same calls on a Dispatcher in this process (tests)."""

    def __init__(self, dispatcher: Dispatcher):
        self.dispatcher = dispatcher

    def join(self, token: str) -> int:
        return self.dispatcher.join(token)

    def lease(self, token: str, n: int, worker: str) -> LeaseAnswer:
        return self.dispatcher.lease(token, n, worker)

    def defer(self, index: int, owner: str, retry_in_s: float, first_deferred_at: float | None = None) -> None:
        self.dispatcher.defer(index, owner, retry_in_s, first_deferred_at)

    def finish(self, index: int, row: dict) -> None:
        self.dispatcher.finish(index, row)

    def confirm(self, sent: list) -> None:
        pass

    def report(self, worker: str, progress: WorkerProgress) -> Control:
        return self.dispatcher.report(worker, progress)

    def alive(self) -> None:
        self.dispatcher.alive()
