"""Naming and checking a base model's files before anything loads them: what `models` (the loader) and
`modelinfo` (the description without loading) share, so both refuse a missing model with one message."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from .limits import BUILTIN_MODELS, DEFAULT_MODEL

FOLDER_LAYOUT = ("it must be a diffusers Stable Diffusion folder (tokenizer/, text_encoder/, unet/, vae/, "
                 "scheduler/)")


class ModelNotAvailableError(RuntimeError):
    """A base model (or one of its components) cannot be found or read."""


def looks_like_path(name: str) -> bool:
    """True when `name` can only be a folder (not a valid hub id)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "~", os.sep, "/")) or (os.altsep and os.altsep in name):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def how_to_get(name: str) -> str:
    """The fix for a model that cannot be read: how to fetch it."""
    hub_id = name if not looks_like_path(name) else DEFAULT_MODEL
    return (f"to fix: download it with network access (HF_HUB_OFFLINE unset), e.g. "
            f"`hf download {hub_id}`, or pass a local diffusers folder that has tokenizer/, "
            f"text_encoder/, unet/, vae/ and scheduler/")


def component_error(name: str, component: str, error: Exception) -> ModelNotAvailableError:
    """The error for a component that exists on no disk or cannot be read, naming the model and the fix."""
    reason = (str(error).splitlines() or [""])[0]
    return ModelNotAvailableError(f"base model {name!r}: cannot load its {component} ({type(error).__name__}: "
                                  f"{reason}); {how_to_get(name)}")


def local_folder(name: str, components: Sequence[str]) -> str | None:
    """The diffusers folder `name` names, checked to have `components` and scheduler/; None for a hub id.
    A missing folder fails here with a clearer message than from_pretrained's hub fallback."""
    source = os.path.expanduser(name)
    if not (looks_like_path(name) or os.path.exists(source)):
        return None
    if not os.path.isdir(source):
        raise ModelNotAvailableError(
            f"base model folder {name!r} does not exist; pass an existing diffusers folder, "
            f"a hub id, or one of the built-ins {BUILTIN_MODELS}")
    for component in (*components, "scheduler"):
        if not os.path.isdir(os.path.join(source, component)):
            raise ModelNotAvailableError(
                f"base model folder {name!r} has no {component}/ subfolder; {FOLDER_LAYOUT}; to fix: fetch the "
                f"files it needs with network access (README, \"Stable Diffusion v1.5 weights\"), e.g. "
                f"`hf download {DEFAULT_MODEL} --local-dir {name} --include model_index.json "
                f"--include '{component}/*'`")
    return source


def model_index(name: str, folder: str) -> dict:
    """A local diffusers folder's model_index.json: {} when absent (a folder of only the components) or not a
    JSON object; an unreadable or malformed one is a component error. The loader and the planner read it here."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, ValueError) as error:
        raise component_error(name, "model_index.json", error) from None
    return index if isinstance(index, dict) else {}
