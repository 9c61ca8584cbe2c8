"""Describing a base model without loading it (catversion.modelinfo): the same facts and training
target as loading it, from a cache that imports nothing heavy on a hit and is never trusted blindly."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import huggingface_hub.constants
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from catversion import modelinfo
from catversion.families import UnknownFamilyError
from catversion.models import ModelNotAvailableError, load_base_model, tiny_base_model
from catversion.training import training_target
from helpers import save_components

HUB_ID = "catversion-test/tiny-sd"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HEAVY = ("torch", "diffusers", "transformers")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test starts with an empty fingerprint cache of its own."""
    folder = tmp_path / "catversion-cache"
    monkeypatch.setenv(modelinfo.CACHE_ENV, str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny():
    return tiny_base_model()


@pytest.fixture(scope="module")
def component_folder(tiny, tmp_path_factory):
    """The tiny model saved one component at a time (no model_index.json), as test_models does."""
    folder = tmp_path_factory.mktemp("tiny-components")
    save_components(tiny, folder)
    return folder


@pytest.fixture(scope="module")
def pipeline_folder(tiny, tmp_path_factory):
    """The tiny model saved whole by diffusers' StableDiffusionPipeline.save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    pipeline = StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                       unet=tiny.unet, scheduler=DDIMScheduler.from_config(tiny.scheduler_config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    """The tiny SDXL model saved whole by diffusers' StableDiffusionXLPipeline.save_pretrained."""
    base = load_base_model("tiny-sdxl")
    folder = tmp_path_factory.mktemp("tiny-sdxl-pipeline")
    pipeline = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                                         tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
                                         scheduler=DDIMScheduler.from_config(base.scheduler_config))
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture
def hub_cache(pipeline_folder, tmp_path, monkeypatch):
    """A Hugging Face cache holding HUB_ID (the pipeline folder) the way `hf download` lays it out:
    refs/main names a snapshot whose files link to blobs. Offline, as the tests run."""
    root = tmp_path / "hf-hub"
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for number, path in enumerate(sorted(p for p in pipeline_folder.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"blob{number}"
        blob.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, blob)
        link = repo / "snapshots" / COMMIT / path.relative_to(pipeline_folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return root


def loaded_facts(name: str) -> dict:
    """What loading the model gives: the reference the cheap description must equal."""
    base = load_base_model(name, device="cpu", components=("text_encoder",))
    config = base.text_encoder.config
    encoders = list(base.text_encoders.values())
    return {"resolution": base.resolution, "text_layers": config.num_hidden_layers,
            "text_width": config.hidden_size, "fingerprint": base.fingerprint, "family": base.family.name,
            "encoders": tuple(base.text_encoders), "encoder_depths": tuple(e.config.num_hidden_layers for e in encoders),
            "encoder_widths": tuple(e.config.hidden_size for e in encoders)}


def described_facts(info: modelinfo.ModelInfo) -> dict:
    return {"resolution": info.resolution, "text_layers": info.text_layers, "text_width": info.text_width,
            "fingerprint": info.fingerprint, "family": info.family, "encoders": info.encoders,
            "encoder_depths": info.encoder_depths, "encoder_widths": info.encoder_widths}


def assert_same_targets(name: str) -> None:
    """training_target_for(name, ...) equals training_target(loaded model, ...) for the batch's arguments, layers
    per encoder (and flat for a one-encoder model) included; layers that do not fit fail both alike."""
    base = load_base_model(name, device="cpu", components=("text_encoder",))
    two = len(base.text_encoders) == 2
    chosen = [[[0, 2], [1, 3]], ((3,), (0, 1, 2))] if two else [[0, 2], [[4, 1]], ((2, 3, 4),)]
    cases = [((), {}), ((128,), {"precision": "bf16"}), ((96, None, 1, "fp16"), {})]
    cases += [((None, layers), {"tokens": 2}) for layers in chosen]
    for args, kwargs in cases:
        assert modelinfo.training_target_for(name, *args, **kwargs) == training_target(base, *args, **kwargs)
    bad_ones = ([0, 1], [[0, 1]], [[0, 1], [1, 2], [2, 3]], [[0, 0], [1]], [[0], [4]]) if two else \
        ([0, 9], [[0, 1], [1, 2]], [[0, 0]], [[]])
    for bad in bad_ones:
        with pytest.raises(ValueError) as fast:
            modelinfo.training_target_for(name, None, bad)
        with pytest.raises(ValueError) as slow:
            training_target(base, None, bad)
        assert str(fast.value) == str(slow.value), bad


def entry_file(cache) -> str:
    (entry,) = (cache / "base-models").iterdir()
    return str(entry)


@pytest.mark.parametrize("name, family", [("tiny", "sd1"), ("tiny-sd2", "sd2"), ("tiny-sdxl", "sdxl")])
def test_a_builtin_is_described_as_loading_it_does(name, family, tiny):
    info = modelinfo.describe(name)
    assert described_facts(info) == loaded_facts(name)
    assert info.family == family
    if name == "tiny":
        assert info.fingerprint == tiny.fingerprint
    assert (info.kind, info.folder) == ("builtin", None)
    assert_same_targets(name)
    # The second call is answered from the cache with the same facts.
    assert modelinfo.describe(name) == info


def test_layer_choices_are_checked_against_every_encoder_without_loading(tiny):
    sdxl = modelinfo.describe("tiny-sdxl")
    assert sdxl.layer_sets() == ((1, 2, 3), (1, 2, 3))  # hidden_states[-2]: the last layer does not reach the UNet
    assert sdxl.layer_sets([[3, 0], [2]]) == ((0, 3), (2,))
    assert sdxl.layers_help() == "text_encoder 0..3, text_encoder_2 0..3 (default '1,2,3;1,2,3')"
    with pytest.raises(ValueError, match="give layers for each"):
        sdxl.layer_sets([1, 2, 3])
    with pytest.raises(ValueError, match=r"layers \[2, 4\] of text_encoder_2: choose distinct layers in 0..3"):
        sdxl.layer_sets([[1], [2, 4]])
    sd1 = modelinfo.describe("tiny")
    assert sd1.layer_sets() == ((2, 3, 4),) and sd1.layer_sets([4, 0]) == ((0, 4),)
    assert sd1.layers_help() == "text_encoder 0..4 (default '2,3,4')"


@pytest.mark.parametrize("layout", ["component_folder", "pipeline_folder"])
def test_a_diffusers_folder_is_described_as_loading_it_does(layout, request, tiny):
    folder = str(request.getfixturevalue(layout))
    info = modelinfo.describe(folder)
    assert described_facts(info) == loaded_facts(folder)
    assert info.fingerprint == tiny.fingerprint  # the same weights, saved and loaded back
    assert (info.kind, info.folder) == ("folder", os.path.realpath(folder))
    assert info.pipeline == ("StableDiffusionPipeline" if layout == "pipeline_folder" else None)
    assert_same_targets(folder)
    assert modelinfo.describe(folder) == info


def test_a_saved_sdxl_folder_is_described_as_loading_it_does(sdxl_folder, tmp_path):
    folder = str(sdxl_folder)
    info = modelinfo.describe(folder)
    assert described_facts(info) == loaded_facts(folder)
    assert info.fingerprint == modelinfo.describe("tiny-sdxl").fingerprint  # the same weights, saved and loaded
    assert (info.family, info.pipeline, info.encoders) == ("sdxl", "StableDiffusionXLPipeline",
                                                            ("text_encoder", "text_encoder_2"))
    assert_same_targets(folder)
    assert modelinfo.describe(folder) == info

    # The cache is keyed by the files of every text encoder: new weights in the second one are fingerprinted.
    copy = tmp_path / "sdxl"
    shutil.copytree(sdxl_folder, copy)
    assert modelinfo.describe(str(copy)).fingerprint == info.fingerprint
    second = CLIPTextModelWithProjection.from_pretrained(copy / "text_encoder_2")
    with torch.no_grad():
        second.get_input_embeddings().weight[0, 0] += 1.0
    second.save_pretrained(copy / "text_encoder_2")
    changed = modelinfo.describe(str(copy)).fingerprint
    assert changed != info.fingerprint and changed == loaded_facts(str(copy))["fingerprint"]

    # Without model_index.json, text_encoder_2/ alone makes it SDXL, as for the loader.
    (copy / "model_index.json").unlink()
    assert modelinfo.describe(str(copy)).family == "sdxl" and modelinfo.describe(str(copy)).pipeline is None


def test_a_pipeline_that_is_no_stable_diffusion_family_is_refused_by_name(pipeline_folder, tmp_path):
    folder = tmp_path / "kandinsky"
    shutil.copytree(pipeline_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(UnknownFamilyError) as fast:
        modelinfo.describe(str(folder))
    message = str(fast.value)
    assert f"base model {str(folder)!r}: model_index.json names the pipeline 'KandinskyPipeline'" in message
    assert "StableDiffusionPipeline, StableDiffusionXLPipeline: Stable Diffusion 1.x, 2.x and XL" in message
    assert isinstance(fast.value, ValueError)  # the command line shows it as an input error (status 1)
    with pytest.raises(UnknownFamilyError) as slow:
        load_base_model(str(folder), components=("text_encoder",))
    assert str(slow.value) == message
    # Named before anything else is looked for: a folder of such a pipeline lacks SD's parts.
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(UnknownFamilyError, match="KandinskyPipeline"):
        modelinfo.describe(str(folder))


def test_the_cache_key_covers_the_code_that_decides_the_fingerprint():
    assert {"models.py", "sd_v1.py", "builtin_families.py"} <= set(modelinfo.KEY_SOURCES)


def test_a_hub_id_in_the_local_cache_is_described_offline(hub_cache, tiny):
    info = modelinfo.describe(HUB_ID)
    assert described_facts(info) == loaded_facts(HUB_ID)
    assert info.fingerprint == tiny.fingerprint
    assert info.kind == "hub" and info.folder.endswith(os.path.join("snapshots", COMMIT))
    assert_same_targets(HUB_ID)


def test_a_cache_hit_imports_neither_torch_nor_diffusers_nor_transformers(hub_cache, pipeline_folder, cache,
                                                                           tmp_path):
    expected = {name: described_facts(modelinfo.describe(name))
                for name in ("tiny", "tiny-sdxl", str(pipeline_folder), HUB_ID)}
    target = modelinfo.training_target_for("tiny", 128, precision="bf16")
    script = textwrap.dedent("""
        import json, sys
        from catversion import modelinfo
        names = json.loads(sys.argv[1])
        facts = {}
        for name in names:
            info = modelinfo.describe(name)
            facts[name] = {"resolution": info.resolution, "text_layers": info.text_layers,
                           "text_width": info.text_width, "fingerprint": info.fingerprint, "family": info.family,
                           "encoders": info.encoders, "encoder_depths": info.encoder_depths,
                           "encoder_widths": info.encoder_widths}
        target = modelinfo.training_target_for("tiny", 128, precision="bf16")
        try:
            modelinfo.describe(sys.argv[2])
            missing = None
        except modelinfo.ModelNotAvailableError as exc:
            missing = str(exc)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
        print(json.dumps({"facts": facts, "target": [target.base_fingerprint, target.resolution,
                          list(target.layers), target.tokens, target.precision],
                          "missing": missing, "heavy": heavy}))
    """)
    env = {**os.environ, modelinfo.CACHE_ENV: str(cache), "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(list(expected)), str(tmp_path / "nowhere")],
                          capture_output=True, text=True, env=env, check=True)
    seen = json.loads(done.stdout)
    assert seen["heavy"] == []
    assert seen["facts"] == json.loads(json.dumps(expected))  # tuples come back as lists
    assert seen["target"] == [target.base_fingerprint, 128, list(target.layers), 1, "bf16"]
    assert "does not exist" in seen["missing"]  # failing is as cheap as succeeding


def test_a_changed_weight_file_is_fingerprinted_again(component_folder, tmp_path, tiny):
    folder = tmp_path / "model"
    shutil.copytree(component_folder, folder)
    weights = folder / "text_encoder" / "model.safetensors"
    assert modelinfo.describe(str(folder)).fingerprint == tiny.fingerprint

    # Same size, new mtime: another weight value.
    size = weights.stat().st_size
    size_of_config = (folder / "text_encoder" / "config.json").stat().st_size
    changed = CLIPTextModel.from_pretrained(folder / "text_encoder")
    with torch.no_grad():
        changed.get_input_embeddings().weight[0, 0] += 1.0
    changed.save_pretrained(folder / "text_encoder")
    assert weights.stat().st_size == size
    first = modelinfo.describe(str(folder)).fingerprint
    assert first != tiny.fingerprint
    assert first == loaded_facts(str(folder))["fingerprint"]

    # New size, old mtimes: the same weights stored in half precision (rounded, so another fingerprint).
    # config.json changes too (its dtype) but keeps its size; its mtime is put back as well, so the
    # weight file's size is the only stamp that moved.
    files = list((folder / "text_encoder").iterdir())
    mtimes = {path: path.stat().st_mtime_ns for path in files}
    changed.half().save_pretrained(folder / "text_encoder")
    assert sorted((folder / "text_encoder").iterdir()) == sorted(files)
    for path, mtime in mtimes.items():
        os.utime(path, ns=(mtime, mtime))
    assert weights.stat().st_size != size
    assert (folder / "text_encoder" / "config.json").stat().st_size == size_of_config
    second = modelinfo.describe(str(folder)).fingerprint
    assert second not in (first, tiny.fingerprint)
    assert second == loaded_facts(str(folder))["fingerprint"]


def test_a_corrupt_or_foreign_cache_entry_is_recomputed_and_replaced(component_folder, cache, tiny):
    folder = str(component_folder)
    modelinfo.describe(folder)
    path = entry_file(cache)
    good = json.loads(open(path).read())
    forged = "sha256:" + "0" * 64
    other_versions = {**good, "key": {**good["key"], "versions": {**good["key"]["versions"], "torch": "0.0"}},
                      "info": {**good["info"], "fingerprint": forged}}
    bad_fingerprint = {**good, "info": {**good["info"], "fingerprint": "sha256:not-a-digest"}}
    missing_field = {**good, "info": {k: v for k, v in good["info"].items() if k != "text_layers"}}
    for content in (b"", b"{\"key\": ", b"[]", json.dumps(other_versions).encode(),
                    json.dumps(bad_fingerprint).encode(), json.dumps(missing_field).encode()):
        with open(path, "wb") as handle:
            handle.write(content)
        assert modelinfo.describe(folder).fingerprint == tiny.fingerprint, content
        assert json.loads(open(path).read()) == good, content


def test_a_missing_model_fails_as_loading_it_does(tmp_path, hub_cache, component_folder):
    (tmp_path / "empty").mkdir()
    for name, reason in ((tmp_path / "no-such-model", "does not exist"),
                         (tmp_path / "empty", "has no text_encoder/ subfolder.*hf download")):
        with pytest.raises(ModelNotAvailableError, match=reason) as fast:
            modelinfo.describe(str(name))
        with pytest.raises(ModelNotAvailableError) as slow:
            load_base_model(str(name), components=("text_encoder",))
        assert str(fast.value) == str(slow.value)

    partial = tmp_path / "partial"
    shutil.copytree(component_folder, partial)
    (partial / "vae" / "config.json").unlink()
    with pytest.raises(ModelNotAvailableError, match=r"cannot load its vae \(FileNotFoundError.*hf download"):
        modelinfo.describe(str(partial))

    with pytest.raises(ModelNotAvailableError, match="'nobody/nothing': its text_encoder is not in the local "
                                                     "Hugging Face cache.*hf download nobody/nothing"):
        modelinfo.describe("nobody/nothing")
    shutil.rmtree(hub_cache / ("models--" + HUB_ID.replace("/", "--")) / "snapshots" / COMMIT / "vae")
    with pytest.raises(ModelNotAvailableError, match=f"'{HUB_ID}': its vae is not in the local Hugging Face cache"):
        modelinfo.describe(HUB_ID)


def test_an_unwritable_cache_warns_and_still_answers(tmp_path, monkeypatch, tiny):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(modelinfo.CACHE_ENV, str(blocker))
    with pytest.warns(UserWarning, match="cannot cache the base model's fingerprint"):
        info = modelinfo.describe("tiny")
    assert info.fingerprint == tiny.fingerprint
