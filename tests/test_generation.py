"""Generation: cached batched decoding matches a naive loop; stopping, sampling, log-probs."""

import math

import pytest
import torch

from stacklab.envs.rollout import Episode
from stacklab.model.config import MoEConfig, TransformerConfig
from stacklab.model.generation import filter_logits, generate, sample_next
from stacklab.model.transformer import build_model
from stacklab.recipe import RLConfig
from stacklab.rl.trainer import RolloutBatch, pad_episodes, token_logprobs, update
from stacklab.train.trainer import OptimizerStep

V = 97


def tiny_model(moe: bool = False):
    torch.manual_seed(0)
    cfg = TransformerConfig(
        depth=2,
        aspect=32,
        head_dim=16,
        max_seq_len=64,
        moe=MoEConfig(enabled=moe, num_experts=4, top_k=2, first_k_dense=1),
    )
    return build_model(cfg, V)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(8, V, (n,), generator=gen).tolist() for n in (3, 7, 1, 5)]


def naive_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Re-run the full forward on the growing sequence, no cache, no padding."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_greedy_matches_naive_loop(moe: bool, prompts) -> None:
    model = tiny_model(moe)
    out = generate(model, prompts, 8, stop_ids=())
    for prompt, gen in zip(prompts, out, strict=True):
        assert gen.tokens == naive_greedy(model, prompt, 8)
        assert not gen.stopped and gen.logprobs is None


def test_padding_id_is_invisible(model, prompts) -> None:
    a = generate(model, prompts, 6, stop_ids=(), pad_id=1)
    b = generate(model, prompts, 6, stop_ids=(), pad_id=50)
    assert [g.tokens for g in a] == [g.tokens for g in b]


def test_stop_tokens_end_rows_independently(model, prompts) -> None:
    free = [g.tokens for g in generate(model, prompts, 12, stop_ids=())]
    stop = free[1][4]  # row 1 stops by step 4 at the latest; other rows may not stop at all
    out = generate(model, prompts, 12, stop_ids=(stop,))
    for tokens, gen in zip(free, out, strict=True):
        if stop in tokens:
            end = tokens.index(stop)
            assert gen.tokens == tokens[:end] and gen.stop_token == stop and gen.stopped
        else:
            assert gen.tokens == tokens and gen.stop_token is None
    assert out[1].stopped and len(out[1].tokens) <= 4


def test_loop_ends_when_every_row_stopped(model, prompts) -> None:
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = generate(model, prompts, 10, stop_ids=range(V))  # any first token stops
    finally:
        hook.remove()
    assert len(calls) == 1  # the prefill only
    assert all(g.tokens == [] and g.stopped for g in out)


def test_max_new_tokens_and_length_limit(model, prompts) -> None:
    out = generate(model, prompts, 5, stop_ids=())
    assert [len(g.tokens) for g in out] == [5] * len(prompts)
    # A 60-token prompt plus 5 new tokens feeds 64 positions: exactly max_seq_len.
    long = [[9] * 60, [9]]
    assert [len(g.tokens) for g in generate(model, long, 5, stop_ids=())] == [5, 5]
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, long, 6)


def test_restores_training_mode(model, prompts) -> None:
    model.train()
    generate(model, prompts, 2)
    assert model.training
    model.eval()
    generate(model, prompts, 2)
    assert not model.training


def test_top_k_1_and_tiny_top_p_are_greedy(model, prompts) -> None:
    greedy = [g.tokens for g in generate(model, prompts, 8, stop_ids=())]
    gen = torch.Generator().manual_seed(0)
    top_k = generate(model, prompts, 8, temperature=1.5, top_k=1, stop_ids=(), generator=gen)
    top_p = generate(model, prompts, 8, temperature=1.5, top_p=1e-9, stop_ids=(), generator=gen)
    assert [g.tokens for g in top_k] == greedy
    assert [g.tokens for g in top_p] == greedy


def test_seeded_sampling_is_reproducible(model, prompts) -> None:
    def sample(seed: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        out = generate(model, prompts, 10, temperature=1.0, stop_ids=(), generator=gen)
        return [g.tokens for g in out]

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_logprobs_are_at_the_sampling_temperature(model, prompts, temperature: float) -> None:
    """log_softmax(logits / temperature), before the top-k filter, at every sampled token."""
    gen = torch.Generator().manual_seed(0)
    out = generate(
        model, prompts, 6, temperature=temperature, top_k=20, generator=gen, return_logprobs=True
    )
    with torch.no_grad():
        for prompt, g in zip(prompts, out, strict=True):
            chosen = g.tokens + ([g.stop_token] if g.stopped else [])
            assert len(g.logprobs) == len(chosen)
            seq = torch.tensor([prompt + chosen])
            logits = model(seq).logits[0, len(prompt) - 1 : -1]
            logp = (logits / temperature).log_softmax(-1)
            expected = logp.gather(-1, torch.tensor(chosen)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(g.logprobs), expected, atol=1e-5)


def test_greedy_logprobs_are_the_models_own(model, prompts) -> None:
    out = generate(model, prompts, 4, stop_ids=(), return_logprobs=True)
    with torch.no_grad():
        for prompt, g in zip(prompts, out, strict=True):
            logits = model(torch.tensor([prompt + g.tokens])).logits[0, len(prompt) - 1 : -1]
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(g.tokens)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(g.logprobs), expected, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_sampler_logprobs_equal_the_rl_trainers(prompts, temperature: float) -> None:
    """The RL trainer recomputes the sampled tokens' log-probs (`token_logprobs`) and logs how
    far the sampler's own are from them (`logprob_drift`): on the same weights that is float
    noise at any temperature, not the gap between two temperatures."""
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    out = generate(
        model, prompts, 8, temperature=temperature, stop_ids=(), generator=gen, return_logprobs=True
    )
    episodes = [
        Episode([], p + g.tokens, [False] * len(p) + [True] * len(g.tokens), g.logprobs)
        for p, g in zip(prompts, out, strict=True)
    ]
    inputs, targets, mask, sampler_logp = pad_episodes(episodes)
    with torch.no_grad():
        logp, _, _ = token_logprobs(model, inputs, targets, temperature, mask)
    assert torch.allclose(logp[mask], sampler_logp[mask], atol=1e-5)
    # The trainer's logged drift, before any update (the optimizer's rate is 0).
    n = len(episodes)
    cfg = RLConfig(temperature=temperature, minibatch_size=n)
    batch = RolloutBatch(episodes, ["tasks"] * n, torch.zeros(n), torch.zeros(n), 1, 0, 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    optimizer_step = OptimizerStep(model, optimizer, scheduler, cfg.grad_clip)
    stats = update(model, None, optimizer_step, batch, cfg, seed=0, step=1)
    assert stats["logprob_drift"] < 1e-5


# --------------------------------------------------------------------------- pure sampling


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.0625, 0.25, 0.5, 0.0625, 0.125])  # exact in binary
    logits = probs.log()[None]

    def kept(p: float) -> set[int]:
        return set(torch.isfinite(filter_logits(logits, 1.0, top_p=p))[0].nonzero()[:, 0].tolist())

    assert kept(0.5) == {2}  # the top token alone reaches 0.5
    assert kept(0.51) == {2, 1}
    assert kept(0.75) == {2, 1}
    assert kept(0.76) == {2, 1, 4}
    assert kept(1e-6) == {2}  # always at least one token
    assert kept(1.0) == {0, 1, 2, 3, 4}
    # Kept tokens keep their logits; top-k applies first.
    out = filter_logits(logits, 1.0, top_k=2, top_p=0.9)
    assert torch.equal(out[0, [1, 2]], logits[0, [1, 2]])
    assert set(torch.isfinite(out)[0].nonzero()[:, 0].tolist()) == {1, 2}


def test_temperature_scales_logits_exactly() -> None:
    logits = torch.tensor([[0.0, math.log(2.0)]])
    probs = filter_logits(logits, 0.5).softmax(-1)  # p ∝ exp(2 · logit) = [1, 4]
    assert torch.allclose(probs, torch.tensor([[0.2, 0.8]]))
    assert torch.allclose(filter_logits(logits, 2.0), logits / 2)


def test_sample_next_greedy_and_sampled_frequencies() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, 0.0]])
    assert sample_next(logits).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits[:1].expand(4000, 2), 1.0, generator=gen)
    assert abs(draws.float().mean().item() - 0.75) < 0.03  # p(1) = 3 / (1 + 3)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, top_p=0.0)
