"""The CatVersion residual: learned Key/Value vectors for a few CLIP self-attention layers.

One file per concept (~18 KB for SD1.x). This module owns the on-disk format (safetensors with a
self-describing header) and the conversion to and from the reference code's `pytorch_adapter.bin`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

from . import storage

FORMAT_NAME = "catversion-residual"
FORMAT_VERSION = 2  # written for residuals of several blocks (SDXL); one-block residuals are still written as 1
READ_VERSIONS = (1, 2)
TENSOR_KEY = "residual"  # version 1's one tensor

# Header keys owned by the format; everything else in the header is `meta`.
_FORMAT_KEYS = ("format", "format_version", "layers", "tokens", "hidden_size", "blocks", "prefix_logit_bias", "sha256")

# Reference code (adapter-transformers 3.2.1 prefix tuning) state-dict keys.
_OFFICIAL_LAYER_KEY = (
    "text_model.encoder.layers.{layer}.self_attn.prefix_tuning.pool.prefix_tunings.{name}"
    ".clip_text_model_self_prefix.control_trans"
)
_OFFICIAL_POOL_KEY = "prefix_tuning.prefix_tunings.{name}.clip_text_model_self_prefix.control_trans"
_OFFICIAL_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.prefix_tuning\.")
OFFICIAL_LAYERS = (9, 10, 11)
OFFICIAL_PREFIX_LOGIT_BIAS = 1.0


class ResidualFormatError(ValueError):
    """A residual file (or bytes) that cannot be read as a valid residual."""


class ResidualNotFoundError(ResidualFormatError, FileNotFoundError):
    """No residual exists at the given path or URI."""


class IncompatibleResidualError(ValueError):
    """A valid residual that does not fit the given text encoder."""


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a residual tensor's float32 little-endian bytes, as 'sha256:<hex>'."""
    return blocks_sha256([tensor])


def blocks_sha256(tensors: Sequence[torch.Tensor]) -> str:
    """sha256 of the blocks' float32 little-endian bytes one after another, as 'sha256:<hex>' (for one block,
    the version-1 hash of its tensor)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


class ResidualBlock:
    """One text encoder's part of a residual: ``tensor[l, 0]`` are keys and ``tensor[l, 1]`` values for
    ``layers[l]`` of the encoder named ``encoder`` (its diffusers subfolder: "text_encoder", "text_encoder_2")."""

    __slots__ = ("encoder", "layers", "tensor")

    def __init__(self, encoder: str, layers: Sequence[int], tensor: torch.Tensor):
        layers = tuple(int(i) for i in layers)
        if not isinstance(encoder, str) or not re.fullmatch(r"text_encoder(_\d+)?", encoder):
            raise ValueError(f"encoder must name a text encoder subfolder (text_encoder, text_encoder_2), got {encoder!r}")
        if not layers or any(i < 0 for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct non-negative layer indices, got {layers}")
        if list(layers) != sorted(layers):
            raise ValueError(f"layers must be in increasing order, got {layers}")
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError("tensor must be a floating-point torch.Tensor of shape [L, 2, T, D]")
        if tensor.dim() != 4 or tensor.shape[0] != len(layers) or tensor.shape[1] != 2:
            raise ValueError(
                f"tensor must have shape [L={len(layers)}, 2, T, D] for layers {layers}, got {tuple(tensor.shape)}"
            )
        if tensor.shape[2] < 1 or tensor.shape[3] < 1:
            raise ValueError(f"tensor has an empty dimension: {tuple(tensor.shape)}")
        tensor = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        if not torch.isfinite(tensor).all():
            raise ValueError("tensor has non-finite values (NaN or inf)")
        self.encoder, self.layers, self.tensor = encoder, layers, tensor

    @property
    def tokens(self) -> int:
        return int(self.tensor.shape[2])

    @property
    def hidden_size(self) -> int:
        return int(self.tensor.shape[3])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.tensor.shape)

    def describe(self) -> dict[str, Any]:
        return {"encoder": self.encoder, "layers": list(self.layers), "tokens": self.tokens,
                "hidden_size": self.hidden_size}


class Residual:
    """Residual Key/Value vectors for a few self-attention layers of each text encoder the UNet reads.

    One `ResidualBlock` per patched text encoder (SD 1.x and 2.x: one, SDXL: two); ``Residual(tensor,
    layers, ...)`` makes the one-block residual of a model's "text_encoder", ``Residual.from_blocks`` any.
    The vectors live in post-projection space (after k_proj / v_proj), so one residual token is a
    full hidden-size vector whose per-head slices are that head's extra key or value.
    ``prefix_logit_bias`` is added to every query's logit for the residual tokens: 0.0 is the
    paper's equation, 1.0 reproduces the reference code's checkpoints (docs/method.md, "The +1 logit
    bias"). ``tensor``, ``layers`` and ``hidden_size`` are the one block's; a residual of several
    blocks has them per block (``blocks``, ``layer_sets``).
    """

    def __init__(
        self,
        tensor: torch.Tensor,
        layers: tuple[int, ...] | list[int],
        prefix_logit_bias: float = 0.0,
        meta: dict[str, Any] | None = None,
        *,
        encoder: str = "text_encoder",
    ):
        self._init([ResidualBlock(encoder, layers, tensor)], prefix_logit_bias, meta)

    @classmethod
    def from_blocks(cls, blocks: Sequence[ResidualBlock | tuple[str, Sequence[int], torch.Tensor]],
                    prefix_logit_bias: float = 0.0, meta: dict[str, Any] | None = None) -> "Residual":
        """A residual of one block per text encoder, in the family's encoder order; every block has the
        same token count."""
        made = [b if isinstance(b, ResidualBlock) else ResidualBlock(*b) for b in blocks]
        self = cls.__new__(cls)
        self._init(made, prefix_logit_bias, meta)
        return self

    def _init(self, blocks: list[ResidualBlock], prefix_logit_bias: float, meta: dict[str, Any] | None) -> None:
        if not blocks:
            raise ValueError("a residual needs at least one block")
        names = [b.encoder for b in blocks]
        if len(set(names)) != len(names):
            raise ValueError(f"a residual has one block per text encoder, got {names}")
        if len({b.tokens for b in blocks}) != 1:
            raise ValueError(f"every block of a residual has the same token count, got {[b.tokens for b in blocks]}")
        bias = float(prefix_logit_bias)
        if not math.isfinite(bias):
            raise ValueError(f"prefix_logit_bias must be finite, got {prefix_logit_bias}")
        self.blocks: tuple[ResidualBlock, ...] = tuple(blocks)
        self.prefix_logit_bias = bias
        self.meta = dict(meta or {})
        for key in _FORMAT_KEYS:
            if key != "sha256":
                self.meta.pop(key, None)
        self.meta["sha256"] = blocks_sha256([b.tensor for b in blocks])

    # ---- shape facts -------------------------------------------------------------------------
    def _single(self, what: str) -> ResidualBlock:
        if len(self.blocks) != 1:
            raise ValueError(f"this residual has {len(self.blocks)} blocks ({', '.join(self.encoders)}); "
                             f"its {what} is per block: use .blocks")
        return self.blocks[0]

    @property
    def tensor(self) -> torch.Tensor:
        return self._single("tensor").tensor

    @property
    def layers(self) -> tuple[int, ...]:
        return self._single("layers").layers

    @property
    def hidden_size(self) -> int:
        return self._single("hidden_size").hidden_size

    @property
    def tokens(self) -> int:
        return self.blocks[0].tokens

    @property
    def encoders(self) -> tuple[str, ...]:
        return tuple(b.encoder for b in self.blocks)

    @property
    def layer_sets(self) -> tuple[tuple[int, ...], ...]:
        """The patched layers of each block, in block order."""
        return tuple(b.layers for b in self.blocks)

    @property
    def patch(self) -> tuple[tuple[str, tuple[int, ...], int, int], ...]:
        """What a patched encoder must apply to take this residual: (encoder, layers, tokens, width) per block."""
        return tuple((b.encoder, b.layers, b.tokens, b.hidden_size) for b in self.blocks)

    @property
    def nbytes(self) -> int:
        return sum(b.tensor.numel() * b.tensor.element_size() for b in self.blocks)

    def flat(self) -> torch.Tensor:
        """Every block's values in one 1-d float32 tensor, in block order (what a trainer optimizes)."""
        return torch.cat([b.tensor.reshape(-1) for b in self.blocks])

    @property
    def sha256(self) -> str:
        return self.meta["sha256"]

    def __repr__(self) -> str:
        word = self.meta.get("class_word")
        if len(self.blocks) == 1:
            shape = f"layers={self.layers}, tokens={self.tokens}, hidden_size={self.hidden_size}"
        else:
            shape = ", ".join(f"{b.encoder}={b.layers}x{b.hidden_size}" for b in self.blocks) + f", tokens={self.tokens}"
        return f"Residual({shape}, prefix_logit_bias={self.prefix_logit_bias}, class_word={word!r}, {self.sha256[:15]}…)"

    # ---- safetensors I/O ---------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Format version 1 for a one-block residual of "text_encoder" (SD 1.x and 2.x: what every catversion
        reads), version 2 (one tensor per block, named by its encoder) otherwise."""
        header = {"format": FORMAT_NAME, "prefix_logit_bias": repr(self.prefix_logit_bias), "sha256": self.sha256}
        if self.encoders == ("text_encoder",):
            header.update({"format_version": "1", "layers": json.dumps(list(self.layers)),
                           "tokens": str(self.tokens), "hidden_size": str(self.hidden_size)})
            tensors = {TENSOR_KEY: self.tensor}
        else:
            header.update({"format_version": str(FORMAT_VERSION),
                           "blocks": json.dumps([b.describe() for b in self.blocks])})
            tensors = {b.encoder: b.tensor for b in self.blocks}
        for key, value in self.meta.items():
            if key in header:
                continue
            header[str(key)] = json.dumps(value, sort_keys=True, default=str)
        return st_save_bytes(tensors, metadata=header)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: the file appears complete or not at all."""
        storage.write_bytes(str(path), self.to_bytes())

    @classmethod
    def load(cls, source: str | os.PathLike | bytes | bytearray | memoryview, name: str | None = None) -> "Residual":
        """Read and verify a residual (a path, ``file://`` or ``s3://`` URI, or the file's bytes).

        Refuses anything not exactly right with ResidualFormatError (ResidualNotFoundError when
        nothing is there); an unreachable store raises ``storage.StorageError``. ``name`` is what error messages call the source (e.g. the s3:// URI the bytes came from).
        """
        if isinstance(source, (bytes, bytearray, memoryview)):
            data, name = bytes(source), name or "<residual bytes>"
        else:
            name = name or str(source)
            try:
                data = storage.read_bytes(str(source))
            except storage.NotFoundError:
                raise ResidualNotFoundError(f"residual file {name} does not exist") from None
            except storage.NotAFileError:
                raise ResidualFormatError(f"residual path {name} is a directory, expected a .safetensors file") from None
        return cls._from_bytes(data, name)

    @classmethod
    def _from_bytes(cls, data: bytes, name: str) -> "Residual":
        def refuse(reason: str) -> ResidualFormatError:
            return ResidualFormatError(f"{name}: {reason}")

        header = _safetensors_header(data, refuse)
        meta_raw = header.get("__metadata__") or {}
        fmt = meta_raw.get("format")
        if fmt != FORMAT_NAME:
            raise refuse(
                f"not a catversion residual (header format={fmt!r}, expected {FORMAT_NAME!r}); "
                "a reference-code pytorch_adapter.bin is imported with `catversion import-official`"
            )
        try:
            version = int(meta_raw.get("format_version", ""))
        except ValueError:
            raise refuse(f"format_version {meta_raw.get('format_version')!r} is not an integer") from None
        if version not in READ_VERSIONS:
            hint = "upgrade catversion" if version > FORMAT_VERSION else "re-save it with the catversion that wrote it"
            raise refuse(f"format version {version} is not supported (this catversion reads versions "
                         f"{', '.join(map(str, READ_VERSIONS))}); {hint}")
        try:
            if version == 1:
                shapes = [{"encoder": "text_encoder", "key": TENSOR_KEY, "layers": json.loads(meta_raw["layers"]),
                           "tokens": meta_raw["tokens"], "hidden_size": meta_raw["hidden_size"]}]
            else:
                shapes = [dict(block, key=block["encoder"]) for block in json.loads(meta_raw["blocks"])]
                if not shapes:
                    raise ValueError("no blocks")
            for block in shapes:
                block["layers"] = tuple(int(i) for i in block["layers"])
                block["tokens"], block["hidden_size"] = int(block["tokens"]), int(block["hidden_size"])
                if not isinstance(block["encoder"], str):
                    raise TypeError("a block's encoder is not a name")
            bias = float(meta_raw["prefix_logit_bias"])
            expected_hash = meta_raw["sha256"]
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise refuse(f"header is missing or has a malformed format field ({exc!r})") from None
        try:
            tensors = st_load_bytes(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise refuse(f"truncated or corrupt safetensors data ({exc})") from None
        keys = [block["key"] for block in shapes]
        if set(tensors) != set(keys) or len(keys) != len(set(keys)):
            raise refuse(f"expected the tensors {keys}, found {sorted(tensors)}")
        blocks = []
        for block in shapes:
            tensor = tensors[block["key"]]
            if tensor.dtype != torch.float32:
                raise refuse(f"tensor {block['key']!r} dtype is {tensor.dtype}, expected torch.float32")
            layers = block["layers"]
            expected_shape = (len(layers), 2, block["tokens"], block["hidden_size"])
            if tuple(tensor.shape) != expected_shape:
                raise refuse(
                    f"tensor {block['key']!r} shape {tuple(tensor.shape)} does not match the header "
                    f"(layers={list(layers)}, tokens={block['tokens']}, hidden_size={block['hidden_size']} → "
                    f"{expected_shape})"
                )
            if not torch.isfinite(tensor).all():
                raise refuse("tensor has non-finite values (NaN or inf); the training run that wrote it diverged")
            blocks.append((block["encoder"], layers, tensor))
        actual_hash = blocks_sha256([tensor for _, _, tensor in blocks])
        if actual_hash != expected_hash:
            raise refuse(
                f"sha256 mismatch: header says {expected_hash}, tensor bytes hash to {actual_hash} "
                "(the file was modified or corrupted after it was written)"
            )
        meta: dict[str, Any] = {}
        for key, value in meta_raw.items():
            if key in _FORMAT_KEYS:
                continue
            try:
                meta[key] = json.loads(value)
            except ValueError:
                meta[key] = value
        try:
            return cls.from_blocks(blocks, bias, meta)
        except ValueError as exc:
            raise refuse(str(exc)) from None

    # ---- compatibility -----------------------------------------------------------------------
    def check_compatible(self, text_encoder: Any = None, *, fingerprint: str | None = None, strict: bool = True,
                         layers: Sequence | None = None, tokens: int | None = None,
                         base_model: str | None = None, family: str | None = None) -> None:
        """Raise IncompatibleResidualError explaining why this residual does not fit the base model.

        ``text_encoder`` is a transformers CLIPTextModel (anything with a CLIP-like ``config``) for a
        one-encoder base, or {encoder name: model} for every text encoder of the base (SDXL: two);
        ``fingerprint`` is the base model's text-encoder fingerprint (``models.BaseModel.fingerprint``),
        compared with the one recorded at training time when both are known. ``layers`` (per encoder, or
        one sequence for a one-encoder base) and ``tokens`` are what the patched encoder that will apply
        the residual takes (exactly those). ``base_model`` is the loaded base model's id: when either
        fingerprint is unknown, a residual whose header names another base model is refused. ``family`` is
        the base's family name ("sd1", "sd2", "sdxl"): a residual recorded for another family is refused
        naming both. ``strict=False`` skips only the base-model comparisons (fingerprint and name).
        """
        trained_on = self.meta.get("base_model") or "an unknown base model"
        recorded_family = self.meta.get("base_family")
        if family and recorded_family and recorded_family != family:
            raise IncompatibleResidualError(
                f"residual was trained for a {recorded_family} base model ({trained_on}) but the loaded base model "
                f"{base_model or ''} is {family}: serve or load a {recorded_family} base model for it, or retrain it "
                f"on this one")
        encoders = text_encoder if isinstance(text_encoder, dict) else (
            {} if text_encoder is None else {"text_encoder": text_encoder})
        if encoders and set(encoders) != set(self.encoders):
            raise IncompatibleResidualError(
                f"residual patches the text encoder(s) {', '.join(self.encoders)} but the base model "
                f"{base_model or ''} has {', '.join(encoders)}: it was trained for {trained_on}, a base model of "
                "another family")
        for block in self.blocks:
            if block.encoder in encoders:
                _check_block(block, encoders[block.encoder].config, trained_on)
        if layers is not None:
            wanted = tuple(tuple(int(i) for i in s) for s in layers) if layers and not isinstance(
                next(iter(layers)), int) else (tuple(int(i) for i in layers),)
            if wanted != self.layer_sets:
                raise IncompatibleResidualError(
                    f"residual patches encoder layers {_layers_text(self.layer_sets)} but this server patches "
                    f"{_layers_text(wanted)}: retrain it with the same layers")
        if tokens is not None and int(tokens) != self.tokens:
            raise IncompatibleResidualError(
                f"residual has {self.tokens} token(s) per layer but this server applies {int(tokens)}: "
                "retrain it with the same token count"
            )
        if not strict:
            return
        recorded = self.meta.get("base_fingerprint")
        if recorded and fingerprint:
            if recorded != fingerprint:
                raise IncompatibleResidualError(
                    f"residual was trained on {trained_on} whose text encoder fingerprint is {recorded[:19]}…, "
                    f"but the loaded text encoder's is {fingerprint[:19]}…: load the same base model "
                    "(or pass strict=False to apply it anyway)"
                )
            return
        named = self.meta.get("base_model")
        if named and base_model and str(named) != str(base_model):
            raise IncompatibleResidualError(
                f"residual names base model {named!r} (and no text-encoder fingerprint to compare), but the loaded "
                f"base model is {base_model!r}: load that base model, or retrain the residual on this one"
            )

    # ---- reference-code checkpoint -------------------------------------------------------------
    @classmethod
    def from_official(
        cls, path: str | os.PathLike, *, class_word: str | None = None, hidden_size: int | None = None
    ) -> "Residual":
        """Import the reference code's ``pytorch_adapter.bin`` (adapter-transformers prefix tuning).

        Layout (docs/method.md, "The released checkpoint format"): one fp32 storage viewed as
        (prefix_len, 2·slot + kv, heads, head_dim) with slots in increasing layer order and kv 0 = key,
        1 = value. The hidden size comes from ``hidden_size``, else the ``adapter_config.json`` beside
        the file, else prefix length 1.
        Imported residuals carry ``prefix_logit_bias`` 1.0, which the reference code applies.
        """
        path = Path(path)
        name = str(path)
        if not path.is_file():
            raise ResidualFormatError(f"{name} does not exist or is not a file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for foreign or unsafe pickles
            raise ResidualFormatError(
                f"{name}: not a loadable reference checkpoint with plain tensors ({type(exc).__name__}: {exc})"
            ) from None
        if not isinstance(state, dict) or not state:
            raise ResidualFormatError(f"{name}: expected a dict of tensors, got {type(state).__name__}")
        per_layer: dict[int, torch.Tensor] = {}
        others: list[torch.Tensor] = []
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or not key.endswith(".control_trans"):
                raise ResidualFormatError(
                    f"{name}: unexpected entry {key!r}; only prefix-tuning 'control_trans' tensors are supported "
                    "(was the adapter trained with flat=True, as CatVersion does?)"
                )
            match = _OFFICIAL_LAYER_RE.search(key)
            if match:
                per_layer[int(match.group(1))] = value
            else:
                others.append(value)
        if not per_layer:
            raise ResidualFormatError(f"{name}: no 'encoder.layers.N.self_attn.prefix_tuning' keys found")
        layers = tuple(sorted(per_layer))
        flat = per_layer[layers[0]].detach().reshape(-1).to(torch.float32)
        for value in list(per_layer.values()) + others:
            if value.numel() != flat.numel() or not torch.equal(value.reshape(-1).to(torch.float32), flat):
                raise ResidualFormatError(
                    f"{name}: the control_trans tensors differ; CatVersion checkpoints hold one shared tensor"
                )
        if hidden_size is None:
            config_path = path.parent / "adapter_config.json"
            if config_path.is_file():
                try:
                    hidden_size = int(json.loads(config_path.read_text())["hidden_size"])
                except (ValueError, KeyError, TypeError):
                    hidden_size = None
        slots = 2 * len(layers)
        if hidden_size is None:
            if flat.numel() % slots:
                raise ResidualFormatError(f"{name}: {flat.numel()} values do not split into {slots} key/value slots")
            hidden_size = flat.numel() // slots
        if flat.numel() % (slots * hidden_size):
            raise ResidualFormatError(
                f"{name}: {flat.numel()} values do not fit {len(layers)} layers × (key, value) × hidden {hidden_size}"
            )
        tokens = flat.numel() // (slots * hidden_size)
        # (T, 2L, D) → (2L, T, D) → (L, 2, T, D)
        tensor = flat.view(tokens, slots, hidden_size).permute(1, 0, 2).reshape(len(layers), 2, tokens, hidden_size)
        meta = {"source": "official", "source_file": path.name}
        if class_word is not None:
            from .recipe import check_class_word

            meta["class_word"] = check_class_word(class_word)
        try:
            return cls(tensor, layers, OFFICIAL_PREFIX_LOGIT_BIAS, meta)
        except ValueError as exc:
            raise ResidualFormatError(f"{name}: {exc}") from None

    def to_official(self, path: str | os.PathLike, *, adapter_name: str = "prefix_tuning1", force: bool = False) -> None:
        """Write the reference code's layout: 4 keys sharing one fp32 storage, loadable by it.

        The reference code always adds +1.0 to the residual logits, so a residual trained with
        another ``prefix_logit_bias`` would behave differently there; that needs ``force=True``.
        """
        family = self.meta.get("base_family")
        if len(self.blocks) != 1 or family not in (None, "sd1"):
            raise IncompatibleResidualError(
                f"the reference code's pytorch_adapter.bin holds Stable Diffusion 1.x residuals only; this one is for "
                f"{family or 'a base model with the text encoders ' + ', '.join(self.encoders)}: keep it as a "
                "catversion .safetensors file")
        if self.prefix_logit_bias != OFFICIAL_PREFIX_LOGIT_BIAS and not force:
            raise IncompatibleResidualError(
                f"this residual uses prefix_logit_bias={self.prefix_logit_bias}, but the reference code always "
                f"applies {OFFICIAL_PREFIX_LOGIT_BIAS}; it would behave differently there. Train with "
                "prefix_logit_bias=1.0 for reference compatibility, or pass force=True (--force) to export anyway"
            )
        layers, tokens, hidden = len(self.layers), self.tokens, self.hidden_size
        flat = self.tensor.reshape(2 * layers, tokens, hidden).permute(1, 0, 2).contiguous().reshape(-1)
        state = {_OFFICIAL_LAYER_KEY.format(layer=i, name=adapter_name): flat for i in self.layers}
        state[_OFFICIAL_POOL_KEY.format(name=adapter_name)] = flat
        buffer = io.BytesIO()
        torch.save(state, buffer)
        storage.write_bytes(str(path), buffer.getvalue())

    def official_adapter_config(self, adapter_name: str = "prefix_tuning1") -> dict[str, Any]:
        """The adapter_config.json the reference code expects beside ``pytorch_adapter.bin``."""
        return {
            "config": {
                "architecture": "prefix_tuning",
                "bottleneck_size": 512,
                "cross_prefix": True,
                "dropout": 0.0,
                "encoder_prefix": True,
                "flat": True,
                "leave_out": [],
                "non_linearity": "tanh",
                "prefix_length": self.tokens,
                "shared_gating": True,
                "use_gating": False,
            },
            "hidden_size": self.hidden_size,
            "model_class": "CLIPTextModel",
            "model_name": None,
            "model_type": "clip_text_model",
            "name": adapter_name,
            "version": "3.2.1",
        }


def _layers_text(layer_sets: Sequence[Sequence[int]]) -> str:
    return str(list(layer_sets[0])) if len(layer_sets) == 1 else " and ".join(str(list(s)) for s in layer_sets)


def _check_block(block: ResidualBlock, config: Any, trained_on: str) -> None:
    """Whether one block fits its text encoder's config (width, depth, heads)."""
    if config.hidden_size != block.hidden_size:
        raise IncompatibleResidualError(
            f"residual block {block.encoder} has hidden size {block.hidden_size} but the text encoder has "
            f"{config.hidden_size}: it was trained for {trained_on}, a different base model")
    depth = config.num_hidden_layers
    if max(block.layers) >= depth:
        raise IncompatibleResidualError(
            f"residual patches {block.encoder} layers {list(block.layers)} but the text encoder has only {depth} "
            f"layers (0..{depth - 1}): it was trained for {trained_on}, a different base model")
    if block.hidden_size % config.num_attention_heads:
        raise IncompatibleResidualError(
            f"residual hidden size {block.hidden_size} is not divisible by the encoder's "
            f"{config.num_attention_heads} heads")


def _safetensors_header(data: bytes, refuse) -> dict:
    """Parse the safetensors header by hand so a foreign or truncated file gets a precise reason."""
    if len(data) < 8:
        raise refuse(f"not a safetensors file ({len(data)} bytes, too short; truncated?)")
    size = int.from_bytes(data[:8], "little")
    if size <= 0 or size > 100_000_000 or 8 + size > len(data):
        raise refuse("not a safetensors file, or truncated (header length field is invalid)")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError:
        raise refuse("not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise refuse("not a safetensors file (header is not a JSON object)")
    return header
