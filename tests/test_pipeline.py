"""The content-addressed stage cache, on toy stages (fast); the real stages are in test_build."""

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stacklab.pipeline import MARKER, Stage, StageContext, build, stage_keys
from stacklab.recipe import Recipe, apply_overrides


def toy_stages(
    calls: list[str], fail_in: str | None = None, hang_at: Path | None = None
) -> list[Stage]:
    def run_a(ctx: StageContext) -> dict:
        calls.append("a")
        if hang_at is not None:
            (ctx.out / "a.txt").write_text("half")  # partly written ...
            hang_at.write_text("x")
            time.sleep(600)  # ... when the SIGKILL arrives
        (ctx.out / "a.txt").write_text(str(ctx.recipe.seed))
        return {"a/seed": ctx.recipe.seed}

    def run_b(ctx: StageContext) -> dict:
        calls.append("b")
        if fail_in == "b":
            (ctx.out / "half.txt").write_text("partial")
            raise RuntimeError("boom")
        seed = int((ctx.inputs["a"] / "a.txt").read_text())
        value = seed * 1000 + ctx.recipe.tokenizer.vocab_size
        (ctx.out / "b.txt").write_text(str(value))
        return {"b/value": value}

    return [
        Stage("a", 1, (), lambda r: {"seed": r.seed}, run_a),
        Stage("b", 1, ("a",), lambda r: r.tokenizer.model_dump(), run_b),
    ]


def test_second_build_is_a_noop(tmp_path: Path) -> None:
    calls: list[str] = []
    first = build(Recipe(), tmp_path / "run1", toy_stages(calls), tmp_path / "cache")
    assert calls == ["a", "b"]
    assert not any(s.cached for s in first.stages)
    second = build(Recipe(), tmp_path / "run1", toy_stages(calls), tmp_path / "cache")
    assert calls == ["a", "b"]
    assert all(s.cached for s in second.stages)
    assert second.metrics == first.metrics == {"a/seed": 0, "b/value": 4096}


def test_run_directory_contents(tmp_path: Path) -> None:
    out = tmp_path / "run"
    build(Recipe(), out, toy_stages([]), tmp_path / "cache")
    assert json.loads((out / "metrics.json").read_text()) == {"a/seed": 0, "b/value": 4096}
    assert (out / "a").is_symlink() and (out / "a" / "a.txt").read_text() == "0"
    assert (out / "b" / MARKER).is_file()
    report = json.loads((out / "build.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["a", "b"]
    assert "vocab_size: 4096" in (out / "recipe.yaml").read_text()


def test_late_change_reuses_early_stages(tmp_path: Path) -> None:
    calls: list[str] = []
    build(Recipe(), tmp_path / "r1", toy_stages(calls), tmp_path / "cache")
    changed = apply_overrides(Recipe(), ["tokenizer.vocab_size=512"])
    result = build(changed, tmp_path / "r2", toy_stages(calls), tmp_path / "cache")
    assert calls == ["a", "b", "b"]
    assert [s.cached for s in result.stages] == [True, False]
    assert result.metrics["b/value"] == 512
    # Both runs point at the same early output.
    assert (tmp_path / "r1" / "a").resolve() == (tmp_path / "r2" / "a").resolve()


def test_early_change_invalidates_dependents(tmp_path: Path) -> None:
    stages = toy_stages([])
    k0 = stage_keys(Recipe(), stages)
    k1 = stage_keys(apply_overrides(Recipe(), ["seed=1"]), stages)
    assert k0["a"] != k1["a"] and k0["b"] != k1["b"]


def test_failed_stage_leaves_nothing_complete(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="boom"):
        build(Recipe(), tmp_path / "run", toy_stages([], fail_in="b"), cache)
    key = stage_keys(Recipe(), toy_stages([]))["b"]
    assert not (cache / "b" / key).exists()
    assert list((cache / "b").glob(f"{key}.tmp-*"))  # the half-written attempt
    calls: list[str] = []
    result = build(Recipe(), tmp_path / "run", toy_stages(calls), cache)
    assert calls == ["b"]
    assert result.metrics["b/value"] == 4096
    assert not list((cache / "b").glob(f"{key}.tmp-*"))  # cleaned up on the re-run


def test_directory_without_marker_is_rebuilt(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    key = stage_keys(Recipe(), toy_stages([]))["a"]
    fake = cache / "a" / key
    fake.mkdir(parents=True)
    (fake / "a.txt").write_text("garbage")
    calls: list[str] = []
    build(Recipe(), tmp_path / "run", toy_stages(calls), cache)
    assert calls == ["a", "b"]
    assert (fake / "a.txt").read_text() == "0"


def test_until_stops_early_and_rejects_unknown(tmp_path: Path) -> None:
    calls: list[str] = []
    result = build(Recipe(), tmp_path / "run", toy_stages(calls), tmp_path / "c", until="a")
    assert calls == ["a"] and [s.name for s in result.stages] == ["a"]
    with pytest.raises(Exception, match="unknown stage 'z'"):
        build(Recipe(), tmp_path / "run", toy_stages(calls), tmp_path / "c", until="z")


# The toy stages come from this file, so that the killed build's stage has the same key (its
# code is part of it) as the one the test re-runs.
KILLED_BUILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    sys.path.insert(0, sys.argv[3])
    from stacklab.pipeline import build
    from stacklab.recipe import Recipe
    from test_pipeline import toy_stages

    cache, ready = Path(sys.argv[1]), Path(sys.argv[2])
    build(Recipe(), cache.parent / "run", toy_stages([], hang_at=ready)[:1], cache)
    """
)


def test_build_killed_mid_stage_completes_on_rerun(tmp_path: Path) -> None:
    cache, ready = tmp_path / "cache", tmp_path / "ready"
    here = str(Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(cache), str(ready), here])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, "the build exited before reaching the stage"
            assert time.monotonic() < deadline, "the stage never started"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    key = stage_keys(Recipe(), toy_stages([]))["a"]
    assert not (cache / "a" / key).exists()  # nothing half-written is taken as done
    assert list((cache / "a").glob(f"{key}.tmp-*"))  # the killed attempt, under the same key

    calls: list[str] = []
    result = build(Recipe(), tmp_path / "run", toy_stages(calls), cache)
    assert calls == ["a", "b"]
    assert (tmp_path / "run" / "a" / "a.txt").read_text() == "0"
    assert result.metrics == {"a/seed": 0, "b/value": 4096}
    assert not list((cache / "a").glob("*.tmp-*"))


def test_resumable_stage_keeps_its_work_directory(tmp_path: Path) -> None:
    attempts: list[list[str]] = []

    def run(ctx: StageContext) -> dict:
        seen = sorted(p.name for p in ctx.out.iterdir())
        attempts.append(seen)
        (ctx.out / f"ckpt{len(attempts)}").write_text("x")
        if len(attempts) == 1:
            raise RuntimeError("killed")
        return {"resumed_from": len(seen)}

    stage = [Stage("train", 1, (), lambda r: {}, run, resumable=True)]
    with pytest.raises(RuntimeError):
        build(Recipe(), tmp_path / "run", stage, tmp_path / "cache")
    result = build(Recipe(), tmp_path / "run", stage, tmp_path / "cache")
    assert attempts == [[], ["ckpt1"]]
    assert result.metrics == {"resumed_from": 1}
    assert not list((tmp_path / "cache" / "train").glob("*.partial"))


def test_editing_a_stage_module_changes_its_key_and_its_dependents_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key covers the code: the run's module and what it imports, however deep."""
    pkg = tmp_path / "toy_code_pkg"
    pkg.mkdir()
    files = {
        "__init__.py": "",
        "helper.py": "FACTOR = 2\n",
        "stage_a.py": "from .helper import FACTOR\n\ndef run(ctx):\n    return {'a': FACTOR}\n",
        "stage_b.py": "def run(ctx):\n    return {}\n",
        # imported inside the function only
        "stage_c.py": "def run(ctx):\n    from toy_code_pkg import extra\n    return {}\n",
        "extra.py": "X = 1\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        run = {n: importlib.import_module(f"toy_code_pkg.stage_{n}").run for n in "abc"}
    finally:  # the functions keep their modules; sys.modules need not
        for name in [m for m in sys.modules if m.partition(".")[0] == "toy_code_pkg"]:
            del sys.modules[name]
    stages = [
        Stage("a", 1, (), lambda r: {}, run["a"]),
        Stage("b", 1, ("a",), lambda r: {}, run["b"]),
        Stage("c", 1, (), lambda r: {}, run["c"]),
    ]
    k0 = stage_keys(Recipe(), stages)
    assert stage_keys(Recipe(), stages) == k0

    (pkg / "helper.py").write_text("FACTOR = 3\n")  # a helper of a's (a relative import)
    k1 = stage_keys(Recipe(), stages)
    assert k1["a"] != k0["a"] and k1["b"] != k0["b"]  # a, and b that reads a's output
    assert k1["c"] == k0["c"]

    (pkg / "extra.py").write_text("X = 2\n")  # imported inside c's function
    k2 = stage_keys(Recipe(), stages)
    assert k2["c"] != k1["c"] and (k2["a"], k2["b"]) == (k1["a"], k1["b"])

    (pkg / "stage_b.py").write_text(files["stage_b.py"] + "# a comment counts too\n")
    k3 = stage_keys(Recipe(), stages)
    assert k3["b"] != k2["b"] and (k3["a"], k3["c"]) == (k2["a"], k2["c"])
