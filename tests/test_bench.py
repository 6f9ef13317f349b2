"""`stacklab bench` gathers the scripts' tables and reports, never hides, a failed script."""

from pathlib import Path

import pytest

from stacklab import bench
from stacklab.errors import StacklabError

ROW = {
    "benchmark": "fake",
    "case": "c",
    "unit": "tokens/s",
    "ours": 1500.0,
    "peer": 1000.0,
    "peer_name": "hf",
    "ratio": 1.5,
    "goal": ">= 1.2x",
    "met": True,
    "note": "",
}


def _script(folder: Path, name: str, body: str) -> None:
    (folder / name).write_text(
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "out = args[args.index('--json') + 1]\n"
        "quick = '--quick' in args\n" + body
    )


def test_suite_runs_in_order_and_collects_rows(tmp_path: Path, monkeypatch) -> None:
    rows = repr([ROW, {**ROW, "case": "d", "met": False}])
    _script(
        tmp_path, "good.py", f"json.dump({{'table': {rows}, 'quick': quick}}, open(out, 'w'))\n"
    )
    _script(tmp_path, "crash.py", "sys.exit(3)\n")
    _script(tmp_path, "notable.py", "json.dump({'x': 1}, open(out, 'w'))\n")
    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path)
    monkeypatch.setattr(
        bench,
        "SUITE",
        (
            bench.Benchmark("good", "good.py"),
            bench.Benchmark("crash", "crash.py"),
            bench.Benchmark("notable", "notable.py"),
        ),
    )
    got, failures = bench.run_suite(quick=True)
    assert [r["case"] for r in got] == ["c", "d"]
    assert failures == ["crash: exit status 3", "notable: no result table in its JSON ('table')"]
    got, failures = bench.run_suite(["good"])
    assert len(got) == 2 and failures == []
    with pytest.raises(StacklabError, match="unknown benchmark 'nope'; the benchmarks are: good"):
        bench.run_suite(["nope"])


def test_markdown_table() -> None:
    text = bench.markdown_table([ROW, {**ROW, "peer": None, "ratio": None, "met": None}])
    assert "| fake | c | tokens/s | 1,500 | 1,000 (hf) | 1.50× | >= 1.2x | yes |" in text
    assert "| fake | c | tokens/s | 1,500 |  |  | >= 1.2x |  |" in text


def test_every_suite_script_exists() -> None:
    for b in bench.SUITE:
        assert (bench.BENCH_DIR / b.script).is_file(), b.script
