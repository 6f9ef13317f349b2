"""The training text: a few thousand sentences from a small grammar, generated with a fixed seed.

The text is the same on every run (its generator's seed is fixed, not the run's seed), so runs
differ only in the model's initialisation and the order of the batches.
"""

from __future__ import annotations

import random

import torch

NOUNS = {
    "cat": "cats",
    "dog": "dogs",
    "fox": "foxes",
    "bird": "birds",
    "child": "children",
    "farmer": "farmers",
    "miller": "millers",
    "sailor": "sailors",
    "horse": "horses",
    "mouse": "mice",
    "goose": "geese",
    "baker": "bakers",
    "weaver": "weavers",
    "shepherd": "shepherds",
    "wolf": "wolves",
    "rabbit": "rabbits",
    "merchant": "merchants",
    "soldier": "soldiers",
    "teacher": "teachers",
    "traveller": "travellers",
    "owl": "owls",
    "donkey": "donkeys",
    "blacksmith": "blacksmiths",
    "fisherman": "fishermen",
    "king": "kings",
    "queen": "queens",
    "sheep": "sheep",
    "beggar": "beggars",
    "piper": "pipers",
    "stranger": "strangers",
}
VERBS = {
    "sees": "see",
    "chases": "chase",
    "follows": "follow",
    "watches": "watch",
    "finds": "find",
    "hears": "hear",
    "carries": "carry",
    "greets": "greet",
    "feeds": "feed",
    "helps": "help",
    "teaches": "teach",
    "visits": "visit",
    "remembers": "remember",
    "frightens": "frighten",
    "admires": "admire",
    "ignores": "ignore",
    "calls": "call",
    "thanks": "thank",
    "forgets": "forget",
    "pushes": "push",
}
ADJECTIVES = [
    "small", "old", "quick", "quiet", "brown", "happy", "tired", "clever", "grey", "young",
    "proud", "hungry", "gentle", "lazy", "brave", "curious", "wicked", "honest", "silly",
    "patient", "careful", "noisy", "lonely", "wise", "angry", "cheerful", "sleepy", "famous",
]  # fmt: skip
PLACES = [
    "the mill", "the river", "the barn", "the hill", "the market", "the old bridge",
    "the forest", "the castle", "the harbour", "the church", "the well", "the garden",
    "the village green", "the crossroads", "the inn", "the meadow", "the orchard", "the gate",
]  # fmt: skip
TIMES = [
    "at dawn", "at noon", "in the rain", "before supper", "after the storm", "at midnight",
    "in the spring", "every morning", "on market day", "in the snow", "after the harvest",
]  # fmt: skip
PREPOSITIONS = ["near", "behind", "beside", "inside", "beyond", "under", "across"]


def _noun_phrase(rng: random.Random) -> tuple[str, bool]:
    plural = rng.random() < 0.4
    singular = rng.choice(list(NOUNS))
    noun = NOUNS[singular] if plural else singular
    words = ["the"]
    if rng.random() < 0.5:
        words.append(rng.choice(ADJECTIVES))
    words.append(noun)
    return " ".join(words), plural


def _sentence(rng: random.Random) -> str:
    subject, plural = _noun_phrase(rng)
    verb = rng.choice(list(VERBS))
    if plural:
        verb = VERBS[verb]
    obj, _ = _noun_phrase(rng)
    words = [subject, verb, obj]
    if rng.random() < 0.5:
        words.append(rng.choice(PREPOSITIONS) + " " + rng.choice(PLACES))
    if rng.random() < 0.3:
        words.append(rng.choice(TIMES))
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def make_text(n_sentences: int = 1200, seed: int = 1234) -> str:
    rng = random.Random(seed)
    return " ".join(_sentence(rng) for _ in range(n_sentences)) + "\n"


def load(val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The encoded training and held-out characters, and the vocabulary."""
    text = make_text()
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    n_val = int(len(ids) * val_fraction)
    return ids[:-n_val], ids[-n_val:], vocab
