"""Recognise a base model and give its text encoder's fingerprint without loading it: what the batch
driver needs to plan a run. Imports neither torch, diffusers nor transformers; only a cache miss does.

The fingerprint (`models.text_encoder_fingerprint`) is computed by the one slow path that loads the
text encoder, and kept in a small cache keyed by the stamps (path, size, mtime_ns) of the text
encoder's files and the versions of the code that computes it. Hashing the safetensors files here
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
from .limits import BUILTIN_MODELS, DEFAULT_MODEL
from .modelsource import FOLDER_LAYOUT, ModelNotAvailableError, component_error, how_to_get, local_folder
from .recipe import TrainingTarget, patched_layers

CACHE_ENV = "CATVERSION_CACHE_DIR"
CACHE_FORMAT = 1  # bump when the entry layout or the key's meaning changes
# The fingerprint depends on the code that builds built-ins and hashes the encoder, and on the
# libraries that build and load it (transformers decides the state-dict names, torch the RNG).
KEY_PACKAGES = ("catversion", "torch", "transformers")
KEY_SOURCES = ("models.py", "sd_v1.py")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class ModelInfo:
    """What planning needs to know about a base model, read without loading it."""

    model: str  # the name as given
    kind: str  # "builtin" | "folder" | "hub"
    folder: str | None  # the diffusers folder read (a hub id's snapshot in the Hugging Face cache); None: built-in
    pipeline: str | None  # model_index.json's _class_name, when the folder has one
    resolution: int  # native image size in px: unet sample_size x the VAE's downsampling factor
    text_layers: int  # the text encoder's depth (num_hidden_layers)
    text_width: int  # its hidden size
    fingerprint: str  # models.text_encoder_fingerprint of the text encoder


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
        return ModelInfo(**cached) if cached is not None else _computed(name, "builtin", key)
    kind, folder = "folder", local_folder(name, ("text_encoder", "unet", "vae"))
    if folder is None:
        kind, folder = "hub", _hub_snapshot(name)
        if folder is None:
            return _computed(name, kind)
    folder = os.path.realpath(folder)
    described = ModelInfo(model=name, kind=kind, folder=folder, fingerprint="", **_read_configs(name, folder))
    key = {"model": folder, "files": _stamps(os.path.join(folder, "text_encoder"))}
    cached = _read_entry(key)
    if cached is None:
        return _computed(name, kind, key, described)
    return replace(described, fingerprint=cached["fingerprint"])


def training_target_for(model: str, resolution: int | None = None, layers: Sequence[int] | None = None,
                        tokens: int = 1, precision: str = "fp32") -> TrainingTarget:
    """`training.training_target(load_base_model(model, device="cpu"), ...)` without loading the model.

    ``precision`` is the UNet/VAE precision training runs at; its default is what a model loaded on
    the CPU has (training_target's default there).
    """
    info = describe(model)
    return TrainingTarget(info.fingerprint, resolution or info.resolution, patched_layers(info.text_layers, layers),
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


def _read_configs(name: str, folder: str) -> dict:
    """Resolution and text encoder size from the folder's configs, read as the loader reads them."""

    def config(component: str, filename: str = "config.json") -> dict:
        try:
            with open(os.path.join(folder, component, filename), encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError) as error:
            raise component_error(name, component, error) from None

    unet, vae, text = config("unet"), config("vae"), config("text_encoder")
    config("scheduler", "scheduler_config.json")  # the loader reads it; a broken one fails here as there
    text = text.get("text_config", text) if text.get("model_type") == "clip" else text
    try:
        layers, width = int(text["num_hidden_layers"]), int(text["hidden_size"])
        resolution = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (KeyError, TypeError, ValueError) as error:
        raise ModelNotAvailableError(
            f"base model {name!r}: its text_encoder, unet or vae config.json lacks a size the loader needs "
            f"({type(error).__name__}: {error}); {FOLDER_LAYOUT}, e.g. {DEFAULT_MODEL}'s") from None
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as handle:
            pipeline = json.load(handle).get("_class_name")
    except (OSError, ValueError, AttributeError):  # optional: the loader never reads it
        pipeline = None
    return {"pipeline": pipeline, "resolution": resolution, "text_layers": layers, "text_width": width}


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
    """Load the text encoder as the training code does and fingerprint it; the rest of the description
    is `described` (read from a folder's configs) or comes from the loaded model. Cached under `key`
    when the files it was read from did not change meanwhile."""
    from .models import load_base_model

    base = load_base_model(name, device="cpu", components=("text_encoder",))
    if described is not None:
        info = replace(described, fingerprint=base.fingerprint)
    else:
        config = base.text_encoder.config
        info = ModelInfo(model=name, kind=kind, folder=None, pipeline=None, resolution=base.resolution,
                         text_layers=config.num_hidden_layers, text_width=config.hidden_size,
                         fingerprint=base.fingerprint)
    if key is not None and (info.folder is None or key["files"] == _stamps(os.path.join(info.folder, "text_encoder"))):
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


def _read_entry(key: dict) -> dict | None:
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
    except TypeError:
        return None
    sizes = (info.resolution, info.text_layers, info.text_width)
    if not (isinstance(info.fingerprint, str) and _FINGERPRINT.match(info.fingerprint)
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes)):
        return None
    return asdict(info)


def _write_entry(key: dict, info: ModelInfo) -> None:
    path = _entry_path(key)
    data = json.dumps({"key": _full_key(key), "info": asdict(info)}, indent=1, sort_keys=True).encode()
    try:
        storage.write_bytes(str(path), data)  # atomic: a reader sees the old entry or the new one
    except (OSError, storage.StorageError) as exc:
        warnings.warn(f"cannot cache the base model's fingerprint in {path.parent} ({exc}); planning loads the "
                      f"text encoder every run until {CACHE_ENV} names a writable folder", stacklevel=3)
