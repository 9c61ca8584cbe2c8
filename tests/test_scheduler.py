"""The scheduler's decisions, without a model: admission, buckets, ordering, cancellation, and the fairness
policy (a joiner waits only while older work is overdue, and never for ever)."""

import subprocess
import sys

import pytest

from catversion.scheduler import Entry, Fairness, Pace, Scheduler

SQUARE, WIDE = (64, 64), (64, 128)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Run:
    """A scheduler driven as StepBatcher drives it, with calls that cost ``cost(rows)`` seconds of a fake clock."""

    def __init__(self, cost, max_batch_size=16, mode="step", fairness=Fairness()):
        self.clock = Clock()
        self.cost = cost
        self.scheduler = Scheduler(max_batch_size, mode, fairness, clock=self.clock)
        self.calls = []  # (bucket, [entry names])
        self.finished = {}  # name -> clock time

    def submit(self, name, steps, bucket=SQUARE, guidance=7.5):
        entry = Entry(name, bucket, steps, rows=1 if guidance == 1.0 else 2, group=(steps, guidance))
        self.scheduler.add(entry)
        return entry

    def call(self):
        plan = self.scheduler.plan()
        if plan.bucket is None:
            return plan
        self.scheduler.start(plan.bucket, plan.joiners)
        batch = self.scheduler.batch(plan.bucket)
        seconds = self.cost(sum(entry.rows for entry in batch))
        self.clock.now += seconds
        self.calls.append((plan.bucket, [entry.payload for entry in batch]))
        for entry in self.scheduler.stepped(plan.bucket, batch, seconds):
            self.finished[entry.payload] = self.clock.now
        return plan


def cpu(rows):
    """A CPU's call time: a fixed cost plus a cost per row (the tiny model's shape)."""
    return 0.012 + 0.0012 * rows


def flat(rows):
    """A GPU below saturation: every call size costs the same."""
    return 0.05


def test_the_scheduler_imports_neither_torch_nor_diffusers():
    code = ("import sys, catversion.scheduler; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_step_mode_admits_oldest_first_up_to_the_batch_size_and_buckets_take_turns():
    run = Run(cpu, max_batch_size=2, fairness=None)
    for name in ("a", "b", "c"):
        run.submit(name, steps=2)
    run.submit("w", steps=1, bucket=WIDE)
    for _ in range(4):
        run.call()
    assert run.calls == [(SQUARE, ["a", "b"]), (WIDE, ["w"]), (SQUARE, ["a", "b"]), (SQUARE, ["c"])]
    run.submit("d", steps=1)  # joins c at its next call: there is room
    run.call()
    assert run.calls[-1] == (SQUARE, ["c", "d"])
    assert run.scheduler.running == 0 and run.scheduler.waiting == 0 and not run.scheduler.has_work()
    assert run.call().bucket is None


def test_static_mode_admits_only_into_an_idle_bucket_and_only_the_first_entrys_group():
    run = Run(cpu, mode="static")
    run.submit("a", steps=2)
    run.submit("other steps", steps=3)
    run.submit("b", steps=2)
    run.submit("other guidance", steps=2, guidance=1.0)
    run.call()
    run.submit("late", steps=2)  # same group, but the bucket is busy
    run.call()
    run.call()
    assert [names for _, names in run.calls] == [["a", "b"], ["a", "b"], ["other steps"]]
    assert run.scheduler.fairness is None  # fairness is a step-mode policy


def test_cancelled_entries_leave_at_the_next_plan_waiting_or_running():
    run = Run(cpu, fairness=None)
    running, other = run.submit("running", steps=5), run.submit("other", steps=5)
    run.call()
    waiting = run.submit("waiting", steps=5)
    running.cancelled = waiting.cancelled = True
    plan = run.call()
    assert {entry.payload for entry in plan.cancelled} == {"running", "waiting"}
    assert run.calls[-1][1] == ["other"] and other.done == 2


def test_a_joiner_is_admitted_when_there_is_room_and_no_older_work_is_overdue():
    run = Run(cpu)
    long = run.submit("long", steps=150)
    for _ in range(20):
        run.call()
    assert not run.scheduler.overdue(long)
    run.submit("short", steps=3)
    plan = run.call()
    assert [entry.payload for entry in plan.joiners] == ["short"]
    run.call()
    run.call()
    assert "short" in run.finished and "long" not in run.finished  # the join case: done long before the long one


def test_a_joiner_is_held_back_while_an_older_running_entry_is_overdue_and_then_admitted_together():
    run = Run(cpu, fairness=Fairness(slack=1.5))
    old = run.submit("old", steps=50)
    run.call()  # alone: the bucket's fastest call so far
    for i in range(15):  # a full batch of short work arrives: each call now costs ~3x the old one's alone
        run.submit(f"short{i}", steps=20)
    for _ in range(20):
        run.call()
    assert run.scheduler.running == 1  # the shorts left after their 20 steps; old ran every one of them with them
    assert run.scheduler.overdue(old)  # its projected time exceeds 1.5x its 50 steps alone
    run.submit("joiner", steps=20)
    run.submit("joiner2", steps=20)
    held = 0
    while "old" not in run.finished:
        plan = run.call()
        assert not plan.joiners
        held += 1
    assert held == old.steps - 21  # held back for exactly old's remaining steps, then old is gone
    plan = run.call()
    assert [entry.payload for entry in plan.joiners] == ["joiner", "joiner2"]  # in order, together


def test_nothing_starves_a_waiting_entry_is_admitted_within_the_older_entries_remaining_steps():
    run = Run(cpu, max_batch_size=4, fairness=Fairness(slack=1.1))
    olds = [run.submit(f"old{i}", steps=steps) for i, steps in enumerate((30, 40, 20, 10))]
    run.call()
    waiting = run.submit("waiting", steps=5)
    bound = max(entry.remaining for entry in olds)  # the policy's documented bound, in calls of the bucket
    for calls in range(1, bound + 1):
        if any(entry.payload == "waiting" for entry in run.call().joiners):
            break
    else:
        pytest.fail(f"the waiting entry was not admitted within {bound} calls")
    assert waiting.done == 1 and calls <= bound


def test_where_calls_cost_the_same_whatever_their_size_no_joiner_is_ever_held_back():
    run = Run(flat, fairness=Fairness(slack=1.1))
    run.submit("first", steps=50)
    run.call()
    for i in range(200):
        run.submit(f"j{i}", steps=(20, 50)[i % 2])
        room = run.scheduler.running < 16
        plan = run.call()
        assert bool(plan.joiners) == room, "a joiner waited although there was room and joining costs nothing here"
        assert len(run.calls[-1][1]) <= 16
    assert run.scheduler.waiting > 0  # the batch was full at times: saturation, not an idle bucket


def test_fairness_shortens_a_long_entrys_time_at_saturation():
    """The point of the policy: under a stream of short joiners, a long entry no longer runs every step in a full
    batch. Its time comes down from ~3x its time alone (no fairness) to near the slack."""
    def saturate(fairness):
        run = Run(cpu, fairness=fairness)
        run.submit("before", steps=1)
        run.call()  # one call alone: the scheduler has seen what a small call costs
        for i in range(15):
            run.submit(f"s{i}", steps=20)
        run.submit("long", steps=50)
        started, i = run.clock.now, 0
        while "long" not in run.finished:
            run.submit(f"more{i}", steps=20)  # a new short request at every call: the queue never empties
            i += 1
            run.call()
        return (run.finished["long"] - started) / (50 * cpu(2))

    unfair, fair = saturate(None), saturate(Fairness(slack=2.0))
    assert unfair > 2.8
    assert fair < 2.2 < unfair


@pytest.mark.parametrize("slack", [1, 0.5, "2"])
def test_a_slack_that_would_hold_back_every_joiner_is_refused(slack):
    with pytest.raises(ValueError, match="slack must be a number > 1"):
        Fairness(slack=slack)


def test_bad_scheduler_arguments_are_refused_naming_them():
    with pytest.raises(ValueError, match="mode must be one of"):
        Scheduler(4, mode="fifo")
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1"):
        Scheduler(0)


def test_the_pace_interpolates_between_observed_call_sizes_and_holds_outside_them():
    pace = Pace()
    pace.observe(2, 0.010)
    pace.observe(10, 0.030)
    assert pace.at(6) == pytest.approx(0.020) and pace.at(1) == 0.010 and pace.at(32) == 0.030
    pace.observe(10, 0.080)  # a moving average: one slow call moves it part of the way
    assert 0.030 < pace.at(10) < 0.080
