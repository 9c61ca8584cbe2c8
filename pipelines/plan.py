"""Deciding what a batch run must do, in O(N/1000) storage requests for N concepts.

The rule is exact and unchanged: a concept is up to date when its residual carries the training
fingerprint of its current inputs (`recipe.training_fingerprint`: the images' sha256, the recipe,
the base model). What is cheap is learning those facts without reading every object:

- image sha256s come from PREFIX/index/images.parquet, an entry used only while the image's listing
  still shows the recorded stamp (S3 ETag, or size+mtime of a file). Images are listed, never
  fetched: a listing returns 1,000 objects per request. Inline image bytes are hashed as read.
- residual fingerprints come from PREFIX/index/residuals.parquet, used only while the residual's
  listing shows the recorded stamp.

Whatever the indexes cannot answer (a fresh image, a residual written by an older version) is left
to the workers, which fetch and hash the images anyway to train: then a concept found up to date
there is still skipped and never trained twice. The indexes are caches: losing one costs time only.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from catversion import layout, storage
from catversion.recipe import TrainingTarget, training_fingerprint

from .manifest import ConceptSpec, ImageRef

# problem: why the image cannot be used (it does not decode), so a rerun rejects it without fetching it again.
IMAGE_INDEX_SCHEMA = pa.schema([("uri", pa.string()), ("stamp", pa.string()), ("sha256", pa.string()),
                                ("problem", pa.string())])
# run_id: the run that trained the residual (absent from indexes written before it was recorded).
RESIDUAL_INDEX_SCHEMA = pa.schema([("concept_id", pa.string()), ("stamp", pa.string()), ("fingerprint", pa.string()),
                                   ("sha256", pa.string()), ("steps", pa.int64()), ("final_loss", pa.float64()),
                                   ("run_id", pa.string())])


@dataclass
class Listing:
    """What listings and the indexes say about a run's inputs and outputs."""

    image_stamps: dict[str, str] = field(default_factory=dict)  # image uri -> stamp, for every listed image
    listed_roots: list[str] = field(default_factory=list)  # prefixes listed completely: absent there = missing
    image_index: dict[str, tuple[str, str, str | None]] = field(default_factory=dict)  # uri -> (stamp, sha256, problem)
    residuals: dict[str, str] = field(default_factory=dict)  # concept id -> residual stamp
    residual_index: dict[str, dict] = field(default_factory=dict)  # concept id -> index row
    states: dict[str, list[str]] = field(default_factory=dict)  # concept id -> state object URIs
    requests: int = 0  # listing and index reads made
    warnings: list[str] = field(default_factory=list)

    def image_missing(self, uri: str) -> bool:
        return uri not in self.image_stamps and any(uri.startswith(root) for root in self.listed_roots)

    def _known(self, ref: ImageRef) -> tuple[str, str, str | None] | None:
        stamp, known = self.image_stamps.get(ref.uri), self.image_index.get(ref.uri)
        return known if stamp is not None and known is not None and known[0] == stamp else None

    def image_sha256(self, ref: ImageRef) -> str | None:
        if ref.digest is not None:  # inline bytes
            return ref.digest
        known = self._known(ref)
        return known[1] if known else None

    def image_problem(self, ref: ImageRef) -> str | None:
        """Why an unchanged image was found unusable when it was last fetched (None: fine or unknown)."""
        known = self._known(ref) if ref.uri is not None else None
        return known[2] if known else None

    def residual_fingerprint(self, concept_id: str) -> str | None:
        entry = self.residual_index.get(concept_id)
        stamp = self.residuals.get(concept_id)
        return entry["fingerprint"] if entry and stamp is not None and entry["stamp"] == stamp else None


def listing_roots(uris: Iterable[str]) -> list[str]:
    """The few prefixes whose listings cover every image: per S3 bucket and top-level folder, the
    longest common folder of its keys; per local top-level folder likewise."""
    groups: dict[tuple[str, str], list[str]] = {}
    for uri in uris:
        if storage.is_s3(uri):
            bucket, key = storage.split_s3(uri)
            groups.setdefault(("s3://" + bucket + "/", key.split("/", 1)[0]), []).append(key)
    roots = []
    for (base, _), keys in groups.items():
        folder = os.path.commonprefix(keys)
        folder = folder[: folder.rfind("/") + 1] if "/" in folder else ""
        if not folder and len(keys) == 1:
            folder = keys[0]  # a single object at the bucket's top level: list just it
        roots.append(base + folder)
    return sorted(roots)


def gather(output: str, concepts: list[ConceptSpec], budget: storage.RetryBudget,
           log: Callable[[str], None]) -> Listing:
    listing = Listing()
    uris = {ref.uri for spec in concepts for ref in spec.images if ref.uri is not None}
    s3_uris = [u for u in uris if storage.is_s3(u)]
    for root in listing_roots(s3_uris):
        try:
            found = storage.list_objects(root, budget=budget)
        except storage.StorageError as exc:
            listing.warnings.append(f"cannot list images under {root} ({exc}); their sha256 will be computed by "
                                    "the workers, which needs s3:ListBucket for cheap reruns")
            continue
        listing.requests += max(1, len(found) // 1000 + 1)
        listing.listed_roots.append(root)
        listing.image_stamps.update((info.uri, info.stamp) for info in found)
    for uri in uris - set(s3_uris):  # local files: a stat each (no request)
        info = storage.stat(uri)
        if info is not None:
            listing.image_stamps[uri] = info.stamp
        else:
            listing.listed_roots.append(uri)
    listing.image_index = {row["uri"]: (row["stamp"], row["sha256"], row.get("problem"))
                           for row in _read_index(layout.image_index_uri(output), budget, listing)}
    for info in _list(layout.residuals_folder(output), layout.RESIDUAL_SUFFIX, budget, listing):
        concept_id = layout.residual_concept(output, info.uri)
        if concept_id:
            listing.residuals[concept_id] = info.stamp
    listing.residual_index = {row["concept_id"]: row
                              for row in _read_index(layout.residual_index_uri(output), budget, listing)}
    for info in _list(layout.state_folder(output), layout.STATE_SUFFIX, budget, listing):
        concept_id = layout.state_concept(output, info.uri)
        if concept_id:
            listing.states.setdefault(concept_id, []).append(info.uri)
    for warning in listing.warnings:
        log(f"warning: {warning}")
    return listing


def _list(prefix: str, suffix: str, budget: storage.RetryBudget, listing: Listing) -> list[storage.ObjectInfo]:
    found = storage.list_objects(prefix, suffix, budget=budget)
    listing.requests += len(found) // 1000 + 1
    return found


def _read_index(uri: str, budget: storage.RetryBudget, listing: Listing) -> list[dict]:
    listing.requests += 1
    try:
        data = storage.read_bytes(uri, budget=budget)
    except storage.NotFoundError:
        return []
    try:
        return pq.read_table(io.BytesIO(data)).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        listing.warnings.append(f"index {uri} is unreadable ({exc}); it will be rebuilt")
        return []


def up_to_date_row(output: str, concept_id: str, listing: Listing, fingerprint: str) -> dict:
    """The result row of a concept planning found up to date (its residual's index entry matches)."""
    from .results import result_row

    entry = listing.residual_index[concept_id]
    trained_by = entry.get("run_id")
    return result_row(concept_id, "skipped", detail=f"up to date (trained by run {trained_by})" if trained_by else
                      "up to date", residual_uri=layout.residual_uri(output, concept_id), sha256=entry["sha256"],
                      fingerprint=fingerprint, steps=entry["steps"], final_loss=entry["final_loss"],
                      residual_stamp=entry["stamp"])


def fingerprint_of(concept, spec: ConceptSpec, listing: Listing, target: TrainingTarget) -> str | None:
    """The concept's training fingerprint when every image's sha256 is known without fetching it."""
    digests = [listing.image_sha256(ref) for ref in spec.images]
    if any(d is None for d in digests):
        return None
    return training_fingerprint(concept, digests, target)


# ---- writing the indexes -----------------------------------------------------------------------


def update_indexes(output: str, listing: Listing, rows: list[dict], budget: storage.RetryBudget,
                   run_id: str | None = None) -> None:
    """Merge what this run (``run_id``) learned (image hashes, residual fingerprints) into the index files.

    Two runs finishing at once may each drop the other's new entries: those become cache misses.
    """
    images = dict(listing.image_index)
    residuals = dict(listing.residual_index)
    for row in rows:
        problems = row.get("image_problems") or [None] * len(row.get("image_uris") or [])
        for uri, stamp, sha, problem in zip(row.get("image_uris") or [], row.get("image_stamps") or [],
                                            row.get("image_sha256s") or [], problems):
            if uri and stamp and sha:
                images[uri] = (stamp, sha, problem)
        if row["status"] in ("ok", "skipped") and row.get("residual_stamp") and row.get("fingerprint"):
            known = residuals.get(row["concept_id"]) or {}
            trained_by = run_id if row["status"] == "ok" else (
                known.get("run_id") if known.get("stamp") == row["residual_stamp"] else None)
            residuals[row["concept_id"]] = {
                "concept_id": row["concept_id"], "stamp": row["residual_stamp"], "fingerprint": row["fingerprint"],
                "sha256": row["sha256"], "steps": row["steps"], "final_loss": row["final_loss"], "run_id": trained_by,
            }
    if images != listing.image_index:
        table = pa.Table.from_pylist([{"uri": u, "stamp": s, "sha256": h, "problem": p}
                                      for u, (s, h, p) in sorted(images.items())],
                                     schema=IMAGE_INDEX_SCHEMA)
        storage.write_bytes(layout.image_index_uri(output), _parquet(table), budget=budget)
    if residuals != listing.residual_index:
        table = pa.Table.from_pylist([residuals[c] for c in sorted(residuals)], schema=RESIDUAL_INDEX_SCHEMA)
        storage.write_bytes(layout.residual_index_uri(output), _parquet(table), budget=budget)


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
