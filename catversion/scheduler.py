"""Which samples share the next UNet call: admission, size buckets, ordering, cancellation and fairness.

Pure policy: no torch, no tensors, no model (its tests import it in a bare interpreter and drive it
with plain objects and a fake clock). catversion/stepbatch.py pairs it with catversion/executor.py,
which runs the calls it plans (docs/architecture.md, "One denoising loop").

Samples of one image size (a *bucket*) share a call; buckets take turns. In ``step`` mode a
bucket admits waiting samples, oldest first, at every call, up to ``max_batch_size`` running;
``static`` mode (the old scheduler, kept for benchmarks) admits only into an idle bucket, and
only samples sharing the oldest one's group (step count and guidance).

Fairness (``step`` mode's default, `Fairness`). Step-level batching lets a short request join a
long one's calls and leave long before it. The price falls on the long request: every joiner
makes its calls bigger, and where a call's time grows with its rows (a CPU; a GPU past the batch
size it runs at full speed), a long request at saturation runs every step in a full batch, up to
about 2x slower than static batching would have run it. The policy bounds that stretch:

- a running sample's *ideal* time is its steps at the pace of a call of its own rows alone; its
  *projected* time is the seconds its steps took so far plus each remaining step at the pace of
  the call it will be in (its batch's samples with that many steps left), if nobody else joins.
  Paces are measured: a moving average of step seconds per call size, interpolated between sizes
  (`Pace`; ``StepBatcher.warm_up`` times a lone sample's step, so a small call's pace is known
  before the first request);
- a waiting sample joins only if no older running sample's projected time, with it (and the
  samples joining before it) in the batch, exceeds ``slack`` x its ideal time. Held back, it
  waits while calls shrink as other samples finish and the late work speeds up; the waiting
  samples then come in together (one text-encoder call for all of them). The oldest waiting
  sample goes first, so a younger one never overtakes a held-back one;
- a short request joining a long one adds its few steps' cost to the long one's projection and is
  admitted (the join case); where calls cost the same whatever their size (a GPU below its
  saturation point), a joiner adds nothing to anyone's projection and is always admitted.

Why this bound: holding joiners back is the only lever that shortens a running sample's remaining
time, and it costs throughput only as far as bigger calls are cheaper per sample. It triggers only
where calls get markedly slower with more rows, typically where a call's time grows about in
proportion to its rows (a CPU; a GPU past its saturation point) and a smaller call costs little
more per sample. A bound relative to the sample's own ideal time needs no model of what static
batching would have done and adapts to the device by measurement. A slack near 1 would hold back
nearly every joiner (static batching), a large one none (plain step-level batching); at 2.0 the
2-core CPU benchmark (benchmarks/serve_latency.py) held back so much that its throughput fell.

Nothing starves: the gate looks only at running samples older than the waiting one, and running
samples only leave, so the oldest waiting sample of a bucket is admitted, once its bucket has
room, within the largest remaining step count of those running samples (at most the largest
``steps`` of any job) calls of its bucket. Buckets take turns, so every bucket gets a call in
every round.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field

Bucket = tuple[int, int]  # (height, width) in pixels
MODES = ("step", "static")
PACE_SMOOTHING = 0.2  # weight of a new step time in its row count's moving average


@dataclass(eq=False)
class Entry:
    """A sample as the scheduler sees it; ``payload`` is its owner's and never read here.

    ``cancelled`` may be set from any thread; the entry leaves at the next ``plan()``.
    """

    payload: object
    bucket: Bucket
    steps: int
    rows: int  # UNet rows per call: 2 for a guided sample ([uncond, cond]), 1 at guidance 1
    group: Hashable  # static mode batches only entries of one group (step count, guidance)
    submitted_at: float = 0.0  # the scheduler's clock; set by ``add``
    cancelled: bool = False
    done: int = 0  # steps taken
    run_s: float = 0.0  # seconds of the steps it took part in

    @property
    def remaining(self) -> int:
        return self.steps - self.done


@dataclass(frozen=True)
class Fairness:
    """Step mode's bound on how much joiners may stretch a running sample (see the module docstring).

    ``slack``: a joiner waits while it would make an older running sample's projected time exceed
    ``slack`` x that sample's ideal time.
    """

    slack: float = 2.5

    def __post_init__(self) -> None:
        if not isinstance(self.slack, (int, float)) or not self.slack > 1:
            raise ValueError(f"Fairness slack must be a number > 1 (1 would hold back every joiner), got {self.slack!r}")


@dataclass
class Plan:
    """What the next call is: the bucket that runs (None: nothing to run), the entries that join it
    (taken off the waiting queue; ``start`` them once prepared) and the cancelled entries taken out."""

    bucket: Bucket | None
    joiners: list[Entry] = field(default_factory=list)
    cancelled: list[Entry] = field(default_factory=list)


class Pace:
    """Observed step times of one bucket: a moving average per call size (rows), interpolated between sizes."""

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}
        self._sizes: list[int] = []  # the observed sizes, sorted

    def observe(self, rows: int, seconds: float) -> None:
        old = self._seconds.get(rows)
        if old is None:
            bisect.insort(self._sizes, rows)
        self._seconds[rows] = seconds if old is None else old + PACE_SMOOTHING * (seconds - old)

    @property
    def largest(self) -> int:
        """The largest call size (rows) observed; needs one observation at least."""
        return self._sizes[-1]

    def at(self, rows: int) -> float:
        """The step time of a call of ``rows`` rows: linear between the observed sizes around it, the
        nearest observed size's outside them. Needs one observation at least."""
        sizes, seconds = self._sizes, self._seconds
        above = bisect.bisect_left(sizes, rows)
        if above == len(sizes) or sizes[above] == rows or above == 0:
            return seconds[sizes[min(above, len(sizes) - 1)]]
        low, high = sizes[above - 1], sizes[above]
        return seconds[low] + (seconds[high] - seconds[low]) * (rows - low) / (high - low)


class Scheduler:
    """Plans UNet calls for entries of any size buckets. Not thread-safe: its owner serializes calls
    (StepBatcher holds its lock); only ``Entry.cancelled`` may change from other threads.

    ``fairness`` applies to step mode (None: admit whenever there is room); ``clock`` gives seconds.
    """

    def __init__(self, max_batch_size: int, mode: str = "step", fairness: Fairness | None = Fairness(),
                 clock: Callable[[], float] = time.monotonic):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        self.max_batch_size = max_batch_size
        self.mode = mode
        self.fairness = fairness if mode == "step" else None
        self.clock = clock
        self._waiting: dict[Bucket, deque[Entry]] = {}
        self._running: dict[Bucket, list[Entry]] = {}
        self._pace: dict[Bucket, Pace] = {}
        self._last_bucket: Bucket | None = None

    @property
    def running(self) -> int:
        return sum(len(entries) for entries in self._running.values())

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    def has_work(self) -> bool:
        return any(self._waiting.values()) or any(self._running.values())

    def work(self) -> int:
        """Outstanding UNet work in row-steps: every waiting entry's steps and every running entry's remaining
        steps, times its rows. A 150-step guided sample weighs 300, fifteen 10-step ones as much: this, not a
        count of requests, is what a new sample waits behind (the admission bound of StepBatcher.submit)."""
        waiting = sum(entry.steps * entry.rows for queue in self._waiting.values() for entry in queue)
        return waiting + sum(entry.remaining * entry.rows for pool in self._running.values() for entry in pool)

    def seconds_for(self, work: int) -> float | None:
        """About how long ``work`` row-steps take: at the best rate measured in any bucket (rows per second of
        its largest observed call, the size a busy generator runs at). None before any call was measured."""
        rates = [pace.largest / seconds for pace in self._pace.values() for seconds in [pace.at(pace.largest)]
                 if seconds > 0]
        return work / max(rates) if rates else None

    def add(self, entry: Entry) -> None:
        """Queue an entry (stamped with the clock's time)."""
        entry.submitted_at = self.clock()
        self._waiting.setdefault(entry.bucket, deque()).append(entry)

    def plan(self) -> Plan:
        """Take out cancelled entries, choose the bucket of the next call and its joiners."""
        cancelled = self._take_cancelled()
        bucket = self._next_bucket()
        joiners = [] if bucket is None else self._admit(bucket)
        return Plan(bucket, joiners, cancelled)

    def start(self, bucket: Bucket, entries: Iterable[Entry]) -> None:
        """Make prepared joiners (from ``plan``) run in ``bucket`` from its next call on."""
        self._running.setdefault(bucket, []).extend(entries)

    def batch(self, bucket: Bucket) -> list[Entry]:
        """The entries the next call of ``bucket`` runs."""
        return list(self._running.get(bucket, ()))

    def stepped(self, bucket: Bucket, entries: list[Entry], seconds: float) -> list[Entry]:
        """Record a call of ``entries`` that took ``seconds``; returns those that took their last step
        (they no longer run)."""
        self.observe(bucket, sum(entry.rows for entry in entries), seconds)
        for entry in entries:
            entry.done += 1
            entry.run_s += seconds
        finished = [entry for entry in entries if entry.remaining <= 0]
        self.remove(bucket, finished)
        return finished

    def observe(self, bucket: Bucket, rows: int, seconds: float) -> None:
        """Record a call of ``bucket`` with ``rows`` rows that took ``seconds`` (``stepped`` does; a
        warm-up may too, so that the fairness policy knows a small call's pace before the first request)."""
        self._pace.setdefault(bucket, Pace()).observe(rows, seconds)

    def remove(self, bucket: Bucket, entries: Iterable[Entry]) -> None:
        """Stop running ``entries`` (failed or finished); entries not running are ignored."""
        leaving = {id(entry) for entry in entries}
        if leaving:
            self._running[bucket] = [e for e in self._running.get(bucket, ()) if id(e) not in leaving]

    def overdue(self, entry: Entry, joiners: Sequence[Entry] = ()) -> bool:
        """Whether a running entry's projected time, with ``joiners`` added to its bucket, exceeds the
        fairness slack times its ideal time (False without fairness or before its bucket's first call).

        Projected: the seconds its steps took so far, plus each remaining step at the pace of the call
        it will be in, if no one else joins: the entries of its batch still running at that step.
        Ideal: its steps at the pace of a call of its own rows alone.
        """
        pace = self._pace.get(entry.bucket)
        if self.fairness is None or pace is None:
            return False
        batch = [*self._running.get(entry.bucket, ()), *joiners]
        ends = sorted((min(e.remaining, entry.remaining), e.rows) for e in batch)
        projected, step, rows = entry.run_s, 0, sum(e.rows for e in batch)
        for until, leaving_rows in ends:
            if until > step:  # steps step+1..until run every entry not yet left
                projected += (until - step) * pace.at(rows)
                step = until
            rows -= leaving_rows
        return projected > self.fairness.slack * entry.steps * pace.at(entry.rows)

    # ---- policy ------------------------------------------------------------------------------
    def _take_cancelled(self) -> list[Entry]:
        cancelled = []
        for pool in (*self._waiting.values(), *self._running.values()):
            keep, gone = [], []
            for entry in pool:  # one read of each flag: it is set from other threads
                (gone if entry.cancelled else keep).append(entry)
            if gone:
                cancelled += gone
                pool.clear()
                pool.extend(keep)
        return cancelled

    def _next_bucket(self) -> Bucket | None:
        """Round-robin over the buckets with work, in (height, width) order."""
        for pool in (self._waiting, self._running):
            for bucket in [b for b, entries in pool.items() if not entries]:
                del pool[bucket]
        active = sorted({*self._waiting, *self._running})
        if not active:
            return None
        later = [b for b in active if self._last_bucket is not None and b > self._last_bucket]
        self._last_bucket = later[0] if later else active[0]
        return self._last_bucket

    def _admit(self, bucket: Bucket) -> list[Entry]:
        queue = self._waiting.get(bucket, deque())
        running = self._running.get(bucket, [])
        room = self.max_batch_size - len(running)
        if self.mode == "static":
            if running or not queue:
                return []
            group = queue[0].group
            chosen = [entry for entry in queue if entry.group == group][:room]
            for entry in chosen:
                queue.remove(entry)
            return chosen
        joiners: list[Entry] = []
        while queue and len(joiners) < room and not self._held_back(queue[0], running, joiners):
            joiners.append(queue.popleft())
        return joiners

    def _held_back(self, joiner: Entry, running: list[Entry], joining: list[Entry]) -> bool:
        """Whether admitting ``joiner`` (after ``joining``) would make an older running entry overdue.
        Waiting entries are taken in order, so the younger ones behind a held-back entry wait too."""
        joiners = [*joining, joiner]
        return any(entry.submitted_at <= joiner.submitted_at and self.overdue(entry, joiners) for entry in running)
