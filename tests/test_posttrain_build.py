"""pretrain → SFT → RL → eval in one build of a small recipe, and what the cache shares."""

import json
from pathlib import Path

import pytest

from helpers import SMALL_MODEL, small_recipe
from stacklab.pipeline import build
from stacklab.recipe import load_recipe
from stacklab.stages import STAGES

POST = {
    "sft": {
        "enabled": True,
        "steps": 4,
        "batch_size": 4,
        "seq_len": 48,
        "task_examples": 40,
        "ckpt_every": 2,
        "log_every": 1,
    },
    "rl": {
        "enabled": True,
        "steps": 2,
        "envs": ["tasks"],
        "prompts_per_step": 2,
        "group_size": 2,
        "max_turns": 1,
        "max_new_tokens": 6,
        "token_budget": 48,
        "minibatch_size": 4,
        "ckpt_every": 1,
    },
}


@pytest.mark.slow
def test_build_runs_every_stage_and_shares_the_prefix(tmp_path: Path) -> None:
    sections = {**SMALL_MODEL, **POST, "eval": {**SMALL_MODEL["eval"], "pass_k": [1, 2]}}
    sections["eval"]["pass_k_samples"] = 2
    sections["eval"]["pass_k_problems"] = 4
    recipe = load_recipe(small_recipe(tmp_path, sections))
    cache = tmp_path / "cache"
    result = build(recipe, tmp_path / "run", STAGES, cache)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [s.name for s in result.stages][-4:] == ["pretrain", "sft", "rl", "eval"]
    assert m["sft/steps"] == 4 and m["sft/conversations"] == 40
    assert m["rl/steps"] == 2 and 0 <= m["rl/final_reward"] <= 1
    assert {"task_acc/arithmetic", "pass@1/arithmetic", "pass@2/arithmetic"} <= set(m)
    # val_bpb of every trained stage's model, the final (RL) one's as before.
    assert {"val_bpb", "pretrain/val_bpb", "sft/val_bpb"} <= set(m) and "rl/val_bpb" not in m
    assert m["pretrain/val_bpb"] != m["sft/val_bpb"]  # (2 RL steps barely move the model)
    assert (tmp_path / "run" / "rl" / "final" / "model.safetensors").is_file()
    # The eval asked in the chat format (the model was post-trained).
    row = json.loads((tmp_path / "run" / "eval" / "completions.jsonl").read_text().split("\n")[0])
    assert set(row) >= {"prompt", "completion", "correct"}

    # Another RL setting: data, pretraining and SFT come from the cache; RL and eval rerun.
    other = load_recipe(small_recipe(tmp_path, sections), ["rl.lr=1e-3"])
    again = build(other, tmp_path / "run2", STAGES, cache)
    cached = {s.name: s.cached for s in again.stages}
    assert cached == {
        "corpus": True, "tokenizer": True, "shards": True, "pretrain": True, "sft": True,
        "rl": False, "eval": False,
    }  # fmt: skip

    # RL off: the eval measures the SFT model, which that build shares too.
    off = load_recipe(small_recipe(tmp_path, sections), ["rl.enabled=false"])
    sft_only = build(off, tmp_path / "run3", STAGES, cache)
    assert {s.name: s.cached for s in sft_only.stages}["sft"] is True
    assert not (tmp_path / "run3" / "rl" / "final").exists()
    assert "rl/steps" not in sft_only.metrics and "task_acc/arithmetic" in sft_only.metrics
    assert sft_only.metrics["sft/val_bpb"] == sft_only.metrics["val_bpb"] == m["sft/val_bpb"]
    assert sft_only.metrics["pretrain/val_bpb"] == m["pretrain/val_bpb"]

    # Pretraining text mixed into SFT: the stage reads the shards; pretraining is shared.
    mixed = load_recipe(
        small_recipe(tmp_path, sections), ["rl.enabled=false", "sft.pretrain_mix=0.25"]
    )
    mix = build(mixed, tmp_path / "run4", STAGES, cache)
    assert {s.name: s.cached for s in mix.stages}["pretrain"] is True
    assert {s.name: s.cached for s in mix.stages}["sft"] is False
    assert mix.metrics["sft/pretrain_rows"] == 1 and mix.metrics["sft/final_lm_loss"] > 0
    assert mix.metrics["pretrain/val_bpb"] == m["pretrain/val_bpb"]
    assert mix.metrics["sft/val_bpb"] == mix.metrics["val_bpb"] != m["sft/val_bpb"]
