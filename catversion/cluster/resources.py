"""Whether the cluster can ever hold what a command is about to ask Ray for.

`check_resources` compares the request with what the cluster has (and what its autoscaler can add),
so a request that can never be placed fails in seconds with the numbers and the flag to change,
instead of waiting forever for resources. Ray is imported inside the functions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from ..errors import InsufficientResources
from . import ray_internals

log = logging.getLogger(__name__)


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
    return ray_internals.autoscaler_node_groups()


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
    if not types and not ray_internals.started_here():
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
