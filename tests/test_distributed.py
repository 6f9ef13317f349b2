"""Data-parallel training: two gloo ranks under torchrun train exactly like one process with
the whole global batch; impossible parallel settings are refused up front."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import random_shards
from stacklab.errors import StacklabError
from stacklab.recipe import recipe_from_dict
from stacklab.train.distributed import World, check_parallel
from stacklab.train.log import read_log
from stacklab.train.pretrain import pretrain

VOCAB, SEQ_LEN = 64, 32


def make_shards(folder: Path) -> Path:
    return random_shards(folder, VOCAB, SEQ_LEN, seed=1)


def moe_recipe(batch_size: int, **pretrain_cfg: object):
    """A small MoE with aux-loss-free balancing (its bias update needs the summed counts)."""
    moe = {"enabled": True, "num_experts": 4, "top_k": 2, "balance": "aux_free"}
    return recipe_from_dict(
        {
            "seed": 5,
            "model": {"depth": 2, "aspect": 32, "head_dim": 16, "max_seq_len": 32, "moe": moe},
            "optim": {"warmup_steps": 2},
            "pretrain": {
                "steps": 6,
                "batch_size": batch_size,
                "grad_accum": 2,
                "ckpt_every": 3,
                "log_every": 1,
                **pretrain_cfg,
            },
        }
    )


@pytest.mark.slow
def test_two_ranks_match_one_process_with_the_global_batch(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards")
    recipe_file = tmp_path / "ddp.yaml"
    recipe_file.write_text(moe_recipe(batch_size=2).to_yaml())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "stacklab.train.pretrain",
        "--recipe",
        str(recipe_file),
        "--shards",
        str(shards),
        "--out",
        str(tmp_path / "ddp"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(moe_recipe(batch_size=4), shards, tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    output, _ = ddp.communicate(timeout=600)
    assert ddp.returncode == 0, output.decode()[-3000:]

    single = read_log(tmp_path / "single" / "metrics.jsonl")
    both = read_log(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in both] == list(range(1, 7))  # one writer: rank 0
    assert [r["tokens"] for r in both] == [r["tokens"] for r in single]
    for key in ("loss", "grad_norm", "moe/1/imbalance"):
        np.testing.assert_allclose(
            [r[key] for r in both], [r[key] for r in single], rtol=1e-5, atol=1e-5, err_msg=key
        )
    weights = [
        load_file(tmp_path / run / "final" / "model.safetensors") for run in ("ddp", "single")
    ]
    for name, value in weights[1].items():
        torch.testing.assert_close(weights[0][name], value, rtol=1e-4, atol=1e-5, msg=name)
    bias = weights[0]["layers.1.mlp.expert_bias"]
    assert torch.equal(bias, weights[1]["layers.1.mlp.expert_bias"])  # counts were summed
    assert bias.abs().sum() > 0


def test_fsdp_on_cpu_is_refused() -> None:
    world = World(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    recipe = moe_recipe(batch_size=2, parallel="fsdp")
    with pytest.raises(StacklabError, match="fsdp needs GPUs"):
        check_parallel(recipe, world)
    check_parallel(recipe, World(0, 1, 0, torch.device("cpu")))  # one process: nothing to shard
