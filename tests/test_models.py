"""Base-model loading: the built-in tiny model, fingerprints, and loading diffusers folders."""

import copy
import re

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from catversion import models, sd_v1
from catversion.models import (
    BUILTIN_MODELS,
    ModelNotAvailableError,
    load_base_model,
    text_encoder_fingerprint,
    tiny_base_model,
    tiny_tokenizer,
)
from helpers import save_components


@pytest.fixture(scope="module")
def tiny():
    return tiny_base_model()


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory):
    """The tiny model saved the way a diffusers Stable Diffusion folder is laid out."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    save_components(tiny, folder)
    return folder


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("name, family, prediction, encoders", [
    ("tiny", "sd1", "epsilon", ["text_encoder"]),
    ("tiny-sd2", "sd2", "v_prediction", ["text_encoder"]),
    ("tiny-sdxl", "sdxl", "epsilon", ["text_encoder", "text_encoder_2"]),
])
def test_each_tiny_builtin_is_a_model_of_its_family(name, family, prediction, encoders):
    assert name in BUILTIN_MODELS
    base = load_base_model(name, components=("tokenizer", "text_encoder"))
    assert (base.family.name, base.prediction_type, list(base.text_encoders)) == (family, prediction, encoders)
    assert list(base.tokenizers) == encoders


def test_tiny_builds_identically_every_time(tiny):
    again = load_base_model("tiny")
    for component in ("text_encoder", "unet", "vae"):
        assert_same_weights(getattr(tiny, component), getattr(again, component))
    assert again.fingerprint == tiny.fingerprint
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", tiny.fingerprint)


def test_loading_some_components_gives_the_same_weights(tiny):
    partial = load_base_model("tiny", components=("tokenizer", "text_encoder"))
    assert partial.unet is None and partial.vae is None
    assert partial.fingerprint == tiny.fingerprint
    assert partial.resolution == 64
    only_vae = load_base_model("tiny", components=("vae",))
    assert_same_weights(only_vae.vae, tiny.vae)
    assert only_vae.fingerprint is None


def test_tiny_model_is_frozen_and_native_64px(tiny):
    assert tiny.resolution == 64
    assert tiny.vae_scale_factor == 8
    assert tiny.vae_scaling_factor == pytest.approx(0.18215)
    assert tiny.unet.config.cross_attention_dim == tiny.text_encoder.config.hidden_size
    for module in (tiny.text_encoder, tiny.unet, tiny.vae):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_tiny_tokenizer_pads_to_77_and_round_trips(tiny):
    tokenizer = tiny_tokenizer()
    assert len(tokenizer) == sd_v1.TINY_VOCAB_SIZE
    assert tokenizer.model_max_length == 77
    prompt = "a photo of a teapot on the beach"
    ids = tokenizer(prompt).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    # Class words are single tokens, as they are in CLIP's real vocabulary.
    assert tokenizer.tokenize("teapot") == ["teapot</w>"]
    # Unknown words and non-ASCII text still encode: every byte is in the vocabulary.
    unknown = tokenizer("sks Zürich").input_ids
    assert tokenizer.decode(unknown, skip_special_tokens=True) == "sks zürich"

    batch = tiny.tokenize([prompt, "a dog", "dog " * 200])
    assert batch.shape == (3, 77) and batch.dtype == torch.long
    assert (batch[:, 0] == tokenizer.bos_token_id).all()
    assert (batch[1, 4:] == tokenizer.eos_token_id).all()  # SD pads with the end token
    assert batch[2, -1] == tokenizer.eos_token_id  # truncated, still ends with the end token
    with pytest.raises(TypeError, match=r"\[prompt\]"):
        tiny.tokenize("a dog")


def test_fingerprint_tracks_weights_and_architecture(tiny):
    encoder = tiny.text_encoder
    attributes = set(vars(encoder))
    assert text_encoder_fingerprint(copy.deepcopy(encoder)) == tiny.fingerprint
    assert set(vars(encoder)) == attributes  # nothing cached on the base model

    changed_weight = copy.deepcopy(encoder)
    with torch.no_grad():
        changed_weight.encoder.layers[-1].self_attn.v_proj.weight[0, 0] += 1e-3
    assert text_encoder_fingerprint(changed_weight) != tiny.fingerprint

    changed_config = copy.deepcopy(encoder)
    changed_config.config.hidden_act = "gelu"
    assert text_encoder_fingerprint(changed_config) != tiny.fingerprint


def test_dtype_defaults_to_float32_on_cpu_and_the_text_encoder_is_always_float32(tiny):
    assert tiny.dtype == torch.float32 and tiny.device == torch.device("cpu") and tiny.precision == "fp32"
    assert next(tiny.unet.parameters()).dtype == torch.float32
    bf16 = load_base_model("tiny", dtype=torch.bfloat16)
    for module in (bf16.unet, bf16.vae):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.text_encoder.parameters()} == {torch.float32}  # the precision policy
    assert bf16.fingerprint == tiny.fingerprint and bf16.precision == "bf16"


def test_tiny_model_runs_end_to_end(tiny):
    batch = 2
    with torch.no_grad():
        hidden = tiny.text_encoder(tiny.tokenize(["a photo of a dog"] * batch)).last_hidden_state
        assert hidden.shape == (batch, 77, tiny.text_encoder.config.hidden_size)

        size = tiny.resolution // tiny.vae_scale_factor
        latents = torch.randn(batch, 4, size, size)
        noise = tiny.unet(latents, torch.tensor([10, 900]), encoder_hidden_states=hidden).sample
        assert noise.shape == latents.shape

        images = torch.rand(batch, 3, tiny.resolution, tiny.resolution) * 2 - 1
        encoded = tiny.vae.encode(images).latent_dist.sample() * tiny.vae_scaling_factor
        assert encoded.shape == latents.shape
        decoded = tiny.vae.decode(encoded / tiny.vae_scaling_factor).sample
        assert decoded.shape == images.shape


def test_scheduler_config_builds_ddim_and_ddpm(tiny):
    for cls in (DDIMScheduler, DDPMScheduler):
        scheduler = cls.from_config(tiny.scheduler_config)
        assert scheduler.config.num_train_timesteps == 1000
        assert scheduler.config.beta_schedule == "scaled_linear"
        assert scheduler.config.clip_sample is False
        assert scheduler.config.prediction_type == "epsilon"


def test_saved_folder_loads_back_with_the_same_fingerprint(tiny, tiny_folder):
    loaded = load_base_model(str(tiny_folder))
    assert loaded.model_id == str(tiny_folder)
    assert loaded.fingerprint == tiny.fingerprint
    assert loaded.tokenizer.model_max_length == 77
    prompts = ["a photo of a teapot", "a cat"]
    assert torch.equal(loaded.tokenize(prompts), tiny.tokenize(prompts))
    assert_same_weights(loaded.unet, tiny.unet)
    assert_same_weights(loaded.vae, tiny.vae)
    assert (loaded.resolution, loaded.vae_scale_factor) == (64, 8)
    assert DDPMScheduler.from_config(loaded.scheduler_config).config.beta_end == 0.012


def test_missing_folder_is_reported_as_such(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotAvailableError, match="does not exist") as error:
        load_base_model(str(missing))
    assert str(missing) in str(error.value)


def test_empty_folder_names_the_missing_component_and_the_fix(tmp_path):
    with pytest.raises(ModelNotAvailableError) as error:
        load_base_model(str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message and "tokenizer/" in message and "hf download" in message


def test_broken_tokenizer_folder_is_not_silently_accepted(tiny_folder, tmp_path):
    # Offline, transformers returns a 2-token placeholder for an empty tokenizer folder.
    for component in ("text_encoder", "unet", "vae", "scheduler"):
        (tmp_path / component).symlink_to(tiny_folder / component)
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(ModelNotAvailableError, match="tokenizer is missing or broken"):
        load_base_model(str(tmp_path))


def test_unknown_component_is_rejected():
    with pytest.raises(ValueError, match="'text-encoder'"):
        load_base_model("tiny", components=("text-encoder",))


def test_sd15_random_has_sd15_shapes():
    # Building it for real takes ~15 s on CPU; its shapes are checked on the meta device instead.
    modules = sd_v1.build_modules("sd15-random", torch.device("meta"), torch.float32, models.COMPONENTS, tiny_tokenizer())
    params = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    assert params == {"text_encoder": 123_060_480, "unet": 859_520_964, "vae": 83_653_863}
    assert modules["text_encoder"].config.vocab_size == 49408

    tokenizer_only = load_base_model("sd15-random", components=("tokenizer",))
    assert tokenizer_only.resolution == 512
    assert tokenizer_only.vae_scaling_factor == pytest.approx(0.18215)
    assert int(tokenizer_only.tokenize(["a photo of a teapot"]).max()) < 49408
