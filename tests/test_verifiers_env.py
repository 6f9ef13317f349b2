"""verifiers tasksets as stacklab environments: opening, rubric scoring, errors, RL and eval.

The environment is `examples/verifiers_env.py`, a verifiers taskset over stacklab's own
arithmetic with a two-reward rubric, named the way a recipe names it (`verifiers:FILE:ATTR`).
Skipped without the verifiers package unless STACKLAB_REQUIRE_ENVS=1.
"""

import functools
import json
import re
from pathlib import Path

import pytest
import torch

from helpers import skip_or_fail
from stacklab.data.chat import render_chat
from stacklab.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from stacklab.envs import verifiers_env as V
from stacklab.envs.suite import agent_tasks, make_env
from stacklab.errors import StacklabError
from stacklab.evals.episodes import run_agents
from stacklab.model.transformer import build_model
from stacklab.recipe import ArithmeticTask, EvalConfig, ModelConfig, Recipe, RLConfig
from stacklab.recipe import TokenizerConfig as TokCfg
from stacklab.rl import trainer
from stacklab.train.checkpoint import load_model, write_model
from stacklab.train.sft import sft
from stacklab.train.sft_data import task_conversations

pytestmark = pytest.mark.slow  # importing verifiers takes seconds

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "verifiers_env.py"
NAME = f"verifiers:{EXAMPLE}:load_environment"
TASK = ArithmeticTask(ops=["+"], min_digits=1, max_digits=1, eval_fraction=0.2)
MODEL = ModelConfig(depth=1, aspect=16, head_dim=16, max_seq_len=64).build()
TOOL_CALL = '<tool_call>\n{"name": "calculator", "arguments": {}}\n</tool_call>'


@pytest.fixture(scope="module")
def vf():
    try:
        import verifiers.v1 as vf
    except ImportError:
        skip_or_fail("STACKLAB_REQUIRE_ENVS", "verifiers is not installed (stacklab[envs])")
    return vf


@pytest.fixture(scope="module")
def example(vf):
    """The example module, the very one the `verifiers:` loader imported (patchable)."""
    return V.import_target(str(EXAMPLE))


def count_calls(monkeypatch, cls, method: str, fail_on: set[int] = frozenset()) -> list[float]:
    """Patch `cls.method` (a verifiers reward) to record its results; calls numbered in
    `fail_on` (from 1) raise instead. Returns the list it appends each result to."""
    original = getattr(cls, method)
    results: list[float] = []

    @functools.wraps(original)  # keeps the @vf.reward marks and weight
    async def counted(self, *args, **kwargs):
        if len(results) + 1 in fail_on:
            results.append(float("nan"))
            raise ValueError("reward function exploded")
        value = await original(self, *args, **kwargs)
        results.append(value)
        return value

    monkeypatch.setattr(cls, method, counted)
    return results


# --------------------------------------------------------------------------- the adapter


def test_opening_is_the_system_prompt_then_the_prompt_turns(vf, example, tmp_path) -> None:
    (tmp_path / "system.txt").write_text("Add the numbers.")
    config = example.ArithmeticConfig(
        split="eval", few_shot=2, system_prompt=tmp_path / "system.txt"
    )
    source = V.VerifiersSource("verifiers:mine", example.ArithmeticTaskset(config), own_split=True)
    task = source.tasks("eval", 3, seed=0)[0]
    roles = [m["role"] for m in task.opening]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert task.opening[0]["content"] == "Add the numbers."
    assert task.question == task.opening[-1]["content"] and task.question.endswith("=")
    assert render_chat(task.opening, add_generation_prompt=True).count("<|im_start|>") == 7
    env = V.VerifiersEnv(source, [task])
    assert env.reset(0) == task.opening


def test_reward_is_the_rubric_weighted_sum(vf, example, monkeypatch) -> None:
    calls = count_calls(monkeypatch, example.ArithmeticTaskVF, "exact")
    source, tasks = agent_tasks(NAME, "eval", 4, seed=0)
    env = make_env(NAME, source, tasks, max_turns=1)
    env.reset(tasks[0])
    right = env.step(tasks[0].answer)
    assert right.done and right.reward == pytest.approx(1.1)  # exact 1 + 0.1 * digits 1
    assert right.info["rewards"] == {"exact": 1.0, "digits": 1.0}
    env.reset(tasks[0])
    wrong = env.step("x" + tasks[0].answer)
    assert wrong.reward == pytest.approx(0.1 * len(tasks[0].answer) / (1 + len(tasks[0].answer)))
    assert calls == [1.0, 0.0]
    env.reset(tasks[0])
    malformed = env.step(f"{tasks[0].answer}\n{TOOL_CALL}")  # no tools here: 0, not scored
    assert (malformed.reward, malformed.info["malformed"], len(calls)) == (0.0, True, 2)


def test_a_raising_reward_function_is_reward_0_naming_the_env(vf, example, monkeypatch) -> None:
    count_calls(monkeypatch, example.ArithmeticTaskVF, "exact", fail_on={1})
    source, tasks = agent_tasks(NAME, "eval", 2, seed=0)
    env = make_env(NAME, source, tasks, max_turns=1)
    env.reset(tasks[0])
    result = env.step(tasks[0].answer)
    assert (result.done, result.reward) == (True, 0.0)
    assert NAME in result.info["error"] and "reward function exploded" in result.info["error"]
    assert "\n" not in result.info["error"]
    env.reset(tasks[1])
    assert env.step(tasks[1].answer).reward == pytest.approx(1.1)  # the next one is scored


def test_splits_come_from_the_factory_or_the_task_hash(vf) -> None:
    _, train = agent_tasks(NAME, "train", 1000, seed=0)
    _, held = agent_tasks(NAME, "eval", 1000, seed=0)
    assert (len(train), len(held)) == (60, 16)  # the factory's own splits, all of them
    assert not {t.question for t in train} & {t.question for t in held}
    by_class = f"verifiers:{EXAMPLE}:ArithmeticTaskset"  # no `split`: 60 tasks, split by hash
    _, a = agent_tasks(by_class, "train", 1000, seed=0)
    _, b = agent_tasks(by_class, "eval", 1000, seed=0)
    assert len(a) + len(b) == 60 and len(b) > 0
    assert not {t.question for t in a} & {t.question for t in b}
    assert len(agent_tasks(by_class, "train", 5, seed=0)[1]) == 5


@pytest.mark.parametrize(
    "name, why",
    [
        ("verifiers:", "expected verifiers:ID"),
        ("verifiers:no_such_module_xyz:load", "No module named 'no_such_module_xyz'"),
        (f"verifiers:{EXAMPLE}:missing", "has no attribute 'missing'"),
        (f"verifiers:{EXAMPLE}:SYSTEM", "gave a NoneType"),
        ("verifiers:no-such-taskset", "not found"),
        ("verifiers:/no/such/file.py:load", "no file"),
    ],
)
def test_a_name_that_does_not_resolve_is_a_one_line_error(vf, name, why) -> None:
    with pytest.raises(StacklabError) as info:
        agent_tasks(name, "train", 4, seed=0)
    message = str(info.value)
    assert repr(name) in message and why in message and "\n" not in message


def test_what_single_turn_offline_scoring_cannot_do_is_refused(vf, example) -> None:
    class NeedsRuntime(vf.Task[example.ArithmeticData]):
        @vf.reward
        async def tests_pass(self, trace, runtime) -> float:
            return 1.0

    class NoReward(vf.Task[example.ArithmeticData]):
        pass

    class SyncReward(vf.Task[example.ArithmeticData]):
        @vf.reward
        def exact(self, task, trace) -> float:
            return 1.0

    class WithTools(example.ArithmeticTaskVF):
        @classmethod
        def toolsets(cls, config):
            return [object()]

    class InContainer(example.ArithmeticTaskVF):
        NEEDS_CONTAINER = True

    data = example.ArithmeticData(prompt="1+1=", answer="2")
    cases = [
        (NeedsRuntime(data), "needs a runtime (tests_pass)"),
        (NoReward(data), "has no @vf.reward"),
        (SyncReward(data), "a sync reward or metric (exact; verifiers awaits them)"),
        (WithTools(data), "task tools (object)"),
        (InContainer(data), "needs a container"),
        (example.ArithmeticTaskVF(data.model_copy(update={"prompt": None})), "no prompt"),
    ]
    for task, why in cases:

        class One(vf.Taskset):
            def load(self, task=task):
                yield task

        source = V.VerifiersSource("verifiers:x", One(vf.TasksetConfig()), own_split=True)
        with pytest.raises(StacklabError, match=f"'verifiers:x': .*{re.escape(why)}"):
            source.tasks("train", 1, seed=0)


# --------------------------------------------------------------------------- RL and eval


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread, and the test machines are small."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [render_chat(c) for c in task_conversations([TASK], 60, seed=0)]
    tokenizer = train_tokenizer(texts, TokCfg(vocab_size=300, min_frequency=2))
    return load_tokenizer(save_tokenizer(tokenizer, tmp_path_factory.mktemp("tok")).parent)


@pytest.fixture(scope="module")
def sft_base(tok, tmp_path_factory) -> Path:
    """A random tiny model after 60 steps of SFT on the arithmetic: it ends its replies, not
    always rightly, so rewards differ within a group and greedy answers get scored."""
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("base") / "final"
    vocab = tok.get_vocab_size()
    write_model(base, MODEL, vocab, build_model(MODEL, vocab).state_dict())
    recipe = Recipe(seed=5)
    recipe.data.tasks = [TASK]
    cfg = recipe.sft
    cfg.enabled, cfg.agent_envs = True, []
    cfg.steps, cfg.batch_size, cfg.seq_len, cfg.task_examples = 60, 8, 64, 60
    cfg.lr, cfg.warmup_steps, cfg.ckpt_every, cfg.log_every = 1e-2, 2, 60, 10
    work = tmp_path_factory.mktemp("sft")
    sft(recipe, tok, base, work)
    return work / "final"


def rl_recipe() -> Recipe:
    recipe = Recipe(seed=5)
    recipe.data.tasks = [TASK]
    recipe.rl = RLConfig(
        enabled=True,
        steps=3,
        prompts_per_step=2,
        group_size=4,
        max_turns=1,
        max_new_tokens=6,
        token_budget=40,
        minibatch_size=4,
        lr=1e-3,
        ckpt_every=3,
    )
    recipe.rl.envs = [NAME]  # validated: rl.envs accepts `verifiers:` names
    return recipe


def test_rl_trains_on_the_verifiers_env_and_eval_reports_its_rubric(
    vf, example, tok, sft_base, tmp_path, monkeypatch, one_thread
) -> None:
    calls = count_calls(monkeypatch, example.ArithmeticTaskVF, "exact", fail_on={2})
    episodes = []
    collect = trainer.collect

    def collect_and_keep(*args, **kwargs):
        batch, by_env = collect(*args, **kwargs)
        episodes.extend(ep for eps in by_env.values() for ep in eps)
        return batch, by_env

    monkeypatch.setattr(trainer, "collect", collect_and_keep)
    metrics = trainer.train_rl(rl_recipe(), tok, sft_base, tmp_path / "rl")

    # Every reward is the rubric's: scored episodes carry both scores and their weighted sum;
    # the one whose reward function raised is 0 with the error, and training went on.
    assert len(episodes) == 3 * 2 * 4
    scored = [ep for ep in episodes if "rewards" in ep.info]
    failed = [ep for ep in episodes if "error" in ep.info]
    assert len(failed) == 1 and failed[0].reward == 0.0 and NAME in failed[0].info["error"]
    truncated = [ep for ep in episodes if ep.truncated]  # cut off: 0, the rubric not asked
    assert len(scored) + len(failed) + len(truncated) == len(episodes)
    assert len(calls) == len(scored) + len(failed) > 12
    for ep in scored:
        r = ep.info["rewards"]
        assert ep.reward == pytest.approx(r["exact"] + 0.1 * r["digits"])
    assert sorted(r for r in calls if r == r) == sorted(
        ep.info["rewards"]["exact"] for ep in scored
    )
    assert len({round(ep.reward, 6) for ep in episodes}) > 1  # informative groups
    rows = [
        json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [1, 2, 3] and f"acc/{NAME}" in rows[0]
    mean = sum(ep.reward for ep in episodes[:8]) / 8
    assert rows[0]["reward"] == pytest.approx(mean)
    assert f"rl/final_acc/{NAME}" in metrics

    # The update moved the weights.
    before, after = load_model(sft_base).state_dict(), load_model(tmp_path / "rl" / "final")
    assert any(not torch.equal(before[k], v) for k, v in after.state_dict().items())

    # Evaluation over the env's held-out tasks reports the rubric's mean reward.
    trained_calls = len(calls)
    result = V.evaluate_env(after, tok, NAME, n=16, seed=0, max_new_tokens=6)
    calls = calls[trained_calls:]
    m = result.metrics
    n = len(result.episodes)
    assert n == 16 and len(calls) == sum("rewards" in ep.info for ep in result.episodes) > 0
    assert m[f"agent_reward/{NAME}"] == pytest.approx(sum(ep.reward for ep in result.episodes) / n)
    assert m[f"agent_reward/{NAME}"] == pytest.approx(
        m[f"agent_reward/{NAME}/exact"] + 0.1 * m[f"agent_reward/{NAME}/digits"], abs=1e-5
    )
    assert m[f"agent_reward/{NAME}/exact"] == pytest.approx(sum(calls) / n)

    # The eval stage's agent loop plays it too, through the suite.
    cfg = EvalConfig(agent_tasks=16, agent_max_new_tokens=6, agent_token_budget=64)
    (agents,) = run_agents(after, tok, cfg.model_copy(update={"agent_envs": [NAME]}), 0)
    assert agents.metrics()[f"agent_success/{NAME}"] == m[f"agent_success/{NAME}"]
