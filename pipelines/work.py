"""What crosses the batch run's driver -> dispatcher -> worker boundary, typed.

The driver plans `PlannedConcept`s and hands them to the run's `Dispatcher` (pipelines/dispatch.py);
each Ray Train worker gets one `WorkerConfig` and leases `Lease`s from the dispatcher, reports
`WorkerProgress` and is answered with a `Control`. Plain data (no Ray, no torch), pickled by Ray. A
concept's recipe (`concept_config`) is decided here too, the same on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from catversion.recipe import Concept, TrainConfig

from .manifest import ConceptSpec
from .options import BatchConfig


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a Train worker needs: the run's options, its id, and its dispatcher's actor handle."""

    batch: BatchConfig
    run_id: str
    dispatcher: Any  # ray.actor.ActorHandle of the run's Dispatcher


@dataclass(frozen=True)
class PlannedConcept:
    """A concept planning could not settle, with what the listings said about its outputs."""

    spec: ConceptSpec
    residual_stamp: str | None = None  # the residual's stamp when planning listed one (None: there was none)
    residual_fingerprint: str | None = None  # its training fingerprint per the index (None: unknown)
    states: tuple[str, ...] = ()  # saved training states of the concept found at planning
    # The text-encoder layers to patch, one tuple per encoder, checked against the model at planning (the
    # manifest's layers column, else --layers, else the family's default); None: the worker's default trainer's.
    # Concepts of other layers never share a pack (the dispatcher leases one layer set at a time).
    layers: tuple[tuple[int, ...], ...] | None = None

    @property
    def concept_id(self) -> str:
        return self.spec.concept_id


@dataclass(frozen=True)
class Deferral:
    """The concept was deferred because run ``owner`` held its claim; first deferred ``waited_s`` ago."""

    owner: str
    waited_s: float


@dataclass(frozen=True)
class Lease:
    """One planned concept handed to one worker."""

    index: int  # the concept's place in the run's queue (the dispatcher's key)
    concept: PlannedConcept
    attempt: int = 0  # how many earlier worker groups held it (> 0: it may have a state or a residual by now)
    deferred: Deferral | None = None


@dataclass(frozen=True)
class LeaseAnswer:
    """The dispatcher's answer to a lease request."""

    leases: list[Lease]
    claiming: bool  # another run is active on the output: claim every concept
    wait_s: float | None = None  # nothing now, but ask again after this long (concepts deferred or held back)

    @property
    def exhausted(self) -> bool:
        """Nothing is left for this worker."""
        return not self.leases and self.wait_s is None


@dataclass(frozen=True)
class WorkerProgress:
    steps: int  # concept-steps done by this worker
    active: int  # concepts in its pack
    images_per_s: float


@dataclass(frozen=True)
class Control:
    """The dispatcher's answer to a progress report."""

    stop: str | None  # why the run is stopping (Ctrl-C, no resources), or None
    claiming: bool


@dataclass(frozen=True)
class Snapshot:
    """The run as the dispatcher sees it (read by the driver's supervisor)."""

    results: dict[str, dict]  # concept id -> its result row
    progress: dict[str, WorkerProgress]  # worker -> its last report
    pending: int
    leased: int
    deferred: int
    groups: int
    idle_s: float  # since the last call from any worker
    events: list[str] = field(default_factory=list)


def concept_config(spec: ConceptSpec, job_steps: int | None, prefix_logit_bias: float) -> TrainConfig:
    """The recipe for one concept: defaults, then the job's options, then the manifest's overrides."""
    values: dict = {"prefix_logit_bias": prefix_logit_bias}
    if job_steps:
        values["steps"] = job_steps
    values.update(spec.overrides)
    return TrainConfig(save_steps=(), **values)


def to_concept(spec: ConceptSpec, config: TrainConfig, images: list | None = None) -> Concept:
    """The library's Concept for a manifest concept; ``images`` default to the manifest's references."""
    sources = images if images is not None else [ref.data if ref.data is not None else ref.uri for ref in spec.images]
    return Concept(spec.concept_id, sources, spec.class_word, spec.caption, config,
                   image_names=[ref.name for ref in spec.images])
