"""Generation: per-sample seeds make a sample independent of its batch; CFG's negative branch has no residual."""

import pytest
import torch

from catversion import IncompatibleResidualError, Residual
from catversion.generation import GenerationRequest, ImageGenerator
from catversion.models import load_base_model

STEPS = 8


@pytest.fixture(scope="module")
def generator():
    return ImageGenerator(load_base_model("tiny"))


def residual(seed, width=32):
    g = torch.Generator().manual_seed(seed)
    return Residual(torch.randn(3, 2, 1, width, generator=g) * 2, (2, 3, 4), meta={"class_word": "teapot"})


def test_a_sample_is_the_same_alone_or_inside_a_mixed_batch(generator):
    r1, r2 = residual(1), residual(2)
    batch = [
        GenerationRequest("a teapot on a beach", r1, seed=10),
        GenerationRequest("a photo of a dog", None, seed=11),
        GenerationRequest("a teapot in the snow", r2, seed=12, residual_scale=0.5, negative_prompt="blurry"),
    ]
    mixed = generator.generate_tensors(batch, steps=STEPS)
    assert mixed.shape == (3, 3, 64, 64)
    for i, request in enumerate(batch):
        alone = generator.generate_tensors([request], steps=STEPS)
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-4, rtol=0)


def test_seed_and_residual_change_the_image(generator):
    r = residual(1)
    same = generator.generate_tensors([GenerationRequest("a teapot", r, seed=1)] * 2, steps=STEPS)
    torch.testing.assert_close(same[0], same[1], atol=1e-5, rtol=0)
    other_seed = generator.generate_tensors([GenerationRequest("a teapot", r, seed=2)], steps=STEPS)
    plain = generator.generate_tensors([GenerationRequest("a teapot", None, seed=1)], steps=STEPS)
    assert (other_seed[0] - same[0]).abs().mean() > 1e-3
    assert (plain[0] - same[0]).abs().mean() > 1e-3
    off = generator.generate_tensors([GenerationRequest("a teapot", r, seed=1, residual_scale=0.0)], steps=STEPS)
    torch.testing.assert_close(off, plain, atol=1e-4, rtol=0)


def test_the_unconditional_branch_is_encoded_without_the_residual(generator):
    r = residual(3)
    cond, uncond = generator.encode([GenerationRequest("a teapot", r), GenerationRequest("a teapot", None)])
    plain_empty = generator.base.text_encoder(input_ids=generator.base.tokenize([""])).last_hidden_state
    assert torch.equal(uncond[0], plain_empty[0]) and torch.equal(uncond[1], plain_empty[0])
    assert (cond[0] - cond[1]).abs().amax() > 0.1


def test_guidance_one_skips_the_unconditional_branch(generator):
    images = generator.generate_tensors([GenerationRequest("a teapot", residual(1))], steps=STEPS, guidance=1.0)
    assert torch.isfinite(images).all()


def test_bad_arguments_are_refused_before_any_compute(generator):
    request = [GenerationRequest("a teapot")]
    with pytest.raises(ValueError, match="size 50 must be a multiple of 16"):
        generator.generate_tensors(request, steps=STEPS, size=50)
    with pytest.raises(ValueError, match="steps must be"):
        generator.generate_tensors(request, steps=0)
    with pytest.raises(ValueError, match="residual_scale"):
        generator.generate_tensors([GenerationRequest("a teapot", residual(1), residual_scale=-1)], steps=STEPS)
    wrong_width = Residual(torch.randn(3, 2, 1, 768), (9, 10, 11))
    with pytest.raises(IncompatibleResidualError, match="hidden size 768"):
        generator.generate_tensors([GenerationRequest("a teapot", wrong_width)], steps=STEPS)
