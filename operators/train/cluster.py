"""Pure rendering of the Kubernetes objects a multi-GPU training run needs (testable without a cluster).

Two shapes, same container, same command (`torchrun ... -m operators train ...`):

- one node: a pod with all the node's GPUs; torchrun starts one process per GPU (`single_node_pod_kwargs`
  adapts the StepOperator's KubernetesPodOperator arguments);
- several nodes: an indexed Job (one pod per node, `completionMode: Indexed`) plus a headless Service, so
  pod 0 is reachable as `<job>-0.<service>`; torchrun's c10d rendezvous runs there and assigns ranks.

Every pod: the `train` image, `nvidia.com/gpu` requests = limits, a local scratch emptyDir (`/scratch`,
`IIP_TRAIN_SCRATCH`) where each rank writes its checkpoint part before uploading it to the run's `s3://`
output (a rescheduled pod resumes from S3, not from a node-local path), optionally a ReadWriteMany volume for
clusters that keep training output on a shared file system instead, a memory-backed /dev/shm for NCCL,
NCCL settings as plain env, S3 credentials only as Secret refs, and the restricted security context every
step pod has (non-root, read-only root, no capabilities).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from operators.orchestration.pod_spec import (
    DEFAULT_S3_SECRET,
    K8S_NAME,
    QUANTITY,
    RUN_AS_USER,
    SECRETISH,
    PodProfile,
    SecretEnv,
    Toleration,
)

CHECKPOINT_VOLUME = "checkpoints"
SCRATCH_VOLUME = "scratch"
DEFAULT_NCCL_ENV = {
    "NCCL_DEBUG": "WARN",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a hung collective fails the pod instead of blocking forever
    "NCCL_IB_DISABLE": "0",
    "NCCL_SOCKET_IFNAME": "eth0",
    "OMP_NUM_THREADS": "4",
}


class ClusterTrainSpec(BaseModel):
    """Where and how a training run is placed on the cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field("iip-train:0.1.0", min_length=1)
    namespace: str = Field("iip", pattern=K8S_NAME)
    service_account: str = Field("iip-step", pattern=K8S_NAME)
    nodes: int = Field(1, ge=1, le=512)
    gpus_per_node: int = Field(8, ge=1, le=16)
    cpu: str = Field("16", pattern=QUANTITY)
    memory: str = Field("256Gi", pattern=QUANTITY)
    shm_size: str = Field("64Gi", pattern=QUANTITY, description="Memory-backed /dev/shm (NCCL, dataloaders).")
    scratch_size: str = Field("1Ti", pattern=QUANTITY, description="Local emptyDir for this node's checkpoint "
                              "parts and downloads (output on s3://).")
    scratch_mount: str = Field("/scratch", pattern=r"^/[A-Za-z0-9_./-]*$")
    checkpoint_claim: str | None = Field(None, pattern=K8S_NAME, description="ReadWriteMany PersistentVolumeClaim "
                                         "shared by every rank, for output on a mounted path; blank with s3:// output.")
    checkpoint_mount: str = Field("/checkpoints", pattern=r"^/[A-Za-z0-9_./-]*$")
    master_port: int = Field(29500, ge=1024, le=65535)
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[Toleration] = Field(default_factory=lambda: [Toleration(key="nvidia.com/gpu",
                                                                              operator="Exists")])
    secret_env: list[SecretEnv] = Field(default_factory=lambda: list(DEFAULT_S3_SECRET))
    env: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_NCCL_ENV))
    backoff_limit: int = Field(3, ge=0, description="Pod restarts of the Job (each resumes from a checkpoint).")

    @field_validator("env")
    @classmethod
    def _no_secret_literals(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if SECRETISH.search(name):
                raise ValueError(f"{name} looks like a secret: use secret_env (a Secret ref)")
        return env

    @property
    def world_size(self) -> int:
        """Training processes in all: one per GPU."""
        return self.nodes * self.gpus_per_node


def spec_from_profile(profile: PodProfile, **overrides: Any) -> ClusterTrainSpec:
    """A training placement from a StepOperator pod profile (image, nodes, GPUs, scheduling, secrets)."""
    base: dict[str, Any] = {
        "image": profile.image, "namespace": profile.namespace, "service_account": profile.service_account,
        "gpus_per_node": max(1, profile.gpus), "cpu": profile.cpu, "memory": profile.memory,
        "node_selector": dict(profile.node_selector), "tolerations": list(profile.tolerations),
        "secret_env": list(profile.secret_env), "env": {**DEFAULT_NCCL_ENV, **profile.env},
        "nodes": profile.nodes,
    }
    return ClusterTrainSpec.model_validate({**base, **overrides})


def check_world_size(spec: ClusterTrainSpec, world_size: int) -> None:
    """Fail (naming the field) when the training config's world size does not match the placement."""
    if world_size != spec.world_size:
        raise ValueError(f"world_size {world_size} != nodes x gpus_per_node = {spec.nodes} x "
                         f"{spec.gpus_per_node}: set train.world_size to {spec.world_size}")


def torchrun_command(spec: ClusterTrainSpec, rendezvous_host: str | None, run_id: str) -> list[str]:
    """`torchrun` launching one process per GPU (multi-node: c10d rendezvous at `rendezvous_host`)."""
    cmd = ["torchrun", f"--nproc_per_node={spec.gpus_per_node}"]
    if spec.nodes > 1:
        if not rendezvous_host:
            raise ValueError("a multi-node run needs a rendezvous host")
        cmd += [f"--nnodes={spec.nodes}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={rendezvous_host}:{spec.master_port}", f"--rdzv_id={run_id}"]
    else:
        cmd += ["--standalone", "--nnodes=1"]
    return [*cmd, "-m", "operators"]


def _restricted() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "privileged": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _volumes(spec: ClusterTrainSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "50Gi"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
        {"name": SCRATCH_VOLUME, "emptyDir": {"sizeLimit": spec.scratch_size}},
    ]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"},
              {"name": SCRATCH_VOLUME, "mountPath": spec.scratch_mount}]
    if spec.checkpoint_claim:
        volumes.append({"name": CHECKPOINT_VOLUME, "persistentVolumeClaim": {"claimName": spec.checkpoint_claim}})
        mounts.append({"name": CHECKPOINT_VOLUME, "mountPath": spec.checkpoint_mount})
    return volumes, mounts


def _plain_env(spec: ClusterTrainSpec) -> dict[str, str]:
    """Non-secret environment of a training container: NCCL settings and where local scratch is."""
    from operators.train.remote import SCRATCH_ENV

    return {"HOME": "/tmp", "PYTHONUNBUFFERED": "1", SCRATCH_ENV: spec.scratch_mount, **spec.env}


def _name(value: str, limit: int = 52) -> str:
    v = re.sub(r"[^a-z0-9-]", "-", value.lower()).strip("-")[:limit].strip("-")
    return v or "train"


def render_indexed_job(spec: ClusterTrainSpec, name: str, arguments: list[str],
                       labels: dict[str, str]) -> list[dict[str, Any]]:
    """A headless Service and an indexed Job running `torchrun ... -m operators <arguments>` on every node."""
    job = _name(name)
    service = f"{job}-rdzv"
    host = f"{job}-0.{service}.{spec.namespace}.svc"
    volumes, mounts = _volumes(spec)
    gpus = str(spec.gpus_per_node)
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(_plain_env(spec).items())]
    env += [{"name": s.env, "valueFrom": {"secretKeyRef": {"name": s.secret, "key": s.key}}} for s in spec.secret_env]
    all_labels = {**labels, "app.kubernetes.io/part-of": "iip", "app.kubernetes.io/component": "train",
                  "iip/train-job": job}
    container = {
        "name": "train",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": torchrun_command(spec, host, job),
        "args": arguments,
        "env": env,
        "ports": [{"name": "rdzv", "containerPort": spec.master_port}],
        "resources": {"requests": {"cpu": spec.cpu, "memory": spec.memory, "nvidia.com/gpu": gpus},
                      "limits": {"memory": spec.memory, "nvidia.com/gpu": gpus}},
        "securityContext": _restricted(),
        "volumeMounts": mounts,
    }
    pod_spec = {
        "subdomain": service,  # pod i resolves as <job>-i.<service>: pod 0 hosts the rendezvous
        "restartPolicy": "Never",
        "serviceAccountName": spec.service_account,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
                            "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}},
        "nodeSelector": dict(spec.node_selector),
        "tolerations": [{k: v for k, v in t.model_dump().items() if v is not None} for t in spec.tolerations],
        "containers": [container],
        "volumes": volumes,
    }
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": service, "namespace": spec.namespace, "labels": all_labels},
           "spec": {"clusterIP": "None", "selector": {"iip/train-job": job}, "publishNotReadyAddresses": True,
                    "ports": [{"name": "rdzv", "port": spec.master_port, "targetPort": spec.master_port}]}}
    batch_job = {"apiVersion": "batch/v1", "kind": "Job",
                 "metadata": {"name": job, "namespace": spec.namespace, "labels": all_labels},
                 "spec": {"completionMode": "Indexed", "completions": spec.nodes, "parallelism": spec.nodes,
                          "backoffLimit": spec.backoff_limit, "ttlSecondsAfterFinished": 86400,
                          "template": {"metadata": {"labels": all_labels}, "spec": pod_spec}}}
    return [svc, batch_job]


def single_node_pod_kwargs(kpo_kwargs: dict[str, Any], spec: ClusterTrainSpec) -> dict[str, Any]:
    """Adapt a step's KubernetesPodOperator arguments into a one-node, all-GPU torchrun training pod."""
    from kubernetes.client import models as k8s

    if spec.nodes != 1:
        raise ValueError("single_node_pod_kwargs renders one node; use render_indexed_job for nodes > 1")
    out = dict(kpo_kwargs)
    out["cmds"] = torchrun_command(spec, None, "train")
    out["image"] = spec.image
    gpus = str(spec.gpus_per_node)
    out["container_resources"] = k8s.V1ResourceRequirements(
        requests={"cpu": spec.cpu, "memory": spec.memory, "nvidia.com/gpu": gpus},
        limits={"memory": spec.memory, "nvidia.com/gpu": gpus})
    present = {e.name for e in out.get("env_vars", [])}
    plain = sorted(_plain_env(spec).items())
    out["env_vars"] = [*out.get("env_vars", []), *(k8s.V1EnvVar(name=k, value=v) for k, v in plain if k not in present)]
    # The same volumes as a node of the indexed Job, minus the /tmp emptyDir the step pod already has.
    volumes, mounts = _volumes(spec)
    out["volumes"] = [*out.get("volumes", []), *(_k8s_volume(v) for v in volumes[1:])]
    out["volume_mounts"] = [*out.get("volume_mounts", []),
                            *(k8s.V1VolumeMount(name=m["name"], mount_path=m["mountPath"]) for m in mounts[1:])]
    out["node_selector"] = dict(spec.node_selector)
    out["tolerations"] = [k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect)
                          for t in spec.tolerations]
    return out


def _k8s_volume(v: dict[str, Any]) -> Any:
    """A rendered volume (emptyDir or PersistentVolumeClaim) as the kubernetes client's model."""
    from kubernetes.client import models as k8s

    if "emptyDir" in v:
        return k8s.V1Volume(name=v["name"], empty_dir=k8s.V1EmptyDirVolumeSource(
            medium=v["emptyDir"].get("medium"), size_limit=v["emptyDir"].get("sizeLimit")))
    return k8s.V1Volume(name=v["name"], persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
        claim_name=v["persistentVolumeClaim"]["claimName"]))
