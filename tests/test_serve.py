"""Serving over real HTTP: the official openai client, step-level batching, isolation, fresh residuals,
the OpenAI Images surface (stream, formats, url, sizes) and every error case.

A local Ray Serve (from the shipped serve/config.yaml) with the built-in tiny model, residuals in
moto's S3 server on 127.0.0.1.
"""

import asyncio
import base64
import io
import json
import os
import threading
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

from catversion import Residual, telemetry
from catversion.encoder import patched_layers
from catversion.models import load_base_model
from catversion.telemetry import BATCH_SIZE
from catversion.training import TrainConfig, train_residual
from helpers import png_bytes
from polling import wait_until
from serve.cli import load_config

KEY = "sk-test-catversion"
BUCKET = "serve-module"
STEPS = 4  # denoising steps per request: enough to exercise the loop, cheap on CPU
TTL_S = 1.0  # residual_ttl_s of the test server


def put(key, data):
    boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=data)


def random_residual(base, tokens=1, scale=1.0, **meta):
    hidden = base.text_encoder.config.hidden_size
    layers = patched_layers(base.text_encoder.config.num_hidden_layers)
    meta = {"base_model": base.model_id, "base_fingerprint": base.fingerprint, **meta}
    return Residual(torch.randn(len(layers), 2, tokens, hidden) * scale, layers, meta={k: v for k, v in meta.items() if v})


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
    put("run/residuals/two-tokens.safetensors", random_residual(base, tokens=2).to_bytes())
    put("run/residuals/other-base.safetensors",
        random_residual(base, base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", base_fingerprint=None).to_bytes())

    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    # Comments may be indented: "   # not a key" must not become a valid key.
    keys.write_text(f"# one key per line\n   # not a key\n\n  {KEY}  \n")
    args, _, _ = load_config(str(Path(__file__).parents[1] / "serve" / "config.yaml"))
    args.update(residuals=f"s3://{BUCKET}/run", model="tiny", device="cpu", gpus_per_replica=0, api_key_file=str(keys),
                max_n=4, residual_ttl_s=TTL_S, images_prefix=str(tmp_path_factory.mktemp("images")))
    small = {"ray_actor_options": {"num_cpus": 0.5}}
    one = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    args["deployment_options"]["Generator"].update(small, **one)
    args["deployment_options"]["Ingress"].update(small, **one)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="catversion", route_prefix="/")
    # A second app with room for one image at a time and a queue of one: the overload case.
    tight = dict(args, max_queued_requests=1, deployment_options={
        "Generator": {**small, "max_ongoing_requests": 1, **one}, "Ingress": small,
    })
    serve.run(build_app(tight), name="tight", route_prefix="/tight")
    # A third with small limits, for the schema-driven fuzzing (every generated request stays cheap).
    fuzz = dict(args, max_n=2, max_steps=2, default_steps=2, max_size=64, api_key_file=None,
                deployment_options={"Generator": {**small, **one}, "Ingress": {**small, **one}})
    serve.run(build_app(fuzz), name="fuzz", route_prefix="/fuzz")
    yield {"url": f"http://127.0.0.1:{port}", "metrics": ray_session, "base": base}
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

    def shared_batch() -> bool:  # Ray reports metrics every second in tests
        count, single = batch_histogram(requests.get(server["metrics"], timeout=10).text)
        return count > single

    wait_until(shared_batch, 30, "a UNet batch holding more than one image (in the batch-size histogram)", interval=0.5)
    wanted = {spec.prometheus_name for spec in (telemetry.IMAGES, telemetry.QUEUE_WAIT_SECONDS, telemetry.UNET_STEP_SECONDS,
                                                telemetry.CACHE_SIZE, telemetry.REQUEST_SECONDS)}
    missing = set(wanted)

    def exported() -> bool:  # every serving series an operator watches
        text = requests.get(server["metrics"], timeout=10).text
        missing.intersection_update(wanted - {sample.name.removesuffix("_count")
                                              for family in text_string_to_metric_families(text)
                                              for sample in family.samples})
        return not missing

    wait_until(exported, 30, lambda: f"the export of {sorted(missing)}", interval=0.5)


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
    assert error_of(post(url, {**ok, "size": "64x144"}))[0] == 400  # past the largest side (twice the native 64)
    assert error_of(post(url, {**ok, "size": "\u00b2x\u00b2"}))[1]["param"] == "size"  # superscript digits: 400, not 500
    assert post(url, {**ok, "size": "64X64"}).status_code == 200
    assert error_of(post(url, {**ok, "n": 5}))[1]["param"] == "n"
    assert error_of(post(url, {**ok, "n": 0}))[0] == 400
    assert error_of(post(url, {**ok, "num_inference_steps": 1000}))[1]["param"] == "num_inference_steps"
    assert error_of(post(url, {**ok, "response_format": "gif"}))[1]["param"] == "response_format"
    assert error_of(post(url, {"model": "teapot-1"}))[1]["param"] == "prompt"
    status, error = error_of(post(url, {**ok, "prompt": "x" * 100_000}))
    assert status == 413 and error["code"] == "request_too_large"
    assert error_of(post(url, ok, key=None))[0] == 401
    assert error_of(post(url, ok, key="sk-wrong"))[0] == 401
    assert error_of(requests.get(f"{url}/v1/models", timeout=30))[0] == 401
    assert error_of(requests.get(f"{url}/v1/nothing-here", timeout=30))[0] == 401  # the key comes first
    assert error_of(requests.get(f"{url}/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"}, timeout=30))[0] == 404

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


def test_a_client_error_is_one_log_line_without_a_traceback(server):
    """A 404 or 422 is the client's problem, not the server's: one INFO line in the ingress's log naming the
    request id (the X-Request-ID the client got) and the reason; nothing logged as a failed request."""
    url = server["url"]
    responses = [post(url, {"model": "no-such-concept-logged", "prompt": "x", "num_inference_steps": STEPS}),
                 post(url, {"model": "corrupt", "prompt": "x", "num_inference_steps": STEPS}),
                 requests.get(f"{url}/v1/models/no-such-concept-logged", headers={"Authorization": f"Bearer {KEY}"},
                              timeout=30)]
    assert [r.status_code for r in responses] == [404, 422, 404]
    folder = Path(os.environ["RAY_TMPDIR"]) / "ray" / "session_latest" / "logs" / "serve"

    def lines(request_id):
        return [line for path in folder.glob("replica_catversion_*.log")
                for line in path.read_text(errors="replace").splitlines() if f"request {request_id}:" in line]

    for response in responses:
        request_id = response.headers["X-Request-ID"]
        logged = wait_until(lambda: lines(request_id), 30, f"a log line for request {request_id}")
        assert len(logged) == 1 and logged[0].startswith("INFO")
        assert f"{response.status_code} {response.json()['error']['code']}" in logged[0]
    replica_logs = "".join(path.read_text(errors="replace") for path in folder.glob("replica_catversion_*.log"))
    assert "Request failed" not in replica_logs and "Traceback" not in replica_logs


def test_overload_is_refused_with_429(server):
    body = {"model": "base", "prompt": "a photo", "num_inference_steps": 30}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: requests.post(f"{server['url']}/tight/v1/images/generations", json={**body, "seed": i},
                                                          headers={"Authorization": f"Bearer {KEY}"}, timeout=120), range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error" and int(refused.headers["Retry-After"]) >= 1


def test_health_and_openapi(server):
    ready = requests.get(f"{server['url']}/readyz", timeout=30)  # open, like /livez and /healthz: no key
    assert ready.status_code == 200 and ready.json() == requests.get(f"{server['url']}/healthz", timeout=30).json()
    health = ready.json()
    assert health["status"] == "ok" and health["device"] == "cpu"
    # on the CPU: the tiny model in fp32, eager (compile auto = off), warmed up before it served
    assert health["precision"] == "fp32" and health["compiled"] is False and health["warm_up_seconds"] > 0
    assert requests.get(f"{server['url']}/livez", timeout=30).json()["status"] == "ok"
    schema = requests.get(f"{server['url']}/openapi.json", timeout=30).json()
    assert "/v1/images/generations" in schema["paths"] and "/v1/models" in schema["paths"]
    assert json.dumps(schema).count("residual_scale") >= 1


def test_a_bad_residual_in_a_concurrent_mixed_batch_fails_only_itself(server):
    """Wrong token count, another base model, wrong hidden size, corrupt: each is its own 422; the rest 200."""
    bad = ["two-tokens", "other-base", "wide", "corrupt"]
    good = ["teapot-1", "mug-2", "base"] * 3
    bodies = [{"model": m, "prompt": "a photo", "num_inference_steps": 8, "seed": i} for i, m in enumerate(good + bad)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post(server["url"], b), bodies))
    assert [r.status_code for r in responses] == [200] * len(good) + [422] * len(bad)
    messages = {m: r.json()["error"]["message"] for m, r in zip(bad, responses[len(good):])}
    assert "2 token(s)" in messages["two-tokens"]
    assert "names base model 'stable-diffusion-v1-5/stable-diffusion-v1-5'" in messages["other-base"]
    for message in messages.values():  # storage locations stay in the server's log
        assert BUCKET not in message and "s3://" not in message and "residuals/" not in message


def test_a_short_request_joining_a_long_one_finishes_first_and_leaves_it_unchanged(server):
    """The long request streams: its first preview (step 38 of 150) shows it is in its denoising loop, and
    only then is the short one sent, so it joins a running batch with 112 of the long one's steps left."""
    url = server["url"]
    long_body = {"model": "teapot-1", "prompt": "a teapot", "num_inference_steps": 150, "seed": 7}
    alone = pixels(post(url, long_body).json()["data"][0]["b64_json"])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    short_done = threading.Event()

    def short_request():
        response = post(url, {"model": "mug-2", "prompt": "a mug", "num_inference_steps": 3, "seed": 1})
        short_done.set()
        return response

    events, short_finished_first = [], None
    with ThreadPoolExecutor(1) as pool:
        short = None
        for event in client.images.generate(model="teapot-1", prompt="a teapot", stream=True, partial_images=3,
                                            extra_body={"num_inference_steps": 150, "seed": 7}):
            events.append(event)
            if short is None:  # the first preview: the long request is in its denoising loop
                short = pool.submit(short_request)
            if event.type == "image_generation.completed":
                short_finished_first = short_done.is_set()
        assert short.result().status_code == 200
    assert [e.type for e in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert short_finished_first, "the 3-step request did not finish before the 150-step one it joined"
    joined = pixels(events[-1].b64_json)
    assert np.abs(joined - alone).mean() <= 1.0  # <= 1/255 on average: the join did not change the long image


def test_a_residual_replaced_or_deleted_in_place_is_noticed_within_the_ttl(server):
    url, base = server["url"], server["base"]
    headers = {"Authorization": f"Bearer {KEY}"}
    first, second = random_residual(base, scale=2.0), random_residual(base, scale=2.0)
    put("run/residuals/fresh-1.safetensors", first.to_bytes())
    body = {"model": "fresh-1", "prompt": "a photo", "num_inference_steps": 2, "seed": 3}
    before = pixels(post(url, body).json()["data"][0]["b64_json"])
    put("run/residuals/fresh-1.safetensors", second.to_bytes())
    # The generation path itself revalidates once the TTL has passed.
    wait_until(lambda: np.abs(pixels(post(url, body).json()["data"][0]["b64_json"]) - before).mean() > 1.0, 30,
               "serving the replaced residual", interval=0.2)
    model = requests.get(f"{url}/v1/models/fresh-1", headers=headers, timeout=30).json()
    assert model["sha256"] == second.sha256
    # A version pin: the current residual by a prefix of its sha256; another prefix is 404.
    assert post(url, {**body, "model": f"fresh-1@{second.sha256.removeprefix('sha256:')[:10]}"}).status_code == 200
    assert post(url, {**body, "model": f"fresh-1@{second.sha256[:20]}"}).status_code == 200  # as /v1/models shows it
    old = first.sha256.removeprefix("sha256:")[:10]
    status, error = error_of(post(url, {**body, "model": f"fresh-1@{old}"}))
    assert status == 404 and old in error["message"]
    assert error_of(post(url, {**body, "model": "fresh-1@not-hex"}))[0] == 400

    corrupt = bytearray(first.to_bytes())
    corrupt[-1] ^= 0xFF
    put("run/residuals/fresh-1.safetensors", bytes(corrupt))  # GET /v1/models/{id} checks at once
    status, error = error_of(requests.get(f"{url}/v1/models/fresh-1", headers=headers, timeout=30))
    assert status == 422 and "sha256 mismatch" in error["message"]
    assert error_of(post(url, body))[0] == 422  # never the old version, silently
    boto3.client("s3").delete_object(Bucket=BUCKET, Key="run/residuals/fresh-1.safetensors")
    wait_until(lambda: post(url, body).status_code == 404, 30, "a 404 for the deleted residual", interval=0.2)


def test_streaming_with_partial_images_through_the_openai_client(server):
    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0)
    stream = client.images.generate(model="teapot-1", prompt="a teapot", stream=True, partial_images=2, size="64x32",
                                    output_format="jpeg", extra_body={"num_inference_steps": 6, "seed": 9})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events:
        image = Image.open(io.BytesIO(base64.b64decode(event.b64_json)))
        assert image.format == "JPEG" and image.size == (64, 32) and event.size == "64x32"
    assert events[-1].output_format == "jpeg"
    # The same request without streaming gives the same final image.
    plain = client.images.generate(model="teapot-1", prompt="a teapot", size="64x32", output_format="jpeg",
                                   extra_body={"num_inference_steps": 6, "seed": 9})
    assert plain.data[0].b64_json == events[-1].b64_json
    # A stream sends one image; unknown models fail before the first event, with their status.
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="teapot-1", prompt="x", stream=True, n=2)
    with pytest.raises(openai.NotFoundError):
        list(client.images.generate(model="no-such-concept", prompt="x", stream=True))


def test_a_stream_that_fails_midway_sends_the_json_error_body_in_an_error_event(caplog):
    """After the first event the status is sent, so an error travels as `event: error` whose data is
    {"type": "error", **the body the same error gets as a JSON response}; an unexpected failure is a
    server_error whose message names the request id that its one log line (with the traceback) names."""
    import logging
    from types import SimpleNamespace

    from serve.app import ImageGenerationRequest, Ingress, request_error_response
    from serve.errors import UnusableResidualError

    def stream(failure):
        recorded = []

        async def image_events(item):  # the generator's events as `_stream` gets them: accepted, a preview, the failure
            yield {"kind": "accepted"}
            yield {"kind": "partial", "index": 0, "image": b"preview"}
            raise failure

        ingress = SimpleNamespace(_image_events=image_events, _record=lambda started, status: recorded.append(status))
        body = ImageGenerationRequest(model="teapot-1", prompt="a teapot", stream=True, partial_images=1)

        async def run():
            response = await Ingress.func_or_class._stream(ingress, {}, body, "64x64", 0.0)
            return "".join([chunk async for chunk in response.body_iterator])

        events = [block.split("\n", 1) for block in asyncio.run(run()).split("\n\n") if block]
        return [(name.removeprefix("event: "), json.loads(data.removeprefix("data: "))) for name, data in events], recorded

    failure = UnusableResidualError("model 'teapot-1' cannot be used: sha256 mismatch")
    events, recorded = stream(failure)
    assert [name for name, _ in events] == ["image_generation.partial_image", "error"]
    assert events[1][1] == {"type": "error", **json.loads(request_error_response(failure).body)}
    assert events[1][1]["error"] == {"message": failure.message, "type": "invalid_request_error",
                                     "param": "model", "code": "residual_invalid"}
    assert recorded == [422]

    caplog.set_level(logging.ERROR, logger="ray.serve")
    events, recorded = stream(RuntimeError("CUDA error: an illegal memory access"))
    name, data = events[-1]
    assert name == "error" and data["error"]["type"] == "server_error" and data["error"]["code"] == "server_error"
    assert data["error"]["message"].startswith("the server failed while streaming; retry, or report request id ")
    assert "CUDA" not in data["error"]["message"]  # the cause goes to the log, not to the client
    [logged] = [r for r in caplog.records if r.exc_info and r.exc_info[0] is RuntimeError]
    assert recorded == [500]


def test_output_formats_sizes_and_url_responses(server):
    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0)
    extra = {"num_inference_steps": 2, "seed": 4}
    for fmt, pil_format in (("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")):
        result = client.images.generate(model="mug-2", prompt="a mug", size="32x48", output_format=fmt,
                                        output_compression=50, extra_body=extra)
        image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
        assert image.format == pil_format and image.size == (32, 48) and result.output_format == fmt
    auto = client.images.generate(model="mug-2", prompt="a mug", size="auto", quality="high", user="u1", extra_body=extra)
    assert Image.open(io.BytesIO(base64.b64decode(auto.data[0].b64_json))).size == (64, 64)  # native size
    linked = client.images.generate(model="mug-2", prompt="a mug", response_format="url", n=2, extra_body=extra)
    fetched = [requests.get(d.url, timeout=30) for d in linked.data]  # no API key: the link itself is the credential
    assert [f.status_code for f in fetched] == [200, 200] and fetched[0].headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched[0].content)).size == (64, 64)
    tampered = linked.data[0].url.replace("signature=", "signature=0")
    assert error_of(requests.get(tampered, timeout=30))[0] == 404


def test_unsupported_openai_fields_are_refused_by_name_and_ignorable_ones_accepted(server):
    url = server["url"]
    ok = {"model": "base", "prompt": "a photo", "num_inference_steps": 1}
    for field, value in (("background", "transparent"), ("output_format", "gif"), ("output_format", "svg"),
                         ("frame_count", 4), ("svg", {"model": "x"}), ("partial_images", 4), ("num_inference_step", 3)):
        status, error = error_of(post(url, {**ok, field: value}))
        assert status == 400 and error["param"] == field, (field, error)
    ignored = {"quality": "high", "style": "vivid", "user": "u", "moderation": "low", "safety_identifier": "s",
               "complexity": "low", "background": "opaque"}
    assert post(url, {**ok, **ignored}).status_code == 200
    for route in ("edits", "variations"):
        status, error = error_of(requests.post(f"{url}/v1/images/{route}", headers={"Authorization": f"Bearer {KEY}"},
                                               timeout=30))
        assert status == 404 and "not supported" in error["message"]


def test_hostile_input_gets_4xx_never_5xx(server):
    url = server["url"]
    ok = {"model": "base", "prompt": "a photo", "num_inference_steps": 1}

    def chunks():  # no Content-Length: the limit must count the bytes as they arrive
        for _ in range(64):
            yield b"x" * 65536

    response = requests.post(f"{url}/v1/images/generations", data=chunks(), timeout=60,
                             headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert error_of(response)[0] == 413
    # The key is checked before the body: no key and a huge body is 401.
    assert requests.post(f"{url}/v1/images/generations", data=b"x" * 200_000, timeout=60).status_code == 401
    headers = {"Authorization": "Bearer sk-\u00e9t\u00e9".encode("utf-8")}  # non-ASCII header bytes
    assert error_of(requests.post(f"{url}/v1/images/generations", json=ok, headers=headers, timeout=30))[0] == 401
    assert error_of(post(url, ok, key="# not a key"))[0] == 401  # an indented comment in the key file is no key
    for body in ([1, 2], "text", {**ok, "n": "many"}, {**ok, "seed": -1}, {**ok, "size": "0x0"},
                 {**ok, "size": "99999999999x1"}, {**ok, "model": "../../etc/passwd"}, {**ok, "model": "a" * 300},
                 {**ok, "guidance_scale": "nan"}):
        response = requests.post(f"{url}/v1/images/generations", data=json.dumps(body), timeout=30,
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
    not_json = requests.post(f"{url}/v1/images/generations", data=b"{not json", timeout=30,
                             headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert error_of(not_json)[0] == 400


def test_openapi_declares_bearer_auth_error_bodies_and_enums(server):
    schema = requests.get(f"{server['url']}/openapi.json", timeout=30).json()
    assert any(s.get("scheme") == "bearer" for s in schema["components"]["securitySchemes"].values())
    operation = schema["paths"]["/v1/images/generations"]["post"]
    assert operation["security"]
    for status in ("400", "401", "404", "413", "422", "429", "503"):
        assert operation["responses"][status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    fields = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    enums = {name: [v for option in fields[name].get("anyOf", [fields[name]]) for v in option.get("enum", [])]
             for name in ("response_format", "output_format", "background")}
    assert enums == {"response_format": ["b64_json", "url"], "output_format": ["png", "jpeg", "webp"],
                     "background": ["auto", "opaque"]}


def test_schemathesis_finds_no_server_errors_or_schema_violations(server):
    """Property-based requests generated from /openapi.json (the small-limits app: every case is cheap)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                                   response_schema_conformance, status_code_conformance)

    base_url = f"{server['url']}/fuzz"
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]
    failures, cases = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=50, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case):
            nonlocal cases
            cases += 1
            try:
                case.call_and_validate(base_url=base_url, checks=checks, timeout=60)
            except Exception as exc:  # collect every failure, not only the first
                failures.append(f"{operation.label}: {exc}")

        run()
    assert cases >= 200 and not failures, "\n".join(failures[:5])


def test_key_files_skip_comments_and_blank_lines_and_refuse_malformed_keys(tmp_path):
    from serve.app import read_keys

    keys = tmp_path / "keys.txt"
    keys.write_text("# keys\n\n   # indented comment\n\tsk-one  \nsk-two\n")
    assert read_keys(str(keys)) == [b"sk-one", b"sk-two"]
    keys.write_text("sk-one # trailing comment\n")
    with pytest.raises(ValueError, match="line 1"):
        read_keys(str(keys))
    keys.write_text("# only comments\n")
    with pytest.raises(ValueError, match="has no keys"):
        read_keys(str(keys))


def test_precision_and_compile_settings_are_checked_and_flags_override_the_config(tmp_path):
    from catversion.cli import build_parser
    from serve.cli import application_args
    from serve.config import ServeSettings

    with pytest.raises(ValueError, match=r"precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        ServeSettings.from_dict({"residuals": "s3://b/run", "precision": "fp8"})
    with pytest.raises(ValueError, match=r"compile must be one of auto, on, off, got 'sometimes'"):
        ServeSettings.from_dict({"residuals": "s3://b/run", "compile": "sometimes"})
    with pytest.raises(ValueError, match=r"unknown serve settings \['precison'\]"):
        ServeSettings.from_dict({"residuals": "s3://b/run", "precison": "bf16"})

    config = tmp_path / "serve.yaml"
    config.write_text("applications:\n  - import_path: serve.app:build_app\n    args:\n"
                      "      residuals: s3://b/run\n      precision: fp16\n      compile: off\n")  # YAML: off is False

    def settings(*flags):
        app_args, _ = application_args(build_parser().parse_args(["serve", *flags]))
        app_args.pop("deployment_options", None)
        chosen = ServeSettings.from_dict(app_args)
        return chosen.precision, chosen.compile

    assert settings("--residuals", "s3://b/run") == ("auto", "auto")
    assert settings("--config", str(config)) == ("fp16", "off")
    assert settings("--config", str(config), "--precision", "bf16", "--compile") == ("bf16", "on")
    assert settings("--residuals", "s3://b/run", "--no-compile") == ("auto", "off")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--precision", "fp8"])


def test_a_replica_is_ready_only_after_its_warm_up_and_earlier_requests_wait(ray_session, tmp_path, monkeypatch):
    """Serve routes requests to a replica once its first health check passes: that check waits for the
    warm-up on the stepping thread; a request that reaches the generator earlier waits in the queue."""
    from catversion.stepbatch import StepBatcher
    from serve.app import Generator

    warm_up = StepBatcher.warm_up
    release = threading.Event()

    def slow_warm_up(self):
        assert release.wait(60)
        return warm_up(self)

    monkeypatch.setattr(StepBatcher, "warm_up", slow_warm_up)
    settings = {"residuals": str(tmp_path), "model": "tiny", "device": "cpu"}
    generator = Generator.func_or_class(settings)
    item = {"model": "base", "prompt": "a teapot", "negative_prompt": "", "seed": 1, "residual_scale": 1.0, "steps": 2,
            "guidance": 5.0, "height": 64, "width": 64, "partial_images": 0, "output_format": "png", "output_compression": None}

    async def generate(item):  # the finished image's event, as the ingress reads it from the stream
        return [event async for event in generator.generate_stream(item)][-1]

    async def start():
        early = asyncio.create_task(generate(item))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(generator.check_health(), 0.5)
        assert not early.done() and generator.info()["warm_up_seconds"] is None
        release.set()
        await asyncio.wait_for(generator.check_health(), 60)
        return await asyncio.wait_for(early, 60)

    try:
        result = asyncio.run(start())
        assert result["image"].startswith(b"\x89PNG") and result["seed"] == 1
        assert generator.info()["warm_up_seconds"] > 0
    finally:
        generator._stop.set()

    def failing_warm_up(self):
        raise RuntimeError("out of GPU memory")

    monkeypatch.setattr(StepBatcher, "warm_up", failing_warm_up)
    broken = Generator.func_or_class(settings)
    try:
        with pytest.raises(RuntimeError, match="warm-up failed.*out of GPU memory"):
            asyncio.run(asyncio.wait_for(broken.check_health(), 60))
    finally:
        broken._stop.set()
