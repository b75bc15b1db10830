"""The source registry: which raw corpora feed which dataset, as one versioned JSON document in storage.

`<data root>/sources/_registry.json` holds {version, sources: [...]}; every change reads it with its token and
writes the next version with `storage.compare_and_swap` (S3 `If-Match`, locally flock + atomic rename), retrying
on a lost race, so two backfills registering at once both land and neither overwrites the other. A source is
keyed by name: registering a name again updates its entry (a new URI, format or cap) and keeps its position.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from operators.core import storage

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
REGISTRY = "_registry.json"


class RegistryConflict(RuntimeError):
    """The registry kept moving under this writer (more than `attempts` lost races)."""


class SourceEntry(BaseModel):
    """One registered raw corpus and the dataset it feeds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="Source name: recorded in each record's `source`.")
    uri: str = Field(min_length=1, description="File, folder or prefix of the raw corpus.")
    format: str = Field("auto", description="Ingest format (auto detects it per file).")
    dataset: str = Field(pattern=NAME_PATTERN, description="The dataset this source feeds.")
    cap: int | None = Field(None, ge=1, description="Most records of this source the selection keeps.")
    registered_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @field_validator("uri")
    @classmethod
    def _valid_uri(cls, v: str) -> str:
        return storage.validate_uri(v)


class Registry(BaseModel):
    """Every registered source, with a version that grows by one per change."""

    model_config = ConfigDict(extra="forbid")

    version: int = 0
    sources: list[SourceEntry] = Field(default_factory=list)

    def of_dataset(self, dataset: str) -> list[SourceEntry]:
        """The sources feeding `dataset`, in registration order."""
        return [s for s in self.sources if s.dataset == dataset]

    def get(self, name: str) -> SourceEntry | None:
        return next((s for s in self.sources if s.name == name), None)


def registry_uri(root: str) -> str:
    return storage.join(storage.validate_uri(root), "sources", REGISTRY)


def load(root: str) -> tuple[Registry, str | None]:
    """The registry (empty before the first registration) and the token a compare-and-swap expects."""
    data, token = storage.read_versioned(registry_uri(root))
    return (Registry.model_validate_json(data) if data is not None else Registry()), token


def register(root: str, entry: SourceEntry, attempts: int = 50) -> Registry:
    """Add `entry` (or update the entry of the same name) and return the registry as committed."""
    for _ in range(attempts):
        current, token = load(root)
        sources = [entry if s.name == entry.name else s for s in current.sources]
        if current.get(entry.name) is None:
            sources.append(entry)
        new = Registry(version=current.version + 1, sources=sources)
        if storage.compare_and_swap(registry_uri(root), token, new.model_dump_json(indent=2).encode()):
            return new
    raise RegistryConflict(f"could not register source {entry.name!r}: the registry changed {attempts} times")


def describe(registry: Registry) -> str:
    """One JSON line per source (what `python -m operators sources list` prints)."""
    return "\n".join(json.dumps({**s.model_dump(), "registry_version": registry.version})
                     for s in registry.sources)
