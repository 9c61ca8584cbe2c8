"""Packed multi-concept training: exact against training alone, cached work, per-concept failures.

Exactness is checked where it is exact: packed = alone and resumed inside a pack = uninterrupted on a
float64 copy of the tiny model (tests/exactness.py says why float32 cannot be compared tightly there);
resumed = uninterrupted with the same shapes in one process bit for bit, in float32.
"""

import contextlib
import io
import math
import struct
import threading
import time
import zlib
from dataclasses import replace

import pytest
import torch
from PIL import Image

from catversion import Residual
from catversion.images import ImageError, decode_image
from catversion.models import load_base_model
from catversion.training import (
    Concept,
    ResidualTrainer,
    StateMismatchError,
    TrainConfig,
    image_digest,
    train_residual,
    training_fingerprint,
    training_target,
)
from exactness import assert_same_training, float64_model, train_saving_every_state
from helpers import png_bytes


@pytest.fixture(scope="module")
def base():
    return load_base_model("tiny")


@pytest.fixture(scope="module")
def base64():
    return float64_model()


def concepts():
    # The reference recipe's learning rate (1e-2): exactness is compared in float64, where it holds at any rate.
    return [
        Concept("teapot-1", [png_bytes(1), png_bytes(2)], "teapot", config=TrainConfig(steps=6, seed=3)),
        Concept("dog-2", [png_bytes(3), png_bytes(4), png_bytes(5)], "dog", "a dog",
                TrainConfig(steps=4, seed=7, batch_size=3)),
        Concept("cat-3", [png_bytes(6)], "cat", config=TrainConfig(steps=5, seed=11, batch_size=1, prefix_logit_bias=1.0)),
    ]


def test_packed_training_gives_each_concept_the_residual_it_gets_alone(base64):
    # Packs of 2 + 3 rows, then 3 + 1 (cat-3 takes dog-2's slot), against 2, 3 and 1 rows alone: other
    # GEMM shapes, the same per-concept mathematics.
    packed = train_saving_every_state(ResidualTrainer(base64, pack=2), concepts())
    for concept in concepts():
        alone = train_saving_every_state(ResidualTrainer(base64, pack=1), [concept])
        assert alone[0][concept.concept_id].steps == concept.config.steps
        assert_same_training(({concept.concept_id: packed[0][concept.concept_id]}, packed[1]), alone)


def test_slots_are_refilled_as_soon_as_a_concept_ends(base):
    seen = []
    ResidualTrainer(base, pack=2).train(iter(concepts()), on_progress=lambda p: seen.append((p.steps_done, p.active)))
    # dog-2 ends after 4 packed steps (8 concept-steps) and cat-3 takes its slot at once: the pack stays full.
    assert seen[0] == (8, 2)
    assert seen[-1] == (15, 0)


def test_results_are_reported_the_moment_each_concept_finishes(base):
    order = []
    ResidualTrainer(base, pack=3).train(concepts(), on_result=lambda r: order.append(r.concept_id))
    assert order == ["dog-2", "cat-3", "teapot-1"]  # by step count: 4, 5, 6


def test_latents_and_lower_text_layers_are_computed_once(base):
    calls = {"vae": 0, "layer0": 0}
    original_encode = base.vae.encode

    def counting_encode(*args, **kwargs):
        calls["vae"] += 1
        return original_encode(*args, **kwargs)

    def count_layer0(*_):
        calls["layer0"] += 1

    hook = base.text_encoder.encoder.layers[0].register_forward_hook(count_layer0)
    base.vae.encode = counting_encode
    try:
        trainer = ResidualTrainer(base, pack=2)
        trainer.train(concepts())
    finally:
        del base.vae.encode
        hook.remove()
    # one encode call per concept (each image and its flip in one chunk), not per step
    assert calls["vae"] == 3
    # one lower-layer pass per distinct caption ("teapot", "a dog", "cat"), not per step
    assert calls["layer0"] == 3


def test_checkpoints_at_save_steps_and_metadata(base):
    saved = {}
    config = TrainConfig(steps=6, save_steps=(2, 4, 6, 10))
    residual = train_residual(base, [png_bytes(1), png_bytes(2)], "teapot", config,
                              on_checkpoint=lambda cid, step, r: saved.setdefault(step, r))
    assert sorted(saved) == [2, 4]
    assert saved[2].meta["steps"] == 2 and saved[2].meta["checkpoint_of_steps"] == 6
    meta = residual.meta
    assert meta["steps"] == 6 and meta["class_word"] == "teapot" and meta["caption"] == "teapot"
    assert meta["base_model"] == "tiny" and meta["base_fingerprint"] == base.fingerprint
    assert meta["learning_rate"] == 0.01 and meta["batch_size"] == 2 and meta["seed"] == 0
    assert math.isfinite(meta["final_loss"]) and meta["training_fingerprint"].startswith("sha256:")
    assert Residual.load(residual.to_bytes()).meta == meta
    assert residual.layers == (2, 3, 4) and residual.tokens == 1  # the last three layers of the tiny encoder


def test_same_seed_same_residual_and_seed_matters(base):
    images = [png_bytes(1), png_bytes(2)]
    a = train_residual(base, images, "teapot", TrainConfig(steps=3, seed=5))
    b = train_residual(base, images, "teapot", TrainConfig(steps=3, seed=5))
    c = train_residual(base, images, "teapot", TrainConfig(steps=3, seed=6))
    assert torch.equal(a.tensor, b.tensor)
    assert not torch.allclose(a.tensor, c.tensor)


def test_a_bad_concept_never_stops_the_others(base):
    batch = [
        Concept("bad", [png_bytes(1), b"definitely not an image"], "cat", image_names=["ok.png", "s3://b/broken.jpg"],
                config=TrainConfig(steps=2)),
        Concept("empty", [], "cat", config=TrainConfig(steps=2)),
        Concept("diverges", [png_bytes(2)], "cat", config=TrainConfig(steps=3, learning_rate=1e30)),
        Concept("good", [png_bytes(3)], "cat", config=TrainConfig(steps=2)),
    ]
    results = {r.concept_id: r for r in ResidualTrainer(base, pack=2).train(batch)}
    assert results["good"].status == "ok"
    assert results["bad"].status == "failed" and "s3://b/broken.jpg is not a decodable image" in results["bad"].error
    assert results["empty"].status == "failed" and "no images" in results["empty"].error
    assert results["diverges"].status == "failed" and "non-finite" in results["diverges"].error


def test_config_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match="steps must be"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="steps must be an integer in 1..100,000"):
        TrainConfig(steps=10**9)
    with pytest.raises(ValueError, match="learning_rate must be a positive finite number, got nan"):
        TrainConfig(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="steps must be"):
        TrainConfig(steps=True)


def test_training_fingerprint_tracks_inputs(base):
    target = training_target(base)
    concept = Concept("cat-1", ["a.png", "b.png"], "cat")
    same = training_fingerprint(concept, ["a", "b"], target)
    assert same == training_fingerprint(Concept("renamed", ["x.png", "y.png"], "cat"), ["a", "b"], target)  # content identity
    assert same != training_fingerprint(concept, ["a", "c"], target)
    assert same != training_fingerprint(Concept("cat-1", ["a.png", "b.png"], "cat", "a cat"), ["a", "b"], target)
    assert same != training_fingerprint(Concept("cat-1", ["a.png", "b.png"], "cat", config=TrainConfig(steps=999)),
                                        ["a", "b"], target)
    assert same != training_fingerprint(
        Concept("cat-1", ["a.png", "b.png"], "cat", config=TrainConfig(prefix_logit_bias=0.0)), ["a", "b"], target)
    assert same != training_fingerprint(concept, ["a", "b"], replace(target, base_fingerprint="sha256:other"))
    assert same != training_fingerprint(concept, ["a", "b"], training_target(base, resolution=128))
    with pytest.raises(ValueError, match="2 images"):
        training_fingerprint(concept, ["a"], target)


def test_the_trainer_records_the_fingerprint_the_driver_computes(base):
    """The batch driver decides what is up to date with training_fingerprint(concept, digests, target);
    the residual the trainer writes must carry exactly that value, or reruns would retrain everything."""
    images = [png_bytes(1), png_bytes(2)]
    concept = Concept("teapot-1", images, "teapot", config=TrainConfig(steps=2, save_steps=()))
    result = ResidualTrainer(base, pack=1).train([concept])[0]
    expected = training_fingerprint(concept, [image_digest(b) for b in images], training_target(base))
    assert result.residual.meta["training_fingerprint"] == expected


def test_default_recipe_is_the_reference_recipe():
    config = TrainConfig()
    assert (config.steps, config.learning_rate, config.batch_size, config.weight_decay, config.init_std) == (1000, 1e-2, 2, 0.01, 1.0)
    assert config.prefix_logit_bias == 1.0  # the reference code's mask quirk, which its hyper-parameters were tuned with


# ---- resumable state ------------------------------------------------------------------------


class _Interrupted(Exception):
    """Stands in for a worker being killed right after a state was saved."""


def train_until_first_state(base, batch, every, pack=1):
    """Train with state_every=every and stop at the first state; returns {concept_id: (fingerprint, step, bytes)}."""
    saved = {}

    def on_state(concept_id, fingerprint, step, data):
        saved[concept_id] = (fingerprint, step, data)
        raise _Interrupted

    with pytest.raises(_Interrupted):
        ResidualTrainer(base, pack=pack).train(batch, state_every=every, on_state=on_state)
    return saved


def assert_identical_result(a, b):
    """Bit for bit: the same computation with the same shapes in one process (only a pack changes the shapes)."""
    assert a.status == b.status == "ok"
    assert a.steps == b.steps
    assert torch.equal(a.residual.tensor, b.residual.tensor)
    assert a.final_loss == b.final_loss


@contextlib.contextmanager
def unet_forward_calls(base):
    """Counts the real UNet's forward calls while the block runs: one per packed training step."""
    calls = []
    hook = base.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


def test_a_resumed_concept_ends_exactly_as_an_uninterrupted_one(base):
    # batch 3 over 2 images: the state is saved mid-epoch, so the remaining shuffled order must carry over
    concept = Concept("teapot-1", [png_bytes(1), png_bytes(2)], "teapot",
                      config=TrainConfig(steps=6, seed=3, batch_size=3, save_steps=()))
    states = []
    with unet_forward_calls(base) as straight_calls:
        straight = ResidualTrainer(base, pack=1).train(
            [concept], state_every=3, on_state=lambda *args: states.append(args[:3]))[0]
    assert len(straight_calls) == 6 and straight.resumed_from_step == 0
    assert states == [("teapot-1", straight.residual.meta["training_fingerprint"], 3)]  # none at the last step
    alone = ResidualTrainer(base, pack=1).train([concept])[0]
    assert torch.equal(straight.residual.tensor, alone.residual.tensor)  # saving changes nothing

    fingerprint, step, data = train_until_first_state(base, [concept], every=3)["teapot-1"]
    assert step == 3
    asked, progress = [], []

    def resume(c, fp):
        asked.append((c.concept_id, fp))
        return data

    with unet_forward_calls(base) as resumed_calls:  # a new trainer, as after a restart
        resumed = ResidualTrainer(base, pack=1).train([concept], resume=resume, on_progress=progress.append)[0]
    assert asked == [("teapot-1", fingerprint)]
    # It continued from the saved state: only steps 4..6 ran, and the result says where it started.
    assert resumed.resumed_from_step == 3 and resumed.resume_problem is None
    assert len(resumed_calls) == 3
    assert (progress[-1].steps_done, progress[-1].steps_total) == (3, 3)
    assert_identical_result(resumed, straight)


def test_state_bytes_are_weights_only_and_restore_everything(base):
    concept = Concept("dog-2", [png_bytes(3), png_bytes(4), png_bytes(5)], "dog", "a dog",
                      TrainConfig(steps=5, seed=7, batch_size=2, save_steps=()))
    _, _, data = train_until_first_state(base, [concept], every=2)["dog-2"]
    payload = torch.load(io.BytesIO(data), weights_only=True)
    assert payload["step"] == 2 and payload["concept_id"] == "dog-2" and payload["format"] == 1
    assert int(payload["optimizer"]["step"]) == 2 and payload["losses"].numel() == 2
    assert payload["order"].numel() == 2  # 4 picks from epochs of 3 images: 2 left of the second
    state = ResidualTrainer(base, pack=1).prepare(concept, resume=data)
    assert state.step == 2 and len(state.losses) == 2 and state.order.tolist() == payload["order"].tolist()
    assert torch.equal(state.residual.detach(), payload["residual"])
    moments = state.moments
    assert torch.equal(moments["exp_avg_sq"], payload["optimizer"]["exp_avg_sq"])
    assert torch.equal(state.generator.get_state(), payload["generator"])


@pytest.mark.parametrize("prefetch", [0, 2])  # the batch worker resumes through the prefetch thread
def test_resuming_one_concept_inside_a_pack(base64, prefetch):
    batch = concepts()
    straight = train_saving_every_state(ResidualTrainer(base64, pack=3), batch)
    # dog-2 alone was stopped after its step-2 state; it now rejoins a pack with the other two (other
    # shapes than in `straight`, hence float64).
    _, _, data = train_until_first_state(base64, [batch[1]], every=2)["dog-2"]
    progress = []
    resumed = train_saving_every_state(ResidualTrainer(base64, pack=3), batch, prefetch=prefetch,
                                       resume=lambda c, fp: data if c.concept_id == "dog-2" else None,
                                       on_progress=progress.append)
    assert {k: r.resumed_from_step for k, r in resumed[0].items()} == {"teapot-1": 0, "dog-2": 2, "cat-3": 0}
    assert all(r.resume_problem is None for r in resumed[0].values())
    # 6 + 5 steps of the fresh concepts and only the last 2 of dog-2's 4.
    assert (progress[-1].steps_done, progress[-1].steps_total) == (13, 13)
    assert ("dog-2", 3) in resumed[1]  # its state after the resumed step is compared too
    assert_same_training(resumed, straight)


def test_a_state_of_another_concept_or_recipe_is_refused(base):
    images = [png_bytes(1), png_bytes(2)]
    concept = Concept("teapot-1", images, "teapot", config=TrainConfig(steps=4, save_steps=()))
    _, _, data = train_until_first_state(base, [concept], every=2)["teapot-1"]
    trainer = ResidualTrainer(base, pack=1)
    with pytest.raises(StateMismatchError, match="fingerprint"):
        trainer.prepare(Concept("teapot-1", images, "teapot", config=TrainConfig(steps=5, save_steps=())), resume=data)
    with pytest.raises(StateMismatchError, match="for concept 'teapot-1', not 'renamed'"):
        trainer.prepare(replace(concept, concept_id="renamed"), resume=data)
    with pytest.raises(StateMismatchError, match="unreadable"):
        trainer.prepare(concept, resume=data[: len(data) // 2])
    with pytest.raises(StateMismatchError, match="unreadable"):
        trainer.prepare(concept, resume=b"not a state")
    assert issubclass(StateMismatchError, ValueError)


def test_an_unusable_state_is_reported_and_the_concept_trains_from_step_0(base, caplog):
    images = [png_bytes(1), png_bytes(2)]
    concept = Concept("teapot-1", images, "teapot", config=TrainConfig(steps=4, save_steps=()))
    # A real state of the same concept under another recipe (6 steps): its fingerprint no longer matches.
    _, _, other_recipe = train_until_first_state(
        base, [replace(concept, config=TrainConfig(steps=6, save_steps=()))], every=2)["teapot-1"]
    trainer = ResidualTrainer(base, pack=1)
    fresh = trainer.train([concept])[0]
    assert fresh.resumed_from_step == 0 and fresh.resume_problem is None  # nothing offered, nothing to report
    for data, problem in [(b"not a state", "unreadable training state"), (other_recipe, "fingerprint")]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="catversion.training"), unet_forward_calls(base) as calls:
            ignored = trainer.train([concept], resume=lambda c, fp: data)[0]
        assert ignored.status == "ok" and ignored.resumed_from_step == 0
        assert problem in ignored.resume_problem
        assert len(calls) == 4  # every step ran: it started over
        assert torch.equal(ignored.residual.tensor, fresh.residual.tensor) and ignored.steps == 4
        assert f"'teapot-1': not resuming its saved training state: {ignored.resume_problem}" in caplog.text


# ---- background preparation (prefetch) ----------------------------------------------------


def five_concepts(bad=None):
    made = []
    for i in range(5):
        images = [png_bytes(20 + i), png_bytes(30 + i)]
        names = None
        if i == bad:
            images, names = [png_bytes(20 + i), b"not an image"], ["ok.png", "s3://b/broken.jpg"]
        made.append(Concept(f"c{i}", images, "cat", image_names=names,
                            config=TrainConfig(steps=2 + i % 3, seed=i, batch_size=1, save_steps=())))
    return made


def slow(batch, delay=0.05):
    for concept in batch:
        time.sleep(delay)  # as a source that fetches images over the network
        yield concept


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "catversion-prefetch"]


def test_prefetch_gives_the_same_results(base64):
    # With prefetch a concept may share the pack with other concepts than without it: other shapes, so float64.
    preparing_on = set()

    def resume(concept, fingerprint):
        preparing_on.add(threading.current_thread().name)
        return None

    plain = train_saving_every_state(ResidualTrainer(base64, pack=2), slow(five_concepts()))
    ahead = train_saving_every_state(ResidualTrainer(base64, pack=2), slow(five_concepts()), prefetch=3, resume=resume)
    assert preparing_on == {"catversion-prefetch"}
    assert sorted(plain[0]) == sorted(ahead[0]) == [f"c{i}" for i in range(5)]
    assert_same_training(ahead, plain)
    assert not prefetch_threads()


def test_prefetch_trains_while_the_source_is_still_fetching(base):
    first, second = five_concepts()[:2]
    first = replace(first, config=replace(first.config, steps=12))  # progress is reported at step 10
    training = threading.Event()
    arrived = []

    def source():
        yield first
        # The next concept arrives only once the pack (holding just `first`) trains; a loop that waited
        # for a full pack, as prefetch=0 does, would sit here for the whole timeout.
        arrived.append(training.wait(timeout=20))
        yield second

    results = ResidualTrainer(base, pack=2).train(source(), prefetch=2, on_progress=lambda p: training.set())
    assert arrived == [True]
    assert [r.status for r in results] == ["ok", "ok"]


def test_prefetch_reports_a_bad_concept_and_finishes_the_others(base):
    reported = []
    results = ResidualTrainer(base, pack=2).train(slow(five_concepts(bad=2)), prefetch=2,
                                                  on_result=reported.append)
    assert reported == results
    by_id = {r.concept_id: r for r in results}
    assert by_id["c2"].status == "failed" and "s3://b/broken.jpg is not a decodable image" in by_id["c2"].error
    assert all(by_id[f"c{i}"].status == "ok" for i in (0, 1, 3, 4))
    assert not prefetch_threads()


def test_prefetch_raises_the_sources_exception_and_leaves_no_thread(base):
    def broken():
        yield from five_concepts()[:2]
        raise RuntimeError("listing the bucket failed")

    with pytest.raises(RuntimeError, match="listing the bucket failed"):
        ResidualTrainer(base, pack=2).train(broken(), prefetch=2)
    assert not prefetch_threads()

    def endless():
        while True:
            yield from slow(five_concepts(), delay=0.01)

    def stop(_):
        raise _Interrupted

    with pytest.raises(_Interrupted):  # train() ends on the main thread's error: the thread ends with it
        ResidualTrainer(base, pack=2).train(endless(), prefetch=2, on_result=stop)
    assert not prefetch_threads()


# ---- image decoding ------------------------------------------------------------------------


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).size == (20, 40)


def test_rgba_and_greyscale_become_rgb():
    rgba = decode_image(png_bytes(1, mode="RGBA"))
    grey = decode_image(png_bytes(1, mode="L"))
    assert rgba.mode == grey.mode == "RGB"
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    buffer = io.BytesIO()
    clear.save(buffer, format="PNG")
    assert decode_image(buffer.getvalue()).getpixel((0, 0)) == (255, 255, 255)  # transparent → white, not black


def png_header_only(width, height):
    """A PNG that claims a huge size: the guard must refuse it before decoding any pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    header = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + header + end


def test_oversized_and_undecodable_images_are_named():
    with pytest.raises(ImageError, match=r"bomb\.png is 11000x11000 .*decompression-bomb"):
        decode_image(png_header_only(11000, 11000), "bomb.png")
    with pytest.raises(ImageError, match=r"huge\.png is too large to decode safely"):
        decode_image(png_header_only(40000, 40000), "huge.png")
    with pytest.raises(ImageError, match="notes.txt is not a decodable image"):
        decode_image(b"hello", "notes.txt")


def test_image_files_are_refused_unread_when_not_regular_or_over_the_byte_cap(tmp_path):
    import os

    from catversion.images import fetch_image, read_source
    from catversion.limits import MAX_IMAGE_BYTES

    huge = tmp_path / "huge.png"
    with open(huge, "wb") as handle:
        handle.truncate(MAX_IMAGE_BYTES + 1)  # sparse: nothing of it would fit the cap, so nothing is read
    with pytest.raises(ImageError, match=rf"huge\.png is {MAX_IMAGE_BYTES + 1:,} bytes, over the limit of "
                                         rf"{MAX_IMAGE_BYTES:,} \(MAX_IMAGE_BYTES .*\); downscale or recompress it"):
        fetch_image(str(huge))
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageError, match=r"pipe\.png is a FIFO \(named pipe\), not a regular file"):
        read_source(str(tmp_path / "pipe.png"))
    with pytest.raises(ImageError, match="is a directory"):
        read_source(str(tmp_path))
    with pytest.raises(ImageError, match=rf"inline\.png is {MAX_IMAGE_BYTES + 1:,} bytes, over the limit"):
        read_source(bytes(MAX_IMAGE_BYTES + 1), "inline.png")  # inline bytes are held to the same cap


def test_a_decode_waits_for_its_share_of_the_decode_memory_budget(monkeypatch):
    """Decodes running at once are bounded by bytes (width x height x DECODE_BYTES_PER_PIXEL), not by
    threads; one larger than the whole budget runs alone, once nothing else holds any."""
    from catversion import images

    budget = images.DecodeMemory(limit=1024)
    monkeypatch.setattr(images, "_decode_memory", budget)
    photo = png_bytes(1)  # any real image costs more than the whole budget
    decoded = []
    with budget.hold(1):  # something else is decoding
        decoder = threading.Thread(target=lambda: decoded.append(decode_image(photo, "photo.png")), daemon=True)
        decoder.start()
        decoder.join(0.5)
        assert decoder.is_alive() and not decoded, "the decode did not wait for its share of the budget"
    decoder.join(30)
    assert decoded and decoded[0].size == Image.open(io.BytesIO(photo)).size and budget.used == 0


def test_the_decode_memory_budget_is_first_come_first_served():
    """A large decode waiting for room is not overtaken by small ones that would fit now (it would starve)."""
    from catversion.images import DecodeMemory

    budget, order = DecodeMemory(limit=100), []

    def decode(name: str, nbytes: int) -> threading.Thread:
        def run() -> None:
            with budget.hold(nbytes):
                order.append(name)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    with budget.hold(10):
        large = decode("large", 95)
        large.join(0.2)
        small = decode("small", 10)  # fits next to the 10 held (not next to the large one), but comes after it
        small.join(0.5)
        assert order == [] and large.is_alive() and small.is_alive()
    large.join(30)
    small.join(30)
    assert order == ["large", "small"] and budget.used == 0
