"""The data stages end to end (corpus → tokenizer → shards) on a small generated corpus."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import make_corpus, small_recipe
from stacklab.cli import main
from stacklab.data.build import DATA_STAGES
from stacklab.data.loader import ShardLoader
from stacklab.data.shards import open_split
from stacklab.data.tokenizer import EOT_ID, load_tokenizer
from stacklab.pipeline import build
from stacklab.recipe import load_recipe


def test_build_writes_every_stage_and_metrics(tmp_path: Path) -> None:
    recipe = load_recipe(small_recipe(tmp_path))
    result = build(recipe, tmp_path / "run", DATA_STAGES, tmp_path / "cache")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m == result.metrics
    assert m["data/docs_read"] == 200
    assert m["data/docs_kept"] == 200
    assert m["tokenizer/vocab_size"] == 400
    assert m["tokenizer/bytes_per_token"] > 1.0
    # The budget is met (documents are whole, so it may be overshot by one document each).
    assert 30_000 <= m["shards/train_tokens"] < 31_000
    share = m["mixture/tokens/task:arithmetic"] / m["shards/train_tokens"]
    assert share == pytest.approx(0.2 / 1.2, abs=0.01)  # weights 1.0 (web) and 0.2 (task)
    # A unigram model needs several bits per byte on this text; the figure must be sane.
    assert 1.0 < m["shards/unigram_val_bpb"] < 8.0

    loader = ShardLoader(tmp_path / "run" / "shards", "train", batch_size=4, seed=0)
    inputs, targets = loader.next_batch()
    assert inputs.shape == targets.shape == (4, 32)
    assert (inputs[:, 1:] == targets[:, :-1]).all()
    tok = load_tokenizer(tmp_path / "run" / "tokenizer" / "tokenizer.json")
    text = tok.decode(inputs[0].tolist(), skip_special_tokens=False)
    assert text  # decodes to real text
    train = open_split(tmp_path / "run" / "shards", "train")
    rows = train.rows(np.arange(train.num_rows))
    info = json.loads((tmp_path / "run" / "shards" / "index.json").read_text())["splits"]["train"]
    # One boundary token after every document; only the dropped tail may hide a few.
    boundaries = int((rows[:, :-1] == EOT_ID).sum())  # rows overlap by one token
    assert info["docs"] - info["dropped_tokens"] <= boundaries <= info["docs"]


def doc_numbers(text: str) -> set[int]:
    return {int(x) for x in re.findall(r"Document (\d+) ends", text)}


def test_held_out_documents_never_reach_training(tmp_path: Path) -> None:
    recipe = load_recipe(small_recipe(tmp_path))
    build(recipe, tmp_path / "run", DATA_STAGES, tmp_path / "cache")
    tok = load_tokenizer(tmp_path / "run" / "tokenizer" / "tokenizer.json")
    decoded = {}
    for split in ("train", "val"):
        loader = ShardLoader(tmp_path / "run" / "shards", split, batch_size=1, seed=0)
        rows = [loader.next_batch()[0][0].tolist() for _ in range(loader.steps_per_epoch)]
        decoded[split] = "".join(tok.decode(r, skip_special_tokens=False) for r in rows)
    assert doc_numbers(decoded["val"]), "the validation split is empty"
    assert not doc_numbers(decoded["val"]) & doc_numbers(decoded["train"])


def test_rebuild_is_noop_and_late_change_reuses_early(tmp_path: Path) -> None:
    path = small_recipe(tmp_path)
    cache = tmp_path / "cache"
    first = build(load_recipe(path), tmp_path / "a", DATA_STAGES, cache)
    again = build(load_recipe(path), tmp_path / "a", DATA_STAGES, cache)
    assert [s.cached for s in again.stages] == [True, True, True]
    assert again.metrics == first.metrics

    budget = build(
        load_recipe(path, ["data.mixture.token_budget=20000"]), tmp_path / "b", DATA_STAGES, cache
    )
    assert [s.cached for s in budget.stages] == [True, True, False]
    vocab = build(
        load_recipe(path, ["tokenizer.vocab_size=350"]), tmp_path / "c", DATA_STAGES, cache
    )
    assert [s.cached for s in vocab.stages] == [True, False, False]


def test_build_is_deterministic_across_caches(tmp_path: Path) -> None:
    path = small_recipe(tmp_path)
    build(load_recipe(path), tmp_path / "a", DATA_STAGES, tmp_path / "cache1")
    build(load_recipe(path), tmp_path / "b", DATA_STAGES, tmp_path / "cache2")
    index = [json.loads((tmp_path / r / "shards" / "index.json").read_text()) for r in "ab"]
    assert index[0] == index[1]
    toks = [(tmp_path / r / "tokenizer" / "tokenizer.json").read_text() for r in "ab"]
    assert toks[0] == toks[1]


def test_user_file_change_invalidates_corpus(tmp_path: Path) -> None:
    path = small_recipe(tmp_path)
    build(load_recipe(path), tmp_path / "a", DATA_STAGES, tmp_path / "cache")
    make_corpus(tmp_path / "corpus.jsonl", seed=5)
    again = build(load_recipe(path), tmp_path / "a", DATA_STAGES, tmp_path / "cache")
    assert not again.stages[0].cached


# --------------------------------------------------------------------------- bad input


def build_error(tmp_path: Path, recipe: Path, capsys, *extra: str) -> str:
    """Run `stacklab build` expecting a user error; return the one error line it prints."""
    args = ["build", str(recipe), "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")]
    assert main([*args, *extra]) == 2
    out = capsys.readouterr()
    text = out.out + out.err
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text, text
    return errors[0]


def test_missing_file_is_one_line_error(tmp_path: Path, capsys) -> None:
    path = small_recipe(tmp_path)
    (tmp_path / "corpus.jsonl").unlink()
    line = build_error(tmp_path, path, capsys)
    assert "corpus.jsonl" in line and "web" in line


def test_empty_corpus_is_one_line_error(tmp_path: Path, capsys) -> None:
    path = small_recipe(tmp_path, filters=[{"name": "length", "min_chars": 100_000}])
    line = build_error(tmp_path, path, capsys)
    assert "empty" in line and "length" in line


def test_unreadable_parquet_column_is_one_line_error(tmp_path: Path, capsys) -> None:
    pq.write_table(pa.table({"body": ["some text " * 20]}), tmp_path / "d.parquet")
    source = {"kind": "parquet", "name": "pq", "path": "d.parquet", "column": "text"}
    line = build_error(tmp_path, small_recipe(tmp_path, sources=[source]), capsys)
    assert "'text'" in line and "body" in line


def test_zero_token_budget_is_one_line_error(tmp_path: Path, capsys) -> None:
    path = small_recipe(tmp_path)
    line = build_error(tmp_path, path, capsys, "--set", "data.mixture.token_budget=0")
    assert "data.mixture.token_budget" in line


# --------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow
def test_real_build_killed_mid_shards_completes_on_rerun(tmp_path: Path) -> None:
    # A large budget over a small corpus (many epochs) keeps the shards stage busy long enough.
    path = small_recipe(
        tmp_path, mixture={"token_budget": 3_000_000, "val_fraction": 0.1, "val_token_budget": 3000}
    )
    cache = tmp_path / "cache"
    cmd = [
        sys.executable,
        "-m",
        "stacklab.cli",
        "build",
        str(path),
        "--out",
        str(tmp_path / "killed"),
        "--cache-dir",
        str(cache),
        "--until",
        "shards",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((cache / "shards").glob("*.tmp-*/train_00000.bin")):
            assert proc.poll() is None, "the build ended before its shards stage was caught"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not [p for p in (cache / "shards").iterdir() if p.is_dir() and ".tmp-" not in p.name]

    resumed = build(load_recipe(path), tmp_path / "killed", DATA_STAGES, cache)
    assert [s.cached for s in resumed.stages] == [True, True, False]
    clean = build(load_recipe(path), tmp_path / "clean", DATA_STAGES, tmp_path / "fresh-cache")
    assert resumed.metrics == clean.metrics
    index = [
        json.loads((tmp_path / r / "shards" / "index.json").read_text())
        for r in ("killed", "clean")
    ]
    assert index[0] == index[1]
    assert not list((cache / "shards").glob("*.tmp-*"))
