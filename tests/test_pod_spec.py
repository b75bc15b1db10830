"""Pod rendering without a cluster: schema-valid, restricted, labelled, and free of secret values."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient
from pydantic import ValidationError

from operators.orchestration.pod_spec import PodProfile, SecretEnv, load_profiles
from operators.orchestration.step_command import redact, secret_values, step_arguments
from operators.orchestration.step_operator import StepOperator
from tests.conftest import FAKE_SECRET

K8S_VERSION = "1.37.0"


def render(op: StepOperator, run_id: str = "manual__2026-11-25T10:00:00+00:00") -> dict[str, Any]:
    kpo = op.build_pod_operator({"run_id": run_id})
    pod = kpo.build_pod_request_obj(dry_run=True)
    return dict(ApiClient().sanitize_for_serialization(pod))


def make_op(profile: str, action: str = "run", shard: int | None = 3) -> StepOperator:
    return StepOperator(
        task_id=f"t-{profile}-{action}", step="ingest", action=action,  # type: ignore[arg-type]
        output_uri="s3://bucket/runs/r1/ingest", inputs=["s3://bucket/raw/"], shard=shard,
        config={"source_name": "demo", "format": "auto"}, profile=profile, mode="kubernetes",
    )


@pytest.fixture(autouse=True)
def secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker holds real credentials in its environment; none may reach a pod spec.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTTESTTEST")


@pytest.mark.parametrize("profile", ["cpu", "cpu-1", "vllm", "train"])
@pytest.mark.parametrize("action", ["plan", "run", "reduce", "report"])
def test_rendered_pod_is_valid_restricted_and_secret_free(profile: str, action: str) -> None:
    pod = render(make_op(profile, action, shard=3 if action == "run" else None))
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    text = json.dumps(pod)
    assert FAKE_SECRET not in text and "AKIATESTTESTTEST" not in text
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == "iip-step"
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["runAsNonRoot"] is True
    base = spec["containers"][0]
    assert base["command"] == ["python", "-m", "operators"]
    assert base["args"][0] == action
    envs = {e["name"]: e for e in base["env"]}
    assert envs["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "iip-s3", "key": "secret_key"}
    assert "value" not in envs["AWS_SECRET_ACCESS_KEY"]
    labels = pod["metadata"]["labels"]
    assert labels["iip/step"] == "ingest" and labels["iip/run-id"].startswith("manual__2026-11-25T10")
    assert any(m["mountPath"] == "/tmp" for m in base["volumeMounts"])  # writable scratch on a read-only root
    has_sidecar = len(spec["containers"]) == 2
    assert has_sidecar == (action in ("plan", "reduce", "report"))
    if profile in ("vllm", "train"):
        assert int(base["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    else:
        assert "nvidia.com/gpu" not in base["resources"]["limits"]


def test_run_arguments_carry_the_shard_and_config() -> None:
    pod = render(make_op("cpu", "run", shard=7))
    args = pod["spec"]["containers"][0]["args"]
    assert args[args.index("--shard") + 1] == "7"
    assert json.loads(args[args.index("--config") + 1]) == {"format": "auto", "source_name": "demo"}
    assert pod["metadata"]["labels"]["iip/shard"] == "7"


def test_partition_stage_pod_runs_one_task_of_the_stage() -> None:
    """A dedup partition stage's mapped task k becomes a pod running `stage ... --stage pairs --shard k`."""
    op = StepOperator(task_id="pairs", step="near_dedup", action="stage", stage="pairs",
                      output_uri="s3://bucket/runs/r1/near_dedup", config={}, shard=5, mode="kubernetes")
    pod = render(op)
    args = pod["spec"]["containers"][0]["args"]
    assert args[:2] == ["stage", "near_dedup"]
    assert args[args.index("--stage") + 1] == "pairs" and args[args.index("--shard") + 1] == "5"
    assert pod["metadata"]["labels"]["iip/shard"] == "5"


def test_a_grouped_wave_task_pod_does_its_slot_of_the_shards() -> None:
    """A grouped (light) wave maps over (shard, slot) pairs: task j's pod runs `--shard j --of G`, and its time
    limit covers each shard it does."""
    op = StepOperator(task_id="pairs", step="near_dedup", action="stage", stage="pairs",
                      output_uri="s3://bucket/runs/r1/near_dedup", config={}, mode="kubernetes",
                      shard=[5, {"slot": 5, "of": 8}])  # type: ignore[arg-type]
    one = StepOperator(task_id="one", step="near_dedup", action="stage", stage="pairs",
                       output_uri="s3://bucket/runs/r1/near_dedup", config={}, mode="kubernetes", shard=5)
    op._take_slot({"ti": None})
    args = render(op)["spec"]["containers"][0]["args"]
    assert args[args.index("--shard") + 1] == "5" and args[args.index("--of") + 1] == "8"
    assert "--of" not in render(one)["spec"]["containers"][0]["args"]
    op.members = 3  # 20 shards on 8 slots: task 5 does shards 5, 13
    assert op.timeout_s() > one.timeout_s()


@pytest.mark.parametrize(("step", "action", "stage"), [("pii", "run", None), ("semantic_dedup", "stage", "embed"),
                                                    ("semantic_dedup", "stage", "pairs"),
                                                    ("decontaminate_paraphrase", "run", None)])
def test_the_curation_steps_render_as_restricted_pods(step: str, action: str, stage: str | None) -> None:
    """pii, semantic_dedup's stages and decontaminate_paraphrase become pods running their one command,
    non-root and with no secret in the spec, like every step."""
    op = StepOperator(task_id=f"{step}-{stage or action}", step=step, action=action, stage=stage,  # type: ignore[arg-type]
                      output_uri=f"s3://bucket/runs/r1/{step}", inputs=["s3://bucket/runs/r1/near_dedup"],
                      config={"enabled": True} if step != "pii" else {"actions": {"secret": "drop"}}, shard=2,
                      profile="cpu-1", mode="kubernetes")
    pod = render(op)
    (container,) = pod["spec"]["containers"]
    assert container["args"][:2] == [action, step]
    if stage:
        assert container["args"][container["args"].index("--stage") + 1] == stage
    assert container["securityContext"]["runAsNonRoot"] is True and FAKE_SECRET not in json.dumps(pod)


def test_profile_refuses_literal_secrets_and_latest_tags() -> None:
    with pytest.raises(ValidationError, match="secret"):
        PodProfile(image="x:1", env={"AWS_SECRET_ACCESS_KEY": "hunter2"})
    with pytest.raises(ValidationError, match="latest"):
        PodProfile(image="x:latest")
    with pytest.raises(ValidationError):
        SecretEnv(env="A B", secret="s", key="k")
    with pytest.raises(ValidationError):
        PodProfile(image="x:1", cpu="lots")


def test_profiles_can_be_overridden_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IIP_POD_PROFILES", json.dumps({"cpu": {"image": "registry.local/iip-cpu:9", "cpu": "4"}}))
    profiles = load_profiles()
    assert profiles["cpu"].image == "registry.local/iip-cpu:9" and profiles["cpu"].cpu == "4"
    assert "vllm" in profiles
    pod = render(make_op("cpu"))
    assert pod["spec"]["containers"][0]["image"] == "registry.local/iip-cpu:9"


def test_redaction_masks_secret_env_values() -> None:
    secrets = secret_values(dict(os.environ))
    assert FAKE_SECRET in secrets
    assert redact(f"key={FAKE_SECRET} done", secrets) == "key=*** done"


def test_step_arguments_shapes() -> None:
    assert step_arguments("reduce", "ingest", output="file:///o") == ["reduce", "ingest", "--output", "file:///o"]
    assert step_arguments("report", "x", output="file:///o", xcom_file="/x.json") == [
        "report", "--output", "file:///o", "--xcom-file", "/x.json"]


# ------------------------------------------------------------------------------------------ step pods in a DAG

DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class _MappedTI:
    """The one attribute of a mapped task instance the operator reads."""

    map_index = 4


def dag_step_pod(profile: str) -> tuple[Any, dict[str, Any]]:
    """A mapped `near_dedup` run task of DAG `foundational_selection`, as its KubernetesPodOperator and its pod."""
    from airflow.sdk import DAG

    with DAG(dag_id="foundational_selection", schedule=None):
        op = StepOperator(task_id="near_dedup.run", step="near_dedup", action="run",
                          output_uri="s3://bucket/runs/r1/near_dedup", inputs=["s3://bucket/runs/r1/exact_dedup"],
                          shard=4, config={}, profile=profile, mode="kubernetes")
    kpo = op.build_pod_operator({"run_id": "scheduled__2026-11-25T10:00:00+00:00", "ti": _MappedTI()})
    return kpo, dict(ApiClient().sanitize_for_serialization(kpo.build_pod_request_obj(dry_run=True)))


@pytest.mark.parametrize("profile", ["cpu", "vllm", "train"])
def test_step_pods_are_labelled_deleted_when_done_and_deferrable_on_gpus(profile: str) -> None:
    from airflow.providers.cncf.kubernetes.utils.pod_manager import OnFinishAction

    kpo, pod = dag_step_pod(profile)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    # The labels tie the pod to its DAG, task, run, step and shard (for cleanup and log search).
    labels = pod["metadata"]["labels"]
    assert {k: v for k, v in labels.items() if k.startswith("iip/")} == {
        "iip/dag-id": "foundational_selection", "iip/task-id": "near_dedup.run",
        "iip/run-id": "scheduled__2026-11-25T10_00_00_00_00", "iip/step": "near_dedup", "iip/shard": "4",
        "iip/map-index": "4"}
    assert all(re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]", v) and len(v) <= 63 for v in labels.values())
    # The API server only accepts DNS-1123 pod names (a step name's underscore is not allowed).
    assert DNS_1123.fullmatch(pod["metadata"]["name"]) and len(pod["metadata"]["name"]) <= 253, pod["metadata"]
    # Deleted when done, whatever the outcome; GPU pods free their worker slot while they wait (deferrable).
    assert kpo.on_finish_action == OnFinishAction.DELETE_POD
    assert kpo.deferrable is (profile in ("vllm", "train"))


@pytest.mark.parametrize("profile", ["cpu", "vllm", "train"])
def test_step_pods_run_under_runtime_default_seccomp(profile: str) -> None:
    """Seccomp on the step pods themselves (not only the chart's): the pod, every container and the xcom sidecar."""
    _, pod = dag_step_pod(profile)
    spec = pod["spec"]
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["containers"] + spec.get("initContainers", []):
        assert c["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
    sidecar = render(make_op(profile, "plan", shard=None))["spec"]["containers"]
    assert len(sidecar) == 2 and all(c["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
                                     for c in sidecar)


def test_a_dag_runs_per_shard_tasks_on_one_core_and_whole_step_tasks_on_the_cpu_profile() -> None:
    """Phase 1's `run` and map/partition stage tasks get `cpu-1` pods (1 CPU, 2Gi: a 64-pod run is 64
    cores); plan, reduce stages and reduce keep `cpu`; an LLM step's Param-chosen profile is kept for all."""
    from airflow.dag_processing.dagbag import DagBag

    from operators.core.fusion import folded_stages
    from operators.core.registry import step_class

    def profile(task: Any) -> str:  # a mapped task keeps its operator arguments apart
        return str(task.partial_kwargs["profile"] if hasattr(task, "partial_kwargs") else task.profile)

    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[1] / "dags"))
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags["foundational_selection"]
    for step in ("filter", "exact_dedup", "near_dedup", "select"):
        # A step's first map stage runs in the upstream's fused shard tasks (operators/core/fusion.py): no task.
        stages = step_class(step).stages
        assert not any(dag.has_task(f"{step}.{st.name}") for st in stages[:1]), step
        per_shard = ["run", *[st.name for st in stages[1:] if st.kind in ("map", "partition")]]
        # In the chain a step's reduce runs in the next step's plan; the chain's last step's in the export's.
        assert not dag.has_task(f"{step}.reduce")
        # ... and so does a reduce stage right after that head (select's cutoffs): the plan runs it.
        folded = folded_stages(step_class(step)) if step != "filter" else []
        assert not any(dag.has_task(f"{step}.{name}") for name in folded), step
        whole = ["plan", *[st.name for st in stages if st.kind == "reduce" and st.name not in folded]]
        assert {t: profile(dag.get_task(f"{step}.{t}")) for t in per_shard} == dict.fromkeys(per_shard, "cpu-1")
        assert {t: profile(dag.get_task(f"{step}.{t}")) for t in whole} == dict.fromkeys(whole, "cpu")
    for step in ("semantic_dedup", "decontaminate_paraphrase"):  # the encoder steps: the Param's profile, every task
        tasks = ["plan", "run", *[st.name for st in step_class(step).stages]]
        assert {profile(dag.get_task(f"{step}.{t}")) for t in tasks} == {"{{ params.encoder_profile }}"}
    synth = bag.dags["conversational_synthesis"]
    assert profile(synth.get_task("label.run")) == profile(synth.get_task("label.plan")) == "{{ params.llm_profile }}"
    pod = render(make_op("cpu-1", "run", shard=0))
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["requests"] == {"cpu": "1", "memory": "2Gi"}
