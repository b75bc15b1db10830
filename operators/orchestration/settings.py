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
