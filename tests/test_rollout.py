"""The rollout loop: exact token streams, masks and log-probs; tool results masked; limits."""

import itertools
import json

import pytest
import torch

from stacklab.data.chat import encode_chat, render_chat
from stacklab.data.tasks import ArithmeticGenerator
from stacklab.data.tokenizer import IM_END, TOOL_CALL, train_tokenizer
from stacklab.envs import rollout as rollout_module
from stacklab.envs.agent_env import ToolEnv, lookup_tasks, system_prompt
from stacklab.envs.rollout import rollout
from stacklab.envs.tasks_env import TaskEnv
from stacklab.model.generation import Generation, generate
from stacklab.model.transformer import build_model
from stacklab.recipe import ArithmeticTask, ModelConfig, TokenizerConfig

TOOLBOX, TASKS = lookup_tasks(20, seed=0)


def call(name: str, **arguments: object) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


@pytest.fixture(scope="module")
def tok():
    texts = [system_prompt(TOOLBOX)] * 20 + [t.question for t in TASKS] * 5
    texts += [f"{i}*{i + 7}={i * (i + 7)}" for i in range(200)]
    return train_tokenizer(texts, TokenizerConfig(vocab_size=600, min_frequency=2))


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(depth=1, aspect=16, head_dim=16, max_seq_len=512).build()
    return build_model(cfg, tok.get_vocab_size())


def runs(mask: list[bool]) -> list[tuple[int, int]]:
    """(start, end) of each stretch of True."""
    out, start = [], None
    for t, m in enumerate([*mask, False]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            out.append((start, t))
            start = None
    return out


# --------------------------------------------------------------------------- a random model


def test_random_model_rollout(tok, model, monkeypatch) -> None:
    """Masked stretches are exactly the tokens `generate` sampled, with their log-probs.

    The random model's logits are nudged towards <|im_end|> and <tool_call>, so replies end
    early and often hold broken tool calls: episodes then go on with error messages.
    """
    bias = torch.zeros(tok.get_vocab_size())
    bias[tok.token_to_id(IM_END)], bias[tok.token_to_id(TOOL_CALL)] = 4.0, 4.5

    def nudge(module, inputs, out):
        out.logits = out.logits + bias
        return out

    hook = model.register_forward_hook(nudge)
    calls = []

    def recording_generate(model, prompts, max_new_tokens, **kwargs):
        outs = generate(model, prompts, max_new_tokens, **kwargs)
        calls.append(([list(p) for p in prompts], outs, max_new_tokens))  # ids grow in place
        return outs

    monkeypatch.setattr(rollout_module, "generate", recording_generate)
    arithmetic = ArithmeticGenerator(ArithmeticTask(max_digits=2))
    envs = [TaskEnv(arithmetic, "train") for _ in range(3)]
    envs += [ToolEnv(TOOLBOX, TASKS, max_turns=3) for _ in range(3)]
    tasks = [0, 1, 2, 0, 1, 2]
    budget = 480
    try:
        episodes = rollout(
            model, tok, envs, tasks, max_turns=3, max_new_tokens=24, token_budget=budget,
            temperature=1.0, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    finally:
        hook.remove()
    assert len(episodes) == 6
    im_end = tok.token_to_id(IM_END)
    for ep, env, task in zip(episodes, envs, tasks, strict=True):
        assert ep.done or ep.truncated
        assert 1 <= ep.turns <= 3 and len(ep.ids) <= budget
        assert len(ep.ids) == len(ep.mask) and len(ep.logprobs) == sum(ep.mask)
        opening, _ = encode_chat(tok, env.reset(task), add_generation_prompt=True)
        assert ep.ids[: len(opening)] == opening and not any(ep.mask[: len(opening)])
        # Each masked stretch is one call's output for this episode's prompt, stop token kept.
        stretches = runs(ep.mask)
        assert len(stretches) == ep.turns
        logprobs = iter(ep.logprobs)
        for start, end in stretches:
            [(out, limit)] = [
                (o, n)
                for ps, os, n in calls
                for p, o in zip(ps, os, strict=True)
                if p == ep.ids[:start]
            ]
            sampled = out.tokens + ([im_end] if out.stopped else [])
            assert ep.ids[start:end] == sampled[: end - start]
            assert [next(logprobs) for _ in range(end - start)] == out.logprobs[: end - start]
            assert end - start <= limit
            if end < len(ep.ids):  # the episode went on: the reply was complete
                assert ep.ids[end - 1] == im_end
        # Between replies: the env's messages, unmasked, up to the next generation prompt.
        for (_, end), (start, _) in itertools.pairwise(stretches):
            gap = tok.decode(ep.ids[end:start], skip_special_tokens=False)
            assert gap.startswith("\n<|im_start|>user\nerror: tool call 1:")
            assert gap.endswith("<|im_end|>\n<|im_start|>assistant\n")
        if ep.truncated:
            assert ep.reward == 0.0
    # A snapshot of this seed's sampled play.
    assert sorted(ep.turns for ep in episodes) == [1, 1, 1, 1, 3, 3]
    assert [ep.truncated for ep in episodes] == [False, False, False, False, True, False]


def test_budget_must_fit_the_model(tok, model) -> None:
    arithmetic = ArithmeticGenerator(ArithmeticTask(max_digits=2))
    with pytest.raises(ValueError, match="max_seq_len"):
        rollout(model, tok, [TaskEnv(arithmetic, "train")], [0], max_turns=1,
                max_new_tokens=8, token_budget=513)  # fmt: skip


# --------------------------------------------------------------------------- a scripted policy


def scripted(tok, script: dict[str, list[str]]):
    """A stand-in for `generate`: the reply to a prompt is script[question][turn], as tokens;
    the k-th token sampled in a call gets log-prob -(k + 1) / 100."""
    im_end = tok.token_to_id(IM_END)

    def fake_generate(model, prompts, max_new_tokens, **kwargs):
        assert kwargs["stop_ids"] == (im_end,) and kwargs["return_logprobs"]
        outs = []
        for prompt in prompts:
            text = tok.decode(prompt, skip_special_tokens=False)
            [question] = [q for q in script if q in text]
            turn = text.count("<|im_start|>assistant") - 1
            sampled = [*tok.encode(script[question][turn]).ids, im_end]
            sampled = sampled[:max_new_tokens]
            stopped = sampled[-1] == im_end
            tokens = sampled[:-1] if stopped else sampled
            logprobs = [-(k + 1) / 100 for k in range(len(sampled))]
            outs.append(Generation(tokens, im_end if stopped else None, logprobs))
        return outs

    return fake_generate


def solve_script(task, wrong: bool = False) -> list[str]:
    keys = TOOLBOX.call("search", {"query": task.question}).splitlines()
    answer = "nope" if wrong else task.answer
    return [call("search", query=task.question), call("get", key=keys[0]), f"Answer: {answer}"]


def test_scripted_tool_episodes(tok, model, monkeypatch) -> None:
    """A full search -> get -> answer episode batched with a shorter one: the token stream
    is the rendered conversation, and only the replies are masked."""
    first, second = TASKS[0], TASKS[1]
    script = {first.question: solve_script(first), second.question: ["Answer: no idea"]}
    monkeypatch.setattr(rollout_module, "generate", scripted(tok, script))
    envs = [ToolEnv(TOOLBOX, TASKS) for _ in range(2)]
    good, bad = rollout(
        model, tok, envs, [first, second], max_turns=5, max_new_tokens=100, token_budget=512
    )
    assert (good.reward, good.turns, good.tool_calls, good.done, good.truncated) == (
        1.0, 3, 2, True, False,
    )  # fmt: skip
    assert (bad.reward, bad.turns, bad.tool_calls, bad.done) == (0.0, 1, 0, True)
    for ep in (good, bad):
        # The ids are the conversation as rendered, up to the final <|im_end|>.
        text = tok.decode(ep.ids, skip_special_tokens=False)
        assert text + "\n" == render_chat(ep.messages)
        # Canonical replies: the very ids and mask SFT would train on (but the final newline).
        ids, mask = encode_chat(tok, ep.messages)
        assert (ep.ids, ep.mask) == (ids[: len(ep.ids)], mask[: len(ep.ids)])
        assert len(ep.logprobs) == sum(ep.mask)
    replies = [tok.decode(good.ids[s:e], skip_special_tokens=False) for s, e in runs(good.mask)]
    assert replies == [r + IM_END for r in script[first.question]]
    assert good.logprobs[:3] == [-0.01, -0.02, -0.03]
    unmasked = tok.decode([t for t, m in zip(good.ids, good.mask, strict=True) if not m], False)
    [key, *_] = TOOLBOX.call("search", {"query": first.question}).splitlines()
    document = TOOLBOX.call("get", {"key": key})
    assert f"<tool_response>\n{document}\n</tool_response>" in unmasked
    assert [m["role"] for m in good.messages] == [
        "system", "user", "assistant", "tool", "assistant", "tool", "assistant",
    ]  # fmt: skip


def test_scripted_limits(tok, model, monkeypatch) -> None:
    task = TASKS[0]
    keep_searching = [call("search", query=task.question)] * 10
    monkeypatch.setattr(rollout_module, "generate", scripted(tok, {task.question: keep_searching}))
    # The rollout's turn limit (below the env's).
    [ep] = rollout(model, tok, [ToolEnv(TOOLBOX, TASKS)], [task], max_turns=2,
                   max_new_tokens=100, token_budget=512)  # fmt: skip
    assert (ep.truncated, ep.done, ep.reward, ep.turns, ep.tool_calls) == (True, False, 0.0, 2, 2)
    assert len(runs(ep.mask)) == 2
    # The env's turn limit.
    [ep] = rollout(model, tok, [ToolEnv(TOOLBOX, TASKS, max_turns=2)], [task], max_turns=9,
                   max_new_tokens=100, token_budget=512)  # fmt: skip
    assert (ep.truncated, ep.done, ep.reward, ep.turns) == (True, True, 0.0, 2)
    # A reply cut off by max_new_tokens.
    [ep] = rollout(model, tok, [ToolEnv(TOOLBOX, TASKS)], [task], max_turns=9,
                   max_new_tokens=5, token_budget=512)  # fmt: skip
    assert (ep.truncated, ep.reward, ep.turns, sum(ep.mask)) == (True, 0.0, 1, 5)
    # The token budget: the conversation never grows past it.
    opening, _ = encode_chat(tok, ToolEnv(TOOLBOX, TASKS).reset(task), add_generation_prompt=True)
    for budget in (len(opening) + 3, len(opening) + 60, 400):
        [ep] = rollout(model, tok, [ToolEnv(TOOLBOX, TASKS, max_turns=50)], [task], max_turns=50,
                       max_new_tokens=100, token_budget=budget)  # fmt: skip
        assert ep.truncated and ep.reward == 0.0 and len(ep.ids) <= budget
        assert len(ep.logprobs) == sum(ep.mask)
