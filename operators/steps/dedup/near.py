"""`near_dedup` step: MinHash + LSH near-duplicate removal across all shards, shuffled by band hash.

Stages (each resumable on its own; no stage holds the whole corpus):
  signatures (map)  per record: MinHash signature of the conversation's word n-gram shingles and its LSH
                    band hashes. Writes the shard's own rows (key = shard << 32 | row, id, keep priority
                    -reward, signature) and shuffles its band rows (key, band, band_hash) into
                    `band_partitions` partitions by band_hash, so every LSH bucket lies in one partition
  pairs (reduce)    one band partition at a time: candidate pairs from equal band hashes (star links per
                    bucket), verified by estimated Jaccard against signatures fetched for the partitions'
                    candidate keys only, in groups of partitions whose candidates fit
                    `max_candidate_signatures`; emits the verified links (key, linked_key)
  resolve (reduce)  connected components over the links only (records without a link never enter it);
                    each component keeps its highest-reward record (then the smallest key); per-shard
                    drop lists
  transform         drop listed rows with reason `near_duplicate` (detail: the kept record's id)
Peak memory: one band partition (~20 bytes x bands per record / band_partitions), one shard's signature
table, at most `max_candidate_signatures` signatures (~0.5 KB each), and the link list (16 bytes per
duplicate). The decisions equal the in-memory `duplicate_components` on the whole set: every bucket is
processed whole, candidate links per bucket are independent of other buckets, and keys order records
the way the whole-set row numbers do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from operators.core.step import SHARD_ROWS, Artifacts, Stage, StageOutput, StepConfig, partition_by_shard
from operators.dedup.minhash import (
    EMPTY_BAND_HASH,
    MinHashParams,
    band_hashes,
    band_rows,
    candidate_pairs,
    components_from_links,
    jaccard_verifier,
    minhash_signatures,
)
from operators.steps.dedup.droplist import DropListStep

REASON = "near_duplicate"
KEY_SHIFT = np.int64(32)
ROW_MASK = np.int64(0xFFFFFFFF)
LINKS_SCHEMA = pa.schema([("key", pa.int64()), ("linked_key", pa.int64())])


class NearDedupConfig(StepConfig):
    """MinHash/LSH parameters (num_perm, ngram, seed, threshold, bands/rows, verify) and the shuffle's size."""

    minhash: MinHashParams = Field(default_factory=MinHashParams)
    band_partitions: int = Field(
        64, ge=1, le=65_536,
        description="Partitions the band rows are shuffled into; the pairs stage holds one at a time.")
    max_candidate_signatures: int = Field(
        2_000_000, ge=1,
        description="Signatures the pairs stage holds at once for verification (~0.5 KB each).")


def conversation_texts(table: pa.Table) -> list[str]:
    """The text compared for near-duplicates: every turn, in order."""
    return ["\n".join(t["value"] for t in conv) for conv in table.column("conversations").to_pylist()]


def band_partition(band_hash: npt.NDArray[np.uint64], partitions: int) -> npt.NDArray[np.int64]:
    """The shuffle partition of each band row: a bucket's rows share a band hash, so they meet in one."""
    return (band_hash % np.uint64(partitions)).astype(np.int64)


def shuffle_band_rows(rows: pa.Table, partitions: int) -> dict[int, pa.Table]:
    """Split band rows ``(key, band, band_hash)`` into their shuffle partitions (only non-empty ones)."""
    if rows.num_rows == 0:
        return {}
    part = band_partition(rows.column("band_hash").to_numpy(), partitions)
    order = np.argsort(part, kind="stable")
    sorted_part = part[order]
    cuts = np.flatnonzero(np.diff(sorted_part)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(order)]])
    taken = rows.take(pa.array(order))
    return {int(sorted_part[s]): taken.slice(s, e - s) for s, e in zip(starts, ends, strict=True)}


def bucket_members(rows: pa.Table) -> npt.NDArray[np.int64]:
    """Sorted distinct keys of the band rows that share their (band, band_hash) with another key.

    Only these keys can take part in a candidate link, so only their signatures are ever fetched."""
    keys = rows.column("key").to_numpy()
    band = rows.column("band").to_numpy().astype(np.int64)
    bhash = rows.column("band_hash").to_numpy()
    live = bhash != EMPTY_BAND_HASH
    keys, band, bhash = keys[live], band[live], bhash[live]
    if keys.size < 2:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((keys, bhash, band))
    keys, band, bhash = keys[order], band[order], bhash[order]
    new_bucket = np.ones(keys.size, dtype=bool)
    new_bucket[1:] = (band[1:] != band[:-1]) | (bhash[1:] != bhash[:-1])
    bucket = np.cumsum(new_bucket) - 1
    # Distinct keys per bucket (a re-emitted shard repeats a key), then buckets with two or more.
    distinct = np.ones(keys.size, dtype=bool)
    distinct[1:] = new_bucket[1:] | (keys[1:] != keys[:-1])
    size = np.bincount(bucket[distinct], minlength=int(bucket[-1]) + 1)
    return np.unique(keys[size[bucket] >= 2])


class KeyedColumns:
    """Values of some records, looked up by key (sorted keys, binary search): the verifier's signatures."""

    def __init__(self, keys: npt.NDArray[np.int64], values: npt.NDArray[np.uint32]) -> None:
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.values = values[order]

    def __call__(self, keys: npt.NDArray[np.int64]) -> npt.NDArray[np.uint32]:
        pos = np.searchsorted(self.keys, keys)
        if keys.size and (pos.max() >= self.keys.size or not np.array_equal(self.keys[pos], keys)):
            raise KeyError("a candidate key has no fetched signature")  # a bug, never data: fail loudly
        return self.values[pos]


def _signature_matrix(table: pa.Table) -> npt.NDArray[np.uint32]:
    col = table.column("signature").combine_chunks()
    return np.asarray(col.flatten().to_numpy(), dtype=np.uint32).reshape(table.num_rows, -1)


def fetch_signatures(tables: Iterator[pa.Table], wanted: npt.NDArray[np.int64]) -> KeyedColumns:
    """The signatures of the `wanted` keys (sorted), gathered from the shards' own signature tables."""
    keys_out: list[npt.NDArray[np.int64]] = []
    sigs_out: list[npt.NDArray[np.uint32]] = []
    for t in tables:
        keys = t.column("key").to_numpy()
        hit = np.isin(keys, wanted, assume_unique=True)
        if hit.any():
            idx = np.flatnonzero(hit)
            keys_out.append(keys[idx])
            sigs_out.append(_signature_matrix(t.take(pa.array(idx))))
    if not keys_out:
        return KeyedColumns(np.zeros(0, dtype=np.int64), np.zeros((0, 1), dtype=np.uint32))
    return KeyedColumns(np.concatenate(keys_out), np.concatenate(sigs_out))


def group_partitions(candidates: list[npt.NDArray[np.int64]], budget: int) -> list[list[int]]:
    """Consecutive partitions grouped so each group's candidate keys number at most `budget` (or one alone)."""
    groups: list[list[int]] = []
    size = 0
    for k, c in enumerate(candidates):
        if groups and size + c.size <= budget:
            groups[-1].append(k)
            size += c.size
        else:
            groups.append([k])
            size = c.size
    return groups


class NearDedupStep(DropListStep[NearDedupConfig]):
    """Drop near-duplicates, keeping one record per cluster."""

    name: ClassVar[str] = "near_dedup"
    version: ClassVar[int] = 2  # stages reorganized as a shuffle by band; decisions unchanged
    config_model: ClassVar[type[StepConfig]] = NearDedupConfig
    stages: ClassVar[tuple[Stage, ...]] = (Stage("signatures", "map"), Stage("pairs", "reduce"),
                                           Stage("resolve", "reduce"))
    drop_reason: ClassVar[str] = REASON
    detail_prefix: ClassVar[str] = "near duplicate of"

    def map_stage(self, stage: str, batch: pa.RecordBatch, shard: int) -> pa.Table | dict[int, pa.Table]:
        p = self.config.minhash
        table = pa.Table.from_batches([batch])
        sig = minhash_signatures(conversation_texts(table), num_perm=p.num_perm, ngram=p.ngram, seed=p.seed,
                                 scheme=p.scheme)
        n = table.num_rows
        keys = (np.int64(shard) << KEY_SHIFT) + np.arange(self._row, self._row + n, dtype=np.int64)
        self._row += n
        reward = table.column("reward").to_numpy(zero_copy_only=False).astype(np.float64)
        own = pa.table({
            "key": pa.array(keys), "id": table.column("id"),
            "priority": pa.array(np.where(np.isnan(reward), np.inf, -reward)),
            "signature": pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel()), sig.shape[1]),
        })
        shuffled = shuffle_band_rows(band_rows(keys, band_hashes(sig, *p.lsh())), self.config.band_partitions)
        return {SHARD_ROWS: own, **shuffled}

    def reduce_stage(self, stage: str, artifacts: Artifacts, num_shards: int) -> StageOutput:
        if stage == "pairs":
            return self._pairs(artifacts)
        return self._resolve(artifacts, num_shards)

    def _partition_rows(self, artifacts: Artifacts, k: int) -> pa.Table:
        parts = list(artifacts.shuffled("signatures", k))
        if not parts:
            return pa.table({"key": pa.array([], pa.int64()), "band": pa.array([], pa.int32()),
                             "band_hash": pa.array([], pa.uint64())})
        return pa.concat_tables(parts)

    def _pairs(self, artifacts: Artifacts) -> StageOutput:
        """Verified candidate links, one band partition at a time, signatures fetched per partition group."""
        p = self.config.minhash
        parts = self.config.band_partitions
        # Pass 1: which keys can be linked at all (bucket members), per partition: 8 bytes per key.
        candidates = [bucket_members(self._partition_rows(artifacts, k)) for k in range(parts)]
        out: dict[int, pa.Table] = {}
        fetched = 0
        for group in group_partitions(candidates, self.config.max_candidate_signatures):
            wanted = np.unique(np.concatenate([candidates[k] for k in group]))
            verify = None
            if p.verify and wanted.size:
                sigs = fetch_signatures(artifacts.iter_tables("signatures"), wanted)
                fetched += int(sigs.keys.size)
                verify = jaccard_verifier(sigs, p.threshold)
            for k in group:
                if candidates[k].size == 0:
                    continue
                links = candidate_pairs(self._partition_rows(artifacts, k), verify=verify)
                if links.num_rows:
                    out[k] = links.cast(LINKS_SCHEMA)
        return StageOutput(partitions=out, summary={
            "candidate_keys": int(sum(c.size for c in candidates)), "signatures_fetched": fetched,
            "links": int(sum(t.num_rows for t in out.values()))})

    def _resolve(self, artifacts: Artifacts, num_shards: int) -> StageOutput:
        """Components over the links only; the survivor of each and per-shard drop lists."""
        links = pa.concat_tables([LINKS_SCHEMA.empty_table(), *artifacts.iter_tables("pairs")])
        linked = np.unique(np.concatenate([links.column("key").to_numpy(), links.column("linked_key").to_numpy()]))
        records = 0
        # One pass over the shards' own rows: count records, fetch priority and id of linked keys only.
        lk: list[npt.NDArray[np.int64]] = []
        lp: list[npt.NDArray[np.float64]] = []
        lid: list[pa.Array] = []
        for t in artifacts.iter_tables("signatures"):
            records += t.num_rows
            if linked.size == 0:
                continue
            keys = t.column("key").to_numpy()
            idx = np.flatnonzero(np.isin(keys, linked, assume_unique=True))
            if idx.size:
                sel = pa.array(idx)
                lk.append(keys[idx])
                lp.append(t.column("priority").take(sel).to_numpy())
                lid.append(t.column("id").take(sel).combine_chunks())
        if linked.size == 0:
            return StageOutput(summary={"records": records, "near_duplicates": 0, "clusters": 0})
        all_keys = np.concatenate(lk)
        order = np.argsort(all_keys)
        all_keys, prio = all_keys[order], np.concatenate(lp)[order]
        ids = pa.concat_arrays(lid).take(pa.array(order))
        if not np.array_equal(all_keys, linked):
            raise ValueError("links name keys that no shard's signatures hold")  # stale or mixed stages

        def priority(keys: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
            return prio[np.searchsorted(all_keys, keys)]

        comps = components_from_links(links, priority=priority)
        drops = comps.filter(pc.invert(comps["keep"]))
        keys = drops["key"].to_numpy()
        kept_ids = ids.take(pa.array(np.searchsorted(all_keys, drops["keep_key"].to_numpy())))
        table = pa.table({"shard": pa.array((keys >> KEY_SHIFT).astype(np.int32)),
                          "row": pa.array(keys & ROW_MASK), "kept_id": kept_ids.cast(pa.string())})
        return StageOutput(partitions=partition_by_shard(table), summary={
            "records": records, "near_duplicates": len(keys),
            "clusters": int(comps.filter(comps["keep"]).num_rows)})


__all__ = ["NearDedupConfig", "NearDedupStep", "bucket_members", "conversation_texts", "group_partitions",
           "shuffle_band_rows"]
