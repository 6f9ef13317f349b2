import random

import numpy as np

from stacklab.data.dedup import exact_dedup, near_dedup, shingle_hashes
from stacklab.data.documents import Document
from stacklab.recipe import DedupConfig


def doc(text: str, id: str) -> Document:
    return Document(id=id, source="s", text=text)


def random_words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"w{rng.randrange(5000)}" for _ in range(n)]


def test_exact_dedup_keeps_first_occurrence():
    docs = [doc("a", "1"), doc("b", "2"), doc("a", "3"), doc("a ", "4"), doc("b", "5")]
    kept, removed = exact_dedup(docs)
    assert [d.id for d in kept] == ["1", "2", "4"]
    assert removed == 2


def test_near_dedup_removes_near_copy_and_keeps_different_docs():
    base = random_words(400, seed=0)
    edited = list(base)
    edited[200] = "changed"
    docs = [
        doc(" ".join(random_words(400, seed=1)), "other1"),
        doc(" ".join(base), "original"),
        doc(" ".join(random_words(400, seed=2)), "other2"),
        doc(" ".join(edited), "copy"),
        doc(" ".join(base[:200] + random_words(200, seed=3)), "half"),
    ]
    kept, removed = near_dedup(docs, DedupConfig())
    assert [d.id for d in kept] == ["other1", "original", "other2", "half"]
    assert removed == 1


def test_near_dedup_is_deterministic_and_handles_short_docs():
    docs = [doc("a b", "1"), doc("a b", "2"), doc("b a", "3"), doc("", "4"), doc(" ", "5")]
    first = near_dedup(docs, DedupConfig(), seed=3)
    assert first == near_dedup(docs, DedupConfig(), seed=3)
    assert [d.id for d in first[0]] == ["1", "3", "4"]
    assert near_dedup([], DedupConfig()) == ([], 0)


def test_shingle_hashes():
    # fewer words than the shingle size: the whole text is one shingle
    assert len(shingle_hashes("a b", 5)) == 1
    assert shingle_hashes("a b", 5)[0] != shingle_hashes("b a", 5)[0]
    # distinct shingles only, as a sorted set
    hashes = shingle_hashes("a b a b a b", 2)
    assert len(hashes) == 2 and hashes.dtype == np.uint32
    assert np.array_equal(shingle_hashes("x  y\nz", 2), shingle_hashes("x y z", 2))
