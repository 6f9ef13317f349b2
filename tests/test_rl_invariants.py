"""RL invariants on real rollouts: the trainer's ids, mask and log-probs are the sampler's.

The episodes come from the real pipeline: `rollout` driving the tool and task environments,
`generate` with its KV cache and `DecodeStep`, the chat format between turns, `pad_episodes`
and `token_logprobs` on the trainer's side. A random tiny model never writes a valid tool call,
so some of its tokens are teacher-forced *inside* the sampler (`Forcing`): `generate` runs
unchanged and only the token drawn at a step is replaced by a script's, which keeps the
model's own log-prob of it. Some forced replies are spelled one character per token, a
tokenization BPE never produces: re-encoding their text gives other ids, so a rollout that
re-tokenized at turn boundaries would fail here.
"""

import dataclasses
import itertools
import json
import re

import pytest
import torch

from stacklab.data.chat import encode_chat
from stacklab.data.tasks import ArithmeticGenerator
from stacklab.data.tokenizer import IM_END, SPECIAL_TOKENS, TOOL_RESPONSE, train_tokenizer
from stacklab.envs import rollout as rollout_module
from stacklab.envs.agent_env import system_prompt
from stacklab.envs.rollout import Episode, rollout
from stacklab.envs.suite import agent_tasks, make_env
from stacklab.envs.tasks_env import TaskEnv
from stacklab.model import generation
from stacklab.model.transformer import build_model
from stacklab.recipe import ArithmeticTask, ModelConfig, TokenizerConfig
from stacklab.rl.invariants import (
    LOGPROB_ATOL,
    InvariantViolation,
    SamplerTrace,
    check_episodes,
)

ARITHMETIC = ArithmeticGenerator(ArithmeticTask(max_digits=2))
TOOLS = {name: agent_tasks(name, "train", 12, seed=0) for name in ("calculator", "lookup")}
SAMPLE_NEXT = generation.sample_next


@pytest.fixture(scope="module")
def tok():
    texts = [system_prompt(toolbox) for toolbox, _ in TOOLS.values()] * 20
    texts += [t.question for _, tasks in TOOLS.values() for t in tasks] * 5
    texts += [ARITHMETIC.render(p) for p in ARITHMETIC.problems("train", 100, 0)]
    texts += ['{"name": "calculator", "arguments": {"expression": "12*34"}}'] * 10
    return train_tokenizer(texts, TokenizerConfig(vocab_size=600, min_frequency=2))


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(depth=1, aspect=16, head_dim=16, max_seq_len=512).build()
    return build_model(cfg, tok.get_vocab_size())


# --------------------------------------------------------------------------- forcing


class Forcing:
    """`generate` with some draws replaced: `plan(prompt)` gives a row's token per step
    (None: the model's own draw). Install `sample_next` in `stacklab.model.generation`."""

    def __init__(self, plan) -> None:
        self.plan, self.rows, self.step = plan, [], 0

    def generate(self, model, prompts, max_new_tokens, **kwargs):
        self.rows, self.step = [self.plan(p) for p in prompts], 0
        return generation.generate(model, prompts, max_new_tokens, **kwargs)

    def sample_next(self, logits, temperature=0.0, top_k=None, top_p=None, generator=None):
        token = SAMPLE_NEXT(logits, temperature, top_k, top_p, generator)
        for row, plan in enumerate(self.rows):
            if self.step < len(plan) and plan[self.step] is not None:
                token[row] = plan[self.step]
        self.step += 1
        return token


def spelled(tok, text: str) -> list[int]:
    """`text` one character per token, special tokens as their ids."""
    ids, rest = [], text
    while rest:
        special = next((s for s in SPECIAL_TOKENS if rest.startswith(s)), None)
        if special:
            ids.append(tok.token_to_id(special))
            rest = rest[len(special) :]
        else:
            ids += tok.encode(rest[0], add_special_tokens=False).ids
            rest = rest[1:]
    return ids


def tool_call(name: str, **arguments: str) -> str:
    body = json.dumps({"name": name, "arguments": arguments})
    return f"<tool_call>\n{body}\n</tool_call>"


def agent_plan(tok, env_name: str):
    """A scripted agent, varied by question: odd-numbered questions are spelled one character
    per token; every third one first sends free tokens with a stray `<tool_call>` (an error
    message comes back); lookup's final reply is free text."""
    im_end = tok.token_to_id(IM_END)
    questions = [t.question for t in TOOLS[env_name][1]]
    stray = [None] * 3 + [tok.token_to_id("<tool_call>"), None]

    def plan(prompt: list[int]) -> list[int | None]:
        text = tok.decode(prompt, skip_special_tokens=False)
        [n] = [n for n, q in enumerate(questions) if f"user\n{q}<|im_end|>" in text]
        turn = text.count("<|im_start|>assistant") - 1 - (n % 3 == 0)
        results = text.split("<tool_response>\n")[1:]
        last = results[-1].split("\n</tool_response>")[0] if results else ""
        if env_name == "calculator":
            expression = questions[n].removeprefix("What is ").removesuffix("?")
            script = [tool_call("calculator", expression=expression), f"Answer: {last}"]
        else:
            script = [tool_call("search", query=questions[n]), tool_call("get", key=last[:9])]
        if turn < 0:
            return [*stray, im_end]
        if turn >= len(script):
            return [None] * 5 + [im_end]  # free text, then stop
        encode = (lambda s: spelled(tok, s)) if n % 2 else (lambda s: tok.encode(s).ids)
        return [*encode(script[turn]), im_end]

    return plan


def play(tok, model, envs, tasks, plan, temperature, **limits):
    """Roll out with forcing and a trace; the episodes and each one's sampled turns."""
    forcing = Forcing(plan)
    trace = SamplerTrace(forcing.generate)
    settings = {"max_turns": 4, "max_new_tokens": 90, "token_budget": 512, **limits}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "sample_next", forcing.sample_next)
        patch.setattr(rollout_module, "generate", trace)
        episodes = rollout(
            model, tok, envs, tasks, temperature=temperature,
            generator=torch.Generator().manual_seed(1), **settings,
        )  # fmt: skip
    return episodes, trace.turns(episodes)


def agent_rollout(tok, model, env_name: str, temperature: float, **limits):
    """Four tasks of `env_name`, each played twice (a group of two, as RL plays them)."""
    toolbox, tasks = TOOLS[env_name]
    chosen = [t for t in tasks[:4] for _ in range(2)]
    envs = [make_env(env_name, toolbox, tasks, max_turns=4) for _ in chosen]
    return play(tok, model, envs, chosen, agent_plan(tok, env_name), temperature, **limits)


# --------------------------------------------------------------------------- the invariants hold


@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("env_name", ["calculator", "lookup"])
def test_tool_agent_rollouts_keep_the_invariants(tok, model, env_name, temperature) -> None:
    assert generation.DecodeStep.supports(model)  # the sampler's fast path is the one checked
    episodes, sampled = agent_rollout(tok, model, env_name, temperature)
    report = check_episodes(episodes, sampled, tok, model, temperature=temperature)
    # Multi-turn with real tool results, error messages and some spelled replies.
    roles = [m["role"] for ep in episodes for m in ep.messages]
    assert roles.count("tool") >= 6 and any(ep.turns >= 3 for ep in episodes)
    assert any(m["content"].startswith("error:") for ep in episodes for m in ep.messages)
    respelled = [
        t.tokens[:-1]
        for turns in sampled
        for t in turns
        if tok.encode(tok.decode(t.tokens[:-1], skip_special_tokens=False)).ids != t.tokens[:-1]
    ]
    assert respelled  # re-encoding these replies would have changed their ids
    assert report.episodes == 8 and report.turns == sum(ep.turns for ep in episodes)
    assert report.policy_tokens == sum(sum(ep.mask) for ep in episodes)
    assert report.policy_tokens > 0 and report.max_logprob_diff < LOGPROB_ATOL


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_task_rollouts_keep_the_invariants(tok, model, temperature) -> None:
    """Single turn, free sampling: some replies stopped after a few tokens, others cut off
    by max_new_tokens or by the token budget."""
    im_end = tok.token_to_id(IM_END)
    prompts = {}

    def plan(prompt):
        n = prompts.setdefault(tuple(prompt), len(prompts))
        return [None] * (2 + n) + [im_end] if n % 2 else []

    envs = [TaskEnv(ARITHMETIC, "train") for _ in range(6)]
    opening, _ = encode_chat(tok, envs[0].reset(0), add_generation_prompt=True)
    episodes, sampled = play(
        tok, model, envs, list(range(6)), plan, temperature,
        max_new_tokens=16, token_budget=len(opening) + 12,
    )  # fmt: skip
    report = check_episodes(episodes, sampled, tok, model, temperature=temperature)
    assert any(ep.done and not ep.truncated for ep in episodes)
    assert any(ep.truncated for ep in episodes)
    # Some reply was drawn past the budget: the trainer keeps only the part that fit.
    assert any(len(t.tokens) > sum(ep.mask) for ep, [t] in zip(episodes, sampled, strict=True))
    assert report.policy_tokens > 0 and report.max_logprob_diff < LOGPROB_ATOL


def test_budget_cuts_a_multi_turn_episode(tok, model) -> None:
    episodes, sampled = agent_rollout(tok, model, "lookup", 0.7, token_budget=260)
    assert any(ep.truncated and ep.turns >= 2 for ep in episodes)
    check_episodes(episodes, sampled, tok, model, temperature=0.7)


def test_an_moe_policy_keeps_the_invariants(tok) -> None:
    """Routing is per token, so the KV-cache decode and the trainer's forward pick the same
    experts and agree as closely as a dense model."""
    torch.manual_seed(1)
    moe = {"enabled": True, "num_experts": 4, "top_k": 2, "num_shared_experts": 1}
    cfg = ModelConfig(depth=2, aspect=16, head_dim=16, max_seq_len=512, moe=moe).build()
    model = build_model(cfg, tok.get_vocab_size())
    episodes, sampled = agent_rollout(tok, model, "lookup", 0.7)
    report = check_episodes(episodes, sampled, tok, model, temperature=0.7)
    assert report.policy_tokens > 0 and report.max_logprob_diff < LOGPROB_ATOL


# --------------------------------------------------------------------------- violations are caught


@pytest.fixture(scope="module")
def played(tok, model):
    return agent_rollout(tok, model, "lookup", 0.7)


def broken(episodes: list[Episode], i: int, **changes) -> list[Episode]:
    """A copy of `episodes` with episode i's fields replaced."""
    copies = [dataclasses.replace(ep) for ep in episodes]
    copies[i] = dataclasses.replace(episodes[i], **changes)
    return copies


def violation(excinfo):
    return excinfo.value.report.first


def test_a_tool_response_token_in_the_mask_is_caught(played, tok, model) -> None:
    episodes, sampled = played
    i = next(i for i, ep in enumerate(episodes) if ep.messages[3]["role"] == "tool")
    ep = episodes[i]
    t = ep.ids.index(tok.token_to_id(TOOL_RESPONSE))
    mask = ep.mask.copy()
    mask[t] = True
    before = sum(ep.mask[:t])
    logprobs = [*ep.logprobs[:before], -1.0, *ep.logprobs[before:]]
    with pytest.raises(InvariantViolation, match="covers id 6 '<tool_response>'") as excinfo:
        check_episodes(broken(episodes, i, mask=mask, logprobs=logprobs), sampled, tok, model,
                       temperature=0.7)  # fmt: skip
    v = violation(excinfo)
    assert (v.invariant, v.episode, v.position) == ("mask", i, t)
    assert "the environment's answer to turn 1" in v.detail


def test_an_end_of_turn_left_out_of_the_mask_is_caught(played, tok, model) -> None:
    episodes, sampled = played
    ep = episodes[0]
    t = ep.ids.index(tok.token_to_id(IM_END), len(sampled[0][0].prompt))  # the first reply's
    mask = ep.mask.copy()
    mask[t] = False
    k = sum(ep.mask[:t])
    logprobs = ep.logprobs[:k] + ep.logprobs[k + 1 :]
    with pytest.raises(
        InvariantViolation, match=re.escape("leaves out id 3 '<|im_end|>'")
    ) as excinfo:
        check_episodes(broken(episodes, 0, mask=mask, logprobs=logprobs), sampled, tok, model,
                       temperature=0.7)  # fmt: skip
    assert (violation(excinfo).invariant, violation(excinfo).position) == ("mask", t)


@pytest.mark.parametrize("where", ["reply", "answer"])
def test_one_changed_trainer_token_is_caught(played, tok, model, where) -> None:
    episodes, sampled = played
    ep = episodes[1]
    first_reply = len(sampled[1][0].prompt)
    # The third sampled token, or the first token of the environment's answer after it.
    t = first_reply + 2 if where == "reply" else ep.mask.index(False, first_reply)
    ids = ep.ids.copy()
    ids[t] = 50 if ids[t] != 50 else 51
    with pytest.raises(InvariantViolation, match="where the sampler's conversation has") as exc:
        check_episodes(broken(episodes, 1, ids=ids), sampled, tok, model, temperature=0.7)
    v = violation(exc)
    assert (v.invariant, v.episode, v.position) == ("tokens", 1, t)


def test_logprobs_scored_at_another_temperature_are_caught(played, tok, model) -> None:
    episodes, sampled = played
    with pytest.raises(InvariantViolation, match=re.escape("temperature 1.0")) as excinfo:
        check_episodes(episodes, sampled, tok, model, temperature=1.0)
    v = violation(excinfo)
    assert v.invariant == "logprobs" and v.episode == 0
    assert v.position == episodes[0].mask.index(True)  # the very first sampled token


def test_a_misrecorded_sampler_logprob_is_caught(played, tok, model) -> None:
    episodes, sampled = played
    logprobs = episodes[2].logprobs.copy()
    logprobs[4] += 1e-3
    with pytest.raises(InvariantViolation, match="recorded the sampler's log-prob") as excinfo:
        check_episodes(broken(episodes, 2, logprobs=logprobs), sampled, tok, model,
                       temperature=0.7)  # fmt: skip
    masked = [t for t, m in enumerate(episodes[2].mask) if m]
    assert (violation(excinfo).invariant, violation(excinfo).position) == ("logprobs", masked[4])


def test_a_sampler_prompt_that_drifted_is_caught(played, tok, model) -> None:
    """The sampler continued another context than the trainer's (a rollout that re-encoded
    the conversation before a turn)."""
    episodes, sampled = played
    i = next(i for i, turns in enumerate(sampled) if len(turns) >= 2)
    turns = list(sampled[i])
    prompt = turns[1].prompt.copy()
    t = len(prompt) - 4
    prompt[t] = 50 if prompt[t] != 50 else 51
    turns[1] = dataclasses.replace(turns[1], prompt=prompt)
    changed = [*sampled[:i], turns, *sampled[i + 1 :]]
    with pytest.raises(InvariantViolation, match="turn 2's prompt to the sampler") as excinfo:
        check_episodes(episodes, changed, tok, model, temperature=0.7)
    assert (violation(excinfo).invariant, violation(excinfo).position) == ("tokens", t)


def test_a_rollout_that_re_encodes_replies_is_caught(played, tok, model) -> None:
    """The classic multi-turn bug: each reply decoded and encoded again. Even with log-probs
    fitted to the new mask, the ids differ from the first token BPE merged."""
    episodes, sampled = played
    ep = episodes[2]  # the second question: spelled one character per token
    im_end = tok.token_to_id(IM_END)
    ids, mask = [], []
    for masked, run in itertools.groupby(zip(ep.ids, ep.mask, strict=True), lambda x: x[1]):
        run = [t for t, _ in run]
        if masked:
            stop = [im_end] if run[-1] == im_end else []
            text = tok.decode(run[: len(run) - len(stop)], skip_special_tokens=False)
            run = tok.encode(text).ids + stop
        ids += run
        mask += [masked] * len(run)
    logprobs = (ep.logprobs * 2)[: sum(mask)]
    t = next(t for t, (a, b) in enumerate(zip(ids, ep.ids, strict=False)) if a != b)
    assert ep.mask[t]
    with pytest.raises(InvariantViolation) as excinfo:
        check_episodes(broken(episodes, 2, ids=ids, mask=mask, logprobs=logprobs), sampled, tok,
                       model, temperature=0.7)  # fmt: skip
    v = violation(excinfo)
    assert (v.invariant, v.episode, v.position) == ("tokens", 2, t)
    assert "turn 1's sampled reply" in v.detail
