"""A training run SIGKILLed between two checkpoints resumes bit-exactly: pretraining, SFT, RL.

Each test starts the same run twice in child processes, the way a user starts one (the
pretrain command line; the SFT and RL stages' training functions, as their stage runs them).
One runs through. The other pauses after step `KILL_AT`, which is logged and fully trained
(its optimizer step taken) but is not a checkpoint step; the test then SIGKILLs it, so the
newest checkpoint is an earlier step and the steps after it are lost and must be replayed.
A third child resumes the killed run's folder. The resumed run must end with the same
weights, optimizer state, scheduler, loader position and random states as the run that went
through, log the same records, and, for RL, sample the same completions after resuming.

The pause is a patch in the child (after `MetricsLog.write` of that step): the training code
has no test hook, and nothing in the parent's process is shared with the runs.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from helpers import random_shards
from stacklab.data.chat import render_chat
from stacklab.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from stacklab.model.transformer import build_model
from stacklab.recipe import ArithmeticTask, ModelConfig, Recipe, RLConfig, TokenizerConfig
from stacklab.train.checkpoint import checkpoint_dir, latest_checkpoint, write_model
from stacklab.train.log import read_log
from stacklab.train.sft import sft
from stacklab.train.sft_data import task_conversations

# Tiny models train fastest on one thread, and the machines running tests are small.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 300  # seconds any one child may take
TASK = ArithmeticTask(ops=["+"], min_digits=1, max_digits=1, eval_fraction=0.2)
MODEL = ModelConfig(depth=1, aspect=16, head_dim=16, max_seq_len=64).build()
TIMING = ("seconds", "tokens_per_s", "mfu")  # metrics that differ between any two runs

CHILD = r"""
import json, sys, time
from pathlib import Path

from stacklab.train import pretrain as P
from stacklab.train.log import MetricsLog

spec = json.loads(sys.argv[1])
work = Path(spec["work"])
if spec["pause_after"]:
    write = MetricsLog.write

    def write_then_pause(self, record):
        write(self, record)
        if record["step"] == spec["pause_after"]:
            time.sleep(3600)  # step trained and logged, its checkpoint not yet written

    MetricsLog.write = write_then_pause

if spec["stage"] == "pretrain":
    args = ["--recipe", spec["recipe"], "--shards", spec["shards"], "--out", str(work)]
    sys.exit(P.main(args))

from stacklab.data.tokenizer import load_tokenizer
from stacklab.recipe import recipe_from_dict

recipe = recipe_from_dict(spec["recipe"])
tokenizer = load_tokenizer(spec["tokenizer"])
if spec["stage"] == "sft":
    from stacklab.train.sft import sft

    sft(recipe, tokenizer, Path(spec["base"]), work)
else:
    from stacklab.rl import trainer

    collect = trainer.collect

    def collect_and_record(*args, **kwargs):
        batch, by_env = collect(*args, **kwargs)
        step = args[5] if len(args) > 5 else kwargs["step"]
        episodes = [ep for eps in by_env.values() for ep in eps]
        record = {
            "step": step,
            "ids": [ep.ids for ep in episodes],
            "mask": [ep.mask for ep in episodes],
            "logprobs": [ep.logprobs for ep in episodes],
        }
        with open(spec["rollouts"], "a") as f:
            f.write(json.dumps(record) + "\n")
        return batch, by_env

    trainer.collect = collect_and_record
    trainer.train_rl(recipe, tokenizer, Path(spec["base"]), work)
"""


def start(spec: dict[str, Any]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], env=ONE_THREAD)


def finish(child: subprocess.Popen) -> None:
    assert child.wait(timeout=TIMEOUT) == 0


def kill_between_checkpoints(spec: dict[str, Any], kill_at: int) -> None:
    """Run `spec` in a child, SIGKILL it once step `kill_at` is trained and logged (it then
    sleeps before that step's end), and check that the kill left what it should."""
    child = start({**spec, "pause_after": kill_at})
    metrics = Path(spec["work"]) / "metrics.jsonl"
    try:
        deadline = time.monotonic() + TIMEOUT
        while not any(r["step"] == kill_at for r in read_log(metrics)):
            assert child.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run never reached the step to kill at"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)  # in the sleep after step `kill_at`
    finally:
        if child.poll() is None:
            child.kill()  # SIGKILL, if it is not dead yet (a failed check above)
        child.wait(timeout=TIMEOUT)
    assert child.returncode == -signal.SIGKILL
    assert [r["step"] for r in read_log(metrics)][-1] == kill_at
    assert not (Path(spec["work"]) / "final").exists()


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal nested state: tensors bit for bit (dtype and shape included), the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_end(clean: Path, resumed: Path, last_step: int) -> None:
    """Same final weights, same last checkpoint (weights, optimizer, state, RNG), same logs."""
    assert_same(
        load_file(clean / "final" / "model.safetensors"),
        load_file(resumed / "final" / "model.safetensors"),
        "final",
    )
    a, b = (
        checkpoint_dir(clean / "checkpoints", last_step),
        checkpoint_dir(resumed / "checkpoints", last_step),
    )
    assert latest_checkpoint(resumed / "checkpoints") == b
    assert_same(load_file(a / "model.safetensors"), load_file(b / "model.safetensors"), "model")
    for name in ("optimizer.pt", "rng.pt"):
        assert_same(
            torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True), name
        )
    state = [json.loads((d / "state.json").read_text()) for d in (a, b)]
    for s in state:
        s.pop("seconds")
    assert_same(state[0], state[1], "state.json")

    def records(work: Path) -> list[dict]:
        return [
            {k: v for k, v in r.items() if not k.endswith(TIMING)}
            for r in read_log(work / "metrics.jsonl")
        ]

    assert records(resumed) == records(clean)
    assert [r["step"] for r in records(clean)] == list(range(1, last_step + 1))


def kill_and_resume(spec: dict[str, Any], tmp_path: Path, kill_at: int, ckpt: int) -> None:
    """An uninterrupted run in `tmp_path/clean` beside one killed after step `kill_at` in
    `tmp_path/killed` (newest checkpoint: step `ckpt`), which is then resumed to the end.
    RL runs append their rollouts to `tmp_path/{clean,killed,resumed}.jsonl`."""
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    rollouts = {name: str(tmp_path / f"{name}.jsonl") for name in ("clean", "killed", "resumed")}
    through = start({**spec, "work": str(clean), "rollouts": rollouts["clean"], "pause_after": 0})
    try:
        kill_between_checkpoints(
            {**spec, "work": str(killed), "rollouts": rollouts["killed"]}, kill_at
        )
    finally:
        finish(through)
    assert latest_checkpoint(killed / "checkpoints").name == f"step_{ckpt:06d}"
    finish(start({**spec, "work": str(killed), "rollouts": rollouts["resumed"], "pause_after": 0}))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    texts = [render_chat(c) for c in task_conversations([TASK], 60, seed=0)]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=2))
    return save_tokenizer(tok, tmp_path_factory.mktemp("tokenizer")).parent


@pytest.fixture(scope="module")
def base(tok_dir, tmp_path_factory) -> Path:
    """A random tiny model saved the way pretraining leaves it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "final"
    vocab = load_tokenizer(tok_dir).get_vocab_size()
    write_model(path, MODEL, vocab, build_model(MODEL, vocab).state_dict())
    return path


def sft_recipe(**fields: object) -> Recipe:
    recipe = Recipe(seed=5)
    recipe.data.tasks = [TASK]
    cfg = recipe.sft
    cfg.enabled = True
    cfg.steps = 7
    cfg.batch_size = 2
    cfg.seq_len = 32
    cfg.task_examples = 12
    cfg.agent_envs = []
    cfg.warmup_steps = 2
    cfg.ckpt_every = 3
    cfg.log_every = 1
    for name, value in fields.items():
        setattr(cfg, name, value)
    return recipe


@pytest.fixture(scope="module")
def sft_base(tok_dir, base, tmp_path_factory) -> Path:
    """The random model after 30 steps of SFT: it ends its answers at different lengths, so
    RL's overlong penalty gives groups unequal rewards and the RL updates move the weights."""
    recipe = sft_recipe(
        steps=30, batch_size=8, seq_len=64, task_examples=60, lr=1e-2, ckpt_every=30
    )
    work = tmp_path_factory.mktemp("sft_base")
    sft(recipe, load_tokenizer(tok_dir), base, work)
    return work / "final"


# --------------------------------------------------------------------------- the tests


@pytest.mark.slow
def test_pretrain_killed_between_checkpoints_resumes_bit_exactly(tmp_path: Path) -> None:
    """The pretrain command line, 8 steps, checkpoints at 3, 6 and 8, killed after step 5."""
    shards = random_shards(tmp_path / "shards", vocab=64, seq_len=32, seed=0)
    recipe = Recipe.model_validate(
        {
            "seed": 3,
            "model": {"depth": 2, "aspect": 32, "head_dim": 16, "max_seq_len": 64},
            "optim": {"warmup_steps": 2},
            "pretrain": {"steps": 8, "batch_size": 4, "ckpt_every": 3, "log_every": 1},
        }
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    spec = {"stage": "pretrain", "recipe": str(path), "shards": str(shards)}

    kill_and_resume(spec, tmp_path, kill_at=5, ckpt=3)
    assert_same_end(tmp_path / "clean", tmp_path / "killed", last_step=8)


@pytest.mark.slow
def test_sft_killed_between_checkpoints_resumes_bit_exactly(tok_dir, base, tmp_path) -> None:
    """SFT of 7 steps, checkpoints at 3, 6 and 7, killed after step 5."""
    spec = {
        "stage": "sft",
        "recipe": sft_recipe().to_dict(),
        "tokenizer": str(tok_dir),
        "base": str(base),
    }
    kill_and_resume(spec, tmp_path, kill_at=5, ckpt=3)
    assert_same_end(tmp_path / "clean", tmp_path / "killed", last_step=7)
    changed = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    before = load_file(base / "model.safetensors")
    assert any(not torch.equal(before[k], changed[k]) for k in before)


@pytest.mark.slow
def test_rl_killed_between_checkpoints_resumes_bit_exactly(tok_dir, sft_base, tmp_path) -> None:
    """RL of 5 steps (2 optimizer updates each), checkpoints at 2, 4 and 5, killed after
    step 3; the rollouts sampled after resuming are the uninterrupted run's, token for token."""
    recipe = Recipe(seed=5)
    recipe.data.tasks = [TASK]
    recipe.rl = RLConfig(
        enabled=True,
        steps=5,
        prompts_per_step=2,
        group_size=4,
        max_turns=1,
        max_new_tokens=6,
        token_budget=40,
        overlong_buffer=4,
        kl_coef=0.01,
        minibatch_size=4,
        lr=1e-3,
        ckpt_every=2,
    )
    spec = {
        "stage": "rl",
        "recipe": recipe.to_dict(),
        "tokenizer": str(tok_dir),
        "base": str(sft_base),
    }
    kill_and_resume(spec, tmp_path, kill_at=3, ckpt=2)
    clean = tmp_path / "clean"
    assert_same_end(clean, tmp_path / "killed", last_step=5)

    def rollouts(name: str) -> list[dict]:
        return read_log(tmp_path / f"{name}.jsonl")

    # Steps 1-3 before the kill; the resumed run starts again at step 3 (replayed) and samples
    # exactly what the uninterrupted run sampled at steps 3, 4 and 5.
    assert rollouts("clean")[:3] == rollouts("killed")
    assert [r["step"] for r in rollouts("resumed")] == [3, 4, 5]
    assert rollouts("resumed") == rollouts("clean")[2:]
    # Not a vacuous comparison: the updates had a signal and moved the weights.
    assert any(r["grad_norm"] > 0 for r in read_log(clean / "metrics.jsonl")[2:])
    before = load_file(sft_base / "model.safetensors")
    after = load_file(clean / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
