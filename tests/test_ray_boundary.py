"""One Ray boundary: every private Ray name lives in catversion/cluster/ray_internals.py, which is pinned to
the Ray release it was written for and fails naming itself when Ray moves one; the rest of the library
imports no Ray at all."""

import ast
import logging
import re
from pathlib import Path

import pytest

from catversion.cluster import ray_internals

ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = ROOT / "catversion" / "cluster" / "ray_internals.py"
PRIVATE = re.compile(r"\bray\.(_private|_raylet|train\.v2\._internal|autoscaler\._private|serve\._private)\b|_internal_kv_")


def _python_files():
    for folder in ("catversion", "pipelines", "serve", "tests", "benchmarks", "infra"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_every_private_ray_name_is_in_the_boundary_module():
    """Imports and strings alike (importlib.import_module("ray._private...") counts too)."""
    found = []
    for path in _python_files():
        if path in (BOUNDARY, Path(__file__).resolve()):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "private Ray names outside catversion/cluster/ray_internals.py:\n" + "\n".join(found)
    assert PRIVATE.search(BOUNDARY.read_text()), "the check must see the names where they are"


def test_the_library_uses_ray_only_in_its_cluster_subpackage():
    outside = []
    for path in sorted((ROOT / "catversion").rglob("*.py")):
        if (ROOT / "catversion" / "cluster") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            outside += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "ray"]
    assert not outside, "\n".join(outside)


def test_every_hook_resolves_on_the_pinned_ray():
    ray_internals.check()
    pinned = re.search(r"^ray\[[^\]]*\]==(\S+)|^ray==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    assert pinned, "constraints.txt pins Ray"
    version = next(v for v in pinned.groups() if v)
    assert ".".join(version.split(".")[:2]) == ray_internals.WRITTEN_FOR, (
        "constraints.txt pins another Ray than ray_internals.py was written for: check its hooks, then update "
        "WRITTEN_FOR")


def test_another_ray_release_fails_the_check_naming_the_module(monkeypatch):
    monkeypatch.setattr(ray_internals, "WRITTEN_FOR", "2.59")
    with pytest.raises(ray_internals.RayInternalsChanged, match=r"catversion/cluster/ray_internals\.py was written "
                                                                 r"for Ray 2\.59"):
        ray_internals.check()


def test_a_moved_required_hook_fails_with_a_message_naming_the_module_and_the_fix(monkeypatch):
    monkeypatch.setitem(ray_internals.HOOKS, "ControllerCallback",
                        ("ray.train.v2._internal.execution.callback", "RenamedControllerCallback"))
    with pytest.raises(ray_internals.RayInternalsChanged) as caught:
        ray_internals.controller_callback(lambda controller: None)
    message = str(caught.value)
    assert "catversion/cluster/ray_internals.py" in message and "RenamedControllerCallback" in message
    assert "constraints.txt" in message, "says how to fix it"
    with pytest.raises(ray_internals.RayInternalsChanged):
        ray_internals.check()


def test_a_moved_optional_hook_is_logged_once_and_the_feature_goes_on_without_it(monkeypatch, caplog):
    monkeypatch.setitem(ray_internals.HOOKS, "stdout_deduplicator", ("ray._private.worker", "no_such_deduplicator"))
    monkeypatch.setattr(ray_internals, "_warned", set())
    data = {"lines": ["hello"], "pid": 1, "is_err": False}
    with caplog.at_level(logging.WARNING, logger=ray_internals.__name__):
        assert ray_internals.deduplicate(data) == [data]
        assert ray_internals.deduplicate(data) == [data]
    warnings = [r.getMessage() for r in caplog.records if "no_such_deduplicator" in r.getMessage()]
    assert len(warnings) == 1 and "catversion/cluster/ray_internals.py" in warnings[0], warnings


def test_the_controller_hook_sets_its_settings_in_the_controller_process_only(monkeypatch):
    """Ray Train reads some settings only from its controller's environment; the hook sets them there
    (a process of its own per run), never in the driver's."""
    import os

    import ray

    started = []
    hook = ray_internals.controller_callback(started.append, env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "7"})
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" not in os.environ, "building it changes nothing here"
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)

    class Context:
        current_actor = "controller-handle"

    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    hook.after_controller_start(train_run_context=None)  # what the controller calls, in its own process
    assert started == ["controller-handle"] and os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "7"
