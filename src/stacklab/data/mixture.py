"""The data mixture: how many training tokens each source gets, and in what order.

A recipe gives each source a weight and the whole run a token budget. Turning that into a
training stream takes three decisions, each a pure function of its inputs and a seed so that
two builds of the same recipe see the same tokens:

* **Held-out split.** A document is held out iff the sha256 of its id, read as a number in
  [0, 1), is below the validation fraction. It depends on nothing but the id, so adding or
  removing other documents never moves a document between splits.
* **Token targets.** The budget is divided in proportion to the weights, rounded so that the
  shares add up to exactly the budget (largest remainder).
* **The plan.** Each source's documents are taken in a seeded random order until its target
  is met. A small source is repeated, in a fresh order each epoch (upsampling), and the plan
  records how many epochs that took: repetition is a knob worth seeing, not hiding. All picks
  are then shuffled together so that sources are interleaved evenly through training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from stacklab.errors import DataError


def is_heldout(doc_id: str, val_fraction: float) -> bool:
    """Whether the document with this id belongs to the held-out split."""
    return _hash64(doc_id) / 2**64 < val_fraction


def token_targets(weights: dict[str, float], budget: int) -> dict[str, int]:
    """Each source's share of `budget` tokens, proportional to its weight, summing to `budget`."""
    if not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise ValueError(f"mixture weights must be non-negative with a positive sum: {weights}")
    total = sum(Fraction(w) for w in weights.values())
    exact = {name: Fraction(w) * budget / total for name, w in weights.items()}
    targets = {name: int(share) for name, share in exact.items()}  # floor: shares are >= 0
    left = budget - sum(targets.values())
    by_remainder = sorted(exact, key=lambda name: exact[name] - targets[name], reverse=True)
    for name in by_remainder[:left]:
        targets[name] += 1
    return targets


@dataclass(frozen=True)
class SourceStats:
    docs: int  # documents picked, repeats counted
    tokens: int  # tokens picked (the last document may overshoot the target)
    epochs: float  # tokens picked / tokens available: above 1 means upsampled


@dataclass(frozen=True)
class MixturePlan:
    order: list[tuple[str, int]]  # (source, index into that source's documents), in train order
    sources: dict[str, SourceStats]


def plan_mixture(lengths: dict[str, list[int]], targets: dict[str, int], seed: int) -> MixturePlan:
    """Pick documents from each source until its token target is met, then interleave them.

    `lengths[source][i]` is the token count of document i of that source; `targets` comes from
    `token_targets`. Every source in `targets` gets stats; a source missing from `lengths` has
    no documents.
    """
    names = list(targets)
    picks: list[np.ndarray] = []
    stats: dict[str, SourceStats] = {}
    for name in names:
        sizes = np.asarray(lengths.get(name, []), dtype=np.int64)
        chosen = _pick(name, sizes, targets[name], seed)
        picks.append(chosen)
        taken = int(sizes[chosen].sum())
        available = int(sizes.sum())
        stats[name] = SourceStats(
            docs=len(chosen), tokens=taken, epochs=taken / available if available else 0.0
        )
    source_of = np.repeat(np.arange(len(names)), [len(p) for p in picks])
    index = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
    perm = _rng(seed, "interleave").permutation(len(index))
    order = [
        (names[s], i) for s, i in zip(source_of[perm].tolist(), index[perm].tolist(), strict=True)
    ]
    return MixturePlan(order=order, sources=stats)


def _pick(name: str, sizes: np.ndarray, target: int, seed: int) -> np.ndarray:
    """Document indices of one source, epoch after shuffled epoch, until `target` tokens."""
    if target <= 0:
        return np.zeros(0, dtype=np.int64)
    available = int(sizes.sum())
    if available <= 0:
        raise DataError(
            f"mixture source {name!r} has no documents (or only empty ones) but a target of "
            f"{target} tokens"
        )
    # Each source has its own stream, so adding a source does not change another's picks.
    rng = _rng(seed, f"source:{name}")
    epochs = -(-target // available)  # ceil: the epochs before the last are taken whole
    whole = [rng.permutation(len(sizes)) for _ in range(epochs)]
    need = target - (epochs - 1) * available  # tokens still wanted from the last epoch, > 0
    last = whole.pop()
    stop = int(np.searchsorted(np.cumsum(sizes[last]), need)) + 1  # first cumsum >= need
    return np.concatenate([*whole, last[:stop]])


def _rng(seed: int, purpose: str) -> np.random.Generator:
    """A numpy generator for one purpose, from any int seed (negative ones included)."""
    return np.random.default_rng(_hash64(f"{seed}:{purpose}"))


def _hash64(text: str) -> int:
    """The first 64 bits of sha256(text): stable across machines, runs and Python versions."""
    # surrogatepass: ids built from undecodable file names still hash, deterministically.
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big")
