"""The named agent environments: disjoint train/eval tasks, and demonstrations that replay to
reward 1 against the real environment, as valid chat whose loss mask is the assistant's."""

import pytest

from stacklab.data.chat import encode_chat, parse_assistant, render_chat, tool_call_json
from stacklab.data.tasks import ArithmeticGenerator, Problem
from stacklab.data.tokenizer import IM_END, TOOL_CALL, TOOL_CALL_END, train_tokenizer
from stacklab.envs.agent_env import ANSWER_PREFIX, ToolEnv, system_prompt
from stacklab.envs.suite import (
    AGENT_ENVS,
    agent_tasks,
    demonstration,
    demonstrations,
    make_env,
    split_seed,
)
from stacklab.envs.tools import synthetic_store
from stacklab.recipe import ArithmeticTask, TokenizerConfig

SEEDS = (0, 1, 7)


def assistant_text(message: dict) -> str:
    """An assistant turn as the model writes it: content, then each call in its block."""
    parts = [message["content"]] if message["content"] else []
    for call in message.get("tool_calls", []):
        body = tool_call_json(call["name"], call["arguments"])
        parts.append(f"{TOOL_CALL}\n{body}\n{TOOL_CALL_END}")
    return "\n".join(parts)


def replay(name: str, toolbox, tasks, task, messages: list[dict]):
    """Feed the demonstration's assistant turns to a fresh env; (env's messages, last step)."""
    env = make_env(name, toolbox, tasks, max_turns=6)
    seen = env.reset(task)
    result = None
    for message in messages[len(seen) :]:
        if message["role"] != "assistant":
            continue
        assert result is None or not result.done
        result = env.step(assistant_text(message))
        seen += [message, *result.messages_to_append]
    return seen, result


# --------------------------------------------------------------------------- task splits


def test_calculator_train_and_eval_never_share_a_question() -> None:
    arithmetic = ArithmeticGenerator(ArithmeticTask(ops=["*"], min_digits=3, max_digits=4))
    for seed in SEEDS:
        _, train = agent_tasks("calculator", "train", 300, seed)
        _, held = agent_tasks("calculator", "eval", 300, seed)
        assert len({t.question for t in train}) == len({t.question for t in held}) == 300
        assert not {t.question for t in train} & {t.question for t in held}
        # The split is the arithmetic generator's own hash split, so calculator eval tasks
        # are also held out of the arithmetic task data.
        for split, tasks in (("train", train), ("eval", held)):
            for t in tasks:
                key = t.question.removeprefix("What is ").removesuffix("?")
                a, b = key.split("*")
                assert 100 <= int(a) < 10_000 and 100 <= int(b) < 10_000
                assert t.answer == str(int(a) * int(b))
                problem = Problem(task="arithmetic", key=key, prompt=f"{key}=", answer=t.answer)
                assert arithmetic.split_of(problem) == split
    # The same seed's training tasks are the same whatever n: a prefix.
    _, more = agent_tasks("calculator", "train", 20, 0)
    _, fewer = agent_tasks("calculator", "train", 5, 0)
    assert fewer == more[:5]


def test_lookup_train_and_eval_stores_share_no_fact() -> None:
    for seed in SEEDS:
        stores = {}
        for split in ("train", "eval"):
            toolbox, tasks = agent_tasks("lookup", split, 100, seed)
            documents, questions = synthetic_store(100, split_seed("lookup", split, seed))
            assert [(t.question, t.answer) for t in tasks] == questions
            assert set(toolbox.tools) == {"search", "get"}
            for key, text in list(documents.items())[:5]:  # the toolbox serves this store
                assert toolbox.call("get", {"key": key}) == text
            stores[split] = (documents, tasks)
        (train_docs, train), (eval_docs, held) = stores["train"], stores["eval"]
        assert not set(train_docs.values()) & set(eval_docs.values())
        assert not {t.answer for t in train} & {t.answer for t in held}
        assert not {t.question for t in train} & {t.question for t in held}
        projects = [{t.question.split()[-1] for t in ts} for ts in (train, held)]
        assert not projects[0] & projects[1]
        # An eval answer is in no training document: it cannot be read during training.
        train_text = "\n".join(train_docs.values())
        assert not [t.answer for t in held if t.answer in train_text]


def test_split_seeds_differ_by_name_split_and_seed() -> None:
    seeds = {split_seed(n, s, k) for n in AGENT_ENVS for s in ("train", "eval") for k in SEEDS}
    assert len(seeds) == len(AGENT_ENVS) * 2 * len(SEEDS)
    assert split_seed("lookup", "train", 3) == split_seed("lookup", "train", 3)


@pytest.mark.parametrize("name", AGENT_ENVS)
def test_agent_tasks_are_deterministic(name: str) -> None:
    for split in ("train", "eval"):
        toolbox, first = agent_tasks(name, split, 12, seed=3)
        _, again = agent_tasks(name, split, 12, seed=3)
        _, other = agent_tasks(name, split, 12, seed=4)
        assert first == again and len(first) == 12
        assert first != other
        assert system_prompt(toolbox) == system_prompt(agent_tasks(name, split, 12, 3)[0])


def test_unknown_environment_names_the_valid_ones() -> None:
    toolbox, tasks = agent_tasks("calculator", "train", 2, 0)
    for call in (
        lambda: agent_tasks("calculater", "train", 2, 0),
        lambda: make_env("python", toolbox, tasks, 3),
        lambda: demonstration("tasks", toolbox, tasks[0]),
        lambda: demonstrations("Lookup", 2, 0),
    ):
        with pytest.raises(ValueError, match="valid: calculator, lookup"):
            call()
    assert isinstance(make_env("calculator", toolbox, tasks, 3), ToolEnv)
    assert make_env("calculator", toolbox, tasks, 3).max_turns == 3


# --------------------------------------------------------------------------- demonstrations


@pytest.mark.parametrize("name", AGENT_ENVS)
@pytest.mark.parametrize("split", ["train", "eval"])
def test_demonstrations_replay_to_reward_one(name: str, split: str) -> None:
    """The env answers each assistant turn with exactly the demonstration's tool messages,
    and the final answer earns 1."""
    for seed in (0, 11):
        toolbox, tasks = agent_tasks(name, split, 8, seed)
        for task in tasks:
            messages = demonstration(name, toolbox, task)
            seen, result = replay(name, toolbox, tasks, task, messages)
            assert seen == messages
            assert result.done and result.reward == 1.0
            assert result.info["given"] == task.answer and result.info["tool_errors"] == 0
            assert messages[-1] == {"role": "assistant", "content": ANSWER_PREFIX + task.answer}
            assert not any(m["content"].startswith("error:") for m in messages)


def test_demonstration_shapes() -> None:
    """Calculator: one call with the question's expression. Lookup: a search for the
    question's words, then gets until the answer is read (the top hit, on these stores)."""
    toolbox, tasks = agent_tasks("calculator", "train", 5, 0)
    for task in tasks:
        messages = demonstration("calculator", toolbox, task)
        expression = task.question.removeprefix("What is ").removesuffix("?")
        assert [m["role"] for m in messages] == [
            "system", "user", "assistant", "tool", "assistant",
        ]  # fmt: skip
        assert messages[2]["tool_calls"] == [
            {"name": "calculator", "arguments": {"expression": expression}}
        ]
        assert messages[3]["content"] == task.answer
    toolbox, tasks = agent_tasks("lookup", "train", 40, 0)
    for task in tasks:
        messages = demonstration("lookup", toolbox, task)
        query = task.question.split(" is the ", 1)[1].removesuffix("?")
        assert messages[2]["tool_calls"] == [{"name": "search", "arguments": {"query": query}}]
        keys = messages[3]["content"].splitlines()
        gets = [m["tool_calls"][0] for m in messages[4:-1:2]]
        assert [g["name"] for g in gets] == ["get"] * len(gets)
        assert [g["arguments"]["key"] for g in gets] == keys[: len(gets)]
        assert task.answer in messages[-2]["content"]
        assert all(task.answer not in m["content"] for m in messages[3:-2:2])


def test_demonstrations_are_the_training_split() -> None:
    for name in AGENT_ENVS:
        toolbox, tasks = agent_tasks(name, "train", 4, 2)
        assert demonstrations(name, 4, 2) == [demonstration(name, toolbox, t) for t in tasks]
        assert [d[1]["content"] for d in demonstrations(name, 4, 2)] == [t.question for t in tasks]


@pytest.fixture(scope="module")
def demos() -> list[list[dict]]:
    return [d for name in AGENT_ENVS for d in demonstrations(name, 6, seed=0)]


@pytest.fixture(scope="module")
def tok(demos):
    texts = [render_chat(d) for d in demos] * 3
    return train_tokenizer(texts, TokenizerConfig(vocab_size=500, min_frequency=2))


def masked_runs(tok, ids: list[int], mask: list[bool]) -> list[str]:
    runs, current = [], []
    for i, m in zip([*ids, -1], [*mask, False], strict=True):
        if m:
            current.append(i)
        elif current:
            runs.append(tok.decode(current, skip_special_tokens=False))
            current = []
    return runs


def test_demonstrations_are_valid_chat_trained_only_on_the_assistant(tok, demos) -> None:
    for messages in demos:
        ids, mask = encode_chat(tok, messages)  # validates the messages first
        assert len(ids) == len(mask)
        assert tok.decode(ids, skip_special_tokens=False) == render_chat(messages)
        assistant = [m for m in messages if m["role"] == "assistant"]
        expected = [assistant_text(m) + IM_END for m in assistant]
        assert masked_runs(tok, ids, mask) == expected
        # The replayed text parses back to the message (the model's view of the same turn).
        for m in assistant:
            assert parse_assistant(assistant_text(m)).to_message() == {"tool_calls": [], **m}
        # Each tool turn's tokens (the conversation up to it is a prefix) are all untrained.
        for k, m in enumerate(messages):
            if m["role"] == "tool":
                start = len(encode_chat(tok, messages[:k])[0])
                end = len(encode_chat(tok, messages[: k + 1])[0])
                assert ids[:end] == encode_chat(tok, messages[: k + 1])[0]
                assert not any(mask[start:end])
                assert m["content"] in tok.decode(ids[start:end], skip_special_tokens=False)
        assert not any(mask[: len(encode_chat(tok, messages[:2])[0])])  # system and user
