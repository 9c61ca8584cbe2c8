"""The batch manifest (one parquet row per training image) and its validation into concepts.

The schema is defined here once (docs/contracts.md, "The manifest"). A concept that breaks it is rejected
by name with every reason, never trained on fewer images than the user gave, and never stops the rest.
A manifest is input from whoever wrote it: its local image paths are confined to its own folder and the
folders the operator allows, checked here and again just before a worker reads the file.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from catversion import layout, storage
from catversion.images import ImageError, decode_image, read_source
from catversion.families import parse_layers
from catversion.recipe import TrainConfig, format_layers, image_digest

# \Z rather than $: "$" also matches before a trailing newline, and the id names a file.
REQUIRED_COLUMNS = ("concept_id", "class_word")
IMAGE_COLUMNS = ("image_uri", "image_bytes")  # each row gives exactly one of them
# layers: the text-encoder layers the residual patches, "9,10,11" or "8,9,10;28,29,30" (one group per encoder);
# checked here for its syntax, against the base model's encoders by the batch driver (pipelines/batch.py).
OVERRIDE_COLUMNS: dict[str, type] = {"caption": str, "steps": int, "learning_rate": float, "batch_size": int, "seed": int,
                                     "layers": str}
KNOWN_COLUMNS = (*REQUIRED_COLUMNS, *IMAGE_COLUMNS, *OVERRIDE_COLUMNS)
PANDAS_INDEX_PREFIX = "__index_level_"  # pandas' to_parquet writes an unnamed non-default index so: not data
# CLIP reads at most 77 tokens (75 between its start and end tokens), and its byte-level BPE never makes
# more tokens than a text has UTF-8 bytes, so a class word within this many bytes takes at most 48 tokens
# and leaves at least 27 for the rest of a caption or prompt ("a photo of a {} on a beach"). Checked in
# bytes, without loading a tokenizer (docs/contracts.md, "The manifest").
MAX_CLASS_WORD_BYTES = 48
# The folders (os.pathsep-separated) whose images any manifest may name, besides its own folder: the
# setting behind `catversion batch --allow-images-under DIR`, for every command that reads a manifest.
ALLOW_IMAGES_ENV = "CATVERSION_ALLOW_IMAGES_UNDER"
ALLOW_IMAGES_FLAG = "--allow-images-under"

# read_manifest's provenance columns: which source file (index into the sources) and which row of it.
SOURCE_COLUMN = "__manifest_source__"
ROW_COLUMN = "__manifest_row__"

_EXPECTED = {str: "a string", int: "an integer", float: "a number"}
_MAX_ROWS_NAMED = 10  # a reason lists at most this many rows, then counts the rest


class ManifestError(ValueError):
    """The manifest as a whole is unusable (not found, not parquet, a required column missing or mistyped)."""


@dataclass
class ImageRef:
    name: str  # for messages: the resolved URI, or "<manifest uri>#row<N>" for inline bytes
    uri: str | None  # resolved URI to fetch at training time; None when inline
    data: bytes | None  # the inline image_bytes; None for a URI
    digest: str | None = None  # training.image_digest of the bytes, once validation has checked the image
    root: str | None = None  # a local image: the folder (real path) validation confined it to; read only inside it


@dataclass
class ConceptSpec:
    concept_id: str
    class_word: str
    images: list[ImageRef]
    caption: str | None = None
    overrides: dict[str, int | float] = field(default_factory=dict)  # only the given ones: steps, learning_rate, batch_size, seed
    layers: tuple[tuple[int, ...], ...] | None = None  # the layers column, one group per text encoder; None: the run's

    def to_row(self) -> dict:
        """A flat row of Arrow-friendly values (for a Ray Dataset); ``from_row`` inverts it."""
        return {
            "concept_id": self.concept_id,
            "class_word": self.class_word,
            "caption": self.caption,
            "overrides": json.dumps(self.overrides, sort_keys=True),
            "layers": None if self.layers is None else format_layers(self.layers),
            "image_names": [image.name for image in self.images],
            "image_uris": [image.uri for image in self.images],
            "image_data": [image.data for image in self.images],
            "image_digests": [image.digest for image in self.images],
            "image_roots": [image.root for image in self.images],
        }

    @classmethod
    def from_row(cls, row: dict) -> ConceptSpec:
        # Ray may hand list columns back as numpy arrays: accept any sequence.
        columns = (row["image_names"], row["image_uris"], row["image_data"], row["image_digests"], row["image_roots"])
        images = [ImageRef(str(name), _optional(uri, str), _optional(data, bytes), _optional(digest, str),
                           _optional(root, str))
                  for name, uri, data, digest, root in zip(*columns, strict=True)]
        overrides, layers = row["overrides"], row.get("layers")
        return cls(
            concept_id=str(row["concept_id"]),
            class_word=str(row["class_word"]),
            images=images,
            caption=_optional(row["caption"], str),
            overrides=json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {}),
            layers=None if layers is None else parse_layers(str(layers)),
        )


@dataclass
class ManifestReport:
    sources: list[str]  # the parquet files read
    rows: int
    concepts: list[ConceptSpec]  # the valid concepts, in order of first appearance
    problems: dict[str, list[str]]  # concept id as given (or "<row N of SRC>" when it has none) -> every reason
    images_checked: bool = True  # whether every image was fetched and decoded
    warnings: list[str] = field(default_factory=list)  # about the manifest as a whole (e.g. unknown columns)

    @property
    def rejected(self) -> list[str]:
        return list(self.problems)

    def to_dict(self) -> dict:
        """The machine-readable report (`catversion batch --validate-only --json`)."""
        return {
            "manifest": list(self.sources), "rows": self.rows, "ok": bool(self.concepts) and not self.problems,
            "valid": [concept.concept_id for concept in self.concepts],
            "images": sum(len(concept.images) for concept in self.concepts),
            "rejected": dict(self.problems), "images_checked": self.images_checked, "warnings": list(self.warnings),
        }

    def format(self) -> str:
        total = len(self.concepts) + len(self.problems)
        images = sum(len(concept.images) for concept in self.concepts)
        shown = ", ".join(self.sources[:5]) + (f", and {len(self.sources) - 5} more" if len(self.sources) > 5 else "")
        lines = [
            f"manifest: {_count(len(self.sources), 'file')}: {shown}",
            f"rows: {self.rows}; concepts: {total} ({len(self.concepts)} valid with {_count(images, 'image')}, "
            f"{len(self.problems)} rejected)",
            "images: fetched and decoded" if self.images_checked else "images: not checked (not fetched or decoded)",
        ]
        lines += [f"warning: {warning}" for warning in self.warnings]
        for concept_id, reasons in self.problems.items():
            lines.append(f"rejected concept {concept_id!r}:")
            lines += [f"  - {reason}" for reason in reasons]
        if not total:
            lines.append("verdict: FAILED, the manifest lists no concept")
        elif not self.concepts:
            lines.append(f"verdict: FAILED, all {_count(total, 'concept')} rejected; nothing would train")
        elif self.problems:
            lines.append(f"verdict: REJECTED {len(self.problems)} of {total} concepts; only the other "
                         f"{len(self.concepts)} would train")
        else:
            lines.append(f"verdict: OK, all {_count(total, 'concept')} valid")
        return "\n".join(lines)


def manifest_sources(uri: str | list[str]) -> list[str]:
    """The parquet files named: a file, a list of them, or a folder/prefix (every *.parquet under it, sorted)."""
    given = [uri] if isinstance(uri, str) else [str(one) for one in uri]
    if not given:
        raise ManifestError("no manifest given")
    sources: list[str] = []
    for one in given:
        sources += [source for source in _expand(one) if source not in sources]
    return sources


def read_manifest(uri: str | list[str]) -> tuple[pa.Table, list[str]]:
    """All the manifest's rows in one table, plus SOURCE_COLUMN/ROW_COLUMN naming where each came from.

    A column missing from one file reads as nulls there.
    """
    sources = manifest_sources(uri)
    tables = []
    for index, source in enumerate(sources):
        table = _read_parquet(source)
        _check_schema(table.schema, source)
        tables.append(table.append_column(SOURCE_COLUMN, pa.array([index] * table.num_rows, pa.int32()))
                      .append_column(ROW_COLUMN, pa.array(range(table.num_rows), pa.int64())))
    try:
        return pa.concat_tables(tables, promote_options="permissive"), sources
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ManifestError(f"the manifest files {', '.join(sources)} give a column different types ({exc}); "
                            "use one type per column in every file") from exc


ImageChecker = Callable[[list[ImageRef]], list[tuple[str | None, str | None]]]


def validate_manifest(uri: str | list[str], check_images: bool = True, max_workers: int = 16,
                      checker: ImageChecker | None = None, allowed_roots: Sequence[str] | None = None,
                      strict: bool = False) -> ManifestReport:
    """Group the manifest's rows into concepts, keep the valid ones and say why each other one was rejected.

    Without ``check_images`` this reads only the parquet files: schema, ids, class words and
    hyper-parameters are checked and inline images hashed; nothing is fetched (the batch driver's
    mode: its workers fetch, decode and hash each image once). With ``check_images`` every image is
    also fetched, fully decoded and hashed: by ``checker`` (a function from image refs to
    ``(sha256, problem)`` each, e.g. one that fans out over a Ray cluster), else by a local pool of
    ``max_workers`` threads.

    A local image path (absolute, file:// or relative, with symlinks and ``..`` followed) must lie in the
    folder of the manifest file that lists it or in one of ``allowed_roots`` or ALLOW_IMAGES_ENV's folders;
    a concept naming any other file is rejected without that file being opened or stat'ed. A column the
    schema does not know is a warning in the report, or, with ``strict``, a ManifestError.
    """
    table, sources = read_manifest(uri)
    warnings = _unknown_columns(table, sources, strict)
    rows = _Rows(table, sources, image_roots(allowed_roots))
    groups: dict[str, list[int]] = {}
    for i, concept_id in enumerate(rows.values("concept_id")):
        groups.setdefault(concept_id or f"<{rows.where(i)}>", []).append(i)

    checked = {key: _check_concept(rows, members) for key, members in groups.items()}
    if check_images:
        _check_images(list(checked.values()), checker or (lambda refs: _check_locally(refs, max_workers)))

    concepts, problems = [], {}
    for key, (class_word, chosen, refs, reasons) in checked.items():
        if reasons:
            problems[key] = reasons
        else:
            caption, layers = chosen.pop("caption", None), chosen.pop("layers", None)
            concepts.append(ConceptSpec(key, class_word, refs, caption, chosen, layers))
    return ManifestReport(sources, table.num_rows, concepts, problems, images_checked=check_images, warnings=warnings)


def image_roots(allowed: Sequence[str] | None = None) -> list[str]:
    """The real paths of the folders any manifest may name local images under: ``allowed`` (the
    --allow-images-under folders) and those of ALLOW_IMAGES_ENV."""
    given = [*(allowed or []), *(p for p in os.environ.get(ALLOW_IMAGES_ENV, "").split(os.pathsep) if p)]
    roots = []
    for folder in given:
        if storage.is_s3(folder) or ("://" in folder and not folder.startswith("file://")):
            raise ManifestError(f"{ALLOW_IMAGES_FLAG} (or {ALLOW_IMAGES_ENV}) takes local folders, got {folder!r}; "
                                "images on S3 need no allowing")
        roots.append(_real_path(folder))
    return list(dict.fromkeys(roots))


def confinement_problem(ref: ImageRef) -> str | None:
    """Why a local image must not be read now, else None. Workers ask just before reading: the file system
    may have changed since validation confined the path (a symlink swapped in since)."""
    if ref.uri is None or storage.is_s3(ref.uri):
        return None
    if ref.root is None:
        return f"image {ref.name} was not confined to an allowed folder when the manifest was checked; it was not read"
    if not _within(_real_path(ref.uri), ref.root):
        return (f"image {ref.name} now resolves outside {ref.root}, the folder it was allowed under when the "
                "manifest was checked; it was not read")
    return None


def _real_path(uri: str) -> str:
    """The path a local URI opens, with every symlink and ``..`` resolved (as `storage` reads it)."""
    return os.path.realpath(storage.local_path(uri))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _unknown_columns(table: pa.Table, sources: list[str], strict: bool) -> list[str]:
    """The warning about columns the schema does not know (a misspelt override would be silently unused)."""
    unknown = [name for name in table.column_names if name not in (*KNOWN_COLUMNS, SOURCE_COLUMN, ROW_COLUMN)
               and not name.startswith(PANDAS_INDEX_PREFIX)]
    if not unknown:
        return []
    where = f"manifest {sources[0]}" if len(sources) == 1 else f"the manifest files ({_count(len(sources), 'file')})"
    text = (f"{where} has {_count(len(unknown), 'column')} that catversion does not read: "
            f"{', '.join(map(repr, unknown))}; the known columns are {', '.join(KNOWN_COLUMNS)}")
    if strict:
        raise ManifestError(f"{text}. Rename or remove them (--strict refuses unknown columns)")
    return [f"{text}. They are ignored: rename a misspelt one, or pass --strict to refuse such a manifest"]


# ---- reading ---------------------------------------------------------------------------------


def _expand(uri: str) -> list[str]:
    try:
        if _is_object(uri):
            return [uri]
        # An S3 prefix is a folder: "s3://b/batch" must not pick up "s3://b/batch2/…".
        folder = uri.rstrip("/") + "/" if storage.is_s3(uri) else uri
        found = storage.list_uris(folder, ".parquet")
    except storage.StorageError as exc:
        raise ManifestError(f"cannot read manifest {uri}: {exc}") from exc
    if not found:
        raise ManifestError(f"no parquet manifest found at {uri}: give a .parquet file, a list of them, "
                            "or a folder/prefix holding *.parquet files")
    return found


def _is_object(uri: str) -> bool:
    if storage.is_s3(uri):
        return not uri.endswith("/") and bool(storage.split_s3(uri)[1]) and storage.exists(uri)
    return storage.exists(uri)


def _read_parquet(source: str) -> pa.Table:
    try:
        data = storage.read_bytes(source)
    except storage.StorageError as exc:
        raise ManifestError(f"cannot read manifest {source}: {exc}") from exc
    try:
        table = pq.read_table(io.BytesIO(data))
    except pa.ArrowException as exc:
        raise ManifestError(f"manifest {source} is not a readable parquet file ({exc})") from exc
    for index, column in enumerate(table.schema):
        if pa.types.is_dictionary(column.type):  # e.g. pandas categoricals: check and read the plain values
            table = table.set_column(index, column.name, table.column(index).cast(column.type.value_type))
    return table


def _check_schema(schema: pa.Schema, source: str) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in schema.names]
    if missing:
        raise ManifestError(f"manifest {source} has no {' or '.join(map(repr, missing))} column (its columns: "
                            f"{', '.join(schema.names)}); every row needs concept_id, class_word, and image_uri or image_bytes")
    if not any(name in schema.names for name in IMAGE_COLUMNS):
        raise ManifestError(f"manifest {source} has neither an 'image_uri' nor an 'image_bytes' column; "
                            "every row needs one of them")
    for name in (*REQUIRED_COLUMNS, "image_uri"):
        if name in schema.names and not _fits(schema.field(name).type, str):
            raise ManifestError(f"column {name!r} of manifest {source} has type {schema.field(name).type}, expected strings")
    if "image_bytes" in schema.names and not _is_binary(schema.field("image_bytes").type):
        raise ManifestError(f"column 'image_bytes' of manifest {source} has type {schema.field('image_bytes').type}, "
                            "expected binary (the encoded image file)")


def _fits(arrow_type: pa.DataType, kind: type) -> bool:
    """Whether a column of this Arrow type can hold values of ``kind`` (an all-null column holds anything)."""
    if pa.types.is_null(arrow_type):
        return True
    if kind is str:
        return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
    # Floats are allowed for integers here; each value must then be whole (checked per concept).
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)


def _is_binary(arrow_type: pa.DataType) -> bool:
    return any(check(arrow_type) for check in (pa.types.is_null, pa.types.is_binary, pa.types.is_large_binary,
                                                pa.types.is_fixed_size_binary))


class _Rows:
    """The manifest's columns as Python values, with the name of each row for messages."""

    def __init__(self, table: pa.Table, sources: list[str], allowed: list[str]):
        self.sources, self.allowed = sources, allowed
        # Each local manifest file's folder (real path), where its local images may be; None for S3.
        self.folders = [None if storage.is_s3(source) else os.path.dirname(_real_path(source)) for source in sources]
        self.types = {name: table.schema.field(name).type for name in table.column_names}
        absent = [None] * table.num_rows  # one shared list for every optional column the manifest lacks
        self.columns = {name: table.column(name).to_pylist() if name in table.column_names else absent
                        for name in (*REQUIRED_COLUMNS, *IMAGE_COLUMNS, *OVERRIDE_COLUMNS, SOURCE_COLUMN, ROW_COLUMN)}

    def values(self, name: str) -> list:
        return self.columns[name]

    def source(self, i: int) -> str:
        return self.sources[self.columns[SOURCE_COLUMN][i]]

    def row(self, i: int) -> int:
        return self.columns[ROW_COLUMN][i]

    def where(self, i: int) -> str:
        return f"row {self.row(i)} of {self.source(i)}"

    def confining_root(self, i: int, path: str) -> str | None:
        """The folder (its manifest file's, or an allowed one) that local image ``path`` of row i lies in."""
        real = _real_path(path)
        folder = self.folders[self.columns[SOURCE_COLUMN][i]]
        return next((root for root in (folder, *self.allowed) if root is not None and _within(real, root)), None)

    def outside(self, i: int, uri: str) -> str:
        """The reason for a local image path outside every folder it may be in (nothing about the file itself)."""
        folder = "" if storage.is_s3(self.source(i)) else f" ({os.path.dirname(storage.local_path(self.source(i)))})"
        allowed = ", ".join(self.allowed) or "none"
        return (f"image_uri {uri!r} on {self.where(i)} is outside the manifest's folder{folder} and the folders "
                f"allowed with {ALLOW_IMAGES_FLAG} ({allowed}); move the image there, or allow its folder with "
                f"{ALLOW_IMAGES_FLAG} DIR (or {ALLOW_IMAGES_ENV})")

    def where_all(self, indices: Sequence[int]) -> str:
        """``rows 2, 5 of a.parquet and row 0 of b.parquet``."""
        named, rest = indices[:_MAX_ROWS_NAMED], len(indices) - _MAX_ROWS_NAMED
        by_source: dict[str, list[str]] = {}
        for i in named:
            by_source.setdefault(self.source(i), []).append(str(self.row(i)))
        text = " and ".join(f"row{'s' if len(r) > 1 else ''} {', '.join(r)} of {s}" for s, r in by_source.items())
        return text + (f" (and {rest} more)" if rest > 0 else "")


# ---- checking one concept --------------------------------------------------------------------


def _check_concept(rows: _Rows, members: list[int]) -> tuple[str | None, dict, list[ImageRef], list[str]]:
    """(class word, given overrides incl. caption, image refs, reasons to reject) for one concept's rows."""
    reasons = []
    concept_id = rows.values("concept_id")[members[0]]
    if problem := _concept_id_problem(concept_id, rows.where(members[0])):
        reasons.append(problem)
    class_word = _class_word(rows, members, reasons)
    refs = _image_refs(rows, members, reasons)
    chosen = _overrides(rows, members, reasons)
    return class_word, chosen, refs, reasons


def _concept_id_problem(concept_id: str | None, where: str) -> str | None:
    if concept_id is None:
        return f"{where} has no concept_id"
    if concept_id == "":
        return f"{where} has an empty concept_id"
    return layout.concept_id_problem(concept_id)


def _class_word(rows: _Rows, members: list[int], reasons: list[str]) -> str | None:
    words = rows.values("class_word")
    empty = [i for i in members if words[i] is None or not words[i].strip()]
    if empty:
        reasons.append(f"class_word is empty on {rows.where_all(empty)}")
    distinct = list(dict.fromkeys(words[i] for i in members if words[i] and words[i].strip()))
    if len(distinct) > 1:
        shown = ", ".join(repr(word) if len(word) <= 40 else f"{word[:40]!r}…" for word in distinct)
        reasons.append(f"class_word differs between rows: {shown}; a concept has one class word")
    for word in distinct:
        size = len(word.encode())
        if size > MAX_CLASS_WORD_BYTES:
            reasons.append(f"class_word {word[:40]!r}{'…' if len(word) > 40 else ''} is {size} UTF-8 bytes long; the "
                           f"limit is {MAX_CLASS_WORD_BYTES} (it must fit CLIP's 77-token window with the rest of a "
                           "caption or prompt): give the plain base-class word, e.g. 'teapot'")
    return distinct[0] if distinct else None


def _image_refs(rows: _Rows, members: list[int], reasons: list[str]) -> list[ImageRef]:
    uris, datas = rows.values("image_uri"), rows.values("image_bytes")
    refs: list[ImageRef] = []
    first_seen: dict[str | bytes, int] = {}
    for i in members:
        # An empty string or empty bytes counts as not given (writers often fill the unused column so).
        uri, data = uris[i] or None, datas[i] or None
        if uri is not None and not uri.strip():
            uri = None
        if uri is None and data is None:
            reasons.append(f"{rows.where(i)} has neither image_uri nor image_bytes")
            continue
        if uri is not None and data is not None:
            reasons.append(f"{rows.where(i)} has both image_uri and image_bytes; give exactly one")
            continue
        if uri is not None:
            if "://" in uri and not (storage.is_s3(uri) or uri.startswith("file://")):
                reasons.append(f"image_uri {uri!r} on {rows.where(i)} has an unsupported scheme; use s3://, file://, "
                               "an absolute path, or a path relative to the manifest")
                continue
            resolved = storage.resolve(uri, rows.source(i))
            root = None if storage.is_s3(resolved) else rows.confining_root(i, resolved)
            if root is None and not storage.is_s3(resolved):  # checked before anything touches the file
                reasons.append(rows.outside(i, uri))
                continue
            key, ref = resolved, ImageRef(resolved, resolved, None, root=root)
        else:
            # Inline bytes are hashed here (as cheap as reading them): no fetch is ever needed for them.
            key, ref = bytes(data), ImageRef(f"{rows.source(i)}#row{rows.row(i)}", None, bytes(data), image_digest(data))
        if key in first_seen:
            pair = rows.where_all([first_seen[key], i])
            what = f"image {ref.name} is listed twice ({pair})" if ref.uri else f"{pair} give identical image_bytes"
            reasons.append(f"{what}; list each image once per concept")
            continue
        first_seen[key] = i
        refs.append(ref)
    if not refs:
        reasons.append("no usable image: none of its rows gives a valid image")
    return refs


def _overrides(rows: _Rows, members: list[int], reasons: list[str]) -> dict:
    chosen: dict = {}
    for name, kind in OVERRIDE_COLUMNS.items():
        column = rows.values(name)
        if name == "layers":  # empty: the run's default, as if not given
            column = [None if isinstance(value, str) and not value.strip() else value for value in column]
        given = [column[i] for i in members if column[i] is not None]
        if not given:
            continue
        arrow_type = rows.types[name]
        if not _fits(arrow_type, kind):
            reasons.append(f"column {name!r} has type {arrow_type}, expected {_EXPECTED[kind]}")
            continue
        nonfinite = [v for v in given if isinstance(v, float) and not math.isfinite(v)]
        if nonfinite:
            reasons.append(f"{name} is {nonfinite[0]!r} on {rows.where_all([i for i in members if _nonfinite(column[i])])}; "
                           f"{name} must be a finite number")
            continue
        if kind is int:
            fractional = [v for v in given if isinstance(v, float) and not v.is_integer()]
            if fractional:
                reasons.append(f"column {name!r} has type {arrow_type}, expected an integer: "
                               f"{name} {fractional[0]!r} is not a whole number")
                continue
        distinct = list(dict.fromkeys(kind(v) for v in given))
        empty = [i for i in members if column[i] is None]
        if len(distinct) > 1:
            reasons.append(f"{name} differs between rows: {', '.join(map(repr, distinct))}; a concept has one {name}")
        elif empty:
            reasons.append(f"{name} is {distinct[0]!r} on some rows but empty on {rows.where_all(empty)}; "
                           "give it on every row of the concept or on none")
        elif name == "layers":
            try:
                chosen[name] = parse_layers(distinct[0])
            except ValueError as exc:
                reasons.append(f"column 'layers': {exc}; or leave it empty for the run's default")
        else:
            chosen[name] = distinct[0]
    hyperparameters = {name: value for name, value in chosen.items() if name not in ("caption", "layers")}
    try:
        TrainConfig(**hyperparameters)
    except ValueError as exc:
        reasons.append(f"invalid hyper-parameters: {exc}")
    return chosen


# ---- checking images -------------------------------------------------------------------------


def _check_images(concepts: list[tuple[str | None, dict, list[ImageRef], list[str]]], checker: ImageChecker) -> None:
    """Fetch, decode and hash every distinct image once; fill digests and add each failure to its concepts."""
    unique = list({ref.name: ref for _, _, refs, _ in concepts for ref in refs}.values())
    if not unique:
        return
    outcomes = dict(zip((ref.name for ref in unique), checker(unique), strict=True))
    for _, _, concept_refs, reasons in concepts:
        for ref in concept_refs:
            ref.digest, problem = outcomes[ref.name]
            if problem:
                reasons.append(problem)


def _check_locally(refs: list[ImageRef], max_workers: int) -> list[tuple[str | None, str | None]]:
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(refs)))) as pool:
        return list(pool.map(check_image, refs))


def check_image(ref: ImageRef) -> tuple[str | None, str | None]:
    """(digest, None) for a usable image, else (None, why). A fetched image's bytes are dropped on return."""
    if (problem := confinement_problem(ref)) is not None:
        return None, problem
    try:
        data, name = read_source(ref.data if ref.data is not None else ref.uri, ref.name)
        decode_image(data, name)
    except ImageError as exc:
        return None, str(exc)
    return image_digest(data), None


def _nonfinite(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _optional(value, convert):
    return None if value is None else convert(value)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
