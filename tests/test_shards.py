"""Token shards: exact packing, dtype, index contents, and refusing damaged files by name."""

import json

import numpy as np
import pytest

from stacklab.data.shards import open_split, token_dtype, write_index, write_split
from stacklab.errors import DataError

DOCS = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]
# stream: 10 11 12 0 | 20 21 0 | 30 31 32 33 0   (12 tokens, boundary id 0 after each doc)


def _write(tmp_path, docs=DOCS, seq_len=4, rows_per_shard=1, vocab_size=100, split="train"):
    entry = write_split(tmp_path, split, docs, seq_len, rows_per_shard, vocab_size)
    write_index(tmp_path, {split: entry}, meta={"source": "test"})
    return entry


def test_packing_is_exact(tmp_path):
    entry = _write(tmp_path)
    # rows of seq_len + 1 = 5 tokens, one every 4: stream[0:5], stream[4:9]; 3 tokens dropped
    expected = [[10, 11, 12, 0, 20], [20, 21, 0, 30, 31]]
    assert (entry["rows"], entry["tokens"], entry["docs"], entry["dropped_tokens"]) == (2, 12, 3, 3)
    assert [s["file"] for s in entry["shards"]] == ["train_00000.bin", "train_00001.bin"]
    raw = [np.fromfile(tmp_path / s["file"], dtype="<u2").tolist() for s in entry["shards"]]
    assert raw == expected
    shards = open_split(tmp_path, "train")
    assert (shards.num_rows, shards.seq_len, shards.row_len) == (2, 4, 5)
    assert shards.rows([1, 0, 1]).tolist() == [expected[1], expected[0], expected[1]]
    assert shards.row(1).tolist() == expected[1]


def test_streamed_packing_matches_the_whole_stream(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 500, size=rng.integers(0, 30)).tolist() for _ in range(200)]
    seq_len = 8
    entry = _write(tmp_path, docs, seq_len=seq_len, rows_per_shard=7, vocab_size=500)
    stream = [t for doc in docs for t in [*doc, 0]]
    n_rows = (len(stream) - 1) // seq_len
    expected = [stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n_rows)]
    shards = open_split(tmp_path, "train")
    assert shards.rows(np.arange(n_rows)).tolist() == expected
    assert entry["dropped_tokens"] == len(stream) - (n_rows * seq_len + 1)
    sizes = [s["rows"] for s in entry["shards"]]
    assert sum(sizes) == n_rows and set(sizes[:-1]) == {7} and 0 < sizes[-1] <= 7
    with pytest.raises(IndexError):
        shards.rows([n_rows])


def test_dtype_follows_vocab_size(tmp_path):
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32
    entry = _write(tmp_path, [[70_000, 1, 2, 3, 69_999]], vocab_size=70_001)
    assert entry["shards"][0]["bytes"] == 5 * 4
    assert open_split(tmp_path, "train").row(0).tolist() == [70_000, 1, 2, 3, 69_999]


def test_index_contents(tmp_path):
    train = write_split(tmp_path, "train", DOCS, 4, 8, 100)
    val = write_split(tmp_path, "val", [[5, 6, 7, 8]], 4, 8, 100)
    write_index(tmp_path, {"train": train, "val": val}, meta={"eot_id": 0})
    index = json.loads((tmp_path / "index.json").read_text())
    assert {k: index[k] for k in ("format", "dtype", "seq_len", "row_len", "vocab_size")} == {
        "format": 1,
        "dtype": "<u2",
        "seq_len": 4,
        "row_len": 5,
        "vocab_size": 100,
    }
    assert index["meta"] == {"eot_id": 0}
    assert index["splits"]["val"]["rows"] == 1
    shard = index["splits"]["train"]["shards"][0]
    assert shard["file"] == "train_00000.bin" and shard["rows"] == 2 and shard["bytes"] == 20
    assert len(shard["sha256"]) == 64
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"document 1.*0\.\.99"):
        write_split(tmp_path, "train", [[1, 2], [3, 100]], 4, 8, 100)
    with pytest.raises(DataError, match="fewer than one row"):
        write_split(tmp_path, "train", [[1, 2]], 4, 8, 100)


def test_missing_index_and_unknown_split(tmp_path):
    with pytest.raises(DataError, match=r"index\.json"):
        open_split(tmp_path, "train")
    _write(tmp_path)
    with pytest.raises(DataError, match=r"no split 'val' \(available: train\)"):
        open_split(tmp_path, "val")


def test_missing_shard_is_named(tmp_path):
    _write(tmp_path)
    (tmp_path / "train_00001.bin").unlink()
    with pytest.raises(DataError, match=r"missing.*train_00001\.bin"):
        open_split(tmp_path, "train")


def test_truncated_shard_is_named_with_sizes(tmp_path):
    _write(tmp_path)
    path = tmp_path / "train_00000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train_00000\.bin.*expected 10 bytes, found 8"):
        open_split(tmp_path, "train", verify=False)


def test_corrupt_shard_is_named(tmp_path):
    _write(tmp_path)
    path = tmp_path / "train_00001.bin"
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"corrupt.*train_00001\.bin"):
        open_split(tmp_path, "train")
    assert open_split(tmp_path, "train", verify=False).num_rows == 2  # size still matches
