"""Pure construction of the Kubernetes pod a step runs in: testable without a cluster.

A pod profile (image, resources, scheduling, secret refs) is data; `pod_operator_kwargs` turns a profile
and a step command into KubernetesPodOperator arguments with a restricted security context: non-root,
no privilege escalation, read-only root filesystem, all capabilities dropped, RuntimeDefault seccomp,
no service-account token. Secrets only ever appear as `secretKeyRef`s.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

RUN_AS_USER = 10001
SECRETISH = re.compile(r"(SECRET|PASSWORD|TOKEN|PRIVATE|CREDENTIAL|API_?KEY|ACCESS_KEY)", re.IGNORECASE)
K8S_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"


class SecretEnv(BaseModel):
    """An environment variable filled from a Kubernetes Secret key (the value never leaves the cluster)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str = Field(..., pattern=ENV_NAME)
    secret: str = Field(..., pattern=K8S_NAME)
    key: str = Field(..., pattern=r"^[-._a-zA-Z0-9]+$")


class Toleration(BaseModel):
    """A pod toleration (e.g. for tainted GPU nodes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class PodProfile(BaseModel):
    """Where and with what a class of steps runs: image, resources, scheduling, secret refs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(..., min_length=1)
    namespace: str = Field("iip", pattern=K8S_NAME)
    service_account: str = Field("iip-step", pattern=K8S_NAME)
    cpu: str = Field("1", pattern=QUANTITY)
    memory: str = Field("4Gi", pattern=QUANTITY)
    cpu_limit: str | None = Field(None, pattern=QUANTITY)
    memory_limit: str | None = Field(None, pattern=QUANTITY)
    gpus: int = Field(0, ge=0, le=16)
    nodes: int = Field(1, ge=1, le=512, description="Nodes of a training run (train action): more than one runs "
                       "as an indexed Job with torchrun rendezvous (operators.orchestration.job_launcher).")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    secret_env: list[SecretEnv] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description="Non-secret environment only.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    startup_timeout_seconds: int = Field(600, ge=10)
    deferrable: bool = False

    @field_validator("env")
    @classmethod
    def _no_secret_literals(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not re.match(ENV_NAME, name):
                raise ValueError(f"invalid environment variable name {name!r}")
            if SECRETISH.search(name):
                raise ValueError(f"{name} looks like a secret: pass it with secret_env (a Secret ref), "
                                 "never as a literal value")
        return env

    @field_validator("image")
    @classmethod
    def _pinned_image(cls, image: str) -> str:
        if image.endswith(":latest"):
            raise ValueError("pin the image to a tag or digest, not :latest")
        return image


DEFAULT_S3_SECRET = [
    SecretEnv(env="AWS_ACCESS_KEY_ID", secret="iip-s3", key="access_key"),
    SecretEnv(env="AWS_SECRET_ACCESS_KEY", secret="iip-s3", key="secret_key"),
]

# `cpu-1` is for a shard's record-local work (a step's `run` and map/partition stage tasks): one core is what
# such a task uses, so a 64-core budget runs 64 of them. `cpu` is for whole-step tasks (plan, reduce stages,
# reduce, validate, export, publish, report), whose memory the shard does not bound.
DEFAULT_PROFILES: dict[str, PodProfile] = {
    "cpu": PodProfile(image="iip-cpu:0.1.0", cpu="2", memory="8Gi", secret_env=DEFAULT_S3_SECRET),
    "cpu-1": PodProfile(image="iip-cpu:0.1.0", cpu="1", memory="2Gi", secret_env=DEFAULT_S3_SECRET),
    "vllm": PodProfile(
        image="iip-vllm:0.1.0", cpu="8", memory="64Gi", gpus=1, secret_env=DEFAULT_S3_SECRET,
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[Toleration(key="nvidia.com/gpu", operator="Exists")], deferrable=True,
    ),
    "train": PodProfile(
        image="iip-train:0.1.0", cpu="16", memory="256Gi", gpus=8, secret_env=DEFAULT_S3_SECRET,
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[Toleration(key="nvidia.com/gpu", operator="Exists")], deferrable=True,
    ),
}


def shard_profile(profile: str) -> str:
    """The profile of a step's per-shard tasks when its whole-step tasks run under `profile`: `cpu-1` for
    `cpu`; any other profile (a GPU one, or a Param still to be rendered) is kept for every task."""
    return "cpu-1" if profile == "cpu" else profile


def load_profiles() -> dict[str, PodProfile]:
    """Built-in profiles, overridden by `IIP_POD_PROFILES` (JSON object, or a path to one) when set."""
    profiles = dict(DEFAULT_PROFILES)
    raw = os.environ.get("IIP_POD_PROFILES", "").strip()
    if raw:
        if raw.startswith("{"):
            text = raw
        else:
            with open(raw) as f:
                text = f.read()
        for name, spec in json.loads(text).items():
            profiles[name] = PodProfile.model_validate(spec)
    return profiles


def _label_value(value: str) -> str:
    """Kubernetes label values: <= 63 chars of [A-Za-z0-9_.-], alphanumeric at both ends."""
    v = re.sub(r"[^A-Za-z0-9_.-]", "_", value)[:63].strip("_.-")
    return v or "none"


def pod_labels(dag_id: str, task_id: str, run_id: str, step: str, shard: int | None) -> dict[str, str]:
    """Labels that tie a pod to its DAG run, task, step and shard (for cleanup and log search)."""
    labels = {
        "app.kubernetes.io/part-of": "iip",
        "app.kubernetes.io/component": "step",
        "iip/dag-id": _label_value(dag_id),
        "iip/task-id": _label_value(task_id),
        "iip/run-id": _label_value(run_id),
        "iip/step": _label_value(step),
    }
    if shard is not None:
        labels["iip/shard"] = str(shard)
    return labels


def pod_operator_kwargs(
    *, task_id: str, arguments: list[str], profile: PodProfile, labels: dict[str, str], xcom: bool
) -> dict[str, Any]:
    """KubernetesPodOperator keyword arguments for one step command under one profile."""
    from airflow.providers.cncf.kubernetes.secret import Secret
    from kubernetes.client import models as k8s

    requests = {"cpu": profile.cpu, "memory": profile.memory}
    limits = {"memory": profile.memory_limit or profile.memory}
    if profile.cpu_limit:
        limits["cpu"] = profile.cpu_limit
    if profile.gpus:
        requests["nvidia.com/gpu"] = str(profile.gpus)
        limits["nvidia.com/gpu"] = str(profile.gpus)
    restricted = k8s.V1SecurityContext(
        run_as_non_root=True,
        run_as_user=RUN_AS_USER,
        run_as_group=RUN_AS_USER,
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        privileged=False,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )
    env = {"HOME": "/tmp", "PYTHONUNBUFFERED": "1", **profile.env}
    return {
        "task_id": task_id,
        # Pod names must be DNS-1123 (lowercase alphanumerics and '-'): step names carry underscores.
        "name": "iip-" + re.sub(r"[^a-z0-9-]+", "-", labels.get("iip/step", "step").lower()).strip("-"),
        "namespace": profile.namespace,
        "image": profile.image,
        "image_pull_policy": profile.image_pull_policy,
        "cmds": ["python", "-m", "operators"],
        "arguments": arguments,
        "labels": labels,
        "env_vars": [k8s.V1EnvVar(name=k, value=v) for k, v in sorted(env.items())],
        "secrets": [Secret("env", s.env, s.secret, s.key) for s in profile.secret_env],
        "container_resources": k8s.V1ResourceRequirements(requests=requests, limits=limits),
        "node_selector": dict(profile.node_selector),
        "tolerations": [
            k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect)
            for t in profile.tolerations
        ],
        "service_account_name": profile.service_account,
        "automount_service_account_token": False,
        "security_context": k8s.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=RUN_AS_USER, run_as_group=RUN_AS_USER, fs_group=RUN_AS_USER,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        "container_security_context": restricted,
        "xcom_sidecar_container_security_context": restricted,
        # A read-only root filesystem needs somewhere to write scratch files.
        "volumes": [k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="10Gi"))],
        "volume_mounts": [k8s.V1VolumeMount(name="tmp", mount_path="/tmp")],
        "do_xcom_push": xcom,
        "get_logs": True,
        "on_finish_action": "delete_pod",
        "startup_timeout_seconds": profile.startup_timeout_seconds,
        "deferrable": profile.deferrable,
        "log_events_on_failure": True,
        "in_cluster": None,
    }
