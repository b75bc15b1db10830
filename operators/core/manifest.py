"""Manifests: the commit record of a shard or a step.

A shard manifest (`_shards/NNNNN.json`) lists the files one shard task wrote, with row counts and
checksums, its stats and the config hash. The step manifest (`_MANIFEST.json`) is written last by the
reduce and lists every committed file. Readers use manifests, never directory listings, so files left
by a crashed attempt are invisible until a retry cleans them up.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from operators.core import storage
from operators.core.stats import StepStats

MANIFEST_NAME = "_MANIFEST.json"
SHARDS_DIR = "_shards"
STATS_NAME = "stats.json"


class FileEntry(BaseModel):
    """One committed file, relative to the step directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    kind: Literal["data", "dropped", "aux"]
    rows: int
    bytes: int
    sha256: str


class Manifest(BaseModel):
    """The commit record of one shard (`shard` set) or of a whole step (`shard` None)."""

    model_config = ConfigDict(extra="forbid")

    step: str
    config_hash: str
    shard: int | None = None
    attempt: str = ""
    files: list[FileEntry] = Field(default_factory=list)
    stats: StepStats
    # Small JSON results of a reduce stage (global models, thresholds) committed atomically with it.
    summary: dict[str, Any] = Field(default_factory=dict)
    # A shard's content key (`operators.core.step.shard_key`): a later plan whose shard has the same key
    # reuses this output instead of recomputing it.
    shard_key: str | None = None
    # Set when this commit reuses the output of an earlier plan (that plan's config hash): no work was done.
    reused_from: str | None = None
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def data_files(self) -> list[FileEntry]:
        return [f for f in self.files if f.kind == "data"]

    def to_bytes(self) -> bytes:
        return self.model_dump_json(indent=2).encode()


def config_hash(step: str, version: int, config: dict[str, Any], inputs: list[str]) -> str:
    """Identity of a step's work: same step code version, config and inputs -> same output."""
    payload = json.dumps(
        {"step": step, "version": version, "config": config, "inputs": inputs}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def shard_manifest_uri(step_dir: str, shard: int) -> str:
    return storage.join(step_dir, SHARDS_DIR, f"{shard:05d}.json")


def step_manifest_uri(step_dir: str) -> str:
    return storage.join(step_dir, MANIFEST_NAME)


STAGES_DIR = "_stages"


def stage_dir(step_dir: str, stage: str) -> str:
    """Folder of an auxiliary stage's outputs inside a step directory."""
    return storage.join(step_dir, STAGES_DIR, stage)


# A step switched off by its config leaves this instead of a commit: the inputs it would have read. A reader that
# finds it in place of a manifest reads those inputs, so a chain runs on as if the step were not in it.
OFF_NAME = "_OFF.json"


def write_off(step_dir: str, inputs: list[str]) -> None:
    """Mark `step_dir` as a step that is off, passing `inputs` on; any earlier commit there is withdrawn."""
    storage.write_bytes(storage.join(step_dir, OFF_NAME), json.dumps({"inputs": inputs}).encode())
    storage.delete(step_manifest_uri(step_dir))


def read_off(step_dir: str) -> list[str] | None:
    """The inputs an off step passes on, or None when `step_dir` is not an off step."""
    uri = storage.join(step_dir, OFF_NAME)
    if not storage.exists(uri):
        return None
    return [str(u) for u in json.loads(storage.read_bytes(uri))["inputs"]]


def clear_off(step_dir: str) -> None:
    """Undo `write_off` (the step is on again)."""
    storage.delete(storage.join(step_dir, OFF_NAME))


def read_manifest(uri: str) -> Manifest | None:
    """The manifest at `uri`, or None when none is committed."""
    if not storage.exists(uri):
        return None
    return Manifest.model_validate_json(storage.read_bytes(uri))
