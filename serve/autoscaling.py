"""Generator autoscaling that sees the demand the generator refused: Serve's default rule on ongoing plus shed requests.

Ray Serve's default policy scales on ongoing requests: those running at replicas plus those queued at
handles, `target_ongoing_requests` per replica. A generator refuses a request while the work ahead of
it is past its `max_queued_work`, with an immediate 429, so refused requests never count as ongoing,
and a saturated generator would look only as busy as its bound lets it be (a few long requests fill the bound). Each generator replica
therefore reports, as a custom autoscaling metric, the requests it shed as the ongoing requests they
would have been (Little's law: refusals per second times the seconds an admitted request takes), and
`demand_policy` adds them to Serve's count before applying the default rule. Serve wraps the policy
with the deployment's `min_replicas`/`max_replicas`, delays and scaling factors.

Serve pickles the policy by value into its controller, so this module imports nothing of the project.
"""

from __future__ import annotations

import threading
import time
from collections import deque

DEMAND_POLICY = "serve.autoscaling:demand_policy"  # autoscaling_config.policy.policy_function of the Generator
SHED_DEMAND = "shed_demand"  # the custom metric's name
WINDOW_S = 30.0  # refusals are counted over this window: Serve's default look_back_period_s
LATENCY_SMOOTHING = 0.1  # weight of one admitted request's seconds in their moving average


class ShedDemand:
    """Requests a replica refused, as the ongoing requests they would have been. Thread-safe."""

    def __init__(self, window_s: float = WINDOW_S, clock=time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self._refused: deque[float] = deque()
        self._seconds: float | None = None  # moving average of an admitted request's seconds
        self._lock = threading.Lock()

    def shed(self) -> None:
        """One request refused now."""
        with self._lock:
            self._refused.append(self.clock())

    def served(self, seconds: float) -> None:
        """One admitted request done after ``seconds``."""
        with self._lock:
            old = self._seconds
            self._seconds = seconds if old is None else old + LATENCY_SMOOTHING * (seconds - old)

    def demand(self) -> float:
        """Refusals per second over the window times an admitted request's seconds (0 before one was served:
        then Serve's own count, which holds the admitted requests, is all there is to go on)."""
        with self._lock:
            horizon = self.clock() - self.window_s
            while self._refused and self._refused[0] < horizon:
                self._refused.popleft()
            return len(self._refused) / self.window_s * (self._seconds or 0.0)


def demand_policy(ctx) -> tuple[float, dict]:
    """Serve's default rule (replicas = ongoing requests / target_ongoing_requests) on the ongoing requests
    plus the demand the replicas shed; ``ctx`` is Serve's AutoscalingContext."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    shed = sum((ctx.aggregated_metrics or {}).get(SHED_DEMAND, {}).values())
    return (ctx.total_num_requests + shed) / ctx.config.get_target_ongoing_requests(), {}
