"""Sources: turn each `data.sources` entry of a recipe into a stream of `Document`s.

Every reader yields documents in a deterministic order with ids derived from where the text
came from (a relative path, a line number, a row number or the user's own id), so the same
files give the same corpus on any machine. A reader checks the input as it goes and stops at
the first problem with one line that names the source, the file and what would be valid:
a typo in a column name should cost seconds, not a failed training run.

`fingerprint` identifies a source's *content*, so a build cache keyed on it is invalidated
when a user edits a data file, even though the recipe did not change.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stacklab.data.documents import Document
from stacklab.errors import DataError
from stacklab.recipe import JsonlSource, ParquetSource, SourceConfig, StdlibSource, TextSource

PARQUET_BATCH_ROWS = 4096
_THIRD_PARTY_DIRS = {"site-packages", "dist-packages"}


@dataclass
class ReadStats:
    """What a reader saw but did not yield; pass one to `iter_documents` to collect it."""

    undecodable: int = 0  # files skipped because they are not valid UTF-8


def iter_documents(source: SourceConfig, stats: ReadStats | None = None) -> Iterator[Document]:
    """Yield the documents of one source, in a deterministic order."""
    stats = stats if stats is not None else ReadStats()
    if source.kind in ("stdlib", "text"):
        return _read_files(source, stats)
    if source.kind == "jsonl":
        return _read_jsonl(source)
    return _read_parquet(source)


def fingerprint(source: SourceConfig) -> str:
    """A hex digest of the source's content: it changes when any file it reads changes.

    The stdlib is identified cheaply by the Python version and each file's size and mtime;
    user sources hash every file's bytes, since an edit may keep the size and the mtime.
    """
    digest = hashlib.sha256(source.kind.encode())
    if source.kind == "stdlib":
        digest.update(f"{sys.version}\0{stdlib_root()}".encode())
        for path, rel in _stdlib_files():
            st = path.stat()
            digest.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return digest.hexdigest()
    for path, rel in _source_files(source):
        digest.update(f"\0{rel}\0".encode())
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: str | Path, key: str) -> str:
    """sha256 of one user file's bytes; a missing file is a DataError naming `key`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: file not found: {path}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def stdlib_root() -> Path:
    """The folder holding this Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


# --------------------------------------------------------------------------- which files


def _source_files(source: SourceConfig) -> list[tuple[Path, str]]:
    """Every file a source reads, as (absolute path, posix path relative to the root), sorted."""
    if source.kind == "stdlib":
        return _stdlib_files()
    if source.kind == "jsonl":
        path = _existing(source, "a .jsonl file")
        if not path.is_file():
            raise DataError(f"source '{source.name}': {path} is not a file; expected a .jsonl file")
        return [(path, path.name)]
    if source.kind == "text":
        return _matching_files(source, source.glob, "text files")
    return _matching_files(source, "**/*.parquet", ".parquet files")


def _stdlib_files() -> list[tuple[Path, str]]:
    root = stdlib_root()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _THIRD_PARTY_DIRS]
        for name in files:
            if name.endswith(".py"):
                path = Path(folder, name)
                found.append((path, path.relative_to(root).as_posix()))
    return sorted(found, key=lambda item: item[1])


def _matching_files(
    source: TextSource | ParquetSource, glob: str, what: str
) -> list[tuple[Path, str]]:
    root = _existing(source, f"a file or a folder of {what}")
    if root.is_file():
        return [(root, root.name)]
    found = sorted(
        ((p, p.relative_to(root).as_posix()) for p in root.glob(glob) if p.is_file()),
        key=lambda item: item[1],
    )
    if not found:
        present = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        seen = "it is empty"
        if present:
            seen = f"it holds {len(present)} files, e.g. {', '.join(present[:3])}"
        raise DataError(
            f"source '{source.name}': no {what} matching '{glob}' under {root} ({seen})"
        )
    return found


def _existing(source: TextSource | JsonlSource | ParquetSource, expected: str) -> Path:
    path = Path(source.path)
    if not path.exists():
        raise DataError(f"source '{source.name}': path not found: {path} (expected {expected})")
    return path


# --------------------------------------------------------------------------- readers


def _read_files(source: StdlibSource | TextSource, stats: ReadStats) -> Iterator[Document]:
    for path, rel in _source_files(source):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            stats.undecodable += 1
            continue
        yield Document(id=f"{source.name}:{rel}", source=source.name, text=text, path=rel)


def _read_jsonl(source: JsonlSource) -> Iterator[Document]:
    ((path, _),) = _source_files(source)
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"source '{source.name}': {path}:{lineno}"
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            for key in (source.field, source.id_field):
                if key is not None and key not in record:
                    keys = ", ".join(repr(k) for k in record) or "none"
                    raise DataError(f"{where}: no field '{key}' (this line has: {keys})")
            text = _text(record[source.field], where, source.field)
            key = lineno if source.id_field is None else record[source.id_field]
            yield Document(id=f"{source.name}:{key}", source=source.name, text=text)


def _read_parquet(source: ParquetSource) -> Iterator[Document]:
    files = _source_files(source)
    for path, rel in files:
        where = f"source '{source.name}': {path}"
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{where}: not a readable Parquet file ({_one_line(exc)})") from None
        names = parquet.schema_arrow.names
        columns = [c for c in (source.column, source.id_column) if c is not None]
        for column in columns:
            if column not in names:
                raise DataError(
                    f"{where}: no column '{column}' (available: {', '.join(names) or 'none'})"
                )
        # Row ids name the file too when a folder holds several, so they stay unique.
        prefix = f"{source.name}:" if len(files) == 1 else f"{source.name}:{rel}:"
        row = 0
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
                texts = batch.column(source.column).to_pylist()
                ids = (
                    batch.column(source.id_column).to_pylist()
                    if source.id_column is not None
                    else range(row, row + len(texts))
                )
                for i, (value, key) in enumerate(zip(texts, ids, strict=True)):
                    text = _text(value, f"{where}: row {row + i}", source.column)
                    yield Document(id=f"{prefix}{key}", source=source.name, text=text)
                row += len(texts)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{where}: Parquet data unreadable ({_one_line(exc)})") from None


def _text(value: object, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: '{field}' must be a string, got {type(value).__name__} ({value!r:.40})"
        )
    return value


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
