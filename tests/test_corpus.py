import json
import random

import pytest

from stacklab.data.corpus import build_corpus
from stacklab.data.documents import read_jsonl
from stacklab.errors import DataError
from stacklab.recipe import DataConfig, JsonlSource, LengthFilter, TextSource


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def prose(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(n))


def test_build_corpus_writes_documents_and_counts(tmp_path):
    near_copy = prose(0).replace("w", "v", 1)
    texts = [prose(0), "too short", prose(1), prose(0), near_copy, prose(2)]
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    cfg = DataConfig(
        sources=[JsonlSource(name="j", path=path)],
        filters=[LengthFilter(min_chars=50), LengthFilter(min_chars=0, max_chars=10**6)],
    )
    metrics = build_corpus(cfg, tmp_path / "out")
    docs = list(read_jsonl(tmp_path / "out" / "documents.jsonl"))
    assert [d.id for d in docs] == ["j:1", "j:3", "j:6"]
    assert metrics == {
        "data/docs_read": 6,
        "data/docs_read/j": 6,
        "data/removed/length": 1,
        "data/removed/length#2": 0,
        "data/dedup_exact_removed": 1,
        "data/dedup_near_removed": 1,
        "data/docs_kept": 3,
        "data/docs_kept/j": 3,
        "data/chars_kept": sum(len(d.text) for d in docs),
        "data/undecodable_skipped": 0,
    }


def test_build_corpus_dedups_across_sources(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(prose(5))
    (tmp_path / "texts" / "bad.txt").write_bytes(b"\xff")
    path = write_jsonl(tmp_path / "d.jsonl", [prose(5), prose(6)])
    cfg = DataConfig(
        sources=[TextSource(name="t", path=tmp_path / "texts"), JsonlSource(name="j", path=path)],
        dedup={"near": False},
    )
    metrics = build_corpus(cfg, tmp_path / "out")
    assert metrics["data/docs_kept/t"] == 1 and metrics["data/docs_kept/j"] == 1
    assert metrics["data/dedup_exact_removed"] == 1
    assert metrics["data/undecodable_skipped"] == 1


def test_build_corpus_all_filtered_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["tiny"] * 12)
    cfg = DataConfig(sources=[JsonlSource(name="j", path=path)], filters=[LengthFilter()])
    with pytest.raises(DataError, match=r"corpus is empty .*: 12 read, length removed 12"):
        build_corpus(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "documents.jsonl").exists()


def test_build_corpus_source_without_documents_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    cfg = DataConfig(sources=[JsonlSource(name="empty", path=path)])
    with pytest.raises(DataError, match=r"source 'empty' yielded no documents"):
        build_corpus(cfg, tmp_path / "out")
