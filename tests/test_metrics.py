"""The evaluation metrics on the built-in tiny models: the paper's CLIP-T, CLIP-I, masked CLIP-I; DreamBooth's DINO."""

import json
import math

import numpy as np
import pytest
from PIL import Image, ImageChops, ImageDraw

from catversion.metrics import CLIP_MEAN, CLIP_STD, FILL, IMAGENET_MEAN, IMAGENET_STD, Preprocess, Scorer, mask_out
from catversion.models import ModelNotAvailableError
from catversion.samples import concept_images


@pytest.fixture(scope="module")
def scorer():
    return Scorer.load(clip="tiny", seg="tiny", dino="tiny", batch_size=2)


def object_on(background: Image.Image) -> tuple[Image.Image, np.ndarray]:
    """A striped disc pasted on ``background``: the same object pixels whatever the background, and
    its exact mask."""
    mask_image = Image.new("L", background.size, 0)
    ImageDraw.Draw(mask_image).ellipse([14, 18, 50, 54], fill=255)
    stripes = Image.new("RGB", background.size, (200, 30, 30))
    draw = ImageDraw.Draw(stripes)
    for y in range(0, background.height, 6):
        draw.rectangle([0, y, background.width, y + 2], fill=(250, 240, 210))
    image = background.copy()
    image.paste(stripes, (0, 0), mask_image)
    return image, np.asarray(mask_image) >= 128


def noise(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def test_identical_images_score_one(scorer):
    photo = concept_images("red-teapot", n=1, size=64)[0]
    copies = [photo.copy() for _ in range(3)]
    assert scorer.clip_i([photo, photo.copy()], copies).mean == pytest.approx(1.0, abs=1e-5)
    assert scorer.dino([photo], copies).mean == pytest.approx(1.0, abs=1e-5)
    # A set of different photos against itself: every image matches its own copy exactly.
    photos = concept_images("blue-mug", n=3, size=64)
    for similarity in (scorer.clip_i(photos, photos), scorer.dino(photos, photos)):
        assert np.allclose(np.diag(similarity.matrix), 1.0, atol=1e-5)
        assert similarity.mean == pytest.approx(np.mean(similarity.per_generated))
        assert len(similarity.per_generated) == 3


def test_masked_clip_i_ignores_the_background_that_moves_clip_i(scorer):
    references = [object_on(noise(1))[0], object_on(Image.new("RGB", (64, 64), (90, 140, 200)))[0]]
    reference_masks = [object_on(noise(1))[1]] * 2
    on_grass, mask = object_on(noise(2))
    on_wall, _ = object_on(Image.new("RGB", (64, 64), (230, 225, 215)))

    plain = [scorer.clip_i(references, [image]).mean for image in (on_grass, on_wall)]
    masked = [scorer.masked_clip_i(references, [image], "teapot", reference_masks, [mask]).mean
              for image in (on_grass, on_wall)]
    assert abs(plain[0] - plain[1]) > 1e-3
    assert masked[0] == pytest.approx(masked[1], abs=1e-9)
    # An "L" image mask means the same as the bool array.
    as_image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    assert scorer.masked_clip_i(references, [on_grass], "teapot", reference_masks, [as_image]).mean == \
        pytest.approx(masked[0], abs=1e-9)


def test_mask_out_keeps_the_frame_and_replaces_the_background():
    """The paper's masked CLIP-I: full frame, every pixel outside the mask set to the fill colour, the
    object's pixels where they were."""
    image, mask = object_on(noise(3))
    (masked,) = mask_out([image], [mask])
    assert masked.size == image.size
    before, after = np.asarray(image), np.asarray(masked)
    assert np.array_equal(after[mask], before[mask])
    assert (after[~mask] == FILL).all()
    (empty,) = mask_out([image], [np.zeros((64, 64), dtype=bool)])
    assert empty.size == image.size and empty.getcolors() == [(64 * 64, FILL)]


def test_mask_out_crop_cuts_to_the_object_on_a_fill_square():
    image, mask = object_on(noise(3))
    (cut,) = mask_out([image], [mask], crop=True)
    assert cut.size == (37, 37)  # the disc's bounding box, already square
    assert cut.getpixel((0, 0)) == FILL
    assert cut.getpixel((18, 18)) == image.getpixel((14 + 18, 18 + 18))
    wide = Image.new("RGB", (64, 64), (10, 20, 30))
    bar = np.zeros((64, 64), dtype=bool)
    bar[30:34, 8:48] = True  # 40 x 4 px: padded to a 40 x 40 square, the bar in its middle rows
    (square,) = mask_out([wide], [bar], crop=True)
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == FILL and square.getpixel((0, 18)) == (10, 20, 30)


def test_scorer_masks_full_frame_unless_asked_to_crop(scorer):
    image, mask = object_on(noise(7))
    assert scorer.mask_out([image], [mask])[0].size == image.size
    cropping = Scorer(scorer.clip_model, scorer.seg_model, scorer.dino_model, masked_crop=True)
    assert cropping.mask_out([image], [mask])[0].size == (37, 37)
    # The same object moved elsewhere in the frame: full frame scores the move, the crop ignores it.
    moved, moved_mask = ImageChops.offset(image, 10, -8), np.roll(mask, (-8, 10), axis=(0, 1))
    full = scorer.masked_clip_i([image], [moved], "teapot", [mask], [moved_mask]).mean
    cropped = cropping.masked_clip_i([image], [moved], "teapot", [mask], [moved_mask]).mean
    assert cropped == pytest.approx(1.0, abs=1e-5)
    assert full < cropped - 1e-3


def test_segmenter_masks_run_end_to_end(scorer):
    images = concept_images("red-teapot", n=2, size=64) + [noise(4, size=(80, 48))]
    masks = scorer.masks(images, "teapot")
    assert [m.shape for m in masks] == [(64, 64), (64, 64), (48, 80)]
    assert all(m.dtype == np.bool_ for m in masks)
    masked = scorer.mask_out(images, masks)
    assert len(masked) == 3 and all(m.mode == "RGB" for m in masked)
    value = scorer.masked_clip_i(images[:2], images[2:], "teapot").mean
    assert math.isfinite(value) and -1.0 <= value <= 1.0


def test_clip_t_scores_each_image_higher_against_its_matching_prompt_than_a_mismatched_one(scorer):
    """With random weights no prompt describes an image, so "matching" is defined in the model's own space:
    for each image, the candidate prompt whose CLIP text embedding is nearest its image embedding matches,
    the farthest one does not. CLIP-T must rank them so, each image against its own prompt."""
    images = concept_images("blue-mug", n=3, size=64)
    candidates = ["a mug on the beach", "a mug in the snow", "a red mug", "a photo of a mug", "a teapot", "a dog"]
    cosines = (scorer.text_embeddings(candidates) @ scorer.image_embeddings(images).T).numpy()  # [prompt, image]
    nearest, farthest = cosines.argmax(axis=0), cosines.argmin(axis=0)
    assert (cosines.max(axis=0) - cosines.min(axis=0) > 1e-3).all(), "the candidates must not tie"

    matching = scorer.clip_t([candidates[i] for i in nearest], images)
    mismatched = scorer.clip_t([candidates[i] for i in farthest], images)
    assert all(m > x for m, x in zip(matching, mismatched, strict=True)), (matching, mismatched)
    # Exactly those cosines, image i with prompt i (float32 embeddings: a few units in the 7th digit).
    columns = np.arange(len(images))
    assert matching == pytest.approx(cosines[nearest, columns].tolist(), abs=1e-5)
    assert mismatched == pytest.approx(cosines[farthest, columns].tolist(), abs=1e-5)
    assert scorer.clip_t("a mug", images) == pytest.approx(scorer.clip_t(["a mug"] * 3, images), abs=1e-6)
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.clip_t(["a mug", "a cup"], images)


def test_score_gives_every_metric_per_generated_image_and_a_copy_of_the_reference_scores_highest(scorer):
    """Generated images: an exact copy of the reference photo, another photo of the same object, a different
    object. A copy scores 1 on every image metric (its masked copy is identical too), and anything else less."""
    (reference,) = concept_images("red-teapot", n=1, size=64)
    generated = [reference.copy(), concept_images("red-teapot", n=2, size=64, seed=7)[1],
                 concept_images("blue-mug", n=1, size=64)[0]]
    prompts = ["a teapot", "a teapot on a table", "a mug"]
    scores = scorer.score([reference], generated, prompts, "teapot")
    for metric in ("clip_i", "masked_clip_i", "dino"):
        copy, *others = getattr(scores, metric)
        assert copy == pytest.approx(1.0, abs=1e-5), metric
        assert all(other < 1.0 - 1e-3 for other in others), (metric, others)
    assert scores.clip_t == pytest.approx(scorer.clip_t(prompts, generated), abs=1e-6)  # CLIP-T's own pairing
    assert scores.means() == pytest.approx({m: float(np.mean(getattr(scores, m))) for m in scores.means()})
    assert len(scores.reference_masks) == 1 and len(scores.generated_masks) == 3


def test_bad_masks_are_refused_by_name(scorer):
    image, mask = object_on(noise(5))
    with pytest.raises(ValueError, match="mask 0 is 32x32 but its image is 64x64"):
        mask_out([image], [np.zeros((32, 32), dtype=bool)])
    with pytest.raises(TypeError, match="bool numpy array"):
        mask_out([image], [mask.astype(np.uint8)])
    with pytest.raises(TypeError, match="single image"):
        scorer.clip_i(image, [image])


def test_tiny_models_are_the_same_every_load(scorer):
    again = Scorer.load(clip="tiny", seg="tiny", dino="tiny")
    images = concept_images("green-vase", n=2, size=64)
    assert np.array_equal(scorer.image_embeddings(images).numpy(), again.image_embeddings(images).numpy())
    assert np.array_equal(scorer.dino_embeddings(images).numpy(), again.dino_embeddings(images).numpy())


def test_missing_model_names_itself_and_how_to_get_it(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="DINO model .*no-dino.*hf download facebook/dino-vits16"):
        Scorer.load(clip="tiny", seg="tiny", dino=str(tmp_path / "no-dino"))


def test_models_load_from_hub_style_folders(scorer, tmp_path):
    """The tiny models saved as the hub lays models out load by folder and score the same: the path
    real CLIP, CLIPSeg and DINO checkpoints take (their preprocessor_config.json read, not guessed)."""
    processor_configs = {
        "clip": {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
                 "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3},
        "seg": {"size": {"height": 32, "width": 32}, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
                "resample": 2},
        "dino": {"size": 32, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "resample": 2},
    }
    folders = {}
    for role, loaded in (("clip", scorer.clip_model), ("seg", scorer.seg_model), ("dino", scorer.dino_model)):
        folder = folders[role] = tmp_path / role
        loaded.model.save_pretrained(folder)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(folder)
        (folder / "preprocessor_config.json").write_text(json.dumps(processor_configs[role]))
    from_folders = Scorer.load(clip=str(folders["clip"]), seg=str(folders["seg"]), dino=str(folders["dino"]))

    images = concept_images("yellow-duck", n=2, size=64) + [noise(6, size=(72, 40))]
    assert np.allclose(from_folders.image_embeddings(images), scorer.image_embeddings(images), atol=1e-6)
    assert np.allclose(from_folders.text_embeddings(["a toy"]), scorer.text_embeddings(["a toy"]), atol=1e-6)
    assert np.allclose(from_folders.dino_embeddings(images), scorer.dino_embeddings(images), atol=1e-6)
    for ours, theirs in zip(from_folders.masks(images, "toy"), scorer.masks(images, "toy")):
        assert np.array_equal(ours, theirs)


def test_preprocess_reads_processor_configs_and_normalizes_exactly():
    clip = Preprocess.from_processor_config({"size": 224, "crop_size": 224, "do_center_crop": True}, square=False,
                                            mean=(0.5,) * 3, std=(0.5,) * 3, resample=3)
    assert (clip.resize, clip.crop, clip.resample) == (224, (224, 224), Image.Resampling.BICUBIC)
    seg = Preprocess.from_processor_config({"size": {"height": 352, "width": 352}, "resample": 2}, square=True,
                                           mean=(0.5,) * 3, std=(0.5,) * 3, resample=3)
    assert (seg.resize, seg.crop, seg.resample) == ((352, 352), None, Image.Resampling.BILINEAR)

    wide = Image.new("RGB", (90, 30), (51, 102, 204))
    pixels = Preprocess(12, (12, 12), mean=(0.2, 0.4, 0.8), std=(0.5, 0.5, 0.5))([wide])
    assert pixels.shape == (1, 3, 12, 12)
    assert np.allclose(pixels.numpy(), 0.0, atol=1e-6)  # (c / 255 - mean) / std with c / 255 == mean
