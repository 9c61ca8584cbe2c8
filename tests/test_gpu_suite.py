"""The GPU suite's CPU quick mode: every code path of the GPU run that a CPU can take, compile included.

It runs as its documentation says (``PYTHONPATH=. python benchmarks/gpu_suite.py ...``) in a
subprocess, so torch.compile's state stays out of the test process. Its timings mean nothing here;
what it checks does: the compiled trainer ends where the eager one does, an image made in a
concurrent batch through compiled CUDA-graph buckets is the image made alone, and every phase
reports.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_mode_runs_every_phase_with_compile(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--device", "cpu", "--model", "tiny", "--quick",
                          "--pack", "2", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1500)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(out.read_text())
    training, sampling = results["training"], results["sampling"]

    # Training: the reference loop, eager, compiled and the ceiling all ran; compiling took time and
    # changed nothing that matters (fp32 on the CPU: rounding only).
    assert set(training) >= {"reference", "eager", "compiled", "ceiling"}
    assert training["compiled"]["compile_s"] > 0 and training["ceiling"]["compiled"] is True
    assert training["compiled"]["max_abs_difference_from_eager"] < 1e-3
    assert training["eager"]["pack"] == 2 and training["ceiling"]["batch"] == 4
    assert training["ceiling"]["new_compiles"] == 0  # the trainer's own graph: its inputs' strides are fixed

    # Sampling: the step-level scheduler ran on the compiled runner, and batching changes no image.
    assert sampling["ceiling"]["compiled"] is True and sampling["warm_up_s"] > 0
    assert sampling["max_abs_difference_batched_vs_alone"] < 1e-3
    assert sampling["concurrent"]["requests"] == 4 and len(sampling["alone"]["latencies_s"]) == 2
    # The warm-up covered every call: serving padded and full buckets compiled nothing more.
    assert sampling["compiles_after_warm_up"] == 0

    for key in ("training_vs_reference", "training_vs_ceiling", "concepts_per_gpu_hour", "alone_p50_s",
                "concurrent_vs_ceiling", "concurrent_vs_one_by_one", "concurrent_vs_reference", "cold_load_p50_ms"):
        assert math.isfinite(results["ratios"][key]) and results["ratios"][key] > 0, key
    assert results["environment"]["precision"] == "fp32" and results["cold_load"]["loads"] == 8

    # One table, with every phase and the verdict column (n/a: targets are for a GPU).
    table = run.stdout
    for phase in ("reference", "eager", "compiled", "ceiling", "one by one", "alone", "concurrent", "cold load"):
        assert phase in table, phase
    assert "n/a" in table and "MISS" not in table


def test_quick_mode_runs_sdxl_eager(tmp_path):
    """SDXL's paths (two text encoders, pooled embeds and time ids as added rows, two-block residuals) through
    every phase: the reference loop, the eager trainer, the ceilings and sampling; eager only, to stay cheap
    (the compiled paths are the family-independent ones the SD 1.x run above takes)."""
    out = tmp_path / "suite.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--device", "cpu", "--model", "tiny-sdxl",
                          "--quick", "--no-compile", "--pack", "2", "--json", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(out.read_text())
    training, sampling = results["training"], results["sampling"]
    assert set(training) >= {"reference", "eager", "ceiling"} and "compiled" not in training
    assert training["eager"]["pack"] == 2 and training["ceiling"]["batch"] == 4
    assert sampling["max_abs_difference_batched_vs_alone"] < 1e-3 and results["cold_load"]["loads"] == 8
    assert results["environment"]["family"] == "sdxl" and results["environment"]["resolution"] == 64
    for key, value in results["ratios"].items():
        assert math.isfinite(value) and value > 0, key
    assert set(results["targets"]["verdicts"].values()) == {"n/a"}
    table = run.stdout
    for phase in ("reference", "eager", "ceiling", "one by one", "alone", "concurrent", "cold load"):
        assert phase in table, phase
    assert "model tiny-sdxl at 64 px" in table
    # The targets are SD1.5's: shown beside SDXL's ratios, never judged.
    assert "n/a (SD1.5 targets)" in table and "MISS" not in table and " ok" not in table
