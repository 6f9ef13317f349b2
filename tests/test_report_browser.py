"""The HTML report of a real round, rendered in headless Chromium.

The report is the page people read to decide what ships, so it must render: no console or
page errors, every section present and drawn, no text clipped by its chart or printed over
other text, no request for anything outside the page, and a screenshot that is a real
picture (not blank). Needs the `playwright` Python package and a Chromium binary
(/usr/bin/chromium, or STACKLAB_CHROMIUM); skipped without them, unless
STACKLAB_REQUIRE_BROWSER=1, which turns a missing browser into a failure (CI sets it).

STACKLAB_REPORT_PNG=PATH also saves a screenshot of the top of the page there, to look at. That
page is this test's round (four made-up contributions, a stand-in trainer), not the demo's:
docs/img/report.png, which the README shows, is a screenshot of the demo round's
runs/demo/report.html, and no test makes it.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from integrate_sim.scenarios import Scenario, write_round
from stacklab.integrate.engine import RoundResult, integrate
from test_integrate_engine import REPORT_SECTIONS

pytestmark = pytest.mark.slow  # starts Chromium (seconds)

CHROMIUM = os.environ.get("STACKLAB_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("STACKLAB_REQUIRE_BROWSER") == "1"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
]
WIDTH = 1200
GOOD, BAD = (0x1A, 0x7F, 0x37), (0xCF, 0x22, 0x2E)  # report.py's colours for good and bad
SECTIONS = list(REPORT_SECTIONS)


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"STACKLAB_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def two_objectives() -> Scenario:
    """Two objectives and a guarded metric, so every chart of the report has something to draw.

    qk-norm and wsd-schedule belong; lr-up loses its gain next to wsd-schedule (a negative
    interaction); long-warmup costs 20% speed against a 90% guardrail. Hyphenated, longer ids
    exercise the label layout.
    """
    return Scenario(
        contributions={
            "qk-norm": ("architecture", "model.qk_norm", False),
            "lr-up": ("optimizer", "optim.lr", 0.006),
            "long-warmup": ("optimizer", "optim.warmup_steps", 40),
            "wsd-schedule": ("optimizer", "optim.schedule", "wsd"),
        },
        metrics={
            "quality": {
                "base": 5.0,
                "main": {"qk-norm": 0.6, "lr-up": 0.8, "long-warmup": 0.0, "wsd-schedule": 0.5},
                "pairs": [["lr-up", "wsd-schedule", -1.0]],
                "noise": 0.1,
                "seed_sd": 0.3,
            },
            "latency": {
                "base": 50.0,
                "main": {"qk-norm": 2.0, "wsd-schedule": -3.0},
                "noise": 0.3,
                "seed_sd": 1.0,
            },
            "speed": {"base": 100.0, "ratio": {"long-warmup": 0.8}, "noise": 1.0, "seed_sd": 2.0},
        },
        objectives=[
            {"metric": "quality", "direction": "max", "weight": 2.0},
            {"metric": "latency", "direction": "min"},
        ],
        guardrails=[{"metric": "speed", "kind": "ratio", "threshold": 0.9}],
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[RoundResult, Path]:
    """A real round through the engine and the external stand-in trainer, and its page."""
    root = tmp_path_factory.mktemp("browser")
    round_file = write_round(root / "round", two_objectives(), budget=40, seeds=2, confirm_seeds=2)
    result = integrate(round_file, root / "out", console=Console(file=io.StringIO()))
    return result, root / "out" / "report.html"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium through Playwright, started once for the module (about a second)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium, or STACKLAB_CHROMIUM)")
    with sync_playwright() as p:
        try:
            chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30_000)
        except Exception as err:  # a browser that cannot start here: a missing library, etc.
            _unavailable(f"Chromium at {CHROMIUM} does not start: {err}")
        yield chromium
        chromium.close()


class Visit:
    """One page load with everything the page said and asked for along the way."""

    def __init__(self, browser: Any, url: str) -> None:
        self.context = browser.new_context(viewport={"width": WIDTH, "height": 800})
        self.console: list[str] = []
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page = self.context.new_page()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda err: self.errors.append(str(err)))
        self.page.on("request", lambda req: self.requests.append(req.url))
        self.page.on("requestfailed", lambda req: self.errors.append(f"failed: {req.url}"))
        # Nothing may leave the machine, even when a check fails.
        self.context.route("**/*", self._only_files)
        self.page.goto(url, wait_until="load")

    def _console(self, msg: Any) -> None:
        if msg.type in ("error", "warning", "assert"):
            self.console.append(f"{msg.type}: {msg.text}")

    @staticmethod
    def _only_files(route: Any) -> None:
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            route.abort()

    def close(self) -> None:
        self.context.close()


# Per chart: text that lies outside its <svg> (clipped) or over other text.
LAYOUT_JS = """() => {
  const problems = [];
  const over = (a, b) => a.left < b.right - 1 && b.left < a.right - 1 &&
                         a.top < b.bottom - 1 && b.top < a.bottom - 1;
  for (const svg of document.querySelectorAll('svg')) {
    const box = svg.getBoundingClientRect();
    const name = svg.getAttribute('aria-label');
    const texts = [...svg.querySelectorAll('text')].map(t => [t, t.getBoundingClientRect()]);
    for (const [t, r] of texts) {
      if (r.width === 0) problems.push(`${name}: "${t.textContent}" has no width`);
      if (r.left < box.left - 1 || r.right > box.right + 1 ||
          r.top < box.top - 1 || r.bottom > box.bottom + 1)
        problems.push(`${name}: "${t.textContent}" is clipped`);
    }
    const level = texts.filter(([t]) => !t.hasAttribute('transform'));
    for (let i = 0; i < level.length; i++)
      for (let j = i + 1; j < level.length; j++)
        if (over(level[i][1], level[j][1]))
          problems.push(`${name}: "${level[i][0].textContent}" overlaps ` +
                        `"${level[j][0].textContent}"`);
  }
  return problems;
}"""

# The parts of the page, as drawn: sections, charts, table sizes.
PARTS_JS = """() => {
  const rows = el => el ? el.querySelectorAll('tr').length - 1 : -1;
  const after = text => {
    const h = [...document.querySelectorAll('h2')].find(h => h.textContent === text);
    let el = h && h.nextElementSibling;
    while (el && el.tagName !== 'TABLE' && el.tagName !== 'H2') el = el.nextElementSibling;
    return el && el.tagName === 'TABLE' ? el : null;
  };
  const svgs = [...document.querySelectorAll('svg')].map(s => {
    const r = s.getBoundingClientRect();
    return {label: s.getAttribute('aria-label'), width: r.width, height: r.height,
            circles: s.querySelectorAll('circle').length,
            filled: [...s.querySelectorAll('rect')].filter(
              x => x.getAttribute('fill') !== '#f6f8fa').length,
            texts: [...s.querySelectorAll('text')].map(t => t.textContent)};
  });
  const runs = document.querySelector('details');
  const runTable = runs && runs.querySelector('table');
  return {
    h2: [...document.querySelectorAll('h2')].map(h => h.textContent),
    decisionRows: (after('Decisions') || document.createElement('table'))
                    .querySelectorAll(':scope > tbody > tr.decision').length,
    statuses: [...(after('Decisions') || document.createElement('table'))
                 .querySelectorAll(':scope > tbody > tr.decision > td:nth-child(4)')]
                 .map(td => [td.className, td.firstChild.textContent]),
    evidenceTables: (after('Decisions') || document.createElement('table'))
                      .querySelectorAll('table.ev').length,
    statusColours: Object.fromEntries(['accepted', 'shelved', 'undecided'].map(c => {
      const td = document.createElement('td');
      td.className = c;
      document.body.appendChild(td);
      const colour = getComputedStyle(td).color;
      td.remove();
      return [c, colour];
    })),
    guardrailStates: (after('Guardrails on the final recipe') || document.createElement('table'))
                       .querySelectorAll('td.held, td.breached, td.open').length,
    svgs,
    runsOpen: !!(runs && runs.open),
    runsSummary: runs ? runs.querySelector('summary').textContent : '',
    runRows: rows(runTable),
    diffs: runTable ? [...runTable.querySelectorAll('tr td:last-child')].map(
      td => td.textContent) : [],
    scrollWidth: document.documentElement.scrollWidth,
    scrollHeight: document.documentElement.scrollHeight,
  };
}"""

# Decode a PNG the way a reader's browser would, and measure what is on it.
PIXELS_JS = """async ([b64, good, bad]) => {
  const img = new Image();
  img.src = 'data:image/png;base64,' + b64;
  await img.decode();
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  const near = (i, rgb) => Math.abs(d[i] - rgb[0]) + Math.abs(d[i + 1] - rgb[1]) +
                           Math.abs(d[i + 2] - rgb[2]) < 24;
  const colours = new Set();
  let n = 0, ink = 0, goodPx = 0, badPx = 0;
  for (let i = 0; i < d.length; i += 4) {
    n++;
    colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
    if (d[i] + d[i + 1] + d[i + 2] < 600) ink++;
    if (near(i, good)) goodPx++;
    if (near(i, bad)) badPx++;
  }
  return {width: c.width, height: c.height, colours: colours.size, ink: ink / n,
          good: goodPx, bad: badPx};
}"""


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a well-formed 8-bit RGB(A) PNG; fails on any broken chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
        if kind == b"IEND":
            break
    assert header is not None and pos == len(data), "no IHDR, or bytes after IEND"
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    channels = 3 if colour == 2 else 4
    assert len(zlib.decompress(idat)) == height * (1 + width * channels), "truncated pixels"
    return width, height


def test_report_renders_in_chromium(
    browser: Any, report: tuple[RoundResult, Path], tmp_path: Path
) -> None:
    """The report of a real round loads cleanly, shows every part, and draws legibly."""
    # `browser` comes first: without one, skip before paying for the round.
    result, page_file = report
    d = result.decision
    url = page_file.resolve().as_uri()
    visit = Visit(browser, url)
    try:
        assert visit.errors == [] and visit.console == []
        assert visit.requests == [url], "the page must be self-contained"

        parts = visit.page.evaluate(PARTS_JS)
        # Sections, in order (Notes may follow).
        assert parts["h2"][: len(SECTIONS)] == SECTIONS
        # The decision table: one row per contribution, with its decision.
        ids = result.round.ids
        assert parts["decisionRows"] == len(ids)
        statuses = [text for _, text in parts["statuses"]]
        assert all(cls == text for cls, text in parts["statuses"]), parts["statuses"]
        assert sorted(statuses) == sorted(row.status for row in d.decisions)
        assert {"accepted", "shelved"} <= set(statuses)
        # The comparisons behind each decision, and a colour of its own for each status.
        assert parts["evidenceTables"] == sum(bool(row.evidence) for row in d.decisions)
        assert len(set(parts["statusColours"].values())) == 3, parts["statusColours"]
        assert parts["guardrailStates"] == len(d.guardrail_checks) >= 1

        charts = {s["label"]: s for s in parts["svgs"]}
        assert len(charts) == len(parts["svgs"]) == 7, list(charts)
        for chart in parts["svgs"]:
            assert chart["width"] > 200 and chart["height"] > 80, chart
        # Effects: one interval plot per metric (objectives and the guarded one), a dot each.
        for metric, kind in [
            ("quality", "objective, higher"),
            ("latency", "objective, lower"),
            ("speed", "guarded metric, higher"),
        ]:
            chart = charts[f"{metric} ({kind} is better)"]
            assert chart["circles"] == len(ids)
            assert [t for t in chart["texts"] if t in ids] == ids
        # Interactions: a matrix per objective, every identified pair coloured (both halves).
        for metric in ("quality", "latency"):
            chart = charts[f"interactions on {metric}"]
            inter = result.views.full[metric].interactions.values()
            assert chart["filled"] == 2 * sum(x.identified for x in inter) > 0, chart
            assert sum(t in ids for t in chart["texts"]) == 2 * len(ids)  # rows and columns
        # The Pareto front: every estimable candidate, the selected one labelled.
        pareto = charts["Pareto front"]
        assert pareto["circles"] == sum(c.estimable for c in result.choice.candidates) > 2
        assert "selected" in pareto["texts"]
        # Credit: one bar per contribution, authors shown.
        credit = next(s for label, s in charts.items() if label.startswith("Shapley value"))
        assert credit["circles"] == len(ids)
        assert {f"{cid} (author-of-{cid})" for cid in ids} <= set(credit["texts"])
        # Runs: every run, open, with its recipe diff against the baseline.
        assert parts["runsOpen"] and parts["runRows"] == d.runs.total
        assert parts["runsSummary"].startswith(f"{d.runs.total} runs")
        diffs = parts["diffs"]
        assert diffs.count("\u2014") >= 2  # baseline runs: no diff
        assert any("optim.lr: 0.003 \u2192 0.006" in t for t in diffs), diffs[:8]
        assert any('optim.schedule: "cosine" \u2192 "wsd"' in t for t in diffs)

        # Drawn legibly: no clipped or overprinted text, no sideways scrolling.
        assert visit.page.evaluate(LAYOUT_JS) == []
        assert parts["scrollWidth"] <= WIDTH

        # The screenshot is a real, whole picture of the page with the charts' colours on it.
        shot = visit.page.screenshot(full_page=True, type="png")
        (tmp_path / "report.png").write_bytes(shot)
        assert len(shot) > 50_000
        assert png_size(shot) == (WIDTH, parts["scrollHeight"])
        assert 1500 < parts["scrollHeight"] < 20_000
        pixels = visit.page.evaluate(PIXELS_JS, [base64.b64encode(shot).decode(), GOOD, BAD])
        assert (pixels["width"], pixels["height"]) == (WIDTH, parts["scrollHeight"])
        assert pixels["colours"] > 100, pixels  # text antialiasing, fills, greys
        assert 0.01 < pixels["ink"] < 0.5, pixels  # mostly paper, some ink
        assert pixels["good"] > 200 and pixels["bad"] > 200, pixels  # green and red marks

        if os.environ.get("STACKLAB_REPORT_PNG"):
            # From the title down to the Pareto front: the part a reader decides on.
            credit = "[...document.querySelectorAll('h2')].find(h => h.textContent === 'Credit')"
            bottom = visit.page.evaluate(f"{credit}.getBoundingClientRect().top + scrollY")
            clip = {"x": 0, "y": 0, "width": WIDTH, "height": int(bottom) - 8}
            path = os.environ["STACKLAB_REPORT_PNG"]
            visit.page.screenshot(path=path, clip=clip, full_page=True)
        # Nothing asked for along the way either (the screenshot, the decoding).
        assert visit.errors == [] and visit.console == []
        assert visit.requests == [url]
    finally:
        visit.close()


def test_the_checks_catch_a_broken_page(browser: Any, tmp_path: Path) -> None:
    """The same checks on a page with a script error and a remote image: both are caught."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>x</title></head><body>"
        "<img src='https://example.invalid/logo.png' alt=''>"
        "<script>no_such_function()</script>"
        "<svg width='40' height='20'><text x='30' y='15'>clipped</text></svg>"
        "</body></html>"
    )
    visit = Visit(browser, bad.as_uri())
    try:
        assert any("no_such_function" in e for e in visit.errors), visit.errors
        assert "https://example.invalid/logo.png" in visit.requests
        assert any("example.invalid" in e for e in visit.errors)  # aborted, never sent
        assert visit.page.evaluate(LAYOUT_JS) == ['null: "clipped" is clipped']
    finally:
        visit.close()
