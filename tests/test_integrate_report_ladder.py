"""The report's "Scale ladder" section, from a hand-made decision.json with a ladder.

No round is run: the section reads only the decision record (built from a hand-made
decision.json, checked by `DecisionRecord`), so a stand-in result (the few attributes
html_page touches when a round has no metrics) is enough.
"""

from __future__ import annotations

import copy
import re
import xml.etree.ElementTree as ET
from types import SimpleNamespace
from typing import Any

import pytest

from stacklab.integrate.record import DecisionRecord
from stacklab.integrate.report import (
    _ladder_md,
    _ladder_section,
    _ladder_svg,
    html_page,
    markdown,
)

SVG = "{http://www.w3.org/2000/svg}"


def _measure(
    rung: str, comparison: str, a: list[str], b: list[str], utility: list[Any], verdict: str
) -> dict[str, Any]:
    seeds = list(range(6)) if rung == "s" else list(range(100, 108))
    level = 0.996 if rung == "s" else 0.99
    return {
        "rung": rung,
        "comparison": comparison,
        "a": a,
        "b": b,
        "seeds": seeds,
        "level": level,
        "utility": utility,
        "verdict": verdict,
        "metrics": {},
    }


def _row(cid: str, status: str, kind: str, rung: str, transfer: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": cid,
        "blind_id": f"c-{cid}",
        "area": "architecture",
        "summary": f"{cid} change",
        "status": status,
        "kind": kind,
        "reason": f"{cid}: see the ladder",
        "evidence": [],
        "rung": rung,
        "transfer": transfer,
    }


def _ladder() -> dict[str, Any]:
    return {
        "budget_units": 200,
        "units_used": 180.0,
        "rungs": [
            {
                "name": "s",
                "patch": {"model.depth": 2},
                "cost": 1.0,
                "cost_source": "given",
                "share": 0.5,
                "budget_units": 100.0,
                "budget_runs": 100,
                "runs": 96,
                "units_used": 96.0,
                "noise_floor": 0.05,
                "chosen": ["alpha", "beta"],
                "final": ["alpha", "beta"],
                "close_calls": [],
                "out_of_budget": False,
                "note": None,
            },
            {
                "name": "m",
                "patch": {"model.depth": 4, "pretrain.steps": 200},
                "cost": 4.0,
                "cost_source": "measured",
                "share": 0.5,
                "budget_units": 104.0,
                "budget_runs": 26,
                "runs": 21,
                "units_used": 84.0,
                "noise_floor": None,
                "chosen": ["alpha", "beta"],
                "final": ["alpha"],
                "close_calls": ["gamma"],
                "out_of_budget": True,
                "note": None,
            },
        ],
        "agreement": [
            {
                "from": "s",
                "to": "m",
                "subsets": 6,
                "kendall_tau": [0.6, 0.1, 1.0],
                "verdicts_compared": 4,
                "verdicts_confirmed": 3,
            }
        ],
        "lr_tuning": {
            "key": "optim.lr",
            "rung": "m",
            "values": [0.0015, 0.003, 0.006],
            "seeds": [900, 901],
            "recipe": ["alpha", "beta"],
            "baseline": {"best": 0.003, "utility": [[0.0015, -0.2], [0.003, 0.0], [0.006, -0.4]]},
            "final": {"best": 0.006, "utility": [[0.0015, 0.1], [0.003, 0.3], [0.006, 0.5]]},
        },
    }


def _decisions() -> list[dict[str, Any]]:
    holds = {
        "rungs": [
            _measure("s", "loo", ["alpha", "beta"], ["beta"], [0.3, 0.1, 0.5], "accept"),
            _measure("m", "loo", ["alpha", "beta"], ["beta"], [0.25, 0.05, 0.45], "accept"),
        ],
        "sign_changed": False,
        "significance_changed": False,
        "pattern": "holds",
    }
    flips = {
        "rungs": [
            _measure("s", "loo", ["alpha", "beta"], ["alpha"], [0.2, 0.05, 0.35], "accept"),
            _measure("m", "loo", ["alpha", "beta"], ["alpha"], [-0.3, -0.5, -0.1], "harm"),
        ],
        "sign_changed": True,
        "significance_changed": False,
        "pattern": "flips",
    }
    # gamma: a close call, measured added at m, with an unbounded lower end (no noise yet).
    emerges = {
        "rungs": [
            _measure("s", "alone", ["gamma"], [], [0.02, -0.1, 0.14], "open"),
            _measure("m", "added", ["alpha", "gamma"], ["alpha"], [0.1, None, 0.4], "open"),
        ],
        "sign_changed": False,
        "significance_changed": False,
        "pattern": "emerges",
    }
    one = {
        "rungs": [_measure("s", "alone", ["delta"], [], [-0.2, -0.4, 0.0], "none")],
        "sign_changed": False,
        "significance_changed": False,
        "pattern": "one rung",
    }
    return [
        _row("alpha", "accepted", "accepted", "m", holds),
        _row("beta", "shelved", "conflict", "m", flips),
        _row("gamma", "undecided", "undecided", "m", emerges),
        _row("delta", "shelved", "no_gain", "s", one),
    ]


def _decision(ladder: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {
        "round": "ladder-round",
        "round_file": "round.yaml",
        "baseline": "base.yaml",
        "selected": ["alpha"],
        "shelved": {"beta": "beta: see the ladder", "delta": "delta: see the ladder"},
        "undecided": {},
        "decisions": _decisions(),
        "credit": {},
        "credit_table": [],
        "runs": {
            "executed": 117, "reused": 0, "failed": 0, "total": 117, "budget": 200, "stale": 0
        },
        "stale": {},
        "code": {"baseline": {"code": "c0de", "kind": "files", "files": {}, "covers": ""}},
        "predicted": {"utility": [0.25, 0.05, 0.45]},
        "objectives": [],
        "scales": {},
        "min_effect": 0.05,
        "level": 0.95,
        "noise_floor": {"utility": 0.1},
        "power": {"max_seeds": 8, "detectable_gain": 0.2},
        "guardrails": [],
        "guardrail_checks": [],
        "confirmation": {
            "chosen": [], "final": [], "seeds": [], "looks": 0, "block": 0, "alpha": 0.05,
            "levels": [], "attempts": [], "out_of_budget": False, "reserve": 0,
        },
        "pareto": [],
        "stopped": "confident",
        "batches": [],
        "notes": [],
    }  # fmt: skip
    if ladder:
        d["ladder"] = _ladder()
    else:
        for row in d["decisions"]:
            del row["rung"], row["transfer"]
    return d


def record(d: dict[str, Any]) -> DecisionRecord:
    return DecisionRecord.model_validate(d)


def _result(d: dict[str, Any]) -> SimpleNamespace:
    """What markdown and html_page read of a RoundResult, for a round with no metrics."""
    workspace = SimpleNamespace(resolve=lambda subset: SimpleNamespace(data={}))
    rnd = SimpleNamespace(
        name=d["round"], metrics=[], objectives=[], guardrails=[], ids=[], workspace=workspace
    )
    return SimpleNamespace(decision=record(d), round=rnd, batches=[], points=[], runs={})


def _svg(text: str) -> ET.Element:
    found = re.findall(r"<svg\b.*?</svg>", text, flags=re.S)
    assert len(found) == 1
    return ET.fromstring(found[0])


def test_markdown_ladder_lists_rungs_agreement_lr_and_the_transfer_table() -> None:
    md = markdown(_result(_decision()))
    assert "\n### Scale ladder\n" in md
    assert "**Budget:** 180 of 200 cost units used" in md
    assert (
        "- **s** (`model.depth=2`): cost 1 per run (given); share 50%; 100 units budgeted "
        "(100 runs); 96 runs used 96 units; utility noise 0.05 per run; chose alpha + beta; "
        "final alpha + beta" in md
    )
    assert (
        "- **m** (`model.depth=4, pretrain.steps=200`): cost 4 per run (measured); share 50%; "
        "104 units budgeted (26 runs); 21 runs used 84 units; utility noise n/a per run; chose "
        "alpha + beta; final alpha; close calls measured: gamma; ran out of budget" in md
    )
    assert (
        "**Agreement:** Kendall's tau between s and m over 6 recipes: +0.6 [+0.1, +1]; "
        "3 of 4 verdicts at s confirmed at m." in md
    )
    assert "optim.lr tuned at rung m over 0.0015, 0.003, 0.006, on seeds 900, 901" in md
    assert "- the baseline: best 0.003 (mean utility 0.0015: -0.2, 0.003: +0, 0.006: -0.4)" in md
    assert "best 0.006 (mean utility 0.0015: +0.1, 0.003: +0.3, 0.006: +0.5)" in md
    assert "| contribution | decision | s | m | pattern |\n|---|---|---|---|---|\n" in md
    assert (
        "| `alpha` | accepted at m | +0.3 [+0.1, +0.5] gain shown (loo, 6 seeds) | "
        "+0.25 [+0.05, +0.45] gain shown (loo, 8 seeds) | holds |" in md
    )
    assert "| `beta` | shelved (conflict) at m |" in md and "| flips (sign changed) |" in md
    assert "+0.1 [-inf, +0.4] not settled (added, 8 seeds) | emerges |" in md  # null low end
    assert "| `delta` | shelved (no_gain) at s | -0.2 [-0.4, +0] no gain shown " in md
    assert "(alone, 6 seeds) | \u2014 | one rung |" in md  # never measured at m
    # The section comes after the decisions table and before the credit.
    assert md.index("| `delta` | architecture |") < md.index("### Scale ladder")


def test_html_ladder_section_tables_and_page_placement() -> None:
    d = _decision()
    section = _ladder_section(record(d))
    assert section.startswith("<h2>Scale ladder</h2>")
    assert "<td><b>m</b></td><td><code>model.depth=4, pretrain.steps=200</code></td>" in section
    assert "84 (21 runs) <b>out of budget</b>" in section
    assert "Kendall&#x27;s tau between s and m over 6 recipes: +0.6 [+0.1, +1]" in section
    assert "3 of 4 verdicts at s confirmed at m" in section
    # Learning rate: one row per value, each side's best in bold.
    assert "<tr><td class='num'>0.006</td><td class='num'>-0.4</td>" in section
    assert "<td class='num'><b>+0.5</b></td></tr>" in section
    assert "<td class='num'><b>+0</b></td>" in section
    # Contribution x rung: interval, verdict, comparison; a dash where not measured.
    assert "<th>s: utility</th><th>m: utility</th><th>pattern</th>" in section
    assert "+0.1 [-inf, +0.4]<br>" in section and "emerges" in section
    assert "<td class='shelved'>shelved (conflict) at m</td>" in section
    assert "added, 8 seeds, 99%" in section and "<td class='muted'>&mdash;</td>" in section
    assert "title='alpha added to beta'" in section
    page = html_page(_result(d))
    assert page.count("<h2>Scale ladder</h2>") == 1
    assert page.index("<h2>Decisions</h2>") < page.index("<h2>Scale ladder</h2>")
    assert page.index("<h2>Scale ladder</h2>") < page.index("<h2>Noise floor and power</h2>")
    assert "<script" not in page


def test_ladder_svg_is_well_formed_with_a_panel_per_contribution() -> None:
    root = _svg(_ladder_svg(record(_decision())))
    assert root.tag == f"{SVG}svg"
    panels = [g for g in root if g.tag == f"{SVG}g"]
    assert len(panels) == 4
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert {"alpha", "beta", "gamma", "delta", "holds", "flips (sign changed)"} <= set(texts)
    assert texts.count("s") == 4 and texts.count("m") == 4  # x axis: every rung, every panel
    # The rung each verdict was drawn at is bold; a zero line in each panel.
    bold = [t.text for t in panels[3].iter(f"{SVG}text") if t.get("font-weight") == "600"]
    assert bold == ["delta", "s"]
    zero = [x for x in root.iter(f"{SVG}line") if x.get("stroke-dasharray")]
    assert len(zero) == 4 and len({z.get("y1") for z in zero}) == 1  # one shared utility axis
    # Colours follow the verdict; an open verdict is hollow.
    alpha_dots = list(panels[0].iter(f"{SVG}circle"))
    assert [c.get("fill") for c in alpha_dots] == ["#1a7f37", "#1a7f37"]
    beta_dots = list(panels[1].iter(f"{SVG}circle"))
    assert [c.get("stroke") for c in beta_dots] == ["#1a7f37", "#cf222e"]
    assert {c.get("fill") for c in panels[2].iter(f"{SVG}circle")} == {"white"}
    assert len(list(panels[0].iter(f"{SVG}polyline"))) == 1  # estimates joined across rungs
    assert not list(panels[3].iter(f"{SVG}polyline"))
    tips = ["".join(t.itertext()) for t in root.iter(f"{SVG}title")]
    assert "alpha at m: alpha added to beta; utility +0.25 [+0.05, +0.45], " in "".join(tips)


def test_a_null_interval_end_runs_to_the_plot_edge_with_an_arrow() -> None:
    d = _decision()
    gamma = d["decisions"][2]["transfer"]["rungs"]
    gamma[0]["utility"] = [0.02, -0.1, None]  # unbounded above at s
    root = _svg(_ladder_svg(record(d)))
    panel = [g for g in root if g.tag == f"{SVG}g"][2]
    arrows = [p for p in panel.iter(f"{SVG}polygon") if p.get("class") == "unbounded"]
    assert len(arrows) == 2
    lines = [x for x in panel.iter(f"{SVG}line") if x.get("stroke-width") == "2"]
    ends = sorted(float(v) for x in lines for v in (x.get("y1"), x.get("y2")))
    assert ends[0] == 40.0 and ends[-1] == 150.0  # the plot's top and bottom edges
    tips = {float(p.get("points").split()[-1].split(",")[1]) for p in arrows}
    assert tips == {40.0, 150.0}
    assert "+0.02 [-0.1, +inf]" in _ladder_section(record(d))
    # Nothing known at all: "n/a" in place of a bar, and the picture still parses.
    gamma[1]["utility"] = [None, None, None]
    root = _svg(_ladder_svg(record(d)))
    panel = [g for g in root if g.tag == f"{SVG}g"][2]
    assert "n/a" in ["".join(t.itertext()) for t in panel.iter(f"{SVG}text")]


def test_without_a_ladder_no_section_is_rendered() -> None:
    d = _decision(ladder=False)
    r = record(d)
    assert _ladder_md(r) == [] and _ladder_section(r) == "" and _ladder_svg(r) == ""
    md = markdown(_result(d))
    page = html_page(_result(d))
    assert "Scale ladder" not in md and "Scale ladder" not in page
    assert "Kendall" not in md + page and "<svg" not in page
    # The ladder only adds its section: everything else is the same text.
    with_ladder = markdown(_result(_decision()))
    start = with_ladder.index("\n### Scale ladder")
    assert with_ladder[:start] == md


@pytest.mark.parametrize("kendall", [None, [None, None, None]])
def test_agreement_without_tau_or_verdicts_and_no_lr_tuning(kendall: Any) -> None:
    d = _decision()
    d["ladder"]["agreement"][0].update(kendall_tau=kendall, verdicts_compared=0, subsets=2)
    d["ladder"]["lr_tuning"] = None
    md = "\n".join(_ladder_md(record(d)))
    assert "Kendall's tau between s and m over 2 recipes: n/a; no verdict at s to check at m." in md
    assert "Learning rate" not in md and "Learning rate" not in _ladder_section(record(d))


def test_names_are_escaped_in_the_section_and_the_svg() -> None:
    d = _decision()
    d["decisions"][0]["id"] = "<a&b>"
    d["ladder"]["rungs"][0]["name"] = "s'<"
    for row in d["decisions"]:
        for m in row["transfer"]["rungs"]:
            if m["rung"] == "s":
                m["rung"] = "s'<"
        if row["rung"] == "s":
            row["rung"] = "s'<"
    section = _ladder_section(record(copy.deepcopy(d)))
    assert "<a&b>" not in section and "&lt;a&amp;b&gt;" in section
    root = _svg(_ladder_svg(record(d)))
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert "<a&b>" in texts and "s'<" in texts
