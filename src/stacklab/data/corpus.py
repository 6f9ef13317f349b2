"""The corpus stage: every source → filters → exact dedup → near dedup → `documents.jsonl`.

Dedup runs across all sources together, since the same text often arrives by two routes
(a file that is also in a dump). The metrics count what each step removed, per filter and
per source, so that a contribution that retunes a filter shows its effect on the data as well
as on the model. Mixture, synthetic tasks and packing are later stages that read this file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from stacklab.data.dedup import exact_dedup, near_dedup
from stacklab.data.documents import write_jsonl
from stacklab.data.filters import apply_filters, filter_keys
from stacklab.data.sources import ReadStats, iter_documents
from stacklab.errors import DataError
from stacklab.recipe import DataConfig

DOCUMENTS = "documents.jsonl"


def build_corpus(cfg: DataConfig, out_dir: Path) -> dict[str, float]:
    """Write the filtered, deduplicated documents to `out_dir/documents.jsonl`; return metrics."""
    stats = ReadStats()
    read: dict[str, int] = {}
    removed = dict.fromkeys(filter_keys(cfg.filters), 0)
    docs = []
    for source in cfg.sources:
        before = stats.undecodable
        kept, removed_here = apply_filters(iter_documents(source, stats), cfg.filters)
        read[source.name] = len(kept) + sum(removed_here.values())
        if read[source.name] == 0:
            skipped = stats.undecodable - before
            raise DataError(
                f"source '{source.name}' yielded no documents"
                + (f" ({skipped} files skipped as not UTF-8)" if skipped else "")
            )
        for key, n in removed_here.items():
            removed[key] += n
        docs.extend(kept)

    exact_removed = near_removed = 0
    if cfg.dedup.exact:
        docs, exact_removed = exact_dedup(docs)
    if cfg.dedup.near:
        docs, near_removed = near_dedup(docs, cfg.dedup)
    if not docs:
        steps = [f"{key} removed {n}" for key, n in removed.items()]
        steps += [f"exact dedup removed {exact_removed}", f"near dedup removed {near_removed}"]
        raise DataError(
            f"corpus is empty after filtering and dedup: {sum(read.values())} read, "
            + ", ".join(steps)
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(docs, out_dir / DOCUMENTS)
    kept_per_source = Counter(doc.source for doc in docs)
    metrics: dict[str, float] = {"data/docs_read": sum(read.values())}
    metrics |= {f"data/docs_read/{name}": n for name, n in read.items()}
    metrics |= {f"data/removed/{key}": n for key, n in removed.items()}
    metrics |= {
        "data/dedup_exact_removed": exact_removed,
        "data/dedup_near_removed": near_removed,
        "data/docs_kept": len(docs),
        "data/chars_kept": sum(len(doc.text) for doc in docs),
        "data/undecodable_skipped": stats.undecodable,
    }
    metrics |= {f"data/docs_kept/{name}": kept_per_source[name] for name in read}
    return metrics
