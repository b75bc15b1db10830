"""The fine-tuning plan as data: which run trains what, from which model, in which order.

Paper (arXiv 2506.11116): stage 1 trains the base model on the foundational set; stage 2 starts from
stage 1's model and trains on the conversational set plus a replay sample of the foundational set
(~16%), which beats mixing everything once (`one_stage`: the ablation). Every function here is pure:
the CLI and the DAG ask it for a stage's `TrainJob`, then run that job in its own process (or pod).
"""

from __future__ import annotations

from typing import Literal

from operators.core import storage
from operators.train.config import ABLATION_STAGE, SWEEP_PREFIX, TwoStageConfig, sweep_ratio, sweep_stage
from operators.train.trainer import DataSelection, TrainJob

Stage = Literal["stage1", "stage2", "one_stage"]
EvalStage = Literal["base", "stage1", "stage2", "one_stage"]
STAGES: tuple[Stage, ...] = ("stage1", "stage2", "one_stage")


def stage_dir(train_dir: str, stage: str) -> str:
    """Run directory of `stage` under the fine-tuning directory."""
    return storage.join(storage.validate_uri(train_dir), stage)


def model_dir(train_dir: str, stage: str) -> str:
    """Where `stage` writes its final Hugging Face model (a local path)."""
    uri = storage.join(stage_dir(train_dir, stage), "model")
    return uri[len("file://"):] if uri.startswith("file://") else uri


def sweep_stages(cfg: TwoStageConfig) -> list[str]:
    """The sweep's stage names, by ratio."""
    return [sweep_stage(r) for r in cfg.replay_ratios]


def known_stage(cfg: TwoStageConfig, stage: str) -> bool:
    """Whether `stage` is a training stage of this config: one of its mode's, or a run of its sweep."""
    return stage in stages_for(cfg.mode) or stage in sweep_stages(cfg) or \
        (stage == ABLATION_STAGE and cfg.ablation_foundational is not None)


def stages_for(mode: str) -> list[Stage]:
    """The training runs a mode needs, in order."""
    return {"two_stage": ["stage1", "stage2"], "one_stage": ["one_stage"],
            "both": ["stage1", "stage2", "one_stage"]}[mode]  # type: ignore[return-value]


def replay_selection(cfg: TwoStageConfig) -> DataSelection:
    """The foundational replay sample: the select step's `replay` rows, or a configured share of the set."""
    if cfg.replay_fraction is None:
        return DataSelection(name="foundational_replay", uri=cfg.foundational, replay_only=True)
    return DataSelection(name="foundational_replay", uri=cfg.foundational, fraction=cfg.replay_fraction)


def stage_job(cfg: TwoStageConfig, stage: str, train_dir: str) -> TrainJob:
    """The `TrainJob` of `stage`: its data mix, starting model, settings and run directory."""
    foundational = DataSelection(name="foundational", uri=cfg.foundational)
    conversational = DataSelection(name="conversational", uri=cfg.conversational)
    out = stage_dir(train_dir, stage)
    ratio = sweep_ratio(stage)
    if ratio is not None:
        # Stage 2 again with `ratio` of the foundational set replayed: the same id-hash draw at every ratio,
        # so the samples are nested and the sweep's curve measures quantity, not which records were drawn.
        data = [conversational]
        if ratio > 0.0:
            data.append(DataSelection(name="foundational_replay", uri=cfg.foundational, fraction=ratio))
        return TrainJob(init_model=model_dir(train_dir, "stage1"), data=data, train=cfg.stage2, output=out)
    if stage == ABLATION_STAGE:
        if cfg.ablation_foundational is None:
            raise ValueError(f"stage {ABLATION_STAGE} needs ablation_foundational (another selection's prepared set)")
        # Stage 1's recipe on the other selection: same base model, settings and size, other records.
        return TrainJob(init_model=cfg.base_model, data=[DataSelection(name="foundational",
                                                                       uri=cfg.ablation_foundational)],
                        train=cfg.stage1, output=out)
    if stage == "stage1":
        return TrainJob(init_model=cfg.base_model, data=[foundational], train=cfg.stage1, output=out)
    if stage == "stage2":
        data = [conversational]
        if cfg.replay_fraction != 0.0:
            data.append(replay_selection(cfg))
        return TrainJob(init_model=model_dir(train_dir, "stage1"), data=data, train=cfg.stage2, output=out)
    if stage == "one_stage":
        # The ablation mixes both sets once, with stage 1's settings (the paper uses the same for both).
        return TrainJob(init_model=cfg.base_model, data=[foundational, conversational], train=cfg.stage1,
                        output=out)
    raise ValueError(f"unknown stage {stage!r}; use one of {STAGES} or {SWEEP_PREFIX}<ratio>")


def eval_model(cfg: TwoStageConfig, stage: str, train_dir: str) -> str:
    """The model `evaluate` loads for `stage` (`base` is the starting model itself)."""
    if stage == "base":
        return cfg.base_model
    if stage not in (*STAGES, ABLATION_STAGE) and sweep_ratio(stage) is None:
        raise ValueError(f"unknown stage {stage!r}; use base, one of {STAGES}, {ABLATION_STAGE} or "
                         f"{SWEEP_PREFIX}<ratio>")
    return model_dir(train_dir, stage)
