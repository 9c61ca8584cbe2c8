"""The manifest contract: parquet rows grouped into concepts, and every way a concept gets rejected by name."""

import hashlib
import io
import json
import os

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import png_bytes
from catversion.layout import CONCEPT_ID_RE
from pipelines.manifest import (
    ALLOW_IMAGES_ENV,
    MAX_CLASS_WORD_BYTES,
    ROW_COLUMN,
    SOURCE_COLUMN,
    ConceptSpec,
    ImageRef,
    ManifestError,
    check_image,
    manifest_sources,
    read_manifest,
    validate_manifest,
)


def parquet_bytes(rows: list[dict], schema: pa.Schema | None = None) -> bytes:
    columns = list(dict.fromkeys(key for row in rows for key in row))  # from_pylist alone keeps the first row's keys
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows], schema=schema), buffer)
    return buffer.getvalue()


def write_manifest(path, rows: list[dict], schema: pa.Schema | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(parquet_bytes(rows, schema))
    return str(path)


def write_image(path, seed: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = png_bytes(seed)
    path.write_bytes(data)
    return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def by_id(report) -> dict[str, ConceptSpec]:
    return {concept.concept_id: concept for concept in report.concepts}


def test_valid_local_manifest_with_relative_absolute_file_uri_and_inline_images(tmp_path):
    a = write_image(tmp_path / "batch" / "photos" / "a.png", 1)
    b = write_image(tmp_path / "elsewhere" / "b.png", 2)
    c = write_image(tmp_path / "elsewhere" / "c.png", 3)
    inline = [png_bytes(4), png_bytes(5)]
    manifest = write_manifest(tmp_path / "batch" / "manifest.parquet", [
        {"concept_id": "teapot", "class_word": "teapot", "image_uri": "photos/a.png", "notes": "an unknown column"},
        {"concept_id": "teapot", "class_word": "teapot", "image_uri": str(tmp_path / "elsewhere" / "b.png")},
        {"concept_id": "mug_2.v1", "class_word": "mug", "image_bytes": inline[0], "caption": "a photo of a mug",
         "steps": 500, "learning_rate": 0.005, "batch_size": 4, "seed": 7},
        {"concept_id": "teapot", "class_word": "teapot", "image_uri": f"file://{tmp_path}/elsewhere/c.png"},
        {"concept_id": "mug_2.v1", "class_word": "mug", "image_bytes": inline[1], "caption": "a photo of a mug",
         "steps": 500, "learning_rate": 0.005, "batch_size": 4, "seed": 7},
    ])

    report = validate_manifest(manifest, allowed_roots=[str(tmp_path / "elsewhere")])  # b.png and c.png live there

    assert report.problems == {} and report.rejected == []
    assert report.sources == [manifest] and report.rows == 5
    assert report.warnings == [
        f"manifest {manifest} has 1 column that catversion does not read: 'notes'; the known columns are concept_id, "
        "class_word, image_uri, image_bytes, caption, steps, learning_rate, batch_size, seed, layers. They are "
        "ignored: rename a misspelt one, or pass --strict to refuse such a manifest"]
    assert [c.concept_id for c in report.concepts] == ["teapot", "mug_2.v1"]
    teapot, mug = report.concepts
    assert teapot.class_word == "teapot" and teapot.caption is None and teapot.overrides == {}
    assert [ref.uri for ref in teapot.images] == [
        str(tmp_path / "batch" / "photos" / "a.png"), str(tmp_path / "elsewhere" / "b.png"), f"file://{tmp_path}/elsewhere/c.png"]
    assert [ref.name for ref in teapot.images] == [ref.uri for ref in teapot.images]
    assert [ref.digest for ref in teapot.images] == [sha(a), sha(b), sha(c)]
    assert [ref.root for ref in teapot.images] == [str(tmp_path / "batch"), *[str(tmp_path / "elsewhere")] * 2]
    assert all(ref.data is None for ref in teapot.images)  # URI images are not kept in memory
    assert mug.class_word == "mug" and mug.caption == "a photo of a mug"
    assert mug.overrides == {"steps": 500, "learning_rate": 0.005, "batch_size": 4, "seed": 7}
    assert type(mug.overrides["steps"]) is int and type(mug.overrides["learning_rate"]) is float
    assert [(ref.name, ref.uri, ref.data, ref.digest) for ref in mug.images] == [
        (f"{manifest}#row2", None, inline[0], sha(inline[0])), (f"{manifest}#row4", None, inline[1], sha(inline[1]))]
    assert "verdict: OK, all 2 concepts valid" in report.format()
    assert f"warning: {report.warnings[0]}" in report.format() and report.to_dict()["warnings"] == report.warnings


def test_manifest_in_s3_with_absolute_and_relative_image_keys(s3_bucket):
    s3 = boto3.client("s3")
    a, b = png_bytes(1), png_bytes(2)
    s3.put_object(Bucket=s3_bucket, Key="photos/a.png", Body=a)
    s3.put_object(Bucket=s3_bucket, Key="batch/imgs/b.png", Body=b)
    s3.put_object(Bucket=s3_bucket, Key="batch/manifest.parquet", Body=parquet_bytes([
        {"concept_id": "dog", "class_word": "dog", "image_uri": f"s3://{s3_bucket}/photos/a.png"},
        {"concept_id": "dog", "class_word": "dog", "image_uri": "imgs/b.png"},
        {"concept_id": "cat", "class_word": "cat", "image_uri": "imgs/missing.png"},
        {"concept_id": "owl", "class_word": "owl", "image_uri": "s3://no-such-bucket-for-manifest-tests/x.png"},
    ]))
    # A sibling "folder" that shares the prefix's first letters is not part of the manifest.
    s3.put_object(Bucket=s3_bucket, Key="batch2/other.parquet", Body=b"not parquet")

    for uri in (f"s3://{s3_bucket}/batch/manifest.parquet", f"s3://{s3_bucket}/batch", f"s3://{s3_bucket}/batch/"):
        report = validate_manifest(uri)
        assert report.sources == [f"s3://{s3_bucket}/batch/manifest.parquet"]
        assert [c.concept_id for c in report.concepts] == ["dog"]
        dog = report.concepts[0]
        assert [ref.uri for ref in dog.images] == [f"s3://{s3_bucket}/photos/a.png", f"s3://{s3_bucket}/batch/imgs/b.png"]
        assert [ref.digest for ref in dog.images] == [sha(a), sha(b)]
        assert report.problems["cat"] == [f"image s3://{s3_bucket}/batch/imgs/missing.png does not exist"]
        [owl_problem] = report.problems["owl"]  # a storage error other than not-found: its own message
        assert "bucket 'no-such-bucket-for-manifest-tests' does not exist" in owl_problem


def test_prefix_with_two_parquet_files_one_lacking_an_optional_column(tmp_path):
    folder = tmp_path / "manifests"
    write_image(folder / "a.png", 1)
    write_image(folder / "b.png", 2)
    inline = png_bytes(3)
    first = write_manifest(folder / "part-0.parquet", [
        {"concept_id": "vase", "class_word": "vase", "image_uri": "a.png", "caption": "a blue vase"},
        {"concept_id": "lamp", "class_word": "lamp", "image_uri": "b.png"},
    ])
    second = write_manifest(folder / "part-1" / "rows.parquet", [
        {"concept_id": "lamp", "class_word": "lamp", "image_bytes": inline},
        {"concept_id": "chair", "class_word": "chair", "image_bytes": png_bytes(4)},
    ])
    (folder / "README.txt").write_text("not a manifest")

    assert manifest_sources(str(folder)) == [first, second]
    assert manifest_sources([second, first, second]) == [second, first]
    table, sources = read_manifest(str(folder))
    assert sources == [first, second] and table.num_rows == 4
    assert table.column("caption").to_pylist() == ["a blue vase", None, None, None]
    assert table.column("image_bytes").to_pylist()[:2] == [None, None]
    assert table.column(SOURCE_COLUMN).to_pylist() == [0, 0, 1, 1]
    assert table.column(ROW_COLUMN).to_pylist() == [0, 1, 0, 1]

    for uri in (str(folder), f"file://{folder}", [first, second]):
        report = validate_manifest(uri)
        assert report.problems == {} and report.rows == 4
        concepts = by_id(report)
        assert list(concepts) == ["vase", "lamp", "chair"]
        assert concepts["vase"].caption == "a blue vase"
        lamp = concepts["lamp"]  # one concept spread over both files
        assert [ref.name for ref in lamp.images][1] == f"{report.sources[1]}#row0"
        assert lamp.images[1].data == inline and lamp.caption is None


def test_good_concepts_survive_and_each_bad_one_is_rejected_with_its_reasons(tmp_path):
    photos = tmp_path / "photos"
    for i in range(4):
        write_image(photos / f"{i}.png", i)
    (photos / "truncated.png").write_bytes(png_bytes(9)[:60])
    (photos / "notes.png").write_text("this is text, not an image")
    same = png_bytes(10)

    def row(concept_id, image="0.png", class_word="thing", **extra):
        values = {"concept_id": concept_id, "class_word": class_word, "image_uri": image}
        values.update(extra)
        return values

    long_id = "x" * 129
    rows = [
        row("good-1", "0.png"), row("good-1", "1.png"),
        row("good_2", "2.png", steps=800, learning_rate=0.02, seed=3), row("good_2", "3.png", steps=800, learning_rate=0.02, seed=3),
        row("../x"), row("a/b"), row(".hidden"), row("-dash"), row("has space"), row(long_id), row("héllo"), row("dog\n"),
        row(""), row(None),
        row("cw-empty", class_word="   "), row("cw-empty", "1.png", class_word=None),
        row("cw-differ", class_word="dog"), row("cw-differ", "1.png", class_word="puppy"),
        row("no-image", image=None), row("no-image", "1.png"),
        row("both", image_bytes=png_bytes(11)),
        row("dup-uri", "0.png"), row("dup-uri", str(photos / "0.png")),
        row("dup-bytes", image=None, image_bytes=same), row("dup-bytes", image=None, image_bytes=same),
        row("caption-conflict", caption="a red thing"), row("caption-conflict", "1.png", caption="a blue thing"),
        row("steps-partial", steps=500), row("steps-partial", "1.png"),
        row("bad-lr", learning_rate=-1.0),
        row("bad-batch", batch_size=0, seed=-5),
        row("missing", "0.png"), row("missing", "gone.png"),
        row("corrupt", "truncated.png"),
        row("not-image", "notes.png"),
        row("unsupported", "https://example.com/x.png"),
        row("only-bad-rows", image=None),
    ]
    manifest = write_manifest(photos / "manifest.parquet", [{"image_bytes": None, **r} for r in rows], schema=pa.schema([
        ("concept_id", pa.string()), ("class_word", pa.string()), ("image_uri", pa.string()), ("image_bytes", pa.binary()),
        ("caption", pa.string()), ("steps", pa.int64()), ("learning_rate", pa.float64()), ("batch_size", pa.int32()),
        ("seed", pa.int64()),
    ]))
    at = f"of {manifest}"
    p = str(photos)

    report = validate_manifest(manifest)

    assert [c.concept_id for c in report.concepts] == ["good-1", "good_2"]
    assert by_id(report)["good_2"].overrides == {"steps": 800, "learning_rate": 0.02, "seed": 3}
    problems = report.problems
    for bad in ("../x", "a/b", ".hidden", "-dash", "has space", "héllo", "dog\n"):
        assert problems[bad] == [f"concept_id {bad!r} is not valid: it names the residual file, so use 1-128 ASCII letters, "
                                 "digits, '.', '_' or '-', starting with a letter or digit"]
    assert problems[long_id] == [f"concept_id {'x' * 40!r}… is 129 characters long; the limit is 128"]
    assert problems[f"<row 12 {at}>"] == [f"row 12 {at} has an empty concept_id"]
    assert problems[f"<row 13 {at}>"] == [f"row 13 {at} has no concept_id"]
    assert problems["cw-empty"] == [f"class_word is empty on rows 14, 15 {at}"]
    assert problems["cw-differ"] == ["class_word differs between rows: 'dog', 'puppy'; a concept has one class word"]
    assert problems["no-image"] == [f"row 18 {at} has neither image_uri nor image_bytes"]  # rejected whole, not trained on 1 image
    assert problems["both"] == [f"row 20 {at} has both image_uri and image_bytes; give exactly one",
                                "no usable image: none of its rows gives a valid image"]
    assert problems["dup-uri"] == [f"image {p}/0.png is listed twice (rows 21, 22 {at}); list each image once per concept"]
    assert problems["dup-bytes"] == [f"rows 23, 24 {at} give identical image_bytes; list each image once per concept"]
    assert problems["caption-conflict"] == ["caption differs between rows: 'a red thing', 'a blue thing'; a concept has one caption"]
    assert problems["steps-partial"] == [f"steps is 500 on some rows but empty on row 28 {at}; "
                                         "give it on every row of the concept or on none"]
    assert problems["bad-lr"] == ["invalid hyper-parameters: learning_rate must be a positive finite number, got -1.0"]
    assert problems["bad-batch"] == ["invalid hyper-parameters: batch_size must be an integer in 1..64, got 0; "
                                     "seed must be a non-negative integer, got -5"]
    assert problems["missing"] == [f"image {p}/gone.png does not exist"]
    [corrupt] = problems["corrupt"]
    assert corrupt.startswith(f"image {p}/truncated.png is not a decodable image")
    assert problems["not-image"] == [f"image {p}/notes.png is not a decodable image (PIL cannot identify its format)"]
    assert problems["unsupported"] == [
        f"image_uri 'https://example.com/x.png' on row 35 {at} has an unsupported scheme; use s3://, file://, "
        "an absolute path, or a path relative to the manifest",
        "no usable image: none of its rows gives a valid image"]
    assert problems["only-bad-rows"] == [f"row 36 {at} has neither image_uri nor image_bytes",
                                         "no usable image: none of its rows gives a valid image"]
    assert len(problems) == len({r["concept_id"] for r in rows}) - 2  # every concept but the two good ones

    text = report.format()
    for concept_id, reasons in problems.items():
        assert f"rejected concept {concept_id!r}:" in text
        assert all(f"  - {reason}" in text for reason in reasons)
    assert text.splitlines()[1] == f"rows: {len(rows)}; concepts: {len(problems) + 2} (2 valid with 4 images, {len(problems)} rejected)"
    assert text.splitlines()[-1] == f"verdict: REJECTED {len(problems)} of {len(problems) + 2} concepts; only the other 2 would train"


def test_override_columns_of_the_wrong_type_reject_only_the_concepts_that_set_them(tmp_path):
    write_image(tmp_path / "a.png", 1)

    def row(concept_id, **extra):
        return {"concept_id": concept_id, "class_word": "thing", "image_uri": "a.png", **extra}

    manifest = write_manifest(tmp_path / "m.parquet", [
        row("plain", steps=None, learning_rate=None, batch_size=None, seed=None, caption=None),
        row("steps-text", steps="500"), row("lr-text", learning_rate="1e-3"),
        row("batch-float", batch_size=2.5), row("seed-whole-float", seed=4.0), row("caption-number", caption=3),
    ], schema=pa.schema([("concept_id", pa.string()), ("class_word", pa.string()), ("image_uri", pa.string()),
                         ("steps", pa.string()), ("learning_rate", pa.string()), ("batch_size", pa.float64()),
                         ("seed", pa.float64()), ("caption", pa.int64())]))

    report = validate_manifest(manifest)

    assert [c.concept_id for c in report.concepts] == ["plain", "seed-whole-float"]
    assert by_id(report)["seed-whole-float"].overrides == {"seed": 4}
    assert type(by_id(report)["seed-whole-float"].overrides["seed"]) is int
    assert report.problems == {
        "steps-text": ["column 'steps' has type string, expected an integer"],
        "lr-text": ["column 'learning_rate' has type string, expected a number"],
        "batch-float": ["column 'batch_size' has type double, expected an integer: batch_size 2.5 is not a whole number"],
        "caption-number": ["column 'caption' has type int64, expected a string"],
    }


def test_non_finite_and_out_of_range_hyper_parameters_are_rejected_with_the_right_reason(tmp_path):
    def rows(concept_id, n=2, **extra):
        return [{"concept_id": concept_id, "class_word": "thing", "image_uri": f"{i}.png", **extra} for i in range(n)]

    manifest = write_manifest(tmp_path / "m.parquet", [
        *rows("nan-lr", learning_rate=float("nan")), *rows("inf-lr", n=1, learning_rate=float("inf")),
        *rows("nan-steps", n=1, steps=float("nan")), *rows("huge-steps", n=1, steps=10.0**9),
        *rows("fine", n=1, steps=100_000.0),
    ], schema=pa.schema([("concept_id", pa.string()), ("class_word", pa.string()), ("image_uri", pa.string()),
                         ("learning_rate", pa.float64()), ("steps", pa.float64())]))

    problems = validate_manifest(manifest, check_images=False).problems

    assert set(problems) == {"nan-lr", "inf-lr", "nan-steps", "huge-steps"}
    assert problems["nan-lr"] == [f"learning_rate is nan on rows 0, 1 of {manifest}; learning_rate must be a finite number"]
    assert problems["inf-lr"] == [f"learning_rate is inf on row 2 of {manifest}; learning_rate must be a finite number"]
    assert problems["nan-steps"] == [f"steps is nan on row 3 of {manifest}; steps must be a finite number"]
    assert "steps must be an integer in 1..100,000 (more would hold a GPU for days" in problems["huge-steps"][0]
    assert "1000000000" in problems["huge-steps"][0]


def test_the_layers_column_is_parsed_per_concept_and_a_bad_one_rejects_only_its_concept(tmp_path):
    """One group of layer indices per text encoder, ';' between groups; empty is the run's default. Whether the
    layers fit the base model is the batch driver's check (tests/test_batch_families.py)."""
    def rows(concept_id, layers, n=1):
        return [{"concept_id": concept_id, "class_word": "thing", "image_uri": f"{concept_id}-{i}.png",
                 "layers": value} for i, value in enumerate(layers if isinstance(layers, list) else [layers] * n)]

    manifest = write_manifest(tmp_path / "m.parquet", [
        *rows("one", "9,10,11", n=2), *rows("two", " 8, 9,10 ;28,29,30"), *rows("blank", "  ", n=2),
        *rows("none", None), *rows("words", "nine,ten"), *rows("empty-group", "1;;2"), *rows("dangling", "1,2;"),
        *rows("differs", ["1,2", "1,3"]), *rows("partial", ["1,2", None]),
    ])
    report = validate_manifest(manifest, check_images=False)

    specs = by_id(report)
    assert specs["one"].layers == ((9, 10, 11),) and specs["two"].layers == ((8, 9, 10), (28, 29, 30))
    assert specs["blank"].layers is None and specs["none"].layers is None
    assert all(spec.overrides == {} for spec in specs.values()), "layers is no hyper-parameter of the recipe"
    syntax = ("write comma-separated layer indices, one group per text encoder separated by ';', e.g. '9,10,11' "
              "(SD 1.x) or '8,9,10;28,29,30' (SDXL); or leave it empty for the run's default")
    assert report.problems == {
        "words": [f"column 'layers': layers 'nine,ten': {syntax}"],
        "empty-group": [f"column 'layers': layers '1;;2': {syntax}"],
        "dangling": [f"column 'layers': layers '1,2;': {syntax}"],
        "differs": ["layers differs between rows: '1,2', '1,3'; a concept has one layers"],
        "partial": [f"layers is '1,2' on some rows but empty on row 12 of {manifest}; give it on every row of the "
                    "concept or on none"],
    }

    numbers = write_manifest(tmp_path / "n.parquet", [{"concept_id": "int", "class_word": "thing",
                                                       "image_uri": "a.png", "layers": 9}])
    assert validate_manifest(numbers, check_images=False).problems == {
        "int": ["column 'layers' has type int64, expected a string"]}


def test_check_images_false_skips_fetching(tmp_path):
    write_image(tmp_path / "a.png", 1)
    manifest = write_manifest(tmp_path / "m.parquet", [
        {"concept_id": "dog", "class_word": "dog", "image_uri": "a.png"},
        {"concept_id": "dog", "class_word": "dog", "image_uri": "not-there.png"},
    ])

    report = validate_manifest(manifest, check_images=False)

    assert report.problems == {}
    assert [ref.uri for ref in report.concepts[0].images] == [str(tmp_path / "a.png"), str(tmp_path / "not-there.png")]
    assert [ref.digest for ref in report.concepts[0].images] == [None, None]
    assert "images: not checked" in report.format()
    assert validate_manifest(manifest).problems == {"dog": [f"image {tmp_path}/not-there.png does not exist"]}


def test_unusable_manifests_raise_manifest_error(tmp_path, s3_bucket):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ManifestError, match=f"no parquet manifest found at {empty}"):
        validate_manifest(str(empty))
    with pytest.raises(ManifestError, match=f"no parquet manifest found at {tmp_path}/absent.parquet"):
        validate_manifest(str(tmp_path / "absent.parquet"))
    with pytest.raises(ManifestError, match=f"no parquet manifest found at s3://{s3_bucket}/nothing-here"):
        validate_manifest(f"s3://{s3_bucket}/nothing-here")
    with pytest.raises(ManifestError, match="no manifest given"):
        validate_manifest([])

    text = tmp_path / "m.parquet"
    text.write_text("concept_id,class_word\ndog,dog\n")
    with pytest.raises(ManifestError, match=f"manifest {text} is not a readable parquet file"):
        validate_manifest(str(text))

    def expect(rows, schema, message):
        path = write_manifest(tmp_path / "bad.parquet", rows, schema)
        with pytest.raises(ManifestError, match=message.format(path=path)):
            validate_manifest(path)

    expect([{"class_word": "dog", "image_uri": "a.png"}], None, "manifest {path} has no 'concept_id' column")
    expect([{"concept_id": "dog", "image_uri": "a.png"}], None, "manifest {path} has no 'class_word' column")
    expect([{"concept_id": 1, "class_word": "dog", "image_uri": "a.png"}], None,
           "column 'concept_id' of manifest {path} has type int64, expected strings")
    expect([{"concept_id": "dog", "class_word": 5, "image_uri": "a.png"}], None,
           "column 'class_word' of manifest {path} has type int64, expected strings")
    expect([{"concept_id": "dog", "class_word": "dog"}], None,
           "manifest {path} has neither an 'image_uri' nor an 'image_bytes' column")
    expect([{"concept_id": "dog", "class_word": "dog", "image_uri": 3}], None,
           "column 'image_uri' of manifest {path} has type int64, expected strings")
    expect([{"concept_id": "dog", "class_word": "dog", "image_bytes": "aGVsbG8="}], None,
           r"column 'image_bytes' of manifest {path} has type string, expected binary \(the encoded image file\)")

    parts = tmp_path / "parts"
    write_manifest(parts / "a.parquet", [{"concept_id": "dog", "class_word": "dog", "image_uri": "a.png", "steps": 5}])
    write_manifest(parts / "b.parquet", [{"concept_id": "cat", "class_word": "cat", "image_uri": "b.png", "steps": "5"}])
    with pytest.raises(ManifestError, match="Field steps has incompatible types: int64 vs string.*use one type per column"):
        validate_manifest(str(parts))


def test_dictionary_encoded_string_columns_are_read_as_strings(tmp_path):
    write_image(tmp_path / "a.png", 1)
    table = pa.table({
        "concept_id": pa.array(["dog"]).dictionary_encode(),
        "class_word": pa.array(["dog"]).dictionary_encode(),
        "image_uri": pa.array(["a.png"], pa.large_string()),
    })
    pq.write_table(table, tmp_path / "m.parquet")

    report = validate_manifest(str(tmp_path / "m.parquet"))

    assert report.problems == {} and report.concepts[0].images[0].uri == str(tmp_path / "a.png")


def test_concept_id_pattern():
    assert all(CONCEPT_ID_RE.match(ok) for ok in ("a", "A9", "dog-2", "my_cat.v1", "x" * 128))
    assert not any(CONCEPT_ID_RE.match(bad) for bad in ("", "x" * 129, "../x", "a/b", ".a", "-a", "_a", "a b", "é", "a\n"))


def test_concept_spec_round_trips_through_rows_arrow_and_numpy():
    specs = [
        ConceptSpec("mixed", "teapot", [ImageRef("s3://b/a.png", "s3://b/a.png", None, "d1"),
                                        ImageRef("s3://b/m.parquet#row3", None, b"\x89PNG...", "d2")],
                    caption="a teapot on a table", overrides={"steps": 500, "learning_rate": 0.005, "batch_size": 4, "seed": 1},
                    layers=((8, 9, 10), (28, 29, 30))),
        ConceptSpec("uris-only", "dog", [ImageRef("/data/x.png", "/data/x.png", None, None)], layers=((3,),)),
        ConceptSpec("inline-only", "cat", [ImageRef("m.parquet#row0", None, b"abc", "d3"),
                                           ImageRef("m.parquet#row1", None, b"def", "d4")], overrides={"learning_rate": 1.0}),
    ]

    for spec in specs:
        assert ConceptSpec.from_row(spec.to_row()) == spec
    through_arrow = pa.Table.from_pylist([spec.to_row() for spec in specs]).to_pylist()
    assert [ConceptSpec.from_row(row) for row in through_arrow] == specs
    as_numpy = [{key: np.array(value, dtype=object) if isinstance(value, list) else value for key, value in spec.to_row().items()}
                for spec in specs]
    assert [ConceptSpec.from_row(row) for row in as_numpy] == specs
    assert type(ConceptSpec.from_row(specs[2].to_row()).overrides["learning_rate"]) is float


def test_local_images_are_confined_to_the_manifests_folder_and_the_allowed_ones(tmp_path, monkeypatch):
    """A hostile manifest cannot make catversion read a file outside its own folder (absolute, file://, '..' or
    through a symlink), whether that file exists or not, until the operator allows a folder explicitly."""
    monkeypatch.delenv(ALLOW_IMAGES_ENV, raising=False)
    batch, outside = tmp_path / "batch", tmp_path / "outside"
    inside = write_image(batch / "photos" / "a.png", 1)
    escaped = write_image(outside / "x.png", 2)
    (batch / "photos" / "link.png").symlink_to(outside / "x.png")
    (batch / "photos" / "dirlink").symlink_to(outside)
    hostile = {"etc": "/etc/passwd", "file-uri": "file:///etc/passwd", "dotdot": "../outside/x.png",
               "dotdot-absent": "../outside/absent.png", "symlink": "photos/link.png", "dir-symlink": "photos/dirlink/x.png"}
    rows = [{"concept_id": "good", "class_word": "thing", "image_uri": "photos/../photos/a.png"},
            *({"concept_id": cid, "class_word": "thing", "image_uri": uri} for cid, uri in hostile.items())]
    manifest = write_manifest(batch / "m.parquet", rows)

    report = validate_manifest(manifest)

    assert [c.concept_id for c in report.concepts] == ["good"] and report.concepts[0].images[0].digest == sha(inside)
    for n, (concept_id, uri) in enumerate(hostile.items(), start=1):
        assert report.problems[concept_id] == [
            f"image_uri {uri!r} on row {n} of {manifest} is outside the manifest's folder ({batch}) and the folders "
            f"allowed with --allow-images-under (none); move the image there, or allow its folder with "
            f"--allow-images-under DIR (or {ALLOW_IMAGES_ENV})",
            "no usable image: none of its rows gives a valid image"]
    text = json.dumps(report.to_dict()) + report.format()
    passwd = open("/etc/passwd", "rb").read()
    for secret in (sha(passwd), sha(escaped), passwd.splitlines()[0].decode()):
        assert secret not in text

    # Allowing the outside folder (flag or setting) lets its images in, however they are named; /etc stays out.
    for allowed, env, shown in (([str(outside)], None, f"{outside}"),
                                (None, f"{tmp_path / 'elsewhere'}{os.pathsep}{outside}", f"{tmp_path}/elsewhere, {outside}")):
        if env:
            monkeypatch.setenv(ALLOW_IMAGES_ENV, env)
        report = validate_manifest(manifest, allowed_roots=allowed)
        assert set(report.problems) == {"etc", "file-uri", "dotdot-absent"}
        assert f"allowed with --allow-images-under ({shown});" in report.problems["etc"][0]
        assert report.problems["dotdot-absent"] == [f"image {batch}/../outside/absent.png does not exist"]
        ok = {c.concept_id: c.images[0] for c in report.concepts}
        assert {cid: (ref.digest, ref.root) for cid, ref in ok.items()} == {
            "good": (sha(inside), str(batch)), **{cid: (sha(escaped), str(outside)) for cid in ("dotdot", "symlink", "dir-symlink")}}
    with pytest.raises(ManifestError, match="--allow-images-under .or CATVERSION_ALLOW_IMAGES_UNDER. takes local folders"):
        validate_manifest(manifest, allowed_roots=["s3://bucket/photos"])


def test_a_worker_rechecks_confinement_before_reading(tmp_path, monkeypatch):
    """Defence in depth: a symlink swapped to point outside after validation is refused where the image is read."""
    monkeypatch.delenv(ALLOW_IMAGES_ENV, raising=False)
    write_image(tmp_path / "real.png", 1)
    write_image(tmp_path.parent / f"{tmp_path.name}-outside.png", 2)
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    manifest = write_manifest(tmp_path / "m.parquet", [{"concept_id": "c", "class_word": "thing", "image_uri": "link.png"}])
    [ref] = validate_manifest(manifest, check_images=False).concepts[0].images
    assert check_image(ref)[1] is None

    (tmp_path / "link.png").unlink()
    (tmp_path / "link.png").symlink_to(tmp_path.parent / f"{tmp_path.name}-outside.png")

    assert check_image(ref) == (None, f"image {tmp_path}/link.png now resolves outside {tmp_path}, the folder it was "
                                      "allowed under when the manifest was checked; it was not read")
    assert check_image(ImageRef(str(tmp_path / "real.png"), str(tmp_path / "real.png"), None))[1] == (
        f"image {tmp_path}/real.png was not confined to an allowed folder when the manifest was checked; it was not read")


def test_an_undecodable_file_is_named_without_quoting_its_bytes(tmp_path):
    """PIL's own error text quotes a header's bytes (here a file that starts like a PPM): never passed on."""
    write_image(tmp_path / "ok.png", 1)
    (tmp_path / "fake.ppm").write_bytes(b"P6\nroot:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "fake2.ppm").write_bytes(b"P6\nSECRETVALUE 4\n255\n")
    manifest = write_manifest(tmp_path / "m.parquet", [
        {"concept_id": "ppm", "class_word": "thing", "image_uri": "fake.ppm"},
        {"concept_id": "ppm2", "class_word": "thing", "image_uri": "fake2.ppm"},
    ])

    report = validate_manifest(manifest)

    for concept_id, file in (("ppm", "fake.ppm"), ("ppm2", "fake2.ppm")):
        assert report.problems[concept_id] == [
            f"image {tmp_path}/{file} is not a decodable image (PIL failed with ValueError: it is corrupt, truncated, "
            "or not the format its first bytes claim)"]
    assert "root:x" not in report.format() and "SECRETVALUE" not in report.format()


def test_class_words_must_fit_the_text_encoders_window(tmp_path):
    write_image(tmp_path / "a.png", 1)
    words = {"at-limit": "x" * MAX_CLASS_WORD_BYTES, "over": "x" * (MAX_CLASS_WORD_BYTES + 1),
             "multibyte": "é" * 25, "huge": "teapot" * 2000}
    manifest = write_manifest(tmp_path / "m.parquet", [
        {"concept_id": cid, "class_word": word, "image_uri": "a.png"} for cid, word in words.items()])

    report = validate_manifest(manifest, check_images=False)

    assert [c.concept_id for c in report.concepts] == ["at-limit"]
    limit = (f"the limit is {MAX_CLASS_WORD_BYTES} (it must fit CLIP's 77-token window with the rest of a caption or "
             "prompt): give the plain base-class word, e.g. 'teapot'")
    assert report.problems == {
        "over": [f"class_word {'x' * 40!r}… is 49 UTF-8 bytes long; {limit}"],
        "multibyte": [f"class_word {'é' * 25!r} is 50 UTF-8 bytes long; {limit}"],
        "huge": [f"class_word {('teapot' * 7)[:40]!r}… is 12000 UTF-8 bytes long; {limit}"],
    }


def test_unknown_columns_warn_naming_the_known_ones_or_refuse_the_manifest_when_strict(tmp_path):
    import pandas as pd

    write_image(tmp_path / "a.png", 1)
    frame = pd.DataFrame([{"concept_id": "dog", "class_word": "dog", "image_uri": "a.png", "stpes": 500}], index=[7])
    frame.to_parquet(tmp_path / "m.parquet")  # a non-default index: pandas stores it as a column, not data
    manifest = str(tmp_path / "m.parquet")
    assert "__index_level_0__" in pq.read_schema(manifest).names

    report = validate_manifest(manifest, check_images=False)

    assert [c.concept_id for c in report.concepts] == ["dog"] and report.concepts[0].overrides == {}
    known = "concept_id, class_word, image_uri, image_bytes, caption, steps, learning_rate, batch_size, seed, layers"
    assert report.warnings == [f"manifest {manifest} has 1 column that catversion does not read: 'stpes'; the known "
                               f"columns are {known}. They are ignored: rename a misspelt one, or pass --strict to "
                               "refuse such a manifest"]
    with pytest.raises(ManifestError) as refused:
        validate_manifest(manifest, check_images=False, strict=True)
    assert str(refused.value) == (f"manifest {manifest} has 1 column that catversion does not read: 'stpes'; the known "
                                  f"columns are {known}. Rename or remove them (--strict refuses unknown columns)")


def test_batch_flags_allow_images_under_and_strict_reach_validation(ray_session, tmp_path, capsys, monkeypatch):
    """`catversion batch --validate-only`: --allow-images-under lets an outside folder's images in (the Ray
    tasks that fetch them check the folder again), --strict turns an unknown column into an error; a folder
    that is not one is a usage error naming the flag."""
    from catversion.cli import main

    monkeypatch.delenv(ALLOW_IMAGES_ENV, raising=False)
    write_image(tmp_path / "outside" / "a.png", 1)
    manifest = write_manifest(tmp_path / "batch" / "m.parquet", [
        {"concept_id": "dog", "class_word": "dog", "image_uri": "../outside/a.png", "stpes": 5}])
    command = ["batch", "--manifest", manifest, "--validate-only", "--quiet", "--json"]

    assert main(command) == 3
    assert list(json.loads(capsys.readouterr().out)["rejected"]) == ["dog"]
    assert main([*command, "--allow-images-under", str(tmp_path / "outside")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] == ["dog"] and report["images_checked"] and "'stpes'" in report["warnings"][0]
    assert main([*command, "--allow-images-under", str(tmp_path / "outside"), "--strict"]) == 1
    assert "has 1 column that catversion does not read: 'stpes'" in capsys.readouterr().err
    assert main(["batch", "--manifest", manifest, "--output", str(tmp_path / "out"),
                 "--allow-images-under", str(tmp_path / "nothing-here")]) == 2
    assert f"--allow-images-under {str(tmp_path / 'nothing-here')!r} is not a folder" in capsys.readouterr().err
