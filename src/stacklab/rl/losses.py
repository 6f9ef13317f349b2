"""GRPO-family policy losses, as pure functions of log-probs, advantages and a token mask.

Every loss takes the same tensors and returns `(loss, stats)`, with the loss to be minimised:

* `logp` [B, T]: log-probs of the sampled tokens under the policy being trained (has grad);
* `old_logp` [B, T]: the same under the policy that sampled them (no grad);
* `advantages` [B]: one per sequence, shared by its tokens;
* `mask` [B, T]: 1 for the tokens the model generated itself; 0 for prompt, padding and
  tool-response tokens, which must neither change the loss nor receive gradient. Values at
  masked positions are never read, so they may be anything (even inf).

Why the variants differ (they share the PPO clipped surrogate `min(r·A, clip(r)·A)` with the
token ratio `r = π/π_old`, except CISPO):

* `grpo` (Shao et al. 2024, DeepSeekMath): mean over each sequence's tokens, then over sequences.
  A long answer's tokens each weigh less, which Dr. GRPO shows biases towards long wrong answers.
* `dr_grpo` (Liu et al. 2025, "Understanding R1-Zero-Like Training"): sum over all tokens divided
  by a constant, batch size × max generation length: no per-sequence length normalisation.
  The paper's other half is in the advantages, which it does not divide by the group's std:
  the recipe's `rl.advantage` defaults to `none` with this loss and refuses `group_std`.
* `dapo` (Yu et al. 2025): one mean over all tokens of the batch, and a decoupled clip range
  whose upper bound (eps_high = 0.28) is wider, so unlikely tokens can still rise ("clip-higher").
* `gspo` (Zheng et al. 2025, "Group Sequence Policy Optimization"): the ratio is taken per
  sequence, the geometric mean of its token ratios, and clipped per sequence; the paper's
  ranges are tiny (3e-4, 4e-4) because a sequence ratio moves much less than a token one.
* `cispo` (MiniMax 2025, "MiniMax-M1", arXiv 2506.13585, eq. 4-5): REINFORCE with the token
  ratio as a clipped, gradient-stopped weight, `sg(clip(r, 1-eps_low, 1+eps_high))·A·log π`,
  averaged over all tokens of the batch. No token is ever dropped from the gradient; only its
  weight is capped. The paper sets no lower bound in practice, so `eps_low` defaults to None.

`grpo` and `dr_grpo` clip symmetrically with one `eps` (the recipe's `rl.eps_low`; an
`rl.eps_high` with them is a recipe error); `dapo`, `gspo` and `cispo` take `eps_low` and
`eps_high` apart.

`kl_k3` is the KL penalty towards a reference model; the caller scales it by its coefficient.
Stats are detached scalars: `clip_frac`, the share of counted tokens (sequences for GSPO) where
clipping changed the objective (the weight was capped, for CISPO), and `ratio_mean`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Stats = dict[str, Tensor]
LossFn = Callable[..., tuple[Tensor, Stats]]


def _token_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """r = exp(logp - old_logp) [B, T], exactly 1 (and no gradient) at masked positions."""
    return torch.exp(torch.where(mask, logp - old_logp, 0.0))


def _clipped_surrogate(
    ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor]:
    """PPO's min(r·A, clip(r, 1-eps_low, 1+eps_high)·A), and where the clipped branch won."""
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    clipped = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
    return surrogate, clipped


def _token_stats(ratio: Tensor, clipped: Tensor, mask: Tensor) -> Stats:
    n = mask.sum().clamp(min=1)
    return {
        "clip_frac": ((clipped & mask).sum() / n).detach(),
        "ratio_mean": ((ratio * mask).sum() / n).detach(),
    }


def _token_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[Tensor, Stats]:
    """Per-token clipped surrogate [B, T], zero at masked positions, and its stats."""
    mask = mask.bool()
    ratio = _token_ratio(logp, old_logp, mask)
    surrogate, clipped = _clipped_surrogate(ratio, advantages[:, None], eps_low, eps_high)
    return surrogate * mask, _token_stats(ratio, clipped, mask)


def grpo(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, eps: float = 0.2
) -> tuple[Tensor, Stats]:
    """GRPO: clipped surrogate, mean over each sequence's tokens, then mean over sequences."""
    surrogate, stats = _token_surrogate(logp, old_logp, advantages, mask, eps, eps)
    per_seq = surrogate.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B]
    return -per_seq.mean(), stats


def dr_grpo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    max_len: int,
    eps: float = 0.2,
) -> tuple[Tensor, Stats]:
    """Dr. GRPO: clipped surrogate summed over all tokens / (batch size × `max_len`)."""
    surrogate, stats = _token_surrogate(logp, old_logp, advantages, mask, eps, eps)
    return -surrogate.sum() / (logp.shape[0] * max_len), stats


def dapo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> tuple[Tensor, Stats]:
    """DAPO: clipped surrogate with a decoupled range, one mean over all tokens of the batch."""
    surrogate, stats = _token_surrogate(logp, old_logp, advantages, mask, eps_low, eps_high)
    return -surrogate.sum() / mask.sum().clamp(min=1), stats


def gspo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[Tensor, Stats]:
    """GSPO: sequence ratio exp(mean token log-ratio), clipped per sequence, mean over them."""
    mask = mask.bool()
    log_ratio = torch.where(mask, logp - old_logp, 0.0)
    ratio = torch.exp(log_ratio.sum(dim=1) / mask.sum(dim=1).clamp(min=1))  # [B]
    surrogate, clipped = _clipped_surrogate(ratio, advantages, eps_low, eps_high)
    stats = {"clip_frac": clipped.float().mean(), "ratio_mean": ratio.detach().mean()}
    return -surrogate.mean(), stats


def cispo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_high: float,
    eps_low: float | None = None,
) -> tuple[Tensor, Stats]:
    """CISPO: -mean over all tokens of sg(clip(r, 1-eps_low, 1+eps_high)) · A · logp."""
    mask = mask.bool()
    ratio = _token_ratio(logp, old_logp, mask).detach()
    low = 0.0 if eps_low is None else 1 - eps_low  # a ratio is never below 0: no lower bound
    weight = ratio.clamp(low, 1 + eps_high)
    clipped = (ratio > 1 + eps_high) | (ratio < low)
    objective = torch.where(mask, weight * advantages[:, None] * logp, 0.0)
    return -objective.sum() / mask.sum().clamp(min=1), _token_stats(ratio, clipped, mask)


def kl_k3(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """KL(π || π_ref) by Schulman's k3 estimator, exp(d) - d - 1 with d = ref_logp - logp.

    Unbiased for samples drawn from π, and never negative ("Approximating KL Divergence",
    Schulman 2020). Mean over all counted tokens of the batch.
    """
    mask = mask.bool()
    d = torch.where(mask, ref_logp - logp, 0.0)
    return (torch.exp(d) - d - 1).sum() / mask.sum().clamp(min=1)


LOSSES: dict[str, LossFn] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "dapo": dapo,
    "gspo": gspo,
    "cispo": cispo,
}
