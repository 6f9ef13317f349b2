"""Multi-turn tool-using episodes: the agent calls tools until it can answer.

The system message lists the tools (`Toolbox.describe()`), how to call them, and the one
answer format. Each assistant turn is parsed with `parse_assistant`:

* **Valid tool calls** run through the `Toolbox` (which never raises) and each result comes
  back as a `{"role": "tool"}` message, in the order of the calls.
* **Malformed calls** (bad JSON, no name, an unterminated block...) come back as one `user`
  message of `error: ...` lines, after the results of the valid calls, and the episode goes
  on, so the model sees its mistake and can recover. They are not `tool` messages because the
  chat format pairs each tool message with a call, and a malformed block is not a call.
* **A turn with neither** ends the episode and is graded. Its whole content (stripped) must be
  one line `Answer: X`; the reward is 1.0 iff X equals the reference answer exactly, else 0.0.
  A turn that still calls tools at the turn limit ends the episode with reward 0.

Two task families:

* `lookup_tasks`: questions about `synthetic_store` facts, behind opaque document keys, so
  answering takes `search` and then `get`; X must be the fact exactly.
* `calculator_tasks`: 3-4 digit multiplications from the arithmetic generator, too large to do
  reliably in one's head; X must be the canonical integer, which is `verify`'s format without
  its allowance for surrounding text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stacklab.data.chat import AssistantTurn, parse_assistant
from stacklab.data.tasks import ArithmeticGenerator, Split
from stacklab.envs.base import Environment, Message, StepResult
from stacklab.envs.tools import (
    CALCULATOR,
    KeyValueStore,
    Toolbox,
    lookup_tools,
    synthetic_store,
)
from stacklab.recipe import ArithmeticTask

ANSWER_PREFIX = "Answer: "
_ANSWER = re.compile(re.escape(ANSWER_PREFIX) + r"([^\n]+)")


@dataclass(frozen=True)
class AgentTask:
    question: str
    answer: str  # the reference answer, matched exactly


def parse_final_answer(content: str) -> str | None:
    """X from content that is exactly one line `Answer: X`, else None."""
    match = _ANSWER.fullmatch(content)
    return match.group(1) if match else None


def system_prompt(toolbox: Toolbox) -> str:
    """Short on purpose: every token of it is in every episode's prompt and RL batch."""
    return (
        'Call a tool with <tool_call>{"name": ..., "arguments": {...}}</tool_call>. Tools:\n'
        f"{toolbox.describe()}\n"
        f"Finish with one line: {ANSWER_PREFIX}<the answer>"
    )


def answer_tool_calls(turn: AssistantTurn, toolbox: Toolbox) -> tuple[list[Message], int]:
    """The messages that answer an assistant turn's tool calls, and how many were errors.

    Each call gets a `tool` message with its result; calls that could not be parsed come back
    as one `user` message of `error: ...` lines, so the model sees what was wrong.
    """
    results = [toolbox.call(c.name, c.arguments) for c in turn.tool_calls]
    messages: list[Message] = [{"role": "tool", "content": r} for r in results]
    if turn.errors:
        lines = "\n".join(f"error: {e}" for e in turn.errors)
        messages.append({"role": "user", "content": lines})
    return messages, len(turn.errors) + sum(r.startswith("error:") for r in results)


class ToolEnv(Environment):
    """A question, a toolbox, and turns until an answer or the turn limit."""

    def __init__(self, toolbox: Toolbox, tasks: list[AgentTask], max_turns: int = 6) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.toolbox = toolbox
        self.tasks = tasks
        self.max_turns = max_turns
        self.task: AgentTask | None = None
        self.turns = self.tool_calls = self.tool_errors = 0

    def reset(self, task: AgentTask | int) -> list[Message]:
        """Start on `task`: a task, or an index into this env's tasks (taken modulo)."""
        self.task = task if isinstance(task, AgentTask) else self.tasks[task % len(self.tasks)]
        self.turns = self.tool_calls = self.tool_errors = 0
        return [
            {"role": "system", "content": system_prompt(self.toolbox)},
            {"role": "user", "content": self.task.question},
        ]

    def _step(self, assistant_text: str) -> StepResult:
        if self.task is None:
            raise RuntimeError("step before reset")
        self.turns += 1
        turn = parse_assistant(assistant_text)
        if not turn.tool_calls and not turn.errors:
            given = parse_final_answer(turn.content)
            reward = 1.0 if given == self.task.answer else 0.0
            return StepResult([], True, reward, self._info(given=given))
        messages, errors = answer_tool_calls(turn, self.toolbox)
        self.tool_calls += len(turn.tool_calls)
        self.tool_errors += errors
        if self.turns >= self.max_turns:
            return StepResult([], True, 0.0, self._info(truncated=True))
        return StepResult(messages, False, 0.0, self._info())

    def _info(self, **extra: object) -> dict[str, object]:
        counts = {"turns": self.turns, "tool_calls": self.tool_calls}
        return {**counts, "tool_errors": self.tool_errors, **extra}


def lookup_tasks(n: int, seed: int) -> tuple[Toolbox, list[AgentTask]]:
    """`n` questions over `synthetic_store(n, seed)`, with its search and get tools."""
    documents, questions = synthetic_store(n, seed)
    toolbox = Toolbox(lookup_tools(KeyValueStore(documents)))
    return toolbox, [AgentTask(q, a) for q, a in questions]


def calculator_tasks(n: int, seed: int, split: Split) -> tuple[Toolbox, list[AgentTask]]:
    """`n` distinct 3-4 digit multiplications of `split`, with the calculator."""
    generator = ArithmeticGenerator(ArithmeticTask(ops=["*"], min_digits=3, max_digits=4))
    problems = generator.problems(split, n, seed)
    tasks = [AgentTask(f"What is {p.key}?", p.answer) for p in problems]
    return Toolbox([CALCULATOR]), tasks
