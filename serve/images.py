"""Generated images in OpenAI's output formats, and stored for ``response_format=url``.

`encode_image` turns a PIL image into PNG, JPEG or WebP bytes (OpenAI's ``output_format`` and
``output_compression``). `ImageStore` keeps encoded images under a storage prefix (a folder, a
file:// URI or s3://bucket/prefix, see `catversion.storage`) as ``<uuid4 hex>.<ext>`` and hands out
links to them, which expire after ``ttl_s``:

* ``links="endpoint"``: URLs of this server, ``/v1/images/files/<name>?expires=...&signature=...``,
  signed with HMAC-SHA256 over the name and the expiry time. Any replica that shares the prefix and
  the secret can check such a link and serve the image: there is no in-memory index.
* ``links="presigned"`` (s3 prefixes only): S3 presigned GET URLs; clients fetch from S3 directly.
  Presigned URLs stop working early when the signing credentials are temporary and expire first.
* ``links="auto"``: presigned for s3 prefixes, endpoint otherwise.

Old images are removed by `ImageStore.sweep` for local folders (``put`` runs it at most every
``ttl_s / 4`` seconds). For S3 prefixes sweep does nothing: give the bucket a lifecycle rule that
expires objects under the prefix (lifecycle rules count in days, so images stay longer than their
links, which is harmless).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from catversion import storage

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("png", "jpeg", "webp")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
LINK_MODES = ("auto", "endpoint", "presigned")
FILES_ROUTE = "/v1/images/files"

DEFAULT_QUALITY = 100  # jpeg/webp quality when the request gives no output_compression (OpenAI's default)
MAX_PRESIGNED_TTL_S = 7 * 24 * 3600  # S3 (SigV4) refuses presigned URLs valid for longer

NOT_FOUND_MESSAGE = "image not found or link expired"
_NAME = re.compile(r"[0-9a-f]{32}\.(png|jpeg|webp)", re.ASCII)
_EXPIRES = re.compile(r"[0-9]{1,20}", re.ASCII)
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def _check_format(output_format: str) -> str:
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    return output_format


def encode_image(image: Image.Image, output_format: str = "png", compression: int | None = None) -> bytes:
    """``image`` encoded as ``output_format`` (png, jpeg or webp).

    ``compression`` is OpenAI's ``output_compression`` (0..100 %, jpeg and webp only; default 100, the
    best): it is the encoder's quality, so lower values give smaller files. PNG ignores it and is always written with
    the fast compress_level=1 (encoding must not hold up the next UNet batch).
    Raises ValueError naming ``output_format`` or ``output_compression`` for bad values.
    """
    _check_format(output_format)
    if compression is not None:
        if isinstance(compression, bool) or not isinstance(compression, int) or not 0 <= compression <= 100:
            raise ValueError(f"output_compression must be an integer from 0 to 100, got {compression!r}")
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()
    quality = DEFAULT_QUALITY if compression is None else compression
    if output_format == "jpeg":
        if image.mode not in ("RGB", "L", "CMYK"):
            image = image.convert("RGB")  # JPEG has no alpha channel
        image.save(buffer, format="JPEG", quality=max(1, quality))
    else:
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
        image.save(buffer, format="WEBP", quality=quality)
    return buffer.getvalue()


_presigners = threading.local()


def _presign_client():
    """A client like storage.s3_client() (same settings and timeouts) that presigns with SigV4.

    Without an explicit signature_version, botocore presigns S3 URLs with the legacy SigV2, which
    S3 refuses for buckets created since mid-2020 and in newer regions.
    """
    base = storage.s3_client()  # rebuilt by storage when AWS_ENDPOINT_URL changes or after reset_clients()
    cached = getattr(_presigners, "pair", None)
    if cached is not None and cached[0] is base:
        return cached[1]
    import boto3
    from botocore.config import Config

    # Built like storage.s3_client() (AWS_ENDPOINT_URL and credentials from the environment), plus SigV4.
    client = boto3.session.Session().client("s3", region_name=base.meta.region_name,
                                            config=base.meta.config.merge(Config(signature_version="s3v4")))
    _presigners.pair = (base, client)
    return client


class ImageNotFoundError(Exception):
    """An unknown, expired or badly signed image link (the server answers 404 for all of them alike)."""

    def __init__(self, message: str = NOT_FOUND_MESSAGE):
        super().__init__(message)


class ImageStore:
    """Encoded images under a storage prefix, and expiring links to them (see the module docstring).

    Everything needed to serve a link lives in the prefix and the secret, so a link minted by one
    replica can be opened by any other one configured alike.
    """

    def __init__(self, prefix: str, *, ttl_s: float, secret: bytes, links: str = "auto",
                 clock: Callable[[], float] = time.time):
        if not prefix or not isinstance(prefix, (str, os.PathLike)):
            raise ValueError(f"image store prefix must be a folder, a file:// URI or an s3://bucket/prefix URI, got {prefix!r}")
        prefix = str(prefix)
        try:
            if storage.is_s3(prefix):
                storage.split_s3(prefix)
            else:
                storage.local_path(prefix)
        except storage.StorageError as exc:  # s3:// without a bucket, or an unsupported scheme
            raise ValueError(f"image store prefix: {exc}") from None
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s) or ttl_s <= 0:
            raise ValueError(f"image store ttl_s must be a number of seconds > 0, got {ttl_s!r}")
        if not isinstance(secret, bytes) or not secret:
            raise ValueError("image store secret must be non-empty bytes (the key that signs image links; "
                             "every replica needs the same one)")
        if links not in LINK_MODES:
            raise ValueError(f"image store links must be one of {', '.join(LINK_MODES)}, got {links!r}")
        if links == "presigned" and not storage.is_s3(prefix):
            raise ValueError(f"image store links='presigned' needs an s3:// prefix (S3 presigns URLs), got {prefix!r}; "
                             "use links='endpoint' (or 'auto') for local folders")
        if links == "auto":
            links = "presigned" if storage.is_s3(prefix) else "endpoint"
        if links == "presigned" and ttl_s > MAX_PRESIGNED_TTL_S:
            raise ValueError(f"image store ttl_s must be at most {MAX_PRESIGNED_TTL_S} s (7 days) for presigned S3 "
                             f"links, got {ttl_s!r}")
        self.prefix = storage.absolute(prefix)  # replicas may run in other folders
        self.ttl_s = float(ttl_s)
        self.links = links  # "endpoint" or "presigned" ("auto" resolved)
        self._secret = bytes(secret)
        self._clock = clock
        self._sweep_lock = threading.Lock()
        self._last_sweep: float | None = None

    def __repr__(self) -> str:  # never shows the secret
        return f"ImageStore({self.prefix!r}, ttl_s={self.ttl_s:g}, links={self.links!r})"

    # ---- writing --------------------------------------------------------------------------------

    def put(self, data: bytes, output_format: str) -> str:
        """Store encoded image bytes; returns their name, ``<uuid4 hex>.<ext>`` (ext = the output format)."""
        name = f"{uuid.uuid4().hex}.{_check_format(output_format)}"
        storage.write_bytes(self._uri(name), data)
        self._maybe_sweep()
        return name

    def _maybe_sweep(self) -> None:
        """Sweep at most once per ttl_s / 4 seconds; a put never waits for, or fails by, a sweep."""
        if storage.is_s3(self.prefix):
            return
        now = self._clock()
        if self._last_sweep is not None and now - self._last_sweep < self.ttl_s / 4:
            return
        if not self._sweep_lock.acquire(blocking=False):
            return  # another thread is sweeping right now
        try:
            self._last_sweep = now
            self.sweep()
        except (OSError, storage.StorageError) as exc:
            log.warning("could not remove expired images from %s: %s", self.prefix, exc)
        finally:
            self._sweep_lock.release()

    def sweep(self) -> int:
        """Delete stored images older than ttl_s (by file mtime); returns how many were deleted.

        Local folders only, and only files named like this store's images (other files in the
        folder are left alone). For S3 it does nothing and returns 0: a bucket lifecycle rule on the
        prefix expires the objects.
        """
        if storage.is_s3(self.prefix):
            return 0
        folder = storage.local_path(self.prefix)
        cutoff = self._clock() - self.ttl_s
        removed = 0
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return 0  # nothing stored yet
        for entry in entries:
            if not _NAME.fullmatch(entry.name):
                continue
            try:
                if not entry.is_file(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue
            except FileNotFoundError:  # another replica removed it meanwhile
                continue
            storage.delete(self._uri(entry.name))
            removed += 1
        return removed

    # ---- links ----------------------------------------------------------------------------------

    def url(self, name: str, base_url: str) -> str:
        """A link to the stored image ``name`` that works for ttl_s seconds from now.

        Endpoint links are ``{base_url}/v1/images/files/{name}?expires=...&signature=...``; presigned
        links point at S3 itself (``base_url`` is then unused). Call it right after `put`: the sweep
        removes an image ttl_s after it was stored, whenever its link was made.
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"not a stored image name: {name!r}")
        if self.links == "presigned":
            bucket, key = storage.split_s3(self._uri(name))
            params = {"Bucket": bucket, "Key": key, "ResponseContentType": MEDIA_TYPES[name.rsplit(".", 1)[1]]}
            return _presign_client().generate_presigned_url(
                "get_object", Params=params, ExpiresIn=max(1, int(self.ttl_s)))
        expires = int(self._clock() + self.ttl_s)
        return (f"{base_url.rstrip('/')}{FILES_ROUTE}/{name}"
                f"?expires={expires}&signature={self._signature(name, str(expires))}")

    def _signature(self, name: str, expires: str) -> str:
        return hmac.new(self._secret, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()

    # ---- reading --------------------------------------------------------------------------------

    def open(self, name: str, expires: str, signature: str) -> tuple[bytes, str]:
        """The bytes and media type of the image an endpoint link points at.

        Raises ImageNotFoundError (always with the same message, and no storage path) when the name is
        not an image name, the link has expired, the signature does not match or the image is gone.
        Storage outages (StorageUnavailableError and other StorageErrors) pass through.
        """
        if not all(isinstance(part, str) for part in (name, expires, signature)):
            raise ImageNotFoundError()
        match = _NAME.fullmatch(name)
        if match is None or not _EXPIRES.fullmatch(expires) or int(expires) < self._clock():
            raise ImageNotFoundError()
        expected = self._signature(name, expires).encode("ascii")
        # Compare bytes: compare_digest raises TypeError on non-ASCII str. "replace" keeps lone
        # surrogates from raising; a replaced character is not hex, so it cannot match.
        if not hmac.compare_digest(expected, signature.encode("utf-8", "replace")):
            raise ImageNotFoundError()
        try:
            data = storage.read_bytes(self._uri(name))
        except (storage.NotFoundError, storage.NotAFileError):
            raise ImageNotFoundError() from None
        return data, MEDIA_TYPES[match.group(1)]

    def _uri(self, name: str) -> str:
        return storage.join(self.prefix, name)
