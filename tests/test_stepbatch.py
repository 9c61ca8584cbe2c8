"""Step-level batching: a job's image does not depend on when it joined or what shared its UNet calls; it
equals what a plain diffusers sampling loop makes (tests/reference_sampling.py).

Images that must be equal are made by the float64 model and compared to float32 sampling noise
(tests/exactness.py says why that bound holds on any machine).
"""

import dataclasses
import threading

import pytest
import torch
from reference_sampling import reference_images

from catversion.generation import GenerationRequest, ImageGenerator
from catversion.residual import IncompatibleResidualError, Residual
from catversion.stepbatch import Job, JobCancelled, StepBatcher
from exactness import float32_sampling_noise, float64_model

SMALL = {"height": 32, "width": 32}  # a quarter of tiny's native 64x64 compute


@pytest.fixture(scope="module")
def base():
    return float64_model()


@pytest.fixture(scope="module")
def generator(base):
    return ImageGenerator(base)


def residual(generator, seed, tokens=1, layers=None, **meta):
    base = generator.base
    layers = layers or generator.encoder.layers
    g = torch.Generator().manual_seed(seed)
    tensor = torch.randn(len(layers), 2, tokens, base.text_encoder.config.hidden_size, generator=g) * 0.5
    return Residual(tensor, layers=layers,
                    meta=meta or {"base_model": base.model_id, "base_fingerprint": base.fingerprint})


def reference(generator, job, previews_at=()):
    """The image the plain reference loop makes for the same request (with ``previews_at``: and its previews)."""
    request = GenerationRequest(job.prompt, job.residual, job.seed, job.residual_scale, job.negative_prompt)
    size = (job.height or generator.base.resolution, job.width or generator.base.resolution)
    out = reference_images(generator, [request], job.steps, job.guidance, size, previews_at)
    if previews_at:
        return out[0][0], {step: images[0] for step, images in out[1].items()}
    return out[0]


@pytest.fixture(scope="module")
def noise():
    return float32_sampling_noise()


def assert_same_image(a, b, noise):
    # Both sides do the same arithmetic in another order (rows grouped differently, DDIM vectorized or not):
    # no pixel further apart than float32 sampling noise. The tiny model's images barely move with
    # guidance, so a bound of one 8-bit level would let a wrong guidance mix pass.
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    assert (a - b).abs().max().item() <= noise


def collect(batcher, job, events, name):
    return batcher.submit(job, on_done=lambda image: events.append((name, "done", image)),
                          on_partial=lambda i, image: events.append((name, "partial", i, image)),
                          on_error=lambda exc: events.append((name, "error", exc)))


def outcome(events, name):
    final = [e for e in events if e[0] == name and e[1] in ("done", "error")]
    assert len(final) == 1, f"{name}: expected exactly one of on_done/on_error, got {final}"
    return final[0]


def step_until_done(batcher, tickets, limit=200):
    for _ in range(limit):
        if all(t.done for t in tickets):
            return
        batcher.step()
    raise AssertionError("jobs did not finish")


def test_an_image_is_the_same_alone_in_a_static_batch_or_joining_midway(generator, noise):
    settings = dict(steps=8, guidance=7.5, **SMALL)
    job = Job("a teapot on a beach", residual(generator, 1), seed=7, negative_prompt="blurry", **settings)
    expected = reference(generator, job)

    alone = StepBatcher(generator).generate([job])[0]
    assert alone.shape == (3, 32, 32) and alone.dtype == torch.float32
    others = [Job("a dog", None, seed=3, **settings),
              Job("a teapot", residual(generator, 2), seed=4, residual_scale=0.5, **settings)]
    static = StepBatcher(generator, mode="static").generate([others[0], job, others[1]])[1]

    batcher = StepBatcher(generator)
    events = []
    long = collect(batcher, Job("a cat", residual(generator, 3), seed=5, steps=12, guidance=1.0, **SMALL),
                   events, "long")
    for _ in range(3):
        batcher.step()
    joined = collect(batcher, job, events, "joined")
    step_until_done(batcher, [long, joined])

    for image in (alone, static, outcome(events, "joined")[2]):
        assert_same_image(image, expected, noise)
    without_residual = reference(generator, Job("a teapot on a beach", seed=7, negative_prompt="blurry", **settings))
    assert (alone - without_residual).abs().mean() > 1e-3


def test_a_clipping_scheduler_steps_each_sample_with_the_schedulers_own_step(base, noise):
    """clip_sample (or thresholding) is not in the vectorized DDIM step: such configs keep diffusers' step."""
    clipping = ImageGenerator(dataclasses.replace(
        base, scheduler_config={**base.scheduler_config, "clip_sample": True, "clip_sample_range": 0.5}))
    jobs = [Job("a teapot", residual(clipping, 1), seed=1, steps=5, **SMALL), Job("a dog", seed=2, steps=3, guidance=1.0, **SMALL)]
    images = StepBatcher(clipping).generate(jobs)
    for job, image in zip(jobs, images):
        assert_same_image(image, reference(clipping, job), noise)
    unclipped = StepBatcher(ImageGenerator(base)).generate(jobs[:1])[0]
    assert (images[0] - unclipped).abs().mean() > 1e-3


def test_warm_up_prepares_every_part_and_changes_no_image(generator, noise):
    batcher = StepBatcher(generator)
    seconds = batcher.warm_up()
    assert seconds > 0 and generator.unet_runner.warm_up_seconds is not None
    job = Job("a teapot", residual(generator, 1), seed=3, steps=4, guidance=5.0)
    assert_same_image(batcher.generate([job])[0], reference(generator, job), noise)


def test_a_short_job_joining_a_long_one_finishes_first(generator, noise):
    long_job = Job("a teapot", residual(generator, 1), seed=1, steps=30, **SMALL)
    batcher = StepBatcher(generator)
    events = []
    long = collect(batcher, long_job, events, "long")
    for _ in range(3):
        batcher.step()
    short = collect(batcher, Job("a dog", seed=2, steps=3, **SMALL), events, "short")
    for _ in range(3):
        batcher.step()
    assert short.done and not long.done
    assert outcome(events, "short")[1] == "done"
    assert batcher.running == 1 and batcher.waiting == 0
    step_until_done(batcher, [long])
    assert_same_image(outcome(events, "long")[2], reference(generator, long_job), noise)
    assert long.started_at is not None and short.started_at > long.started_at


def test_an_incompatible_residual_is_refused_without_touching_running_jobs(generator, noise):
    batcher = StepBatcher(generator)
    events = []
    good = [Job("a teapot", residual(generator, 1), seed=1, steps=6, **SMALL), Job("a dog", seed=2, steps=6, **SMALL)]
    tickets = [collect(batcher, job, events, i) for i, job in enumerate(good)]
    batcher.step()
    batcher.step()
    bad = {
        "token": residual(generator, 5, tokens=2),
        "layers": residual(generator, 5, layers=(1, 2, 3)),
        "base model": residual(generator, 5, base_model="someone/other-model"),
    }
    for match, wrong in bad.items():
        with pytest.raises(IncompatibleResidualError, match=match):
            batcher.submit(Job("a teapot", wrong, steps=6))
    assert batcher.waiting == 0 and batcher.running == 2
    step_until_done(batcher, tickets)
    for i, job in enumerate(good):
        assert_same_image(outcome(events, i)[2], reference(generator, job), noise)


def test_a_job_failing_while_encoding_fails_alone(generator, monkeypatch, noise):
    encode = generator.conditioning

    def fragile(requests):
        if any(r.prompt == "poison" for r in requests):
            raise RuntimeError("cannot encode poison")
        return encode(requests)

    monkeypatch.setattr(generator, "conditioning", fragile)
    batcher = StepBatcher(generator)
    events = []
    jobs = {"a": Job("a teapot", residual(generator, 1), seed=1, steps=4, **SMALL),
            "poison": Job("poison", seed=2, steps=4, **SMALL),
            "b": Job("a dog", seed=3, steps=4, **SMALL)}
    tickets = [collect(batcher, job, events, name) for name, job in jobs.items()]
    step_until_done(batcher, tickets)
    assert isinstance(outcome(events, "poison")[2], RuntimeError)
    monkeypatch.undo()
    for name in ("a", "b"):
        assert_same_image(outcome(events, name)[2], reference(generator, jobs[name]), noise)


def test_a_failing_unet_call_fails_its_jobs_and_the_loop_goes_on(generator, monkeypatch):
    calls = []
    forward = generator.base.unet.forward

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device fault")
        return forward(*args, **kwargs)

    monkeypatch.setattr(generator.base.unet, "forward", flaky)
    batcher = StepBatcher(generator)
    events = []
    first = collect(batcher, Job("a teapot", seed=1, steps=3, **SMALL), events, "first")
    batcher.step()
    assert first.done and isinstance(outcome(events, "first")[2], RuntimeError)
    assert batcher.running == 0
    second = collect(batcher, Job("a dog", seed=2, steps=3, **SMALL), events, "second")
    step_until_done(batcher, [second])
    assert outcome(events, "second")[1] == "done"


def test_sizes_run_in_separate_unet_calls_and_settings_share_one_in_step_mode(generator, noise):
    assert generator.size_multiple == 16
    calls = []
    batcher = StepBatcher(generator, on_unet_step=lambda seconds, n, size: calls.append((n, size)))
    square = Job("a teapot", seed=1, steps=4, **SMALL)
    wide = Job("a dog", seed=2, steps=4, height=32, width=64)
    images = batcher.generate([square, wide])
    assert images[0].shape == (3, 32, 32) and images[1].shape == (3, 32, 64)
    assert sorted(calls) == [(1, (32, 32))] * 4 + [(1, (32, 64))] * 4
    assert_same_image(images[1], reference(generator, wide), noise)

    mixed = [Job("a teapot", seed=1, steps=4, guidance=10.0, **SMALL),
             Job("a dog", seed=2, steps=6, guidance=1.0, **SMALL),
             Job("a cat", seed=3, steps=5, guidance=3.0, **SMALL)]
    calls.clear()
    stepped = batcher.generate(mixed)
    assert [n for n, _ in calls] == [3, 3, 3, 3, 2, 1]

    calls.clear()
    static = StepBatcher(generator, mode="static", on_unet_step=lambda seconds, n, size: calls.append(n))
    images = static.generate([*mixed, Job("a bird", seed=4, steps=4, guidance=10.0, **SMALL)])
    assert calls == [2] * 4 + [1] * 6 + [1] * 5
    for a, b in zip(stepped, images):
        assert_same_image(a, b, noise)


def test_previews_come_before_the_image_with_their_indexes(generator, noise):
    batcher = StepBatcher(generator)
    events = []
    job = Job("a teapot", seed=1, steps=6, partial_images=2)
    step_until_done(batcher, [collect(batcher, job, events, "job")])
    kinds = [(e[1], e[2]) if e[1] == "partial" else (e[1],) for e in events]
    assert kinds == [("partial", 0), ("partial", 1), ("done",)]
    assert events[0][3].shape == (3, 64, 64)
    assert_same_image(events[2][2], reference(generator, job), noise)
    # previews 0 and 1 of 2 over 6 steps come after steps 2 and 4, from the predicted clean latent
    image, previews = reference(generator, job, previews_at=(2, 4))
    assert_same_image(events[0][3], previews[2], noise)
    assert_same_image(events[1][3], previews[4], noise)
    assert (events[0][3] - events[1][3]).abs().mean() > 1e-3


def test_cancel_fails_only_that_job(generator):
    batcher = StepBatcher(generator)
    events = []
    tickets = {name: collect(batcher, Job(f"a {name}", seed=i, steps=5, **SMALL), events, name)
               for i, name in enumerate(("teapot", "dog", "cat"))}
    batcher.step()
    tickets["dog"].cancel()
    tickets["cat"].cancel()  # already running, and leaves at the next step too
    waiting = collect(batcher, Job("a bird", steps=5, **SMALL), events, "bird")
    waiting.cancel()  # never started
    step_until_done(batcher, [*tickets.values(), waiting])
    for name in ("dog", "cat", "bird"):
        assert isinstance(outcome(events, name)[2], JobCancelled)
    assert outcome(events, "teapot")[1] == "done"
    assert waiting.started_at is None


def test_a_raising_callback_does_not_disturb_other_jobs(generator):
    batcher = StepBatcher(generator)
    events = []

    def explode(image):
        raise ValueError("client gone")

    first = batcher.submit(Job("a teapot", steps=3, **SMALL), on_done=explode)
    second = collect(batcher, Job("a dog", steps=3, **SMALL), events, "dog")
    step_until_done(batcher, [first, second])
    assert outcome(events, "dog")[1] == "done"


def test_run_serves_jobs_submitted_from_another_thread_and_stops(generator):
    starts = []
    batcher = StepBatcher(generator, on_start=starts.append)
    stop = threading.Event()
    loop = threading.Thread(target=batcher.run, args=(stop,), daemon=True)
    loop.start()
    finished = threading.Event()
    images = []

    def done(image):
        images.append(image)
        if len(images) == 3:
            finished.set()

    for i in range(3):
        batcher.submit(Job(f"a teapot {i}", seed=i, steps=3, height=32, width=32 * (1 + i % 2)), on_done=done)
    assert finished.wait(30)
    assert len(starts) == 3 and all(wait >= 0 for wait in starts)
    stop.set()
    loop.join(5)
    assert not loop.is_alive()


@pytest.mark.parametrize("field, value", [("steps", 0), ("height", 50), ("width", 8), ("partial_images", 4),
                                          ("seed", -1), ("guidance", -1.0), ("residual_scale", 11.0)])
def test_bad_parameters_are_refused_naming_the_field(generator, field, value):
    batcher = StepBatcher(generator)
    job = Job("a teapot", steps=4, **SMALL)
    setattr(job, field, value)
    with pytest.raises(ValueError, match=field):
        batcher.validate(job)
    with pytest.raises(ValueError, match=field):
        batcher.submit(job)
    assert batcher.waiting == 0 and not batcher.step()
