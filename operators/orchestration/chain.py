"""A chain of steps as the DAGs run it, without Airflow: each step's inputs, output, the upstream its plan
commits (and the stage-less steps it commits on the way, which have no tasks), the fused work its shard tasks
go on to, and whether its first map stage has a task of its own.

`dag_builder.step_chain` makes task groups of it; tests and `bench/scale.py` run the same chain as CLI tasks,
so all three run one design (operators/core/fusion.py says what fusing does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from operators.core.fusion import folded_stages, grouped_run, head
from operators.core.registry import step_class
from operators.core.step import Step


@dataclass(frozen=True)
class ChainLink:
    """One step of a chain: what its plan, stage and shard tasks are given."""

    step: str
    config: dict[str, Any]
    inputs: list[str] | str
    output: str
    profile: str = "cpu"
    after: str | None = None  # the upstream step its plan commits first (`plan --after`)
    then: list[dict[str, Any]] = field(default_factory=list)  # its shard tasks' fused work (`run --then`)
    fold_head: bool = False  # no task for its first map stage (the upstream's shard tasks run it) nor for a
    # reduce stage right after it (the plan runs it): `fusion.folded_stages`
    through: list[dict[str, Any]] = field(default_factory=list)  # stage-less steps between `after` and this one,
    # which the upstream's shard tasks always run: its plan commits them (`plan --through`), they have no tasks

    def grouped_run(self) -> bool:
        """Whether its run's shard tasks form a grouped wave (`run_grouped`)."""
        return run_grouped(self.step, self.then)

    def stage_tasks(self) -> list[str]:
        """The step's stages that have tasks of their own, in order."""
        cls = step_class(self.step)
        folded = folded_stages(cls) if self.fold_head else []
        return [st.name for st in cls.stages if st.name not in folded]


def run_grouped(step: str, then: Sequence[dict[str, Any]]) -> bool:
    """Whether `step`'s run, going on to the fused work `then` (`run --then`), is a grouped wave
    (`fusion.grouped_run`)."""
    return grouped_run(step_class(step), [step_class(t["step"]) for t in then])


def chain_steps(steps: Sequence[str], *, configs: dict[str, dict[str, Any]], inputs: list[str] | str, run: str,
                common: dict[str, Any] | None = None, profiles: dict[str, str] | None = None,
                fuse: bool = True) -> list[ChainLink]:
    """`steps` in order, each reading the one before under `run` (the first reads `inputs`); `common` joins every
    step's config, `profiles` names a step's pod profile (default cpu). `fuse`: shard tasks go on to the next steps'
    record-local work; a step whose first map stage they always run has no task for it, and a stage-less step
    they always run (not the last) has no task at all: the next link's plan commits it (`ChainLink.through`)."""
    profile = {s: (profiles or {}).get(s, "cpu") for s in steps}
    config = {s: {**configs.get(s, {}), **(common or {})} for s in steps}
    links: list[ChainLink] = []
    through: list[dict[str, Any]] = []
    for i, step in enumerate(steps):
        source = inputs if i == 0 else [f"{run}/{steps[i - 1]}"]
        if fuse and links and i < len(steps) - 1 and _passes_through(links[-1].step, step, profile):
            through.append({"step": step, "config": config[step], "input": source[0], "output": f"{run}/{step}"})
            continue
        # Only CPU pods go on to CPU work (an encoder step's GPU pod does not run the steps after it).
        then = fused_then(steps[i + 1:], config, profile, run) if fuse and profile[step] == "cpu" else []
        links.append(ChainLink(step, config[step], source, f"{run}/{step}", profile[step],
                               links[-1].step if links else None, then,
                               fuse and bool(links) and _folds_head(links[-1].step, step, profile), through))
        through = []
    return links


def _fusable(step: str) -> bool:
    """Whether a shard task may run `step`'s head: record-local work (`fusion.head`), not an LLM step (those
    talk to an engine with its own limits and pods)."""
    from operators.steps.synth.base import LLMStep

    cls = step_class(step)
    return head(cls) is not None and not issubclass(cls, LLMStep)


def fused_then(following: Sequence[str], config: dict[str, dict[str, Any]], profile: dict[str, str],
               run: str) -> list[dict[str, Any]]:
    """What a shard task of a chain step runs after its own shard (`run --then`): the next steps' heads, through
    the first one with stages (its next stage reads every shard). A step on another pod profile is listed to
    be skipped when it is off (it ends the fused work when it is on); a step that cannot be fused ends the list."""
    out: list[dict[str, Any]] = []
    for step in following:
        piece = {"step": step, "config": config[step], "output": f"{run}/{step}"}
        if profile[step] != "cpu":
            if step_class(step).is_off is Step.is_off:  # always on: its own pods run it
                break
            out.append({**piece, "stop_if_on": True})
            continue
        if not _fusable(step):
            break
        out.append(piece)
        if step_class(step).stages:
            break
    return out


def _goes_on(upstream: str, step: str, profile: dict[str, str]) -> bool:
    """Whether every shard task of `upstream` (on CPU pods, never off) goes on to `step`'s head (a fusable step on
    CPU pods)."""
    return (_fusable(step) and _fusable(upstream) and profile[upstream] == "cpu" and profile[step] == "cpu"
            and step_class(upstream).is_off is Step.is_off)


def _folds_head(upstream: str, step: str, profile: dict[str, str]) -> bool:
    """Whether `step`'s first map stage needs no task of its own: the shard tasks of `upstream` always go on to
    it, so the plan finds it prepared."""
    return bool(step_class(step).stages) and _goes_on(upstream, step, profile)


def _passes_through(owner: str, step: str, profile: dict[str, str]) -> bool:
    """Whether stage-less `step` needs no tasks: the shard tasks of `owner` (the last step with tasks; any steps
    between are such steps too) always run it, and it is never off, so the next plan finds every shard prepared
    and commits it."""
    cls = step_class(step)
    return not cls.stages and cls.is_off is Step.is_off and _goes_on(owner, step, profile)
