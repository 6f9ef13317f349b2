"""Evaluation objectives: exact bits per byte, task grading, and the eval stage's wiring."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from stacklab.data.shards import open_split, write_index, write_split
from stacklab.data.tasks import make_generator
from stacklab.data.tokenizer import EOT_ID, save_tokenizer, train_tokenizer
from stacklab.evals.objectives import (
    accuracy_by_task,
    constant_answer_baseline,
    encode_prompts,
    grade_tasks,
    pass_at_k,
    token_bytes,
    val_bpb,
)
from stacklab.evals.stage import COMPLETIONS, EVAL_STAGE, evaluate, evaluate_run
from stacklab.model.transformer import ModelOutput, build_model
from stacklab.recipe import ArithmeticTask, ModelConfig, Recipe, TokenizerConfig
from stacklab.train.checkpoint import write_model

TASK = ArithmeticTask(max_digits=2)
SEQ_LEN = 16


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "x = 1", "(y)", "café", "🙂"]
    return [" ".join(rng.choices(words, k=rng.randint(5, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    gen = make_generator(TASK)
    corpus = texts(200) + [gen.render(p) for p in gen.problems("train", 300, 0)]
    return train_tokenizer(corpus, TokenizerConfig(vocab_size=300, min_frequency=2))


@pytest.fixture(scope="module")
def ascii_docs() -> list[str]:
    return [t.replace("café", "cafe").replace("🙂", ":)") for t in texts(12, seed=1)]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tok, ascii_docs) -> Path:
    out = tmp_path_factory.mktemp("shards")
    docs = [tok.encode(t).ids for t in ascii_docs]
    V = tok.get_vocab_size()
    val = write_split(out, "val", docs, SEQ_LEN, rows_per_shard=4, vocab_size=V)
    train = write_split(out, "train", docs, SEQ_LEN, rows_per_shard=4, vocab_size=V)
    val_bytes = sum(len(t.encode()) for t in ascii_docs)
    write_index(out, {"train": train, "val": val}, meta={"val_bytes": val_bytes})
    return out


def tiny_model(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(depth=1, aspect=32, head_dim=16, max_seq_len=64).build(), vocab)


class Uniform(nn.Module):
    """Equal logits for every token: −log₂ p = log₂ V bits for every target."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab_size = vocab
        self.embed = nn.Embedding(1, 1)

    def forward(self, input_ids, targets=None, **_):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        return ModelOutput(logits=logits, loss=None, aux_loss=torch.zeros(()))


class Scripted(nn.Module):
    """Test stand-in for a model: after a prompt it spells out the text `replies[prompt]`.

    It keeps each row's tokens itself and puts all the probability on the next token of the
    scripted reply, then on the end-of-text token; it uses the real model's cache only for
    its length, so `generate` drives it exactly as it drives a transformer.
    """

    def __init__(self, inner, tok, replies: dict[str, str]) -> None:
        super().__init__()
        self.inner, self.cfg, self.embed = inner, inner.cfg, inner.embed
        self.vocab_size = inner.vocab_size
        self.next: dict[tuple[int, ...], int] = {}
        for prompt, reply in replies.items():
            ids = encode_prompts(tok, [prompt])[0]
            spelled = [*tok.encode(reply).ids, EOT_ID]
            for k, token in enumerate(spelled):
                self.next[tuple(ids + spelled[:k])] = token

    def new_cache(self, batch, max_len=None):
        return self.inner.new_cache(batch, max_len)

    def forward(self, input_ids, targets=None, *, cache, positions, key_mask, logits="all"):
        if cache.length == 0:
            self.rows = [ids[m].tolist() for ids, m in zip(input_ids, key_mask, strict=True)]
        else:
            for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
                row.append(token)
        cache.length += input_ids.shape[1]
        out = torch.zeros(*input_ids.shape, self.vocab_size)
        for i, row in enumerate(self.rows):
            out[i, -1, self.next.get(tuple(row), EOT_ID)] = 10.0
        out = out[:, -1:] if logits == "last" else out
        return ModelOutput(logits=out, loss=None, aux_loss=torch.zeros(()))


# --------------------------------------------------------------------------- val_bpb


def test_token_bytes_sum_to_the_texts_utf8_length(tok) -> None:
    sizes = token_bytes(tok)
    assert sizes.shape == (tok.get_vocab_size(),)
    assert sizes[:8].tolist() == [0] * 8  # special tokens stand for no bytes
    for text in [*texts(5, seed=7), "naïve café 🙂 ✓\ttab\n", "12*34=408"]:
        assert int(sizes[tok.encode(text).ids].sum()) == len(text.encode("utf-8"))


def test_val_bpb_of_uniform_logits_is_log2_vocab_per_token(tok, ascii_docs, shard_dir) -> None:
    V = tok.get_vocab_size()
    val = open_split(shard_dir, "val")
    # The evaluated targets: the stream of documents and boundaries, less its first token
    # and the dropped partial row. All text is ASCII, so bytes = decoded characters.
    stream = [t for doc in ascii_docs for t in [*tok.encode(doc).ids, EOT_ID]]
    targets = stream[1 : val.num_rows * SEQ_LEN + 1]
    n_bytes = len(tok.decode(targets, skip_special_tokens=True))
    expected = len(targets) * math.log2(V) / n_bytes
    assert val_bpb(Uniform(V), shard_dir, tok, batch_size=3) == pytest.approx(expected, rel=1e-6)
    # max_batches: only the first batch's targets count.
    first = stream[1 : 3 * SEQ_LEN + 1]
    first_bpb = len(first) * math.log2(V) / len(tok.decode(first, skip_special_tokens=True))
    got = val_bpb(Uniform(V), shard_dir, tok, batch_size=3, max_batches=1)
    assert got == pytest.approx(first_bpb, rel=1e-6)


def test_val_bpb_of_a_model_is_its_mean_loss_in_bits_per_byte(tok, shard_dir) -> None:
    model = tiny_model(tok.get_vocab_size())
    val = open_split(shard_dir, "val")
    rows = torch.from_numpy(val.rows(range(val.num_rows)).astype("int64"))
    with torch.no_grad():
        loss = model(rows[:, :-1], targets=rows[:, 1:]).loss.item()  # mean nats per target
    n_bytes = int(token_bytes(tok)[rows[:, 1:]].sum())
    expected = loss * rows[:, 1:].numel() / math.log(2) / n_bytes
    assert val_bpb(model, shard_dir, tok, batch_size=4) == pytest.approx(expected, rel=1e-5)


def test_val_bpb_refuses_a_mismatched_vocabulary(tok, shard_dir) -> None:
    with pytest.raises(ValueError, match="ids"):
        val_bpb(Uniform(tok.get_vocab_size() + 1), shard_dir, tok, batch_size=4)


# --------------------------------------------------------------------------- task accuracy


def test_prompts_start_with_a_document_boundary(tok) -> None:
    ids = encode_prompts(tok, ["12+3=", "<|endoftext|>"])
    assert ids[0] == [EOT_ID, *tok.encode("12+3=").ids]
    assert ids[1][0] == EOT_ID and EOT_ID not in ids[1][1:]  # the string is text here
    assert not tok.encode_special_tokens  # the caller's tokenizer is left as it was


def test_task_accuracy_of_right_wrong_and_random_models(tok) -> None:
    problems = make_generator(TASK).problems("eval", 12, seed=5)
    inner = tiny_model(tok.get_vocab_size())

    def accuracy(replies: dict[str, str]) -> float:
        model = Scripted(inner, tok, replies)
        return accuracy_by_task(
            grade_tasks(model, tok, [TASK], 12, 5, max_new_tokens=8, batch_size=5)
        )["task_acc/arithmetic"]

    assert accuracy({p.prompt: p.answer for p in problems}) == 1.0

    # Half right; an extra digit, a missing digit or a stray special token scores zero.
    def wrong(i: int, answer: str) -> str:
        return ["9" + answer, answer[:-1], answer + "<|pad|>"][i % 3]

    replies = {p.prompt: p.answer if i % 2 else wrong(i, p.answer) for i, p in enumerate(problems)}
    assert accuracy(replies) == 0.5
    random_acc = accuracy_by_task(
        grade_tasks(inner, tok, [TASK], 12, 5, max_new_tokens=8, batch_size=5)
    )
    assert random_acc == {"task_acc/arithmetic": 0.0}


def test_grade_tasks_records_completions(tok) -> None:
    problems = make_generator(TASK).problems("eval", 4, seed=0)
    replies = {p.prompt: f"{p.answer}\nmore" for p in problems}
    model = Scripted(tiny_model(tok.get_vocab_size()), tok, replies)
    graded = grade_tasks(model, tok, [TASK], 4, 0, max_new_tokens=16, batch_size=4)
    assert [g.problem for g in graded] == problems
    assert [g.completion for g in graded] == [replies[p.prompt] for p in problems]
    assert all(g.correct for g in graded)


# --------------------------------------------------------------------------- the eval stage


def test_eval_stage_and_evaluate_run(tmp_path: Path, tok, shard_dir) -> None:
    recipe = Recipe(seed=3)
    recipe.data.tasks = [TASK]
    recipe.eval.task_problems = 6
    recipe.eval.batch_size = 4
    run = tmp_path / "run"
    model = tiny_model(tok.get_vocab_size())
    write_model(run / "pretrain" / "final", model.cfg, model.vocab_size, model.state_dict())
    save_tokenizer(tok, run / "tokenizer")
    (run / "shards").symlink_to(shard_dir)
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    inputs = {name: run / name for name in EVAL_STAGE.deps}

    metrics = evaluate(recipe, inputs, tmp_path)
    assert set(metrics) == {
        "val_bpb",
        "pretrain/val_bpb",
        "task_acc/arithmetic",
        "task_baseline/arithmetic",
    }
    assert metrics["pretrain/val_bpb"] == metrics["val_bpb"]  # the same model, measured once
    assert 0 < metrics["val_bpb"] < 2 * math.log2(tok.get_vocab_size())
    lines = (tmp_path / COMPLETIONS).read_text().splitlines()
    assert len(lines) == 6
    assert set(json.loads(lines[0])) == {"task", "key", "prompt", "answer", "completion", "correct"}
    assert evaluate_run(run) == metrics
    assert evaluate_run(run, ["eval.val_batches=1"])["val_bpb"] != metrics["val_bpb"]
    # The stage's cache key covers the eval settings and the tasks.
    changed = recipe.model_copy(deep=True)
    changed.eval.max_new_tokens = 4
    assert EVAL_STAGE.config(changed) != EVAL_STAGE.config(recipe)


def test_constant_answer_baseline_is_the_commonest_answers_share() -> None:
    # One-digit products: "0" has 19 of the 100 problems (0*x, x*0), far ahead of any other
    # answer, so the baseline is the share of held-out problems whose answer is 0.
    task = ArithmeticTask(ops=["*"], min_digits=1, max_digits=1, eval_fraction=0.3)
    problems = make_generator(task).problems("eval", 20, seed=3)
    expected = sum(p.answer == "0" for p in problems) / len(problems)
    assert 0 < constant_answer_baseline(task, 20, seed=3) == expected


@pytest.mark.parametrize(
    ("n", "c", "k"), [(10, 0, 1), (10, 3, 1), (10, 3, 5), (5, 1, 5), (20, 4, 8)]
)
def test_pass_at_k_matches_the_combinatorial_formula(n: int, c: int, k: int) -> None:
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_edges() -> None:
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the plain success rate
    assert pass_at_k(4, 1, 4) == 1.0
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)
