"""The `stacklab` command line: one entry point, one subcommand per job.

Input errors (a bad recipe key, a missing data file, …) are printed as one line and exit with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stacklab.errors import StacklabError

console = Console()

EXAMPLES = """examples:
  stacklab demo                                  the demo integration round, into runs/demo
  stacklab build tiny --out runs/tiny            build a built-in recipe by name
  stacklab build my.yaml --set data.mixture.token_budget=500000 --out runs/small
  stacklab recipe tiny --set tokenizer.vocab_size=8192    show the resolved recipe
  stacklab tasks tiny --split eval -n 5          print held-out task problems
  stacklab eval runs/tiny                        evaluate a built run again
  stacklab export runs/tiny --format hf --out hf/tiny    write a transformers checkpoint
  stacklab import hf/tiny --out runs/imported    start from a checkpoint on disk
  stacklab chat runs/tiny                        talk to a model (with tools)
  stacklab serve runs/tiny --port 8000          an OpenAI-compatible API over a run
  stacklab integrate round.yaml --out runs/round1    decide which contributions to keep
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except StacklabError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; re-run the same command to resume[/]")
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stacklab",
        description="A full, hackable LLM stack driven by one recipe, with a content-addressed "
        "stage cache.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser(
        "build",
        help="build a recipe: every stage, reusing cached outputs",
        description="Run every stage of RECIPE, reusing any stage whose output is already in "
        "the cache. Writes OUT/metrics.json, OUT/build.json, OUT/recipe.yaml and a link per "
        "stage to its cached output. A killed build resumes where it stopped when re-run.",
    )
    _recipe_args(p)
    p.add_argument("--out", required=True, type=Path, help="run directory to write")
    _cache_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser(
        "demo",
        help="run the demo integration round (about 10-15 minutes on 2 CPU cores)",
        description="Run the built-in round demo: Muon, QK-norm and a WSD "
        "schedule from the contribution catalog, on a shrunken tiny recipe "
        "(the built-in demo-baseline; the Python standard library as corpus, nothing is "
        "downloaded). The engine plans and runs the builds, searches with an effects model, "
        "confirms each member on fresh seeds "
        "and writes OUT/report.html, OUT/report.md and OUT/decision.json. Re-running resumes. "
        "To build the full tiny recipe instead: stacklab build tiny --out runs/tiny.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="default: runs/demo")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="stage cache root for the round's builds (default: $STACKLAB_CACHE or "
        "~/.cache/stacklab)",
    )
    p.set_defaults(func=cmd_demo, round="demo")

    p = sub.add_parser(
        "recipe",
        help="validate a recipe and print it resolved, with section hashes",
        description="Validate RECIPE with its overrides and print every value (defaults "
        "included) and the canonical hash of each section.",
    )
    _recipe_args(p)
    p.set_defaults(func=cmd_recipe)

    p = sub.add_parser(
        "eval",
        help="evaluate a built run again (val_bpb, task accuracy)",
        description="Re-evaluate RUN (a directory written by `stacklab build`) from its "
        "recipe, tokenizer, shards and final pretrained model. --set patches the recipe's "
        "eval settings first, e.g. --set eval.task_problems=1000.",
    )
    p.add_argument("run", metavar="RUN", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness tasks on a run's model",
        description="Evaluate RUN's final model on lm-evaluation-harness tasks (hellaswag, "
        "arc_easy, ..., or the bundled offline stacklab_arith and stacklab_arith_gen) "
        "through a native adapter: the run's own model and tokenizer, no export. Needs "
        "the lm-eval extra: pip install 'stacklab[lm-eval]'. See docs/evals.md.",
    )
    p.add_argument("run", metavar="RUN", type=Path)
    p.add_argument(
        "--tasks", required=True, help="comma-separated task, group or tag names (globs allowed)"
    )
    p.add_argument("--limit", type=float, help="at most N documents per task (<1: a fraction)")
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="another folder of task YAMLs (repeatable; the bundled stacklab tasks are always "
        "included)",
    )
    p.add_argument("--out", type=Path, help="write lm-eval's results to this JSON file")
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward (16)")
    p.add_argument("--num-fewshot", type=int, help="override the tasks' few-shot examples")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--stage",
        choices=["pretrain", "sft", "rl"],
        help="whose final model (default: the newest trained: rl, else sft, else pretrain)",
    )
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser(
        "export",
        help="export a run's model to Hugging Face transformers",
        description="Write RUN's final model as a transformers checkpoint: Qwen3 (dense), "
        "Qwen3-MoE (softmax router) or GLM-4-MoE (sigmoid router, shared experts), with the "
        "tokenizer. Refuses, naming the field, when the recipe has no exact counterpart.",
    )
    p.add_argument("run", metavar="RUN", type=Path)
    p.add_argument("--format", choices=["hf"], default="hf")
    p.add_argument("--out", required=True, type=Path, help="new directory to write")
    p.add_argument(
        "--stage",
        choices=["pretrain", "sft", "rl"],
        help="whose final model (default: the newest trained: rl, else sft, else pretrain)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import",
        help="import a Hugging Face checkpoint from disk as a stacklab run",
        description="Read a Qwen3, Qwen3-MoE or GLM-4-MoE checkpoint folder (config.json, "
        "safetensors, tokenizer) and write OUT/pretrain/final, OUT/tokenizer and "
        "OUT/recipe.yaml, so post-training and export can start from it.",
    )
    p.add_argument("hf_dir", metavar="HF_DIR", type=Path)
    p.add_argument("--out", required=True, type=Path, help="run directory to write")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "chat",
        help="talk to a run's model in the terminal, with tools",
        description="Chat with RUN's final model in the ChatML format, opened the way the run "
        "was trained: the system prompt and tools of the first agent environment of its "
        "post-training (sft.agent_envs, then rl.envs), as in its evaluation episodes; no "
        "system prompt when it trained on none. Tool results go back to the model. /quit or "
        "end of input leaves.",
    )
    p.add_argument("run", metavar="RUN", type=Path)
    p.add_argument("--no-tools", action="store_true", help="do not offer tools")
    p.add_argument(
        "--env",
        choices=["calculator", "lookup"],
        help="open as this agent environment does (default: the run's first trained one)",
    )
    p.add_argument("--system", help="a system prompt of your own instead of the trained one")
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default 0.7)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stage",
        choices=["pretrain", "sft", "rl"],
        help="whose final model (default: the newest trained: rl, else sft, else pretrain)",
    )
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "serve",
        help="serve a run's model over an OpenAI-compatible HTTP API",
        description="Serve RUN's final model at http://HOST:PORT/v1 for any OpenAI client: "
        "/v1/models, /v1/chat/completions (tools, streaming) and /v1/completions (logprobs, "
        "echo). Requests are generated one at a time, in order. Needs the serve extra: "
        "pip install 'stacklab[serve]'.",
    )
    p.add_argument("run", metavar="RUN", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument(
        "--stage",
        choices=["pretrain", "sft", "rl"],
        help="whose final model (default: the newest trained: rl, else sft, else pretrain)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "tasks",
        help="print sample problems of a recipe's synthetic tasks",
        description="Print problems from the train or held-out eval split of each task in "
        "RECIPE, with their reference answers.",
    )
    _recipe_args(p)
    p.add_argument("--split", choices=["train", "eval"], default="train")
    p.add_argument("-n", type=int, default=5, help="problems per task (default 5)")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser(
        "integrate",
        help="run an integration round: decide which contributions go into the model",
        description="Run the round described by ROUND (a YAML file: baseline recipe, "
        "contributions, objectives, guardrails, seeds, budget, runner, executor): plan and run "
        "ablations, fit effects and interactions, choose the best allowed subset, confirm it, "
        "and write OUT/decision.json, OUT/report.md and OUT/report.html. Runs are stored in "
        "OUT/runs.db and OUT/runs/: re-running the same command after a crash or Ctrl-C "
        "resumes without repeating a finished run.",
    )
    p.add_argument("round", metavar="ROUND", type=Path, help="the round file (YAML)")
    p.add_argument("--out", required=True, type=Path, help="round directory (created if missing)")
    p.set_defaults(func=cmd_integrate)

    p = sub.add_parser(
        "bench",
        help="run the CPU benchmark suite and print one table (about 8 minutes)",
        description="Run the scripts in benchmarks/ one after another (training step and MoE "
        "layer vs transformers and a per-expert loop, rollout sampling vs transformers "
        "generate, one RL step, the integration engine vs other searches) and print every "
        "ratio next to its goal. --quick runs each in well under a minute.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="only these benchmarks")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: each script's)"
    )
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    p.add_argument("--markdown", type=Path, help="also write the table as Markdown")
    p.add_argument(
        "--scenarios", type=int, help="engine_search: simulated rounds (suite default: 4)"
    )
    p.add_argument(
        "--samplers", help="engine_search: Optuna samplers, of nsga2,tpe,random (default: nsga2)"
    )
    p.add_argument(
        "--calibration",
        action="store_true",
        help="engine_search: its calibration run (random scenarios, budgets 160/320/640)",
    )
    p.set_defaults(func=cmd_bench)
    return parser


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", metavar="RECIPE", help="a recipe file, or a built-in name (tiny)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set data.packing.seq_len=128 (repeatable)",
    )


def _cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="stage cache root shared between builds (default: $STACKLAB_CACHE or "
        "~/.cache/stacklab)",
    )
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")


# --------------------------------------------------------------------------- commands


def cmd_build(args: argparse.Namespace) -> int:
    from stacklab.pipeline import build
    from stacklab.recipe import load_recipe
    from stacklab.stages import STAGES
    from stacklab.tracking import require

    recipe = load_recipe(args.recipe, args.overrides)
    require(recipe.log.trackers, "recipe key log.trackers")  # before hours of data stages
    start = time.perf_counter()

    def announce(stage, key: str) -> None:
        console.print(f"[bold]{stage.name}[/] [dim]{key}[/]")

    result = build(recipe, args.out, STAGES, args.cache_dir, args.until, on_stage=announce)
    _print_build(result, time.perf_counter() - start)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.cache_dir is not None:  # the round's builds are child processes: they read this
        os.environ["STACKLAB_CACHE"] = str(args.cache_dir.resolve())
    console.print(
        "[bold]stacklab demo[/]: an integration round over three techniques from the "
        "catalog (muon, qk-norm, wsd-schedule) on the built-in recipe demo-baseline"
    )
    code = cmd_integrate(args)
    console.print(
        f"report: {args.out / 'report.html'} (open it in a browser); "
        f"summary: {args.out / 'report.md'}",
        highlight=False,
    )
    return code


def cmd_recipe(args: argparse.Namespace) -> int:
    from stacklab.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(recipe.to_yaml(), end="")
    print("# section hashes")
    for section in type(recipe).model_fields:
        value = getattr(recipe, section)
        if hasattr(value, "model_dump"):
            print(f"#   {section}: {recipe.section_hash(section)}")
    print(f"#   recipe: {recipe.hash()}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from stacklab.evals.stage import evaluate_run
    from stacklab.fileio import write_atomic

    metrics = evaluate_run(args.run, args.overrides)
    _print_metrics(metrics, f"evaluation of {args.run}")
    if args.json:
        write_atomic(args.json, json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from stacklab.fileio import write_atomic

    try:
        from stacklab.evals import lm_eval_adapter as adapter
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "lm_eval":
            raise
        raise StacklabError(
            "stacklab lm-eval needs lm-evaluation-harness: pip install 'stacklab[lm-eval]'"
        ) from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise StacklabError("--tasks names no task")
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    manager = adapter.task_manager(tasks, args.include_path)  # bad names fail before loading
    lm = adapter.StacklabLM(args.run, args.stage, batch_size=args.batch_size, device=args.device)
    results = adapter.run_tasks(
        lm, tasks, limit=limit, num_fewshot=args.num_fewshot, manager=manager
    )  # fmt: skip
    table = Table(title=f"lm-eval of {args.run}" + (f" (limit {limit})" if limit else ""))
    for col in ("task", "metric", "value", "stderr"):
        table.add_column(col, justify="right" if col in ("value", "stderr") else "left")
    for task, metric, value, stderr in adapter.result_rows(results):
        table.add_row(task, metric, f"{value:.4f}", "" if stderr is None else f"{stderr:.4f}")
    console.print(table)
    if args.out:
        write_atomic(args.out, adapter.results_json(results))
        console.print(f"results in {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from stacklab.interop.hf import export_hf
    from stacklab.train.checkpoint import load_model, run_model_dir

    model = load_model(run_model_dir(args.run, args.stage))
    out = export_hf(
        model.cfg, model.vocab_size, model.state_dict(), _run_part(args.run, "tokenizer"), args.out
    )
    console.print(f"exported to {out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from stacklab.data.tokenizer import load_tokenizer, save_tokenizer
    from stacklab.fileio import write_atomic
    from stacklab.interop.hf import import_hf
    from stacklab.recipe import Recipe
    from stacklab.train.checkpoint import write_model

    if args.out.exists():
        raise StacklabError(f"{args.out} already exists; choose a new --out")
    cfg, vocab_size, state, tokenizer_path = import_hf(args.hf_dir)
    if tokenizer_path is None:
        raise StacklabError(f"{args.hf_dir}: no tokenizer.json; a run needs its tokenizer")
    args.out.mkdir(parents=True)
    write_model(args.out / "pretrain" / "final", cfg, vocab_size, state)
    save_tokenizer(load_tokenizer(tokenizer_path), args.out / "tokenizer")
    recipe = Recipe(name=f"import:{args.hf_dir.name}", model=cfg.to_dict())
    write_atomic(args.out / "recipe.yaml", recipe.to_yaml())
    console.print(f"imported {args.hf_dir} → {args.out} ({vocab_size} tokens, depth {cfg.depth})")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from stacklab.chat import chat

    chat(
        args.run, tools=not args.no_tools, env=args.env, system=args.system,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens, seed=args.seed, stage=args.stage, console=console,
    )  # fmt: skip
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    if any(importlib.util.find_spec(name) is None for name in ("fastapi", "uvicorn")):
        raise StacklabError("stacklab serve needs the serve extra: pip install 'stacklab[serve]'")
    from stacklab.serve import serve

    serve(args.run, host=args.host, port=args.port, device=args.device, stage=args.stage,
          log=console.print)  # fmt: skip
    return 0


def _run_part(run: Path, part: str) -> Path:
    path = run / part
    if not path.exists():
        raise StacklabError(f"{run} has no {part}/: is it a run directory written by build?")
    return path


def cmd_tasks(args: argparse.Namespace) -> int:
    from stacklab.data.tasks import make_generator
    from stacklab.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    for cfg in recipe.data.tasks:
        gen = make_generator(cfg)
        table = Table(title=f"{cfg.kind} — {args.split} split")
        table.add_column("prompt")
        table.add_column("answer")
        for problem in gen.problems(args.split, args.n, recipe.seed):
            table.add_row(repr(problem.prompt), problem.answer)
        console.print(table)
    return 0


def _print_build(result, seconds: float) -> None:
    table = Table(title=f"build → {result.out}")
    for col in ("stage", "status", "seconds", "output"):
        table.add_column(col)
    for s in result.stages:
        status = "[green]cached[/]" if s.cached else "[yellow]built[/]"
        table.add_row(s.name, status, f"{s.seconds:.1f}", str(s.path))
    console.print(table)
    _print_metrics(result.metrics, "metrics.json")
    console.print(f"done in {seconds:.1f}s; metrics in {result.out / 'metrics.json'}")


def cmd_bench(args: argparse.Namespace) -> int:
    from stacklab.bench import fmt_number, markdown_table, run_suite
    from stacklab.fileio import write_atomic

    options = {f"--{k}": getattr(args, k) for k in ("scenarios", "samplers", "calibration")}
    rows, failures = run_suite(
        args.names, args.quick, args.threads, log=console.print, options=options
    )
    table = Table(title="stacklab bench" + (" (quick)" if args.quick else ""))
    for col in ("benchmark", "case", "unit", "ours", "peer", "ratio", "goal", "met"):
        table.add_column(col, justify="right" if col in ("ours", "peer", "ratio") else "left")
    for r in rows:
        met = "" if r["met"] is None else ("[green]yes[/]" if r["met"] else "[red]no[/]")
        table.add_row(
            r["benchmark"],
            r["case"],
            r["unit"],
            fmt_number(r["ours"]),
            f"{fmt_number(r['peer'])} {r['peer_name']}" if r["peer"] is not None else "",
            f"{r['ratio']:.2f}x" if r["ratio"] is not None else "",
            r["goal"],
            met,
        )
    console.print(table)
    if args.json:
        write_atomic(args.json, json.dumps(rows, indent=2))
    if args.markdown:
        write_atomic(args.markdown, markdown_table(rows))
    for failure in failures:
        console.print(f"[red]failed[/] {failure}")
    return 1 if failures else 0


def cmd_integrate(args: argparse.Namespace) -> int:

    from stacklab.integrate.engine import integrate

    result = integrate(args.round, args.out, console=console)
    d = result.decision
    table = Table(title=f"round {d.round}: decisions")
    for col in ("contribution", "decision", "evidence"):
        table.add_column(col)
    for row in d.decisions:
        color = {"accepted": "green", "shelved": "yellow"}.get(row.status, "magenta")
        table.add_row(escape(row.id), f"[{color}]{row.status}[/]", escape(row.reason))
    console.print(table)
    runs = d.runs
    console.print(
        f"selected: {', '.join(d.selected) or 'nothing'}"
        + (f"; undecided: {', '.join(d.undecided)}" if d.undecided else "")
        + f"; runs: {runs.executed} executed, {runs.reused} reused, {runs.failed} failed"
        + (f", {runs.stale} stale set aside" if runs.stale else "")
    )
    return 0


def _print_metrics(metrics: dict[str, float], title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(metrics.items()):
        table.add_row(name, f"{value:,}" if isinstance(value, int) else f"{value:.4g}")
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
