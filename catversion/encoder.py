"""ResidualTextEncoder: a CLIP text encoder whose last self-attention layers see per-sample residuals.

It wraps a transformers ``CLIPTextModel`` without changing it: patched layers are computed here from
the layer's own submodules, with the residual Key/Value tokens concatenated in front of K and V and
an explicit mask that lets every query see them. Each row of a batch has its own residual (or none),
so one batch mixes concepts and plain prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .recipe import patched_layers
from .residual import Residual

ResidualLike = Residual | torch.Tensor | None


class ResidualTextEncoder(nn.Module):
    """Wraps a ``CLIPTextModel``; ``forward`` returns ``last_hidden_state`` [B, S, D].

    ``layers`` are the 0-based encoder layers that take residual tokens (None = the last three of
    whatever depth the encoder has); ``tokens`` is the number of residual tokens per layer.
    The wrapped model is held by reference and never modified: it adds no parameters, buffers or
    hooks, so its state dict and its own forward stay exactly as they were.
    """

    def __init__(self, text_encoder: nn.Module, layers: Sequence[int] | None = None, tokens: int = 1):
        super().__init__()
        config = text_encoder.config
        depth = config.num_hidden_layers
        if not hasattr(text_encoder, "encoder") or not hasattr(text_encoder, "embeddings"):
            raise TypeError(
                f"expected a transformers CLIPTextModel (with .embeddings and .encoder), got {type(text_encoder).__name__}"
            )
        layers = patched_layers(depth, layers)
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        # Kept out of the module tree on purpose: wrapping must not register the base model as a
        # submodule (no new state-dict keys, no .to()/.train() side effects on the caller's model).
        self.__dict__["text_encoder"] = text_encoder
        self.layers = layers
        self.tokens = int(tokens)
        self.hidden_size = int(config.hidden_size)
        self.num_heads = int(config.num_attention_heads)
        self.head_dim = self.hidden_size // self.num_heads
        self.residual_shape = (len(layers), 2, self.tokens, self.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_encoder.final_layer_norm.weight.device

    # ---- public entry points -----------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        residuals: Sequence[ResidualLike] | None = None,
        residual_scale: float | Sequence[float] | torch.Tensor = 1.0,
        prefix_logit_bias: float | Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Encode token ids [B, S]; ``residuals[b]`` applies to row b (None = plain encoder).

        A row's residual logits get ``prefix_logit_bias + log(residual_scale)``: the bias comes from
        the Residual (raw tensors use ``prefix_logit_bias``, default 0.0), scale 0 switches it off.
        """
        batch = input_ids.shape[0]
        residuals = self._check_residuals(residuals, batch)
        if all(r is None for r in residuals):
            # The exact unpatched computation, so "no residual" is bit-identical to the base model.
            return self.text_encoder(input_ids=input_ids).last_hidden_state
        hidden = self.pre_patch_states(input_ids)
        return self.forward_patched(hidden, residuals, residual_scale, prefix_logit_bias)

    def pre_patch_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering the first patched layer; they do not depend on any residual.

        Training caches these per caption, so the frozen lower layers run once, not every step.
        """
        te = self.text_encoder
        hidden = te.embeddings(input_ids=input_ids)
        mask = self._causal_mask(hidden)
        for layer in te.encoder.layers[: self.layers[0]]:
            hidden = layer(hidden, mask, is_causal=True)
        return hidden

    def forward_patched(
        self,
        hidden: torch.Tensor,
        residuals: Sequence[ResidualLike],
        residual_scale: float | Sequence[float] | torch.Tensor = 1.0,
        prefix_logit_bias: float | Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Run from the first patched layer to the final layer norm; ``hidden`` from ``pre_patch_states``."""
        te = self.text_encoder
        batch = hidden.shape[0]
        residuals = self._check_residuals(residuals, batch)
        delta, logit = self._stack(residuals, residual_scale, prefix_logit_bias, batch, hidden)
        mask = self._causal_mask(hidden)
        for index in range(self.layers[0], len(te.encoder.layers)):
            layer = te.encoder.layers[index]
            if index in self.layers:
                slot = self.layers.index(index)
                hidden = self._patched_layer(layer, hidden, delta[:, slot, 0], delta[:, slot, 1], logit)
            else:
                hidden = layer(hidden, mask, is_causal=True)
        return te.final_layer_norm(hidden)

    # ---- internals ---------------------------------------------------------------------------
    def _causal_mask(self, hidden: torch.Tensor):
        # The same mask object the base model builds for itself (None under sdpa: is_causal path).
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(
            config=self.text_encoder.config, inputs_embeds=hidden, attention_mask=None, cache=None
        )

    def _check_residuals(self, residuals, batch: int) -> list[ResidualLike]:
        if residuals is None:
            return [None] * batch
        residuals = list(residuals)
        if len(residuals) != batch:
            raise ValueError(f"got {len(residuals)} residuals for a batch of {batch} prompts; pass one per row (None = none)")
        for row, item in enumerate(residuals):
            if item is None:
                continue
            if isinstance(item, Residual):
                if item.layers != self.layers:
                    raise ValueError(
                        f"row {row}: residual patches layers {list(item.layers)} but this encoder patches {list(self.layers)}"
                    )
                shape = tuple(item.tensor.shape)
            elif isinstance(item, torch.Tensor):
                shape = tuple(item.shape)
            else:
                raise TypeError(f"row {row}: expected a Residual, a tensor or None, got {type(item).__name__}")
            if shape != self.residual_shape:
                raise ValueError(f"row {row}: residual shape {shape} does not match this encoder's {self.residual_shape}")
        return residuals

    def _stack(self, residuals, residual_scale, prefix_logit_bias, batch: int, like: torch.Tensor):
        """Per-row residual tensors [B, L, 2, T, D] (zeros where None) and logit offsets [B]."""
        device, dtype = like.device, like.dtype
        scales = _per_row(residual_scale, batch, "residual_scale")
        default_bias = _per_row(0.0 if prefix_logit_bias is None else prefix_logit_bias, batch, "prefix_logit_bias")
        rows, offsets = [], []
        zero = torch.zeros(self.residual_shape, device=device, dtype=dtype)
        for row, item in enumerate(residuals):
            scale = scales[row]
            if scale < 0 or not math.isfinite(scale):
                raise ValueError(f"row {row}: residual_scale must be a finite number >= 0, got {scale}")
            if item is None or scale == 0:
                rows.append(zero)
                offsets.append(-math.inf)
                continue
            if isinstance(item, Residual):
                tensor, bias = item.tensor, item.prefix_logit_bias
                if prefix_logit_bias is not None:
                    bias = default_bias[row]
            else:
                tensor, bias = item, default_bias[row]
            # Residuals stay fp32 (they may be trainable); the cast keeps their gradient path.
            rows.append(tensor.to(device=device, dtype=dtype))
            offsets.append(bias + math.log(scale))
        return torch.stack(rows), torch.tensor(offsets, device=device, dtype=torch.float32)

    def _patched_layer(self, layer, hidden, delta_k, delta_v, logit):
        """CLIPEncoderLayer.forward with K' = [Δk; K], V' = [Δv; V] and an explicit mask."""
        residual = hidden
        hidden = layer.layer_norm1(hidden)
        hidden = residual + self._patched_attention(layer.self_attn, hidden, delta_k, delta_v, logit)
        residual = hidden
        hidden = layer.mlp(layer.layer_norm2(hidden))
        return residual + hidden

    def _patched_attention(self, attn, hidden, delta_k, delta_v, logit):
        batch, seq, _ = hidden.shape
        heads, head_dim, tokens = self.num_heads, self.head_dim, self.tokens

        def split(x, length):
            return x.view(batch, length, heads, head_dim).transpose(1, 2)

        query = split(attn.q_proj(hidden), seq)
        key = torch.cat([split(delta_k, tokens), split(attn.k_proj(hidden), seq)], dim=2)
        value = torch.cat([split(delta_v, tokens), split(attn.v_proj(hidden), seq)], dim=2)
        # Additive mask [B, 1, S, T + S]: residual columns visible to every query (offset per row),
        # then CLIP's causal mask. Built explicitly because sdpa's is_causal path would crop K/V.
        causal = torch.full((seq, seq), -math.inf, device=hidden.device).triu(1)
        prefix = logit.view(batch, 1, 1).expand(batch, seq, tokens)
        mask = torch.cat([prefix, causal.expand(batch, seq, seq)], dim=-1).unsqueeze(1).to(query.dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, seq, heads * head_dim)
        return attn.out_proj(out)


def _per_row(value, batch: int, name: str) -> list[float]:
    if isinstance(value, torch.Tensor):
        value = value.detach().flatten().tolist()
    if isinstance(value, (int, float)):
        return [float(value)] * batch
    values = [float(v) for v in value]
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} values for a batch of {batch}")
    return values
