"""`exact_dedup` step: drop records whose normalized text repeats, keeping the best copy of each.

Stages (each resumable on its own; no task holds the whole corpus):
  keys (map)           per record: its key (shard << 32 | row) and the facts that decide which copy survives
                       (reward, answer length, id) as the shard's own rows; and, per scope, a 128-bit hash
                       of the normalized whole conversation / first human turn, shuffled by hash into
                       `partitions` partitions so equal hashes meet in one
  groups (partition)   per hash partition: records with an equal (scope, hash) linked to the group's first
  resolve (reduce)     connected components over the links only (a copy may match one record by
                       conversation and another by prompt), one survivor per component: highest reward,
                       then longest answer, then smallest id; per-shard drop lists
  transform            drop the listed rows of each shard with reason `exact_duplicate`
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from pydantic import Field

from operators.core.step import (
    SHARD_ROWS,
    Artifacts,
    PartitionResult,
    Stage,
    StageOutput,
    StepConfig,
    concat_or_empty,
    shuffle_partitions,
)
from operators.dedup.unionfind import choose_keepers, connected_components
from operators.steps.dedup.droplist import (
    DropListStep,
    Keys,
    NoChurnConfig,
    drop_lists,
    links_table,
    resolve_links,
    shuffle_rows,
)
from operators.steps.dedup.partition_index import PartitionIndex, equal_rows
from operators.text.normalize import normalize_text

Scope = Literal["conversation", "first_human"]
DEFAULT_SCOPES: tuple[Scope, ...] = ("conversation", "first_human")
REASON = "exact_duplicate"


class ExactDedupConfig(NoChurnConfig):
    """Which texts must be unique, and the shuffle's size."""

    scopes: list[Scope] = Field(default_factory=lambda: list(DEFAULT_SCOPES), min_length=1,
                                description="Hash the whole conversation and/or the first human turn.")
    partitions: int | None = Field(
        None, ge=1, le=65_536,
        description="Partitions the hash rows are shuffled into; a groups task holds one at a time. "
                    "Default: one per shard, at least 64.")


def _hash(text: str) -> bytes:
    return xxhash.xxh3_128_digest(normalize_text(text).encode())


def record_hashes(conversations: list[list[dict[str, str]]], scope: Scope) -> list[bytes]:
    """Normalized-text hash (16 bytes) of each record in `scope`. Pure."""
    if scope == "conversation":
        return [_hash("\x1e".join(f"{t['from']}\x1f{t['value']}" for t in conv)) for conv in conversations]
    return [_hash(next((t["value"] for t in conv if t["from"] == "human"), "")) for conv in conversations]


def hash_words(digests: list[bytes]) -> npt.NDArray[np.uint64]:
    """128-bit digests as an ``(n, 2)`` uint64 matrix (sorts and compares fast; all 128 bits kept)."""
    return np.frombuffer(b"".join(digests), dtype=np.uint64).reshape(-1, 2) if digests else \
        np.zeros((0, 2), dtype=np.uint64)


def answer_lengths(conversations: list[list[dict[str, str]]]) -> list[int]:
    return [sum(len(t["value"]) for t in conv if t["from"] == "gpt") for conv in conversations]


HASH_ROWS = pa.schema([("key", pa.int64()), ("scope", pa.int8()), ("h1", pa.uint64()), ("h2", pa.uint64())])
HEAD_ORDER = ["h1", "h2", "scope"]  # how index heads are sorted: by hash first, so a probe is a binary search


def group_links(keys: Keys, scope: npt.NDArray[np.int8], h1: npt.NDArray[np.uint64],
                h2: npt.NDArray[np.uint64]) -> tuple[Keys, Keys, Keys]:
    """Links (key, first key of its group) for rows whose (scope, hash) another row shares: a star per group,
    linear in rows; and the row of each group's first key (its head), in `HEAD_ORDER`. A key repeated within
    a group (a re-emitted shard) adds no link."""
    order = np.lexsort((keys, scope, h2, h1))
    k, sc, a, b = keys[order], scope[order], h1[order], h2[order]
    first = np.ones(k.size, dtype=bool)
    first[1:] = (sc[1:] != sc[:-1]) | (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    head = k[np.maximum.accumulate(np.where(first, np.arange(k.size), 0))] if k.size else k
    linked = ~first & (k != head)
    return k[linked], head[linked], order[first]


def equal_hash_links(keys: npt.NDArray[np.int64], scope: npt.NDArray[np.int8], h1: npt.NDArray[np.uint64],
                     h2: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Links (key, first key of its group) for rows whose (scope, hash) another row shares (`group_links`)."""
    src, dst, _ = group_links(keys, scope, h1, h2)
    return src, dst


def probe_heads(segments: list[pa.Table], rows: pa.Table) -> npt.NDArray[np.int64]:
    """For each of `rows` (`HASH_ROWS`), the head key of the group with its (scope, hash) among the index
    `segments` (each sorted by `HEAD_ORDER`; a group is in at most one), or -1 (`equal_rows`). Pure."""
    found = np.full(rows.num_rows, -1, dtype=np.int64)
    for seg, at, query in equal_rows(segments, rows, "h1", ["h2", "scope"]):
        found[query] = seg["key"].to_numpy()[at]
    return found


def link_new_rows(segments: list[pa.Table], rows: pa.Table) -> tuple[pa.Table, npt.NDArray[np.int64],
                                                                     npt.NDArray[np.int64]]:
    """Link `rows` against the index `segments` and each other: (heads of the groups new to the index, in
    `HEAD_ORDER`; link sources; link targets). A row whose group the index holds links to that group's head;
    the others link within their own groups (`group_links`). With an empty index, that is `group_links` over
    all rows. New rows come from shards appended after the index's, so their keys are larger than every head:
    the links are the ones linking all rows at once would make. Pure."""
    keys = rows["key"].to_numpy()
    head = probe_heads(segments, rows)
    hit = head >= 0
    old_src, old_dst = keys[hit], head[hit]
    fresh = rows.filter(pa.array(~hit)) if hit.any() else rows
    src, dst, heads = group_links(fresh["key"].to_numpy(), fresh["scope"].to_numpy(), fresh["h1"].to_numpy(),
                                  fresh["h2"].to_numpy())
    keep = old_src != old_dst  # a key already in the index (a re-emitted shard) links to nothing new
    return (fresh.take(pa.array(heads)).select(HASH_ROWS.names), np.concatenate([old_src[keep], src]),
            np.concatenate([old_dst[keep], dst]))


def survivor_rank(reward: npt.NDArray[np.float64], answer_len: npt.NDArray[np.int64], ids: pa.Array) -> npt.NDArray[
        np.int64]:
    """Rank of each record as a survivor (0 = best): highest reward (missing last), longest answer, smallest id."""
    order = pc.sort_indices(pa.table({"r": np.nan_to_num(reward, nan=-np.inf), "a": answer_len, "id": ids}),
                            sort_keys=[("r", "descending"), ("a", "descending"), ("id", "ascending")]).to_numpy()
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    return rank


def choose_survivors(hashes: Mapping[str, npt.NDArray[np.uint64]], reward: npt.NDArray[np.float64],
                     answer_len: npt.NDArray[np.int64], ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The single-machine form: for n records with per-scope ``(n, 2)`` hashes, (is_duplicate, survivor index).

    Records sharing any hash are one cluster (transitively); the survivor is the best `survivor_rank`.
    The distributed stages decide the same. Pure and deterministic."""
    n = len(reward)
    rows = np.arange(n, dtype=np.int64)
    src, dst = [], []
    for i, h in enumerate(hashes.values()):
        s, d = equal_hash_links(rows, np.full(n, i, dtype=np.int8), h[:, 0], h[:, 1])
        src.append(s)
        dst.append(d)
    comp = connected_components(n, np.concatenate(src), np.concatenate(dst))
    survivor = choose_keepers(comp, survivor_rank(reward, answer_len, ids))
    return survivor != rows, survivor


class ExactDedupStep(DropListStep[ExactDedupConfig]):
    """Drop exact duplicates (after normalization) across all shards, keeping one copy of each."""

    name: ClassVar[str] = "exact_dedup"
    version: ClassVar[int] = 2  # hashes shuffled to partition tasks; decisions unchanged
    config_model: ClassVar[type[StepConfig]] = ExactDedupConfig
    stages: ClassVar[tuple[Stage, ...]] = (Stage("keys", "map"), Stage("groups", "partition"),
                                           Stage("resolve", "reduce"))
    drop_reason: ClassVar[str] = REASON
    detail_prefix: ClassVar[str] = "duplicate of"

    def stage_partitions(self, stage: str) -> int:
        return shuffle_partitions(self.config.partitions, self.num_shards)

    def map_stage(self, stage: str, batch: pa.RecordBatch, shard: int) -> dict[int, pa.Table]:
        convs = batch.column("conversations").to_pylist()
        n = len(convs)
        keys = self.next_keys(shard, n)
        own = pa.table({"key": pa.array(keys), "id": batch.column("id"), "reward": batch.column("reward"),
                        "answer_len": pa.array(answer_lengths(convs), pa.int64())})
        hash_rows = []
        for i, scope in enumerate(self.config.scopes):
            h = hash_words(record_hashes(convs, scope))
            hash_rows.append(pa.table({"key": pa.array(keys), "scope": pa.array(np.full(n, i, dtype=np.int8)),
                                       "h1": pa.array(h[:, 0]), "h2": pa.array(h[:, 1])}))
        rows = pa.concat_tables(hash_rows)
        part = (rows["h1"].to_numpy() % np.uint64(self.stage_partitions("groups"))).astype(np.int64)
        return {SHARD_ROWS: own, **shuffle_rows(rows, part)}

    def partition_stage(self, stage: str, artifacts: Artifacts, partition: int) -> PartitionResult:
        """Link the partition's hash rows. With an index of an earlier run (`partition_index`), only the rows of
        shards it does not cover are read and linked, against its group heads and each other."""
        index = PartitionIndex.open(artifacts, "keys", stage, partition, self.num_shards)
        rows = concat_or_empty(artifacts.shuffled("keys", partition, index.new_shards), HASH_ROWS)
        heads, src, dst = link_new_rows(index.base_heads, rows.select(HASH_ROWS.names))
        new_links = links_table(src, dst)
        index.commit(heads, new_links, rows.num_rows, HEAD_ORDER)
        links = index.all_links(new_links)
        # Counts over every covered row, so a run on an index reports what one without it would.
        return PartitionResult(links, index.base_rows + rows.num_rows,
                               {"links": float(links.num_rows), **index.counters(rows.num_rows)})

    def reduce_stage(self, stage: str, artifacts: Artifacts, num_shards: int) -> StageOutput:
        def rank(rows: pa.Table) -> npt.NDArray[np.int64]:
            reward = rows["reward"].to_numpy(zero_copy_only=False).astype(np.float64)
            return survivor_rank(reward, rows["answer_len"].to_numpy(), rows["id"])

        drops, records, _ = resolve_links(artifacts, links_stage="groups", rows_stage="keys",
                                          columns=["reward", "answer_len"], priority=rank, protected=self.protected)
        return drop_lists(drops, {"records": records, "duplicates": drops.num_rows})
