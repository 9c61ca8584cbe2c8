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
import sys
from dataclasses import dataclass, field

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
)


def _show(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def forward_line(data: dict, write=_show) -> None:
    """Ray's log handler for one batch of worker output: prefix each line that matters with the
    component that printed it and write it above any progress bar."""
    lines = data.get("lines") or []
    pid = data.get("pid")
    who = data.get("actor_name") or data.get("task_name") or ("Ray" if pid in ("raylet", "autoscaler") else "worker")
    traceback = False
    for line in lines:
        line = line.rstrip()
        if not line:
            continue
        traceback = traceback or line.startswith("Traceback")
        if not traceback and ROUTINE.search(line):
            continue
        write(f"({who} pid={pid}) {line}" if pid not in ("raylet", "autoscaler") else f"(Ray) {line}")


def connect(address: str | None = None, env_vars: dict[str, str] | None = None, **options) -> bool:
    """Join the Ray cluster at `address`, or start (or join) a local one; returns True when this call
    connected (so the caller must `ray.shutdown()`), False when Ray was already initialized.

    Worker output reaches this terminal through `forward_line` (warnings and errors; routine INFO
    lines stay in Ray's log files under /tmp/ray/session_latest/logs)."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=True,
             **options)
    try:  # Ray's own handler prints every line; keep its plumbing, filter what it prints.
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", forward_line)
    except (ImportError, AttributeError):  # another Ray version: its handler (everything) stays
        log.debug("Ray's log dispatcher is not where it was; worker output is not filtered")
    return True


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


def autoscaler_node_types() -> tuple[bool, list[tuple[dict[str, float], int]]]:
    """(is an autoscaler running?, [(resources of a node type, the most nodes of it; -1 = no limit)])."""
    types: list[tuple[dict[str, float], int]] = []
    running = False
    try:
        from ray._private import state

        config = state.state.get_cluster_config()
        if config is not None:
            running = True
            types = [(dict(group.resources), int(group.max_count)) for group in config.node_group_configs]
    except Exception:  # noqa: BLE001  (an older or newer Ray: fall back to the status key below)
        pass
    if not running:
        try:
            from ray._private import ray_constants
            from ray.experimental.internal_kv import _internal_kv_get

            running = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) is not None
        except Exception:  # noqa: BLE001
            running = False
    return running, types


def check_resources(request: Request) -> None:
    """Raise InsufficientResources, naming what is missing and the flag to change, when the cluster
    (its live nodes plus what its autoscaler may add) cannot run `request.count` units at once.

    An autoscaler whose node types cannot be read lets the request through (the run's own resources
    timeout still ends a wait that never ends), with a warning."""
    import ray

    nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    room = sum(fits(node, request.each) for node in nodes)
    if room >= request.count:
        return
    autoscaling, types = autoscaler_node_types()
    if autoscaling and not types:
        log.warning("this cluster has room for %s of %s %s(s) now; waiting for its autoscaler to add nodes",
                    room, request.count, request.what)
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
