"""Deduplication: train on each piece of text once.

Repeated documents waste compute and make a model memorise them (Lee et al. 2022,
"Deduplicating Training Data Makes Language Models Better"). Two passes, both keeping the
first occurrence in input order so the result does not depend on anything but the input:

* exact: documents with the same sha256 of their text;
* near: documents whose sets of word n-grams ("shingles") have an estimated Jaccard
  similarity of at least `threshold` with a document already kept. MinHash sketches each
  document in `num_perm` numbers and LSH finds the candidates without comparing all pairs;
  each candidate is then confirmed with the sketches' Jaccard estimate, which drops most of
  LSH's false positives.

Shingles are hashed with numpy (each distinct word once, then a polynomial hash over each
window of words), so sketching the ~30 MB standard library takes seconds, not minutes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
from datasketch import MinHash, MinHashLSH

from stacklab.data.documents import Document
from stacklab.progress import track
from stacklab.recipe import DedupConfig

SKETCH_CHUNK = 8192  # shingles per MinHash update: bounds memory to CHUNK x num_perm values
_SHINGLE_BASE = np.uint64(0x100000001B3)  # odd multiplier of the polynomial shingle hash


def exact_dedup(docs: Iterable[Document]) -> tuple[list[Document], int]:
    """Keep the first document of each distinct text; return (kept, number removed)."""
    seen: set[bytes] = set()
    kept = []
    removed = 0
    for doc in docs:
        digest = hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).digest()
        if digest in seen:
            removed += 1
        else:
            seen.add(digest)
            kept.append(doc)
    return kept, removed


def near_dedup(
    docs: Iterable[Document], cfg: DedupConfig, seed: int = 0
) -> tuple[list[Document], int]:
    """Keep the first document of each near-duplicate cluster; return (kept, number removed).

    A document is removed when it is near a document already *kept*; a chain a~b~c where only
    b is near both keeps a and c.
    """
    docs = list(docs)
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    # The shingles are hashed already, so the sketch's own hash function is the identity.
    template = MinHash(num_perm=cfg.num_perm, seed=seed, hashfunc=int)
    word_hashes: dict[str, int] = {}
    sketches: list[MinHash] = []  # of the kept documents, indexed by LSH key
    kept = []
    for doc in track(docs, "near dedup"):
        sketch = template.copy()
        shingles = shingle_hashes(doc.text, cfg.shingle_words, word_hashes)
        for start in range(0, len(shingles), SKETCH_CHUNK):
            sketch.update_batch(shingles[start : start + SKETCH_CHUNK])
        if any(sketch.jaccard(sketches[key]) >= cfg.threshold for key in lsh.query(sketch)):
            continue
        lsh.insert(len(sketches), sketch, check_duplication=False)
        sketches.append(sketch)
        kept.append(doc)
    return kept, len(docs) - len(kept)


def shingle_hashes(text: str, n: int, word_hashes: dict[str, int] | None = None) -> np.ndarray:
    """The distinct 32-bit hashes of the word n-grams of `text` (one shingle if fewer words).

    `word_hashes` caches each word's 64-bit hash across calls.
    """
    cache = word_hashes if word_hashes is not None else {}
    words = text.split()
    hashes = np.fromiter((_word_hash(w, cache) for w in words), dtype=np.uint64, count=len(words))
    width = min(n, len(hashes))
    shingles = np.zeros(len(hashes) - width + 1, dtype=np.uint64)  # (windows,)
    for k in range(width):  # Horner: h = (...(w0 * B + w1) * B + ...) + w_{n-1}, mod 2**64
        shingles = shingles * _SHINGLE_BASE + hashes[k : len(hashes) - width + 1 + k]
    folded = (shingles ^ (shingles >> np.uint64(32))).astype(np.uint32)
    return np.unique(folded)


def _word_hash(word: str, cache: dict[str, int]) -> int:
    value = cache.get(word)
    if value is None:
        digest = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        value = cache[word] = int.from_bytes(digest, "little")
    return value
