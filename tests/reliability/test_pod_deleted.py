"""Kubernetes mode: a step's pod deleted while its task runs (a node loss, an eviction, `kubectl delete pod`).

Issue #24, item 2, for kubernetes mode: the pod spec and the operator's settings must give the same outcome as a
SIGKILL of the task's process tree gives in local mode: the try fails, is retried, and the retry runs afresh and
cleans up after itself.

No Kubernetes cluster can be had on this machine (see tests/test_job_launcher.py for why), so the API
conversation is replayed by a loopback HTTP server (tests/k8s_replay.py): each request the provider must send, in
order, and the answer a Kubernetes API server gives, in its wire format. A request out of script order fails the
test. The script was written from the provider's code (cncf-kubernetes 10.25, `KubernetesPodOperator.execute_sync`
and `PodManager`) and the API reference, not recorded from a cluster. Everything else is real: the
StepOperator in kubernetes mode builds the real KubernetesPodOperator from `pod_kwargs` (profile `cpu`, not
deferrable, `on_finish_action: delete_pod`), whose KubernetesHook reads an Airflow connection naming a kubeconfig,
and the official `kubernetes` client speaks HTTP (and WebSocket, for the XCom sidecar's exec) to the server. The
task instance and its task state store (which, on Airflow 3.3, outlives a try and holds the pod's name) are plain
in-memory stand-ins for the Airflow API server's.

What the provider does, read from its code and checked here:
- Try 1: the pod is created and Running; its log stream ends and the next read answers 404. The 404 propagates;
  the cleanup in `execute_sync`'s `finally` tries to label the pod `already_checked` (404), reads its events and
  deletes it (404, tolerated), and raises "Pod <name> returned a failure." with the 404 as its context: an
  AirflowException, which Airflow retries (the StepOperator turns only ValueError/TypeError into a no-retry
  failure).
- Try 2: the provider asks for the pod named in the task state store; it is gone (404), so it searches by the
  task's labels, which leave out `try_number` and exclude pods labelled `already_checked`; the API lists none, so it
  creates a new pod (labelled `try_number=2`, a new random name), follows it, reads its XCom through the sidecar
  and deletes it.
- If instead the old try's pod is still there and Failed (e.g. evicted by the kubelet while the try's worker was
  lost with its node, so no cleanup ran), the provider does not reattach to it: it deletes it (its cleanup of
  an old try's pod, `get_or_create_pod` -> `process_pod_deletion`) and creates a new one. (Were it still Pending
  or Running, not evicted, the provider would reattach to it: `durable`/`reattach_on_restart`, on by default and
  left on by pod_spec; not exercised here.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from operators.orchestration.step_operator import StepFailedError, StepOperator
from tests.k8s_replay import Exec, Replay

ROOT = Path(__file__).resolve().parents[2]
NS = "iip"
DAG_ID = "pipeline"
TASK_ID = "ingest_reduce"
RUN_ID = "manual__1"
PODS = f"/api/v1/namespaces/{NS}/pods"
SIDECAR = "airflow-xcom-sidecar"
SUMMARY = {"step": "ingest", "records": 1200, "shards": 3, "output": "s3://bucket/runs/r1/ingest"}
NOT_FOUND = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
             "message": 'pods "{name}" not found', "details": {"name": "{name}", "kind": "pods"}}
T0 = "2026-11-28T10:00:00Z"


class TaskStateStore:
    """Stands in for Airflow 3.3's task state store: a key-value store of the task instance that outlives a try
    (kept in a file when a try runs in a process of its own)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.values: dict[str, Any] = json.loads(path.read_text()) if path is not None and path.exists() else {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set(self, key: str, value: Any, **_: Any) -> None:
        self.values[key] = value
        if self.path is not None:
            self.path.write_text(json.dumps(self.values))


@pytest.fixture()
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Replay]:
    replay = Replay()
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", replay.kubeconfig(tmp_path / "kubeconfig", NS))
    monkeypatch.setenv("IIP_EXECUTION_MODE", "kubernetes")
    monkeypatch.delenv("IIP_POD_PROFILES", raising=False)
    monkeypatch.delenv("IIP_TASK_RETRIES", raising=False)
    yield replay
    replay.server.shutdown()


def _op() -> StepOperator:
    from airflow.sdk import DAG

    with DAG(DAG_ID, schedule=None):
        return StepOperator(task_id=TASK_ID, step="ingest", action="reduce", output_uri="s3://bucket/runs/r1/ingest",
                            config={"source_name": "demo", "format": "auto"}, profile="cpu")


def _context(op: StepOperator, try_number: int, store: TaskStateStore) -> dict[str, Any]:
    pushed: list[tuple[str, Any]] = []
    ti = SimpleNamespace(dag_id=DAG_ID, task_id=TASK_ID, run_id=RUN_ID, map_index=-1, try_number=try_number,
                         pushed=pushed, xcom_push=lambda key, value: pushed.append((key, value)))
    return {"run_id": RUN_ID, "ti": ti, "dag": op.dag, "task_state_store": store}


def _selector() -> str:
    """The label search the provider makes for a task's pod: the task's labels without `try_number`, leaving out
    pods an earlier try has checked."""
    labels = {"app.kubernetes.io/component": "step", "app.kubernetes.io/part-of": "iip", "dag_id": DAG_ID,
              "iip/dag-id": DAG_ID, "iip/run-id": RUN_ID, "iip/step": "ingest", "iip/task-id": TASK_ID,
              "kubernetes_pod_operator": "True", "run_id": RUN_ID, "task_id": TASK_ID}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + ",already_checked!=True,!airflow-worker"


class Cluster:
    """What the API server holds: the pods the provider created (as POSTed), by the script's key (p1, p2)."""

    def __init__(self, api: Replay) -> None:
        self.api = api
        self.pods: dict[str, dict[str, Any]] = {}

    def create(self, key: str) -> Callable[[dict[str, Any]], Any]:
        def answer(request: dict[str, Any]) -> Any:
            body = request["body"]
            self.pods[key] = body
            self.api.names[key] = body["metadata"]["name"]
            return self.pod(key, "Pending")(request)
        return answer

    def pod(self, key: str, phase: str, base: dict[str, Any] | None = None, sidecar: dict[str, Any] | None = None,
            **status: Any) -> Callable[[dict[str, Any]], Any]:
        def answer(_: dict[str, Any]) -> Any:
            body = self.pods[key]
            states = [{"name": name, "image": image, "imageID": "", "ready": "running" in state,
                       "restartCount": 0, "state": state}
                      for name, image, state in (("base", body["spec"]["containers"][0]["image"], base),
                                                 (SIDECAR, "alpine", sidecar)) if state is not None]
            return {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {**body["metadata"], "uid": f"uid-{key}", "resourceVersion": "1",
                                 "creationTimestamp": T0},
                    "spec": {**body["spec"], "nodeName": f"node-{key}"},
                    "status": {"phase": phase, "containerStatuses": states, **status}}
        return answer

    def list(self, *keys: str, **pod: Any) -> Callable[[dict[str, Any]], Any]:
        return lambda request: {"kind": "PodList", "apiVersion": "v1", "metadata": {},
                                "items": [self.pod(k, **pod)(request) for k in keys]}


def _gone(request: dict[str, Any]) -> Any:
    """The API server's answer for a pod that no longer exists."""
    name = request["path"].split("/")[6]
    return json.loads(json.dumps(NOT_FOUND).replace("{name}", name))


RUNNING = {"running": {"startedAt": T0}}


def _log(*lines: str) -> str:
    return "".join(f"2026-11-28T10:00:0{i}.000000000Z {line}\n" for i, line in enumerate(lines))


def _script_create(api: Replay, cluster: Cluster, key: str) -> None:
    """Create the pod and wait for it to run."""
    api.expect("POST", PODS, 201, cluster.create(key))
    api.expect("GET", PODS, 200, cluster.list(key, phase="Pending"), labelSelector=_selector())
    api.expect("GET", f"{PODS}/{{{key}}}", 200, cluster.pod(key, "Running", RUNNING, RUNNING))


def _script_try1(api: Replay, cluster: Cluster) -> None:
    p1 = f"{PODS}/{{p1}}"
    api.expect("GET", PODS, 200, cluster.list(), labelSelector=_selector())  # no pod of this task yet
    _script_create(api, cluster, "p1")
    api.expect("GET", p1, 200, cluster.pod("p1", "Running", RUNNING, RUNNING))  # its containers, to follow logs
    api.expect("GET", f"{p1}/log", 200, _log("INFO ingest: reduce of 3 shards", "INFO ingest: shard 0 merged"),
               container="base", follow="True", timestamps="True")
    api.expect("GET", p1, 200, cluster.pod("p1", "Running", RUNNING, RUNNING))
    # The log stream broke off: the node is gone, and with it the pod.
    api.expect("GET", p1, 404, _gone)
    # The cleanup in the provider's `finally`: istio check, `already_checked` label, container states, events,
    # delete: the pod is gone, all best effort.
    api.expect("GET", p1, 404, _gone)
    api.expect("PATCH", p1, 404, _gone)
    api.expect("GET", p1, 404, _gone)
    api.expect("GET", f"/api/v1/namespaces/{NS}/events", 200, {"kind": "EventList", "metadata": {}, "items": []},
               fieldSelector="involvedObject.name={p1}")
    api.expect("DELETE", p1, 404, _gone)


def _script_try2_succeeds(api: Replay, cluster: Cluster) -> None:
    p2 = f"{PODS}/{{p2}}"
    _script_create(api, cluster, "p2")
    api.expect("GET", p2, 200, cluster.pod("p2", "Running", RUNNING, RUNNING))
    api.expect("GET", f"{p2}/log", 200, _log("INFO ingest: reduce of 3 shards", json.dumps(SUMMARY)),
               container="base", follow="True", timestamps="True")
    api.expect("GET", p2, 200, cluster.pod("p2", "Running", RUNNING, RUNNING))
    done = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": T0, "finishedAt": T0}}
    api.expect("GET", p2, 200, cluster.pod("p2", "Running", done, RUNNING))  # the step exited 0
    api.expect("GET", p2, 200, cluster.pod("p2", "Running", done, RUNNING))  # the sidecar is up
    api.expect("GET", p2, 200, cluster.pod("p2", "Running", done, RUNNING))
    api.expect("GET", f"{p2}/exec", 200, Exec(stdout=json.dumps(SUMMARY)), container=SIDECAR, stdin="False")
    api.expect("GET", f"{p2}/exec", 200, Exec(stdin=True), container=SIDECAR, stdin="True")
    api.expect("GET", p2, 200, cluster.pod("p2", "Running", done, RUNNING))  # istio check
    api.expect("GET", p2, 200, cluster.pod("p2", "Succeeded", done, done))  # the pod completed
    api.expect("GET", p2, 200, cluster.pod("p2", "Succeeded", done, done))  # the cleanup's istio check
    api.expect("DELETE", p2, 200, cluster.pod("p2", "Succeeded", done, done))  # on_finish_action: delete_pod


def _requests(api: Replay, since: int = 0) -> list[str]:
    return [f"{r['method']} {r['path']}" for r in api.received[since:]]


def _check_new_pod(api: Replay, since: int, old: str) -> str:
    """The retry's pod: a new one (new name, `try_number=2`) as the pod spec renders it; its XCom read through the
    sidecar (then the sidecar stopped); deleted at the end. Returns its name."""
    new = api.names["p2"]
    assert new != old and new.startswith("iip-ingest-")
    post = next(r for r in api.received[since:] if r["method"] == "POST")
    labels, spec = post["body"]["metadata"]["labels"], post["body"]["spec"]
    assert labels["try_number"] == "2" and labels["iip/task-id"] == TASK_ID
    assert spec["restartPolicy"] == "Never" and spec["activeDeadlineSeconds"] == 3600  # retries are Airflow's
    assert spec["containers"][0]["args"][:2] == ["reduce", "ingest"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    execs = [r for r in api.received[since:] if r["path"].endswith("/exec")]
    assert [r["path"] for r in execs] == [f"{PODS}/{new}/exec"] * 2
    assert "/airflow/xcom/return.json" in execs[0]["query"]["command"] and "kill -2" in execs[1]["stdin"]
    assert _requests(api)[-1] == f"DELETE {PODS}/{new}"  # on_finish_action: delete_pod
    return new


def test_deleted_pod_fails_the_try_and_the_retry_runs_a_new_pod_and_deletes_it(api: Replay) -> None:
    from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException
    from kubernetes.client.exceptions import ApiException

    started = time.monotonic()
    cluster = Cluster(api)
    store = TaskStateStore()
    op = _op()
    assert op.retries is not None and op.retries > 0  # the platform's retry policy: a lost pod is retried

    # Try 1: the pod is created, runs, and is deleted under it.
    _script_try1(api, cluster)
    with pytest.raises(Exception) as failed:
        op.execute(_context(op, 1, store))
    assert not api.errors and not api.script, (api.errors, api.script)
    p1 = api.names["p1"]
    err = failed.value
    # The StepOperator names what happened (the provider's own message only says "returned a failure") ...
    assert isinstance(err, StepFailedError) and "pod was deleted while the step ran" in str(err)
    assert f'pods \\"{p1}\\" not found' in str(err)
    assert not isinstance(err, (AirflowFailException, AirflowSkipException))  # ... and it is retried
    provider = err.__cause__  # the provider's failure, with the API's 404 as its context
    assert isinstance(provider, AirflowException) and f"Pod {p1} returned a failure" in str(provider)
    cause = provider.__context__
    assert isinstance(cause, ApiException) and cause.status == 404 and f'pods \\"{p1}\\" not found' in str(cause.body)
    created = api.received[1]["body"]
    assert created["metadata"]["labels"]["try_number"] == "1"
    # The cleanup asked for the pod's deletion (it was gone: 404, tolerated).
    assert _requests(api)[-1] == f"DELETE {PODS}/{p1}"

    # Try 2: the pod named in the task state store is gone; the label search finds nothing; a new pod runs.
    mark = len(api.received)
    api.expect("GET", f"{PODS}/{{p1}}", 404, _gone)
    api.expect("GET", PODS, 200, cluster.list(), labelSelector=_selector())
    _script_try2_succeeds(api, cluster)
    context = _context(op, 2, store)
    result = _op().execute(context)
    assert not api.errors and not api.script, (api.errors, api.script)
    assert result == SUMMARY  # the XCom the sidecar held, read over the exec stream
    p2 = _check_new_pod(api, mark, p1)
    # Nothing of try 2 touched the old pod but the one look-up by name; the label search (the script checks its
    # selector: no `try_number`, `already_checked!=True`) found nothing.
    assert [r for r in _requests(api, mark) if p1 in r] == [f"GET {PODS}/{p1}"]
    assert ("pod_name", p2) in context["ti"].pushed
    assert time.monotonic() - started < 20


def run_try_1(store: str) -> None:
    """Try 1 of the task in a worker process of its own (test_worker_killed_...)."""
    op = _op()
    op.execute(_context(op, 1, TaskStateStore(Path(store))))


def test_worker_killed_and_pod_evicted_the_retry_deletes_the_old_pod_and_runs_a_new_one(
        api: Replay, tmp_path: Path) -> None:
    """The try's worker is SIGKILLed (process group) while it follows its pod's log, so no cleanup runs, and the pod
    is evicted (Failed, the object stays). The retry finds it through the task state store, does not reattach to
    it, deletes it and runs a new pod."""
    started = time.monotonic()
    cluster = Cluster(api)
    released = threading.Event()

    def stream_until_killed(_: dict[str, Any]) -> str:
        released.wait(60)  # the step runs and logs: the stream stays open until the worker is gone
        return _log("INFO ingest: reduce of 3 shards")

    p1 = f"{PODS}/{{p1}}"
    api.expect("GET", PODS, 200, cluster.list(), labelSelector=_selector())
    _script_create(api, cluster, "p1")
    api.expect("GET", p1, 200, cluster.pod("p1", "Running", RUNNING, RUNNING))
    api.expect("GET", f"{p1}/log", 200, stream_until_killed, container="base", follow="True", timestamps="True")
    store = tmp_path / "task_state_store.json"
    worker = subprocess.Popen(
        [sys.executable, "-c", f"from tests.reliability.test_pod_deleted import run_try_1; run_try_1({str(store)!r})"],
        cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (api.received and api.received[-1]["path"].endswith("/log")):
            assert worker.poll() is None and time.monotonic() < deadline, (worker.poll(), api.errors)
            time.sleep(0.05)
        os.killpg(worker.pid, signal.SIGKILL)  # the worker's whole process tree, as a node loss does
        assert worker.wait(10) == -signal.SIGKILL
    finally:
        released.set()
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        assert worker.stderr is not None
        worker.stderr.close()
    assert not api.errors and not api.script, (api.errors, api.script)
    old = api.names["p1"]
    assert json.loads(store.read_text())["pod_identifier"] == {"name": old, "namespace": NS}  # try 1 recorded it
    op = _op()
    assert op.retries is not None and op.retries > 0  # a lost worker's try is retried

    # Try 2: the old pod is still there, evicted, and unmarked (try 1 never cleaned up).
    mark = len(api.received)
    evicted = {"terminated": {"exitCode": 137, "reason": "Error", "startedAt": T0, "finishedAt": T0}}
    api.expect("GET", p1, 200, cluster.pod("p1", "Failed", evicted, evicted, reason="Evicted",
                                           message="The node was low on resource: memory."))
    api.expect("DELETE", p1, 200, cluster.pod("p1", "Failed", evicted, evicted, reason="Evicted"))
    _script_try2_succeeds(api, cluster)
    context = _context(op, 2, TaskStateStore(store))
    result = op.execute(context)
    assert not api.errors and not api.script, (api.errors, api.script)
    assert result == SUMMARY
    _check_new_pod(api, mark, old)
    # The old pod: looked up and deleted before the new one was created; never followed, never exec'd into.
    assert [r for r in _requests(api, mark) if old in r] == [f"GET {PODS}/{old}", f"DELETE {PODS}/{old}"]
    assert _requests(api, mark).index(f"DELETE {PODS}/{old}") < _requests(api, mark).index(f"POST {PODS}")
    assert time.monotonic() - started < 20
