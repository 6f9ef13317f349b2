"""Reports of a round: decision.json for programs, report.md for a pull request, HTML for people.

The HTML page is self-contained (inline CSS, inline SVG, no scripts, no external assets), so
it can be mailed, archived or attached to a pull request and still render years later. Every
number in it comes from `RoundResult` (its decision record, record.py, and the fits and runs
the pictures draw); nothing is recomputed here, and every interval is printed the one way
decision.json's reasons print it (`verdicts.fmt`). All three files are written atomically: a
reader sees the old report or the new one, never half of one.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stacklab.fileio import write_atomic
from stacklab.integrate.decide import guard_rule
from stacklab.integrate.record import (
    Agreement,
    ComparisonEvidence,
    Decision,
    DecisionRecord,
    EvidenceItem,
    FilesCode,
    LadderRecord,
    LrCurve,
    LrTuning,
    RungComparison,
    RungRecord,
    Transfer,
)
from stacklab.integrate.utility import UTILITY
from stacklab.integrate.verdicts import fmt

if TYPE_CHECKING:
    from stacklab.integrate.engine import RoundResult

_GOOD, _BAD, _NEUTRAL, _INK = "#1a7f37", "#cf222e", "#8c959f", "#1f2328"


def write_reports(result: RoundResult, out: Path) -> None:
    """Write out/decision.json, out/report.md and out/report.html."""
    write_atomic(out / "decision.json", result.decision.dumps())
    write_atomic(out / "report.md", markdown(result))
    write_atomic(out / "report.html", html_page(result))


def recipe_diff(base: Any, other: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, baseline value, run value) for every leaf that differs."""
    if isinstance(base, dict) and isinstance(other, dict):
        out = []
        for key in sorted(set(base) | set(other), key=str):
            out += recipe_diff(base.get(key), other.get(key), f"{prefix}{key}.")
        return out
    if base != other:
        return [(prefix.rstrip("."), base, other)]
    return []


def _num(value: float | None) -> str:
    """One plain number (a noise floor, min_effect, a detectable gain), or n/a."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3g}"


def _pct(level: float | None) -> str:
    """An interval's level as people read it: 0.998 -> 99.8%."""
    return "n/a" if level is None or not math.isfinite(level) else f"{100 * level:.3g}%"


def _names(ids: Sequence[str]) -> str:
    return " + ".join(ids) or "the baseline"


def _levels(levels: Sequence[float]) -> str:
    """Per-look levels with runs of equal ones merged: `looks 1-7: 99.8%; look 8: 96.2%`."""
    parts: list[str] = []
    k = 0
    while k < len(levels):
        j = k
        while j + 1 < len(levels) and _pct(levels[j + 1]) == _pct(levels[k]):
            j += 1
        span = f"look {k + 1}" if j == k else f"looks {k + 1}\u2013{j + 1}"
        parts.append(f"{span}: {_pct(levels[k])}")
        k = j + 1
    return "; ".join(parts)


def _rules(d: DecisionRecord) -> str:
    """How verdicts are made, in plain words, with this round's numbers.

    The report is read by people deciding what ships, so it says once what "accepted",
    "shelved" and "undecided" rest on instead of leaving them to guess from the intervals.
    """
    conf = d.confirmation
    looks, block = conf.looks, conf.block
    plan = (
        f" The confirmation looks up to {looks} times, {block} new seeds a look, and spends "
        f"alpha {_num(conf.alpha)} across the looks, so an early look needs a wider "
        f"interval than the last ({_levels(conf.levels)})."
        if looks and block
        else ""
    )
    return (
        "Every verdict rests on direct seed-paired comparisons (two recipes run on the same "
        "seeds, compared seed by seed), not on the effects model. A contribution is accepted "
        "only when the final recipe with it beats the same recipe without it by a gain of at "
        f"least min_effect {_num(d.min_effect)} utility, shown on confirmation seeds "
        f"that took no part in choosing.{plan} It is shelved when the comparison shows that it "
        "hurts, that its gain is below min_effect, or no gain at the last look, and when a "
        "breach of a guardrail by it is shown. A comparison the budget could not settle "
        "leaves it undecided, which is not \u201cno gain\u201d; undecided contributions are "
        "not shipped."
    )


def _power_line(d: DecisionRecord) -> str:
    return (
        f"gains inside the final recipe above {_num(d.power.detectable_gain)} utility are "
        f"detected with 80% power on {d.power.max_seeds} confirmation seeds; "
        f"min_effect {_num(d.min_effect)}"
    )


def _noise_line(d: DecisionRecord) -> str:
    return ", ".join(f"{m} {_num(sd)}" for m, sd in d.noise_floor.items())


def _undecided_reason(reason: str) -> str:
    """The reason without its leading `undecided:`, where the list already says so."""
    return reason.removeprefix("undecided: ")


def _comparison_words(item: EvidenceItem | RungComparison) -> str:
    """An evidence item's `a - b` in words: the recipes compared, relative to each other."""
    if not isinstance(item, ComparisonEvidence):
        return f"{' and '.join(item.pair)} together, beyond the sum of each alone"
    a, b = item.a, item.b
    if not b:
        return f"{_names(a)} alone vs the baseline" if len(a) == 1 else f"{_names(a)} vs baseline"
    added = [c for c in a if c not in b]
    removed = [c for c in b if c not in a]
    common = [c for c in a if c in b]
    if added and removed:
        return f"{_names(added)} in place of {_names(removed)}, with {_names(common)}"
    if added:
        return f"{_names(added)} added to {_names(common)}"
    if removed:
        return f"{_names(removed)} taken out of {_names(b)}"
    return f"{_names(a)} against itself"


_VERDICT_WORDS = {
    "accept": "gain shown",
    "harm": "loss shown",
    "small": "gain below min_effect",
    "none": "no gain shown",
    "open": "not settled",
}


# --------------------------------------------------------------------------- markdown


def markdown(result: RoundResult) -> str:
    """report.md: the decision and its evidence in a form that reads in a pull request."""
    d = result.decision
    runs = d.runs
    lines = [
        f"## Integration round `{d.round}`",
        "",
        "**Selected:** "
        + (", ".join(f"`{c}`" for c in d.selected) or "nothing (keep the baseline)"),
        "",
    ]
    undecided = d.undecided
    if undecided:
        lines += [
            "**Undecided** (the budget could not settle them; not shipped):",
            "",
            *(f"- `{c}`: {_md_cell(_undecided_reason(r))}" for c, r in undecided.items()),
            "",
        ]
    lines += [
        "**Change vs baseline** (the selected recipe, seed-paired on the confirmation seeds, "
        "95%): " + "; ".join(f"{m} {fmt(*v)}" for m, v in d.predicted.items()),
        "",
    ]
    checks = d.guardrail_checks
    if checks:
        lines += [
            "**Guardrails on the final recipe:** "
            + "; ".join(f"{c.metric} {_md_cell(c.text)}" for c in checks),
            "",
        ]
    lines += [
        f"**How verdicts are made:** {_rules(d)}",
        "",
        f"**Noise floor** (sd of one run after the seed effect): {_noise_line(d) or 'n/a'}.",
        "",
        f"**Power:** {_power_line(d)}.",
        "",
        f"Runs: {runs.executed} executed, {runs.reused} reused from the store, "
        f"{runs.failed} failed, budget {runs.budget}; stopped: {d.stopped}.",
        "",
        *_md_code(d),
        "| contribution | area | decision | evidence |",
        "|---|---|---|---|",
    ]
    for row in d.decisions:
        lines.append(f"| `{row.id}` | {row.area} | {_status(row)} | {_md_cell(row.reason)} |")
    lines += _ladder_md(d)
    if d.credit_table:
        metrics = list(d.credit_table[0].metrics)
        lines += [
            "",
            "### Credit (Shapley value in the final model, 95% interval)",
            "",
            "| contribution | author | status | " + " | ".join(metrics) + " |",
            "|---|---|---|" + "---|" * len(metrics),
        ]
        for row in d.credit_table:
            cells = " | ".join(fmt(*row.metrics[m].shapley) for m in metrics)
            lines.append(f"| `{row.id}` | {row.author} | {row.status} | {cells} |")
    if d.notes:
        lines += ["", "Notes:", *(f"- {note}" for note in d.notes)]
    return "\n".join(lines) + "\n"


def _shown_path(path: str) -> str:
    """A path under the current folder is shown relative to it (the page is read there)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _status(row: Decision) -> str:
    """`shelved (vanishes)`; the kind is not repeated when it only restates the status."""
    return row.status if row.kind == row.status else f"{row.status} ({row.kind})"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;color:#1f2328;
max-width:1100px;margin:2em auto;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse;margin:.6em 0;width:100%}
th,td{border:1px solid #d0d7de;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
code{background:#f6f8fa;padding:0 .2em;border-radius:3px}
.accepted,.held{color:#1a7f37;font-weight:600}.shelved{color:#9a6700;font-weight:600}
.undecided,.open{color:#8250df;font-weight:600}.breached{color:#cf222e;font-weight:600}
.failed{color:#cf222e}.muted{color:#656d76}.small{font-size:.85em}
tbody.decision{border-top:2px solid #afb8c1}
tr.evidence>td{border-top:0;padding:0 .5em .4em 1.5em}
table.ev{width:auto;margin:.1em 0;font-size:.85em}
table.ev th,table.ev td{padding:.1em .4em}table.ev th{background:#fff;font-weight:600}
table.ev td.num,table.ev td.nw{white-space:nowrap}
svg{display:block;margin:.5em 0;font:11px system-ui,sans-serif}
details{margin:.3em 0}
"""


def html_page(result: RoundResult) -> str:
    """report.html: one self-contained page (inline CSS and SVG, no scripts)."""
    d = result.decision
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>stacklab integrate: {e(d.round)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Integration round <code>{e(d.round)}</code></h1>",
        f"<p class='muted'>baseline <code>{e(_shown_path(d.baseline))}</code>; "
        f"{d.runs.executed} runs executed, {d.runs.reused} reused, "
        f"{d.runs.failed} failed (budget {d.runs.budget}); stopped: "
        f"{e(d.stopped)}</p>",
        "<p><b>Selected:</b> "
        + (", ".join(f"<code>{e(c)}</code>" for c in d.selected) or "nothing (keep the baseline)")
        + "</p>",
        _undecided_list(d),
        _predicted_table(d),
        "<h2>Decisions</h2>",
        f"<p class='small'>{e(_rules(d))}</p>",
        _decision_table(d),
        _ladder_section(d),
        "<h2>Noise floor and power</h2>",
        _power_section(d),
        "<h2>Guardrails on the final recipe</h2>",
        _guardrail_section(d),
        "<h2>Effects, with 95% intervals</h2>",
        "<p class='muted small'>Each contribution alone vs the baseline, as the effects model "
        "fitted on the screening runs sees it. Filled dots: the gain or loss alone is shown by "
        "the direct seed-paired comparison on the screening seeds (95%); hollow: not shown. "
        "The picture is the model's; verdicts rest on the direct comparisons listed under "
        "Decisions.</p>",
        *(_effects_svg(result, m) for m in result.round.metrics),
        "<h2>Interactions</h2>",
        "<p class='muted small'>Pairwise interaction (the change from running both beyond the "
        "sum of their effects alone), from the effects model fitted on every run. Blank: never "
        "run together (choice groups) or not identified by the runs. A conflict named under "
        "Decisions rests on a measured interaction, not on this picture.</p>",
        *(_interaction_svg(result, o.name) for o in result.round.objectives),
        "<h2>Pareto front</h2>",
        _pareto_svg(result),
        "<h2>Credit</h2>",
        _credit_section(result),
        _code_section(d),
        "<h2>Batches and runs</h2>",
        _batches_table(result),
        _runs_table(result),
    ]
    if d.notes:
        parts += ["<h2>Notes</h2><ul>", *(f"<li>{e(n)}</li>" for n in d.notes), "</ul>"]
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p) + "\n"


def _stale_text(d: DecisionRecord) -> str:
    stale = d.stale
    if not stale:
        return ""
    why = "; ".join(f"{n} because {reason}" for reason, n in stale.items())
    return f"{sum(stale.values())} stored runs of this round set aside as stale: {why}."


def _md_code(d: DecisionRecord) -> list[str]:
    """The code the runs ran (a git round: base and each change's diffstat), and stale runs."""
    code = d.code
    lines = []
    if code.changes is not None and code.base is not None:
        commit = (code.base.commit or "")[:12]
        lines += [
            f"**Code:** `{code.repo}` at `{code.base.ref}` ({commit}); each "
            "subset merges its members' changes in round order.",
            "",
            "| contribution | ref | files | diffstat |",
            "|---|---|---|---|",
        ]
        for cid, ch in code.changes.items():
            lines.append(
                f"| `{cid}` | `{ch.ref}` ({ch.commit[:12]}) | "
                f"{_md_cell(', '.join(ch.files))} | +{ch.insertions} -{ch.deletions} |"
            )
        lines.append("")
    stale = _stale_text(d)
    if stale:
        lines += [f"**Stale runs:** {stale}", ""]
    return lines


def _code_section(d: DecisionRecord) -> str:
    e = html.escape
    code = d.code
    stale = _stale_text(d)
    parts = []
    if code.changes is not None and code.base is not None:
        rows = "".join(
            f"<tr><td><code>{e(cid)}</code></td><td><code>{e(ch.ref)}</code> "
            f"<span class='muted small'>{e(ch.commit[:12])}</span></td>"
            f"<td class='small'><pre>{e(ch.diffstat)}</pre></td></tr>"
            for cid, ch in code.changes.items()
        )
        parts.append(
            f"<p class='small'>Repository <code>{e(code.repo or '')}</code> at "
            f"<code>{e(code.base.ref)}</code> ({e((code.base.commit or '')[:12])}); each subset "
            "merges its members' changes into it in round order, and runs in the merged tree.</p>"
            f"<table><tr><th>contribution</th><th>ref</th><th>diffstat</th></tr>{rows}</table>"
        )
    elif isinstance(code.baseline, FilesCode) and code.baseline.covers:
        parts.append(f"<p class='small'>Every run's code: {e(code.baseline.covers)}.</p>")
    if stale:
        parts.append(f"<p class='small'>{e(stale)}</p>")
    return "<h2>Code</h2>" + "".join(parts) if parts else ""


def _undecided_list(d: DecisionRecord) -> str:
    undecided = d.undecided
    if not undecided:
        return ""
    items = "".join(
        f"<li><code>{html.escape(c)}</code>: {html.escape(_undecided_reason(r))}</li>"
        for c, r in undecided.items()
    )
    return (
        "<p><b class='undecided'>Undecided</b> (the budget could not settle them; not "
        f"shipped):</p><ul class='small'>{items}</ul>"
    )


def _predicted_table(d: DecisionRecord) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td><td class='num'>{fmt(*v)}</td></tr>"
        for m, v in d.predicted.items()
    )
    return (
        "<table style='width:auto'><tr><th>selected vs baseline</th><th>change [95%], "
        f"seed-paired on the confirmation seeds</th></tr>{rows}</table>"
    )


def _decision_table(d: DecisionRecord) -> str:
    """One tbody per contribution: its decision row, then the comparisons behind it."""
    e = html.escape
    metrics = list(dict.fromkeys(m for row in d.decisions for x in row.evidence for m in x.metrics))
    groups = []
    for row in d.decisions:
        kind = row.kind
        decision = (
            f"<td class='{e(row.status)}'>{e(row.status)}"
            + (
                f"<br><span class='muted small'>{e(kind.replace('_', ' '))}</span>"
                if kind != row.status
                else ""
            )
            + "</td>"
        )
        body = (
            f"<tr class='decision'><td><code>{e(row.id)}</code><br>"
            f"<span class='muted small'>{e(row.blind_id)}</span></td>"
            f"<td>{e(row.area)}</td><td>{e(row.summary)}</td>{decision}"
            f"<td>{e(row.reason)}</td></tr>"
        )
        if row.evidence:
            body += (
                f"<tr class='evidence'><td colspan='5'>{_evidence_table(row, metrics)}</td></tr>"
            )
        groups.append(f"<tbody class='decision'>{body}</tbody>")
    return (
        "<table class='decisions'><thead><tr><th>contribution</th><th>area</th><th>summary</th>"
        "<th>decision</th><th>reason</th></tr></thead>" + "".join(groups) + "</table>"
    )


def _evidence_table(row: Decision, metrics: Sequence[str]) -> str:
    """The direct comparisons behind one decision, recipe a minus recipe b, at their level."""
    e = html.escape
    head = "".join(f"<th>{e(m)}</th>" for m in metrics)
    rows = []
    for item in row.evidence:
        seeds = item.seeds
        verdict = item.verdict
        if isinstance(item, ComparisonEvidence):
            exact = f"[{_names(item.a)}] \u2212 [{_names(item.b)}]"
        else:
            x, y = item.pair
            exact = f"[{x} + {y}] \u2212 [{x}] \u2212 [{y}] + [baseline]"
        cells = "".join(
            f"<td class='num'>{fmt(*item.metrics.get(m, (None, None, None)))}</td>" for m in metrics
        )
        rows.append(
            f"<tr><td class='nw'>{e(item.comparison)}</td>"
            f"<td title='{e(exact)}'>{e(_comparison_words(item))}</td>"
            f"<td class='num' title='{e(', '.join(map(str, seeds)))}'>"
            f"{len(seeds) or '&mdash;'}</td><td class='num'>{_pct(item.level)}</td>"
            f"<td class='nw'>{e(_VERDICT_WORDS.get(verdict, verdict))}</td>"
            f"<td class='num'>{fmt(*item.utility)}</td>{cells}</tr>"
        )
    return (
        "<table class='ev'><tr><th>comparison</th><th>a \u2212 b</th><th>seeds</th>"
        f"<th>level</th><th>verdict</th><th>utility</th>{head}</tr>{''.join(rows)}</table>"
    )


def _power_section(d: DecisionRecord) -> str:
    """What the runs can resolve: the noise, min_effect, the detectable gain, the plan.

    Without these a "no gain shown" reads as "no gain"; with them a reader sees how large a
    gain the round could have missed.
    """
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(m)}</td><td class='num'>{_num(sd)}</td></tr>"
        for m, sd in d.noise_floor.items()
    )
    objectives = {o.metric: o for o in d.objectives}
    units = "; ".join(
        f"{m} ({o.direction if o else 'max'}): weight {_num(o.weight if o else None)}, "
        f"scale {_num(s)}"
        for m, s in d.scales.items()
        for o in [objectives.get(m)]
    )
    conf = d.confirmation
    head = "<tr><th>metric</th><th>noise floor: sd of one run after the seed effect</th></tr>"
    out = [
        f"<table style='width:auto'>{head}{rows}</table>" if rows else "",
        "<p>Utility: the sum over the objectives of weight &times; change / scale, signed so "
        f"that higher is better ({e(units or 'n/a')}). min_effect, the smallest gain worth "
        f"keeping a member for: <b>{_num(d.min_effect)}</b> utility.</p>",
        f"<p>Power: {e(_power_line(d))}.</p>",
    ]
    if conf.looks:
        out.append(
            f"<p>Confirmation plan: up to {conf.looks} looks &times; {conf.block} "
            f"seeds, alpha {_num(conf.alpha)} spent across the looks; interval level "
            f"per look: {e(_levels(conf.levels))}. Used {len(conf.seeds)} confirmation "
            f"seeds"
            + (", and ran out of budget" if conf.out_of_budget else "")
            + f". Chosen to confirm: {e(_names(conf.chosen))}; final recipe "
            f"confirmed: {e(_names(conf.final))}.</p>"
        )
    if conf.attempts:
        rows = "".join(
            f"<tr><td class='num'>{k}</td><td>{e(_names(a.recipe))}</td>"
            f"<td>{e(_pairs(a.verdicts, _VERDICT_WORDS))}</td>"
            f"<td>{e(_pairs(a.guardrails, {}))}</td></tr>"
            for k, a in enumerate(conf.attempts, 1)
        )
        out.append(
            "<table class='small'><tr><th>attempt</th><th>recipe confirmed</th><th>comparisons"
            f"</th><th>guardrails</th></tr>{rows}</table>"
        )
    return "".join(out)


def _pairs(mapping: Mapping[str, str], words: Mapping[str, str]) -> str:
    return "; ".join(f"{k}: {words.get(v, v)}" for k, v in mapping.items()) or "\u2014"


def _guardrail_section(d: DecisionRecord) -> str:
    """Each guardrail judged on the recipe that would ship, against the baseline."""
    e = html.escape
    rules = {g.metric: g for g in d.guardrails}
    checks = d.guardrail_checks
    if not rules:
        return "<p class='muted'>This round has no guardrails.</p>"
    if not checks:
        return "<p class='muted'>No guardrail was checked: no final recipe to check.</p>"
    rows = "".join(
        f"<tr><td>{e(c.metric)}</td>"
        f"<td>{e(guard_rule(rules[c.metric]) if c.metric in rules else '')}</td>"
        f"<td class='{e(c.state)}'>{e(c.state)}</td>"
        f"<td class='num'>{fmt(*c.margin)}</td>"
        f"<td class='num'>{_pct(c.level)}</td>"
        f"<td class='num'>{len(c.seeds)}</td><td>{e(c.text)}</td></tr>"
        for c in checks
    )
    return (
        "<p class='muted small'>The recipe that would ship against the baseline, seed-paired "
        "on the confirmation seeds; the margin is at least 0 where the guardrail holds. held: "
        "the interval lies above 0; breached: below 0; open: neither is shown, and the text "
        "names the largest breach the runs rule out.</p>"
        "<table><tr><th>metric</th><th>guardrail</th><th>state</th><th>margin</th>"
        f"<th>level</th><th>seeds</th><th>detail</th></tr>{rows}</table>"
    )


class _Scale:
    """A linear map from data to pixels, padded so a zero line always shows."""

    def __init__(self, values: Iterable[float], lo_px: float, hi_px: float):
        vals = [v for v in values if math.isfinite(v)] + [0.0]
        lo, hi = min(vals), max(vals)
        pad = (hi - lo) * 0.08 or 1.0
        self.lo, self.hi = lo - pad, hi + pad
        self.lo_px, self.hi_px = lo_px, hi_px

    def __call__(self, v: float) -> float:
        return self.lo_px + (v - self.lo) / (self.hi - self.lo) * (self.hi_px - self.lo_px)

    def ticks(self, room: Callable[[str], float]) -> list[tuple[float, str]]:
        """Labels for both ends and zero, leaving out an end too close to zero to print."""
        zero = "+0"
        out = [(0.0, zero)]
        for v in (self.lo, self.hi):
            label = f"{v:+.3g}"
            if abs(self(v) - self(0.0)) >= (room(label) + room(zero)) / 2 + 4:
                out.append((v, label))
        return out


def _text_px(text: str, size: float = 11.0) -> float:
    """A generous estimate of a label's width, to size charts so no label is cut off.

    SVG cannot wrap or measure text without a script; 0.64 em a character covers the wide
    sans-serif fonts (DejaVu Sans) that browsers fall back to on Linux.
    """
    return 0.64 * size * len(text)


def _fit(text: str, px: float, size: float = 11.0) -> str:
    """`text`, cut with an ellipsis if it would be wider than `px`."""
    keep = int(px / (0.64 * size))
    return text if len(text) <= keep else text[: max(keep - 1, 1)] + "\u2026"


def _forest(
    title: str,
    raw: Sequence[tuple[str, float | None, float | None, float | None, bool | None]],
    color: Callable[[float], str],
) -> str:
    """Horizontal interval plot: (label, estimate, low, high, filled?) per row.

    An unknown number (None, NaN, an unbounded end) draws no line or dot rather than a
    broken one: an interval read from decision.json may have null ends.
    """
    e = html.escape
    rows = [
        (label, *(math.nan if v is None else float(v) for v in (est, lo, hi)), filled)
        for label, est, lo, hi, filled in raw
    ]
    longest = max((_text_px(label) for label, *_ in rows), default=0.0)
    left = int(min(max(longest + 16, 120), 560))
    width, right, row_h, top = left + 540, 20, 22, 28
    height = top + row_h * len(rows) + 24
    x = _Scale([v for _, est, lo, hi, _ in rows for v in (est, lo, hi)], left, width - right)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{e(title)}">',
        f'<text x="4" y="16" font-weight="600">{e(title)}</text>',
        f'<line x1="{x(0):.1f}" y1="{top - 6}" x2="{x(0):.1f}" y2="{height - 20}" '
        f'stroke="{_NEUTRAL}" stroke-dasharray="3,3"/>',
    ]
    for k, (label, est, lo, hi, filled) in enumerate(rows):
        y = top + row_h * k + row_h / 2
        c = color(est)
        out.append(
            f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">'
            f"{e(_fit(label, left - 12))}</text>"
        )
        if math.isfinite(lo) and math.isfinite(hi):
            out.append(
                f'<line x1="{x(lo):.1f}" y1="{y:.1f}" x2="{x(hi):.1f}" y2="{y:.1f}" '
                f'stroke="{c}" stroke-width="2"/>'
            )
        if not math.isfinite(est):
            out.append(f'<text x="{x(0) + 6:.1f}" y="{y + 4:.1f}" fill="{_NEUTRAL}">n/a</text>')
            continue
        fill = c if filled or filled is None else "white"
        out.append(
            f'<circle cx="{x(est):.1f}" cy="{y:.1f}" r="4.5" fill="{fill}" stroke="{c}" '
            f'stroke-width="2"><title>{e(label)}: {fmt(est, lo, hi)}</title></circle>'
        )
    for v, label in x.ticks(_text_px):
        out.append(
            f'<text x="{x(v):.1f}" y="{height - 6}" text-anchor="middle" fill="#656d76">'
            f"{label}</text>"
        )
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------- scale ladder
#
# With `scales:` a round measures its choice again on larger rungs (docs/integrate.md, "a
# ladder of rungs"). decision.json then has a round-level `ladder` and, per decision, `rung`
# and `transfer`; without a ladder none of this is drawn and the report is unchanged.

_VERDICT_COLOR = {"accept": _GOOD, "harm": _BAD}
_DASH = "\u2014"


def _signed(value: float | None) -> str:
    """One signed number (a mean utility), or n/a."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{0.0 if value == 0 else value:+.3g}"


def _plain(value: Any) -> str:
    """A setting's value as written (a learning rate: 0.003), or n/a."""
    return "n/a" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _patch_words(patch: Mapping[str, Any]) -> str:
    """A rung's patch as `model.depth=2, pretrain.steps=100`."""
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in patch.items()) or "no patch"


def _transfers(row: Decision) -> dict[str, RungComparison]:
    """rung name -> the contribution's comparison there."""
    return {m.rung: m for m in row.transfer.rungs} if row.transfer else {}


def _rung_names(d: DecisionRecord) -> list[str]:
    """Rung names, smallest first: the ladder's, then any a transfer names that it lacks."""
    names = [r.name for r in d.ladder.rungs] if d.ladder else []
    for row in d.decisions:
        for rung in _transfers(row):
            if rung not in names:
                names.append(rung)
    return names


def _budget_words(ladder: LadderRecord) -> str:
    return (
        f"{_num(ladder.units_used)} of {_num(ladder.budget_units)} cost units "
        "used (a run at a rung of cost c uses c units; what a rung leaves unspent passes to "
        "the next)"
    )


def _rung_words(rung: RungRecord) -> str:
    """One rung in a line: cost, budget, runs, noise, what it chose."""
    words = [
        f"cost {_num(rung.cost)} per run ({rung.cost_source})",
        f"share {_pct(rung.share)}",
        f"{_num(rung.budget_units)} units budgeted ({rung.budget_runs} runs)",
        f"{rung.runs} runs used {_num(rung.units_used)} units",
        f"utility noise {_num(rung.noise_floor)} per run",
        f"chose {_names(rung.chosen)}",
        f"final {_names(rung.final)}",
    ]
    if rung.close_calls:
        words.append(f"close calls measured: {', '.join(rung.close_calls)}")
    if rung.out_of_budget:
        words.append("ran out of budget")
    return "; ".join(words)


def _agreement_words(a: Agreement) -> str:
    """`Kendall's tau between s and m over 6 recipes: ...; 3 of 4 verdicts at s confirmed`."""
    low, high = a.from_, a.to
    text = (
        f"Kendall's tau between {low} and {high} over {a.subsets} recipes: "
        f"{fmt(*(a.kendall_tau or (None, None, None)))}"
    )
    if a.verdicts_compared:
        return (
            f"{text}; {a.verdicts_confirmed} of {a.verdicts_compared} verdicts at {low} "
            f"confirmed at {high}"
        )
    return f"{text}; no verdict at {low} to check at {high}"


def _lr_sides(lr: LrTuning) -> list[tuple[str, LrCurve]]:
    """(who, tuning) for the baseline and the chosen recipe."""
    recipe = f"the chosen recipe ({_names(lr.recipe)})"
    return [("the baseline", lr.baseline), (recipe, lr.final)]


def _lr_head(lr: LrTuning) -> str:
    seeds = ", ".join(map(str, lr.seeds)) or "n/a"
    return (
        f"{lr.key} tuned at rung {lr.rung} over "
        f"{', '.join(_plain(v) for v in lr.values) or 'n/a'}, on seeds {seeds} "
        "of its own (used for no verdict). The comparisons there run the baseline at its best "
        f"value, {_plain(lr.baseline.best)}, and every other recipe at "
        f"the chosen recipe's, {_plain(lr.final.best)}."
    )


def _transfer_cell(m: RungComparison) -> str:
    """A contribution's comparison at one rung, in words: interval, verdict, kind."""
    return (
        f"{fmt(*m.utility)} {_VERDICT_WORDS.get(m.verdict, m.verdict)} "
        f"({m.comparison}, {len(m.seeds)} seeds)"
    )


def _pattern_words(transfer: Transfer | None) -> str:
    """`flips (sign changed)`: the pattern, with the changes behind it."""
    if transfer is None:
        return ""
    changed = [
        words
        for flag, words in (
            (transfer.sign_changed, "sign changed"),
            (transfer.significance_changed, "significance changed"),
        )
        if flag
    ]
    return f"{transfer.pattern} ({', '.join(changed)})" if changed else transfer.pattern


def _decided_at(row: Decision) -> str:
    return _status(row) + (f" at {row.rung}" if row.rung else "")


def _ladder_md(d: DecisionRecord) -> list[str]:
    """report.md's "Scale ladder" section; nothing without a ladder."""
    ladder = d.ladder
    if not ladder:
        return []
    names = _rung_names(d)
    lines = [
        "",
        "### Scale ladder",
        "",
        f"**Budget:** {_budget_words(ladder)}.",
        "",
        *(
            f"- **{r.name}** (`{_md_cell(_patch_words(r.patch))}`): {_md_cell(_rung_words(r))}"
            for r in ladder.rungs
        ),
        "",
    ]
    for a in ladder.agreement:
        lines += [f"**Agreement:** {_agreement_words(a)}.", ""]
    lr = ladder.lr_tuning
    if lr:
        lines += [f"**Learning rate:** {_md_cell(_lr_head(lr))}", ""]
        for who, side in _lr_sides(lr):
            curve = ", ".join(f"{_plain(v)}: {_signed(u)}" for v, u in side.utility)
            lines.append(f"- {_md_cell(who)}: best {_plain(side.best)} (mean utility {curve})")
        lines.append("")
    lines += [
        "Utility at each rung (interval, verdict, comparison and seeds):",
        "",
        "| contribution | decision | " + " | ".join(names) + " | pattern |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for row in d.decisions:
        at = _transfers(row)
        cells = " | ".join(_transfer_cell(at[n]) if n in at else _DASH for n in names)
        lines.append(
            f"| `{row.id}` | {_decided_at(row)} | {cells} | {_pattern_words(row.transfer)} |"
        )
    return lines


def _ladder_section(d: DecisionRecord) -> str:
    """report.html's "Scale ladder" section; "" without a ladder."""
    ladder = d.ladder
    if not ladder:
        return ""
    e = html.escape
    names = _rung_names(d)
    rungs = "".join(
        f"<tr><td><b>{e(r.name)}</b></td><td><code>{e(_patch_words(r.patch))}"
        f"</code></td><td class='num'>{_num(r.cost)} "
        f"<span class='muted small'>{e(r.cost_source)}</span></td>"
        f"<td class='num'>{_pct(r.share)}</td>"
        f"<td class='num'>{_num(r.budget_units)} ({r.budget_runs} "
        f"runs)</td><td class='num'>{_num(r.units_used)} ({r.runs} "
        f"runs){' <b>out of budget</b>' if r.out_of_budget else ''}</td>"
        f"<td class='num'>{_num(r.noise_floor)}</td>"
        f"<td>{e(_names(r.chosen))}</td><td>{e(_names(r.final))}</td>"
        f"<td>{e(', '.join(r.close_calls) or _DASH)}</td></tr>"
        for r in ladder.rungs
    )
    parts = [
        "<h2>Scale ladder</h2>",
        "<p class='muted small'>The first rung runs the round; each larger rung measures, on "
        "seeds of its own, the recipe the rung below chose, each member's leave-one-out and "
        "the close calls, in the same utility units. A contribution's verdict comes from the "
        "largest rung at which it was measured.</p>",
        f"<p>Budget: {e(_budget_words(ladder))}.</p>",
        "<table><tr><th>rung</th><th>patch</th><th>cost per run</th><th>share</th>"
        "<th>budgeted units</th><th>used units</th><th>utility noise per run</th>"
        f"<th>chose</th><th>final</th><th>close calls measured</th></tr>{rungs}</table>",
        *(f"<p>{e(_agreement_words(a))}.</p>" for a in ladder.agreement),
        _lr_table(ladder.lr_tuning),
        _transfer_table(d, names),
        _ladder_svg(d),
    ]
    return "".join(parts)


def _lr_table(lr: LrTuning | None) -> str:
    """Mean utility at each learning rate tried, for the baseline and the chosen recipe."""
    if not lr:
        return ""
    e = html.escape
    sides = _lr_sides(lr)
    curves = [dict(side.utility) for _, side in sides]
    values = list(dict.fromkeys([*lr.values, *(v for c in curves for v in c)]))
    rows = []
    for v in values:
        cells = "".join(
            f"<td class='num'>{'<b>' if v == side.best else ''}"
            f"{_signed(curve.get(v))}{'</b>' if v == side.best else ''}</td>"
            for (_, side), curve in zip(sides, curves, strict=True)
        )
        rows.append(f"<tr><td class='num'>{e(_plain(v))}</td>{cells}</tr>")
    head = "".join(f"<th>{e(who)}: mean utility</th>" for who, _ in sides)
    return (
        f"<p>Learning rate: {e(_lr_head(lr))}</p><table style='width:auto'><tr>"
        f"<th>{e(lr.key)}</th>{head}</tr>{''.join(rows)}</table>"
        "<p class='muted small'>Bold: each one's best value.</p>"
    )


def _transfer_table(d: DecisionRecord, names: Sequence[str]) -> str:
    """Contribution x rung: the utility interval and verdict where measured, and the pattern."""
    e = html.escape
    rows = []
    for row in d.decisions:
        at = _transfers(row)
        cells = []
        for n in names:
            m = at.get(n)
            if m is None:
                cells.append("<td class='muted'>&mdash;</td>")
                continue
            cells.append(
                f"<td class='num' title='{e(_comparison_words(m))}'>"
                f"{fmt(*m.utility)}<br>"
                f"<span style='color:{_VERDICT_COLOR.get(m.verdict, _NEUTRAL)}'>"
                f"{e(_VERDICT_WORDS.get(m.verdict, m.verdict))}</span><br>"
                f"<span class='muted small'>{e(m.comparison)}, "
                f"{len(m.seeds)} seeds, {_pct(m.level)}</span></td>"
            )
        rows.append(
            f"<tr><td><code>{e(row.id)}</code></td>"
            f"<td class='{e(row.status)}'>{e(_decided_at(row))}</td>{''.join(cells)}"
            f"<td>{e(_pattern_words(row.transfer))}</td></tr>"
        )
    head = "".join(f"<th>{e(n)}: utility</th>" for n in names)
    return (
        "<table><tr><th>contribution</th><th>decision</th>"
        f"{head}<th>pattern</th></tr>{''.join(rows)}</table>"
    )


def _ladder_svg(d: DecisionRecord) -> str:
    """Small multiples: each measured contribution's utility effect against the rungs.

    One panel per contribution, all on one utility axis (effects at every rung are in the
    same units). Dots: the estimate, coloured by that rung's verdict (hollow: not settled);
    bars: the interval, an arrow where an end is unbounded (null); a bold rung name: the rung
    the verdict was drawn at.
    """
    e = html.escape
    names = _rung_names(d)
    panels = [(row, _transfers(row)) for row in d.decisions]
    panels = [(row, at) for row, at in panels if at]
    if not panels or not names:
        return ""

    def number(v: float | None) -> float:
        return math.nan if v is None else float(v)

    values = [number(v) for _, at in panels for m in at.values() for v in m.utility]
    top, bottom = 40, 150
    y = _Scale(values, bottom, top)
    ticks = y.ticks(lambda label: 14.0)  # stacked: one line of text apart
    left = int(14 + max(_text_px(label, 10) for _, label in ticks))
    slot = int(min(max(44.0, max(_text_px(n) for n in names) + 10), 90.0))
    # Wide enough for the pattern line (`fades (significance changed)`) as well.
    panel_w = max(left + slot * len(names) + 10, 200)
    slot = (panel_w - left - 10) // len(names)
    panel_h, gap = bottom + 24, 8
    cols = max(1, min(len(panels), 1060 // (panel_w + gap)))
    width = cols * (panel_w + gap)
    height = math.ceil(len(panels) / cols) * (panel_h + gap)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'role="img" aria-label="utility effect of each contribution against the rungs">'
    ]
    for k, (row, at) in enumerate(panels):
        ox, oy = (panel_w + gap) * (k % cols), (panel_h + gap) * (k // cols)
        out += [
            f'<g transform="translate({ox},{oy})">',
            f'<rect x="0.5" y="0.5" width="{panel_w - 1}" height="{panel_h - 1}" fill="none" '
            'stroke="#d0d7de"/>',
            f'<text x="6" y="15" font-weight="600">{e(_fit(row.id, panel_w - 12))}</text>',
            f'<text x="6" y="29" font-size="10" fill="#656d76">'
            f"{e(_fit(_pattern_words(row.transfer), panel_w - 12, 10))}</text>",
            f'<line x1="{left}" y1="{y(0):.1f}" x2="{panel_w - 6}" y2="{y(0):.1f}" '
            f'stroke="{_NEUTRAL}" stroke-dasharray="3,3"/>',
            *(
                f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="10" '
                f'fill="#656d76">{e(label)}</text>'
                for v, label in ticks
            ),
        ]
        xs = {n: left + slot * j + slot / 2 for j, n in enumerate(names)}
        for n, cx in xs.items():
            bold = ' font-weight="600"' if n == row.rung else ""
            out.append(
                f'<text x="{cx:.1f}" y="{bottom + 16}" text-anchor="middle"{bold}>'
                f"{e(_fit(n, slot - 4))}</text>"
            )
        trail = [
            f"{xs[n]:.1f},{y(number(at[n].utility[0])):.1f}"
            for n in names
            if n in at and math.isfinite(number(at[n].utility[0]))
        ]
        if len(trail) > 1:
            out.append(
                f'<polyline points="{" ".join(trail)}" fill="none" stroke="{_NEUTRAL}" '
                'stroke-width="1"/>'
            )
        for n, m in at.items():
            out.append(_ladder_mark(row.id, n, m, xs[n], y, top, bottom))
        out.append("</g>")
    out.append("</svg>")
    legend = (
        "<p class='muted small'>Utility effect of each contribution at each rung it was "
        "measured at, with its interval: green, gain shown; red, loss shown; grey, neither "
        "(hollow: not settled); an arrow, an unbounded end. Bold rung: where the verdict was "
        "drawn. Hover for the comparison.</p>"
    )
    return "".join(out) + legend


def _ladder_mark(
    cid: str, rung: str, m: RungComparison, cx: float, y: _Scale, top: float, bottom: float
) -> str:
    """One rung's interval bar and estimate dot, with the comparison as the group's tooltip.

    A null (or non-finite) end runs the bar to the plot's edge and ends it in an arrow.
    """
    e = html.escape
    est, lo, hi = (math.nan if v is None or not math.isfinite(v) else float(v) for v in m.utility)
    c = _VERDICT_COLOR.get(m.verdict, _NEUTRAL)
    tip = (
        f"{cid} at {rung}: {_comparison_words(m)}; utility {fmt(*m.utility)}, "
        f"{_VERDICT_WORDS.get(m.verdict, m.verdict)}, {len(m.seeds)} seeds, "
        f"{_pct(m.level)}"
    )
    out = [f"<g><title>{e(tip)}</title>"]
    if not any(math.isfinite(v) for v in (est, lo, hi)):
        out.append(
            f'<text x="{cx:.1f}" y="{y(0) - 6:.1f}" text-anchor="middle" fill="{_NEUTRAL}">'
            "n/a</text></g>"
        )
        return "".join(out)
    y_lo = y(lo) if math.isfinite(lo) else bottom
    y_hi = y(hi) if math.isfinite(hi) else top
    out += [
        f'<line x1="{cx:.1f}" y1="{y_lo:.1f}" x2="{cx:.1f}" y2="{y_hi:.1f}" stroke="{c}" '
        'stroke-width="2"/>'
    ]
    for end, tip_y, back in ((lo, bottom, -7), (hi, top, 7)):
        if not math.isfinite(end):
            out.append(
                f'<polygon points="{cx - 4:.1f},{tip_y + back:.1f} {cx + 4:.1f},'
                f'{tip_y + back:.1f} {cx:.1f},{tip_y:.1f}" fill="{c}" class="unbounded"/>'
            )
    if math.isfinite(est):
        fill = "white" if m.verdict == "open" else c
        out.append(
            f'<circle cx="{cx:.1f}" cy="{y(est):.1f}" r="4.5" fill="{fill}" stroke="{c}" '
            'stroke-width="2"/>'
        )
    out.append("</g>")
    return "".join(out)


def _direction(result: RoundResult, metric: str) -> str:
    for o in result.round.objectives:
        if o.name == metric:
            return o.direction
    for g in result.round.guardrails:
        if g.metric == metric:
            return g.direction
    return "max"


def _effects_svg(result: RoundResult, metric: str) -> str:
    fit = result.views.screen[metric]
    sign = 1.0 if _direction(result, metric) == "max" else -1.0
    rows = []
    for i, cid in enumerate(result.round.ids):
        eff = fit.main_effects[i]
        found = result.discoveries.get((i, metric))
        rows.append((cid, eff.estimate, eff.low, eff.high, found))
    is_objective = any(o.name == metric for o in result.round.objectives)
    kind = "objective" if is_objective else "guarded metric"
    title = f"{metric} ({kind}, {'higher' if sign > 0 else 'lower'} is better)"
    return _forest(title, rows, lambda v: _GOOD if sign * v > 0 else _BAD)


def _interaction_svg(result: RoundResult, metric: str) -> str:
    e = html.escape
    fit = result.views.full[metric]
    ids = result.round.ids
    n = len(ids)
    inter = fit.interactions
    sign = 1.0 if _direction(result, metric) == "max" else -1.0
    scale = max((abs(x.estimate) for x in inter.values() if x.identified), default=0.0) or 1.0
    numbers = [f"{x.estimate:+.2g}" for x in inter.values() if x.identified]
    cell = int(max([34.0] + [_text_px(s, 9) + 8 for s in numbers]))
    name = max((_text_px(cid) for cid in ids), default=0.0)
    # Row names end left of the matrix; column names rise at 50 degrees above it.
    left = int(max(60, name + 14))
    top = int(max(40, name * 0.77 + 34))
    width = int(max(left + cell * n + 10, left + cell * n - cell / 2 + name * 0.65 + 16))
    height = top + cell * n + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="interactions on {e(metric)}">',
        f'<text x="4" y="16" font-weight="600">{e(metric)}</text>',
    ]
    for k, cid in enumerate(ids):
        cx = left + cell * k + cell / 2
        out.append(
            f'<text x="{left - 6}" y="{top + cell * k + cell / 2 + 4:.1f}" '
            f'text-anchor="end">{e(cid)}</text>'
        )
        out.append(
            f'<text transform="translate({cx + 4:.1f},{top - 6}) rotate(-50)">{e(cid)}</text>'
        )
    for a in range(n):
        for b in range(n):
            x, y = left + cell * b, top + cell * a
            pair = (min(a, b), max(a, b))
            eff = inter.get(pair)
            if a == b or eff is None or not eff.identified:
                out.append(
                    f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="#f6f8fa" '
                    'stroke="#d0d7de"/>'
                )
                continue
            good = sign * eff.estimate > 0
            alpha = min(1.0, abs(eff.estimate) / scale)
            color = _GOOD if good else _BAD
            tip = f"{ids[pair[0]]} x {ids[pair[1]]}: {fmt(eff.estimate, eff.low, eff.high)}"
            out.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{color}" '
                f'fill-opacity="{0.1 + 0.8 * alpha:.2f}" stroke="#d0d7de"><title>{e(tip)}'
                "</title></rect>"
            )
            out.append(
                f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" text-anchor="middle" '
                f'font-size="9">{eff.estimate:+.2g}</text>'
            )
    out.append("</svg>")
    return "".join(out)


def _pareto_svg(result: RoundResult) -> str:
    e = html.escape
    objectives = [o.name for o in result.round.objectives]
    guarded = [g.metric for g in result.round.guardrails if g.metric not in objectives]
    axes = (objectives + guarded)[:2]
    if len(axes) < 2:
        return "<p class='muted'>One metric: no trade-off to show.</p>"
    rows = [c for c in result.choice.candidates if c.estimable]

    def value(c: Any, axis: str) -> float:
        return c.deltas[axis]

    width, height, pad = 760, 420, 50
    y = _Scale([value(c, axes[1]) for c in rows], height - pad, 20)
    y_ticks = y.ticks(lambda label: 14.0)  # stacked: one line of text apart
    left = int(30 + max(_text_px(label) for _, label in y_ticks))  # room for the y labels
    x = _Scale([value(c, axes[0]) for c in rows], left, width - 20)
    front = set(result.choice.pareto)
    ids = result.round.ids

    def name(s: frozenset[int]) -> str:
        return " + ".join(ids[i] for i in sorted(s)) or "baseline"

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'role="img" aria-label="Pareto front">',
        f'<line x1="{x(0):.1f}" y1="10" x2="{x(0):.1f}" y2="{height - pad}" stroke="{_NEUTRAL}" '
        'stroke-dasharray="3,3"/>',
        f'<line x1="{left}" y1="{y(0):.1f}" x2="{width - 20}" y2="{y(0):.1f}" '
        f'stroke="{_NEUTRAL}" stroke-dasharray="3,3"/>',
        f'<text x="{width / 2:.0f}" y="{height - 12}" text-anchor="middle">change in '
        f"{e(axes[0])} ({_direction(result, axes[0])} is better)</text>",
        f'<text transform="translate(14,{height / 2:.0f}) rotate(-90)" text-anchor="middle">'
        f"change in {e(axes[1])} ({_direction(result, axes[1])} is better)</text>",
        *(
            f'<text x="{x(v):.1f}" y="{height - pad + 16}" text-anchor="middle" '
            f'fill="#656d76">{label}</text>'
            for v, label in x.ticks(_text_px)
        ),
        *(
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" fill="#656d76">'
            f"{label}</text>"
            for v, label in y_ticks
        ),
    ]
    for c in sorted(rows, key=lambda c: c.subset in front):
        cx, cy = x(value(c, axes[0])), y(value(c, axes[1]))
        on = c.subset in front
        # Two independent marks: green for the front, hollow for a failed guardrail (the front
        # is over every estimable subset, so an infeasible one can be on it).
        fill = "white" if not c.feasible else (_GOOD if on else _NEUTRAL)
        r = 8 if c.subset == result.final else 4.5
        stroke = _INK if c.subset == result.final else (_GOOD if on else _NEUTRAL)
        tip = (
            f"{name(c.subset)}: utility {c.expected_utility:+.3g}, P(guardrails) "
            f"{c.guardrail_prob:.2f}{'' if c.feasible else ' (infeasible)'}"
        )
        out.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r}" fill="{fill}" stroke="{stroke}" '
            f'stroke-width="1.5"><title>{e(tip)}</title></circle>'
        )
        if c.subset == result.final:
            # Beside the dot, on whichever side has room.
            side = 'text-anchor="end" ' if cx + 10 + _text_px("selected") > width else ""
            out.append(
                f'<text x="{cx + (-10 if side else 10):.1f}" y="{cy - 8:.1f}" {side}'
                'font-weight="600">selected</text>'
            )
    out.append("</svg>")
    legend = (
        "<p class='muted small'>Each dot is a candidate subset whose prediction the runs pin "
        "down; green: on the Pareto front; hollow: a guardrail fails; large outlined: "
        "selected. Hover for names.</p>"
    )
    return "".join(out) + legend


def _credit_section(result: RoundResult) -> str:
    e = html.escape
    table = result.decision.credit_table
    if not table:
        return "<p class='muted'>No credit computed (see notes).</p>"
    rows = [
        (f"{r.id} ({r.author})", *r.metrics[UTILITY].shapley, r.status == "accepted") for r in table
    ]
    svg = _forest(
        "Shapley value for the utility (filled: accepted; hollow: shelved, had it shipped)",
        rows,
        lambda v: _GOOD if v > 0 else _BAD,
    )
    metrics = list(table[0].metrics)
    head = "".join(f"<th>{e(m)}: Shapley</th><th>Banzhaf</th>" for m in metrics)
    body = []
    for r in table:
        cells = "".join(
            f"<td class='num'>{fmt(*r.metrics[m].shapley)}</td>"
            f"<td class='num'>{fmt(*r.metrics[m].banzhaf)}</td>"
            for m in metrics
        )
        body.append(
            f"<tr><td><code>{e(r.id)}</code></td><td>{e(r.author)}</td>"
            f"<td class='{e(r.status)}'>{e(r.status)}</td>{cells}</tr>"
        )
    return (
        svg
        + "<p class='muted small'>Authors are revealed only here, after every decision.</p>"
        + f"<table><tr><th>contribution</th><th>author</th><th>status</th>{head}</tr>"
        + "".join(body)
        + "</table>"
    )


def _batches_table(result: RoundResult) -> str:
    e = html.escape
    ids = result.round.ids
    rows = []
    for b in result.batches:
        recipes = "<br>".join(
            e(" + ".join(ids[i] for i in sorted(s)) or "baseline")
            + (f" <span class='muted small'>({e(b.why[s])})</span>" if s in b.why else "")
            for s in b.subsets
        )
        rows.append(
            f"<tr><td class='num'>{b.number}</td><td>{e(b.purpose)}</td>"
            f"<td>{e(', '.join(map(str, b.seeds)))}</td><td class='small'>{recipes}</td></tr>"
        )
    return (
        "<table><tr><th>batch</th><th>purpose</th><th>seeds</th><th>recipes</th></tr>"
        f"{''.join(rows)}</table>"
    )


def _runs_table(result: RoundResult) -> str:
    e = html.escape
    ids = result.round.ids
    base = result.round.workspace.resolve(frozenset()).data
    metrics = result.round.metrics
    head = "".join(f"<th>{e(m)}</th>" for m in metrics)
    rows = []
    for p in result.points:
        run = result.runs[p.key]
        seed_free = {k: v for k, v in run.recipe.items() if k != "seed"}
        diff = recipe_diff({k: v for k, v in base.items() if k != "seed"}, seed_free)
        diff_html = "<br>".join(
            f"<code>{e(k)}</code>: {e(json.dumps(old))} &rarr; {e(json.dumps(new))}"
            for k, old, new in diff
        )
        if run.metrics:
            cells = "".join(
                f"<td class='num'>{run.metrics.get(m, float('nan')):.4g}</td>" for m in metrics
            )
        else:
            cells = f"<td colspan='{len(metrics)}' class='failed small'>{e(run.error or '')}</td>"
        tree = (run.provenance or {}).get("tree") or run.code or ""
        rows.append(
            f"<tr><td><code class='small'>{e(p.key)}</code></td>"
            f"<td><code class='small'>{e(tree[:12])}</code></td><td class='num'>{p.batch}</td>"
            f"<td>{e(' + '.join(ids[i] for i in sorted(p.subset)) or 'baseline')}</td>"
            f"<td class='num'>{p.seed}</td><td class='{e(run.status)}'>{e(run.status)}"
            f"{'' if run.round == result.round.name else ' (reused)'}</td>"
            f"{cells}<td class='small'>{diff_html or '&mdash;'}</td></tr>"
        )
    return (
        f"<details open><summary>{len(rows)} runs (recipe diff vs baseline)</summary>"
        f"<table><tr><th>run</th><th>code</th><th>batch</th><th>recipe</th><th>seed</th>"
        "<th>status</th>"
        f"{head}<th>diff vs baseline</th></tr>{''.join(rows)}</table></details>"
    )
