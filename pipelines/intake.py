"""A batch worker's input side: lease concepts, fetch and hash their images, claim them, skip those already
up to date, and find their saved training state, all ahead of training.

`Intake.concepts()` is the trainer's concept source (it runs on the trainer's prefetch thread); each
leased concept is prepared on a fetch thread (the only time in the run its images are fetched). A
concept settled here (its images are missing, it is up to date, another run holds it) is recorded
through the `OutcomeSink` and never reaches the trainer.

Concepts of other patched layers need another trainer: `concepts(layers)` yields only leases of one layer set
and keeps the first lease of another for the next round (`next_layers`), whose fingerprints use that set.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from catversion import layout, storage
from catversion.images import ImageError, fetch_image
from catversion.recipe import Concept, TrainingTarget, image_digest, layers_key, training_fingerprint

from .claims import Claims
from .control import Held, Holdings, WorkerControl
from .manifest import confinement_problem
from .outcomes import OutcomeSink
from .results import result_row
from .work import Lease, LeaseAnswer, WorkerConfig, concept_config, to_concept

FETCH_THREADS = 8
ANY_LAYERS = object()  # concepts(): every leased concept, whatever its layers
DONE = object()  # next_layers(): nothing is left for this worker
CLAIM_RETRY_S = 5.0  # a concept claimed by another run is looked at again after this long


class Settled(Exception):
    """The concept's outcome is recorded (or it is left to another run): it is not trained here."""


class Intake:
    def __init__(self, config: WorkerConfig, calls, token: str, worker: str, target: TrainingTarget, claims: Claims,
                 holdings: Holdings, sink: OutcomeSink, control: WorkerControl, lease_size: int,
                 budget: storage.RetryBudget):
        self.config, self.calls, self.token, self.worker, self.target = config, calls, token, worker, target
        self.claims, self.holdings, self.sink, self.control = claims, holdings, sink, control
        self.lease_size, self.budget = max(1, lease_size), budget
        self.output, self.run_id = config.batch.output, config.run_id
        self._resume_states: dict[str, bytes] = {}
        self._pool = ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="fetch")
        self._kept: LeaseAnswer | None = None  # leased, of other layers than the round that took it: the next round's

    # ---- the trainer's side ----------------------------------------------------------------------
    def concepts(self, layers=ANY_LAYERS) -> Iterator[Concept]:
        """Leased concepts, ready to decode, until the dispatcher has none left for this worker; with
        ``layers`` (a `PlannedConcept.layers` value), only until a lease answer brings another layer set,
        which is kept for the next call."""
        while True:
            answer = self._next_answer()
            if answer is None:
                return
            if layers is not ANY_LAYERS and answer.leases[0].concept.layers != layers:
                self._kept = answer
                return
            for future in [self._pool.submit(self.prepare, lease) for lease in answer.leases]:
                concept = future.result()
                if concept is not None:
                    yield concept

    def next_layers(self):
        """The layers (`PlannedConcept.layers`) of the next concepts this worker trains, leasing them now; DONE
        when the dispatcher has none left for it."""
        answer = self._next_answer()
        if answer is None:
            return DONE
        self._kept = answer
        return answer.leases[0].concept.layers

    def _next_answer(self) -> LeaseAnswer | None:
        """The kept lease answer, else the next one with leases (every answer holds one layer set); None when
        nothing is left."""
        if self._kept is not None:
            answer, self._kept = self._kept, None
            return answer
        while True:
            answer = self.calls.lease(self.token, self.lease_size, self.worker)
            self.control.follow(answer.claiming)
            if answer.exhausted:
                return None
            if answer.leases:
                return answer
            time.sleep(answer.wait_s)  # nothing yet: deferred concepts, or the start-up hold

    def target_of(self, lease: Lease) -> TrainingTarget:
        """What the concept trains against: the worker's target, with the lease's layers when it names them."""
        layers = lease.concept.layers
        return self.target if layers is None else replace(self.target, layers=layers_key(layers))

    def resume(self, concept: Concept, fingerprint: str) -> bytes | None:
        """The trainer's resume callback: the saved state found for the concept, once."""
        return self._resume_states.pop(concept.concept_id, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- one concept (on a fetch thread) ---------------------------------------------------------
    def prepare(self, lease: Lease) -> Concept | None:
        """The concept ready to train, or None when it is settled here."""
        try:
            concept, facts = self._fetch(lease)
            self._check_and_hold(lease, concept, facts)
        except Settled:
            return None
        return concept

    def _record(self, lease: Lease, status: str, **values) -> Settled:
        self.sink.record(lease.index, result_row(lease.concept.concept_id, status, **values))
        return Settled()

    def _fetch(self, lease: Lease) -> tuple[Concept, dict]:
        """Fetch and hash the images: the concept and its result-row facts (fingerprint, images)."""
        spec = lease.concept.spec
        try:
            config = concept_config(spec, self.config.batch.steps, self.config.batch.prefix_logit_bias)
        except ValueError as exc:
            raise self._record(lease, "failed", error=str(exc)) from None
        images, stamps = [], []
        for ref in spec.images:
            if ref.data is not None:
                images.append(ref.data)
                stamps.append(None)
                continue
            if (problem := confinement_problem(ref)) is not None:  # the manifest's folder rule, again at the read
                raise self._record(lease, "failed", error=problem)
            try:  # refused unread when it is not a regular file or is over MAX_IMAGE_BYTES
                data, info = fetch_image(ref.uri, ref.name, budget=self.budget)
            except ImageError as exc:
                raise self._record(lease, "failed", error=str(exc)) from None
            images.append(data)
            stamps.append(info.stamp)
        concept = to_concept(spec, config, images)
        digests = [ref.digest or image_digest(data) for ref, data in zip(spec.images, images)]
        fingerprint = training_fingerprint(concept, digests, self.target_of(lease))
        return concept, {"fingerprint": fingerprint, "image_uris": [ref.uri for ref in spec.images],
                         "image_stamps": stamps, "image_sha256s": digests}

    def _check_and_hold(self, lease: Lease, concept: Concept, facts: dict) -> None:
        """Claim (when claiming), skip if up to date, load the saved state, then hold it for training."""
        concept_id, fingerprint = concept.concept_id, facts["fingerprint"]
        try:
            claiming = self.holdings.claiming
            if claiming:
                self._claim(lease, fingerprint, facts)
            # Solo, a residual can only exist where planning saw one (or this run wrote it before a
            # restart); with another run active, one may have landed since: look after claiming.
            planned = lease.concept
            if claiming or planned.residual_stamp is not None or lease.attempt > 0 or lease.deferred:
                self._skip_if_up_to_date(lease, fingerprint, facts)
            stale = self._load_state(lease, fingerprint)
        except storage.StorageError as exc:
            self.claims.release(concept_id)
            raise self._record(lease, "failed", error=str(exc), **facts) from None
        held = Held(lease, fingerprint, facts, stale, has_state=concept_id in self._resume_states)
        if self.holdings.add(held) and not self.claims.holds(concept_id):
            self._claim_after_switch(lease, fingerprint, facts)

    def _claim(self, lease: Lease, fingerprint: str, facts: dict) -> None:
        """Claim the concept, or settle it: deferred while another run trains it, skipped after claim_wait_s."""
        held_by = self.claims.acquire(lease.concept.concept_id, fingerprint)
        if held_by is None:
            return
        waited = lease.deferred.waited_s if lease.deferred else 0.0
        if waited >= self.config.batch.claim_wait_s:
            raise self._record(lease, "skipped", detail=(
                f"claimed by run {held_by.owner}, which was still training it after {waited:.0f} s"), **facts)
        self.calls.defer(lease.index, held_by.owner, CLAIM_RETRY_S, time.time() - waited)
        raise Settled()

    def _skip_if_up_to_date(self, lease: Lease, fingerprint: str, facts: dict) -> None:
        """Settle the concept when its residual already carries this fingerprint (called holding its claim,
        when claiming: a residual a concurrent run wrote before releasing its claim is seen here)."""
        found = self._existing_residual(lease, fingerprint)
        if found is None:
            return
        concept_id = lease.concept.concept_id
        self.claims.release(concept_id)
        residual, stamp = found
        trained_by = residual.meta.get("run_id")
        status = "ok" if trained_by == self.run_id else "skipped"  # ours: written just before a worker restart
        detail = "up to date" if trained_by in (None, self.run_id) else f"up to date (trained by run {trained_by})"
        self.sink.record(lease.index, result_row(
            concept_id, status, detail=detail, residual_uri=layout.residual_uri(self.output, concept_id),
            sha256=residual.sha256, steps=residual.meta.get("steps"), final_loss=residual.meta.get("final_loss"),
            residual_stamp=stamp, **facts))
        if trained_by == self.run_id:
            # Written by this run's worker that died before deleting the concept's saved state (a lost
            # node): the state is of no use now.
            for uri in {layout.state_uri(self.output, concept_id, fingerprint), *lease.concept.states}:
                try:
                    storage.delete(uri, budget=self.budget)
                except storage.StorageError:
                    pass
        raise Settled()

    def _existing_residual(self, lease: Lease, fingerprint: str):
        """(residual, stamp) already written for this concept when it is up to date, else None."""
        from catversion.residual import Residual, ResidualFormatError

        uri = layout.residual_uri(self.output, lease.concept.concept_id)
        info = storage.stat(uri, budget=self.budget)
        if info is None:
            return None
        planned = lease.concept
        if info.stamp == planned.residual_stamp and planned.residual_fingerprint not in (None, fingerprint):
            return None  # unchanged since planning, and known to be out of date
        try:
            data, info = storage.read_object(uri, budget=self.budget)
            residual = Residual.load(data)
        except (storage.NotFoundError, ResidualFormatError):
            return None
        return (residual, info.stamp) if residual.meta.get("training_fingerprint") == fingerprint else None

    def _load_state(self, lease: Lease, fingerprint: str) -> list[str]:
        """Read the concept's saved state for the trainer (if it may have one); returns the stale states
        (of older fingerprints) to delete once it is done."""
        concept_id = lease.concept.concept_id
        state_uri = layout.state_uri(self.output, concept_id, fingerprint)
        if lease.attempt > 0 or state_uri in lease.concept.states:
            try:
                self._resume_states[concept_id] = storage.read_bytes(state_uri, budget=self.budget)
            except storage.NotFoundError:
                pass
        return [uri for uri in lease.concept.states if uri != state_uri]

    def _claim_after_switch(self, lease: Lease, fingerprint: str, facts: dict) -> None:
        """Claiming began while the concept was being prepared: claim it now, or give it up."""
        concept_id = lease.concept.concept_id

        def give_up() -> None:
            self.holdings.drop(concept_id)
            self._resume_states.pop(concept_id, None)

        try:
            self._claim(lease, fingerprint, facts)
            if self._existing_residual(lease, fingerprint) is not None:
                self.claims.release(concept_id)
                self.calls.defer(lease.index, self.run_id, 0.0, time.time())  # look again: now up to date
                raise Settled()
        except Settled:
            give_up()
            raise
        except storage.StorageError as exc:
            give_up()
            self.claims.release(concept_id)
            raise self._record(lease, "failed", error=str(exc), **facts) from None
