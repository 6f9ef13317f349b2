"""The rollout loop: a model plays a batch of episodes, and keeps what an RL trainer needs.

Each turn, every episode still running is continued in one batched `generate` call up to
`<|im_end|>`; its reply goes to its environment, whose answer (tool results, errors) is
appended, and the next turn starts from there.

The token sequence of an episode is built from the tokens the model actually sampled, never
by re-encoding the text: a BPE tokenizer may encode the decoded reply differently, and the
trainer must score exactly the tokens whose log-probs were recorded. So an episode's `ids` are
the opening prompt, then per turn the sampled tokens (with `<|im_end|>`), the newline after
it, and the environment's messages with the next generation prompt, encoded by `encode_chat`.
`mask` is True exactly on the sampled tokens, so tool results, errors, role headers and the
prompt never enter the loss, and `logprobs` has one entry per True in `mask`, in order.

Limits end an episode with reward 0 and `truncated` set: the turn limit, a reply cut off
without `<|im_end|>`, and the token budget (the whole conversation, prompt included, never
exceeds `token_budget` tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer

from stacklab.data.chat import encode_chat, parse_assistant
from stacklab.data.tokenizer import IM_END
from stacklab.envs.base import Environment, Message
from stacklab.model.generation import generate
from stacklab.model.transformer import Transformer


@dataclass
class Episode:
    messages: list[Message]
    ids: list[int]  # the whole conversation as the model saw and wrote it
    mask: list[bool]  # True exactly on tokens the model sampled
    logprobs: list[float]  # of each sampled token: one per True in `mask`, in order
    reward: float = 0.0
    turns: int = 0
    tool_calls: int = 0
    done: bool = False  # the environment ended the episode
    truncated: bool = False  # a limit ended it (reward 0)
    info: dict[str, Any] = field(default_factory=dict)  # the environment's last info


def rollout(
    model: Transformer,
    tokenizer: Tokenizer,
    envs: Sequence[Environment],
    tasks: Sequence[Any],
    *,
    max_turns: int,
    max_new_tokens: int,
    token_budget: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[Episode]:
    """Play `envs[i]` on `tasks[i]` for every i, batched; one finished `Episode` per env.

    A turn generates up to `max_new_tokens` tokens; an episode ends when its environment says
    so or at a limit (at most `max_turns` turns, and the env's own turn limit; at most
    `token_budget` tokens, which must fit the model's max_seq_len).
    """
    if len(envs) != len(tasks):
        raise ValueError(f"{len(envs)} envs but {len(tasks)} tasks")
    if token_budget > model.cfg.max_seq_len:
        raise ValueError(
            f"token_budget ({token_budget}) exceeds the model's max_seq_len "
            f"({model.cfg.max_seq_len})"
        )
    im_end = tokenizer.token_to_id(IM_END)
    newline = tokenizer.encode("\n", add_special_tokens=False).ids
    episodes = []
    for env, task in zip(envs, tasks, strict=True):
        messages = env.reset(task)
        ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
        episodes.append(Episode(messages, ids, [False] * len(ids), []))
        if len(ids) >= token_budget:
            episodes[-1].truncated = True

    while True:
        active = [i for i, ep in enumerate(episodes) if not ep.done and not ep.truncated]
        if not active:
            return episodes
        longest = max(len(episodes[i].ids) for i in active)
        room = {i: min(max_new_tokens, token_budget - len(episodes[i].ids)) for i in active}
        # Left padding makes every row as long as the longest, so that bounds the batch too.
        batch_new = min(max(room.values()), model.cfg.max_seq_len + 1 - longest)
        outs = generate(
            model,
            [episodes[i].ids for i in active],
            batch_new,
            temperature=temperature,
            stop_ids=(im_end,),
            generator=generator,
            return_logprobs=True,
        )
        for i, out in zip(active, outs, strict=True):
            ep = episodes[i]
            sampled = out.tokens + ([im_end] if out.stopped else [])
            sampled, logprobs = sampled[: room[i]], out.logprobs[: room[i]]
            ep.ids += sampled
            ep.mask += [True] * len(sampled)
            ep.logprobs += logprobs
            ep.turns += 1
            if len(sampled) <= len(out.tokens):  # cut off before its <|im_end|>
                ep.truncated = True
                continue
            _take_turn(ep, envs[i], tokenizer, out.tokens, newline, max_turns, token_budget)


def _take_turn(
    ep: Episode,
    env: Environment,
    tokenizer: Tokenizer,
    tokens: list[int],
    newline: list[int],
    max_turns: int,
    token_budget: int,
) -> None:
    """Hand one finished reply to the env and append its answer, or end the episode."""
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    turn = parse_assistant(text)
    ep.tool_calls += len(turn.tool_calls)
    ep.messages.append(turn.to_message())
    result = env.step(text)
    ep.info = result.info
    if result.done:
        ep.done, ep.reward = True, result.reward
        ep.truncated = bool(result.info.get("truncated", False))
        return
    if ep.turns >= max_turns:
        ep.truncated = True
        return
    prefix, _ = encode_chat(tokenizer, ep.messages)
    full, _ = encode_chat(
        tokenizer, ep.messages + result.messages_to_append, add_generation_prompt=True
    )
    after = newline + full[len(prefix) :]
    if len(ep.ids) + len(after) >= token_budget:  # no room for even one more token
        ep.truncated = True
        return
    ep.messages += result.messages_to_append
    ep.ids += after
    ep.mask += [False] * len(after)
