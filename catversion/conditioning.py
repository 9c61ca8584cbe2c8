"""The UNet's text conditioning for any family: every text encoder it reads, patched with one residual block each.

A `Conditioner` holds one `ResidualTextEncoder` (catversion/encoder.py) per text encoder of the base
model's family (catversion/families.py) and gives what the UNet takes: the token embeddings, the
encoders' hidden states concatenated on the last axis (SD 1.x/2.x: one encoder's; SDXL: 768 + 1280 = 2048
wide), and for SDXL the pooled text embeds of its second encoder. A residual's blocks go to their
encoders; a residual row of the trainer is one tensor (``residual_shape``) that `split` views per encoder.

SDXL's UNet also takes six time ids per sample (original size, crop top-left, target size: `time_ids`);
they and the pooled embeds travel as one ``added`` row [P + 6] per UNet row, which `added_cond_kwargs`
unpacks for the UNet call (docs/families.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .encoder import ResidualTextEncoder, _per_row
from .recipe import layers_key
from .residual import Residual, ResidualBlock

TIME_IDS = 6  # SDXL: original (h, w), crop top-left (y, x), target (h, w)


@dataclass
class Conditioning:
    """What the UNet reads of a batch of prompts: ``embeds`` [B, S, D] and, for SDXL, ``pooled`` [B, P]."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def added(self, time_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The UNet's added conditioning rows [B, P + 6] (pooled embeds, then time ids [B, 6] or [6]); None
        for families without it."""
        if self.pooled is None:
            return None
        ids = time_ids.to(self.pooled).expand(self.pooled.shape[0], -1)
        return torch.cat([self.pooled, ids], dim=1)


def time_ids(target: tuple[int, int], original: tuple[int, int] | None = None,
             crop: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """SDXL's six time ids (float32 [6]): original size, crop top-left, target size, as diffusers' SDXL
    pipelines and training scripts compute them (original = target for generation)."""
    original = original or target
    return torch.tensor([*original, *crop, *target], dtype=torch.float32)


def added_cond_kwargs(added: torch.Tensor | None) -> dict[str, Any]:
    """The UNet's keyword arguments for ``added`` rows [R, P + 6] (none for families without them)."""
    if added is None:
        return {}
    return {"added_cond_kwargs": {"text_embeds": added[:, :-TIME_IDS], "time_ids": added[:, -TIME_IDS:]}}


def added_width(unet) -> int:
    """The width of a UNet's added conditioning rows (P + 6), 0 when it takes none."""
    config = unet.config
    if config.get("addition_embed_type") != "text_time":
        return 0
    return int(config.projection_class_embeddings_input_dim) - TIME_IDS * int(config.addition_time_embed_dim) + TIME_IDS


class Conditioner:
    """Patched text encoders of ``base`` (a models.BaseModel with its tokenizers and text encoders).

    ``layers``: None (the family's default: the last three layers feeding what the UNet reads, in every
    encoder), one sequence per encoder, or for a one-encoder family a flat sequence. ``tokens``: residual
    tokens per layer, the same in every encoder.
    """

    def __init__(self, base, layers: Sequence | None = None, tokens: int = 1):
        family = base.family
        encoders = base.text_encoders
        missing = [spec.name for spec in family.encoders if spec.name not in encoders]
        if missing:
            raise ValueError(f"base model {base.model_id!r} was loaded without its {', '.join(missing)}")
        depths = [encoders[spec.name].config.num_hidden_layers for spec in family.encoders]
        sets = family.resolve_layers(layers, depths)
        self.base = base
        self.family = family
        self.parts = [ResidualTextEncoder(encoders[spec.name], layers=ls, tokens=tokens, hidden_state=spec.hidden_state,
                                          pooled=spec.pooled, name=spec.name)
                      for spec, ls in zip(family.encoders, sets)]
        self.tokens = int(tokens)
        self._sizes = [int(torch.Size(p.residual_shape).numel()) for p in self.parts]

    # ---- shape facts ---------------------------------------------------------------------------
    @property
    def layer_sets(self) -> tuple[tuple[int, ...], ...]:
        return tuple(p.layers for p in self.parts)

    @property
    def layers(self) -> tuple:
        """``layers_key(layer_sets)``: flat for one encoder (as ``ResidualTextEncoder.layers``)."""
        return layers_key(self.layer_sets)

    @property
    def patch(self) -> tuple[tuple[str, tuple[int, ...], int, int], ...]:
        """(encoder, layers, tokens, width) per encoder: a residual fits when its ``patch`` is this."""
        return tuple((p.name, p.layers, p.tokens, p.hidden_size) for p in self.parts)

    @property
    def residual_shape(self) -> tuple[int, ...]:
        """A trainer's residual tensor: [L, 2, T, D] for one encoder, the blocks' values flat for several."""
        return self.parts[0].residual_shape if len(self.parts) == 1 else (sum(self._sizes),)

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    # ---- residuals ---------------------------------------------------------------------------
    def check(self, residual: Residual, row: int | None = None) -> None:
        """ValueError unless ``residual`` has exactly this conditioner's blocks, layers, tokens and widths."""
        if residual.patch != self.patch:
            where = "" if row is None else f"row {row}: "

            def text(patch):
                return "; ".join(f"{name} layers {list(layers)} x {tokens} token(s) x {width}"
                                 for name, layers, tokens, width in patch)
            raise ValueError(f"{where}residual patches {text(residual.patch)}, but this base model's patched encoders "
                             f"take {text(self.patch)}")

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """A trainer's residual tensor (``residual_shape``) as one [L, 2, T, D] view per encoder."""
        if len(self.parts) == 1:
            return [tensor]
        return [chunk.view(part.residual_shape) for chunk, part in zip(tensor.split(self._sizes), self.parts)]

    def residual(self, tensor: torch.Tensor, prefix_logit_bias: float, meta: dict | None = None) -> Residual:
        """A trainer's residual tensor as a Residual (one block per encoder)."""
        blocks = [ResidualBlock(p.name, p.layers, t) for p, t in zip(self.parts, self.split(tensor.detach()))]
        return Residual.from_blocks(blocks, prefix_logit_bias, meta)

    def _per_part(self, residuals, prefix_logit_bias, batch: int):
        """Each part's residual rows (tensors or None) and the rows' logit biases."""
        residuals = [None] * batch if residuals is None else list(residuals)
        if len(residuals) != batch:
            raise ValueError(f"got {len(residuals)} residuals for a batch of {batch} prompts; pass one per row (None = none)")
        overrides = None if prefix_logit_bias is None else _per_row(prefix_logit_bias, batch, "prefix_logit_bias")
        rows: list[list] = [[] for _ in self.parts]
        biases = []
        for row, item in enumerate(residuals):
            bias = 0.0 if overrides is None else overrides[row]
            if item is None:
                tensors = [None] * len(self.parts)
            elif isinstance(item, Residual):
                self.check(item, row)
                tensors = [block.tensor for block in item.blocks]
                bias = item.prefix_logit_bias if overrides is None else bias
            elif isinstance(item, torch.Tensor):
                if tuple(item.shape) != self.residual_shape:
                    raise ValueError(f"row {row}: residual shape {tuple(item.shape)} does not match this encoder's "
                                     f"{self.residual_shape}")
                tensors = self.split(item)
            else:
                raise TypeError(f"row {row}: expected a Residual, a tensor or None, got {type(item).__name__}")
            for part_rows, tensor in zip(rows, tensors):
                part_rows.append(tensor)
            biases.append(bias)
        return rows, biases

    # ---- encoding ------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Token ids [B, 77] per encoder, each from its own tokenizer."""
        return [self.base.tokenize(list(prompts), part.name) for part in self.parts]

    def pre_patch_states(self, ids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per encoder, the states entering its first patched layer (they do not depend on any residual)."""
        return [part.pre_patch_states(i) for part, i in zip(self.parts, ids)]

    def encode(self, ids: Sequence[torch.Tensor], residuals=None, residual_scale=1.0,
               prefix_logit_bias=None) -> Conditioning:
        """The conditioning of token ids (``tokenize``) with ``residuals[b]`` on row b (None: the base model's
        own conditioning, bit-identical to its encoders' forward)."""
        batch = ids[0].shape[0]
        rows, biases = self._per_part(residuals, prefix_logit_bias, batch)
        outs = [part.encode(i, r, residual_scale, biases) for part, i, r in zip(self.parts, ids, rows)]
        return self._combine(outs)

    def encode_patched(self, hidden: Sequence[torch.Tensor], ids: Sequence[torch.Tensor], residuals,
                       residual_scale=1.0, prefix_logit_bias=None) -> Conditioning:
        """``encode`` from cached ``pre_patch_states`` (training: only the patched layers run per step)."""
        batch = hidden[0].shape[0]
        rows, biases = self._per_part(residuals, prefix_logit_bias, batch)
        outs = [part.encode_patched(h, r, residual_scale, biases, input_ids=i)
                for part, h, i, r in zip(self.parts, hidden, ids, rows)]
        return self._combine(outs)

    def __call__(self, prompts: Sequence[str], residuals=None, residual_scale=1.0) -> Conditioning:
        return self.encode(self.tokenize(prompts), residuals, residual_scale)

    @staticmethod
    def _combine(outs) -> Conditioning:
        embeds = outs[0][0] if len(outs) == 1 else torch.cat([out[0] for out in outs], dim=-1)
        pooled = [out[1] for out in outs if out[1] is not None]
        return Conditioning(embeds, pooled[0] if pooled else None)
