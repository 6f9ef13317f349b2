"""Learning-rate schedules: exact factors, shapes, per-group peaks, scheduler resume."""

import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from stacklab.recipe import MuonConfig, OptimConfig
from stacklab.train.optim import build_optimizer
from stacklab.train.schedule import build_scheduler, lr_factor

EXACT = {"rel": 1e-12, "abs": 1e-15}


def cfg(**kw) -> OptimConfig:
    return OptimConfig(**{"warmup_steps": 4, "min_lr_frac": 0.1, **kw})


def factors(total: int, c: OptimConfig, extra: int = 0) -> list[float]:
    return [lr_factor(s, total, c) for s in range(total + extra)]


def rising(xs: list[float]) -> bool:
    return all(a <= b for a, b in pairwise(xs))


def falling(xs: list[float]) -> bool:
    return all(a >= b for a, b in pairwise(xs))


def test_warmup_is_linear_from_one_step_in() -> None:
    for schedule in ("cosine", "wsd", "constant"):
        c = cfg(schedule=schedule)
        assert factors(100, c)[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0], **EXACT)
    assert lr_factor(0, 100, cfg(schedule="constant", warmup_steps=0)) == 1.0


def test_cosine_values() -> None:
    c = cfg(schedule="cosine")
    f = factors(14, c, extra=3)  # decays over the 10 steps after warmup
    assert f[3] == 1.0
    assert f[4] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 10)), **EXACT)
    assert f[8] == pytest.approx(0.55, **EXACT)  # halfway: progress 5/10
    assert f[13] == pytest.approx(0.1, **EXACT)  # the last step is at the floor
    assert f[14:] == pytest.approx([0.1] * 3, **EXACT)  # and it stays there
    assert rising(f[:4]) and falling(f[3:])


def test_wsd_values() -> None:
    c = cfg(schedule="wsd", decay_frac=0.25)  # 20 steps: the last 5 decay
    f = factors(20, c, extra=2)
    assert f[3:15] == [1.0] * 12  # stable
    assert f[15:20] == pytest.approx([0.82, 0.64, 0.46, 0.28, 0.1], **EXACT)
    assert f[20:] == pytest.approx([0.1, 0.1], **EXACT)


def test_constant_values() -> None:
    assert factors(10, cfg(schedule="constant"))[3:] == [1.0] * 7


def test_decay_is_monotone_on_a_long_run() -> None:
    for schedule in ("cosine", "wsd"):
        f = factors(1000, cfg(schedule=schedule, warmup_steps=50))
        assert rising(f[:50]) and falling(f[49:])
        assert f[49] == 1.0 and f[-1] == pytest.approx(0.1, **EXACT)


def test_wsd_decay_overlapping_warmup_stays_positive_and_ends_at_the_floor() -> None:
    f = factors(5, cfg(schedule="wsd", warmup_steps=4, decay_frac=0.8))
    assert all(x > 0 for x in f) and f[-1] == pytest.approx(0.1, **EXACT)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.proj = nn.Linear(4, 4)  # weight: Muon; bias: no decay


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_scheduler_scales_each_group_peak_and_resumes(name: str) -> None:
    c = cfg(name=name, lr=1e-3, muon=MuonConfig(lr=0.02), schedule="cosine")
    total = 12
    opt = build_optimizer(Tiny(), c)
    sched = build_scheduler(opt, total, c)
    peaks = [g["initial_lr"] for g in opt.param_groups]
    assert sorted(set(peaks)) == ([1e-3, 0.02] if name == "muon" else [1e-3])

    def advance(o: torch.optim.Optimizer, s: torch.optim.lr_scheduler.LambdaLR) -> list[float]:
        o.step()
        s.step()
        return [g["lr"] for g in o.param_groups]

    for step in range(6):
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(
            [p * lr_factor(step, total, c) for p in peaks], **EXACT
        )
        advance(opt, sched)

    opt_b = build_optimizer(Tiny(), c)
    sched_b = build_scheduler(opt_b, total, c)
    opt_b.load_state_dict(opt.state_dict())
    sched_b.load_state_dict(sched.state_dict())
    assert [g["lr"] for g in opt_b.param_groups] == [g["lr"] for g in opt.param_groups]
    for _ in range(6):
        assert advance(opt_b, sched_b) == advance(opt, sched)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * p for p in peaks], **EXACT)
