"""Optimizers: Newton–Schulz orthogonalisation, parameter roles, the Muon update, exact resume."""

import io

import pytest
import torch
from torch import nn

from stacklab.model.transformer import build_model
from stacklab.recipe import ModelConfig, MoEConfig, MuonConfig, OptimConfig
from stacklab.train.optim import (
    Muon,
    build_optimizer,
    check_partition,
    newton_schulz,
    param_groups,
    parameter_roles,
)

V = 97


def tiny_model(moe: bool = False, **kw) -> nn.Module:
    torch.manual_seed(0)
    if moe:
        kw["moe"] = MoEConfig(
            enabled=True, num_experts=4, top_k=2, first_k_dense=1, num_shared_experts=1
        )
    cfg = ModelConfig(depth=2, aspect=32, head_dim=16, max_seq_len=32, **kw)
    return build_model(cfg.build(), V)


def muon_cfg(**kw) -> OptimConfig:
    return OptimConfig(name="muon", muon=MuonConfig(**kw))


def singular_values(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double())


# --------------------------------------------------------------------------- Newton–Schulz

SHAPES = {"wide": (24, 40), "tall": (40, 24), "batched": (3, 24, 40)}


# The bands below are the scalar maps' own: singular values (relative to the Frobenius norm)
# at or above 1e-3 land, after 5 steps, in [0.6818, 1.2024] for the quintic (its image of
# [0, 1] once they have grown) and in [0.840, 1.124] for Polar Express ([0.993, 1.002] after 6).


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_quintic_singular_values_in_band(shape) -> None:
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    X = newton_schulz(G, steps=5, coefficients="quintic")
    assert X.shape == G.shape and X.dtype == G.dtype
    sv = singular_values(X)
    assert sv.min() > 0.68 and sv.max() < 1.21


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_polar_express_is_tighter_and_converges(shape) -> None:
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sv5 = singular_values(newton_schulz(G, steps=5, coefficients="polar_express"))
    assert sv5.min() > 0.84 and sv5.max() < 1.13
    sv6 = singular_values(newton_schulz(G, steps=6, coefficients="polar_express"))
    assert sv6.min() > 0.99 and sv6.max() < 1.01
    # Past the 8-entry table the last (classic quintic Newton–Schulz) step repeats: σ → 1.
    sv10 = singular_values(newton_schulz(G, steps=10, coefficients="polar_express"))
    assert torch.allclose(sv10, torch.ones_like(sv10), atol=1e-4)


def test_wide_output_is_orthogonal_with_the_input_singular_vectors() -> None:
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    X = newton_schulz(G, steps=10, coefficients="polar_express")
    assert torch.allclose(X @ X.T, torch.eye(24), atol=1e-4)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.allclose(X, U @ Vh, atol=1e-4)  # the polar factor, not any orthogonal matrix


def test_batched_equals_one_matrix_at_a_time_and_tall_equals_transposed_wide() -> None:
    G = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(2))
    batched = newton_schulz(G, 5)
    for e in range(3):
        assert torch.allclose(batched[e], newton_schulz(G[e], 5), atol=1e-6)
    assert torch.equal(newton_schulz(G[0].T, 5), newton_schulz(G[0], 5).T)


def test_newton_schulz_ignores_the_input_scale() -> None:
    G = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    # Up to the 1e-7 added to the norm, which the iterations amplify a little.
    assert torch.allclose(newton_schulz(G, 5), newton_schulz(1e-4 * G, 5), atol=1e-3)
    assert torch.equal(newton_schulz(torch.zeros(4, 8), 5), torch.zeros(4, 8))


# --------------------------------------------------------------------------- parameter groups


def names(groups: list[dict], role: str) -> set[str]:
    return {name for g in groups if g["name"] == role for name, _ in g["params"]}


def test_adamw_groups_decay_matrices_only() -> None:
    model = tiny_model(tie_embeddings=False)
    groups = param_groups(model, OptimConfig(weight_decay=0.1))
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    decay, no_decay = names(groups, "decay"), names(groups, "no_decay")
    assert {"embed.weight", "lm_head.weight", "layers.0.attn.q_proj.weight"} <= decay
    assert no_decay == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert {"layers.1.attn.k_norm.weight", "norm.weight"} <= no_decay
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(g["lr"] == 3e-3 and not g["use_muon"] for g in groups)


def test_muon_groups_on_the_dense_model() -> None:
    model = tiny_model(tie_embeddings=False)
    groups = param_groups(model, muon_cfg(lr=0.05))
    assert [g["name"] for g in groups] == ["muon", "decay", "no_decay"]
    assert names(groups, "decay") == {"embed.weight", "lm_head.weight"}
    muon = names(groups, "muon")
    assert len(muon) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert "layers.1.mlp.down_proj.weight" in muon and "layers.0.attn.k_proj.weight" in muon
    assert groups[0]["lr"] == 0.05 and groups[0]["use_muon"] and groups[0]["weight_decay"] == 0.1
    all_names = {n for n, _ in model.named_parameters()}
    assert muon | names(groups, "decay") | names(groups, "no_decay") == all_names


def test_muon_groups_on_the_moe_model() -> None:
    model = tiny_model(moe=True)  # tied embeddings: `embed.weight` only, no `lm_head.weight`
    groups = param_groups(model, muon_cfg())
    muon = names(groups, "muon")
    # Expert stacks [E, out, in] and the shared expert go to Muon; the router stays on AdamW.
    assert {"layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"} <= muon
    assert "layers.1.mlp.shared.up_proj.weight" in muon
    assert names(groups, "decay") == {"embed.weight", "layers.1.mlp.router.weight"}
    assert "layers.1.mlp.expert_bias" not in muon | names(groups, "no_decay")  # a buffer


def test_roles_survive_a_wrapper_prefix_and_frozen_parameters_are_left_out() -> None:
    wrapped = nn.ModuleDict({"module": tiny_model()})
    wrapped["module"].layers[0].attn_norm.weight.requires_grad_(False)
    groups = param_groups(wrapped, muon_cfg())
    assert names(groups, "decay") == {"module.embed.weight"}
    assert "module.layers.0.attn_norm.weight" not in names(groups, "no_decay")


def test_a_parameter_without_a_rule_is_refused_by_name() -> None:
    """A new 2-D parameter that is not a Linear weight is not guessed into Muon."""
    model = tiny_model()
    model.layers[1].attn.extra = nn.Parameter(torch.zeros(4, 4))
    for cfg in (muon_cfg(), OptimConfig()):
        with pytest.raises(ValueError, match=r"layers\.1\.attn\.extra \(Attention\.extra"):
            build_optimizer(model, cfg)
    model.layers[1].attn.extra.requires_grad_(False)  # frozen: left out, no rule needed
    assert "layers.1.attn.extra" not in parameter_roles(model)


def test_roles_follow_module_types_and_a_new_linear_is_a_hidden_map() -> None:
    model = tiny_model(tie_embeddings=False)
    model.layers[0].attn.gate = nn.Linear(8, 8)  # weight: a hidden map; bias: a vector
    roles = parameter_roles(model)
    assert roles["layers.0.attn.gate.weight"] == "hidden"
    assert roles["layers.0.attn.gate.bias"] == "vector"
    assert roles["lm_head.weight"] == roles["embed.weight"] == "matrix"
    assert roles["layers.1.mlp.down_proj.weight"] == "hidden"
    assert roles["norm.weight"] == "vector"
    groups = param_groups(model, muon_cfg())
    assert "layers.0.attn.gate.weight" in names(groups, "muon")
    assert "layers.0.attn.gate.bias" in names(groups, "no_decay")


def test_groups_must_partition_the_trainable_parameters() -> None:
    model = tiny_model()
    groups = param_groups(model, muon_cfg())
    check_partition(model, groups)  # the built groups pass
    first = groups[0]["params"][0]
    twice = [*groups, {"name": "again", "params": [first]}]
    with pytest.raises(ValueError, match=rf"{first[0]} is in two groups, muon and again"):
        check_partition(model, twice)
    missing = [{**groups[0], "params": groups[0]["params"][1:]}, *groups[1:]]
    with pytest.raises(ValueError, match=rf"in no group: {first[0]}$"):
        check_partition(model, missing)
    stranger = [*groups, {"name": "other", "params": [("w", nn.Parameter(torch.zeros(2)))]}]
    with pytest.raises(ValueError, match="other: w is not a trainable parameter"):
        check_partition(model, stranger)


# --------------------------------------------------------------------------- the update


def one_step(opt: torch.optim.Optimizer, model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (2, 16), generator=gen)
    opt.zero_grad(set_to_none=True)
    out = model(x, x)
    (out.loss + out.aux_loss).backward()
    opt.step()


@pytest.mark.parametrize("nesterov", [True, False])
def test_first_muon_step_is_the_scaled_polar_factor_of_the_gradient(nesterov: bool) -> None:
    model = tiny_model(moe=True)
    cfg = muon_cfg(lr=0.05, nesterov=nesterov)
    opt = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    one_step(opt, model, seed=0)
    beta, wd = cfg.muon.momentum, cfg.weight_decay
    for name, p in model.named_parameters():
        if name not in names(param_groups(model, cfg), "muon"):
            continue
        # buffer = (1-β)·g; nesterov steps along (1-β)·g + β·buffer = (1-β²)·g.
        smoothed = (1 - beta**2 if nesterov else 1 - beta) * p.grad
        direction = newton_schulz(smoothed, 5, "quintic")
        scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
        expected = before[name] * (1 - 0.05 * wd) - 0.05 * scale * direction
        assert torch.allclose(p.detach(), expected, atol=1e-6), name
        # Each matrix moves by lr·scale times a near-orthogonal one: the gradient of a small
        # batch is low-rank, so some singular values stay ~0, the others are in the band.
        step = (before[name] * (1 - 0.05 * wd) - p.detach()) / (0.05 * scale)
        assert 0.68 < singular_values(step).max() < 1.21


def test_muon_second_step_uses_momentum_and_both_optimizers_move() -> None:
    model = tiny_model()
    opt = build_optimizer(model, muon_cfg())
    assert isinstance(opt, Muon)
    one_step(opt, model, seed=0)
    q = model.layers[0].attn.q_proj.weight
    buf = opt.state[q]["momentum_buffer"]
    assert torch.allclose(buf, 0.05 * q.grad)  # (1 - β)·g after one step
    # The AdamW part keeps its state in the same dict, keyed by parameter.
    embed_state = opt.state[model.embed.weight]
    assert set(embed_state) == {"step", "exp_avg", "exp_avg_sq"} and embed_state["step"] == 1


def test_scheduler_lr_reaches_both_parts() -> None:
    model = tiny_model()
    opt = build_optimizer(model, muon_cfg(lr=0.02))
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    one_step(opt, model, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# --------------------------------------------------------------------------- exact resume


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cfg", [OptimConfig(), muon_cfg(), muon_cfg(coefficients="polar_express")])
def test_state_dict_resume_is_bit_exact(cfg: OptimConfig) -> None:
    moe = cfg.name == "muon"
    model_a = tiny_model(moe=moe)
    opt_a = build_optimizer(model_a, cfg)
    for seed in range(3):
        one_step(opt_a, model_a, seed)

    model_b = tiny_model(moe=moe)
    model_b.load_state_dict(roundtrip(model_a.state_dict()))
    opt_b = build_optimizer(model_b, cfg)
    opt_b.load_state_dict(roundtrip(opt_a.state_dict()))
    for seed in range(3, 6):
        for g_a, g_b in zip(opt_a.param_groups, opt_b.param_groups, strict=True):
            g_a["lr"] = g_b["lr"] = g_a["lr"] * 0.9  # a scheduler at work, on both
        one_step(opt_a, model_a, seed)
        one_step(opt_b, model_b, seed)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert str(opt_a.state_dict()["param_groups"]) == str(opt_b.state_dict()["param_groups"])
