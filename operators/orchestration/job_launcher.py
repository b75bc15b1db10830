"""Multi-node training as a Kubernetes indexed Job: create it, wait for it, report it, delete it.

A training stage whose pod profile asks for more than one node (`PodProfile.nodes > 1`) cannot run as one
KubernetesPodOperator pod. `StepOperator` hands it here instead:

1. render (`operators.train.cluster.render_indexed_job`) a headless Service and an indexed Job with one pod
   per node; torchrun's c10d rendezvous runs on pod 0, reachable through the Service;
2. create both through the Kubernetes API (the cncf-kubernetes provider's `KubernetesHook` picks the
   cluster: its connection, a kubeconfig, or in-cluster credentials);
3. wait until the Job succeeds or fails: deferred to the triggerer (`IndexedJobTrigger`) when the profile is
   deferrable, else polling in the worker; every pod's state is logged whenever it changes;
4. copy rank 0's log (pod index 0: torchrun prints the summary there) into the task log; its last JSON line
   is the task's return value (the worker needs no storage credentials to read the result);
5. delete the Job, its pods and the Service: after success, after failure, and when the task is killed
   (`on_kill` in the worker, `IndexedJobTrigger.on_kill` while deferred).

Job names carry the task's try number, so a retry never collides with a previous attempt's objects; the
training itself resumes from its last complete checkpoint on S3.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

log = logging.getLogger(__name__)

JOB_LABEL = "iip/train-job"  # set by render_indexed_job on the Job, its pods and the Service
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"  # set by Kubernetes on each pod of an indexed Job
CONTAINER = "train"


class TrainJobFailed(RuntimeError):
    """The training Job failed; the message lists every pod's state."""


# ----------------------------------------------------------------------------------------------------
# State of a Job, from API objects (pure)


@dataclass(frozen=True)
class PodState:
    """One pod of the Job as the API reports it."""

    name: str
    index: int | None
    phase: str
    reason: str | None = None
    exit_code: int | None = None
    node: str | None = None

    def describe(self) -> str:
        """One line for the task log."""
        extra = "".join(f" {k}={v}" for k, v in (("reason", self.reason), ("exit_code", self.exit_code),
                                                  ("node", self.node)) if v is not None)
        return f"pod {self.name} (rank group {self.index}): {self.phase}{extra}"


@dataclass(frozen=True)
class JobState:
    """The Job's status: running, succeeded or failed, with its pods."""

    name: str
    status: str
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    message: str = ""
    pods: list[PodState] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """True once the Job succeeded or failed."""
        return self.status in ("succeeded", "failed")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (a trigger event's payload)."""
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> JobState:
        """Inverse of `to_dict`."""
        return JobState(**{**d, "pods": [PodState(**p) for p in d.get("pods", [])]})


def pod_state(pod: dict[str, Any]) -> PodState:
    """A pod's state from its API object (as JSON): phase, and the train container's reason and exit code."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    labels = {**(meta.get("annotations") or {}), **(meta.get("labels") or {})}
    index = labels.get(INDEX_LABEL)
    reason, code = status.get("reason"), None
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") != CONTAINER:
            continue
        st = cs.get("state") or {}
        if "terminated" in st:
            reason, code = st["terminated"].get("reason"), st["terminated"].get("exitCode")
        elif "waiting" in st:
            reason = st["waiting"].get("reason")
    return PodState(name=meta.get("name", "?"), index=int(index) if index is not None else None,
                    phase=status.get("phase", "Unknown"), reason=reason, exit_code=code,
                    node=(pod.get("spec") or {}).get("nodeName"))


def job_state(job: dict[str, Any], pods: list[dict[str, Any]]) -> JobState:
    """The Job's state from its API object and its pods' (as JSON): done when a Complete/Failed condition holds."""
    status = job.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    if "Failed" in conditions:
        verdict, message = "failed", f"{conditions['Failed'].get('reason')}: {conditions['Failed'].get('message')}"
    elif "Complete" in conditions:
        verdict, message = "succeeded", "all indexes completed"
    else:
        verdict, message = "running", ""
    states = sorted((pod_state(p) for p in pods), key=lambda p: (p.index if p.index is not None else -1, p.name))
    return JobState(name=(job.get("metadata") or {}).get("name", "?"), status=verdict,
                    active=int(status.get("active") or 0), succeeded=int(status.get("succeeded") or 0),
                    failed=int(status.get("failed") or 0), message=message, pods=states)


def last_json(text: str) -> Any:
    """The last line of `text` that parses as JSON (the CLI prints its summary last), else None."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


# ----------------------------------------------------------------------------------------------------
# Talking to the API


def kube_client(conn_id: str | None, config_file: str | None = None) -> Any:
    """An API client for the cluster of Airflow connection `conn_id` (or a kubeconfig / in-cluster config)."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    return KubernetesHook(conn_id=conn_id, config_file=config_file).api_client


class JobLauncher:
    """Create, watch, read and delete one training Job and its Service in `namespace`."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client

        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.namespace = namespace

    def create(self, objects: list[dict[str, Any]]) -> str:
        """Create the Service and the Job (in that order: the rendezvous name resolves before pods start);
        returns the Job's name. An object already there from this same attempt is kept."""
        from kubernetes.client.exceptions import ApiException

        name = ""
        for obj in objects:
            kind = obj["kind"]
            try:
                if kind == "Service":
                    self.core.create_namespaced_service(self.namespace, obj)
                elif kind == "Job":
                    self.batch.create_namespaced_job(self.namespace, obj)
                else:
                    raise ValueError(f"unexpected object kind {kind}")
            except ApiException as e:
                if e.status != 409:
                    raise
                log.warning("%s %s already exists (this attempt created it before); keeping it", kind,
                            obj["metadata"]["name"])
            if kind == "Job":
                name = obj["metadata"]["name"]
            log.info("created %s %s/%s", kind, self.namespace, obj["metadata"]["name"])
        if not name:
            raise ValueError("no Job among the objects to create")
        return name

    def _pods(self, job: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOB_LABEL}={job}")
        return [dict(self.api.sanitize_for_serialization(p)) for p in pods.items]

    def state(self, job: str) -> JobState:
        """The Job's current state and its pods'."""
        obj = self.api.sanitize_for_serialization(self.batch.read_namespaced_job_status(job, self.namespace))
        return job_state(obj, self._pods(job))

    def wait(self, job: str, poll_s: float = 10.0, timeout_s: float | None = None) -> JobState:
        """Poll until the Job is done, logging each pod's state when it changes."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        seen: list[PodState] = []
        while True:
            st = self.state(job)
            seen = report_changes(st, seen)
            if st.done:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"training Job {job} still running after {timeout_s}s")
            time.sleep(poll_s)

    def rank0_log(self, job: str) -> str:
        """The train container's log of pod index 0 (the newest such pod, if the Job restarted it)."""
        pods = [p for p in self._pods(job) if pod_state(p).index == 0]
        if not pods:
            return ""
        newest = max(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
        # Raw bytes, decoded here: the client's own decoding of a log is version-dependent (str or bytes repr).
        resp = self.core.read_namespaced_pod_log(newest["metadata"]["name"], self.namespace, container=CONTAINER,
                                                 _preload_content=False)
        return bytes(resp.data).decode("utf-8", "replace")

    def delete(self, job: str, service: str | None) -> None:
        """Delete the Job, its pods and the Service; objects already gone are fine."""
        from kubernetes.client.exceptions import ApiException

        calls = [
            lambda: self.batch.delete_namespaced_job(job, self.namespace, propagation_policy="Background"),
            # Background propagation deletes pods eventually; delete them now so GPUs free at once.
            lambda: self.core.delete_collection_namespaced_pod(self.namespace, label_selector=f"{JOB_LABEL}={job}"),
        ]
        if service:
            calls.append(lambda: self.core.delete_namespaced_service(service, self.namespace))
        for call in calls:
            try:
                call()
            except ApiException as e:
                if e.status != 404:
                    raise
        log.info("deleted Job %s/%s, its pods and Service %s", self.namespace, job, service)


def report_changes(st: JobState, before: list[PodState]) -> list[PodState]:
    """Log the pods whose state changed since `before`; returns the new list."""
    old = {p.name: p for p in before}
    for p in st.pods:
        if old.get(p.name) != p:
            log.info("%s", p.describe())
    return list(st.pods)


# ----------------------------------------------------------------------------------------------------
# The trigger (deferrable wait)


class IndexedJobTrigger(BaseTrigger):
    """Polls a training Job from the triggerer until it is done; deletes it if the task is killed meanwhile."""

    def __init__(self, job: str, service: str, namespace: str, conn_id: str | None = None,
                 config_file: str | None = None, poll_interval: float = 30.0) -> None:
        super().__init__()
        self.job, self.service, self.namespace = job, service, namespace
        self.conn_id, self.config_file, self.poll_interval = conn_id, config_file, poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Classpath and arguments (the triggerer rebuilds the trigger from them)."""
        return (f"{__name__}.IndexedJobTrigger",
                {"job": self.job, "service": self.service, "namespace": self.namespace, "conn_id": self.conn_id,
                 "config_file": self.config_file, "poll_interval": self.poll_interval})

    def _launcher(self) -> JobLauncher:
        return JobLauncher(kube_client(self.conn_id, self.config_file), self.namespace)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Yield one event with the final state (the blocking API calls run in a thread)."""
        launcher = await asyncio.to_thread(self._launcher)
        seen: list[PodState] = []
        while True:
            try:
                st = await asyncio.to_thread(launcher.state, self.job)
            except Exception as e:  # the API is unreachable or the Job vanished: the task decides
                yield TriggerEvent({"status": "error", "job": self.job, "service": self.service,
                                    "namespace": self.namespace, "message": f"{type(e).__name__}: {e}"})
                return
            seen = report_changes(st, seen)
            if st.done:
                yield TriggerEvent({"status": st.status, "job": self.job, "service": self.service,
                                    "namespace": self.namespace, "state": st.to_dict()})
                return
            await asyncio.sleep(self.poll_interval)

    async def on_kill(self) -> None:
        """The user killed the deferred task: delete the Job, its pods and the Service."""
        await asyncio.to_thread(self._launcher().delete, self.job, self.service)


# ----------------------------------------------------------------------------------------------------
# What StepOperator calls


def job_name(task_id: str, run_id: str, try_number: int) -> str:
    """A Job name unique per task, run and try (Kubernetes names: lowercase, short)."""
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    base = "".join(c if c.isalnum() else "-" for c in task_id.lower()).strip("-")[:30] or "train"
    return f"{base}-{digest}-t{try_number}"


def finish(launcher: JobLauncher, job: str, service: str, st: JobState) -> Any:
    """After the Job is done: log every pod and rank 0's log, delete everything, return rank 0's summary."""
    try:
        for p in st.pods:
            log.info("final: %s", p.describe())
        from operators.orchestration.step_command import redact, secret_values

        text = launcher.rank0_log(job)
        secrets = secret_values()
        for line in text.splitlines():
            log.info("[rank 0] %s", redact(line, secrets))
        if st.status != "succeeded":
            pods = "; ".join(p.describe() for p in st.pods) or "no pods"
            raise TrainJobFailed(f"training Job {job} {st.status}: {st.message} ({pods})")
        return last_json(text)
    finally:
        launcher.delete(job, service)


def _settings() -> tuple[str, float]:
    """(Airflow connection id of the cluster, seconds between status polls), from the environment."""
    import os

    return (os.environ.get("IIP_KUBERNETES_CONN_ID", "kubernetes_default"),
            float(os.environ.get("IIP_TRAIN_JOB_POLL_S", "30")))


def launch(op: Any, context: Any) -> Any:
    """Run `op` (a StepOperator with action `train` on a multi-node profile) as an indexed Job.

    Deferrable profiles defer to `IndexedJobTrigger` (the task resumes in `op.train_job_complete`); others
    wait here. Either way the Job, its pods and its Service are deleted when it is done or fails.
    """
    from operators.orchestration.pod_spec import load_profiles, pod_labels
    from operators.orchestration.step_command import step_arguments
    from operators.train.cluster import check_world_size, render_indexed_job, spec_from_profile
    from operators.train.config import TwoStageConfig

    profile = load_profiles()[op.profile]
    spec = spec_from_profile(profile)
    cfg = TwoStageConfig.model_validate(op.config)
    check_world_size(spec, (cfg.stage2 if op.stage == "stage2" else cfg.stage1).world_size)  # fail before creating
    run_id = str(context.get("run_id", ""))
    ti = context.get("ti")
    objects = render_indexed_job(
        spec, job_name(op.task_id, run_id, int(getattr(ti, "try_number", 1) or 1)),
        step_arguments(op.action, op.step, output=op.output_uri, config=op.config, stage=op.stage),
        pod_labels(op.dag_id or "", op.task_id, run_id, op.step, None))
    service, job = objects[0]["metadata"]["name"], objects[1]["metadata"]["name"]
    conn_id, poll_s = _settings()
    launcher = JobLauncher(kube_client(conn_id), spec.namespace)
    op.train_job = {"job": job, "service": service, "namespace": spec.namespace}
    try:
        launcher.create(objects)
    except BaseException:
        launcher.delete(job, service)
        raise
    if profile.deferrable:
        op.defer(trigger=IndexedJobTrigger(job, service, spec.namespace, conn_id, poll_interval=poll_s),
                 method_name="train_job_complete")
    try:
        st = launcher.wait(job, poll_s)
    except BaseException:
        launcher.delete(job, service)
        raise
    return finish(launcher, job, service, st)


def complete(op: Any, event: dict[str, Any]) -> Any:
    """Resume after `IndexedJobTrigger`: report, collect rank 0's log, delete, return the summary."""
    conn_id, _ = _settings()
    launcher = JobLauncher(kube_client(conn_id), event["namespace"])
    op.train_job = {k: event[k] for k in ("job", "service", "namespace")}
    if event["status"] == "error":
        launcher.delete(event["job"], event["service"])
        raise TrainJobFailed(f"lost track of training Job {event['job']}: {event['message']}")
    return finish(launcher, event["job"], event["service"], JobState.from_dict(event["state"]))


def kill(op: Any) -> None:
    """The task was killed while waiting in the worker: delete its Job, pods and Service."""
    info = getattr(op, "train_job", None)
    if info:
        conn_id, _ = _settings()
        JobLauncher(kube_client(conn_id), info["namespace"]).delete(info["job"], info["service"])
