"""The registry of dataset versions under `<data root>/datasets/<name>/`.

    LATEST             {"version": N, "path": "v000N", ...}, moved only by compare-and-swap
    _claims/v000N      one file per version number ever claimed (commit_if_absent): numbers are never reused
    pinned/v000N       a pin: retention never deletes this version
    v000N/hf/          the Hugging Face folder (export's layout: data/{train,replay}-*.parquet) + the card README.md
    v000N/ids/         id index (id, source, domain, hash) bucketed by hash, for streamed diffs
    v000N/dedup_index/ per dedup step of the run, the id hashes it kept (the no-churn rule of later runs)
    v000N/stats/       every step's stats.json;  v000N/report.{json,html} when the run had one
    v000N/_VERSION.json  the version's manifest, committed last: a version without it does not exist

Publishing is two commits: the version folder is written and its manifest committed (`build_version`), then
`LATEST` moves from the value read at the start to the new version (`move_latest`). A publisher whose pointer
moved under it loses (PublishConflict) and leaves a complete, unpointed version that retention removes later.

A version records the checksum of the committed step manifest it was made from. Publishing a step whose
manifest LATEST already holds makes no version (a night with nothing new, or a second run that adopted the
first's commits), and a publisher that loses the pointer race to the very same output adopts that version
and removes its own draft: two runs of one pipeline racing publish one version, not two.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from operators.core import storage
from operators.core.arrays import unique_sorted
from operators.core.manifest import read_manifest, step_manifest_uri
from operators.datasets.ids import id_hash as id_hash  # re-exported: the dedup steps' no-churn rule uses it
from operators.tail import EXPORT_COMMIT, SUMMARIES, committed_export, export_step
from operators.validate import step_commit

VERSION_MANIFEST = "_VERSION.json"
LATEST = "LATEST"
COPY_THREADS = 16  # copies are requests that wait on the store, not on this core


class PublishError(RuntimeError):
    """The version could not be published (bad input, unknown dataset or version)."""


class PublishConflict(PublishError):
    """Another publisher moved LATEST first; this version is complete but not the latest."""


class PublishConfig(BaseModel):
    """What `python -m operators datasets publish` takes (also the publish task's config)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$", description="Dataset name.")
    keep: int | None = Field(None, ge=1, description="Keep the last K versions (plus LATEST and pins); None: all.")
    licenses: dict[str, str] = Field(default_factory=dict, description="License per source name (for the card).")


def dataset_root(root: str, name: str) -> str:
    """`<data root>/datasets/<name>`."""
    PublishConfig(name=name)  # validates the name as one safe path segment
    return storage.join(storage.validate_uri(root), "datasets", name)


def vname(version: int) -> str:
    return f"v{version:04d}"


def parse_version(text: str) -> int:
    """`v0003`, `v3` or `3` -> 3."""
    try:
        return int(str(text).lower().lstrip("v"))
    except ValueError:
        raise PublishError(f"not a version: {text!r} (use v0003 or 3)") from None


def read_latest(root: str, name: str) -> tuple[int | None, str | None]:
    """(LATEST's version, its compare-and-swap token); (None, None) before the first publish."""
    data, token = storage.read_versioned(storage.join(dataset_root(root, name), LATEST))
    return (int(json.loads(data)["version"]) if data is not None else None), token


def published_id_hashes(dataset_uri: str, step: str | None = None) -> tuple[int | None, Any]:
    """(LATEST's version, the sorted distinct `id_hash` of its records as a numpy uint64 array) of the dataset
    folder `dataset_uri` (`<data root>/datasets/<name>`); (None, empty array) before its first publish. With
    `step` (a dedup step), also the records that step kept in the version's run (`_write_survivors`).

    Hashes, not ids: 8 bytes per published record is what a dedup resolve can hold to protect them."""
    import numpy as np

    root, sep, name = storage.validate_uri(dataset_uri).rstrip("/").rpartition("/datasets/")
    if not sep or "/" in name:
        raise PublishError(f"not a dataset folder (<data root>/datasets/<name>): {dataset_uri!r}")
    version, _ = read_latest(root, name)
    if version is None:
        return None, np.zeros(0, dtype=np.uint64)
    parts = []
    vdir = storage.join(dataset_root(root, name), vname(version))
    uris = [u for u in storage.list_files(storage.join(vdir, "ids")) if u.endswith(".parquet")]
    if step:  # one file per part (the tail's layout), or one file (versions published before it)
        uris += [u for u in storage.list_files(storage.join(vdir, "dedup_index"))
                 if u.endswith(f"/dedup_index/{step}.parquet") or f"/dedup_index/{step}/" in u]
    for uri in uris:
        with storage.open_input(uri) as fh:
            parts.append(pq.read_table(fh, columns=["h"])["h"].to_numpy())
    return version, unique_sorted(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def _numbered(folder: str) -> list[int]:
    """Version numbers named by the files `v<N>` in `folder` (a writer's temp file beside them is not one)."""
    names = (u.rsplit("/", 1)[1] for u in storage.list_files(folder, recursive=False))
    return sorted(int(n[1:]) for n in names if re.fullmatch(r"v\d+", n))


def _claimed(base: str) -> list[int]:
    return _numbered(storage.join(base, "_claims"))


def versions(root: str, name: str) -> list[int]:
    """Committed versions of `name`, oldest first (a claimed number without a manifest is not a version)."""
    base = dataset_root(root, name)
    return [v for v in _claimed(base) if storage.exists(storage.join(base, vname(v), VERSION_MANIFEST))]


def names(root: str) -> list[str]:
    """Every dataset with at least one claimed version."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(storage.join(storage.validate_uri(root), "datasets"))
    dirs = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            if i.type == pafs.FileType.Directory]  # one level only: never lists the versions' files
    return sorted(d for d in dirs if _claimed(dataset_root(root, d)))


def show(root: str, name: str, version: int | None = None) -> dict[str, Any]:
    """The manifest of `version` (default LATEST), with `latest` and `pinned` flags."""
    latest, _ = read_latest(root, name)
    v = latest if version is None else version
    if v is None:
        raise PublishError(f"dataset {name!r} has no published version")
    uri = storage.join(dataset_root(root, name), vname(v), VERSION_MANIFEST)
    if not storage.exists(uri):
        raise PublishError(f"dataset {name!r} has no version {v}")
    m: dict[str, Any] = json.loads(storage.read_bytes(uri))
    return {**m, "latest": v == latest, "pinned": v in pinned(root, name)}


def pinned(root: str, name: str) -> set[int]:
    """Versions a pin protects from retention."""
    return set(_numbered(storage.join(dataset_root(root, name), "pinned")))


def pin(root: str, name: str, version: int, on: bool = True) -> None:
    """Pin (or unpin) a committed version."""
    if version not in versions(root, name):
        raise PublishError(f"dataset {name!r} has no version {version}")
    uri = storage.join(dataset_root(root, name), "pinned", vname(version))
    if on:
        storage.write_bytes(uri, datetime.now(UTC).isoformat(timespec="seconds").encode())
    else:
        storage.delete(uri)


def retain(root: str, name: str, keep: int) -> list[int]:
    """Delete all but the last `keep` versions, never LATEST's nor a pinned one; returns the deleted versions."""
    if keep < 1:
        raise PublishError("keep must be at least 1")
    latest, _ = read_latest(root, name)
    protected = pinned(root, name) | ({latest} if latest is not None else set())
    all_versions = versions(root, name)
    doomed = [v for v in all_versions[:-keep] if v not in protected]
    for v in doomed:
        discard(root, name, v)
    return doomed


def _lineage(step_dir: str, run_root: str, licenses: dict[str, str]) -> dict[str, Any]:
    """Walk plan inputs (and step dirs a config names) back from `step_dir`: steps inside the run, sources outside."""
    from operators.core.runner import load_plan

    steps: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, Any]] = {}
    todo, seen = [step_dir], set()
    while todo:
        d = storage.validate_uri(todo.pop())
        if d in seen:
            continue
        seen.add(d)
        m = read_manifest(step_manifest_uri(d))
        inside = d == run_root or d.startswith(run_root + "/")
        if not inside or m is None:
            raw = storage.read_bytes(step_manifest_uri(d)) if m is not None else None
            parts = d.rstrip("/").split("/")  # an ingest is named by its source; any other step dir by <run>/<step>
            name = parts[-2] if d.endswith("/ingest") else "/".join(parts[-2:])
            sources[d] = {"uri": d, "name": name, "manifest_sha256": storage.sha256_hex(raw) if raw else None,
                          "records": m.stats.records_kept if m else None, "license": licenses.get(name)}
            continue
        steps[d[len(run_root) + 1:] or d] = {"step": m.step, "config_hash": m.config_hash,
                                             "records_in": m.stats.records_in, "records_kept": m.stats.records_kept}
        plan = load_plan(d)
        refs = [v for v in plan.config.values() if isinstance(v, str)] + \
            [x for v in plan.config.values() if isinstance(v, list) for x in v if isinstance(x, str)]
        todo += list(plan.inputs) + [r for r in refs if r.startswith(run_root + "/")]
    return {"steps": dict(sorted(steps.items())), "sources": sorted(sources.values(), key=lambda s: s["uri"])}


def iter_ids(root: str, name: str, version: int, bucket: int, of: int) -> Iterator[pa.Table]:
    """Id index tables of `version` whose hash is `bucket` mod `of` (`of` a multiple of the version's buckets)."""
    m = show(root, name, version)
    vdir = storage.join(dataset_root(root, name), vname(version))
    for uri in storage.list_files(storage.join(vdir, "ids", f"b{bucket % m['id_buckets']:05d}"), recursive=False):
        with storage.open_input(uri) as fh:
            t = pq.read_table(fh)
        if of != m["id_buckets"]:
            t = t.filter(pa.array(t["h"].to_numpy() % of == bucket))
        yield t


@dataclass
class Draft:
    """A complete version folder whose pointer has not moved yet."""

    root: str
    name: str
    version: int
    expected: str | None  # LATEST's token when the publish began
    manifest: dict[str, Any]


def latest_manifest(root: str, name: str) -> dict[str, Any] | None:
    """The manifest of LATEST's version, or None before the first publish."""
    version, _ = read_latest(root, name)
    if version is None:
        return None
    m: dict[str, Any] = json.loads(storage.read_bytes(storage.join(dataset_root(root, name), vname(version),
                                                                   VERSION_MANIFEST)))
    return m


def _same_output(manifest: dict[str, Any] | None, step_dir: str, checksum: str) -> bool:
    return manifest is not None and manifest.get("step_dir") == step_dir and manifest.get("step_sha256") == checksum


def discard(root: str, name: str, version: int) -> None:
    """Remove a committed version that LATEST does not point at (its number stays claimed, never reused)."""
    vdir = storage.join(dataset_root(root, name), vname(version))
    storage.delete(storage.join(vdir, VERSION_MANIFEST))  # first: the version vanishes at once for readers
    for uri in storage.list_files(vdir):
        storage.delete(uri)


def _version_data(step_dir: str, export_dir: str | None, vdir: str, run_root: str, name: str) -> dict[str, Any]:
    """The version's data, id index and dedup survivors; returns the tail's summary of them.

    From a committed export of this very step commit (the DAG's tail shard tasks wrote one): its files are
    copied, server-side on S3 and as hard links on a local disk, so no byte passes through this task. Else
    (a publish from the CLI with no export) the tail runs here, writing straight into the version folder."""
    export = committed_export(export_dir, step_dir) if export_dir else None
    if export is None or "hf" not in export["formats"] or export.get("run_root") != run_root:
        summary = export_step(step_dir, vdir, ("hf",), name=name, run_root=run_root)
        for uri in [*storage.list_files(storage.join(vdir, SUMMARIES)), storage.join(vdir, EXPORT_COMMIT)]:
            storage.delete(uri)  # the tail's bookkeeping, not part of the version
        return summary
    assert export_dir is not None
    src = storage.validate_uri(export_dir)
    uris = [u for folder in ("hf/data", "ids", "dedup_index") for u in storage.list_files(storage.join(src, folder))]
    with ThreadPoolExecutor(COPY_THREADS) as pool:
        list(pool.map(lambda u: storage.copy_file(u, storage.join(vdir, u[len(src) + 1:])), uris))
    return export


def build_version(root: str, name: str, step_dir: str, run_root: str, run: dict[str, Any] | None = None,
                  licenses: dict[str, str] | None = None, export_dir: str | None = None) -> Draft:
    """Write and commit a new version folder from a committed step (the pointer is not moved here).

    `export_dir`: a committed export of the step (the tail's), whose files the version copies."""
    step_dir, run_root = storage.validate_uri(step_dir), storage.validate_uri(run_root)
    base = dataset_root(root, name)
    if read_manifest(step_manifest_uri(step_dir)) is None:
        raise PublishError(f"no committed step at {step_dir}")
    latest, token = read_latest(root, name)  # the pointer this publish will move from
    version = max([latest or 0, *_claimed(base)]) + 1
    while not storage.commit_if_absent(storage.join(base, "_claims", vname(version)), b""):
        version += 1  # another publisher claimed it: numbers are never shared
    vdir = storage.join(base, vname(version))
    summary = _version_data(step_dir, export_dir, vdir, run_root, name)
    lineage = _lineage(step_dir, run_root, licenses or {})
    for key in lineage["steps"]:
        stats = storage.join(run_root, key, "stats.json")
        if storage.exists(stats):
            storage.write_bytes(storage.join(vdir, "stats", f"{key.replace('/', '__')}.json"),
                                storage.read_bytes(stats))
    contribution = storage.join(run_root, "contribution.json")  # a backfill's, when present
    if storage.exists(contribution):
        storage.write_bytes(storage.join(vdir, "contribution.json"), storage.read_bytes(contribution))
    # The version's own report, rendered now from the committed steps: the run folder's report is written
    # after publish and rewritten by any later run into the same folder, so a copy or a link to it would show
    # another run's figures.
    from operators.report import build_report, write_report_files

    write_report_files(build_report(run_root, run), vdir)
    manifest: dict[str, Any] = {
        "name": name, "version": version, "path": vname(version), "uri": vdir, "hf": storage.join(vdir, "hf"),
        "published_at": datetime.now(UTC).isoformat(timespec="seconds"), "step_dir": step_dir,
        "step_sha256": step_commit(step_dir),
        "run_root": run_root, "run": run or {}, "report": storage.join(vdir, "report.html"),
        "counts": {"splits": summary["counts"], "by_source_domain": summary["by_source_domain"],
                   "split_bytes": summary["split_bytes"]},
        "id_buckets": summary["id_buckets"], "lineage": lineage, "dedup_survivors": summary["dedup_survivors"],
    }
    from operators.datasets.card import render_card

    storage.write_bytes(storage.join(vdir, "hf", "README.md"), render_card(manifest).encode())
    manifest["files"] = [{"path": u[len(vdir) + 1:], "bytes": storage.file_size(u)} for u in storage.list_files(vdir)]
    if not storage.commit_if_absent(storage.join(vdir, VERSION_MANIFEST), json.dumps(manifest, indent=2).encode()):
        raise PublishConflict(f"{name} {vname(version)} was committed by someone else")
    return Draft(root, name, version, token, manifest)


def move_latest(draft: Draft) -> dict[str, Any]:
    """Point LATEST at the draft's version if LATEST has not moved since the draft began; else PublishConflict."""
    ptr = {"version": draft.version, "path": vname(draft.version),
           "published_at": draft.manifest["published_at"]}
    uri = storage.join(dataset_root(draft.root, draft.name), LATEST)
    if not storage.compare_and_swap(uri, draft.expected, json.dumps(ptr).encode()):
        raise PublishConflict(f"LATEST of {draft.name} moved while {vname(draft.version)} was being published; "
                              "that version is complete but not latest (publish again to supersede it)")
    return ptr


def publish(root: str, cfg: PublishConfig, step_dir: str, run_root: str,
            run: dict[str, Any] | None = None, export_dir: str | None = None) -> dict[str, Any]:
    """Publish a committed step as the next version of `cfg.name`, move LATEST, then apply retention.

    When LATEST already is this step output (same step dir, same manifest checksum) nothing is published: the
    result says `skipped` (the publish task skips, so no asset event announces a version that is not new).
    Losing the pointer race to a publisher of the same output adopts its version the same way."""
    step_dir = storage.validate_uri(step_dir)
    if read_manifest(step_manifest_uri(step_dir)) is None:
        raise PublishError(f"no committed step at {step_dir}")
    checksum = step_commit(step_dir)
    current = latest_manifest(root, cfg.name)
    if _same_output(current, step_dir, checksum):
        assert current is not None
        return _unchanged(current, "LATEST already is this output")
    draft = build_version(root, cfg.name, step_dir, run_root, run, cfg.licenses, export_dir)
    try:
        move_latest(draft)
    except PublishConflict:
        winner = latest_manifest(root, cfg.name)
        if not _same_output(winner, step_dir, checksum):
            raise
        assert winner is not None
        discard(draft.root, draft.name, draft.version)
        return _unchanged(winner, f"another publisher of this output won the race ({vname(draft.version)} dropped)")
    deleted = retain(root, cfg.name, cfg.keep) if cfg.keep else []
    return {**_summary(draft.manifest), "deleted": deleted}


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {"name": m["name"], "version": m["version"], "uri": m["uri"], "hf": m["hf"], "step_dir": m["step_dir"],
            "sources": [src["uri"] for src in m["lineage"]["sources"]], "counts": m["counts"]["splits"]}


def _unchanged(latest: dict[str, Any], why: str) -> dict[str, Any]:
    return {**_summary(latest), "skipped": True, "unchanged": True,
            "reason": f"{latest['name']} {vname(latest['version'])} unchanged: {why}", "deleted": []}
