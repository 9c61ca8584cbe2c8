"""One GPU benchmark: training and sampling against the reference and the bare-UNet ceiling, one table.

Run on a GPU (SD v1.5's shapes with random weights, nothing to download; sized for under 6 minutes on an H100):

    PYTHONPATH=. python benchmarks/gpu_suite.py --json gpu_suite.json
    PYTHONPATH=. python benchmarks/gpu_suite.py --no-compile          # a quicker pass, eager only
    PYTHONPATH=. python benchmarks/gpu_suite.py --model sdxl-random   # or sd2-random: the same phases and table

Every model runs at its native size (sd2-random: 768 px, v-prediction; sdxl-random: 1024 px, two text
encoders, pooled embeds and time ids). The targets are SD1.5's: other families' ratios are shown beside
them, marked n/a (benchmarks/README.md, "GPU suite").

It imports only the library (torch, transformers, diffusers, safetensors, PIL, numpy): no Ray,
boto3 or moto, so it runs on a bare GPU machine. If that machine has no diffusers, bring its wheel
(see benchmarks/README.md, "GPU suite"). The test suite runs the CPU quick mode, which takes every
code path the GPU run takes that can run on a CPU, torch.compile included:

    PYTHONPATH=. python benchmarks/gpu_suite.py --device cpu --model tiny --quick

Phases (each on the same base model in one process, so every ratio compares like with like):

training (1000-step concepts at batch 2, the reference recipe):
  reference   the authors' loop: fp32, batch 2, VAE encode and the whole text encoder every step
  eager       ResidualTrainer(pack=P): cached latents and lower text layers, one fused AdamW, bf16 UNet
  compiled    the same with compile=True (static shapes, padded row buckets); compile time reported
  ceiling     the compiled bare UNet forward+backward to the conditioning at the same batch (P x 2)
sampling (DDIM, 30 steps, guidance 7.5, native size):
  reference   fp32, one image at a time (as the reference inference script)
  one-by-one  today's server without batching: bf16, eager, one request at a time
  alone       one request through the step-level scheduler (compiled UNet, CUDA graphs): p50 latency
  concurrent  16 requests for 16 different concepts arriving over ~0.3 s through the same scheduler
              (--quick: 4, with the buckets up to 8 rows, so that the CPU compiles fewer of them)
  ceiling     the compiled UNet at the same batch (CFG: 32 rows) for 30 steps plus a batched VAE decode
residual cold load: read, verify, check and move to the device one residual never seen (p50)

Throughput phases are timed in their steady state: warm-up and compilation are reported apart.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from catversion.generation import GenerationRequest, ImageGenerator
from catversion.limits import BUILTIN_MODELS
from catversion.models import BaseModel, load_base_model
from catversion.residual import Residual
from catversion.stepbatch import Job, StepBatcher
from catversion.unetrun import buckets_for
from catversion.training import Concept, ResidualTrainer
from train_throughput import (BATCH_PER_CONCEPT as BATCH, Timer, baseline_train_concept, make_concepts,
                              peak_memory_gib, run_ceiling, start_phase)

RECIPE_STEPS = 1000  # a concept's training steps in the reference recipe (concepts/GPU-hour is per these)
GUIDANCE = 7.5
ARRIVAL_GAP_S = 0.02  # mean gap between the concurrent requests' arrivals (exponential)
TARGETS = {  # the targets for sd15-random at 512 px on one H100/H200
    "training_vs_reference": 25.0, "training_vs_ceiling": 0.90, "concepts_per_gpu_hour": 300.0,
    "alone_p50_s": 0.5, "concurrent_vs_ceiling": 0.90, "concurrent_vs_one_by_one": 3.5,
    "concurrent_vs_reference": 10.0, "cold_load_p50_ms": 50.0,
}
TARGETS_FAMILY = "sd1"  # the targets judge SD 1.x models only; other families' rows show them for reference


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if cuda else "cpu")
    parser.add_argument("--model", default="sd15-random",
                        help=f"a built-in ({', '.join(BUILTIN_MODELS)}; default sd15-random) or a diffusers folder; "
                             "each runs at its native size (sd2-random 768 px, sdxl-random 1024 px)")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (the test suite's mode)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile: eager phases only")
    parser.add_argument("--pack", type=int, help="concepts per training pack (default: the trainer's choice)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"),
                        help="UNet/VAE precision of ours (default: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--residual-prefix", metavar="URI",
                        help="where to write and cold-load the test residuals: a folder, file:// or s3:// prefix "
                             "(default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu")
    if args.pack is not None and args.pack < 1:
        parser.error("--pack must be >= 1")
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    sizes = {  # steps of each measurement
        True: dict(train_steps=30, reference_steps=4, ceiling_steps=4, sample_steps=5, repeats=2, loads=8,
                   concurrent=4),
        False: dict(train_steps=60, reference_steps=20, ceiling_steps=20, sample_steps=30, repeats=5, loads=32,
                    concurrent=16),
    }
    vars(args).update(sizes[args.quick])
    return args


class Clock:
    """Seconds since the suite started, for the phase log."""

    def __init__(self):
        self.start = time.perf_counter()

    def log(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f} s] {text}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- training ----------------------------------------------------------------------------------
def train_steady(trainer: ResidualTrainer, concepts: list[Concept]) -> dict:
    """Train one full pack; throughput between the first and the last progress report (each one follows
    a host sync), so preparing the concepts and compiling stay outside the window."""
    marks: list[tuple[float, int]] = []
    results = trainer.train(concepts, on_progress=lambda p: marks.append((time.perf_counter(), p.steps_done)))
    failed = [f"{r.concept_id}: {r.error}" for r in results if r.status != "ok"]
    if failed:
        raise RuntimeError("training failed: " + "; ".join(failed))
    (t0, s0), (t1, s1) = marks[0], marks[-1]
    rows = (s1 - s0) * BATCH
    return {"images_per_s": rows / (t1 - t0), "seconds": t1 - t0, "batch": len(concepts) * BATCH,
            "residuals": {r.concept_id: torch.cat([b.tensor.flatten() for b in r.residual.blocks]) for r in results}}


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (a recompile counts)."""
    return counters["stats"]["unique_graphs"]


def per_hour(images_per_s: float) -> float:
    return 3600 * images_per_s / (RECIPE_STEPS * BATCH)


def run_training(args, reference_base: BaseModel, base: BaseModel, clock: Clock) -> dict:
    from diffusers import DDPMScheduler

    device, out = base.device, {}
    concept = make_concepts(1, args.reference_steps, base.resolution)[0]
    encoder = ResidualTrainer(reference_base, pack=1).encoder
    scheduler = DDPMScheduler.from_config(reference_base.scheduler_config)
    baseline_train_concept(reference_base, encoder, scheduler, concept, 2, 0)  # warm-up
    start_phase(device)
    with Timer(device) as timer:
        baseline_train_concept(reference_base, encoder, scheduler, concept, args.reference_steps, 0)
    out["reference"] = {"images_per_s": args.reference_steps * BATCH / timer.seconds, "batch": BATCH,
                        "precision": reference_base.precision, "peak_memory_gib": peak_memory_gib(device)}
    clock.log(f"training reference: {out['reference']['images_per_s']:.2f} images/s")

    start_phase(device)
    eager = ResidualTrainer(base, pack=args.pack)
    pack = eager.pack
    concepts = make_concepts(pack, args.train_steps, base.resolution)
    row = train_steady(eager, concepts)
    eager_residuals = row.pop("residuals")
    out["eager"] = {**row, "precision": base.precision, "pack": pack, "peak_memory_gib": peak_memory_gib(device)}
    clock.log(f"training eager, pack {pack}: {row['images_per_s']:.2f} images/s")

    timed = eager
    if not args.no_compile:
        start_phase(device)
        compiled = ResidualTrainer(base, pack=pack, compile=True)
        row = train_steady(compiled, concepts)
        residuals = row.pop("residuals")
        difference = max(float((residuals[k] - eager_residuals[k]).abs().max()) for k in residuals)
        out["compiled"] = {**row, "precision": base.precision, "pack": pack, "compile_s": compiled.compile_seconds,
                           "max_abs_difference_from_eager": difference, "peak_memory_gib": peak_memory_gib(device)}
        clock.log(f"training compiled: {row['images_per_s']:.2f} images/s, compiled in {compiled.compile_seconds:.1f} s")
        timed = compiled
    graphs = compiled_graphs()
    ceiling = run_ceiling(base, pack * BATCH, args.ceiling_steps, 0, unet=timed.unet)
    out["ceiling"] = {"images_per_s": ceiling["images_per_s"], "batch": ceiling["batch"], "precision": base.precision,
                      "compiled": timed.compiled, "peak_memory_gib": ceiling["peak_memory_gib"],
                      "new_compiles": compiled_graphs() - graphs}  # 0: the very graphs the trainer ran
    clock.log(f"training ceiling: {ceiling['images_per_s']:.2f} images/s")
    best = out.get("compiled", out["eager"])
    for row in out.values():
        row["concepts_per_gpu_hour"] = per_hour(row["images_per_s"])
    out["ratios"] = {"training_vs_reference": best["images_per_s"] / out["reference"]["images_per_s"],
                     "training_vs_ceiling": best["images_per_s"] / out["ceiling"]["images_per_s"],
                     "concepts_per_gpu_hour": best["concepts_per_gpu_hour"]}
    return out


# ---- sampling ----------------------------------------------------------------------------------
def random_residuals(base: BaseModel, generator: ImageGenerator, n: int) -> list[Residual]:
    """``n`` residuals of the base model's shape: one block per text encoder (SDXL: two)."""
    g = torch.Generator().manual_seed(1)
    shape = generator.encoder.residual_shape
    meta = {"base_model": base.model_id, "base_fingerprint": base.fingerprint, "class_word": "teapot"}
    return [generator.encoder.residual(torch.randn(shape, generator=g) * 0.5, 1.0, {**meta, "concept_id": f"c{i}"})
            for i in range(n)]


def one_by_one(generator: ImageGenerator, requests: list[GenerationRequest], steps: int) -> float:
    """Images/s making one image per call (after one warm-up call)."""
    generator.generate_tensors(requests[:1], steps=2, guidance=GUIDANCE)
    with Timer(generator.base.device) as timer:
        for request in requests:
            generator.generate_tensors([request], steps=steps, guidance=GUIDANCE)
    return len(requests) / timer.seconds


def serve_arrivals(batcher: StepBatcher, jobs: list[Job], arrivals: list[float]) -> tuple[list[float], float]:
    """Submit each job at its arrival time while stepping on this thread; (latencies, makespan)."""
    start = time.perf_counter()
    done: dict[int, float] = {}
    submitted: dict[int, float] = {}
    errors: list[BaseException] = []
    pending = sorted(range(len(jobs)), key=lambda i: arrivals[i])
    while len(done) < len(jobs):
        if errors:
            raise errors[0]
        now = time.perf_counter() - start
        while pending and arrivals[pending[0]] <= now:
            i = pending.pop(0)
            submitted[i] = time.perf_counter()
            batcher.submit(jobs[i], on_done=lambda _image, i=i: done.__setitem__(i, time.perf_counter()),
                           on_error=errors.append)
        if not batcher.step() and pending:
            time.sleep(max(0.0, min(0.005, arrivals[pending[0]] - now)))
    return [done[i] - submitted[i] for i in range(len(jobs))], max(done.values()) - start


def run_sampling(args, reference_base: BaseModel, base: BaseModel, clock: Clock) -> dict:
    device, steps, out = base.device, args.sample_steps, {}
    reference = ImageGenerator(reference_base)
    residuals = random_residuals(base, reference, args.concurrent)
    requests = [GenerationRequest("a photo of a teapot", r, seed=i) for i, r in enumerate(residuals)]
    count = 2 if args.quick else 3
    start_phase(device)
    out["reference"] = {"images_per_s": one_by_one(reference, requests[:count], steps),
                        "precision": reference_base.precision, "peak_memory_gib": peak_memory_gib(device)}
    clock.log(f"sampling reference: {out['reference']['images_per_s']:.2f} images/s")
    start_phase(device)
    eager = ImageGenerator(base)
    out["one_by_one"] = {"images_per_s": one_by_one(eager, requests[:count + 1], steps), "precision": base.precision,
                         "peak_memory_gib": peak_memory_gib(device)}
    clock.log(f"sampling one at a time, eager: {out['one_by_one']['images_per_s']:.2f} images/s")

    start_phase(device)
    # Buckets up to the concurrency (the default ones for 16): the quick mode compiles fewer of them.
    generator = ImageGenerator(base, compile=not args.no_compile, buckets=buckets_for(args.concurrent))
    batcher = StepBatcher(generator, max_batch_size=args.concurrent)
    warm = batcher.warm_up()
    out["warm_up_s"] = warm
    graphs = compiled_graphs()
    clock.log(f"sampling warm-up (compile and CUDA graphs for buckets {list(generator.unet_runner.buckets)}): "
              f"{warm:.1f} s")
    jobs = [Job(r.prompt, r.residual, r.seed, steps=steps, guidance=GUIDANCE) for r in requests]
    alone = [serve_arrivals(batcher, [job], [0.0])[0][0] for job in jobs[:args.repeats]]
    out["alone"] = {"p50_s": statistics.median(alone), "latencies_s": alone}
    clock.log(f"sampling one request alone: p50 {out['alone']['p50_s']:.3f} s")
    rng = random.Random(0)
    gaps = [rng.expovariate(1 / ARRIVAL_GAP_S) for _ in jobs]
    arrivals = [sum(gaps[:i]) for i in range(len(jobs))]
    runs = [serve_arrivals(batcher, jobs, arrivals) for _ in range(2)]
    latencies, makespan = min(runs, key=lambda run: run[1])
    out["concurrent"] = {"images_per_s": len(jobs) / makespan, "requests": len(jobs),
                         "p50_s": statistics.median(latencies), "peak_memory_gib": peak_memory_gib(device)}
    clock.log(f"sampling {len(jobs)} concurrent requests: {out['concurrent']['images_per_s']:.2f} images/s")
    # Correctness: an image made in the batcher equals the same request made alone by generate_tensors.
    alone_image = eager.generate_tensors([requests[0]], steps=steps, guidance=GUIDANCE)[0]
    batched = batcher.generate(jobs[:4])[0]
    out["max_abs_difference_batched_vs_alone"] = float((batched - alone_image).abs().max())

    out["ceiling"] = {"images_per_s": sampling_ceiling(generator, len(jobs), steps), "batch": len(jobs),
                      "compiled": generator.unet_runner.compiled, "peak_memory_gib": peak_memory_gib(device)}
    # 0 when the warm-up covered every call serving made (a compile mid-serving stalls every request).
    out["compiles_after_warm_up"] = compiled_graphs() - graphs
    clock.log(f"sampling ceiling: {out['ceiling']['images_per_s']:.2f} images/s")
    best = out["concurrent"]["images_per_s"]
    out["ratios"] = {"alone_p50_s": out["alone"]["p50_s"],
                     "concurrent_vs_ceiling": best / out["ceiling"]["images_per_s"],
                     "concurrent_vs_one_by_one": best / out["one_by_one"]["images_per_s"],
                     "concurrent_vs_reference": best / out["reference"]["images_per_s"]}
    return out


def sampling_ceiling(generator: ImageGenerator, batch: int, steps: int) -> float:
    """Images/s of the bare UNet (as the batcher calls it: same runner, same buckets) with CFG rows for
    ``steps`` steps, plus one batched VAE decode; nothing else (no text encoder, no scheduler)."""
    base = generator.base
    unet = base.unet
    side = base.resolution // base.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2 * batch, unet.config.in_channels, side, side, generator=g).to(base.device)
    embeddings = torch.randn(2 * batch, base.tokenizer.model_max_length, unet.config.cross_attention_dim,
                             generator=g).to(base.device)
    timesteps = torch.full((2 * batch,), 500, dtype=torch.long, device=base.device)
    width = generator.unet_runner.added_width  # SDXL: zero pooled embeds + time ids rows; 0: none
    added = torch.zeros((2 * batch, width), device=base.device) if width else None

    def images() -> None:
        for _ in range(steps):
            eps = generator.unet_runner(latents, timesteps, embeddings, added)
        with torch.no_grad():
            base.vae.decode((eps[:batch] / base.vae_scaling_factor).to(base.vae.dtype)).sample.float().cpu()

    images()
    with Timer(base.device) as timer:
        images()
    return batch / timer.seconds


# ---- residual cold load ------------------------------------------------------------------------
def run_cold_load(args, base: BaseModel, clock: Clock) -> dict:
    from catversion import storage

    generator = ImageGenerator(base)
    residuals = random_residuals(base, generator, args.loads)
    with tempfile.TemporaryDirectory() as folder:
        prefix = (args.residual_prefix or folder).rstrip("/")
        uris = [f"{prefix}/bench-{i}.safetensors" for i in range(len(residuals))]
        for uri, residual in zip(uris, residuals):
            storage.write_bytes(uri, residual.to_bytes())
        times = []
        for uri in uris:
            sync(base.device)
            started = time.perf_counter()
            residual = Residual.load(storage.read_bytes(uri), name=uri)
            generator.check_request(GenerationRequest("a teapot", residual))
            for block in residual.blocks:  # SDXL: two
                block.tensor.to(base.device)
            sync(base.device)
            times.append(time.perf_counter() - started)
        for uri in uris:
            if args.residual_prefix:
                storage.delete(uri)
    out = {"p50_ms": 1000 * statistics.median(times), "max_ms": 1000 * max(times), "loads": len(times),
           "from": "given prefix" if args.residual_prefix else "local folder"}
    clock.log(f"residual cold load: p50 {out['p50_ms']:.1f} ms")
    return out


# ---- report ------------------------------------------------------------------------------------
def judge(ratios: dict, config: dict, family: str) -> dict:
    """Each ratio's verdict against TARGETS: "ok" or "MISS" for an SD 1.x model in a full GPU run, else "n/a"
    (the targets are SD1.5's at 512 px on one H100/H200: a CPU or quick run, or another family, is not judged)."""
    judged = config["device"] == "cuda" and not config["quick"] and family == TARGETS_FAMILY
    verdicts = {}
    for key, value in ratios.items():
        target = TARGETS[key]
        met = value <= target if key.endswith(("_s", "_ms")) else value >= target
        verdicts[key] = ("ok" if met else "MISS") if judged else "n/a"
    return verdicts


def report(results: dict) -> None:
    env, train, sample = results["environment"], results["training"], results["sampling"]
    print(f"\n{env['device_name']} · torch {env['torch']} · model {env['model']} at {env['resolution']} px · "
          f"ours {env['precision']} (text encoder fp32){' · quick mode' if results['config']['quick'] else ''}")
    print(f"\n{'training':<22}{'batch':>6}{'images/s':>11}{'concepts/GPU-h':>16}{'peak GiB':>10}")
    for name in ("reference", "eager", "compiled", "ceiling"):
        if name in train:
            row = train[name]
            peak = f"{row['peak_memory_gib']:10.1f}" if row.get("peak_memory_gib") is not None else f"{'-':>10}"
            print(f"  {name:<20}{row['batch']:>6}{row['images_per_s']:11.2f}{row['concepts_per_gpu_hour']:16.1f}{peak}")
    if "compiled" in train:
        print(f"  compile {train['compiled']['compile_s']:.1f} s; compiled vs eager residuals differ by at most "
              f"{train['compiled']['max_abs_difference_from_eager']:.2e}; ceiling recompiled "
              f"{train['ceiling']['new_compiles']} time(s)")
    print(f"\n{'sampling':<22}{'images/s':>11}{'p50 s':>9}")
    for name in ("reference", "one_by_one", "alone", "concurrent", "ceiling"):
        row = sample[name]
        rate = f"{row['images_per_s']:11.2f}" if "images_per_s" in row else f"{'-':>11}"
        p50 = f"{row['p50_s']:9.3f}" if "p50_s" in row else f"{'-':>9}"
        print(f"  {name.replace('_', ' '):<20}{rate}{p50}")
    print(f"  warm-up {sample['warm_up_s']:.1f} s, compiles after it: {sample['compiles_after_warm_up']}; batched vs "
          f"alone image difference {sample['max_abs_difference_batched_vs_alone']:.2e}")
    print(f"\nresidual cold load p50 {results['cold_load']['p50_ms']:.1f} ms ({results['cold_load']['from']})")
    targets = results["targets"]
    print(f"\n{'ratio':<28}{'value':>10}{'target':>10}{'':>4}")
    for key, value in results["ratios"].items():
        target = targets["values"][key]
        lower_is_better = key.endswith(("_s", "_ms"))
        print(f"  {key:<26}{value:10.2f}{('<= ' if lower_is_better else '>= ') + f'{target:g}':>10}  "
              f"{targets['verdicts'][key]}")
    if env["family"] != TARGETS_FAMILY:
        print(f"  n/a (SD1.5 targets): the targets are {targets['for']}; for {env['model']} ({env['family']}, "
              f"{env['resolution']} px) they are shown for reference, not judged")
    print(f"\ntotal {results['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    clock = Clock()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
    # The training and the sampling compile share the UNet's code object, and so Dynamo's recompile limit.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    reference_base = load_base_model(args.model, device, precision="fp32")
    base = reference_base if args.precision == "fp32" else load_base_model(args.model, device, precision=args.precision)
    clock.log(f"models ready: {args.model} on {device} (reference fp32, ours {base.precision})")
    training = run_training(args, reference_base, base, clock)
    sampling = run_sampling(args, reference_base, base, clock)
    cold = run_cold_load(args, base, clock)
    results = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({torch.get_num_threads()} threads)",
            "torch": torch.__version__, "python": platform.python_version(), "model": args.model,
            "resolution": base.resolution, "precision": base.precision, "family": base.family.name,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        },
        "training": training, "sampling": sampling, "cold_load": cold,
        "ratios": {**training["ratios"], **sampling["ratios"], "cold_load_p50_ms": cold["p50_ms"]},
        "seconds": time.perf_counter() - clock.start,
    }
    # The targets are SD1.5's (sd15-random at 512 px): judged for SD 1.x models only, "n/a" for the others.
    results["targets"] = {"for": "SD1.5's (sd15-random at 512 px, one H100/H200)", "values": TARGETS,
                          "verdicts": judge(results["ratios"], results["config"], base.family.name)}
    report(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
