"""The eval stage: the pretrained model's objectives as a build's metrics.

It reads only its inputs' files (the tokenizer, the held-out shards and `pretrain/final`), so
the same function re-evaluates a finished run directory (`evaluate_run`), whose stage links
point at exactly those outputs. Besides the metrics it writes `completions.jsonl`, every task
problem with the model's completion and its grade, to look at what the model got wrong.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from stacklab.data.tokenizer import load_tokenizer
from stacklab.evals.objectives import (
    accuracy_by_task,
    constant_answer_baseline,
    grade_tasks,
    val_bpb,
)
from stacklab.fileio import atomic_open
from stacklab.pipeline import Metrics, Stage, StageContext
from stacklab.recipe import Recipe, load_recipe
from stacklab.train.checkpoint import load_model

COMPLETIONS = "completions.jsonl"


def evaluate(recipe: Recipe, inputs: dict[str, Path], out: Path | None = None) -> Metrics:
    """`val_bpb` and `task_acc/<kind>` of `inputs["pretrain"]/final`; completions into `out`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(inputs["pretrain"] / "final").to(device)
    tok = load_tokenizer(inputs["tokenizer"])
    cfg = recipe.eval
    metrics: Metrics = {
        "val_bpb": round(val_bpb(model, inputs["shards"], tok, cfg.batch_size, cfg.val_batches), 6)
    }
    graded = grade_tasks(
        model,
        tok,
        recipe.data.tasks,
        cfg.task_problems,
        recipe.seed,
        cfg.max_new_tokens,
        cfg.batch_size,
    )
    metrics.update(accuracy_by_task(graded))
    for task in recipe.data.tasks:
        baseline = constant_answer_baseline(task, cfg.task_problems, recipe.seed)
        metrics[f"task_baseline/{task.kind}"] = round(baseline, 6)
    if out is not None:
        with atomic_open(out / COMPLETIONS) as f:
            for g in graded:
                row = {**asdict(g.problem), "completion": g.completion, "correct": g.correct}
                f.write(json.dumps(row) + "\n")
    return metrics


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None) -> Metrics:
    """Evaluate a finished run directory again, from its `recipe.yaml` and stage links.

    `overrides` (`eval.task_problems=1000`, ...) patch the recipe first, e.g. to measure on
    more problems than the build did.
    """
    run_dir = Path(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml", overrides)
    return evaluate(recipe, {name: run_dir / name for name in EVAL_STAGE.deps})


def eval_config(recipe: Recipe) -> dict:
    return {
        "eval": recipe.eval.model_dump(mode="json"),
        "tasks": [t.model_dump(mode="json") for t in recipe.data.tasks],
        "seed": recipe.seed,
    }


def run_eval(ctx: StageContext) -> Metrics:
    return evaluate(ctx.recipe, ctx.inputs, ctx.out)


EVAL_STAGE = Stage("eval", 2, ("tokenizer", "shards", "pretrain"), eval_config, run_eval)
