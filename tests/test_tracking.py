"""Experiment tracking (tracking.py): the recipe's `log.trackers` sends every stage's metrics to
TensorBoard, W&B (offline) and trackio as well as metrics.jsonl, which stays the record; a
round's `tracking:` logs each finished run, tagged with its subset and seed.

The backends are optional (`stacklab[track]`): their tests skip when one is missing, and fail
instead when STACKLAB_REQUIRE_TRACK=1. Nothing here touches the network.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import struct
import sys
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from rich.console import Console

from helpers import SMALL_MODEL, skip_or_fail, small_recipe
from integrate_sim.scenarios import small, write_round
from stacklab import tracking
from stacklab.errors import StacklabError
from stacklab.integrate.configs import RecipeBaseline
from stacklab.integrate.engine import integrate
from stacklab.integrate.store import RunStore
from stacklab.pipeline import build, stage_keys
from stacklab.recipe import apply_overrides, load_recipe, recipe_from_dict
from stacklab.stages import STAGES
from stacklab.tracking import RoundTracker, Tracker, TrackingWarning
from stacklab.train.log import MetricsLog, read_log
from stacklab.train.pretrain import pretrain
from test_posttrain_build import POST
from test_pretrain import make_shards, one_thread, tiny_recipe  # noqa: F401 (a fixture)

REQUIRE = "STACKLAB_REQUIRE_TRACK"
EXTRA = "pip install 'stacklab[track]'"


@pytest.fixture(autouse=True)
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B's own settings, cache and logs in the test's folder, not the user's home."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


def need(module: str) -> Any:
    """Import a tracker's package, or skip (fail under STACKLAB_REQUIRE_TRACK=1)."""
    if importlib.util.find_spec(module) is None:
        skip_or_fail(REQUIRE, f"{module} is not installed ({EXTRA})")
    return importlib.import_module(module)


def tb_run(folder: Path) -> Any:
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def tb_scalars(acc: Any) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_config(acc: Any) -> dict[str, Any]:
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    return json.loads(text.strip("`\n"))


def expected(records: list[dict], stage: str, f32: bool) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as tag -> [(step, value)]; TensorBoard keeps float32."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key != "step":
                v = float(np.float32(value)) if f32 else value
                out.setdefault(f"{stage}/{key}", []).append((r["step"], v))
    return out


def wandb_records(run_file: Path) -> list[Any]:
    """The records of a W&B run file (`run-<id>.wandb`): a 7-byte header, then LevelDB-log
    chunks (crc 4, length 2, type 1) in 32 KiB blocks, each record a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little left in the block for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def wandb_run(folder: Path) -> tuple[Any, list[dict[str, Any]]]:
    """(run record, history rows) of the one offline run under `folder/wandb`."""
    need("wandb")
    (run_file,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    rows = [
        {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    return run, rows


def wandb_config(run: Any) -> dict[str, Any]:
    return {u.key: json.loads(u.value_json) for u in run.config.update}


# --------------------------------------------------------------------------- stages


def test_tensorboard_scalars_equal_metrics_jsonl_and_resume_drops_the_lost_steps(
    tmp_path: Path,
) -> None:
    need("tensorboard")
    shards = make_shards(tmp_path / "shards")
    recipe = tiny_recipe(log={"trackers": ["tensorboard"]})
    pretrain(recipe, shards, tmp_path / "clean")
    records = read_log(tmp_path / "clean" / "metrics.jsonl")
    acc = tb_run(tmp_path / "clean" / "tensorboard")
    assert tb_scalars(acc) == expected(records, "pretrain", f32=True)
    assert {"pretrain/loss", "pretrain/lr", "pretrain/mfu"} <= set(tb_scalars(acc))
    config = tb_config(acc)
    assert config["stage"] == "pretrain" and config["recipe_hash"] == recipe.hash()

    class Crash(Exception):
        pass

    def crash(step: int, _: object) -> None:
        if step == 6:  # after step 6 is logged; the last checkpoint is step 4
            raise Crash

    with pytest.raises(Crash):
        pretrain(recipe, shards, tmp_path / "crashed", on_step=crash)
    pretrain(recipe, shards, tmp_path / "crashed")
    resumed = tb_scalars(tb_run(tmp_path / "crashed" / "tensorboard"))
    assert [s for s, _ in resumed["pretrain/loss"]] == list(range(1, 13))  # 5, 6 once each
    assert resumed["pretrain/loss"] == tb_scalars(acc)["pretrain/loss"]


@pytest.mark.slow
def test_wandb_offline_run_holds_every_logged_metric(tmp_path: Path) -> None:
    need("wandb")
    shards = make_shards(tmp_path / "shards")
    recipe = tiny_recipe(log={"trackers": ["wandb"], "project": "stacklab-test"})
    pretrain(recipe, shards, tmp_path / "work")
    records = read_log(tmp_path / "work" / "metrics.jsonl")
    run, rows = wandb_run(tmp_path / "work")
    assert run.project == "stacklab-test" and run.job_type == "pretrain"
    assert run.display_name == f"unnamed-{recipe.hash()[:8]}/pretrain"
    config = wandb_config(run)
    assert config["stage"] == "pretrain" and config["model"]["depth"] == 2
    logged = {row["_step"]: row for row in rows}
    assert sorted(logged) == [r["step"] for r in records]
    for r in records:
        row = logged[r["step"]]
        assert {k: row[f"pretrain/{k}"] for k in r if k != "step"} == {
            k: v for k, v in r.items() if k != "step"
        }


def test_trackio_run_holds_every_logged_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio loads
    need("trackio")
    from trackio import utils
    from trackio.sqlite_storage import SQLiteStorage

    project = f"stacklab-test-{uuid.uuid4().hex[:8]}"
    shards = make_shards(tmp_path / "shards")
    recipe = tiny_recipe(log={"trackers": ["trackio"], "project": project})
    try:
        pretrain(recipe, shards, tmp_path / "work")
        records = read_log(tmp_path / "work" / "metrics.jsonl")
        (name,) = SQLiteStorage.get_runs(project)
        assert name == f"unnamed-{recipe.hash()[:8]}/pretrain"
        logs = {row["step"]: row for row in SQLiteStorage.get_logs(project, name)}
        assert sorted(logs) == [r["step"] for r in records]
        for r in records:
            assert all(logs[r["step"]][f"pretrain/{k}"] == v for k, v in r.items() if k != "step")
    finally:
        for file in Path(utils.TRACKIO_DIR).glob(f"{project}*"):
            file.unlink()


def test_every_stage_prefix_and_log_dir(tmp_path: Path) -> None:
    """SFT and RL log through the same MetricsLog, under their own prefix; `log.dir` gathers
    every build's files by recipe and stage."""
    need("tensorboard")
    recipe = tiny_recipe(log={"trackers": ["tensorboard"], "dir": str(tmp_path / "tb")})
    (tmp_path / "sft").mkdir()
    with MetricsLog(tmp_path / "sft", 0, True, "sft", recipe) as log:
        log.write({"step": 1, "loss": 2.5, "lr": 1e-3})
        log.write({"step": 2, "loss": 2.0, "lr": 1e-3})
    assert not (tmp_path / "sft" / "tensorboard").exists()
    folder = tmp_path / "tb" / f"unnamed-{recipe.hash()[:8]}" / "sft" / "tensorboard"
    assert tb_scalars(tb_run(folder)) == {
        "sft/loss": [(1, 2.5), (2, 2.0)],
        "sft/lr": [(1, float(np.float32(1e-3))), (2, float(np.float32(1e-3)))],
    }
    # Rank > 0 writes nothing, and opens no tracker.
    with MetricsLog(tmp_path / "rank1", 0, False, "rl", recipe) as log:
        log.write({"step": 1, "loss": 1.0})
    assert not (tmp_path / "rank1").exists()


@pytest.mark.slow
def test_a_build_logs_pretrain_sft_and_rl_and_shares_the_untracked_cache(tmp_path: Path) -> None:
    need("tensorboard")
    sections = {**SMALL_MODEL, **POST, "log": {"trackers": ["tensorboard"]}}
    tracked = load_recipe(small_recipe(tmp_path, sections))
    cache = tmp_path / "cache"
    result = build(tracked, tmp_path / "run", STAGES, cache, until="rl")
    for stage in ("pretrain", "sft", "rl"):
        records = read_log(tmp_path / "run" / stage / "metrics.jsonl")
        acc = tb_run(tmp_path / "run" / stage / "tensorboard")
        assert tb_scalars(acc) == expected(records, stage, f32=True)
    assert "log:" in (tmp_path / "run" / "recipe.yaml").read_text()
    plain = recipe_from_dict(tracked.to_dict())  # the same recipe, without log
    again = build(plain, tmp_path / "plain", STAGES, cache, until="rl")
    assert [s.key for s in again.stages] == [s.key for s in result.stages]
    assert all(s.cached for s in again.stages)


class Boom(Tracker):
    """A backend that fails at `fail_on` ("init", "log" or "close")."""

    fail_on = "log"
    logged: ClassVar[list[int]] = []

    def __init__(self, *_: object, **__: object) -> None:
        if self.fail_on == "init":
            raise OSError("disk full")

    def log(self, metrics: Mapping[str, Any], step: int, stage: str) -> None:
        Boom.logged.append(step)
        if self.fail_on == "log" and step >= 3:
            raise OSError("disk full")

    def close(self) -> None:
        if self.fail_on == "close":
            raise OSError("disk full")


@pytest.mark.parametrize("fail_on", ["init", "log", "close"])
def test_a_failing_tracker_warns_once_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_on: str
) -> None:
    monkeypatch.setitem(tracking.MODULES, "wandb", "json")  # installed or not
    monkeypatch.setitem(tracking.BACKENDS, "wandb", Boom)
    monkeypatch.setattr(Boom, "fail_on", fail_on)
    monkeypatch.setattr(Boom, "logged", [])
    shards = make_shards(tmp_path / "shards")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = pretrain(tiny_recipe(log={"trackers": ["wandb"]}), shards, tmp_path / "work")
    ours = [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(ours) == 1
    assert "tracker 'wandb' failed (OSError: disk full)" in str(ours[0].message)
    assert "metrics.jsonl is still written" in str(ours[0].message)
    assert [r["step"] for r in read_log(tmp_path / "work" / "metrics.jsonl")] == list(range(1, 13))
    assert metrics["pretrain/tokens"] > 0
    assert Boom.logged == {"init": [], "log": [1, 2, 3], "close": list(range(1, 13))}[fail_on]


def test_a_missing_package_is_a_one_line_error_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    shards = make_shards(tmp_path / "shards")
    recipe = tiny_recipe(log={"trackers": ["wandb", "tensorboard"]})
    monkeypatch.setitem(tracking.MODULES, "wandb", "json")
    with pytest.raises(StacklabError) as err:
        pretrain(recipe, shards, tmp_path / "work")
    assert str(err.value) == f"recipe key log.trackers: 'tensorboard' needs {EXTRA}"
    assert not (tmp_path / "work" / "metrics.jsonl").exists()
    with pytest.raises(StacklabError, match=r"^round key tracking.trackers: 'tensorboard' needs"):
        RoundTracker(["tensorboard"], tmp_path, "p", "r")


def test_trackers_change_no_hash_stage_key_or_run_identity(tmp_path: Path) -> None:
    path = small_recipe(tmp_path)
    plain = load_recipe(path)
    tracked_file = tmp_path / "tracked.yaml"
    tracked_file.write_text(
        f"base: {path.name}\nlog: {{trackers: [tensorboard, wandb], project: p, dir: tb}}\n"
    )
    tracked = load_recipe(tracked_file)
    assert tracked.log.trackers == ["tensorboard", "wandb"]
    assert tracked.log.dir == tmp_path / "tb"  # relative to the recipe file, like data paths
    assert tracked.hash() == plain.hash()
    assert tracked.to_dict() == plain.to_dict() and "log" not in plain.to_dict()
    assert stage_keys(tracked, STAGES) == stage_keys(plain, STAGES)
    assert RecipeBaseline(tracked).data() == RecipeBaseline(plain).data()  # a round's run key
    assert tracked.section_hash("model") == plain.section_hash("model")
    assert tracked.section_hash("log") != plain.section_hash("log")
    # The option survives --set and the written recipe.yaml.
    over = apply_overrides(plain, ["log.trackers=[trackio]"])
    assert over.log.trackers == ["trackio"] and over.hash() == plain.hash()
    (tmp_path / "again.yaml").write_text(tracked.to_yaml())
    assert load_recipe(tmp_path / "again.yaml").log == tracked.log
    with pytest.raises(StacklabError, match=r"log\.trackers.*'tensorbord'"):
        recipe_from_dict({"log": {"trackers": ["tensorbord"]}})
    with pytest.raises(StacklabError, match="trackers repeat"):
        recipe_from_dict({"log": {"trackers": ["wandb", "wandb"]}})


# --------------------------------------------------------------------------- rounds


@pytest.mark.slow
def test_round_logs_every_finished_run_tagged_with_subset_and_seed(tmp_path: Path) -> None:
    need("tensorboard")
    round_file = write_round(
        tmp_path / "round", small(), budget=45, tracking={"trackers": ["tensorboard"]}
    )
    console = Console(file=io.StringIO(), width=200)
    result = integrate(round_file, tmp_path / "out", console=console)
    with RunStore(f"sqlite:///{tmp_path / 'out' / 'runs.db'}") as store:
        done = store.runs(status="done")
    assert len(done) == result.decision.runs.executed > 0
    root = tmp_path / "out" / "tracking" / "round"
    folders = sorted(root.glob("*/seed*/tensorboard"))
    assert len(folders) == len(done)
    for run in done:
        label = "+".join(sorted(run.subset)) or "baseline"
        acc = tb_run(root / label / f"seed{run.seed}-{run.key[:8]}" / "tensorboard")
        assert tb_scalars(acc)["quality"] == [
            (run.batch, float(np.float32(run.metrics["quality"])))
        ]
        assert tb_config(acc) == {
            "round": "round",
            "subset": sorted(run.subset),
            "seed": run.seed,
            "run_key": run.key,
        }
    assert all(s.startswith("c-") for run in done for s in run.subset)  # blind ids only


@pytest.mark.slow
def test_round_tracker_wandb_runs_and_a_failing_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need("wandb")
    monkeypatch.setitem(tracking.MODULES, "tensorboard", "json")
    monkeypatch.setitem(tracking.BACKENDS, "tensorboard", Boom)
    monkeypatch.setattr(Boom, "fail_on", "init")
    tracker = RoundTracker(["tensorboard", "wandb"], tmp_path / "t", "proj", "spring")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.log_run("k" * 16, 2, ["c-b", "c-a"], {"val_bpb": 1.25, "note": "x"}, step=3)
        tracker.log_run("j" * 16, 0, [], {"val_bpb": 1.5}, step=0)
    assert len([w for w in caught if issubclass(w.category, TrackingWarning)]) == 1
    run, rows = wandb_run(tmp_path / "t" / "spring" / "c-a+c-b" / "seed2-kkkkkkkk")
    assert run.project == "proj" and run.run_group == "spring"
    assert run.job_type == "integration" and run.display_name == "c-a+c-b seed 2"
    assert list(run.tags) == ["seed:2", "c-a", "c-b"]
    assert {k: v for k, v in wandb_config(run).items() if k != "_wandb"} == {
        "round": "spring",
        "subset": ["c-a", "c-b"],
        "seed": 2,
        "run_key": "k" * 16,
    }
    assert [(r["_step"], r["val_bpb"]) for r in rows] == [(3, 1.25)]
    base, rows = wandb_run(tmp_path / "t" / "spring" / "baseline" / "seed0-jjjjjjjj")
    assert list(base.tags) == ["seed:0", "baseline"] and rows[0]["val_bpb"] == 1.5
