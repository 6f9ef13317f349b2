"""The MoE layer: sorted dispatch equals a plain per-expert loop, the losses equal hand
computations, and aux-loss-free balancing actually balances."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from stacklab.model.config import FastPaths, MoEConfig
from stacklab.model.moe import MoE


def make_moe(d_model: int = 16, hidden: int = 8, fast: FastPaths | None = None, **cfg) -> MoE:
    torch.manual_seed(0)
    return MoE(d_model, hidden, MoEConfig(enabled=True, **cfg), init_std=0.2, fast=fast)


def reference_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The Hugging Face way: route, then loop over experts gathering their tokens."""
    cfg = moe.cfg
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ moe.router.weight.T
    scores = logits.softmax(-1) if cfg.router == "softmax" else logits.sigmoid()
    chosen = torch.topk(scores + moe.expert_bias, cfg.top_k, dim=-1).indices  # [N, k]
    weights = scores.gather(1, chosen)
    if cfg.norm_topk:
        eps = 0.0 if cfg.router == "softmax" else 1e-20
        weights = weights / (weights.sum(-1, keepdim=True) + eps)
    weights = weights * cfg.routed_scaling
    y = torch.zeros_like(flat)
    for e in range(cfg.num_experts):
        token, slot = torch.where(chosen == e)  # may be empty
        rows = flat[token]
        hidden = F.silu(rows @ moe.gate_proj[e].T) * (rows @ moe.up_proj[e].T)
        y = y.index_add(0, token, (hidden @ moe.down_proj[e].T) * weights[token, slot, None])
    if moe.shared is not None:
        y = y + moe.shared(flat)
    return y.view(x.shape)


CONFIGS = [
    dict(router="softmax", top_k=1),
    dict(router="softmax", top_k=2, norm_topk=False),
    dict(router="softmax", top_k=3, num_shared_experts=1, routed_scaling=2.5),
    dict(router="softmax", top_k=4, balance="aux_free"),
    dict(router="sigmoid", top_k=1, balance="aux_free"),
    dict(router="sigmoid", top_k=2, norm_topk=False, num_shared_experts=2),
    dict(router="sigmoid", top_k=3, balance="aux_free", routed_scaling=2.5),
    dict(router="sigmoid", top_k=4, num_shared_experts=1),
]


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "slice_loop"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_dispatch_matches_reference(cfg: dict, grouped_mm: bool) -> None:
    moe = make_moe(num_experts=8, fast=FastPaths(grouped_mm=grouped_mm), **cfg)
    # Experts 0 and 5 can never be selected: the dispatch must cope with empty experts.
    moe.expert_bias.copy_(torch.tensor([-10.0, 0.1, -0.05, 0.0, 0.2, -10.0, 0.03, -0.1]))
    x = torch.randn(3, 7, 16, requires_grad=True)
    upstream = torch.randn(3, 7, 16)

    y = moe(x)
    y_ref = reference_forward(moe, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)

    params = [x, *moe.parameters()]
    grads = torch.autograd.grad((y * upstream).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * upstream).sum(), params)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    assert grads[1].abs().sum() > 0  # the router learns through the routing weights
    for e in (0, 5):
        assert moe.expert_counts[e] == 0
        assert grads[2][e].abs().sum() == 0  # gate_proj of an idle expert


def test_shapes_and_state_dict() -> None:
    moe = make_moe(num_experts=4, top_k=2, num_shared_experts=1)
    assert moe(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    assert moe(torch.randn(10, 16)).shape == (10, 16)
    shapes = {k: tuple(v.shape) for k, v in moe.state_dict().items()}
    assert shapes == {
        "router.weight": (4, 16),
        "gate_proj": (4, 8, 16),
        "up_proj": (4, 8, 16),
        "down_proj": (4, 16, 8),
        "expert_bias": (4,),
        "shared.gate_proj.weight": (8, 16),
        "shared.up_proj.weight": (8, 16),
        "shared.down_proj.weight": (16, 8),
    }
    assert moe.expert_bias.dtype == torch.float32


def tiny_router(router: str, logits: list[list[float]]) -> tuple[MoE, torch.Tensor]:
    """A 2-expert top-1 MoE whose router gives exactly `logits` for the returned inputs.

    Inputs are one-hot rows, so the router weight's columns are the distinct tokens' logits.
    """
    moe = MoE(2, 4, MoEConfig(enabled=True, num_experts=2, top_k=1, router=router), 0.02)
    distinct = [list(row) for row in dict.fromkeys(tuple(row) for row in logits)]
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor(distinct).T)
    x = torch.stack([F.one_hot(torch.tensor(distinct.index(row)), 2).float() for row in logits])
    return moe, x


# Logits chosen so that the probabilities are exact fractions: token 0 (and 2) 3/4 vs 1/4, token 1
# 1/8 vs 7/8, by softmax over [ln 3, 0] and [0, ln 7], or sigmoid of [ln 3, -ln 3] and
# [-ln 7, ln 7]. Experts chosen: 0, 1, 0, so f = (2/3, 1/3); P = (13/24, 11/24);
# E · Σ f·P = 2 · (26 + 11) / 72 = 37/36.
LN3, LN7 = math.log(3), math.log(7)
TINY = {
    "softmax": [[LN3, 0.0], [0.0, LN7], [LN3, 0.0]],
    "sigmoid": [[LN3, -LN3], [-LN7, LN7], [LN3, -LN3]],
}


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_aux_loss_by_hand(router: str) -> None:
    moe, x = tiny_router(router, TINY[router])
    moe.cfg = replace(moe.cfg, aux_loss_coef=1.0, z_loss_coef=0.0)
    moe(x)
    assert moe.expert_counts.tolist() == [2, 1]
    assert moe.aux_loss.item() == pytest.approx(37 / 36, rel=1e-6)
    assert moe.aux_loss.requires_grad


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_z_loss_by_hand(router: str) -> None:
    moe, x = tiny_router(router, TINY[router])
    moe.cfg = replace(moe.cfg, aux_loss_coef=0.0, z_loss_coef=0.5)
    moe(x)
    lse = [math.log(sum(math.exp(v) for v in row)) for row in TINY[router]]
    # softmax: lse = ln 4, ln 8, ln 4 → (4 + 9 + 4)(ln 2)² / 3
    expected = 0.5 * sum(v * v for v in lse) / 3
    assert moe.aux_loss.item() == pytest.approx(expected, rel=1e-6)


def test_losses_add_with_their_coefficients() -> None:
    moe, x = tiny_router("softmax", TINY["softmax"])
    moe.cfg = replace(moe.cfg, aux_loss_coef=0.01, z_loss_coef=0.001)
    moe(x)
    expected = 0.01 * 37 / 36 + 0.001 * 17 / 3 * math.log(2) ** 2
    assert moe.aux_loss.item() == pytest.approx(expected, rel=1e-6)


def test_eval_and_aux_free_have_no_loss() -> None:
    moe = make_moe(num_experts=4, top_k=2)
    moe.eval()
    moe(torch.randn(10, 16))
    assert moe.aux_loss.item() == 0 and not moe.aux_loss.requires_grad
    assert moe.expert_counts.sum() == 0  # eval forwards are not counted

    free = make_moe(num_experts=4, top_k=2, balance="aux_free", z_loss_coef=0.1)
    free(torch.randn(10, 16))
    assert free.aux_loss.item() == 0 and not free.aux_loss.requires_grad
    assert free.expert_counts.sum() == 20


def test_update_bias_step_and_reset() -> None:
    moe = make_moe(num_experts=4, top_k=1, balance="aux_free", bias_update_rate=0.01)
    moe.expert_counts.copy_(torch.tensor([6, 2, 0, 4]))  # mean load 3
    assert moe.load_stats() == {
        "load_0": 0.5,
        "load_1": 1 / 6,
        "load_2": 0.0,
        "load_3": 1 / 3,
        "imbalance": 2.0,
    }
    moe.update_bias()
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.01, 0.01, 0.01, -0.01]))
    assert moe.expert_counts.sum() == 0
    assert moe.load_stats()["imbalance"] == 0.0

    with_loss = make_moe(num_experts=4, top_k=1)  # aux_loss: counts reset, bias untouched
    with_loss.expert_counts.fill_(5)
    with_loss.update_bias()
    assert with_loss.expert_bias.abs().sum() == 0 and with_loss.expert_counts.sum() == 0


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_aux_free_bias_balances_a_skewed_router(router: str) -> None:
    moe = make_moe(
        d_model=16, num_experts=8, top_k=2, router=router, balance="aux_free",
        bias_update_rate=0.01,
    )  # fmt: skip
    torch.manual_seed(1)
    # Inputs all lean one way, and the router is aligned with it: experts 0 and 1 get nearly all.
    direction = F.normalize(torch.randn(16), dim=0)
    x = torch.randn(512, 16) + 3 * direction
    with torch.no_grad():
        moe.router.weight[:2] = direction
    with torch.no_grad():  # training mode counts the load; no graph is needed
        moe(x)
        before = moe.load_stats()["imbalance"]
        # A fixed-size sign step makes the bias oscillate around balance: judge the load over
        # the last 50 steps together.
        recent = torch.zeros(8)
        for step in range(200):
            moe.update_bias()
            moe(x)
            if step >= 150:
                recent += moe.expert_counts
    assert before > 3.0
    assert recent.max() / recent.mean() < 1.5


@pytest.mark.slow  # importing transformers takes seconds
def test_matches_hugging_face_blocks() -> None:
    """The routing details (dtypes, epsilon, where the bias enters) are Hugging Face's own."""
    pytest.importorskip("transformers")
    from transformers.models.glm4_moe.configuration_glm4_moe import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    x = torch.randn(2, 9, 16)
    for norm_topk in (True, False):
        ours = make_moe(num_experts=8, top_k=2, norm_topk=norm_topk)
        qwen = Qwen3MoeSparseMoeBlock(
            Qwen3MoeConfig(
                hidden_size=16, moe_intermediate_size=8, num_experts=8,
                num_experts_per_tok=2, norm_topk_prob=norm_topk,
            )
        )  # fmt: skip
        with torch.no_grad():
            qwen.gate.weight.copy_(ours.router.weight)
            qwen.experts.gate_up_proj.copy_(torch.cat([ours.gate_proj, ours.up_proj], dim=1))
            qwen.experts.down_proj.copy_(ours.down_proj)
            torch.testing.assert_close(ours(x), qwen(x), atol=1e-6, rtol=1e-5)

        ours = make_moe(
            num_experts=8, top_k=2, router="sigmoid", norm_topk=norm_topk, routed_scaling=2.5,
            num_shared_experts=2, balance="aux_free",
        )  # fmt: skip
        glm = Glm4MoeMoE(
            Glm4MoeConfig(
                hidden_size=16, moe_intermediate_size=8, n_routed_experts=8,
                num_experts_per_tok=2, norm_topk_prob=norm_topk, routed_scaling_factor=2.5,
                n_shared_experts=2,
            )
        )  # fmt: skip
        with torch.no_grad():
            ours.expert_bias.copy_(torch.linspace(-0.3, 0.3, 8))
            glm.gate.weight.copy_(ours.router.weight)
            glm.gate.e_score_correction_bias.copy_(ours.expert_bias)
            glm.experts.gate_up_proj.copy_(torch.cat([ours.gate_proj, ours.up_proj], dim=1))
            glm.experts.down_proj.copy_(ours.down_proj)
            glm.shared_experts.load_state_dict(ours.shared.state_dict())
            torch.testing.assert_close(ours(x), glm(x), atol=1e-6, rtol=1e-5)
