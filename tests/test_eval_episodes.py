"""Objectives measured by playing episodes, and the eval stage that picks the final model.

A stand-in for `generate` answers each prompt from a script, so every grade and metric has an
exact expected value; the model only supplies its config and device.
"""

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from stacklab.data.shards import write_index, write_split
from stacklab.data.tasks import make_generator
from stacklab.data.tokenizer import EOT, EOT_ID, IM_END, save_tokenizer, train_tokenizer
from stacklab.envs import rollout as rollout_module
from stacklab.envs.agent_env import system_prompt
from stacklab.envs.rollout import Episode
from stacklab.envs.suite import agent_tasks
from stacklab.evals import episodes as episodes_module
from stacklab.evals import stage as stage_module
from stacklab.evals.episodes import (
    AgentResult,
    grade_chat_tasks,
    pass_at_k_metrics,
    run_agents,
)
from stacklab.evals.objectives import Graded, pass_at_k, val_bpb
from stacklab.evals.stage import AGENT_EPISODES, COMPLETIONS, EVAL_STAGE, evaluate
from stacklab.model.generation import Generation
from stacklab.model.transformer import build_model
from stacklab.recipe import ArithmeticTask, EvalConfig, ModelConfig, Recipe, TokenizerConfig
from stacklab.train.checkpoint import load_model, write_model

TASK = ArithmeticTask(max_digits=2)
SEED = 3
SEQ_LEN = 16
USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)
KEYS = ("agent_success", "agent_turns", "agent_tool_calls", "agent_tool_errors", "agent_truncated")


def call(name: str, **arguments: object) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def wrong(answer: str) -> str:
    return str(int(answer) + 1)


@pytest.fixture(scope="module")
def tok():
    toolbox, tasks = agent_tasks("calculator", "eval", 20, SEED)
    gen = make_generator(TASK)
    texts = [system_prompt(toolbox)] * 20 + [t.question for t in tasks] * 5
    texts += [gen.render(p) for p in gen.problems("train", 300, 0)]
    texts += [f"the answer is {i} because {i * 7}" for i in range(100)]
    return train_tokenizer(texts, TokenizerConfig(vocab_size=600, min_frequency=2))


def tiny_model(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(depth=1, aspect=16, head_dim=16, max_seq_len=512).build()
    return build_model(cfg, vocab)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.get_vocab_size())


def chat_policy(tok, reply):
    """A stand-in for the rollout's `generate`: the reply to a conversation is
    `reply(first user message, assistant turn)`, as tokens, then <|im_end|>.
    Each call's temperature is recorded in `.temperatures`."""
    im_end = tok.token_to_id(IM_END)
    temperatures: list[float] = []

    def fake_generate(model, prompts, max_new_tokens, **kwargs):
        assert kwargs["stop_ids"] == (im_end,) and kwargs["return_logprobs"]
        temperatures.append(kwargs["temperature"])
        outs = []
        for prompt in prompts:
            text = tok.decode(prompt, skip_special_tokens=False)
            question = USER.search(text).group(1)
            turn = text.count("<|im_start|>assistant") - 1
            sampled = [*tok.encode(reply(question, turn)).ids, im_end][:max_new_tokens]
            stopped = sampled[-1] == im_end
            tokens = sampled[:-1] if stopped else sampled
            logprobs = [-0.5] * len(sampled)
            outs.append(Generation(tokens, im_end if stopped else None, logprobs))
        return outs

    fake_generate.temperatures = temperatures
    return fake_generate


def raw_policy(tok, reply):
    """A stand-in for `generate` on bare prompts: `reply(prompt)` then <|endoftext|>."""
    temperatures: list[float] = []

    def fake_generate(model, prompts, max_new_tokens, **kwargs):
        assert kwargs["stop_ids"] == (EOT_ID,)
        temperatures.append(kwargs["temperature"])
        outs = []
        for prompt in prompts:
            text = tok.decode(prompt, skip_special_tokens=False)
            assert text.startswith(EOT)
            outs.append(Generation(tok.encode(reply(text.removeprefix(EOT))).ids, EOT_ID))
        return outs

    fake_generate.temperatures = temperatures
    return fake_generate


# --------------------------------------------------------------------------- chat task grading


def test_grade_chat_tasks_grades_the_reply_content(tok, model, monkeypatch) -> None:
    tasks = [ArithmeticTask(ops=["+"], max_digits=2), ArithmeticTask(ops=["*"], max_digits=2)]
    n = 6
    problems = [p for t in tasks for p in make_generator(t).problems("eval", n, SEED)]
    answers = {p.prompt: p.answer for p in problems}
    assert len(answers) == 2 * n

    def replies(a: str) -> list[tuple[str, str, bool]]:
        """(reply, its content, correct) for the i-th problem of a task."""
        return [
            (a, a, True),
            (wrong(a), wrong(a), False),
            (f"{a}\nsince I added them", f"{a}\nsince I added them", True),  # verify's format
            (f"The answer is {a}", f"The answer is {a}", False),
            (f"{a} {call('calculator', expression='1+1')}", a, False),  # no tools here
            (f"  {a}<tool_call>", a, False),  # an unterminated block: malformed
        ]

    index = {p.prompt: i % n for i, p in enumerate(problems)}
    policy = chat_policy(tok, lambda q, turn: replies(answers[q])[index[q]][0])
    monkeypatch.setattr(rollout_module, "generate", policy)
    graded = grade_chat_tasks(model, tok, tasks, n, SEED, max_new_tokens=64)
    assert [g.problem for g in graded] == problems  # n per task, in order
    expected = [replies(p.answer)[i % n] for i, p in enumerate(problems)]
    assert [g.completion for g in graded] == [content for _, content, _ in expected]
    assert [g.correct for g in graded] == [ok for _, _, ok in expected]
    assert policy.temperatures == [0.0, 0.0]  # greedy, one batch per task


# --------------------------------------------------------------------------- pass@k

N_SAMPLES, N_PROBLEMS = 4, 5


def counting_reply(problems):
    """The i-th problem is answered right in the first i % 5 of its samples, then wrongly."""
    index = {p.prompt: i for i, p in enumerate(problems)}
    answers = {p.prompt: p.answer for p in problems}
    asked: Counter[str] = Counter()

    def reply(prompt: str, turn: int = 0) -> str:
        asked[prompt] += 1
        right = asked[prompt] <= index[prompt] % (N_SAMPLES + 1)
        return answers[prompt] if right else wrong(answers[prompt])

    return reply, asked


@pytest.mark.parametrize("chat", [True, False])
def test_pass_at_k_metrics_from_known_counts(tok, model, monkeypatch, chat: bool) -> None:
    cfg = EvalConfig(
        pass_k=[1, 2, 4],
        pass_k_samples=N_SAMPLES,
        pass_k_problems=N_PROBLEMS,
        pass_k_temperature=0.7,
    )
    problems = make_generator(TASK).problems("eval", N_PROBLEMS, SEED)
    reply, asked = counting_reply(problems)
    if chat:
        policy = chat_policy(tok, reply)
        monkeypatch.setattr(rollout_module, "generate", policy)
    else:
        policy = raw_policy(tok, reply)
        monkeypatch.setattr(episodes_module, "generate", policy)
    metrics = pass_at_k_metrics(model, tok, [TASK], cfg, SEED, chat=chat)
    assert asked == {p.prompt: N_SAMPLES for p in problems}
    assert policy.temperatures == [0.7]
    counts = [i % (N_SAMPLES + 1) for i in range(N_PROBLEMS)]  # 0, 1, 2, 3, 4 right of 4
    assert set(metrics) == {"pass@1/arithmetic", "pass@2/arithmetic", "pass@4/arithmetic"}
    for k in cfg.pass_k:
        expected = sum(pass_at_k(N_SAMPLES, c, k) for c in counts) / N_PROBLEMS
        assert metrics[f"pass@{k}/arithmetic"] == pytest.approx(expected, abs=1e-6)
    # The same by hand: pass@1 is the mean success rate, pass@n the share ever right.
    assert metrics["pass@1/arithmetic"] == pytest.approx(0.5, abs=1e-6)
    assert metrics["pass@2/arithmetic"] == pytest.approx((0 + 1 / 2 + 5 / 6 + 1 + 1) / 5, abs=1e-6)
    assert metrics["pass@4/arithmetic"] == pytest.approx(0.8, abs=1e-6)


# --------------------------------------------------------------------------- agents


def calculator_script(answer_of):
    """A policy over calculator tasks: `answer_of(question, answer, turn)` is its reply."""
    _, tasks = agent_tasks("calculator", "eval", 4, SEED)
    answers = {t.question: t.answer for t in tasks}
    return lambda q, turn: answer_of(q, answers[q], turn)


def solve(question: str, answer: str, turn: int) -> str:
    expression = question.removeprefix("What is ").removesuffix("?")
    return [call("calculator", expression=expression), f"Answer: {answer}"][turn]


def agent_cfg(n: int = 4, budget: int = 448) -> EvalConfig:
    return EvalConfig(
        agent_envs=["calculator"],
        agent_tasks=n,
        agent_max_turns=3,
        agent_max_new_tokens=64,
        agent_token_budget=budget,
    )


def test_run_agents_with_a_solving_policy(tok, model, monkeypatch) -> None:
    policy = chat_policy(tok, calculator_script(solve))
    monkeypatch.setattr(rollout_module, "generate", policy)
    [result] = run_agents(model, tok, agent_cfg(), SEED)
    _, tasks = agent_tasks("calculator", "eval", 4, SEED)
    assert result.env == "calculator"
    assert result.answers == [t.answer for t in tasks]
    assert [ep.messages[1]["content"] for ep in result.episodes] == [t.question for t in tasks]
    assert result.metrics() == {
        "agent_success/calculator": 1.0,
        "agent_turns/calculator": 2.0,
        "agent_tool_calls/calculator": 1.0,
        "agent_tool_errors/calculator": 0.0,
        "agent_truncated/calculator": 0.0,
    }
    # The tool really ran: its result is the answer.
    assert all(ep.messages[3] == {"role": "tool", "content": t.answer}
               for ep, t in zip(result.episodes, tasks, strict=True))  # fmt: skip
    assert set(policy.temperatures) == {0.0}  # greedy


def test_run_agents_with_a_wrong_answer_at_once(tok, model, monkeypatch) -> None:
    policy = chat_policy(tok, calculator_script(lambda q, a, turn: f"Answer: {wrong(a)}"))
    monkeypatch.setattr(rollout_module, "generate", policy)
    # A budget past the model's max_seq_len is capped to it rather than refused.
    [result] = run_agents(model, tok, agent_cfg(3, budget=4096), SEED)
    assert len(result.episodes) == 3
    assert result.metrics() == {
        "agent_success/calculator": 0.0,
        "agent_turns/calculator": 1.0,
        "agent_tool_calls/calculator": 0.0,
        "agent_tool_errors/calculator": 0.0,
        "agent_truncated/calculator": 0.0,
    }


def test_agent_metrics_average_over_mixed_episodes(tok, model, monkeypatch) -> None:
    """Solved; wrong at once; a broken call, then right; tool calls until the turn limit."""
    _, tasks = agent_tasks("calculator", "eval", 4, SEED)
    plan = {t.question: i for i, t in enumerate(tasks)}

    def reply(question: str, answer: str, turn: int) -> str:
        kind = plan[question]
        if kind == 0:
            return solve(question, answer, turn)
        if kind == 1:
            return "Answer: 7"
        if kind == 2:
            return ["<tool_call>{not json}</tool_call>", f"Answer: {answer}"][turn]
        return call("calculator", expression="2*3")

    monkeypatch.setattr(rollout_module, "generate", chat_policy(tok, calculator_script(reply)))
    [result] = run_agents(model, tok, agent_cfg(4), SEED)
    assert [ep.reward for ep in result.episodes] == [1.0, 0.0, 1.0, 0.0]
    assert [ep.turns for ep in result.episodes] == [2, 1, 2, 3]
    assert [ep.truncated for ep in result.episodes] == [False, False, False, True]
    assert result.metrics() == {
        "agent_success/calculator": 0.5,
        "agent_turns/calculator": 2.0,  # (2 + 1 + 2 + 3) / 4
        "agent_tool_calls/calculator": 1.0,  # (1 + 0 + 0 + 3) / 4
        "agent_tool_errors/calculator": 0.25,
        "agent_truncated/calculator": 0.25,
    }


def test_agent_result_metrics_keys_carry_the_env_name() -> None:
    episodes = [
        Episode([], [], [], [], reward=1.0, turns=3, tool_calls=2, info={"tool_errors": 1}),
        Episode([], [], [], [], reward=0.0, turns=1, truncated=True),
        Episode([], [], [], [], reward=1.0, turns=2, tool_calls=1),
    ]
    metrics = AgentResult("lookup", episodes, ["a", "b", "c"]).metrics()
    assert metrics == {
        "agent_success/lookup": round(2 / 3, 6),
        "agent_turns/lookup": 2.0,
        "agent_tool_calls/lookup": 1.0,
        "agent_tool_errors/lookup": round(1 / 3, 4),
        "agent_truncated/lookup": round(1 / 3, 4),
    }


# --------------------------------------------------------------------------- the eval stage

STAGE_SEEDS = {"pretrain": 0, "sft": 1, "rl": 2}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tok) -> Path:
    out = tmp_path_factory.mktemp("shards")
    texts = [f"the answer is {i} because {i * 7}" for i in range(40)]
    docs = [tok.encode(t).ids for t in texts]
    V = tok.get_vocab_size()
    val = write_split(out, "val", docs, SEQ_LEN, rows_per_shard=4, vocab_size=V)
    train = write_split(out, "train", docs, SEQ_LEN, rows_per_shard=4, vocab_size=V)
    write_index(out, {"train": train, "val": val}, meta={"val_bytes": sum(map(len, texts))})
    return out


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, tok) -> dict[str, Path]:
    """A final model per training stage, each from a different seed."""
    root = tmp_path_factory.mktemp("models")
    for name, seed in STAGE_SEEDS.items():
        model = tiny_model(tok.get_vocab_size(), seed)
        write_model(root / name / "final", model.cfg, model.vocab_size, model.state_dict())
    return {name: root / name for name in STAGE_SEEDS}


def make_run(tmp_path: Path, tok, shard_dir: Path, saved: dict[str, Path], stages) -> dict:
    """A run directory with the tokenizer, shards and the given stages' final models; the
    other stages' folders exist but hold no model (as a disabled stage leaves them)."""
    run = tmp_path / "run"
    save_tokenizer(tok, run / "tokenizer")
    (run / "shards").symlink_to(shard_dir)
    for name in STAGE_SEEDS:
        if name in stages:
            (run / name).symlink_to(saved[name])
        else:
            (run / name).mkdir()
    return {name: run / name for name in EVAL_STAGE.deps}


def make_recipe(**eval_section) -> Recipe:
    return Recipe.model_validate(
        {
            "seed": SEED,
            "data": {"tasks": [TASK.model_dump()]},
            "eval": {"task_problems": 4, "val_batches": 2, "batch_size": 4, **eval_section},
        }
    )


def record_graders(monkeypatch) -> list[tuple[str, object, bool | None]]:
    """Replace the task graders and pass@k in the stage by recorders of (which, model, chat)."""
    ran: list[tuple[str, object, bool | None]] = []

    def grade_raw(model, tok, tasks, n, seed, max_new_tokens, batch_size):
        ran.append(("raw", model, None))
        return [Graded(p, "0", False) for p in make_generator(tasks[0]).problems("eval", n, seed)]

    def grade_chat(model, tok, tasks, n, seed, max_new_tokens):
        ran.append(("chat", model, None))
        return [Graded(p, "0", True) for p in make_generator(tasks[0]).problems("eval", n, seed)]

    def pass_k(model, tok, tasks, cfg, seed, chat):
        ran.append(("pass@k", model, chat))
        return {"pass@1/arithmetic": 0.25}

    monkeypatch.setattr(stage_module, "grade_tasks", grade_raw)
    monkeypatch.setattr(stage_module, "grade_chat_tasks", grade_chat)
    monkeypatch.setattr(stage_module, "pass_at_k_metrics", pass_k)
    return ran


@pytest.mark.parametrize(
    ("stages", "newest"),
    [
        (("pretrain",), "pretrain"),
        (("pretrain", "sft"), "sft"),
        (("pretrain", "rl"), "rl"),
        (("pretrain", "sft", "rl"), "rl"),
    ],
)
def test_eval_stage_evaluates_the_newest_final_model(
    tmp_path, tok, shard_dir, saved_models, monkeypatch, stages, newest
) -> None:
    inputs = make_run(tmp_path, tok, shard_dir, saved_models, stages)
    ran = record_graders(monkeypatch)
    recipe = make_recipe()
    metrics = evaluate(recipe, inputs, tmp_path)
    # auto: the bare prompt after pretraining only, a chat turn after SFT or RL.
    [(kind, graded_model, _)] = ran
    assert kind == ("raw" if newest == "pretrain" else "chat")
    for name, path in saved_models.items():
        same = torch.equal(graded_model.embed.weight, load_model(path / "final").embed.weight)
        assert same == (name == newest)
    bpb = {
        name: round(val_bpb(load_model(path / "final"), shard_dir, tok, 4, 2), 6)
        for name, path in saved_models.items()
    }
    assert len(set(bpb.values())) == 3  # the models tell apart
    assert metrics["val_bpb"] == bpb[newest]
    # The models of the stages before, on the same held-out batches.
    per_stage = {f"{name}/val_bpb": bpb[name] for name in ("pretrain", "sft") if name in stages}
    assert {k: v for k, v in metrics.items() if k.endswith("/val_bpb")} == per_stage
    assert metrics["task_acc/arithmetic"] == (0.0 if newest == "pretrain" else 1.0)
    keys = {"val_bpb", "task_acc/arithmetic", "task_baseline/arithmetic", *per_stage}
    assert set(metrics) == keys
    assert not (tmp_path / AGENT_EPISODES).exists()  # no agent envs, no episodes file


@pytest.mark.parametrize(
    ("stages", "task_format", "chat"),
    [
        (("pretrain",), "auto", False),
        (("pretrain", "sft"), "auto", True),
        (("pretrain", "rl"), "auto", True),
        (("pretrain",), "chat", True),
        (("pretrain", "sft", "rl"), "raw", False),
        (("pretrain", "sft"), "chat", True),
        (("pretrain",), "raw", False),
    ],
)
def test_eval_stage_task_format(
    tmp_path, tok, shard_dir, saved_models, monkeypatch, stages, task_format, chat
) -> None:
    """Task accuracy and pass@k are both asked in the chosen format."""
    inputs = make_run(tmp_path, tok, shard_dir, saved_models, stages)
    ran = record_graders(monkeypatch)
    recipe = make_recipe(task_format=task_format, pass_k=[1], pass_k_samples=2)
    metrics = evaluate(recipe, inputs)
    assert [(kind, flag) for kind, _, flag in ran] == [
        ("chat" if chat else "raw", None),
        ("pass@k", chat),
    ]
    assert metrics["pass@1/arithmetic"] == 0.25


def test_eval_stage_plays_agents_and_writes_episodes(
    tmp_path, tok, shard_dir, saved_models, monkeypatch
) -> None:
    """After SFT, the real chat grader and agent runs, driven by a scripted policy."""
    inputs = make_run(tmp_path, tok, shard_dir, saved_models, ("pretrain", "sft"))
    recipe = make_recipe(
        agent_envs=["calculator"],
        agent_tasks=3,
        agent_max_turns=3,
        agent_max_new_tokens=64,
        agent_token_budget=448,
        max_new_tokens=16,
    )
    problems = make_generator(TASK).problems("eval", 4, SEED)
    arithmetic = {p.prompt: (p.answer if i % 2 == 0 else wrong(p.answer))
                  for i, p in enumerate(problems)}  # fmt: skip
    _, tasks = agent_tasks("calculator", "eval", 3, SEED)
    agents = {t.question: t.answer for t in tasks}

    def reply(question: str, turn: int) -> str:
        if question in arithmetic:
            return arithmetic[question]
        answer = agents[question]
        if question == tasks[1].question:
            return f"Answer: {wrong(answer)}"
        return solve(question, answer, turn)

    monkeypatch.setattr(rollout_module, "generate", chat_policy(tok, reply))
    metrics = evaluate(recipe, inputs, tmp_path)
    assert metrics["task_acc/arithmetic"] == 0.5
    assert {k: v for k, v in metrics.items() if k.startswith("agent_")} == {
        "agent_success/calculator": round(2 / 3, 6),
        "agent_turns/calculator": round(5 / 3, 4),
        "agent_tool_calls/calculator": round(2 / 3, 4),
        "agent_tool_errors/calculator": 0.0,
        "agent_truncated/calculator": 0.0,
    }
    assert set(metrics) == {
        "val_bpb",
        "pretrain/val_bpb",
        "sft/val_bpb",
        "task_acc/arithmetic",
        "task_baseline/arithmetic",
        *(f"{key}/calculator" for key in KEYS),
    }
    completions = [json.loads(line) for line in (tmp_path / COMPLETIONS).read_text().splitlines()]
    assert [(c["prompt"], c["completion"], c["correct"]) for c in completions] == [
        (p.prompt, arithmetic[p.prompt], i % 2 == 0) for i, p in enumerate(problems)
    ]
    rows = [json.loads(line) for line in (tmp_path / AGENT_EPISODES).read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {
            "env", "answer", "reward", "turns", "tool_calls", "truncated", "messages",
        }  # fmt: skip
    assert [r["env"] for r in rows] == ["calculator"] * 3
    assert [r["answer"] for r in rows] == [t.answer for t in tasks]
    assert [(r["reward"], r["turns"], r["tool_calls"], r["truncated"]) for r in rows] == [
        (1.0, 2, 1, False),
        (0.0, 1, 0, False),
        (1.0, 2, 1, False),
    ]
    assert [m["role"] for m in rows[0]["messages"]] == [
        "system", "user", "assistant", "tool", "assistant",
    ]  # fmt: skip
    assert rows[0]["messages"][1]["content"] == tasks[0].question
    assert rows[1]["messages"][-1]["content"] == f"Answer: {wrong(tasks[1].answer)}"
    assert math.isfinite(metrics["val_bpb"])
