"""Where things live under an output PREFIX, and which concept ids are valid: the one definition.

    PREFIX/residuals/<concept_id>.safetensors    one trained residual per concept
    PREFIX/runs/<run_id>/results.parquet         one row per concept of a batch run
    PREFIX/runs/<run_id>/parts/<part>.parquet    the same rows, written as concepts finish
    PREFIX/index/images.parquet                  image URI -> (stamp, sha256), recorded when hashed
    PREFIX/index/residuals.parquet               concept id -> (training fingerprint, residual stamp, ...)
    PREFIX/state/<concept_id>/<fingerprint>.pt   an in-flight concept's training state (removed when done)
    PREFIX/claims/<concept_id>.json              which run is training the concept now (removed when done)
    PREFIX/active/<run_id>.json                  a batch run in progress, with a heartbeat (removed at its end)

The index files are caches: an entry is used only while the object it describes still has the
recorded stamp (S3 ETag, or size and mtime for files), so a stale or lost index costs time, never
correctness.

The batch job writes this layout, `catversion serve` and `catversion evaluate` read it, and the
demo shows it. PREFIX is an s3:// URI, a file:// URI or a folder (see `catversion.storage`).
"""

from __future__ import annotations

import re

from . import storage

RESIDUALS_FOLDER = "residuals"
RESIDUAL_SUFFIX = ".safetensors"
RUNS_FOLDER = "runs"
RESULTS_FILE = "results.parquet"
PARTS_FOLDER = "parts"
INDEX_FOLDER = "index"
IMAGE_INDEX_FILE = "images.parquet"
RESIDUAL_INDEX_FILE = "residuals.parquet"
STATE_FOLDER = "state"
STATE_SUFFIX = ".pt"
CLAIMS_FOLDER = "claims"
CLAIM_SUFFIX = ".json"
ACTIVE_FOLDER = "active"
# How help texts and messages show the layout.
RESIDUAL_PATTERN = f"PREFIX/{RESIDUALS_FOLDER}/<concept_id>{RESIDUAL_SUFFIX}"
RESULTS_PATTERN = f"PREFIX/{RUNS_FOLDER}/<run_id>/{RESULTS_FILE}"

MAX_CONCEPT_ID_LENGTH = 128
# Safe as an S3 key part, a file name and a URL path segment; no leading dot, dash or underscore.
CONCEPT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
CONCEPT_ID_RULE = f"1-{MAX_CONCEPT_ID_LENGTH} ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"


def concept_id_problem(concept_id: object) -> str | None:
    """Why ``concept_id`` is not a valid concept id, or None when it is."""
    if not isinstance(concept_id, str) or not concept_id:
        return f"concept_id {concept_id!r} is empty or not a string"
    if CONCEPT_ID_RE.match(concept_id):
        return None
    if len(concept_id) > MAX_CONCEPT_ID_LENGTH:
        return f"concept_id {concept_id[:40]!r}… is {len(concept_id)} characters long; the limit is {MAX_CONCEPT_ID_LENGTH}"
    return f"concept_id {concept_id!r} is not valid: it names the residual file, so use {CONCEPT_ID_RULE}"


def is_concept_id(concept_id: object) -> bool:
    return isinstance(concept_id, str) and CONCEPT_ID_RE.match(concept_id) is not None


def residuals_folder(prefix: str) -> str:
    return storage.join(prefix, RESIDUALS_FOLDER)


def residual_uri(prefix: str, concept_id: str) -> str:
    """``residual_uri("s3://b/run1", "dog-2")`` → ``s3://b/run1/residuals/dog-2.safetensors``."""
    problem = concept_id_problem(concept_id)
    if problem:
        raise ValueError(problem)
    return storage.join(prefix, RESIDUALS_FOLDER, f"{concept_id}{RESIDUAL_SUFFIX}")


def results_uri(prefix: str, run_id: str) -> str:
    return storage.join(prefix, RUNS_FOLDER, run_id, RESULTS_FILE)


def run_folder(prefix: str, run_id: str) -> str:
    return storage.join(prefix, RUNS_FOLDER, run_id)


def parts_folder(prefix: str, run_id: str) -> str:
    return storage.join(prefix, RUNS_FOLDER, run_id, PARTS_FOLDER)


def part_uri(prefix: str, run_id: str, name: str) -> str:
    return storage.join(parts_folder(prefix, run_id), f"{name}.parquet")


def image_index_uri(prefix: str) -> str:
    return storage.join(prefix, INDEX_FOLDER, IMAGE_INDEX_FILE)


def residual_index_uri(prefix: str) -> str:
    return storage.join(prefix, INDEX_FOLDER, RESIDUAL_INDEX_FILE)


def state_folder(prefix: str) -> str:
    return storage.join(prefix, STATE_FOLDER)


def state_uri(prefix: str, concept_id: str, fingerprint: str) -> str:
    """A concept's in-flight training state, keyed by its training fingerprint (``sha256:<hex>``)."""
    residual_uri(prefix, concept_id)  # validates the id
    return storage.join(prefix, STATE_FOLDER, concept_id, fingerprint.split(":")[-1] + STATE_SUFFIX)


def state_concept(prefix: str, uri: str) -> str | None:
    """The concept id of a state object listed under ``state_folder(prefix)``, or None for a foreign object."""
    parts = uri[len(state_folder(prefix)):].strip("/").split("/")
    if len(parts) == 2 and is_concept_id(parts[0]) and parts[1].endswith(STATE_SUFFIX):
        return parts[0]
    return None


def claims_folder(prefix: str) -> str:
    return storage.join(prefix, CLAIMS_FOLDER)


def claim_uri(prefix: str, concept_id: str) -> str:
    residual_uri(prefix, concept_id)  # validates the id
    return storage.join(prefix, CLAIMS_FOLDER, f"{concept_id}{CLAIM_SUFFIX}")


def active_folder(prefix: str) -> str:
    return storage.join(prefix, ACTIVE_FOLDER)


def active_uri(prefix: str, run_id: str) -> str:
    return storage.join(prefix, ACTIVE_FOLDER, f"{run_id}.json")


def residual_concept(prefix: str, uri: str) -> str | None:
    """The concept id of an object listed under ``residuals_folder(prefix)``, or None when it is not a residual."""
    name = uri.rsplit("/", 1)[-1]
    if not name.endswith(RESIDUAL_SUFFIX):
        return None
    concept_id = name[: -len(RESIDUAL_SUFFIX)]
    if is_concept_id(concept_id) and uri == residual_uri(prefix, concept_id):
        return concept_id
    return None


def list_concepts(prefix: str, *, budget: storage.RetryBudget | None = None) -> list[str]:
    """Concept ids that have a residual directly under PREFIX/residuals/, sorted (``budget``: storage.list_uris's).

    Files whose names are not valid concept ids, and files in nested folders, are not residuals
    of this prefix and are left out.
    """
    found = [residual_concept(prefix, uri)
             for uri in storage.list_uris(residuals_folder(prefix), RESIDUAL_SUFFIX, budget=budget)]
    return sorted(c for c in found if c)
