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
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    top_sizes, dup_sizes = set(top_ngram_sizes), set(dup_ngram_sizes)
    top_chars = dict.fromkeys(top_sizes, 0)
    dup_chars = dict.fromkeys(dup_sizes, 0)
    for n, gram, counts in _ngrams(ids, max(top_sizes | dup_sizes, default=0)):
        if n in top_sizes:
            top_chars[n] = _top_ngram_chars(gram, counts, lengths, n)
        if n in dup_sizes:
            dup_chars[n] = _covered_chars(np.flatnonzero(counts[gram] > 1), lengths, n)
    stats |= {f"top_{n}gram_char_frac": _ratio(c, total) for n, c in top_chars.items()}
    stats |= {f"dup_{n}gram_char_frac": _ratio(c, total) for n, c in dup_chars.items()}
    return stats


def char_fractions(text: str) -> dict[str, float]:
    """Fractions of all characters that are letters, digits, whitespace and non-ASCII."""
    counts = Counter(text)  # classify each distinct character once, not every character

    def fraction(is_class: Callable[[str], bool]) -> float:
        return _ratio(sum(n for char, n in counts.items() if is_class(char)), len(text))

    return {
        "alpha": fraction(str.isalpha),
        "digit": fraction(str.isdigit),
        "whitespace": fraction(str.isspace),
        "non_ascii": fraction(lambda char: not char.isascii()),
    }


def _ngrams(ids: np.ndarray, max_n: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """For n = 1..max_n: (n, the index of each start position's n-gram among the distinct
    n-grams, how often each distinct n-gram occurs).

    Exact and one sort per n: an n-gram is the pair (its (n-1)-gram's index, its last word).
    """
    vocab_size = int(ids.max(initial=0)) + 1
    gram = np.zeros(len(ids) + 1, dtype=np.int64)  # the empty 0-gram, at every position
    for n in range(1, min(max_n, len(ids)) + 1):
        pairs = gram[:-1] * vocab_size + ids[n - 1 :]  # (positions,) < len(ids) * vocab_size
        _, gram, counts = np.unique(pairs, return_inverse=True, return_counts=True)
        yield n, gram, counts


def _top_ngram_chars(gram: np.ndarray, counts: np.ndarray, lengths: np.ndarray, n: int) -> int:
    """Word characters covered by the most frequent n-gram (ties: the one with more characters)."""
    if counts.max() < 2:
        return 0
    word_chars = np.concatenate([[0], np.cumsum(lengths)])
    gram_chars = np.zeros(len(counts), dtype=np.int64)
    gram_chars[gram] = word_chars[n:] - word_chars[:-n]  # each distinct n-gram's characters
    top = np.lexsort((gram_chars, counts))[-1]
    return _covered_chars(np.flatnonzero(gram == top), lengths, n)


def _covered_chars(starts: np.ndarray, lengths: np.ndarray, n: int) -> int:
    """Characters of the words covered by the n-grams starting at `starts`, each word once."""
    size = len(lengths) + 1
    depth = np.bincount(starts, minlength=size) - np.bincount(starts + n, minlength=size)
    covered = np.cumsum(depth[:-1]) > 0  # (words,) inside at least one of the n-grams
    return int(lengths[covered].sum())


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0
