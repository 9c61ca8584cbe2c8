"""Serving under faults, over real HTTP: generator replicas killed with SIGKILL mid-load, overload shed
with 429 and Retry-After, clients that leave, failures nobody expected; every answer an OpenAI body.

A local Ray Serve with the built-in tiny model on the session's Ray; the replicas are real processes,
killed by their pid. Synchronisation is on what a user or an operator sees: HTTP answers, /readyz,
Serve's own replica states and the Prometheus metrics endpoint.
"""

import asyncio
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from catversion import telemetry
from serve.app import READINESS_TTL_S
from polling import wait_until

STEPS = 150  # the longest request the server takes: in flight for seconds on the CPU
FAULTS_APP, SHED_APP = "faults", "shed"
# The shed app's max_queued_work: almost nothing may be ahead of a request, so of six sent at once the first is
# admitted and the others are refused until it has nearly finished (its 150 steps take seconds), however
# slowly a busy machine delivers them.
SHED_BOUND = 1


def openai_error(response):
    """(status, the error object) of a response that must carry OpenAI's error body."""
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), response.text
    return response.status_code, body["error"]


def metric_samples(metrics_url: str, spec, **labels) -> dict[tuple, float]:
    """Each exported series of a counter (or a histogram's _count) with these labels: its labels -> value.
    Ray exports one series per process, and a dead process's series goes stale or away."""
    names = {spec.prometheus_name, spec.prometheus_name + "_count"}
    text = requests.get(metrics_url, timeout=10).text
    return {tuple(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name in names and all(sample.labels.get(k) == v for k, v in labels.items())}


def metric_increase(metrics_url: str, before: dict[tuple, float], spec, **labels) -> float:
    """How much the live series grew since ``before`` (a replica killed meanwhile takes its series along)."""
    return sum(value - before.get(key, 0.0) for key, value in metric_samples(metrics_url, spec, **labels).items())


@pytest.fixture(scope="module")
def faults_server(ray_session, tmp_path_factory):
    """Two apps: "faults" with two generator replicas (one can take over the other's requests), a short
    replica wait and room for every test's load; "shed" with one replica that holds SHED_BOUND of work."""
    from ray import serve

    from conftest import free_port
    from serve.app import build_app

    small = {"ray_actor_options": {"num_cpus": 0.5}}
    one = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    args = {"residuals": str(tmp_path_factory.mktemp("residuals")), "model": "tiny", "device": "cpu",
            "max_batch_size": 4, "replica_wait_s": 3.0, "max_queued_work": 100_000,
            "deployment_options": {
                "Generator": {**small, "autoscaling_config": {"min_replicas": 2, "max_replicas": 2}},
                "Ingress": {**small, **one}}}
    port = free_port()
    serve.shutdown()  # a Serve another module left would keep its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=FAULTS_APP, route_prefix="/")
    shed = dict(args, max_queued_work=SHED_BOUND, deployment_options={"Generator": {**small, **one},
                                                                       "Ingress": {**small, **one}})
    serve.run(build_app(shed), name=SHED_APP, route_prefix="/shed")
    yield {"url": f"http://127.0.0.1:{port}", "metrics": ray_session}
    serve.shutdown()


def running_generators() -> int:
    from ray import serve

    deployment = serve.status().applications[FAULTS_APP].deployments["Generator"]
    return deployment.replica_states.get("RUNNING", 0)


def generator_pids(count: int) -> set[int]:
    """The process ids of ``count`` running generator replicas (asked through Serve until each has answered)."""
    from ray import serve

    handle = serve.get_deployment_handle("Generator", FAULTS_APP)
    pids: set[int] = set()

    def all_seen() -> bool:
        pids.update(handle.info.remote().result(timeout_s=30)["pid"] for _ in range(4))
        return len(pids) >= count

    wait_until(all_seen, 60, f"{count} distinct generator replicas answering")
    return pids


def ingress_log_lines(pattern: str) -> list[str]:
    """Lines of the ingress replicas' log files (Serve writes them under the session's logs) holding ``pattern``."""
    folder = Path(os.environ["RAY_TMPDIR"]) / "ray" / "session_latest" / "logs" / "serve"
    return [line for path in folder.glob(f"replica_{FAULTS_APP}_Ingress_*.log")
            for line in path.read_text(errors="replace").splitlines() if pattern in line]


def load(url: str, count: int):
    """``count`` concurrent generations on threads (n=4, STEPS steps each: with 4 samples per UNet batch, a
    replica has work queued for several batches); futures of their responses."""
    pool = ThreadPoolExecutor(count)
    body = {"model": "base", "prompt": "a photo", "num_inference_steps": STEPS, "n": 4}
    futures = [pool.submit(requests.post, f"{url}/v1/images/generations", json={**body, "seed": 10 * i}, timeout=300)
               for i in range(count)]
    pool.shutdown(wait=False)
    return futures


def wait_until_both_replicas_run(metrics_url: str, before: dict[tuple, float]) -> None:
    """Until 5 more samples have taken their first UNet step (the queue-wait histogram counts them then): a
    replica runs at most 4 (max_batch_size), so both replicas are then in their denoising loops."""
    wait_until(lambda: metric_increase(metrics_url, before, telemetry.QUEUE_WAIT_SECONDS) >= 5, 60,
               "5 samples taking their first denoising step", interval=0.2)


def test_http_a_request_on_a_killed_generator_replica_goes_to_the_other_one(faults_server):
    url, metrics = faults_server["url"], faults_server["metrics"]
    wait_until(lambda: running_generators() == 2, 120, "two warm generator replicas")
    victim = next(iter(generator_pids(2)))
    retried_before = len(ingress_log_lines("sending it to another"))
    queued = metric_samples(metrics, telemetry.QUEUE_WAIT_SECONDS)
    futures = load(url, 8)
    wait_until_both_replicas_run(metrics, queued)
    os.kill(victim, signal.SIGKILL)
    responses = [future.result() for future in futures]
    assert [r.status_code for r in responses] == [200] * 8, [r.text[:300] for r in responses]
    assert all(len(r.json()["data"]) == 4 for r in responses)
    # The victim held some of them: they went to the surviving replica, once each.
    wait_until(lambda: len(ingress_log_lines("sending it to another")) > retried_before, 30,
               "the ingress logging a request sent to another replica")
    assert requests.get(f"{url}/readyz", timeout=30).status_code == 200  # one replica stayed warm throughout


def test_http_with_every_generator_replica_killed_answers_are_openai_bodies_and_readiness_waits_for_a_warm_one(
        faults_server):
    url, metrics = faults_server["url"], faults_server["metrics"]
    wait_until(lambda: running_generators() == 2, 180, "two warm generator replicas")
    assert requests.get(f"{url}/readyz", timeout=30).status_code == 200
    pids = generator_pids(2)
    queued = metric_samples(metrics, telemetry.QUEUE_WAIT_SECONDS)
    futures = load(url, 8)
    wait_until_both_replicas_run(metrics, queued)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()

    seen = []

    def not_ready():
        response = requests.get(f"{url}/readyz", timeout=30)
        seen[:] = [response.status_code, response.text[:200], running_generators()]
        return [response] if response.status_code == 503 else None  # a 503 Response itself is falsy

    [refused] = wait_until(not_ready, 30, lambda: f"/readyz saying not ready once no generator replica lives "
                                                  f"(last: {seen})", interval=0.2)
    status, error = openai_error(refused)
    assert error["code"] == "service_unavailable" and int(refused.headers["Retry-After"]) >= 1
    assert openai_error(requests.get(f"{url}/healthz", timeout=30))[0] == 503  # the older name says the same

    responses = [future.result() for future in futures]
    for response in responses:  # each either made it before the kill or is a 503 with Retry-After
        if response.status_code != 200:
            status, error = openai_error(response)
            assert status == 503 and error["type"] == "server_error" and int(response.headers["Retry-After"]) >= 1
    assert any(r.status_code == 503 for r in responses), "no request was in flight when the replicas died"

    # Not ready until a replacement has warmed up (Serve counts it RUNNING), then ready within readiness's
    # own caching (READINESS_TTL_S), and requests are served again.
    warm_since = None
    while True:
        ready = requests.get(f"{url}/readyz", timeout=30).status_code
        running = running_generators()  # asked after /readyz: a 200 means one was running before, so now too
        assert ready == 503 or running > 0, f"/readyz said {ready} with no warm generator replica"
        if ready == 200:
            break
        warm_since = warm_since or (time.monotonic() if running else None)
        assert warm_since is None or time.monotonic() - warm_since < READINESS_TTL_S + 5, "a replica is warm, /readyz 503"
        assert time.monotonic() - killed < 180, "no generator replica warm again within 180 s"
        time.sleep(0.2)
    again = requests.post(f"{url}/v1/images/generations", json={"model": "base", "prompt": "a photo",
                                                                 "num_inference_steps": 2}, timeout=120)
    assert again.status_code == 200


def test_http_a_client_that_leaves_is_counted_as_abandoned_not_as_200(faults_server):
    url, metrics = faults_server["url"], faults_server["metrics"]
    wait_until(lambda: running_generators() >= 1, 180, "a warm generator replica")
    before = metric_samples(metrics, telemetry.REQUESTS, status=telemetry.ABANDONED)
    body = {"model": "base", "prompt": "a photo", "num_inference_steps": STEPS, "size": "128x128"}
    with requests.post(f"{url}/v1/images/generations", json={**body, "stream": True, "partial_images": 3},
                       stream=True, timeout=120) as stream:
        assert stream.status_code == 200
        next(stream.iter_lines())  # the first preview's line: the sample is in the running batch; then hang up
    with pytest.raises(requests.exceptions.ReadTimeout):  # a plain request whose client gives up
        requests.post(f"{url}/v1/images/generations", json=body, timeout=(10, 0.5))
    wait_until(lambda: metric_increase(metrics, before, telemetry.REQUESTS, status=telemetry.ABANDONED) >= 2, 30,
               "two requests counted as abandoned", interval=0.5)


def test_http_work_past_the_bound_is_refused_at_once_with_429_and_retry_after_and_autoscaling_sees_it(
        faults_server):
    from ray import serve

    from serve.autoscaling import SHED_DEMAND

    url = f"{faults_server['url']}/shed"
    body = {"model": "base", "prompt": "a photo", "num_inference_steps": STEPS}

    def timed(seed):
        started = time.monotonic()
        response = requests.post(f"{url}/v1/images/generations", json={**body, "seed": seed}, timeout=120)
        return response, time.monotonic() - started

    assert requests.post(f"{url}/v1/images/generations", json={**body, "num_inference_steps": 2},
                         timeout=120).status_code == 200  # warm: the ingress knows the model, a step was timed
    handle = serve.get_deployment_handle("Generator", SHED_APP)
    answers, stats = [], None
    with ThreadPoolExecutor(6) as pool:
        for future in as_completed([pool.submit(timed, seed) for seed in range(6)]):
            answers.append(future.result())
            if stats is None and sum(response.status_code == 429 for response, _ in answers) >= 3:
                # What the refusals are worth in ongoing requests, as the autoscaling policy reads it
                # (serve/autoscaling.py), while the admitted work still runs.
                stats = handle.record_autoscaling_stats.remote().result(timeout_s=30)
    statuses = [response.status_code for response, _ in answers]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 1 and statuses.count(429) >= 3, statuses
    for response, seconds in answers:
        if response.status_code == 429:
            status, error = openai_error(response)
            assert error["type"] == "rate_limit_error" and error["code"] == "overloaded"
            assert int(response.headers["Retry-After"]) >= 1
            assert seconds < 1.0, f"a refusal took {seconds:.2f} s"
    assert stats[SHED_DEMAND] > 0
    assert timed(99)[0].status_code == 200  # once the admitted work is done, there is room again


# ---- an unexpected failure, through the ASGI guard every route goes through -----------------------


def asgi_call(app, path="/v1/models", headers=()):
    """Drive an ASGI app with one GET request; (status, headers, body bytes) of its answer."""
    scope = {"type": "http", "method": "GET", "path": path, "headers": list(headers), "query_string": b""}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


def test_http_an_unexpected_failure_is_a_500_whose_id_the_log_line_with_the_traceback_carries(caplog):
    import json

    from ray.exceptions import ActorDiedError

    from catversion import storage
    from serve.app import _Guard
    from serve.errors import UnknownConceptError

    def failing(exc):
        async def app(scope, receive, send):
            raise exc
        return _Guard(app)

    caplog.set_level(logging.INFO, logger="ray.serve")
    status, headers, body = asgi_call(failing(KeyError("a bug")), headers=[(b"x-request-id", b"req-123")])
    error = json.loads(body)["error"]
    assert status == 500 and error["type"] == "server_error" and error["code"] == "server_error"
    assert "req-123" in error["message"] and "KeyError" not in error["message"]
    logged = [r for r in caplog.records if "req-123" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.ERROR and logged[0].exc_info[0] is KeyError

    caplog.clear()
    status, headers, body = asgi_call(failing(UnknownConceptError("model 'x' does not exist")))
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    assert [r.levelno for r in caplog.records] == [logging.INFO] and not caplog.records[0].exc_info  # one line
    for exc, code in ((storage.StorageError("s3://b/k: connection refused"), "storage_unavailable"),
                      (ActorDiedError(), "service_unavailable")):
        status, headers, body = asgi_call(failing(exc))
        assert status == 503 and json.loads(body)["error"]["code"] == code and int(headers[b"retry-after"]) >= 1
        assert "s3://" not in body.decode()
