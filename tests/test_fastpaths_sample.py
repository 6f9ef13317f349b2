"""Sampling fast paths give what the plain path gives: same tokens, same log-probs.

The plain path decodes with the model's general forward (`generate(..., fast=False)`); the
fast path with `DecodeStep` (fused projections and norms, MKL-packed weights, direct cache
writes). On float32 the tokens are identical and the log-probs agree to a few ulps (at most
4.8e-7 here: a concatenated weight's matmul rounds differently); the tolerance of 1e-5 allows
for BLAS builds that round more differently still.

`DecodeStep` is a second, hand-written forward: a model feature written into one path only
must fail here. `OPTION_GRID` lists every field of the model's config and of `FastPaths`
(a field missing from it fails), and every option is decoded through both paths and
compared with the model's full forward.
"""

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

from stacklab.data.tasks import ArithmeticGenerator
from stacklab.data.tokenizer import train_tokenizer
from stacklab.envs import rollout as rollout_module
from stacklab.envs.rollout import rollout
from stacklab.envs.tasks_env import TaskEnv
from stacklab.model import generation
from stacklab.model.config import FastPaths, MoEConfig, TransformerConfig
from stacklab.model.generation import DecodeStep, _Linear, filter_logits, generate
from stacklab.model.transformer import Transformer, build_model
from stacklab.recipe import ArithmeticTask, TokenizerConfig

V = 97
MOE = {"enabled": True, "num_experts": 4, "top_k": 2, "first_k_dense": 1}
CONFIGS = {
    "dense": {},
    "dense_no_qk_norm_untied": {"qk_norm": False, "tie_embeddings": False},
    "mha": {"n_kv_heads": 2},  # n_heads == n_kv_heads: no grouped-query attention
    "moe_softmax": {"moe": MOE},
    "moe_sigmoid_shared": {
        "moe": MOE | {"router": "sigmoid", "balance": "aux_free", "num_shared_experts": 1}
    },
}


def make_model(name: str) -> Transformer:
    torch.manual_seed(0)
    extra = dict(CONFIGS[name])
    moe = MoEConfig(**extra.pop("moe", {}))
    cfg = TransformerConfig(depth=2, aspect=32, head_dim=16, max_seq_len=64, moe=moe, **extra)
    return build_model(cfg, V)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(8, V, (n,), generator=gen).tolist() for n in (3, 9, 1, 5, 6)]


def both(model: Transformer, prompts: list[list[int]], **kwargs: object):
    """The plain path's and the fast path's generations, from equally seeded generators."""
    out = []
    for fast in (False, True):
        gen = torch.Generator().manual_seed(7)
        out.append(generate(model, prompts, 12, generator=gen, fast=fast, **kwargs))
    return out


def assert_same(plain, fast) -> None:
    for p, f in zip(plain, fast, strict=True):
        assert f.tokens == p.tokens
        assert f.stop_token == p.stop_token
        if p.logprobs is None:
            assert f.logprobs is None
        else:
            assert f.logprobs == pytest.approx(p.logprobs, abs=1e-5, rel=0)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_fast_decoding_matches_the_plain_path(name: str, temperature: float, prompts) -> None:
    model = make_model(name)
    assert DecodeStep.supports(model)  # a layout change must not silently drop the fast path
    plain, fast = both(model, prompts, temperature=temperature, stop_ids=(), return_logprobs=True)
    assert_same(plain, fast)
    assert all(len(g.tokens) == 12 for g in fast)


def test_fast_decoding_matches_with_stops_filters_and_padding(prompts) -> None:
    model = make_model("dense")
    stops = (5, 11, 40, 60, 90)  # common enough that some rows stop early
    kwargs = {"temperature": 1.0, "top_k": 20, "top_p": 0.9, "stop_ids": stops, "pad_id": 3}
    plain, fast = both(model, prompts, return_logprobs=True, **kwargs)
    assert_same(plain, fast)
    assert any(g.stopped for g in fast)


def test_decode_step_logits_equal_the_general_forward(prompts) -> None:
    """One step from the same cache: logits and the cache's new keys/values agree."""
    model = make_model("dense").eval()
    ids = torch.tensor([prompts[3], prompts[4][:5]])  # two rows of 5 tokens
    token = torch.tensor([17, 23])
    results = []
    with torch.inference_mode():
        for fast in (False, True):
            cache = model.new_cache(2, max_len=16)
            model(ids, cache=cache)
            position = torch.full((2, 1), ids.shape[1])
            key_mask = torch.ones(2, 16, dtype=torch.bool)
            if fast:
                logits = DecodeStep(model, 2)(token, position, cache, key_mask)
            else:
                seen = key_mask[:, : cache.length + 1]
                out = model(token[:, None], cache=cache, positions=position, key_mask=seen)
                logits = out.logits[:, -1]
            results.append((logits, cache))
    (a, ca), (b, cb) = results
    assert ca.length == cb.length == ids.shape[1] + 1
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    torch.testing.assert_close(cb.k, ca.k, atol=1e-6, rtol=0)
    torch.testing.assert_close(cb.v, ca.v, atol=1e-6, rtol=0)


def test_unknown_layouts_take_the_general_forward(prompts, monkeypatch) -> None:
    """A subclass may compute something else: it is not fast-pathed, and still correct."""

    class Custom(Transformer):
        pass

    model = make_model("dense")
    expected = generate(model, prompts, 6, stop_ids=(), fast=False)
    model.__class__ = Custom
    assert not DecodeStep.supports(model)

    def refuse(*args: object) -> None:
        raise AssertionError("DecodeStep used on a layout it does not know")

    monkeypatch.setattr(DecodeStep, "__init__", refuse)
    got = generate(model, prompts, 6, stop_ids=())
    assert [g.tokens for g in got] == [g.tokens for g in expected]


def test_packed_linear_equals_linear() -> None:
    if not generation._MKL_PACKED:
        pytest.skip("this torch build has no MKL packed sgemm")
    torch.manual_seed(0)
    w, x = torch.randn(48, 32), torch.randn(5, 32)
    packed = _Linear(w, batch=5)
    torch.testing.assert_close(packed(x), F.linear(x, w), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed(x[:3]), F.linear(x[:3], w))  # another batch: plain


def test_temperature_divides_and_one_skips_the_division() -> None:
    """Any temperature but 1 divides the logits; at 1 the pass over [B, V] is skipped, which
    changes nothing (x / 1.0 is x exactly): the float32 input comes back as it is."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for temperature in (0.5, 0.7, 1.5):
        scaled = filter_logits(logits, temperature)
        assert torch.equal(scaled, logits / temperature)
        assert not torch.equal(scaled, logits)
    same = filter_logits(logits, 1.0)
    assert torch.equal(same, logits)
    assert same.data_ptr() == logits.data_ptr()  # no new tensor: no division was done


def test_rollouts_are_the_same_on_both_paths(monkeypatch) -> None:
    """Whole episodes (tokens, masks, log-probs, rewards) under deterministic algorithms."""
    task = ArithmeticTask(ops=["+"], min_digits=1, max_digits=1, eval_fraction=0.2)
    gen = ArithmeticGenerator(task)
    texts = [gen.render(p) for p in gen.problems("train", 60, 0)] * 3
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=2))
    torch.manual_seed(0)
    model = build_model(TransformerConfig(depth=2, aspect=16, head_dim=16, max_seq_len=128), 300)
    problems = gen.problems("train", 3, 1)
    episodes = []
    for fast in (False, True):
        monkeypatch.setattr(rollout_module, "generate", functools.partial(generate, fast=fast))
        envs = [TaskEnv(gen, "train") for _ in range(6)]
        with torch.inference_mode(False):
            torch.use_deterministic_algorithms(True)
            try:
                episodes.append(
                    rollout(
                        model,
                        tok,
                        envs,
                        [p for p in problems for _ in range(2)],
                        max_turns=1,
                        max_new_tokens=10,
                        token_budget=100,
                        generator=torch.Generator().manual_seed(3),
                    )
                )
            finally:
                torch.use_deterministic_algorithms(False)
    for a, b in zip(*episodes, strict=True):
        assert (b.ids, b.mask, b.reward) == (a.ids, a.mask, a.reward)
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5, rel=0)


def test_a_forward_hook_disables_the_fast_path(prompts) -> None:
    """Hooks see the general forward's outputs, so a hooked model decodes with it."""
    model = make_model("dense")
    bias = torch.zeros(V)
    bias[42] = 100.0  # every step then picks token 42: only if the hook runs each step
    handle = model.register_forward_hook(
        lambda mod, inp, out: setattr(out, "logits", out.logits + bias)
    )
    try:
        assert not DecodeStep.supports(model)
        out = generate(model, prompts, 5, stop_ids=())
    finally:
        handle.remove()
    assert all(g.tokens == [42] * 5 for g in out)
    assert DecodeStep.supports(model)


@pytest.mark.parametrize("name", ["dense", "moe_sigmoid_shared"])
def test_bfloat16_decoding_stays_close_to_the_plain_path(name: str, prompts) -> None:
    """Outside float32 the norms are the modules' own; fused matmuls may round differently."""
    model = make_model(name).to(torch.bfloat16)
    plain, fast = both(model, prompts, temperature=0.0, stop_ids=(), return_logprobs=True)
    for p, f in zip(plain, fast, strict=True):
        assert f.tokens[:4] == p.tokens[:4]
        assert f.logprobs[:4] == pytest.approx(p.logprobs[:4], abs=0.05)


# --------------------------------------------------------------------------- every option


# Every field of TransformerConfig (dotted: `moe.` for its MoEConfig) and of FastPaths
# (`fast.`), with the values decoded besides the defaults. Fields that cannot change a
# decoding step (init_std, the balance losses' coefficients, the loss's chunk) are listed
# too: the list is checked against the dataclasses, so a new field fails until it is here.
OPTION_GRID: dict[str, list[object]] = {
    "depth": [1, 3],
    "aspect": [24],
    "head_dim": [16],
    "d_model": [48],
    "n_heads": [2],
    "n_kv_heads": [4],  # as many as the query heads: no grouped-query attention
    "ffn_hidden": [40],
    "max_seq_len": [24],
    "rope_theta": [50.0],
    "qk_norm": [False],
    "tie_embeddings": [False],
    "norm_eps": [0.5],
    "init_std": [0.1],
    "moe.enabled": [True],
    "moe.num_experts": [3, 6],
    "moe.top_k": [1, 3],
    "moe.expert_hidden": [24],
    "moe.router": ["sigmoid"],
    "moe.norm_topk": [False],
    "moe.routed_scaling": [2.5],
    "moe.num_shared_experts": [1, 2],
    "moe.first_k_dense": [1],
    "moe.balance": ["aux_free"],
    "moe.aux_loss_coef": [0.5],
    "moe.z_loss_coef": [0.5],
    "moe.bias_update_rate": [0.1],
    "fast.fused": [False],
    "fast.grouped_mm": [False],
    "fast.logits_chunk_elements": [7],
}
OPTION_BASE = TransformerConfig(depth=2, aspect=16, head_dim=8, max_seq_len=32)
OPTION_BASE_MOE = dataclasses.replace(OPTION_BASE, moe=MoEConfig(enabled=True, num_experts=4))


def _dotted_fields(value: object, prefix: str = "") -> list[str]:
    """The dotted names of a dataclass instance's fields, nested dataclasses expanded."""
    names = []
    for f in dataclasses.fields(value):
        inner = getattr(value, f.name)
        if dataclasses.is_dataclass(inner):
            names += _dotted_fields(inner, f"{prefix}{f.name}.")
        else:
            names.append(prefix + f.name)
    return names


def _replaced(value, path: list[str], new: object):
    head, *rest = path
    inner = _replaced(getattr(value, head), rest, new) if rest else new
    return dataclasses.replace(value, **{head: inner})


def _option(name: str, value: object) -> tuple[TransformerConfig, FastPaths]:
    """The base model (MoE for `moe.*` options) with one option changed."""
    moe_option = name.startswith("moe.") and name != "moe.enabled"
    cfg = OPTION_BASE_MOE if moe_option else OPTION_BASE
    if name.startswith("fast."):
        return cfg, _replaced(FastPaths(), name.split(".")[1:], value)
    return _replaced(cfg, name.split("."), value), FastPaths()


OPTION_CASES = [("defaults", OPTION_BASE, FastPaths()), ("moe", OPTION_BASE_MOE, FastPaths())]
OPTION_CASES += [
    (f"{name}={value}", *_option(name, value))
    for name, values in OPTION_GRID.items()
    for value in values
]


def test_the_option_grid_covers_every_field() -> None:
    fields = _dotted_fields(TransformerConfig()) + [
        "fast." + n for n in _dotted_fields(FastPaths())
    ]
    missing = sorted(set(fields) - set(OPTION_GRID))
    assert not missing, f"add these model options to OPTION_GRID: {missing}"
    assert sorted(OPTION_GRID) == sorted(fields)  # and no stale entries


def _random_model(cfg: TransformerConfig, fast: FastPaths) -> Transformer:
    """A model whose norm scales and MoE selection biases are not their neutral init, so an
    option a path ignores changes its logits."""
    torch.manual_seed(0)
    model = build_model(cfg, V, fast).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # RMSNorm scales
                param.copy_(1 + 0.5 * torch.randn_like(param))
        for moe in model.moe_layers():
            moe.expert_bias.normal_(0, 0.1)
    return model


def _decoded(model: Transformer, prompts: list[list[int]], feed: torch.Tensor, fast: bool):
    """Logits [B, 1 + steps, V] of teacher-forced decoding as `generate` runs it: one
    left-padded prefill, then `feed` one token per row per step, through `DecodeStep` or
    the general forward."""
    batch, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + feed.shape[1]
    ids = torch.zeros(batch, longest, dtype=torch.long)
    key_mask = torch.ones(batch, total, dtype=torch.bool)
    for i, prompt in enumerate(prompts):
        ids[i, longest - len(prompt) :] = torch.tensor(prompt)
        key_mask[i, : longest - len(prompt)] = False
    positions = (key_mask[:, :longest].cumsum(-1) - 1).clamp(min=0)
    step = DecodeStep(model, batch) if fast else None
    cache = model.new_cache(batch, total)
    prefill = model(
        ids, cache=cache, positions=positions, key_mask=key_mask[:, :longest], logits="last"
    )
    logits, position = [prefill.logits[:, -1]], positions[:, -1:]
    for t in range(feed.shape[1]):
        token, position = feed[:, t], position + 1
        if step is not None:
            logits.append(step(token, position, cache, key_mask))
        else:
            seen = key_mask[:, : cache.length + 1]
            out = model(token[:, None], cache=cache, positions=position, key_mask=seen)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize(
    ("cfg", "fast"), [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES]
)
def test_every_option_decodes_the_same_on_both_paths(
    cfg: TransformerConfig, fast: FastPaths
) -> None:
    """DecodeStep, the general forward's cached decoding, and each row's full forward alone
    give the same logits for every model option."""
    model = _random_model(cfg, fast)
    assert DecodeStep.supports(model)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, V, (n,), generator=gen).tolist() for n in (4, 7)]
    feed = torch.randint(2, V, (2, 4), generator=gen)
    with torch.inference_mode():
        plain = _decoded(model, prompts, feed, fast=False)
        fused = _decoded(model, prompts, feed, fast=True)
        for i, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt + feed[i].tolist()])).logits[0, len(prompt) - 1 :]
            torch.testing.assert_close(plain[i], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
