"""Verify a committed step folder the way a careful reader would (`python -m operators verify STEP_DIR ...`).

A step folder is sound when:
- its step manifest is committed, and every file it lists exists with the listed size (and, with checksums,
  the listed sha256);
- every `part-*` file in the folder belongs to a committed manifest (the step's, a shard's, or a stage's or
  stage shard's): nothing a crashed or losing attempt wrote is left where a listing could pick it up;
- a consumer reading the folder instead of the manifest (a Parquet dataset, a glob) sees exactly the
  manifest's data files.

Writers' temp files (`*.tmp-xxxxxxxx`, a write in flight or killed) are counted, not flagged: no reader
lists them, and a step's reduce deletes those older than `runner.TEMP_MAX_AGE_S`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from operators.core import storage
from operators.core.manifest import MANIFEST_NAME, SHARDS_DIR, Manifest, read_manifest


@dataclass
class StepCheck:
    """What `verify_step` found in one step folder."""

    step_dir: str
    files_checked: int = 0
    bytes_checked: int = 0
    temp_files: int = 0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"step_dir": self.step_dir, "ok": not self.problems, "files_checked": self.files_checked,
                "bytes_checked": self.bytes_checked, "temp_files": self.temp_files, "problems": self.problems}


def _sha256(uri: str) -> str:
    h = hashlib.sha256()
    for chunk in storage.iter_chunks(uri):
        h.update(chunk)
    return h.hexdigest()


def _manifests(step_dir: str, files: list[str]) -> list[tuple[str, Manifest | None]]:
    """(folder its paths are relative to, manifest) for every manifest in the folder tree."""
    out = []
    for uri in files:
        rel = uri[len(step_dir) + 1:]
        parent, _, name = rel.rpartition("/")
        if name == MANIFEST_NAME:
            out.append((storage.join(step_dir, parent) if parent else step_dir, read_manifest(uri)))
        elif parent.rpartition("/")[2] == SHARDS_DIR and name.endswith(".json"):
            base = parent.rpartition("/")[0]
            out.append((storage.join(step_dir, base) if base else step_dir, read_manifest(uri)))
    return out


def verify_step(step_dir: str, checksums: bool = True) -> StepCheck:
    """Check one committed step folder (local or s3://); `problems` is empty when it is sound."""
    step_dir = storage.validate_uri(step_dir).rstrip("/")
    check = StepCheck(step_dir)
    everything = storage.list_files(step_dir, include_temp=True)
    files = [u for u in everything if not storage.is_temp(u)]
    check.temp_files = len(everything) - len(files)
    step_m = read_manifest(storage.join(step_dir, MANIFEST_NAME))
    if step_m is None:
        check.problems.append("no committed step manifest")
        return check
    present = set(files)
    for f in step_m.files:
        uri = storage.join(step_dir, f.path)
        if uri not in present:
            check.problems.append(f"listed file missing: {f.path}")
            continue
        if storage.file_size(uri) != f.bytes:
            check.problems.append(f"listed file has the wrong size: {f.path}")
        elif checksums and _sha256(uri) != f.sha256:
            check.problems.append(f"listed file has the wrong checksum: {f.path}")
        check.files_checked += 1
        check.bytes_checked += f.bytes
    listed: set[str] = set()
    for base, m in _manifests(step_dir, files):
        listed |= {storage.join(base, f.path) for f in (m.files if m else [])}
    for uri in files:
        name = uri.rpartition("/")[2]
        if name.startswith("part-") and uri not in listed:
            check.problems.append(f"part file outside every committed manifest: {uri[len(step_dir) + 1:]}")
    # A consumer that reads the folder rather than the manifest (a Parquet dataset over the folder, a glob)
    # takes the top-level part files: they must be exactly the manifest's data files.
    top = sorted(u for u in files if "/" not in u[len(step_dir) + 1:] and u.rpartition("/")[2].startswith("part-"))
    expect = sorted(storage.join(step_dir, f.path) for f in step_m.data_files())
    if top != expect:
        check.problems.append(f"a folder reader sees {len(top)} data file(s), the manifest lists {len(expect)}")
    return check


def verify_chain(step_dirs: list[str], checksums: bool = True) -> tuple[list[StepCheck], list[str]]:
    """Verify each step folder of a pipeline, in order, and the ledger between them: every step keeps
    `in = kept + dropped`, and each reads exactly what the one before kept. Returns (checks, chain problems)."""
    checks = [verify_step(d, checksums) for d in step_dirs]
    problems: list[str] = []
    stats = []
    for c in checks:
        uri = storage.join(c.step_dir, "stats.json")
        stats.append(json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None)
    for c, s in zip(checks, stats, strict=True):
        if s is not None and s["records_in"] != s["records_kept"] + sum(s["dropped_by_reason"].values()):
            problems.append(f"{c.step_dir}: in {s['records_in']} != kept {s['records_kept']} + dropped")
    for (a, sa), (b, sb) in itertools.pairwise(zip(checks, stats, strict=True)):
        if sa is not None and sb is not None and sb["records_in"] != sa["records_kept"]:
            problems.append(f"{b.step_dir} read {sb['records_in']} records, {a.step_dir} kept {sa['records_kept']}")
    return checks, problems


__all__ = ["StepCheck", "verify_chain", "verify_step"]
