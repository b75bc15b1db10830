"""Every step task has a time limit and retries: a stuck step is stopped (its whole process group) and retried,
a step that failed for a reason that may pass is retried, and a bad config or input fails at once."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowTaskTimeout

from operators.orchestration import settings
from operators.orchestration.step_operator import StepOperator
from tests.conftest import three_domain_conversations


def test_limits_follow_the_shard_size_the_param_and_the_action() -> None:
    mib = 2**20
    assert settings.step_timeout_s("run", shard_bytes=256 * mib, llm=False) == 600 + 6 * 256
    assert settings.step_timeout_s("run", shard_bytes=4 * mib, llm=True) == 600 + 300 * 4
    assert settings.step_timeout_s("reduce", shard_bytes=None, llm=False) == 3600
    assert settings.step_timeout_s("train", shard_bytes=None, llm=False) is None
    assert settings.step_timeout_s("train", shard_bytes=None, llm=False, minutes=90) == 5400  # the Param wins
    with pytest.raises(ValueError, match="task_timeout_minutes"):
        settings.step_timeout_s("run", shard_bytes=1, llm=False, minutes=-1)


def test_an_operator_derives_its_limit_from_its_step_and_shard() -> None:
    def op(**kw: object) -> StepOperator:
        return StepOperator(task_id="t", output_uri="/tmp/x", **kw)  # type: ignore[arg-type]

    assert op(step="filter", action="run", shard=0, config={"target_shard_bytes": 10 * 2**20}).timeout_s() == 660
    assert op(step="filter", action="run", shard=0).timeout_s() == 600 + 6 * 1024  # the step's 1 GiB default
    assert op(step="label", action="run", shard=0, config={"target_shard_bytes": 2**20}).timeout_s() == 900
    assert op(step="filter", action="plan").timeout_s() == 3600
    assert op(step="filter", action="run", shard=0, timeout_minutes="2").timeout_s() == 120  # rendered Param
    with pytest.raises(ValueError, match="must be a number"):
        op(step="filter", action="run", shard=0, timeout_minutes="soon").timeout_s()


def test_retry_policy_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IIP_TASK_RETRIES", raising=False)
    monkeypatch.delenv("IIP_TASK_RETRY_DELAY_S", raising=False)
    op = StepOperator(task_id="t", step="filter", output_uri="/tmp/x")
    assert op.retries == 2 and op.retry_delay.total_seconds() == 30 and op.retry_exponential_backoff == 2.0
    monkeypatch.setenv("IIP_TASK_RETRIES", "5")
    assert StepOperator(task_id="t", step="filter", output_uri="/tmp/x").retries == 5
    assert StepOperator(task_id="t", step="filter", output_uri="/tmp/x", retries=0).retries == 0  # explicit wins
    monkeypatch.setenv("IIP_TASK_RETRIES", "-1")
    with pytest.raises(ValueError, match="IIP_TASK_RETRIES"):
        settings.task_retry_policy()


def _planned_ingest(tmp_path: Path) -> StepOperator:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text("\n".join(three_domain_conversations(20)) + "\n")
    out = str(tmp_path / "ingest")
    cfg = {"source_name": "t"}
    plan = StepOperator(task_id="plan", step="ingest", action="plan", inputs=[str(raw)], output_uri=out,
                        config=cfg, mode="local")
    assert plan.execute({}) == [0]
    return StepOperator(task_id="run", step="ingest", action="run", inputs=[str(raw)], output_uri=out, shard=0,
                        config=cfg, mode="local", timeout_minutes=0.05)  # 3 s


def _step_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line names `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd and "operators" in cmd:
            found.append(int(pid))
    return found


def test_a_stuck_step_is_stopped_at_its_limit_and_its_retry_commits(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run = _planned_ingest(tmp_path)
    monkeypatch.setenv("IIP_FAULT", "part.written:1:hang")  # stuck after writing a part, before its commit
    t0 = time.monotonic()
    with pytest.raises(AirflowTaskTimeout, match="ran past its limit of 3 s"):
        run.execute({})
    assert time.monotonic() - t0 < 60
    assert _step_processes(str(tmp_path / "ingest")) == []  # the step process is gone, not left hanging
    shard_manifests = list((tmp_path / "ingest" / "_shards").glob("*.json"))
    assert shard_manifests == []  # nothing committed

    monkeypatch.delenv("IIP_FAULT")  # the retry
    result = run.execute({})
    assert result["records_in"] == 20 == result["records_kept"] + sum(result["dropped_by_reason"].values())
    assert len(list((tmp_path / "ingest" / "_shards").glob("*.json"))) == 1


def test_a_failing_step_is_retryable_and_a_bad_config_or_input_is_not(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run = _planned_ingest(tmp_path)
    monkeypatch.setenv("IIP_FAULT", "part.written:1")  # the process dies (status 137): Airflow retries that
    with pytest.raises(Exception) as died:
        run.execute({})
    assert not isinstance(died.value, AirflowFailException) and "code 137" in str(died.value)
    monkeypatch.delenv("IIP_FAULT")

    bad = StepOperator(task_id="plan", step="filter", action="plan", inputs=[str(tmp_path / "raw")],
                       output_uri=str(tmp_path / "f2"), config={"min_turns": "many"}, mode="local")
    with pytest.raises(AirflowFailException, match="min_turns"):
        bad.execute({})
    missing = StepOperator(task_id="plan", step="filter", action="plan", inputs=[str(tmp_path / "nothing")],
                           output_uri=str(tmp_path / "f3"), mode="local")
    with pytest.raises(AirflowFailException, match="invalid config or input"):
        missing.execute({})


def test_every_task_of_the_dags_has_the_retry_policy_and_the_timeout_param() -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[1] / "dags"))
    assert not bag.import_errors, bag.import_errors
    checked = 0
    for dag in bag.dags.values():
        assert "task_timeout_minutes" in dag.params, dag.dag_id
        for task in dag.tasks:
            if task.task_type not in ("StepOperator",):
                continue
            assert task.retries == settings.task_retry_policy()["retries"], (dag.dag_id, task.task_id)
            checked += 1
    assert checked > 100, checked
    print(json.dumps({"step_tasks_checked": checked}))


def test_an_unreachable_store_is_an_outage_not_a_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    # A closed port on loopback: every attempt is refused, for real. The commit gives up as unavailable (the
    # CLI exits 1, and the task's retry may get through), not as an invalid input (exit 2, never retried).
    from operators.core import storage
    from tests.conftest import free_port

    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unreachable")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unreachable")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("IIP_S3_MAX_ATTEMPTS", "2")
    with pytest.raises(storage.StorageUnavailable, match="after 2 attempts"):
        storage.commit_if_absent("s3://nowhere/step/_MANIFEST.json", b"{}")
