"""The protocol every environment follows, single-turn task or multi-turn tool agent.

RL, evaluation and chat drive environments through two calls: `reset(task)` gives the opening
messages (system and user), and `step(text)` takes one generated assistant reply and answers
with the messages that follow it, whether the episode is over, and its reward. One protocol
lets one rollout loop serve every kind of episode.

Rewards are strict and never fail: an environment reads the final answer from a fixed format,
and anything else, however malformed, earns 0. `step` wraps the environment's own logic, so a
bug triggered by strange model output ends that episode with reward 0 and the reason in
`info["error"]` instead of stopping a whole batch of rollouts.

An environment knows its turn limit (`max_turns`); the token budget of an episode is the
rollout loop's to enforce, since only it sees tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]


@dataclass
class StepResult:
    messages_to_append: list[Message]  # what follows the assistant turn (tool results, errors)
    done: bool
    reward: float  # 0.0 until the episode is done
    info: dict[str, Any] = field(default_factory=dict)


class Environment(ABC):
    """An episode at a time: `reset`, then `step` once per assistant turn until done."""

    max_turns: int

    @abstractmethod
    def reset(self, task: Any) -> list[Message]:
        """Start an episode on `task` (an int seed or a task object); the opening messages."""

    @abstractmethod
    def _step(self, assistant_text: str) -> StepResult:
        """The environment's reply to one assistant turn; may raise, `step` catches it."""

    def step(self, assistant_text: str) -> StepResult:
        """The reply to one generated assistant turn (raw text); never raises."""
        try:
            return self._step(assistant_text)
        except Exception as e:
            return StepResult([], True, 0.0, {"error": f"{type(e).__name__}: {e}"})
