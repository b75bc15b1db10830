"""`near_dedup` step: MinHash + LSH near-duplicate removal across all shards, shuffled by band hash.

Stages (each resumable on its own; no task holds the whole corpus):
  signatures (map)       per record: MinHash signature of the conversation's word n-gram shingles and its
                         LSH band hashes. Writes the shard's own rows (key = shard << 32 | row, id, keep
                         priority -reward, signature) and shuffles its band rows (key, band, band_hash) into
                         `band_partitions` partitions by band_hash, so every LSH bucket lies in one partition
  candidates (partition) per band partition: the keys that share a bucket with another key (the only ones
                         a link can name), shuffled to the shard that holds each key's signature
  gather (map)           per shard, over its own signature rows: the signatures, ids and priorities of its
                         candidate keys, shuffled to the band partitions that need them
  pairs (partition)      per band partition: candidate pairs from equal band hashes (star links per
                         bucket), verified by estimated Jaccard against the gathered signatures; emits the
                         verified links (key, linked_key) with both ends' ids and priorities
                         shuffled to the shard of the smallest key the linking key links to
                         (`pieces.link_routes`): a pair that collides in several bands is linked in several
                         partitions
  links (partition)      per shard: the links routed to it, each once, and their components there (pieces,
                         each labelled by its best record); every member's piece row goes to its own shard
  labels (partition)     per shard: each linked record's best piece, and a merge row for each other piece it
                         lies in (counted per pair of pieces)
  resolve (reduce)       components over the merge rows only (`pieces.resolve_merges`; records without a link
                         never enter it, and a cluster that is one piece makes no merge row): the survivor of
                         each label that took part in a merge, by shard; the cluster counts and sizes
  transform              drop listed rows with reason `near_duplicate` (detail: the kept record's id)
Partition stages run one task per shard, each over the partitions ``k mod shards``, one partition at a time.
Peak memory per task: one band partition (~20 bytes x bands x records / band_partitions) and the signatures
of its candidates (~0.5 KB each), or one shard's signature rows, or one shard's links or piece rows; the resolve
holds the merge rows only (a record linked to different smallest keys in different band partitions), and the
transform reads its shard's best pieces and the merge survivors they name. With a published version to protect
(no churn), protected records rank first in their pieces, and the resolve also reads the protected linked records
(to find exact copies among them: only the oldest row of an id is protected).
Data moved: each signature is read once by its own shard's gather task and sent only where it is a
candidate, so I/O grows with the corpus, not with corpus x tasks.
The decisions equal the in-memory `duplicate_components` on the whole set: every bucket is
processed whole, candidate links per bucket are independent of other buckets, and keys order records
the way the whole-set row numbers do.

Nights: each band partition keeps an index (`partition_index`) of its buckets' `CENTRES` smallest keys and
the links found so far. A night's `candidates` and `pairs` read only the band rows of shards the index does
not cover, with the index's centres of the buckets they touch; only those keys' signatures are gathered
(a shard with none reads nothing). A member's links depend only on the keys below it (`candidate_pairs`)
and new shards' keys are larger than old ones, so the links equal linking every band row again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from operators.core.arrays import run_starts, unique_sorted
from operators.core.step import (
    SHARD_ROWS,
    Artifacts,
    PartitionResult,
    ShardSpec,
    Stage,
    StageOutput,
    StepConfig,
    concat_or_empty,
    partition_by_shard,
    shuffle_partitions,
)
from operators.dedup.minhash import (
    EMPTY_BAND_HASH,
    MinHashParams,
    band_hashes,
    band_rows,
    candidate_pairs,
    jaccard_verifier,
    minhash_signatures,
)
from operators.steps.dedup.droplist import (
    KEY_SHIFT,
    LINKS_SCHEMA,
    DropListStep,
    NoChurnConfig,
    drop_rows,
    shuffle_rows,
    size_bins,
    sorted_links,
)
from operators.steps.dedup.partition_index import PartitionIndex, equal_rows
from operators.steps.dedup.pieces import (
    FINAL,
    PIECE_ROWS,
    final_drops,
    link_pieces,
    link_routes,
    node_labels,
    protected_rows,
    resolve_merges,
)
from operators.text.turns import joined_turns, turn_columns

REASON = "near_duplicate"
BAND_ROWS = pa.schema([("key", pa.int64()), ("band", pa.int32()), ("band_hash", pa.uint64())])
BUCKET_ORDER = ["band_hash", "band", "key"]  # how index centres are sorted: by hash, so a probe is a binary search
CENTRES = 4  # `candidate_pairs`' max_rounds: a member tries at most this many smallest keys of its bucket
# What picks a survivor travels with the links (both ends), so the resolve never reads a shard.
FACT_COLUMNS = ["key", "id", "priority"]
FACTS = pa.schema([("key", pa.int64()), ("id", pa.string()), ("priority", pa.float64())])
FACT_LINKS = pa.schema([("key", pa.int64()), ("linked_key", pa.int64()), ("id", pa.string()),
                        ("priority", pa.float64()), ("linked_id", pa.string()), ("linked_priority", pa.float64())])


class NearDedupConfig(NoChurnConfig):
    """MinHash/LSH parameters (num_perm, ngram, seed, threshold, bands/rows, verify) and the shuffle's size."""

    minhash: MinHashParams = Field(default_factory=MinHashParams)
    band_partitions: int | None = Field(
        None, ge=1, le=65_536,
        description="Partitions the band rows are shuffled into; a pairs task holds one at a time. "
                    "Default: one per shard, at least 64, so a partition stays about a shard's size.")


def conversation_texts(table: pa.Table) -> pa.Array:
    """The text compared for near-duplicates: every turn, in order, joined by newlines (an Arrow column: the
    signatures read its buffers, no Python string is made)."""
    _, values, offsets = turn_columns(table.column("conversations"))
    return joined_turns(values, offsets)


def band_partition(band_hash: npt.NDArray[np.uint64], partitions: int) -> npt.NDArray[np.int64]:
    """The shuffle partition of each band row: a bucket's rows share a band hash, so they meet in one."""
    return (band_hash % np.uint64(partitions)).astype(np.int64)


def shuffle_band_rows(rows: pa.Table, partitions: int) -> dict[int, pa.Table]:
    """Split band rows ``(key, band, band_hash)`` into their shuffle partitions (only non-empty ones)."""
    return shuffle_rows(rows, band_partition(rows.column("band_hash").to_numpy(), partitions)) if rows.num_rows else {}


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
    return unique_sorted(keys[size[bucket] >= 2])


def probe_centres(segments: list[pa.Table], rows: pa.Table) -> pa.Table:
    """The index rows (`BAND_ROWS`) of the buckets `rows` fall into: their kept smallest keys, from every
    segment (each sorted by `BUCKET_ORDER`), each row once (`equal_rows`). Pure."""
    return concat_or_empty([seg.take(pa.array(unique_sorted(at))).select(BAND_ROWS.names)
                            for seg, at, _ in equal_rows(segments, rows, "band_hash", ["band"])], BAND_ROWS)


def bucket_rows(segments: list[pa.Table], rows: pa.Table) -> tuple[pa.Table, pa.Table, npt.NDArray[np.int64]]:
    """What a night links, from its new band `rows` and the index `segments`: (the new rows with the index's
    centres of the buckets they touch; the new rows that become centres, in `BUCKET_ORDER`; the old keys).
    A row is a centre while fewer than `CENTRES` smaller keys share its bucket. Pure."""
    old = probe_centres(segments, rows)
    both = pa.concat_tables([old, rows.select(BAND_ROWS.names)])
    key, band, bhash = (both[c].to_numpy() for c in ("key", "band", "band_hash"))
    order = np.lexsort((key, band, bhash))
    k, bd, bh = key[order], band[order], bhash[order]
    first = np.ones(k.size, dtype=bool)
    first[1:] = (bd[1:] != bd[:-1]) | (bh[1:] != bh[:-1])
    distinct = first.copy()
    distinct[1:] |= k[1:] != k[:-1]  # a re-emitted key is one member
    rank = np.cumsum(distinct) - 1
    if k.size:
        rank -= np.maximum.accumulate(np.where(first, rank, 0))
    new_centre = distinct & (rank < CENTRES) & (order >= old.num_rows)
    return both, both.take(pa.array(order[new_centre])), old["key"].to_numpy()


class KeyedColumns:
    """Values of some records, looked up by key (sorted keys, binary search): the verifier's signatures."""

    def __init__(self, keys: npt.NDArray[np.int64], values: npt.NDArray[np.uint32]) -> None:
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.values = values[order]

    def __call__(self, keys: npt.NDArray[np.int64]) -> npt.NDArray[np.uint32]:
        pos = np.searchsorted(self.keys, keys)
        if keys.size and (pos.max() >= self.keys.size or not np.array_equal(self.keys[pos], keys)):
            raise KeyError("a candidate key has no gathered signature")  # a bug, never data: fail loudly
        return self.values[pos]


def with_facts(links: pa.Table, facts: pa.Table) -> pa.Table:
    """`links` (``key``, ``linked_key``) with the id and priority of both ends, looked up in `facts` (`FACTS`,
    every linked key at least once). Pure."""
    facts = facts.take(pc.sort_indices(facts["key"]))
    keys = facts["key"].to_numpy()

    def at(col: str) -> pa.Array:
        pos = np.searchsorted(keys, links[col].to_numpy())
        if pos.size and (pos.max() >= keys.size or not np.array_equal(keys[pos], links[col].to_numpy())):
            raise KeyError("a linked key has no gathered facts")  # a bug, never data: fail loudly
        return pa.array(pos, pa.int64())

    src, dst = at("key"), at("linked_key")
    return pa.table({"key": links["key"], "linked_key": links["linked_key"], "id": facts["id"].take(src),
                     "priority": facts["priority"].take(src), "linked_id": facts["id"].take(dst),
                     "linked_priority": facts["priority"].take(dst)}, schema=FACT_LINKS)


def linked_facts(links: pa.Table) -> pa.Table:
    """Each linked key once, sorted, with its priority (and its id when the links carry ids), from links that
    carry both ends' facts. Pure."""
    mine = [c for c in ("key", "id", "priority") if c in links.column_names]
    both = pa.concat_tables([
        links.select(mine), links.select([f"linked_{c}" if c != "key" else "linked_key" for c in mine])
        .rename_columns(mine)])
    return first_per_key(both)


def first_per_key(table: pa.Table) -> pa.Table:
    """The first row of each ``key`` of `table`, sorted by key. Pure."""
    keys = table["key"].to_numpy()
    order = np.argsort(keys, kind="stable")
    return table.take(pa.array(order[run_starts(keys[order])]))


def first_links(links: pa.Table) -> pa.Table:
    """Each link of `links` once, sorted by key, then linked key. Pure."""
    t = links.sort_by([("key", "ascending"), ("linked_key", "ascending")])
    return t.filter(pa.array(run_starts(t["key"].to_numpy(), t["linked_key"].to_numpy())))


def distinct_links(links: pa.Table) -> PartitionResult:
    """Each link of one partition once (the band partitions that found it each sent it), sorted. Pure."""
    out = first_links(links)
    return PartitionResult(out, links.num_rows, {"links": float(out.num_rows),
                                                 "repeats": float(links.num_rows - out.num_rows)})


def signature_matrix(table: pa.Table) -> npt.NDArray[np.uint32]:
    """The `signature` column of `table` as an ``(n, num_perm)`` matrix."""
    col = table.column("signature").combine_chunks()
    return np.asarray(col.flatten().to_numpy(), dtype=np.uint32).reshape(table.num_rows, -1)


def route_candidates(members: npt.NDArray[np.int64], partition: int) -> dict[int, pa.Table]:
    """Candidate keys of one band partition, shuffled to the shard that holds each key (``key >> 32``)."""
    rows = pa.table({"key": pa.array(members, pa.int64()),
                     "partition": pa.array(np.full(members.size, partition, dtype=np.int32))})
    return shuffle_rows(rows, (members >> KEY_SHIFT).astype(np.int64))


def gather_signatures(own: pa.Table, cand_keys: npt.NDArray[np.int64], cand_parts: npt.NDArray[np.int32],
                      signatures: bool = True) -> dict[int, pa.Table]:
    """Rows ``(key, id, priority, signature)`` of the candidates among `own` rows (without the signature when
    nothing verifies), shuffled to each partition that asked for them (a key may be a candidate in several).
    `cand_keys` sorted; `own` keys ascending."""
    keys = own.column("key").to_numpy()
    if keys.size == 0 or cand_keys.size == 0:
        return {}
    lo, hi = np.searchsorted(cand_keys, [keys[0], keys[-1] + 1])
    ck, cp = cand_keys[lo:hi], cand_parts[lo:hi]
    hit = np.isin(ck, keys, assume_unique=False)
    ck, cp = ck[hit], cp[hit]
    if ck.size == 0:
        return {}
    rows = own.select([*FACT_COLUMNS, *(["signature"] if signatures else [])]).take(
        pa.array(np.searchsorted(keys, ck)))
    return shuffle_rows(rows, cp.astype(np.int64))


class NearDedupStep(DropListStep[NearDedupConfig]):
    """Drop near-duplicates, keeping one record per cluster."""

    name: ClassVar[str] = "near_dedup"
    version: ClassVar[int] = 5  # components by pieces and merges (`pieces`): no task holds every link; same decisions
    config_model: ClassVar[type[StepConfig]] = NearDedupConfig
    stages: ClassVar[tuple[Stage, ...]] = (
        Stage("signatures", "map"), Stage("candidates", "partition", grouped=True),
        Stage("gather", "map", grouped=True), Stage("pairs", "partition", grouped=True),
        Stage("links", "partition", grouped=True), Stage("labels", "partition", grouped=True),
        Stage("resolve", "reduce"))
    per_shard_partitions: ClassVar[frozenset[str]] = frozenset({"links", "labels"})
    drop_reason: ClassVar[str] = REASON
    detail_prefix: ClassVar[str] = "near duplicate of"

    def __init__(self, config: NearDedupConfig) -> None:
        super().__init__(config)
        self._cand_keys = np.zeros(0, dtype=np.int64)
        self._cand_parts = np.zeros(0, dtype=np.int32)

    def stage_partitions(self, stage: str) -> int:
        # `candidates` reads band partitions; `pairs` reads what `gather` shuffled to the same partitions;
        # `links` reads what `pairs` shuffled to each shard, `labels` what `links` shuffled to each shard.
        if stage in self.per_shard_partitions:
            return self.num_shards
        return shuffle_partitions(self.config.band_partitions, self.num_shards)

    def map_input(self, stage: str, artifacts: Artifacts, shard: ShardSpec) -> Iterator[pa.RecordBatch]:
        if stage == "signatures":
            return self.read(shard)
        if self._cand_keys.size == 0:  # no partition needs a signature of this shard (most shards on a night)
            return iter(())
        return (b for t in artifacts.shard_rows("signatures", shard.index) for b in t.to_batches())

    def prepare_stage(self, stage: str, artifacts: Artifacts, shard: int) -> None:
        if stage == "gather":
            t = concat_or_empty(artifacts.shuffled("candidates", shard),
                                pa.schema([("key", pa.int64()), ("partition", pa.int32())]))
            order = pc.sort_indices(t["key"])
            self._cand_keys = t["key"].take(order).to_numpy()
            self._cand_parts = t["partition"].take(order).to_numpy()

    def map_stage(self, stage: str, batch: pa.RecordBatch, shard: int) -> pa.Table | dict[int, pa.Table]:
        if stage == "gather":
            return gather_signatures(pa.Table.from_batches([batch]), self._cand_keys, self._cand_parts,
                                     signatures=self.config.minhash.verify)
        p = self.config.minhash
        table = pa.Table.from_batches([batch])
        sig = minhash_signatures(conversation_texts(table), num_perm=p.num_perm, ngram=p.ngram, seed=p.seed,
                                 scheme=p.scheme)
        keys = self.next_keys(shard, table.num_rows)
        reward = table.column("reward").to_numpy(zero_copy_only=False).astype(np.float64)
        own = pa.table({
            "key": pa.array(keys), "id": table.column("id"),
            "priority": pa.array(np.where(np.isnan(reward), np.inf, -reward)),
            "signature": pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel()), sig.shape[1]),
        })
        shuffled = shuffle_band_rows(band_rows(keys, band_hashes(sig, *p.lsh())), self.stage_partitions("pairs"))
        return {SHARD_ROWS: own, **shuffled}

    def partition_stage(self, stage: str, artifacts: Artifacts, partition: int) -> PartitionResult:
        if stage == "links":
            links = distinct_links(concat_or_empty(artifacts.shuffled("pairs", partition), FACT_LINKS))
            assert isinstance(links.rows, pa.Table)
            facts = linked_facts(links.rows)
            rows, sizes = link_pieces(links.rows, facts, partition, self.protected(facts))
            by_shard = shuffle_rows(rows, (rows["key"].to_numpy() >> KEY_SHIFT).astype(np.int64))
            return PartitionResult({SHARD_ROWS: sizes, **by_shard}, links.rows_in,
                                   {**links.counters, "pieces": float(sizes["pieces"].to_numpy().sum())})
        if stage == "labels":
            best, merges = node_labels(concat_or_empty(artifacts.shuffled("links", partition), PIECE_ROWS))
            mine = protected_rows(best)
            # Protected records go to the merge task through a partition past the shards' (`protected_channel`).
            return PartitionResult({SHARD_ROWS: merges, **({partition: best} if best.num_rows else {}),
                                    **({self.protected_channel: mine} if mine.num_rows else {})},
                                   best.num_rows, {"linked": float(best.num_rows), "merges": float(merges.num_rows),
                                                   "protected": float(mine.num_rows)})
        verify = self.config.minhash.verify
        # `candidates` only reads the index; `pairs` links against it and commits.
        index = PartitionIndex.open(artifacts, "signatures", "pairs", partition, self.num_shards,
                                    with_links=stage == "pairs")
        new_rows = concat_or_empty(artifacts.shuffled("signatures", partition, index.new_shards), BAND_ROWS)
        rows, centres, old_keys = bucket_rows(index.base_heads, new_rows)
        rows_in = index.base_rows + new_rows.num_rows
        if stage == "candidates":
            members = bucket_members(rows)
            return PartitionResult(route_candidates(members, partition), rows_in,
                                   {"candidate_keys": float(members.size)})
        verifier = None
        sigs = concat_or_empty(artifacts.shuffled("gather", partition), FACTS)
        gathered = sigs.num_rows
        if verify:
            keyed = KeyedColumns(sigs["key"].to_numpy(), signature_matrix(sigs) if gathered else
                                 np.zeros((0, 1), dtype=np.uint32))
            verifier = jaccard_verifier(keyed, self.config.minhash.threshold)
        links = candidate_pairs(rows, verify=verifier, max_rounds=CENTRES).cast(LINKS_SCHEMA)
        # Links between two old keys are the index's already (a member links only to keys below it).
        new_links = links.filter(pa.array(~np.isin(links["key"].to_numpy(), old_keys)))
        new_links = with_facts(new_links, sigs.select(FACT_COLUMNS))
        index.commit(centres, new_links, new_rows.num_rows, BUCKET_ORDER)
        all_links = sorted_links([t for t in (index.base_links, new_links) if t is not None], FACT_LINKS)
        by_shard = shuffle_rows(all_links, link_routes(all_links))
        return PartitionResult(by_shard, rows_in, {"signatures_gathered": float(gathered),
                                                   "links": float(all_links.num_rows),
                                                   **index.counters(new_rows.num_rows)})

    @property
    def protected_channel(self) -> int:
        """The `labels` partition past every shard's that holds the protected linked records."""
        return self.num_shards

    def reduce_stage(self, stage: str, artifacts: Artifacts, num_shards: int) -> StageOutput:
        """Components over the merges of the pieces only (`resolve_merges`): the survivor of each label that took
        part in a merge, by shard, the protected records that are copies, and the cluster sizes."""
        final, sizes = resolve_merges(artifacts.iter_tables("labels"), artifacts.iter_tables("links"),
                                      artifacts.shuffled("labels", self.protected_channel))
        size, count = sizes["size"].to_numpy(), sizes["pieces"].to_numpy()
        clusters = int(count.sum())
        return StageOutput(partitions=partition_by_shard(final), summary={
            "records": artifacts.records_in("signatures"), "near_duplicates": int((size * count).sum()) - clusters,
            "clusters": clusters, "cluster_sizes": size_bins(size, count),
            "merged_labels": final.num_rows - int(np.count_nonzero(final["copy"].to_numpy(zero_copy_only=False)))})

    def drop_list(self, artifacts: Artifacts, shard: int) -> pa.Table | None:
        """Shard `shard`'s drops: its linked records' best pieces (`labels`) with the merge task's rows."""
        best = concat_or_empty(artifacts.shuffled("labels", shard), PIECE_ROWS)
        keys, kept_ids = final_drops(best, artifacts.iter_tables("resolve", columns=FINAL.names))
        return drop_rows(keys, kept_ids) if keys.size else None


__all__ = ["NearDedupConfig", "NearDedupStep", "bucket_members", "conversation_texts", "gather_signatures",
           "route_candidates", "shuffle_band_rows"]
