"""A dedup partition's index, kept beside the step's output across plans, so that a night links only its
new rows against what earlier runs already linked.

A partition stage sees the rows every shard shuffled to its partition. Linking all of them again each night
makes a night's dedup cost grow with the corpus. Instead each partition keeps *generations* in
`<step dir>/_index/<stage>/pNNNNN/`:

    gen-<digest>.json   {"covered": {shard: map content key}, "rows": hash rows covered,
                         "heads": [segment files], "links": [segment files]}

`heads` segments hold one row per group the covered rows form (the group's smallest key, sorted by hash), and
`links` segments the links found among the covered rows. A later plan whose map outputs for those shards are
unchanged (same shard index, same content key: a reused map output keeps its record keys) builds on that
generation: it reads only the other shards' rows, probes them against the heads, links them to each other,
and commits a generation covering every shard, whose segments are the base's plus one delta each. New shards
are appended to a plan, so their keys are larger than every old key: a new row joins an old group behind its
head, and old rows' links are the ones a full recompute would make, so the output equals a full recompute.

A generation is committed create-if-absent under a name derived from what it covers; a racing writer of the
same generation adopts the winner's. Anything unreadable falls back to linking every row (slower, never
wrong). After a commit, generations other than the newest two are deleted, with the segment files no kept
generation lists and no live writer can still be writing (older than `STALE_S`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from operators.core import storage
from operators.core.step import Artifacts
from operators.steps.dedup.droplist import sorted_links

log = logging.getLogger(__name__)

INDEX_DIR = "_index"
KEEP_GENERATIONS = 2
MAX_SEGMENTS = 8  # more and the next generation compacts them into one (bounded probe and read cost)
STALE_S = 900.0  # an uncommitted segment this old has no live writer (a task writes and commits in seconds)


@dataclass
class Generation:
    """One committed state of a partition's index."""

    name: str
    covered: dict[int, str]
    rows: int
    heads: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return json.dumps({"covered": {str(k): v for k, v in sorted(self.covered.items())}, "rows": self.rows,
                           "heads": self.heads, "links": self.links}, sort_keys=True).encode()

    @classmethod
    def parse(cls, name: str, data: bytes) -> Generation:
        doc = json.loads(data)
        return cls(name, {int(k): str(v) for k, v in doc["covered"].items()}, int(doc["rows"]),
                   list(doc["heads"]), list(doc["links"]))


def generation_name(covered: dict[int, str]) -> str:
    """The file name of the generation covering `covered` (equal coverage, equal name). Pure."""
    payload = "\n".join(f"{k}={v}" for k, v in sorted(covered.items()))
    return f"gen-{hashlib.sha256(payload.encode()).hexdigest()[:20]}.json"


def best_base(generations: list[Generation], covered: dict[int, str]) -> Generation | None:
    """The generation covering the most rows whose every shard is still covered with the same key. Pure."""
    usable = [g for g in generations if all(covered.get(k) == v for k, v in g.covered.items())]
    return max(usable, key=lambda g: (len(g.covered), g.rows, g.name), default=None)


def equal_rows(segments: list[pa.Table], rows: pa.Table, on: str, also: list[str]
               ) -> Iterator[tuple[pa.Table, npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
    """For each index segment (sorted by `on` first): (the segment, its rows, the rows of `rows`) of the pairs
    equal in `on` and in every column of `also`. Binary search on `on`: the cost grows with `rows` (times log
    of the index), not with the index; only rows whose `on` the index holds are compared further. Pure."""
    if rows.num_rows == 0:
        return
    q_on, q_also = rows[on].to_numpy(), [rows[c].to_numpy() for c in also]
    for seg in segments:
        if seg.num_rows == 0:
            continue
        s_on, s_also = seg[on].to_numpy(), [seg[c].to_numpy() for c in also]
        lo, hi = np.searchsorted(s_on, q_on, "left"), np.searchsorted(s_on, q_on, "right")
        at: list[npt.NDArray[np.int64]] = []
        query: list[npt.NDArray[np.int64]] = []
        for i in np.flatnonzero(hi > lo):
            same = np.ones(hi[i] - lo[i], dtype=bool)
            for s_col, q_col in zip(s_also, q_also, strict=True):
                same &= s_col[lo[i]:hi[i]] == q_col[i]
            hit = lo[i] + np.flatnonzero(same)
            at.append(hit)
            query.append(np.full(hit.size, i, dtype=np.int64))
        if at:
            yield seg, np.concatenate(at), np.concatenate(query)


class PartitionIndex:
    """The index of one partition of one stage: load a base, then commit what this run adds to it."""

    @classmethod
    def open(cls, artifacts: Artifacts, map_stage: str, stage: str, partition: int, num_shards: int,
             with_links: bool = True) -> PartitionIndex:
        """The index of partition stage `stage` over the rows map stage `map_stage` shuffled to `partition`,
        for the plan's `num_shards` shards (`with_links` False: a reader that needs only the heads)."""
        covered = {k: v for k, v in artifacts.shard_keys(map_stage).items() if k < num_shards}
        return cls(artifacts.step_dir, stage, partition, covered, with_links)

    def __init__(self, step_dir: str, stage: str, partition: int, covered: dict[int, str | None],
                 with_links: bool = True) -> None:
        self.folder = storage.join(step_dir, INDEX_DIR, stage, f"p{partition:05d}")
        self.with_links = with_links
        # A map output without a content key cannot be recognised later: such runs neither use nor keep an index.
        self.covered: dict[int, str] | None = (
            None if any(v is None for v in covered.values()) else {k: str(v) for k, v in covered.items()})
        self.base: Generation | None = None
        self.base_heads: list[pa.Table] = []
        self.base_links: pa.Table | None = None
        if self.covered is not None:
            self._load()

    @property
    def new_shards(self) -> set[int] | None:
        """Shards whose rows this run must read (None: all of them)."""
        if self.base is None or self.covered is None:
            return None
        return set(self.covered) - set(self.base.covered)

    @property
    def base_rows(self) -> int:
        return self.base.rows if self.base is not None else 0

    def all_links(self, new_links: pa.Table) -> pa.Table:
        """The base's links and `new_links`, sorted (`sorted_links`): the partition's output."""
        return sorted_links([t for t in (self.base_links, new_links) if t is not None])

    def counters(self, new_rows: int) -> dict[str, float]:
        """How many rows the base covered and how many this run read and linked (a stage's counters)."""
        return {"index_rows_reused": float(self.base_rows), "index_rows_linked": float(new_rows)}

    def _generations(self) -> list[Generation]:
        out = []
        for uri in storage.list_files(self.folder, recursive=False):
            name = uri.rsplit("/", 1)[-1]
            if name.startswith("gen-") and name.endswith(".json"):
                try:
                    out.append(Generation.parse(name, storage.read_bytes(uri)))
                except (OSError, ValueError, KeyError) as e:
                    log.warning("index %s: skipping unreadable generation %s (%s)", self.folder, name, e)
        return out

    def _load(self) -> None:
        assert self.covered is not None
        base = best_base(self._generations(), self.covered)
        if base is None:
            return
        try:
            heads = [self._read(f) for f in base.heads]
            links = pa.concat_tables([self._read(f) for f in base.links]) if base.links and self.with_links \
                else None
        except (OSError, pa.ArrowException) as e:  # a sweep raced us, or a torn file: link everything instead
            log.warning("index %s: generation %s unreadable (%s); linking every row", self.folder, base.name, e)
            return
        self.base, self.base_heads, self.base_links = base, heads, links

    def _read(self, name: str) -> pa.Table:
        with storage.open_input(storage.join(self.folder, name)) as f:
            return pq.read_table(f)

    def _write(self, kind: str, gen: str, table: pa.Table) -> str:
        name = f"{kind}-{gen.removeprefix('gen-').removesuffix('.json')}-{uuid.uuid4().hex[:8]}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        storage.write_bytes(storage.join(self.folder, name), sink.getvalue())
        return name

    def commit(self, new_heads: pa.Table, new_links: pa.Table, new_rows: int, order_heads: list[str]) -> None:
        """Commit the generation covering every shard: the base's segments plus `new_heads` (sorted by
        `order_heads`) and `new_links`; compacted when segments pile up. No-op when nothing is new."""
        if self.covered is None:
            return
        name = generation_name(self.covered)
        if self.base is not None and self.base.name == name:
            self._retain(name)
            return
        heads_files = list(self.base.heads) if self.base else []
        links_files = list(self.base.links) if self.base else []
        written: list[str] = []
        if len(heads_files) >= MAX_SEGMENTS:
            merged = pa.concat_tables([*self.base_heads, new_heads])
            new_heads, heads_files = merged.sort_by([(c, "ascending") for c in order_heads]), []
            new_links = pa.concat_tables([t for t in (self.base_links, new_links) if t is not None])
            links_files = []
        if new_heads.num_rows or not heads_files:
            heads_files.append(self._write("heads", name, new_heads))
            written.append(heads_files[-1])
        if new_links.num_rows or not links_files:
            links_files.append(self._write("links", name, new_links))
            written.append(links_files[-1])
        gen = Generation(name, self.covered, self.base_rows + new_rows, heads_files, links_files)
        if not storage.commit_if_absent(storage.join(self.folder, name), gen.to_bytes()):
            for f in written:  # an equal generation won the race: ours is redundant
                storage.delete(storage.join(self.folder, f))
        self._retain(name)

    def _retain(self, current: str) -> None:
        """Keep `current` and the next newest generation; delete the others and the files nobody lists."""
        gens = sorted(self._generations(), key=lambda g: (g.name == current, len(g.covered), g.rows))
        keep, drop = gens[-KEEP_GENERATIONS:], gens[:-KEEP_GENERATIONS]
        for g in drop:
            storage.delete(storage.join(self.folder, g.name))
        listed = {f for g in keep for f in (*g.heads, *g.links)}
        cutoff = time.time() - STALE_S
        dropped_ids = {g.name.removeprefix("gen-").removesuffix(".json") for g in drop}
        current_id = current.removeprefix("gen-").removesuffix(".json")
        for uri in storage.list_files(self.folder, recursive=False):
            name = uri.rsplit("/", 1)[-1]
            if not name.endswith(".parquet") or name in listed:
                continue
            gen_id = name.split("-")[1] if name.count("-") >= 2 else ""
            # Unlisted files of the current or a dropped generation are a loser's or a killed attempt's;
            # any other unlisted file may belong to a writer still running: only when it is stale.
            if gen_id in dropped_ids or gen_id == current_id or _older_than(uri, cutoff):
                storage.delete(uri)


def _older_than(uri: str, cutoff: float) -> bool:
    fs, path = storage.filesystem(uri)
    info: Any = fs.get_file_info(path)
    mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
    return bool(mtime < cutoff)
