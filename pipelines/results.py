"""A batch run's result rows: their columns (docs/contracts.md, "results.parquet"), built and written here."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from catversion import storage

STATUSES = ("ok", "skipped", "failed", "interrupted")
RESULT_SCHEMA = pa.schema([
    ("concept_id", pa.string()), ("status", pa.string()), ("error", pa.string()), ("detail", pa.string()),
    ("residual_uri", pa.string()), ("sha256", pa.string()), ("fingerprint", pa.string()), ("steps", pa.int64()),
    ("final_loss", pa.float64()), ("seconds", pa.float64()), ("residual_stamp", pa.string()),
    ("image_uris", pa.list_(pa.string())), ("image_stamps", pa.list_(pa.string())),
    ("image_sha256s", pa.list_(pa.string())), ("image_problems", pa.list_(pa.string())),
])
RESULT_COLUMNS = tuple(RESULT_SCHEMA.names)


def result_row(concept_id: str, status: str, **values) -> dict:
    """One row: every column, None unless given."""
    unknown = set(values) - set(RESULT_COLUMNS)
    if unknown:
        raise ValueError(f"result rows have no column(s) {sorted(unknown)}")
    row = dict.fromkeys(RESULT_COLUMNS)
    row.update(concept_id=concept_id, status=status, **values)
    return row


def results_parquet(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in RESULT_COLUMNS} for r in rows], schema=RESULT_SCHEMA),
                   sink)
    return sink.getvalue().to_pybytes()


def read_results(uri: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()
