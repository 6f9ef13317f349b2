"""Reinforcement learning with verifiable rewards: GRPO-family losses, advantages, trainer."""
