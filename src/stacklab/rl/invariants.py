"""RL invariants: the trainer learns from exactly what the sampler sampled.

The bugs this catches are silent: nothing crashes, the loss still goes down, and the policy
quietly learns something else. Three are classics of multi-turn RL:

* **Re-tokenization drift.** A reply decoded to text and encoded again can come back as other
  ids (BPE merges what were separate sampled tokens, or merges across a turn boundary), so the
  trainer scores tokens the sampler never drew, in a context it never saw.
* **A leaking mask.** A tool response, an error message or a role header in the loss mask
  trains the policy to imitate its environment; an `<|im_end|>` left out of it means the
  policy is never taught to stop.
* **Off-policy log-probs.** The trainer scoring at another temperature than the sampler drew
  at, or on a context shifted by a token, biases every importance ratio from the first step.

`check_episodes` replays each episode from records that do not go through the trainer: the
sampler's own calls (`SamplerTrace`: each turn's prompt ids, the tokens drawn, their
log-probs) and the environment's messages encoded by the chat format (`encode_chat`). On the
tensors the trainer builds (`pad_episodes`) it asserts:

1. **tokens**: the trainer's ids are the replay's exactly (the opening prompt, each turn's
   sampled tokens, then the chat format's encoding of the environment's answer and of the next
   generation prompt), then padding; and each turn's prompt was exactly the replay up to it;
2. **mask**: the loss mask is True on exactly the sampled tokens the episode kept (each
   reply's `<|im_end|>` included), never on a prompt, header, tool-response or padding token;
3. **logprobs**: the sampler's log-probs are laid out on the mask unchanged, and the trainer's
   own (`token_logprobs` at the sampling temperature, same weights) agree within `atol`.

It is a check for tests (tests/test_rl_invariants.py), not for training runs: recording the
sampler means wrapping the `generate` that `rollout` calls. Training logs invariant 3's mean
difference as `logprob_drift` every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer

from stacklab.data.chat import encode_chat
from stacklab.data.tokenizer import IM_END, PAD_ID
from stacklab.envs.base import Message
from stacklab.envs.rollout import Episode
from stacklab.model.generation import Generation, generate
from stacklab.model.transformer import Transformer
from stacklab.rl.trainer import pad_episodes, token_logprobs

# float32 on CPU, the KV-cache decode against the trainer's full forward: the largest
# difference over the tests' rollouts is 4.8e-7 nats dense, 9.5e-7 MoE (docs/post-training.md,
# "RL invariants"). Scoring at temperature 1 (even 0.69) what a random tiny model sampled at
# 0.7 is off by up to 0.14 (6.6e-3) nats.
LOGPROB_ATOL = 1e-5


# --------------------------------------------------------------------------- the sampler's record


@dataclass(frozen=True)
class SampledTurn:
    """One reply as the sampler produced it."""

    prompt: list[int]  # the ids it continued
    tokens: list[int]  # the tokens it drew, its stop token last when it stopped
    logprobs: list[float]  # one per token, at the sampling temperature


class SamplerTrace:
    """A recording stand-in for `generate`: what every call was given and what it drew.

    Put it where `rollout` calls `generate` (`monkeypatch.setattr(stacklab.envs.rollout,
    "generate", trace)`), one trace per `rollout` call; `turns(episodes)` then gives each
    episode its own turns.
    """

    def __init__(self, generate_fn: Callable[..., list[Generation]] = generate) -> None:
        self.generate_fn = generate_fn
        self.calls: list[list[SampledTurn]] = []  # per call, one turn per prompt

    def __call__(
        self, model: Transformer, prompts: list[list[int]], max_new_tokens: int, **kwargs: Any
    ) -> list[Generation]:
        outs = self.generate_fn(model, prompts, max_new_tokens, **kwargs)
        calls = []
        for prompt, out in zip(prompts, outs, strict=True):
            if out.logprobs is None:
                raise ValueError("SamplerTrace records log-probs: call with return_logprobs")
            tokens = out.tokens + ([out.stop_token] if out.stop_token is not None else [])
            # Copies: rollout extends its episodes' id lists in place.
            calls.append(SampledTurn(list(prompt), tokens, list(out.logprobs)))
        self.calls.append(calls)
        return outs

    def turns(self, episodes: Sequence[Episode]) -> list[list[SampledTurn]]:
        """Each episode's turns, in order. `rollout` batches the episodes still running in
        episode order, and an episode runs for `ep.turns` calls."""
        per_episode: list[list[SampledTurn]] = [[] for _ in episodes]
        for c, call in enumerate(self.calls):
            running = [i for i, ep in enumerate(episodes) if len(per_episode[i]) < ep.turns]
            if len(running) != len(call):
                raise ValueError(
                    f"sampler call {c} continued {len(call)} prompts, but {len(running)} "
                    "episodes were still running: not the trace of these episodes' rollout"
                )
            for i, turn in zip(running, call, strict=True):
                per_episode[i].append(turn)
        short = [i for i, ep in enumerate(episodes) if len(per_episode[i]) != ep.turns]
        if short:
            raise ValueError(f"episodes {short} played more turns than the trace recorded")
        return per_episode


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Violation:
    invariant: str  # "tokens", "mask" or "logprobs"
    episode: int  # index in the checked episodes
    position: int  # index in the episode's ids
    detail: str

    def __str__(self) -> str:
        return (
            f"RL invariant '{self.invariant}' violated in episode {self.episode} at token "
            f"{self.position}: {self.detail}"
        )


@dataclass
class InvariantReport:
    episodes: int = 0
    turns: int = 0
    tokens: int = 0  # trainer-side ids compared, padding excluded
    policy_tokens: int = 0  # sampled tokens in the loss mask
    max_logprob_diff: float = 0.0  # |trainer - sampler| over the masked tokens
    violations: list[Violation] = field(default_factory=list)  # the first per episode and kind

    @property
    def first(self) -> Violation | None:
        return self.violations[0] if self.violations else None


class InvariantViolation(AssertionError):
    """A broken RL invariant; `report` holds every violation found."""

    def __init__(self, report: InvariantReport) -> None:
        first = report.first
        more = len(report.violations) - 1
        super().__init__(f"{first}" + (f" (and {more} more)" if more else ""))
        self.report = report


# --------------------------------------------------------------------------- the check


def check_episodes(
    episodes: Sequence[Episode],
    sampled: Sequence[Sequence[SampledTurn]],
    tokenizer: Tokenizer,
    model: Transformer,
    *,
    temperature: float,
    atol: float = LOGPROB_ATOL,
) -> InvariantReport:
    """Replay `episodes` from the sampler's record (`sampled[i]`: episode i's turns, from
    `SamplerTrace.turns`) and the chat format, and check the three invariants on what the
    trainer builds from them, scoring with `model` (the weights that sampled) at the sampling
    `temperature`. Raise `InvariantViolation` naming the first violation; else the report."""
    if len(sampled) != len(episodes):
        raise ValueError(f"{len(episodes)} episodes but {len(sampled)} sampler records")
    report = InvariantReport(episodes=len(episodes), turns=sum(len(t) for t in sampled))
    replays = [_replay(ep, turns, tokenizer) for ep, turns in zip(episodes, sampled, strict=True)]
    _check_lengths(episodes, report)
    if report.violations:  # pad_episodes itself could not lay these out
        raise InvariantViolation(report)

    inputs, targets, mask, sampler_logp = pad_episodes(list(episodes))
    rows = torch.cat([inputs[:, :1], targets], dim=1)  # [B, W] the trainer's ids
    row_mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1)  # [B, W] over ids
    row_logp = torch.cat([torch.zeros_like(sampler_logp[:, :1]), sampler_logp], dim=1)
    device = model.embed.weight.device
    was_training = model.training
    model.eval()  # as `update` scores the old policy
    try:
        with torch.no_grad():
            trainer_logp = token_logprobs(
                model, inputs.to(device), targets.to(device), temperature, mask.to(device)
            )[0].cpu()
    finally:
        model.train(was_training)
    row_trainer_logp = torch.cat([torch.zeros_like(trainer_logp[:, :1]), trainer_logp], dim=1)
    if not torch.equal(inputs, rows[:, :-1]):
        bad = int((inputs != rows[:, :-1]).any(1).nonzero()[0])
        t = int((inputs[bad] != rows[bad, :-1]).nonzero()[0])
        report.violations.append(
            Violation("tokens", bad, t, "the trainer's inputs are not its targets shifted by one")
        )

    for i, replay in enumerate(replays):
        ids, policy = rows[i].tolist(), row_mask[i].tolist()
        report.tokens += len(replay.ids)
        report.policy_tokens += sum(replay.policy)
        width = max(len(ids), len(replay.ids))
        pad = [PAD_ID] * (width - len(replay.ids))
        expected_ids, expected_policy = replay.ids + pad, replay.policy + [False] * len(pad)
        ids += [PAD_ID] * (width - len(ids))  # a replay longer than the trainer's row
        policy += [False] * (width - len(policy))
        # A replay that stopped early is compared up to where it stopped.
        compared = len(replay.ids) if replay.problem else width
        t = _first_difference(ids[:compared], expected_ids[:compared])
        if t is not None:
            detail = (
                f"the trainer has {_show(tokenizer, ids, t)} where the sampler's conversation "
                f"has {_show(tokenizer, expected_ids, t)} ({replay.where(t)})"
            )
            report.violations.append(Violation("tokens", i, t, detail))
        elif replay.problem is not None:
            report.violations.append(Violation("tokens", i, *replay.problem))
        if replay.problem is not None:  # the rest cannot be replayed
            continue
        if (t := _first_difference(policy, expected_policy)) is not None:
            token = _show(tokenizer, expected_ids, t)
            detail = (
                f"the loss mask covers {token}, which the policy did not sample ({replay.where(t)})"
                if policy[t]
                else f"the loss mask leaves out {token}, which the policy sampled "
                f"({replay.where(t)})"
            )
            report.violations.append(Violation("mask", i, t, detail))
            continue  # the log-probs are laid out on that mask
        positions = [t for t, p in enumerate(replay.policy) if p]
        recorded = row_logp[i, positions]
        theirs = torch.tensor(replay.logprobs, dtype=recorded.dtype)
        if not torch.equal(recorded, theirs):
            k = int((recorded != theirs).nonzero()[0])
            detail = (
                f"the trainer recorded the sampler's log-prob as {float(recorded[k]):.7g}, "
                f"the sampler returned {float(theirs[k]):.7g}"
            )
            report.violations.append(Violation("logprobs", i, positions[k], detail))
            continue
        if not positions:
            continue
        diff = (row_trainer_logp[i, positions] - recorded).abs()
        report.max_logprob_diff = max(report.max_logprob_diff, float(diff.max()))
        if bool((diff > atol).any()):
            k = int((diff > atol).nonzero()[0])
            detail = (
                f"the trainer scores {_show(tokenizer, expected_ids, positions[k])} at "
                f"{float(row_trainer_logp[i, positions[k]]):.7g}, the sampler drew it at "
                f"{float(recorded[k]):.7g} (|difference| {float(diff[k]):.2e} > {atol:.0e}; "
                f"temperature {temperature})"
            )
            report.violations.append(Violation("logprobs", i, positions[k], detail))
    if report.violations:
        raise InvariantViolation(report)
    return report


# --------------------------------------------------------------------------- the replay


@dataclass
class _Replay:
    """An episode as the sampler and the chat format say it should be."""

    ids: list[int] = field(default_factory=list)
    policy: list[bool] = field(default_factory=list)  # sampled and kept
    logprobs: list[float] = field(default_factory=list)  # the sampler's, one per policy token
    spans: list[tuple[int, str]] = field(default_factory=list)  # (start, what it is)
    problem: tuple[int, str] | None = None  # (position, detail): the replay stopped there

    def add(self, ids: list[int], what: str, logprobs: list[float] | None = None) -> None:
        self.spans.append((len(self.ids), what))
        self.ids += ids
        self.policy += [logprobs is not None] * len(ids)
        self.logprobs += logprobs or []

    def where(self, position: int) -> str:
        if position >= len(self.ids):
            return "padding"
        return [what for start, what in self.spans if start <= position][-1]


def _replay(ep: Episode, turns: Sequence[SampledTurn], tokenizer: Tokenizer) -> _Replay:
    """The opening prompt, each turn's sampled tokens, and between turns the chat format's
    encoding of the environment's answer and the next generation prompt."""
    im_end = tokenizer.token_to_id(IM_END)
    replay = _Replay()
    starts = [j for j, m in enumerate(ep.messages) if m["role"] == "assistant"]
    opening = ep.messages[: starts[0]] if starts else ep.messages
    replay.add(encode_chat(tokenizer, opening, add_generation_prompt=True)[0], "the prompt")
    for k, turn in enumerate(turns):
        if (t := _first_difference(turn.prompt, replay.ids)) is not None:
            detail = (
                f"turn {k + 1}'s prompt to the sampler has {_show(tokenizer, turn.prompt, t)} "
                f"where the conversation has {_show(tokenizer, replay.ids, t)} "
                f"({replay.where(t)}): the sampler continued another context"
            )
            replay.problem = (t, detail)
            return replay
        if len(turn.logprobs) != len(turn.tokens):
            replay.problem = (len(replay.ids), f"turn {k + 1}: not one log-prob per token")
            return replay
        kept = turn.tokens
        if k == len(turns) - 1 and ep.truncated:  # the token budget may have cut the reply
            kept = kept[: max(0, len(ep.ids) - len(replay.ids))]
        replay.add(kept, f"turn {k + 1}'s sampled reply", turn.logprobs[: len(kept)])
        if k == len(turns) - 1:
            break
        if not turn.tokens or turn.tokens[-1] != im_end:
            replay.problem = (len(replay.ids), f"turn {k + 1} did not end, yet the episode went on")
            return replay
        answered = ep.messages[: starts[k + 1]] if k + 1 < len(starts) else ep.messages
        if len(starts) <= k or answered[-1]["role"] == "assistant":
            replay.problem = (
                len(replay.ids),
                f"the episode's messages hold no environment answer to turn {k + 1}",
            )
            return replay
        replay.add(_answer_ids(tokenizer, answered), f"the environment's answer to turn {k + 1}")
    return replay


def _answer_ids(tokenizer: Tokenizer, messages: list[Message]) -> list[int]:
    """What the chat format puts after the last assistant turn of `messages` (from the newline
    after its `<|im_end|>`) up to the next generation prompt, inclusive."""
    ids, trained = encode_chat(tokenizer, messages, add_generation_prompt=True)
    last_trained = max(t for t, m in enumerate(trained) if m)  # the assistant's <|im_end|>
    return ids[last_trained + 1 :]


def _check_lengths(episodes: Sequence[Episode], report: InvariantReport) -> None:
    for i, ep in enumerate(episodes):
        if len(ep.mask) != len(ep.ids):
            detail = f"{len(ep.ids)} ids but {len(ep.mask)} mask entries"
            report.violations.append(Violation("mask", i, min(len(ep.ids), len(ep.mask)), detail))
        elif len(ep.logprobs) != sum(ep.mask):
            masked = [t for t, m in enumerate(ep.mask) if m]
            at = masked[len(ep.logprobs)] if len(masked) > len(ep.logprobs) else len(ep.ids)
            detail = f"{sum(ep.mask)} masked tokens but {len(ep.logprobs)} log-probs"
            report.violations.append(Violation("logprobs", i, at, detail))


def _first_difference(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    for t, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return t
    return None if len(a) == len(b) else min(len(a), len(b))


def _show(tokenizer: Tokenizer, ids: Sequence[int], t: int) -> str:
    """Token t of `ids`, for a message."""
    if t >= len(ids):
        return "nothing (the ids end before it)"
    return f"id {ids[t]} {tokenizer.decode([ids[t]], skip_special_tokens=False)!r}"
