"""What a user sees at the terminal: version, usage errors, exit statuses, signals, progress, worker
output forwarded from Ray, and resource requests checked before anything starts.

The serve side of these (its --gpus-per-replica, its resource check and its SIGTERM) is in
tests/test_serve_cli.py; the batch runs' Ctrl-C in tests/test_batch_faults.py, and a GPU request on
a CPU machine (a Ray the command starts) in tests/test_cluster.py.
"""

import json
import os
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from catversion import progress
from catversion.cli import main
from catversion.cluster import Request, check_resources, fits, forward_line
from catversion.errors import InsufficientResources
from catversion.recipe import Concept
from catversion.residual import Residual
from catversion.samples import concept_jpegs

from polling import wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"catversion {version('catversion')}"


@pytest.mark.parametrize("command", [
    ["train", "--images", "x", "--class-word", "cat", "--out", "y"],
    ["generate", "--prompt", "a cat", "--out", "y"],
    ["evaluate", "--residuals", "r", "--manifest", "m", "--prompts", "p", "--out", "o"],
])
def test_a_bad_device_is_a_usage_error_naming_the_choices(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--device", "gpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid device 'gpu': choose from auto, cpu, cuda, cuda:N" in err and "Traceback" not in err


def test_cuda_with_an_index_is_accepted_by_the_parser(tmp_path, capsys):
    # Parsed, then refused by the machine (no CUDA here): an error (1), not a usage error (2).
    code = main(["generate", "--prompt", "a teapot", "--out", str(tmp_path / "x.png"), "--model", "tiny",
                 "--device", "cuda:1", "--steps", "2", "--quiet"])
    assert code == 1
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("word", ["", "   "])
def test_empty_class_words_are_refused_everywhere(word, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--images", str(tmp_path), "--class-word", word, "--out", str(tmp_path / "x.safetensors")])
    assert exit_.value.code == 2 and "class word is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["import-official", str(tmp_path / "a.bin"), str(tmp_path / "b.safetensors"), "--class-word", word])
    assert exit_.value.code == 2 and "class word is empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="concept 'c': class word is empty"):
        Concept("c", [], word)
    import torch
    from test_residual import write_reference_checkpoint

    write_reference_checkpoint(tmp_path / "a.bin", torch.randn(4608))
    with pytest.raises(ValueError, match="class word is empty"):
        Residual.from_official(tmp_path / "a.bin", class_word=word)
    assert Concept("c", [], "  teapot ").class_word == "teapot"


def test_a_missing_required_input_is_a_usage_error(tmp_path, capsys):
    assert main(["batch", "--manifest", str(tmp_path / "m.parquet")]) == 2
    assert "--output PREFIX is required" in capsys.readouterr().err


def test_sigterm_stops_a_command_as_ctrl_c_does(tmp_path):
    """`catversion train` under SIGTERM (what `kill`, Kubernetes and `ray job stop` send) in the middle of
    training: status 130, 'interrupted', no traceback, no residual half-written."""
    images = tmp_path / "photos"
    images.mkdir()
    for i, data in enumerate(concept_jpegs("red-teapot", n=3, size=64)):
        (images / f"{i}.jpg").write_bytes(data)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    # A checkpoint at step 1 is the sign that the training loop is running.
    process = subprocess.Popen(
        [sys.executable, "-m", "catversion.cli", "train", "--images", str(images), "--class-word", "teapot",
         "--out", str(tmp_path / "t.safetensors"), "--model", "tiny", "--steps", "100000", "--save-steps", "1",
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        started = wait_until(lambda: (tmp_path / "t.step1.safetensors").exists() or process.poll() is not None,
                             120, "training's first step")
        assert started and process.poll() is None, "train ended before it took a step"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err[-3000:]
    assert "catversion train: interrupted" in err and "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "t.safetensors").exists()


# ---- progress ------------------------------------------------------------------------------------

def test_a_bar_in_a_log_is_a_line_now_and_then_and_one_at_the_end(capsys):
    bar = progress.PlainBar(8, "batch", "concept", interval=3600)
    bar.set_postfix(trained=2, failed=1)
    bar.update(3)
    assert capsys.readouterr().err == ""  # not yet: at most one line per interval
    bar.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batch:" in err and "3/8" in err and "trained=2, failed=1" in err
    assert "\r" not in err
    quiet = progress.bar(8, "batch", "concept", quiet=True)
    quiet.update(8)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_the_batch_bar_counts_finished_concepts_and_is_silent_when_quiet(capsys):
    from pipelines.cli import _BatchBar

    stats = {"total": 5, "done": 2, "trained": 1, "failed": 1, "skipped": 0, "workers": 2, "images_per_s": 12.5}
    bar = _BatchBar(quiet=False)
    bar(stats)
    bar({**stats, "done": 4, "trained": 3})
    bar.close()
    err = capsys.readouterr().err
    assert "4/5" in err and "trained=3" in err and "failed=1" in err and "img_s=12.5" in err
    silent = _BatchBar(quiet=True)
    silent(stats)
    silent.close()
    assert capsys.readouterr().err == ""


# ---- worker output forwarded from Ray -------------------------------------------------------------

def test_forwarded_worker_output_keeps_warnings_errors_and_tracebacks_only():
    shown: list[str] = []
    forward_line({"pid": 41, "actor_name": "RayTrainWorker", "is_err": True, "lines": [
        "Setting up process group for: env:// [rank=0, world_size=2]",
        "INFO 2026-11-27 10:00:00,000 serve -- routine",
        "[worker 0] tiny on cpu: UNet/VAE fp32, text encoder fp32, pack 2",
        "WARNING compiled gradients differ; training eager",
        "Traceback (most recent call last):",
        '  File "worker.py", line 3, in train',
        "INFO inside a traceback is still shown",
        "ValueError: image 3.jpg is not a decodable image",
    ]}, write=shown.append)
    assert shown == [
        "(RayTrainWorker pid=41) [worker 0] tiny on cpu: UNet/VAE fp32, text encoder fp32, pack 2",
        "(RayTrainWorker pid=41) WARNING compiled gradients differ; training eager",
        "(RayTrainWorker pid=41) Traceback (most recent call last):",
        '(RayTrainWorker pid=41)   File "worker.py", line 3, in train',
        "(RayTrainWorker pid=41) INFO inside a traceback is still shown",
        "(RayTrainWorker pid=41) ValueError: image 3.jpg is not a decodable image",
    ]


def test_worker_warnings_and_errors_reach_the_terminal_through_a_real_ray(tmp_path):
    """connect() (used by batch, evaluate and serve) forwards a task's warning and its traceback to the
    driver's stderr, and keeps Ray's routine INFO lines out."""
    script = tmp_path / "job.py"
    script.write_text(
        "import sys, time, traceback, ray\n"
        "from catversion.cluster import connect\n"
        "class Tee:\n"  # remembers what reaches this driver's stderr
        "    def __init__(self, stream):\n"
        "        self.stream, self.text = stream, ''\n"
        "    def write(self, text):\n"
        "        self.text += text\n"
        "        return self.stream.write(text)\n"
        "    def __getattr__(self, name):\n"
        "        return getattr(self.stream, name)\n"
        "sys.stderr = Tee(sys.stderr)\n"
        "assert connect(None, None, num_cpus=1, include_dashboard=False)\n"
        "@ray.remote\n"
        "def noisy():\n"
        "    print('INFO 2026-11-27 10:00:00,000 routine line', file=sys.stderr, flush=True)\n"
        "    print('WARNING: the residual cache is full', file=sys.stderr, flush=True)\n"
        "    try:\n"
        "        raise ValueError('image 7.jpg is not a decodable image')\n"
        "    except ValueError:\n"
        "        traceback.print_exc()\n"
        "ray.get(noisy.remote())\n"
        # Wait until the log monitor has published the task's last line to this driver (within ~1 s).
        "deadline = time.monotonic() + 60\n"
        "while 'decodable image' not in sys.stderr.text and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "ray.shutdown()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING: the residual cache is full" in done.stderr, done.stderr[-3000:]
    assert "(noisy pid=" in done.stderr and "ValueError: image 7.jpg is not a decodable image" in done.stderr
    assert "routine line" not in done.stderr


# ---- resources checked before anything starts ------------------------------------------------------

def test_fits_counts_units_per_node():
    assert fits({"CPU": 8, "GPU": 2}, {"CPU": 1, "GPU": 1}) == 2
    assert fits({"CPU": 8}, {"CPU": 1, "GPU": 1}) == 0
    assert fits({"CPU": 8, "GPU": 1}, {"CPU": 1, "GPU": 0}) == 8
    assert fits({"GPU": 1}, {"GPU": 0.5}) == 2


def test_a_request_the_cluster_can_never_hold_names_what_is_missing_and_the_flag(ray_session):
    # The session's Ray: one node with 4 CPUs and no GPU, started by this process (no autoscaler).
    with pytest.raises(InsufficientResources) as error:
        check_resources(Request("worker", 1, {"CPU": 1, "GPU": 1}, flags={"GPU": "--gpus-per-worker 0"}))
    assert str(error.value) == "each worker needs 1 GPU; this cluster has 0 GPUs (add GPU nodes or use --gpus-per-worker 0)"
    with pytest.raises(InsufficientResources) as error:
        check_resources(Request("worker", 1, {"CPU": 16}, flags={"CPU": "a lower --cpus-per-worker"}))
    assert "each worker needs 16 CPUs; its largest node has 4 CPUs" in str(error.value)
    assert "a lower --cpus-per-worker" in str(error.value)
    with pytest.raises(InsufficientResources) as error:
        check_resources(Request("worker", 5, {"CPU": 1}, count_flag="--workers"))
    assert "5 workers with 1 CPU each must run at once; this cluster has room for 4" in str(error.value)
    assert "lower --workers" in str(error.value)
    check_resources(Request("worker", 4, {"CPU": 1}))  # fits: no error
    check_resources(Request("replica", 1, {"CPU": 1, "GPU": 0}))  # nothing asked of GPUs


def test_node_types_an_autoscaler_can_add_count(ray_session):
    """A cluster whose autoscaler publishes its node types (Ray's autoscaler v2, e.g. KubeRay): GPU
    workers that it can add pass the check; more than its limits allow do not."""
    from catversion.cluster.ray_internals import published_node_groups

    with published_node_groups([("gpu", {"CPU": 8, "GPU": 1}, 2)]):
        check_resources(Request("worker", 2, {"CPU": 1, "GPU": 1}))
        with pytest.raises(InsufficientResources) as error:
            check_resources(Request("worker", 3, {"CPU": 1, "GPU": 1}, count_flag="--workers"))
        assert "room for 0 (with what its autoscaler can add)" in str(error.value)


def test_validate_only_json_is_one_object_on_stdout_with_status_3_for_rejected_concepts(ray_session, s3_bucket,
                                                                                        capsys):
    from batch_inputs import write_manifest

    manifest = write_manifest(s3_bucket)
    assert main(["batch", "--manifest", manifest, "--validate-only", "--quiet", "--json"]) == 3
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert set(report["rejected"]) == {"broken", "missing"} and not report["ok"], report
    assert report["valid"] == ["red-teapot", "blue-mug", "green-vase", "yellow-duck"] and report["images_checked"]
    assert any("not a decodable image" in reason for reason in report["rejected"]["broken"])
    assert "2 concept(s) rejected" in captured.err
