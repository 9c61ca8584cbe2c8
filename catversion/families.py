"""Base-model families as data: what each Stable Diffusion family feeds its UNet, read from its configs.

Every part of catversion (training, generation, serving, the batch driver, evaluation) asks a base
model's `Family` how to condition the UNet instead of testing for a family by name. A family says which
text encoders the UNet reads, which hidden state of each (`hidden_state`: -1 is ``last_hidden_state``
after the final layer norm, as SD 1.x and 2.x read it; -2 is ``hidden_states[-2]``, the penultimate
layer's output with no final layer norm, as SDXL reads both of its encoders), whether an encoder's
pooled, projected output goes to the UNet too (SDXL's second encoder), and the UNet's added
conditioning (SDXL's six size-and-crop ``time_ids``). What varies per model rather than per family
(prediction type, native size) is read from the model's own configs (models.py, modelinfo.py).
docs/families.md says it in prose, with the facts each description rests on.

Plain data, no torch: the batch driver and the command line use it without loading a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .recipe import layer_sets


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family, named by its diffusers subfolder."""

    name: str  # "text_encoder" | "text_encoder_2": the subfolder, and the name of its block in a residual
    tokenizer: str  # the tokenizer's subfolder ("tokenizer" | "tokenizer_2")
    hidden_state: int  # -1: last_hidden_state (after the final layer norm); -2: hidden_states[-2], no layer norm
    pooled: bool = False  # its pooled, projected EOS embedding also goes to the UNet (added conditioning)
    with_projection: bool = False  # stored as CLIPTextModelWithProjection (has text_projection)

    def output_layers(self, depth: int) -> int:
        """How many of a ``depth``-layer encoder's layers the hidden state the UNet reads has passed."""
        return depth if self.hidden_state == -1 else depth + 1 + self.hidden_state


@dataclass(frozen=True)
class Family:
    """How a family of base models conditions its UNet (see the module docstring)."""

    name: str  # "sd1" | "sd2" | "sdxl"
    title: str  # for messages: "Stable Diffusion 1.x"
    pipeline: str  # diffusers' text-to-image pipeline class
    encoders: tuple[TextEncoderSpec, ...]
    added_conditioning: str | None = None  # None, or "text_time": pooled text embeds + six time ids
    zero_empty_negative: bool = False  # an empty negative prompt is all-zero conditioning (SDXL's default)
    time_ids: int = 0  # added time ids per sample (SDXL: 6)

    @property
    def encoder_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.encoders)

    def encoder(self, name: str) -> TextEncoderSpec:
        for spec in self.encoders:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.title} has no text encoder {name!r} (it has {', '.join(self.encoder_names)})")

    def default_layers(self, depths: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        """Per encoder, the default patched layers: the last three that feed the hidden state the UNet reads
        (docs/method.md; SD1.5: 9-11, SD2: 20-22, SDXL: 8-10 and 28-30)."""
        if len(depths) != len(self.encoders):
            raise ValueError(f"{self.title} has {len(self.encoders)} text encoders, got {len(depths)} depths")
        layers = []
        for spec, depth in zip(self.encoders, depths):
            stop = spec.output_layers(depth)
            layers.append(tuple(range(max(0, stop - 3), stop)))
        return tuple(layers)

    def resolve_layers(self, layers: Sequence | None, depths: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        """The patched layers per encoder, as training and generation use them: None is the default, else
        ``layers`` (one sequence per encoder, or a flat one for a one-encoder family) checked; the one place
        that decides it (Conditioner, training.training_target and modelinfo.ModelInfo.layer_sets ask here)."""
        chosen = layer_sets(layers, len(self.encoders))
        return self.default_layers(depths) if chosen is None else self.check_layers(chosen, depths)

    def check_layers(self, layers: Sequence[Sequence[int]], depths: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        """``layers`` (one sequence per encoder) checked against the encoders: each a non-empty set of
        distinct indices of layers whose output reaches the hidden state the UNet reads; sorted."""
        if len(layers) != len(self.encoders):
            raise ValueError(f"{self.title} patches {len(self.encoders)} text encoder(s) "
                             f"({', '.join(self.encoder_names)}); got layers for {len(layers)}")
        checked = []
        for spec, depth, chosen in zip(self.encoders, depths, layers):
            chosen = tuple(sorted(int(i) for i in chosen))
            stop = spec.output_layers(depth)
            if not chosen or len(set(chosen)) != len(chosen) or chosen[0] < 0 or chosen[-1] >= stop:
                reach = ("" if stop == depth else
                         f"; layer {depth - 1} does not reach the hidden state the UNet reads")
                raise ValueError(f"layers {list(chosen)} of {spec.name}: choose distinct layers in 0..{stop - 1} "
                                 f"(it has {depth} layers{reach})")
            checked.append(chosen)
        return tuple(checked)


SD1 = Family(
    name="sd1", title="Stable Diffusion 1.x", pipeline="StableDiffusionPipeline",
    encoders=(TextEncoderSpec("text_encoder", "tokenizer", hidden_state=-1),),
)
SD2 = Family(
    name="sd2", title="Stable Diffusion 2.x", pipeline="StableDiffusionPipeline",
    encoders=(TextEncoderSpec("text_encoder", "tokenizer", hidden_state=-1),),
)
SDXL = Family(
    name="sdxl", title="Stable Diffusion XL", pipeline="StableDiffusionXLPipeline",
    encoders=(TextEncoderSpec("text_encoder", "tokenizer", hidden_state=-2),
              TextEncoderSpec("text_encoder_2", "tokenizer_2", hidden_state=-2, pooled=True, with_projection=True)),
    added_conditioning="text_time", zero_empty_negative=True, time_ids=6,
)
FAMILIES = {family.name: family for family in (SD1, SD2, SDXL)}

# SD 2.x's text encoder is OpenCLIP ViT-H (1024 wide, gelu), SD 1.x's CLIP ViT-L (768 wide, quick_gelu); both
# pipelines are StableDiffusionPipeline, so the text encoder's config tells them apart.
SD2_TEXT_WIDTH = 1024
RECOGNISED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


class UnknownFamilyError(ValueError):
    """A diffusers folder whose pipeline is not a Stable Diffusion family catversion knows."""


def recognise(pipeline: str | None, text_width: int, components: Mapping[str, object] | None = None,
              name: str = "the base model", text_act: str | None = None) -> Family:
    """The family of a diffusers folder from model_index.json's ``_class_name`` (``pipeline``; None when the
    folder has none, as a folder of only the components may), the first text encoder's width and activation
    (OpenCLIP's gelu: SD 2.x, CLIP's quick_gelu: SD 1.x), and the component names model_index.json lists."""
    components = components or {}
    if pipeline in (None, "StableDiffusionPipeline") and "text_encoder_2" not in components:
        return SD2 if text_width == SD2_TEXT_WIDTH or text_act == "gelu" else SD1
    if pipeline in ("StableDiffusionXLPipeline", None) and "text_encoder_2" in components:
        return SDXL
    raise UnknownFamilyError(
        f"{name}: model_index.json names the pipeline {pipeline!r}, which is not a Stable Diffusion family "
        f"catversion supports ({', '.join(RECOGNISED_PIPELINES)}: Stable Diffusion 1.x, 2.x and XL); pass the "
        "text-to-image base model's folder or hub id (refiner, inpainting and other pipelines are not base models)")


def parse_layers(text: str) -> tuple[tuple[int, ...], ...]:
    """Layers as written on a command line or in a manifest: "9,10,11" for a one-encoder model, one group per text
    encoder separated by ";" for several ("8,9,10;28,29,30" for SDXL). Checked against a model by
    `Family.check_layers`; ValueError for text that is not comma-separated integers."""
    groups = [group.strip() for group in str(text).split(";")]
    try:
        parsed = tuple(tuple(int(i) for i in group.split(",") if i.strip()) for group in groups)
    except ValueError:
        parsed = ()
    if not parsed or any(not group for group in parsed):
        raise ValueError(f"layers {text!r}: write comma-separated layer indices, one group per text encoder separated "
                         "by ';', e.g. '9,10,11' (SD 1.x) or '8,9,10;28,29,30' (SDXL)")
    return parsed


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None
