"""Storage deadlines (catversion/storage.py, "Deadlines"): a call on a request path ends within its
deadline whatever the S3 endpoint does, against moto's S3 server behind a TcpProxy that refuses,
black-holes (accepts connections, never answers) or trickles (answers too slowly to finish, too fast
for a read to time out).

Without a deadline, botocore waits 30 s per attempt on a black hole, twice, and a trickle is never cut.
"""

import threading
import time

import pytest

from catversion import storage

DEADLINE_S = 2.0
MARGIN_S = 1.5  # scheduling on a busy machine; a call that waited on a socket timeout would take 30 s


def operations(prefix: str) -> dict:
    """Every S3 operation a server makes on a request path (and the others), each with a deadline."""
    budget = storage.deadline(DEADLINE_S)
    uri = f"{prefix}/residuals/dog.safetensors"
    return {
        "read": lambda: storage.read_object(uri, budget=budget),
        "stat": lambda: storage.stat(uri, budget=budget),
        "exists": lambda: storage.exists(uri, budget=budget),
        "list": lambda: storage.list_objects(f"{prefix}/residuals", ".safetensors", budget=budget),
        "versions": lambda: storage.list_versions(uri, budget=budget),
        "write": lambda: storage.write_bytes(f"{prefix}/images/x.png", b"png", budget=budget),
        "delete": lambda: storage.delete(f"{prefix}/images/x.png", budget=budget),
    }


def timed(call) -> tuple[float, object]:
    started = time.monotonic()
    try:
        result = call()
    except storage.StorageError as exc:
        result = exc
    return time.monotonic() - started, result


def test_every_call_ends_within_its_deadline_on_a_black_holed_store_and_works_once_it_answers(s3_bucket, proxy):
    prefix = f"s3://{s3_bucket}/run"
    storage.write_bytes(f"{prefix}/residuals/dog.safetensors", b"residual")
    calls = operations(prefix)
    assert all(not isinstance(timed(call)[1], storage.StorageError) for call in calls.values()), "all work when up"

    proxy.black_hole()
    for name, call in calls.items():
        waited, error = timed(call)
        assert isinstance(error, storage.StorageUnavailableError), (name, error)
        assert waited < DEADLINE_S + MARGIN_S, f"{name} waited {waited:.1f} s on a black hole"
        message = str(error)
        assert "within its deadline of 2 s" in message and f"s3://{s3_bucket}/run/" in message, message
    assert proxy.swallowed > 0

    proxy.up()
    waited, result = timed(calls["read"])
    assert result[0] == b"residual" and waited < DEADLINE_S, "the first call after the outage works"


def test_a_trickling_answer_is_cut_off_at_the_deadline(s3_bucket, proxy):
    """Each read gets bytes well within the socket timeout (half the deadline), so only the deadline ends it."""
    uri = f"s3://{s3_bucket}/big.bin"
    storage.write_bytes(uri, bytes(1024 * 1024))
    storage.prepare(uri, storage.deadline(DEADLINE_S))  # as a server does at start: no call waits for the client
    proxy.trickle(0.05)  # 1 MiB at 1.3 KB/s: 13 minutes
    waited, error = timed(lambda: storage.read_bytes(uri, budget=storage.deadline(DEADLINE_S)))
    assert isinstance(error, storage.StorageUnavailableError) and "no answer within 2 s" in str(error), error
    assert DEADLINE_S * 0.9 <= waited < DEADLINE_S + MARGIN_S, waited
    proxy.up()
    assert storage.read_bytes(uri, budget=storage.deadline(DEADLINE_S)) == bytes(1024 * 1024)


def test_more_calls_than_storage_threads_still_end_within_their_deadline(s3_bucket, proxy):
    """Attempts beyond the storage threads wait in a queue: they time out there, and never run later."""
    uri = f"s3://{s3_bucket}/dog"
    storage.write_bytes(uri, b"x")
    storage.prepare(uri, storage.deadline(DEADLINE_S))  # as a server does at start: no call waits for the client
    proxy.black_hole()
    waits, errors = [], []

    def call():
        waited, result = timed(lambda: storage.stat(uri, budget=storage.deadline(DEADLINE_S)))
        waits.append(waited)
        errors.append(result)

    threads = [threading.Thread(target=call) for _ in range(2 * storage.DEADLINE_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(e, storage.StorageUnavailableError) for e in errors), {type(e).__name__ for e in errors}
    assert max(waits) < DEADLINE_S + MARGIN_S, f"the slowest of {len(waits)} calls waited {max(waits):.1f} s"
    proxy.up()
    assert storage.stat(uri, budget=storage.deadline(DEADLINE_S)).size == 1


def test_a_deadline_is_positive_and_batch_budgets_keep_their_long_retries(s3_endpoint):
    with pytest.raises(ValueError, match="must be > 0"):
        storage.deadline(0)
    assert not storage.LONG_BUDGET.hard and not storage.SHORT_BUDGET.hard
    assert storage.deadline(2.0).hard and storage.deadline(2.0).seconds == 2.0
    client = storage.s3_client()  # a batch call's client: botocore's one retry, the long read timeout
    assert client.meta.config.read_timeout == storage.S3_READ_TIMEOUT and client.meta.config.retries == {
        "mode": "standard", "total_max_attempts": storage.S3_RETRY_ATTEMPTS}
