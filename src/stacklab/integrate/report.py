"""Reports of a round: decision.json for programs, report.md for a pull request, HTML for people.

The HTML page is self-contained (inline CSS, inline SVG, no scripts, no external assets), so
it can be mailed, archived or attached to a pull request and still render years later. Every
number in it comes from `RoundResult`; nothing is recomputed here. All three files are
written atomically: a reader sees the old report or the new one, never half of one.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stacklab.fileio import write_atomic

if TYPE_CHECKING:
    from stacklab.integrate.engine import RoundResult

UTILITY = "utility"
_GOOD, _BAD, _NEUTRAL, _INK = "#1a7f37", "#cf222e", "#8c959f", "#1f2328"


def write_reports(result: RoundResult, out: Path) -> None:
    """Write out/decision.json, out/report.md and out/report.html."""
    write_atomic(out / "decision.json", json.dumps(result.decision, indent=2) + "\n")
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


def _fmt(values: Sequence[float | None]) -> str:
    # Sums of many float terms leave 1e-17 where the exact value is 0; show those as 0.
    # None: an unbounded end (no noise estimate yet), written as null in decision.json.
    tol = 1e-9 * max((abs(v) for v in values if v is not None), default=0.0)
    est, low, high = (
        "n/a" if v is None else f"{0.0 if abs(v) <= tol else v:+.3g}" for v in values
    )
    return f"{est} [{low}, {high}]"


# --------------------------------------------------------------------------- markdown


def markdown(result: RoundResult) -> str:
    d = result.decision
    runs = d["runs"]
    lines = [
        f"## Integration round `{d['round']}`",
        "",
        "**Selected:** "
        + (", ".join(f"`{c}`" for c in d["selected"]) or "nothing (keep the baseline)"),
        "",
        "**Predicted change vs baseline:** "
        + "; ".join(f"{m} {_fmt(v)}" for m, v in d["predicted"].items()),
        "",
        f"Runs: {runs['executed']} executed, {runs['reused']} reused from the store, "
        f"{runs['failed']} failed, budget {runs['budget']}; stopped: {d['stopped']}.",
        "",
        "| contribution | area | decision | evidence |",
        "|---|---|---|---|",
    ]
    for row in d["decisions"]:
        lines.append(
            f"| `{row['id']}` | {row['area']} | {_status(row)} | {_md_cell(row['reason'])} |"
        )
    if d["credit_table"]:
        metrics = [m for m in d["credit_table"][0] if m not in ("id", "author", "status")]
        lines += [
            "",
            "### Credit (Shapley value in the final model, 95% interval)",
            "",
            "| contribution | author | status | " + " | ".join(metrics) + " |",
            "|---|---|---|" + "---|" * len(metrics),
        ]
        for row in d["credit_table"]:
            cells = " | ".join(_fmt(row[m]["shapley"]) for m in metrics)
            lines.append(f"| `{row['id']}` | {row['author']} | {row['status']} | {cells} |")
    if d["notes"]:
        lines += ["", "Notes:", *(f"- {note}" for note in d["notes"])]
    return "\n".join(lines) + "\n"


def _shown_path(path: str) -> str:
    """A path under the current folder is shown relative to it (the page is read there)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _status(row: dict[str, Any]) -> str:
    """`shelved (vanishes)`; the kind is not repeated when it only restates the status."""
    kind = row["kind"]
    return row["status"] if kind == row["status"] else f"{row['status']} ({kind})"


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
.accepted{color:#1a7f37;font-weight:600}.shelved{color:#9a6700;font-weight:600}
.failed{color:#cf222e}.muted{color:#656d76}.small{font-size:.85em}
svg{display:block;margin:.5em 0;font:11px system-ui,sans-serif}
details{margin:.3em 0}
"""


def html_page(result: RoundResult) -> str:
    d = result.decision
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>stacklab integrate: {e(d['round'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Integration round <code>{e(d['round'])}</code></h1>",
        f"<p class='muted'>baseline <code>{e(_shown_path(d['baseline']))}</code>; "
        f"{d['runs']['executed']} runs executed, {d['runs']['reused']} reused, "
        f"{d['runs']['failed']} failed (budget {d['runs']['budget']}); stopped: "
        f"{e(d['stopped'])}</p>",
        "<p><b>Selected:</b> "
        + (
            ", ".join(f"<code>{e(c)}</code>" for c in d["selected"])
            or "nothing (keep the baseline)"
        )
        + "</p>",
        _predicted_table(d),
        "<h2>Decisions</h2>",
        _decision_table(d),
        "<h2>Effects, with 95% intervals</h2>",
        "<p class='muted small'>Each contribution alone vs the baseline, seed-paired, on the "
        "screening runs; filled dots are discoveries after false-discovery control across "
        "contributions &times; objectives, hollow ones are not.</p>",
        *(_effects_svg(result, m) for m in result.round.metrics),
        "<h2>Interactions</h2>",
        "<p class='muted small'>Pairwise interaction (the change from running both beyond the "
        "sum of their effects alone). Blank: never run together (choice groups) or not "
        "identified by the runs.</p>",
        *(_interaction_svg(result, o.name) for o in result.round.objectives),
        "<h2>Pareto front</h2>",
        _pareto_svg(result),
        "<h2>Credit</h2>",
        _credit_section(result),
        "<h2>Batches and runs</h2>",
        _batches_table(result),
        _runs_table(result),
    ]
    if d["notes"]:
        parts += ["<h2>Notes</h2><ul>", *(f"<li>{e(n)}</li>" for n in d["notes"]), "</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _predicted_table(d: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td><td class='num'>{_fmt(v)}</td></tr>"
        for m, v in d["predicted"].items()
    )
    return (
        "<table style='width:auto'><tr><th>selected vs baseline</th><th>change [95%]</th></tr>"
        f"{rows}</table>"
    )


def _decision_table(d: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for row in d["decisions"]:
        rows.append(
            f"<tr><td><code>{e(row['id'])}</code><br><span class='muted small'>"
            f"{e(row['blind_id'])}</span></td><td>{e(row['area'])}</td>"
            f"<td>{e(row['summary'])}</td><td class='{e(row['status'])}'>{e(row['status'])}"
            + (
                f"<br><span class='muted small'>{e(row['kind'])}</span>"
                if row["kind"] != row["status"]
                else ""
            )
            + "</td>"
            f"<td>{e(row['reason'])}</td></tr>"
        )
    return (
        "<table><tr><th>contribution</th><th>area</th><th>summary</th><th>decision</th>"
        f"<th>evidence</th></tr>{''.join(rows)}</table>"
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
    rows: Sequence[tuple[str, float, float, float, bool | None]],
    color: Callable[[float], str],
) -> str:
    """Horizontal interval plot: (label, estimate, low, high, filled?) per row."""
    e = html.escape
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
        fill = c if filled or filled is None else "white"
        out.append(
            f'<circle cx="{x(est):.1f}" cy="{y:.1f}" r="4.5" fill="{fill}" stroke="{c}" '
            f'stroke-width="2"><title>{e(label)}: {est:+.4g} [{lo:+.4g}, {hi:+.4g}]'
            "</title></circle>"
        )
    for v, label in x.ticks(_text_px):
        out.append(
            f'<text x="{x(v):.1f}" y="{height - 6}" text-anchor="middle" fill="#656d76">'
            f"{label}</text>"
        )
    out.append("</svg>")
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
            tip = (
                f"{ids[pair[0]]} x {ids[pair[1]]}: {eff.estimate:+.4g} "
                f"[{eff.low:+.4g}, {eff.high:+.4g}]"
            )
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
    table = result.decision["credit_table"]
    if not table:
        return "<p class='muted'>No credit computed (see notes).</p>"
    rows = [
        (f"{r['id']} ({r['author']})", *r[UTILITY]["shapley"], r["status"] == "accepted")
        for r in table
    ]
    svg = _forest(
        "Shapley value for the utility (filled: accepted; hollow: shelved, had it shipped)",
        rows,
        lambda v: _GOOD if v > 0 else _BAD,
    )
    metrics = [m for m in table[0] if m not in ("id", "author", "status")]
    head = "".join(f"<th>{e(m)}: Shapley</th><th>Banzhaf</th>" for m in metrics)
    body = []
    for r in table:
        cells = "".join(
            f"<td class='num'>{_fmt(r[m]['shapley'])}</td>"
            f"<td class='num'>{_fmt(r[m]['banzhaf'])}</td>"
            for m in metrics
        )
        body.append(
            f"<tr><td><code>{e(r['id'])}</code></td><td>{e(r['author'])}</td>"
            f"<td class='{e(r['status'])}'>{e(r['status'])}</td>{cells}</tr>"
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
    base = result.round.baseline.to_dict()
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
        rows.append(
            f"<tr><td><code class='small'>{e(p.key)}</code></td><td class='num'>{p.batch}</td>"
            f"<td>{e(' + '.join(ids[i] for i in sorted(p.subset)) or 'baseline')}</td>"
            f"<td class='num'>{p.seed}</td><td class='{e(run.status)}'>{e(run.status)}"
            f"{'' if run.round == result.round.name else ' (reused)'}</td>"
            f"{cells}<td class='small'>{diff_html or '&mdash;'}</td></tr>"
        )
    return (
        f"<details open><summary>{len(rows)} runs (recipe diff vs baseline)</summary>"
        f"<table><tr><th>run</th><th>batch</th><th>recipe</th><th>seed</th><th>status</th>"
        f"{head}<th>diff vs baseline</th></tr>{''.join(rows)}</table></details>"
    )
