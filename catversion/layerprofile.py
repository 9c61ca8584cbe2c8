"""Which text-encoder layers integrate token features: the paper's layer analysis, for any family.

CatVersion patches the "feature-dense" layers of the CLIP text encoder, the ones where a token's
features are merged with those of the other words of the prompt; the paper located them for SD1.5 by
looking at its encoder (the last three layers, 9-11). `catversion layers` measures the same thing on
any base model, per text encoder the UNet reads, over a set of prompts (docs/layers.md):

- **integration** of layer l: for each content token i of a prompt (a real word piece: not the start
  token, not the end token or the padding after it) that has at least one content token before it,
  the share of its attention in layer l (softmax weights averaged over the heads, causal as CLIP is)
  that goes to the *other* content tokens 1..i-1, rather than to itself or to the start token; the mean
  over all such tokens of all prompts. In [0, 1]. The start token is CLIP's attention sink: weight
  parked there reads nothing from the prompt, and weight on itself keeps the token's own features, so
  this is the share of what a word reads that comes from the rest of the prompt. The first content
  token (i = 1) is left out: causally it can read no other word, so its share is 0 in every layer.
- **mixing** of layer l: 1 - the cosine similarity between a content token's hidden state entering
  layer l and leaving it (the residual stream before and after the layer), averaged over every content
  token of every prompt; in [0, 2], 0 for a layer that leaves the tokens as they were.

Integration is read against ``uniform_baseline``: what a layer attending evenly to every position it
sees would score on the same prompts (random weights score about that). The suggested window is the
``WINDOW`` consecutive layers, among those that feed the hidden state the UNet reads
(`TextEncoderSpec.output_layers`), with the highest mean integration; ties go to the later window.
It is a reading of the encoder, not a tuning result: `Family.default_layers` stays the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .encoder import eos_positions

WINDOW = 3  # layers CatVersion patches per encoder (docs/method.md)
BAR_WIDTH = 24
PLOT_SUFFIXES = (".svg", ".png")

# Varied on purpose: objects, animals, people, scenes; short and long; with and without a style.
DEFAULT_PROMPTS = (
    "a photo of a teapot on a beach",
    "a red car parked in front of an old house",
    "a dog wearing a blue hat",
    "an oil painting of a lighthouse at night",
    "a cat sleeping on a wooden chair next to a window",
    "a bowl of ramen with an egg and green onions",
    "a watercolor sketch of a mountain village in winter",
    "a man riding a bicycle through a busy market",
    "a close-up photo of a sunflower covered in rain drops",
    "a robot reading a book in a library",
    "a pair of leather boots on a stone floor",
    "a child flying a kite over a green hill",
    "a bronze statue of a horse in a city square",
    "a cup of coffee and a croissant on a marble table",
    "a small boat on a calm lake at sunrise",
    "a cartoon drawing of a smiling dragon",
)


@dataclass(frozen=True)
class EncoderProfile:
    """The profile of one text encoder: one number per layer and measure, and the windows."""

    encoder: str  # "text_encoder" | "text_encoder_2"
    integration: tuple[float, ...]  # per layer, see the module docstring
    mixing: tuple[float, ...]
    feeding: int  # layers 0..feeding-1 reach the hidden state the UNet reads
    hidden_state: int  # -1: last_hidden_state (after the final layer norm); -2: hidden_states[-2]
    default: tuple[int, ...]  # Family.default_layers
    suggested: tuple[int, ...]  # suggest_window(integration, feeding)
    uniform: float  # the integration a layer attending uniformly would have, for these prompts (uniform_baseline)

    @property
    def depth(self) -> int:
        return len(self.integration)

    @property
    def agree(self) -> bool:
        return self.suggested == self.default

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = [
            {"layer": i, "integration": self.integration[i], "mixing": self.mixing[i], "feeds_unet": i < self.feeding}
            for i in range(self.depth)
        ]
        for key in ("integration", "mixing"):
            del data[key]
        data.update(depth=self.depth, default=list(self.default), suggested=list(self.suggested), agree=self.agree)
        return data


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped. No prompt is an error."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file {path}: no such file") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise ValueError(f"prompt file {path}: cannot read it as text ({exc.__class__.__name__})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts (one per line; blank and '#' lines are skipped)")
    return prompts


def clip_text_model(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The CLIPTextModel of a text encoder (CLIPTextModelWithProjection keeps it as ``.text_model``)."""
    return text_encoder.text_model if hasattr(text_encoder, "text_projection") else text_encoder


def attention_weights(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Causal self-attention weights [B, heads, S, S] of a CLIPEncoderLayer for its input ``hidden``
    [B, S, D], computed from the layer's own submodules as its forward does (layer_norm1, q/k_proj)."""
    attn = layer.self_attn
    batch, seq, width = hidden.shape
    heads = attn.num_heads
    x = layer.layer_norm1(hidden)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, seq, heads, width // heads).transpose(1, 2)

    scores = split(attn.q_proj(x)) @ split(attn.k_proj(x)).transpose(-1, -2) * attn.scale
    future = torch.ones(seq, seq, dtype=torch.bool, device=hidden.device).triu(1)
    return scores.float().masked_fill(future, float("-inf")).softmax(dim=-1)


def _content_masks(ends: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(content [B, S]: positions 1..end-1; counted [B, S]: the content positions with an earlier one)."""
    positions = torch.arange(seq, device=ends.device).unsqueeze(0)
    content = (positions >= 1) & (positions < ends.unsqueeze(1))
    return content, content & (positions >= 2)


@torch.no_grad()
def encoder_profile(text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> tuple[list[float], list[float]]:
    """(integration, mixing): one number per layer of ``text_encoder`` for the prompts ``input_ids`` [B, S]
    (module docstring). Raises ValueError when no prompt has two content tokens."""
    model = clip_text_model(text_encoder)
    ends = eos_positions(model, input_ids)
    seq = int(ends.max()) + 1  # causal: positions up to the end token never see what follows it
    content, counted = _content_masks(ends, seq)
    if not bool(counted.any()):
        raise ValueError("the prompts need at least two words (content tokens) for the integration measure")
    states = model(input_ids=input_ids[:, :seq], output_hidden_states=True).hidden_states
    # Token i reads token j < i, j >= 1 (another content token): a strictly lower triangle without column 0.
    others = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril(-1)
    others[:, 0] = False
    integration, mixing = [], []
    for index, layer in enumerate(model.encoder.layers):
        before, after = states[index], states[index + 1]
        weights = attention_weights(layer, before).mean(dim=1)  # [B, S, S], averaged over the heads
        share = (weights * others).sum(dim=-1)  # [B, S]
        integration.append(float(share[counted].mean()))
        cosine = torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)
        mixing.append(float((1 - cosine)[content].mean()))
    return integration, mixing


def uniform_baseline(text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """The integration of a layer whose attention is uniform over the positions a token sees (what random
    weights give): token i sees positions 0..i, i - 1 of them other content tokens, so (i - 1) / (i + 1),
    averaged as ``encoder_profile`` averages. It depends on the prompts' lengths only: the level to read a
    profile against."""
    ends = eos_positions(clip_text_model(text_encoder), input_ids).tolist()
    shares = [(i - 1) / (i + 1) for end in ends for i in range(2, end)]
    return sum(shares) / len(shares) if shares else 0.0


def suggest_window(values: Sequence[float], feeding: int, width: int = WINDOW) -> tuple[int, ...]:
    """The ``width`` consecutive layers in 0..feeding-1 with the highest mean of ``values``; ties -> the later."""
    width = min(width, feeding)
    if width < 1:
        raise ValueError(f"no layer feeds the hidden state the UNet reads (feeding={feeding})")
    best, best_mean = 0, float("-inf")
    for start in range(feeding - width + 1):
        mean = sum(values[start:start + width]) / width
        if mean >= best_mean:  # >=: a tie goes to the later window
            best, best_mean = start, mean
    return tuple(range(best, best + width))


def profile_model(base, prompts: Sequence[str]) -> list[EncoderProfile]:
    """The profile of every text encoder of ``base`` (a models.BaseModel with tokenizers and text encoders)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to profile the text encoder(s) with")
    encoders = base.text_encoders
    specs = base.family.encoders
    missing = [spec.name for spec in specs if spec.name not in encoders]
    if missing:
        raise ValueError(f"base model {base.model_id!r} was loaded without {', '.join(missing)}")
    depths = [clip_text_model(encoders[spec.name]).config.num_hidden_layers for spec in specs]
    defaults = base.family.default_layers(depths)
    profiles = []
    for spec, depth, default in zip(specs, depths, defaults):
        ids = base.tokenize(prompts, spec.name)
        integration, mixing = encoder_profile(encoders[spec.name], ids)
        feeding = spec.output_layers(depth)
        profiles.append(EncoderProfile(
            encoder=spec.name, integration=tuple(integration), mixing=tuple(mixing), feeding=feeding,
            hidden_state=spec.hidden_state, default=tuple(default), suggested=suggest_window(integration, feeding),
            uniform=uniform_baseline(encoders[spec.name], ids),
        ))
    return profiles


def _span(layers: Sequence[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def format_profile(profile: EncoderProfile) -> str:
    """A table for people: layer, both measures, a bar of the integration, and markers."""
    reads = ("last_hidden_state (after the final layer norm)" if profile.hidden_state == -1
             else f"hidden_states[{profile.hidden_state}] (no final layer norm)")
    lines = [f"{profile.encoder}: {profile.depth} layers; the UNet reads {reads}, "
             f"fed by layers {_span(range(profile.feeding))}",
             f"  {'layer':>5}  {'integration':>11}  {'mixing':>6}  {'integration (bar: 0..1)':<{BAR_WIDTH}}  marks"]
    for i in range(profile.depth):
        bar = "#" * round(BAR_WIDTH * min(max(profile.integration[i], 0.0), 1.0))  # full width = 1
        marks = ["feeds UNet" if i < profile.feeding else "not read by the UNet"]
        marks += [name for name, window in (("default", profile.default), ("suggested", profile.suggested))
                  if i in window]
        lines.append(f"  {i:>5}  {profile.integration[i]:>11.3f}  {profile.mixing[i]:>6.3f}  "
                     f"{bar:<{BAR_WIDTH}}  {', '.join(marks)}")
    mean = sum(profile.integration[i] for i in profile.suggested) / len(profile.suggested)
    verdict = "they agree" if profile.agree else "they differ"
    lines.append(f"  uniform attention would give integration {profile.uniform:.3f} for these prompts")
    lines.append(f"  suggested window: layers {_span(profile.suggested)} (mean integration {mean:.3f}); "
                 f"default: layers {_span(profile.default)}; {verdict}")
    return "\n".join(lines)


def plot_profiles(profiles: Sequence[EncoderProfile], path: str | Path, title: str) -> Path:
    """An SVG or PNG chart (by ``path``'s suffix): per encoder, integration and mixing per layer, the
    layers that do not feed the UNet greyed, the default and suggested windows shaded."""
    from matplotlib.figure import Figure

    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise ValueError(f"--plot {path}: use a {' or '.join(PLOT_SUFFIXES)} file name")
    figure = Figure(figsize=(7.6, 2.6 * len(profiles)), dpi=110, layout="constrained")
    figure.suptitle(title, x=0.01, horizontalalignment="left", fontsize=10)
    for axes, profile in zip(figure.subplots(len(profiles), 1, squeeze=False)[:, 0], profiles):
        layers = list(range(profile.depth))
        colours = ["#2f6db5" if i < profile.feeding else "#b4b4b4" for i in layers]
        axes.bar(layers, profile.integration, color=colours, label="integration")
        axes.plot(layers, profile.mixing, color="#d9822b", marker="o", linewidth=1.5, label="mixing")
        axes.axvspan(profile.suggested[0] - 0.5, profile.suggested[-1] + 0.5, color="#3a9a4a", alpha=0.15,
                     label="suggested window", zorder=0)
        axes.axvspan(profile.default[0] - 0.5, profile.default[-1] + 0.5, fill=False, hatch="//",
                     edgecolor="#888888", linewidth=0, label="default window", zorder=0)
        axes.axhline(profile.uniform, color="#555555", linestyle="--", linewidth=1, label="uniform attention")
        axes.set_ylim(0, max(1.0, *profile.mixing) * 1.05)
        axes.set_title(f"{profile.encoder} (grey bars: not read by the UNet)", fontsize=9)
        axes.set_xticks(layers)
        axes.set_xlabel("layer", fontsize=8)
        axes.tick_params(labelsize=8)
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format=path.suffix.lower().lstrip("."), metadata={"Software": None} if path.suffix.lower()
                   == ".png" else {"Date": None})
    return path
