"""UNetRunner: padding rows to buckets and chunking change no row's prediction; a compiled runner
compiles once for every bucket and equals eager; the vectorized DDIM step equals diffusers'."""

import pytest
import torch
from diffusers import DDIMScheduler

from catversion.generation import GenerationRequest, ImageGenerator
from catversion.models import load_base_model
from catversion.sd_v1 import SD_SCHEDULER_CONFIG
from catversion.executor import ddim_step, vectorizable
from catversion.stepbatch import Job, StepBatcher
from catversion.unetrun import DEFAULT_BUCKETS, UNetRunner, buckets_for
from exactness import assert_same_float32_rounding, float32_sampling_noise, float64_model


@pytest.fixture(scope="module")
def base():
    return load_base_model("tiny")


@pytest.fixture(scope="module")
def base64():
    """Padded, chunked or batched calls are other GEMM shapes: equalities are checked on the float64 model."""
    return float64_model()


def inputs(base, rows, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(rows, base.unet.config.in_channels, size, size, generator=g)
    timesteps = torch.randint(0, 1000, (rows,), generator=g)
    embeddings = torch.randn(rows, 77, base.unet.config.cross_attention_dim, generator=g)
    return latents, timesteps, embeddings


def direct(base, latents, timesteps, embeddings):
    """The UNet called once on exactly these rows, in its own dtype."""
    with torch.no_grad():
        dtype = base.unet.dtype
        return base.unet(latents.to(dtype), timesteps, encoder_hidden_states=embeddings.to(dtype)).sample


class CallSizes:
    """Records the batch size of every UNet forward."""

    def __init__(self, unet):
        self.sizes = []
        self._hook = unet.register_forward_pre_hook(lambda module, args: self.sizes.append(args[0].shape[0]))

    def close(self):
        self._hook.remove()


def test_padding_to_a_bucket_and_chunking_change_no_rows_prediction(base64):
    # The runner hands back float32: the float64 predictions of both sides, rounded to float32.
    base = base64
    runner = UNetRunner(base.unet, buckets=(1, 2, 4, 8), latent_size=(8, 8), pad=True)
    calls = CallSizes(base.unet)
    try:
        for rows, expected_calls in ((3, [4]), (5, [8]), (8, [8]), (19, [8, 8, 4])):
            calls.sizes.clear()
            latents, timesteps, embeddings = inputs(base, rows, seed=rows)
            eps = runner(latents, timesteps, embeddings)
            assert calls.sizes == expected_calls
            assert eps.shape == latents.shape and eps.dtype == torch.float32
            assert_same_float32_rounding(eps, direct(base, latents, timesteps, embeddings).float(), f"{rows} rows")

        eager = UNetRunner(base.unet, buckets=(1, 2, 4), latent_size=(8, 8))  # pad=None: eager calls run as they are
        calls.sizes.clear()
        latents, timesteps, embeddings = inputs(base, 11, seed=11)
        eps = eager(latents, timesteps, embeddings)
        assert calls.sizes == [4, 4, 3]
        assert_same_float32_rounding(eps, direct(base, latents, timesteps, embeddings).float(), "11 rows in chunks")
    finally:
        calls.close()


def test_the_result_is_a_fresh_float32_tensor_and_inputs_take_the_unets_dtype():
    bf16 = load_base_model("tiny", precision="bf16")
    runner = UNetRunner(bf16.unet, latent_size=(8, 8), pad=True)
    latents, timesteps, embeddings = inputs(bf16, 3)
    first = runner(latents, timesteps, embeddings)
    assert first.dtype == torch.float32 and first.shape == latents.shape
    kept = first.clone()
    runner(*inputs(bf16, 3, seed=1))
    assert torch.equal(first, kept)  # a later call does not overwrite an earlier result
    expected = direct(bf16, latents.bfloat16(), timesteps, embeddings.bfloat16()).float()
    torch.testing.assert_close(first, expected, atol=2e-2, rtol=0)


def test_buckets_follow_max_batch_size_and_the_batcher_refuses_batches_over_the_largest(base):
    assert buckets_for(16) == DEFAULT_BUCKETS
    assert buckets_for(1) == (1, 2) and buckets_for(12) == (1, 2, 4, 8, 16, 32) and buckets_for(17)[-1] == 64
    generator = ImageGenerator(base)
    with pytest.raises(ValueError, match=r"max_batch_size 17 .*buckets_for\(17\)"):
        StepBatcher(generator, max_batch_size=17)
    assert StepBatcher(ImageGenerator(base, buckets=buckets_for(17)), max_batch_size=17).max_batch_size == 17
    with pytest.raises(ValueError, match="buckets"):
        UNetRunner(base.unet, buckets=(0, 2))


def test_step_level_unet_calls_are_the_runners_buckets_and_images_do_not_change(base64):
    base = base64
    generator = ImageGenerator(base)
    padded = ImageGenerator(base)
    padded.executor.runner = UNetRunner(base.unet, latent_size=(8, 8), pad=True)
    jobs = [Job("a teapot", seed=1, steps=4, guidance=7.5), Job("a dog", seed=2, steps=6, guidance=1.0),
            Job("a cat", seed=3, steps=3, guidance=3.0)]
    calls = CallSizes(base.unet)
    try:
        images = StepBatcher(padded, max_batch_size=4).generate(jobs)
    finally:
        calls.close()
    # rows: 2 + 1 + 2 = 5 → 8; after the 3-step job leaves 3 → 4; then the 6-step job alone: 1
    assert calls.sizes == [8, 8, 8, 4, 1, 1]
    noise = float32_sampling_noise()  # the bound for two float64-model images (tests/exactness.py)
    for image, expected in zip(images, StepBatcher(generator).generate(jobs)):
        assert (image - expected).abs().max() <= noise


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_step_equals_diffusers_for_samples_at_different_timesteps(prediction_type, set_alpha_to_one):
    config = {**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type, "set_alpha_to_one": set_alpha_to_one}
    schedulers = {}
    for steps in (3, 20, 50):
        schedulers[steps] = DDIMScheduler.from_config(config)
        schedulers[steps].set_timesteps(steps)
    assert vectorizable(schedulers[3].config)
    # every sample at its own point of its own schedule, the last step (to the final alpha) included
    picks = [(3, 0), (3, 2), (20, 7), (20, 19), (50, 0), (50, 31), (50, 49)]
    g = torch.Generator().manual_seed(0)
    output = torch.randn(len(picks), 4, 8, 8, generator=g)
    sample = torch.randn(len(picks), 4, 8, 8, generator=g)
    timesteps = torch.stack([schedulers[steps].timesteps[index] for steps, index in picks])
    prev = torch.tensor([int(t) - 1000 // steps for t, (steps, _) in zip(timesteps, picks)])
    reference = schedulers[3]
    stepped, original = ddim_step(output, timesteps, prev, sample, reference.alphas_cumprod,
                                  reference.final_alpha_cumprod, prediction_type)
    for i, (steps, index) in enumerate(picks):
        out = schedulers[steps].step(output[i : i + 1], schedulers[steps].timesteps[index], sample[i : i + 1], eta=0.0)
        torch.testing.assert_close(stepped[i : i + 1], out.prev_sample, atol=1e-6, rtol=0)
        torch.testing.assert_close(original[i : i + 1], out.pred_original_sample, atol=1e-6, rtol=0)


def test_clipping_or_thresholding_configs_are_not_vectorized():
    for change in ({"clip_sample": True}, {"thresholding": True}):
        assert not vectorizable(DDIMScheduler.from_config({**SD_SCHEDULER_CONFIG, **change}).config)


def test_a_compiled_runner_compiles_once_for_every_bucket_and_equals_eager(base):
    """The one compile of the suite (tens of seconds cold on a CPU, a few with Inductor's cache)."""
    from torch._dynamo.utils import counters

    eager = ImageGenerator(base)
    compiled = ImageGenerator(base, compile=True, buckets=(1, 2, 4, 8))
    runner = compiled.unet_runner
    assert runner.compiled and runner.buckets == (2, 4, 8)  # a batch of one runs in bucket 2
    before = counters["stats"]["unique_graphs"]
    seconds = compiled.warm_up()
    assert seconds > 0 and runner.warm_up_seconds == seconds
    assert counters["stats"]["unique_graphs"] - before == 1, "one compile for every bucket"

    requests = [GenerationRequest("a teapot on a beach", seed=1), GenerationRequest("a dog", seed=2)]
    torch.testing.assert_close(compiled.generate_tensors(requests, steps=4),
                               eager.generate_tensors(requests, steps=4), atol=1e-4, rtol=0)
    jobs = [Job("a teapot", seed=1, steps=4, guidance=7.5), Job("a dog", seed=2, steps=5, guidance=1.0),
            Job("a cat", seed=3, steps=3, guidance=3.0),
            Job("a bird", seed=4, steps=3, height=32, width=32)]  # not the native size: eager
    assert not runner.runs_compiled((4, 4)) and runner.runs_compiled((8, 8))
    images = StepBatcher(compiled, max_batch_size=4).generate(jobs)
    expected = StepBatcher(eager).generate(jobs)
    for image, reference in zip(images[:3], expected[:3]):  # 5, 3, 1 rows: buckets 8, 4, 2
        assert (image - reference).abs().max() <= 1e-4
    assert torch.equal(images[3], expected[3])  # the same eager UNet call, unpadded
    assert counters["stats"]["unique_graphs"] - before == 1, "no compile after the warm-up"
