"""The named agent environments a recipe can ask for, their task splits, and demonstrations.

`calculator` and `lookup` are the tool-use environments of SFT (`sft.agent_envs`), RL
(`rl.envs`) and evaluation (`eval.agent_envs`). One function makes each one's tasks for a split,
so training and evaluation can never overlap:

* `calculator`: products of 3-4 digit numbers from the arithmetic generator's own hash split;
* `lookup`: questions over a `synthetic_store` whose seed is derived from the split and the
  recipe seed, so the evaluation store is a different set of invented facts from any training
  store (the answers exist nowhere but in their store);
* `verifiers:SPEC`: a taskset of the `verifiers` library, single-turn, scored by its own
  rewards (`envs/verifiers_env.py` says which SPECs resolve and what is supported).

`demonstration` plays a task with a scripted, correct policy against the real tools and
records the conversation, for SFT: the calculator gets the question's expression; lookup
searches for the question's words, reads the found documents in rank order until one holds
the answer, and answers.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from stacklab.data.tasks import Split
from stacklab.envs.agent_env import (
    ANSWER_PREFIX,
    AgentTask,
    ToolEnv,
    calculator_tasks,
    system_prompt,
)
from stacklab.envs.agent_env import lookup_tasks as _lookup_tasks
from stacklab.envs.base import Environment, Message
from stacklab.envs.tools import Toolbox

AGENT_ENVS = ("calculator", "lookup")
VERIFIERS_PREFIX = "verifiers:"  # then a taskset id, MODULE:ATTR or FILE.py:ATTR

_QUESTION = re.compile(r"(?:What|Who) is the (.+)\?")


def split_seed(name: str, split: Split, seed: int) -> int:
    """A seed for `name`'s tasks of `split`, distinct across names and splits."""
    digest = hashlib.sha256(f"{name}/{split}/{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def agent_tasks(name: str, split: Split, n: int, seed: int) -> tuple[Any, list[Any]]:
    """`n` tasks of environment `name` from `split`, and the toolbox that answers them (for a
    `verifiers:` env, the loaded taskset that scores them)."""
    if name.startswith(VERIFIERS_PREFIX):
        from stacklab.envs.verifiers_env import verifiers_tasks

        return verifiers_tasks(name, split, n, seed)
    if name == "calculator":
        return calculator_tasks(n, split_seed(name, split, seed), split)
    if name == "lookup":
        return _lookup_tasks(n, split_seed(name, split, seed))
    raise ValueError(
        f"unknown agent environment {name!r}; valid: {', '.join(AGENT_ENVS)}, "
        f"{VERIFIERS_PREFIX}SPEC"
    )


def make_env(name: str, toolbox: Any, tasks: list[Any], max_turns: int) -> Environment:
    """A `ToolEnv` over `tasks` (the environment name only chose the tools and tasks); for a
    `verifiers:` env, a single-turn `VerifiersEnv` (`toolbox` is its loaded taskset)."""
    if name.startswith(VERIFIERS_PREFIX):
        from stacklab.envs.verifiers_env import VerifiersEnv

        return VerifiersEnv(toolbox, tasks)
    if name not in AGENT_ENVS:
        raise ValueError(f"unknown agent environment {name!r}; valid: {', '.join(AGENT_ENVS)}")
    return ToolEnv(toolbox, tasks, max_turns=max_turns)


def demonstration(name: str, toolbox: Toolbox, task: AgentTask) -> list[Message]:
    """A correct episode of `task` by a scripted policy, as chat messages for SFT."""
    messages: list[Message] = [
        {"role": "system", "content": system_prompt(toolbox)},
        {"role": "user", "content": task.question},
    ]

    def call(tool: str, arguments: dict[str, Any]) -> str:
        messages.append(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": tool, "arguments": arguments}],
            }
        )
        result = toolbox.call(tool, arguments)
        messages.append({"role": "tool", "content": result})
        return result

    if name == "calculator":
        expression = task.question.removeprefix("What is ").removesuffix("?")
        call("calculator", {"expression": expression})
    elif name == "lookup":
        match = _QUESTION.fullmatch(task.question)
        query = match.group(1) if match else task.question
        for key in call("search", {"query": query}).splitlines():
            if task.answer in call("get", {"key": key}):
                break
    else:
        raise ValueError(f"unknown agent environment {name!r}; valid: {', '.join(AGENT_ENVS)}")
    messages.append({"role": "assistant", "content": ANSWER_PREFIX + task.answer})
    return messages


def demonstrations(name: str, n: int, seed: int) -> list[list[Message]]:
    """`n` demonstrations on `name`'s training split."""
    toolbox, tasks = agent_tasks(name, "train", n, seed)
    return [demonstration(name, toolbox, task) for task in tasks]
