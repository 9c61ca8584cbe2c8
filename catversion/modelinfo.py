"""Recognise a base model (its family, every text encoder's depth and width) and give its text encoders'
fingerprint without loading it: what the batch driver needs to plan a run. Imports neither torch, diffusers
nor transformers; only a cache miss does.

The family is recognised from the folder's model_index.json and configs as the loader recognises it
(`families.recognise`). The fingerprint (`models.text_encoders_fingerprint`) is computed by the one slow
path that loads the text encoders, and kept in a small cache keyed by the stamps (path, size, mtime_ns) of
every text encoder's files and the versions of the code that computes it. Hashing the safetensors files here
instead would have to re-derive what transformers does when it loads them (key renames, dropped or
added buffers, dtype upcasts, sharded and .bin checkpoints) for every transformers version; a cached
value from the real computation is equal by construction.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path

from . import storage
from .families import FAMILIES, RECOGNISED_PIPELINES, UnknownFamilyError, family_named, recognise  # noqa: F401
from .limits import BUILTIN_MODELS, DEFAULT_MODEL
from .modelsource import (FOLDER_LAYOUT, ModelNotAvailableError, component_error, how_to_get, local_folder,
                          model_index)
from .recipe import TrainingTarget, format_layers, layers_key

CACHE_ENV = "CATVERSION_CACHE_DIR"
CACHE_FORMAT = 2  # bump when the entry layout or the key's meaning changes (2: families, every text encoder)
# The fingerprint depends on the code that builds built-ins and hashes the encoders, and on the
# libraries that build and load them (transformers decides the state-dict names, torch the RNG).
KEY_PACKAGES = ("catversion", "torch", "transformers")
KEY_SOURCES = ("models.py", "sd_v1.py", "builtin_families.py")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class ModelInfo:
    """What planning needs to know about a base model, read without loading it."""

    model: str  # the name as given
    kind: str  # "builtin" | "folder" | "hub"
    folder: str | None  # the diffusers folder read (a hub id's snapshot in the Hugging Face cache); None: built-in
    pipeline: str | None  # model_index.json's _class_name, when the folder has one
    resolution: int  # native image size in px: unet sample_size x the VAE's downsampling factor
    text_layers: int  # the (first) text encoder's depth (num_hidden_layers)
    text_width: int  # its hidden size
    fingerprint: str  # models.text_encoders_fingerprint of every text encoder
    family: str  # families.Family.name: "sd1" | "sd2" | "sdxl"
    encoder_depths: tuple[int, ...]  # per text encoder of the family, in its order: num_hidden_layers
    encoder_widths: tuple[int, ...]  # and hidden_size

    @property
    def encoders(self) -> tuple[str, ...]:
        """The text encoders' subfolder names, in the family's order (a residual has one block per encoder)."""
        return family_named(self.family).encoder_names

    def layer_sets(self, layers=None) -> tuple[tuple[int, ...], ...]:
        """The patched layers per text encoder, as training uses them: ``layers`` (one sequence per encoder, or
        for a one-encoder model a flat one) checked against the encoders, or the family's default for None.
        ValueError, naming the valid range, when they do not fit."""
        return family_named(self.family).resolve_layers(layers, self.encoder_depths)

    def layers_help(self) -> str:
        """What layers fit, for messages: "text_encoder 0..4 (default '2,3,4')"."""
        family = family_named(self.family)
        ranges = ", ".join(f"{spec.name} 0..{spec.output_layers(depth) - 1}"
                           for spec, depth in zip(family.encoders, self.encoder_depths))
        return f"{ranges} (default {format_layers(self.layer_sets())!r})"


# ---- the description --------------------------------------------------------------------------


def describe(name: str) -> ModelInfo:
    """Recognise base model `name` (a built-in, a local diffusers folder, or a hub id already in the
    local Hugging Face cache) and fingerprint its text encoder, loading it only on a cache miss.

    Raises ModelNotAvailableError as `models.load_base_model` does when the model cannot be read.
    A hub id is read from the cache only with HF_HUB_OFFLINE set: online, only the hub knows what its
    "main" is now, so the model is loaded (and maybe downloaded) as `load_base_model` does.
    """
    if name in BUILTIN_MODELS:
        key = {"model": name}
        cached = _read_entry(key)
        return cached if cached is not None else _computed(name, "builtin", key)
    source = os.path.expanduser(name)
    if os.path.isdir(source):  # a pipeline that is no Stable Diffusion family is named before any missing part
        _refuse_unknown_pipeline(name, model_index(name, source))
    kind, folder = "folder", local_folder(name, ("text_encoder", "unet", "vae"))
    if folder is None:
        kind, folder = "hub", _hub_snapshot(name)
        if folder is None:
            return _computed(name, kind)
    folder = os.path.realpath(folder)
    described = ModelInfo(model=name, kind=kind, folder=folder, fingerprint="", **_read_configs(name, folder, kind))
    key = {"model": folder, "files": _encoder_stamps(folder, described.encoders)}
    cached = _read_entry(key)
    if cached is None:
        return _computed(name, kind, key, described)
    return replace(described, fingerprint=cached.fingerprint)


def training_target_for(model: str, resolution: int | None = None, layers: Sequence | None = None,
                        tokens: int = 1, precision: str = "fp32") -> TrainingTarget:
    """`training.training_target(load_base_model(model, device="cpu"), ...)` without loading the model.

    ``layers`` as training_target takes them: None (the family's default), one sequence per text encoder,
    or a flat one for a one-encoder model. ``precision`` is the UNet/VAE precision training runs at; its
    default is what a model loaded on the CPU has (training_target's default there).
    """
    info = describe(model)
    return TrainingTarget(info.fingerprint, resolution or info.resolution, layers_key(info.layer_sets(layers)),
                          int(tokens), precision)


def _hub_snapshot(name: str) -> str | None:
    """The cached snapshot folder of hub id `name`'s "main", offline; None online or when not cached."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "text_encoder/config.json")
    snapshot = os.path.dirname(os.path.dirname(found)) if isinstance(found, str) else None
    for component in ("text_encoder", "unet", "vae", "scheduler"):
        if snapshot is None or not os.path.isdir(os.path.join(snapshot, component)):
            raise ModelNotAvailableError(
                f"base model {name!r}: its {component} is not in the local Hugging Face cache "
                f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; {how_to_get(name)}")
    return snapshot


def _refuse_unknown_pipeline(name: str, index: dict) -> None:
    """UnknownFamilyError (naming the model and the supported families) for a pipeline that is none of them."""
    pipeline = index.get("_class_name")
    if pipeline is not None and pipeline not in RECOGNISED_PIPELINES:
        recognise(pipeline, 0, index, f"base model {name!r}")  # raises, with the families' message


def _read_configs(name: str, folder: str, kind: str) -> dict:
    """The family, resolution and every text encoder's size from the folder's configs, read as the loader
    reads them (models.family_of and _load_pretrained)."""

    def config(component: str, filename: str = "config.json") -> dict:
        try:
            with open(os.path.join(folder, component, filename), encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError) as error:
            raise component_error(name, component, error) from None

    def size(text: dict) -> tuple[int, int]:
        text = text.get("text_config", text) if text.get("model_type") == "clip" else text
        return int(text["num_hidden_layers"]), int(text["hidden_size"])

    index = model_index(name, folder)
    _refuse_unknown_pipeline(name, index)
    unet, vae, text = config("unet"), config("vae"), config("text_encoder")
    config("scheduler", "scheduler_config.json")  # the loader reads it; a broken one fails here as there
    try:
        first = size(text)
        resolution = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (KeyError, TypeError, ValueError) as error:
        raise ModelNotAvailableError(
            f"base model {name!r}: its text_encoder, unet or vae config.json lacks a size the loader needs "
            f"({type(error).__name__}: {error}); {FOLDER_LAYOUT}, e.g. {DEFAULT_MODEL}'s") from None
    components = dict(index)
    if not index and os.path.isdir(os.path.join(folder, "text_encoder_2")):
        components["text_encoder_2"] = True
    act = (text.get("text_config", text) if text.get("model_type") == "clip" else text).get("hidden_act")
    family = recognise(index.get("_class_name"), first[1], components, f"base model {name!r}", text_act=act)
    sizes = [first]
    for spec in family.encoders[1:]:
        if kind == "folder":  # the loader's check of a local folder, with its message
            local_folder(name, [spec.tokenizer, spec.name])
        elif not all(os.path.isdir(os.path.join(folder, part)) for part in (spec.tokenizer, spec.name)):
            raise ModelNotAvailableError(
                f"base model {name!r}: its {spec.name} or {spec.tokenizer} is not in the local Hugging Face cache "
                f"({folder}) and HF_HUB_OFFLINE is set; {how_to_get(name)}")
        try:
            sizes.append(size(config(spec.name)))
        except (KeyError, TypeError, ValueError) as error:
            raise ModelNotAvailableError(
                f"base model {name!r}: its {spec.name} config.json lacks a size the loader needs "
                f"({type(error).__name__}: {error})") from None
    return {"pipeline": index.get("_class_name"), "resolution": resolution, "text_layers": first[0],
            "text_width": first[1], "family": family.name, "encoder_depths": tuple(d for d, _ in sizes),
            "encoder_widths": tuple(w for _, w in sizes)}


def _encoder_stamps(folder: str, encoders: Sequence[str]) -> dict[str, list[list]]:
    """`_stamps` of every text encoder's subfolder: the files the fingerprint is computed from."""
    return {encoder: _stamps(os.path.join(folder, encoder)) for encoder in encoders}


def _stamps(folder: str) -> list[list]:
    """(relative path, real path, size, mtime_ns) of every file under `folder`, in a stable order;
    symbolic links (the Hugging Face cache's) are followed to the file they point at."""
    stamps = []
    for root, _, files in os.walk(folder, followlinks=True):
        for filename in files:
            path = os.path.join(root, filename)
            try:
                st = os.stat(path)
            except OSError:
                continue  # a dangling link is no weight file; the loader ignores it too
            stamps.append([os.path.relpath(path, folder), os.path.realpath(path), st.st_size, st.st_mtime_ns])
    return sorted(stamps)


# ---- the slow path and the cache --------------------------------------------------------------


def _computed(name: str, kind: str, key: dict | None = None, described: ModelInfo | None = None) -> ModelInfo:
    """Load the text encoders as the training code does and fingerprint them; the rest of the description
    is `described` (read from a folder's configs) or comes from the loaded model. Cached under `key`
    when the files it was read from did not change meanwhile."""
    from .models import load_base_model

    base = load_base_model(name, device="cpu", components=("text_encoder",))
    if described is not None:
        info = replace(described, fingerprint=base.fingerprint)
    else:
        configs = [encoder.config for encoder in base.text_encoders.values()]
        info = ModelInfo(model=name, kind=kind, folder=None, pipeline=None, resolution=base.resolution,
                         text_layers=configs[0].num_hidden_layers, text_width=configs[0].hidden_size,
                         fingerprint=base.fingerprint, family=base.family.name,
                         encoder_depths=tuple(c.num_hidden_layers for c in configs),
                         encoder_widths=tuple(c.hidden_size for c in configs))
    if key is not None and (info.folder is None or key["files"] == _encoder_stamps(info.folder, info.encoders)):
        _write_entry(key, info)
    return info


def cache_dir() -> Path:
    """Where fingerprints are cached: $CATVERSION_CACHE_DIR, else $XDG_CACHE_HOME/catversion (~/.cache/catversion)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "catversion"


def _full_key(key: dict) -> dict:
    versions = {}
    for package in KEY_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    here = Path(__file__).parent
    sources = {source: hashlib.sha256((here / source).read_bytes()).hexdigest() for source in KEY_SOURCES}
    return {"format": CACHE_FORMAT, **key, "versions": versions, "sources": sources}


def _entry_path(key: dict) -> Path:
    """One file per model: a new stamp or version replaces the model's old entry."""
    identity = hashlib.sha256(json.dumps(key["model"]).encode()).hexdigest()[:32]
    return cache_dir() / "base-models" / f"{identity}.json"


def _read_entry(key: dict) -> ModelInfo | None:
    """The cached description under `key`: None when absent, unreadable, for other stamps or versions,
    or malformed (it is then recomputed and rewritten, never trusted)."""
    try:
        entry = json.loads(_entry_path(key).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != _full_key(key):
        return None
    info = entry.get("info")
    try:
        info = ModelInfo(**info)
        info = replace(info, encoder_depths=tuple(info.encoder_depths), encoder_widths=tuple(info.encoder_widths))
        encoders = len(FAMILIES[info.family].encoders)
    except (TypeError, KeyError):
        return None
    sizes = (info.resolution, info.text_layers, info.text_width, *info.encoder_depths, *info.encoder_widths)
    if not (isinstance(info.fingerprint, str) and _FINGERPRINT.match(info.fingerprint)
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes)
            and len(info.encoder_depths) == len(info.encoder_widths) == encoders):
        return None
    return info


def _write_entry(key: dict, info: ModelInfo) -> None:
    path = _entry_path(key)
    data = json.dumps({"key": _full_key(key), "info": asdict(info)}, indent=1, sort_keys=True).encode()
    try:
        storage.write_bytes(str(path), data)  # atomic: a reader sees the old entry or the new one
    except (OSError, storage.StorageError) as exc:
        warnings.warn(f"cannot cache the base model's fingerprint in {path.parent} ({exc}); planning loads the "
                      f"text encoder every run until {CACHE_ENV} names a writable folder", stacklevel=3)
