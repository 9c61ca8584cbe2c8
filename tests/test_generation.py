"""Generation: per-sample seeds make a sample independent of its batch; CFG's negative branch has no residual;
images equal a plain diffusers sampling loop (tests/reference_sampling.py).

Images that must be equal are made by the float64 model and compared to float32 sampling noise
(tests/exactness.py says why that bound holds on any machine).
"""

import pytest
import torch
from reference_sampling import reference_images

from catversion import IncompatibleResidualError, Residual
from catversion.generation import GenerationRequest, ImageGenerator
from catversion.limits import DEFAULT_GUIDANCE
from exactness import float32_sampling_noise, float64_model

STEPS = 8


@pytest.fixture(scope="module")
def generator():
    return ImageGenerator(float64_model())


@pytest.fixture(scope="module")
def noise():
    return float32_sampling_noise()


def assert_same_images(a, b, noise):
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=noise, rtol=0)


def residual(seed, width=32):
    g = torch.Generator().manual_seed(seed)
    return Residual(torch.randn(3, 2, 1, width, generator=g) * 2, (2, 3, 4), meta={"class_word": "teapot"})


def test_a_sample_is_the_same_alone_or_inside_a_mixed_batch(generator, noise):
    r1, r2 = residual(1), residual(2)
    batch = [
        GenerationRequest("a teapot on a beach", r1, seed=10),
        GenerationRequest("a photo of a dog", None, seed=11),
        GenerationRequest("a teapot in the snow", r2, seed=12, residual_scale=0.5, negative_prompt="blurry"),
    ]
    mixed = generator.generate_tensors(batch, steps=STEPS)
    assert mixed.shape == (3, 3, 64, 64)
    # The same arithmetic in another order (rows interleaved per sample, a vectorized DDIM step).
    assert_same_images(mixed, reference_images(generator, batch, STEPS, DEFAULT_GUIDANCE), noise)
    for i, request in enumerate(batch):
        assert_same_images(mixed[i : i + 1], generator.generate_tensors([request], steps=STEPS), noise)


def test_seed_and_residual_change_the_image(generator, noise):
    r = residual(1)
    same = generator.generate_tensors([GenerationRequest("a teapot", r, seed=1)] * 2, steps=STEPS)
    assert_same_images(same[0], same[1], noise)
    other_seed = generator.generate_tensors([GenerationRequest("a teapot", r, seed=2)], steps=STEPS)
    plain = generator.generate_tensors([GenerationRequest("a teapot", None, seed=1)], steps=STEPS)
    assert (other_seed[0] - same[0]).abs().mean() > 1e-3
    assert (plain[0] - same[0]).abs().mean() > 1e-3
    off = generator.generate_tensors([GenerationRequest("a teapot", r, seed=1, residual_scale=0.0)], steps=STEPS)
    assert_same_images(off, plain, noise)  # scale 0 runs the patched layers without the residual: another order


def test_the_unconditional_branch_is_encoded_without_the_residual(generator):
    r = residual(3)
    cond, uncond = generator.encode([GenerationRequest("a teapot", r), GenerationRequest("a teapot", None)])
    plain_empty = generator.base.text_encoder(input_ids=generator.base.tokenize([""])).last_hidden_state
    assert torch.equal(uncond[0], plain_empty[0]) and torch.equal(uncond[1], plain_empty[0])
    assert (cond[0] - cond[1]).abs().amax() > 0.1


class RowCounter:
    """The generator's real UNetRunner, with the rows of every call recorded."""

    def __init__(self, runner):
        self.runner = runner
        self.rows = []

    def __call__(self, latents, timesteps, embeddings):
        self.rows.append(latents.shape[0])
        return self.runner(latents, timesteps, embeddings)

    def __getattr__(self, name):
        return getattr(self.runner, name)


def test_guidance_one_skips_the_unconditional_branch(generator, noise, monkeypatch):
    requests = [GenerationRequest("a teapot", residual(1), seed=4), GenerationRequest("a dog", seed=5)]
    counter = RowCounter(generator.executor.runner)
    monkeypatch.setattr(generator.executor, "runner", counter)
    images = generator.generate_tensors(requests, steps=STEPS, guidance=1.0)
    assert counter.rows == [2] * STEPS  # one conditional row per sample, no unconditional row
    assert_same_images(images, reference_images(generator, requests, STEPS, 1.0), noise)
    counter.rows.clear()
    guided = generator.generate_tensors(requests, steps=STEPS, guidance=7.5)
    assert counter.rows == [4] * STEPS
    assert (guided - images).abs().mean() > 1e-3


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
