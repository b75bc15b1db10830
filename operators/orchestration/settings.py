"""Platform settings read from the environment by DAG files (no logic beyond defaults)."""

from __future__ import annotations

import os
import re

from operators.core import storage


def data_root() -> str:
    """Where runs and sources live: `IIP_DATA_ROOT` (file:// or s3://), default ./.data beside the project."""
    return storage.validate_uri(os.environ.get("IIP_DATA_ROOT") or os.path.abspath(".data"))


def safe_name(value: str) -> str:
    """A run or source name usable as one path segment (Airflow run ids contain ':' and '+')."""
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", str(value)).strip("._") or "run"


def source_dirs(sources: list[str] | str) -> list[str]:
    """Ingested source step dirs: a bare name means <data root>/sources/<name>/ingest; URIs pass through."""
    items = [sources] if isinstance(sources, str) else list(sources)
    out = []
    for s in items:
        s = str(s).strip()
        if not s:
            continue
        out.append(storage.validate_uri(s) if ("/" in s or "://" in s)
                   else storage.join(data_root(), "sources", safe_name(s), "ingest"))
    if not out:
        raise ValueError("no sources given")
    return out


def run_dir(run: str, step: str) -> str:
    """The output of `step` in run `run` (a bare run name under <data root>/runs), or `run` itself as a URI."""
    run = str(run).strip()
    if "/" in run or "://" in run:
        return storage.validate_uri(run)
    return storage.join(data_root(), "runs", safe_name(run), step)


# Retries: a step's commit protocol makes a retried task safe (it adopts or redoes what the killed attempt left),
# so a task that failed for a reason that may pass (a lost node, an S3 outage longer than the storage layer's own
# retries, a timeout) is retried; a bad config or input is not (see StepOperator).
DEFAULT_TASK_RETRIES = 2
DEFAULT_RETRY_DELAY_S = 30.0
MAX_RETRY_DELAY_S = 600.0

# A step task's time limit, when the DAG's `task_timeout_minutes` Param is 0: a fixed allowance for start-up and
# commit, plus a rate per MiB of the shard it works on. The record-local rate is about 100x the slowest Phase 1
# step measured (near_dedup, ~0.07 s per MiB of records), the LLM rate about 10x a CPU model's labeling rate:
# generous enough never to stop honest work, small enough that a hung task is retried within the hour.
BASE_TIMEOUT_S = 600.0
SECONDS_PER_MIB = {"cpu": 6.0, "llm": 300.0}
# Actions whose time does not follow one shard's size (whole-step reduces, publishing, training): one hour, or
# none for training, whose length the run's config decides (a Param sets one when wanted).
UNSHARDED_TIMEOUT_S = 3600.0
UNTIMED_ACTIONS = ("train", "evaluate")


def task_retry_policy() -> dict[str, float | int]:
    """Airflow retry arguments of a step task: `IIP_TASK_RETRIES` retries (default 2), the first after
    `IIP_TASK_RETRY_DELAY_S` seconds (default 30), each next one twice as late, at most 10 minutes."""
    retries = int(os.environ.get("IIP_TASK_RETRIES", DEFAULT_TASK_RETRIES))
    delay = float(os.environ.get("IIP_TASK_RETRY_DELAY_S", DEFAULT_RETRY_DELAY_S))
    if retries < 0 or delay < 0:
        raise ValueError(f"IIP_TASK_RETRIES ({retries}) and IIP_TASK_RETRY_DELAY_S ({delay}) must be >= 0")
    return {"retries": retries, "retry_delay": delay, "retry_exponential_backoff": 2.0,
            "max_retry_delay": max(MAX_RETRY_DELAY_S, delay)}


def step_timeout_s(action: str, *, shard_bytes: int | None, llm: bool, minutes: float = 0) -> float | None:
    """The time limit of one step task in seconds, or None for no limit.

    `minutes` > 0 (the DAG's `task_timeout_minutes` Param) wins. Otherwise a task on one shard gets
    BASE_TIMEOUT_S plus SECONDS_PER_MIB of its shard, an unsharded task UNSHARDED_TIMEOUT_S, and training none."""
    if minutes < 0:
        raise ValueError(f"task_timeout_minutes must be >= 0, got {minutes}")
    if minutes > 0:
        return minutes * 60.0
    if action in UNTIMED_ACTIONS:
        return None
    if shard_bytes is None:
        return UNSHARDED_TIMEOUT_S
    return BASE_TIMEOUT_S + SECONDS_PER_MIB["llm" if llm else "cpu"] * shard_bytes / 2**20
