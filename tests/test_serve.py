"""Serving over real HTTP: the official openai client, cross-concept batching, and every error case.

A local Ray Serve (from the shipped serve/config.yaml) with the built-in tiny model, residuals in
moto's S3 server on 127.0.0.1.
"""

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import numpy as np
import openai
import pytest
import requests
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from catversion import Residual
from catversion.models import load_base_model
from catversion.telemetry import BATCH_SIZE
from catversion.training import TrainConfig, train_residual
from helpers import png_bytes
from serve.cli import load_config

KEY = "sk-test-catversion"
BUCKET = "serve-module"
STEPS = 4  # denoising steps per request: enough to exercise the loop, cheap on CPU


def put(key, data):
    boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=data)


@pytest.fixture(scope="module")
def server(ray_session, s3_endpoint, tmp_path_factory):
    from ray import serve

    from conftest import free_port
    from serve.app import build_app

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    base = load_base_model("tiny")
    for concept_id, word, seed in (("teapot-1", "teapot", 1), ("mug-2", "mug", 2)):
        residual = train_residual(base, [png_bytes(seed), png_bytes(seed + 10)], word, TrainConfig(steps=2, seed=seed))
        put(f"run/residuals/{concept_id}.safetensors", residual.to_bytes())
    corrupt = bytearray(train_residual(base, [png_bytes(3)], "cat", TrainConfig(steps=1)).to_bytes())
    corrupt[-1] ^= 0xFF
    put("run/residuals/corrupt.safetensors", bytes(corrupt))
    put("run/residuals/wide.safetensors", Residual(torch.randn(3, 2, 1, 768), (9, 10, 11)).to_bytes())

    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# one key per line\n{KEY}\n")
    args, _, _ = load_config(str(Path(__file__).parents[1] / "serve" / "config.yaml"))
    args.update(residuals=f"s3://{BUCKET}/run", model="tiny", device="cpu", gpus_per_replica=0, api_key_file=str(keys),
                batch_wait_timeout_s=0.3, max_n=4)
    small = {"ray_actor_options": {"num_cpus": 0.5}}
    args["deployment_options"]["Generator"].update(small, autoscaling_config={"min_replicas": 1, "max_replicas": 1})
    args["deployment_options"]["Ingress"].update(small, autoscaling_config={"min_replicas": 1, "max_replicas": 1})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="catversion", route_prefix="/")
    # A second app with room for one image at a time and a queue of one: the overload case.
    tight = dict(args, max_queued_requests=1, deployment_options={
        "Generator": {**small, "max_ongoing_requests": 1, "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        "Ingress": small,
    })
    serve.run(build_app(tight), name="tight", route_prefix="/tight")
    yield {"url": f"http://127.0.0.1:{port}", "metrics": ray_session}
    serve.shutdown()


def post(url, body, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}/v1/images/generations", json=body, headers=headers, timeout=120, **kwargs)


def pixels(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def test_openai_client_lists_models_and_generates_for_concepts_and_base(server):
    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0)
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "base" and {"teapot-1", "mug-2"} <= set(ids)
    for model in ("teapot-1", "mug-2", "base"):
        result = client.images.generate(model=model, prompt="a teapot on a beach", n=2, size="64x64",
                                        response_format="b64_json", extra_body={"num_inference_steps": STEPS, "seed": 5})
        assert len(result.data) == 2
        first, second = (pixels(d.b64_json) for d in result.data)
        assert first.shape == (64, 64, 3) and np.abs(first - second).mean() > 0.5  # seeds 5 and 6 differ
    model = client.models.retrieve("teapot-1")
    assert model.id == "teapot-1" and model.model_extra["class_word"] == "teapot"


def test_concurrent_mixed_requests_share_unet_batches(server):
    models = ["teapot-1", "mug-2", "base"]
    bodies = [{"model": models[i % 3], "prompt": "a photo", "num_inference_steps": STEPS, "seed": i} for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        statuses = [r.status_code for r in pool.map(lambda b: post(server["url"], b), bodies)]
    assert statuses == [200] * 16
    deadline = time.time() + 30
    while time.time() < deadline:  # Ray reports metrics every second in tests
        count, single = batch_histogram(requests.get(server["metrics"], timeout=10).text)
        if count > single:
            break
        time.sleep(1)
    assert count > single, "no UNet batch held more than one image"


def batch_histogram(text):
    """(batches observed, batches of size <= 1) from Ray's Prometheus text, read with Prometheus's own parser."""
    count = single = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == BATCH_SIZE.prometheus_name + "_count":
                count += sample.value
            elif sample.name == BATCH_SIZE.prometheus_name + "_bucket" and float(sample.labels["le"]) == 1.0:
                single += sample.value
    return count, single


def test_a_request_gives_the_same_image_alone_and_inside_a_mixed_batch(server):
    body = {"model": "teapot-1", "prompt": "a teapot in the snow", "num_inference_steps": STEPS, "seed": 1234}
    alone = pixels(post(server["url"], body).json()["data"][0]["b64_json"])
    others = [{"model": m, "prompt": "something else", "num_inference_steps": STEPS, "seed": i}
              for i, m in enumerate(["mug-2", "base", "mug-2", "teapot-1", "base"])]
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda b: post(server["url"], b), [body] + others))
    assert all(r.status_code == 200 for r in responses)
    mixed = pixels(responses[0].json()["data"][0]["b64_json"])
    assert np.abs(mixed - alone).max() <= 1  # identical up to rounding of the last uint8 step


def error_of(response):
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"])
    return response.status_code, body["error"]


def test_errors_use_openai_bodies_and_statuses(server):
    url = server["url"]
    ok = {"model": "teapot-1", "prompt": "a teapot", "num_inference_steps": STEPS}
    status, error = error_of(post(url, {**ok, "model": "no-such-concept"}))
    assert status == 404 and error["code"] == "model_not_found" and "no-such-concept" in error["message"]
    status, error = error_of(post(url, {**ok, "size": "50x50"}))
    assert status == 400 and error["param"] == "size" and "multiple of 16" in error["message"]
    assert error_of(post(url, {**ok, "size": "64x128"}))[0] == 400
    assert error_of(post(url, {**ok, "size": "\u00b2x\u00b2"}))[1]["param"] == "size"  # superscript digits: 400, not 500
    assert post(url, {**ok, "size": "64X64"}).status_code == 200
    assert error_of(post(url, {**ok, "n": 5}))[1]["param"] == "n"
    assert error_of(post(url, {**ok, "n": 0}))[0] == 400
    assert error_of(post(url, {**ok, "num_inference_steps": 1000}))[1]["param"] == "num_inference_steps"
    assert "b64_json" in error_of(post(url, {**ok, "response_format": "url"}))[1]["message"]
    assert error_of(post(url, {"model": "teapot-1"}))[1]["param"] == "prompt"
    status, error = error_of(post(url, {**ok, "prompt": "x" * 100_000}))
    assert status == 413 and error["code"] == "request_too_large"
    assert error_of(post(url, ok, key=None))[0] == 401
    assert error_of(post(url, ok, key="sk-wrong"))[0] == 401
    assert error_of(requests.get(f"{url}/v1/models", timeout=30))[0] == 401
    assert error_of(requests.get(f"{url}/v1/nothing-here", timeout=30))[0] == 404

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="no-such-concept", prompt="x", response_format="b64_json")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_a_corrupt_or_incompatible_residual_fails_alone(server):
    url = server["url"]
    ok = {"model": "teapot-1", "prompt": "a teapot", "num_inference_steps": STEPS}
    status, error = error_of(post(url, {**ok, "model": "corrupt"}))
    assert status == 422 and error["code"] == "residual_invalid" and "sha256 mismatch" in error["message"]
    assert error["param"] == "model"
    status, error = error_of(post(url, {**ok, "model": "wide"}))
    assert status == 422 and "hidden size 768" in error["message"]
    headers = {"Authorization": f"Bearer {KEY}"}
    assert requests.get(f"{url}/v1/models/corrupt", headers=headers, timeout=30).status_code == 422
    status, error = error_of(requests.get(f"{url}/v1/models/no-such-concept", headers=headers, timeout=30))
    assert status == 404 and error["code"] == "model_not_found"
    assert post(url, ok).status_code == 200  # the others keep working


def test_overload_is_refused_with_429(server):
    body = {"model": "base", "prompt": "a photo", "num_inference_steps": 30}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: requests.post(f"{server['url']}/tight/v1/images/generations", json={**body, "seed": i},
                                                          headers={"Authorization": f"Bearer {KEY}"}, timeout=120), range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error"


def test_health_and_openapi(server):
    assert requests.get(f"{server['url']}/healthz", timeout=30).json()["status"] == "ok"
    schema = requests.get(f"{server['url']}/openapi.json", timeout=30).json()
    assert "/v1/images/generations" in schema["paths"] and "/v1/models" in schema["paths"]
    assert json.dumps(schema).count("residual_scale") >= 1
