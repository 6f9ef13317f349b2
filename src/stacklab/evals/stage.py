"""The eval stage: the final model's objectives as a build's metrics.

The final model is the newest one the build trained: `rl/final`, else `sft/final`, else
`pretrain/final` (a disabled SFT or RL stage writes no model). Task accuracy is asked in the
format the model was trained for (`eval.task_format`): the bare prompt after pretraining, one
chat turn after SFT or RL. It reads only its inputs' files, so the same function re-evaluates a
finished run directory (`evaluate_run`), whose stage links point at exactly those outputs.
Besides the metrics it writes `completions.jsonl` (every task problem with the model's answer
and its grade) and, with agent environments, `agent_episodes.jsonl` (every conversation).

`val_bpb` is also reported for the models the build trained on the way: `pretrain/val_bpb`
always and `sft/val_bpb` when SFT ran, on the same held-out batches by the same function, so
they are comparable and show what each post-training stage did to the language model.
They are computed here rather than in the training stages so that the eval settings stay out
of the training stages' cache keys (a new `eval.val_batches` retrains nothing); a stage's
model that is the final one is not evaluated twice.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from stacklab.data.tokenizer import load_tokenizer
from stacklab.evals.episodes import grade_chat_tasks, pass_at_k_metrics, run_agents
from stacklab.evals.objectives import (
    accuracy_by_task,
    constant_answer_baseline,
    grade_tasks,
    val_bpb,
)
from stacklab.fileio import atomic_open
from stacklab.model.transformer import Transformer
from stacklab.pipeline import Metrics, Stage, StageContext
from stacklab.recipe import Recipe, load_recipe
from stacklab.train.checkpoint import MODEL_FILE, final_model_dir, load_model
from stacklab.train.distributed import local_device

COMPLETIONS = "completions.jsonl"
AGENT_EPISODES = "agent_episodes.jsonl"
STAGE_BPB = ("pretrain", "sft")  # `<stage>/val_bpb` of these stages' final models


def evaluate(recipe: Recipe, inputs: dict[str, Path], out: Path | None = None) -> Metrics:
    """Every objective of the build's final model; completions and episodes into `out`."""
    device = local_device()
    model_dir = final_model_dir(inputs)
    model = load_model(model_dir).to(device)
    tok = load_tokenizer(inputs["tokenizer"])
    cfg = recipe.eval
    post_trained = model_dir != Path(inputs["pretrain"]) / "final"
    chat = cfg.task_format == "chat" or (cfg.task_format == "auto" and post_trained)

    def bpb(model: Transformer) -> float:
        return round(val_bpb(model, inputs["shards"], tok, cfg.batch_size, cfg.val_batches), 6)

    metrics: Metrics = {"val_bpb": bpb(model)}
    for stage in STAGE_BPB:
        if (stage_dir := Path(inputs[stage]) / "final") == model_dir:
            metrics[f"{stage}/val_bpb"] = metrics["val_bpb"]
        elif (stage_dir / MODEL_FILE).is_file():
            metrics[f"{stage}/val_bpb"] = bpb(load_model(stage_dir).to(device))
    tasks = recipe.data.tasks
    if chat:
        graded = grade_chat_tasks(
            model, tok, tasks, cfg.task_problems, recipe.seed, cfg.max_new_tokens
        )
    else:
        graded = grade_tasks(
            model, tok, tasks, cfg.task_problems, recipe.seed, cfg.max_new_tokens, cfg.batch_size
        )
    metrics.update(accuracy_by_task(graded))
    for task in tasks:
        baseline = constant_answer_baseline(task, cfg.task_problems, recipe.seed)
        metrics[f"task_baseline/{task.kind}"] = round(baseline, 6)
    if cfg.pass_k:
        metrics.update(pass_at_k_metrics(model, tok, tasks, cfg, recipe.seed, chat))
    agents = run_agents(model, tok, cfg, recipe.seed)
    for result in agents:
        metrics.update(result.metrics())
    if out is not None:
        with atomic_open(out / COMPLETIONS) as f:
            for g in graded:
                row = {**asdict(g.problem), "completion": g.completion, "correct": g.correct}
                f.write(json.dumps(row) + "\n")
        if agents:
            with atomic_open(out / AGENT_EPISODES) as f:
                for result in agents:
                    for ep, answer in zip(result.episodes, result.answers, strict=True):
                        row = {
                            "env": result.env,
                            "answer": answer,
                            "reward": ep.reward,
                            "turns": ep.turns,
                            "tool_calls": ep.tool_calls,
                            "truncated": ep.truncated,
                            "messages": ep.messages,
                        }
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


EVAL_STAGE = Stage(
    "eval", 3, ("tokenizer", "shards", "pretrain", "sft", "rl"), eval_config, run_eval
)
