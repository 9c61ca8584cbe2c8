"""ResidualTextEncoder: a CLIP text encoder whose last self-attention layers see per-sample residuals.

It wraps a transformers ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``, SDXL's second encoder)
without changing it: patched layers are computed here from
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
from .residual import Residual, ResidualBlock

ResidualLike = Residual | ResidualBlock | torch.Tensor | None


class ResidualTextEncoder(nn.Module):
    """Wraps a ``CLIPTextModel``; ``forward`` returns the hidden state the UNet reads [B, S, D].

    ``hidden_state`` says which (catversion/families.py): -1 = ``last_hidden_state`` after the final layer
    norm (SD 1.x, 2.x), -2 = ``hidden_states[-2]``, the penultimate layer's output without it (SDXL).
    ``layers`` are the 0-based encoder layers that take residual tokens (None = the last three that feed
    that hidden state); ``tokens`` is the number of residual tokens per layer. ``name`` is the encoder's
    subfolder, which a residual's block for it carries. With ``pooled=True`` (a
    ``CLIPTextModelWithProjection``), ``encode`` also returns the projected EOS embedding of the final
    layer, as SDXL's pipeline takes it, computed through the patched layers too.
    The wrapped model is held by reference and never modified: it adds no parameters, buffers or
    hooks, so its state dict and its own forward stay exactly as they were.
    """

    def __init__(self, text_encoder: nn.Module, layers: Sequence[int] | None = None, tokens: int = 1, *,
                 hidden_state: int = -1, pooled: bool = False, name: str = "text_encoder"):
        super().__init__()
        projection = getattr(text_encoder, "text_projection", None)
        outer = text_encoder
        if projection is not None and hasattr(text_encoder, "text_model"):
            text_encoder = text_encoder.text_model  # CLIPTextModelWithProjection: the CLIPTextModel inside
        elif pooled:
            raise TypeError(f"pooled output needs a CLIPTextModelWithProjection, got {type(outer).__name__}")
        config = text_encoder.config
        depth = config.num_hidden_layers
        if not hasattr(text_encoder, "encoder") or not hasattr(text_encoder, "embeddings"):
            raise TypeError(
                f"expected a transformers CLIPTextModel (with .embeddings and .encoder), got {type(text_encoder).__name__}"
            )
        if hidden_state not in (-1, -2):
            raise ValueError(f"hidden_state must be -1 (last, after the final layer norm) or -2, got {hidden_state}")
        self.hidden_state = hidden_state
        self.stop = depth if hidden_state == -1 else depth - 1  # layers the output has passed
        if layers is None:
            layers = range(max(0, self.stop - 3), self.stop)
        layers = patched_layers(self.stop, layers)
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        # Kept out of the module tree on purpose: wrapping must not register the base model as a
        # submodule (no new state-dict keys, no .to()/.train() side effects on the caller's model).
        self.__dict__["text_encoder"] = text_encoder
        self.__dict__["outer"] = outer  # the model as given (with its projection, if any)
        self.__dict__["projection"] = projection if pooled else None
        self.pooled = bool(pooled)
        self.name = name
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
        return self.encode(input_ids, residuals, residual_scale, prefix_logit_bias)[0]

    def encode(
        self,
        input_ids: torch.Tensor,
        residuals: Sequence[ResidualLike] | None = None,
        residual_scale: float | Sequence[float] | torch.Tensor = 1.0,
        prefix_logit_bias: float | Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the hidden state the UNet reads [B, S, D], the pooled projection [B, P] or None): ``forward``
        with the pooled output for an encoder built with ``pooled=True``."""
        batch = input_ids.shape[0]
        residuals = self._check_residuals(residuals, batch)
        if all(r is None for r in residuals):
            # The exact unpatched computation, so "no residual" is bit-identical to the base model.
            if self.hidden_state == -1 and not self.pooled:
                return self.text_encoder(input_ids=input_ids).last_hidden_state, None
            out = self.outer(input_ids=input_ids, output_hidden_states=True)
            states = out.last_hidden_state if self.hidden_state == -1 else out.hidden_states[-2]
            return states, (out.text_embeds if self.pooled else None)
        hidden = self.pre_patch_states(input_ids)
        return self.encode_patched(hidden, residuals, residual_scale, prefix_logit_bias, input_ids=input_ids)

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
        """Run from the first patched layer to the hidden state the UNet reads; ``hidden`` from ``pre_patch_states``."""
        return self.encode_patched(hidden, residuals, residual_scale, prefix_logit_bias)[0]

    def encode_patched(
        self,
        hidden: torch.Tensor,
        residuals: Sequence[ResidualLike],
        residual_scale: float | Sequence[float] | torch.Tensor = 1.0,
        prefix_logit_bias: float | Sequence[float] | None = None,
        *,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward_patched`` and, for a pooled encoder, the projected EOS embedding [B, P] of the final layer
        (which needs ``input_ids`` to find each row's end token)."""
        te = self.text_encoder
        batch = hidden.shape[0]
        residuals = self._check_residuals(residuals, batch)
        delta, logit = self._stack(residuals, residual_scale, prefix_logit_bias, batch, hidden)
        mask = self._causal_mask(hidden)
        out = None
        last = len(te.encoder.layers) if self.pooled else self.stop
        for index in range(self.layers[0], last):
            if index == self.stop:
                out = hidden  # hidden_states[-2]: the input of the last layer, no final layer norm
            layer = te.encoder.layers[index]
            if index in self.layers:
                slot = self.layers.index(index)
                hidden = self._patched_layer(layer, hidden, delta[:, slot, 0], delta[:, slot, 1], logit)
            else:
                hidden = layer(hidden, mask, is_causal=True)
        if self.hidden_state == -1:
            out = te.final_layer_norm(hidden)
        elif out is None:
            out = hidden
        if not self.pooled:
            return out, None
        if input_ids is None:
            raise ValueError(f"{self.name}: the pooled output needs the input ids (to find each row's end token)")
        final = te.final_layer_norm(hidden)
        return out, self.projection(final[torch.arange(batch, device=final.device), eos_positions(te, input_ids)])

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
                item = item.blocks[0] if len(item.blocks) == 1 else None
                if item is None:
                    raise ValueError(f"row {row}: a residual of several blocks goes to a Conditioner "
                                     "(catversion/conditioning.py), which hands each encoder its block")
            if isinstance(item, ResidualBlock):
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
                tensor, bias = item.blocks[0].tensor, item.prefix_logit_bias
                if prefix_logit_bias is not None:
                    bias = default_bias[row]
            elif isinstance(item, ResidualBlock):
                tensor, bias = item.tensor, default_bias[row]
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


def eos_positions(text_model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Each row's end-token position, as transformers' CLIPTextModel picks its pooled output: the first
    ``eos_token_id`` (the highest id for configs from before that id was fixed, eos_token_id == 2)."""
    ids = input_ids.to(dtype=torch.int)
    if text_model.eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == text_model.eos_token_id).int().argmax(dim=-1)


def _per_row(value, batch: int, name: str) -> list[float]:
    if isinstance(value, torch.Tensor):
        value = value.detach().flatten().tolist()
    if isinstance(value, (int, float)):
        return [float(value)] * batch
    values = [float(v) for v in value]
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} values for a batch of {batch}")
    return values
