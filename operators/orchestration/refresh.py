"""What the nightly refresh ingests: raw files that no committed ingest of the source has read yet.

A source `name` lives under `<data root>/sources/<name>/`: the backfill (`ingest_source`) writes
`ingest/` there, each night writes `<night>/ingest/`. Every committed ingest (its `_MANIFEST.json`
exists) records the raw files it read in its `_plan.json` (the shards' file URIs), so the diff needs no
state of its own: a night that failed committed nothing and its files count as new again the next night.
Files are compared by URI (a raw file is expected to be immutable once it lands).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from operators.core import storage
from operators.core.manifest import MANIFEST_NAME, read_manifest, step_manifest_uri
from operators.core.step import Plan
from operators.orchestration.settings import data_root, safe_name

PLAN_NAME = "_plan.json"  # the runner's plan file name (operators.core.runner.PLAN_NAME)


def new_raw_files(listing: Iterable[str], ingested: Iterable[str]) -> list[str]:
    """The raw files of `listing` that are not among the `ingested` ones, sorted. Pure."""
    done = set(ingested)
    return sorted({uri for uri in listing if uri not in done})


def ingested_files(plans: Iterable[Plan]) -> set[str]:
    """Every raw file the shards of these (committed) ingest plans read. Pure."""
    return {uri for plan in plans for shard in plan.shards for uri in shard.uris}


def source_root(name: str, root: str | None = None) -> str:
    """Folder of source `name`: its backfill ingest and its nightly ingests live below it."""
    return storage.join(root or data_root(), "sources", safe_name(name))


def night_dir(name: str, night: str, root: str | None = None) -> str:
    """The ingest step dir of source `name` for night `night` (e.g. the run's `ds`)."""
    return storage.join(source_root(name, root), safe_name(night), "ingest")


def committed_ingests(name: str, root: str | None = None) -> list[str]:
    """Every committed ingest step dir of source `name` (backfill and nightly), sorted."""
    base = source_root(name, root)
    suffix = "/ingest/" + MANIFEST_NAME
    dirs = [uri[: -len("/" + MANIFEST_NAME)] for uri in storage.list_files(base) if uri.endswith(suffix)]
    return sorted(d for d in dirs if read_manifest(step_manifest_uri(d)) is not None)


def raw_listing(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """The raw files an ingest of `uri` would read: the same suffix and `_`-folder rules as the step."""
    uri = storage.validate_uri(uri)
    listed = storage.list_files(uri)
    if listed == [uri]:
        return listed
    return [u for u in listed if u.endswith(suffixes) and "/_" not in u[len(uri):]]


def plan_night(sources: list[dict[str, str]], night: str, root: str | None = None) -> list[dict[str, Any]]:
    """For each source {name, uri} with new raw files: the kwargs of its ingest task for night `night`.

    Sources without new files are left out (their ingest task is not created)."""
    from operators.core.registry import step_class  # the step's own suffix list, not a copy of it

    if not sources:
        # e.g. the @daily run the scheduler starts when the DAG is unpaused with the form's defaults
        raise ValueError("nightly_refresh has no sources: give them in the trigger form, or as the `sources` "
                         "Param's default for scheduled nights")

    suffixes = step_class("ingest").input_suffixes
    out = []
    for src in sources:
        name, uri = str(src["name"]), str(src["uri"])
        plans = [Plan.model_validate_json(storage.read_bytes(storage.join(d, PLAN_NAME)))
                 for d in committed_ingests(name, root)]
        new = new_raw_files(raw_listing(uri, suffixes), ingested_files(plans))
        if new:
            out.append({"config": {"source_name": name}, "inputs": new, "output_uri": night_dir(name, night, root)})
    return out


def selection_inputs(sources: list[dict[str, str]], root: str | None = None) -> list[str]:
    """Every committed ingest dir of the sources: what tonight's selection reads (sorted per source)."""
    dirs = [d for src in sources for d in committed_ingests(str(src["name"]), root)]
    if not dirs:
        raise ValueError(f"no committed ingest for any of {[s['name'] for s in sources]}")
    return dirs
