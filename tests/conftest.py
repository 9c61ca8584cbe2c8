"""Shared test settings and real local services: one S3 server and one Ray per session.

Offline, CPU, no Ray telemetry or auth files. The S3 server is moto's on 127.0.0.1, reached over
HTTP by boto3 exactly as a real endpoint would be (AWS_ENDPOINT_URL).
"""

import os
import socket
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray binds a single-machine cluster to the loopback interface only with this (meant for laptops) set.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, versioned bucket (versions let tests count how often an object was written)."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


@pytest.fixture(scope="session")
def ray_session(s3_endpoint, tmp_path_factory):
    """One local Ray for the whole session; workers inherit the S3 settings above.

    Yields the URL of Ray's Prometheus metrics endpoint (reported every second for tests).
    """
    import ray

    os.environ["RAY_TMPDIR"] = str(tmp_path_factory.mktemp("ray"))
    metrics_port = free_port()
    # address="local": a Ray of the session's own, even when another one runs on the machine.
    ray.init(address="local", num_cpus=4, object_store_memory=100 * 1024**2, include_dashboard=False,
             log_to_driver=False, configure_logging=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    yield f"http://127.0.0.1:{metrics_port}/metrics"
    ray.shutdown()


@pytest.fixture(scope="session")
def batch_run(ray_session, s3_endpoint, tmp_path_factory):
    """One real batch run for the session (4 good and 2 bad concepts, residuals in S3).

    Session-scoped so the batch tests and the metrics tests share the one Ray Train fit it costs.
    """
    from batch_inputs import first_batch_run

    return first_batch_run(tmp_path_factory)


@pytest.fixture
def proxy(s3_endpoint, monkeypatch):
    """Storage talks to the S3 server through a TcpProxy the test can take down (``.down()``, ``.up()``)."""
    from urllib.parse import urlparse

    from catversion import storage
    from tcp_proxy import TcpProxy

    target = urlparse(s3_endpoint)
    with TcpProxy(target.hostname, target.port) as tcp_proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", tcp_proxy.endpoint)
        storage.reset_clients()
        yield tcp_proxy
    monkeypatch.undo()
    storage.reset_clients()
