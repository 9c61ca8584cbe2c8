"""Residuals in a user's own diffusers pipeline: `pipeline_kwargs` turns (pipeline, prompts, residuals) into the
keyword arguments that pipeline takes (``prompt_embeds``, ``negative_prompt_embeds`` and, for SDXL,
``pooled_prompt_embeds``, ``negative_pooled_prompt_embeds``), so text-to-image, image-to-image, inpainting
and ControlNet pipelines of the residual's family generate with it, unpatched (README, "Residuals in your own
diffusers pipeline"; docs/families.md).

The conditioning is catversion's own (catversion/conditioning.py), computed with the pipeline's text encoders;
the negative branch never carries a residual and follows the family's convention (SDXL with
``force_zeros_for_empty_prompt``: all zeros when no negative prompt is given), as the pipeline itself does.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from .conditioning import Conditioner, Conditioning
from .families import SDXL, recognise
from .models import BaseModel, text_encoders_fingerprint
from .residual import IncompatibleResidualError, Residual

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def base_of_pipeline(pipeline: Any) -> BaseModel:
    """A catversion view of a diffusers pipeline's tokenizers and text encoders (shared, not copied)."""
    text_encoder = getattr(pipeline, "text_encoder", None)
    tokenizer = getattr(pipeline, "tokenizer", None)
    if text_encoder is None or tokenizer is None:
        raise TypeError(f"{type(pipeline).__name__} has no text_encoder/tokenizer: pass a Stable Diffusion 1.x, 2.x "
                        "or XL pipeline (text-to-image, image-to-image, inpainting, ControlNet)")
    second = getattr(pipeline, "text_encoder_2", None)
    if second is not None:
        family = SDXL
    else:
        family = recognise("StableDiffusionPipeline", text_encoder.config.hidden_size,
                           text_act=text_encoder.config.hidden_act)
    encoders = {"text_encoder": text_encoder, **({"text_encoder_2": second} if second is not None else {})}
    key = text_encoder
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = text_encoders_fingerprint(encoders)
    config = getattr(pipeline, "config", {}) or {}
    unet = getattr(pipeline, "unet", None)
    return BaseModel(model_id=config.get("_name_or_path") or type(pipeline).__name__, tokenizer=tokenizer,
                     text_encoder=text_encoder, unet=unet, vae=getattr(pipeline, "vae", None),
                     scheduler_config=dict(pipeline.scheduler.config), fingerprint=_FINGERPRINTS[key], resolution=0,
                     vae_scaling_factor=0.0, device=text_encoder.device,
                     dtype=unet.dtype if unet is not None else torch.float32, family=family,
                     tokenizer_2=getattr(pipeline, "tokenizer_2", None), text_encoder_2=second,
                     zero_empty_negative=bool(config.get("force_zeros_for_empty_prompt", False)))


@torch.no_grad()
def pipeline_kwargs(pipeline: Any, prompts: str | Sequence[str], residuals: Residual | Sequence[Residual | None] | None,
                    *, negative_prompt: str | Sequence[str] | None = None, residual_scale: float = 1.0,
                    strict: bool = True) -> dict[str, torch.Tensor]:
    """Keyword arguments for ``pipeline(...)`` that generate ``prompts`` with ``residuals`` (one per prompt, or one
    for all; None: the base model), e.g. ``pipe(**pipeline_kwargs(pipe, "a photo of a teapot", r), image=...)``.

    Raises IncompatibleResidualError when a residual was trained for another family or base model (``strict=False``
    skips the base-model fingerprint and name, not the shapes). Prompts are tokenized as the pipeline does (77
    tokens, truncated).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    rows = _per_prompt(residuals, len(prompts))
    base = base_of_pipeline(pipeline)
    cond = _encode(base, prompts, rows, residual_scale, strict)
    negatives = _negatives(negative_prompt, len(prompts))
    if negatives is None and base.zero_empty_negative:
        uncond = Conditioning(torch.zeros_like(cond.embeds), None if cond.pooled is None else torch.zeros_like(cond.pooled))
    else:
        uncond = Conditioner(base)(negatives or [""] * len(prompts))
    dtype = base.dtype
    kwargs = {"prompt_embeds": cond.embeds.to(dtype), "negative_prompt_embeds": uncond.embeds.to(dtype)}
    if cond.pooled is not None:
        kwargs.update(pooled_prompt_embeds=cond.pooled.to(dtype), negative_pooled_prompt_embeds=uncond.pooled.to(dtype))
    return kwargs


def _per_prompt(residuals, count: int) -> list[Residual | None]:
    if residuals is None or isinstance(residuals, Residual):
        return [residuals] * count
    rows = list(residuals)
    if len(rows) != count:
        raise ValueError(f"got {len(rows)} residuals for {count} prompts: give one per prompt, or one for all")
    return rows


def _negatives(negative_prompt, count: int) -> list[str] | None:
    if negative_prompt is None:
        return None
    negatives = [negative_prompt] * count if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != count:
        raise ValueError(f"got {len(negatives)} negative prompts for {count} prompts")
    return negatives


def _encode(base: BaseModel, prompts: list[str], rows: list[Residual | None], scale: float, strict: bool) -> Conditioning:
    """Each prompt's conditioning, the rows of each residual patch encoded by a Conditioner of that patch."""
    groups: dict[tuple, list[int]] = {}
    for index, residual in enumerate(rows):
        if residual is not None:
            residual.check_compatible(base.text_encoders, fingerprint=base.fingerprint, strict=strict,
                                      base_model=None, family=base.family.name)
        groups.setdefault(None if residual is None else residual.patch, []).append(index)
    embeds: list[torch.Tensor | None] = [None] * len(prompts)
    pooled: list[torch.Tensor | None] = [None] * len(prompts)
    for patch, indexes in groups.items():
        layers = None if patch is None else [block[1] for block in patch]
        tokens = 1 if patch is None else patch[0][2]
        try:
            conditioner = Conditioner(base, layers=layers, tokens=tokens)
        except ValueError as error:
            raise IncompatibleResidualError(str(error)) from None
        out = conditioner([prompts[i] for i in indexes], [rows[i] for i in indexes], residual_scale=scale)
        for row, index in enumerate(indexes):
            embeds[index] = out.embeds[row : row + 1]
            pooled[index] = None if out.pooled is None else out.pooled[row : row + 1]
    return Conditioning(torch.cat(embeds), None if pooled[0] is None else torch.cat(pooled))
