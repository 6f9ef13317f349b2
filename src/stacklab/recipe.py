"""The recipe: one typed, declarative description of a whole model build.

A recipe is a YAML file validated by the pydantic models below. It is the unit that the
integration engine patches ("set `optim.lr` to 3e-3"), so three properties matter more than
convenience:

* **Strict.** An unknown key is an error that names the key and suggests the closest valid
  ones; a value of the wrong type is an error that names the key and the expected type. A
  typo must never silently fall back to a default.
* **Overridable.** `--set a.b.c=value` patches any leaf; the value is parsed as YAML (so
  `3`, `true`, `[1, 2]` mean what they look like) and validated like the file itself.
* **Hashable.** Each section has a canonical hash (sorted-key JSON of its validated values,
  defaults included), so build stages can be cached by exactly the settings they read.

Sections owned by later parts of the stack (model, optim, pretrain, sft, rl, eval) are
declared here so that recipes and overrides address them uniformly; they gain their fields
as those parts land.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from stacklab import builtin
from stacklab.errors import RecipeError, describe_validation_error, suggest
from stacklab.model import config as model_config
from stacklab.model.config import ModelDims, TransformerConfig


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data sources


class StdlibSource(Section):
    """The embedded default corpus: this Python's own standard-library `.py` files."""

    kind: Literal["stdlib"] = "stdlib"
    name: str = "stdlib"
    weight: float = Field(1.0, gt=0, description="mixture weight (relative share of tokens)")


class TextSource(Section):
    """Plain-text files: one file, or every file under a folder matching `glob`."""

    kind: Literal["text"] = "text"
    name: str
    path: Path
    glob: str = "**/*.txt"
    weight: float = Field(1.0, gt=0)


class JsonlSource(Section):
    """JSON Lines: one document per line, its text in `field` (and optionally an id)."""

    kind: Literal["jsonl"] = "jsonl"
    name: str
    path: Path
    field: str = "text"
    id_field: str | None = None
    weight: float = Field(1.0, gt=0)


class ParquetSource(Section):
    """A Parquet file (or folder of them): one document per row, its text in `column`."""

    kind: Literal["parquet"] = "parquet"
    name: str
    path: Path
    column: str = "text"
    id_column: str | None = None
    weight: float = Field(1.0, gt=0)


SourceConfig = Annotated[
    StdlibSource | TextSource | JsonlSource | ParquetSource, Field(discriminator="kind")
]

# --------------------------------------------------------------------------- filters


class LengthFilter(Section):
    """Drop documents that are too short to teach anything or too long to be normal text."""

    name: Literal["length"] = "length"
    min_chars: int = Field(200, ge=0)
    max_chars: int = Field(200_000, gt=0)
    min_words: int = Field(0, ge=0)


class RepetitionFilter(Section):
    """Gopher-style repetition rules (Rae et al. 2021, appendix A).

    Fractions are over non-blank lines, over characters in duplicated lines, over characters
    covered by the most frequent word n-gram (n = 2..4), and over characters covered by
    duplicated word n-grams (n = 5..10). A document exceeding any threshold is removed.
    """

    name: Literal["repetition"] = "repetition"
    max_dup_line_frac: float = Field(0.30, ge=0, le=1)
    max_dup_line_char_frac: float = Field(0.20, ge=0, le=1)
    max_top_ngram_char_frac: dict[int, float] = {2: 0.20, 3: 0.18, 4: 0.16}
    max_dup_ngram_char_frac: dict[int, float] = {
        5: 0.15,
        6: 0.14,
        7: 0.13,
        8: 0.12,
        9: 0.11,
        10: 0.10,
    }

    @field_validator("max_top_ngram_char_frac", "max_dup_ngram_char_frac")
    @classmethod
    def _ngram_sizes(cls, limits: dict[int, float]) -> dict[int, float]:
        bad = [n for n, frac in limits.items() if n < 1 or not 0 <= frac <= 1]
        if bad:
            raise ValueError(f"n-gram sizes must be >= 1 and fractions in [0, 1]; bad: {bad}")
        return limits


class CharRatioFilter(Section):
    """Bounds on the share of character classes (letters, digits, whitespace, non-ASCII)."""

    name: Literal["char_ratio"] = "char_ratio"
    min_alpha_frac: float = Field(0.0, ge=0, le=1)
    max_digit_frac: float = Field(1.0, ge=0, le=1)
    max_whitespace_frac: float = Field(1.0, ge=0, le=1)
    max_non_ascii_frac: float = Field(1.0, ge=0, le=1)


class PathExcludeFilter(Section):
    """Drop documents whose path matches any glob (e.g. test suites in a code corpus)."""

    name: Literal["path_exclude"] = "path_exclude"
    patterns: list[str] = Field(min_length=1)


FilterConfig = Annotated[
    LengthFilter | RepetitionFilter | CharRatioFilter | PathExcludeFilter,
    Field(discriminator="name"),
]


class DedupConfig(Section):
    """Exact dedup by content hash, then near-duplicate removal with MinHash LSH."""

    exact: bool = True
    near: bool = True
    threshold: float = Field(0.8, gt=0, lt=1, description="estimated Jaccard similarity")
    num_perm: int = Field(128, ge=16, le=1024)
    shingle_words: int = Field(5, ge=1, description="word n-gram size of the shingles")


# --------------------------------------------------------------------------- synthetic tasks


class ArithmeticTask(Section):
    """Integer arithmetic with programmatic answers: `a op b` with operands of 1..N digits."""

    kind: Literal["arithmetic"] = "arithmetic"
    ops: list[Literal["+", "-", "*"]] = Field(["+", "-", "*"], min_length=1)
    min_digits: int = Field(1, ge=1, le=18)
    max_digits: int = Field(3, ge=1, le=18)
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of the problem space reserved for evaluation"
    )
    weight: float = Field(0.05, gt=0, description="mixture weight of this task's text")

    @model_validator(mode="after")
    def _digits_ordered(self) -> ArithmeticTask:
        if self.min_digits > self.max_digits:
            raise ValueError(
                f"min_digits ({self.min_digits}) must not exceed max_digits ({self.max_digits})"
            )
        return self


TaskConfig = Annotated[ArithmeticTask, Field(discriminator="kind")]

# --------------------------------------------------------------------------- mixture and packing


class MixtureConfig(Section):
    """How many tokens to train on, and how much of the corpus to hold out for validation."""

    token_budget: int = Field(2_000_000, gt=0, description="training tokens across all sources")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of documents held out")
    val_token_budget: int = Field(100_000, gt=0, description="cap on held-out tokens")


class PackingConfig(Section):
    """Training rows: `seq_len + 1` tokens each (inputs and shifted targets)."""

    seq_len: int = Field(256, ge=8)
    rows_per_shard: int = Field(8192, ge=1)


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=lambda: [StdlibSource()], min_length=1)
    filters: list[FilterConfig] = Field(default_factory=list)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    tasks: list[TaskConfig] = Field(default_factory=lambda: [ArithmeticTask()])
    mixture: MixtureConfig = Field(default_factory=MixtureConfig)
    packing: PackingConfig = Field(default_factory=PackingConfig)

    @field_validator("sources")
    @classmethod
    def _unique_source_names(cls, sources: list[Any]) -> list[Any]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        return sources

    @field_validator("tasks")
    @classmethod
    def _unique_task_kinds(cls, tasks: list[Any]) -> list[Any]:
        kinds = [t.kind for t in tasks]
        if len(set(kinds)) != len(kinds):
            raise ValueError("each task kind may appear once")
        return tasks


# --------------------------------------------------------------------------- tokenizer


class TokenizerConfig(Section):
    """Byte-level BPE; digits are always split one per token."""

    vocab_size: int = Field(4096, ge=300, le=262_144)
    min_frequency: int = Field(2, ge=1)
    train_chars: int = Field(
        4_000_000, gt=0, description="characters sampled from the mixture to train on"
    )


# --------------------------------------------------------------------------- later sections


class MoEConfig(Section):
    """Mixture of Experts in the MLP of every layer after the first `first_k_dense`."""

    enabled: bool = False
    num_experts: int = Field(8, ge=2)
    top_k: int = Field(2, ge=1)
    expert_hidden: int | None = Field(
        None, ge=1, description="hidden size of one expert; default: the dense hidden / top_k"
    )
    router: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk: bool = Field(True, description="renormalise the top-k weights to sum to 1")
    routed_scaling: float = Field(1.0, gt=0, description="scale of the routed experts' sum")
    num_shared_experts: int = Field(0, ge=0, description="experts every token goes through")
    first_k_dense: int = Field(0, ge=0, description="the first k layers keep a dense MLP")
    balance: Literal["aux_loss", "aux_free"] = Field(
        "aux_loss",
        description="aux_loss: Switch/GShard load-balancing loss; aux_free: DeepSeek-V3 bias",
    )
    aux_loss_coef: float = Field(0.01, ge=0)
    z_loss_coef: float = Field(0.001, ge=0, description="router z-loss (ST-MoE)")
    bias_update_rate: float = Field(0.001, ge=0, description="aux_free: bias step per update")

    @model_validator(mode="after")
    def _top_k_fits(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        return self

    def build(self) -> model_config.MoEConfig:
        """The MoE layer's own config (`stacklab.model.config.MoEConfig`)."""
        return model_config.MoEConfig(**self.model_dump())


class ModelConfig(Section):
    """A decoder-only transformer: RMSNorm, RoPE, grouped-query attention, SwiGLU.

    `depth` is the one dial: layers = depth, width = depth × `aspect`, heads of `head_dim`.
    Any size set explicitly wins over the derived one; `dims()` resolves them all.
    The model itself reads the `TransformerConfig` that `build()` returns; its fields and
    defaults are these, one for one (tests/test_recipe.py checks).
    """

    depth: int = Field(4, ge=1)
    aspect: int = Field(64, ge=8, description="d_model = depth × aspect unless set")
    head_dim: int = Field(64, ge=8)
    d_model: int | None = Field(None, ge=8)
    n_heads: int | None = Field(None, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="default: half the query heads")
    ffn_hidden: int | None = Field(None, ge=8, description="default: 8/3 d_model, to 64s")
    max_seq_len: int = Field(1024, ge=8)
    rope_theta: float = Field(10_000.0, gt=0)
    qk_norm: bool = True
    tie_embeddings: bool = True
    norm_eps: float = Field(1e-6, gt=0)
    init_std: float = Field(0.02, gt=0)
    moe: MoEConfig = Field(default_factory=MoEConfig)

    def build(self) -> TransformerConfig:
        """The model's own config: what `build_model`, checkpoints and export read."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return TransformerConfig(**fields | {"moe": self.moe.build()})

    def dims(self) -> ModelDims:
        return self.build().dims()

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        self.dims()
        if self.moe.enabled and self.moe.first_k_dense > self.depth:
            raise ValueError(
                f"moe.first_k_dense ({self.moe.first_k_dense}) exceeds depth ({self.depth})"
            )
        return self


class MuonConfig(Section):
    """Muon for 2-D hidden weight matrices (embeddings, norms and the head stay on AdamW)."""

    lr: float = Field(0.02, gt=0)
    momentum: float = Field(0.95, ge=0, lt=1)
    nesterov: bool = True
    ns_steps: int = Field(5, ge=1, le=20)
    coefficients: Literal["quintic", "polar_express"] = Field(
        "quintic",
        description="Newton-Schulz iteration: the original fixed quintic (Jordan et al. 2024) "
        "or the per-step Polar Express schedule (Amsel et al. 2025)",
    )


class OptimConfig(Section):
    """Optimizer, learning-rate schedule and clipping."""

    name: Literal["adamw", "muon"] = "adamw"
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate (peak)")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0, description="on matrices only, never norms or biases")
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip; 0 disables")
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(20, ge=0)
    decay_frac: float = Field(0.2, gt=0, le=1, description="wsd: share of steps spent decaying")
    min_lr_frac: float = Field(0.1, ge=0, le=1, description="final lr as a share of the peak")
    muon: MuonConfig = Field(default_factory=MuonConfig)


class PretrainConfig(Section):
    """The pretraining loop."""

    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1, description="rows per micro-batch per process")
    grad_accum: int = Field(1, ge=1)
    ckpt_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, float32 on CPU"
    )
    compile: bool = Field(
        False,
        description="torch.compile the model (fused element-wise kernels): forward+backward "
        "about 1.1x faster on CPU, a tiny Muon step 1.03-1.07x, after 20-45 s of compiling; "
        "same results up to float rounding",
    )
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="under torchrun; fsdp: GPU only")
    activation_checkpointing: bool = Field(
        False,
        description="recompute each block's activations in backward: less memory, about one "
        "more forward per step; identical results",
    )


AgentEnvName = Literal["calculator", "lookup"]
VERIFIERS_PREFIX = "verifiers:"


def _env_name(builtin: tuple[str, ...]) -> AfterValidator:
    """A built-in environment name, or one from the `verifiers` ecosystem
    (src/stacklab/envs/verifiers_env.py): RL and eval only, as it has no SFT demonstrations."""

    def check(name: str) -> str:
        if name in builtin or (name.startswith(VERIFIERS_PREFIX) and name != VERIFIERS_PREFIX):
            return name
        raise ValueError(
            f"{name!r} is not an environment: use {', '.join(builtin)}, or "
            "verifiers:<taskset-id> / verifiers:<module or file.py>:<attr> (pip install "
            "'stacklab[envs]')"
        )

    return AfterValidator(check)


RLEnvName = Annotated[str, _env_name(("tasks", "calculator", "lookup"))]
EvalAgentEnvName = Annotated[str, _env_name(("calculator", "lookup"))]
SFTSourceName = Literal["tasks", "calculator", "lookup", "data"]


class SFTPhase(Section):
    """A span of SFT steps that trains on some of the data sources only (a curriculum).

    Sources: `tasks` (the data.tasks chats), an agent env of `sft.agent_envs` (its
    demonstrations), `data` (the user files). Omitted: every source.
    """

    steps: int = Field(ge=1)
    sources: list[SFTSourceName] | None = Field(None, min_length=1)
    task_max_digits: int | None = Field(
        None,
        ge=1,
        description="the `tasks` source in this phase: only problems whose operands have at "
        "most this many digits (small sums before large ones), drawn with repetition",
    )


class SFTConfig(Section):
    """Supervised fine-tuning on chat-formatted data: loss on assistant tokens only.

    The data is the training split of every `data.tasks` generator as one-turn conversations,
    tool-use demonstrations for each of `agent_envs`, and any user JSONL files of
    `{"messages": [...]}` records.
    """

    enabled: bool = False
    steps: int = Field(150, ge=1)
    batch_size: int = Field(16, ge=1, description="packed rows per step")
    seq_len: int = Field(256, ge=16, description="tokens per packed row")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (peak)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    min_lr_frac: float = Field(0.1, ge=0, le=1, description="cosine decay to this share of lr")
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip; 0 disables")
    task_examples: int = Field(2000, ge=0, description="conversations per data.tasks generator")
    agent_envs: list[AgentEnvName] = Field(
        default_factory=list, description="tool-use demonstrations for these environments"
    )
    agent_examples: int = Field(1000, ge=0, description="demonstrations per agent env")
    data: list[Path] = Field(default_factory=list, description="user JSONL conversation files")
    phases: list[SFTPhase] = Field(
        default_factory=list,
        description="in order, steps adding up to sft.steps, each on some sources only; "
        "empty: every step on every source",
    )
    pretrain_mix: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of each batch's rows that are windows of the pretraining train "
        "split (plain next-token loss on every token), so SFT keeps what pretraining learned; "
        "round(pretrain_mix × batch_size) rows",
    )
    ckpt_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)

    @property
    def pretrain_rows(self) -> int:
        """Rows of each batch taken from the pretraining text (the rest are chat rows)."""
        return math.floor(self.pretrain_mix * self.batch_size + 0.5)

    @model_validator(mode="after")
    def _mix_fits(self) -> SFTConfig:
        if not self.pretrain_mix or not self.enabled:
            return self
        rows = self.pretrain_rows
        if not 1 <= rows < self.batch_size:
            raise ValueError(
                f"sft.pretrain_mix {self.pretrain_mix} of sft.batch_size {self.batch_size} is "
                f"{rows} rows a batch: a batch needs at least one row of each kind (shares "
                f"{1 / self.batch_size:.3g} to {1 - 1 / self.batch_size:.3g})"
            )
        return self

    @model_validator(mode="after")
    def _phases_fit(self) -> SFTConfig:
        if not self.phases or not self.enabled:  # a disabled stage reads none of its fields
            return self
        total = sum(p.steps for p in self.phases)
        if total != self.steps:
            raise ValueError(
                f"sft.phases: the phases' steps add up to {total}, but sft.steps is {self.steps}"
            )
        for i, phase in enumerate(self.phases):
            if phase.task_max_digits is not None and "tasks" not in (phase.sources or ["tasks"]):
                raise ValueError(
                    f"sft.phases[{i}].task_max_digits: the phase has no `tasks` source "
                    f"(its sources: {phase.sources})"
                )
            for name in phase.sources or []:
                if name in ("calculator", "lookup") and name not in self.agent_envs:
                    raise ValueError(
                        f"sft.phases[{i}].sources: {name!r} has no demonstrations (add it to "
                        f"sft.agent_envs {self.agent_envs})"
                    )
        return self


RLLoss = Literal["grpo", "dr_grpo", "dapo", "gspo", "cispo"]
AdvantageScale = Literal["group_std", "batch_std", "none"]
# What `rl.advantage: null` means for each loss: the scale its paper uses. Dr. GRPO (Liu et al.
# 2025) drops GRPO's division by the group std, so `dr_grpo` refuses `group_std` outright.
LOSS_ADVANTAGE: dict[str, AdvantageScale] = {
    "grpo": "group_std",
    "dr_grpo": "none",
    "dapo": "group_std",
    "gspo": "group_std",
    "cispo": "group_std",
}
# The losses with a separate upper clip bound; grpo and dr_grpo clip symmetrically (eps_low).
EPS_HIGH_LOSSES = ("dapo", "gspo", "cispo")


class RLConfig(Section):
    """Reinforcement learning with verifiable rewards (the GRPO family), from the SFT model.

    Each step samples `prompts_per_step` tasks from `envs`, plays `group_size` episodes of each
    at `temperature`, turns rewards into group-relative advantages and takes `epochs` passes
    of `loss` over the batch in minibatches of `minibatch_size` episodes.

    `advantage` left unset follows `loss` (`none` for dr_grpo, `group_std` for the others);
    `advantage: group_std` with `loss: dr_grpo` and `eps_high` with grpo or dr_grpo (which clip
    symmetrically by `eps_low`) are errors rather than silently ignored.
    """

    enabled: bool = False
    steps: int = Field(30, ge=1)
    envs: list[RLEnvName] = Field(default_factory=lambda: ["tasks"], min_length=1)
    env_weights: dict[RLEnvName, float] = Field(
        default_factory=dict,
        description="relative share of each step's prompts per env of `envs` (unset: 1); "
        "under `tasks`, each of data.tasks is a source of this weight",
    )
    prompts_per_step: int = Field(16, ge=1)
    group_size: int = Field(8, ge=2)
    temperature: float = Field(1.0, gt=0)
    max_turns: int = Field(4, ge=1, description="assistant turns per episode")
    max_new_tokens: int = Field(48, ge=1, description="tokens per assistant turn")
    token_budget: int = Field(384, ge=16, description="tokens per episode, prompt included")
    loss: RLLoss = "grpo"
    advantage: AdvantageScale | None = Field(
        None,
        description="reward - group mean, divided by the group's std (group_std), the batch's "
        "(batch_std) or nothing (none); None: the loss's own, none for dr_grpo, else group_std "
        "(dr_grpo refuses group_std)",
    )
    eps_low: float | None = Field(
        None,
        gt=0,
        description="clip range below 1 (grpo, dr_grpo: on both sides of 1); None: the loss's own",
    )
    eps_high: float | None = Field(
        None,
        gt=0,
        description="clip range above 1, dapo/gspo/cispo only (an error with grpo or dr_grpo); "
        "None: the loss's own",
    )
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups of equal rewards, refill")
    max_sampling_rounds: int = Field(3, ge=1, description="dynamic sampling: rollout rounds/step")
    overlong_buffer: int = Field(0, ge=0, description="DAPO soft overlong penalty span; 0: off")
    kl_coef: float = Field(0.0, ge=0, description="k3 KL penalty to the frozen SFT model")
    epochs: int = Field(1, ge=1, description="optimisation passes over each rollout batch")
    minibatch_size: int = Field(64, ge=1, description="episodes per optimizer step")
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate (constant after warmup)")
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    ckpt_every: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _budget_fits(self) -> RLConfig:
        if self.max_new_tokens >= self.token_budget:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must be below token_budget "
                f"({self.token_budget})"
            )
        return self

    @model_validator(mode="after")
    def _settings_fit_the_loss(self) -> RLConfig:
        if self.loss == "dr_grpo" and self.advantage == "group_std":
            raise ValueError(
                "rl.advantage 'group_std' contradicts rl.loss 'dr_grpo' (Dr. GRPO does not divide "
                "by the group's std); valid for dr_grpo: none, batch_std, or null (none)"
            )
        if self.eps_high is not None and self.loss not in EPS_HIGH_LOSSES:
            raise ValueError(
                f"rl.eps_high is unused by rl.loss '{self.loss}', which clips symmetrically by "
                f"rl.eps_low; set eps_high: null, or a loss with an upper bound of its own "
                f"({', '.join(EPS_HIGH_LOSSES)})"
            )
        return self

    @property
    def advantage_scale(self) -> AdvantageScale:
        """`advantage`, or the loss's own when unset (see `LOSS_ADVANTAGE`)."""
        return self.advantage or LOSS_ADVANTAGE[self.loss]

    @model_validator(mode="after")
    def _weights_name_envs(self) -> RLConfig:
        for name, weight in self.env_weights.items():
            if name not in self.envs:
                raise ValueError(f"env_weights names '{name}', which is not in rl.envs {self.envs}")
            if not weight > 0:
                raise ValueError(f"env_weights['{name}'] must be > 0, got {weight}")
        return self


class EvalConfig(Section):
    """Evaluation objectives."""

    val_batches: int = Field(0, ge=0, description="held-out batches for val_bpb; 0: all")
    batch_size: int = Field(16, ge=1)
    task_problems: int = Field(200, ge=1, description="held-out problems per task")
    max_new_tokens: int = Field(16, ge=1)
    task_format: Literal["auto", "raw", "chat"] = Field(
        "auto",
        description="raw: complete the bare prompt; chat: one user turn; auto: chat when SFT or "
        "RL ran",
    )
    agent_envs: list[EvalAgentEnvName] = Field(
        default_factory=list, description="agent_success/<env> on held-out agent tasks"
    )
    agent_tasks: int = Field(100, ge=1, description="held-out tasks per agent env")
    agent_max_turns: int = Field(4, ge=1)
    agent_max_new_tokens: int = Field(48, ge=1)
    agent_token_budget: int = Field(384, ge=16)
    pass_k: list[int] = Field(
        default_factory=list, description="pass@k per task for these k, from sampled answers"
    )
    pass_k_samples: int = Field(8, ge=1, description="samples per problem for pass@k")
    pass_k_problems: int = Field(50, ge=1)
    pass_k_temperature: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _k_fits(self) -> EvalConfig:
        if self.pass_k and max(self.pass_k) > self.pass_k_samples:
            raise ValueError(
                f"pass_k {self.pass_k} asks for more than pass_k_samples ({self.pass_k_samples})"
            )
        if any(k < 1 for k in self.pass_k):
            raise ValueError(f"pass_k must be positive, got {self.pass_k}")
        return self


# --------------------------------------------------------------------------- tracking

TrackerName = Literal["tensorboard", "wandb", "trackio"]
# Sections that say where results are sent, never what they are: left out of `to_dict()`, so
# of the recipe's hash, every stage's cache key and an integration run's identity.
UNHASHED = frozenset({"log"})


class LogConfig(Section):
    """Where every stage's metrics go besides its `metrics.jsonl` (which stays the record).

    Turning a tracker on changes no hash and no cache key: a stage already in the cache is
    not run again, so it logs nothing new. Needs `pip install 'stacklab[track]'`.
    """

    trackers: list[TrackerName] = Field(
        default_factory=list,
        description="tensorboard (event files), wandb (offline run folders, `wandb sync` "
        "uploads them), trackio (its local database: `trackio show`); empty: metrics.jsonl only",
    )
    project: str = Field("stacklab", min_length=1, description="the W&B and trackio project")
    dir: Path | None = Field(
        None,
        description="one folder for every build's tracker files, by recipe name and hash, then "
        "stage; None: inside each stage's own folder. trackio keeps its own ($TRACKIO_DIR)",
    )

    @field_validator("trackers")
    @classmethod
    def _unique_trackers(cls, trackers: list[str]) -> list[str]:
        if len(set(trackers)) != len(trackers):
            raise ValueError(f"trackers repeat: {trackers}")
        return trackers


# --------------------------------------------------------------------------- the recipe


class Recipe(Section):
    name: str = "unnamed"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _easy_phases_have_problems(self) -> Recipe:
        if not self.sft.enabled:
            return self
        for i, phase in enumerate(self.sft.phases):
            k = phase.task_max_digits
            if k is not None and not any(t.min_digits <= k for t in self.data.tasks):
                have = [f"{t.min_digits}-{t.max_digits}" for t in self.data.tasks] or "none"
                raise ValueError(
                    f"sft.phases[{i}].task_max_digits: no data.tasks problem has operands of "
                    f"at most {k} digits (the tasks' digit ranges: {have})"
                )
        return self

    def section_hash(self, dotted: str) -> str:
        """Canonical hash of one section (or any sub-object), e.g. `"data.mixture"`."""
        return canonical_hash(get_dotted(self.to_dict(full=True), dotted))

    def hash(self) -> str:
        """Canonical hash of the whole recipe (what can change a result: not `log`)."""
        return canonical_hash(self.to_dict())

    def to_dict(self, *, full: bool = False) -> dict[str, Any]:
        """Every value, defaults included, as plain JSON-compatible data; without the
        sections that only say where metrics are sent (`log`) unless `full`."""
        return self.model_dump(mode="json", exclude=None if full else set(UNHASHED))

    def to_yaml(self) -> str:
        """Every value, as `to_dict()`; and `log` when it is set, so a written recipe keeps it."""
        data = self.to_dict()
        if self.log != LogConfig():
            data["log"] = self.log.model_dump(mode="json")
        return yaml.safe_dump(data, sort_keys=False)


def canonical_hash(value: Any) -> str:
    """sha256 of the sorted-key, compact JSON of `value`, as 16 hex digits."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def get_dotted(data: Any, dotted: str) -> Any:
    """Look up `a.b.0.c` in nested dicts and lists."""
    node = data
    for part in dotted.split(".") if dotted else []:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply `key=value` overrides, and validate.

    `path` may also be the bare name of a built-in recipe (`tiny`: see `stacklab.builtin`).
    A recipe may start from another with `base: NAME_OR_PATH`: the base is read first and
    this file's values are merged over it (mappings merge key by key; lists and values
    replace). Relative data paths are resolved against the folder of the file that names them.
    """
    file = builtin.resolve("recipe", path, error=RecipeError)
    recipe = recipe_from_dict(_read_raw(file), origin=str(file))
    if overrides:
        recipe = apply_overrides(recipe, overrides)
    return recipe


def _read_raw(file: Path, children: tuple[Path, ...] = ()) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{file}: not valid YAML ({_one_line(exc)})") from None
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{file}: a recipe must be a mapping of sections, got {type(raw).__name__}"
        )
    data = raw.get("data")
    for source in data.get("sources") or [] if isinstance(data, dict) else []:
        if isinstance(source, dict) and isinstance(source.get("path"), str):
            source["path"] = str((file.parent / source["path"]).resolve())
    sft = raw.get("sft")
    if isinstance(sft, dict) and isinstance(sft.get("data"), list):
        sft["data"] = [
            str((file.parent / item).resolve()) if isinstance(item, str) else item
            for item in sft["data"]
        ]
    log = raw.get("log")
    if isinstance(log, dict) and isinstance(log.get("dir"), str):
        log["dir"] = str((file.parent / Path(log["dir"]).expanduser()).resolve())
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise RecipeError(f"{file}: base must be a recipe name or path, got {base!r}")
    base_file = builtin.resolve("recipe", base, beside=file.parent, error=RecipeError)
    if base_file.resolve() in (*children, file.resolve()):
        raise RecipeError(f"{file}: base recipes form a cycle through {base_file}")
    return _merge(_read_raw(base_file, (*children, file.resolve())), raw)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def recipe_from_dict(raw: dict[str, Any], origin: str = "recipe") -> Recipe:
    """Validate a plain dict as a Recipe, turning pydantic errors into one-line RecipeErrors."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{origin}: {describe_validation_error(exc, Recipe)}") from None


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Apply `a.b.c=value` overrides; values are parsed as YAML and validated in place."""
    data = recipe.to_dict(full=True)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"bad override {item!r}: expected KEY=VALUE, e.g. data.seed=3")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(data, key, value, item)
    return recipe_from_dict(data, origin="--set")


def _set_dotted(data: dict[str, Any], key: str, value: Any, item: str) -> None:
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth]) or "the recipe"
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(
                    f"bad override {item!r}: {here} is a list of {len(node)} items; "
                    f"index it with 0..{len(node) - 1}"
                )
            index: int | str = int(part)
        elif isinstance(node, dict):
            if part not in node:
                raise RecipeError(
                    f"bad override {item!r}: unknown key '{'.'.join(parts[: depth + 1])}'"
                    + suggest(part, list(node))
                )
            index = part
        else:
            raise RecipeError(f"bad override {item!r}: {here} is a value ({node!r}), not a section")
        if last:
            node[index] = value
        else:
            node = node[index]


# --------------------------------------------------------------------------- error messages


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
