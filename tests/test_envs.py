"""Environments: strict rewards, tool results and errors, turn limits, never raising."""

import json

import pytest

from stacklab.data.chat import parse_assistant, validate_messages
from stacklab.data.tasks import ArithmeticGenerator, Problem
from stacklab.envs.agent_env import (
    AgentTask,
    ToolEnv,
    calculator_tasks,
    lookup_tasks,
    parse_final_answer,
)
from stacklab.envs.tasks_env import TaskEnv
from stacklab.recipe import ArithmeticTask


def call(name: str, **arguments: object) -> str:
    """A tool-call block exactly as the chat format renders it."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def play(env, task, replies: list[str]):
    """Run a scripted agent: reset, then one step per reply until done; the conversation and
    the last step result."""
    messages = env.reset(task)
    for text in replies:
        result = env.step(text)
        messages += [parse_assistant(text).to_message(), *result.messages_to_append]
        if result.done:
            break
    return messages, result


# --------------------------------------------------------------------------- TaskEnv


@pytest.fixture
def task_env() -> TaskEnv:
    return TaskEnv(ArithmeticGenerator(ArithmeticTask(max_digits=2)), "train")


def test_task_env_opening_and_reset(task_env) -> None:
    messages = task_env.reset(3)
    assert messages == [{"role": "user", "content": task_env.problem.prompt}]
    assert task_env.generator.split_of(task_env.problem) == "train"
    assert task_env.reset(3) == messages  # a seed always gives the same problem
    problem = Problem("arithmetic", "12*3", "12*3=", "36")
    system = TaskEnv(task_env.generator, "train", system="Be brief.")
    assert system.reset(problem) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "12*3="},
    ]


@pytest.mark.parametrize(
    ("reply", "reward"),
    [
        ("36", 1.0),
        ("  36\n", 1.0),
        ("35", 0.0),
        ("036", 0.0),
        ("The answer is 36", 0.0),
        ("", 0.0),
        ('36\n<tool_call>\n{"name": "calculator", "arguments": {}}\n</tool_call>', 0.0),
        ("36 <tool_call>{bad", 0.0),
        ("\x00\ud800<|im_end|>", 0.0),
    ],
)
def test_task_env_reward(task_env, reply: str, reward: float) -> None:
    task_env.reset(Problem("arithmetic", "12*3", "12*3=", "36"))
    result = task_env.step(reply)
    assert (result.done, result.reward, result.messages_to_append) == (True, reward, [])


def test_step_never_raises(task_env) -> None:
    result = task_env.step("36")  # before reset
    assert (result.done, result.reward) == (True, 0.0)
    assert "step before reset" in result.info["error"]
    task_env.reset(0)
    assert task_env.step(None).reward == 0.0  # not even text


# --------------------------------------------------------------------------- ToolEnv


@pytest.fixture
def lookup():
    toolbox, tasks = lookup_tasks(20, seed=0)
    return ToolEnv(toolbox, tasks, max_turns=4), tasks[0]


def test_lookup_search_get_answer(lookup) -> None:
    env, task = lookup
    keys = env.toolbox.call("search", {"query": task.question}).splitlines()
    document = env.toolbox.call("get", {"key": keys[0]})
    assert task.answer in document  # the scripted agent below can succeed
    messages, result = play(
        env,
        task,
        [
            "Let me search.\n" + call("search", query=task.question),
            call("get", key=keys[0]),
            f"Answer: {task.answer}",
        ],
    )
    assert (result.done, result.reward) == (True, 1.0)
    assert result.info == {"turns": 3, "tool_calls": 2, "tool_errors": 0, "given": task.answer}
    assert messages[0]["role"] == "system" and "search(query: string)" in messages[0]["content"]
    assert messages[1] == {"role": "user", "content": task.question}
    assert messages[3] == {"role": "tool", "content": "\n".join(keys)}
    assert messages[5] == {"role": "tool", "content": document}
    validate_messages(messages)


@pytest.mark.parametrize(
    "final",
    ["answer: {a}", "Answer:{a}", "Answer: {a}\nThanks", "The Answer: {a}", "Answer: {a}x", "{a}"],
)
def test_answer_format_is_strict(lookup, final: str) -> None:
    env, task = lookup
    _, result = play(env, task, [final.format(a=task.answer)])
    assert (result.done, result.reward, result.info["turns"]) == (True, 0.0, 1)


def test_wrong_answer_scores_zero(lookup) -> None:
    env, task = lookup
    _, result = play(env, task, ["  Answer: 0000  "])
    assert (result.done, result.reward, result.info["given"]) == (True, 0.0, "0000")
    assert parse_final_answer("  Answer: x") is None  # the env strips; the parser does not


def test_bad_json_gets_an_error_and_continues(lookup) -> None:
    env, task = lookup
    env.reset(task)
    result = env.step('<tool_call>\n{"name": "search", "arguments": {"query": \n</tool_call>')
    assert not result.done and result.reward == 0.0
    [error] = result.messages_to_append
    assert error["role"] == "user" and error["content"].startswith("error: tool call 1: invalid")
    assert result.info == {"turns": 1, "tool_calls": 0, "tool_errors": 1}
    result = env.step(f"Answer: {task.answer}")  # the episode goes on, and can still succeed
    assert (result.done, result.reward, result.info["tool_errors"]) == (True, 1.0, 1)


def test_valid_and_malformed_calls_in_one_turn(lookup) -> None:
    env, task = lookup
    messages, result = play(env, task, [call("search", query="lead") + "\n<tool_call>\n[1]"])
    tool, error = result.messages_to_append
    assert tool["role"] == "tool" and tool["content"].startswith("doc-")
    unterminated = "error: tool call 2: unterminated block (no </tool_call> after it)"
    assert error == {"role": "user", "content": unterminated}
    assert result.info["tool_calls"] == 1 and result.info["tool_errors"] == 1
    validate_messages(messages)  # still a well-formed conversation


def test_unknown_tool_and_bad_arguments(lookup) -> None:
    env, task = lookup
    env.reset(task)
    result = env.step(call("browse", url="x") + "\n" + call("get", id="doc-x"))
    unknown, bad_args = (m["content"] for m in result.messages_to_append)
    assert unknown == "error: unknown tool 'browse'; available: search, get"
    assert bad_args == "error: get: missing required argument 'key'"
    assert not result.done
    assert result.info == {"turns": 1, "tool_calls": 2, "tool_errors": 2}


def test_turn_limit(lookup) -> None:
    env, task = lookup
    _, result = play(env, task, [call("search", query="x")] * 10)
    assert (result.done, result.reward, result.info["truncated"]) == (True, 0.0, True)
    assert result.info["turns"] == env.max_turns == 4
    assert result.messages_to_append == []
    env.reset(task)  # reset clears the counts
    assert env.step(f"Answer: {task.answer}").info["turns"] == 1


def test_calculator_task_solved_by_script() -> None:
    toolbox, tasks = calculator_tasks(5, seed=0, split="train")
    task = tasks[0]
    a, b = (int(x) for x in task.question.removeprefix("What is ").removesuffix("?").split("*"))
    assert min(a, b) >= 100 and max(a, b) < 10_000
    env = ToolEnv(toolbox, tasks)
    messages, result = play(env, 0, [call("calculator", expression=f"{a}*{b}"), "Answer: ?"])
    assert messages[3] == {"role": "tool", "content": str(a * b)} and task.answer == str(a * b)
    assert result.reward == 0.0
    _, result = play(env, 0, [call("calculator", expression=f"{a}*{b}"), f"Answer: {a * b}"])
    assert (result.reward, result.info["turns"], result.info["tool_calls"]) == (1.0, 2, 1)


def test_calculator_splits_are_disjoint() -> None:
    train = {t.question for t in calculator_tasks(200, 0, "train")[1]}
    heldout = {t.question for t in calculator_tasks(50, 0, "eval")[1]}
    assert len(train) == 200 and len(heldout) == 50 and not train & heldout


def test_reset_by_index_or_task(lookup) -> None:
    env, task = lookup
    assert env.reset(0)[1]["content"] == task.question
    assert env.reset(len(env.tasks))[1]["content"] == task.question  # modulo
    assert env.reset(AgentTask("Q?", "A"))[1] == {"role": "user", "content": "Q?"}
