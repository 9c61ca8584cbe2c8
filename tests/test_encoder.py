"""ResidualTextEncoder: the patched attention is the paper's equation, per row, and nothing else changes."""

import copy
import math

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from catversion import Residual, ResidualTextEncoder

HIDDEN, HEADS, DEPTH, VOCAB, SEQ = 32, 4, 5, 300, 77


def text_encoder(attn="sdpa", dtype=torch.float32, seed=0):
    config = CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=DEPTH,
        num_attention_heads=HEADS, max_position_embeddings=SEQ, hidden_act="quick_gelu",
        bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = CLIPTextModel(config).eval().requires_grad_(False)
    assert model.config._attn_implementation == attn
    return model.to(dtype)


def token_ids(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, SEQ), VOCAB - 1)  # SD pads with the end-of-text token
    ids[:, 0] = VOCAB - 2
    ids[:, 1:7] = torch.randint(0, VOCAB - 2, (batch, 6), generator=g)
    return ids


def residual(layers=(2, 3, 4), tokens=1, bias=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Residual(torch.randn(len(layers), 2, tokens, HIDDEN, generator=g), layers, bias)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_residual_is_bit_identical_to_the_base_encoder(attn):
    te = text_encoder(attn)
    ids = token_ids()
    enc = ResidualTextEncoder(te)
    assert enc.layers == (2, 3, 4)  # default: the last three
    assert torch.equal(enc(ids), te(input_ids=ids).last_hidden_state)
    assert torch.equal(enc(ids, [None, None, None]), te(input_ids=ids).last_hidden_state)


def test_residual_changes_the_output_and_scale_zero_switches_it_off():
    te = text_encoder()
    ids = token_ids()
    enc = ResidualTextEncoder(te)
    base = te(input_ids=ids).last_hidden_state
    r = residual()
    out = enc(ids, [r, r, r])
    assert (out - base).abs().amax() > 0.1
    off = enc(ids, [r, r, r], residual_scale=0.0)
    torch.testing.assert_close(off, base, atol=1e-5, rtol=0)
    per_row = enc(ids, [r, r, r], residual_scale=[1.0, 0.0, 1.0])
    torch.testing.assert_close(per_row[[0, 2]], out[[0, 2]], atol=1e-5, rtol=0)
    torch.testing.assert_close(per_row[1], base[1], atol=1e-5, rtol=0)


def hand_written_patched_layer(layer, x, dk, dv, logit_offset):
    """docs/method.md's equation ("The attention math") with plain tensor ops: K' = [Δk; K], V' = [Δv; V],
    causal + residual columns."""
    a = layer.self_attn
    h = layer.layer_norm1(x)
    B, S, D = h.shape
    hd = D // HEADS
    q = (h @ a.q_proj.weight.T + a.q_proj.bias).view(B, S, HEADS, hd)
    k = (h @ a.k_proj.weight.T + a.k_proj.bias).view(B, S, HEADS, hd)
    v = (h @ a.v_proj.weight.T + a.v_proj.bias).view(B, S, HEADS, hd)
    T = dk.shape[0]
    k = torch.cat([dk.view(1, T, HEADS, hd).expand(B, T, HEADS, hd), k], dim=1)
    v = torch.cat([dv.view(1, T, HEADS, hd).expand(B, T, HEADS, hd), v], dim=1)
    out = torch.zeros(B, S, HEADS, hd)
    for b in range(B):
        for head in range(HEADS):
            for i in range(S):
                logits = (k[b, : T + i + 1, head] @ q[b, i, head]) / math.sqrt(hd)
                logits[:T] += logit_offset
                out[b, i, head] = torch.softmax(logits, 0) @ v[b, : T + i + 1, head]
    x = x + out.reshape(B, S, D) @ a.out_proj.weight.T + a.out_proj.bias
    return x + layer.mlp(layer.layer_norm2(x))


@pytest.mark.parametrize("bias, scale", [(0.0, 1.0), (1.0, 0.5)])
def test_matches_the_attention_equation_written_out_by_hand(bias, scale):
    te = text_encoder()
    ids = token_ids(batch=2)[:, :12]  # short sequences keep the explicit loops fast
    r = residual(layers=(3, 4), tokens=2, bias=bias)
    enc = ResidualTextEncoder(te, layers=(3, 4), tokens=2)
    got = enc(ids, [r, r], residual_scale=scale)

    x = te.embeddings(input_ids=ids)
    causal = torch.full((12, 12), -math.inf).triu(1)[None, None]
    for layer in te.encoder.layers[:3]:
        x = layer(x, causal)
    for slot, layer in enumerate(te.encoder.layers[3:]):
        x = hand_written_patched_layer(layer, x, r.tensor[slot, 0], r.tensor[slot, 1], bias + math.log(scale))
    expected = te.final_layer_norm(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_sdpa_and_eager_base_models_agree():
    ids = token_ids()
    r1, r2 = residual(seed=1), residual(seed=2, bias=1.0)
    outs = [ResidualTextEncoder(text_encoder(attn))(ids, [r1, None, r2]) for attn in ("sdpa", "eager")]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_two_concepts_in_one_batch_give_the_rows_each_gives_alone():
    te = text_encoder()
    enc = ResidualTextEncoder(te)
    ids = token_ids(batch=3)
    r1, r2 = residual(seed=1), residual(seed=2, bias=1.0)
    mixed = enc(ids, [r1, None, r2])
    torch.testing.assert_close(mixed[0:1], enc(ids[0:1], [r1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1:2], enc(ids[1:2], [None]), atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[2:3], enc(ids[2:3], [r2]), atol=1e-5, rtol=0)


def test_cached_pre_patch_states_give_the_same_result():
    enc = ResidualTextEncoder(text_encoder())
    ids = token_ids()
    rs = [residual(seed=1), None, residual(seed=3)]
    hidden = enc.pre_patch_states(ids)
    torch.testing.assert_close(enc.forward_patched(hidden, rs), enc(ids, rs), atol=0, rtol=0)


def test_wrapping_never_changes_the_base_model():
    te = text_encoder()
    before = copy.deepcopy(te.state_dict())
    enc = ResidualTextEncoder(te)
    ids = token_ids()
    reference = te(input_ids=ids).last_hidden_state
    enc(ids, [residual(), None, residual(seed=5)]).sum()
    assert list(enc.state_dict()) == [] and list(enc.parameters()) == []
    after = te.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not te._forward_hooks and not te._forward_pre_hooks
    assert torch.equal(te(input_ids=ids).last_hidden_state, reference)


def test_gradients_reach_fp32_residual_tensors_only():
    te = text_encoder()
    enc = ResidualTextEncoder(te)
    ids = token_ids(batch=2)
    delta = torch.randn(3, 2, 1, HIDDEN, requires_grad=True)
    enc(ids, [delta, None]).square().mean().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert all(p.grad is None for p in te.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_weights_take_fp32_residuals(dtype):
    te32, te_half = text_encoder(), text_encoder(dtype=dtype)
    ids = token_ids(batch=2)
    delta = torch.randn(3, 2, 1, HIDDEN, requires_grad=True)
    out = ResidualTextEncoder(te_half)(ids, [delta, residual()])
    assert out.dtype == dtype
    ref = ResidualTextEncoder(te32)(ids, [delta, residual()])
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert delta.grad.dtype == torch.float32 and delta.grad.abs().sum() > 0


def test_runs_under_inference_mode():
    enc = ResidualTextEncoder(text_encoder())
    ids = token_ids()
    with torch.inference_mode():
        out = enc(ids, [residual(), None, residual()])
    assert out.shape == (3, SEQ, HIDDEN) and torch.isfinite(out).all()


def test_clear_errors_for_wrong_residuals():
    enc = ResidualTextEncoder(text_encoder())
    ids = token_ids(batch=2)
    with pytest.raises(ValueError, match="2 residuals for a batch of 2|got 1 residuals"):
        enc(ids, [residual()])
    with pytest.raises(ValueError, match=r"patches layers \[1, 2, 3\] but this encoder patches \[2, 3, 4\]"):
        enc(ids, [residual(layers=(1, 2, 3)), None])
    with pytest.raises(ValueError, match="shape"):
        enc(ids, [torch.zeros(3, 2, 2, HIDDEN), None])
    with pytest.raises(ValueError, match="residual_scale"):
        enc(ids, [residual(), None], residual_scale=-1.0)
    with pytest.raises(ValueError, match="not distinct indices"):
        ResidualTextEncoder(text_encoder(), layers=(3, 9))
