"""From rewards to advantages: the group baseline, and the DAPO shaping around it.

Why these functions:

* **The group is the baseline.** GRPO (Shao et al. 2024, DeepSeekMath) samples `n` answers per
  prompt and scores each against its siblings: advantage = reward - group mean. No value model.
* **Which std, if any.** GRPO also divides by the group's std. Dr. GRPO (Liu et al. 2025,
  "Understanding R1-Zero-Like Training") shows this favours prompts that are too easy or too
  hard and drops it (`"none"`, what the recipe's `rl.advantage` defaults to with
  `loss: dr_grpo`); dividing by one std over the whole batch (`"batch_std"`, the
  "group mean, batch std" of Liu et al. 2025, "Tricks or Traps? A Deep Dive into RL for LLM
  Reasoning") keeps the scale fixed across prompts. Every std here is the unbiased (n - 1)
  one, as `torch.std` computes it and as TRL and verl use; the paper does not say which. The
  `eps` added to it makes a group whose rewards are all equal come out as exact zeros, not NaN.
* **Groups without signal are dropped.** When every answer in a group has the same reward, all
  advantages are zero and the group only dilutes the batch. DAPO (Yu et al. 2025) samples more
  prompts and keeps only the informative groups ("dynamic sampling").
* **Overlong answers are punished softly.** Cutting an answer at the length limit and scoring it
  wrong teaches the model that its reasoning was wrong; DAPO instead adds a penalty that grows
  linearly over the last `cache_len` tokens before the limit.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

AdvantageScale = Literal["none", "group_std", "batch_std"]


def group_advantages(rewards: Tensor, scale: AdvantageScale, eps: float = 1e-6) -> Tensor:
    """Advantages [G, n] of `rewards` [G groups, n answers each]: reward - group mean, scaled.

    `scale`: "none" (Dr. GRPO), "group_std" (GRPO: divide by each group's std + eps) or
    "batch_std" (divide by the std of all G·n rewards + eps). Stds are unbiased; n >= 2.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, n >= 2], got {tuple(rewards.shape)}")
    rewards = rewards.float()
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centered
    if scale == "group_std":
        return centered / (rewards.std(dim=1, keepdim=True) + eps)
    if scale == "batch_std":
        return centered / (rewards.std() + eps)
    raise ValueError(f"unknown advantage scale {scale!r}")


def informative_groups(rewards: Tensor) -> Tensor:
    """Bool mask [G]: groups whose rewards [G, n] are not all equal (DAPO dynamic sampling)."""
    return rewards.amax(dim=1) != rewards.amin(dim=1)


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, added to the reward of each answer of `lengths` [B].

    0 up to `max_len - cache_len` tokens, then linear down to -`penalty` at `max_len`, and
    -`penalty` beyond it.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got {cache_len=} {max_len=}")
    over = (lengths.float() - (max_len - cache_len)) / cache_len  # 0 at the soft limit, 1 at max
    return -penalty * over.clamp(0.0, 1.0)
