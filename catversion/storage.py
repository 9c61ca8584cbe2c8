"""URI-addressed object storage: ``s3://bucket/key`` through boto3, ``file://`` URIs and plain paths.

S3 uses boto3's standard configuration (AWS_ENDPOINT_URL, the credential chain, region), so real
S3, MinIO or any S3-compatible server works unchanged. Transient errors are retried with backoff
by boto3's "standard" retry mode; permanent ones become a StorageError that says what to fix.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

S3_RETRY_ATTEMPTS = 8

_local = threading.local()


class StorageError(RuntimeError):
    """A storage operation failed for a reason the user can act on (the message says which)."""


class NotFoundError(StorageError, FileNotFoundError):
    """The object or file does not exist."""


class NotAFileError(StorageError, IsADirectoryError):
    """The path is a folder where a file was expected."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{uri!r} is not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(uri: str | os.PathLike) -> Path:
    text = str(uri)
    if text.startswith("file://"):
        return Path(unquote(urlparse(text).path))
    if "://" in text:
        raise StorageError(f"unsupported URI scheme in {text!r}: use s3://, file:// or a plain path")
    return Path(text)


def absolute(uri: str | list[str]) -> str | list[str]:
    """Local paths made absolute (other processes, e.g. Ray workers, run in other folders); URIs as given."""
    if isinstance(uri, list):
        return [absolute(u) for u in uri]
    text = str(uri)
    if is_s3(text) or text.startswith("file://"):
        return text
    return os.path.abspath(text)


def join(prefix: str, *parts: str) -> str:
    """``join("s3://b/run1", "residuals", "x.safetensors")`` → ``s3://b/run1/residuals/x.safetensors``."""
    prefix = str(prefix)
    if is_s3(prefix) or prefix.startswith("file://"):
        return "/".join([prefix.rstrip("/")] + [p.strip("/") for p in parts])
    return str(Path(prefix, *parts))


def resolve(uri: str, relative_to: str) -> str:
    """A manifest's image reference resolved against the manifest's own location."""
    if is_s3(uri) or uri.startswith("file://") or os.path.isabs(uri):
        return uri
    base = str(relative_to)
    if is_s3(base) or base.startswith("file://"):
        return base.rsplit("/", 1)[0] + "/" + uri
    return str(Path(base).parent / uri)


def s3_client():
    """One boto3 client per thread (clients are thread-safe, sessions are not)."""
    client = getattr(_local, "client", None)
    if client is None:
        import boto3
        from botocore.config import Config

        config = Config(retries={"mode": "standard", "max_attempts": S3_RETRY_ATTEMPTS}, connect_timeout=10, read_timeout=60)
        client = boto3.session.Session().client("s3", config=config)
        _local.client = client
    return client


def _s3_error(exc: Exception, uri: str, action: str) -> StorageError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"cannot {action} {uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or an instance/pod role)"
        )
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"cannot {action} {uri}: S3 endpoint unreachable ({exc}); check AWS_ENDPOINT_URL and the network")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        bucket = split_s3(uri)[0]
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFoundError(f"{uri} does not exist")
        if code == "NoSuchBucket":
            return StorageError(f"cannot {action} {uri}: bucket {bucket!r} does not exist (create it, or fix the URI)")
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            need = {"read": "s3:GetObject", "write": "s3:PutObject", "list": "s3:ListBucket"}.get(action, "access")
            return StorageError(f"cannot {action} {uri}: permission denied ({code}); the credentials need {need} on bucket {bucket!r}")
        return StorageError(f"cannot {action} {uri}: S3 error {code or type(exc).__name__}: {exc}")
    return StorageError(f"cannot {action} {uri}: {type(exc).__name__}: {exc}")


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            raise _s3_error(exc, uri, "read") from None
    path = local_path(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{uri} does not exist") from None
    except IsADirectoryError:
        raise NotAFileError(f"{uri} is a directory, not a file") from None
    except PermissionError:
        raise StorageError(f"cannot read {uri}: permission denied") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object whole: readers see the old object or the complete new one, never a part."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)  # a PUT is atomic in S3
        except Exception as exc:
            raise _s3_error(exc, uri, "write") from None
        return
    path = local_path(uri)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except PermissionError:
        raise StorageError(f"cannot write {uri}: permission denied") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:
            error = _s3_error(exc, uri, "read")
            if isinstance(error, NotFoundError):
                return False
            raise error from None
    return local_path(uri).is_file()


def list_uris(prefix: str, suffix: str = "") -> list[str]:
    """Objects (or files, recursively) under a prefix whose names end with ``suffix``, sorted."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        found = []
        try:
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                found += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []) if o["Key"].endswith(suffix)]
        except Exception as exc:
            raise _s3_error(exc, prefix, "list") from None
        return sorted(found)
    root = local_path(prefix)
    if root.is_file():
        return [str(root)] if str(root).endswith(suffix) else []
    if not root.is_dir():
        return []
    scheme = "file://" if str(prefix).startswith("file://") else ""
    return sorted(f"{scheme}{p}" for p in root.rglob(f"*{suffix}") if p.is_file())
