"""`stacklab lm-eval`: the lm-evaluation-harness adapter scores exactly what the model says,
generates greedily up to stop strings, and runs the bundled offline task end to end.

Skipped without lm-eval unless STACKLAB_REQUIRE_LM_EVAL=1. No test touches the network: the
Hugging Face offline switches are on and opening a socket fails the test.
"""

import json
import random
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stacklab.evals
from helpers import skip_or_fail
from stacklab.cli import main
from stacklab.data.tasks import make_generator
from stacklab.data.tokenizer import EOT_ID, load_tokenizer, save_tokenizer, train_tokenizer
from stacklab.model.generation import generate
from stacklab.model.transformer import build_model
from stacklab.recipe import ArithmeticTask, ModelConfig, TokenizerConfig
from stacklab.train.checkpoint import load_model, write_model

L = 48  # the test model's max_seq_len: short, so truncation is easy to reach
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "and", "then", "x", "=", "\n"]


@pytest.fixture(scope="module")
def lm_eval():
    try:
        import lm_eval
    except ImportError:
        skip_or_fail("STACKLAB_REQUIRE_LM_EVAL", "lm-eval is not installed")
    return lm_eval


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Hugging Face offline, any socket connection an error, global RNGs as they were."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for module, name in [("datasets.config", "HF_DATASETS_OFFLINE"),
                         ("datasets.config", "HF_HUB_OFFLINE"),
                         ("huggingface_hub.constants", "HF_HUB_OFFLINE")]:  # fmt: skip
        if module in sys.modules and hasattr(sys.modules[module], name):
            monkeypatch.setattr(sys.modules[module], name, True)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory: a tokenizer that knows arithmetic and words, a random model."""
    run = tmp_path_factory.mktemp("run")
    gen = make_generator(ArithmeticTask(ops=["+", "-"], max_digits=2))
    rng = random.Random(0)
    texts = [gen.render(p) for p in gen.problems("train", 300, 0)]
    texts += [" ".join(rng.choices(WORDS, k=12)) for _ in range(200)]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=1))
    save_tokenizer(tok, run / "tokenizer")
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, aspect=16, head_dim=16, max_seq_len=L).build()
    model = build_model(cfg, tok.get_vocab_size())
    write_model(run / "pretrain" / "final", cfg, model.vocab_size, model.state_dict())
    return run


def requests(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def direct_logprob(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) straight from one forward of the model: tokens
    [EOT] + context + continuation (the continuation is what encoding the whole string adds
    after the context's tokens), cut from the left to L + 1, last ones scored."""
    ctx = tok.encode(context).ids
    cont = tok.encode(context + continuation).ids[len(ctx) :]
    seq = ([EOT_ID, *ctx, *cont])[-(L + 1) :]
    with torch.no_grad():
        logits = model(torch.tensor([seq[:-1]])).logits[0]
    logprobs = F.log_softmax(logits.double(), -1)[-len(cont) :]
    target = torch.tensor(seq[-len(cont) :])
    picked = logprobs.gather(-1, target[:, None]).sum()
    return float(picked), bool((logprobs.argmax(-1) == target).all())


def test_loglikelihood_is_the_models_own_token_logprobs(lm_eval, run: Path) -> None:
    from stacklab.evals.lm_eval_adapter import StacklabLM

    lm = StacklabLM(run, batch_size=3)
    model, tok = load_model(run / "pretrain" / "final").eval(), load_tokenizer(run / "tokenizer")
    long_context = " ".join(random.Random(1).choices(WORDS[:-1], k=3 * L))  # > L tokens
    pairs = [
        ("12+34=", "46"),
        ("12+34=", "-7"),
        ("the cat sat on", " the mat"),
        ("the dog ran and", " then the cat sat on a mat and the dog ran"),
        (long_context, " the cat"),  # truncated from the left
        ("9-1=", "8"),
    ]
    got = lm.loglikelihood(requests("loglikelihood", pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        want, want_greedy = direct_logprob(model, tok, context, continuation)
        assert logprob == pytest.approx(want, abs=1e-5), (context, continuation)
        assert greedy == want_greedy
    # Trailing spaces of the context belong to the continuation (lm-eval's HF rule).
    ((spaced, _),) = lm.loglikelihood(requests("loglikelihood", [("the cat ", "sat")]))
    assert spaced == pytest.approx(direct_logprob(model, tok, "the cat", " sat")[0], abs=1e-5)
    # An empty context is the boundary token alone.
    ((empty, _),) = lm.loglikelihood(requests("loglikelihood", [("", "the cat")]))
    assert empty == pytest.approx(direct_logprob(model, tok, "", "the cat")[0], abs=1e-5)
    # Batch size never changes a result.
    one = StacklabLM(run, batch_size=1).loglikelihood(requests("loglikelihood", pairs))
    assert [r[0] for r in one] == pytest.approx([r[0] for r in got], abs=1e-6)
    assert [r[1] for r in one] == [r[1] for r in got]


def test_is_greedy_exactly_when_every_token_is_the_argmax(lm_eval, run: Path) -> None:
    from stacklab.evals.lm_eval_adapter import StacklabLM

    lm = StacklabLM(run)
    model, tok = lm.model, lm.tokenizer
    checked = 0
    for context in ["12+34=", "the cat", "a mat and", "7-5=", "the dog ran", "on the"]:
        prompt = [EOT_ID, *tok.encode(context).ids]
        greedy = generate(model, [prompt], 2, stop_ids=())[0].tokens
        text = tok.decode(greedy)
        if tok.encode(context + text).ids != prompt[1:] + greedy:
            continue  # the greedy tokens do not come back from their text: not testable here
        other = next(i for i in range(8, tok.get_vocab_size()) if i != greedy[0])
        other_text = tok.decode([other, greedy[1]])
        if tok.encode(context + other_text).ids != [*prompt[1:], other, greedy[1]]:
            continue
        (_, yes), (_, no) = lm.loglikelihood(
            requests("loglikelihood", [(context, text), (context, other_text)])
        )
        assert yes and not no, context
        checked += 1
    assert checked >= 2


def test_rolling_loglikelihood_scores_each_token_once_with_the_most_context(
    lm_eval, run: Path
) -> None:
    from stacklab.evals.lm_eval_adapter import StacklabLM

    lm = StacklabLM(run, batch_size=2)
    model, tok = lm.model, lm.tokenizer
    short = "the cat sat on the mat"
    long = " ".join(random.Random(2).choices(WORDS[:-1], k=4 * L))
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(short,), (long,), ("",)]))
    # Windows end at every multiple of L (and at the end); each predicts the tokens since the
    # previous end from the L tokens before it, the first one from the boundary token.
    full = [EOT_ID, *tok.encode(long).ids]
    n, want, previous = len(full) - 1, 0.0, 0
    with torch.no_grad():
        for end in [*range(L, n, L), n]:
            start = max(0, end - L)
            logits = model(torch.tensor([full[start:end]])).logits[0].double()
            logprobs = F.log_softmax(logits, -1)
            targets = torch.tensor(full[start + 1 : end + 1])
            want += float(logprobs.gather(-1, targets[:, None])[-(end - previous) :].sum())
            previous = end
    assert n > 2 * L
    assert got[1] == pytest.approx(want, abs=1e-4)
    assert got[0] == pytest.approx(direct_logprob(model, tok, "", short)[0], abs=1e-5)
    assert got[2] == 0.0


def test_generate_until_is_greedy_and_cuts_at_the_first_stop_string(lm_eval, run: Path) -> None:
    from stacklab.evals.lm_eval_adapter import StacklabLM

    lm = StacklabLM(run, batch_size=2)
    model, tok = lm.model, lm.tokenizer
    contexts = ["12+34=", "the cat", "a mat and the", "9-1="]
    full = []
    for context in contexts:
        out = generate(model, [[EOT_ID, *tok.encode(context).ids]], 12, stop_ids=(EOT_ID,))[0]
        full.append(tok.decode(out.tokens, skip_special_tokens=False))
    # A stop string from inside each greedy text: the answer is the text before it.
    stops = [text[len(text) // 2 :][:2] or "never" for text in full]
    args = [
        (c, {"until": [s, "zzz"], "max_gen_toks": 12}) for c, s in zip(contexts, stops, strict=True)
    ]
    args += [(c, {"until": ["never seen"], "max_gen_toks": 12}) for c in contexts]
    args += [(contexts[0], {"until": "never seen", "max_gen_toks": 3, "do_sample": False})]
    got = lm.generate_until(requests("generate_until", args))
    assert any(len(t) >= 4 for t in full), full  # the test means something
    for i, (text, stop) in enumerate(zip(full, stops, strict=True)):
        assert got[i] == (text[: text.find(stop)] if stop in text else text)
        assert got[len(contexts) + i] == text
    three = generate(model, [[EOT_ID, *tok.encode(contexts[0]).ids]], 3, stop_ids=(EOT_ID,))
    assert got[-1] == tok.decode(three[0].tokens, skip_special_tokens=False)
    # Batch size and order never change a result.
    alone = StacklabLM(run, batch_size=1).generate_until(requests("generate_until", args[::-1]))
    assert alone[::-1] == got


def test_generate_until_keeps_the_end_of_a_long_prompt(lm_eval, run: Path) -> None:
    from stacklab.evals.lm_eval_adapter import StacklabLM

    lm = StacklabLM(run)
    model, tok = lm.model, lm.tokenizer
    context = " ".join(random.Random(3).choices(WORDS[:-1], k=2 * L))
    (got,) = lm.generate_until(requests("generate_until", [(context, {"max_gen_toks": 8})]))
    prompt = [EOT_ID, *tok.encode(context).ids][-(L - 8) :]
    out = generate(model, [prompt], 8, stop_ids=(EOT_ID,))[0]
    assert got == tok.decode(out.tokens, skip_special_tokens=False)
    # A budget over half the context is cut to L // 2 tokens rather than failing.
    (capped,) = lm.generate_until(requests("generate_until", [(context, {"max_gen_toks": 4 * L})]))
    prompt = [EOT_ID, *tok.encode(context).ids][-(L - L // 2) :]
    out = generate(model, [prompt], L // 2, stop_ids=(EOT_ID,))[0]
    assert capped == tok.decode(out.tokens, skip_special_tokens=False)


@pytest.mark.slow
def test_without_the_boundary_token_it_matches_lm_evals_hf_model_on_the_export(
    lm_eval, run: Path, tmp_path: Path
) -> None:
    """`boundary=False` gives what `lm_eval --model hf` gives on `stacklab export`'s
    checkpoint: the same token split, truncation, rolling windows and greedy text."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # lm-eval's HF model needs it
    from lm_eval.models.huggingface import HFLM

    from stacklab.evals.lm_eval_adapter import StacklabLM
    from stacklab.interop.hf import export_hf

    model = load_model(run / "pretrain" / "final")
    out = export_hf(
        model.cfg, model.vocab_size, model.state_dict(), run / "tokenizer", tmp_path / "hf"
    )
    hf = HFLM(pretrained=str(out), device="cpu", batch_size=4, dtype="float32")
    ours = StacklabLM(run, boundary=False, batch_size=3)
    long = " ".join(random.Random(4).choices(WORDS[:-1], k=3 * L))
    pairs = [("12+34=", "46"), ("the cat ", "sat on"), ("", "the cat"), (long, " the mat")]
    for a, b in zip(
        hf.loglikelihood(requests("loglikelihood", pairs)),
        ours.loglikelihood(requests("loglikelihood", pairs)),
        strict=True,
    ):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
    rolling = requests("loglikelihood_rolling", [(long,), ("the cat sat",)])
    assert hf.loglikelihood_rolling(rolling) == pytest.approx(
        ours.loglikelihood_rolling(rolling), abs=1e-3
    )
    gen = requests(
        "generate_until",
        [
            ("12+34=", {"until": ["\n"], "max_gen_toks": 8}),
            (long, {"until": ["a"], "max_gen_toks": 8}),
        ],
    )
    assert hf.generate_until(gen) == ours.generate_until(gen)


def test_registered_with_lm_eval_and_built_from_an_arg_string(lm_eval, run: Path) -> None:
    from lm_eval.api.registry import get_model

    from stacklab.evals.lm_eval_adapter import StacklabLM

    assert get_model("stacklab") is StacklabLM
    lm = StacklabLM.create_from_arg_string(
        f"run={run},stage=pretrain", {"batch_size": "auto", "device": "cpu"}
    )
    assert lm.max_length == L and lm.batch_size > 0


def test_bundled_data_is_stacklabs_own_held_out_problems() -> None:
    folder = Path(stacklab.evals.__file__).parent / "lm_eval_tasks" / "stacklab_arith"
    sys.path.insert(0, str(folder))
    try:
        import utils as arith  # the task folder's loader, as lm-eval imports it
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("utils", None)
    shipped = [json.loads(line) for line in arith.DATA_FILE.read_text().splitlines()]
    assert shipped == arith.make_items()
    assert len(shipped) == 20
    gen = make_generator(ArithmeticTask(ops=["+", "-"], max_digits=2))
    for item in shipped:
        assert item["choices"][item["label"]] == item["answer"]
        assert len(set(item["choices"])) == 4
        problem = next(p for p in gen.problems("eval", 20, 0) if p.prompt == item["prompt"])
        assert gen.split_of(problem) == "eval"


@pytest.mark.slow
def test_cli_runs_the_bundled_tasks_and_matches_the_adapter(
    lm_eval, run: Path, tmp_path: Path, capsys
) -> None:
    from stacklab.evals.lm_eval_adapter import TASKS_DIR, StacklabLM

    out = tmp_path / "results.json"
    argv = ["lm-eval", str(run), "--tasks", "stacklab_arith,stacklab_arith_gen"]
    assert main([*argv, "--limit", "10", "--out", str(out), "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "stacklab_arith" in printed and "acc" in printed
    results = json.loads(out.read_text())["results"]
    acc = results["stacklab_arith"]["acc,none"]
    exact = results["stacklab_arith_gen"]["exact_match,none"]
    assert 0 <= acc <= 1 and 0 <= exact <= 1
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left behind

    items = [json.loads(line) for line in (TASKS_DIR / "stacklab_arith" / "arith.jsonl").open()]
    items = items[:10]
    lm = StacklabLM(run)
    right = 0
    for item in items:
        scores = lm.loglikelihood(
            requests("loglikelihood", [(item["prompt"], c) for c in item["choices"]])
        )
        right += int(np.argmax([s for s, _ in scores])) == item["label"]
    assert acc == pytest.approx(right / len(items), abs=1e-12)
    gen_args = [(it["prompt"], {"until": ["\n"], "max_gen_toks": 8}) for it in items]
    answers = lm.generate_until(requests("generate_until", gen_args))
    want = sum(a == it["answer"] for a, it in zip(answers, items, strict=True)) / len(items)
    assert exact == pytest.approx(want, abs=1e-12)


def test_unknown_task_is_one_line_naming_close_matches(
    lm_eval, run: Path, monkeypatch, capsys
) -> None:
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager

    def bundled_only(*args, **kwargs):  # lm-eval's own ~15k tasks take seconds to index
        return real(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", bundled_only)
    assert main(["lm-eval", str(run), "--tasks", "stacklab_arth"]) == 2
    printed = capsys.readouterr().out.strip()
    assert "unknown lm-eval task 'stacklab_arth'" in printed
    assert "stacklab_arith" in printed and "\n" not in printed


def test_missing_lm_eval_is_one_line_naming_the_extra(run: Path, monkeypatch, capsys) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == "lm_eval"] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing any of lm_eval now fails
    monkeypatch.delitem(sys.modules, "stacklab.evals.lm_eval_adapter", raising=False)
    monkeypatch.delattr(stacklab.evals, "lm_eval_adapter", raising=False)
    assert main(["lm-eval", str(run), "--tasks", "stacklab_arith"]) == 2
    printed = capsys.readouterr().out.strip()
    assert "pip install 'stacklab[lm-eval]'" in printed and "\n" not in printed
