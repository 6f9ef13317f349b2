"""Checkpoints: tied weights stored once and restored tied, exact round-trips, atomic saves,
and model.json files that old and new code both read."""

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from stacklab.errors import StacklabError
from stacklab.model.config import MoEConfig, TransformerConfig
from stacklab.model.transformer import Transformer, build_model
from stacklab.recipe import ModelConfig, OptimConfig
from stacklab.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    restore_rng,
    save_checkpoint,
    write_model,
)
from stacklab.train.optim import build_optimizer

V = 50


def tiny(**kw) -> TransformerConfig:
    return TransformerConfig(depth=1, aspect=32, head_dim=16, max_seq_len=32, **kw)


def save(model: Transformer, path) -> None:
    write_model(path, model.cfg, model.vocab_size, model.state_dict())


def trained(cfg: TransformerConfig):
    """A model and optimizer one AdamW step away from initialisation."""
    torch.manual_seed(0)
    model = build_model(cfg, V)
    opt = build_optimizer(model, OptimConfig())
    x = torch.randint(0, V, (2, 8))
    model(x, x).loss.backward()
    opt.step()
    return model, opt


def stored_keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_load_model_round_trip(tmp_path, tied: bool) -> None:
    model, _ = trained(tiny(tie_embeddings=tied))
    save(model, tmp_path / "final")
    keys = stored_keys(tmp_path / "final" / "model.safetensors")
    assert "embed.weight" in keys
    assert ("lm_head.weight" in keys) is not tied  # a tied head is stored once, as the embedding
    meta = json.loads((tmp_path / "final" / "model.json").read_text())
    assert meta["vocab_size"] == V and meta["model"]["tie_embeddings"] is tied

    loaded = load_model(tmp_path / "final")
    assert loaded.cfg == model.cfg
    assert (loaded.lm_head.weight is loaded.embed.weight) is tied
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    x = torch.randint(0, V, (1, 8))
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_load_model_without_files_is_clear_error(tmp_path) -> None:
    with pytest.raises(StacklabError, match="no saved model"):
        load_model(tmp_path)


def test_checkpoint_round_trip_restores_model_optimizer_state_and_rng(tmp_path) -> None:
    cfg = tiny()
    model, opt = trained(cfg)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = {"tokens": 123, "seconds": 1.5, "loader": {"epoch": 0, "step": 4}}
    path = save_checkpoint(tmp_path, 7, cfg, model.state_dict(), opt.state_dict(), state)
    assert path.name == "step_000007"
    draws = (random.random(), np.random.rand(), torch.rand(2))

    ckpt = load_checkpoint(path, cfg)
    assert ckpt.step == 7 and ckpt.state["tokens"] == 123 and ckpt.state["loader"]["step"] == 4
    fresh, fresh_opt = trained(tiny())
    torch.manual_seed(99)
    fresh.load_state_dict(ckpt.model)
    fresh_opt.load_state_dict(ckpt.optimizer)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    exp_avg = [s["exp_avg"] for s in opt.state.values()]
    assert all(
        torch.equal(a, s["exp_avg"]) for a, s in zip(exp_avg, fresh_opt.state.values(), strict=True)
    )
    restore_rng(ckpt)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert again[:2] == draws[:2] and torch.equal(again[2], draws[2])


def test_latest_ignores_half_written_and_keeps_two(tmp_path) -> None:
    cfg = tiny()
    model, opt = trained(cfg)
    for step in (4, 8, 12):
        save_checkpoint(tmp_path, step, cfg, model.state_dict(), opt.state_dict(), {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000008", "step_000012"]

    # A save killed before its rename leaves only a hidden temporary folder.
    half = tmp_path / ".step_000016.tmp-deadbeef"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(tmp_path).name == "step_000012"

    save_checkpoint(tmp_path, 16, cfg, model.state_dict(), opt.state_dict(), {})
    assert not half.exists()  # the next save clears it
    assert latest_checkpoint(tmp_path).name == "step_000016"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_run_model_dir_prefers_the_newest_trained_stage(tmp_path) -> None:
    from stacklab.errors import StacklabError
    from stacklab.train.checkpoint import run_model_dir

    with pytest.raises(StacklabError, match="no trained model"):
        run_model_dir(tmp_path)
    cfg = TransformerConfig(depth=1, aspect=16, head_dim=16, max_seq_len=16)
    for stage in ("pretrain", "sft"):
        save(build_model(cfg, 32), tmp_path / stage / "final")
    (tmp_path / "rl").mkdir()  # a disabled RL stage writes no model
    assert run_model_dir(tmp_path) == tmp_path / "sft" / "final"
    assert run_model_dir(tmp_path, "pretrain") == tmp_path / "pretrain" / "final"
    with pytest.raises(StacklabError, match="rl/final"):
        run_model_dir(tmp_path, "rl")


# model.json exactly as the code before `TransformerConfig` wrote it (`save_model` of a model
# built from the recipe's ModelConfig(depth=1, aspect=16, head_dim=16, max_seq_len=16,
# tie_embeddings=False, moe={enabled, num_experts=2, top_k=1, router=sigmoid}), vocab 32).
OLD_MODEL_JSON = """\
{
  "model": {
    "depth": 1,
    "aspect": 16,
    "head_dim": 16,
    "d_model": null,
    "n_heads": null,
    "n_kv_heads": null,
    "ffn_hidden": null,
    "max_seq_len": 16,
    "rope_theta": 10000.0,
    "qk_norm": true,
    "tie_embeddings": false,
    "norm_eps": 1e-06,
    "init_std": 0.02,
    "moe": {
      "enabled": true,
      "num_experts": 2,
      "top_k": 1,
      "expert_hidden": null,
      "router": "sigmoid",
      "norm_topk": true,
      "routed_scaling": 1.0,
      "num_shared_experts": 0,
      "first_k_dense": 0,
      "balance": "aux_loss",
      "aux_loss_coef": 0.01,
      "z_loss_coef": 0.001,
      "bias_update_rate": 0.001
    }
  },
  "vocab_size": 32
}
"""
OLD_CFG = TransformerConfig(
    depth=1,
    aspect=16,
    head_dim=16,
    max_seq_len=16,
    tie_embeddings=False,
    moe=MoEConfig(enabled=True, num_experts=2, top_k=1, router="sigmoid"),
)


def test_a_model_saved_by_the_old_code_loads(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(OLD_CFG, 32)
    save(model, tmp_path / "final")
    (tmp_path / "final" / "model.json").write_text(OLD_MODEL_JSON)  # the old writer's file
    loaded = load_model(tmp_path / "final")
    assert loaded.cfg == OLD_CFG and loaded.vocab_size == 32
    x = torch.randint(0, 32, (1, 8))
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_the_old_code_reads_what_the_new_code_writes(tmp_path) -> None:
    """model.json is byte for byte what the old writer wrote for the same model, and the
    old reader (the recipe section's validation) rebuilds the same config from it."""
    save(build_model(OLD_CFG, 32), tmp_path / "final")
    text = (tmp_path / "final" / "model.json").read_text()
    assert text == OLD_MODEL_JSON
    old_reader = ModelConfig.model_validate(json.loads(text)["model"])
    assert old_reader.build() == OLD_CFG
