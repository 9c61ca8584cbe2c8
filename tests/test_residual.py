"""Residual files: safetensors round trips, every refusal, and the reference-code checkpoint layout."""

import json
import math

import pytest
import torch
from safetensors.torch import save as st_save
from transformers import CLIPTextConfig

from catversion import IncompatibleResidualError, Residual, ResidualFormatError
from catversion.residual import FORMAT_NAME


def make_residual(layers=(9, 10, 11), tokens=1, hidden=768, bias=0.0, seed=0, **meta):
    g = torch.Generator().manual_seed(seed)
    tensor = torch.randn(len(layers), 2, tokens, hidden, generator=g)
    meta = {"class_word": "teapot", "steps": 1000, "learning_rate": 0.01, **meta}
    return Residual(tensor, layers, bias, meta)


def test_save_load_round_trip_keeps_tensor_and_metadata(tmp_path):
    r = make_residual(base_model="tiny", base_fingerprint="sha256:abc", final_loss=0.125)
    path = tmp_path / "dog.safetensors"
    r.save(path)
    loaded = Residual.load(path)
    assert torch.equal(loaded.tensor, r.tensor)
    assert loaded.layers == (9, 10, 11)
    assert loaded.tokens == 1 and loaded.hidden_size == 768
    assert loaded.prefix_logit_bias == 0.0
    assert loaded.meta == r.meta
    assert loaded.meta["steps"] == 1000 and loaded.meta["final_loss"] == 0.125
    assert loaded.sha256 == r.sha256 and r.sha256.startswith("sha256:")
    # a T=1 SD1.x residual is 4,608 fp32 numbers: ~18 KB on disk with its header
    assert r.tensor.numel() == 4608
    assert path.stat().st_size < 20_000


def test_load_from_bytes_and_header_is_readable_by_plain_safetensors(tmp_path):
    r = make_residual(bias=1.0)
    data = r.to_bytes()
    assert torch.equal(Residual.load(data).tensor, r.tensor)
    assert Residual.load(data).prefix_logit_bias == 1.0
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])["__metadata__"]
    assert header["format"] == FORMAT_NAME
    assert json.loads(header["layers"]) == [9, 10, 11]
    assert header["sha256"] == r.sha256
    assert json.loads(header["class_word"]) == "teapot"


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    r = make_residual()
    r.save(tmp_path / "a.safetensors")
    r.save(tmp_path / "a.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_constructor_refuses_bad_tensors():
    with pytest.raises(ValueError, match="shape"):
        Residual(torch.zeros(2, 2, 1, 8), (9, 10, 11))
    with pytest.raises(ValueError, match="non-finite"):
        Residual(torch.full((1, 2, 1, 8), math.nan), (3,))
    with pytest.raises(ValueError, match="increasing"):
        Residual(torch.zeros(2, 2, 1, 8), (4, 3))


def _raw_file(tensor, header):
    return st_save({"residual": tensor}, metadata=header)


def _header(r):
    data = r.to_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size])["__metadata__"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h, t: ({**h, "format": "something-else"}, t), "not a catversion residual"),
        (lambda h, t: ({k: v for k, v in h.items() if k != "format"}, t), "not a catversion residual"),
        (lambda h, t: ({**h, "format_version": "3"}, t), "format version 3 is not supported.*upgrade"),
        (lambda h, t: ({**h, "tokens": "2"}, t), "does not match the header"),
        (lambda h, t: (h, t.to(torch.float16)), "dtype is torch.float16"),
        (lambda h, t: (h, t.clone().index_fill_(3, torch.tensor([5]), math.inf)), "non-finite"),
        (lambda h, t: (h, t + 1e-3), "sha256 mismatch"),
        (lambda h, t: ({k: v for k, v in h.items() if k != "layers"}, t), "missing or has a malformed"),
    ],
)
def test_load_refuses_with_a_reason(mutate, message):
    r = make_residual(layers=(2, 3), hidden=16)
    header, tensor = mutate(_header(r), r.tensor)
    with pytest.raises(ResidualFormatError, match=message):
        Residual.load(_raw_file(tensor, header))


def test_load_refuses_truncated_foreign_and_missing_files(tmp_path):
    data = make_residual().to_bytes()
    with pytest.raises(ResidualFormatError, match="truncated"):
        Residual.load(data[: len(data) - 100])
    with pytest.raises(ResidualFormatError, match="truncated|too short"):
        Residual.load(data[:5])
    with pytest.raises(ResidualFormatError, match="not a safetensors file"):
        Residual.load(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    other = st_save({"weight": torch.zeros(3)})
    with pytest.raises(ResidualFormatError, match="not a catversion residual"):
        Residual.load(other)
    with pytest.raises(ResidualFormatError, match="does not exist"):
        Residual.load(tmp_path / "missing.safetensors")
    with pytest.raises(ResidualFormatError, match="is a directory"):
        Residual.load(tmp_path)
    tampered = bytearray(data)
    tampered[-1] ^= 0xFF  # flip a bit of the last tensor value
    with pytest.raises(ResidualFormatError, match="sha256 mismatch"):
        Residual.load(bytes(tampered))


# ---- reference-code checkpoint ---------------------------------------------------------------


def write_reference_checkpoint(path, flat):
    """What adapter-transformers 3.2.1 saves for CatVersion: 4 keys viewing one fp32 storage."""
    name = "prefix_tuning1"
    state = {
        f"text_model.encoder.layers.{i}.self_attn.prefix_tuning.pool.prefix_tunings.{name}"
        ".clip_text_model_self_prefix.control_trans": flat
        for i in (9, 10, 11)
    }
    state[f"prefix_tuning.prefix_tunings.{name}.clip_text_model_self_prefix.control_trans"] = flat
    torch.save(state, path)
    (path.parent / "adapter_config.json").write_text(json.dumps({"hidden_size": 768, "config": {"prefix_length": 1}}))


def test_from_official_follows_the_reference_layout(tmp_path):
    flat = torch.randn(4608)
    path = tmp_path / "pytorch_adapter.bin"
    write_reference_checkpoint(path, flat)
    r = Residual.from_official(path, class_word="teapot")
    assert r.layers == (9, 10, 11) and r.tokens == 1 and r.hidden_size == 768
    assert r.prefix_logit_bias == 1.0
    assert r.meta["class_word"] == "teapot"
    # view(1, 6, 12, 64): dim 1 is 2·slot + kv, heads × head_dim concatenate to the hidden vector
    ref = flat.view(1, 6, 12, 64)
    for slot in range(3):
        for kv in range(2):
            assert torch.equal(r.tensor[slot, kv, 0], ref[0, 2 * slot + kv].reshape(768))


def test_official_round_trip_is_unchanged(tmp_path):
    flat = torch.randn(4608)
    src = tmp_path / "src" / "pytorch_adapter.bin"
    src.parent.mkdir()
    write_reference_checkpoint(src, flat)
    out = tmp_path / "out.bin"
    Residual.from_official(src).to_official(out)
    before = torch.load(src, weights_only=True)
    after = torch.load(out, weights_only=True)
    assert list(after) == list(before)
    for key in before:
        assert torch.equal(after[key], before[key])
    assert len({t.untyped_storage().data_ptr() for t in after.values()}) == 1, "all keys must share one storage"


def test_official_multi_token_round_trip(tmp_path):
    r = make_residual(tokens=3, bias=1.0)
    out = tmp_path / "pytorch_adapter.bin"
    r.to_official(out)
    back = Residual.from_official(out, hidden_size=768)
    assert back.tokens == 3 and torch.equal(back.tensor, r.tensor)


def test_to_official_refuses_a_clean_residual_unless_forced(tmp_path):
    r = make_residual(bias=0.0)
    with pytest.raises(IncompatibleResidualError, match="prefix_logit_bias=0.0"):
        r.to_official(tmp_path / "x.bin")
    r.to_official(tmp_path / "x.bin", force=True)
    assert Residual.from_official(tmp_path / "x.bin").prefix_logit_bias == 1.0


class NotATensor:
    pass


def test_from_official_never_unpickles_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"x": NotATensor()}, path)
    with pytest.raises(ResidualFormatError, match="not a loadable reference checkpoint"):
        Residual.from_official(path)
    torch.save({"some.other.weight": torch.zeros(4)}, path)
    with pytest.raises(ResidualFormatError, match="unexpected entry"):
        Residual.from_official(path)


# ---- compatibility -------------------------------------------------------------------------


def clip_config(hidden=768, layers=12):
    return type("Enc", (), {"config": CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=16 if hidden == 1024 else 12)})()


def test_check_compatible_explains_mismatches():
    r = make_residual(base_model="runwayml/stable-diffusion-v1-5", base_fingerprint="sha256:" + "a" * 64)
    r.check_compatible(clip_config(), fingerprint="sha256:" + "a" * 64)
    with pytest.raises(IncompatibleResidualError, match="hidden size 768 but the text encoder has 1024"):
        r.check_compatible(clip_config(hidden=1024))
    with pytest.raises(IncompatibleResidualError, match="only 6 layers"):
        r.check_compatible(clip_config(layers=6))
    with pytest.raises(IncompatibleResidualError, match="trained on runwayml/stable-diffusion-v1-5.*fingerprint"):
        r.check_compatible(clip_config(), fingerprint="sha256:" + "b" * 64)
    r.check_compatible(clip_config(), fingerprint="sha256:" + "b" * 64, strict=False)
    # an imported reference checkpoint records no fingerprint: shape checks only
    Residual(r.tensor, r.layers, 1.0).check_compatible(clip_config(), fingerprint="sha256:" + "b" * 64)


def test_check_compatible_covers_layers_tokens_and_a_named_base_model():
    r = Residual(torch.zeros(3, 2, 1, 768), (9, 10, 11), meta={"base_model": "tiny"})
    r.check_compatible(clip_config(), layers=(9, 10, 11), tokens=1, base_model="tiny")
    with pytest.raises(IncompatibleResidualError, match=r"patches encoder layers \[9, 10, 11\] but this server patches \[8, 9, 10\]"):
        r.check_compatible(clip_config(), layers=(8, 9, 10))
    two = Residual(torch.zeros(3, 2, 2, 768), (9, 10, 11))
    with pytest.raises(IncompatibleResidualError, match="2 token.*applies 1"):
        two.check_compatible(clip_config(), tokens=1)
    # No fingerprint on either side: the recorded name decides; strict=False applies it anyway.
    with pytest.raises(IncompatibleResidualError, match="names base model 'tiny'.*'sd15-random'"):
        r.check_compatible(clip_config(), base_model="sd15-random")
    r.check_compatible(clip_config(), base_model="sd15-random", strict=False)
    # Matching fingerprints settle it, whatever the name.
    fp = "sha256:" + "a" * 64
    Residual(r.tensor, r.layers, meta={"base_model": "/data/sd15", "base_fingerprint": fp}).check_compatible(
        clip_config(), fingerprint=fp, base_model="runwayml/stable-diffusion-v1-5")
