"""The pretraining loop: exact resume after a crash or a SIGKILL, the NaN guard, MoE balancing,
and the pretrain stage through `stacklab build`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import random_shards
from stacklab.errors import StacklabError
from stacklab.pipeline import build
from stacklab.recipe import Recipe, load_recipe, recipe_from_dict
from stacklab.stages import STAGES
from stacklab.train.checkpoint import latest_checkpoint, load_model
from stacklab.train.log import read_log
from stacklab.train.pretrain import main, measure_peak_flops, pretrain

VOCAB, SEQ_LEN = 64, 32
# Tiny models train fastest on one thread, and the machines running tests are small.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_shards(folder: Path) -> Path:
    return random_shards(folder, VOCAB, SEQ_LEN, seed=0)


def tiny_recipe(**sections: dict) -> Recipe:
    raw = {
        "seed": 3,
        "model": {"depth": 2, "aspect": 32, "head_dim": 16, "max_seq_len": 64},
        "optim": {"warmup_steps": 2},
        "pretrain": {"steps": 12, "batch_size": 4, "ckpt_every": 4, "log_every": 1},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return recipe_from_dict(raw)


def losses(work: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_log(work / "metrics.jsonl")]


class Crash(Exception):
    pass


def test_crash_and_resume_is_bit_exact(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards")
    recipe = tiny_recipe()
    clean = pretrain(recipe, shards, tmp_path / "clean")

    def crash(step: int, model) -> None:
        if step == 6:
            raise Crash

    with pytest.raises(Crash):
        pretrain(recipe, shards, tmp_path / "crashed", on_step=crash)
    assert latest_checkpoint(tmp_path / "crashed" / "checkpoints").name == "step_000004"
    resumed = pretrain(recipe, shards, tmp_path / "crashed")

    assert losses(tmp_path / "crashed") == losses(tmp_path / "clean")
    assert [r[0] for r in losses(tmp_path / "clean")] == list(range(1, 13))
    final = [
        load_file(tmp_path / run / "final" / "model.safetensors") for run in ("clean", "crashed")
    ]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert resumed["pretrain/tokens"] == clean["pretrain/tokens"] == 12 * 4 * SEQ_LEN
    assert resumed["pretrain/final_loss"] == clean["pretrain/final_loss"]
    assert clean["pretrain/params"] == load_model(tmp_path / "clean" / "final").num_params()
    for key in ("tokens_per_s", "mfu", "peak_flops", "seconds"):
        assert clean[f"pretrain/{key}"] > 0
    flops = load_model(tmp_path / "clean" / "final").flops_per_token(SEQ_LEN)
    mfu = flops * clean["pretrain/tokens_per_s"] / clean["pretrain/peak_flops"]
    assert clean["pretrain/mfu"] == pytest.approx(mfu, rel=1e-3, abs=1e-5)
    # Started again on a finished run, it only rewrites the final model.
    again = pretrain(recipe, shards, tmp_path / "clean")
    assert again["pretrain/tokens"] == clean["pretrain/tokens"]
    assert losses(tmp_path / "clean") == losses(tmp_path / "crashed")


# A training run in its own process; with a delay, `on_step` sleeps after every step from
# step 9 on, so the test can kill it between step 9's log and step 12's checkpoint.
RUN_SCRIPT = """
import json, sys, time
from stacklab.recipe import recipe_from_dict
from stacklab.train.pretrain import pretrain

recipe = recipe_from_dict(json.loads(sys.argv[1]))
delay = float(sys.argv[4])
pretrain(recipe, sys.argv[2], sys.argv[3], on_step=lambda step, _: time.sleep(delay * (step >= 9)))
"""


def start_run(recipe: Recipe, shards: Path, work: Path, delay: float) -> subprocess.Popen:
    args = [json.dumps(recipe.to_dict()), str(shards), str(work), str(delay)]
    return subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, *args], env=ONE_THREAD)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sections",
    [{}, {"pretrain": {"grad_accum": 2}}, {"optim": {"name": "muon"}}],
    ids=["adamw", "grad_accum", "muon"],
)
def test_sigkill_and_resume_is_bit_exact(tmp_path: Path, sections: dict) -> None:
    shards = make_shards(tmp_path / "shards")
    recipe = tiny_recipe(**sections)
    clean = start_run(recipe, shards, tmp_path / "clean", delay=0.0)
    killed = start_run(recipe, shards, tmp_path / "killed", delay=1.0)
    try:
        # Kill once step 8's checkpoint exists and step 9 is logged, in step 9's sleep.
        deadline = time.monotonic() + 300
        while not any(r["step"] == 9 for r in read_log(tmp_path / "killed" / "metrics.jsonl")):
            assert killed.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(killed.pid, signal.SIGKILL)
    finally:
        killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step_000008"
    assert not (tmp_path / "killed" / "final").exists()

    pretrain(recipe, shards, tmp_path / "killed")  # resume here, in this process
    assert clean.wait(timeout=300) == 0
    assert losses(tmp_path / "killed") == losses(tmp_path / "clean")
    assert len(losses(tmp_path / "clean")) == 12
    final = [
        load_file(tmp_path / run / "final" / "model.safetensors") for run in ("clean", "killed")
    ]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards")

    def poison(step: int, model) -> None:
        if step == 6:
            with torch.no_grad():
                model.layers[0].mlp.up_proj.weight.fill_(float("nan"))

    with pytest.raises(StacklabError, match=r"NaN/Inf at step 7\b.*step_000004"):
        pretrain(tiny_recipe(), shards, tmp_path / "work", on_step=poison)
    assert latest_checkpoint(tmp_path / "work" / "checkpoints").name == "step_000004"
    assert [r[0] for r in losses(tmp_path / "work")] == list(range(1, 7))
    assert not (tmp_path / "work" / "final").exists()


def test_moe_aux_free_moves_bias_and_logs_imbalance(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards")
    moe = {"enabled": True, "num_experts": 4, "top_k": 2, "balance": "aux_free"}
    recipe = tiny_recipe(model={"moe": {**moe, "bias_update_rate": 0.01}}, optim={"grad_clip": 0.0})
    metrics = pretrain(recipe, shards, tmp_path / "work")
    records = read_log(tmp_path / "work" / "metrics.jsonl")
    assert all(r["aux_loss"] == 0.0 for r in records)  # aux_free: no balance loss
    assert all(r["grad_norm"] > 0 for r in records)  # reported without clipping too
    assert all(1.0 <= r["moe/1/imbalance"] <= 4.0 for r in records)
    model = load_model(tmp_path / "work" / "final")
    bias = model.layers[1].mlp.expert_bias
    assert bias.abs().sum() > 0  # update_bias ran after each step: at most 0.01 a step
    assert bias.abs().max() <= 0.01 * 12 + 1e-6
    assert metrics["pretrain/active_params"] < metrics["pretrain/params"]


def test_too_long_shards_are_refused(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards")
    recipe = tiny_recipe(model={"max_seq_len": 16})
    with pytest.raises(StacklabError, match="max_seq_len"):
        pretrain(recipe, shards, tmp_path / "work")


def test_peak_flops_is_measured() -> None:
    assert 1e8 < measure_peak_flops(torch.device("cpu")) < 1e14


def test_command_line_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--shards" in capsys.readouterr().out


# --------------------------------------------------------------------------- the stage


def test_pretrain_stage_through_build(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), size=4)) for _ in range(200)]
    with (tmp_path / "corpus.jsonl").open("w") as f:
        for i in range(100):
            text = " ".join(rng.choice(words, size=100)) + f". Document {i}.\n"
            f.write(json.dumps({"text": text, "id": f"doc{i}"}) + "\n")
    raw = {
        "name": "tiny-train",
        "data": {
            "sources": [{"kind": "jsonl", "name": "web", "path": "corpus.jsonl", "id_field": "id"}],
            "filters": [],
            "mixture": {"token_budget": 20_000, "val_fraction": 0.1, "val_token_budget": 2000},
            "packing": {"seq_len": 32, "rows_per_shard": 200},
        },
        "tokenizer": {"vocab_size": 300, "train_chars": 100_000},
        "model": {"depth": 1, "aspect": 32, "head_dim": 16, "max_seq_len": 32},
        "pretrain": {"steps": 4, "batch_size": 4, "ckpt_every": 2, "log_every": 2},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = build(
        load_recipe(path), tmp_path / "run", STAGES, tmp_path / "cache", until="pretrain"
    )
    assert [s.name for s in result.stages][-1] == "pretrain"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["pretrain/tokens"] == 4 * 4 * 32
    assert 0 < metrics["pretrain/final_loss"] < 10
    assert (tmp_path / "run" / "pretrain" / "final" / "model.safetensors").is_file()
    assert load_model(tmp_path / "run" / "pretrain" / "final").vocab_size == 300
    assert not (tmp_path / "run" / "pretrain" / "checkpoints").exists()  # done: not kept

    again = build(load_recipe(path), tmp_path / "run", STAGES, tmp_path / "cache", until="pretrain")
    assert again.stages[-1].cached
