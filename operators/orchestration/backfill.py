"""What `backfill_source` does besides running steps: register the new corpus, gather every source of the
target dataset, and report what the new corpus contributed.

The registry (operators.datasets.sources) names the sources of each dataset; the selection then runs over the
committed ingests of all of them (the backfill's and the nightly ones, `refresh.committed_ingests`), so a new
corpus is deduplicated and decontaminated together with what the dataset already holds.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.core import storage
from operators.core.manifest import read_manifest, step_manifest_uri
from operators.core.registry import FOUNDATIONAL_STEPS
from operators.datasets.sources import SourceEntry, load, register
from operators.orchestration.refresh import committed_ingests
from operators.orchestration.settings import data_root

CONTRIBUTION = "contribution.json"
DEDUP_STEPS = ("exact_dedup", "near_dedup")


def register_source(params: dict[str, Any], root: str | None = None) -> dict[str, Any]:
    """Record the form's source in the registry; returns the entry and the registry's new version."""
    entry = SourceEntry(name=params["source_name"], uri=params["source_uri"], format=params.get("format", "auto"),
                        dataset=params["dataset"], cap=params.get("cap"))
    registry = register(root or data_root(), entry)
    return {"source": entry.model_dump(), "registry_version": registry.version,
            "dataset_sources": [s.name for s in registry.of_dataset(entry.dataset)]}


def dataset_inputs(dataset: str, root: str | None = None) -> list[str]:
    """Every committed ingest of every source registered to `dataset`: what its selection reads."""
    registry, _ = load(root or data_root())
    dirs = [d for s in registry.of_dataset(dataset) for d in committed_ingests(s.name, root)]
    if not dirs:
        raise ValueError(f"no committed ingest for any source of dataset {dataset!r}")
    return dirs


def source_caps(dataset: str, root: str | None = None) -> dict[str, int]:
    """{source: cap} for the sources of `dataset` registered with a cap (select's `source_caps`)."""
    registry, _ = load(root or data_root())
    return {s.name: s.cap for s in registry.of_dataset(dataset) if s.cap is not None}


def _parts(step_dir: str, kind: str) -> list[str]:
    m = read_manifest(step_manifest_uri(step_dir))
    return [storage.join(step_dir, f.path) for f in (m.files if m else []) if f.kind == kind]


def _read(uri: str, columns: list[str]) -> Any:
    with storage.open_input(uri) as fh:
        return pq.read_table(fh, columns=columns)


def contribution(run: str, source: str) -> dict[str, Any]:
    """What `source` contributed to the run under `run`: records in and kept per step, drops by reason, the
    duplicates of records of other sources (by that source), and what the selection kept by source. Reads
    only the `source`, `reason`, `detail` and `id` columns, part by part."""
    steps: dict[str, Any] = {}
    dup_of: Counter[str] = Counter()
    for step in FOUNDATIONAL_STEPS:
        step_dir = storage.join(run, step)
        m = read_manifest(step_manifest_uri(step_dir))
        if m is None:
            continue
        kept = sum(int(pc.sum(pc.equal(_read(u, ["source"])["source"], source)).as_py() or 0)
                   for u in _parts(step_dir, "data"))
        reasons: Counter[str] = Counter()
        survivors: list[str] = []
        for u in _parts(step_dir, "dropped"):
            t = _read(u, ["source", "reason", "detail"])
            mine = t.filter(pc.equal(t["source"], source))
            reasons.update(mine["reason"].to_pylist())
            if step in DEDUP_STEPS:
                survivors += [d.removeprefix("duplicate of ") for d in mine["detail"].to_pylist()]
        if survivors:  # whose copies they were: the survivors' sources, read from the step's kept data
            want = set(survivors)
            owner: dict[str, str] = {}
            for u in _parts(step_dir, "data"):
                t = _read(u, ["id", "source"])
                hit = t.filter(pc.is_in(t["id"], value_set=pa.array(sorted(want), pa.string())))
                owner.update(zip(hit["id"].to_pylist(), hit["source"].to_pylist(), strict=True))
            dup_of.update(owner.get(s, "unknown") for s in survivors)
        steps[step] = {"records_in": kept + sum(reasons.values()), "kept": kept,
                       "dropped_by_reason": dict(sorted(reasons.items()))}
    selected: Counter[str] = Counter()
    for u in _parts(storage.join(run, "select"), "data"):
        selected.update(_read(u, ["source"])["source"].to_pylist())
    out = {"source": source, "run": run, "steps": steps,
           "duplicates_of": dict(sorted(dup_of.items())),
           "duplicates_of_other_sources": sum(n for s, n in dup_of.items() if s != source),
           "contaminated": sum(steps.get("decontaminate", {}).get("dropped_by_reason", {}).values()),
           "selected_by_source": dict(sorted(selected.items()))}
    storage.write_bytes(storage.join(run, CONTRIBUTION), json.dumps(out, indent=2).encode())
    return out
