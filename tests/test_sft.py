"""The SFT stage: the batch order, training and its metrics, bit-exact resume, the data it
reads, and the stage's cache key and fingerprint."""

import json
import re
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from helpers import random_shards
from stacklab.data.chat import render_chat
from stacklab.data.shards import open_split
from stacklab.data.tasks import make_generator
from stacklab.data.tokenizer import train_tokenizer
from stacklab.envs.suite import demonstrations
from stacklab.errors import DataError, StacklabError
from stacklab.model.transformer import Transformer, build_model
from stacklab.recipe import (
    ArithmeticTask,
    ModelConfig,
    Recipe,
    SFTConfig,
    SFTPhase,
    TokenizerConfig,
)
from stacklab.train import sft as sft_module
from stacklab.train import trainer as trainer_module
from stacklab.train.checkpoint import latest_checkpoint, write_model
from stacklab.train.log import read_log
from stacklab.train.schedule import lr_factor
from stacklab.train.sft import (
    SFT_STAGE,
    Schedule,
    batch_indices,
    chat_loss,
    sft,
    sft_conversations,
    sft_fingerprint,
    sft_optim,
    window_indices,
)
from stacklab.train.sft_data import (
    IGNORE,
    PretrainWindows,
    load_conversations,
    pack_sft,
    small_task_conversations,
    task_conversations,
)

MAX_SEQ_LEN = 64
TASK = ArithmeticTask(max_digits=1)
USER_CHATS = [
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2="},
        {"role": "assistant", "content": "4"},
    ],
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    texts = [render_chat(c) for c in task_conversations([TASK], 200, seed=0)]
    texts += [render_chat(c) for c in USER_CHATS] * 5
    return train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=2))


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory) -> Path:
    """A random tiny model saved the way pretraining leaves it."""
    torch.manual_seed(0)
    cfg = ModelConfig(depth=1, aspect=16, head_dim=16, max_seq_len=MAX_SEQ_LEN).build()
    path = tmp_path_factory.mktemp("base") / "final"
    vocab = tok.get_vocab_size()
    write_model(path, cfg, vocab, build_model(cfg, vocab).state_dict())
    return path


def tiny_recipe(**sft_fields: object) -> Recipe:
    recipe = Recipe()
    recipe.seed = 5
    recipe.data.tasks = [TASK]
    cfg = recipe.sft
    cfg.enabled = True
    cfg.steps = 6
    cfg.batch_size = 2
    cfg.seq_len = 32
    cfg.task_examples = 12
    cfg.agent_envs = []
    cfg.warmup_steps = 2
    cfg.ckpt_every = 2
    cfg.log_every = 1
    for name, value in sft_fields.items():
        setattr(cfg, name, value)
    return recipe


def write_jsonl(path: Path, chats: list[list[dict]]) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return path


def log(work: Path) -> list[dict]:
    return read_log(work / "metrics.jsonl")


def final_weights(work: Path) -> dict[str, torch.Tensor]:
    return load_file(work / "final" / "model.safetensors")


# --------------------------------------------------------------------------- batch order


def stream(n_rows: int, batch_size: int, steps: int, seed: int) -> list[int]:
    return torch.cat([batch_indices(n_rows, batch_size, s, seed) for s in range(steps)]).tolist()


@pytest.mark.parametrize(
    ("n_rows", "batch_size", "steps", "epochs"),
    [(12, 4, 9, 3), (12, 12, 2, 2), (10, 3, 10, 3), (7, 5, 7, 5), (3, 8, 3, 8), (1, 2, 3, 6)],
)
def test_batch_indices_are_a_permutation_per_epoch(n_rows, batch_size, steps, epochs) -> None:
    """Steps are consecutive slices of the row stream; each epoch of it is a permutation."""
    assert steps * batch_size == epochs * n_rows
    for s in range(steps):
        idx = batch_indices(n_rows, batch_size, s, seed=3)
        assert idx.dtype == torch.int64 and idx.shape == (batch_size,)
    flat = stream(n_rows, batch_size, steps, seed=3)
    for e in range(epochs):
        assert sorted(flat[e * n_rows : (e + 1) * n_rows]) == list(range(n_rows))
    assert all(flat.count(i) == epochs for i in range(n_rows))
    if n_rows % batch_size == 0:  # no step straddles two epochs: its rows are distinct
        for s in range(steps):
            assert len(set(batch_indices(n_rows, batch_size, s, seed=3).tolist())) == batch_size


def test_batch_indices_do_not_depend_on_the_batch_size() -> None:
    """One row order per seed: batch b's step s is positions [s*b, (s+1)*b) of that order,
    across epoch boundaries (10 rows, batch 3: step 3 is the last row of epoch 0 and the
    first two of epoch 1)."""
    one_by_one = stream(10, 1, 30, seed=4)
    assert stream(10, 3, 10, seed=4) == one_by_one
    assert stream(10, 7, 4, seed=4) == one_by_one[:28]
    assert batch_indices(10, 3, 3, seed=4).tolist() == one_by_one[9:12]


def test_batch_indices_deterministic_and_seeded() -> None:
    a = stream(50, 8, 13, seed=1)
    assert a == stream(50, 8, 13, seed=1)
    assert a != stream(50, 8, 13, seed=2)
    assert batch_indices(50, 8, 0, 1).tolist() != batch_indices(50, 8, 0, 2).tolist()
    # A new epoch is a new order, not the first one again.
    assert stream(50, 50, 1, seed=1) != batch_indices(50, 50, 1, seed=1).tolist()
    assert sorted(a[:50]) == sorted(a[50:100]) == list(range(50))
    assert a[:50] != a[50:100]


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("moe", [False, True])
def test_chat_loss_is_the_full_logits_loss_and_gradient(moe: bool) -> None:
    """The head only at trained positions gives the loss and gradients of the full logits."""
    torch.manual_seed(0)
    moe_cfg = {"enabled": True, "num_experts": 4, "top_k": 2} if moe else {}
    cfg = ModelConfig(depth=2, aspect=16, head_dim=16, max_seq_len=32, moe=moe_cfg).build()
    model = build_model(cfg, 50)
    inputs = torch.randint(0, 50, (3, 20))
    targets = torch.randint(0, 50, (3, 20))
    targets[torch.rand(3, 20) < 0.8] = -100  # packed chat rows train few positions
    full = model(inputs, targets)
    (full.loss + full.aux_loss).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss, aux = chat_loss(model, inputs, targets)
    (loss + aux).backward()
    torch.testing.assert_close(loss, full.loss)  # float32: within 1.3e-6 relative
    for name, grad in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


def test_sft_writes_final_model_and_metrics(tok, base, tmp_path) -> None:
    recipe = tiny_recipe()
    metrics = sft(recipe, tok, base, tmp_path)
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert (tmp_path / "final" / "model.json").is_file()
    assert set(metrics) == {
        "sft/final_loss",
        "sft/conversations",
        "sft/rows",
        "sft/assistant_tokens",
        "sft/dropped_too_long",
        "sft/seconds",
        "sft/steps",
    }
    assert metrics["sft/steps"] == 6 and metrics["sft/conversations"] == 12
    assert metrics["sft/dropped_too_long"] == 0 and metrics["sft/seconds"] > 0
    stats = pack_sft(tok, sft_conversations(recipe), 32, recipe.seed).stats()
    assert metrics["sft/rows"] == stats["rows"] and 6 <= stats["rows"] <= 12
    assert metrics["sft/assistant_tokens"] == stats["assistant_tokens"] >= 24
    records = log(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(set(r) == {"step", "loss", "lr", "grad_norm"} for r in records)
    last5 = [r["loss"] for r in records[-5:]]  # the trainer's window, as for every stage
    assert metrics["sft/final_loss"] == round(sum(last5) / 5, 5)
    assert all(0 < r["lr"] <= recipe.sft.lr and r["grad_norm"] > 0 for r in records)
    # The saved model differs from the base: it was trained.
    before, after = load_file(base / "model.safetensors"), final_weights(tmp_path)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert [c.name for c in (tmp_path / "checkpoints").iterdir()] != []
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_000006"


def test_logged_lr_is_the_lr_of_that_step(tok, base, tmp_path) -> None:
    """Like pretraining's log: warmup over 2 steps to the peak, then cosine decay to
    min_lr_frac of it at the last step."""
    recipe = tiny_recipe()
    sft(recipe, tok, base, tmp_path)
    optim = sft_optim(recipe.sft)
    expected = [recipe.sft.lr * lr_factor(s, 6, optim) for s in range(6)]
    assert [r["lr"] for r in log(tmp_path)] == pytest.approx(expected, rel=1e-9)
    assert expected[0] == pytest.approx(recipe.sft.lr / 2)
    assert expected[-1] == pytest.approx(recipe.sft.lr * recipe.sft.min_lr_frac)


def test_sft_creates_its_work_dir(tok, base, tmp_path) -> None:
    sft(tiny_recipe(steps=2), tok, base, tmp_path / "new" / "work")
    assert (tmp_path / "new" / "work" / "final" / "model.safetensors").is_file()


def test_sft_loss_goes_down_on_a_tiny_dataset(tok, base, tmp_path) -> None:
    recipe = tiny_recipe(steps=40, task_examples=3, seq_len=64, lr=1e-2, ckpt_every=40)
    metrics = sft(recipe, tok, base, tmp_path)
    assert metrics["sft/rows"] == 1  # the same row, every step
    losses = [r["loss"] for r in log(tmp_path)]
    assert len(losses) == 40
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert metrics["sft/final_loss"] == pytest.approx(sum(losses[-5:]) / 5, abs=1e-5)


class Crash(Exception):
    pass


def crash_after_checkpoint(monkeypatch: pytest.MonkeyPatch, at_step: int) -> None:
    """Make the trainer raise `Crash` right after it writes the checkpoint of `at_step`."""
    real_save = trainer_module.save_checkpoint

    def save_then_crash(root, step, *args, **kwargs):
        real_save(root, step, *args, **kwargs)
        if step == at_step:
            raise Crash

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_crash)


def test_crash_and_resume_is_bit_exact(tok, base, tmp_path, monkeypatch) -> None:
    recipe = tiny_recipe()
    clean = sft(recipe, tok, base, tmp_path / "clean")

    crash_after_checkpoint(monkeypatch, 4)
    with pytest.raises(Crash):
        sft(recipe, tok, base, tmp_path / "crashed")
    monkeypatch.undo()
    crashed = tmp_path / "crashed"
    assert latest_checkpoint(crashed / "checkpoints").name == "step_000004"
    assert not (crashed / "final").exists()
    assert [r["step"] for r in log(crashed)] == [1, 2, 3, 4]

    resumed = sft(recipe, tok, base, crashed)
    assert log(crashed) == log(tmp_path / "clean")
    assert [r["step"] for r in log(crashed)] == [1, 2, 3, 4, 5, 6]
    a, b = final_weights(tmp_path / "clean"), final_weights(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["sft/final_loss"] == clean["sft/final_loss"]


def test_more_steps_resume_from_a_shorter_run(tok, base, tmp_path) -> None:
    """With a constant learning rate (no warmup, no decay) the schedule does not depend on
    `steps`, so a run of 4 steps continued to 6 in the same folder equals a run of 6."""
    recipe = tiny_recipe(warmup_steps=0, min_lr_frac=1.0)
    sft(recipe, tok, base, tmp_path / "straight")
    short = tiny_recipe(warmup_steps=0, min_lr_frac=1.0, steps=4)
    sft(short, tok, base, tmp_path / "split")
    assert latest_checkpoint(tmp_path / "split" / "checkpoints").name == "step_000004"
    sft(recipe, tok, base, tmp_path / "split")
    assert log(tmp_path / "split") == log(tmp_path / "straight")
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seq_len_over_the_model_context_is_refused(tok, base, tmp_path) -> None:
    recipe = tiny_recipe(seq_len=MAX_SEQ_LEN + 1)
    with pytest.raises(StacklabError, match=r"sft\.seq_len \(65\).*max_seq_len \(64\)"):
        sft(recipe, tok, base, tmp_path)
    assert not (tmp_path / "final").exists()


# --------------------------------------------------------------------------- data


def test_sft_conversations_are_tasks_then_demonstrations_then_files(tmp_path) -> None:
    first = write_jsonl(tmp_path / "a.jsonl", USER_CHATS)
    second = write_jsonl(tmp_path / "b.jsonl", USER_CHATS[:1])
    recipe = tiny_recipe(
        task_examples=3, agent_envs=["lookup", "calculator"], agent_examples=2, data=[first, second]
    )
    got = sft_conversations(recipe)
    expected = task_conversations([TASK], 3, recipe.seed)
    expected += demonstrations("lookup", 2, recipe.seed)
    expected += demonstrations("calculator", 2, recipe.seed)
    expected += USER_CHATS + USER_CHATS[:1]
    assert got == expected
    assert got[-3:] == load_conversations(first) + load_conversations(second)


def test_sft_conversations_user_files_only(tmp_path) -> None:
    path = write_jsonl(tmp_path / "chats.jsonl", USER_CHATS)
    recipe = tiny_recipe(task_examples=0, data=[path])
    assert sft_conversations(recipe) == USER_CHATS


def test_sft_without_any_data_is_refused(tmp_path) -> None:
    recipe = tiny_recipe(task_examples=0, agent_envs=["calculator"], agent_examples=0)
    with pytest.raises(StacklabError, match="no training data"):
        sft_conversations(recipe)
    with pytest.raises(StacklabError, match="no training data"):
        sft_conversations(tiny_recipe(task_examples=0))


def test_sft_trains_on_a_user_file(tok, base, tmp_path) -> None:
    path = write_jsonl(tmp_path / "chats.jsonl", USER_CHATS)
    recipe = tiny_recipe(task_examples=0, data=[path], steps=2)
    metrics = sft(recipe, tok, base, tmp_path / "work")
    assert metrics["sft/conversations"] == 2 and metrics["sft/rows"] == 2  # 15 + 24 > 33


# --------------------------------------------------------------------------- the stage


def test_stage_config_disabled_ignores_sft_fields() -> None:
    off = Recipe()
    assert SFT_STAGE.config(off) == {"enabled": False}
    changed = Recipe()
    changed.sft.lr = 0.5
    changed.sft.steps = 7
    changed.sft.agent_envs = ["lookup"]
    changed.data.tasks = [TASK]
    changed.seed = 9
    assert SFT_STAGE.config(changed) == {"enabled": False}
    assert sft_fingerprint(changed) == []


def test_stage_config_tracks_what_changes_the_model(tmp_path) -> None:
    base_cfg = SFT_STAGE.config(tiny_recipe())
    assert base_cfg != {"enabled": False}
    assert SFT_STAGE.config(tiny_recipe()) == base_cfg
    assert json.loads(json.dumps(base_cfg)) == base_cfg  # plain JSON, hashable as a key
    assert SFT_STAGE.config(tiny_recipe(lr=2e-3)) != base_cfg
    assert SFT_STAGE.config(tiny_recipe(steps=7)) != base_cfg
    assert SFT_STAGE.config(tiny_recipe(agent_envs=["calculator"])) != base_cfg
    other_tasks = tiny_recipe()
    other_tasks.data.tasks = [ArithmeticTask(max_digits=2)]
    assert SFT_STAGE.config(other_tasks) != base_cfg
    other_seed = tiny_recipe()
    other_seed.seed = 6
    assert SFT_STAGE.config(other_seed) != base_cfg
    # User files are covered by content (the fingerprint), not by their path.
    path = write_jsonl(tmp_path / "chats.jsonl", USER_CHATS)
    assert SFT_STAGE.config(tiny_recipe(data=[path])) == base_cfg
    assert SFT_STAGE.name == "sft" and SFT_STAGE.deps == ("tokenizer", "shards", "pretrain")
    assert SFT_STAGE.resumable


def test_fingerprint_follows_user_file_content(tmp_path) -> None:
    path = write_jsonl(tmp_path / "chats.jsonl", USER_CHATS)
    recipe = tiny_recipe(data=[path])
    assert SFT_STAGE.fingerprint is sft_fingerprint
    first = sft_fingerprint(recipe)
    assert len(first) == 1 and sft_fingerprint(recipe) == first
    write_jsonl(path, USER_CHATS[:1])
    second = sft_fingerprint(recipe)
    assert second != first
    write_jsonl(path, USER_CHATS)
    assert sft_fingerprint(recipe) == first
    assert sft_fingerprint(tiny_recipe()) == []


def test_fingerprint_of_a_missing_file_names_sft_data(tmp_path) -> None:
    recipe = tiny_recipe(data=[tmp_path / "nope.jsonl"])
    with pytest.raises(DataError, match=r"sft\.data.*nope\.jsonl"):
        sft_fingerprint(recipe)


# --------------------------------------------------------------------------- phases


def phased(tmp_path: Path, **fields: object) -> Recipe:
    """12 task chats and the 2 user chats; 2 steps on both sources, then 4 on the file."""
    path = write_jsonl(tmp_path / "chats.jsonl", USER_CHATS)
    return tiny_recipe(
        data=[path],
        phases=[SFTPhase(steps=2), SFTPhase(steps=4, sources=["data"])],
        **fields,
    )


def test_phases_draw_only_from_their_sources(tok, tmp_path) -> None:
    schedule = Schedule(phased(tmp_path), tok)
    tasks_only = pack_sft(tok, task_conversations([TASK], 12, seed=5), 32, seed=5)
    n_task_rows = tasks_only.inputs.shape[0]
    # Each source is packed on its own: the task rows, then the user file's 2 rows.
    assert torch.equal(schedule.rows.inputs[:n_task_rows], tasks_only.inputs)
    assert schedule.rows.inputs.shape[0] == n_task_rows + 2
    assert schedule.rows.conversations == 14
    first = torch.cat([schedule.batch(s, 2, seed=5) for s in range(2)]).tolist()
    later = torch.cat([schedule.batch(s, 2, seed=5) for s in range(2, 6)]).tolist()
    # Phase 2 is the batch order of 2 rows from its own step 0: each row twice per 2 steps.
    assert sorted(later) == [n_task_rows] * 4 + [n_task_rows + 1] * 4
    assert later[:2] == (n_task_rows + batch_indices(2, 2, 0, seed=5)).tolist()
    assert all(0 <= i < n_task_rows + 2 for i in first)
    with pytest.raises(ValueError, match="past the schedule's 6 steps"):
        schedule.batch(6, 2, seed=5)


def test_a_source_named_twice_is_drawn_twice_as_often(tok, tmp_path) -> None:
    """`sources: [data, data, tasks]`: the file's rows are in the phase's pool twice, so one
    epoch of the phase draws each of them twice and each task row once."""
    path = write_jsonl(tmp_path / "chats.jsonl", USER_CHATS)
    phases = [SFTPhase(steps=6, sources=["data", "data", "tasks"])]
    schedule = Schedule(tiny_recipe(data=[path], phases=phases), tok)
    n = schedule.rows.inputs.shape[0]  # the task rows, then the file's 2 rows
    epoch = schedule.batch(0, n + 2, seed=5).tolist()  # one step of one whole epoch
    assert sorted(epoch) == [*range(n - 2), n - 2, n - 2, n - 1, n - 1]


def test_no_phases_keeps_one_packing_of_all_sources(tok, tmp_path) -> None:
    path = write_jsonl(tmp_path / "chats.jsonl", USER_CHATS)
    recipe = tiny_recipe(data=[path])
    schedule = Schedule(recipe, tok)
    joint = pack_sft(tok, sft_conversations(recipe), 32, seed=5)
    assert torch.equal(schedule.rows.inputs, joint.inputs)
    for s in range(6):
        n = joint.inputs.shape[0]
        assert torch.equal(schedule.batch(s, 2, seed=5), batch_indices(n, 2, s, seed=5))


def test_phased_sft_trains_and_resumes_bit_exactly(tok, base, tmp_path, monkeypatch) -> None:
    recipe = phased(tmp_path)
    clean = sft(recipe, tok, base, tmp_path / "clean")
    assert clean["sft/steps"] == 6 and clean["sft/conversations"] == 14
    real_save = trainer_module.save_checkpoint

    def save_then_crash(root, step, *args, **kwargs):
        real_save(root, step, *args, **kwargs)
        if step == 2:  # the end of phase 1
            raise Crash

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        sft(recipe, tok, base, tmp_path / "crashed")
    monkeypatch.undo()
    sft(recipe, tok, base, tmp_path / "crashed")
    assert log(tmp_path / "crashed") == log(tmp_path / "clean")
    a, b = final_weights(tmp_path / "clean"), final_weights(tmp_path / "crashed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_phases_change_the_stage_key(tmp_path) -> None:
    assert SFT_STAGE.config(phased(tmp_path)) != SFT_STAGE.config(
        tiny_recipe(data=[tmp_path / "chats.jsonl"])
    )


@pytest.mark.parametrize(
    ("phases", "agent_envs", "message"),
    [
        ([{"steps": 2}, {"steps": 3}], [], r"add up to 5, but sft\.steps is 6"),
        ([{"steps": 6, "sources": ["lookup"]}], ["calculator"], r"'lookup' has no demonstr"),
        ([{"steps": 6, "sources": ["math"]}], [], r"tasks.*calculator.*lookup.*data"),
        ([{"steps": 6, "sources": []}], [], r"at least 1 item"),
        ([{"steps": 0}, {"steps": 6}], [], r"greater than or equal to 1"),
    ],
)
def test_bad_phases_are_refused_with_the_reason(phases, agent_envs, message) -> None:
    fields = {"enabled": True, "steps": 6, "agent_envs": agent_envs, "phases": phases}
    with pytest.raises(ValidationError, match=message):
        SFTConfig.model_validate(fields)
    if "steps is" in message:  # a disabled stage's fields are not read, nor checked
        SFTConfig.model_validate({**fields, "enabled": False})


def test_a_phase_on_a_source_without_data_is_refused(tok, tmp_path) -> None:
    recipe = tiny_recipe(phases=[SFTPhase(steps=6, sources=["data"])])
    with pytest.raises(StacklabError, match=r"phases\[0\]\.sources: no conversations from data"):
        Schedule(recipe, tok)


# --------------------------------------------------------------------------- small sums first

TWO_DIGITS = ArithmeticTask(ops=["+", "-"], max_digits=2)


def operands(conversation: list[dict]) -> list[str]:
    return re.split(r"[+\-*]", conversation[0]["content"].rstrip("="))


def test_small_task_conversations_keep_to_the_cap_and_the_train_split() -> None:
    convs = small_task_conversations([TWO_DIGITS], 1, 400, seed=3)
    assert len(convs) == 400
    assert all(len(x) == 1 for c in convs for x in operands(c))
    gen = make_generator(TWO_DIGITS)
    heldout = {p.key for p in gen.problems("eval", 10, seed=0)}
    keys = [c[0]["content"].rstrip("=") for c in convs]
    assert not heldout & set(keys)
    # One-digit problems are 200 in all: 400 draws repeat some, as they must.
    assert len(set(keys)) < 400
    assert convs == small_task_conversations([TWO_DIGITS], 1, 400, seed=3)
    assert convs != small_task_conversations([TWO_DIGITS], 1, 400, seed=4)
    # A task whose operands all have more digits than the cap gives nothing.
    assert small_task_conversations([ArithmeticTask(min_digits=2, max_digits=3)], 1, 5, 0) == []


def test_an_easy_phase_trains_on_small_sums_and_leaves_the_other_rows_alone(tok) -> None:
    easy = tiny_recipe(
        steps=6,
        phases=[SFTPhase(steps=2, sources=["tasks"], task_max_digits=1), SFTPhase(steps=4)],
    )
    plain = tiny_recipe(steps=6, phases=[SFTPhase(steps=2), SFTPhase(steps=4)])
    for recipe in (easy, plain):
        recipe.data.tasks = [TWO_DIGITS]
    schedule, reference = Schedule(easy, tok), Schedule(plain, tok)
    n = reference.rows.inputs.shape[0]
    # The full task pool is packed as before; the small sums are packed after it.
    assert torch.equal(schedule.rows.inputs[:n], reference.rows.inputs)
    assert schedule.rows.inputs.shape[0] > n
    for step in range(2):
        assert all(i >= n for i in schedule.batch(step, 2, seed=5).tolist())
        text = tok.decode(schedule.rows.inputs[schedule.batch(step, 2, seed=5)[0]].tolist())
        sums = re.findall(r"(\d+)[+-](\d+)=", text)
        assert sums and all(len(a) == len(b) == 1 for a, b in sums)
    for step in range(2, 6):  # the later phase draws from the full pool only
        assert torch.equal(schedule.batch(step, 2, seed=5), reference.batch(step, 2, seed=5))
    # Only a recipe that uses the option carries it in its stage key.
    assert "task_max_digits" not in json.dumps(SFT_STAGE.config(plain))
    assert SFT_STAGE.config(easy) != SFT_STAGE.config(plain)


def test_an_easy_phase_without_tasks_or_small_problems_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"phases\[0\]\.task_max_digits: the phase has no"):
        SFTConfig.model_validate(
            {
                "enabled": True,
                "steps": 2,
                "agent_envs": ["calculator"],
                "phases": [{"steps": 2, "sources": ["calculator"], "task_max_digits": 1}],
            }
        )
    sft_cfg = {"enabled": True, "steps": 2, "phases": [{"steps": 2, "task_max_digits": 1}]}
    with pytest.raises(ValidationError, match=r"no data\.tasks problem has operands of at most 1"):
        Recipe.model_validate(
            {"data": {"tasks": [{"kind": "arithmetic", "min_digits": 2}]}, "sft": sft_cfg}
        )


# --------------------------------------------------------------------------- pretraining mix


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A train split of random documents in rows of 16 + 1 tokens (ids below the vocab)."""
    return random_shards(tmp_path_factory.mktemp("shards"), vocab=64, seq_len=16, seed=2)


def token_stream(shard_dir: Path) -> list[int]:
    """The packed stream the train rows were cut from: consecutive rows share one token."""
    split = open_split(shard_dir, "train")
    rows = split.rows(range(split.num_rows)).tolist()
    return rows[0] + [t for row in rows[1:] for t in row[1:]]


@pytest.mark.parametrize(("seq_len", "rows_per_window"), [(10, 1), (16, 1), (32, 2), (40, 3)])
def test_pretrain_windows_are_spans_of_the_stream(shards, seq_len, rows_per_window) -> None:
    """Shorter SFT rows crop one shard row, longer ones join consecutive rows; either way a
    window is an unbroken span of the pretraining stream, every target trained."""
    windows = PretrainWindows(shards, seq_len)
    n_rows = open_split(shards, "train").num_rows
    assert windows.rows_per_window == rows_per_window
    assert windows.count == n_rows // rows_per_window
    stream = token_stream(shards)
    picked = torch.tensor([0, 3, windows.count - 1, 3])
    inputs, targets = windows.batch(picked)
    assert inputs.shape == targets.shape == (4, seq_len) and inputs.dtype == torch.int64
    for row, j in enumerate(picked.tolist()):
        start = j * rows_per_window * 16
        span = stream[start : start + seq_len + 1]
        assert inputs[row].tolist() == span[:-1] and targets[row].tolist() == span[1:]
    assert (targets != IGNORE).all()


def test_pretrain_windows_need_one_window_of_rows(shards) -> None:
    with pytest.raises(DataError, match="too few for one window of 100000"):
        PretrainWindows(shards, 100_000)


def test_window_order_is_its_own_and_a_function_of_seed_and_step() -> None:
    a = torch.cat([window_indices(50, 4, s, seed=5) for s in range(25)]).tolist()
    assert sorted(a[:48]) == sorted(set(a[:48])) and set(a[:50]) == set(range(50))
    assert a == torch.cat([window_indices(50, 4, s, seed=5) for s in range(25)]).tolist()
    assert a != torch.cat([window_indices(50, 4, s, seed=6) for s in range(25)]).tolist()
    assert a[:4] != batch_indices(50, 4, 0, seed=5).tolist()  # not the chat rows' order


def record_forwards(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (inputs, targets) the model is trained on, in order."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    forward, chat = Transformer.forward, sft_module.chat_loss

    def spy(self, inputs, targets=None, **kwargs):
        if targets is not None:  # a pretraining window's forward
            calls.append((inputs.clone(), targets.clone()))
        return forward(self, inputs, targets, **kwargs)

    def chat_spy(model, inputs, targets):  # chat rows: the head only at trained positions
        calls.append((inputs.clone(), targets.clone()))
        return chat(model, inputs, targets)

    monkeypatch.setattr(Transformer, "forward", spy)
    monkeypatch.setattr(sft_module, "chat_loss", chat_spy)
    return calls


def test_pretrain_mix_takes_its_share_of_every_batch(tok, base, shards, tmp_path, monkeypatch):
    """batch_size 4, pretrain_mix 0.25: each step trains 3 chat rows (the chat order at 3
    rows a step), then 1 pretraining window (the windows' order); both losses are logged."""
    recipe = tiny_recipe(batch_size=4, pretrain_mix=0.25)
    calls = record_forwards(monkeypatch)
    metrics = sft(recipe, tok, base, tmp_path, shards)
    monkeypatch.undo()
    schedule, windows = Schedule(recipe, tok), PretrainWindows(shards, 32)
    assert len(calls) == 2 * 6
    for step in range(6):
        (chat_in, chat_tg), (lm_in, lm_tg) = calls[2 * step : 2 * step + 2]
        idx = schedule.batch(step, 3, seed=5)
        assert torch.equal(chat_in, schedule.rows.inputs[idx])
        assert torch.equal(chat_tg, schedule.rows.targets[idx])
        expected = windows.batch(window_indices(windows.count, 1, step, seed=5))
        assert torch.equal(lm_in, expected[0]) and torch.equal(lm_tg, expected[1])
    assert metrics["sft/pretrain_rows"] == 1
    records = log(tmp_path)
    assert all(set(r) == {"step", "loss", "lr", "grad_norm", "lm_loss"} for r in records)
    assert metrics["sft/final_lm_loss"] == round(sum(r["lm_loss"] for r in records[-5:]) / 5, 5)
    assert metrics["sft/final_loss"] == round(sum(r["loss"] for r in records[-5:]) / 5, 5)


def test_pretrain_mix_zero_trains_as_before(tok, base, shards, tmp_path, monkeypatch) -> None:
    """Without a mix the shards are not read and the batches and losses are SFT's alone;
    the stage key carries no trace of the option."""
    calls = record_forwards(monkeypatch)
    with_shards = sft(tiny_recipe(), tok, base, tmp_path / "a", shards)
    n = len(calls)
    without = sft(tiny_recipe(pretrain_mix=0.0), tok, base, tmp_path / "b")
    assert n == 6 and len(calls) == 12
    first, second = torch.cat([c[0] for c in calls[:6]]), torch.cat([c[0] for c in calls[6:]])
    assert torch.equal(first, second)
    first, second = torch.cat([c[1] for c in calls[:6]]), torch.cat([c[1] for c in calls[6:]])
    assert torch.equal(first, second)
    assert log(tmp_path / "a") == log(tmp_path / "b")
    assert {k: v for k, v in with_shards.items() if k != "sft/seconds"} == {
        k: v for k, v in without.items() if k != "sft/seconds"
    }
    assert "pretrain_mix" not in json.dumps(SFT_STAGE.config(tiny_recipe()))
    assert SFT_STAGE.config(tiny_recipe(pretrain_mix=0.25)) != SFT_STAGE.config(tiny_recipe())


def test_pretrain_mix_without_shards_is_refused(tok, base, tmp_path) -> None:
    with pytest.raises(StacklabError, match="pretrain_mix needs the shards"):
        sft(tiny_recipe(batch_size=4, pretrain_mix=0.25), tok, base, tmp_path)


def test_mixed_sft_resumes_bit_exactly(tok, base, shards, tmp_path, monkeypatch) -> None:
    recipe = tiny_recipe(batch_size=4, pretrain_mix=0.5)
    sft(recipe, tok, base, tmp_path / "clean", shards)
    crash_after_checkpoint(monkeypatch, 4)
    with pytest.raises(Crash):
        sft(recipe, tok, base, tmp_path / "crashed", shards)
    monkeypatch.undo()
    sft(recipe, tok, base, tmp_path / "crashed", shards)
    assert log(tmp_path / "crashed") == log(tmp_path / "clean")
    assert [r["step"] for r in log(tmp_path / "crashed")] == [1, 2, 3, 4, 5, 6]
    a, b = final_weights(tmp_path / "clean"), final_weights(tmp_path / "crashed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("mix", "batch_size", "message"),
    [
        (1.0, 8, r"pretrain_mix\n.*less than 1"),
        (-0.1, 8, r"pretrain_mix\n.*greater than or equal to 0"),
        (0.05, 8, r"sft\.pretrain_mix 0\.05 of sft\.batch_size 8 is 0 rows.*0\.125 to 0\.875"),
        (0.95, 8, r"is 8 rows a batch"),
    ],
)
def test_an_out_of_range_pretrain_mix_is_refused(mix, batch_size, message) -> None:
    fields = {"enabled": True, "batch_size": batch_size, "pretrain_mix": mix}
    with pytest.raises(ValidationError, match=message):
        SFTConfig.model_validate(fields)
    assert SFTConfig.model_validate({**fields, "pretrain_mix": 0.25}).pretrain_rows == 2
    assert SFTConfig.model_validate({**fields, "pretrain_mix": 0.3}).pretrain_rows == 2
