"""The batch run's options, defined once: each `BatchConfig` field carries its command-line flag and help.

`catversion batch`'s parser is built from these fields (`add_arguments`) and its arguments turned back into
a `BatchConfig` (`from_args`), so a new option is one field here. Plain data (no torch, no Ray): the
parser and `--help` stay light.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import MISSING, dataclass, field, fields

from catversion import layout
from catversion.limits import (BUILTIN_MODELS, DEFAULT_CLAIM_TTL_S, DEFAULT_CLAIM_WAIT_S, DEFAULT_MODEL,
                               DEFAULT_PRECISION, DEFAULT_RESIZE_INTERVAL_S, DEFAULT_RESOURCES_TIMEOUT_S,
                               DEFAULT_STATE_EVERY, DEFAULT_STORAGE_RETRY_S, PRECISION_CHOICES, PRECISION_HELP)
from catversion.families import parse_layers
from catversion.recipe import REFERENCE_PREFIX_LOGIT_BIAS, TrainConfig


def option(default=None, *, flag: str | None = None, help: str = "", **argparse_kwargs):
    """A BatchConfig field; with ``flag``, also a `catversion batch` option (argparse keywords as given;
    ``type`` defaults to the default's type, and %(default)s works in ``help``)."""
    metadata = {"flag": flag, "help": help, **argparse_kwargs} if flag else {}
    return field(default=default, metadata=metadata)


@dataclass
class BatchConfig:
    """Everything one batch run needs; ValueError (a `BatchConfigError`) names every bad value."""

    manifest: str | list[str] = option(
        MISSING, flag="--manifest", required=True, nargs="+", metavar="URI",
        help="parquet file(s) or a prefix/folder of them: s3://bucket/key, file://..., or a path")
    output: str = option(
        MISSING, flag="--output", metavar="PREFIX",
        help="where residuals and run results go: s3://bucket/prefix or a folder")
    model: str = option(
        DEFAULT_MODEL, flag="--model",
        help=f"base model: {' | '.join(BUILTIN_MODELS)} | a diffusers folder | a hub id (default: {DEFAULT_MODEL})")
    workers: int = option(
        1, flag="--workers",
        help="Ray Train workers: a fixed group of this size, or the most of an elastic one (default: 1)")
    min_workers: int | None = option(
        None, flag="--min-workers", type=int, metavar="M",
        help="make the group elastic, M..--workers workers: a lost node shrinks it and new capacity grows it, "
             "with the unfinished concepts resumed from their saved state (default: a fixed group)")
    gpus_per_worker: float = option(0.0, flag="--gpus-per-worker",
                                    help="GPUs per worker; 0 trains on CPU (default: 0)")
    cpus_per_worker: float = option(1.0, flag="--cpus-per-worker", help="CPUs per worker (default: 1)")
    pack: int | None = option(
        None, flag="--pack", type=int,
        help="concepts trained together in one UNet batch per worker (default: 4 on CPU workers; on GPU workers "
             "as many as the GPU's memory holds, measured at start, up to 16)")
    precision: str = option(
        DEFAULT_PRECISION, flag="--precision", choices=PRECISION_CHOICES,
        help=f"{PRECISION_HELP} (default: %(default)s); part of each residual's training fingerprint, so a change "
             "retrains")
    compile: bool | None = option(
        None, flag="--compile", action=argparse.BooleanOptionalAction,
        help="torch.compile the UNet (static shapes; the first steps compile, a minute or two on SD1.5) "
             "(default: on with --gpus-per-worker > 0, off on CPU)")
    steps: int | None = option(
        None, flag="--steps", type=int,
        help=f"training steps per concept unless the manifest says otherwise (default: {TrainConfig().steps})")
    prefix_logit_bias: float = option(
        REFERENCE_PREFIX_LOGIT_BIAS, flag="--prefix-logit-bias",
        help="logit added to the residual tokens in attention: 1 = the reference code's recipe (exports to "
             "pytorch_adapter.bin), 0 = the paper's equation as written (default: %(default)s)")
    resolution: int | None = option(None, flag="--resolution", type=int,
                                    help="training image size in px (default: the model's native size)")
    layers: tuple[tuple[int, ...], ...] | None = option(
        None, flag="--layers", metavar="L,L,L[;L,L,L]",
        help="text-encoder layers each residual patches, unless the manifest's layers column says otherwise: "
             "comma-separated layer indices, one group per text encoder separated by ';' (e.g. 9,10,11 or "
             "'8,9,10;28,29,30'); checked against the base model's encoders; part of each residual's training "
             "fingerprint, so a change retrains (default: the model family's, the last three layers that feed "
             "what the UNet reads: 9,10,11 on SD 1.5, 8,9,10;28,29,30 on SDXL)")
    max_failures: int = option(
        2, flag="--max-failures",
        help="worker group failures to recover from; each restart resumes in-flight concepts (default: 2)")
    state_every: int = option(
        DEFAULT_STATE_EVERY, flag="--state-every", metavar="STEPS",
        help=f"save each in-flight concept's training state every STEPS of its steps under "
             f"PREFIX/{layout.STATE_FOLDER}/, so a failure or Ctrl-C redoes at most that many; 0 = never "
             "(default: %(default)s)")
    prefetch: int | None = option(
        None, flag="--prefetch", type=int, metavar="N",
        help="concepts fetched, decoded and VAE-encoded ahead of training per worker (default: --pack)")
    resources_timeout_s: float = option(
        DEFAULT_RESOURCES_TIMEOUT_S, flag="--resources-timeout", metavar="SECONDS",
        help="end the job, naming what is missing, when the worker group cannot get its resources for this "
             "long (default: %(default)s)")
    resize_interval_s: float = option(
        DEFAULT_RESIZE_INTERVAL_S, flag="--resize-interval", metavar="SECONDS",
        help="elastic groups: how often to check for capacity to grow into (default: %(default)s)")
    storage_retry_s: float = option(
        DEFAULT_STORAGE_RETRY_S, flag="--storage-retry", metavar="SECONDS",
        help="how long storage reads and writes retry transient errors (an S3 outage) before the concept fails "
             "with the storage error (default: %(default)s)")
    claim_ttl_s: float = option(
        DEFAULT_CLAIM_TTL_S, flag="--claim-ttl", metavar="SECONDS",
        help=f"concepts are claimed under PREFIX/{layout.CLAIMS_FOLDER}/ so concurrent runs never train one "
             "twice; a claim not refreshed for this long (its run died) is taken over (default: %(default)s)")
    claim_wait_s: float = option(
        DEFAULT_CLAIM_WAIT_S, flag="--claim-wait", metavar="SECONDS",
        help="how long to wait for a concept another run is training before reporting it as skipped "
             "(default: %(default)s)")
    address: str | None = option(
        None, flag="--address",
        help="Ray cluster to join: HOST:PORT, ray://HOST:PORT or auto (default: RAY_ADDRESS when set, as in a Ray "
             "Job, else a new local Ray of this command's own, never one already running)")
    allow_images_under: list[str] | None = option(
        None, flag="--allow-images-under", action="append", metavar="DIR",
        help="a folder whose images the manifest may name, besides the manifest's own folder (repeatable; also "
             "CATVERSION_ALLOW_IMAGES_UNDER, folders separated by ':'); a local image anywhere else is rejected")
    strict: bool = option(
        False, flag="--strict", action="store_true",
        help="refuse a manifest with a column catversion does not read (e.g. a misspelt override), instead of "
             "warning about it")
    run_id: str | None = option(
        None, flag="--run-id",
        help=f"name of this run under PREFIX/{layout.RUNS_FOLDER}/ (default: timestamp + random suffix)")
    storage_path: str | None = option(None, flag="--storage-path",
                                      help="Ray Train run state location (default: ~/ray_results)")
    worker_env: dict[str, str] | None = None  # extra environment variables for the Train workers (not a flag)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise BatchConfigError(problems)

    def problems(self) -> list[tuple[str, str]]:
        """(field, what is wrong) for every bad value (``layers`` given as text is parsed here)."""
        found = []
        if self.layers is not None:
            try:
                self.layers = _layer_groups(self.layers)
            except (TypeError, ValueError) as exc:
                found.append(("layers", f"must be layer indices: {exc}"))
        for name in ("workers", "pack"):
            value = getattr(self, name)
            if (value is not None or name == "workers") and (not _is_int(value) or value < 1):
                found.append((name, f"must be an integer >= 1, got {value!r}"))
        if self.prefetch is not None and (not _is_int(self.prefetch) or self.prefetch < 0):
            found.append(("prefetch", f"must be an integer >= 0 (0: the pack size), got {self.prefetch!r}"))
        if self.min_workers is not None and not (_is_int(self.min_workers) and 1 <= self.min_workers <= self.workers):
            found.append(("min_workers", f"must be an integer in 1..workers ({self.workers}), got {self.min_workers!r}"))
        if self.steps is not None:
            try:
                TrainConfig(steps=self.steps)
            except ValueError as exc:
                found.append(("steps", str(exc).removeprefix("steps ")))
        if self.precision not in PRECISION_CHOICES:
            found.append(("precision", f"must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}"))
        if not _is_int(self.state_every) or self.state_every < 0:
            found.append(("state_every", f"must be an integer >= 0 (0: never), got {self.state_every!r}"))
        if not _is_int(self.max_failures) or self.max_failures < -1:
            found.append(("max_failures", f"must be an integer >= 0 (-1: no limit), got {self.max_failures!r}"))
        for name in ("gpus_per_worker", "cpus_per_worker"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value >= 0):
                found.append((name, f"must be a number >= 0, got {value!r}"))
        for folder in self.allow_images_under or []:
            if "://" in str(folder) and not str(folder).startswith("file://"):
                found.append(("allow_images_under", f"takes local folders, got {folder!r} (images on S3 need no allowing)"))
            elif not os.path.isdir(str(folder).removeprefix("file://")):
                found.append(("allow_images_under", f"{folder!r} is not a folder"))
        for name in ("resources_timeout_s", "storage_retry_s", "claim_ttl_s", "claim_wait_s", "resize_interval_s"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                found.append((name, f"must be a positive number of seconds, got {value!r}"))
        return found

    @property
    def training_precision(self) -> str:
        """The concrete UNet/VAE precision the workers train at (part of every training fingerprint)."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if self.gpus_per_worker > 0 else "fp32"

    @property
    def compiled(self) -> bool:
        return self.gpus_per_worker > 0 if self.compile is None else bool(self.compile)

    @property
    def resources(self) -> dict[str, float]:
        """What one worker asks Ray for."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker > 0 else {})}


class BatchConfigError(ValueError):
    """Bad BatchConfig values; ``problems`` lists (field, what is wrong)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{name} {message}" for name, message in problems))

    def for_command_line(self) -> str:
        """The same, naming each option by its flag."""
        flags = {f.name: f.metadata.get("flag") or f.name for f in fields(BatchConfig)}
        return "; ".join(f"{flags[name]} {message}" for name, message in self.problems)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per flagged BatchConfig field, in field order, with the field's default."""
    for item in fields(BatchConfig):
        meta = dict(item.metadata)
        flag = meta.pop("flag", None)
        if not flag:
            continue
        if item.default is not MISSING:
            meta["default"] = item.default
            if "action" not in meta and "type" not in meta and "choices" not in meta and item.default is not None:
                meta["type"] = type(item.default)
        parser.add_argument(flag, dest=item.name, **meta)


def from_args(args: argparse.Namespace, **overrides) -> BatchConfig:
    """The BatchConfig of parsed `catversion batch` arguments (BatchConfigError for bad values)."""
    values = {item.name: getattr(args, item.name) for item in fields(BatchConfig) if item.metadata.get("flag")}
    manifest = values["manifest"]
    values["manifest"] = manifest[0] if isinstance(manifest, list) and len(manifest) == 1 else manifest
    values.update(overrides)
    return BatchConfig(**values)


def _layer_groups(layers) -> tuple[tuple[int, ...], ...]:
    """--layers as one tuple of layer indices per text encoder, from its text or from sequences (a flat
    sequence of ints is one encoder's); whether they fit the model is checked at planning."""
    if isinstance(layers, str):
        return parse_layers(layers)
    items = list(layers)
    groups = [items] if items and all(_is_int(i) for i in items) else items
    parsed = tuple(tuple(int(i) for i in group) for group in groups)
    if not parsed or any(not group for group in parsed):
        raise ValueError(f"layers {layers!r}: give at least one layer per text encoder")
    return parsed


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
