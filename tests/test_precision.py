"""The precision policy and the training speed paths that must not change results.

- the text encoder and the residual path run in float32 whatever the UNet/VAE precision;
- training is the reference recipe's computation (VAE-encode, whole text encoder, UNet, MSE,
  one torch.optim.AdamW per concept, every step), compared in float64 (tests/exactness.py);
- the one fused AdamW over a pack equals one optimizer per concept;
- padding the UNet batch to a static-shape bucket never changes a concept's result;
- the precision is recorded in the residual and is part of the training fingerprint.
"""

import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from catversion.conditioning import Conditioner
from catversion.generation import GenerationRequest, ImageGenerator
from catversion.images import decode_image, to_tensor
from catversion.models import load_base_model, resolve_precision
from catversion.training import Concept, ResidualTrainer, TrainConfig, training_fingerprint, training_target
from exactness import (
    assert_float64_close,
    assert_same_float32_rounding,
    assert_same_training,
    float64_model,
    train_saving_every_state,
)
from helpers import png_bytes


@pytest.fixture(scope="module")
def fp32():
    return load_base_model("tiny", precision="fp32")


@pytest.fixture(scope="module")
def bf16():
    return load_base_model("tiny", precision="bf16")


@pytest.fixture(scope="module")
def fp64():
    return float64_model()


def teapot(steps=5, **config):
    return Concept("teapot", [png_bytes(1), png_bytes(2), png_bytes(3)], "teapot",
                   config=TrainConfig(steps=steps, seed=4, **config))


def test_the_text_encoder_is_float32_at_every_precision(fp32, bf16):
    assert fp32.precision == "fp32" and bf16.precision == "bf16"
    assert bf16.unet.dtype == bf16.vae.dtype == torch.bfloat16
    assert bf16.text_encoder.dtype == torch.float32
    assert fp32.fingerprint == bf16.fingerprint  # the same text encoder: residuals move between precisions
    residual = torch.randn(3, 2, 1, 32)
    requests = [GenerationRequest("a teapot", residual), GenerationRequest("a teapot")]
    cond32, uncond32 = ImageGenerator(fp32).encode(requests)
    cond16, uncond16 = ImageGenerator(bf16).encode(requests)
    assert cond16.dtype == uncond16.dtype == torch.float32
    assert torch.equal(cond32, cond16) and torch.equal(uncond32, uncond16)


def test_precision_names():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("fp16", "cpu") == "fp16"
    with pytest.raises(ValueError, match="precision 'half' is not one of auto, fp32, bf16, fp16"):
        resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match="not a supported precision"):
        load_base_model("tiny", dtype=torch.float64, components=("text_encoder",))
    with pytest.raises(ValueError, match="precision or dtype, not both"):
        load_base_model("tiny", dtype=torch.float32, precision="fp32", components=("text_encoder",))


def reference_training(base, concept: Concept) -> list[torch.Tensor]:
    """The reference recipe written out the way the authors' code computes it, step by step: the
    VAE encodes the (flipped) images and the whole text encoder runs every step, one AdamW.
    Returns the residual after each step.

    Random draws come from the concept's own generator in the trainer's order (in float32, converted to
    the text encoder's dtype, as the trainer draws them), so the two must agree.
    """
    cfg = concept.config
    encoder, vae, unet = Conditioner(base), base.vae, base.unet
    dtype = encoder.dtype
    scheduler = DDPMScheduler.from_config(base.scheduler_config)
    pixels = torch.stack([to_tensor(decode_image(data, "photo"), base.resolution) for data in concept.images])
    g = torch.Generator().manual_seed(cfg.seed)
    residual = torch.nn.Parameter(torch.randn(encoder.residual_shape, generator=g).to(dtype) * cfg.init_std)
    optimizer = torch.optim.AdamW([residual], lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    ids = encoder.tokenize([concept.prompt] * cfg.batch_size)
    # SDXL's time ids: each photo's original (height, width), no crop, the training size (diffusers' SDXL scripts)
    sizes = [Image.open(io.BytesIO(data)).size[::-1] for data in concept.images]
    order = torch.empty(0, dtype=torch.long)
    after_each_step = []
    for _ in range(cfg.steps):
        picks = []
        while len(picks) < cfg.batch_size:
            if order.numel() == 0:
                order = torch.randperm(len(concept.images), generator=g)
            picks.append(order[0])
            order = order[1:]
        flip = torch.rand(cfg.batch_size, generator=g) < cfg.flip_p
        batch = torch.stack([pixels[i].flip(-1) if f else pixels[i] for i, f in zip(torch.stack(picks), flip)])
        with torch.no_grad():
            dist = vae.encode(batch.to(vae.dtype)).latent_dist
        latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(dtype)) * base.vae_scaling_factor
        noise = torch.randn(latents.shape, generator=g).to(dtype)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        cond = encoder.encode(ids, [residual] * cfg.batch_size, prefix_logit_bias=cfg.prefix_logit_bias)
        extra = {}
        if cond.pooled is not None:
            times = torch.tensor([[*sizes[int(i)], 0, 0, base.resolution, base.resolution] for i in torch.stack(picks)])
            extra = {"added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": times.to(dtype)}}
        pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=cond.embeds,
                    **extra).sample
        # ε-prediction learns the noise; v-prediction (SD 2.x at 768 px) the velocity
        target = (scheduler.get_velocity(latents, noise, timesteps)
                  if scheduler.config.prediction_type == "v_prediction" else noise)
        F.mse_loss(pred, target).backward()
        optimizer.step()
        optimizer.zero_grad()
        after_each_step.append(residual.detach().clone())
    return after_each_step


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2", "tiny-sdxl"])
def test_training_is_the_reference_computation(name):
    """In float64, where another order of the same arithmetic (the VAE encoding all images at once, the
    cached lower text layers, one fused AdamW) changes only the last bits, whatever the machine's BLAS.
    The tolerance is 600 times below float32's precision, so a float32 rounding anywhere on the trainer's
    path (a cast left in the loss, say) fails it too. Each family: SD 2.x's v-prediction target, SDXL's two
    encoders, pooled embeds and time ids."""
    fp64 = float64_model(name)
    concept = teapot()
    expected = reference_training(fp64, concept)
    results, states = train_saving_every_state(ResidualTrainer(fp64, pack=1), [concept])
    for step in range(1, concept.config.steps):
        assert_float64_close(states["teapot", step]["residual"], expected[step - 1], f"residual after step {step}")
    final = results["teapot"].residual.flat().view(expected[-1].shape)  # every block's values, in block order
    assert_same_float32_rounding(final, expected[-1].float(), "final residual")


@pytest.mark.parametrize("model", ["fp32", "fp64"])
def test_one_fused_adamw_equals_one_optimizer_per_concept(model, request):
    """Bit for bit against one fused optimizer per concept (the same kernel); against the plain (unfused)
    optimizer in float64 only, where its other order of the same arithmetic changes only the last bits."""
    trainer = ResidualTrainer(request.getfixturevalue(model), pack=3)
    configs = [TrainConfig(seed=1), TrainConfig(seed=2, learning_rate=3e-3, weight_decay=0.1),
               TrainConfig(seed=3, adam_betas=(0.8, 0.99), adam_eps=1e-6)]
    states = [trainer.prepare(Concept(f"c{i}", [png_bytes(i)], "cat", config=c)) for i, c in enumerate(configs)]

    def optimizers(**kind):
        return [torch.optim.AdamW([s.residual.detach().clone().requires_grad_()], lr=s.cfg.learning_rate,
                                  betas=s.cfg.adam_betas, eps=s.cfg.adam_eps, weight_decay=s.cfg.weight_decay, **kind)
                for s in states]

    references = {"fused": optimizers(fused=True), **({"plain": optimizers()} if model == "fp64" else {})}
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        active = states if step >= 2 else states[:2]  # the third concept joins at the third step
        for index, state in enumerate(active):
            grad = torch.randn(state.residual.shape, generator=g, dtype=state.residual.dtype) * 10 ** -index
            state.residual.grad = grad.clone()
            for reference in references.values():
                reference[index].param_groups[0]["params"][0].grad = grad.clone()
                reference[index].step()
        trainer._adamw(active)
        assert all(s.residual.grad is None for s in active)
    for index, state in enumerate(states):
        one = references["fused"][index]
        alone = one.param_groups[0]["params"][0]
        assert torch.equal(state.residual.detach(), alone.detach())  # bit for bit
        moments = one.state[alone]
        assert all(torch.equal(state.moments[key], moments[key]) for key in ("exp_avg", "exp_avg_sq", "step"))
        if "plain" in references:
            plain = references["plain"][index].param_groups[0]["params"][0]
            assert_float64_close(state.residual.detach(), plain.detach(), f"c{index} against the plain AdamW")
    assert int(states[0].moments["step"]) == 6 and int(states[2].moments["step"]) == 4


def test_padding_to_a_static_bucket_never_changes_a_result(fp64):
    # Padded batches are other GEMM shapes: compared in float64.
    concepts = [teapot(steps=3), Concept("dog", [png_bytes(5), png_bytes(6)], "dog",
                                         config=TrainConfig(steps=5, seed=2, batch_size=3))]
    plain = train_saving_every_state(ResidualTrainer(fp64, pack=2), concepts)
    padded = ResidualTrainer(fp64, pack=2)
    padded.compiled = True  # the static-shape path, with the eager UNet (compiling is the GPU suite's to prove)
    rows = []
    unet = padded.unet
    padded.unet = lambda latents, *a, **k: rows.append(latents.shape[0]) or unet(latents, *a, **k)
    results = train_saving_every_state(padded, concepts)
    # 2 + 3 rows, then dog's 3 alone padded to a bucket of 4 (each bucket's first step also checks the
    # compiled gradient against eager: here both are the eager UNet, so the check passes)
    assert set(rows) == {4, 5} and rows[0] == 5 and rows[-1] == 4 and padded.compiled
    assert_same_training(results, plain)


def test_buckets_are_powers_of_two_and_the_full_pack(fp32):
    trainer = ResidualTrainer(fp32, pack=12)
    assert trainer._bucket(24) == 24  # a full pack of 12 concepts at batch 2: no padding
    assert [trainer._bucket(n) for n in (23, 17, 16, 9, 5, 3, 1)] == [24, 24, 16, 16, 8, 4, 1]


def test_precision_is_recorded_and_retrains(fp32, bf16):
    concept = teapot(steps=2)
    low = ResidualTrainer(bf16, pack=1).train([concept])[0].residual
    high = ResidualTrainer(fp32, pack=1).train([concept])[0].residual
    assert low.meta["precision"] == "bf16" and high.meta["precision"] == "fp32"
    assert low.meta["training_fingerprint"] != high.meta["training_fingerprint"]
    digests = [d for d in ("a", "b", "c")]
    text_only = load_base_model("tiny", components=("text_encoder",))
    # The batch driver computes fingerprints from the text encoder alone, naming the workers' precision.
    assert training_fingerprint(concept, digests, training_target(text_only, precision="bf16")) == \
        training_fingerprint(concept, digests, training_target(bf16))
    assert training_target(bf16).precision == "bf16"


def test_precision_flags_are_offered_and_checked():
    for command in (["train"], ["generate"], ["batch"], ["evaluate"], ["serve"]):
        out = subprocess.run([sys.executable, "-m", "catversion.cli", *command, "--help"], capture_output=True,
                             text=True, check=True).stdout
        assert "--precision" in out and "fp16" in out, command
    bad = subprocess.run([sys.executable, "-m", "catversion.cli", "generate", "--prompt", "x", "--out", "x.png",
                          "--precision", "half"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'half'" in bad.stderr


def test_a_compiled_unet_with_a_wrong_gradient_is_dropped_for_eager(fp32, caplog):
    concept = teapot(steps=3)
    expected = ResidualTrainer(fp32, pack=1).train([concept])[0].residual.tensor
    trainer = ResidualTrainer(fp32, pack=1)
    unet = trainer.unet

    def miscompiled(latents, steps, encoder_hidden_states):
        out = unet(latents, steps, encoder_hidden_states=encoder_hidden_states * 1.5)  # as a compiler bug would
        return out

    trainer.compiled, trainer.unet = True, miscompiled
    with caplog.at_level("WARNING", logger="catversion.training"):
        result = trainer.train([concept])[0]
    assert not trainer.compiled and trainer.unet is fp32.unet
    assert "compiled UNet's gradient differs from the eager one" in caplog.text and "training eager instead" in caplog.text
    assert torch.equal(result.residual.tensor, expected)  # the same eager steps with the same shapes: bit for bit
