"""Document filters: cheap, explainable rules that drop text a model should not learn from.

Each filter is a pure function `(document, config) -> keep?` registered under the `name` of
its recipe config, so a recipe lists filters in the order they run and a contribution can
add, remove or retune one by patching that list. `apply_filters` counts every removal under
the first filter that rejected the document, which is what makes a filter's cost visible in
the build metrics.

The statistics behind the rules (`repetition_stats`, `char_fractions`) are exposed on their
own, so their exact definitions are pinned by tests and can be inspected on real documents.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from stacklab.data.documents import Document
from stacklab.recipe import (
    CharRatioFilter,
    FilterConfig,
    LengthFilter,
    PathExcludeFilter,
    RepetitionFilter,
)


def keep_length(doc: Document, cfg: LengthFilter) -> bool:
    """Keep documents of `min_chars..max_chars` characters and at least `min_words` words."""
    if not cfg.min_chars <= len(doc.text) <= cfg.max_chars:
        return False
    return cfg.min_words == 0 or len(doc.text.split()) >= cfg.min_words


def keep_repetition(doc: Document, cfg: RepetitionFilter) -> bool:
    """Keep documents under every Gopher repetition threshold (see `repetition_stats`)."""
    stats = repetition_stats(doc.text, cfg.max_top_ngram_char_frac, cfg.max_dup_ngram_char_frac)
    limits = {
        "dup_line_frac": cfg.max_dup_line_frac,
        "dup_line_char_frac": cfg.max_dup_line_char_frac,
        **{f"top_{n}gram_char_frac": v for n, v in cfg.max_top_ngram_char_frac.items()},
        **{f"dup_{n}gram_char_frac": v for n, v in cfg.max_dup_ngram_char_frac.items()},
    }
    return all(stats[key] <= limit for key, limit in limits.items())


def keep_char_ratio(doc: Document, cfg: CharRatioFilter) -> bool:
    """Keep documents whose character-class fractions are within the configured bounds."""
    frac = char_fractions(doc.text)
    return (
        frac["alpha"] >= cfg.min_alpha_frac
        and frac["digit"] <= cfg.max_digit_frac
        and frac["whitespace"] <= cfg.max_whitespace_frac
        and frac["non_ascii"] <= cfg.max_non_ascii_frac
    )


def keep_path(doc: Document, cfg: PathExcludeFilter) -> bool:
    """Drop documents whose path matches a glob (`*` also matches `/`); keep those without one."""
    return doc.path is None or not any(fnmatch.fnmatchcase(doc.path, p) for p in cfg.patterns)


FILTERS: dict[str, Callable[[Document, Any], bool]] = {
    "length": keep_length,
    "repetition": keep_repetition,
    "char_ratio": keep_char_ratio,
    "path_exclude": keep_path,
}


def filter_keys(filters: Sequence[FilterConfig]) -> list[str]:
    """Names that identify each filter in metrics: `name`, then `name#2` for a repeat."""
    seen: Counter[str] = Counter()
    keys = []
    for cfg in filters:
        seen[cfg.name] += 1
        keys.append(cfg.name if seen[cfg.name] == 1 else f"{cfg.name}#{seen[cfg.name]}")
    return keys


def apply_filters(
    docs: Iterable[Document], filters: Sequence[FilterConfig]
) -> tuple[list[Document], dict[str, int]]:
    """Run filters in recipe order; count each removed document under the first that rejects it."""
    keyed = list(zip(filter_keys(filters), filters, strict=True))
    removed = {key: 0 for key, _ in keyed}
    kept = []
    for doc in docs:
        rejected_by = next((key for key, cfg in keyed if not FILTERS[cfg.name](doc, cfg)), None)
        if rejected_by is None:
            kept.append(doc)
        else:
            removed[rejected_by] += 1
    return kept, removed


# --------------------------------------------------------------------------- statistics


def repetition_stats(
    text: str,
    top_ngram_sizes: Iterable[int] = (2, 3, 4),
    dup_ngram_sizes: Iterable[int] = (5, 6, 7, 8, 9, 10),
) -> dict[str, float]:
    """Gopher repetition statistics (Rae et al. 2021, appendix A), each a fraction in [0, 1].

    Lines are compared by exact text, blank (whitespace-only) lines ignored:
      dup_line_frac        non-blank lines whose text occurs more than once / non-blank lines
      dup_line_char_frac   characters of those lines / characters of all non-blank lines
    Words are `text.split()`; "word characters" are the characters of the words (no spaces):
      top_{n}gram_char_frac  word characters covered by occurrences of the most frequent word
                             n-gram (ties: the one with more characters); 0 if none repeats
      dup_{n}gram_char_frac  word characters covered by any word n-gram occurring more than
                             once, each word counted once however many n-grams cover it
    """
    lines = [line for line in text.splitlines() if line.strip()]
    line_counts = Counter(lines)
    dup_lines = [line for line in lines if line_counts[line] > 1]
    line_chars = sum(map(len, lines))
    stats = {
        "dup_line_frac": _ratio(len(dup_lines), len(lines)),
        "dup_line_char_frac": _ratio(sum(map(len, dup_lines)), line_chars),
    }
    words = text.split()
    vocab: dict[str, int] = {}
    ids = np.array([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.int64)
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    total = int(lengths.sum())
    for n in top_ngram_sizes:
        stats[f"top_{n}gram_char_frac"] = _ratio(_top_ngram_chars(ids, lengths, n), total)
    for n in dup_ngram_sizes:
        stats[f"dup_{n}gram_char_frac"] = _ratio(_dup_ngram_chars(ids, lengths, n), total)
    return stats


def char_fractions(text: str) -> dict[str, float]:
    """Fractions of all characters that are letters, digits, whitespace and non-ASCII."""
    n = len(text)
    return {
        "alpha": _ratio(sum(map(str.isalpha, text)), n),
        "digit": _ratio(sum(map(str.isdigit, text)), n),
        "whitespace": _ratio(sum(map(str.isspace, text)), n),
        "non_ascii": _ratio(n - len(text.encode("ascii", "ignore")), n),
    }


def _ngrams(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For each start position, the id of its n-gram among distinct n-grams, and their counts."""
    windows = np.lib.stride_tricks.sliding_window_view(ids, n)  # (positions, n)
    _, inverse, counts = np.unique(windows, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def _covered_chars(starts: np.ndarray, lengths: np.ndarray, n: int) -> int:
    """Characters of the words covered by n-grams starting at the positions in `starts`."""
    size = len(lengths) + 1
    depth = np.bincount(starts, minlength=size) - np.bincount(starts + n, minlength=size)
    covered = np.cumsum(depth[:-1]) > 0  # (words,) inside at least one of the n-grams
    return int(lengths[covered].sum())


def _top_ngram_chars(ids: np.ndarray, lengths: np.ndarray, n: int) -> int:
    if len(ids) < n:
        return 0
    gram, counts = _ngrams(ids, n)
    if counts.max() < 2:
        return 0
    word_chars = np.concatenate([[0], np.cumsum(lengths)])
    gram_chars = np.zeros(len(counts), dtype=np.int64)
    gram_chars[gram] = word_chars[n:] - word_chars[:-n]  # each n-gram's own characters
    top = np.lexsort((gram_chars, counts))[-1]  # most frequent, then most characters
    return _covered_chars(np.flatnonzero(gram == top), lengths, n)


def _dup_ngram_chars(ids: np.ndarray, lengths: np.ndarray, n: int) -> int:
    if len(ids) < n:
        return 0
    gram, counts = _ngrams(ids, n)
    return _covered_chars(np.flatnonzero(counts[gram] > 1), lengths, n)


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0
