"""`stacklab chat`: the terminal loop, its tool round-trips and its exits."""

import io
from pathlib import Path

import pytest
from rich.console import Console

from stacklab import chat as chat_module
from stacklab.cli import main
from stacklab.data.tokenizer import save_tokenizer, train_tokenizer
from stacklab.model.generation import Generation
from stacklab.model.transformer import build_model
from stacklab.recipe import ModelConfig, TokenizerConfig
from stacklab.train.checkpoint import write_model


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    texts = [f"user asks {i} plus {i * 7} and the assistant answers {i * 8}\n" for i in range(300)]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=400, min_frequency=1))
    save_tokenizer(tok, run / "tokenizer")
    cfg = ModelConfig(depth=1, aspect=16, head_dim=16, max_seq_len=4096).build()
    model = build_model(cfg, 400)
    write_model(run / "pretrain" / "final", cfg, 400, model.state_dict())
    return run


def scripted(replies: list[str]):
    def read(prompt: str) -> str:
        if not replies:
            raise EOFError
        return replies.pop(0)

    return read


def test_random_model_chats_and_quits(run: Path) -> None:
    out = io.StringIO()
    messages = chat_module.chat(
        run, read=scripted(["hello", "/quit", "never read"]), max_new_tokens=4,
        console=Console(file=out),
    )  # fmt: skip
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert "model>" in out.getvalue()


def test_tool_calls_are_answered_until_a_plain_reply(run: Path, monkeypatch) -> None:
    turns = iter(
        [
            '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1234*5678"}}\n'
            "</tool_call>",
            "<tool_call>\n{bad json}\n</tool_call>",
            "It is 7006652.",
        ]
    )

    def fake_generate(model, prompts, max_new_tokens, **kw):
        tok = chat_module.load_tokenizer(run / "tokenizer")
        return [Generation(tok.encode(next(turns)).ids, None, None)]

    monkeypatch.setattr(chat_module, "generate", fake_generate)
    out = io.StringIO()
    messages = chat_module.chat(
        run, read=scripted(["what is 1234*5678?"]), console=Console(file=out)
    )
    roles = [m["role"] for m in messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert messages[3]["content"] == "7006652"
    assert messages[5]["content"].startswith("error: ")
    assert messages[6]["content"] == "It is 7006652."
    assert "7006652" in out.getvalue()


def test_chat_on_a_non_run_is_one_line_error(tmp_path: Path, capsys) -> None:
    assert main(["chat", str(tmp_path)]) == 2
    assert "is it a run directory" in capsys.readouterr().out


def test_a_chat_too_long_for_the_model_starts_over(run: Path) -> None:
    out = io.StringIO()
    messages = chat_module.chat(
        run, read=scripted(["hello"]), max_new_tokens=5000, console=Console(file=out)
    )
    assert [m["role"] for m in messages] == ["system"]
    assert "no longer fits" in out.getvalue()


def run_with_recipe(run: Path, tmp_path: Path, **sections) -> Path:
    """A copy of `run` whose recipe.yaml says what its post-training used."""
    import shutil

    from stacklab.recipe import Recipe

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    recipe = Recipe(seed=5)
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        setattr(getattr(recipe, section), key, value)
    (copy / "recipe.yaml").write_text(recipe.to_yaml())
    return copy


def first_prompt_ids(run: Path, monkeypatch, question: str, **kw) -> list[int]:
    seen: list[list[int]] = []

    def fake_generate(model, prompts, max_new_tokens, **_):
        seen.append(list(prompts[0]))
        tok = chat_module.load_tokenizer(run / "tokenizer")
        return [Generation(tok.encode("done").ids, None, None)]

    monkeypatch.setattr(chat_module, "generate", fake_generate)
    chat_module.chat(run, read=scripted([question]), console=Console(file=io.StringIO()), **kw)
    return seen[0]


@pytest.mark.parametrize("env", ["calculator", "lookup"])
def test_a_chat_turn_is_encoded_as_the_eval_episode_encodes_the_question(
    run: Path, tmp_path: Path, monkeypatch, env: str
) -> None:
    from stacklab.data.chat import encode_chat
    from stacklab.envs.suite import agent_tasks, make_env

    trained = run_with_recipe(
        run, tmp_path, sft__enabled=True, sft__agent_envs=[env], rl__enabled=False
    )
    seed = chat_module.trained_envs(trained)[1]
    toolbox, tasks = agent_tasks(env, "eval", 3, seed)  # what `stacklab eval` plays
    episode = make_env(env, toolbox, tasks, max_turns=4).reset(tasks[0])
    tok = chat_module.load_tokenizer(trained / "tokenizer")
    expected, _ = encode_chat(tok, episode, add_generation_prompt=True)
    assert first_prompt_ids(trained, monkeypatch, tasks[0].question) == expected


def test_a_run_trained_on_no_agent_env_chats_without_a_system_prompt(
    run: Path, tmp_path: Path, monkeypatch
) -> None:
    from stacklab.data.chat import encode_chat

    plain = run_with_recipe(run, tmp_path, sft__enabled=True, sft__agent_envs=[],
                            rl__enabled=False)  # fmt: skip
    tok = chat_module.load_tokenizer(plain / "tokenizer")
    expected, _ = encode_chat(
        tok, [{"role": "user", "content": "2+2="}], add_generation_prompt=True
    )
    assert first_prompt_ids(plain, monkeypatch, "2+2=") == expected
    # An own system prompt still replaces it, and an unknown env is a clear error.
    ids = first_prompt_ids(plain, monkeypatch, "2+2=", system="Be brief.")
    assert ids != expected
    with pytest.raises(chat_module.StacklabError, match="unknown agent environment 'web'"):
        chat_module.chat(plain, env="web", read=scripted([]), console=Console(file=io.StringIO()))
