"""A batch worker's control side: the concepts it holds and the claim mode, keep-alive, progress, stop.

`Holdings` is the one record of what a worker holds (concepts handed to the trainer, residuals being
written) together with the claim mode, an explicit state machine (see its docstring). `WorkerControl`
sends the keep-alive and the progress reports, and follows the dispatcher's answers: switch to
claiming, stop. It calls the dispatcher through pipelines/calls.py (`RayCalls` in a run, `LocalCalls`
in tests), so both run without Ray in tests/test_supervisor.py.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from catversion import storage

from .claims import Claims
from .work import Lease, WorkerProgress

KEEP_ALIVE_S = 10.0  # the driver's watchdog hears from a worker at least this often, even while it loads the model
REPORT_EVERY_S = 1.0  # progress reports (and metrics) at most this often


class Stopped(Exception):
    """The driver asked the run to stop (Ctrl-C, SIGTERM): in-flight concepts keep their saved state."""


@dataclass
class Held:
    """A concept handed to the trainer: its lease and what the intake learned about it."""

    lease: Lease
    fingerprint: str
    facts: dict  # result-row columns known before training: fingerprint, image URIs, stamps and sha256s
    stale_states: list[str] = field(default_factory=list)  # saved states of older fingerprints: delete when done
    has_state: bool = False  # a state was loaded or saved for it: delete it once the concept is done


class ClaimMode(enum.Enum):
    SOLO = "solo"  # no other run on the output: nothing is claimed (claims cost two requests each)
    CLAIMING = "claiming"  # another run is active: every concept is claimed before it is trained


class Holdings:
    """What one worker holds, and its claim mode: SOLO, then (once, never back) CLAIMING.

    The switch to CLAIMING claims every concept held at that moment, in training or being written. A
    concept added after the switch is claimed by the intake: `add` says which mode it was added in. One
    lock orders `add`, `written` and the switch, so no concept is missed by both, and none is claimed by
    the switch after its writer released it.
    """

    def __init__(self, claims: Claims):
        self.claims = claims
        self.mode = ClaimMode.SOLO
        self._lock = threading.Lock()
        self._training: dict[str, Held] = {}
        self._writing: dict[str, str] = {}  # concept id -> fingerprint, while its residual is written

    @property
    def claiming(self) -> bool:
        return self.mode is ClaimMode.CLAIMING

    def switch_to_claiming(self) -> None:
        """Another run appeared on the output: claim what is held now, and everything from now on."""
        with self._lock:
            if self.mode is ClaimMode.CLAIMING:
                return
            self.mode = ClaimMode.CLAIMING
            held = {**{c: h.fingerprint for c, h in self._training.items()}, **self._writing}
            for concept_id, fingerprint in held.items():
                try:
                    self.claims.acquire(concept_id, fingerprint)
                except storage.StorageError:
                    pass  # not written: the other run's claim check then finds no claim of ours

    def add(self, held: Held) -> bool:
        """Hold a concept for training; True when claiming was on at that moment (then the caller claims it)."""
        with self._lock:
            self._training[held.lease.concept.concept_id] = held
            return self.mode is ClaimMode.CLAIMING

    def get(self, concept_id: str) -> Held | None:
        with self._lock:
            return self._training.get(concept_id)

    def drop(self, concept_id: str) -> Held | None:
        """Forget a concept that will not be trained here after all."""
        with self._lock:
            return self._training.pop(concept_id, None)

    def start_writing(self, concept_id: str) -> Held | None:
        """The trainer finished the concept: it is held as being written until `written`."""
        with self._lock:
            held = self._training.pop(concept_id, None)
            if held is not None:
                self._writing[concept_id] = held.fingerprint
            return held

    def written(self, concept_id: str) -> None:
        """Its outcome is recorded: release its claim (if any). After this the switch no longer claims it."""
        with self._lock:
            self._writing.pop(concept_id, None)
        self.claims.release(concept_id)

    def training(self) -> list[str]:
        with self._lock:
            return list(self._training)


class WorkerControl:
    """Keep-alive, progress reports and the driver's answers for one worker.

    ``on_progress`` is the trainer's progress callback: at most every REPORT_EVERY_S it updates the
    metrics and reports to the dispatcher, whose answer can switch the holdings to claiming or stop the
    worker (raising `Stopped` on the training thread). ``clock`` is injectable for tests.
    """

    def __init__(self, calls, worker: str, holdings: Holdings, metrics: Callable[[int, float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, keep_alive_s: float = KEEP_ALIVE_S):
        self.calls, self.worker, self.holdings = calls, worker, holdings
        self.metrics = metrics  # (steps since the last report, images/s)
        self.clock = clock
        self.keep_alive_s = keep_alive_s
        self.images_per_s = 0.0
        self._last_report: float | None = None
        self._steps_reported = 0
        self._finished = threading.Event()

    def start_keep_alive(self) -> None:
        """A thread that tells the dispatcher this worker is alive until `close` (a worker loading a large
        model is alive, not starved)."""
        def beat() -> None:
            while not self._finished.wait(self.keep_alive_s):
                self.calls.alive()

        threading.Thread(target=beat, name="keep-alive", daemon=True).start()

    def follow(self, claiming: bool) -> None:
        """The dispatcher says whether another run is active on the output."""
        if claiming and not self.holdings.claiming:
            self.holdings.switch_to_claiming()

    def on_progress(self, progress) -> None:
        """The trainer's per-step callback (catversion.training.Progress); raises Stopped when asked to stop."""
        self.images_per_s = progress.images_per_s
        now = self.clock()
        if self._last_report is not None and now - self._last_report < REPORT_EVERY_S:
            return
        if self.metrics is not None:
            self.metrics(progress.steps_done - self._steps_reported, progress.images_per_s)
        answer = self.calls.report(self.worker, WorkerProgress(progress.steps_done, progress.active,
                                                               progress.images_per_s))
        self._last_report, self._steps_reported = now, progress.steps_done
        self.follow(answer.claiming)
        if answer.stop:
            raise Stopped(answer.stop)

    def close(self) -> None:
        self._finished.set()
