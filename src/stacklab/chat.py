"""`stacklab chat RUN`: talk to a model in the terminal, with its tools.

The same pieces the agent environments use, driven by a person instead of a task: the chat
format (`encode_chat` with a generation prompt), the KV-cache generator stopping at
`<|im_end|>`, `parse_assistant` for tool calls, and a `Toolbox` whose answers (or errors) go
back to the model until it replies without a tool call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from stacklab.data.chat import encode_chat, parse_assistant
from stacklab.data.tokenizer import IM_END, load_tokenizer
from stacklab.envs.agent_env import answer_tool_calls
from stacklab.envs.tools import CALCULATOR, PYTHON, Toolbox
from stacklab.errors import StacklabError
from stacklab.model.generation import generate
from stacklab.train.checkpoint import load_model, run_model_dir

QUIT = {"/quit", "/exit"}


def chat(
    run: Path,
    *,
    tools: bool = True,
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
    toolbox = Toolbox([CALCULATOR, PYTHON]) if tools else None
    generator = torch.Generator().manual_seed(seed)
    intro = system or "You are a helpful assistant."
    if toolbox is not None:
        intro += (
            "\nTo call a tool, write <tool_call>\n"
            '{"name": "<tool>", "arguments": {...}}\n</tool_call>. Tools:\n' + toolbox.describe()
        )
    messages: list[dict[str, Any]] = [{"role": "system", "content": intro}]
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
                messages = messages[:1]
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
