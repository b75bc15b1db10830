"""Pod rendering without a cluster: schema-valid, restricted, labelled, and free of secret values."""

from __future__ import annotations

import json
import os
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient
from pydantic import ValidationError

from operators.orchestration.pod_spec import PodProfile, SecretEnv, load_profiles
from operators.orchestration.step_operator import StepOperator, redact, secret_values, step_arguments
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


@pytest.mark.parametrize("profile", ["cpu", "vllm", "train"])
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
