"""Synthetic concept photos: deterministic, varied within a concept, recognisably one object per concept."""

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from catversion.samples import SAMPLE_CONCEPTS, concept_images, concept_jpegs, write_concept_images


def hue_signature(image: Image.Image) -> np.ndarray:
    """Hue histogram of the clearly coloured pixels: the backgrounds are near-neutral, so this is the object."""
    hsv = np.asarray(image.convert("HSV"), dtype=np.int32)
    coloured = (hsv[..., 1] > 128) & (hsv[..., 2] > 64)
    counts, _ = np.histogram(hsv[..., 0][coloured], bins=18, range=(0, 256))
    return counts / counts.sum()


def test_builtin_concepts_are_distinct_objects():
    assert len(SAMPLE_CONCEPTS) >= 4
    assert all(cid == c.concept_id for cid, c in SAMPLE_CONCEPTS.items())
    assert SAMPLE_CONCEPTS["red-teapot"].class_word == "teapot"
    assert len({(c.shape, c.body) for c in SAMPLE_CONCEPTS.values()}) == len(SAMPLE_CONCEPTS)


@pytest.mark.parametrize("size", [64, 256])
def test_images_are_rgb_of_the_requested_size(size):
    images = concept_images("blue-mug", n=3, size=size)
    assert len(images) == 3
    assert all(im.mode == "RGB" and im.size == (size, size) for im in images)


def test_same_arguments_give_identical_pixels_and_jpeg_bytes():
    first = concept_images("red-teapot", n=4, size=96, seed=7)
    again = concept_images("red-teapot", n=4, size=96, seed=7)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    assert concept_jpegs("red-teapot", n=4, size=96, seed=7) == concept_jpegs("red-teapot", n=4, size=96, seed=7)


def test_image_i_does_not_depend_on_n():
    few, many = concept_images("green-vase", n=2, size=64), concept_images("green-vase", n=5, size=64)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(few, many))


def test_different_seeds_give_different_photos():
    a = concept_jpegs("yellow-duck", n=3, size=64, seed=0)
    b = concept_jpegs("yellow-duck", n=3, size=64, seed=1)
    assert set(a).isdisjoint(b)


@pytest.mark.parametrize("concept_id", sorted(SAMPLE_CONCEPTS))
def test_photos_of_one_concept_differ_from_each_other(concept_id):
    pixels = [np.asarray(im, dtype=np.float32) for im in concept_images(concept_id, n=5, size=128)]
    for a, b in itertools.combinations(pixels, 2):
        assert np.abs(a - b).mean() > 10


@pytest.mark.parametrize("seed", [0, 3])
def test_a_concepts_photos_are_closer_to_each_other_than_to_other_concepts(seed):
    signatures = {
        cid: [hue_signature(im) for im in concept_images(cid, n=5, size=128, seed=seed)] for cid in SAMPLE_CONCEPTS
    }
    within = max(np.abs(a - b).sum() for sigs in signatures.values() for a, b in itertools.combinations(sigs, 2))
    across = min(
        np.abs(a - b).sum()
        for (_, sigs1), (_, sigs2) in itertools.combinations(signatures.items(), 2)
        for a in sigs1
        for b in sigs2
    )
    assert within < across


def test_jpegs_decode_to_the_same_photos():
    images = concept_images("blue-mug", n=2, size=128)
    for data, image in zip(concept_jpegs("blue-mug", n=2, size=128, quality=95), images):
        decoded = Image.open(io.BytesIO(data))
        assert decoded.format == "JPEG" and decoded.mode == "RGB" and decoded.size == (128, 128)
        assert np.abs(np.asarray(decoded, dtype=np.float32) - np.asarray(image, dtype=np.float32)).mean() < 4


def test_write_concept_images_writes_n_jpeg_files(tmp_path):
    folder = tmp_path / "photos" / "teapot"
    paths = write_concept_images("red-teapot", folder, n=3, size=64)
    assert [p.name for p in paths] == ["red-teapot-0.jpg", "red-teapot-1.jpg", "red-teapot-2.jpg"]
    assert all(p.parent == folder and p.is_file() for p in paths)
    assert [p.read_bytes() for p in paths] == concept_jpegs("red-teapot", n=3, size=64)


def test_unknown_concept_id_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown sample concept 'purple-cat'") as excinfo:
        concept_images("purple-cat")
    assert all(cid in str(excinfo.value) for cid in SAMPLE_CONCEPTS)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: concept_images("red-teapot", n=-1), "n must be >= 0"),
        (lambda: concept_images("red-teapot", size=8), "size must be >= 16"),
        (lambda: concept_jpegs("red-teapot", quality=0), "quality must be in 1..100"),
    ],
)
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
