"""The driver's watch over one Ray Train run while `fit()` runs on a thread of its own.

Every tick the `Supervisor` looks at the run: every MARKER_POLL_S for another run appearing on the same
output (then the dispatcher switches every worker to claiming), every PROGRESS_EVERY_S for progress
(logged, or handed to a progress bar) and for starvation (no worker heard from for resources_timeout_s:
the group cannot get its resources, so the run is ended with a job error naming what is missing). On
Ctrl-C it asks the workers to stop, gives them STOP_GRACE_S to finish their step, save state and hand
results over, and aborts the Train run if it has not ended by then.

Its clock, its wait and the dispatcher are injected (tests/test_supervisor.py drives it without Ray
Train, with a fake clock and a plain `Dispatcher`); `RayDriverCalls` is the dispatcher actor's adapter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .claims import MARKER_POLL_S
from .work import Snapshot

TICK_S = 1.0
PROGRESS_EVERY_S = 5.0
STOP_GRACE_S = 12.0  # after Ctrl-C: how long workers get to finish their step, save state and hand results over


class RayDriverCalls:
    """The driver's calls on the Dispatcher actor (the Supervisor's `dispatcher`)."""

    def __init__(self, handle, timeout_s: float = 10.0):
        self.handle, self.timeout_s = handle, timeout_s

    def snapshot(self) -> Snapshot:
        import ray

        return ray.get(self.handle.snapshot.remote(), timeout=self.timeout_s)

    def start_claiming(self, others: list[str]) -> None:
        self.handle.start_claiming.remote(others)

    def stop(self, reason: str) -> None:
        self.handle.stop.remote(reason)


@dataclass
class Verdict:
    """How the watch ended: the run ended by itself, starved (with the job error), or was interrupted."""

    starved: str | None = None
    interrupted: bool = False


class Supervisor:
    """Watches one Train run until ``fit_done`` is set, starvation, or Ctrl-C (KeyboardInterrupt in ``wait``).

    ``dispatcher``: snapshot(), start_claiming(others), stop(reason) (a Dispatcher, or RayDriverCalls).
    ``others()``: other live runs on the output (storage errors count as none). ``abort()``: end the Train
    run now. ``missing_resources(idle_s)``: the job error for a starved run. ``progress(stats)``: the run's
    counts every PROGRESS_EVERY_S (without it they are logged as a line). ``clock`` and ``wait(seconds) ->
    fit done?`` default to real time and ``fit_done.wait``.
    """

    def __init__(self, dispatcher, fit_done: threading.Event, *, run_id: str, total: int, resources_timeout_s: float,
                 others: Callable[[], list[str]], abort: Callable[[], None],
                 missing_resources: Callable[[float], str], claiming: bool = False,
                 log: Callable[[str], None] = print, progress: Callable[[dict], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, wait: Callable[[float], bool] | None = None):
        self.dispatcher, self.fit_done, self.run_id, self.total = dispatcher, fit_done, run_id, total
        self.resources_timeout_s = resources_timeout_s
        self.others, self.abort, self.missing_resources = others, abort, missing_resources
        self.claiming, self.log, self.progress = claiming, log, progress
        self.clock = clock
        self.wait = wait or fit_done.wait
        self.started = clock()
        self.shown = 0  # dispatcher events logged so far

    def watch(self) -> Verdict:
        next_marker = self.started + MARKER_POLL_S
        next_progress = self.started + PROGRESS_EVERY_S
        try:
            while not self.fit_done.is_set():
                if self.wait(TICK_S):
                    break
                now = self.clock()
                if not self.claiming and now >= next_marker:
                    next_marker = now + MARKER_POLL_S
                    self._look_for_other_runs()
                if now >= next_progress:
                    next_progress = now + PROGRESS_EVERY_S
                    idle = self._report()
                    if idle is not None and idle > self.resources_timeout_s and not self.fit_done.is_set():
                        return self._starved(idle)
        except KeyboardInterrupt:
            self._stop_on_interrupt()
            return Verdict(interrupted=True)
        return Verdict()

    def _look_for_other_runs(self) -> None:
        others = self.others()
        if others:
            self.claiming = True
            self.dispatcher.start_claiming(others)

    def _snapshot(self) -> Snapshot | None:
        try:
            return self.dispatcher.snapshot()
        except Exception:  # noqa: BLE001  (busy or gone: no news this time)
            return None

    def _report(self) -> float | None:
        """Log the run's new events and hand on its progress; how long no worker has been heard from."""
        snap = self._snapshot()
        if snap is None:
            return None
        for event in snap.events[self.shown:]:
            self.log(f"[batch {self.run_id}] {self.clock() - self.started:.1f} s: {event}")
        self.shown = len(snap.events)
        results = snap.results.values()
        stats = {"total": self.total, "trained": sum(r["status"] == "ok" for r in results),
                 "failed": sum(r["status"] == "failed" for r in results),
                 "skipped": sum(r["status"] == "skipped" for r in results), "workers": len(snap.progress),
                 "images_per_s": sum(p.images_per_s for p in snap.progress.values())}
        stats["done"] = stats["trained"] + stats["failed"] + stats["skipped"]
        if self.progress is not None:
            self.progress(stats)
        else:
            self.log(f"[batch {self.run_id}] {stats['done']}/{self.total} concepts finished ({stats['trained']} "
                     f"trained, {stats['skipped']} skipped, {stats['failed']} failed), {stats['workers']} worker(s), "
                     f"{stats['images_per_s']:.1f} images/s")
        return snap.idle_s

    def _starved(self, idle: float) -> Verdict:
        """No worker has run for resources_timeout_s: the group cannot get its resources (a fixed group that
        lost a node, an elastic one below its minimum, a GPU request on a CPU cluster). The results so far
        are kept."""
        error = self.missing_resources(idle)
        self.log(f"[batch {self.run_id}] no worker has run for {idle:.0f} s (--resources-timeout "
                 f"{self.resources_timeout_s:g}): ending the run")
        self.dispatcher.stop("the worker group lacks resources")
        self.abort()
        self.log(f"[batch {self.run_id}] the Train run has {'' if self.fit_done.is_set() else 'not '}ended")
        return Verdict(starved=error)

    def _stop_on_interrupt(self) -> None:
        self.log(f"[batch {self.run_id}] interrupted: stopping the workers (in-flight concepts keep their saved "
                 "state); Ctrl-C again to stop at once")
        self.dispatcher.stop("interrupted")
        try:
            deadline = self.clock() + STOP_GRACE_S
            while not self.fit_done.is_set() and self.clock() < deadline:
                if self.wait(TICK_S):
                    break
                snap = self._snapshot()
                if snap is None or (not snap.progress and not snap.leased):
                    break  # no worker is running (e.g. still waiting for resources), or none answers
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: stop at once
        if not self.fit_done.is_set():  # workers that never started, or a second Ctrl-C: abort the Train run
            self.abort()
