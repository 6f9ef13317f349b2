"""The small building blocks every transformer variant shares: RMSNorm, RoPE and SwiGLU.

They are kept apart from the transformer so the MoE layer (whose experts and shared expert are
SwiGLU MLPs) and the transformer can both use them without importing each other.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale; computed in float32 for stability."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def fused_linear(x: Tensor, *weights: Tensor) -> tuple[Tensor, ...]:
    """`F.linear(x, w)` for each of `weights` (no bias), as one matmul.

    The weights stay separate parameters (the state dict, Hugging Face export and per-matrix
    optimizers such as Muon see them unchanged); they are concatenated for the product, and
    autograd splits the gradient back. One larger product keeps the matmul kernel busier
    than several thin ones and reads `x` once.
    """
    if len(weights) == 1:
        return (F.linear(x, weights[0]),)
    out = F.linear(x, torch.cat(weights))
    return out.split([w.shape[0] for w in weights], dim=-1)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin tables [max_len, head_dim] for rotate-half RoPE (Su et al. 2021).

    Frequencies are θ^(-2i/d) for i < d/2, repeated across both halves of the head, the layout
    Llama, Qwen and GLM use, so weights move between them without permutation.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, hd] by position; cos/sin are [B or 1, 1, T, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `x @ weight.T` against `targets`, in chunks of rows.

    The gradient is computed during the forward, chunk by chunk (softmax minus one-hot, times
    the weight for `x`, times `x` for the weight), so the [N, V] logits, their log-softmax and
    their gradient never exist whole: on the tiny recipe they are the largest activations of
    a training step. Backward only scales the stored gradients.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, targets: Tensor, chunk: int
    ) -> Tensor:
        valid = targets != -100
        count = valid.sum().clamp(min=1)
        grad_x = torch.empty_like(x) if x.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = x.new_zeros((), dtype=torch.float32)
        for start in range(0, x.shape[0], chunk):
            xs, ts = x[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(xs, weight).float()  # [n, V]
            lse = torch.logsumexp(logits, dim=-1)
            ok = valid[start : start + chunk]
            safe = ts.clamp(min=0)
            picked = logits.gather(-1, safe[:, None]).squeeze(-1)
            total = total + torch.where(ok, lse - picked, 0.0).sum()
            # d(loss)/d(logits) = (softmax - onehot) / count on valid rows, 0 elsewhere
            probs = logits.sub_(lse[:, None]).exp_()
            probs.scatter_add_(-1, safe[:, None], -torch.ones_like(probs[:, :1]))
            probs.mul_((ok.float() / count)[:, None])
            grad_logits = probs.to(x.dtype)
            if grad_x is not None:
                grad_x[start : start + chunk] = grad_logits @ weight.to(x.dtype)
            grad_w.addmm_(grad_logits.t().float(), xs.float())
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        grad_x, grad_w = ctx.saved_tensors
        gx = grad_x * grad if grad_x is not None and ctx.needs_input_grad[0] else None
        gw = grad_w * grad if ctx.needs_input_grad[1] else None
        return gx, gw, None, None


def linear_cross_entropy(
    x: Tensor, weight: Tensor, targets: Tensor, chunk_elements: int | None
) -> Tensor:
    """`F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=-100)` without logits.

    x [N, D], weight [V, D], targets [N]. With gradients enabled, autocast off and a
    `chunk_elements` (logits per chunk) this is the chunked fused path (`_LinearCrossEntropy`);
    otherwise, and always with `chunk_elements=None`, the plain computation.
    """
    fused = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    # Under autocast the plain path keeps autocast's casts (bf16 matmul, float32 loss).
    if chunk_elements is not None and fused and not torch.is_autocast_enabled(x.device.type):
        chunk = max(1, chunk_elements // weight.shape[0])
        return _LinearCrossEntropy.apply(x, weight, targets, chunk)
    logits = F.linear(x, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=-100)
