"""SFT data: targets exactly on assistant tokens, the loss over exactly those, packing, loading."""

import json
import random

import pytest
import torch
import torch.nn.functional as F

from stacklab.data.chat import encode_chat, render_chat
from stacklab.data.tasks import ArithmeticGenerator, Problem
from stacklab.data.tokenizer import EOT_ID, PAD_ID, train_tokenizer
from stacklab.errors import DataError
from stacklab.model.transformer import build_model
from stacklab.recipe import ArithmeticTask, ModelConfig, TokenizerConfig
from stacklab.train.sft_data import (
    IGNORE,
    load_conversations,
    pack_sft,
    task_conversations,
)

TOOL_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [{"name": "weather", "arguments": {"city": "Paris"}}],
    },
    {"role": "tool", "content": "sunny, 21C"},
    {"role": "assistant", "content": "Sunny, 21C."},
]
TOOL_CHAT_TRAINED = [
    'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n'
    "</tool_call><|im_end|>",
    "Sunny, 21C.<|im_end|>",
]
ARITH = ArithmeticTask(max_digits=1, eval_fraction=0.3)


def _chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = ["the", "weather", "in", "paris", "is", "sunny", "let", "me", "check", "tool"]
    texts = [" ".join(rng.choices(words, k=10)) + f" {i * 37}+{i}=\n" for i in range(300)]
    texts += [render_chat(TOOL_CHAT)] * 3
    return train_tokenizer(texts, TokenizerConfig(vocab_size=400, min_frequency=2))


def _kept_runs(tok, targets: torch.Tensor) -> list[str]:
    """Each maximal stretch of kept targets in a row, decoded."""
    runs, current = [], []
    for t in [*targets.tolist(), IGNORE]:
        if t != IGNORE:
            current.append(t)
        elif current:
            runs.append(tok.decode(current, skip_special_tokens=False))
            current = []
    return runs


def test_targets_are_exactly_the_assistant_tokens(tok):
    chats = [TOOL_CHAT, _chat("12+3=", "15"), _chat("7-80=", "-73"), _chat("2*4=", "8")]
    rows = pack_sft(tok, chats, seq_len=96, seed=0)
    runs = [run for row in rows.targets for run in _kept_runs(tok, row)]
    expected = [*TOOL_CHAT_TRAINED, "15<|im_end|>", "-73<|im_end|>", "8<|im_end|>"]
    assert sorted(runs) == sorted(expected)
    # A kept target is the next input token; pads are never targets.
    kept = rows.targets[:, :-1] != IGNORE
    assert torch.equal(rows.targets[:, :-1][kept], rows.inputs[:, 1:][kept])
    assert not (rows.targets == PAD_ID).any() and not (rows.targets == EOT_ID).any()
    masks = [encode_chat(tok, c)[1] for c in chats]
    stats = rows.stats()
    assert stats["assistant_tokens"] == sum(map(sum, masks))
    assert stats["conversations"] == 4 and stats["rows"] == rows.inputs.shape[0] > 1
    assert rows.inputs.dtype == rows.targets.dtype == torch.int64
    assert rows.inputs.shape == rows.targets.shape == (stats["rows"], 96)


def test_rows_hold_whole_conversations_in_seeded_order(tok):
    chats = [_chat(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]
    rows = pack_sft(tok, chats, seq_len=40, seed=3)
    again = pack_sft(tok, chats, seq_len=40, seed=3)
    other = pack_sft(tok, chats, seq_len=40, seed=4)
    assert torch.equal(rows.inputs, again.inputs) and torch.equal(rows.targets, again.targets)
    assert not torch.equal(rows.inputs, other.inputs)
    # Every row is whole conversations separated by <|endoftext|>, then padding. (The row's
    # last token, the last separator or a pad, is never an input and never a target.)
    seen = []
    for row in rows.inputs.tolist():
        n = row.index(PAD_ID) if PAD_ID in row else len(row)
        assert all(t == PAD_ID for t in row[n:])
        seen += tok.decode(row[:n], skip_special_tokens=False).split("<|endoftext|>")
        if seen[-1] == "":
            seen.pop()
    assert sorted(seen) == sorted(render_chat(c) for c in chats)
    assert (rows.targets != IGNORE).any(dim=1).all()  # every row has a loss


def test_too_long_and_untrained_conversations_are_dropped(tok):
    ids, _ = encode_chat(tok, _chat("1+1=", "2"))
    fits = len(ids) + 1  # with the separator
    chats = [_chat("1+1=", "2"), _chat("1+1=", "2 " * 20), [{"role": "user", "content": "hi"}]]
    rows = pack_sft(tok, chats, seq_len=fits - 1, seed=0)
    assert rows.stats() == {
        "conversations": 1,
        "rows": 1,
        "assistant_tokens": 2,  # "2", <|im_end|>
        "pad_tokens": 0,
        "dropped_too_long": 1,
        "dropped_untrained": 1,
    }
    with pytest.raises(DataError, match=r"no conversation to train on \(1 longer"):
        pack_sft(tok, chats[1:], seq_len=fits - 1, seed=0)


def test_loss_is_cross_entropy_over_exactly_the_assistant_positions(tok):
    ids, mask = encode_chat(tok, TOOL_CHAT)
    rows = pack_sft(tok, [TOOL_CHAT], seq_len=len(ids), seed=0)  # one row, no padding
    assert rows.inputs[0].tolist() == ids
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, aspect=32, head_dim=16, max_seq_len=len(ids)).build()
    model = build_model(cfg, tok.get_vocab_size())

    loss = model(rows.inputs, rows.targets).loss  # what an SFT step trains on
    logits = model(rows.inputs).logits[0].float()  # [T, V]
    # Position t predicts token t + 1; it counts iff the assistant wrote token t + 1.
    positions = [t for t in range(len(ids) - 1) if mask[t + 1]]
    picked = torch.tensor([ids[t + 1] for t in positions])
    expected = -F.log_softmax(logits[positions], dim=-1).gather(1, picked[:, None]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)

    # No gradient reaches the logits of a prompt, header or tool-response position.
    out = model(rows.inputs)
    out.logits.retain_grad()
    F.cross_entropy(out.logits[0].float(), rows.targets[0], ignore_index=IGNORE).backward()
    has_grad = out.logits.grad[0].abs().sum(-1) > 0
    assert has_grad.nonzero().flatten().tolist() == positions


def test_task_conversations_come_from_the_train_split():
    gen = ArithmeticGenerator(ARITH)
    chats = task_conversations([ARITH], n_per_task=150, seed=5)
    assert chats == task_conversations([ARITH], n_per_task=150, seed=5)
    assert chats != task_conversations([ARITH], n_per_task=150, seed=6)
    keys = set()
    for user, assistant in chats:
        key = user["content"].removesuffix("=")
        problem = Problem("arithmetic", key, user["content"], assistant["content"])
        assert gen.split_of(problem) == "train"
        assert gen.verify(problem, assistant["content"])  # the answer is the right one
        keys.add(key)
    assert len(keys) == 150
    with pytest.raises(DataError, match="cannot draw"):
        task_conversations([ARITH], n_per_task=290, seed=0)  # ~210 train problems exist


def test_load_conversations(tmp_path):
    path = tmp_path / "sft.jsonl"
    good = {"messages": _chat("1+1=", "2"), "id": "a"}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"messages": TOOL_CHAT}) + "\n")
    assert load_conversations(path) == [good["messages"], TOOL_CHAT]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"messages": [', "invalid JSON"),
        ('{"text": "hi"}', 'expected an object with a "messages" list'),
        ("[1, 2]", 'expected an object with a "messages" list'),
        ('{"messages": [' * 100_000, "invalid JSON (RecursionError)"),
        ('{"messages": []}', "messages must be a non-empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "chat message 0: unknown role"),
    ],
)
def test_load_conversations_names_the_bad_line(tmp_path, line, problem):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": _chat("1+1=", "2")}) + "\n" + line + "\n")
    with pytest.raises(DataError) as err:
        load_conversations(path)
    assert str(err.value).startswith(f"{path}:2: ")
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_load_conversations_missing_or_empty(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_conversations(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no conversations"):
        load_conversations(tmp_path / "empty.jsonl")


def test_non_utf8_line_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "conv.jsonl"
    good = b'{"messages": [{"role": "user", "content": "hi"}]}'
    path.write_bytes(good + b'\n{"messages": "\xff"}\n')
    with pytest.raises(DataError, match=r"conv\.jsonl:2: not UTF-8"):
        load_conversations(path)
