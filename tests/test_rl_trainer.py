"""The RL stage: batches from rollouts, dynamic sampling, the update, and bit-exact resume."""

import json
from pathlib import Path

import pytest
import torch

from stacklab.data.tasks import ArithmeticGenerator
from stacklab.data.tokenizer import IM_END, train_tokenizer
from stacklab.envs import rollout as rollout_module
from stacklab.envs.rollout import Episode
from stacklab.model.generation import Generation
from stacklab.model.transformer import build_model
from stacklab.recipe import ArithmeticTask, ModelConfig, Recipe, RLConfig, TokenizerConfig
from stacklab.rl import trainer
from stacklab.rl.advantages import group_advantages
from stacklab.rl.trainer import (
    RL_STAGE,
    RolloutBatch,
    bucketed_logprobs,
    collect,
    length_buckets,
    loss_kwargs,
    pad_episodes,
    share,
    task_sources,
    token_logprobs,
    train_rl,
    update,
)
from stacklab.train.checkpoint import load_model, write_model
from stacklab.train.trainer import OptimizerStep

TASK = ArithmeticTask(ops=["+"], min_digits=1, max_digits=1, eval_fraction=0.2)


@pytest.fixture(scope="module")
def tok():
    gen = ArithmeticGenerator(TASK)
    texts = [gen.render(p) for p in gen.problems("train", 60, 0)] * 3
    texts += ["user assistant system hello"] * 10
    return train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=2))


def recipe(**rl: object) -> Recipe:
    r = Recipe(seed=5)
    r.data.tasks = [TASK]
    settings = {
        "enabled": True,
        "steps": 3,
        "prompts_per_step": 2,
        "group_size": 2,
        "max_turns": 1,
        "max_new_tokens": 4,
        "token_budget": 40,
        "minibatch_size": 2,
        "lr": 1e-3,
        "ckpt_every": 2,
    }
    r.rl = RLConfig(**{**settings, **rl})
    return r


def tiny_model(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(depth=1, aspect=16, head_dim=16, max_seq_len=64).build(), vocab)


def fake_generate(tok, answer):
    """`generate` that replies `answer(problem prompt text)` to each prompt, log-prob -0.5."""
    im_end = tok.token_to_id(IM_END)

    def generate(model, prompts, max_new_tokens, **kwargs):
        outs = []
        for prompt in prompts:
            text = tok.decode(prompt, skip_special_tokens=False)
            question = text.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
            tokens = tok.encode(answer(question)).ids[: max_new_tokens - 1]
            outs.append(Generation(tokens, im_end, [-0.5] * (len(tokens) + 1)))
        return outs

    return generate


def sgd(model, lr: float, cfg: RLConfig) -> OptimizerStep:
    """Plain SGD at a constant rate, clipped as the trainer clips RL's updates."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return OptimizerStep(model, optimizer, scheduler, cfg.grad_clip)


def right(question: str) -> str:
    a, b = question.rstrip("=").split("+")
    return str(int(a) + int(b))


# --------------------------------------------------------------------------- small pieces


def test_share_splits_evenly_larger_first() -> None:
    assert share(7, [1, 1, 1]) == [3, 2, 2]
    assert share(2, [1, 1, 1]) == [1, 1, 0]
    assert share(16, [1.0] * 5) == [4, 3, 3, 3, 3]


def test_share_follows_the_weights_by_largest_remainder() -> None:
    assert share(32, [3, 1]) == [24, 8]
    assert share(10, [2, 1]) == [7, 3]  # quotas 6.67, 3.33
    assert share(5, [1, 1, 2]) == [1, 1, 3]  # quotas 1.25, 1.25, 2.5
    assert share(3, [0.1, 10]) == [0, 3]


def test_env_weights_reach_the_sources_and_are_checked() -> None:
    r = recipe(envs=["tasks", "calculator"], env_weights={"tasks": 3})
    assert [(s.name, s.weight) for s in task_sources(r, pool=4)] == [
        ("arithmetic", 3),
        ("calculator", 1),
    ]
    with pytest.raises(ValueError, match="env_weights names 'lookup'"):
        RLConfig(envs=["tasks"], env_weights={"lookup": 1.0})
    with pytest.raises(ValueError, match="must be > 0"):
        RLConfig(envs=["tasks"], env_weights={"tasks": 0.0})


def test_loss_kwargs_follow_the_loss_and_recipe() -> None:
    assert loss_kwargs(RLConfig(loss="grpo")) == {}
    assert loss_kwargs(RLConfig(loss="grpo", eps_low=0.1)) == {"eps": 0.1}
    assert loss_kwargs(RLConfig(loss="dr_grpo", max_new_tokens=10, max_turns=3)) == {"max_len": 30}
    assert loss_kwargs(RLConfig(loss="dapo", eps_low=0.2, eps_high=0.3)) == {
        "eps_low": 0.2,
        "eps_high": 0.3,
    }
    assert loss_kwargs(RLConfig(loss="gspo")) == {}
    assert loss_kwargs(RLConfig(loss="cispo")) == {"eps_high": trainer.CISPO_EPS_HIGH}


def test_pad_episodes_shifts_and_masks_exactly() -> None:
    a = Episode([], [1, 2, 3, 4], [False, False, True, True], [-0.1, -0.2])
    b = Episode([], [5, 6, 7], [False, True, False], [-0.3])
    inputs, targets, mask, logp = pad_episodes([a, b])
    assert inputs.tolist() == [[1, 2, 3], [5, 6, 7]]
    assert targets.tolist() == [[2, 3, 4], [6, 7, 1]]  # 1 = <|pad|>
    assert mask.tolist() == [[False, True, True], [True, False, False]]
    assert torch.allclose(logp, torch.tensor([[0.0, -0.1, -0.2], [-0.3, 0.0, 0.0]]))


def test_token_logprobs_gather_the_targets(tok) -> None:
    model = tiny_model(tok.get_vocab_size())
    inputs = torch.tensor([[3, 4, 5, 6]])
    targets = torch.tensor([[4, 5, 6, 7]])
    logp, entropy, _ = token_logprobs(model, inputs, targets, temperature=2.0)
    full = torch.log_softmax(model(inputs).logits / 2.0, dim=-1)
    assert torch.allclose(logp, full[0, torch.arange(4), targets[0]][None], atol=1e-6)
    assert torch.allclose(entropy, -(full.exp() * full).sum(-1), atol=1e-5)
    # Scoring only masked positions gives the same numbers there and zeros elsewhere.
    mask = torch.tensor([[False, True, False, True]])
    part, part_entropy, _ = token_logprobs(model, inputs, targets, 2.0, mask)
    assert torch.allclose(part, torch.where(mask, logp, 0.0), atol=1e-6)
    assert torch.allclose(part_entropy, torch.where(mask, entropy, 0.0), atol=1e-5)


def test_length_buckets_group_rows_by_rounded_length() -> None:
    lengths = torch.tensor([5, 64, 65, 0, 130, 3, 128])
    buckets = [b.tolist() for b in length_buckets(lengths, granularity=64)]
    assert buckets == [[0, 1, 5], [2, 6], [4]]  # row 3 has no sampled token


@pytest.mark.parametrize("moe", [False, True])
def test_bucketed_logprobs_equal_one_padded_forward(moe: bool) -> None:
    """Scoring groups of similar length at their own width changes no log-prob, entropy or
    gradient of the padded batch (a row's tokens never attend to another row's)."""
    torch.manual_seed(0)
    moe_cfg = {"enabled": True, "num_experts": 4, "top_k": 2} if moe else {}
    cfg = ModelConfig(depth=2, aspect=16, head_dim=16, max_seq_len=160, moe=moe_cfg).build()
    model = build_model(cfg, 60)
    lengths = [7, 150, 30, 0, 90, 64, 65]  # spans four buckets of 64, one row unscored
    inputs = torch.randint(0, 60, (len(lengths), 150))
    targets = torch.randint(0, 60, (len(lengths), 150))
    mask = torch.zeros(len(lengths), 150, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, max(0, n - 5) : n] = True  # the sampled tokens end each episode
        inputs[i, n:], targets[i, n:] = 0, 0  # padding
    weights = torch.randn(mask.shape)
    results = []
    for score in (token_logprobs, bucketed_logprobs):
        model.zero_grad()
        logp, entropy, _ = score(model, inputs, targets, 0.7, mask)
        (logp * weights).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((logp.detach(), entropy, grads))
    (want_lp, want_ent, want_g), (lp, ent, g) = results
    torch.testing.assert_close(lp, want_lp)
    torch.testing.assert_close(ent, want_ent)
    assert len(g) == len(want_g)
    for a, b in zip(g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_recipe_rejects_a_turn_longer_than_the_budget() -> None:
    with pytest.raises(ValueError, match="token_budget"):
        RLConfig(max_new_tokens=64, token_budget=64)


# --------------------------------------------------------------------------- collecting


def test_collect_groups_rewards_and_advantages(tok, monkeypatch) -> None:
    """Odd group members answer wrong: every group is informative, advantages are ±."""
    calls = {"n": 0}
    base = fake_generate(tok, right)

    def alternating(model, prompts, max_new_tokens, **kwargs):
        outs = base(model, prompts, max_new_tokens, **kwargs)
        for i, out in enumerate(outs):
            if i % 2:
                out.tokens = tok.encode("x").ids
                out.logprobs = [-0.5] * (len(out.tokens) + 1)
        calls["n"] += 1
        return outs

    monkeypatch.setattr(rollout_module, "generate", alternating)
    r = recipe(prompts_per_step=3, group_size=2)
    model = tiny_model(tok.get_vocab_size())
    batch, by_env = collect(model, tok, task_sources(r), r.rl, r.seed, step=1)
    assert calls["n"] == 1 and len(batch.episodes) == 6 and batch.env_names == ["arithmetic"] * 6
    assert batch.rewards.tolist() == [1.0, 0.0] * 3
    expected = group_advantages(torch.tensor([[1.0, 0.0]] * 3), "group_std").flatten()
    assert torch.allclose(batch.advantages, expected)
    assert (batch.groups_sampled, batch.groups_dropped, batch.groups_uninformative) == (3, 0, 0)
    assert len(by_env["arithmetic"]) == 6
    # Same step, same tasks; another step, other tasks.
    again, _ = collect(model, tok, task_sources(r), r.rl, r.seed, step=1)
    later, _ = collect(model, tok, task_sources(r), r.rl, r.seed, step=2)
    assert [e.messages[0] for e in again.episodes] == [e.messages[0] for e in batch.episodes]
    assert [e.messages[0] for e in later.episodes] != [e.messages[0] for e in batch.episodes]


def test_dynamic_sampling_drops_equal_groups_and_refills(tok, monkeypatch) -> None:
    """All answers right: every group has equal rewards; without dynamic sampling they are
    kept (zero advantages), with it each round's groups are dropped until the rounds run out."""
    monkeypatch.setattr(rollout_module, "generate", fake_generate(tok, right))
    model = tiny_model(tok.get_vocab_size())
    plain = recipe(prompts_per_step=2)
    batch, _ = collect(model, tok, task_sources(plain), plain.rl, plain.seed, step=1)
    assert len(batch.episodes) == 4 and batch.advantages.abs().max() == 0
    assert (batch.groups_sampled, batch.groups_dropped, batch.groups_uninformative) == (2, 0, 2)

    dyn = recipe(prompts_per_step=2, dynamic_sampling=True, max_sampling_rounds=3)
    batch, by_env = collect(model, tok, task_sources(dyn), dyn.rl, dyn.seed, step=1)
    assert batch.episodes == [] and batch.advantages.numel() == 0
    assert (batch.groups_sampled, batch.groups_dropped) == (6, 6)  # 3 rounds of 2 groups
    assert len(by_env["arithmetic"]) == 12


def test_dynamic_sampling_keeps_informative_groups_only(tok, monkeypatch) -> None:
    """Right only on even problems' first answer: groups of even problems are informative."""
    base = fake_generate(tok, right)

    def mixed(model, prompts, max_new_tokens, **kwargs):
        outs = base(model, prompts, max_new_tokens, **kwargs)
        for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
            question = tok.decode(prompt, skip_special_tokens=False).split("user\n")[-1]
            first = int(question.split("+")[0])
            if i % 2 or first % 2:
                out.tokens = tok.encode("x").ids
        return outs

    monkeypatch.setattr(rollout_module, "generate", mixed)
    dyn = recipe(prompts_per_step=2, dynamic_sampling=True, max_sampling_rounds=6)
    model = tiny_model(tok.get_vocab_size())
    batch, _ = collect(model, tok, task_sources(dyn), dyn.rl, dyn.seed, step=1)
    assert len(batch.episodes) == 4
    assert batch.rewards.view(2, 2).tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert batch.groups_dropped == batch.groups_sampled - 2


# --------------------------------------------------------------------------- the update


def test_update_raises_the_logprob_of_rewarded_answers(tok, monkeypatch) -> None:
    monkeypatch.setattr(rollout_module, "generate", fake_generate(tok, right))
    r = recipe(prompts_per_step=1, group_size=2, minibatch_size=2, lr=1e-2)
    model = tiny_model(tok.get_vocab_size())
    batch, _ = collect(model, tok, task_sources(r), r.rl, r.seed, step=1)
    batch = RolloutBatch(
        batch.episodes, batch.env_names, torch.tensor([1.0, -1.0]), batch.rewards, 1, 0, 0
    )
    inputs, targets, mask, _ = pad_episodes(batch.episodes)
    before = token_logprobs(model, inputs, targets, 1.0)[0].detach()
    optimizer_step = sgd(model, lr=0.5, cfg=r.rl)
    stats = update(model, None, optimizer_step, batch, r.rl, r.seed, step=1)
    after = token_logprobs(model, inputs, targets, 1.0)[0].detach()
    # Both episodes hold the same tokens, so the ±1 advantages cancel: nothing to learn...
    assert stats["clip_frac"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)
    assert torch.allclose(before, after, atol=1e-6)
    # ...while a lone positive advantage raises the sampled tokens' log-probs.
    batch = RolloutBatch(
        batch.episodes[:1], ["arithmetic"], torch.tensor([1.0]), batch.rewards[:1], 1, 0, 0
    )
    update(model, None, optimizer_step, batch, r.rl, r.seed, step=2)
    later = token_logprobs(model, inputs, targets, 1.0)[0].detach()
    assert ((later - after)[0][mask[0]] > 0).all()
    assert stats["entropy"] > 0 and "logprob_drift" in stats and "kl_old" in stats


def test_kl_to_the_reference_is_logged_and_zero_at_the_start(tok, monkeypatch) -> None:
    monkeypatch.setattr(rollout_module, "generate", fake_generate(tok, right))
    r = recipe(prompts_per_step=1, group_size=2, kl_coef=0.1)
    model = tiny_model(tok.get_vocab_size())
    ref = tiny_model(tok.get_vocab_size()).requires_grad_(False)
    batch, _ = collect(model, tok, task_sources(r), r.rl, r.seed, step=1)
    stats = update(model, ref, sgd(model, lr=0.0, cfg=r.rl), batch, r.rl, r.seed, step=1)
    assert stats["kl_ref"] == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- the loop


@pytest.mark.slow
def test_train_rl_writes_a_model_and_resumes_bit_exactly(tmp_path: Path, tok) -> None:
    """Real sampling from a tiny model: 3 steps straight vs 2 steps, then resumed to 3."""
    base = tmp_path / "base"
    model = tiny_model(tok.get_vocab_size())
    write_model(base, model.cfg, model.vocab_size, model.state_dict())
    r = recipe(steps=3, ckpt_every=2)
    straight = train_rl(r, tok, base, tmp_path / "a")
    short = recipe(steps=2, ckpt_every=2)
    train_rl(short, tok, base, tmp_path / "b")
    resumed = train_rl(r, tok, base, tmp_path / "b")
    a, b = load_model(tmp_path / "a" / "final"), load_model(tmp_path / "b" / "final")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name

    def rows(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [
            {k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
            for line in lines
        ]

    assert rows("a") == rows("b") and len(rows("a")) == 3
    assert {k: v for k, v in straight.items() if "seconds" not in k} == {
        k: v for k, v in resumed.items() if "seconds" not in k
    }
    assert {"rl/final_reward", "rl/final_acc/arithmetic", "rl/dropped_frac"} <= set(straight)
    record = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("reward", "acc/arithmetic", "resp_len", "entropy", "clip_frac", "kl_old"):
        assert key in record


def test_stage_config_ignores_settings_while_disabled() -> None:
    off = Recipe()
    other = Recipe()
    other.rl.lr = 1.0
    assert RL_STAGE.config(off) == RL_STAGE.config(other) == {"enabled": False}
    on = recipe()
    changed = recipe(loss="dapo")
    assert RL_STAGE.config(on) != RL_STAGE.config(changed)
