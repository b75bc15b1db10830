"""StepOperator: run one step action (plan / run a shard / reduce) as a local process or a Kubernetes pod.

Both modes run the very same command, `python -m operators <action> <step> ...`; only the place differs.
The mode comes from the operator argument, else `IIP_EXECUTION_MODE` (default `local`), read when the
task executes so one DAG file serves both a laptop and a cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any, Literal

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from operators.core.step import slot_members
from operators.orchestration.pod_spec import load_profiles, pod_labels, pod_operator_kwargs
from operators.orchestration.settings import step_timeout_s, task_retry_policy
from operators.orchestration.step_command import Action, redact, secret_values, step_arguments

XCOM_FILE = "/airflow/xcom/return.json"
# The DAG's `task_timeout_minutes` Param when it has one (0: derived from the shard; see settings.step_timeout_s).
TIMEOUT_PARAM = "{{ params.task_timeout_minutes | default(0) }}"
INVALID_EXIT = 2  # the CLI's status for an invalid config or input: a retry cannot fix it


class StepFailedError(RuntimeError):
    """The step process exited with an error."""


class InvalidStepRequest(AirflowFailException, ValueError):
    """The task's config, Params or input are invalid: it fails at once, without retries (none could fix it)."""


class StepOperator(BaseOperator):
    """Runs `python -m operators <action> <step>` locally or in a pod; returns the step's JSON summary."""

    # `profile` is templated so a DAG can put LLM steps on GPU pods by a Param (e.g. cpu | vllm).
    template_fields: Sequence[str] = ("config", "inputs", "output_uri", "profile", "timeout_minutes", "then",
                                     "through")
    ui_color = "#d6eaff"

    def __init__(
        self,
        *,
        step: str,
        action: Action = "run",
        output_uri: str,
        config: dict[str, Any] | None = None,
        inputs: Sequence[str] | str = (),
        shard: int | None = None,
        stage: str | None = None,
        profile: str = "cpu",
        mode: Literal["local", "kubernetes"] | None = None,
        timeout_minutes: float | str = TIMEOUT_PARAM,
        after_step: str | None = None,
        then: Sequence[dict[str, Any]] = (),
        fold_head: bool = False,
        through: Sequence[dict[str, Any]] = (),
        plan_task_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        for key, value in task_retry_policy().items():
            kwargs.setdefault(key, value)
        super().__init__(**kwargs)
        self.step = step
        self.action = action
        self.output_uri = output_uri
        self.config = config or {}
        self.inputs = inputs
        self.shard = shard
        self.stage = stage
        self.profile = profile
        self.mode = mode
        self.timeout_minutes = timeout_minutes
        # A plan that first commits the upstream step (its reduce, fused here: one wave fewer per step).
        self.after_step = after_step
        # A shard's run that goes on with the chain's next steps on that shard (operators/core/fusion.py), and a
        # plan that runs its step's first map stage where those did not (the DAG has no task for it).
        self.then = list(then)
        self.fold_head = fold_head
        # A plan that also commits the stage-less steps between the upstream and its step (they have no tasks).
        self.through = list(through)
        # A grouped wave's task (`dag_builder.per_shard_tasks`): `shard` arrives as (shard, {"slot", "of"}) and the task
        # does task `slot` of `of`'s shards; the plan's shard list (`plan_task_id`'s XCom) says how many.
        self.plan_task_id = plan_task_id
        self.of: int | None = None
        self.members = 1

    @classmethod
    def mapped(cls, **kwargs: Any) -> Any:
        """`StepOperator.partial(**kwargs)` with the platform's retry policy (a mapped task's retries come from
        its partial arguments, not from `__init__`)."""
        return cls.partial(**{**task_retry_policy(), **kwargs})

    def timeout_s(self) -> float | None:
        """This task's time limit in seconds (None: none): the `timeout_minutes` Param, else derived from the
        size of the shard the task works on (see `settings.step_timeout_s`)."""
        value = _rendered(self.timeout_minutes)
        try:
            minutes = float(value or 0)
        except (TypeError, ValueError):
            raise ValueError(f"task_timeout_minutes must be a number, got {value!r}") from None
        return step_timeout_s(self.action, shard_bytes=self._shard_bytes(), llm=self._is_llm_step(),
                              minutes=minutes)

    def _shard_bytes(self) -> int | None:
        """About how many bytes the shard this task works on holds, or None for an unsharded task: the step's
        `target_shard_bytes` (one big file can make a larger shard: the limit's fixed allowance covers that)."""
        if self.action not in ("run", "stage") or self.shard is None:
            return None
        # A fused run does its steps' work on the same shard: about one shard's time per step; a grouped task
        # does it for each of its shards.
        pieces = (1 + (len(self.then) if self.action == "run" else 0)) * self.members
        value = _rendered(dict(self.config).get("target_shard_bytes"))
        if value is None:
            from operators.core.registry import STEPS, step_class

            field = step_class(self.step).config_model.model_fields.get("target_shard_bytes") \
                if self.step in STEPS else None
            value = field.default if field is not None else None
        return int(value) * pieces if value is not None else None

    def _is_llm_step(self) -> bool:
        from operators.core.registry import STEPS, step_class
        from operators.steps.synth.base import LLMStep

        return self.step in STEPS and issubclass(step_class(self.step), LLMStep)

    def _inputs(self) -> list[str]:
        # Templated inputs may render to one string, a list, or a JSON list string from a Params field.
        if isinstance(self.inputs, str):
            s = self.inputs.strip()
            return [str(x) for x in json.loads(s)] if s.startswith("[") else [s]
        return [str(x) for x in self.inputs]

    def execute(self, context: Any) -> Any:
        try:
            return self._execute(context)
        except InvalidStepRequest:
            raise
        except (ValueError, TypeError) as e:  # an invalid config, Param or input: no retry can fix it
            raise InvalidStepRequest(str(e)) from e

    def _execute(self, context: Any) -> Any:
        if isinstance(self.shard, (list, tuple)):
            self._take_slot(context)
        # A Params field left empty renders to None: it means "the step's default", so drop it.
        self.config = _defaults_dropped(self.config)
        # The fused steps' configs as their own groups pass them (their plans must compute the same content keys).
        self.then, self.through = ([{**dict(piece), "config": _defaults_dropped(dict(piece).get("config") or {})}
                                     for piece in pieces or []] for pieces in (self.then, self.through))
        mode = self.mode or os.environ.get("IIP_EXECUTION_MODE", "local")
        if self.action in ("plan", "stage", "run"):
            from operators.cli import build_step  # validate before any work: a bad config fails here

            build_step(self.step, dict(self.config))
            for piece in [*self.then, *self.through]:
                build_step(str(piece["step"]), piece["config"])
        if self.action in ("train", "evaluate"):
            from operators.cli import ConfigError, _validated
            from operators.train.config import TwoStageConfig

            try:
                _validated(TwoStageConfig, dict(self.config), "fine-tuning")
            except ConfigError as e:  # fail before any work, naming the field
                raise ValueError(str(e)) from None
        if self.action == "publish":
            from operators.cli import ConfigError, _validated
            from operators.datasets.versions import PublishConfig

            try:
                _validated(PublishConfig, {**self.config, "name": self.step}, "publish")
            except ConfigError as e:
                raise ValueError(str(e)) from None
        if mode == "kubernetes":
            result = self._execute_pod(context)
        elif mode != "local":
            raise ValueError(f"unknown execution mode {mode!r}: use 'local' or 'kubernetes'")
        else:
            result = self._execute_local(context)
        if isinstance(result, dict) and result.get("skipped") is True:
            from airflow.sdk.exceptions import AirflowSkipException

            # e.g. the one-stage ablation when the run's mode is two_stage (downstream tasks skip too), or a
            # publish whose step output already is LATEST (a skipped publish emits no asset event).
            raise AirflowSkipException(str(result.get("reason", "nothing to do")))
        if self.action == "publish":
            self._record_asset_events(context, result)
        return result

    def _take_slot(self, context: Any) -> None:
        """A grouped wave's task: mapped over the plan's shard list zipped with the DAG's slots, it is given
        (shard, {"slot": j, "of": G}) and does task j of G (`step.slot_members`), each shard committed on its own."""
        _, slot = self.shard  # type: ignore[misc]
        self.shard, self.of = int(slot["slot"]), int(slot["of"])
        shards = context["ti"].xcom_pull(task_ids=self.plan_task_id) if self.plan_task_id else None
        self.members = len(slot_members(self.shard, self.of, len(shards) if isinstance(shards, list) and shards
                                        else self.of))

    def _record_asset_events(self, context: Any, result: Any) -> None:
        """Attach the published version to this task's asset events (`extra`), so the event says which version
        it announces and a DAG scheduled on the asset can read it from `triggering_asset_events`."""
        from airflow.sdk import Asset

        if not isinstance(result, dict) or "version" not in result or not hasattr(context, "get"):
            raise StepFailedError(f"publish of {self.step} returned no version: {result!r}")
        events = context.get("outlet_events")
        extra = {k: result[k] for k in ("name", "version", "uri", "hf", "step_dir", "sources") if k in result}
        for asset in self.outlets or []:
            if isinstance(asset, Asset) and events is not None:
                events[asset].extra.update(extra)

    def _report_context(self, context: Any) -> dict[str, Any]:
        """For the report action: which Airflow run it reports on, and the data root its index entry goes under."""
        if self.action not in ("report", "publish") or not hasattr(context, "get"):
            return {}
        from operators.orchestration.settings import data_root

        logical = context.get("logical_date")
        run = {"dag_id": self.dag_id or "", "run_id": str(context.get("run_id", "")),
               "logical_date": logical.isoformat() if logical is not None else ""}
        return {"run_context": run, "index": data_root()} if run["run_id"] else {}

    def _arguments(self, context: Any, xcom_file: str | None = None) -> list[str]:
        """The task's `python -m operators` arguments, the same in a local process and in a pod."""
        return step_arguments(self.action, self.step, output=self.output_uri, config=self.config,
                              inputs=self._inputs(), shard=self.shard, stage=self.stage, after=self.after_step,
                              then=self.then, fold_head=self.fold_head, through=self.through, of=self.of,
                              xcom_file=xcom_file,
                              **self._report_context(context))

    def _execute_local(self, context: Any = None) -> Any:
        args = self._arguments(context)
        secrets = secret_values()
        where = f"shard {self.shard}" if self.of is None else \
            f"task {self.shard} of {self.of} slots, {self.members} shard(s)"
        self.log.info("running: python -m operators %s %s%s (%s) -> %s", self.action, self.step,
                      f" --stage {self.stage}" if self.stage else "", where, redact(self.output_uri, secrets))
        limit = self.timeout_s()
        # Its own process group: a timeout stops the step and everything it started (an LLM engine, a pool).
        proc = subprocess.Popen(
            [sys.executable, "-m", "operators", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True,
        )
        timed_out = threading.Event()

        def time_out() -> None:
            timed_out.set()
            _kill_group(proc)

        timer = threading.Timer(limit, time_out) if limit is not None else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        last_json: Any = None
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                self.log.info("%s", redact(line, secrets))
                if line.startswith("{"):
                    try:
                        last_json = json.loads(line)
                    except ValueError:
                        pass
            rc = proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
            if proc.poll() is None:  # this task is being stopped (Airflow's own timeout, a kill): stop the step
                _kill_group(proc)
        if timed_out.is_set():
            from airflow.sdk.exceptions import AirflowTaskTimeout

            raise AirflowTaskTimeout(f"{self.step} {self.action} (shard {self.shard}) ran past its limit of "
                                     f"{limit:.0f} s and was stopped; set the DAG's task_timeout_minutes Param "
                                     "to change the limit")
        if rc == INVALID_EXIT:
            raise InvalidStepRequest(f"{self.step} {self.action} exited with code {rc} (invalid config or "
                                     "input: not retried); see the log above")
        if rc != 0:
            raise StepFailedError(f"{self.step} {self.action} exited with code {rc} (step failed); see the log "
                                  "above")
        return self._xcom(last_json)

    def pod_kwargs(self, context: Any) -> dict[str, Any]:
        """KubernetesPodOperator arguments for this task (pure given the context; used by tests too)."""
        profiles = load_profiles()
        if self.profile not in profiles:
            raise ValueError(f"unknown pod profile {self.profile!r}; known: {sorted(profiles)}")
        xcom = self.action in ("plan", "reduce", "report", "validate", "export", "tail_plan", "tail_commit", "publish",
                               "train", "evaluate")
        args = self._arguments(context, XCOM_FILE if xcom else None)
        ti = context.get("ti") if hasattr(context, "get") else None
        run_id = str(context.get("run_id", "")) if hasattr(context, "get") else ""
        labels = pod_labels(self.dag_id or "", self.task_id, run_id, self.step, self.shard)
        if ti is not None and getattr(ti, "map_index", -1) >= 0:
            labels["iip/map-index"] = str(ti.map_index)
        kwargs = pod_operator_kwargs(task_id=f"{self.task_id}-pod", arguments=args,
                                     profile=profiles[self.profile], labels=labels, xcom=xcom)
        limit = self.timeout_s()
        if limit is not None:  # Kubernetes stops the pod at the limit; the task fails and is retried
            kwargs["active_deadline_seconds"] = int(limit)
        if self.action == "train" and profiles[self.profile].gpus > 1:
            # One process per GPU under torchrun, a shared checkpoint volume, /dev/shm and NCCL settings.
            from operators.train.cluster import single_node_pod_kwargs, spec_from_profile

            kwargs = single_node_pod_kwargs(kwargs, spec_from_profile(profiles[self.profile]))
        return kwargs

    def build_pod_operator(self, context: Any) -> Any:
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

        return KubernetesPodOperator(**self.pod_kwargs(context))

    def _execute_pod(self, context: Any) -> Any:
        profile = load_profiles().get(self.profile)  # an unknown one fails in pod_kwargs, naming the known ones
        if self.action == "train" and profile is not None and profile.nodes > 1:
            # Several nodes: an indexed Job + headless Service, created, awaited and deleted by the launcher.
            from operators.orchestration.job_launcher import launch

            return launch(self, context)
        try:
            return self._xcom(self.build_pod_operator(context).execute(context))
        except Exception as e:
            gone = _pod_gone(e)
            if gone is None:
                raise
            raise StepFailedError(
                f"{self.step} {self.action}: its pod was deleted while the step ran (node loss, eviction or "
                f"`kubectl delete pod`): {gone}; the try fails and is retried in a new pod, and the step's commit "
                "protocol makes the retry safe") from e

    def train_job_complete(self, context: Any, event: dict[str, Any]) -> Any:
        """Resume a deferred multi-node training task after its Job finished (see job_launcher)."""
        from operators.orchestration.job_launcher import complete

        return complete(self, event)

    def on_kill(self) -> None:
        """A killed multi-node training task deletes its Job, pods and Service (single pods: KPO's own)."""
        from operators.orchestration.job_launcher import kill

        kill(self)

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> Any:
        """Resume a deferred pod task: a deferrable KubernetesPodOperator hands back here after its trigger."""
        return self._xcom(self.build_pod_operator(context).trigger_reentry(context, event))

    def _xcom(self, result: Any) -> Any:
        """What the task returns: a plan, the shard indices its stage and shard tasks map over (none when the step
        is already committed under this plan: they skip, and the reduce finds the commit; an older step image that
        does not say falls back to every shard); the tail's plan, its shard indices; anything else as is."""
        if self.action == "plan" and isinstance(result, dict):
            return result.get("to_run", result["shards"])
        if self.action == "tail_plan" and isinstance(result, dict):
            return result["shards"]
        return result


def _pod_gone(exc: BaseException) -> str | None:
    """The Kubernetes API's "not found" answer somewhere in `exc`'s chain (the provider wraps it in "Pod <name>
    returned a failure."), or None when the failure was something else."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if getattr(cur, "status", None) == 404 and any(c.__name__ == "ApiException" for c in type(cur).__mro__):
            return str(getattr(cur, "reason", "") or "Not Found") + ": " + str(getattr(cur, "body", "") or "")[:200]
        cur = cur.__cause__ or cur.__context__
    return None


def _defaults_dropped(config: Any) -> dict[str, Any]:
    """A rendered step config without its None values: a Params field left empty renders to None, and means "the
    step's default"."""
    return {k: v for k, v in dict(config).items() if v is not None}


def _rendered(value: Any) -> Any:
    """`value`, or None while it is still a Jinja template (a task used outside a DAG run, e.g. rendering pods)."""
    return None if isinstance(value, str) and "{{" in value else value


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the step process and its process group (it leads one: `start_new_session`)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass
