"""What exact and near-duplicate removal share.

Both run as map -> shuffle -> partitioned reduce -> resolve -> transform:
  map          per record: a record key (``shard << 32 | row``) and the facts that pick a survivor (own rows),
               plus hash rows shuffled by hash into partitions (`shuffle_rows`), so equal hashes meet
  partition    per shuffle partition, in parallel tasks: duplicate links ``(key, linked_key)``
  resolve      connected components over the links only (a record without a duplicate never enters it),
               the survivor of each component, and per-shard drop lists (`resolve_links`)
  transform    drop exactly the listed rows (`DropListStep.transform`)
A partition task holds one partition's hash rows. exact_dedup decides per partition; near_dedup finds its
components in pieces per link partition and merges only what the pieces leave apart (`pieces`);
semantic_dedup's resolve holds its links and their records' facts in one task (`resolve_links`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from operators.core.arrays import unique_sorted
from operators.core.step import (
    Artifacts,
    BatchResult,
    StageOutput,
    Step,
    StepConfig,
    concat_or_empty,
    dropped_table,
    partition_by_shard,
    table_digest,
)
from operators.dedup.minhash import components_from_links

N = TypeVar("N", bound="NoChurnConfig")

KEY_SHIFT = np.int64(32)
ROW_MASK = np.int64(0xFFFFFFFF)
LINKS_SCHEMA = pa.schema([("key", pa.int64()), ("linked_key", pa.int64())])

Keys = npt.NDArray[np.int64]


def record_keys(shard: int, first_row: int, n: int) -> Keys:
    """Keys of `n` records of `shard` from row `first_row` on: unique across shards, ordered like read order."""
    return (np.int64(shard) << KEY_SHIFT) + np.arange(first_row, first_row + n, dtype=np.int64)


def shuffle_rows(rows: pa.Table, partition: npt.NDArray[np.int64]) -> dict[int, pa.Table]:
    """Split `rows` by their shuffle `partition` (one per row) into one table per non-empty partition."""
    if rows.num_rows == 0:
        return {}
    order = np.argsort(partition, kind="stable")
    sorted_part = partition[order]
    cuts = np.flatnonzero(np.diff(sorted_part)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(order)]])
    taken = rows.take(pa.array(order))
    return {int(sorted_part[s]): taken.slice(s, e - s) for s, e in zip(starts, ends, strict=True)}


def links_table(src: Keys, dst: Keys) -> pa.Table:
    return pa.table({"key": pa.array(src, pa.int64()), "linked_key": pa.array(dst, pa.int64())})


def sorted_links(tables: list[pa.Table], schema: pa.Schema = LINKS_SCHEMA) -> pa.Table:
    """Links as one table sorted by (key, linked_key): equal link sets give equal files."""
    t = concat_or_empty(tables, schema)
    return t.sort_by([("key", "ascending"), ("linked_key", "ascending")])


def linked_rows(artifacts: Artifacts, stage: str, linked: Keys, columns: list[str]) -> tuple[int, pa.Table]:
    """One pass over map stage `stage`'s own rows: (records seen, the `columns` of the `linked` keys by key).

    `linked` must be sorted and distinct; only those rows are kept, so memory follows the duplicates."""
    records = 0
    found: list[pa.Table] = []
    for t in artifacts.iter_tables(stage, columns=["key", *columns] if linked.size else ["key"]):
        records += t.num_rows
        if linked.size:
            idx = np.flatnonzero(np.isin(t.column("key").to_numpy(), linked, assume_unique=True))
            if idx.size:
                found.append(t.take(pa.array(idx)))
    if not linked.size:
        return records, pa.table({"key": pa.array([], pa.int64())})
    rows = pa.concat_tables(found).combine_chunks() if found else None
    if rows is not None:
        rows = rows.take(pc.sort_indices(rows["key"]))
    if rows is None or not np.array_equal(rows["key"].to_numpy(), linked):
        raise ValueError("links name keys that no shard's map output holds")  # stale or mixed stages
    return records, rows


class NoChurnConfig(StepConfig):
    """What a dedup step must not take back: the records of a published dataset version."""

    published: str | None = Field(
        None, description="A dataset folder (<data root>/datasets/<name>): the records of its LATEST version, and "
        "every record this step kept in that version's run, are never dropped as duplicates of records that "
        "arrive later (no churn); each one survives its cluster. None: every record competes on the usual "
        "survivor rule.")


def published_mask(dataset_uri: str | None, step: str, ids: pa.Array | pa.ChunkedArray) -> npt.NDArray[np.bool_]:
    """Which of `ids` the LATEST version of the dataset at `dataset_uri` protects from dedup step `step`: its
    records and the ones `step` kept in its run (none when `dataset_uri` is None)."""
    if dataset_uri is None or len(ids) == 0:
        return np.zeros(len(ids), dtype=bool)
    from operators.datasets.versions import id_hash, published_id_hashes  # storage-facing; only when configured

    _, published = published_id_hashes(dataset_uri, step)
    return np.isin(id_hash(ids.to_pylist()).to_numpy(), published)


def resolve_links(artifacts: Artifacts, *, links_stage: str, rows_stage: str, columns: list[str],
                  priority: Callable[[pa.Table], npt.ArrayLike],
                  protected: Callable[[pa.Table], npt.NDArray[np.bool_]] | None = None) -> tuple[pa.Table, int, int]:
    """Components of the links of `links_stage` and the drop list they imply (`decide_components`), with the
    linked records' ``id`` and `columns` read from map stage `rows_stage`'s own rows (one pass over every
    shard's rows; memory follows the duplicates). Returns (drops, records seen, components)."""
    links = concat_or_empty(artifacts.iter_tables(links_stage), LINKS_SCHEMA)
    linked = unique_sorted(np.concatenate([links.column("key").to_numpy(), links.column("linked_key").to_numpy()]))
    records, rows = linked_rows(artifacts, rows_stage, linked, ["id", *columns])
    drops, components = decide_components(links, rows, priority, protected)
    return drops, records, components


def decide_components(links: pa.Table, rows: pa.Table, priority: Callable[[pa.Table], npt.ArrayLike],
                      protected: Callable[[pa.Table], npt.NDArray[np.bool_]] | None = None,
                      ids_of: Callable[[Keys], pa.Array] | None = None) -> tuple[pa.Table, int]:
    """Components of `links` (``key``, ``linked_key``) and the drop list they imply.

    `rows` holds every linked key once, sorted by key, with what `priority` reads and ``id`` (not needed when
    nothing is `protected` and `ids_of` gives the ids of the sorted distinct survivor keys it is asked for).
    The survivor of a component has the smallest ``priority(rows)``, then the smallest key. Rows that
    `protected` marks (published records) survive first and are never dropped, even when one component holds
    several. Returns (drops as ``shard, row, kept_id``; components)."""
    empty = pa.table({"shard": pa.array([], pa.int32()), "row": pa.array([], pa.int64()),
                      "kept_id": pa.array([], pa.string())})
    if links.num_rows == 0:
        return empty, 0
    prio = np.asarray(priority(rows), dtype=np.float64)
    keep_always = protected(rows) if protected is not None else np.zeros(rows.num_rows, dtype=bool)
    if keep_always.any():
        # Ids are content hashes, so an exact copy carries its original's id: protect one row per id, the one
        # with the smallest key (rows are sorted by key; an older shard's row), never its copies.
        at = np.flatnonzero(keep_always)
        _, first = np.unique(np.asarray(rows["id"].take(pa.array(at)).to_pylist(), dtype=object), return_index=True)
        keep_always = np.zeros(rows.num_rows, dtype=bool)
        keep_always[at[first]] = True
    prio = np.where(keep_always, -np.inf, prio)
    keys_sorted = rows["key"].to_numpy()

    def by_key(keys: Keys) -> npt.NDArray[np.float64]:
        return prio[np.searchsorted(keys_sorted, keys)]

    comps = components_from_links(links, priority=by_key)
    dropped = pc.invert(comps["keep"])
    if keep_always.any():
        dropped = pc.and_(dropped, pa.array(~keep_always[np.searchsorted(keys_sorted, comps["key"].to_numpy())]))
    drops = comps.filter(dropped)
    keys = drops["key"].to_numpy()
    keep_keys = drops["keep_key"].to_numpy()
    if ids_of is None:
        kept_ids = rows["id"].take(pa.array(np.searchsorted(keys_sorted, keep_keys)))
    else:
        survivors = unique_sorted(keep_keys)
        kept_ids = ids_of(survivors).take(pa.array(np.searchsorted(survivors, keep_keys)))
    return drop_rows(keys, kept_ids), int(comps.filter(comps["keep"]).num_rows)


def drop_rows(keys: Keys, kept_ids: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The drop list ``shard, row, kept_id`` of the dropped record `keys`, each with its survivor's id."""
    return pa.table({"shard": pa.array((keys >> KEY_SHIFT).astype(np.int32)),
                     "row": pa.array(keys & ROW_MASK), "kept_id": kept_ids.cast(pa.string())})


CLUSTER_BINS = ((2, 2), (3, 3), (4, 5), (6, 10), (11, 100), (101, None))


def cluster_sizes(kept_ids: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """How many duplicate clusters have each size (survivor + its drops), in fixed bins (additive)."""
    if len(kept_ids) == 0:
        return {}
    sizes = pc.value_counts(kept_ids).field("counts").to_numpy() + 1
    return size_bins(sizes, np.ones(sizes.size, dtype=np.int64))


def size_bins(sizes: npt.NDArray[np.int64], counts: npt.NDArray[np.int64]) -> dict[str, int]:
    """`counts` clusters of each of `sizes` (records per cluster, survivor included), in `CLUSTER_BINS`."""
    out = {}
    for lo, hi in CLUSTER_BINS:
        n = int(counts[(sizes >= lo) & ((sizes <= hi) if hi else True)].sum())
        if n:
            out[str(lo) if lo == hi else (f"{lo}-{hi}" if hi else f">{lo - 1}")] = n
    return out


def drop_lists(drops: pa.Table, summary: dict[str, Any]) -> StageOutput:
    """The resolve stage's output: one drop list per shard that has drops, and the cluster-size histogram."""
    return StageOutput(partitions=partition_by_shard(drops),
                       summary={**summary, "cluster_sizes": cluster_sizes(drops["kept_id"])})


class DropListStep(Step[N]):
    """A step whose reduce stage `resolve` lists (shard, row, kept_id) to drop with reason `drop_reason`.

    Rows are numbered per shard in read order, which is deterministic, so the map stage and the
    transform agree on them.
    """

    drop_reason: ClassVar[str]
    detail_prefix: ClassVar[str]  # "duplicate of" -> detail "duplicate of <kept id>"

    def __init__(self, config: N) -> None:
        super().__init__(config)
        self._row = 0
        self._drop_rows = np.zeros(0, dtype=np.int64)  # sorted
        self._drop_details = pa.array([], pa.string())  # "duplicate of <kept id>", in `_drop_rows` order
        self._digested: tuple[str, int, pa.Table | None] | None = None  # (step dir, shard, its drop list)

    def begin_shard(self, shard: int) -> None:
        self._row = 0

    def next_keys(self, shard: int, n: int) -> Keys:
        """Keys of the next `n` records of `shard` in read order (map stages number rows as they read)."""
        keys = record_keys(shard, self._row, n)
        self._row += n
        return keys

    def protected(self, rows: pa.Table) -> npt.NDArray[np.bool_]:
        """Which linked rows the no-churn rule keeps (`resolve_links`'s `protected`): see `NoChurnConfig`."""
        return published_mask(self.config.published, self.name, rows["id"])

    def drop_list(self, artifacts: Artifacts, shard: int) -> pa.Table | None:
        """Shard `shard`'s drops (``row``, ``kept_id``), sorted by row; None when it has none. Here the reduce
        stage `resolve`'s table for the shard; a step that resolves per partition reads what they shuffled."""
        return artifacts.partition("resolve", shard)

    def transform_digest(self, artifacts: Artifacts, shard: int) -> str | None:
        # The transform reads only the shard's drop list: an unchanged list means an unchanged output. A shard
        # task digests it just before `bind`, so the list is kept for that bind rather than read twice.
        t = self.drop_list(artifacts, shard)
        self._digested = (artifacts.step_dir, shard, t)
        return table_digest(t)

    def bind(self, artifacts: Artifacts, shard: int) -> None:
        held, self._digested = self._digested, None
        t = held[2] if held is not None and held[:2] == (artifacts.step_dir, shard) else \
            self.drop_list(artifacts, shard)
        if t is None or t.num_rows == 0:
            self._drop_rows, self._drop_details = np.zeros(0, dtype=np.int64), pa.array([], pa.string())
            return
        t = t.sort_by("row")
        self._drop_rows = t["row"].to_numpy()
        self._drop_details = pc.binary_join_element_wise(self.detail_prefix, t["kept_id"].combine_chunks(), " ")

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        # Vectorized: the batch's rows are a range, the drop list sorted rows; a binary search finds the listed.
        table = pa.Table.from_batches([batch])
        lo, hi = np.searchsorted(self._drop_rows, [self._row, self._row + table.num_rows])
        self._row += table.num_rows
        mask = np.zeros(table.num_rows, dtype=bool)
        mask[self._drop_rows[lo:hi] - (self._row - table.num_rows)] = True
        dropped = table.filter(pa.array(mask))
        details = self._drop_details.slice(int(lo), int(hi - lo)).to_pylist()
        return BatchResult(kept=table.filter(pa.array(~mask)),
                           dropped=dropped_table(dropped, [self.drop_reason] * dropped.num_rows, details))
