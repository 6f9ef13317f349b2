"""Packed token shards: the training data as fixed-length rows of token ids on disk.

Why this format:

* **Packed, not padded.** Documents are concatenated into one stream with `<|endoftext|>`
  after each, and the stream is cut into rows of `seq_len + 1` tokens, one every `seq_len`
  tokens (consecutive rows share one token). A row gives `inputs = row[:-1]` and
  `targets = row[1:]`, so every token of the stream except the very first is a target exactly
  once and no compute is spent on padding. Only the final partial row is dropped.
* **Raw little-endian arrays.** A shard is just `rows x row_len` uint16 (uint32 for
  vocabularies over 65,536) with no header, so `np.memmap` opens it instantly and a random
  batch reads only the rows it needs, whatever the dataset's size.
* **Checked.** `index.json` records each shard's row count, size and sha256; `open_split`
  refuses a missing, truncated or corrupt shard by name instead of training on garbage.

Writing streams: memory holds one shard's rows, never a whole split. Every file is written
under a temporary name and then renamed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stacklab.data.tokenizer import EOT_ID
from stacklab.errors import DataError
from stacklab.fileio import write_atomic

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
_FORMAT_KEYS = ("dtype", "seq_len", "vocab_size")  # shared by all splits; lifted into the index


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest little-endian unsigned dtype that holds ids `0..vocab_size-1`."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def write_split(
    out_dir: str | Path,
    split: str,
    docs: Iterable[list[int]],
    seq_len: int,
    rows_per_shard: int,
    vocab_size: int,
) -> dict[str, Any]:
    """Pack tokenized documents into shards `{split}_00000.bin, ...`; return the split's entry.

    The entry holds `shards` (file, rows, bytes, sha256 each), `rows`, `tokens` (stream length,
    boundary tokens included), `docs`, `dropped_tokens` (the final partial row), and the
    `dtype`, `seq_len`, `vocab_size` that `write_index` lifts into the index.
    """
    if seq_len < 1 or rows_per_shard < 1:
        raise ValueError(
            f"seq_len and rows_per_shard must be >= 1, got {seq_len}, {rows_per_shard}"
        )
    dtype = token_dtype(vocab_size)
    writer = _ShardWriter(Path(out_dir), split, rows_per_shard, seq_len + 1, dtype)
    pending: list[int] = []  # stream tokens not yet fully cut into rows
    n_docs = n_tokens = 0
    for doc in docs:
        _check_ids(doc, vocab_size, split, n_docs)
        pending.extend(doc)
        pending.append(EOT_ID)
        n_docs += 1
        n_tokens += len(doc) + 1
        if len(pending) > rows_per_shard * seq_len:
            pending = _cut_rows(pending, seq_len, writer)
    _cut_rows(pending, seq_len, writer)
    writer.close()
    rows = sum(s["rows"] for s in writer.shards)
    if rows == 0:
        raise DataError(
            f"split '{split}' has {n_tokens} tokens, fewer than one row of {seq_len + 1}; "
            "add data or lower data.packing.seq_len"
        )
    return {
        "shards": writer.shards,
        "rows": rows,
        "tokens": n_tokens,
        "docs": n_docs,
        "dropped_tokens": n_tokens - (rows * seq_len + 1),
        "dtype": dtype.str,
        "seq_len": seq_len,
        "vocab_size": vocab_size,
    }


def _check_ids(doc: list[int], vocab_size: int, split: str, index: int) -> None:
    if len(doc) and not 0 <= min(doc) <= max(doc) < vocab_size:
        raise DataError(
            f"split '{split}', document {index}: token ids must lie in 0..{vocab_size - 1}, "
            f"found {min(doc)}..{max(doc)}"
        )


def _cut_rows(pending: list[int], seq_len: int, writer: _ShardWriter) -> list[int]:
    """Write every complete row of `pending`; return the tokens the next row starts with."""
    n_rows = (len(pending) - 1) // seq_len
    if n_rows <= 0:
        return pending
    stream = np.asarray(pending, dtype=writer.dtype)
    # Every window of row_len tokens, [len(stream) - seq_len, row_len]; rows start every seq_len.
    windows = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)
    writer.add(windows[: n_rows * seq_len : seq_len])
    return pending[n_rows * seq_len :]


class _ShardWriter:
    """Collects rows into a one-shard buffer and writes it out each time it fills."""

    def __init__(
        self, out_dir: Path, split: str, rows_per_shard: int, row_len: int, dtype: np.dtype
    ):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir, self.split, self.dtype = out_dir, split, dtype
        self.buffer = np.empty((rows_per_shard, row_len), dtype=dtype)
        self.filled = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, rows: np.ndarray) -> None:  # rows: [n, row_len]
        while len(rows):
            take = min(len(rows), len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + take] = rows[:take]
            self.filled += take
            rows = rows[take:]
            if self.filled == len(self.buffer):
                self._flush()

    def close(self) -> None:
        if self.filled:
            self._flush()

    def _flush(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        data = self.buffer[: self.filled].tobytes()
        write_atomic(self.out_dir / name, data)
        digest = hashlib.sha256(data).hexdigest()
        self.shards.append(
            {"file": name, "rows": self.filled, "bytes": len(data), "sha256": digest}
        )
        self.filled = 0


def write_index(
    out_dir: str | Path, splits: dict[str, dict[str, Any]], meta: dict[str, Any]
) -> Path:
    """Write `index.json` describing `splits` (entries from `write_split`) and caller `meta`."""
    formats = {tuple(entry[k] for k in _FORMAT_KEYS) for entry in splits.values()}
    if len(formats) != 1:
        raise ValueError(f"splits must share one (dtype, seq_len, vocab_size); got {formats}")
    dtype, seq_len, vocab_size = formats.pop()
    index = {
        "format": FORMAT_VERSION,
        "dtype": dtype,
        "seq_len": seq_len,
        "row_len": seq_len + 1,
        "vocab_size": vocab_size,
        "splits": {
            name: {k: v for k, v in entry.items() if k not in _FORMAT_KEYS}
            for name, entry in splits.items()
        },
        "meta": meta,
    }
    path = Path(out_dir) / INDEX_FILE
    write_atomic(path, json.dumps(index, indent=2) + "\n")
    return path


class ShardSet:
    """One split's rows, memory-mapped across its shard files and indexed as one array."""

    def __init__(
        self, split: str, seq_len: int, vocab_size: int, arrays: list[np.memmap], fingerprint: str
    ):
        self.split = split
        self.seq_len = seq_len
        self.row_len = seq_len + 1
        self.vocab_size = vocab_size
        self.fingerprint = fingerprint  # hash of the shards' sha256s: identifies the data
        self._arrays = arrays  # each [rows_in_shard, row_len]
        self._starts = np.cumsum([0] + [len(a) for a in arrays])  # first global row per shard
        self.num_rows = int(self._starts[-1])

    def __len__(self) -> int:
        return self.num_rows

    def row(self, i: int) -> np.ndarray:
        """Row `i` as a `[row_len]` array of token ids."""
        return self.rows(np.array([i]))[0]

    def rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows at `indices` (any order, repeats allowed) as a `[n, row_len]` array."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(
                f"row index out of range 0..{self.num_rows - 1} in split '{self.split}'"
            )
        shard = np.searchsorted(self._starts, idx, side="right") - 1  # [n] shard of each row
        local = idx - self._starts[shard]
        out = np.empty((len(idx), self.row_len), dtype=self._arrays[0].dtype)
        for s in np.unique(shard):
            hit = shard == s
            out[hit] = self._arrays[s][local[hit]]  # reads only the requested rows
        return out


def open_split(shard_dir: str | Path, split: str, verify: bool = True) -> ShardSet:
    """Open one split of a shard folder; with `verify`, check every shard's sha256."""
    folder = Path(shard_dir)
    index = read_index(folder)
    splits = index["splits"]
    if split not in splits:
        raise DataError(
            f"{folder / INDEX_FILE}: no split '{split}' (available: {', '.join(sorted(splits))})"
        )
    dtype = np.dtype(index["dtype"])
    arrays = []
    for shard in splits[split]["shards"]:
        path = folder / shard["file"]
        if not path.is_file():
            raise DataError(f"shard file missing: {path}")
        found = path.stat().st_size
        if found != shard["bytes"]:
            raise DataError(
                f"shard file truncated or resized: {path} (expected {shard['bytes']} bytes, "
                f"found {found})"
            )
        if verify and _sha256(path) != shard["sha256"]:
            raise DataError(f"shard file corrupt: {path} (sha256 does not match index.json)")
        arrays.append(
            np.memmap(path, dtype=dtype, mode="r", shape=(shard["rows"], index["row_len"]))
        )
    digests = "".join(shard["sha256"] for shard in splits[split]["shards"])
    fingerprint = hashlib.sha256(digests.encode()).hexdigest()[:16]
    return ShardSet(split, index["seq_len"], index["vocab_size"], arrays, fingerprint)


def read_index(shard_dir: str | Path) -> dict[str, Any]:
    """The parsed `index.json` of a shard folder, or a DataError saying what is wrong with it."""
    path = Path(shard_dir) / INDEX_FILE
    if not path.is_file():
        raise DataError(f"shard index not found: {path}")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable shard index ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT_VERSION:
        found = index.get("format") if isinstance(index, dict) else None
        raise DataError(f"{path}: shard index format {found!r}, expected {FORMAT_VERSION}")
    return index


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
