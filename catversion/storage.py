"""URI-addressed object storage: ``s3://bucket/key`` through boto3, ``file://`` URIs and plain paths.

S3 uses boto3's standard configuration (AWS_ENDPOINT_URL, the credential chain, region), so real
S3, MinIO or any S3-compatible server works unchanged. Permanent errors (a missing object or
bucket, denied access, no credentials) raise at once as a StorageError that says what to fix.

Retry budgets
-------------
Transient S3 errors (endpoint unreachable, connection dropped or timed out, throttling, 5xx) are
retried with exponential backoff and jitter for as long as the call's :class:`RetryBudget` allows:
``RetryBudget(seconds)`` keeps retrying for ``seconds`` in total (a retry is only started before the
budget is spent, so the last attempt may end up to one request timeout later). Serving passes
nothing and gets :data:`SHORT_BUDGET` (10 s: fail fast, the client can try again); batch jobs pass
:data:`LONG_BUDGET` (5 min: ride out an S3 or network hiccup rather than lose the work). botocore's
own retries are turned down to one retry with short timeouts, so the budget governs the timing.
When the budget is spent the call raises :class:`StorageUnavailableError`, whose message names the
URI, the action and the root cause. Local file errors are never retried.

Deadlines
---------
A budget bounds when retries stop, not how long one attempt may hang: a black-holed endpoint
(connections accepted, never answered) holds an attempt for botocore's read timeout, twice. A call
on a request path needs an end it cannot overrun, so :func:`deadline` makes a budget whose seconds
bound the whole call, connects, reads, retries and backoff together. Each attempt runs on a storage
thread whose client has socket timeouts of half the deadline and makes one attempt (so one hung
attempt still leaves time to retry), and the caller waits for it only until the deadline: an attempt
still running then is abandoned (it ends on its thread at its socket timeout) and the call raises
StorageUnavailableError. Serving uses these (serve/config.py ``storage_deadline_s``); batch jobs keep
their long budgets. Local files take no deadline: a thread cannot end a hung file system call.

Stamps and conditional writes
-----------------------------
Every object has a stamp (:class:`ObjectInfo`): the ETag for S3 (quotes stripped), and
``f"{size}-{mtime_ns}"`` for local files. ``write_bytes(if_absent=True)`` creates an object only
where none exists (else :class:`AlreadyExistsError`); ``write_bytes(if_match=stamp)`` and
``delete(if_match=stamp)`` change an object only while it still has that stamp (else
:class:`ConditionFailedError`). On S3 the conditions are checked by the server (If-None-Match /
If-Match), so they hold across hosts; a 409 ConditionalRequestConflict (a race with another request
on the key) is retried like a transient error, as AWS advises. A conditional write that is retried
after its answer was lost recognises its own earlier success (the object's ETag is the MD5 of the
bytes written) instead of reporting a conflict with itself. Local files are meant for one host: creation is atomic
(``os.link``), but ``if_match`` compares the stamp and then replaces the file, so two processes can
race between the two steps.

Local files
-----------
Every ``OSError`` of a local file (a read-only or full disk, a quota, a path through a file, an I/O
error) is raised as a StorageError naming the path, the cause and the fix (``_os_error``), never as a
bare ``OSError``: a batch run fails the concept whose file it is, not the worker. Only regular files
are read: a FIFO, a device or a socket is refused from a ``stat`` before it is opened (opening a FIFO
blocks; reading a device never ends), and ``read_object(max_bytes=...)`` refuses a larger object from
its size (a ``stat``, or an S3 GET's headers) before reading any of it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import stat as statmod
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import unquote, urlparse

from .limits import DEFAULT_STORAGE_RETRY_S

# botocore's own attempts per call (the first and 1 retry): the RetryBudget, not botocore, decides how long to keep trying.
S3_RETRY_ATTEMPTS = 2
S3_CONNECT_TIMEOUT = 5
S3_READ_TIMEOUT = 30

_local = threading.local()
_generation = 0  # bumped by reset_clients(): every thread then builds a fresh client
DEADLINE_THREADS = 32  # storage threads: deadline attempts running at once (more wait, and time out, in a queue)
_deadline_clients: dict[tuple, object] = {}  # (generation, endpoint, attempt_s) -> the storage threads' client
_deadline_pool = None  # the storage threads (a ThreadPoolExecutor), started on the first deadline call
_deadline_lock = threading.Lock()

T = TypeVar("T")


@dataclass(frozen=True)
class RetryBudget:
    """How long a storage call keeps retrying transient errors, and how it backs off in between."""

    seconds: float  # keep retrying transient errors for this long in total
    first_delay: float = 0.2  # exponential backoff with jitter, capped at max_delay
    max_delay: float = 5.0
    hard: bool = False  # True: `seconds` is a deadline for the whole call, a hung attempt included (see deadline())


def deadline(seconds: float) -> RetryBudget:
    """A budget for a request path: the call returns or raises within ``seconds``, whatever the endpoint does."""
    if not seconds > 0:
        raise ValueError(f"a storage deadline must be > 0 s, got {seconds}")
    return RetryBudget(seconds, first_delay=min(0.1, seconds / 20), max_delay=seconds / 4, hard=True)


def prepare(uri: str, budget: RetryBudget) -> None:
    """Build now the S3 client that calls on ``uri`` with a deadline ``budget`` use, so that the first
    request is not the one to wait for it (building one takes up to a second of CPU); else nothing."""
    if budget.hard and is_s3(uri):
        _deadline_client(budget.seconds / 2)


SHORT_BUDGET = RetryBudget(10.0)  # the default when a caller passes none (serving uses this)
LONG_BUDGET = RetryBudget(DEFAULT_STORAGE_RETRY_S)  # batch jobs (catversion batch --storage-retry)


@dataclass(frozen=True)
class ObjectInfo:
    """An object's URI, size in bytes and stamp (S3: the ETag without quotes; files: ``size-mtime_ns``)."""

    uri: str
    size: int
    stamp: str


class StorageError(RuntimeError):
    """A storage operation failed for a reason the user can act on (the message says which)."""


class NotFoundError(StorageError, FileNotFoundError):
    """The object or file does not exist."""


class NotAFileError(StorageError, IsADirectoryError):
    """The path is a folder, a FIFO, a device or a socket where a regular file was expected."""


class TooLargeError(StorageError):
    """The object is larger than the caller's cap (``read_object(max_bytes=...)``); nothing of it was read."""


class StorageUnavailableError(StorageError):
    """A transient failure (unreachable, throttled, 5xx...) that outlived the call's retry budget."""


class AlreadyExistsError(StorageError):
    """``write_bytes(if_absent=True)`` found an existing object."""


class ConditionFailedError(StorageError):
    """``write_bytes(if_match=...)`` or ``delete(if_match=...)``: the object no longer has that stamp."""


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


def absolute_model(name: str | None) -> str | None:
    """A base model as Ray workers must see it: a local folder made absolute (they run in other
    folders); a hub id or built-in name as given."""
    if name and os.path.isdir(name):
        return os.path.abspath(name)
    return name


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


# ---- S3 client and error handling ------------------------------------------------------------


def s3_client():
    """One boto3 client per thread (clients are thread-safe, sessions are not).

    A thread's client is rebuilt after :func:`reset_clients` or when AWS_ENDPOINT_URL changed. On a
    deadline's storage thread (``_local.attempt_s`` set) it is the deadline client (:func:`_deadline_client`).
    """
    attempt_s = getattr(_local, "attempt_s", None)
    if attempt_s is not None:
        return _deadline_client(attempt_s)
    key = (_generation, os.environ.get("AWS_ENDPOINT_URL"))
    client = getattr(_local, "client", None)
    if client is None or getattr(_local, "key", None) != key:
        from botocore.config import Config

        # total_max_attempts counts the first attempt too (Config's "max_attempts" would count retries only).
        client = _new_client(Config(retries={"mode": "standard", "total_max_attempts": S3_RETRY_ATTEMPTS},
                                    connect_timeout=S3_CONNECT_TIMEOUT, read_timeout=S3_READ_TIMEOUT))
        _local.client, _local.key = client, key
    return client


def _deadline_client(attempt_s: float):
    """The client every storage thread shares for attempts of ``attempt_s``: socket timeouts of ``attempt_s``,
    one attempt per call, a connection per storage thread. Built once (under a lock), so a deadline is not
    spent building it: :func:`_s3_call` gets it before its clock starts."""
    key = (_generation, os.environ.get("AWS_ENDPOINT_URL"), attempt_s)
    with _deadline_lock:
        client = _deadline_clients.get(key)
        if client is None:
            from botocore.config import Config

            for old in [k for k in _deadline_clients if k[:2] != key[:2]]:  # after reset_clients() or a new endpoint
                del _deadline_clients[old]
            client = _deadline_clients[key] = _new_client(Config(
                retries={"mode": "standard", "total_max_attempts": 1}, max_pool_connections=DEADLINE_THREADS,
                connect_timeout=min(attempt_s, S3_CONNECT_TIMEOUT), read_timeout=attempt_s))
    return client


def _new_client(config):
    import boto3
    import botocore.session

    session = botocore.session.get_session()
    # botocore parses each listed object's LastModified with dateutil (~0.3 ms each); S3 sends
    # ISO 8601 there, which datetime.fromisoformat reads directly.
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_s3_timestamp)
    return boto3.session.Session(botocore_session=session).client("s3", config=config)


def _s3_timestamp(value: str) -> datetime:
    """A timestamp of an S3 response: ISO 8601 in listings (read fast), RFC 1123 in headers (botocore's parser)."""
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        from botocore.utils import parse_timestamp

        return parse_timestamp(value)


def reset_clients() -> None:
    """Make every thread build a new S3 client on its next call (after changing AWS_* settings, e.g. in tests)."""
    global _generation
    _generation += 1
    _local.client = None


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code", ""))


def _status(exc: Exception) -> int:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return 0
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _retried_by_botocore(exc: Exception) -> bool:
    response = getattr(exc, "response", None)
    return isinstance(response, dict) and bool(response.get("ResponseMetadata", {}).get("RetryAttempts"))


# ConditionalRequestConflict (409): a conditional write raced another operation on the key; AWS says retry
# (the retry then succeeds, or meets the winner's object as a 412).
_TRANSIENT_CODES = ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "ConditionalRequestConflict")


_NETWORK_HINT = "check AWS_ENDPOINT_URL and the network"
_SERVICE_HINT = "the S3 service is overloaded or failing: try again later, or give the job a longer RetryBudget"


def _transient_cause(exc: Exception) -> tuple[str, str] | None:
    """What went wrong and what to check, in words, when ``exc`` is worth retrying; None for permanent errors."""
    from botocore import exceptions as bce

    if isinstance(exc, bce.SSLError):
        return None  # a certificate problem does not fix itself
    if isinstance(exc, bce.ReadTimeoutError):
        return f"S3 endpoint did not answer in time ({exc})", _NETWORK_HINT
    if isinstance(exc, (bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError, ConnectionError, TimeoutError)):
        return f"S3 endpoint unreachable ({exc})", _NETWORK_HINT
    try:
        import urllib3.exceptions
    except ImportError:  # pragma: no cover - botocore depends on urllib3
        pass
    else:
        if isinstance(exc, (urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError,
                            urllib3.exceptions.NewConnectionError, urllib3.exceptions.IncompleteRead)):
            return f"S3 endpoint unreachable ({exc})", _NETWORK_HINT
    if isinstance(exc, bce.ClientError):
        code, status = _code(exc), _status(exc)
        if status >= 500 or code in _TRANSIENT_CODES:
            return f"S3 is failing or throttling (HTTP {status or '?'} {code or type(exc).__name__}: {exc})", _SERVICE_HINT
    return None


def _s3_error(exc: Exception, uri: str, action: str) -> StorageError:
    """The StorageError for a permanent S3 failure."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"cannot {action} {uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or an instance/pod role)"
        )
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"cannot {action} {uri}: S3 endpoint unreachable ({exc}); check AWS_ENDPOINT_URL and the network")
    if isinstance(exc, ClientError):
        code = _code(exc)
        bucket = split_s3(uri)[0]
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFoundError(f"{uri} does not exist")
        if code == "NoSuchBucket":
            return StorageError(f"cannot {action} {uri}: bucket {bucket!r} does not exist (create it, or fix the URI)")
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            need = {"read": "s3:GetObject", "write": "s3:PutObject", "list": "s3:ListBucket",
                    "delete": "s3:DeleteObject"}.get(action, "access")
            return StorageError(f"cannot {action} {uri}: permission denied ({code}); the credentials need {need} on bucket {bucket!r}")
        return StorageError(f"cannot {action} {uri}: S3 error {code or type(exc).__name__}: {exc}")
    return StorageError(f"cannot {action} {uri}: {type(exc).__name__}: {exc}")


def _s3_call(uri: str, action: str, budget: RetryBudget | None, call: Callable[[int], T]) -> T:
    """``call(attempt)`` (attempt counts from 1), retried on transient errors until ``budget`` is spent.

    A StorageError raised by ``call`` passes through; other permanent errors become one (_s3_error).
    """
    budget = budget or SHORT_BUDGET
    if budget.hard:
        _deadline_client(budget.seconds / 2)  # built before the deadline's clock starts (local work, once)
    start = time.monotonic()
    delay = budget.first_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            return _bounded(call, attempt, budget, start + budget.seconds) if budget.hard else call(attempt)
        except StorageError:
            raise
        except Exception as exc:
            transient = _transient_cause(exc)
            if transient is None:
                raise _s3_error(exc, uri, action) from None
            left = budget.seconds - (time.monotonic() - start)
            pause = random.uniform(delay / 2, delay)
            if left <= 0 or (budget.hard and pause >= left):  # a deadline: no attempt that could not even start
                cause, hint = transient
                within = "within its deadline of" if budget.hard else "after retrying for"
                raise StorageUnavailableError(
                    f"cannot {action} {uri}: {cause}; still failing {within} {budget.seconds:g} s "
                    f"({attempt} attempts); {hint}"
                ) from None
        time.sleep(min(left, pause))
        delay = min(delay * 2, budget.max_delay)


class _NoAnswer(TimeoutError):
    """A deadline's attempt that had not ended when the deadline came (transient: _transient_cause)."""


def _bounded(call: Callable[[int], T], attempt: int, budget: RetryBudget, end: float) -> T:
    """``call(attempt)`` on a storage thread, waited for until ``end`` (time.monotonic()) at the latest."""
    global _deadline_pool
    from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout

    with _deadline_lock:
        if _deadline_pool is None:
            _deadline_pool = ThreadPoolExecutor(DEADLINE_THREADS, thread_name_prefix="catversion-storage")
    attempt_s = budget.seconds / 2

    def run() -> T:
        _local.attempt_s = attempt_s  # s3_client() on this thread: short socket timeouts, one attempt
        return call(attempt)

    left = end - time.monotonic()
    if left <= 0:
        raise _NoAnswer(f"no time left for attempt {attempt} within {budget.seconds:g} s")
    future = _deadline_pool.submit(run)
    try:
        return future.result(timeout=left)
    except FutureTimeout:
        if future.done():
            raise  # the attempt's own error (a socket's timeout), not the deadline
        future.cancel()  # still queued: it never runs; running: it ends at its socket timeout, unheard
        raise _NoAnswer(f"no answer within {budget.seconds:g} s") from None


def _etag(value: str | None) -> str:
    return (value or "").strip('"')


# ---- local files -----------------------------------------------------------------------------


def _file_info(uri: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(uri, st.st_size, f"{st.st_size}-{st.st_mtime_ns}")


# What to do about each local file error (the cause itself comes from the OS).
_OS_FIXES = {
    errno.EROFS: "the file system is read-only: make it writable, or use another location",
    errno.ENOSPC: "the device is full: free some space, or use another location",
    errno.EDQUOT: "the disk quota is used up: free some space or raise the quota, or use another location",
    errno.EACCES: "give this user access to it, or use another location",
    errno.EPERM: "the file or its folder may be immutable or locked (chattr, ACLs): allow the change, or use "
                 "another location",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.EIO: "the disk or network file system failed: check it, then try again",
    errno.ENAMETOOLONG: "shorten the path",
    errno.ELOOP: "the path has a symbolic link loop: fix the links",
}


def _os_error(exc: OSError, uri: str, action: str) -> StorageError:
    """The StorageError for a local file's OSError: the path, the cause (with its errno name) and the fix."""
    name = errno.errorcode.get(exc.errno or 0, "")
    cause = f"{exc.strerror or exc}" + (f" ({name})" if name else "")
    fix = _OS_FIXES.get(exc.errno or 0)
    error = NotAFileError if exc.errno == errno.EISDIR else StorageError
    return error(f"cannot {action} {uri}: {cause}" + (f"; {fix}" if fix else ""))


def _file_kind(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    for test, kind in ((statmod.S_ISREG, None), (statmod.S_ISDIR, "a directory"),
                       (statmod.S_ISFIFO, "a FIFO (named pipe)"), (statmod.S_ISCHR, "a character device"),
                       (statmod.S_ISBLK, "a block device"), (statmod.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _check_readable(uri: str, st: os.stat_result, max_bytes: int | None) -> None:
    """Refuse what must not be read: anything but a regular file, or more than ``max_bytes``."""
    kind = _file_kind(st.st_mode)
    if kind is not None:
        raise NotAFileError(f"{uri} is {kind}, not a regular file" + ("" if statmod.S_ISDIR(st.st_mode) else
                                                                         "; only regular files are read"))
    if max_bytes is not None and st.st_size > max_bytes:
        raise TooLargeError(f"{uri} is {st.st_size:,} bytes, over the limit of {max_bytes:,}")


def _local_read(uri: str, max_bytes: int | None) -> tuple[bytes, ObjectInfo]:
    path = local_path(uri)
    try:
        # stat before opening: opening a FIFO blocks until a writer comes, and opening a device may act.
        _check_readable(uri, os.stat(path), max_bytes)
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as handle:
            st = os.fstat(handle.fileno())  # the opened file: writes replace it, never change it in place
            _check_readable(uri, st, max_bytes)  # the path may have been swapped since the stat
            data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(f"{uri} does not exist") from None
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise _os_error(exc, uri, "read") from None
    if max_bytes is not None and len(data) > max_bytes:  # it grew in place after the stat
        raise TooLargeError(f"{uri} is over the limit of {max_bytes:,} bytes")
    return data, _file_info(uri, st)


def _local_stat(uri: str) -> os.stat_result | None:
    try:
        st = os.stat(local_path(uri))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise _os_error(exc, uri, "read") from None
    return st if statmod.S_ISREG(st.st_mode) else None


def _local_write(uri: str, data: bytes, if_absent: bool, if_match: str | None) -> ObjectInfo:
    path = local_path(uri)
    try:
        return _write_file(uri, path, data, if_absent, if_match)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise _os_error(exc, uri, "write") from None


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's answer when a part of the path is a file
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder)) from None


def _write_file(uri: str, path: Path, data: bytes, if_absent: bool, if_match: str | None) -> ObjectInfo:
    _make_folder(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        old = _local_stat(uri)
        if if_match is not None and (old is None or _file_info(uri, old).stamp != if_match):
            raise ConditionFailedError(f"cannot write {uri}: it changed since stamp {if_match} (now "
                                       f"{_file_info(uri, old).stamp if old else 'absent'})")
        new = os.stat(tmp)
        if old is not None and (old.st_size, old.st_mtime_ns) == (new.st_size, new.st_mtime_ns):
            # A coarse file clock gave the new file the old stamp: move its mtime on so the stamp changes.
            os.utime(tmp, ns=(new.st_atime_ns, old.st_mtime_ns + 1))
        if if_absent:
            try:
                os.link(tmp, path)  # atomic, and fails where the file exists
            except FileExistsError:
                raise AlreadyExistsError(f"cannot create {uri}: it already exists") from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                # No hard links on this filesystem: exclusive create (readers may see a partial file meanwhile).
                try:
                    with open(path, "xb") as handle:
                        handle.write(data)
                except FileExistsError:
                    raise AlreadyExistsError(f"cannot create {uri}: it already exists") from None
        else:
            os.replace(tmp, path)
        return _file_info(uri, os.stat(path))
    finally:
        with contextlib.suppress(OSError):  # the write's own error, if any, is the one to report
            if os.path.exists(tmp):
                os.unlink(tmp)


# ---- the operations --------------------------------------------------------------------------


def read_bytes(uri: str, *, budget: RetryBudget | None = None, version_id: str | None = None) -> bytes:
    return read_object(uri, budget=budget, version_id=version_id)[0]


def read_object(uri: str, *, budget: RetryBudget | None = None, version_id: str | None = None,
                max_bytes: int | None = None) -> tuple[bytes, ObjectInfo]:
    """The object's bytes and the stamp of exactly those bytes (S3: the GET's ETag).

    ``version_id`` (S3 only, from :func:`list_versions`) reads that version instead of the current one.
    ``max_bytes``: an object larger than this raises TooLargeError, decided from its size before it is read.
    A local path that is not a regular file (a folder, FIFO, device) raises NotAFileError unopened.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        extra = {"VersionId": version_id} if version_id is not None else {}

        def get(attempt: int) -> tuple[bytes, ObjectInfo]:
            from botocore.exceptions import ClientError

            try:
                response = s3_client().get_object(Bucket=bucket, Key=key, **extra)
            except ClientError as exc:
                if extra and _code(exc) == "NoSuchVersion":
                    raise NotFoundError(f"{uri} has no version {version_id!r}") from None
                raise
            size = int(response.get("ContentLength") or 0)
            if max_bytes is not None and size > max_bytes:
                response["Body"].close()  # from the GET's headers: the body is never read
                raise TooLargeError(f"{uri} is {size:,} bytes, over the limit of {max_bytes:,}")
            data = response["Body"].read()
            return data, ObjectInfo(uri, len(data), _etag(response.get("ETag")))

        return _s3_call(uri, "read", budget, get)
    if version_id is not None:
        raise ValueError(f"cannot read version {version_id!r} of {uri}: only S3 objects have versions")
    return _local_read(uri, max_bytes)


def write_bytes(uri: str, data: bytes, *, budget: RetryBudget | None = None, if_absent: bool = False,
                if_match: str | None = None) -> ObjectInfo:
    """Write an object whole: readers see the old object or the complete new one, never a part.

    ``if_absent``: only create it (else AlreadyExistsError). ``if_match``: only replace the object
    that has this stamp (else ConditionFailedError, also when it is gone). Returns the new object's info.
    """
    if if_absent and if_match is not None:
        raise ValueError("write_bytes: give if_absent or if_match, not both")
    data = bytes(data)
    if not is_s3(uri):
        return _local_write(uri, data, if_absent, if_match)
    bucket, key = split_s3(uri)
    extra = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_match} if if_match is not None else {}

    def put(attempt: int) -> ObjectInfo:
        from botocore.exceptions import ClientError

        try:
            response = s3_client().put_object(Bucket=bucket, Key=key, Body=data, **extra)  # a PUT is atomic in S3
        except ClientError as exc:
            code, status = _code(exc), _status(exc)
            failed = code == "PreconditionFailed" or status == 412
            missing = if_match is not None and code in ("NoSuchKey", "404", "NotFound")
            if not (extra and (failed or missing)):
                raise
            if attempt > 1 or _retried_by_botocore(exc):
                # An earlier attempt may have written these very bytes before its answer was lost.
                now = _s3_head(bucket, key)
                if now is not None and now.stamp == hashlib.md5(data).hexdigest():
                    return ObjectInfo(uri, len(data), now.stamp)
            if if_absent:
                raise AlreadyExistsError(f"cannot create {uri}: it already exists") from None
            raise ConditionFailedError(f"cannot write {uri}: it " + ("no longer exists" if missing else
                                       f"changed since stamp {if_match}")) from None
        return ObjectInfo(uri, len(data), _etag(response.get("ETag")))

    return _s3_call(uri, "write", budget, put)


def _s3_head(bucket: str, key: str) -> ObjectInfo | None:
    """HEAD one object (no retries of its own: called inside _s3_call)."""
    from botocore.exceptions import ClientError

    try:
        response = s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _code(exc) in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    return ObjectInfo(f"s3://{bucket}/{key}", int(response.get("ContentLength", 0)), _etag(response.get("ETag")))


def stat(uri: str, *, budget: RetryBudget | None = None) -> ObjectInfo | None:
    """The object's size and stamp; None when there is no such object (or the path is a folder)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _s3_call(uri, "read", budget, lambda attempt: _s3_head(bucket, key))
    st = _local_stat(uri)
    return None if st is None else _file_info(uri, st)


def exists(uri: str, *, budget: RetryBudget | None = None) -> bool:
    return stat(uri, budget=budget) is not None


def delete(uri: str, *, budget: RetryBudget | None = None, if_match: str | None = None) -> None:
    """Delete an object; one that is already absent is fine (also with ``if_match``: it is gone either way).

    ``if_match``: only delete the object while it has this stamp (else ConditionFailedError).
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        extra = {"IfMatch": if_match} if if_match is not None else {}

        def remove(attempt: int) -> None:
            from botocore.exceptions import ClientError

            try:
                s3_client().delete_object(Bucket=bucket, Key=key, **extra)
            except ClientError as exc:
                code = _code(exc)
                if code in ("NoSuchKey", "404", "NotFound"):
                    return None  # absent already (or an earlier attempt deleted it)
                if if_match is not None and (code == "PreconditionFailed" or _status(exc) == 412):
                    raise ConditionFailedError(f"cannot delete {uri}: it changed since stamp {if_match}") from None
                raise

        return _s3_call(uri, "delete", budget, remove)
    path = local_path(uri)
    if if_match is not None:
        st = _local_stat(uri)
        if st is None:
            return
        if _file_info(uri, st).stamp != if_match:
            raise ConditionFailedError(f"cannot delete {uri}: it changed since stamp {if_match} (now "
                                       f"{_file_info(uri, st).stamp})")
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:
        raise _os_error(exc, uri, "delete") from None


def list_objects(prefix: str, suffix: str = "", *, budget: RetryBudget | None = None) -> list[ObjectInfo]:
    """Objects (or files, recursively) under a prefix whose names end with ``suffix``, with size and stamp, sorted by URI.

    S3 takes size and ETag from the listing itself (1000 objects per request, no call per object).
    """
    if is_s3(prefix):
        bucket, key = split_s3(prefix)

        def listing(attempt: int) -> list[ObjectInfo]:
            found = []
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                found += [ObjectInfo(f"s3://{bucket}/{o['Key']}", int(o.get("Size", 0)), _etag(o.get("ETag")))
                          for o in page.get("Contents", []) if o["Key"].endswith(suffix)]
            return found

        return sorted(_s3_call(prefix, "list", budget, listing), key=lambda info: info.uri)
    try:
        return _list_files(prefix, suffix)
    except OSError as exc:
        raise _os_error(exc, prefix, "list") from None


def _list_files(prefix: str, suffix: str) -> list[ObjectInfo]:
    root = local_path(prefix)
    if root.is_file():
        return [_file_info(str(root), root.stat())] if str(root).endswith(suffix) else []
    if not root.is_dir():
        return []
    scheme = "file://" if str(prefix).startswith("file://") else ""
    found = []
    for path in root.rglob(f"*{suffix}"):
        try:
            if path.is_file():
                found.append(_file_info(f"{scheme}{path}", path.stat()))
        except FileNotFoundError:  # deleted while we looked
            continue
    return sorted(found, key=lambda info: info.uri)


def list_uris(prefix: str, suffix: str = "", *, budget: RetryBudget | None = None) -> list[str]:
    """Objects (or files, recursively) under a prefix whose names end with ``suffix``, sorted."""
    return [info.uri for info in list_objects(prefix, suffix, budget=budget)]


@dataclass(frozen=True)
class ObjectVersion:
    """One stored version of an S3 object (see :func:`list_versions`); ``last_modified`` as S3 reports it."""

    version_id: str
    stamp: str
    size: int
    is_latest: bool
    last_modified: datetime


def list_versions(uri: str, *, budget: RetryBudget | None = None) -> list[ObjectVersion]:
    """The stored versions of one object, newest first; delete markers are left out.

    A versioned S3 bucket keeps every version written; an unversioned one lists only the current
    object (version id ``"null"``). Local files have no versions: ``[]``. Needs s3:ListBucketVersions.
    """
    if not is_s3(uri):
        return []
    bucket, key = split_s3(uri)

    def listing(attempt: int) -> list[ObjectVersion]:
        found = []
        for page in s3_client().get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=key):
            found += [ObjectVersion(v["VersionId"], _etag(v.get("ETag")), int(v.get("Size", 0)),
                                    bool(v.get("IsLatest")), v.get("LastModified"))
                      for v in page.get("Versions", []) if v["Key"] == key]
        return found  # S3 lists the versions of a key newest first

    return _s3_call(uri, "list", budget, listing)
