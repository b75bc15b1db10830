"""The command a step task runs, and the masking of secrets in what it prints.

Both the StepOperator (local processes and pods) and the job launcher (training Jobs) build the same
`python -m operators ...` arguments and mask the same secrets; this module is what they share, so that
neither imports the other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Literal

from operators.orchestration.pod_spec import SECRETISH

Action = Literal["plan", "stage", "run", "reduce", "report", "validate", "export", "tail_plan", "tail_shard",
                 "tail_commit", "publish", "train", "evaluate"]
# The tail's tasks (operators/tail.py): `export` with one of these modes.
TAIL_MODES = {"tail_plan": ["--plan"], "tail_shard": ["--shard"], "tail_commit": ["--commit"]}


def step_arguments(
    action: Action,
    step: str,
    *,
    output: str,
    config: dict[str, Any] | None = None,
    inputs: Sequence[str] = (),
    shard: int | None = None,
    stage: str | None = None,
    xcom_file: str | None = None,
    run_context: dict[str, str] | None = None,
    index: str | None = None,
    after: str | None = None,
    then: Sequence[dict[str, Any]] = (),
    fold_head: bool = False,
    of: int | None = None,
    through: Sequence[dict[str, Any]] = (),
) -> list[str]:
    """The CLI arguments after `python -m operators` for one step action.

    `after`: for a plan or the tail's plan, the upstream step whose output is the one input, committed first in
    the same task; `through`: with `after`, the stage-less steps between it and this one, committed next
    (`fusion.commit_through`); `fold_head`: that plan also runs the step's first map stage where the upstream's
    shard tasks did not, and a reduce stage right after it; `then`: for a shard's run, the chain's next steps
    whose record-local work runs after it in the same task, `operators/core/fusion.py`; `of`: with `shard`, the
    task is task `shard` of a grouped wave of `of` tasks, `step.slot_members`."""
    grouped = ["--of", str(int(of))] if of is not None and shard is not None else []
    xcom = ["--xcom-file", xcom_file] if xcom_file else []
    if action == "report":
        ctx = ["--run-context", json.dumps(run_context, sort_keys=True)] if run_context else []
        return [action, "--output", output, *ctx, *(["--index", index] if index else []), *xcom]
    if action == "validate":
        return [action, "--output", output, *xcom]
    if action == "export":
        return ["export", "--input", inputs[0], "--output", output, *xcom]
    if action in TAIL_MODES:  # config: {validate, run, name, formats}
        if action == "tail_shard" and shard is None:
            raise ValueError("action 'tail_shard' needs a shard")
        cfg = config or {}
        mode = TAIL_MODES[action] + ([str(int(shard)), *grouped] if action == "tail_shard" and shard is not None
                                     else [])
        opts = (["--validate"] if cfg.get("validate") else []) + \
            [a for key in ("run", "name", "formats") if cfg.get(key) for a in (f"--{key}", str(cfg[key]))]
        committed = ["--after", after] if action == "tail_plan" and after else []
        return ["export", "--input", inputs[0], "--output", output, *mode, *opts, *committed, *xcom]
    if action == "publish":  # `step` names the dataset; `output` is the run root (lineage, stats, report)
        ctx = ["--run-context", json.dumps(run_context, sort_keys=True)] if run_context else []
        return ["datasets", "publish", step, "--input", inputs[0], "--run", output,
                "--config", json.dumps(config or {}, sort_keys=True, separators=(",", ":")), *ctx,
                *(["--root", index] if index else []), *xcom]
    if action in ("train", "evaluate"):  # fine-tuning: `stage` names the training stage (stage1, stage2, ...)
        staged = ["--stage", stage] if stage else []
        return [action, *staged, "--config", json.dumps(config or {}, sort_keys=True, separators=(",", ":")),
                "--output", output, *xcom]
    args = [action, step, "--output", output]
    if action != "reduce":
        args += ["--config", json.dumps(config or {}, sort_keys=True, separators=(",", ":"))]
        for uri in inputs:
            args += ["--input", uri]
    if action == "stage":
        if not stage:
            raise ValueError("action 'stage' needs a stage name")
        args += ["--stage", stage]
    if action in ("run", "stage") and shard is not None:
        args += ["--shard", str(int(shard)), *grouped]
    if action == "plan" and after:
        args += ["--after", after, *(["--fold-head"] if fold_head else [])]
        if through:
            args += ["--through", json.dumps(list(through), sort_keys=True, separators=(",", ":"))]
    if action == "run" and shard is not None and then:
        args += ["--then", json.dumps(list(then), sort_keys=True, separators=(",", ":"))]
    if xcom_file:
        args += ["--xcom-file", xcom_file]
    return args


def secret_values(env: dict[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables, to be masked wherever output is echoed."""
    env = dict(os.environ) if env is None else env
    return [v for k, v in env.items() if SECRETISH.search(k) and len(v) >= 4]


def redact(text: str, secrets: Sequence[str]) -> str:
    """Replace every secret value in `text` with ***."""
    for s in secrets:
        text = text.replace(s, "***")
    return text
