"""Examples in docstrings use names the code really has."""

import inspect
import textwrap
from pathlib import Path

import yaml

from stacklab.data.tasks import make_generator
from stacklab.envs.rollout import Episode
from stacklab.evals.episodes import AgentResult
from stacklab.evals.objectives import Graded, accuracy_by_task
from stacklab.evals.stage import evaluate
from stacklab.integrate import round as round_module
from stacklab.integrate.round import RoundSpec
from stacklab.model.transformer import build_model
from stacklab.recipe import ModelConfig, Recipe, load_recipe
from stacklab.train import pretrain
from stacklab.train.trainer import TrainRun


def example_round() -> dict:
    """The indented YAML example at the top of `stacklab.integrate.round`'s docstring."""
    lines = (round_module.__doc__ or "").splitlines()[2:]  # after the summary and a blank line
    return yaml.safe_load(textwrap.dedent("\n".join(lines[: lines.index("")])))


def build_metrics(recipe: Recipe, tmp_path: Path) -> set[str]:
    """The metric names `stacklab build` (the built-in runner) reports for `recipe`'s eval and
    pretraining, from the functions that name them."""
    assert '"val_bpb"' in inspect.getsource(evaluate)
    names = {"val_bpb"}
    problems = [make_generator(t).problems("eval", 1, 0)[0] for t in recipe.data.tasks]
    names |= set(accuracy_by_task(Graded(p, "", False) for p in problems))
    for env in recipe.eval.agent_envs:
        names |= set(AgentResult(env, [Episode([], [], [], [])], [""]).metrics())
    model = build_model(ModelConfig(depth=1, aspect=16, head_dim=16, max_seq_len=16).build(), 64)
    names |= set(pretrain._summary(model, TrainRun([], 1.0), 1, 1.0, 1.0, 1))
    return names


def test_round_docstring_example_names_metrics_the_builtin_runner_reports(tmp_path) -> None:
    spec = RoundSpec.model_validate(example_round())
    produced = build_metrics(load_recipe(spec.baseline), tmp_path)
    named = [o.metric for o in spec.objectives] + [g.metric for g in spec.guardrails]
    missing = [m for m in named if m not in produced]
    assert not missing, f"{missing} are not among stacklab build's metrics {sorted(produced)}"
    assert spec.runner.kind == "builtin"
