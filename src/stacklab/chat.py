"""`stacklab chat RUN`: talk to a model in the terminal, with its tools.

The same pieces the agent environments use, driven by a person instead of a task: the chat
format (`encode_chat` with a generation prompt), the KV-cache generator stopping at
`<|im_end|>`, `parse_assistant` for tool calls, and a `Toolbox` whose answers (or errors) go
back to the model until it replies without a tool call.

By default the conversation opens the way the run was trained: with the system prompt and
tools of the first agent environment its post-training used (`sft.agent_envs`, then
`rl.envs`, read from the run's recipe.yaml), exactly as that environment's episodes open, so
a question typed here is encoded to the same token ids as in evaluation. A run trained on no
agent environment gets no system prompt and no tools (its task chats had none); a run without
a recipe.yaml (an imported one) gets the calculator environment's opening.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from stacklab.data.chat import encode_chat, parse_assistant
from stacklab.data.tokenizer import IM_END, load_tokenizer
from stacklab.envs.agent_env import answer_tool_calls, system_prompt
from stacklab.envs.suite import AGENT_ENVS, agent_tasks
from stacklab.envs.tools import Toolbox
from stacklab.errors import StacklabError
from stacklab.model.generation import generate
from stacklab.train.checkpoint import load_model, run_model_dir

QUIT = {"/quit", "/exit"}


def trained_envs(run: Path) -> tuple[list[str] | None, int]:
    """The agent environments the run's post-training used (SFT's demonstrations, then RL's)
    and the recipe seed (which picks the lookup environment's document store); None when the
    run has no readable recipe.yaml."""
    from stacklab.recipe import load_recipe

    path = run / "recipe.yaml"
    if not path.is_file():
        return None, 0
    try:
        recipe = load_recipe(path)
    except StacklabError:
        return None, 0
    names: list[str] = list(recipe.sft.agent_envs) if recipe.sft.enabled else []
    if recipe.rl.enabled:
        names += [e for e in recipe.rl.envs if e in AGENT_ENVS]
    return list(dict.fromkeys(names)), recipe.seed


def opening(run: Path, env: str | None, tools: bool) -> tuple[list[dict[str, Any]], Toolbox | None]:
    """The messages a conversation starts with, and the tools it offers (see the module
    docstring); `env` picks an agent environment by name instead."""
    trained, seed = trained_envs(run)
    if env is not None and env not in AGENT_ENVS:
        raise StacklabError(f"unknown agent environment {env!r}; valid: {', '.join(AGENT_ENVS)}")
    if env is None:
        env = "calculator" if trained is None else (trained[0] if trained else None)
    if not tools or env is None:
        return [], None
    toolbox, _ = agent_tasks(env, "eval", 1, seed)
    return [{"role": "system", "content": system_prompt(toolbox)}], toolbox


def chat(
    run: Path,
    *,
    tools: bool = True,
    env: str | None = None,
    system: str | None = None,
    temperature: float = 0.7,
    max_new_tokens: int = 256,
    max_tool_rounds: int = 4,
    seed: int = 0,
    stage: str | None = None,
    read: Callable[[str], str] = input,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Chat until end of input or `/quit`; return the conversation."""
    console = console or Console()
    if not (run / "tokenizer").exists():
        raise StacklabError(f"{run} has no tokenizer/: is it a run directory written by build?")
    model = load_model(run_model_dir(run, stage)).eval()
    tokenizer = load_tokenizer(run / "tokenizer")
    im_end = tokenizer.token_to_id(IM_END)
    generator = torch.Generator().manual_seed(seed)
    start, toolbox = opening(run, env, tools)
    if system is not None:  # the caller's own system prompt replaces the trained one
        start = [{"role": "system", "content": system}]
    messages: list[dict[str, Any]] = list(start)
    console.print("[dim]/quit or end of input to leave[/]")
    while True:
        try:
            text = read("you> ")
        except EOFError:
            return messages
        if text.strip() in QUIT:
            return messages
        messages.append({"role": "user", "content": text})
        for _ in range(max_tool_rounds + 1):
            ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
            if len(ids) + max_new_tokens > model.cfg.max_seq_len:
                console.print("[yellow]the chat no longer fits; starting over (ask again)[/]")
                messages = list(start)
                break
            out = generate(
                model, [ids], max_new_tokens, temperature=temperature, stop_ids=(im_end,),
                generator=generator,
            )[0]  # fmt: skip
            turn = parse_assistant(tokenizer.decode(out.tokens, skip_special_tokens=False))
            messages.append(turn.to_message())
            console.print(f"[bold green]model>[/] {turn.content}", highlight=False)
            if toolbox is None or not (turn.tool_calls or turn.errors):
                break
            replies, _ = answer_tool_calls(turn, toolbox)
            for call in turn.tool_calls:
                console.print(f"[cyan]tool call[/] {call.name}({call.arguments})", highlight=False)
            for reply in replies:
                console.print(f"[cyan]{reply['role']}>[/] {reply['content']}", highlight=False)
            messages.extend(replies)
