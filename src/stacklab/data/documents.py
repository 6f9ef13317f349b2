"""Documents: the unit that flows from sources through filters and dedup into the mixture.

A document's `id` is stable across runs and machines (derived from where it came from, not
from the order it was read in), so held-out splits and dedup decisions are reproducible.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from stacklab.errors import DataError
from stacklab.fileio import atomic_open


@dataclass(frozen=True)
class Document:
    id: str  # stable: "<source>:<relative path or row key>"
    source: str  # the source's `name` in the recipe
    text: str
    path: str | None = None  # file path relative to the source root, for code corpora


def write_jsonl(docs: Iterable[Document], path: Path) -> int:
    """Write documents as JSON Lines (via a temp file, then rename); return how many."""
    n = 0
    with atomic_open(path) as f:
        for doc in docs:
            f.write(json.dumps(asdict(doc), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> Iterator[Document]:
    """Read documents written by `write_jsonl`."""
    if not path.is_file():
        raise DataError(f"document file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                yield Document(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as exc:
                raise DataError(f"{path}:{lineno}: not a document record ({exc})") from None
