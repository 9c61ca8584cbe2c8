"""Admission by work: the scheduler counts outstanding UNet work in row-steps (a 150-step request weighs
fifteen 10-step ones), the step batcher refuses a job while the work ahead of it is past its bound
(and always takes one when idle), its stall clock shows a hung step, and the autoscaling policy counts
refused requests as the demand they were.

The scheduler part needs no model (a fake clock and plain objects); the batcher runs the tiny model.
"""

import pytest

from catversion.scheduler import Entry, Scheduler
from polling import wait_until
from serve.autoscaling import SHED_DEMAND, ShedDemand, demand_policy

SQUARE = (64, 64)


def entry(steps, guidance=7.5):
    return Entry(None, SQUARE, steps, rows=1 if guidance == 1.0 else 2, group=(steps, guidance))


def test_outstanding_work_is_steps_times_rows_waiting_and_remaining():
    scheduler = Scheduler(max_batch_size=4)
    long, shorts = entry(150), [entry(10) for _ in range(15)]
    assert scheduler.work() == 0
    scheduler.add(long)
    assert scheduler.work() == 300  # 150 steps x 2 rows ([uncond, cond])
    for short in shorts:
        scheduler.add(short)
    assert scheduler.work() == 600  # fifteen 10-step samples weigh what one 150-step one does
    scheduler.add(entry(20, guidance=1.0))
    assert scheduler.work() == 620  # an unguided sample has one row
    plan = scheduler.plan()
    scheduler.start(plan.bucket, plan.joiners)
    batch = scheduler.batch(plan.bucket)
    scheduler.stepped(plan.bucket, batch, 0.5)  # one step of the 4 running samples (the long one and 3 short)
    assert scheduler.work() == 620 - 2 * len(batch)


def test_the_time_to_run_work_comes_from_the_measured_pace_of_the_largest_call():
    scheduler = Scheduler(max_batch_size=8)
    assert scheduler.seconds_for(100) is None  # nothing measured yet
    scheduler.observe(SQUARE, 2, 0.1)  # a lone guided sample: 20 rows/s
    scheduler.observe(SQUARE, 16, 0.4)  # a full batch: 40 rows/s, what a busy generator runs at
    assert scheduler.seconds_for(400) == pytest.approx(10.0)


@pytest.fixture(scope="module")
def batcher():
    from catversion.generation import ImageGenerator
    from catversion.models import load_base_model
    from catversion.stepbatch import StepBatcher

    return StepBatcher(ImageGenerator(load_base_model("tiny")), max_batch_size=4)


def test_a_job_is_refused_while_the_work_ahead_is_past_the_bound_whatever_its_own_and_an_idle_batcher_takes_any(
        batcher):
    from catversion.stepbatch import Job, QueueFull

    first = batcher.submit(Job("a", seed=1, steps=6, height=32, width=32), max_work=10)  # 12 row-steps, none ahead
    with pytest.raises(QueueFull) as refused:
        batcher.submit(Job("b", seed=2, steps=3, height=32, width=32), max_work=10)  # 12 ahead > 10, however short
    assert "12 row-steps" in str(refused.value) and refused.value.retry_after_s is None  # nothing timed yet
    assert batcher.work == 12 and batcher.waiting == 1
    batcher.step()  # one step measured (10 row-steps left): a refusal now says when there will be room
    with pytest.raises(QueueFull) as refused:
        batcher.submit(Job("b", seed=2, steps=3, height=32, width=32), max_work=8)
    assert refused.value.retry_after_s > 0
    # The bound is on the work ahead, not the job's own: a long job is taken where a short one would be.
    long = batcher.submit(Job("c", seed=3, steps=40, height=32, width=32), max_work=10)  # 10 ahead, 80 its own
    assert batcher.work == 10 + 80
    while not first.done:
        batcher.step()
    long.cancel()
    batcher.step()
    assert long.done and batcher.work == 0
    huge = batcher.submit(Job("d", seed=4, steps=40, height=32, width=32), max_work=1)  # idle: any job is taken
    huge.cancel()
    batcher.step()
    assert huge.done and batcher.work == 0


def test_the_stall_clock_runs_only_while_work_waits_for_a_step(batcher):
    from catversion.stepbatch import Job

    batcher.step()  # nothing to do: that is progress
    assert batcher.stalled_s() == 0.0  # idle is not stalled
    ticket = batcher.submit(Job("a", seed=1, steps=2, height=32, width=32))
    first = batcher.stalled_s()
    wait_until(lambda: batcher.stalled_s() > first, 5, "the stall clock running while work waits for a step")
    while not ticket.done:
        batcher.step()
    assert batcher.stalled_s() == 0.0


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_refused_requests_count_as_the_ongoing_requests_they_would_have_been():
    clock = Clock()
    shed = ShedDemand(window_s=30.0, clock=clock)
    for _ in range(60):
        shed.shed()
    assert shed.demand() == 0.0  # no admitted request done yet: nothing says what one costs
    shed.served(4.0)
    assert shed.demand() == pytest.approx(60 / 30 * 4.0)  # 2 refusals/s x 4 s each: 8 requests' worth
    clock.now += 31
    assert shed.demand() == 0.0  # refusals older than the window no longer count


class Context:
    """The fields of Serve's AutoscalingContext that the policy reads."""

    def __init__(self, replicas, ongoing, shed_per_replica, target=16):
        self.current_num_replicas = replicas
        self.target_num_replicas = replicas
        self.total_num_requests = ongoing
        self.aggregated_metrics = {SHED_DEMAND: {f"r{i}": shed_per_replica for i in range(replicas)}}
        self.config = type("Config", (), {"get_target_ongoing_requests": staticmethod(lambda: target)})


def test_the_policy_scales_on_ongoing_plus_shed_demand_as_the_default_rule_does_on_ongoing():
    desired, _ = demand_policy(Context(replicas=1, ongoing=10, shed_per_replica=0.0))
    assert desired == pytest.approx(10 / 16)  # what Serve's default rule gives for 10 ongoing requests
    desired, _ = demand_policy(Context(replicas=1, ongoing=10, shed_per_replica=22.0))
    assert desired == pytest.approx(2.0)  # the refused 22 requests' worth make it 32: two replicas
    desired, _ = demand_policy(Context(replicas=2, ongoing=20, shed_per_replica=6.0))
    assert desired == pytest.approx(2.0)
