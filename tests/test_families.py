"""Base-model families: each family's conditioning is diffusers' own and the method's written-out computation,
SDXL residuals train and generate (in catversion and in diffusers' own pipelines), and old files still work.

Conditioning is compared where it is exact: the plain path bit for bit with diffusers' ``encode_prompt`` (the same
modules called the same way), the patched path on a float64 copy of each tiny model's encoders against a
computation written out here from the paper's equation (FLOAT64_RTOL, tests/exactness.py).
"""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                       StableDiffusionXLPipeline)
from PIL import Image

from catversion.conditioning import Conditioner
from catversion.generation import GenerationRequest, ImageGenerator
from catversion.interop import pipeline_kwargs
from catversion.models import load_base_model
from catversion.residual import IncompatibleResidualError, Residual
from catversion.samples import concept_jpegs
from catversion.training import TrainConfig, train_residual
from exactness import assert_float64_close

DATA = Path(__file__).parent / "data"
TINY = ["tiny", "tiny-sd2", "tiny-sdxl"]
PROMPTS = ["a photo of a teapot on a beach", "a red dog"]


@pytest.fixture(scope="module")
def bases():
    return {name: load_base_model(name) for name in TINY}


def pipeline(base, cls=None):
    """diffusers' own pipeline of the base's family, from the same modules, sampling with DDIM."""
    scheduler = DDIMScheduler.from_config(base.scheduler_config)
    if base.family.name == "sdxl":
        cls = cls or StableDiffusionXLPipeline
        return cls(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                   tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def encode_prompt(base, prompts):
    """diffusers' (prompt, negative prompt) embeddings and, for SDXL, pooled embeddings."""
    out = pipeline(base).encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                       do_classifier_free_guidance=True)
    return out if len(out) == 4 else (*out, None, None)


def random_residual(conditioner, seed=0, bias=1.0):
    g = torch.Generator().manual_seed(seed)
    return conditioner.residual(torch.randn(conditioner.residual_shape, generator=g), bias)


@pytest.mark.parametrize("name", TINY)
def test_the_base_conditioning_is_exactly_diffusers_encode_prompt(bases, name):
    """With no residual (or one switched off, residual_scale 0: see the next test) the patched encoders are the
    base model's. An all-zero residual *tensor* is not: its zero keys still take a share of every query's
    attention (softmax over [q.0 + bias; q.K]) and its zero values dilute the output, as in the method."""
    base = bases[name]
    embeds, negative, pooled, negative_pooled = encode_prompt(base, PROMPTS)
    generator = ImageGenerator(base)
    requests = [GenerationRequest(p) for p in PROMPTS]
    cond, uncond = generator.conditioning(requests)
    assert torch.equal(cond.embeds, embeds)
    assert torch.equal(uncond.embeds, negative)  # SDXL: zeros for an empty negative prompt, as diffusers does
    if base.family.name == "sdxl":
        assert cond.embeds.shape[-1] == 64 and not negative.any()  # both encoders' hidden_states[-2]
        assert torch.equal(cond.pooled, pooled) and torch.equal(uncond.pooled, negative_pooled)
    else:
        assert cond.pooled is None and pooled is None


def float64_encoders(base):
    encoders = {name: module.double() for name, module in load_base_model(base.model_id,
                components=("tokenizer", "text_encoder")).text_encoders.items()}
    return dataclasses.replace(base, text_encoder=encoders["text_encoder"], text_encoder_2=encoders.get("text_encoder_2"))


def written_out(text_encoder, ids, layers, tensor, bias, hidden_state, pooled):
    """One encoder by hand: CLIP layers with K' = [Δk; K], V' = [Δv; V] in ``layers`` and the logit bias on the
    residual tokens (docs/method.md), then the hidden state the UNet reads and the pooled projection."""
    te = getattr(text_encoder, "text_model", text_encoder)
    config = te.config
    heads, width = config.num_attention_heads, config.hidden_size
    head = width // heads
    x = te.embeddings.token_embedding(ids) + te.embeddings.position_embedding.weight[: ids.shape[1]]
    seq = ids.shape[1]
    causal = torch.full((seq, seq), -math.inf, dtype=x.dtype).triu(1)
    states = [x]
    for index, layer in enumerate(te.encoder.layers):
        h = layer.layer_norm1(x)
        attn = layer.self_attn
        q = attn.q_proj(h).view(1, seq, heads, head).transpose(1, 2)
        k = attn.k_proj(h).view(1, seq, heads, head).transpose(1, 2)
        v = attn.v_proj(h).view(1, seq, heads, head).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / math.sqrt(head) + causal
        if index in layers:
            slot = layers.index(index)
            dk = tensor[slot, 0].to(x).view(1, -1, heads, head).transpose(1, 2)
            dv = tensor[slot, 1].to(x).view(1, -1, heads, head).transpose(1, 2)
            logits = torch.cat([q @ dk.transpose(-1, -2) / math.sqrt(head) + bias, logits], dim=-1)
            v = torch.cat([dv, v], dim=2)
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(1, seq, width)
        x = x + attn.out_proj(out)
        x = x + layer.mlp(layer.layer_norm2(x))
        states.append(x)
    final = te.final_layer_norm(x)
    read = final if hidden_state == -1 else states[-2]
    if not pooled:
        return read, None
    eos = int((ids[0] == config.eos_token_id).nonzero()[0])
    return read, text_encoder.text_projection(final[:, eos])


@pytest.mark.parametrize("name", TINY)
def test_a_residual_gives_the_written_out_computation_in_every_encoder(bases, name):
    base = float64_encoders(bases[name])
    conditioner = Conditioner(base)
    residual = random_residual(conditioner, bias=1.0)
    got = conditioner([PROMPTS[0]], [residual])
    reads, pooled = [], None
    for spec, block in zip(base.family.encoders, residual.blocks):
        ids = base.tokenize([PROMPTS[0]], spec.name)
        read, pool = written_out(base.text_encoders[spec.name], ids, list(block.layers), block.tensor, 1.0,
                                 spec.hidden_state, spec.pooled)
        reads.append(read)
        pooled = pool if pool is not None else pooled
    assert_float64_close(got.embeds, torch.cat(reads, dim=-1), f"{name} conditioning")
    if pooled is not None:
        assert_float64_close(got.pooled, pooled, f"{name} pooled embeds")
    # Switched off (scale 0), the patched path is the base model's conditioning.
    off = conditioner([PROMPTS[0]], [residual], residual_scale=0.0)
    plain = conditioner([PROMPTS[0]])
    assert_float64_close(off.embeds, plain.embeds, f"{name} residual switched off")


def test_default_layers_are_the_last_three_feeding_what_the_unet_reads(bases):
    assert Conditioner(bases["tiny"]).layer_sets == ((2, 3, 4),)
    assert Conditioner(bases["tiny-sd2"]).layer_sets == ((2, 3, 4),)
    # SDXL reads hidden_states[-2]: the last layer of each 5-layer encoder never reaches it.
    assert Conditioner(bases["tiny-sdxl"]).layer_sets == ((1, 2, 3), (1, 2, 3))
    with pytest.raises(ValueError, match=r"text_encoder_2: choose distinct layers in 0\.\.3.*layer 4 does not reach"):
        Conditioner(bases["tiny-sdxl"], layers=[[1, 2, 3], [2, 3, 4]])
    with pytest.raises(ValueError, match="give layers for each"):
        Conditioner(bases["tiny-sdxl"], layers=[1, 2, 3])


@pytest.fixture(scope="module")
def sdxl_residual(bases):
    config = TrainConfig(steps=6, save_steps=())
    return train_residual(bases["tiny-sdxl"], concept_jpegs("red-teapot", 3, 64), "teapot", config, concept_id="teapot")


def test_an_sdxl_residual_has_a_block_per_encoder_and_round_trips(sdxl_residual):
    assert sdxl_residual.encoders == ("text_encoder", "text_encoder_2")
    assert sdxl_residual.meta["base_family"] == "sdxl"
    again = Residual.load(sdxl_residual.to_bytes())
    assert again.patch == sdxl_residual.patch and again.sha256 == sdxl_residual.sha256
    for a, b in zip(again.blocks, sdxl_residual.blocks):
        assert torch.equal(a.tensor, b.tensor)
    with pytest.raises(IncompatibleResidualError, match="Stable Diffusion 1.x residuals only"):
        sdxl_residual.to_official("/nonexistent/pytorch_adapter.bin")


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-sdxl"])
def test_text_to_image_through_the_diffusers_pipeline_equals_catversions_own(bases, name, sdxl_residual):
    """The same DDIM sampling, seed and conditioning (via pipeline_kwargs): SDXL's time ids and pooled embeds,
    SD2's v-prediction; catversion's image equals the diffusers pipeline's to within one level of 255."""
    base = bases[name]
    residual = sdxl_residual if name == "tiny-sdxl" else random_residual(Conditioner(base))
    generator = ImageGenerator(base, layers=residual.layer_sets)
    request = GenerationRequest(PROMPTS[0], residual, seed=3)
    ours = (generator.generate_tensors([request], steps=8, guidance=5.0) + 1) / 2
    pipe = pipeline(base)
    latents = generator.initial_latents([3], base.resolution)
    theirs = pipe(**pipeline_kwargs(pipe, PROMPTS[0], residual), num_inference_steps=8, guidance_scale=5.0,
                  latents=latents, output_type="pt", height=base.resolution, width=base.resolution).images
    assert float((ours - theirs).abs().max()) <= 1 / 255
    plain = (generator.generate_tensors([GenerationRequest(PROMPTS[0], seed=3)], steps=8, guidance=5.0) + 1) / 2
    assert float((plain - theirs).abs().max()) > 1 / 255  # the residual is what made the image


def test_an_sdxl_residual_generates_through_diffusers_image_to_image(bases, sdxl_residual):
    base = bases["tiny-sdxl"]
    pipe = pipeline(base, StableDiffusionXLImg2ImgPipeline)
    photo = Image.fromarray(np.asarray(Image.open(DATA / "sd1-residual-v1-seed7-steps10.png").convert("RGB")))

    def run(residual):
        kwargs = pipeline_kwargs(pipe, PROMPTS[0], residual)
        return pipe(**kwargs, image=photo, strength=0.6, num_inference_steps=10, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    with_residual, without = run(sdxl_residual), run(None)
    assert with_residual.shape == (1, 3, 64, 64)
    assert float((with_residual - without).abs().max()) > 1 / 255


def test_a_residual_of_another_family_is_refused_naming_both(bases, sdxl_residual):
    sd1 = ImageGenerator(bases["tiny"])
    with pytest.raises(IncompatibleResidualError, match="sdxl base model.*is sd1"):
        sd1.check_request(GenerationRequest("a teapot", sdxl_residual))
    old = Residual.load(DATA / "sd1-residual-v1.safetensors")  # no recorded family: its encoders tell
    with pytest.raises(IncompatibleResidualError, match="text_encoder but the base model.*text_encoder, text_encoder_2"):
        ImageGenerator(bases["tiny-sdxl"]).check_request(GenerationRequest("a teapot", old))


def test_a_residual_file_written_before_families_loads_and_generates_the_same_image(bases):
    """tests/data holds a residual and its image made by catversion before model families existed (commit
    6140228, tiny model, seed 7, 10 DDIM steps)."""
    residual = Residual.load(DATA / "sd1-residual-v1.safetensors")
    assert residual.layer_sets == ((2, 3, 4),) and "base_family" not in residual.meta
    image = ImageGenerator(bases["tiny"]).generate([GenerationRequest("a photo of a teapot on the beach", residual,
                                                                      seed=7)], steps=10)[0]
    expected = np.asarray(Image.open(DATA / "sd1-residual-v1-seed7-steps10.png").convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - expected).max() <= 1


def test_a_saved_folder_is_recognised_as_its_family_by_the_loader_and_the_planner(bases, tmp_path):
    """model_index.json and the configs decide (SD 2.x and 1.x share StableDiffusionPipeline: the text encoder's
    OpenCLIP config tells them apart), whether the model is loaded or only described."""
    from catversion.modelinfo import describe

    for name in ("tiny-sd2", "tiny-sdxl"):
        folder = tmp_path / name
        pipeline(bases[name]).save_pretrained(folder)
        loaded = load_base_model(str(folder), components=("tokenizer", "text_encoder"))
        assert loaded.family.name == describe(str(folder)).family == bases[name].family.name
        assert loaded.fingerprint == bases[name].fingerprint
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    for part in ("text_encoder", "unet", "vae", "scheduler", "tokenizer"):
        (tmp_path / "other" / part).mkdir()
    (tmp_path / "other" / "text_encoder" / "config.json").write_text('{"hidden_size": 32, "num_hidden_layers": 5}')
    with pytest.raises(ValueError, match="KandinskyPipeline.*not a Stable Diffusion family"):
        load_base_model(str(tmp_path / "other"))
