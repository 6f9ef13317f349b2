"""experiments/rl_vs_sft.py reports on fake run folders: the build-per-seed table, the goal
verdicts, the report-only error for a missing folder and the coverage simulation. Nothing
is built; every test runs in well under a second or two."""

import importlib.util
import json
import math
import random
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from scipy import stats

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "rl_vs_sft.py"
STAGES = ("corpus", "tokenizer", "shards", "pretrain", "sft", "rl", "eval")


def _load_script() -> ModuleType:
    """Import the script as a module (registered, so its dataclass resolves its module)."""
    spec = importlib.util.spec_from_file_location("rl_vs_sft", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["rl_vs_sft"] = module
    spec.loader.exec_module(module)
    return module


rvs = _load_script()


def make_run(
    out: Path,
    seed: int,
    arm: str,
    metrics: dict,
    tasks: dict[str, list[bool]],
    envs: dict[str, list[float]],
    seconds: dict[str, float] | None = None,
) -> Path:
    """A run folder as `stacklab build` leaves it: metrics.json, eval/*.jsonl, build.json and
    one link per stage to a cache folder holding that stage's _COMPLETE.json (for the stages
    in `seconds`: all of them, a minute each, by default); eval/ is the eval stage's link."""
    run = out / f"seed{seed}-{arm}"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics))
    seconds = seconds if seconds is not None else dict.fromkeys(STAGES, 60.0)
    report = []
    for stage in STAGES:
        cached = out / "cache" / stage / f"{arm}-{seed}-key"
        cached.mkdir(parents=True)
        if stage in seconds:
            record = {"stage": stage, "seconds": seconds[stage]}
            (cached / "_COMPLETE.json").write_text(json.dumps(record))
        (run / stage).symlink_to(cached)
        report.append({"stage": stage, "key": "k", "cached": False, "seconds": 0.1})
    rows = [
        {"task": task, "correct": ok, "prompt": "p", "completion": "c"}
        for task, oks in tasks.items()
        for ok in oks
    ]
    (run / "eval" / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    episodes = [{"env": env, "reward": r} for env, rewards in envs.items() for r in rewards]
    (run / "eval" / "agent_episodes.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in episodes)
    )
    (run / "build.json").write_text(json.dumps({"stages": report}))
    return run


def outcomes_at(rate: float, n: int) -> list[bool]:
    """n items, the first round(rate · n) correct."""
    k = round(rate * n)
    return [True] * k + [False] * (n - k)


def make_seed(out: Path, seed: int, level: dict, seconds: dict | None = None) -> None:
    """Both arms of a seed from a compact spec: val_bpb levels and per-arm success rates."""
    n = 10
    for arm in ("sft", "rl"):
        rates = level[arm]
        metrics = {
            "task_acc/arithmetic": rates["arith"],
            "agent_success/calculator": rates["calc"],
            "agent_success/lookup": rates["lookup"],
        }
        if arm == "rl":
            metrics.update(level["bpb"])
        tasks = {"arithmetic": outcomes_at(rates["arith"], n)}
        envs = {
            "calculator": [float(x) for x in outcomes_at(rates["calc"], n)],
            "lookup": [float(x) for x in outcomes_at(rates["lookup"], n)],
        }
        make_run(out, seed, arm, metrics, tasks, envs, seconds)


GOOD = {
    "sft": {"arith": 0.4, "calc": 0.3, "lookup": 0.2},
    "rl": {"arith": 0.6, "calc": 0.5, "lookup": 0.6},
    "bpb": {"pretrain/val_bpb": 2.0, "sft/val_bpb": 2.1, "val_bpb": 2.1},
}


def level(sft: dict, rl: dict, bpb: dict) -> dict:
    """A seed spec for make_seed."""
    return {"sft": sft, "rl": rl, "bpb": bpb}


def test_levels_table_numbers(tmp_path: Path) -> None:
    """Per-seed values, ratio, minutes and Wilson intervals; the mean row's t interval is
    scipy's; a missing metric is "–" and left out of its column's mean."""
    seconds = {s: 60.0 * (i + 1) for i, s in enumerate(STAGES)}  # 1..7 minutes
    make_seed(tmp_path, 0, GOOD, seconds)
    make_seed(
        tmp_path,
        1,
        level(GOOD["sft"], {"arith": 0.8, "calc": 0.7, "lookup": 0.5}, {**GOOD["bpb"]}),
        seconds,
    )
    third = {"pretrain/val_bpb": 2.0, "val_bpb": 2.3}  # no sft/val_bpb
    make_seed(tmp_path, 2, level(GOOD["sft"], GOOD["rl"], third), seconds)

    runs = [rvs.load_seed(tmp_path, s) for s in (0, 1, 2)]
    report, md = rvs.levels(runs)
    rows = report["seeds"]
    assert [r["val_bpb_ratio"] for r in rows] == pytest.approx([1.05, 1.05, 1.15])
    assert [r["rl/task_acc/arithmetic"] for r in rows] == [0.6, 0.8, 0.6]
    assert rows[0]["sft/agent_success/lookup"] == 0.2
    assert rows[2]["sft/val_bpb"] is None
    assert rows[0]["build_minutes"] == pytest.approx(28.0)
    assert rows[0]["stage_minutes"]["group/data"] == pytest.approx(6.0)
    assert rows[0]["stage_minutes"]["rl"] == pytest.approx(6.0)
    assert rows[0]["n_items"]["rl/task_acc/arithmetic"] == 10
    lo, hi = rows[0]["wilson_ci95"]["rl/task_acc/arithmetic"]  # 6 of 10
    assert (lo, hi) == pytest.approx((0.3127, 0.8318), abs=1e-4)

    arith = [0.6, 0.8, 0.6]
    mean = report["mean"]["rl/task_acc/arithmetic"]
    expect = stats.t.interval(0.95, 2, loc=np.mean(arith), scale=stats.sem(arith))
    assert mean["mean"] == pytest.approx(np.mean(arith))
    assert mean["t_ci95"] == pytest.approx(list(expect))
    assert report["mean"]["sft/val_bpb"]["n_seeds"] == 2
    assert report["mean"]["sft/val_bpb"]["mean"] == pytest.approx(2.1)
    assert report["stage_group_minutes_mean"]["pretrain"] == pytest.approx(4.0)
    assert report["stage_group_minutes_mean"]["total"] == pytest.approx(28.0)

    lines = md.splitlines()
    assert "| 2 | 2.000 | – | 2.300 | 1.150 |" in md
    half = (expect[1] - expect[0]) / 2
    mean_row = next(line for line in lines if line.startswith("| **mean** |"))
    assert f"{np.mean(arith):.3f} ± {half:.3f}" in mean_row
    assert "| minutes | 6.0 | 4.0 | 5.0 | 6.0 | 7.0 | 28.0 |" in lines


def test_missing_stage_record_leaves_minutes_out(tmp_path: Path) -> None:
    """A stage without _COMPLETE.json has no minutes, and the total is then unknown."""
    make_seed(tmp_path, 0, GOOD)
    (tmp_path / "seed0-rl" / "sft" / "_COMPLETE.json").unlink()
    row = rvs.level_row(rvs.load_seed(tmp_path, 0))
    assert row["stage_minutes"]["sft"] is None
    assert row["build_minutes"] is None
    assert row["stage_minutes"]["group/pretrain"] == pytest.approx(1.0)


def test_wilson_matches_the_textbook_value() -> None:
    """8 of 10: the Wilson 95% interval is [0.490, 0.943]; 0 of 10 starts at 0."""
    assert rvs.wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert rvs.wilson(0, 10)[0] == 0.0


def _rows(values: dict[str, list[float | None]]) -> list[dict]:
    """Levels rows from per-key lists over seeds 0, 1, ..."""
    n = len(next(iter(values.values())))
    return [{"seed": i, **{k: v[i] for k, v in values.items()}} for i in range(n)]


def test_goal_lookup() -> None:
    good = rvs.goal_lookup(_rows({"rl/agent_success/lookup": [0.6, 0.5, 0.7]}))
    assert good["pass"] is True
    assert good["mean"] == pytest.approx(0.6)
    assert good["t_ci95"][0] < 0.6 < good["t_ci95"][1]
    assert not good["interval_clears"] and "reaches below" in good["detail"]
    tight = rvs.goal_lookup(_rows({"rl/agent_success/lookup": [0.61, 0.6, 0.62]}))
    assert tight["pass"] and tight["interval_clears"] and "interval above" in tight["detail"]
    bad = rvs.goal_lookup(_rows({"rl/agent_success/lookup": [0.4, 0.5, None]}))
    assert bad["pass"] is False and bad["n_seeds"] == 2
    assert rvs.goal_lookup(_rows({"rl/agent_success/lookup": [None]}))["pass"] is None


def test_goal_arithmetic_lists_the_seeds_that_miss() -> None:
    good = rvs.goal_arithmetic(_rows({"rl/task_acc/arithmetic": [0.5, 0.9]}))
    assert good["pass"] is True and good["misses"] == []
    bad = rvs.goal_arithmetic(_rows({"rl/task_acc/arithmetic": [0.7, 0.49, 0.2]}))
    assert bad["pass"] is False
    assert bad["misses"] == [1, 2]
    assert "seed 1: 0.490" in bad["detail"] and "seed 2: 0.200" in bad["detail"]
    missing = rvs.goal_arithmetic(_rows({"rl/task_acc/arithmetic": [0.7, None]}))
    assert missing["pass"] is False and missing["missing"] == [1]


def test_goal_agent_effects_verdicts() -> None:
    def entry(mean: float, lo: float, hi: float) -> dict:
        return {"seeds": [], "mean_diff": mean, "t_ci95": [lo, hi], "bootstrap_ci95": [lo, hi]}

    results = {
        "task_acc/arithmetic": entry(0.5, 0.4, 0.6),
        "agent_success/calculator": entry(0.2, 0.05, 0.35),
        "agent_success/lookup": entry(0.1, -0.1, 0.3),
        "agent_success/search": entry(-0.1, -0.3, 0.1),
    }
    found = {g["goal"]: g for g in rvs.goal_agent_effects(results)}
    assert set(found) == {
        "RL over SFT positive on agent_success/calculator",
        "RL over SFT positive on agent_success/lookup",
        "RL over SFT positive on agent_success/search",
    }
    calc = found["RL over SFT positive on agent_success/calculator"]
    assert calc["pass"] is True and calc["verdict"] == "positive, interval excludes 0"
    lookup = found["RL over SFT positive on agent_success/lookup"]
    assert lookup["pass"] is False
    assert lookup["verdict"] == "positive mean, interval includes 0"
    search = found["RL over SFT positive on agent_success/search"]
    assert search["pass"] is False and search["verdict"] == "not positive"


def test_goal_bpb_ratio() -> None:
    good = rvs.goal_bpb(_rows({"val_bpb_ratio": [1.0, 1.1]}))
    assert good["pass"] is True and good["mean_ratio"] == pytest.approx(1.05)
    bad = rvs.goal_bpb(_rows({"val_bpb_ratio": [1.05, 1.2]}))
    assert bad["pass"] is False and bad["misses"] == [1]
    assert "mean ratio 1.125" in bad["detail"]


def test_report_only_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--report-only reads the run folders and writes both tables and the goals; the
    difference table comes first, as before."""
    for seed in (0, 1, 2):
        make_seed(tmp_path, seed, GOOD)
    assert rvs.main(["--report-only", "--out", str(tmp_path), "--seeds", "0", "1", "2"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {
        "task_acc/arithmetic",
        "agent_success/calculator",
        "agent_success/lookup",
        "levels",
        "goals",
    }
    assert results["task_acc/arithmetic"]["mean_diff"] == pytest.approx(0.2)
    # Every seed identical: both intervals collapse onto the difference.
    assert results["task_acc/arithmetic"]["t_ci95"] == pytest.approx([0.2, 0.2])
    assert [g["pass"] for g in results["goals"]] == [True, True, True, True, True]
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("| objective | seed | SFT | SFT+RL | Δ | n items |")
    assert md.index("**The build per seed**") < md.index("**Goals**")
    assert "- [pass] arithmetic after RL ≥ 0.5 on every seed" in md
    assert capsys.readouterr().out.strip() == md.strip()


def test_report_only_missing_run_dir_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make_seed(tmp_path, 0, GOOD)
    assert rvs.main(["--report-only", "--out", str(tmp_path), "--seeds", "0", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert str(tmp_path / "seed1-sft") in err
    assert not (tmp_path / "results.json").exists()


def _old_bootstrap(pairs: list, draws: int) -> tuple[float, float]:
    """The item-by-item bootstrap the script used before it was vectorized."""
    rng = random.Random(0)
    means = []
    for _ in range(draws):
        total = count = 0.0
        for seed_pairs in (rng.choice(pairs) for _ in pairs):
            for _ in seed_pairs:
                a, b = seed_pairs[rng.randrange(len(seed_pairs))]
                total += b - a
                count += 1
        means.append(total / count)
    means.sort()
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def test_vectorized_bootstrap_matches_item_by_item() -> None:
    """The multinomial draw gives the same percentiles as resampling items one by one, up to
    Monte Carlo noise; an experiment without variation gives a one-point interval."""
    rng = random.Random(1)
    pairs = [
        [(float(rng.random() < 0.3), float(rng.random() < p)) for _ in range(40)]
        for p in (0.4, 0.6, 0.5)
    ]
    old = _old_bootstrap(pairs, 4000)
    new = rvs.bootstrap(pairs, 4000)
    assert new == pytest.approx(old, abs=0.03)
    assert rvs.bootstrap([[(0.0, 1.0)] * 5] * 3, 100) == (1.0, 1.0)


def _same_rate_results(n_seeds: int = 5, n_items: int = 200) -> dict:
    """A report whose seeds all have the same rates (SFT 0.4, RL 0.55)."""
    rows = [{"seed": s, "sft": 0.4, "rl": 0.55, "n": n_items} for s in range(n_seeds)]
    return {"task_acc/arithmetic": {"seeds": rows, "mean_diff": 0.15}, "levels": {}}


def test_coverage_same_rates_is_sane_and_reproducible() -> None:
    results = _same_rate_results()
    report, md = rvs.coverage(results, reps=200, draws=200, seed=3)
    cov = report["objectives"]["task_acc/arithmetic"]
    assert set(report["objectives"]) == {"task_acc/arithmetic"}
    assert cov["true_diff"] == pytest.approx(0.15)
    assert cov["n_seeds"] == 5
    assert 0.85 <= cov["t"] <= 1.0
    assert 0.8 <= cov["bootstrap"] <= 1.0
    assert rvs.coverage(results, reps=200, draws=200, seed=3)[0] == report
    assert "| task_acc/arithmetic | 5 | 0.95 |" in md


def test_coverage_from_results_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--coverage alone reads OUT/results.json, adds "coverage" and replaces (not repeats)
    the coverage part of results.md; without a report it is a one-line error."""
    assert rvs.main(["--coverage", "--out", str(tmp_path)]) == 2
    assert str(tmp_path / "results.json") in capsys.readouterr().err
    for seed in (0, 1):
        make_seed(tmp_path, seed, GOOD)
    assert rvs.main(["--report-only", "--out", str(tmp_path), "--seeds", "0", "1"]) == 0
    args = ["--coverage", "--out", str(tmp_path), "--coverage-reps", "20"]
    args += ["--coverage-draws", "50"]
    for _ in range(2):
        assert rvs.main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["coverage"]["reps"] == 20
    assert set(results["coverage"]["objectives"]) == {
        "task_acc/arithmetic",
        "agent_success/calculator",
        "agent_success/lookup",
    }
    assert "goals" in results and "levels" in results
    md = (tmp_path / "results.md").read_text()
    assert md.count(rvs.COVERAGE_HEADING) == 1
    assert md.index("**Goals**") < md.index(rvs.COVERAGE_HEADING)
    out = capsys.readouterr().out
    assert "| objective | n seeds | nominal | t coverage | bootstrap coverage |" in out
    assert not math.isnan(results["coverage"]["objectives"]["task_acc/arithmetic"]["bootstrap"])
