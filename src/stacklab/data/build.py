"""The data stages of a build: corpus → tokenizer → shards.

Each function here is a stage's `run`: it reads its inputs' files and the recipe, writes into
its own output directory, and returns flat metrics. What the stages do lives in the modules
they call (sources, filters, dedup, tasks, mixture, tokenizer, shards); this file only wires.

* **corpus**: read every source, filter, dedup → `documents.jsonl`.
* **tokenizer**: train byte-level BPE on a sample drawn by the mixture weights (task text
  included, held-out documents excluded) → `tokenizer.json`.
* **shards**: hold out validation documents, tokenize, plan the weighted mixture to the token
  budget (task text generated on demand), pack into rows → `train_*.bin`, `val_*.bin`,
  `index.json`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from stacklab.data.corpus import DOCUMENTS, build_corpus
from stacklab.data.documents import Document, read_jsonl
from stacklab.data.mixture import is_heldout, plan_mixture, token_targets
from stacklab.data.shards import write_index, write_split
from stacklab.data.sources import fingerprint
from stacklab.data.tasks import iter_task_documents, make_generator
from stacklab.data.tokenizer import (
    EOT,
    bytes_per_token,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from stacklab.pipeline import Metrics, Stage, StageContext
from stacklab.progress import track
from stacklab.recipe import DataConfig, Recipe

TOKENIZER = "tokenizer.json"


def mixture_weights(data: DataConfig) -> dict[str, float]:
    """Mixture weight of every source, task text included (as `task:<kind>`)."""
    weights = {s.name: s.weight for s in data.sources}
    weights.update({f"task:{t.kind}": t.weight for t in data.tasks})
    return weights


def task_stream(data: DataConfig, name: str, seed: int) -> Iterator[Document]:
    """The endless stream of training-split task documents for source `task:<kind>`."""
    kind = name.removeprefix("task:")
    cfg = next(t for t in data.tasks if t.kind == kind)
    return iter_task_documents(make_generator(cfg), seed)


def split_corpus(corpus_dir: Path, val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, held-out) documents of a corpus stage; the split is a pure function of doc id."""
    train: list[Document] = []
    val: list[Document] = []
    for doc in read_jsonl(corpus_dir / DOCUMENTS):
        (val if is_heldout(doc.id, val_fraction) else train).append(doc)
    return train, val


# --------------------------------------------------------------------------- corpus


def run_corpus(ctx: StageContext) -> Metrics:
    return build_corpus(ctx.recipe.data, ctx.out)


def corpus_config(recipe: Recipe) -> dict:
    data = recipe.data.model_dump(mode="json")
    return {k: data[k] for k in ("sources", "filters", "dedup")}


# --------------------------------------------------------------------------- tokenizer


def run_tokenizer(ctx: StageContext) -> Metrics:
    recipe = ctx.recipe
    train, val = split_corpus(ctx.inputs["corpus"], recipe.data.mixture.val_fraction)
    sample = tokenizer_sample(recipe, train)
    tok = train_tokenizer(track(sample, "training tokenizer"), recipe.tokenizer)
    save_tokenizer(tok, ctx.out / TOKENIZER)
    # Compression is measured on held-out text the tokenizer never saw.
    probe = [d.text for d in val[:500]] or sample[:200]
    return {
        "tokenizer/vocab_size": tok.get_vocab_size(),
        "tokenizer/train_chars": sum(len(t) for t in sample),
        "tokenizer/bytes_per_token": round(bytes_per_token(tok, probe), 4),
    }


def tokenizer_sample(recipe: Recipe, train: list[Document]) -> list[str]:
    """Texts for tokenizer training: each source's share of `train_chars` by mixture weight."""
    targets = token_targets(mixture_weights(recipe.data), recipe.tokenizer.train_chars)
    by_source: dict[str, list[Document]] = {}
    for doc in train:
        by_source.setdefault(doc.source, []).append(doc)
    rng = random.Random(recipe.seed)
    texts: list[str] = []
    for name, target in targets.items():
        if name.startswith("task:"):
            docs: Iterator[Document] | list[Document] = task_stream(recipe.data, name, recipe.seed)
        else:
            docs = list(by_source.get(name, []))
            rng.shuffle(docs)
        taken = 0
        for doc in docs:
            if taken >= target:
                break
            texts.append(doc.text)
            taken += len(doc.text)
    return texts


def tokenizer_config(recipe: Recipe) -> dict:
    return {
        "tokenizer": recipe.tokenizer.model_dump(mode="json"),
        "weights": mixture_weights(recipe.data),
        "tasks": [t.model_dump(mode="json") for t in recipe.data.tasks],
        "val_fraction": recipe.data.mixture.val_fraction,
        "seed": recipe.seed,
    }


# --------------------------------------------------------------------------- shards


def run_shards(ctx: StageContext) -> Metrics:
    recipe = ctx.recipe
    data = recipe.data
    tok = load_tokenizer(ctx.inputs["tokenizer"] / TOKENIZER)
    # A document that happens to contain "<|endoftext|>" is text, not a boundary.
    tok.encode_special_tokens = True
    vocab_size = tok.get_vocab_size()
    train, val = split_corpus(ctx.inputs["corpus"], data.mixture.val_fraction)

    targets = token_targets(mixture_weights(data), data.mixture.token_budget)
    tokens: dict[str, list[list[int]]] = {name: [] for name in targets}
    for doc, ids in zip(
        train, _encode(tok, [d.text for d in train], "tokenizing corpus"), strict=True
    ):
        tokens[doc.source].append(ids)
    for name, target in targets.items():
        if name.startswith("task:"):
            tokens[name] = _take_tokens(tok, task_stream(data, name, recipe.seed), target)

    # +1: the document-boundary token the packer appends after each document.
    lengths = {name: [len(ids) + 1 for ids in docs] for name, docs in tokens.items()}
    plan = plan_mixture(lengths, targets, recipe.seed)
    seq_len, rows_per_shard = data.packing.seq_len, data.packing.rows_per_shard
    ordered = (tokens[name][i] for name, i in plan.order)
    train_info = write_split(
        ctx.out,
        "train",
        track(ordered, "packing train", len(plan.order)),
        seq_len,
        rows_per_shard,
        vocab_size,
    )

    val = sorted(val, key=lambda d: d.id)
    val_ids: list[list[int]] = []
    val_docs: list[Document] = []
    taken = 0
    for doc, ids in zip(
        val, _encode(tok, [d.text for d in val], "tokenizing held-out"), strict=True
    ):
        if taken >= data.mixture.val_token_budget:
            break
        val_ids.append(ids)
        val_docs.append(doc)
        taken += len(ids) + 1
    val_info = write_split(ctx.out, "val", val_ids, seq_len, rows_per_shard, vocab_size)
    val_bytes = sum(len(d.text.encode("utf-8")) for d in val_docs)
    write_index(
        ctx.out,
        {"train": train_info, "val": val_info},
        meta={"val_bytes": val_bytes, "eot_id": tok.token_to_id(EOT)},
    )

    metrics: Metrics = {
        "shards/train_tokens": train_info["tokens"],
        "shards/train_rows": train_info["rows"],
        "shards/val_tokens": val_info["tokens"],
        "shards/val_rows": val_info["rows"],
        "shards/val_docs": len(val_docs),
        "shards/unigram_val_bpb": round(
            unigram_bits(tokens, val_ids, vocab_size) / max(val_bytes, 1), 4
        ),
    }
    for name, stats in plan.sources.items():
        metrics[f"mixture/tokens/{name}"] = stats.tokens
        metrics[f"mixture/epochs/{name}"] = round(stats.epochs, 4)
    (ctx.out / "mixture.json").write_text(
        json.dumps({n: vars(s) for n, s in plan.sources.items()}, indent=2)
    )
    return metrics


def shards_config(recipe: Recipe) -> dict:
    data = recipe.data
    return {
        "mixture": data.mixture.model_dump(mode="json"),
        "packing": data.packing.model_dump(mode="json"),
        "weights": mixture_weights(data),
        "tasks": [t.model_dump(mode="json") for t in data.tasks],
        "seed": recipe.seed,
    }


def unigram_bits(train: dict[str, list[list[int]]], val: list[list[int]], vocab: int) -> float:
    """Total bits to code the held-out tokens (and boundaries) with train unigram frequencies.

    The baseline a language model must beat: divided by the held-out bytes it is the
    unigram model's bits per byte. Add-one smoothing keeps unseen tokens finite.
    """
    counts = np.ones(vocab, dtype=np.float64)
    for docs in train.values():
        for ids in docs:
            counts += np.bincount(ids, minlength=vocab)[:vocab]
        counts[0] += len(docs)  # boundary tokens, id 0
    logp = np.log2(counts / counts.sum())
    bits = 0.0
    for ids in val:
        bits -= logp[ids].sum() + logp[0]
    return float(bits)


def _encode(
    tok: Tokenizer, texts: list[str], description: str, chunk: int = 256
) -> Iterator[list[int]]:
    """Token ids of each text, batched so the Rust tokenizer can use every core."""
    for start in track(range(0, len(texts), chunk), description):
        for enc in tok.encode_batch(texts[start : start + chunk]):
            yield enc.ids


def _take_tokens(tok: Tokenizer, docs: Iterator[Document], target: int) -> list[list[int]]:
    """Encode documents from an endless stream until `target` tokens (with boundaries)."""
    out: list[list[int]] = []
    total = 0
    while total < target:
        batch = [next(docs).text for _ in range(256)]
        for enc in tok.encode_batch(batch):
            out.append(enc.ids)
            total += len(enc.ids) + 1
            if total >= target:
                break
    return out


def corpus_fingerprint(recipe: Recipe) -> list[str]:
    return [fingerprint(s) for s in recipe.data.sources]


DATA_STAGES = [
    Stage("corpus", 1, (), corpus_config, run_corpus, fingerprint=corpus_fingerprint),
    Stage("tokenizer", 2, ("corpus",), tokenizer_config, run_tokenizer),
    Stage("shards", 1, ("corpus", "tokenizer"), shards_config, run_shards),
]
