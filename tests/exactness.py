"""Exactness checks that hold on any machine: a float64 copy of the tiny model, and the comparisons used
where two computations are the same mathematics in another order (packed = alone, padded = unpadded).

Why float64: packed and alone runs (or padded and unpadded UNet batches) use different GEMM shapes, so
BLAS sums in another order; the results differ in the last bits, and AdamW carries that forward (a
near-zero gradient's rounding becomes a visible step). In float32 that is ~1e-5 after six steps at the
reference learning rate, more or less with the machine's BLAS and thread count. In float64 the same
computation differs by a few units of 2**-53: measured 5e-15 relative for six packed steps (2 and 1
CPU threads), so FLOAT64_RTOL = 1e-10 is 10**4 times what rounding does and 10**6 times smaller
than what any packing bug does (rows mixed between concepts, a loss scaled by the pack: 1e-5 or more).

Images are not float64 end to end: the sampler (catversion/executor.py) keeps latents, the guidance mix
and the DDIM step in float32, and the UNet runner hands back float32, whatever the model. On the float64
model two groupings of the same requests (alone or batched, padded or not, the executor or the plain
reference loop) compute every UNet and VAE output to ~1e-15 and round it to float32: the same float32
value unless it lies within ~1e-15 of a rounding boundary (a chance of ~1e-8 per value), and then the
neighbouring one. One such rounding is one of the many that float32 arithmetic throughout makes, so the
two images are no further apart than float32 arithmetic throughout moves an image away from the float64
model's: ``float32_sampling_noise`` measures that in the same session (~4e-6 on the tiny model, where
the images are in fact equal bit for bit), 25 times tighter than the 1e-4 such tests allowed before
and far below what a wrong guidance mix or a row given another sample's inputs does.
"""

import dataclasses
import io

import torch

from catversion.models import BaseModel, load_base_model

FLOAT64_RTOL = 1e-10
FLOAT32_EPS = torch.finfo(torch.float32).eps  # 2**-23: the gap between 1 and the next float32


def float64_model(name: str = "tiny") -> BaseModel:
    """A tiny model ("tiny", "tiny-sd2", "tiny-sdxl") with its text encoders, UNet and VAE in float64 (weights are
    the same values: float32 converts exactly). No loader offers float64; the trainer's residual path follows
    the text encoder's dtype."""
    base = load_base_model(name)  # fresh modules, converted in place
    for module in (*base.text_encoders.values(), base.unet, base.vae):
        module.double()
    return dataclasses.replace(base, dtype=torch.float64)


def float32_sampling_noise() -> float:
    """The largest pixel difference between the tiny model's float32 and float64 images of the same guided
    requests (a residual, a negative prompt, 12 steps), both from the plain reference loop: the bound for
    images that two groupings of the float64 model's computation make (see the module docstring)."""
    from reference_sampling import reference_images

    from catversion.generation import GenerationRequest, ImageGenerator
    from catversion.residual import Residual

    g = torch.Generator().manual_seed(0)
    residual = Residual(torch.randn(3, 2, 1, 32, generator=g), (2, 3, 4))
    requests = [GenerationRequest("a teapot on a beach", residual, seed=1, negative_prompt="blurry"),
                GenerationRequest("a photo of a dog", seed=2)]
    images = [reference_images(ImageGenerator(base), requests, 12, 7.5) for base in (load_base_model("tiny"), float64_model())]
    noise = float((images[0] - images[1]).abs().max())
    assert 0 < noise < 1e-4, f"float32 moved the images by {noise:.3g}: not rounding (is the float64 model float64?)"
    return noise


def assert_float64_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal up to float64 rounding: max |actual - expected| <= FLOAT64_RTOL * max |expected| (a tensor-wide
    scale, so that elements near zero, such as AdamW's first moment, are not held to their own magnitude)."""
    assert actual.dtype == expected.dtype == torch.float64, (what, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    error = float((actual - expected).abs().max())
    scale = float(expected.abs().max())
    assert error <= FLOAT64_RTOL * scale, f"{what}: max difference {error:.3g}, allowed {FLOAT64_RTOL * scale:.3g}"


def assert_same_float32_rounding(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Two float64 results equal to FLOAT64_RTOL, stored as float32 (a Residual's format): each rounds to the
    nearest float32, so they are equal or neighbours, at most one float32 spacing (FLOAT32_EPS relative) apart."""
    assert actual.dtype == expected.dtype == torch.float32, (what, actual.dtype, expected.dtype)
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=FLOAT32_EPS, atol=FLOAT64_RTOL * scale, msg=lambda m: f"{what}: {m}")


def train_saving_every_state(trainer, concepts, **train) -> tuple[dict, dict]:
    """``trainer.train(concepts, **train)`` with each concept's training state saved at every step but its last
    (the residual and AdamW moments in the model's dtype, its RNG and image order): returns the results by
    concept id and the states by (concept id, step), as dicts of tensors."""
    states = {}

    def on_state(concept_id, fingerprint, step, data):
        states[concept_id, step] = torch.load(io.BytesIO(data), weights_only=True)

    results = trainer.train(concepts, state_every=1, on_state=on_state, **train)
    return {r.concept_id: r for r in results}, states


def assert_same_training(actual: tuple[dict, dict], expected: tuple[dict, dict]) -> None:
    """Two float64 trainings (``train_saving_every_state`` output) of the same concepts agree: at every step
    both saved, the residual and AdamW moments to FLOAT64_RTOL, the step count, RNG and image order exactly;
    the final residuals to their float32 rounding and the final losses to FLOAT64_RTOL."""
    (results, states), (expected_results, expected_states) = actual, expected
    assert sorted(results) == sorted(expected_results)
    common = sorted(set(states) & set(expected_states))
    assert common, "no training state in common to compare"
    for key in common:
        state, reference = states[key], expected_states[key]
        assert_float64_close(state["residual"], reference["residual"], f"{key} residual")
        for moment in ("exp_avg", "exp_avg_sq"):
            assert_float64_close(state["optimizer"][moment], reference["optimizer"][moment], f"{key} {moment}")
        assert torch.equal(state["optimizer"]["step"], reference["optimizer"]["step"]), key
        assert torch.equal(state["generator"], reference["generator"]), f"{key}: its own random stream"
        assert torch.equal(state["order"], reference["order"]), key
        assert_float64_close(state["losses"], reference["losses"], f"{key} losses")
    for concept_id, result in results.items():
        reference = expected_results[concept_id]
        assert result.status == reference.status == "ok", (concept_id, result.error, reference.error)
        assert result.steps == reference.steps, concept_id
        assert_same_float32_rounding(result.residual.tensor, reference.residual.tensor, f"{concept_id} residual")
        assert abs(result.final_loss - reference.final_loss) <= FLOAT64_RTOL * abs(reference.final_loss), concept_id
