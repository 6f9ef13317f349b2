"""The integration engine's parts: round files, runners, executors, the planner, the report."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re
import sys
import textwrap
import time
import types
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from stacklab.cli import build_parser
from stacklab.errors import StacklabError
from stacklab.integrate.effects import fit_effects
from stacklab.integrate.planner import (
    all_in_variants,
    fresh_seeds,
    propose,
    screening_design,
)
from stacklab.integrate.report import recipe_diff
from stacklab.integrate.round import RoundError, load_round
from stacklab.integrate.runners import (
    CommandRunner,
    Job,
    LocalPool,
    RayPool,
    make_executor,
    make_runner,
    read_metrics,
)
from stacklab.integrate.select import Objective, candidate_subsets, choose

F = frozenset

# --------------------------------------------------------------------------- round files

GOOD_ROUND = """
baseline: tiny
contributions: [contribs]
objectives:
  - {metric: quality, direction: max, weight: 2.0}
  - {metric: latency, direction: min}
guardrails:
  - {metric: latency, kind: ratio, threshold: 1.1}
  - {metric: agent_success, kind: min_delta, threshold: -0.01}
seeds: 2
confirm_seeds: [10, 11]
budget: 50
runner: {kind: external, command: "python train.py --recipe {recipe} --out '{out}' -s {seed}"}
"""


def write_contrib(folder: Path, cid: str, patch: dict, author: str = "ann") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"id": cid, "area": "optimizer", "summary": "s", "author": author, "patch": patch}
    (folder / f"{cid}.yaml").write_text(json.dumps(doc))


def make_round(tmp_path: Path, text: str = GOOD_ROUND, contribs: dict | None = None) -> Path:
    contribs = contribs or {
        "lr": {"optim.lr": 0.006},
        "adam": {"optim.name": "adamw"},
        "sgdish": {"optim.name": "muon", "optim.warmup_steps": 5},
    }
    for cid, patch in contribs.items():
        write_contrib(tmp_path / "contribs", cid, patch)
    path = tmp_path / "round.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_round_loads_and_resolves(tmp_path: Path) -> None:
    rnd = load_round(make_round(tmp_path))
    assert rnd.name == "round"
    assert rnd.ids == ["adam", "lr", "sgdish"]  # a folder's files in name order
    assert rnd.groups == [[0, 2]]  # both set optim.name
    assert rnd.seeds == [0, 1] and rnd.confirm_list == [10, 11] and rnd.confirm_count == 2
    assert [(o.name, o.direction, o.weight) for o in rnd.objectives] == [
        ("quality", "max", 2.0),
        ("latency", "min", 1.0),
    ]
    # A guardrail on an objective takes its direction; on another metric, "max".
    assert [(g.metric, g.direction) for g in rnd.guardrails] == [
        ("latency", "min"),
        ("agent_success", "max"),
    ]
    assert rnd.metrics == ["quality", "latency", "agent_success"]
    assert set(rnd.blind) == set(rnd.ids) and all(b.startswith("c-") for b in rnd.blind.values())
    assert rnd.workers >= 1 and rnd.baseline.name == "tiny"
    assert rnd.spec.margin == 0.5 and rnd.spec.level == 0.95 and rnd.spec.min_effect is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("budget: 50\n", ""), r"round.yaml: missing key 'budget'"),
        (("seeds: 2", "seds: 2"), r"unknown key 'seds'; did you mean 'seeds'\?"),
        (("{seed}", "{sed}"), r"key 'runner.command': unknown placeholder \{sed\}"),
        (("--out '{out}' ", ""), r"key 'runner.command': the command must pass \{out\}"),
        (("kind: external", "kind: docker"), r"key 'runner': unknown 'kind' 'docker'; valid: 'b"),
        (("direction: min}", "direction: down}"), r"key 'objectives.1.direction'"),
        (("seeds: 2", "seeds: [1, 1]"), r"key 'seeds': .*seeds repeat"),
        (("baseline: tiny", "baseline: nope.yaml"), r"round.yaml: baseline: recipe file not found"),
        (
            ("threshold: 1.1}", "threshold: 1.1, direction: max}"),
            r"guardrail on 'latency' says direction max but the objective says min",
        ),
    ],
)
def test_round_errors_name_the_file_and_key(tmp_path: Path, edit, message) -> None:
    old, new = edit
    assert old in GOOD_ROUND
    with pytest.raises(RoundError, match=message):
        load_round(make_round(tmp_path, GOOD_ROUND.replace(old, new, 1)))


def test_round_errors_from_contribution_files(tmp_path: Path) -> None:
    with pytest.raises(RoundError, match=r"contributions: .*bad.yaml: patch key 'optim.lrr'"):
        load_round(make_round(tmp_path, contribs={"bad": {"optim.lrr": 1.0}}))
    with pytest.raises(RoundError, match=r"seed.yaml: patch sets 'seed'; seeds belong"):
        load_round(make_round(tmp_path / "b", contribs={"seed": {"seed": 3}}))
    with pytest.raises(RoundError, match=r"noop.yaml: the patch changes nothing"):
        load_round(make_round(tmp_path / "c", contribs={"noop": {"optim.name": "muon"}}))
    twins = {"big": {"optim.lr": 0.006, "optim.warmup_steps": 5}, "part": {"optim.lr": 0.006}}
    with pytest.raises(RoundError, match=r"big.yaml and .*part.yaml: one's change is part of"):
        load_round(make_round(tmp_path / "d", contribs=twins))
    clash = {
        "deep": {"model.depth": 1},
        "moe": {"model.moe.enabled": True, "model.moe.first_k_dense": 2},
    }
    with pytest.raises(RoundError, match=r"deep.yaml and .*moe.yaml cannot be combined: invalid"):
        load_round(make_round(tmp_path / "e", contribs=clash))
    with pytest.raises(RoundError, match="round file not found"):
        load_round(tmp_path / "missing.yaml")


RAY_ROUND = GOOD_ROUND + "executor: {kind: ray, address: '10.0.0.7:6379', cpus_per_run: 2}\n"


def test_ray_executor_fails_clearly_without_ray(tmp_path: Path, monkeypatch) -> None:
    """Whether or not Ray is installed here: `import ray` is made to fail."""
    rnd = load_round(make_round(tmp_path, RAY_ROUND))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(StacklabError) as failure:
        make_executor(rnd.spec.executor, 1)
    assert str(failure.value) == (
        "executor kind 'ray' needs Ray: pip install ray (or use kind: local)"
    )


def test_ray_executor_is_a_ray_pool_on_the_given_address(tmp_path: Path, monkeypatch) -> None:
    """With Ray importable (a bare stand-in module: nothing of it may be used yet, Ray starts
    at the first batch), the executor is a RayPool with the round file's address and CPUs."""
    rnd = load_round(make_round(tmp_path, RAY_ROUND))
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    assert make_executor(rnd.spec.executor, 4) == RayPool("10.0.0.7:6379", 2.0)
    local = load_round(make_round(tmp_path / "local", GOOD_ROUND)).spec.executor
    assert make_executor(local, 3) == LocalPool(3)


# --------------------------------------------------------------------------- runners


def py_runner(tmp_path: Path, code: str, required=("q",), timeout_s=None) -> CommandRunner:
    """A runner whose command is a small Python program: argv = recipe, seed, out."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(code))
    template = (sys.executable, str(script), "{recipe}", "{seed}", "{out}")
    return CommandRunner(template, tmp_path, tuple(required), timeout_s, threads=1)


WRITES = """
import json, sys, yaml
recipe = yaml.safe_load(open(sys.argv[1]))
json.dump({"q": recipe["x"] * 10 + int(sys.argv[2]), "name": "n", "flag": True},
          open(sys.argv[3] + "/metrics.json", "w"))
print("trained")
"""


def job(tmp_path: Path, key: str = "k1", x: float = 1.5, seed: int = 2) -> Job:
    return Job(key, {"x": x, "seed": seed}, seed, tmp_path / "runs" / key)


def test_runner_success_is_atomic_and_keeps_numbers_only(tmp_path: Path) -> None:
    out = py_runner(tmp_path, WRITES)(job(tmp_path))
    assert (out.key, out.metrics, out.error) == ("k1", {"q": 17.0}, None)
    final = tmp_path / "runs" / "k1"
    assert json.loads((final / "metrics.json").read_text())["q"] == 17
    assert (final / "stdout.log").read_text() == "trained\n"
    assert "x: 1.5" in (final / "recipe.yaml").read_text()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["k1"]


def test_a_finished_run_folder_is_not_run_again(tmp_path: Path) -> None:
    py_runner(tmp_path, WRITES)(job(tmp_path))
    # The coordinator was killed after the rename: the folder holds the result.
    failing = py_runner(tmp_path, "import sys; sys.exit(3)")
    out = failing(job(tmp_path))
    assert out.metrics == {"q": 17.0} and out.error is None


WRITE = "import sys; open(sys.argv[3] + '/metrics.json', 'w').write({!r})"


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (
            "import sys; print('bad lr', file=sys.stderr); sys.exit(3)",
            r"^exit status 3; stderr ends: bad lr \(logs: ",
        ),
        ("pass", r"^the runner wrote no metrics.json"),
        (WRITE.format("{oops"), r"^metrics.json is not valid JSON"),
        (WRITE.format("[1]"), r"must be an object"),
        (WRITE.format('{"r": 1}'), r"has no metric 'q' \(has: r\)"),
        (WRITE.format('{"q": NaN}'), r"metric 'q' is nan, not a number"),
    ],
)
def test_runner_failures_are_recorded_not_results(tmp_path: Path, code: str, error: str) -> None:
    out = py_runner(tmp_path, code)(job(tmp_path))
    assert out.metrics is None
    assert out.error is not None
    assert re.search(error, out.error), out.error
    assert not (tmp_path / "runs" / "k1").exists()
    assert (tmp_path / "runs" / "k1.failed" / "recipe.yaml").exists()  # kept, with its logs


def test_runner_timeout_kills_the_run(tmp_path: Path) -> None:
    start = time.perf_counter()
    out = py_runner(tmp_path, "import time; time.sleep(60)", timeout_s=0.5)(job(tmp_path))
    assert out.error is not None and out.error.startswith("timed out after 0.5s")
    assert time.perf_counter() - start < 20


def test_runner_cannot_start(tmp_path: Path) -> None:
    runner = CommandRunner(("/no/such/trainer", "{recipe}", "{out}"), tmp_path, ("q",))
    out = runner(job(tmp_path))
    assert out.error is not None and out.error.startswith("cannot start /no/such/trainer")


def test_placeholders_fill_whole_arguments(tmp_path: Path) -> None:
    spec = load_round(make_round(tmp_path)).spec.runner
    runner = make_runner(spec, tmp_path, ["quality"], workers=2)
    argv = runner.argv(Path("/a dir/recipe.yaml"), 7, Path("/out dir"))
    assert argv == [
        "python", "train.py", "--recipe", "/a dir/recipe.yaml", "--out", "/out dir", "-s", "7",
    ]  # fmt: skip


def test_builtin_runner_is_stacklab_build(tmp_path: Path) -> None:
    text = GOOD_ROUND.split("runner:")[0] + "runner: {kind: builtin, cache_dir: cache}\n"
    spec = load_round(make_round(tmp_path, text)).spec.runner
    runner = make_runner(spec, tmp_path, ["quality"], workers=1)
    argv = runner.argv(Path("r.yaml"), 0, Path("o"))
    assert argv[0] == sys.executable and argv[3:] == [
        "build", "r.yaml", "--out", "o", "--cache-dir", str((tmp_path / "cache").resolve())
    ]  # fmt: skip


def test_local_pool_runs_jobs_concurrently(tmp_path: Path) -> None:
    code = "import json, sys, time; time.sleep(0.4); json.dump({'q': 1}, open(sys.argv[3] + '/metrics.json', 'w'))"  # noqa: E501
    runner = py_runner(tmp_path, code)
    jobs = [job(tmp_path, key=f"k{i}") for i in range(4)]
    start = time.perf_counter()
    outs = list(LocalPool(workers=4).run(runner, jobs))
    assert sorted(o.key for o in outs) == ["k0", "k1", "k2", "k3"]
    assert all(o.metrics == {"q": 1.0} for o in outs)
    # Four 0.4 s runs side by side, each also paying a Python start-up.
    assert time.perf_counter() - start < 4 * 0.4 + 1.5
    assert list(LocalPool(workers=2).run(runner, [])) == []


def test_read_metrics_keeps_finite_numbers(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"a": 1, "b": 2.5, "c": "x", "d": True, "e": None}))
    assert read_metrics(path, ["a"]) == {"a": 1.0, "b": 2.5}


# --------------------------------------------------------------------------- planner


def test_all_in_variants_cover_every_member_of_every_group() -> None:
    assert all_in_variants(3, []) == [F({0, 1, 2})]
    assert all_in_variants(5, [[1, 2], [3, 4]]) == [F({0, 1, 3}), F({0, 2, 4})]
    # Groups of 3 and 2: three variants, the smaller group wraps around.
    assert all_in_variants(6, [[0, 1, 2], [3, 4]]) == [F({0, 3, 5}), F({1, 4, 5}), F({2, 3, 5})]


def test_screening_design_exactly() -> None:
    assert screening_design(3, []) == [
        F(), F({0}), F({1}), F({2}), F({0, 1, 2}), F({1, 2}), F({0, 2}), F({0, 1}),
    ]  # fmt: skip
    # With a group, two all-in variants. The second gets only its group member's
    # leave-one-out, which is the first variant's ({0, 3}) and is kept once: its other
    # leave-one-outs would measure the free contributions a second time.
    design = screening_design(4, [[1, 2]])
    assert design == [
        F(), F({0}), F({1}), F({2}), F({3}),
        F({0, 1, 3}), F({1, 3}), F({0, 3}), F({0, 1}),
        F({0, 2, 3}),
    ]  # fmt: skip
    assert all(len(s & {1, 2}) <= 1 for s in design)


def test_fresh_seeds() -> None:
    assert fresh_seeds([0, 1, 2], 3) == [3, 4, 5]
    assert fresh_seeds([], 2) == [0, 1]
    assert fresh_seeds({7, 2}, 1) == [8]


def additive_runs(subsets, beta, seeds=(0, 1, 2), noise=0.01):
    rng = np.random.default_rng(0)
    return [
        (s, seed, 10 + seed + sum(beta[i] for i in s) + noise * rng.normal())
        for seed in seeds
        for s in subsets
    ]


def test_propose_explores_a_promising_recipe_never_run() -> None:
    beta = [1.0, 1.0, -1.0]
    ran = [F(), F({0}), F({1}), F({2}), F({0, 1, 2})]
    fit = fit_effects(additive_runs(ran, beta), 3, "all", draws=400)
    objectives = [Objective("q", "max", 1.0, scale=1.0)]
    p = propose(
        {"q": fit}, objectives, [], candidate_subsets(3), set(ran), set(ran),
        confidence=0.9, guardrail_prob=0.95, margin=0.5,
    )  # fmt: skip
    # The choice is the measured recipe of highest estimated utility. {0} and {1} gain the same
    # in truth, but this noise puts {0} ahead (1.004 against 0.998): no tie, {0}.
    utility = {c.subset: c.expected_utility for c in p.table.candidates if c.subset in ran}
    assert p.chosen == max(utility, key=utility.__getitem__) == F({0})
    assert p.subsets[0] == F({0, 1})  # the best recipe, never run: explore it
    assert "never run" in p.why[F({0, 1})]
    # Once it has run, the choice is clear and nothing is left to propose.
    ran.append(F({0, 1}))
    fit = fit_effects(additive_runs(ran, beta), 3, "all", draws=400)
    p = propose(
        {"q": fit}, objectives, [], candidate_subsets(3), set(ran), set(ran),
        confidence=0.9, guardrail_prob=0.95, margin=0.5,
    )  # fmt: skip
    assert (p.chosen, p.subsets) == (F({0, 1}), [])


def test_choose_breaks_exact_ties_by_fewest_contributions_then_smallest_ids() -> None:
    """Equal estimated utility: the recipe with fewer contributions, then the one whose sorted
    ids come first, whatever order the candidates are listed in."""
    ran = [F(), F({0}), F({1}), F({0, 1})]
    fit = fit_effects(additive_runs(ran, [1.0, 1.0]), 2, None, draws=400)
    objectives = [Objective("q", "max", 1.0, scale=1.0)]

    def chosen(coef: list[float], candidates: list[frozenset[int]]) -> frozenset[int]:
        exact = dataclasses.replace(fit, coef=np.array(coef))  # utilities tie exactly
        return choose({"q": exact}, objectives, [], candidates).chosen

    assert chosen([1.0, 1.0], [F({1}), F({0})]) == F({0})
    assert chosen([1.0, 1.0], [F({0}), F({1})]) == F({0})
    assert chosen([1.0, 0.0], [F({0, 1}), F({0})]) == F({0})
    assert chosen([0.0, 1.0], [F({0, 1}), F({1})]) == F({1})
    assert chosen([0.0, 0.0], [F({1}), F({0})]) == F()  # the baseline: no contribution at all


def test_propose_reruns_a_close_contender_and_the_choice() -> None:
    # 0 and 1 differ by 0.02 under noise 0.2: with margin 0 a contender, run both again.
    beta = [0.52, 0.5]
    ran = [F(), F({0}), F({1})]
    fit = fit_effects(additive_runs(ran, beta, noise=0.2), 2, None, draws=400)
    objectives = [Objective("q", "max", 1.0, scale=0.2)]
    kwargs = {"confidence": 0.9, "guardrail_prob": 0.95}
    p = propose({"q": fit}, objectives, [], ran, set(ran), set(ran), margin=0.0, **kwargs)
    assert set(p.subsets) == {F({0}), F({1})}
    assert all("run again on new seeds" in p.why[s] for s in p.subsets)
    # A failed recipe (tried, never measured) is not proposed again.
    p = propose(
        {"q": fit}, objectives, [], [*ran, F({0, 1})], set(ran), {*ran, F({0, 1})},
        margin=10.0, **kwargs,
    )  # fmt: skip
    assert p.subsets == []


# --------------------------------------------------------------------------- report and CLI


def test_recipe_diff() -> None:
    base = {"a": 1, "b": {"c": 2, "d": [1, 2]}, "e": "x"}
    other = {"a": 1, "b": {"c": 3, "d": [1, 2, 3]}, "e": "x", "f": None}
    assert recipe_diff(base, other) == [("b.c", 2, 3), ("b.d", [1, 2], [1, 2, 3])]
    assert recipe_diff(base, base) == []


VOID = frozenset({"meta", "br", "link", "img", "input", "hr", "line", "circle", "rect", "path"})


class _Balance(HTMLParser):
    """Collects unbalanced tags, scripts and references to anything outside the page."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        for name, value in attrs:
            external = name in ("src", "href") or (value or "").startswith(("http:", "https:"))
            if external and not (name == "xmlns" and value == "http://www.w3.org/2000/svg"):
                self.errors.append(f"external reference {name}={value}")
        if tag == "script":
            self.errors.append("script")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs) -> None:
        pass

    def handle_endtag(self, tag) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


REPORT_SECTIONS = (  # the report's <h2> sections, in order
    "Decisions",
    "Noise floor and power",
    "Guardrails on the final recipe",
    "Effects, with 95% intervals",
    "Interactions",
    "Pareto front",
    "Credit",
    "Code",
    "Batches and runs",
)


def _balanced(page: str) -> list[str]:
    checker = _Balance()
    checker.feed(page)
    return checker.errors + [f"<{tag}> never closed" for tag in checker.stack]


@pytest.fixture(scope="module")
def report_round(tmp_path_factory: pytest.TempPathFactory):
    """A real (tiny) round through the engine, shared by the report tests: (result, out)."""
    from rich.console import Console

    from integrate_sim.scenarios import small, write_round
    from stacklab.integrate.engine import integrate

    root = tmp_path_factory.mktemp("report")
    round_file = write_round(root / "r", small(), budget=80)
    result = integrate(round_file, root / "out", console=Console(file=io.StringIO()))
    return result, root / "out"


@pytest.mark.slow
def test_html_report_is_self_contained_and_balanced(report_round) -> None:
    """Render a report from a real (tiny) round through the engine."""
    result, out = report_round
    d = result.decision
    page = (out / "report.html").read_text()
    assert _balanced(page) == []
    for section in REPORT_SECTIONS:
        assert f"<h2>{section}</h2>" in page
    assert page.count("<svg") == 3  # effects, interactions, credit (one metric: no Pareto plot)
    assert "author-of-alpha" in page and "optim.lr" in page  # credit table; a recipe diff
    # Decisions: one tbody each, its status coloured, and the comparisons behind it.
    assert page.count("<tbody class='decision'>") == len(d.decisions)
    for row in d.decisions:
        assert f"<td class='{row.status}'>{row.status}" in page
    evidence = [x for row in d.decisions for x in row.evidence]
    assert evidence and page.count("<table class='ev'>") == sum(
        bool(row.evidence) for row in d.decisions
    )
    assert f"{100 * evidence[0].level:.3g}%" in page
    assert "alone vs the baseline" in page  # a - b in words
    # The rules, the noise floor and power, the confirmation plan, the guardrails.
    assert "rests on direct seed-paired comparisons" in page
    assert "80% power" in page and f"{d.min_effect:.3g}" in page
    assert f"up to {d.confirmation.looks} looks" in page
    for metric, sd in d.noise_floor.items():
        assert f"<td>{metric}</td><td class='num'>{sd:.3g}</td>" in page
    if d.guardrail_checks:
        check = d.guardrail_checks[0]
        assert f"<td class='{check.state}'>{check.state}</td>" in page
    # The effects picture is the model's; false-discovery control is gone.
    assert "false-discovery" not in page and "the picture is the model's" in page.lower()
    md = (out / "report.md").read_text()
    assert md.startswith("## Integration round `round`") and "| `beta` | optimizer | accepted" in md
    assert "**Noise floor**" in md and "detected with 80% power on" in md


@pytest.mark.slow
def test_report_shows_undecided_and_unknown_numbers(report_round) -> None:
    """An undecided contribution gets its own line and colour; a null end prints as an
    unbounded one (-inf, +inf, as the reasons print it), an unknown number as n/a."""
    import dataclasses

    from stacklab.integrate.record import DecisionRecord
    from stacklab.integrate.report import html_page, markdown

    result, _ = report_round
    d = result.decision.model_dump(mode="json")
    row = d["decisions"][0]
    reason = "undecided: added to the final recipe quality +0.2 [-0.4, +0.8]; about 6 more runs"
    row.update(status="undecided", kind="undecided", reason=reason)
    d["undecided"] = {row["id"]: reason}
    unknown = [None, None, None]
    row["evidence"] = [
        {
            "comparison": "interaction",
            "pair": [row["id"], d["decisions"][1]["id"]],
            "seeds": [],
            "level": 0.95,
            "verdict": "harm",
            "utility": [-1.0, None, None],
            "metrics": {m: unknown for m in d["noise_floor"] if m != "utility"},
        }
    ]
    d["predicted"] = {m: unknown for m in d["predicted"]}
    d["noise_floor"] = {m: float("nan") for m in d["noise_floor"]}
    d["power"] = {"max_seeds": 6, "detectable_gain": float("inf")}
    d["guardrails"] = [
        {"metric": "quality", "kind": "min_delta", "threshold": -0.01, "direction": "max"}
    ]
    d["guardrail_checks"] = [
        {
            "metric": "quality",
            "state": "open",
            "margin": [0.1, None, None],
            "level": 0.95,
            "seeds": [5],
            "text": "margin of the change in quality over the allowed -0.01 +0.1 [n/a, n/a]",
        }
    ]
    odd = dataclasses.replace(result, decision=DecisionRecord.model_validate(d))
    page = html_page(odd)
    assert _balanced(page) == []
    assert "<b class='undecided'>Undecided</b>" in page
    assert "<td class='undecided'>undecided" in page and ".undecided,.open{color:" in page
    assert "together, beyond the sum of each alone" in page
    assert "-1 [-inf, +inf]" in page and "+0.1 [-inf, +inf]" in page
    assert "<td>may fall at most 0.01</td><td class='open'>open</td>" in page
    assert "detected with 80% power on 6 confirmation seeds" in page and "nan" not in page
    md = markdown(odd)
    assert f"- `{row['id']}`: added to the final recipe" in md
    assert "above n/a utility" in md and "quality n/a" in md


@pytest.mark.slow
def test_relative_out_works_from_another_folder(tmp_path: Path, monkeypatch) -> None:
    """Runs execute in the round file's folder; a relative --out must still land in cwd."""
    from rich.console import Console

    from integrate_sim.scenarios import small, write_round
    from stacklab.integrate.engine import integrate

    round_file = write_round(tmp_path / "r", small(), budget=40)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    result = integrate(round_file, "out", console=Console(file=io.StringIO()))
    assert result.decision.runs.failed == 0
    assert (tmp_path / "here" / "out" / "decision.json").is_file()


def test_cli_integrate_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices["integrate"].format_help()
    assert "ROUND" in text and "--out" in text and "decision.json" in text
    assert "resumes" in text
