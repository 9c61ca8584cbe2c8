"""`catversion serve` as a user runs it: flags checked by argparse, a cluster that can never place a
replica refused at once (naming the flag to change), --gpus-per-replica over the config, the CPU
config, and a clean stop on SIGTERM (during deployment and while serving: Serve and the Ray it
started are gone, exit status 130).

The fail-fast and signal-during-deployment cases run in-process on the session Ray; one subprocess
starts its own Ray and is stopped with SIGTERM.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from catversion.cli import build_parser, main
from conftest import free_port

ROOT = Path(__file__).parents[1]
GPU_CONFIG = str(ROOT / "serve" / "config.yaml")
CPU_CONFIG = str(ROOT / "serve" / "config-cpu.yaml")


@pytest.mark.parametrize("flags, named", [
    (["--device", "gpu"], "invalid device 'gpu': choose from auto, cpu, cuda, cuda:N"),
    (["--device", "cuda:x"], "invalid device"),
    (["--gpus-per-replica", "-1"], "expected a number of GPUs >= 0, got '-1'"),
    (["--gpus-per-replica", "one"], "expected a number of GPUs >= 0"),
    (["--gpus-per-replica", "1.5"], "must be a whole number"),
])
def test_bad_flags_are_usage_errors_without_a_traceback(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--residuals", "somewhere", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_good_device_and_gpu_values_parse():
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:3"):
        assert build_parser().parse_args(["serve", "--device", device]).device == device
    for text, gpus in (("0", 0.0), ("0.5", 0.5), ("1", 1.0), ("2", 2.0)):
        assert build_parser().parse_args(["serve", "--gpus-per-replica", text]).gpus_per_replica == gpus


def test_a_missing_residuals_prefix_or_cuda_without_gpus_is_a_usage_error(capsys):
    assert main(["serve"]) == 2
    assert "--residuals PREFIX is required" in capsys.readouterr().err
    assert main(["serve", "--residuals", "x", "--device", "cuda", "--gpus-per-replica", "0"]) == 2
    assert "--device cuda needs a GPU per replica" in capsys.readouterr().err


def test_gpus_per_replica_overrides_the_config_and_the_cpu_config_asks_for_no_gpu(tmp_path):
    from serve.app import build_app
    from serve.cli import application_args, replica_requests
    from serve.config import ServeSettings

    def parsed(*flags):
        return application_args(build_parser().parse_args(["serve", *flags]))[0]

    gpu = parsed("--config", GPU_CONFIG)
    assert gpu["gpus_per_replica"] == 1
    assert parsed("--config", GPU_CONFIG, "--gpus-per-replica", "0")["gpus_per_replica"] == 0
    assert parsed("--config", CPU_CONFIG, "--gpus-per-replica", "0.5")["gpus_per_replica"] == 0.5
    assert parsed("--residuals", "x")["residuals"] == "x" and "gpus_per_replica" not in parsed("--residuals", "x")

    cpu = parsed("--config", CPU_CONFIG)
    assert cpu["gpus_per_replica"] == 0 and cpu["residuals"] == "./demo-output" and cpu["model"] == "tiny"
    settings = ServeSettings.from_dict({k: v for k, v in cpu.items() if k != "deployment_options"})
    assert (settings.device, settings.precision, settings.compile) == ("cpu", "fp32", "off")

    # What the fail-fast check asks the cluster for, from the built application.
    def needs(app_args):
        return {r.what: (r.count, r.each) for r in replica_requests(build_app(app_args))}

    assert needs(gpu)["generator replica"] == (1, {"CPU": 1.0, "GPU": 1.0})
    assert needs(parsed("--config", GPU_CONFIG, "--gpus-per-replica", "0"))["generator replica"] == (1, {"CPU": 1.0, "GPU": 0.0})
    assert needs(cpu) == {"generator replica": (1, {"CPU": 1.0, "GPU": 0.0}), "ingress replica": (1, {"CPU": 0.5, "GPU": 0.0})}
    # The CPU config's own num_cpus stays when GPUs are asked for on top of it.
    assert needs(parsed("--config", CPU_CONFIG, "--gpus-per-replica", "1"))["generator replica"] == (1, {"CPU": 1.0, "GPU": 1.0})
    # min_replicas 0 still needs room for one replica.
    scaled = parsed("--config", GPU_CONFIG)
    scaled["deployment_options"]["Generator"]["autoscaling_config"]["min_replicas"] = 0
    assert needs(scaled)["generator replica"][0] == 1


def test_the_cpu_config_is_a_valid_serve_config_for_the_same_application():
    from ray.serve.schema import ServeDeploySchema

    cpu, gpu = (yaml.safe_load(Path(path).read_text()) for path in (CPU_CONFIG, GPU_CONFIG))
    ServeDeploySchema.model_validate(cpu)
    cpu_app, gpu_app = cpu["applications"][0], gpu["applications"][0]
    assert cpu_app["import_path"] == gpu_app["import_path"] == "serve.app:build_app"
    assert [d["name"] for d in cpu_app["deployments"]] == [d["name"] for d in gpu_app["deployments"]]
    assert set(cpu_app["args"]) <= set(gpu_app["args"]), "the CPU config uses only settings the GPU config documents"
    assert "config-cpu.yaml" in Path(GPU_CONFIG).read_text().split("proxy_location")[0]
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "serve/config.yaml" in help_text and "serve/config-cpu.yaml" in help_text


def _serve_running(app: str) -> bool:
    import ray
    from ray import serve

    controllers = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == "SERVE_CONTROLLER_ACTOR"]
    return bool(controllers) and app in serve.status().applications


def test_a_gpu_config_on_a_cluster_without_gpus_fails_at_once_naming_the_flag(ray_session, tmp_path, capsys):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    status = main(["serve", "--config", GPU_CONFIG, "--residuals", str(tmp_path), "--model", "tiny",
                   "--port", str(free_port())])
    assert status == 1 and time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert ("catversion serve: error: each generator replica needs 1 GPU; this cluster has 0 GPUs "
            "(add GPU nodes or use --gpus-per-replica 0)") in err, err
    assert "Traceback" not in err
    assert not _serve_running("catversion")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers

    import ray

    assert ray.is_initialized(), "a Ray the process already used is left running"


@pytest.mark.parametrize("quiet", [False, True])
def test_sigterm_during_deployment_stops_serve_and_exits_130(ray_session, tmp_path, capsys, monkeypatch, quiet):
    """serve.run blocks while replicas warm up: a signal then must still shut Serve down."""
    from ray import serve

    calls = []
    monkeypatch.setattr(serve, "start", lambda **kwargs: calls.append("start"))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("shutdown"))

    def deploying(*_args, **_kwargs):
        calls.append("run")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler interrupts this
        calls.append("not interrupted")

    monkeypatch.setattr(serve, "run", deploying)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    status = main(["serve", "--config", CPU_CONFIG, "--residuals", str(tmp_path), *(["--quiet"] if quiet else [])])
    assert status == 130 and time.monotonic() - started < 20
    assert calls == ["start", "run", "shutdown"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    captured = capsys.readouterr()
    own_lines = ("starting 1 generator replica(s) on the CPU; each loads the model and warms up before serving",
                 "shutting down")
    for line in own_lines:
        assert (line in captured.err) != quiet, captured.err
    assert "catversion serve: interrupted" in captured.err and "serving" not in captured.out


# ---- one real `catversion serve` with its own Ray, stopped by SIGTERM ---------------------------------

def _descendants(pid: int) -> dict[int, str]:
    """{pid: start time} of every process below `pid`, from /proc (start time tells a reused pid apart)."""
    parents: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
        started[int(entry.name)] = fields[19]
    found, todo = {}, [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found[child] = started[child]
            todo.append(child)
    return found


def _alive(pid: int, start: str) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc")
def test_sigterm_stops_a_running_server_and_its_ray_within_seconds(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    ray_tmp = Path(f"/tmp/cv-serve-{os.getpid()}-{port}")  # short: Ray's socket paths must stay < 108 bytes
    env["RAY_TMPDIR"] = str(ray_tmp)
    (tmp_path / "residuals").mkdir()
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "catversion.cli", "serve", "--config", CPU_CONFIG, "--residuals", str(tmp_path),
             "--model", "tiny", "--port", str(port), "--quiet"],
            cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
    ray_processes: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 240
        while "serving" not in out.read_text():
            assert server.poll() is None, f"exited {server.returncode} before serving:\n{err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not serving after 240 s:\n{err.read_text()[-3000:]}"
            time.sleep(0.5)
        import requests

        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()["status"] == "ok"
        ray_processes = _descendants(server.pid)
        assert len(ray_processes) >= 2, "Ray's own processes (gcs_server, raylet) run below the command"

        stopped = time.monotonic()
        server.send_signal(signal.SIGTERM)
        status = server.wait(timeout=60)
        took = time.monotonic() - stopped
        log = err.read_text()
        assert status == 130, log[-3000:]
        assert took < 30, f"SIGTERM took {took:.1f} s"
        deadline = time.monotonic() + 10  # processes the command killed may take a moment to go
        while (left := {p for p, s in ray_processes.items() if _alive(p, s)}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"left running: {[Path(f'/proc/{p}/cmdline').read_bytes()[:80] for p in left]}"
        # --quiet: the URL line, and only warnings and errors on stderr (not this command's progress lines).
        assert out.read_text().startswith(f"serving {tmp_path} at http://127.0.0.1:{port}/v1")
        assert "starting 1 generator replica" not in log and "shutting down" not in log
        assert "catversion serve: interrupted" in log and "Traceback" not in log
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for pid, start in {**ray_processes, **_descendants(server.pid)}.items():
            if _alive(pid, start):  # only what this test started
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)
