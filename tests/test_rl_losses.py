"""GRPO-family losses against hand computations: values, gradients, clipping, masking.

Ratios are set, not derived: `logp` is a leaf and `old_logp = logp - log(ratio)`, so the
token ratio r = exp(logp - old_logp) is exactly the number written in the test. The gradient of
a clipped-surrogate term r·A with respect to logp is A·r; of a clipped branch, 0.
"""

import math

import pytest
import torch

from stacklab.rl.losses import LOSSES, cispo, dapo, dr_grpo, grpo, gspo, kl_k3

INF = math.inf


def _inputs(ratios, logp=None):
    """Leaf `logp` [B, T] (zeros unless given) and `old_logp` giving those token ratios."""
    ratios = torch.tensor(ratios)
    logp = torch.zeros_like(ratios) if logp is None else torch.tensor(logp)
    logp.requires_grad_(True)
    return logp, logp.detach() - ratios.log()


# Sequence 0: 3 counted tokens, token 1 is a tool response (ratio 5, never read).
# Sequence 1: 2 counted tokens, then padding.
MASK = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
RATIOS = [[1.1, 5.0, 1.25, 0.5], [0.7, 1.0, 1.0, 1.0]]
ADV = torch.tensor([1.0, -0.5])
# With eps = 0.2, per token r·A or the clipped value:
#   seq 0 (A = 1):    1.1 inside → 1.1 | 1.25 > 1.2 → 1.2 (clipped) | 0.5 < 0.8 but A > 0 → 0.5
#   seq 1 (A = -0.5): 0.7 < 0.8 with A < 0 → -0.4 (clipped) | 1.0 → -0.5
# With DAPO's 1 + 0.28 = 1.28, the 1.25 token is inside: 1.25, gradient 1.25.


def test_grpo_value_gradient_and_stats():
    logp, old = _inputs(RATIOS)
    loss, stats = grpo(logp, old, ADV, MASK, eps=0.2)
    # per-sequence means: (1.1 + 1.2 + 0.5) / 3 and (-0.4 - 0.5) / 2; mean over 2; negated
    assert loss.item() == pytest.approx(-((2.8 / 3) + (-0.45)) / 2, abs=1e-6)
    loss.backward()
    # -A·r / (B·len) where unclipped, 0 where clipped or masked
    expected = torch.tensor([[-1.1 / 6, 0.0, 0.0, -0.5 / 6], [0.0, 0.125, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    assert stats["ratio_mean"].item() == pytest.approx((1.1 + 1.25 + 0.5 + 0.7 + 1.0) / 5)


def test_dr_grpo_divides_the_sum_by_batch_times_max_len():
    logp, old = _inputs(RATIOS)
    loss, stats = dr_grpo(logp, old, ADV, MASK, max_len=4, eps=0.2)
    assert loss.item() == pytest.approx(-(1.1 + 1.2 + 0.5 - 0.4 - 0.5) / 8, abs=1e-6)
    loss.backward()
    expected = torch.tensor([[-1.1 / 8, 0.0, 0.0, -0.5 / 8], [0.0, 0.5 / 8, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)


def test_dapo_token_mean_with_clip_higher():
    logp, old = _inputs(RATIOS)
    loss, stats = dapo(logp, old, ADV, MASK, eps_low=0.2, eps_high=0.28)
    assert loss.item() == pytest.approx(-(1.1 + 1.25 + 0.5 - 0.4 - 0.5) / 5, abs=1e-6)
    loss.backward()
    expected = torch.tensor([[-1.1 / 5, 0.0, -1.25 / 5, -0.5 / 5], [0.0, 0.5 / 5, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)
    assert stats["clip_frac"].item() == pytest.approx(1 / 5)  # only the 0.7 token, A < 0


def test_normalisations_differ_on_sequences_of_different_lengths():
    # r = 1 everywhere; 3 tokens with A = 1, 1 token with A = -1; max_len 4
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([1.0, -1.0])
    logp, old = _inputs([[1.0] * 4, [1.0] * 4])
    assert grpo(logp, old, adv, mask)[0].item() == pytest.approx(0.0)  # -(1 + -1) / 2
    assert dr_grpo(logp, old, adv, mask, max_len=4)[0].item() == pytest.approx(-0.25)  # -(3-1)/8
    assert dapo(logp, old, adv, mask)[0].item() == pytest.approx(-0.5)  # -(3 - 1) / 4


def test_grpo_gradient_at_ratio_one_is_minus_a_over_len():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([0.6, -2.0])
    logp, old = _inputs([[1.0] * 4, [1.0] * 4])
    grpo(logp, old, adv, mask)[0].backward()
    # -A / len per token, / B = 2 for the mean over sequences
    expected = torch.tensor([[-0.1, -0.1, -0.1, 0.0], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)


def test_gspo_sequence_ratio_clip_and_gradient():
    # token log-ratios: seq 0 [0.3, -0.1, 0.1] → s = e^0.1 = 1.105171, inside [0.9, 1.2]
    #                   seq 1 [0.4, 0.2] → s = e^0.3 = 1.349859 > 1.2 with A = 2: clipped, 2.4
    #                   seq 2 [-0.5] → s = e^-0.5 = 0.606531 < 0.9 with A = -1: clipped, -0.9
    log_ratios = torch.tensor([[0.3, -0.1, 0.1], [0.4, 0.2, 9.0], [-0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([1.0, 2.0, -1.0])
    logp, old = _inputs(log_ratios.exp().tolist())
    loss, stats = gspo(logp, old, adv, mask, eps_low=0.1, eps_high=0.2)
    assert loss.item() == pytest.approx(-(1.105171 + 2.4 - 0.9) / 3, abs=1e-6)
    loss.backward()
    # only seq 0 is unclipped: d(s·A)/d logp_t = A·s / len, then / B and negated
    g = -1.105171 / 3 / 3
    expected = torch.tensor([[g, g, g], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)
    assert stats["ratio_mean"].item() == pytest.approx((1.105171 + 1.349859 + 0.606531) / 3)


def test_cispo_detached_clipped_weight():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    ratios = [[1.5, 0.5, 7.0], [1.0, 3.0, 0.9]]
    logp, old = _inputs(ratios, logp=[[-1.0, -2.0, -4.0], [-0.5, -1.5, -3.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, stats = cispo(logp, old, adv, mask, eps_high=0.2)
    # weights (upper bound 1.2 only): [1.2, 0.5 | 1.0, 1.2, 0.9]
    objective = 1.2 * 2 * -1.0 + 0.5 * 2 * -2.0 + 1.0 * -1 * -0.5 + 1.2 * -1 * -1.5 + 0.9 * -1 * -3
    assert loss.item() == pytest.approx(-objective / 5, abs=1e-6)
    loss.backward()
    # gradient -w·A / 5: capped tokens keep theirs (unlike the PPO clip)
    expected = torch.tensor([[-2.4 / 5, -1.0 / 5, 0.0], [1.0 / 5, 1.2 / 5, 0.9 / 5]])
    torch.testing.assert_close(logp.grad, expected)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)


def test_cispo_optional_lower_bound():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    logp, old = _inputs([[1.5, 0.5, 7.0], [1.0, 3.0, 0.9]])
    loss, stats = cispo(logp, old, torch.tensor([2.0, -1.0]), mask, eps_high=0.2, eps_low=0.2)
    loss.backward()
    # 0.5 now weighs 0.8
    expected = torch.tensor([[-2.4 / 5, -1.6 / 5, 0.0], [1.0 / 5, 1.2 / 5, 0.9 / 5]])
    torch.testing.assert_close(logp.grad, expected)
    assert stats["clip_frac"].item() == pytest.approx(3 / 5)


KWARGS = {
    "grpo": {},
    "dr_grpo": {"max_len": 4},
    "dapo": {},
    "gspo": {"eps_low": 0.2, "eps_high": 0.2},
    "cispo": {"eps_high": 0.2},
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_masked_tokens_change_nothing_and_get_no_gradient(name):
    loss_fn = LOSSES[name]
    ratios = [[1.1, 1.0, 0.9, 1.0], [1.05, 1.0, 1.0, 1.0]]
    base_logp, base_old = _inputs(ratios, logp=[[-1.0, -2.0, -0.5, -1.0], [-0.3, -1.0, -1.0, -1.0]])
    loss, _ = loss_fn(base_logp, base_old, ADV, MASK, **KWARGS[name])
    # overwrite the tool-response and padding positions with junk, including infinities
    junk = MASK == 0
    logp = base_logp.detach().masked_scatter(junk, torch.tensor([30.0, -INF, 7.0]))
    old = base_old.masked_scatter(junk, torch.tensor([-INF, 3.0, INF]))
    logp.requires_grad_(True)
    junk_loss, _ = loss_fn(logp, old, ADV, MASK, **KWARGS[name])
    assert junk_loss.item() == pytest.approx(loss.item(), abs=1e-7)
    junk_loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[junk] == 0).all()
    assert (logp.grad[~junk] != 0).all()
    bool_loss, _ = loss_fn(base_logp, base_old, ADV, MASK.bool(), **KWARGS[name])
    assert bool_loss.item() == pytest.approx(loss.item(), abs=1e-7)


def test_kl_k3_values():
    logp = torch.tensor([[-1.0, -2.0, -4.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, 5.0], [-0.5, INF, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    # d = ref - logp: -0.5 → e^-0.5 + 0.5 - 1 = 0.106531; 0 → 0; 0.5 → e^0.5 - 1.5 = 0.148721
    assert kl_k3(logp, ref, mask).item() == pytest.approx((0.106531 + 0.148721) / 3, abs=1e-6)
    assert kl_k3(logp, logp, mask).item() == 0.0


def test_kl_k3_is_non_negative():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    assert kl_k3(logp, ref, torch.ones(4, 8)).item() > 0
