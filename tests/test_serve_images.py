"""serve/images.py: output formats, signed endpoint links, presigned S3 links and the sweep.

Real parts only: a tmp_path folder, and moto's S3 server over HTTP (tests/conftest.py).
"""

import hashlib
import hmac
import io
import os
import re
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from PIL import Image

from catversion import storage
from serve.images import MEDIA_TYPES, OUTPUT_FORMATS, ImageNotFoundError, ImageStore, encode_image

SECRET = b"test-secret-for-image-links"
BASE = "http://api.example:8000/"


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def picture(mode: str = "RGB", size=(96, 64)) -> Image.Image:
    """A smooth gradient (compresses like a real picture, unlike noise)."""
    gray = Image.linear_gradient("L").resize(size)
    image = Image.merge("RGB", (gray, gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gray.rotate(180)))
    return image.convert(mode)


def link_parts(url: str) -> tuple[str, str, str]:
    """(name, expires, signature) of an endpoint link, parsed as the server's route would."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    return parts.path.rsplit("/", 1)[1], query["expires"][0], query["signature"][0]


@pytest.fixture
def s3_prefix(s3_endpoint):
    """A bucket of this file's own, under a fresh prefix per test."""
    import boto3

    bucket = "serve-images-test"
    client = boto3.client("s3")
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return f"s3://{bucket}/links-{uuid.uuid4().hex[:8]}"


# ---- encode_image ------------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_encode_round_trips_in_each_format(output_format, mode):
    data = encode_image(picture(mode), output_format)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[output_format]
    assert decoded.size == (96, 64)
    decoded.load()
    assert Image.MIME[decoded.format] == MEDIA_TYPES[output_format]


def test_png_is_the_default_and_ignores_compression():
    image = picture()
    assert Image.open(io.BytesIO(encode_image(image))).format == "PNG"
    assert encode_image(image, "png", 80) == encode_image(image, "png")


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_compression_makes_smaller_files(output_format):
    image = picture(size=(256, 256))
    default, best, compressed = (len(encode_image(image, output_format, c)) for c in (None, 100, 20))
    assert default == best > compressed  # OpenAI's scale: 100 (the default) is the best quality


@pytest.mark.parametrize("bad", [-1, 101, 50.0, True, "50"])
def test_bad_compression_is_a_value_error_naming_the_field(bad):
    with pytest.raises(ValueError, match="output_compression"):
        encode_image(picture(), "jpeg", bad)


def test_bad_format_is_a_value_error_naming_the_field():
    with pytest.raises(ValueError, match="output_format"):
        encode_image(picture(), "gif")
    with pytest.raises(ValueError, match="output_format"):
        encode_image(picture(), "JPEG")


# ---- endpoint links ----------------------------------------------------------------------------


def test_put_stores_under_the_prefix_with_a_uuid_name(tmp_path):
    store = ImageStore(str(tmp_path), ttl_s=60, secret=SECRET)
    data = encode_image(picture(), "webp")
    name = store.put(data, "webp")
    assert re.fullmatch(r"[0-9a-f]{32}\.webp", name)
    assert (tmp_path / name).read_bytes() == data
    with pytest.raises(ValueError, match="output_format"):
        store.put(data, "gif")


def test_endpoint_link_opens_with_the_parts_of_its_url(tmp_path):
    clock = FakeClock()
    store = ImageStore(str(tmp_path), ttl_s=600, secret=SECRET, clock=clock)
    assert store.links == "endpoint"  # "auto" for a folder
    data = encode_image(picture(), "jpeg", 20)
    name = store.put(data, "jpeg")
    url = store.url(name, BASE)
    assert url.startswith(f"http://api.example:8000/v1/images/files/{name}?expires=")
    name_in_url, expires, signature = link_parts(url)
    assert name_in_url == name and expires == str(int(clock.now + 600))
    assert signature == hmac.new(SECRET, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()
    assert store.open(name, expires, signature) == (data, "image/jpeg")
    clock.now += 599  # still valid up to the expiry second
    assert store.open(name, expires, signature)[0] == data


def _refused(store, name, expires, signature):
    with pytest.raises(ImageNotFoundError) as caught:
        store.open(name, expires, signature)
    return str(caught.value)


def test_bad_links_are_all_not_found_alike_and_name_no_path(tmp_path):
    clock = FakeClock()
    store = ImageStore(str(tmp_path), ttl_s=60, secret=SECRET, clock=clock)
    name = store.put(encode_image(picture()), "png")
    other = store.put(encode_image(picture()), "png")
    _, expires, signature = link_parts(store.url(name, BASE))
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    messages = [
        _refused(store, name, expires, flipped),  # tampered signature
        _refused(store, name, expires, signature.upper()),
        _refused(store, name, expires, signature[:-1]),
        _refused(store, name, expires, ""),
        _refused(store, name, expires, "é" * 64),  # non-ASCII: no TypeError from compare_digest
        _refused(store, name, expires, "\ud800" * 64),  # a lone surrogate cannot be encoded strictly
        _refused(store, other, expires, signature),  # another image's name
        _refused(store, name.replace(".png", ".webp"), expires, signature),
        _refused(store, "../" + name, expires, signature),
        _refused(store, f"{name}\n", expires, signature),
        _refused(store, name, str(int(expires) + 3600), signature),  # extended expiry
        _refused(store, name, "+" + expires, signature),
        _refused(store, name, "soon", signature),
        _refused(store, name, expires, None),
    ]
    clock.now += 61  # past the expiry
    messages.append(_refused(store, name, expires, signature))
    # A well-signed link to an image that is gone (swept, or never stored here).
    clock.now -= 61
    os.remove(tmp_path / name)
    messages.append(_refused(store, name, expires, signature))
    assert set(messages) == {"image not found or link expired"}


def test_another_replica_with_the_same_prefix_and_secret_opens_the_link(tmp_path):
    prefix = f"file://{tmp_path}/images"
    first = ImageStore(prefix, ttl_s=60, secret=SECRET)
    data = encode_image(picture(), "webp", 50)
    url = first.url(first.put(data, "webp"), BASE)
    second = ImageStore(prefix, ttl_s=60, secret=SECRET)
    assert second.open(*link_parts(url)) == (data, "image/webp")
    stranger = ImageStore(prefix, ttl_s=60, secret=b"another secret")
    with pytest.raises(ImageNotFoundError):
        stranger.open(*link_parts(url))


def test_endpoint_links_over_s3_work_across_replicas(s3_prefix):
    first = ImageStore(s3_prefix, ttl_s=60, secret=SECRET, links="endpoint")
    data = encode_image(picture(), "png")
    name = first.put(data, "png")
    assert storage.read_bytes(f"{s3_prefix}/{name}") == data
    url = first.url(name, BASE)
    second = ImageStore(s3_prefix, ttl_s=60, secret=SECRET, links="endpoint")
    assert second.open(*link_parts(url)) == (data, "image/png")
    storage.delete(f"{s3_prefix}/{name}")
    message = _refused(second, *link_parts(url))
    assert "s3://" not in message and "serve-images-test" not in message


# ---- presigned links ---------------------------------------------------------------------------


def test_presigned_link_fetches_the_bytes_from_s3(s3_prefix, s3_endpoint):
    store = ImageStore(s3_prefix, ttl_s=300, secret=SECRET)
    assert store.links == "presigned"  # "auto" for s3
    data = encode_image(picture(), "jpeg")
    url = store.url(store.put(data, "jpeg"), BASE)
    assert url.startswith(s3_endpoint) and "X-Amz-Expires=300" in url and "X-Amz-Signature=" in url
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["Content-Type"] == "image/jpeg"
    assert store.sweep() == 0  # S3: a bucket lifecycle rule expires images


# ---- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    ({"links": "signed"}, "links must be one of"),
    ({"links": "presigned"}, "needs an s3:// prefix"),
    ({"ttl_s": 0}, "ttl_s"),
    ({"ttl_s": -5}, "ttl_s"),
    ({"ttl_s": float("inf")}, "ttl_s"),
    ({"secret": b""}, "secret"),
    ({"secret": "text"}, "secret"),
])
def test_bad_settings_are_value_errors(tmp_path, kwargs, words):
    settings = {"ttl_s": 60, "secret": SECRET, **kwargs}
    with pytest.raises(ValueError, match=words):
        ImageStore(str(tmp_path), **settings)


def test_bad_prefixes_and_presigned_ttl_are_value_errors():
    with pytest.raises(ValueError, match="prefix"):
        ImageStore("gs://bucket/images", ttl_s=60, secret=SECRET)
    with pytest.raises(ValueError, match="prefix"):
        ImageStore("s3://", ttl_s=60, secret=SECRET)
    with pytest.raises(ValueError, match="7 days"):
        ImageStore("s3://bucket/images", ttl_s=8 * 24 * 3600, secret=SECRET)
    assert "test-secret" not in repr(ImageStore("s3://bucket/images", ttl_s=60, secret=SECRET))


def test_url_refuses_names_it_did_not_make(tmp_path):
    store = ImageStore(str(tmp_path), ttl_s=60, secret=SECRET)
    with pytest.raises(ValueError):
        store.url("../secrets.png", BASE)


# ---- sweep -------------------------------------------------------------------------------------


def test_sweep_removes_old_images_only(tmp_path):
    clock = FakeClock(1_700_000_000.0)
    store = ImageStore(str(tmp_path), ttl_s=100, secret=SECRET, clock=clock)
    old = [store.put(b"old", "png") for _ in range(2)]
    fresh = store.put(b"fresh", "webp")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    nested = tmp_path / "sub" / f"{uuid.uuid4().hex}.png"
    nested.write_bytes(b"elsewhere")
    for path in [*(tmp_path / n for n in old), tmp_path / "notes.txt", nested]:
        os.utime(path, (clock.now - 101, clock.now - 101))
    os.utime(tmp_path / fresh, (clock.now - 99, clock.now - 99))
    assert store.sweep() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh, "notes.txt", "sub"])
    assert nested.exists()
    assert store.sweep() == 0


def test_put_sweeps_at_most_once_per_quarter_ttl(tmp_path):
    clock = FakeClock(1_700_000_000.0)
    store = ImageStore(str(tmp_path), ttl_s=100, secret=SECRET, clock=clock)
    store.put(b"a", "png")  # the first put sweeps (nothing to remove yet)

    def age_all():
        for path in tmp_path.iterdir():
            os.utime(path, (clock.now - 200, clock.now - 200))

    age_all()
    clock.now += 24  # within ttl/4 of the last sweep: no sweep
    store.put(b"b", "png")
    assert len(list(tmp_path.iterdir())) == 2
    age_all()
    clock.now += 2  # 26 s since the last sweep: this put sweeps the two old ones, keeps its own image
    name = store.put(b"c", "png")
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_sweep_of_a_missing_folder_is_empty(tmp_path):
    store = ImageStore(str(tmp_path / "not-yet"), ttl_s=100, secret=SECRET)
    assert store.sweep() == 0
