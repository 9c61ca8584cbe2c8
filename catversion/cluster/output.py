"""Joining Ray, with the workers' output forwarded to this terminal and filtered to what a user must see.

`connect` starts a local Ray, or joins the cluster it is told to (README, "Running on a Ray cluster"):
warnings, errors and tracebacks from Ray Train, Ray Serve and the workers, and the workers' own lines
reach the terminal; Ray's routine INFO lines stay in the Ray log files. Lines are written through tqdm,
so they never garble a progress bar. Ray is imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Mapping

from .. import progress
from . import ray_internals

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
    batches = [data] if data.get("pid") == "autoscaler" else ray_internals.deduplicate(data)
    for batch in batches:
        _forward(batch, write or progress.write)


def _forward(data: dict, write) -> None:
    lines = data.get("lines") or []
    pid = data.get("pid")
    if pid == "autoscaler":  # its periodic status report is for `ray status`; keep its events ("Adding 1 node...")
        lines = ray_internals.autoscaler_events(lines)
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


# Names of environment variables that hold secrets: never put into a Ray runtime environment, which Ray
# writes in plain text into its logs (runtime_env_agent.log and others, readable by every local user).
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|API_KEY", re.IGNORECASE)
RAY_ADDRESS_ENV = "RAY_ADDRESS"


def ray_address(address: str | None) -> str:
    """The address `connect` hands ray.init: the one given; else RAY_ADDRESS (set by `ray job submit` and
    KubeRay for a job's driver, or by the operator: being told); else "local", a new Ray of this process's
    own, never one that happens to be running on the machine (ray.init() alone joins the latest one)."""
    return address or os.environ.get(RAY_ADDRESS_ENV) or "local"


def check_no_secrets(env: Mapping[str, str], where: str) -> None:
    """Refuse (ValueError) environment variables that look like credentials where Ray would log them."""
    secrets = sorted(name for name in env if SECRET_NAME.search(name))
    if secrets:
        raise ValueError(f"{', '.join(secrets)} would be written in plain text into Ray's logs through {where}; "
                         "a Ray the command starts inherits its environment, and a cluster's workers use their "
                         "nodes' own credentials")


def connect(address: str | None = None, env_vars: dict[str, str] | None = None, **options) -> bool:
    """Start a local Ray, or join the cluster at `address` (or RAY_ADDRESS, see `ray_address`); returns True
    when this call connected (so the caller must `ray.shutdown()`), False when Ray was already initialized.

    A Ray started here runs its workers with this process's environment, credentials included, so nothing
    is put in its runtime environment; its processes are also given its address as RAY_ADDRESS, so none of
    them looks up another Ray running on the machine. On a joined cluster the workers get `env_vars` (settings such as the
    S3 endpoint, never secrets: ValueError) through the job's runtime environment, and use their nodes' own
    credentials (an instance profile, a role, a Kubernetes Secret).

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
    check_no_secrets(env_vars or {}, "the job's runtime environment")
    target = ray_address(address)
    on_term = signal.getsignal(signal.SIGTERM)
    if target == "local":
        # Its own processes are told its address: none of them may look up "the latest cluster" on the machine.
        host = options.get("_node_ip_address") or ray.util.get_node_ip_address()
        with ray_internals.head_address_for_new_ray(f"{host}:{_free_port(host)}"):
            ray.init(address="local", log_to_driver=True, **options)
    else:
        ray.init(address=target, runtime_env={"env_vars": dict(env_vars)} if env_vars else None,
                 log_to_driver=True, **options)
    # Ray's core worker installs its own SIGTERM handler (it logs and exits): put the command's back,
    # so SIGTERM stops the command as Ctrl-C does (see catversion.cli).
    if callable(on_term) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    _route_ray_output()
    return True


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _to_stderr(data: dict, ignore_prefix: bool = False) -> None:
    forward_line({**data, "is_err": True})


def _route_ray_output() -> None:
    """Keep Ray's plumbing, filter what it prints, and print it to stderr."""
    ray_internals.route_driver_output(_to_stderr, forward_line)
