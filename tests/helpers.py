"""Small generated corpora and recipes shared by the end-to-end tests, and the switch that turns
a skip for a missing service into a failure."""

import json
import os
import random
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
import yaml

from stacklab.data.shards import write_index, write_split

WORDS = [
    "".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=3 + i % 6)) for i in range(400)
]

# A model small enough to pretrain for a few dozen steps in about a second.
SMALL_MODEL = {
    "model": {"depth": 2, "aspect": 16, "head_dim": 16, "max_seq_len": 64},
    "pretrain": {"steps": 30, "batch_size": 4, "ckpt_every": 10, "log_every": 10},
    "optim": {"warmup_steps": 5},
    "eval": {"task_problems": 16, "val_batches": 4, "max_new_tokens": 6},
}


def skip_or_fail(require_var: str, reason: str) -> NoReturn:
    """Skip the test because what it needs is missing (`reason`), or fail it when the
    environment variable `require_var` is "1": CI sets the STACKLAB_REQUIRE_* variables where
    the service must be there, so a missing one cannot pass as a skip."""
    if os.environ.get(require_var) == "1":
        pytest.fail(f"{require_var}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def make_corpus(path: Path, n_docs: int = 200, seed: int = 0) -> None:
    """Distinct pseudo-English documents of 80-200 words, one JSON object a line."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n_docs):
            words = rng.choices(WORDS, k=rng.randint(80, 200))
            text = " ".join(words) + f". Document {i} ends here.\n"
            f.write(json.dumps({"text": text, "id": f"doc{i}"}) + "\n")


def small_recipe(tmp_path: Path, sections: dict | None = None, **data_overrides: object) -> Path:
    """A recipe over a generated JSONL corpus in `tmp_path`; `sections` adds model etc."""
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        make_corpus(corpus)
    recipe = {
        "name": "small",
        "seed": 1,
        "data": {
            "sources": [{"kind": "jsonl", "name": "web", "path": "corpus.jsonl", "id_field": "id"}],
            "filters": [{"name": "length", "min_chars": 50}],
            "tasks": [{"kind": "arithmetic", "max_digits": 2, "weight": 0.2}],
            "mixture": {"token_budget": 30_000, "val_fraction": 0.1, "val_token_budget": 3000},
            "packing": {"seq_len": 32, "rows_per_shard": 200},
            **data_overrides,
        },
        "tokenizer": {"vocab_size": 400, "train_chars": 200_000},
        **(sections or {}),
    }
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def random_shards(folder: Path, vocab: int = 64, seq_len: int = 32, seed: int = 0) -> Path:
    """A train split of 200 random documents (ids 8..vocab-1), rows of `seq_len` tokens."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(8, vocab, size=rng.integers(20, 80)).tolist() for _ in range(200)]
    info = write_split(folder, "train", docs, seq_len, rows_per_shard=100, vocab_size=vocab)
    write_index(folder, {"train": info}, meta={})
    return folder
