"""SFT data: chat conversations packed into next-token rows that train only the assistant.

Why it works this way:

* **Loss on what the assistant wrote, nothing else.** `encode_chat` marks the assistant's
  tokens (content, tool calls, the closing `<|im_end|>`); a row's target is kept only where
  the *target* token is one of them. Prompts, system text, role headers and tool responses
  are context the model reads, never text it is taught to produce.
* **Whole conversations, packed.** Each conversation is followed by `<|endoftext|>` (a
  separator, not trained: the model learns to stop at `<|im_end|>`) and placed whole in a row
  of `seq_len + 1` tokens, next to others while they fit, in a seeded shuffled order; the
  rest of a row is `<|pad|>` with no targets. A conversation longer than a row is dropped,
  not truncated: a cut one would teach a reply without its ending, or a reply without the
  prompt it answers. So are conversations with no assistant token, which would train
  nothing; every row then has at least one target and a finite loss.
* **No new loss.** `Transformer.forward` already takes the mean cross-entropy over targets
  that are not -100, which with these targets is the mean over assistant tokens.

As in pretraining, conversations sharing a row see each other through causal attention; the
`<|endoftext|>` between them marks the boundary.

`PretrainWindows` is the other kind of row an SFT batch can hold (`sft.pretrain_mix`): plain
pretraining text, every token a target, cut from the shards to the SFT row length.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from stacklab.data.chat import encode_chat, task_conversation, validate_messages
from stacklab.data.shards import open_split
from stacklab.data.tasks import make_generator
from stacklab.data.tokenizer import EOT_ID, PAD_ID
from stacklab.errors import DataError
from stacklab.recipe import TaskConfig

IGNORE = -100  # a target the loss skips

Conversation = list[dict[str, Any]]


def load_conversations(path: str | Path) -> list[Conversation]:
    """Conversations from JSON Lines, one `{"messages": [...]}` object a line (other keys are
    ignored, blank lines skipped); a bad line is a `DataError` naming `path:line`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"conversation file not found: {path}")
    conversations: list[Conversation] = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not UTF-8 (byte {exc.start})") from None
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg}, column {exc.colno})") from None
        except (ValueError, RecursionError) as exc:  # an integer too long, nesting too deep
            raise DataError(f"{where}: invalid JSON ({type(exc).__name__})") from None
        if not isinstance(record, dict) or "messages" not in record:
            raise DataError(f'{where}: expected an object with a "messages" list')
        try:
            validate_messages(record["messages"])
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        conversations.append(record["messages"])
    if not conversations:
        raise DataError(f"{path}: no conversations")
    return conversations


def task_conversations(
    task_cfgs: list[TaskConfig], n_per_task: int, seed: int
) -> list[Conversation]:
    """`n_per_task` distinct train-split problems of each task as user/assistant turns, in
    task order then sampling order; the same for the same seed. Eval problems never appear."""
    out: list[Conversation] = []
    for cfg in task_cfgs:
        problems = make_generator(cfg).problems("train", n_per_task, seed)
        out += [task_conversation(p) for p in problems]
    return out


def small_task_conversations(
    task_cfgs: list[TaskConfig], max_digits: int, n_per_task: int, seed: int
) -> list[Conversation]:
    """`n_per_task` train-split problems of each task whose operands have at most `max_digits`
    digits, drawn with repetition (one-digit sums are only a few hundred problems), as
    user/assistant turns; the same for the same seed. Tasks whose operands are all longer
    contribute none. Eval problems never appear: the split is a function of the problem."""
    out: list[Conversation] = []
    for cfg in task_cfgs:
        if cfg.min_digits > max_digits:
            continue
        gen = make_generator(cfg.model_copy(update={"max_digits": min(cfg.max_digits, max_digits)}))
        rng = random.Random(f"{gen.kind}:small{max_digits}:{seed}")
        kept = draws = 0
        while kept < n_per_task:
            if draws == 100 * n_per_task + 1000:  # only a bound: most of a space is train
                raise DataError(
                    f"{gen.kind}: found only {kept} train problems of at most {max_digits} digits"
                )
            problem = gen.sample(rng)
            draws += 1
            if gen.split_of(problem) == "train":
                out.append(task_conversation(problem))
                kept += 1
    return out


@dataclass
class SFTRows:
    """Packed rows: `targets[i, t]` is `inputs[i, t + 1]` of the row, or -100 where that
    token is not the assistant's."""

    inputs: Tensor  # [N, seq_len] int64
    targets: Tensor  # [N, seq_len] int64, -100 = no loss
    conversations: int  # packed
    dropped_too_long: int  # longer than seq_len + 1 tokens with the separator
    dropped_untrained: int  # no assistant token

    def stats(self) -> dict[str, int]:
        return {
            "conversations": self.conversations,
            "rows": self.inputs.shape[0],
            "assistant_tokens": int((self.targets != IGNORE).sum()),
            "pad_tokens": int((self.inputs == PAD_ID).sum()),
            "dropped_too_long": self.dropped_too_long,
            "dropped_untrained": self.dropped_untrained,
        }


def pack_sft(
    tokenizer: Tokenizer, conversations: list[Conversation], seq_len: int, seed: int
) -> SFTRows:
    """Encode, shuffle with `seed`, and pack greedily into rows of `seq_len + 1` tokens."""
    width = seq_len + 1
    sequences: list[tuple[list[int], list[bool]]] = []
    too_long = untrained = 0
    for messages in conversations:
        ids, mask = encode_chat(tokenizer, messages)
        if len(ids) + 1 > width:
            too_long += 1
        elif not any(mask):
            untrained += 1
        else:
            sequences.append(([*ids, EOT_ID], [*mask, False]))
    if not sequences:
        raise DataError(
            f"pack_sft: no conversation to train on ({too_long} longer than seq_len + 1 = "
            f"{width} tokens, {untrained} without an assistant turn)"
        )
    random.Random(seed).shuffle(sequences)

    rows: list[tuple[list[int], list[bool]]] = []
    for ids, mask in sequences:
        if not rows or len(rows[-1][0]) + len(ids) > width:
            rows.append(([], []))
        rows[-1][0].extend(ids)
        rows[-1][1].extend(mask)
    tokens = torch.full((len(rows), width), PAD_ID, dtype=torch.int64)
    trained = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, mask) in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids)
        trained[i, : len(mask)] = torch.tensor(mask)
    targets = tokens[:, 1:].masked_fill(~trained[:, 1:], IGNORE)
    return SFTRows(
        inputs=tokens[:, :-1].contiguous(),
        targets=targets,
        conversations=len(sequences),
        dropped_too_long=too_long,
        dropped_untrained=untrained,
    )


def concat_rows(parts: list[SFTRows]) -> SFTRows:
    """The rows of `parts` one after another (their counts added up)."""
    return SFTRows(
        inputs=torch.cat([p.inputs for p in parts]),
        targets=torch.cat([p.targets for p in parts]),
        conversations=sum(p.conversations for p in parts),
        dropped_too_long=sum(p.dropped_too_long for p in parts),
        dropped_untrained=sum(p.dropped_untrained for p in parts),
    )


class PretrainWindows:
    """Spans of the pretraining stream (the shards' train split) as SFT rows of `seq_len`.

    Shard rows are `data.packing.seq_len + 1` tokens, one every `data.packing.seq_len` tokens
    of the stream, so consecutive rows share one token and `k` of them joined (each after the
    first without its shared token) are an unbroken span of `k · packing_seq_len + 1` tokens,
    document boundaries included, exactly as pretraining saw them. Window `j` is the first
    `seq_len + 1` tokens of the span of rows `j·k .. j·k + k - 1`, with `k` the fewest rows
    that reach that length: shorter SFT rows crop one shard row, longer ones join several.
    Windows never overlap; the tail of a span past `seq_len + 1` tokens is not used.
    """

    def __init__(self, shard_dir: str | Path, seq_len: int) -> None:
        self.shards = open_split(shard_dir, "train")
        self.seq_len = seq_len
        self.rows_per_window = -(-seq_len // self.shards.seq_len)  # ceil
        self.count = self.shards.num_rows // self.rows_per_window
        if self.count == 0:
            raise DataError(
                f"{shard_dir}: the train split has {self.shards.num_rows} rows of "
                f"{self.shards.seq_len} tokens, too few for one window of {seq_len}"
            )

    def batch(self, windows: Tensor) -> tuple[Tensor, Tensor]:
        """`(inputs, targets)` of the windows at `windows` [n], each int64 `[n, seq_len]`."""
        k, n = self.rows_per_window, len(windows)
        first = windows.numpy()[:, None] * k + np.arange(k)  # [n, k] shard rows
        rows = self.shards.rows(first.reshape(-1)).reshape(n, k, self.shards.row_len)
        span = np.concatenate([rows[:, 0], rows[:, 1:, 1:].reshape(n, -1)], axis=1)
        tokens = torch.from_numpy(span[:, : self.seq_len + 1].astype(np.int64))
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
