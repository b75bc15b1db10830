"""`exact_dedup` step: drop records whose normalized text repeats, keeping the best copy of each.

What must be unique (`scopes`): the whole conversation (every turn, normalized turn by turn) and/or the first
human turn. Equal conversations have equal first human turns, so with both scopes a cluster of duplicates is
exactly a group of records with one normalized first human turn: the step hashes only the coarser scope
(`effective_scope`), every cluster is one hash group, and no connected components are needed. Shuffled by
that hash, every cluster lies whole in one partition, so survivors are chosen there and no task sees more
than its partition (docs/architecture.md, "Exact dedup decides per partition").

Stages (each resumable on its own; no task holds the whole corpus or grows with it):
  keys (map)           per record: a 128-bit hash of its normalized text in the effective scope, its key
                       (shard << 32 | row) and the facts that decide which copy survives (reward, answer
                       length, id), shuffled by hash into `partitions` partitions so equal hashes meet in one
  resolve (partition)  per hash partition: each group of equal hashes and its survivor (highest reward, then
                       longest answer, then smallest id, then smallest key); the drop list of each shard,
                       shuffled to that shard
  transform            drop the listed rows of each shard with reason `exact_duplicate`
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from pydantic import Field

from operators.core.arrays import run_starts, unique_sorted
from operators.core.step import (
    Artifacts,
    PartitionResult,
    Stage,
    StepConfig,
    concat_or_empty,
    shuffle_partitions,
)
from operators.steps.dedup.droplist import (
    KEY_SHIFT,
    ROW_MASK,
    DropListStep,
    Keys,
    NoChurnConfig,
    cluster_sizes,
    shuffle_rows,
    sorted_links,
)
from operators.steps.dedup.partition_index import PartitionIndex, equal_rows
from operators.text.normalize import normalize_text
from operators.text.turns import first_turn, role_chars, turn_columns

Scope = Literal["conversation", "first_human"]
DEFAULT_SCOPES: tuple[Scope, ...] = ("conversation", "first_human")
REASON = "exact_duplicate"


class ExactDedupConfig(NoChurnConfig):
    """Which texts must be unique, and the shuffle's size."""

    scopes: list[Scope] = Field(default_factory=lambda: list(DEFAULT_SCOPES), min_length=1,
                                description="Hash the whole conversation and/or the first human turn (which "
                                            "implies the whole conversation: equal conversations have equal "
                                            "first human turns).")
    partitions: int | None = Field(
        None, ge=1, le=65_536,
        description="Partitions the hash rows are shuffled into; a resolve task holds one at a time. "
                    "Default: one per shard, at least 64.")


def effective_scope(scopes: list[Scope]) -> Scope:
    """The one scope whose hash groups are exactly the clusters of duplicates under `scopes`.

    Two records with equal normalized conversations (turn by turn) have equal normalized first human turns, so
    every conversation group lies inside one first-human group: the union of both scopes' groups is the
    first-human grouping alone. Pure."""
    return "first_human" if "first_human" in scopes else "conversation"


# Normalized text is words separated by single spaces: these separators never occur in it, so equal joined
# strings mean equal turns.
_TURN, _FIELD = "\x1e", "\x1f"


def record_hashes(conversations: list[list[dict[str, str]]], scope: Scope) -> list[bytes]:
    """Normalized-text hash (16 bytes) of each record in `scope`: the first human turn (empty when there is
    none), or every turn's speaker and text, each turn normalized on its own so that turn boundaries count.
    Pure."""
    if scope == "conversation":
        digest = xxhash.xxh3_128_digest
        return [digest(_TURN.join(f"{t['from']}{_FIELD}{normalize_text(t['value'])}" for t in conv).encode())
                for conv in conversations]
    return prompt_hashes([next((t["value"] for t in conv if t["from"] == "human"), "") for conv in conversations])


def prompt_hashes(prompts: list[str]) -> list[bytes]:
    """The first-human scope's hash of each first human turn (`record_hashes`). Pure."""
    digest = xxhash.xxh3_128_digest
    return [digest(normalize_text(p).encode()) for p in prompts]


def hash_words(digests: list[bytes]) -> npt.NDArray[np.uint64]:
    """128-bit digests as an ``(n, 2)`` uint64 matrix (sorts and compares fast; all 128 bits kept)."""
    return np.frombuffer(b"".join(digests), dtype=np.uint64).reshape(-1, 2) if digests else \
        np.zeros((0, 2), dtype=np.uint64)


# A record's hash row carries the facts that choose a survivor, so the partition that holds its group decides.
FACTS = [("reward", pa.float64()), ("answer_len", pa.int64()), ("id", pa.string())]
HASH_ROWS = pa.schema([("key", pa.int64()), ("h1", pa.uint64()), ("h2", pa.uint64()), *FACTS])
HEAD_ORDER = ["h1", "h2"]  # how index heads are sorted: by hash, so a probe is a binary search
# A link: a record (its key and facts) and the head of its group (the group's smallest key).
MEMBER_LINKS = pa.schema([("key", pa.int64()), ("linked_key", pa.int64()), *FACTS])
DROPS = pa.schema([("shard", pa.int32()), ("row", pa.int64()), ("kept_id", pa.string())])


def group_links(keys: Keys, h1: npt.NDArray[np.uint64], h2: npt.NDArray[np.uint64]
                ) -> tuple[npt.NDArray[np.int64], Keys, npt.NDArray[np.int64]]:
    """Rows whose hash another row shares, linked to their group's first (smallest) key: a star per group,
    linear in rows. Returns (positions of the linked rows, their heads' keys, positions of each group's head
    row, in `HEAD_ORDER`). A key repeated within a group (a re-emitted shard) adds no link. Pure."""
    order = np.lexsort((keys, h2, h1))
    k, a, b = keys[order], h1[order], h2[order]
    first = np.ones(k.size, dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    head = k[np.maximum.accumulate(np.where(first, np.arange(k.size), 0))] if k.size else k
    linked = ~first & (k != head)
    return order[linked], head[linked], order[first]


def probe_heads(segments: list[pa.Table], rows: pa.Table) -> npt.NDArray[np.int64]:
    """For each of `rows`, the head key of the group with its hash among the index `segments` (each sorted by
    `HEAD_ORDER`; a group is in at most one), or -1 (`equal_rows`). Pure."""
    found = np.full(rows.num_rows, -1, dtype=np.int64)
    for seg, at, query in equal_rows(segments, rows, "h1", ["h2"]):
        found[query] = seg["key"].to_numpy()[at]
    return found


def _member_links(rows: pa.Table, at: npt.NDArray[np.int64], heads: Keys) -> pa.Table:
    t = rows.take(pa.array(at, pa.int64())).select(["key", *(n for n, _ in FACTS)])
    return t.add_column(1, "linked_key", pa.array(heads, pa.int64())).cast(MEMBER_LINKS)


def link_new_rows(segments: list[pa.Table], rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Link `rows` (`HASH_ROWS`) against the index `segments` and each other: (heads of the groups new to the
    index, in `HEAD_ORDER`; links as `MEMBER_LINKS`). A row whose group the index holds links to that group's
    head; the others link within their own groups (`group_links`). With an empty index, that is `group_links`
    over all rows. New rows come from shards appended after the index's, so their keys are larger than every
    head: the links are the ones linking all rows at once would make. Pure."""
    keys = rows["key"].to_numpy()
    head = probe_heads(segments, rows)
    # A key already in the index (a re-emitted shard) links to nothing new.
    old = np.flatnonzero((head >= 0) & (keys != head))
    fresh_at = np.flatnonzero(head < 0)
    fresh = rows.take(pa.array(fresh_at, pa.int64()))
    linked, heads_of, first = group_links(fresh["key"].to_numpy(), fresh["h1"].to_numpy(), fresh["h2"].to_numpy())
    links = pa.concat_tables([_member_links(rows, old, head[old]), _member_links(fresh, linked, heads_of)])
    return fresh.take(pa.array(first, pa.int64())).cast(HASH_ROWS), links


def head_facts(heads: list[pa.Table], wanted: Keys) -> pa.Table:
    """The rows of the heads whose key is in `wanted` (sorted, distinct), from index and new head tables,
    sorted by key; one per key."""
    found = [h.filter(pa.array(np.isin(h["key"].to_numpy(), wanted, assume_unique=True))) for h in heads
             if h.num_rows]
    t = concat_or_empty(found, HASH_ROWS).select(["key", *(n for n, _ in FACTS)])
    t = t.take(pc.sort_indices(t["key"]))
    if t.num_rows != wanted.size or not np.array_equal(t["key"].to_numpy(), wanted):
        raise ValueError("links name group heads that no index or new row holds")  # a torn or mixed index
    return t


def choose_in_groups(members: pa.Table, protected: npt.NDArray[np.bool_]) -> pa.Table:
    """Survivor of each group and the drop list: `members` holds every record of every group with more than one
    (``key``, ``group``, reward, answer_len, id). The survivor has the highest reward (missing last), then the
    longest answer, then the smallest id, then the smallest key. A `protected` record (no churn) is never
    dropped and survives first: among several of one id only the smallest key counts (ids are content hashes,
    so copies of a published record carry its id), and among several ids the smallest key survives.
    Returns the drops as `DROPS`. Pure and deterministic."""
    if members.num_rows == 0:
        return DROPS.empty_table()
    keys = members["key"].to_numpy()
    if protected.any():
        at = np.flatnonzero(protected)
        sub = pa.table({"id": members["id"].take(pa.array(at)), "key": keys[at]})
        first = pc.sort_indices(sub, sort_keys=[("id", "ascending"), ("key", "ascending")]).to_numpy()
        ids = sub["id"].take(pa.array(first)).to_numpy(zero_copy_only=False)
        protected = np.zeros(members.num_rows, dtype=bool)
        protected[at[first[run_starts(ids)]]] = True
    reward = members["reward"].to_numpy(zero_copy_only=False).astype(np.float64)
    # Protected records rank by key alone: their facts must not reorder them.
    order = pc.sort_indices(pa.table({
        "group": members["group"], "tier": pa.array(~protected),
        "r": pa.array(np.where(protected, 0.0, np.nan_to_num(reward, nan=-np.inf))),
        "a": pa.array(np.where(protected, 0, members["answer_len"].to_numpy())),
        "id": pc.if_else(pa.array(protected), "", members["id"]), "key": members["key"]}),
        sort_keys=[("group", "ascending"), ("tier", "ascending"), ("r", "descending"), ("a", "descending"),
                   ("id", "ascending"), ("key", "ascending")]).to_numpy()
    first = run_starts(members["group"].to_numpy()[order])
    keeper = order[np.maximum.accumulate(np.where(first, np.arange(order.size), 0))]
    drop = ~first & ~protected[order]
    dropped, kept = order[drop], keeper[drop]
    k = keys[dropped]
    return pa.table({"shard": pa.array((k >> KEY_SHIFT).astype(np.int32)), "row": pa.array(k & ROW_MASK),
                     "kept_id": members["id"].take(pa.array(kept)).cast(pa.string())}, schema=DROPS)


class ExactDedupStep(DropListStep[ExactDedupConfig]):
    """Drop exact duplicates (after normalization) across all shards, keeping one copy of each."""

    name: ClassVar[str] = "exact_dedup"
    version: ClassVar[int] = 3  # one hash per record in the coarsest scope; survivors chosen per partition
    config_model: ClassVar[type[StepConfig]] = ExactDedupConfig
    stages: ClassVar[tuple[Stage, ...]] = (Stage("keys", "map"), Stage("resolve", "partition", grouped=True))
    drop_reason: ClassVar[str] = REASON
    detail_prefix: ClassVar[str] = "duplicate of"

    def stage_partitions(self, stage: str) -> int:
        return shuffle_partitions(self.config.partitions, self.num_shards)

    def map_stage(self, stage: str, batch: pa.RecordBatch, shard: int) -> dict[int, pa.Table]:
        roles, values, offsets = turn_columns(batch.column("conversations"))
        if effective_scope(self.config.scopes) == "first_human":  # only the prompts become Python strings
            h = hash_words(prompt_hashes(first_turn(roles, values, offsets, "human").to_pylist()))
        else:
            h = hash_words(record_hashes(batch.column("conversations").to_pylist(), "conversation"))
        rows = pa.table({"key": pa.array(self.next_keys(shard, batch.num_rows)), "h1": pa.array(h[:, 0]),
                         "h2": pa.array(h[:, 1]), "reward": batch.column("reward").cast(pa.float64()),
                         "answer_len": pa.array(role_chars(roles, values, offsets, "gpt"), pa.int64()),
                         "id": batch.column("id").cast(pa.string())}, schema=HASH_ROWS)
        part = (h[:, 0] % np.uint64(self.stage_partitions("resolve"))).astype(np.int64)
        return shuffle_rows(rows, part)

    def partition_stage(self, stage: str, artifacts: Artifacts, partition: int) -> PartitionResult:
        """Group the partition's hash rows and choose each group's survivor; the drops go to their shards.
        With an index of an earlier run (`partition_index`), only the rows of shards it does not cover are read
        and linked, against its group heads and each other; the index's heads and links carry the facts, so
        every group is decided again without reading old shards."""
        index = PartitionIndex.open(artifacts, "keys", stage, partition, self.num_shards)
        rows = concat_or_empty(artifacts.shuffled("keys", partition, index.new_shards), HASH_ROWS)
        heads, new_links = link_new_rows(index.base_heads, rows.select(HASH_ROWS.names).cast(HASH_ROWS))
        index.commit(heads, new_links, rows.num_rows, HEAD_ORDER)
        links = sorted_links([t for t in (index.base_links, new_links) if t is not None], MEMBER_LINKS)
        group_keys = unique_sorted(links["linked_key"].to_numpy())
        heads_rows = head_facts([*index.base_heads, heads], group_keys)
        members = pa.concat_tables([
            links.rename_columns({"linked_key": "group"}).select(["key", "group", *(n for n, _ in FACTS)]),
            heads_rows.add_column(1, "group", heads_rows["key"])]).combine_chunks()
        drops = choose_in_groups(members, self.protected(members))
        records = index.base_rows + rows.num_rows
        counters = {"records": float(records), "duplicates": float(drops.num_rows), "links": float(links.num_rows),
                    **{f"cluster_sizes.{k}": float(v) for k, v in cluster_sizes(drops["kept_id"]).items()},
                    **index.counters(rows.num_rows)}
        # Counts over every covered row, so a run on an index reports what one without it would.
        return PartitionResult(shuffle_rows(drops, drops["shard"].to_numpy().astype(np.int64)), records, counters)

    def drop_list(self, artifacts: Artifacts, shard: int) -> pa.Table | None:
        parts = list(artifacts.shuffled("resolve", shard))
        if not parts:
            return None
        t = pa.concat_tables(parts)
        return t.take(pc.sort_indices(t["row"]))
