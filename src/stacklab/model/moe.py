"""Mixture of Experts: many small SwiGLU MLPs, of which each token uses only `top_k`.

An MoE layer buys parameters without buying compute: a router scores every expert for each
token, the token goes through its `top_k` best experts, and their outputs are summed with the
router's weights. Two routers are here, both exactly as Hugging Face computes them so that an
exported model gives the same logits:

* **softmax** (Qwen3-MoE, Mixtral): probabilities over experts, top-k of them, optionally
  renormalised to sum to 1.
* **sigmoid** (DeepSeek-V3, GLM-4-MoE): an independent score per expert; a per-expert bias
  shifts which experts are *selected* but never the weights they get.

The router always runs in float32 (autocast off), as ST-MoE recommends: its softmax and the
z-loss are where low precision hurts. Routing is a pure function (`route`), so are the two
losses; the module only wires them and keeps the load statistics.

Experts must not stay idle while others drown, so two ways to balance the load:

* **aux_loss** (Switch Transformer, GShard): `E · Σ_e f_e · P_e`, the fraction of assignments
  routed to expert e times its mean router probability, which is smallest when both are
  uniform; plus the ST-MoE router z-loss `mean(logsumexp(logits)²)`, which keeps logits small.
  (Hugging Face's `load_balancing_loss_func` counts f over tokens rather than assignments,
  so its value is `top_k` times ours.)
* **aux_free** (Wang et al. 2024, used by DeepSeek-V3): no loss at all. Each training forward
  counts the tokens per expert; after each optimizer step `update_bias()` nudges the
  selection bias of overloaded experts down and of underloaded ones up by a fixed step. With
  aux_free neither the balance loss nor the z-loss is used, as in DeepSeek-V3.

Dispatch sorts the (token, slot) assignments by expert so that each expert's tokens form one
contiguous slice, then runs all experts with one grouped matmul (`torch.nn.functional.grouped_mm`:
on CPU in any dtype, on Ampere+ GPUs in bf16; no host synchronisation at all) or, where that is
unavailable, a loop over the slices whose sizes come from one host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stacklab.model.config import FastPaths, MoEConfig
from stacklab.model.layers import MLP

HAS_GROUPED_MM = hasattr(F, "grouped_mm")  # this torch has it (the device may still not)
SIGMOID_NORM_EPS = 1e-20  # what DeepSeek-V3 / GLM-4-MoE add to the top-k sum before dividing


def route(logits: Tensor, expert_bias: Tensor, cfg: MoEConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Pick each token's experts and their weights from float32 router logits [N, E].

    Returns `weights` [N, k] float32, `experts` [N, k] int64, and the router `scores` [N, E]
    (softmax probabilities or sigmoid scores). `expert_bias` only changes the selection.
    """
    scores = logits.softmax(-1) if cfg.router == "softmax" else logits.sigmoid()
    experts = torch.topk(scores + expert_bias, cfg.top_k, dim=-1).indices
    weights = scores.gather(-1, experts)
    if cfg.norm_topk:
        total = weights.sum(-1, keepdim=True)
        weights = weights / (total if cfg.router == "softmax" else total + SIGMOID_NORM_EPS)
    return weights * cfg.routed_scaling, experts, scores


def load_balance_loss(scores: Tensor, counts: Tensor, router: str) -> Tensor:
    """Switch/GShard balance loss `E · Σ_e f_e · P_e` (1.0 when perfectly balanced).

    f_e: the share of all N·k assignments that went to e (from `counts` [E], no gradient);
    P_e: the mean over tokens of e's routing probability; sigmoid scores are first normalised
    per token to sum to 1, as in DeepSeek-V3's balance loss.
    """
    probs = scores if router == "softmax" else scores / scores.sum(-1, keepdim=True)
    num_experts = scores.shape[-1]
    assigned = counts.to(probs.dtype) / counts.sum()
    return num_experts * (assigned * probs.mean(0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)², which keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def tokens_per_expert(experts: Tensor, num_experts: int) -> Tensor:
    """How many assignments each expert received, [E] int64, without a host sync."""
    flat = experts.flatten()
    return flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))


def run_experts(
    x: Tensor,
    weights: Tensor,
    experts: Tensor,
    counts: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
    *,
    fused: bool = True,
    grouped_mm: bool = True,
) -> Tensor:
    """Σ_k weight_k · expert_k(x) for tokens x [N, D], with SwiGLU experts.

    gate_proj/up_proj [E, F, D], down_proj [E, D, F]; weights/experts [N, k]; counts [E].
    `fused` and `grouped_mm` are the `FastPaths` options of the same names.
    """
    num_tokens, top_k = experts.shape
    order = experts.flatten().argsort(stable=True)  # [N*k] assignments grouped by expert
    token = order // top_k  # [N*k] the token of each sorted assignment
    rows = x[token]  # [N*k, D] contiguous per expert
    linear = _grouped_linear(rows, counts, gate_proj.shape[1], grouped_mm)
    hidden = F.silu(linear(rows, gate_proj)) * linear(rows, up_proj)  # [N*k, F]
    weight = weights.flatten()[order, None]  # [N*k, 1] float32
    if fused:
        # down_proj is linear, so weighting its input is the same sum up to rounding, on the
        # narrower [N*k, F] rows (F < D in fine-grained MoE): less work, a smaller saved tensor.
        out = linear((hidden * weight).to(hidden.dtype), down_proj).to(x.dtype)
    else:
        # Weight in float32 and accumulate in x's dtype, as GLM-4-MoE does.
        out = (linear(hidden, down_proj) * weight).to(x.dtype)
    return out.new_zeros(num_tokens, x.shape[-1]).index_add_(0, token, out)


def _grouped_linear(
    rows: Tensor, counts: Tensor, hidden: int, grouped: bool
) -> Callable[[Tensor, Tensor], Tensor]:
    """A function `(a [M, in], w [E, out, in]) -> [M, out]` applying w[e] to expert e's slice.

    One grouped matmul where `grouped` allows it and it can run, else a loop over slices.
    """
    device = rows.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else rows.dtype
    # grouped_mm runs on CPU (float32 too) and on Ampere+ GPUs in bf16, and needs every row
    # stride to be a multiple of 16 bytes.
    on_gpu = device == "cuda" and dtype == torch.bfloat16
    supported = device == "cpu" or (
        on_gpu and torch.cuda.get_device_capability(rows.device) >= (8, 0)
    )
    aligned = all(n * dtype.itemsize % 16 == 0 for n in (rows.shape[-1], hidden))
    if grouped and HAS_GROUPED_MM and supported and aligned:
        offsets = counts.cumsum(0).to(torch.int32)  # [E] end of each expert's slice
        # Under torch.compile the aten op's shape function accepts bf16 only (the CUDA kernel's
        # rule), so other dtypes go through the custom op below; eager keeps the aten op.
        via_op = torch.compiler.is_compiling() and dtype != torch.bfloat16
        mm = grouped_mm if via_op else F.grouped_mm
        # grouped_mm is not autocast-aware: cast like autocast would.
        return lambda a, w: mm(a.to(dtype), w.transpose(-2, -1).to(dtype), offs=offsets)
    sizes = counts.tolist()  # the one host sync of the layer
    return lambda a, w: torch.cat([F.linear(part, w[e]) for e, part in enumerate(a.split(sizes))])


if HAS_GROUPED_MM:

    @torch.library.custom_op("stacklab::grouped_mm", mutates_args=())
    def grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
        """`F.grouped_mm(a, b, offs=offs)` for a [M, K] and b [E, K, N] as an opaque op.

        torch.compile treats it as one kernel (shape from the fake below, gradients from the
        autograd formula below) and fuses the gather, SwiGLU and scatter around it.
        """
        return F.grouped_mm(a, b, offs=offs)

    @grouped_mm.register_fake
    def _grouped_mm_shape(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
        return a.new_empty(a.shape[0], b.shape[-1])

    @torch.library.custom_op("stacklab::grouped_mm_weight_grad", mutates_args=())
    def _grouped_mm_weight_grad(a: Tensor, grad: Tensor, offs: Tensor) -> Tensor:
        """Per group g of rows: `a[g]ᵀ @ grad[g]`, stacked to [E, K, N]."""
        return F.grouped_mm(a.t(), grad, offs=offs)

    @_grouped_mm_weight_grad.register_fake
    def _weight_grad_shape(a: Tensor, grad: Tensor, offs: Tensor) -> Tensor:
        return a.new_empty(offs.shape[0], a.shape[1], grad.shape[1])

    def _grouped_mm_save(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor):
        a, b, offs = inputs
        ctx.save_for_backward(a, b, offs)

    def _grouped_mm_backward(
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None]:
        a, b, offs = ctx.saved_tensors  # type: ignore[attr-defined]
        need_a, need_b, _ = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad = grad.contiguous()  # grouped_mm refuses broadcast (stride-0) gradients
        grad_a = grouped_mm(grad, b.transpose(-2, -1), offs) if need_a else None
        grad_b = _grouped_mm_weight_grad(a, grad, offs) if need_b else None
        return grad_a, grad_b, None

    grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_save)


class MoE(nn.Module):
    """A routed MoE MLP with optional shared experts; a drop-in for the dense `MLP`.

    After a training forward, `aux_loss` holds the balance + z loss (a scalar with gradient)
    for the trainer to add; it is 0 in eval mode and with `balance="aux_free"`.
    `expert_counts` (a non-persistent buffer) accumulates tokens per expert over training
    forwards; a distributed trainer all-reduces it before `update_bias()`. (Under DDP, set
    `broadcast_buffers=False`, or rank 0's counts overwrite the others' at each forward.)
    """

    def __init__(
        self,
        d_model: int,
        expert_hidden: int,
        cfg: MoEConfig,
        init_std: float,
        fast: FastPaths | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.fast = cfg, fast or FastPaths()
        n, f = cfg.num_experts, expert_hidden
        self.router = nn.Linear(d_model, n, bias=False)
        self.gate_proj = nn.Parameter(torch.empty(n, f, d_model))
        self.up_proj = nn.Parameter(torch.empty(n, f, d_model))
        self.down_proj = nn.Parameter(torch.empty(n, d_model, f))
        self.shared = MLP(d_model, cfg.num_shared_experts * f) if cfg.num_shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(n, dtype=torch.float32))
        self.register_buffer("expert_counts", torch.zeros(n, dtype=torch.int64), persistent=False)
        self.aux_loss = torch.zeros(())
        # True while activation checkpointing replays this forward in backward: the replay
        # must compute exactly what the first run did, but not count the tokens again.
        self.replaying = False
        for param in self.parameters():
            nn.init.normal_(param, mean=0.0, std=init_std)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape  # [B, T, D] or [N, D]
        x = x.reshape(-1, shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())  # [N, E]
        weights, experts, scores = route(logits, self.expert_bias, self.cfg)
        counts = tokens_per_expert(experts, self.cfg.num_experts)
        self.aux_loss = logits.new_zeros(())
        if self.training:
            if not self.replaying:
                self.expert_counts += counts
            if self.cfg.balance == "aux_loss":
                self.aux_loss = self.cfg.aux_loss_coef * load_balance_loss(
                    scores, counts, self.cfg.router
                ) + self.cfg.z_loss_coef * router_z_loss(logits)
        y = run_experts(
            x,
            weights,
            experts,
            counts,
            self.gate_proj,
            self.up_proj,
            self.down_proj,
            fused=self.fast.fused,
            grouped_mm=self.fast.grouped_mm,
        )
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(shape)

    @torch.no_grad()
    def update_bias(self) -> None:
        """End of a step: with aux_free, move the selection bias towards balance; reset counts.

        `bias += rate · sign(mean load − load)`: overloaded experts become less likely to be
        picked, underloaded ones more. With aux_loss this only resets the counts.
        """
        if self.cfg.balance == "aux_free":
            load = self.expert_counts.float()
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_counts.zero_()

    def load_stats(self) -> dict[str, float]:
        """Share of assignments per expert since the last reset, and max load / mean load.

        All zeros when nothing was routed since the last reset.
        """
        counts = self.expert_counts.tolist()
        total = sum(counts)
        shares = [c / total if total else 0.0 for c in counts]
        stats = {f"load_{e}": share for e, share in enumerate(shares)}
        stats["imbalance"] = max(shares) * len(shares)
        return stats
