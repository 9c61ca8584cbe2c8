"""One endpoint serving two base models of different families (an SD 1.x and an SDXL tiny model), over real
HTTP with the official openai client: each concept goes to the generator of the base model it was trained
on, GET /v1/models shows each concept's base model, and a residual of a base model not served is a 422
naming both."""

import base64
import io
from pathlib import Path

import boto3
import numpy as np
import openai
import pytest
import requests
from PIL import Image

from catversion.conditioning import Conditioner
from catversion.generation import GenerationRequest, ImageGenerator
from catversion.models import load_base_model
from catversion.samples import concept_jpegs
from catversion.training import TrainConfig, train_residual
from serve.app import generator_names, match_base
from serve.cli import load_config
from serve.config import ServeSettings

BUCKET = "serve-families"
STEPS = 3


@pytest.fixture(scope="module")
def server(ray_session, s3_endpoint, tmp_path_factory):
    from ray import serve

    from conftest import free_port
    from serve.app import build_app

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    bases = {name: load_base_model(name) for name in ("tiny", "tiny-sdxl", "tiny-sd2")}
    residuals = {}
    for concept_id, model in (("teapot-sd1", "tiny"), ("teapot-xl", "tiny-sdxl"), ("teapot-sd2", "tiny-sd2")):
        residual = train_residual(bases[model], concept_jpegs("red-teapot", 2, 64), "teapot",
                                  TrainConfig(steps=2, save_steps=()), concept_id=concept_id)
        residuals[concept_id] = residual
        boto3.client("s3").put_object(Bucket=BUCKET, Key=f"run/residuals/{concept_id}.safetensors",
                                      Body=residual.to_bytes())
    args, _, _ = load_config(str(Path(__file__).parents[1] / "serve" / "config-cpu.yaml"))
    args.update(residuals=f"s3://{BUCKET}/run", model="tiny", models=["tiny-sdxl"], max_n=2)
    small = {"ray_actor_options": {"num_cpus": 0.5}, "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    args["deployment_options"] = {"Generator": small, "Ingress": small}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="catversion", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "bases": bases, "residuals": residuals}
    serve.shutdown()


def pixels(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def test_one_endpoint_serves_an_sd1_and_an_sdxl_residual(server):
    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="unused", max_retries=0)
    listed = {m.id: m.model_extra.get("base_model") for m in client.models.list().data}
    assert listed["base"] == "tiny" and listed["base:tiny-sdxl"] == "tiny-sdxl"
    assert listed["teapot-sd1"] == "tiny" and listed["teapot-xl"] == "tiny-sdxl"
    assert listed.get("teapot-sd2") is None  # trained on a base model this server does not serve
    for concept, model in (("teapot-sd1", "tiny"), ("teapot-xl", "tiny-sdxl")):
        result = client.images.generate(model=concept, prompt="a photo of a teapot on a beach", size="64x64",
                                        response_format="b64_json", extra_body={"num_inference_steps": STEPS, "seed": 4})
        # The image is the one catversion's own generator makes with that base model and residual.
        base = server["bases"][model]
        residual = server["residuals"][concept]
        expected = ImageGenerator(base, layers=residual.layer_sets).generate(
            [GenerationRequest("a photo of a teapot on a beach", residual, seed=4)], steps=STEPS)[0]
        assert np.abs(pixels(result.data[0].b64_json) - np.asarray(expected, dtype=np.int16)).max() <= 1
    assert client.models.retrieve("teapot-xl").model_extra["base_model"] == "tiny-sdxl"
    plain = client.images.generate(model="base:tiny-sdxl", prompt="a teapot", size="64x64", response_format="b64_json",
                                   extra_body={"num_inference_steps": STEPS, "seed": 4})
    assert pixels(plain.data[0].b64_json).shape == (64, 64, 3)


def test_a_residual_of_a_base_model_not_served_is_a_422_naming_both(server):
    response = requests.post(f"{server['url']}/v1/images/generations", timeout=60,
                             json={"model": "teapot-sd2", "prompt": "a teapot", "num_inference_steps": STEPS})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "tiny-sd2 (sd2)" in message and "tiny (sd1)" in message and "tiny-sdxl (sdxl)" in message
    unknown = requests.post(f"{server['url']}/v1/images/generations", timeout=60,
                            json={"model": "base:tiny-sd2", "prompt": "a teapot"})
    assert unknown.status_code == 404 and "not served here" in unknown.json()["error"]["message"]


def test_routing_prefers_the_fingerprint_then_the_name_then_the_shape():
    infos = [{"model": "a", "family": "sd1", "fingerprint": "sha256:1", "patch": [["text_encoder", [9, 10, 11], 1, 768]]},
             {"model": "b", "family": "sdxl", "fingerprint": "sha256:2",
              "patch": [["text_encoder", [8, 9, 10], 1, 768], ["text_encoder_2", [28, 29, 30], 1, 1280]]}]
    xl = (("text_encoder", (8, 9, 10), 1, 768), ("text_encoder_2", (28, 29, 30), 1, 1280))
    assert match_base({"base_fingerprint": "sha256:2", "base_model": "a"}, xl, infos) == 1
    assert match_base({"base_fingerprint": "sha256:3"}, xl, infos) is None  # another base model's weights
    assert match_base({"base_model": "a"}, (("text_encoder", (9, 10, 11), 1, 768),), infos) == 0
    assert match_base({}, xl, infos) == 1  # nothing recorded (imported): the shape decides
    assert match_base({}, (("text_encoder", (9, 10, 11), 1, 1024),), infos) is None


def test_each_base_model_gets_its_own_generator_deployment():
    settings = ServeSettings(residuals="x", model="tiny", models=["tiny-sdxl", "/models/sdxl/"])
    assert generator_names(settings) == ["Generator", "Generator-tiny-sdxl", "Generator-sdxl"]
    with pytest.raises(ValueError, match="must not repeat"):
        ServeSettings(residuals="x", model="tiny", models=["tiny"])
    assert Conditioner(load_base_model("tiny-sdxl", components=("tokenizer", "text_encoder"))).layer_sets == ((1, 2, 3), (1, 2, 3))
