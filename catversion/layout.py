"""Where things live under an output PREFIX, and which concept ids are valid: the one definition.

    PREFIX/residuals/<concept_id>.safetensors    one trained residual per concept
    PREFIX/runs/<run_id>/results.parquet         one row per concept of a batch run

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


def list_concepts(prefix: str) -> list[str]:
    """Concept ids that have a residual directly under PREFIX/residuals/, sorted.

    Files whose names are not valid concept ids, and files in nested folders, are not residuals
    of this prefix and are left out.
    """
    found = []
    for uri in storage.list_uris(residuals_folder(prefix), RESIDUAL_SUFFIX):
        name = uri.rsplit("/", 1)[-1][: -len(RESIDUAL_SUFFIX)]
        if is_concept_id(name) and uri == residual_uri(prefix, name):
            found.append(name)
    return sorted(found)
