import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stacklab.data import sources
from stacklab.data.sources import ReadStats, fingerprint, iter_documents, stdlib_root
from stacklab.errors import DataError
from stacklab.recipe import JsonlSource, ParquetSource, StdlibSource, TextSource

# --------------------------------------------------------------------------- stdlib


def test_stdlib_finds_its_own_files_with_stable_ids():
    first = list(iter_documents(StdlibSource()))
    second = list(iter_documents(StdlibSource()))
    ids = [d.id for d in first]
    assert ids == [d.id for d in second]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert len(first) > 100
    by_path = {d.path: d for d in first}
    assert by_path["os.py"].id == "stdlib:os.py"
    assert by_path["os.py"].text == (stdlib_root() / "os.py").read_text(encoding="utf-8")
    assert "json/decoder.py" in by_path
    assert not any("site-packages" in p or "dist-packages" in p for p in by_path)
    assert all(d.source == "stdlib" for d in first)


def test_stdlib_fingerprint_is_stable():
    assert fingerprint(StdlibSource()) == fingerprint(StdlibSource())
    int(fingerprint(StdlibSource()), 16)


# --------------------------------------------------------------------------- text


def test_text_folder_is_read_sorted_and_skips_undecodable(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes.md").write_text("not matched")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe broken")
    stats = ReadStats()
    docs = list(iter_documents(TextSource(name="t", path=tmp_path), stats))
    assert [(d.id, d.path, d.text) for d in docs] == [
        ("t:a.txt", "a.txt", "first"),
        ("t:b/two.txt", "b/two.txt", "second"),
    ]
    assert stats.undecodable == 1


def test_text_single_file_and_custom_glob(tmp_path):
    (tmp_path / "one.md").write_text("hello")
    docs = list(iter_documents(TextSource(name="t", path=tmp_path / "one.md")))
    assert [(d.id, d.text) for d in docs] == [("t:one.md", "hello")]
    docs = list(iter_documents(TextSource(name="t", path=tmp_path, glob="*.md")))
    assert [d.id for d in docs] == ["t:one.md"]


def test_text_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"source 't': path not found: .*nope"):
        list(iter_documents(TextSource(name="t", path=tmp_path / "nope")))


def test_text_empty_folder(tmp_path):
    with pytest.raises(DataError, match=r"source 't': no text files matching .*it is empty"):
        list(iter_documents(TextSource(name="t", path=tmp_path)))


def test_text_folder_without_matches_names_what_it_holds(tmp_path):
    (tmp_path / "a.md").write_text("x")
    with pytest.raises(DataError, match=r"matching '\*\*/\*\.txt'.*holds 1 files, e.g. a\.md"):
        list(iter_documents(TextSource(name="t", path=tmp_path)))


# --------------------------------------------------------------------------- jsonl


def _jsonl(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines))
    return path


def test_jsonl_reads_text_and_line_ids(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "one"}, "", {"text": "two", "x": 1}])
    docs = list(iter_documents(JsonlSource(name="j", path=path)))
    assert [(d.id, d.source, d.text, d.path) for d in docs] == [
        ("j:1", "j", "one", None),
        ("j:3", "j", "two", None),
    ]


def test_jsonl_custom_fields(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"body": "one", "key": "a"}, {"body": "two", "key": 7}])
    source = JsonlSource(name="j", path=path, field="body", id_field="key")
    assert [(d.id, d.text) for d in iter_documents(source)] == [("j:a", "one"), ("j:7", "two")]


def test_jsonl_missing_field_lists_keys(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"body": "x", "title": "y"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: no field 'text' .*'body', 'title'"):
        list(iter_documents(JsonlSource(name="j", path=path)))


def test_jsonl_missing_id_field(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "ok"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: no field 'uid'"):
        list(iter_documents(JsonlSource(name="j", path=path, id_field="uid")))


def test_jsonl_bad_json_line(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, "{not json"])
    with pytest.raises(DataError, match=r"source 'j': .*d\.jsonl:2: not valid JSON"):
        list(iter_documents(JsonlSource(name="j", path=path)))


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [[1, 2]])
    with pytest.raises(DataError, match=r"d\.jsonl:1: expected a JSON object, got list"):
        list(iter_documents(JsonlSource(name="j", path=path)))


def test_jsonl_text_not_a_string(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": 42}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: 'text' must be a string, got int"):
        list(iter_documents(JsonlSource(name="j", path=path)))


def test_jsonl_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match=r"source 'j': path not found"):
        list(iter_documents(JsonlSource(name="j", path=tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match=r"not a file; expected a \.jsonl file"):
        list(iter_documents(JsonlSource(name="j", path=tmp_path)))


# --------------------------------------------------------------------------- parquet


def _parquet(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_reads_rows_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 2)
    path = _parquet(tmp_path / "d.parquet", text=["a", "b", "c", "d", "e"], n=[1, 2, 3, 4, 5])
    docs = list(iter_documents(ParquetSource(name="p", path=path)))
    assert [(d.id, d.text) for d in docs] == [(f"p:{i}", t) for i, t in enumerate("abcde")]


def test_parquet_id_column_and_folder(tmp_path):
    _parquet(tmp_path / "b.parquet", body=["x"], key=["k2"])
    _parquet(tmp_path / "a.parquet", body=["y", "z"], key=["k0", "k1"])
    docs = list(iter_documents(ParquetSource(name="p", path=tmp_path, column="body")))
    assert [(d.id, d.text) for d in docs] == [
        ("p:a.parquet:0", "y"),
        ("p:a.parquet:1", "z"),
        ("p:b.parquet:0", "x"),
    ]
    source = ParquetSource(name="p", path=tmp_path, column="body", id_column="key")
    assert [d.id for d in iter_documents(source)] == [
        "p:a.parquet:k0",
        "p:a.parquet:k1",
        "p:b.parquet:k2",
    ]


def test_parquet_missing_column_lists_available(tmp_path):
    path = _parquet(tmp_path / "d.parquet", content=["x"], lang=["en"])
    with pytest.raises(DataError, match=r"no column 'text' \(available: content, lang\)"):
        list(iter_documents(ParquetSource(name="p", path=path)))


def test_parquet_garbage_file(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(DataError, match=r"source 'p': .*d\.parquet: not a readable Parquet file"):
        list(iter_documents(ParquetSource(name="p", path=path)))


def test_parquet_non_string_value(tmp_path):
    path = _parquet(tmp_path / "d.parquet", text=[1, 2])
    with pytest.raises(DataError, match=r"row 0: 'text' must be a string, got int"):
        list(iter_documents(ParquetSource(name="p", path=path)))


def test_parquet_empty_folder(tmp_path):
    with pytest.raises(DataError, match=r"source 'p': no \.parquet files matching"):
        list(iter_documents(ParquetSource(name="p", path=tmp_path)))


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_follows_content(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "abc"}\n')
    source = JsonlSource(name="j", path=path)
    before = fingerprint(source)
    assert fingerprint(source) == before
    path.write_text('{"text": "abd"}\n')  # same size
    assert fingerprint(source) != before


def test_fingerprint_of_text_folder_sees_new_files(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    source = TextSource(name="t", path=tmp_path)
    before = fingerprint(source)
    (tmp_path / "b.txt").write_text("")
    assert fingerprint(source) != before


def test_fingerprint_of_missing_source(tmp_path):
    with pytest.raises(DataError, match="path not found"):
        fingerprint(ParquetSource(name="p", path=tmp_path / "nope"))
