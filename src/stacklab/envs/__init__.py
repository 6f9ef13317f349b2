"""Environments the agent acts in: the sandbox that runs the model's Python tool calls."""
