"""Single-turn episodes over the synthetic tasks: the verifiable-reward setting of RL.

The user asks one problem (its prompt, exactly as in SFT data from `task_conversation`), the
assistant answers once, and the task's own `verify` grades the reply: 1.0 for the right answer
in the task's strict format, 0.0 for anything else. A reply that tries to call a tool is
malformed here (there are no tools) and also earns 0.
"""

from __future__ import annotations

from stacklab.data.chat import parse_assistant
from stacklab.data.tasks import Problem, Split, TaskGenerator
from stacklab.envs.base import Environment, Message, StepResult


class TaskEnv(Environment):
    """One problem, one reply, reward = verify(problem, reply content)."""

    max_turns = 1

    def __init__(self, generator: TaskGenerator, split: Split, system: str | None = None) -> None:
        self.generator = generator
        self.split = split
        self.system = system
        self.problem: Problem | None = None

    def reset(self, task: Problem | int) -> list[Message]:
        """Start on `task`: a problem, or a seed that draws one problem of this env's split."""
        if isinstance(task, Problem):
            self.problem = task
        else:
            self.problem = self.generator.problems(self.split, 1, task)[0]
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [*head, {"role": "user", "content": self.problem.prompt}]

    def _step(self, assistant_text: str) -> StepResult:
        if self.problem is None:
            raise RuntimeError("step before reset")
        turn = parse_assistant(assistant_text)
        well_formed = not turn.tool_calls and not turn.errors
        correct = well_formed and self.generator.verify(self.problem, turn.content)
        info = {"answer": self.problem.answer, "malformed": not well_formed}
        return StepResult([], True, 1.0 if correct else 0.0, info)
