"""The transformer: shapes, causality, RoPE, KV-cache decoding, padding, sizes, the
`logits` request, and a model package that stands without the recipe."""

import math
import subprocess
import sys

import pytest
import torch

from stacklab.model.config import MoEConfig, TransformerConfig
from stacklab.model.layers import RMSNorm, apply_rope, rope_tables
from stacklab.model.transformer import build_model
from stacklab.recipe import ModelConfig

V = 97


def tiny(moe: bool = False, **kw) -> TransformerConfig:
    base = dict(depth=2, aspect=32, head_dim=16, max_seq_len=64)
    base.update(kw)
    if moe:
        base["moe"] = MoEConfig(enabled=True, num_experts=4, top_k=2, first_k_dense=1)
    return TransformerConfig(**base)


@pytest.fixture(params=["dense", "moe", "untied-noqk"])
def model(request):
    torch.manual_seed(0)
    cfg = {
        "dense": tiny(),
        "moe": tiny(moe=True),
        "untied-noqk": tiny(tie_embeddings=False, qk_norm=False, n_kv_heads=4),
    }[request.param]
    return build_model(cfg, V).eval()


def test_rmsnorm_exact() -> None:
    norm = RMSNorm(4, eps=0.0)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    rms = math.sqrt((1 + 4 + 9 + 16) / 4)
    assert torch.allclose(norm(x), x / rms)


def test_rope_rotates_pairs_and_keeps_norm() -> None:
    cos, sin = rope_tables(4, 8, theta=10_000.0)
    # Position p rotates the pair (x_i, x_{i+d/2}) by p·θ^(-2i/d).
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4).expand(1, 1, 8, 4)
    y = apply_rope(x, cos[None, None], sin[None, None])
    for p in range(8):
        assert torch.allclose(
            y[0, 0, p], torch.tensor([math.cos(p), 0.0, math.sin(p), 0.0]), atol=1e-6
        )
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))


def test_rope_attention_depends_on_relative_position() -> None:
    cos, sin = rope_tables(8, 32, theta=100.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i: int, j: int) -> float:
        qi = apply_rope(q.view(1, 1, 1, 8), cos[i].view(1, 1, 1, 8), sin[i].view(1, 1, 1, 8))
        kj = apply_rope(k.view(1, 1, 1, 8), cos[j].view(1, 1, 1, 8), sin[j].view(1, 1, 1, 8))
        return float((qi * kj).sum())

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)


def test_shapes_and_loss(model) -> None:
    ids = torch.randint(0, V, (3, 10))
    targets = torch.randint(0, V, (3, 10))  # not `ids`: tied embeddings favour the input token
    out = model(ids, targets=targets)
    assert out.logits.shape == (3, 10, V)
    assert out.loss is not None and out.loss.ndim == 0
    # At init the loss is close to uniform guessing.
    assert abs(out.loss.item() - math.log(V)) < 0.5
    ignored = targets.clone()
    ignored[:, :5] = -100
    full = torch.nn.functional.cross_entropy(
        out.logits[:, 5:].reshape(-1, V), targets[:, 5:].reshape(-1)
    )
    assert torch.allclose(model(ids, targets=ignored).loss, full, atol=1e-6)


def test_causal_masking(model) -> None:
    ids = torch.randint(0, V, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % V
    a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)  # the past never sees the future
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_kv_cache_decoding_matches_full_forward(model) -> None:
    ids = torch.randint(0, V, (2, 16))
    full = model(ids).logits
    cache = model.new_cache(batch=2, max_len=16)
    prefill = model(ids[:, :9], cache=cache).logits
    steps = [model(ids[:, t : t + 1], cache=cache).logits for t in range(9, 16)]
    incremental = torch.cat([prefill, *steps], dim=1)
    assert cache.length == 16
    assert (incremental - full).abs().max() < 1e-5


def test_left_padded_batch_matches_unpadded_rows(model) -> None:
    a = torch.randint(2, V, (1, 6))
    b = torch.randint(2, V, (1, 9))
    batch = torch.ones(2, 9, dtype=torch.long)  # pad id 1 on the left of the short row
    batch[0, 3:] = a[0]
    batch[1] = b[0]
    key_mask = batch != 1
    key_mask[1] = True
    positions = (key_mask.cumsum(-1) - 1).clamp(min=0)
    cache = model.new_cache(batch=2, max_len=12)
    out = model(batch, cache=cache, positions=positions, key_mask=key_mask).logits
    assert torch.isfinite(out).all()
    assert (out[0, 3:] - model(a).logits[0]).abs().max() < 1e-5
    assert (out[1] - model(b).logits[0]).abs().max() < 1e-5
    # One decoding step continues both rows correctly.
    nxt = torch.randint(2, V, (2, 1))
    step_mask = torch.cat([key_mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
    step = model(nxt, cache=cache, positions=positions[:, -1:] + 1, key_mask=step_mask).logits
    ref_a = model(torch.cat([a, nxt[:1]], dim=1)).logits[0, -1]
    assert (step[0, 0] - ref_a).abs().max() < 1e-5


def test_cache_overflow_is_an_error(model) -> None:
    cache = model.new_cache(batch=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_param_count_and_flops() -> None:
    cfg = tiny()
    m = build_model(cfg, V)
    d = cfg.dims()
    per_layer = (
        d.d_model * d.head_dim * (2 * d.n_heads + 2 * d.n_kv_heads)  # q, k, v, o
        + 3 * d.d_model * d.ffn_hidden  # SwiGLU
        + 2 * d.d_model  # two norms
        + 2 * d.head_dim  # qk-norm
    )
    expected = V * d.d_model + d.n_layers * per_layer + d.d_model
    assert m.num_params() == expected
    n_matmul = expected - V * d.d_model + V * d.d_model  # head counted, lookup not
    attn = 12 * d.n_layers * d.n_heads * d.head_dim * 32
    assert m.flops_per_token(32) == 6 * n_matmul + attn


def test_moe_active_params() -> None:
    cfg = tiny(moe=True)
    m = build_model(cfg, V)
    moe = m.moe_layers()
    assert len(moe) == 1  # first_k_dense=1 of 2 layers
    d = cfg.dims()
    per_expert = 3 * d.d_model * d.expert_hidden
    assert m.num_params() - m.num_params(active=True) == (4 - 2) * per_expert


def test_logits_requests(model) -> None:
    """Each `logits` request gives what it names, and the same numbers as the full head."""
    ids = torch.randint(0, V, (2, 7))
    targets = torch.randint(0, V, (2, 7))
    full = model(ids, targets)
    assert torch.allclose(model(ids, logits="last").logits, full.logits[:, -1:], atol=1e-6)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2], mask[1, 5] = True, True
    assert torch.allclose(model(ids, logits=mask).logits, full.logits[mask], atol=1e-6)
    loss_only = model(ids, targets, logits=None)
    assert loss_only.logits is None
    assert torch.allclose(loss_only.loss, full.loss, atol=1e-6)


@pytest.mark.parametrize(
    ("targets", "logits", "message"),
    [
        (None, None, "needs targets"),
        (True, "last", "targets are scored at every position"),
        (True, "mask", "targets are scored at every position"),
        (None, "first", "logits must be"),
        (None, "int_mask", "must be bool"),
    ],
)
def test_logits_requests_that_cannot_be_honoured_are_errors(
    model, targets: bool | None, logits: object, message: str
) -> None:
    ids = torch.randint(0, V, (2, 7))
    if logits == "mask":
        logits = torch.ones(2, 7, dtype=torch.bool)
    elif logits == "int_mask":
        logits = torch.ones(2, 7, dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        model(ids, ids if targets else None, logits=logits)


def test_the_model_needs_its_own_config() -> None:
    with pytest.raises(TypeError, match=r"recipe\.model\.build\(\)"):
        build_model(ModelConfig(depth=1), V)  # the recipe's section, not the model's config


@pytest.mark.slow
def test_the_model_package_does_not_import_the_recipe() -> None:
    """The model is a library (export, chat, serving load it without a recipe): importing
    every module of `stacklab.model` must not import `stacklab.recipe`, even indirectly."""
    from pathlib import Path

    import stacklab.model.transformer as transformer

    package = Path(transformer.__file__).parent
    modules = sorted(f"stacklab.model.{f.stem}" for f in package.glob("*.py") if f.stem[0] != "_")
    assert {"stacklab.model.config", "stacklab.model.generation"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('stacklab')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = eval(done.stdout)  # a printed list of module names
    assert "stacklab.model.generation" in loaded
    assert "stacklab.recipe" not in loaded, loaded
