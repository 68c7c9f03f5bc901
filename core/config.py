"""Training job configuration: one validated object, loaded from YAML or built in code.

Every field has a default and a one-line description; validation errors name the field and
what is allowed (`ConfigError`). No torch here: the API validates job specs with these models.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from core.errors import InvalidInput
from core.rewards.spec import Grader, RewardSpec, spec_of_grader

Method = Literal["prefix_rft", "rft", "sft", "sft_then_rft", "psft", "psft_then_rft"]
METHODS: tuple[str, ...] = get_args(Method)
# Methods that start with (or are only) a supervised phase on demonstrations, and its kind.
SUPERVISED_PHASE = {"sft": "sft", "sft_then_rft": "sft", "psft": "psft", "psft_then_rft": "psft"}
# Methods that train on demonstrations only, so they need no reward.
REWARD_FREE_METHODS = ("sft", "psft")


class _Strict(BaseModel):
    # No NaN or infinity (JSON has neither, and 1e400 parses as inf): a bound must mean something.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class PrefixAdapterConfig(_Strict):
    """PEFT prefix tuning: trainable key/value vectors prepended at every layer."""

    type: Literal["prefix"] = "prefix"
    num_virtual_tokens: int | None = Field(
        None, ge=1, le=512, description="Key/value prefix slots per layer; default: the length of init_text."
    )
    prefix_projection: bool = Field(False, description="Reparameterise the prefix through a two-layer MLP.")
    init_text: str | None = Field(
        None,
        description="Text whose key/value activations initialise the prefix; the prefix then stands in for "
        "it at the start of a prompt, so a fresh adapter is the base model. Default: the start every chat "
        "prompt shares (the system turn and the user turn's header).",
    )
    # Measured on SmolLM2-135M (SFT on addition, 32 sequences per step): 3e-3 barely moves the
    # loss in 5 steps (1.63 -> 1.32), 1e-2 matches LoRA at 3e-4 (-> 0.93), 3e-2 goes faster still.
    learning_rate: float = Field(
        1e-2, gt=0, description="AdamW learning rate (prefix vectors need a high one)."
    )


class LoraAdapterConfig(_Strict):
    """PEFT LoRA on the linear layers."""

    type: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear'."
    )
    learning_rate: float = Field(3e-4, gt=0, description="AdamW learning rate.")


def _adapter_type(value: Any) -> str:
    """The adapter's `type`, prefix when left out (the default adapter)."""
    return value.get("type", "prefix") if isinstance(value, dict) else getattr(value, "type", "prefix")


AdapterConfig = Annotated[
    Annotated[PrefixAdapterConfig, Tag("prefix")] | Annotated[LoraAdapterConfig, Tag("lora")],
    Discriminator(_adapter_type),
]


class DataConfig(_Strict):
    train: Path = Field(description="JSONL file of training examples.")
    eval: Path | None = Field(
        None, description="JSONL file of held-out examples; default: carved from train."
    )
    eval_size: int = Field(
        0, ge=0, description="Examples carved out of `train` for evaluation when `eval` is unset."
    )
    split_seed: int = Field(0, description="Seed of the held-out split.")


class TrainingConfig(_Strict):
    steps: int = Field(100, ge=1, le=1_000_000, description="Optimizer steps.")
    prompts_per_step: int = Field(8, ge=1, description="Prompts (groups) per step (B).")
    rollouts_per_prompt: int = Field(8, ge=2, description="Rollouts per prompt (N), hybrids included.")
    hybrid_rollouts_per_prompt: int = Field(
        1,
        ge=0,
        description="Of the N rollouts, how many start from a demonstration prefix (H); prefix_rft only.",
    )
    max_completion_tokens: int = Field(
        256, ge=1, description="Longest response, demonstration prefix included."
    )
    max_prompt_tokens: int = Field(1024, ge=1, description="Prompts longer than this are rejected at load.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts (and of scoring).")
    learning_rate: float | None = Field(None, gt=0, description="Overrides the adapter type's default.")
    rft_learning_rate: float | None = Field(
        None,
        gt=0,
        description="sft_then_rft / psft_then_rft: the RFT phase's learning rate, as a separate RL run "
        "would choose its own; default: the same as the supervised phase.",
    )
    lr_scheduler: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="Learning-rate shape."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward/backward; bounds memory.")
    generation_batch_size: int = Field(64, ge=1, description="Sequences per generate call; bounds memory.")
    advantage: Literal["dr_grpo", "grpo"] = Field(
        "dr_grpo", description="dr_grpo: r - mean(on-policy r); grpo: also divided by the group std."
    )
    clip_epsilon: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip.")
    dual_clip: float = Field(3.0, gt=1, description="Dual-clip bound for negative advantages.")
    entropy_keep_fraction: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Fraction of highest-entropy demonstration-prefix tokens that keep their advantage.",
    )
    kl_beta: float = Field(0.0, ge=0, description="KL penalty to the initial adapter (0 = off).")
    updates_per_batch: int = Field(1, ge=1, description="Optimizer passes over each rollout batch.")
    demo_prefix_high: float = Field(
        0.95, gt=0, lt=1, description="Upper bound of the demonstration-prefix ratio."
    )
    demo_prefix_low_start: float = Field(0.95, gt=0, lt=1, description="Lower bound at step 0.")
    demo_prefix_low_end: float = Field(0.05, ge=0, lt=1, description="Lower bound after the decay.")
    demo_prefix_decay_steps: int | None = Field(
        None, ge=1, description="Cosine decay length; default: all steps."
    )
    sft_steps: int | None = Field(
        None,
        ge=1,
        description="sft_then_rft / psft_then_rft: supervised steps before RFT; default: half.",
    )
    sft_examples_per_step: int | None = Field(
        None,
        ge=1,
        description="Demonstrations per supervised step; default prompts_per_step * rollouts_per_prompt "
        "(the same sequences per step as RFT).",
    )
    psft_minibatches: int = Field(
        8,
        ge=1,
        description="psft: optimizer steps per batch of demonstrations, one per mini-batch, all against "
        "the policy that started the batch (1 is exactly sft).",
    )
    psft_epsilon_low: float = Field(0.2, gt=0, lt=1, description="psft: lower ratio clip.")
    psft_epsilon_high: float = Field(
        0.28, gt=0, description="psft: upper ratio clip (the one that acts: the advantage is 1)."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Of the frozen base weights. auto: bfloat16 on CUDA and on CPUs with AMX or "
        "AVX512-BF16, else float32; adapters, optimizer state and the loss stay float32.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available.")
    processes: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Processes (one per GPU) the job trains in, data-parallel, each on its share of every "
        "step's groups; a worker starts them with torchrun. Default: the worker's "
        "PREFIX_RFT_TRAIN_PROCESSES (1). `prefix-rft train` starts torchrun with as many, unless it "
        "runs under a launcher (torchrun, accelerate launch) already.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward pass instead of keeping them: "
        "less memory for more compute (docs/benchmarks.md).",
    )
    samples_per_step: int = Field(
        4, ge=0, description="Completions with rewards kept per step for inspection."
    )
    max_reward_error_rate: float = Field(
        0.5,
        ge=0,
        le=1,
        description="A grader that fails on more than this share of a step's samples for reward_error_steps "
        "steps in a row fails the job.",
    )
    reward_error_steps: int = Field(
        3, ge=1, description="Steps in a row over max_reward_error_rate before the job fails."
    )

    early_stop_patience: int | None = Field(
        None,
        ge=1,
        description="Stop once the held-out reward has not improved for this many evaluations in a row, "
        "and keep the adapter of the best one (needs eval.every; off by default).",
    )
    early_stop_min_delta: float = Field(
        0.0, ge=0, description="The least rise of the held-out reward that counts as an improvement."
    )
    early_stop_zero_variance_steps: int | None = Field(
        None,
        ge=1,
        description="Stop after this many training steps in a row in which every group's rollouts all got "
        "the same reward (nothing left to learn from; off by default).",
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> TrainingConfig:
        if self.hybrid_rollouts_per_prompt >= self.rollouts_per_prompt:
            raise ValueError(
                "hybrid_rollouts_per_prompt must be smaller than rollouts_per_prompt: the on-policy rollouts "
                "are the baseline of the group"
            )
        if self.demo_prefix_low_end > self.demo_prefix_low_start:
            raise ValueError("demo_prefix_low_end must not exceed demo_prefix_low_start")
        if self.demo_prefix_low_start > self.demo_prefix_high:
            raise ValueError("demo_prefix_low_start must not exceed demo_prefix_high")
        if self.sft_steps is not None and self.sft_steps >= self.steps:
            raise ValueError("sft_steps must be smaller than steps (the RFT phase needs some steps)")
        return self


class EvalConfig(_Strict):
    every: int = Field(0, ge=0, description="Evaluate every K steps (0: only before and after training).")
    max_examples: int = Field(200, ge=1, description="Held-out examples scored per evaluation.")
    batch_size: int = Field(64, ge=1, description="Sequences per greedy generate call.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Default: training.max_completion_tokens."
    )


class CheckpointConfig(_Strict):
    every: int = Field(0, ge=0, description="Checkpoint every K steps (0: never).")
    keep: int = Field(2, ge=1, description="Most recent checkpoints kept on disk.")


class TrainConfig(_Strict):
    model: str = Field(description="Base model: a registry name, a local directory, or a cached hub id.")
    method: Method = Field("prefix_rft", description=" | ".join(METHODS) + ".")
    adapter: AdapterConfig = Field(default_factory=PrefixAdapterConfig)
    data: DataConfig
    reward: RewardSpec | None = Field(None, description="Required for every method except sft.")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    seed: int = Field(0, description="Seed of sampling, data order and initialisation.")
    output_dir: Path = Field(
        Path("runs/latest"), description="Where the adapter, metrics and checkpoints go."
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        if self.method not in REWARD_FREE_METHODS and self.reward is None:
            raise ValueError(f"method {self.method!r} needs a `reward` (only sft and psft train without one)")
        if self.training.early_stop_patience is not None and not self.eval.every:
            raise ValueError(
                "training.early_stop_patience counts evaluations: set eval.every to evaluate during training"
            )
        return self

    @property
    def learning_rate(self) -> float:
        return self.training.learning_rate or self.adapter.learning_rate

    @property
    def sft_steps(self) -> int:
        """Steps of supervised training at the start of the run."""
        if self.method in ("sft", "psft"):
            return self.training.steps
        if self.method in ("sft_then_rft", "psft_then_rft"):
            return self.training.sft_steps or self.training.steps // 2
        return 0

    @property
    def supervised_phase(self) -> str | None:
        """`sft` or `psft`: how the supervised steps train; None for methods without them."""
        return SUPERVISED_PHASE.get(self.method)

    @property
    def hybrid_rollouts_per_prompt(self) -> int:
        return self.training.hybrid_rollouts_per_prompt if self.method == "prefix_rft" else 0


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where (a dotted field path, if any) and what."""

    param: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.param}: {self.message}" if self.param else self.message


class ConfigError(InvalidInput):
    """A configuration problem, phrased for the person who wrote the config."""

    def __init__(self, problems: list[Problem | str]):
        self.details = [p if isinstance(p, Problem) else Problem(None, p) for p in problems]
        self.problems = [str(p) for p in self.details]
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in self.problems))


def _describe(error: dict[str, Any], root: type[BaseModel]) -> Problem:
    loc = error["loc"][:-1] if error["type"] == "extra_forbidden" else error["loc"]
    path, node = _walk(loc, root)
    model = node if isinstance(node, type) else None
    message = error["msg"]
    if error["type"] == "union_tag_not_found":
        path = [*path, "type"]
        allowed = f": one of {', '.join(map(repr, node))}" if isinstance(node, dict) else ""
        message = f"required{allowed}"
    if error["type"] == "union_tag_invalid":
        path = [*path, "type"]
        message = f"must be one of {error['ctx']['expected_tags']}, got {error['ctx']['tag']!r}"
    if error["type"] == "extra_forbidden":
        known = list(model.model_fields) if model else []
        name = str(error["loc"][-1])
        path = [*path, name]
        close = difflib.get_close_matches(name, known, n=1)
        message = "unknown field" + (f"; did you mean {close[0]!r}?" if close else "")
        if known:
            message += f" (allowed: {', '.join(known)})"
    return Problem(".".join(path) or None, message.removeprefix("Value error, "))


def _walk(loc: tuple[Any, ...], root: type[BaseModel]) -> tuple[list[str], Any]:
    """Follow an error location through the config models.

    Returns the location as the user wrote it (union tags and validator names dropped) and the
    model found at its end, if any.
    """
    path: list[str] = []
    node: Any = root
    for part in loc:
        if isinstance(node, dict):  # a tagged union: this part is the tag, not a field
            node = node.get(part)
            continue
        path.append(str(part))
        if isinstance(node, tuple):  # a list: this part is the index
            node = _model_of(node[1])
        elif isinstance(node, type) and issubclass(node, BaseModel) and str(part) in node.model_fields:
            node = _model_of(node.model_fields[str(part)].annotation)
        else:
            node = None
    return path, node


def _model_of(annotation: Any) -> Any:
    """A model class, a {tag: model} dict for a tagged union, ("list", item) for a list, or None."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _model_of(get_args(annotation)[0])
    if origin is list:
        return ("list", get_args(annotation)[0])
    if origin in (Union, UnionType):
        models = [
            m for m in map(_unwrap, get_args(annotation)) if isinstance(m, type) and issubclass(m, BaseModel)
        ]
        if len(models) == 1:
            return models[0]
        return {m.model_fields["type"].default: m for m in models}
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def parse_config(raw: Any, base_dir: Path | None = None) -> TrainConfig:
    """Validate a mapping into a TrainConfig; relative data paths resolve against `base_dir`."""
    if not isinstance(raw, dict):
        raise ConfigError([f"the config must be a mapping of fields, got {type(raw).__name__}"])
    try:
        config = TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_describe(e, TrainConfig) for e in exc.errors()]) from None
    if base_dir is not None:
        data = config.data
        data.train = _resolve(data.train, base_dir)
        if data.eval is not None:
            data.eval = _resolve(data.eval, base_dir)
    return config


def parse_reward_spec(raw: Any) -> RewardSpec:
    """Validate a reward spec on its own (the API stores specs before any job uses them)."""
    if not isinstance(raw, dict):
        raise ConfigError([f"a reward spec must be a mapping with `graders`, got {type(raw).__name__}"])
    try:
        return RewardSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_describe(e, RewardSpec) for e in exc.errors()]) from None


def parse_grader(raw: Any) -> RewardSpec:
    """One grader object as OpenAI's API takes it (a `multi` grader included) as a reward spec.

    Problems name their place in the grader object: `operation`, `graders.style.input`,
    `calculate_output`.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise ConfigError(
            [Problem("type", "a grader is an object with a `type`, e.g. string_check or python")]
        )
    types = [*_model_of(Grader), "multi"]
    if raw["type"] not in types:
        raise ConfigError(
            [Problem("type", f"unknown grader type {raw['type']!r}; one of {', '.join(types)}")]
        )
    keys = _multi_keys(raw)
    try:
        return spec_of_grader(raw)
    except ValidationError as exc:
        problems = [_describe(e, RewardSpec) for e in exc.errors()]
    except ValueError as exc:  # the multi grader's own shape
        raise ConfigError([Problem("graders", str(exc).removeprefix("multi grader: "))]) from None
    raise ConfigError([_in_grader(p, keys) for p in problems]) from None


def _multi_keys(raw: dict[str, Any]) -> list[str] | None:
    """The sub-graders' names as a multi grader's map gives them (None for other shapes)."""
    inner = raw.get("graders") if raw.get("type") == "multi" else None
    return [str(k) for k in inner] if isinstance(inner, dict) and "type" not in inner else None


def _in_grader(problem: Problem, keys: list[str] | None) -> Problem:
    """A spec's problem (`graders.0.operation`) at its place in the grader object the user wrote."""
    parts = (problem.param or "").split(".")
    if problem.param is None:
        return Problem(
            "calculate_output" if problem.message.startswith("calculate_output") else None, problem.message
        )
    if parts[0] != "graders" or len(parts) < 2:
        return problem
    if keys is None and len(parts) >= 2 and parts[1] == "0":  # a single grader: its own fields
        rest = parts[2:]
        return Problem(".".join(rest) or None, problem.message)
    index = int(parts[1]) if parts[1].isdigit() else None
    name = keys[index] if keys is not None and index is not None and index < len(keys) else parts[1]
    return Problem(".".join(["graders", name, *parts[2:]]), problem.message)


def _resolve(path: Path, base_dir: Path) -> Path:
    return path if path.is_absolute() else (base_dir / path)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config; `overrides` are dotted keys (`training.steps`) applied on top."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return parse_config(raw, base_dir=path.parent)


def _set_dotted(raw: Any, dotted: str, value: Any) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(["the config must be a mapping of fields"])
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError([f"{dotted}: {key} is not a section"])
    node[leaf] = value
