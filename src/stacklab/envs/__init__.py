"""Environments the model acts in: single-turn tasks and multi-turn tool agents, their tools,
the Python sandbox, and the rollout loop that records what RL trains on."""
