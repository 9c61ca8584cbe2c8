"""Training throughput: the reference recipe as the reference code runs it vs ResidualTrainer.

Measures images/s (training rows through the UNet per second) and concepts/hour for three phases
on the same concepts, in one run:

  baseline  fp32 weights, one concept at a time, batch 2; every step loads and flips pixels,
            VAE-encodes them, runs the whole text encoder with the residual, UNet, loss, AdamW.
            Written out below so that it is the thing we compare against.
  ours      ResidualTrainer(base, pack=K).train(concepts): frozen weights in bf16 on CUDA (fp32 on
            CPU), K concepts packed into one UNet batch, cached VAE latents and pre-patch states.
  ceiling   a bare UNet forward+backward at our batch (K x 2) and dtype, where only the
            conditioning requires grad: what ours would reach if everything but the UNet were free.

Run (CPU, tiny model, well under a minute):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_throughput.py
Run (GPU, SD v1.5 shapes with random weights):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_throughput.py --model sd15-random --device cuda
Add --json results.json to keep the numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # built-in models only; never reach for the network

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from catversion.conditioning import Conditioner, added_cond_kwargs, added_width, time_ids
from catversion.images import decode_image, to_tensor
from catversion.limits import BUILTIN_MODELS
from catversion.models import BaseModel, load_base_model
from catversion.samples import SAMPLE_CONCEPTS, concept_jpegs
from catversion.training import Concept, ResidualTrainer, TrainConfig

# The reference recipe (docs/method.md); the baseline hard-codes it, ours gets it from TrainConfig.
BATCH_PER_CONCEPT = 2
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 0.01
FLIP_P = 0.5
# Steps run before each timer starts: first calls pay for allocator growth, kernel selection, lazy init.
WARMUP_STEPS = 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=BUILTIN_MODELS, default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--concepts", type=int, default=8, help="concepts trained by each of baseline and ours")
    parser.add_argument("--pack", type=int, default=8, help="concepts per UNet batch for ours")
    parser.add_argument("--steps", type=int, default=30, help="steps per concept for ours (and concepts/hour)")
    parser.add_argument("--baseline-steps", type=int, default=None,
                        help="steps per concept for the baseline (default: --steps); it is per-step, so fewer is fair")
    parser.add_argument("--images-per-concept", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    args.baseline_steps = args.steps if args.baseline_steps is None else args.baseline_steps
    for name in ("concepts", "pack", "steps", "baseline_steps", "images_per_concept"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu")
    return args


def make_concepts(n: int, steps: int, resolution: int, images_per_concept: int = 4, seed: int = 0) -> list[Concept]:
    """N concepts: the built-in sample objects in turn, each round with a new photo seed."""
    ids = list(SAMPLE_CONCEPTS)
    concepts = []
    for i in range(n):
        sample = SAMPLE_CONCEPTS[ids[i % len(ids)]]
        photo_seed = seed + i // len(ids)
        images = concept_jpegs(sample.concept_id, images_per_concept, resolution, photo_seed)
        config = TrainConfig(steps=steps, learning_rate=LEARNING_RATE, batch_size=BATCH_PER_CONCEPT,
                             seed=seed + i, weight_decay=WEIGHT_DECAY, flip_p=FLIP_P, save_steps=())
        concepts.append(Concept(f"{sample.concept_id}-{photo_seed}", images, sample.class_word, config=config))
    return concepts


class Timer:
    """Wall time of a block, with the device drained at both ends so queued kernels count where they ran."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> "Timer":
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.start


def start_phase(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    # Includes the phase's frozen weights: they are resident while it trains.
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ---- baseline: the reference recipe, one concept at a time, nothing cached ---------------------
def baseline_train_concept(base: BaseModel, encoder: Conditioner, scheduler: DDPMScheduler,
                           concept: Concept, steps: int, seed: int) -> float:
    """Train one residual the way the reference loop does; returns the last step's loss.

    Any family: ``encoder`` (a Conditioner of ``base``) runs every text encoder the UNet reads, whole, every
    step; SDXL's UNet also gets the pooled embeds and the time ids (each photo's original size, no crop, the
    native size as target, as ResidualTrainer and diffusers' SDXL training scripts compute them); a
    v-prediction model's target is the velocity, as ResidualTrainer's."""
    device = base.device
    torch.manual_seed(seed)
    # Decoded once and kept as CPU tensors: kinder to the baseline than the reference's per-step file reads.
    images = [decode_image(data) for data in concept.images]
    pixels = torch.stack([to_tensor(image, base.resolution) for image in images])
    target_size = (base.resolution, base.resolution)
    times = torch.stack([time_ids(target_size, original=(image.height, image.width)) for image in images])
    ids = encoder.tokenize([concept.prompt] * BATCH_PER_CONCEPT)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    residual = torch.nn.Parameter(torch.randn(encoder.residual_shape, device=device))  # N(0, 1) init
    optimizer = torch.optim.AdamW([residual], lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    loss = torch.zeros(())
    for _ in range(steps):
        index = torch.randint(len(pixels), (BATCH_PER_CONCEPT,))
        batch = pixels[index]
        flip = torch.rand(BATCH_PER_CONCEPT) < FLIP_P
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch).to(device)
        with torch.no_grad():
            latents = base.vae.encode(batch).latent_dist.sample() * base.vae_scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH_PER_CONCEPT,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        conditioning = encoder.encode(ids, [residual] * BATCH_PER_CONCEPT)  # the whole text encoder(s), every step
        added = conditioning.added(times[index].to(device))  # None but for SDXL
        pred = base.unet(noisy, timesteps, encoder_hidden_states=conditioning.embeds, **added_cond_kwargs(added)).sample
        target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
        loss = F.mse_loss(pred, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def run_baseline(base: BaseModel, concepts: list[Concept], steps: int, seed: int) -> dict:
    encoder = Conditioner(base)
    scheduler = DDPMScheduler.from_config(base.scheduler_config)
    baseline_train_concept(base, encoder, scheduler, concepts[0], WARMUP_STEPS, seed)
    start_phase(base.device)
    with Timer(base.device) as timer:
        losses = [baseline_train_concept(base, encoder, scheduler, concept, steps, seed + i)
                  for i, concept in enumerate(concepts)]
    rows = len(concepts) * steps * BATCH_PER_CONCEPT
    return {"seconds": timer.seconds, "rows": rows, "images_per_s": rows / timer.seconds,
            "batch": BATCH_PER_CONCEPT, "steps_per_concept": steps, "dtype": str(base.dtype).removeprefix("torch."),
            "peak_memory_gib": peak_memory_gib(base.device), "last_losses": losses}


# ---- ours: the library's packed, cached trainer -------------------------------------------------
def run_ours(base: BaseModel, concepts: list[Concept], pack: int) -> dict:
    warmup = [Concept(c.concept_id, c.images, c.class_word, config=TrainConfig(steps=WARMUP_STEPS, save_steps=()))
              for c in concepts[:pack]]
    ResidualTrainer(base, pack=pack).train(warmup)
    start_phase(base.device)
    # A fresh trainer, so the timed run pays for its own caches (latents, pre-patch states) as a user's would.
    with Timer(base.device) as timer:
        results = ResidualTrainer(base, pack=pack).train(concepts)
    failed = [f"{r.concept_id}: {r.error}" for r in results if r.status != "ok"]
    if failed:
        # Still reported (rows count only the steps that ran), but a pack that shrank early is not
        # the steady state this benchmark means to measure.
        print("WARNING ours: concepts failed, so packs ran short: " + "; ".join(failed), file=sys.stderr)
    rows = sum(r.steps for r in results) * BATCH_PER_CONCEPT
    return {"seconds": timer.seconds, "rows": rows, "images_per_s": rows / timer.seconds,
            "batch": min(pack, len(concepts)) * BATCH_PER_CONCEPT, "steps_per_concept": concepts[0].config.steps,
            "dtype": str(base.dtype).removeprefix("torch."), "peak_memory_gib": peak_memory_gib(base.device),
            "final_losses": [r.final_loss for r in results], "failed": failed}


# ---- ceiling: the UNet alone at our batch and dtype ---------------------------------------------
def run_ceiling(base: BaseModel, batch: int, steps: int, seed: int, unet=None) -> dict:
    """``unet``: the module to time (default: the base model's own, eager); channels-last inputs on CUDA."""
    device = base.device
    unet = base.unet if unet is None else unet
    generator = torch.Generator(device=device).manual_seed(seed)
    latent = base.resolution // base.vae_scale_factor
    train_timesteps = base.scheduler_config["num_train_timesteps"]
    shape = (batch, base.unet.config.in_channels, latent, latent)
    noisy = torch.randn(shape, generator=generator, device=device, dtype=base.unet.dtype)
    if device.type == "cuda":
        noisy = noisy.contiguous(memory_format=torch.channels_last)  # as ResidualTrainer feeds it
    noise = torch.randn(shape, generator=generator, device=device)
    cond = torch.randn((batch, base.tokenizer.model_max_length, base.unet.config.cross_attention_dim),
                       generator=generator, device=device, dtype=base.unet.dtype, requires_grad=True)
    # SDXL: zero added rows (pooled embeds + time ids), requiring grad as ours do (the pooled embeds come from
    # the residual), so a compiled trainer's graph fits them; other families take none.
    width = added_width(base.unet)
    added = (torch.zeros((batch, width), device=device, dtype=base.unet.dtype, requires_grad=True) if width
             else None)

    def step() -> None:
        timesteps = torch.randint(0, train_timesteps, (batch,), generator=generator, device=device)
        pred = unet(noisy, timesteps, encoder_hidden_states=cond, **added_cond_kwargs(added)).sample
        # The same loss shape as ours, so backward starts from the same place.
        (pred.float() - noise).square().mean().backward()
        cond.grad = None
        if added is not None:
            added.grad = None

    for _ in range(WARMUP_STEPS):
        step()
    start_phase(device)
    with Timer(device) as timer:
        for _ in range(steps):
            step()
    rows = steps * batch
    return {"seconds": timer.seconds, "rows": rows, "images_per_s": rows / timer.seconds, "batch": batch,
            "dtype": str(base.unet.dtype).removeprefix("torch."), "peak_memory_gib": peak_memory_gib(device)}


def concepts_per_hour(images_per_s: float, steps: int) -> float:
    # Normalised to the same --steps for both, so baseline and ours price the same amount of training.
    return 3600 * images_per_s / (steps * BATCH_PER_CONCEPT)


def report(args: argparse.Namespace, device: torch.device, resolution: int, results: dict) -> None:
    baseline, ours, ceiling = results["baseline"], results["ours"], results["ceiling"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nmodel {args.model} at {resolution} px on {name}; torch {torch.__version__}")
    print(f"{args.concepts} concepts x {args.images_per_concept} images; ours: {args.steps} steps/concept, "
          f"pack {args.pack}; baseline: {args.baseline_steps} steps/concept; warm-up of {WARMUP_STEPS} steps excluded")
    if args.baseline_steps != args.steps:
        print(f"(baseline ran {args.baseline_steps} steps/concept instead of {args.steps}: throughput is per step, "
              f"and concepts/hour below is normalised to {args.steps} steps for both)")
    memory = device.type == "cuda"
    header = f"{'phase':<10}{'dtype':>10}{'batch':>7}{'images/s':>12}{'concepts/h':>13}{'seconds':>10}"
    print("\n" + header + (f"{'peak GiB':>10}" if memory else ""))
    print("-" * (len(header) + (10 if memory else 0)))
    for phase, row in (("baseline", baseline), ("ours", ours), ("ceiling", ceiling)):
        per_hour = f"{row['concepts_per_hour']:13.1f}" if "concepts_per_hour" in row else f"{'-':>13}"
        line = f"{phase:<10}{row['dtype']:>10}{row['batch']:>7}{row['images_per_s']:12.2f}{per_hour}"
        print(line + f"{row['seconds']:10.2f}" + (f"{row['peak_memory_gib']:10.2f}" if memory else ""))
    print(f"\nours / baseline:  {results['speedup']:.2f}x images/s (and concepts/hour)")
    print(f"ours / ceiling:   {results['fraction_of_ceiling']:.1%} of a bare UNet forward+backward at batch "
          f"{ceiling['batch']} ({ceiling['dtype']})")


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    # Baseline weights are fp32 as in the reference code; ours uses load_base_model's default dtype.
    baseline_base = load_base_model(args.model, device, dtype=torch.float32)
    concepts = make_concepts(args.concepts, args.steps, baseline_base.resolution, args.images_per_concept, args.seed)
    baseline = run_baseline(baseline_base, concepts, args.baseline_steps, args.seed)

    ours_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if ours_dtype != baseline_base.dtype:
        # One set of weights on the device at a time, so each phase's peak memory is its own.
        del baseline_base
        gc.collect()
        ours_base = load_base_model(args.model, device, dtype=None)
    else:
        ours_base = baseline_base
    ours = run_ours(ours_base, concepts, args.pack)
    ceiling = run_ceiling(ours_base, ours["batch"], args.steps, args.seed)

    baseline["concepts_per_hour"] = concepts_per_hour(baseline["images_per_s"], args.steps)
    ours["concepts_per_hour"] = concepts_per_hour(ours["images_per_s"], args.steps)
    results = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "resolution": ours_base.resolution, "warmup_steps": WARMUP_STEPS},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                        "cpu_threads": torch.get_num_threads()},
        "baseline": baseline, "ours": ours, "ceiling": ceiling,
        "speedup": ours["images_per_s"] / baseline["images_per_s"],
        "fraction_of_ceiling": ours["images_per_s"] / ceiling["images_per_s"],
    }
    report(args, device, ours_base.resolution, results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
