"""One pretraining step (forward, backward, AdamW step): our model vs `transformers`.

Cases: the tiny dense recipe (vs Qwen3), the tiny MoE recipe (8 experts, top-2, sigmoid router
with a shared expert: vs GLM-4-MoE, what our exporter emits for it) and a fine-grained MoE
(64 experts, top-8, otherwise tiny-moe: vs GLM-4-MoE). The Hugging Face model is built from
our exported config and weights (`hf_config`, `to_hf_state_dict`), so both sides hold the same
weights; both train with `torch.optim.AdamW` on the same batch, alternating, and the script
prints medians of tokens/s, the ratio, the goal from the performance issue, and model FLOPs
utilisation against a float32 matmul peak measured in the same run (`measure_peak_flops`,
the better of a measurement at the start and one at the end, as pretraining does).

Before timing, every `transformers` setting (attention: sdpa, eager; experts: eager,
batched_mm, grouped_mm) is checked to give our logits and loss, and the fastest correct one
(forward+backward on two rows of the batch) is kept, so the peer is never handicapped.

With `--compile` both sides also run under `torch.compile` (ours as `pretrain.compile` does,
the MoE experts through the `stacklab::grouped_mm` op; the peer in its fastest eager setting),
each first checked against its own eager loss; the goal is then judged on each side at its
fastest, compiled or not.

Peak memory is measured per side in a fresh subprocess (glibc's mmap threshold fixed at
64 KiB, so freed tensors go back to the OS and the resident size follows live memory): after
one warm-up step the peak-RSS counter is reset (`/proc/self/clear_refs`), one more step runs,
and the report gives the peak increase over the resident size before the step (activations,
gradients, temporaries). Linux only; `--no-memory` skips it.

`--device` and `--dtype` put both models, their optimizer state and the batch on that device
in that dtype (the `transformers` model is loaded with `dtype=`); bf16 is pure bf16 training
on both sides (no autocast, no float32 master weights), and its logits and loss are checked
to bf16 precision (see LOGIT_TOL). The MFU peak is `measure_peak_flops` of the device
(float32 1024² on CPU, bf16 8192² on CUDA); memory is measured on CPU only.

    python benchmarks/train_step.py [--quick] [--cases dense,moe8,moe64] [--batch 16]
        [--seq 256] [--repeats 5] [--threads 2] [--device cpu] [--dtype float32]
        [--activation-checkpointing] [--compile] [--json PATH]
    python benchmarks/train_step.py --profile moe64 --batch 4 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stacklab.interop.hf import hf_config, to_hf_state_dict
from stacklab.model.config import TransformerConfig
from stacklab.model.transformer import Transformer, build_model
from stacklab.recipe import load_recipe
from stacklab.train.pretrain import measure_peak_flops

# case → (recipe, overrides, the goal for ours/HF tokens/s)
CASES: dict[str, tuple[str, list[str], float]] = {
    "dense": ("tiny", [], 1.2),
    "moe8": ("tiny-moe", [], 1.3),
    "moe64": ("tiny-moe", ["model.moe.num_experts=64", "model.moe.top_k=8"], 1.6),
    # The softmax router exports to Qwen3-MoE (no shared expert there). Its balance loss is
    # computed over all layers' tokens at once (ours: per layer, summed), so the two cannot
    # add the same loss: both train without one here (theirs: output_router_logits off).
    "moe64-qwen": (
        "tiny-moe",
        [
            "model.moe.num_experts=64",
            "model.moe.top_k=8",
            "model.moe.router=softmax",
            "model.moe.num_shared_experts=0",
            "model.moe.balance=aux_loss",
            "model.moe.aux_loss_coef=0",
            "model.moe.z_loss_coef=0",
        ],
        1.6,
    ),
}
SIDES = ("ours", "ours+ac", "ours+compile", "hf", "hf+compile")
PROBE_ROWS = 2  # rows of the batch on which the transformers settings are compared
# The logit and loss differences accepted between the sides, per dtype. float32 rounds the
# same sums in another order: the largest |logit difference| <= 1e-3. bf16 rounds every
# product (2^-8 relative), and a near-tie in an MoE router can send one token to another
# expert (on CPU: largest difference 0.19 for logits up to 3.8, mean 0.002), so there the
# mean |logit difference| is checked.
LOGIT_TOL = {"float32": ("max", 1e-3), "bfloat16": ("mean", 1e-2)}
LOSS_TOL = {"float32": 1e-4, "bfloat16": 1e-2}
LR = 1e-4  # small: the weights hardly move, so routing stays comparable across repeats


def model_config(case: str) -> tuple[TransformerConfig, int]:
    recipe_name, overrides, _ = CASES[case]
    recipe = load_recipe(recipe_name, overrides)
    return recipe.model.build(), recipe.tokenizer.vocab_size


def build_ours(
    cfg: TransformerConfig, vocab: int, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    torch.manual_seed(0)  # the same weights on every device and dtype: built in float32
    return build_model(cfg, vocab).to(device=device, dtype=dtype).train()


def build_hf(cfg: TransformerConfig, vocab: int, ours: Transformer) -> nn.Module:
    """The `transformers` model of our export, loaded the way a user would load it: in the
    dtype of `ours`' weights, then moved to their device."""
    import transformers
    from safetensors.torch import save_file

    arch, fields = hf_config(cfg, vocab)
    weight = next(ours.parameters())
    state = {k: v.detach().cpu() for k, v in ours.state_dict().items()}
    tensors = to_hf_state_dict(cfg, state)
    config_class = {
        "Qwen3ForCausalLM": transformers.Qwen3Config,
        "Qwen3MoeForCausalLM": transformers.Qwen3MoeConfig,
        "Glm4MoeForCausalLM": transformers.Glm4MoeConfig,
    }[arch]
    config = config_class(**fields, dtype=weight.dtype)
    config.architectures = [arch]
    if arch == "Qwen3MoeForCausalLM":
        config.output_router_logits = False  # see CASES["moe64-qwen"]
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, Path(tmp) / "model.safetensors", metadata={"format": "pt"})
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=weight.dtype)
    return model.to(weight.device).train()


def batch(vocab: int, rows: int, seq: int, device: str = "cpu") -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)  # drawn on CPU: the same tokens on every device
    ids = torch.randint(0, vocab, (rows, seq + 1), generator=gen)
    return ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)


def ours_loss(
    model: Transformer, x: Tensor, y: Tensor, logits: bool = False
) -> tuple[Tensor, Tensor | None]:
    """How our training loop calls the model: loss only (the head fused with the loss)."""
    out = model(x, y, logits="all" if logits else None)
    return out.loss + out.aux_loss, out.logits


def hf_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    # `shift_labels`: our targets are already shifted, so both sides score the same positions.
    out = model(input_ids=x, labels=y, shift_labels=y, use_cache=False)
    return out.loss, out.logits


def make_step(
    model: nn.Module, loss_fn: Callable[..., tuple[Tensor, Tensor]], x: Tensor, y: Tensor
) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    moe_layers = model.moe_layers() if isinstance(model, Transformer) else []

    def step() -> None:
        loss, _ = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for moe in moe_layers:  # part of our training step (aux_free bias, load counts)
            moe.update_bias()

    return step


def compiled_step(
    model: nn.Module,
    loss_fn: Callable[..., tuple[Tensor, Tensor]],
    x: Tensor,
    y: Tensor,
    loss_tol: float = LOSS_TOL["float32"],
) -> Callable[[], None]:
    """A training step of a `torch.compile`d copy of `model`, checked against eager first.

    The check runs the training graph itself (forward with gradients, then backward) on the
    full batch, so the timed steps reuse its compilation and never see another shape.
    """
    with torch.no_grad():
        eager_loss = loss_fn(model, x, y)[0].item()
    _reset_counts(model)
    clone = copy.deepcopy(model)
    compiled = torch.compile(clone)

    def compiled_loss(_: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return loss_fn(compiled, x, y)

    start = time.perf_counter()
    loss = compiled_loss(clone, x, y)[0]
    loss.backward()
    clone.zero_grad(set_to_none=True)
    print(f"  compiled {type(model).__name__} in {time.perf_counter() - start:.0f} s", flush=True)
    if abs(loss.item() - eager_loss) > loss_tol:
        raise SystemExit(f"compiled {type(model).__name__}: loss {loss.item()} != {eager_loss}")
    _reset_counts(clone)
    return make_step(clone, compiled_loss, x, y)


def _reset_counts(model: nn.Module) -> None:
    """Forget the MoE load counts of a check's forward (the timed steps start from none)."""
    for moe in model.moe_layers() if isinstance(model, Transformer) else []:
        moe.expert_counts.zero_()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], None]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def hf_settings(moe: bool, quick: bool) -> list[tuple[str, str | None]]:
    """The settings to try; --quick (a smoke test) tries only the one usually fastest on CPU."""
    if quick:
        return [("sdpa", "grouped_mm" if moe else None)]
    attn = ["sdpa", "eager"]
    experts: list[str | None] = ["grouped_mm", "batched_mm", "eager"] if moe else [None]
    return [(a, e) for a in attn for e in experts]


def apply_setting(model: nn.Module, attn: str, experts: str | None) -> None:
    model.set_attn_implementation(attn)
    if experts is not None:
        model.set_experts_implementation(experts)


def pick_hf_setting(
    ours: Transformer,
    hf: nn.Module,
    x: Tensor,
    y: Tensor,
    moe: bool,
    quick: bool,
    dtype: str = "float32",
) -> tuple[tuple[str, str | None], dict[str, Any]]:
    """The fastest `transformers` setting whose logits and loss match ours.

    Checked and timed on the first PROBE_ROWS rows of the batch: some settings are very slow
    on CPU (batched_mm experts: about 20x grouped_mm), and the ranking is what matters.
    """
    x, y = x[:PROBE_ROWS], y[:PROBE_ROWS]
    with torch.no_grad():
        our_loss, our_logits = ours_loss(ours, x, y, logits=True)
    results: dict[str, Any] = {}
    best: tuple[float, tuple[str, str | None]] | None = None
    for attn, experts in hf_settings(moe, quick):
        name = f"attn={attn}" + (f",experts={experts}" if experts else "")
        try:
            apply_setting(hf, attn, experts)
            with torch.no_grad():
                loss, logits = hf_loss(hf, x, y)
        except Exception as exc:  # a setting this device or version lacks
            results[name] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
            continue
        diffs = (logits.float() - our_logits.float()).abs()
        diff, mean_diff = diffs.max().item(), diffs.mean().item()
        loss_diff = abs(loss.item() - our_loss.item())
        kind, tol = LOGIT_TOL[dtype]
        if (diff if kind == "max" else mean_diff) > tol or loss_diff > LOSS_TOL[dtype]:
            results[name] = (
                f"wrong: logit diff max {diff:.2e} mean {mean_diff:.2e}, loss diff {loss_diff:.2e}"
            )
            continue

        # Time forward+backward only (no optimizer: it must not move the shared weights).
        def fwd_bwd() -> None:
            hf_loss(hf, x, y)[0].backward()
            hf.zero_grad(set_to_none=True)

        seconds = min(timed(fwd_bwd) for _ in range(1 if quick else 2))
        results[name] = {
            "fwd_bwd_s": round(seconds, 4),
            "max_logit_diff": diff,
            "mean_logit_diff": mean_diff,
        }
        if best is None or seconds < best[0]:
            best = (seconds, (attn, experts))
    if best is None:
        raise SystemExit(f"no transformers setting matches our model: {results}")
    return best[1], results


def profile_step(case: str, rows: int, seq: int, limit: int = 30) -> None:
    """Print where one training step of our model spends its time (after a warm-up step)."""
    from torch.profiler import ProfilerActivity, profile

    cfg, vocab = model_config(case)
    ours = build_ours(cfg, vocab)
    x, y = batch(vocab, rows, seq)
    step = make_step(ours, ours_loss, x, y)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=limit))


def memory_probe(case: str, side: str, rows: int, seq: int, checkpointing: bool) -> dict[str, Any]:
    """Run in a fresh process: peak RSS increase of one training step after a warm-up step."""
    cfg, vocab = model_config(case)
    ours = build_ours(cfg, vocab)
    x, y = batch(vocab, rows, seq)
    if side == "ours":
        ours.set_activation_checkpointing(checkpointing)
        step = make_step(ours, ours_loss, x, y)
    else:
        hf = build_hf(cfg, vocab, ours)
        del ours
        attn, experts = os.environ["TRAIN_STEP_HF_SETTING"].split(",")
        apply_setting(hf, attn, None if experts == "-" else experts)
        step = make_step(hf, hf_loss, x, y)
    step()  # warm-up: optimizer state, lazy initialisation
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
    step()
    peak = _status_kib("VmHWM")
    return {"rss_before_mib": before / 1024, "step_peak_mib": (peak - before) / 1024}


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_memory(
    case: str, side: str, args: argparse.Namespace, hf_setting: str, checkpointing: bool = False
) -> dict[str, Any] | None:
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = os.environ | {
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": str(args.threads),
        "TRAIN_STEP_HF_SETTING": hf_setting,
    }
    cmd = [sys.executable, __file__, "--memory-probe", f"{case}:{side}:{int(checkpointing)}"]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"memory probe {case}/{side} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_case(case: str, args: argparse.Namespace, peak: float) -> dict[str, Any]:
    cfg, vocab = model_config(case)
    goal = CASES[case][2]
    dtype = getattr(torch, args.dtype)
    ours = build_ours(cfg, vocab, args.device, dtype)
    hf = build_hf(cfg, vocab, ours)
    x, y = batch(vocab, args.batch, args.seq, args.device)
    moe = cfg.moe.enabled
    (attn, experts), tried = pick_hf_setting(ours, hf, x, y, moe, args.quick, args.dtype)
    apply_setting(hf, attn, experts)
    setting = f"{attn},{experts or '-'}"

    sides: dict[str, Callable[[], None]] = {
        "ours": make_step(ours, ours_loss, x, y),
        "hf": make_step(hf, hf_loss, x, y),
    }
    if args.activation_checkpointing:
        ours_ac = build_ours(cfg, vocab, args.device, dtype)
        ours_ac.set_activation_checkpointing(True)
        sides["ours+ac"] = make_step(ours_ac, ours_loss, x, y)
    if args.compile:
        # Both sides compiled (the peer in its fastest eager setting), from the same weights.
        for name, model, loss_fn in (("ours", ours, ours_loss), ("hf", hf, hf_loss)):
            sides[f"{name}+compile"] = compiled_step(model, loss_fn, x, y, LOSS_TOL[args.dtype])
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeats + 1):  # the first round warms up every side
        for name, step in sides.items():
            times[name].append(timed(step))
    tokens = args.batch * args.seq
    flops = ours.flops_per_token(args.seq)
    result: dict[str, Any] = {
        "case": case,
        "recipe": CASES[case][0],
        "overrides": CASES[case][1],
        "hf_class": type(hf).__name__,
        "device": args.device,
        "dtype": args.dtype,
        "hf_setting": {"attn_implementation": attn, "experts_implementation": experts},
        "hf_settings_tried": tried,
        "params": ours.num_params(),
        "active_params": ours.num_params(active=True),
        "flops_per_token": flops,
        "goal": goal,
    }
    for name, ts in times.items():
        median = statistics.median(ts[1:])
        result[name] = {
            "step_s": median,
            "tokens_per_s": tokens / median,
            "mfu": flops * tokens / median / peak,
        }
    result["ratio"] = result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    if args.compile:
        ours_c, hf_c = result["ours+compile"]["tokens_per_s"], result["hf+compile"]["tokens_per_s"]
        result["ratio_compiled"] = ours_c / hf_c
        # Each side at its fastest, compiled or not: the ratio the goal is judged on.
        result["ratio_best"] = max(result["ours"]["tokens_per_s"], ours_c) / max(
            result["hf"]["tokens_per_s"], hf_c
        )
    if args.memory:
        for name in sides:
            side, ac = ("ours", True) if name == "ours+ac" else (name, False)
            result[name]["memory"] = measure_memory(case, side, args, setting, ac)
    return result


def print_table(results: list[dict[str, Any]], peak: float, cuda: bool = False) -> None:
    kind = "bf16 matmul peak (8192²" if cuda else "float32 matmul peak (1024²"
    print(f"{kind}, best of start/end): {peak / 1e9:.1f} GFLOP/s")
    head = f"{'case':<11} {'side':<12} {'step ms':>8} {'tok/s':>8} {'MFU':>6} {'step MiB':>9}"
    print(head + f" {'ratio':>7} {'goal':>6}")
    for r in results:
        for side in SIDES:
            if side not in r:
                continue
            s = r[side]
            mem = s.get("memory")
            mib = f"{mem['step_peak_mib']:>9.0f}" if mem else f"{'-':>9}"
            line = (
                f"{r['case']:<11} {side:<12} {s['step_s'] * 1e3:>8.0f} "
                f"{s['tokens_per_s']:>8.0f} {s['mfu']:>6.1%} {mib}"
            )
            if side == "ours":
                line += f" {r['ratio']:>6.2f}x {'>=' + format(r['goal'], '.1f') + 'x':>6}"
            if side == "ours+compile":
                line += f" {r['ratio_compiled']:>6.2f}x (both compiled)"
            print(line)
        if "ratio_best" in r:
            print(f"  each side at its fastest (eager or compiled): {r['ratio_best']:.2f}x")
        mem_o, mem_h = r["ours"].get("memory"), r["hf"].get("memory")
        mem_ratio = ""
        if mem_o and mem_h:
            mem_ratio = (
                f", step memory ours/hf {mem_o['step_peak_mib'] / mem_h['step_peak_mib']:.2f}x"
                " (goal <= 1x)"
            )
        setting = r["hf_setting"]
        print(f"  hf: {r['hf_class']} {setting}{mem_ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="dense,moe8,moe64", help=f"of {', '.join(CASES)}")
    parser.add_argument("--batch", type=int, help="rows per step (default 16)")
    parser.add_argument("--seq", type=int, help="tokens per row (default 256)")
    parser.add_argument("--repeats", type=int, help="timed steps per side (default 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=sorted(LOGIT_TOL))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="batch 2 x 128, 2 repeats, no memory, HF sdpa/grouped_mm only "
        "(--batch/--seq/--repeats still apply)",
    )
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="also time (and measure memory of) our model with activation checkpointing",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time both sides under torch.compile (about 30-40 s of compiling per model)",
    )
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument(
        "--profile",
        metavar="CASE",
        help="instead of timing: torch.profiler table of one step of our model on CASE",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quick = {"batch": 2, "seq": 128, "repeats": 2} if args.quick else {}
    for name, default in {"batch": 16, "seq": 256, "repeats": 5}.items():
        if getattr(args, name) is None:
            setattr(args, name, quick.get(name, default))
    if args.memory_probe:
        case, side, ac = args.memory_probe.split(":")
        print(json.dumps(memory_probe(case, side, args.batch, args.seq, ac == "1")))
        return
    if args.profile:
        profile_step(args.profile, args.batch, args.seq)
        return
    if args.quick:
        args.memory = False
    device = torch.device(args.device)
    if args.memory and device.type != "cpu":
        print("step memory is measured on CPU only (peak RSS): skipped")
        args.memory = False
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, {args.dtype} on {device}, batch {args.batch} x "
        f"{args.seq} tokens, AdamW both sides, median of {args.repeats}"
    )
    peak = measure_peak_flops(device)
    results = [run_case(case, args, peak) for case in args.cases.split(",")]
    peak = max(peak, measure_peak_flops(device))
    for r in results:  # MFU against the better peak
        for side in SIDES:
            if side in r:
                r[side]["mfu"] = r["flops_per_token"] * r[side]["tokens_per_s"] / peak
    print_table(results, peak, device.type == "cuda")
    if args.json:
        table = table_rows(results)
        args.json.write_text(
            json.dumps({"peak_flops": peak, "results": results, "table": table}, indent=2)
        )


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for `stacklab bench` (see src/stacklab/bench.py)."""
    rows = []
    for r in results:
        o, h = r["ours"], r["hf"]
        peer = f"transformers {r['hf_class']} ({r['hf_setting']['attn_implementation']}"
        peer += f", experts {e})" if (e := r["hf_setting"]["experts_implementation"]) else ")"
        rows.append(
            {
                "benchmark": "train_step",
                "case": f"{r['case']} tokens/s",
                "unit": "tokens/s",
                "ours": o["tokens_per_s"],
                "peer": h["tokens_per_s"],
                "peer_name": peer,
                "ratio": r["ratio"],
                "goal": f">= {r['goal']}x",
                "met": r["ratio"] >= r["goal"],
                "note": f"{r['dtype']} on {r['device']}; MFU ours {o['mfu']:.1%}, "
                f"peer {h['mfu']:.1%}",
            }
        )
        if o.get("memory") and h.get("memory"):
            mo, mh = o["memory"]["step_peak_mib"], h["memory"]["step_peak_mib"]
            rows.append(
                {
                    "benchmark": "train_step",
                    "case": f"{r['case']} step peak memory",
                    "unit": "MiB",
                    "ours": mo,
                    "peer": mh,
                    "peer_name": peer,
                    "ratio": mo / mh,
                    "goal": "<= 1x",
                    "met": mo <= mh,
                    "note": "peak RSS increase of one step, fresh process per side",
                }
            )
        if "ours+compile" in r:
            oc, hc = r["ours+compile"], r["hf+compile"]
            rows.append(
                {
                    "benchmark": "train_step",
                    "case": f"{r['case']} tokens/s, both compiled",
                    "unit": "tokens/s",
                    "ours": oc["tokens_per_s"],
                    "peer": hc["tokens_per_s"],
                    "peer_name": peer + " + torch.compile",
                    "ratio": r["ratio_compiled"],
                    "goal": f">= {r['goal']}x",
                    "met": r["ratio_best"] >= r["goal"],
                    "note": (
                        f"compile speeds ours {oc['tokens_per_s'] / o['tokens_per_s']:.2f}x, "
                        f"peer {hc['tokens_per_s'] / h['tokens_per_s']:.2f}x; each side at its "
                        f"fastest: {r['ratio_best']:.2f}x"
                    ),
                }
            )
        if "ours+ac" in r:
            a = r["ours+ac"]
            mem = a.get("memory")
            rows.append(
                {
                    "benchmark": "train_step",
                    "case": f"{r['case']} activation checkpointing",
                    "unit": "tokens/s",
                    "ours": a["tokens_per_s"],
                    "peer": o["tokens_per_s"],
                    "peer_name": "ours without checkpointing",
                    "ratio": a["tokens_per_s"] / o["tokens_per_s"],
                    "goal": "record",
                    "met": None,
                    "note": f"step peak {mem['step_peak_mib']:.0f} MiB" if mem else "",
                }
            )
    return rows


if __name__ == "__main__":
    main()
