"""Every use of Ray's private names (`ray._private…`, `ray._raylet…`, `ray.autoscaler._private…`,
`ray.train.v2._internal…`, the underscored internal key-value calls), in one place, checked against the
Ray version it was written for.

Ray does not promise these names across releases. Each hook below is looked up when it is first used; if
Ray moved it, a required hook raises `RayInternalsChanged` naming this module, the hook and both Ray
versions, and an optional one (output filtering, autoscaler node types) logs that once and lets the
command go on without it. `check()` resolves every hook at once: tests/test_ray_boundary.py runs it, so a
Ray upgrade that moves one fails a test instead of a user's run. After an upgrade, read each hook against
the new Ray, then raise `WRITTEN_FOR`.

No module outside this one imports a private Ray module (tests/test_ray_boundary.py checks the source).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Iterable

WRITTEN_FOR = "2.60"  # the Ray release (major.minor) every hook here was read against (constraints.txt pins it)
MODULE = "catversion/cluster/ray_internals.py"

log = logging.getLogger(__name__)
_warned: set[str] = set()


class RayInternalsChanged(RuntimeError):
    """A private Ray name this project relies on is not where it was."""


def ray_version() -> str:
    import ray

    return ray.__version__


def _changed(hook: str, exc: BaseException) -> RayInternalsChanged:
    return RayInternalsChanged(
        f"{MODULE}: Ray's private {hook} is not where Ray {WRITTEN_FOR} had it (installed Ray: {ray_version()}; "
        f"{type(exc).__name__}: {exc}). Install the Ray version pinned in constraints.txt, or update {MODULE} "
        "for this Ray release")


# Each private name this project uses: (module, attribute). Nothing else in the code base spells them.
HOOKS: dict[str, tuple[str, str]] = {
    "stdout_deduplicator": ("ray._private.worker", "stdout_deduplicator"),
    "stderr_deduplicator": ("ray._private.worker", "stderr_deduplicator"),
    "filter_autoscaler_events": ("ray._private.worker", "filter_autoscaler_events"),
    "worker module": ("ray._private", "worker"),  # print_to_stdstream, global_worker_stdstream_dispatcher
    "global_node": ("ray._private.worker", "_global_node"),
    "cluster state": ("ray._private.state", "state"),
    "ControllerCallback": ("ray.train.v2._internal.execution.callback", "ControllerCallback"),
    "autoscaler prepare_config": ("ray.autoscaler._private.util", "prepare_config"),
    "autoscaler validate_config": ("ray.autoscaler._private.util", "validate_config"),
    "cluster config key": ("ray._raylet", "GCS_AUTOSCALER_CLUSTER_CONFIG_KEY"),
    "autoscaler namespace": ("ray._raylet", "GCS_AUTOSCALER_STATE_NAMESPACE"),
    "kv put": ("ray.experimental.internal_kv", "_internal_kv_put"),
    "kv del": ("ray.experimental.internal_kv", "_internal_kv_del"),
    "gcs port variable": ("ray._private.ray_constants", "GCS_PORT_ENVIRONMENT_VARIABLE"),
}
# Attributes of the worker module that route_driver_output() replaces or calls.
WORKER_ATTRIBUTES = ("print_to_stdstream", "global_worker_stdstream_dispatcher")


def _hook(key: str):
    """The hook's object; RayInternalsChanged when Ray moved it."""
    module, name = HOOKS[key]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise _changed(f"{module}.{name}", exc) from None


def _optional(key: str):
    """The hook's object, or None (logged once) when Ray moved it."""
    try:
        return _hook(key)
    except RayInternalsChanged as exc:
        if key not in _warned:
            _warned.add(key)
            log.warning("%s; going on without it", exc)
        return None


# ---- driver output (catversion.cluster.output) ------------------------------------------------------

def deduplicate(data: dict) -> list[dict]:
    """Ray's own de-duplication of worker output ("[repeated 3x across cluster]"); ``[data]`` without it."""
    deduplicator = _optional("stderr_deduplicator" if data.get("is_err") else "stdout_deduplicator")
    return deduplicator.deduplicate(data) if deduplicator is not None else [data]


def autoscaler_events(lines: Iterable[str]) -> list[str]:
    """The events in the autoscaler's output ("Adding 1 node..."), without its periodic status report."""
    keep = _optional("filter_autoscaler_events")
    return list(keep(list(lines))) if keep is not None else list(lines)


def route_driver_output(print_error_message: Callable[..., None], print_logs: Callable[[dict], None]) -> bool:
    """Make Ray's driver print its error messages through ``print_error_message(data, ignore_prefix)`` and
    the worker output it forwards (with log_to_driver) through ``print_logs(data)``. False when Ray's
    printing could not be replaced (it then prints everything, as it does by default)."""
    worker = _optional("worker module")
    if worker is None or not all(hasattr(worker, name) for name in WORKER_ATTRIBUTES):
        if worker is not None and "worker attributes" not in _warned:
            _warned.add("worker attributes")
            log.warning("%s: ray._private.worker lacks %s (Ray %s); worker output is not filtered", MODULE,
                        " or ".join(WORKER_ATTRIBUTES), ray_version())
        return False
    worker.print_to_stdstream = print_error_message  # what Ray's error-message listener calls
    dispatcher = worker.global_worker_stdstream_dispatcher
    if any(name == "ray_print_logs" for name, _ in dispatcher.handlers):  # log_to_driver is on
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", print_logs)
    return True


# ---- starting a local Ray (catversion.cluster.output) -----------------------------------------------

@contextlib.contextmanager
def head_address_for_new_ray(address: str):
    """Within the block, a Ray head that ray.init starts listens at ``address`` (HOST:PORT; Ray reads a new
    head's GCS port from an environment variable only), and every process it starts has RAY_ADDRESS set to
    it. A Ray component that looks its own cluster up (Ray Train's placement-group cleaner asks the State
    API, which otherwise picks the latest cluster `ray start` made on this machine: maybe another user's)
    then finds this one. The command's own environment is as before after the block."""
    port_variable = _hook("gcs port variable")
    names = (port_variable, "RAY_ADDRESS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({port_variable: address.rsplit(":", 1)[1], "RAY_ADDRESS": address})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---- the cluster (catversion.cluster.resources) -----------------------------------------------------

def autoscaler_node_groups() -> list[tuple[dict[str, float], int]] | None:
    """[(resources of one node, the most nodes; -1 = no limit)] of the node types the cluster's autoscaler
    (v2, e.g. KubeRay's) publishes; None when there is none or Ray does not say."""
    state = _optional("cluster state")
    if state is None:
        return None
    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001  (no answer from the GCS: unknown)
        return None
    if config is None or not config.node_group_configs:
        return None
    return [(dict(group.resources), int(group.max_count)) for group in config.node_group_configs]


def started_here() -> bool:
    """Whether this process started the Ray it is connected to (its head node) rather than joining one."""
    return bool(getattr(_optional("global_node"), "head", False))


# ---- Ray Train (pipelines/batch.py) -----------------------------------------------------------------

def controller_callback(on_start: Callable[[object], None], env: dict[str, str] | None = None):
    """A Ray Train controller callback (RunConfig(callbacks=[...])). In the controller's own process, before
    it starts any worker group, it sets ``env`` (settings Ray Train reads only from the environment, such as
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S; a controller is one process per run, so neither the driver nor
    another run sees them), then calls ``on_start(the controller's actor handle)``."""
    base = _hook("ControllerCallback")
    settings = dict(env or {})

    class StartHook(base):
        def after_controller_start(self, train_run_context) -> None:
            import ray

            os.environ.update(settings)
            on_start(ray.get_runtime_context().current_actor)

    return StartHook()


# ---- for tests: the shipped cluster launcher config, and an autoscaler's published node groups ------------

def validate_cluster_launcher_config(config: dict) -> None:
    """The offline half of `ray up`: fill in the config's defaults and validate it (raises when invalid)."""
    prepare, validate = _hook("autoscaler prepare_config"), _hook("autoscaler validate_config")
    validate(prepare(config))


@contextlib.contextmanager
def published_node_groups(groups: list[tuple[str, dict[str, float], int]]):
    """Within the block, the connected cluster says its autoscaler (v2) can add these node groups
    ([(name, resources of one node, the most nodes)]), as KubeRay's does; what `autoscaler_node_groups`
    reads."""
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for name, resources, max_count in groups:
        group = config.node_group_configs.add()
        group.name, group.max_count = name, max_count
        group.resources.update(resources)
    key, namespace = _hook("cluster config key"), _hook("autoscaler namespace")
    _hook("kv put")(key, config.SerializeToString(), overwrite=True, namespace=namespace)
    try:
        yield
    finally:
        _hook("kv del")(key, namespace=namespace)


# ---- the pin ------------------------------------------------------------------------------------------

def check() -> None:
    """Raise RayInternalsChanged unless the installed Ray is the release this module was written for and
    every hook resolves."""
    version = ray_version()
    if ".".join(version.split(".")[:2]) != WRITTEN_FOR:
        raise RayInternalsChanged(f"{MODULE} was written for Ray {WRITTEN_FOR}, but Ray {version} is installed: "
                                  f"check each hook in {MODULE} against it, then update WRITTEN_FOR")
    for key in HOOKS:
        _hook(key)
    worker = _hook("worker module")
    missing = [name for name in WORKER_ATTRIBUTES if not hasattr(worker, name)]
    if missing:
        raise RayInternalsChanged(f"{MODULE}: ray._private.worker has no {', '.join(missing)} (Ray {version})")
