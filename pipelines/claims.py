"""Per-concept claims, so two runs on the same output never train a concept twice.

Claims cost two requests per concept, so a run claims only while another run is active on the
same output. Each run keeps a marker with a heartbeat at PREFIX/active/<run_id>.json. A run that
finds another live marker when it starts claims from the start, and hands out no concept for
`CLAIM_GRACE_S`; a run that sees a new marker appear switches to claiming within seconds, and
first claims every concept it has in flight or is still writing. So whenever two runs overlap,
every concept either of them trains is claimed, and a concept one of them finished before is
found by the other's check for an up-to-date residual, made after claiming.

A claim is a small JSON object at PREFIX/claims/<concept_id>.json, created with a conditional
write (S3 If-None-Match: "*"; atomic in S3): exactly one run gets it. It names the owner run and
carries a heartbeat the owner refreshes (a conditional overwrite, If-Match its last ETag). Another
run that finds the claim leaves the concept to its owner; a claim whose heartbeat is older than
its TTL is taken over, again by a conditional overwrite, so only one taker wins. The owner deletes
the claim once the residual is written. Heartbeats use wall-clock time: hosts need roughly synced
clocks (seconds of skew are fine against a TTL of minutes).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from catversion import layout, storage
from catversion.limits import DEFAULT_CLAIM_TTL_S

CLAIM_GRACE_S = 10.0  # a run that starts next to another waits this long before training anything
MARKER_POLL_S = 2.0  # how often a run looks for other runs on its output


@dataclass
class Held:
    """Another run holds the claim."""

    owner: str
    age_s: float  # seconds since its last heartbeat


class Claims:
    """The claims one worker of run ``run_id`` holds, with a heartbeat thread refreshing them."""

    def __init__(self, output: str, run_id: str, ttl_s: float = DEFAULT_CLAIM_TTL_S,
                 budget: storage.RetryBudget = storage.LONG_BUDGET):
        self.output, self.run_id, self.ttl_s, self.budget = output, run_id, float(ttl_s), budget
        self._held: dict[str, tuple[str, str]] = {}  # concept id -> (fingerprint, stamp of our claim object)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self, concept_id: str, fingerprint: str) -> bytes:
        return json.dumps({"concept_id": concept_id, "run_id": self.run_id, "fingerprint": fingerprint,
                           "heartbeat": time.time(), "ttl_s": self.ttl_s}).encode()

    def acquire(self, concept_id: str, fingerprint: str) -> Held | None:
        """None when this run now holds the claim, else who does. Raises StorageError."""
        uri = layout.claim_uri(self.output, concept_id)
        for _ in range(3):
            try:
                info = storage.write_bytes(uri, self._body(concept_id, fingerprint), budget=self.budget, if_absent=True)
                self._keep(concept_id, fingerprint, info.stamp)
                return None
            except storage.AlreadyExistsError:
                pass
            try:
                data, info = storage.read_object(uri, budget=self.budget)
            except storage.NotFoundError:
                continue  # released in between: try to create it again
            try:
                claim = json.loads(data)
                owner, heartbeat = str(claim["run_id"]), float(claim["heartbeat"])
                ttl = float(claim.get("ttl_s", self.ttl_s))
            except (ValueError, KeyError, TypeError):
                owner, heartbeat, ttl = "<unreadable claim>", 0.0, 0.0
            age = time.time() - heartbeat
            if owner != self.run_id and age <= max(ttl, self.ttl_s):
                return Held(owner, age)
            # Ours from before a worker restart, or stale: take it over (only one taker's If-Match wins).
            try:
                new = storage.write_bytes(uri, self._body(concept_id, fingerprint), budget=self.budget,
                                          if_match=info.stamp)
            except storage.ConditionFailedError:
                continue
            except storage.NotFoundError:
                continue
            self._keep(concept_id, fingerprint, new.stamp)
            return None
        data, _ = storage.read_object(uri, budget=self.budget)
        return Held(str(json.loads(data).get("run_id", "?")), 0.0)

    def _keep(self, concept_id: str, fingerprint: str, stamp: str) -> None:
        with self._lock:
            self._held[concept_id] = (fingerprint, stamp)

    def holds(self, concept_id: str) -> bool:
        with self._lock:
            return concept_id in self._held

    def release(self, concept_id: str) -> None:
        """Delete our claim (once the residual is written, or the concept failed)."""
        with self._lock:
            held = self._held.pop(concept_id, None)
        if held is None:
            return
        try:
            storage.delete(layout.claim_uri(self.output, concept_id), budget=self.budget, if_match=held[1])
        except storage.StorageError:
            pass  # taken over meanwhile, or the store is down: the claim then expires by its TTL

    def heartbeat(self) -> None:
        """Refresh every held claim once."""
        with self._lock:
            held = dict(self._held)
        for concept_id, (fingerprint, stamp) in held.items():
            uri = layout.claim_uri(self.output, concept_id)
            try:
                info = storage.write_bytes(uri, self._body(concept_id, fingerprint), budget=self.budget, if_match=stamp)
            except storage.StorageError:
                continue  # lost to a taker (we were too slow) or the store is down; the next beat retries
            with self._lock:
                if concept_id in self._held:
                    self._held[concept_id] = (fingerprint, info.stamp)

    def start(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                self.heartbeat()

        self._thread = threading.Thread(target=beat, name="claims-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def release_leftovers(output: str, run_id: str, concept_ids: list[str], budget: storage.RetryBudget) -> list[str]:
    """Delete the claims run ``run_id`` still holds on these concepts (its workers died, or the store
    was down when they tried), so a rerun need not wait for them to expire. Best effort: returns why
    each claim that could not be looked at or released was not (they expire after their TTL)."""
    from concurrent.futures import ThreadPoolExecutor

    def release(concept_id: str) -> str | None:
        if not layout.is_concept_id(concept_id):  # only a valid id can have a claim (or a path)
            return None
        uri = layout.claim_uri(output, concept_id)
        try:
            data, info = storage.read_object(uri, budget=budget)
            if json.loads(data).get("run_id") == run_id:
                storage.delete(uri, budget=budget, if_match=info.stamp)
        except storage.NotFoundError:
            return None
        except storage.ConditionFailedError:
            return None  # taken over by another run meanwhile: no longer ours
        except (storage.StorageError, ValueError) as exc:
            return f"{concept_id}: {exc}"
        return None

    if not concept_ids:
        return []
    with ThreadPoolExecutor(max_workers=16) as pool:
        return [problem for problem in pool.map(release, concept_ids) if problem]


class RunMarker:
    """This run's marker under PREFIX/active/, kept fresh by a heartbeat thread (driver side). Another run's
    marker whose heartbeat is older than its TTL belongs to a run that died: it is reported through ``log``
    (once) and removed, never counted as an active run."""

    def __init__(self, output: str, run_id: str, ttl_s: float, budget: storage.RetryBudget,
                 log: Callable[[str], None] = lambda line: None):
        self.output, self.run_id, self.ttl_s, self.budget, self.log = output, run_id, float(ttl_s), budget, log
        self.uri = layout.active_uri(output, run_id)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: set[str] = set()  # dead markers already logged (removing them failed)

    def _write(self) -> None:
        body = {"run_id": self.run_id, "heartbeat": time.time(), "ttl_s": self.ttl_s}
        storage.write_bytes(self.uri, json.dumps(body).encode(), budget=self.budget)

    def start(self) -> None:
        self._write()

        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    self._write()
                except storage.StorageError:
                    pass

        self._thread = threading.Thread(target=beat, name="run-marker", daemon=True)
        self._thread.start()

    def others(self) -> list[str]:
        """Other runs on this output whose heartbeat is fresh; the markers of dead ones are removed."""
        live = []
        for info in storage.list_objects(layout.active_folder(self.output), layout.CLAIM_SUFFIX, budget=self.budget):
            if info.uri == self.uri:
                continue
            try:
                marker = json.loads(storage.read_bytes(info.uri, budget=self.budget))
                run_id, heartbeat = str(marker["run_id"]), float(marker["heartbeat"])
                ttl = max(float(marker.get("ttl_s", 0)), self.ttl_s)
            except (storage.NotFoundError, ValueError, KeyError, TypeError):
                continue
            age = time.time() - heartbeat
            if age <= ttl:
                live.append(run_id)
            else:
                self._remove_dead(info, run_id, age, ttl)
        return live

    def _remove_dead(self, info: storage.ObjectInfo, run_id: str, age: float, ttl: float) -> None:
        dead = f"run {run_id} is dead: its marker {info.uri} had no heartbeat for {age:.0f} s (TTL {ttl:g} s)"
        try:
            # Only the marker as listed: one whose run came back and beat since is left alone.
            storage.delete(info.uri, budget=self.budget, if_match=info.stamp)
        except storage.ConditionFailedError:
            return
        except storage.StorageError as exc:
            if info.uri not in self._reported:
                self._reported.add(info.uri)
                self.log(f"[batch {self.run_id}] {dead}; not counted as active, but its marker could not be "
                         f"removed ({exc})")
            return
        self.log(f"[batch {self.run_id}] {dead}; not counted as active, marker removed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            storage.delete(self.uri, budget=self.budget)
        except storage.StorageError as exc:
            self.log(f"[batch {self.run_id}] warning: could not remove this run's marker ({exc}); other runs "
                     f"will take it for a dead run's after {self.ttl_s:g} s")
