"""Secrets end to end (issue #13, part 5): planted credentials appear nowhere a run writes or renders.

Unique random values are planted as the S3 keys (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), an LLM API
key (`VLLM_API_KEY`, named by the DAG's `models` param as the openai backend's `api_key_env`) and the Hugging
Face tokens (`HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`). A reduced demo pipeline then runs with them through
`airflow dags test` on its own Airflow home (SQLite), with every byte of data on a real S3 API server (moto,
on loopback): `ingest_source`, `foundational_selection` (all seven steps, validate, export, publish, report)
and `conversational_synthesis` as far as its first LLM step (pool, label, report) against an
OpenAI-compatible server on loopback that demands the key.

Then everything is scanned (`secret_scan.Scanner`: raw, base64, url-encoded, JSON-escaped, hex, UTF-16 and
truncated forms, inside Parquet, gzip, zstd and SQLite too): every file of the Airflow home (task logs, the
metadata DB with its XComs and rendered template fields), every object of the bucket (data, stats,
manifests, plans, reports, dataset versions, LLM caches), the processes' temp dir and home, every captured
stdout/stderr, every pod spec and training Job any task of any DAG renders under every pod profile, and
the iip chart's manifests. Zero hits, and positive controls that the scan would have seen a leak: moto's
request log shows the planted key id signing the pipeline's requests (boto3 and pyarrow's AWS SDK), the
LLM server saw the planted key, and canaries planted after the run (one per place and encoding) are found.

The LLM server is a small OpenAI-compatible HTTP server written here (its answers are schema-valid
placeholders): what is under test is where the key travels, not the model; a real vLLM server costs minutes
to start (tests/test_llm_openai.py checks the backend against one).
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import (
    ROOT,
    airflow,
    airflow_env,
    dags_test,
    free_port,
    run_cli,
    three_domain_conversations,
    wait_for_port,
)
from tests.reliability.secret_scan import Scanner

KEY_ENV = "VLLM_API_KEY"
MODEL_ROLES = ("labeler", "reference", "evolver", "responder", "user", "judge")  # dags/conversational_synthesis.py
RUN_ID = "manual__2026-11-28T10:00:00+00:00"
# The long variant: the whole conversational_synthesis DAG on the keyed LLM server (~100 s more).
FULL = os.environ.get("IIP_SECRETS_FULL", "") == "1"


def plant() -> dict[str, str]:
    """Fresh credential values, shaped like real ones, unique to this test run."""
    raw = base64.b64encode(secrets.token_bytes(30)).decode()
    return {
        "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        # An AWS secret key is 40 base64 characters: '/' and '+' make its url-encoding differ from it.
        "AWS_SECRET_ACCESS_KEY": raw[:12] + "/" + raw[13:25] + "+" + raw[26:40],
        KEY_ENV: "sk-iip-planted-" + secrets.token_hex(16),
        "HF_TOKEN": "hf_planted" + secrets.token_hex(14),
        "HUGGING_FACE_HUB_TOKEN": "hf_plantedhub" + secrets.token_hex(14),
    }


# ------------------------------------------------------------------------------ an OpenAI-compatible server


def schema_instance(schema: dict[str, Any]) -> Any:
    """The smallest value valid under a JSON schema of the kinds the prompts use (what guided decoding forces)."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: schema_instance(props.get(k, {})) for k in schema.get("required", list(props))}
    if kind == "array":
        return [schema_instance(schema.get("items", {})) for _ in range(max(1, int(schema.get("minItems", 1))))]
    if kind in ("integer", "number"):
        return schema.get("minimum", 1)
    if kind == "boolean":
        return True
    return "ok" + "k" * max(0, int(schema.get("minLength", 0)) - 2)


class KeyedLLMServer:
    """Chat completions, /tokenize and prompt log-probabilities on loopback, for requests bearing `key` only
    (others get a 401, as vLLM started with --api-key answers). Counts both."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.authorized = 0
        self.refused = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                ok = self.headers.get("Authorization") == f"Bearer {outer.key}"
                with outer._lock:
                    if ok:
                        outer.authorized += 1
                    else:
                        outer.refused += 1
                if not ok:
                    self._reply(401, {"error": {"message": "invalid API key"}})
                elif self.path.endswith("/chat/completions"):
                    fmt = body.get("response_format") or {}
                    schema = (fmt.get("json_schema") or {}).get("schema")
                    # Distinct per prompt: steps that drop duplicates or degenerate evolutions keep them.
                    last = str((body.get("messages") or [{}])[-1].get("content", ""))
                    text = json.dumps(schema_instance(schema)) if schema else (
                        f"Placeholder {zlib.crc32(last.encode()):08x}: an answer of several plain words, "
                        "enough for the length checks of the synthesis steps to keep it.")
                    self._reply(200, {"choices": [{"message": {"role": "assistant", "content": text},
                                                   "finish_reason": "stop"}],
                                      "usage": {"prompt_tokens": 9, "completion_tokens": 5}})
                elif self.path.endswith("/tokenize"):
                    words = " ".join(f"{m['role']}: {m['content']}" for m in body.get("messages", [])).split()
                    words += str(body.get("prompt", "")).split()
                    if body.get("add_generation_prompt"):
                        words.append("assistant:")
                    self._reply(200, {"tokens": [zlib.crc32(w.encode()) % 30000 for w in words]})
                elif self.path.endswith("/completions"):
                    ids = body.get("prompt", [])
                    # Later tokens are likelier (more context): an answer after its instruction scores a
                    # lower loss than alone, so IFD < 1, as with a real model.
                    plp = [None] + [{str(t): {"logprob": -2.0 / (1 + 0.05 * i)}} for i, t in enumerate(ids[1:], 1)]
                    self._reply(200, {"choices": [{"text": "x", "prompt_logprobs": plp}]})
                else:
                    self._reply(404, {"error": {"message": "not found"}})

        return Handler


# ------------------------------------------------------------------------------ the reduced demo run


@dataclass
class Run:
    """A finished run: where it wrote, what its processes printed, what the servers saw."""

    planted: dict[str, str]
    env: dict[str, str]
    home: Path
    scratch: Path
    bucket: str
    s3: Any
    recording: Path
    llm: KeyedLLMServer
    outputs: dict[str, str] = field(default_factory=dict)  # process -> stdout + stderr
    seconds: dict[str, float] = field(default_factory=dict)

    def cli(self, name: str, *args: str) -> None:
        """Run `python -m operators ...` (a step task's process) in the run's environment; keep its output."""
        t = time.monotonic()
        self._done(name, t, run_cli(*args, env=self.env))

    def airflow(self, name: str, *args: str) -> None:
        """Run an `airflow` command in the run's environment; keep its output for the scan."""
        t = time.monotonic()
        self._done(name, t, airflow(self.env, *args, timeout=900))

    def dags_test(self, dag_id: str, conf: dict[str, Any]) -> None:
        """`airflow dags test` of one DAG in the run's environment; keep its output for the scan."""
        t = time.monotonic()
        self._done(dag_id, t, dags_test(self.env, dag_id, "-c", json.dumps(conf), timeout=900))

    def _done(self, name: str, started: float, r: subprocess.CompletedProcess[str]) -> None:
        self.seconds[name] = round(time.monotonic() - started, 1)
        self.outputs[name] = r.stdout + r.stderr
        (self.home.parent / f"{name.replace(' ', '_')}.out").write_text(self.outputs[name])  # for a failure's reader
        assert r.returncode == 0, f"{name} failed:\n{self.outputs[name][-5000:]}"


def corpus() -> bytes:
    """Three domains, ten exact duplicates and a refusal (as tests/test_dags.py's foundational run)."""
    lines = three_domain_conversations(45)
    lines += lines[:10]
    lines.append(json.dumps({"conversations": [{"from": "human", "value": "Why?"},
                                               {"from": "gpt", "value": "I'm sorry, but I can't help with that."}]}))
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    import boto3

    planted = plant()
    base = tmp_path_factory.mktemp("secrets")
    # moto records every request it serves (headers included): the proof of which key id signed them.
    recording = base / "moto-requests.jsonl"
    port = free_port()
    moto = subprocess.Popen(
        [shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server", "-H", "127.0.0.1",
         "-p", str(port)], cwd=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "MOTO_ENABLE_RECORDING": "1", "MOTO_RECORDER_FILEPATH": str(recording)})
    llm = KeyedLLMServer(planted[KEY_ENV])
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        bucket = f"iip-secrets-{secrets.token_hex(4)}"
        scratch = base / "scratch"
        for d in ("tmp", "home"):
            (scratch / d).mkdir(parents=True)
        env = {
            **airflow_env(base / "airflow", Path("/nonexistent")),
            **planted,
            "IIP_DATA_ROOT": f"s3://{bucket}/root",
            "S3_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "HF_HUB_OFFLINE": "1",  # the token must not go anywhere, not even to the Hub
            # Whatever any process writes to its temp dir or home lands where the scan looks.
            "TMPDIR": str(scratch / "tmp"),
            "HOME": str(scratch / "home"),
        }
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=planted["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=planted["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="raw/tiny/a.jsonl", Body=corpus())
        r = Run(planted, env, base / "airflow", scratch, bucket, s3, recording, llm)
        r.airflow("db migrate", "db", "migrate")
        r.dags_test("ingest_source", {"source_uri": f"s3://{bucket}/raw/tiny/", "source_name": "tiny",
                                      "target_shard_mb": 1})
        r.dags_test("foundational_selection", {"sources": ["tiny"], "run_name": "t1",
                                               "budgets": {"math": 5, "code": 0.5, "general": 1.0},
                                               "target_shard_mb": 1})
        openai = {"backend": "openai", "model": "served-model", "base_url": llm.base_url, "api_key_env": KEY_ENV,
                  "max_retries": 0}
        if FULL:
            # Every role of the synthesis DAG on the keyed server: label, scoring, evolution, responses,
            # diagnosis, round 2, validate, export, publish, report (~50 more tasks, ~100 s).
            r.dags_test("conversational_synthesis", {
                "foundational": "t1", "run_name": "syn", "pool_budgets": {"math": 2, "code": 2, "general": 2},
                "models": dict.fromkeys(MODEL_ROLES, openai), "candidates": {"served": openai},
                "max_new_tokens": 16, "weak_threshold": 10, "min_turns": 2, "max_turns": 2})
        else:
            # The synthesis DAG's two kinds of LLM call, as its tasks run them (the same CLI): generation with
            # structured output (label) and loss scoring (seed_score), over the foundational selection.
            syn = f"s3://{bucket}/root/runs/syn"
            r.cli("label", "run", "label", "--config", json.dumps({"llm": openai, "max_tokens": 16}),
                  "--input", f"s3://{bucket}/root/runs/t1/select", "--output", f"{syn}/label")
            r.cli("seed_score", "run", "seed_score", "--config", json.dumps({"llm": openai}),
                  "--input", f"{syn}/label", "--output", f"{syn}/seed_score")
        yield r
    finally:
        llm.close()
        moto.terminate()
        moto.wait(timeout=10)


def recorded_requests(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.integration
def test_the_planted_credentials_did_the_work(run: Run) -> None:
    """Positive control: the run used the planted values, so a leak of them was possible to see."""
    reqs = recorded_requests(run.recording)
    auth = [r["headers"].get("Authorization", "") for r in reqs]
    akid = run.planted["AWS_ACCESS_KEY_ID"]
    signed = [a for a in auth if f"Credential={akid}/" in a]
    assert len(signed) == len(reqs) > 100, f"{len(signed)} of {len(reqs)} S3 requests signed with the planted key"
    agents = {r["headers"].get("User-Agent", "").split("/")[0] for r in reqs}
    assert "Boto3" in agents or any(a.startswith("Boto3") for a in agents), agents  # the CLI's storage layer
    assert any("aws-sdk-cpp" in r["headers"].get("User-Agent", "") for r in reqs), agents  # pyarrow's S3FS
    # SigV4 never sends the secret key itself: its absence from the wire is the protocol, not luck.
    assert not any(run.planted["AWS_SECRET_ACCESS_KEY"] in json.dumps(r["headers"]) for r in reqs)
    def stats(step: str) -> dict[str, Any]:
        key = f"root/runs/syn/{step}/stats.json"
        return dict(json.loads(run.s3.get_object(Bucket=run.bucket, Key=key)["Body"].read()))

    label, scored = stats("label"), stats("seed_score")
    n = label["records_in"]
    assert n >= 6 and label["counters"]["llm.backend_requests"] >= n, label
    assert label["records_kept"] == n, label  # the placeholder labels were valid: the whole write path ran
    assert scored["records_kept"] == n and scored["counters"].get("llm.scored_tokens", 0) > 0, scored
    # Every LLM request bore the planted key (a missing or wrong one is refused, and would have failed rows).
    assert run.llm.authorized >= 2 * n and run.llm.refused == 0


def plant_canaries(run: Run) -> set[tuple[str, str, str]]:
    """One planted value per scanned place and encoding, written after the run: (where-prefix, secret, encoding)
    that the scan must report. Proves the scan reaches each place and decodes each container."""
    p = run.planted
    log = run.home / "logs" / "zz-canary.log"
    log.parent.mkdir(exist_ok=True)
    basic = base64.b64encode(f"user:{p['AWS_SECRET_ACCESS_KEY']}".encode()).decode()
    log.write_text(f"Authorization: Basic {basic}\n")
    db = run.home / "zz-canary.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE xcom (value BLOB)")
        con.execute("INSERT INTO xcom VALUES (?)", (zlib.compress(json.dumps({"k": p[KEY_ENV]}).encode()),))
    (run.scratch / "tmp" / "zz-canary.url").write_text(f"GET /x?key={quote(p['AWS_SECRET_ACCESS_KEY'], safe='')}")
    buf = io.BytesIO()
    # Compressed and without min/max statistics (which the footer would hold raw): found only by decoding.
    pq.write_table(pa.table({"text": [f"token {p['HF_TOKEN']} " * 3]}), buf, compression="zstd",
                   write_statistics=False)
    run.s3.put_object(Bucket=run.bucket, Key="zz-canary/part.parquet", Body=buf.getvalue())
    return {
        (str(log), "AWS_SECRET_ACCESS_KEY", "base64"),
        (f"{db} (sqlite)", KEY_ENV, "raw"),
        (str(run.scratch / "tmp" / "zz-canary.url"), "AWS_SECRET_ACCESS_KEY", "url"),
        (f"s3://{run.bucket}/zz-canary/part.parquet (parquet)", "HF_TOKEN", "raw"),
        ("process zz-canary", "HUGGING_FACE_HUB_TOKEN", "prefix"),
    }


@pytest.mark.integration
def test_no_credential_in_anything_the_run_wrote(run: Run) -> None:
    """Every file of the Airflow home (logs, the metadata DB: XComs, rendered template fields, run conf), every
    object in the bucket, the processes' temp dir and home, and every process's output: zero hits."""
    canaries = plant_canaries(run)
    outputs = {**run.outputs, "zz-canary": f"truncated: {run.planted['HUGGING_FACE_HUB_TOKEN'][:20]}..."}
    sc = Scanner(run.planted)
    home_files = sc.scan_tree(run.home)
    scratch_files = sc.scan_tree(run.scratch)
    keys = sc.scan_bucket(run.s3, run.bucket)
    for name, text in outputs.items():
        sc.scan_text(text, f"process {name}")
    # A canary may also match in further forms (a parquet footer's statistics hold the raw value): any hit at a
    # canary's place for its value is the canary; each must be found at least in the form it was written in.
    leaks = [h for h in sc.hits
             if not any(h.where.startswith(w.split(" (")[0]) and h.secret == n for w, n, _ in canaries)]
    assert not leaks, "planted credentials found:\n" + "\n".join(map(str, leaks))
    missed = {c for c in canaries if not any(h.where.startswith(c[0]) and (h.secret, h.encoding) == c[1:]
                                             for h in sc.hits)}
    assert not missed, f"the scan missed canaries: {missed}"

    # What the scan covered (a scan of nothing would pass too). `airflow dags test` writes every task's log
    # to its own output, not to files: each step task's log is there, with the step process's lines.
    tasks_logged = sum(text.count("running: python -m operators") for text in run.outputs.values())
    assert tasks_logged > 30, tasks_logged  # fused shard tasks: a record-local step's work has no task of its own
    assert sc.sqlite_rows.get("xcom", 0) > 20 and sc.sqlite_rows.get("rendered_task_instance_fields", 0) > 30, \
        sc.sqlite_rows
    assert sc.sqlite_rows.get("dag_run", 0) >= 2 and sc.sqlite_rows.get("task_instance", 0) > 40
    names = {k.rsplit("/", 1)[-1] for k in keys}
    assert {"stats.json", "_MANIFEST.json", "_plan.json", "report.html", "report.md", "report.json"} <= names, names
    assert any("/_llm_cache/" in k for k in keys) and any(k.startswith("root/datasets/") for k in keys)
    assert sc.decoded.get("parquet", 0) > 20 and sc.decoded.get("sqlite", 0) >= 2, sc.decoded
    print(f"\nscanned: {home_files} files in the Airflow home, {scratch_files} in temp/home, {len(keys)} objects, "
          f"{len(outputs)} process outputs; {sc.bytes} bytes; decoded {sc.decoded}; sqlite rows {sc.sqlite_rows}; "
          f"run times {run.seconds}")


# ------------------------------------------------------------------------------ pods, Jobs, charts


class _TI:
    """What the operator reads of a (mapped) task instance."""

    map_index = 3
    try_number = 1


TRAIN_CONFIG = {"foundational": "s3://b/runs/r/train_prep_foundational",
                "conversational": "s3://b/runs/r/train_prep_conversational",
                "stage1": {"world_size": 16}, "stage2": {"world_size": 16}}
NIGHTLY_INGEST = {"config": {"source_name": "tiny"}, "inputs": ["s3://b/raw/tiny/a.jsonl"],
                  "output_uri": "s3://b/root/sources/tiny/nights/2026-11-28/ingest"}


def _step_operators(task: Any) -> Any:
    """The StepOperator a DAG task runs (a mapped one unmapped for one shard or source), else None."""
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    from operators.orchestration.step_operator import StepOperator

    if isinstance(task, StepOperator):
        return task
    if isinstance(task, MappedOperator) and issubclass(task.operator_class, StepOperator):
        value = getattr(task.expand_input, "value", None)
        resolve = dict.fromkeys(value, 3) if isinstance(value, dict) else NIGHTLY_INGEST
        return task.unmap(resolve)
    return None


def render_dag_pods(out: str) -> None:
    """Write to `out` (JSON lines) every pod spec and training Job that any StepOperator task of any DAG renders:
    under every profile its Param allows (templated ones), else under its own and under `vllm-hf`; multi-node
    training goes through job_launcher.launch up to the API call."""
    from airflow.dag_processing.dagbag import DagBag
    from kubernetes.client import ApiClient

    from operators.orchestration import job_launcher
    from operators.orchestration.pod_spec import load_profiles

    class Created(Exception):
        """Stops launch() where it would call the cluster's API."""

    def create(_self: Any, objects: list[dict[str, Any]]) -> str:
        raise Created(json.dumps(objects))

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    api = ApiClient()
    profiles = load_profiles()
    context = {"run_id": RUN_ID, "ti": _TI(), "logical_date": datetime(2026, 11, 28, tzinfo=UTC)}
    with open(out, "w") as f:
        for dag_id, dag in sorted(bag.dags.items()):
            for task in dag.tasks:
                op = _step_operators(task)
                if op is None:
                    continue
                # A templated profile (a Param) may be any profile; a fixed one renders as itself and under
                # the profile wired with every secret ref.
                names = list(profiles) if "{{" in str(op.profile) else [str(op.profile), "vllm-hf"]
                for name in names:
                    profile = profiles[name]
                    op.profile = name
                    rec: dict[str, Any] = {"dag": dag_id, "task": task.task_id, "profile": name}
                    if op.action == "train" and profile.nodes > 1:
                        op.config = TRAIN_CONFIG
                        # No cluster: the API client and create() are replaced; everything before them is real.
                        with mock.patch.object(job_launcher, "kube_client"), \
                                mock.patch.object(job_launcher.JobLauncher, "create", create), \
                                mock.patch.object(job_launcher.JobLauncher, "delete"):
                            try:
                                job_launcher.launch(op, context)
                            except Created as e:
                                rec["job"] = json.loads(str(e))
                    else:
                        kpo = op.build_pod_operator(context)
                        rec["pod"] = api.sanitize_for_serialization(kpo.build_pod_request_obj(dry_run=True))
                    f.write(json.dumps(rec) + "\n")


def test_no_credential_in_any_rendered_pod_spec_or_training_job(tmp_path: Path) -> None:
    """A worker holding the planted values renders every step pod of every DAG (GPU, vLLM and multi-node
    training profiles included, with secret refs for S3, HF and the LLM key): none carries a value."""
    planted = plant()
    refs = [{"env": "AWS_ACCESS_KEY_ID", "secret": "iip-s3", "key": "access_key"},
            {"env": "AWS_SECRET_ACCESS_KEY", "secret": "iip-s3", "key": "secret_key"},
            {"env": "HF_TOKEN", "secret": "hf-token", "key": "token"},
            {"env": KEY_ENV, "secret": "vllm-api-key", "key": "api-key"}]
    gpu = {"node_selector": {"nvidia.com/gpu.present": "true"},
           "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}
    profiles = {"vllm-hf": {"image": "iip-vllm:0.1.0", "gpus": 1, "secret_env": refs, "deferrable": True, **gpu},
                "train-multi": {"image": "iip-train:0.1.0", "gpus": 8, "nodes": 2, "secret_env": refs, **gpu}}
    env = {**airflow_env(tmp_path / "airflow", tmp_path / "data"), **planted,
           "IIP_DATA_ROOT": "s3://bucket/root", "IIP_EXECUTION_MODE": "kubernetes",
           "IIP_POD_PROFILES": json.dumps(profiles), "HOME": str(tmp_path)}
    out = tmp_path / "pods.jsonl"
    code = f"from tests.reliability.test_secrets_e2e import render_dag_pods; render_dag_pods({str(out)!r})"
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-5000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    sc = Scanner(planted)
    for rec in records:
        sc.scan_text(json.dumps(rec), f"{rec['dag']}/{rec['task']} [{rec['profile']}]")
    sc.scan_text(r.stdout + r.stderr, "the rendering process")
    assert not sc.hits, "planted credentials in rendered specs:\n" + "\n".join(map(str, sc.hits))

    pods = [rec["pod"] for rec in records if "pod" in rec]
    jobs = [rec["job"] for rec in records if "job" in rec]
    dags = {rec["dag"] for rec in records}
    assert dags >= {"conversational_synthesis", "foundational_selection", "ingest_source", "nightly_refresh",
                    "two_stage_finetune"}, dags
    assert {rec["profile"] for rec in records} >= {"cpu", "vllm", "train", "vllm-hf", "train-multi"}
    assert len(jobs) >= 3  # stage1, stage2 and one_stage of two_stage_finetune as multi-node Jobs
    # The secrets are wired, as references: every planted variable's entry names a Secret, never a value.
    wired = 0
    for spec in [p["spec"] for p in pods] + [o["spec"]["template"]["spec"] for j in jobs for o in j
                                               if o["kind"] == "Job"]:
        for c in spec["containers"] + spec.get("initContainers", []):
            for e in c.get("env") or []:
                if e["name"] in planted:
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], e
                    wired += 1
    assert wired > len(pods)
    print(f"\nrendered {len(pods)} pod specs and {len(jobs)} training Jobs ({sum(len(j) for j in jobs)} objects) "
          f"from {len(records)} task x profile pairs of {len(dags)} DAGs; {sc.bytes} bytes scanned")


def test_no_credential_in_helm_manifests() -> None:
    """helm template of helm/iip in every scenario of tests/test_helm_docker.py (secret references for S3,
    Hugging Face and the vLLM API key), run by a process holding the planted values: zero hits."""
    from tests.test_helm_docker import SCENARIOS, find_helm, helm_template

    helm = find_helm()
    if helm is None:
        from tests.conftest import require_or_skip

        require_or_skip("helm", "no helm binary: run `bash scripts/get-helm.sh`")
    assert helm is not None
    planted = plant()
    sc = Scanner(planted)
    secret_refs = 0
    with mock.patch.dict(os.environ, planted):
        for name, sets in SCENARIOS.items():
            proc = helm_template(helm, sets)
            assert proc.returncode == 0, proc.stderr
            sc.scan_text(proc.stdout + proc.stderr, f"helm template [{name}]")
            secret_refs += proc.stdout.count("secretKeyRef")
    assert not sc.hits, sc.hits
    assert secret_refs > 0
