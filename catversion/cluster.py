"""Ray cluster helpers shared by `batch`, `evaluate` and `serve`.

* `connect` joins (or starts) Ray with the workers' output forwarded to this terminal, filtered to
  what a user must see: warnings, errors and tracebacks from Ray Train, Ray Serve and the workers,
  and the workers' own lines; Ray's routine INFO lines stay in the Ray log files. Lines are written
  through tqdm, so they never garble a progress bar.
* `check_resources` compares what a command is about to ask Ray for with what the cluster has (and
  what its autoscaler can add), so a request that can never be placed fails in seconds with the
  numbers and the flag to change, instead of waiting forever for resources.

Ray is imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field

from . import progress
from .errors import InsufficientResources

log = logging.getLogger(__name__)

# Lines Ray's components print on every healthy run; everything else a worker prints is shown.
ROUTINE = re.compile(
    r"^\s*(INFO|DEBUG)\b"  # Ray Serve / Ray Data loggers: "INFO 2026-11-27 ... -- message"
    r"|^\s*\S+ \S+\s+(INFO|DEBUG)\s"  # "2026-11-27 00:50:13,971\tINFO worker.py:2029 -- ..."
    r"|^\[[^\]]+ [ID] \d+ \d+\]"  # Ray core (glog) info lines: "[2026-11-27 ... I 123 456] ..."
    r"|Requesting resources: |Attempting to start training worker group|Started training worker group"
    r"|^- \(ip=\S+, pid=\d+\) world_rank=|Setting up process group for: |Reporting training result \d+"
    r"|has constructor arguments in the object store"  # Ray Train's own watcher actor, harmless
    r"|Moving model to device: |Wrapping provided model in DistributedDataParallel"
    r"|Failed to query Ray Train Controller actor state"  # Ray Train's cleaner, after a run is aborted
)
_recent: dict[tuple, float] = {}  # (pid, line) -> when shown: Ray Train can publish a worker's line twice
REPEAT_S = 10.0


def forward_line(data: dict, write=None) -> None:
    """Ray's log handler for worker output: Ray's own de-duplication ("[repeated 3x across cluster]"),
    then each line that matters, prefixed with the component that printed it, written above any bar."""
    batches = [data]
    if data.get("pid") != "autoscaler":
        try:
            from ray._private.worker import stderr_deduplicator, stdout_deduplicator

            batches = (stderr_deduplicator if data.get("is_err") else stdout_deduplicator).deduplicate(data)
        except (ImportError, AttributeError):
            pass
    for batch in batches:
        _forward(batch, write or progress.write)


def _forward(data: dict, write) -> None:
    lines = data.get("lines") or []
    pid = data.get("pid")
    if pid == "autoscaler":  # its periodic status report is for `ray status`; keep its events ("Adding 1 node...")
        from ray._private.worker import filter_autoscaler_events

        lines = list(filter_autoscaler_events(lines))
    who = data.get("actor_name") or data.get("task_name") or "worker"
    traceback = False
    for line in lines:
        line = line.rstrip()
        if not line:
            continue
        traceback = traceback or line.startswith("Traceback")
        if not traceback and ROUTINE.search(line):
            continue
        now = time.monotonic()
        if now - _recent.get((pid, line), -REPEAT_S) < REPEAT_S:
            continue
        _recent[(pid, line)] = now
        if len(_recent) > 1000:
            _recent.clear()
        write(f"({who} pid={pid}) {line}" if pid not in ("raylet", "autoscaler") else f"(Ray) {line}")


def connect(address: str | None = None, env_vars: dict[str, str] | None = None, **options) -> bool:
    """Join the Ray cluster at `address`, or start (or join) a local one; returns True when this call
    connected (so the caller must `ray.shutdown()`), False when Ray was already initialized.

    Worker output reaches this terminal's stderr through `forward_line` (warnings and errors; routine
    INFO lines stay in Ray's log files under /tmp/ray/session_latest/logs). So do Ray's own error
    messages ("a worker died..."), which Ray prints to stdout: stdout stays the command's own
    (`catversion batch --json > summary.json`)."""
    import signal
    import threading

    import ray

    if ray.is_initialized():
        _route_ray_output()
        return False
    on_term = signal.getsignal(signal.SIGTERM)
    ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=True,
             **options)
    # Ray's core worker installs its own SIGTERM handler (it logs and exits): put the command's back,
    # so SIGTERM stops the command as Ctrl-C does (see catversion.cli).
    if callable(on_term) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    _route_ray_output()
    return True


def _to_stderr(data: dict, ignore_prefix: bool = False) -> None:
    forward_line({**data, "is_err": True})


def _route_ray_output() -> None:
    """Keep Ray's plumbing, filter what it prints, and print it to stderr."""
    try:
        from ray._private import worker

        worker.print_to_stdstream = _to_stderr  # what Ray's error-message listener calls
        dispatcher = worker.global_worker_stdstream_dispatcher
        if any(name == "ray_print_logs" for name, _ in dispatcher.handlers):  # log_to_driver is on
            dispatcher.remove_handler("ray_print_logs")
            dispatcher.add_handler("ray_print_logs", forward_line)
    except (ImportError, AttributeError):  # another Ray version: its own printing (everything) stays
        log.debug("Ray's log dispatcher is not where it was; worker output is not filtered")


# ---- resources ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """`count` units of `what` (e.g. 3 "worker"s) that must run at once, each needing `each`
    ({"CPU": 1, "GPU": 1}, on one node). `flags` names the flag that sets each resource, and
    `count_flag` the one that sets `count`, for the error message."""

    what: str
    count: int
    each: dict[str, float]
    flags: dict[str, str] = field(default_factory=dict)
    count_flag: str = ""


def fits(node: dict[str, float], each: dict[str, float]) -> float:
    """How many units needing `each` fit on a node with resources `node` (inf when nothing is asked)."""
    counts = [math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in each.items() if amount > 0]
    return min(counts) if counts else math.inf


def _plural(n: float, word: str) -> str:
    return f"{n:g} {word}{'' if n == 1 else 's'}"


def _describe(resources: dict[str, float], names) -> str:
    return ", ".join(_plural(resources.get(name, 0.0), name) for name in names)


def autoscaler_node_types() -> list[tuple[dict[str, float], int]] | None:
    """The node types an autoscaler may add, as [(resources of one node, the most nodes; -1 = no limit)],
    from the cluster config Ray's autoscaler (v2, e.g. KubeRay's) publishes; None when there is none."""
    try:
        from ray._private import state

        config = state.state.get_cluster_config()
    except Exception:  # noqa: BLE001  (another Ray version: unknown)
        return None
    if config is None or not config.node_group_configs:
        return None
    return [(dict(group.resources), int(group.max_count)) for group in config.node_group_configs]


def started_here() -> bool:
    """Whether this process started the Ray it is connected to (a local Ray: no autoscaler, no other nodes
    to come), rather than joining a cluster."""
    try:
        from ray._private import worker

        return bool(getattr(worker._global_node, "head", False))
    except Exception:  # noqa: BLE001
        return False


def check_resources(request: Request) -> None:
    """Raise InsufficientResources, naming what is missing and the flag to change, when the cluster
    cannot run `request.count` units at once: its live nodes, plus the node types its autoscaler may add
    when it publishes them. A Ray this process started has no autoscaler. On a joined cluster whose
    autoscaler (if any) cannot be read, a shortfall is a warning: the command waits for nodes (and the
    caller's own resources timeout ends a wait that never ends)."""
    import ray

    nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    room = sum(fits(node, request.each) for node in nodes)
    if room >= request.count:
        return
    types = autoscaler_node_types() or []
    if not types and not started_here():
        log.warning("this cluster has room for %s of the %s %s(s) that must run at once (%s each); waiting for "
                    "nodes to join", room, request.count, request.what,
                    _describe(request.each, [k for k, v in request.each.items() if v > 0]))
        return
    unbounded = any(limit < 0 and fits(resources, request.each) > 0 for resources, limit in types)
    extra = sum(fits(resources, request.each) * limit for resources, limit in types if limit > 0)
    if unbounded or room + extra >= request.count:
        return

    asked = [name for name, amount in request.each.items() if amount > 0]
    total = {name: sum(node.get(name, 0.0) for node in nodes) for name in asked}
    largest = {name: max([node.get(name, 0.0) for node in nodes] + [r.get(name, 0.0) for r, _ in types] or [0.0])
               for name in asked}
    added = " (with what its autoscaler can add)" if types else ""
    short = [name for name in asked if largest[name] < request.each[name]]
    if short:
        name = short[0]
        where = (f"this cluster has {_plural(total[name], name)}" if total[name] == 0 or not nodes
                 else f"its largest node has {_plural(largest[name], name)}")
        fix = f" or use {request.flags[name]}" if name in request.flags else ""
        hint = f"add nodes with {request.each[name]:g} {name} or more{fix}"
        if name == "GPU" and total[name] == 0:
            hint = f"add GPU nodes{fix}"
        raise InsufficientResources(
            f"each {request.what} needs {_plural(request.each[name], name)}; {where}{added} ({hint})")
    count_fix = f", or lower {request.count_flag}" if request.count_flag else ""
    raise InsufficientResources(
        f"{request.count} {request.what}s with {_describe(request.each, asked)} each must run at once; this cluster "
        f"has room for {room:g}{added} ({_describe(total, asked)} in all on {len(nodes)} node(s)) (add nodes{count_fix})")
