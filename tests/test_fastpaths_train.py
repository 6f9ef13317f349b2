"""Training fast paths against the plain path: same loss, same gradients (float tolerance).

Fast paths (`FastPaths`, set per model): one matmul for the attention projections
(`fused_linear`), the output head fused with the cross-entropy (`linear_cross_entropy`,
`logits=None`), the MoE routing weights applied before `down_proj`; and activation
checkpointing (bit-identical gradients, MoE load counts not counted twice), and training
under `torch.compile` (`pretrain.compile`; MoE experts through the `stacklab::grouped_mm` op).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stacklab.model import moe
from stacklab.model.config import FastPaths, MoEConfig, TransformerConfig
from stacklab.model.layers import fused_linear, linear_cross_entropy
from stacklab.model.transformer import build_model
from stacklab.recipe import PretrainConfig, load_recipe
from stacklab.train.pretrain import pretrain_config

VOCAB = 97
SMALL = {"depth": 2, "d_model": 32, "head_dim": 8, "n_heads": 4, "n_kv_heads": 2}
CONFIGS = {
    "dense": TransformerConfig(**SMALL),
    "moe_aux_loss": TransformerConfig(
        **SMALL, moe=MoEConfig(enabled=True, num_experts=4, top_k=2, first_k_dense=1)
    ),
    "moe_sigmoid_shared": TransformerConfig(
        **SMALL,
        tie_embeddings=False,
        moe=MoEConfig(
            enabled=True,
            num_experts=8,
            top_k=3,
            router="sigmoid",
            num_shared_experts=1,
            balance="aux_free",
        ),
    ),
}


def _batch(rows: int = 3, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (rows, seq + 1), generator=gen)
    targets = ids[:, 1:].clone()
    targets[0, :4] = -100  # ignored positions (e.g. padding) must not count
    return ids[:, :-1], targets


def _loss_and_grads(
    name: str,
    fast: bool,
    loss_only: bool = False,
    checkpointing: bool = False,
    compiled: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(CONFIGS[name], VOCAB, FastPaths(fused=fast)).train()
    model.set_activation_checkpointing(checkpointing)
    call = torch.compile(model) if compiled else model
    x, y = _batch()
    out = call(x, y, logits=None if loss_only else "all")
    (out.loss + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    counts = [m.expert_counts.clone() for m in model.moe_layers()]
    loss = (out.loss + out.aux_loss).detach()
    return loss, grads, counts


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_paths_give_the_plain_loss_and_gradients(name: str) -> None:
    plain_loss, plain_grads, plain_counts = _loss_and_grads(name, fast=False)
    fast_loss, fast_grads, fast_counts = _loss_and_grads(name, fast=True, loss_only=True)
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert sorted(fast_grads) == sorted(plain_grads)
    for n in plain_grads:
        torch.testing.assert_close(fast_grads[n], plain_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert all(torch.equal(a, b) for a, b in zip(fast_counts, plain_counts, strict=True))


def test_loss_only_forward_returns_no_logits_and_the_same_loss_without_grad() -> None:
    torch.manual_seed(0)
    model = build_model(CONFIGS["dense"], VOCAB)
    x, y = _batch()
    out = model(x, y, logits=None)
    assert out.logits is None
    with torch.no_grad():  # no gradient wanted: the plain computation
        torch.testing.assert_close(model(x, y, logits=None).loss, model(x, y).loss)
    torch.testing.assert_close(out.loss.detach(), model(x, y).loss.detach())


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_linear_cross_entropy_matches_for_any_chunk(chunk: int) -> None:
    vocab = 13
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, 6, generator=gen, requires_grad=True)
    w = torch.randn(vocab, 6, generator=gen, requires_grad=True)
    t = torch.randint(0, vocab, (11,), generator=gen)
    t[[2, 7]] = -100
    (2.5 * linear_cross_entropy(x, w, t, chunk * vocab)).backward()  # upstream gradient applied
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (2.5 * F.cross_entropy(F.linear(x, w), t, ignore_index=-100)).backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)


def test_fused_linear_splits_like_separate_products() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=gen)
    ws = [torch.randn(n, 8, generator=gen) for n in (8, 4, 4)]
    for got, w in zip(fused_linear(x, *ws), ws, strict=True):
        torch.testing.assert_close(got, F.linear(x, w))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_activation_checkpointing_gives_identical_gradients(name: str) -> None:
    loss, grads, counts = _loss_and_grads(name, fast=True)
    ac_loss, ac_grads, ac_counts = _loss_and_grads(name, fast=True, checkpointing=True)
    assert torch.equal(ac_loss, loss)
    assert sorted(ac_grads) == sorted(grads)
    assert all(torch.equal(ac_grads[n], grads[n]) for n in grads)
    # The backward replays each MoE forward; its tokens are counted once.
    assert all(torch.equal(a, b) for a, b in zip(ac_counts, counts, strict=True))


@pytest.mark.slow
def test_grouped_mm_op_matches_the_aten_op_and_passes_opcheck() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(10, 8, generator=gen, requires_grad=True)
    w = torch.randn(3, 4, 8, generator=gen, requires_grad=True)  # [E, out, in] as the experts
    offs = torch.tensor([2, 2, 10], dtype=torch.int32)  # the middle expert gets no rows
    out = moe.grouped_mm(a, w.transpose(-2, -1), offs)
    ref = F.grouped_mm(a, w.transpose(-2, -1), offs=offs)
    assert torch.equal(out, ref)
    upstream = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (a, w), upstream)
    want = torch.autograd.grad(ref, (a, w), upstream)
    assert all(torch.equal(g, r) for g, r in zip(got, want, strict=True))
    assert not got[1][1].any()  # an expert without rows gets a zero gradient
    # The fake (shape) and autograd registrations, as torch.compile will use them.
    torch.library.opcheck(moe.grouped_mm, (a, w.transpose(-2, -1), offs))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "checkpointing"),
    [(name, False) for name in CONFIGS] + [("moe_aux_loss", True)],
)
def test_compiled_training_gives_the_eager_loss_gradients_and_counts(
    name: str, checkpointing: bool
) -> None:
    torch._dynamo.reset()
    loss, grads, counts = _loss_and_grads(name, fast=True, loss_only=True)
    c_loss, c_grads, c_counts = _loss_and_grads(
        name, fast=True, loss_only=True, checkpointing=checkpointing, compiled=True
    )
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    assert sorted(c_grads) == sorted(grads)
    for n in grads:
        torch.testing.assert_close(c_grads[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert all(torch.equal(a, b) for a, b in zip(c_counts, counts, strict=True))


def test_activation_checkpointing_is_a_recipe_option_outside_the_stage_hash() -> None:
    assert PretrainConfig().activation_checkpointing is False
    recipe = load_recipe("tiny", ["pretrain.activation_checkpointing=true"])
    assert recipe.pretrain.activation_checkpointing
    assert pretrain_config(recipe) == pretrain_config(load_recipe("tiny"))
