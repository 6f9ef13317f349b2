from typing import get_args

import pytest

from stacklab.data.documents import Document
from stacklab.data.filters import (
    FILTERS,
    apply_filters,
    char_fractions,
    keep_char_ratio,
    keep_length,
    keep_path,
    keep_repetition,
    repetition_stats,
)
from stacklab.recipe import (
    CharRatioFilter,
    FilterConfig,
    LengthFilter,
    PathExcludeFilter,
    RepetitionFilter,
)


def doc(text: str, path: str | None = None, id: str = "s:0") -> Document:
    return Document(id=id, source="s", text=text, path=path)


def test_registry_covers_every_filter_config():
    union = get_args(get_args(FilterConfig)[0])
    assert set(FILTERS) == {cls.model_fields["name"].default for cls in union}


# --------------------------------------------------------------------------- repetition


def test_repetition_line_stats():
    # non-blank lines: "aa", "b", "aa", "cccc" (the blank and whitespace-only ones are ignored)
    stats = repetition_stats("aa\nb\n\n  \naa\ncccc")
    assert stats["dup_line_frac"] == pytest.approx(2 / 4)
    assert stats["dup_line_char_frac"] == pytest.approx(4 / 9)


def test_repetition_top_ngram_covers_each_word_once():
    # words: a b c a b c x y (8 words, 8 characters)
    stats = repetition_stats("a b c a b c x y", top_ngram_sizes=(2, 3, 4), dup_ngram_sizes=())
    assert stats["top_2gram_char_frac"] == pytest.approx(4 / 8)  # "a b" twice
    assert stats["top_3gram_char_frac"] == pytest.approx(6 / 8)  # "a b c" twice
    assert stats["top_4gram_char_frac"] == 0.0  # no 4-gram repeats
    # overlapping occurrences: "a a" occurs 3 times in 4 words, but covers each word once
    assert repetition_stats("a a a a", (2,), ())["top_2gram_char_frac"] == 1.0


def test_repetition_top_ngram_ties_prefer_more_characters():
    # "x y", "y long" and "long word" each occur twice; "long word" has the most characters
    # and covers 16 of the 20 word characters
    stats = repetition_stats("x y long word x y long word", (2,), ())
    assert stats["top_2gram_char_frac"] == pytest.approx(16 / 20)


def test_repetition_duplicated_ngrams():
    # 12 words of 1 char; "1 2 3 4 5" occurs twice → 10 words covered by duplicated 5-grams
    text = "1 2 3 4 5 a 1 2 3 4 5 b"
    stats = repetition_stats(text, top_ngram_sizes=(), dup_ngram_sizes=(5, 6))
    assert stats["dup_5gram_char_frac"] == pytest.approx(10 / 12)
    assert stats["dup_6gram_char_frac"] == 0.0
    # counts word characters, not spaces: "aaa bb" twice covers 10 of 14
    stats = repetition_stats("aaa bb aaa bb cccc", top_ngram_sizes=(), dup_ngram_sizes=(2,))
    assert stats["dup_2gram_char_frac"] == pytest.approx(10 / 14)


def test_repetition_on_short_and_empty_text():
    assert set(repetition_stats("").values()) == {0.0}
    stats = repetition_stats("just three words")
    assert stats["dup_10gram_char_frac"] == 0.0 and stats["top_2gram_char_frac"] == 0.0


def test_keep_repetition():
    prose = " ".join(f"word{i}" for i in range(300))
    spam = "\n".join(["buy cheap pills now"] * 20)
    assert keep_repetition(doc(prose), RepetitionFilter())
    assert not keep_repetition(doc(spam), RepetitionFilter())
    loose = RepetitionFilter(
        max_dup_line_frac=1,
        max_dup_line_char_frac=1,
        max_top_ngram_char_frac={2: 1.0},
        max_dup_ngram_char_frac={5: 1.0},
    )
    assert keep_repetition(doc(spam), loose)


# --------------------------------------------------------------------------- the others


def test_keep_length():
    cfg = LengthFilter(min_chars=5, max_chars=10, min_words=2)
    assert keep_length(doc("ab cd"), cfg)
    assert not keep_length(doc("ab c"), cfg)  # 4 chars
    assert not keep_length(doc("abcdefghijk"), cfg)  # 11 chars
    assert not keep_length(doc("abcdefg"), cfg)  # one word
    assert keep_length(doc("abcdefg"), LengthFilter(min_chars=5, max_chars=10))


def test_char_fractions():
    assert char_fractions("ab 12é\n") == pytest.approx(
        {"alpha": 3 / 7, "digit": 2 / 7, "whitespace": 2 / 7, "non_ascii": 1 / 7}
    )
    assert set(char_fractions("").values()) == {0.0}


def test_keep_char_ratio():
    assert keep_char_ratio(doc("hello world"), CharRatioFilter(min_alpha_frac=0.8))
    assert not keep_char_ratio(doc("12345 hello"), CharRatioFilter(min_alpha_frac=0.8))
    assert not keep_char_ratio(doc("12345 hello"), CharRatioFilter(max_digit_frac=0.4))
    assert not keep_char_ratio(doc("a     b"), CharRatioFilter(max_whitespace_frac=0.5))
    assert not keep_char_ratio(doc("日本語 text"), CharRatioFilter(max_non_ascii_frac=0.2))


def test_keep_path():
    cfg = PathExcludeFilter(patterns=["test/*", "*/tests/*"])
    assert not keep_path(doc("x", path="test/test_os.py"), cfg)
    assert not keep_path(doc("x", path="lib2to3/tests/data/x.py"), cfg)
    assert keep_path(doc("x", path="os.py"), cfg)
    assert keep_path(doc("x", path="Test/x.py"), cfg)  # case-sensitive
    assert keep_path(doc("x"), cfg)  # no path


# --------------------------------------------------------------------------- apply_filters


def test_apply_filters_counts_first_rejection_in_recipe_order():
    docs = [
        doc("short", path="a.py", id="s:1"),
        doc("x" * 50, path="test/b.py", id="s:2"),
        doc("y" * 50, path="c.py", id="s:3"),
        doc("z" * 500, path="d.py", id="s:4"),
    ]
    filters = [
        PathExcludeFilter(patterns=["test/*"]),
        LengthFilter(min_chars=10, max_chars=100),
        LengthFilter(min_chars=0, max_chars=40),
        CharRatioFilter(),
    ]
    kept, removed = apply_filters(docs, filters)
    assert kept == []
    assert removed == {"path_exclude": 1, "length": 2, "length#2": 1, "char_ratio": 0}


def test_apply_filters_without_filters_keeps_all():
    docs = [doc("a", id="s:1"), doc("b", id="s:2")]
    assert apply_filters(iter(docs), []) == (docs, {})
