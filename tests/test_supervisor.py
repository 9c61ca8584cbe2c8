"""The batch run's control paths without Ray Train: the driver's supervisor (watchdog, claim switch,
Ctrl-C) on a fake clock, and a worker's intake, claim-mode switch and outcomes against a plain Dispatcher
and a local output folder."""

import itertools
import threading
import types

import pytest

from catversion import layout, storage
from catversion.recipe import TrainingTarget
from pipelines.calls import LocalCalls
from pipelines.claims import MARKER_POLL_S, Claims
from pipelines.control import Holdings, Stopped, WorkerControl
from pipelines.dispatch import Dispatcher
from pipelines.intake import Intake
from pipelines.manifest import ConceptSpec, ImageRef
from pipelines.options import BatchConfig
from pipelines.outcomes import OutcomeSink
from pipelines.supervisor import PROGRESS_EVERY_S, STOP_GRACE_S, Supervisor, Verdict
from pipelines.work import PlannedConcept, WorkerConfig, WorkerProgress

TIMEOUT_S = 60.0


class FakeClock:
    """Time that moves only when the supervisor waits; ``at(t, action)`` runs an action once t is reached."""

    def __init__(self, fit_done: threading.Event):
        self.now = 1000.0
        self.fit_done = fit_done
        self.actions: list[tuple[float, object]] = []

    def __call__(self) -> float:
        return self.now

    def at(self, offset: float, action) -> None:
        self.actions.append((1000.0 + offset, action))

    def wait(self, seconds: float) -> bool:
        self.now += seconds
        if self.now > 1000.0 + 3600:
            raise AssertionError("the supervisor kept watching for an hour of fake time")
        due = [a for a in self.actions if a[0] <= self.now]
        self.actions = [a for a in self.actions if a[0] > self.now]
        for _, action in sorted(due, key=lambda a: a[0]):
            action()
        return self.fit_done.is_set()


def planned(n: int) -> list[PlannedConcept]:
    return [PlannedConcept(ConceptSpec(f"c{i}", "mug", [ImageRef(f"img{i}", None, b"x")])) for i in range(n)]


class Run:
    """A supervisor over a plain Dispatcher, with everything it calls recorded."""

    def __init__(self, concepts: int = 3, others=lambda t: [], claiming: bool = False):
        self.fit_done = threading.Event()
        self.clock = FakeClock(self.fit_done)
        self.dispatcher = Dispatcher(planned(concepts), claiming=claiming, clock=self.clock)
        self.aborted, self.lines, self.stats, self.polls = [], [], [], []

        def look() -> list[str]:
            self.polls.append(self.clock.now)
            return others(self.clock.now - 1000.0)

        self.supervisor = Supervisor(
            self.dispatcher, self.fit_done, run_id="r", total=concepts, resources_timeout_s=TIMEOUT_S,
            others=look, abort=lambda: (self.aborted.append(self.clock.now), self.fit_done.set()),
            missing_resources=lambda idle: f"no worker for {idle:.0f} s", claiming=claiming,
            log=self.lines.append, progress=self.stats.append, clock=self.clock, wait=self.clock.wait)

    def worker_steps(self, every: float = 1.0, until: float = 1e9) -> None:
        """A worker that leases and reports progress every ``every`` seconds until ``until``."""
        self.dispatcher.join("group-1")
        self.dispatcher.lease("group-1", 2, "w0")

        def tick(t=0.0):
            if t < until:
                self.dispatcher.report("w0", WorkerProgress(int(t), 2, 4.0))
                self.clock.at(t + every, lambda: tick(t + every))

        tick()


def test_the_watchdog_ends_a_run_whose_workers_never_start_and_says_why():
    run = Run()
    verdict = run.supervisor.watch()
    # The watchdog looks every PROGRESS_EVERY_S: it ends the run at its first look past the timeout.
    first_look_past = next(t for t in itertools.count(PROGRESS_EVERY_S, PROGRESS_EVERY_S) if t > TIMEOUT_S)
    assert verdict.starved == f"no worker for {first_look_past:.0f} s"
    assert run.dispatcher.stopping == "the worker group lacks resources"
    assert run.aborted == [1000.0 + first_look_past]
    assert any("no worker has run for" in line and "--resources-timeout 60" in line for line in run.lines)


def test_a_run_whose_workers_keep_reporting_is_never_starved():
    run = Run()
    run.worker_steps(every=1.0)
    run.clock.at(4 * TIMEOUT_S, run.fit_done.set)
    assert run.supervisor.watch() == Verdict()
    assert not run.aborted and run.dispatcher.stopping is None
    assert run.stats and run.stats[-1]["workers"] == 1 and run.stats[-1]["images_per_s"] == 4.0


def test_progress_counts_finished_concepts_and_logs_new_events_once():
    run = Run(concepts=3)
    run.worker_steps()
    run.clock.at(3, lambda: run.dispatcher.finish(0, {"concept_id": "c0", "status": "ok"}))
    run.clock.at(7, lambda: run.dispatcher.finish(1, {"concept_id": "c1", "status": "failed"}))
    run.clock.at(12, run.fit_done.set)
    run.supervisor.watch()
    assert [(s["done"], s["trained"], s["failed"]) for s in run.stats] == [(1, 1, 0), (2, 1, 1)]
    assert sum("worker group 1 started" in line for line in run.lines) == 1


def test_another_run_appearing_switches_every_worker_to_claiming():
    run = Run(others=lambda t: ["other-run"] if t >= 5 else [])
    run.worker_steps()
    run.clock.at(20, run.fit_done.set)
    run.supervisor.watch()
    assert run.dispatcher.claiming
    assert run.dispatcher.lease("group-1", 1, "w0").claiming, "workers learn it with their next lease"
    assert run.dispatcher.report("w0", WorkerProgress(1, 1, 1.0)).claiming, "... or their next report"
    polls = [t - 1000.0 for t in run.polls]
    assert polls == [MARKER_POLL_S * k for k in range(1, len(polls) + 1)] and 5 <= polls[-1] < 5 + MARKER_POLL_S, \
        "the output is looked at every MARKER_POLL_S until another run shows up, then no more"
    assert any("another run is active" in line and "other-run" in line for line in run.lines)


def test_a_run_that_starts_claiming_never_looks_for_other_runs():
    run = Run(claiming=True, others=lambda t: pytest.fail("looked for other runs"))
    run.clock.at(10, run.fit_done.set)
    assert run.supervisor.watch() == Verdict()


def test_ctrl_c_stops_the_workers_and_waits_for_them_to_hand_over():
    run = Run()
    run.worker_steps(until=13)  # the workers stop 3 s after being asked (they finish their step)

    def interrupt():
        raise KeyboardInterrupt

    run.clock.at(10, interrupt)
    run.clock.at(13, run.fit_done.set)
    assert run.supervisor.watch() == Verdict(interrupted=True)
    assert run.dispatcher.stopping == "interrupted"
    assert run.dispatcher.report("w0", WorkerProgress(1, 1, 1.0)).stop == "interrupted"
    assert not run.aborted, "the workers ended within the grace: nothing is aborted"


def test_ctrl_c_aborts_workers_that_do_not_stop_within_the_grace():
    run = Run()
    run.worker_steps()  # keeps reporting, never ends

    def interrupt():
        raise KeyboardInterrupt

    run.clock.at(10, interrupt)
    assert run.supervisor.watch() == Verdict(interrupted=True)
    assert len(run.aborted) == 1 and run.aborted[0] - 1000.0 == pytest.approx(10 + STOP_GRACE_S, abs=1.0)


def test_a_second_ctrl_c_aborts_at_once():
    run = Run()
    run.worker_steps()

    def interrupt():
        raise KeyboardInterrupt

    run.clock.at(10, interrupt)
    run.clock.at(12, interrupt)
    run.supervisor.watch()
    assert len(run.aborted) == 1 and run.aborted[0] - 1000.0 == pytest.approx(12, abs=0.5)


def test_ctrl_c_before_any_worker_runs_aborts_without_waiting_the_grace():
    run = Run()  # no worker ever joins (still waiting for resources)

    def interrupt():
        raise KeyboardInterrupt

    run.clock.at(3, interrupt)
    run.supervisor.watch()
    assert len(run.aborted) == 1 and run.aborted[0] - 1000.0 <= 4 + 1e-9


# ---- a worker's parts, against a plain Dispatcher and a local output folder --------------------------

TARGET = TrainingTarget("sha256:base", 64, (3, 4), 1, "fp32")


class Worker:
    """Intake, holdings, control and outcomes of one worker of run ``run_id``, wired as train_worker does."""

    def __init__(self, output, dispatcher: Dispatcher, run_id: str = "run-a", claim_wait_s: float = 600.0):
        config = WorkerConfig(BatchConfig(manifest="m", output=str(output), claim_wait_s=claim_wait_s, steps=3),
                              run_id, dispatcher=None)
        self.calls = LocalCalls(dispatcher)
        self.token = "group-1"
        self.calls.join(self.token)
        budget = storage.RetryBudget(5)
        self.claims = Claims(str(output), run_id, 60.0, budget)
        self.holdings = Holdings(self.claims)
        self.control = WorkerControl(self.calls, "w0", self.holdings)
        self.sink = OutcomeSink(str(output), run_id, "w0", self.calls, self.holdings, budget)
        self.intake = Intake(config, self.calls, self.token, "w0", TARGET, self.claims, self.holdings, self.sink,
                             self.control, 4, budget)

    def close(self):
        self.intake.close()
        self.sink.close()


def inline_concepts(n: int) -> list[PlannedConcept]:
    return [PlannedConcept(ConceptSpec(f"c{i}", "mug", [ImageRef(f"#row{i}", None, b"image-%d" % i, f"d{i}")]))
            for i in range(n)]


def test_intake_hands_every_leased_concept_to_the_trainer_and_holds_it(tmp_path):
    dispatcher = Dispatcher(inline_concepts(3))
    worker = Worker(tmp_path, dispatcher)
    concepts = list(worker.intake.concepts())
    worker.close()
    assert [c.concept_id for c in concepts] == ["c0", "c1", "c2"]
    assert sorted(worker.holdings.training()) == ["c0", "c1", "c2"]
    assert not storage.list_uris(layout.claims_folder(str(tmp_path))), "solo: nothing is claimed"


def test_switching_to_claiming_claims_what_is_held_and_whatever_comes_after(tmp_path):
    dispatcher = Dispatcher(inline_concepts(4))
    worker = Worker(tmp_path, dispatcher)
    source = worker.intake.concepts()
    first = [next(source) for _ in range(2)]
    assert not storage.list_uris(layout.claims_folder(str(tmp_path)))
    dispatcher.start_claiming(["run-b"])
    rest = list(source)  # the next lease answer says claiming: the worker switches, then claims each new one
    worker.close()
    assert worker.holdings.claiming
    claimed = sorted(uri.rsplit("/", 1)[-1].removesuffix(layout.CLAIM_SUFFIX)
                     for uri in storage.list_uris(layout.claims_folder(str(tmp_path))))
    assert claimed == ["c0", "c1", "c2", "c3"], "held ones claimed at the switch, later ones as they came"
    assert len(first) + len(rest) == 4


def test_a_concept_another_run_holds_is_deferred_then_skipped_naming_that_run(tmp_path):
    dispatcher = Dispatcher(inline_concepts(1), claiming=True)
    other = Claims(str(tmp_path), "run-b", 60.0)
    assert other.acquire("c0", "sha256:whatever") is None
    worker = Worker(tmp_path, dispatcher, claim_wait_s=10.0)
    answer = dispatcher.lease("group-1", 1, "w0")
    worker.control.follow(answer.claiming)  # as the intake does with every lease answer
    assert worker.intake.prepare(answer.leases[0]) is None
    assert dispatcher.deferred and not dispatcher.results, "deferred, not settled, while within claim_wait_s"
    dispatcher.deferred[0].since -= 11.0  # the deferral began 11 s ago
    dispatcher.deferred[0].retry_at = 0.0
    again = dispatcher.lease("group-1", 1, "w0").leases[0]
    assert again.deferred.owner == "run-b" and again.deferred.waited_s >= 11.0
    assert worker.intake.prepare(again) is None
    worker.close()
    row = dispatcher.results["c0"]
    assert row["status"] == "skipped" and "claimed by run run-b" in row["detail"], row


def test_a_residual_being_written_is_claimed_by_a_switch_and_released_after(tmp_path):
    dispatcher = Dispatcher(inline_concepts(1))
    worker = Worker(tmp_path, dispatcher)
    next(worker.intake.concepts())
    held = worker.holdings.start_writing("c0")
    assert held is not None and worker.holdings.training() == []
    worker.holdings.switch_to_claiming()
    assert worker.claims.holds("c0"), "a concept being written is still this run's: the switch claims it"
    worker.holdings.written("c0")
    assert not worker.claims.holds("c0") and not storage.list_uris(layout.claims_folder(str(tmp_path)))
    worker.holdings.switch_to_claiming()  # a second switch is a no-op: nothing is claimed again
    assert not storage.list_uris(layout.claims_folder(str(tmp_path)))
    worker.close()


def test_a_stop_from_the_driver_reaches_the_training_thread():
    dispatcher = Dispatcher(planned(1))
    now = [0.0]
    control = WorkerControl(LocalCalls(dispatcher), "w0", Holdings(Claims("unused", "r")), clock=lambda: now[0])
    progress = types.SimpleNamespace(steps_done=1, active=1, images_per_s=2.0)  # the trainer's Progress fields
    control.on_progress(progress)
    dispatcher.stop("interrupted")
    control.on_progress(progress)  # within REPORT_EVERY_S of the last report: no call, no stop yet
    now[0] += 1.0
    with pytest.raises(Stopped, match="interrupted"):
        control.on_progress(progress)
    assert dispatcher.progress["w0"] == WorkerProgress(1, 1, 2.0)
