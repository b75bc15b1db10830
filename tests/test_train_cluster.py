"""Training on a cluster, rendered without one: a one-node torchrun pod and a multi-node indexed Job,
schema-valid (Kubernetes 1.37), restricted, with GPUs, local scratch for checkpoint parts (output on S3) or
an optional shared volume, NCCL env, no secrets. (Launching them: tests/test_job_launcher.py.)"""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient
from pydantic import ValidationError

from operators.orchestration.step_operator import StepOperator
from operators.train.cluster import ClusterTrainSpec, check_world_size, render_indexed_job
from tests.conftest import FAKE_SECRET

K8S = "1.37.0"
CONFIG = {"foundational": "s3://b/runs/r/train_prep_foundational",
          "conversational": "s3://b/runs/r/train_prep_conversational", "stage1": {"world_size": 8}}


@pytest.fixture(autouse=True)
def secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)


def _check_restricted(spec: dict[str, Any]) -> None:
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert sc["capabilities"]["drop"] == ["ALL"]


def test_train_task_renders_a_torchrun_pod_with_all_gpus_and_local_scratch() -> None:
    op = StepOperator(task_id="stage1", step="finetune", action="train", stage="stage1", config=CONFIG,
                      output_uri="s3://b/runs/r/finetune", profile="train", mode="kubernetes")
    pod = dict(ApiClient().sanitize_for_serialization(
        op.build_pod_operator({"run_id": "manual__1"}).build_pod_request_obj(dry_run=True)))
    kubernetes_validate.validate(pod, K8S, strict=True)
    assert FAKE_SECRET not in json.dumps(pod)
    spec = pod["spec"]
    _check_restricted(spec)
    c = spec["containers"][0]
    assert c["image"].startswith("iip-train:")
    assert c["command"][:2] == ["torchrun", "--nproc_per_node=8"] and c["command"][-2:] == ["-m", "operators"]
    assert c["args"][:3] == ["train", "--stage", "stage1"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    env = {e["name"]: e for e in c["env"]}
    assert env["NCCL_DEBUG"]["value"] == "WARN" and "secretKeyRef" in env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]
    assert env["IIP_TRAIN_SCRATCH"]["value"] == "/scratch"  # checkpoint parts on local disk, then to S3
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert {"/scratch", "/dev/shm", "/tmp"} <= set(mounts)
    assert not [v for v in spec["volumes"] if "persistentVolumeClaim" in v]  # no RWX volume needed


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_indexed_job_with_rendezvous_is_valid_for_1_2_4_nodes(nodes: int) -> None:
    spec = ClusterTrainSpec(nodes=nodes, gpus_per_node=8)
    check_world_size(spec, 8 * nodes)
    objs = render_indexed_job(spec, "Stage1 Run!", ["train", "--stage", "stage1", "--config", "{}", "--output",
                                                     "s3://b/r"], {"iip/run-id": "r1"})
    for obj in objs:
        kubernetes_validate.validate(obj, K8S, strict=True)
    svc, job = objs
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == {"iip/train-job": "stage1-run"}
    js = job["spec"]
    assert js["completionMode"] == "Indexed" and js["completions"] == js["parallelism"] == nodes
    pod = js["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert js["template"]["metadata"]["labels"]["iip/train-job"] == "stage1-run"  # what the launcher selects on
    _check_restricted(pod)
    cmd = pod["containers"][0]["command"]
    assert "--nproc_per_node=8" in cmd
    if nodes > 1:
        assert f"--nnodes={nodes}" in cmd and "--rdzv_backend=c10d" in cmd
        assert f"--rdzv_endpoint=stage1-run-0.{svc['metadata']['name']}.iip.svc:29500" in cmd
    else:
        assert "--standalone" in cmd
    assert {v["name"] for v in pod["volumes"]} == {"tmp", "dshm", "scratch"}
    assert FAKE_SECRET not in json.dumps(objs)


def test_optional_shared_checkpoint_volume() -> None:
    objs = render_indexed_job(ClusterTrainSpec(nodes=2, checkpoint_claim="iip-checkpoints"), "s1", ["train"], {})
    kubernetes_validate.validate(objs[1], K8S, strict=True)
    pod = objs[1]["spec"]["template"]["spec"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v] == \
        ["iip-checkpoints"]
    assert {"mountPath": "/checkpoints", "name": "checkpoints"} in pod["containers"][0]["volumeMounts"]


def test_multi_node_profile_and_world_size_checks() -> None:
    from operators.orchestration.pod_spec import DEFAULT_PROFILES
    from operators.train.cluster import spec_from_profile

    spec = spec_from_profile(DEFAULT_PROFILES["train"].model_copy(update={"nodes": 4}))
    assert spec.nodes == 4 and spec.world_size == 32 and spec.image.startswith("iip-train:")
    with pytest.raises(ValueError, match="world_size"):
        check_world_size(spec, 8)
    with pytest.raises(ValidationError):
        ClusterTrainSpec(env={"HF_TOKEN": "x"})
