"""Connected components of duplicate links without a task that holds every link: pieces, then their merges.

A single resolve over every link holds every linked record (about 56 bytes each), so it grows with the corpus.
Here the components are found in three steps, each bounded by a partition or by what is left to merge:

  pieces (per link partition)  the components of the links one partition holds (`link_pieces`): each piece's
                               label is its best member (smallest priority, then smallest key) and its size;
                               every member gets a row naming its piece, sent to the member's own shard
  labels (per shard)           each record of the shard in one piece keeps it; a record in several pieces
                               keeps the best and joins the others to it (`node_labels`: a merge row per
                               extra piece, counted per pair of pieces)
  merges (one task)            components over the merge rows only (`resolve_merges`): the final survivor of
                               each label that took part in a merge, and the component sizes

Why it is exact: every link lies in some piece, so pieces joined through their shared records are the
components. A piece's label is its best member, so the best label of a merged component is the component's best
record, the survivor `decide_components` picks. A component's size is the sum of its pieces' sizes less one per
extra piece membership of a record (the merge rows' counts).

Why it stays small: the link partitions send every link of a record to the shard of the smallest key it links
to (`link_routes`), so a cluster whose members all link to its smallest record (near-identical copies: every
band's bucket has the same smallest key) is one piece, and only records that link to different smallest keys
in different band partitions make merge rows. The merge task's input grows with those, not with the linked
records (measured in docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from operators.core.arrays import in_sorted, run_starts, unique_sorted
from operators.core.step import concat_or_empty
from operators.dedup.unionfind import choose_keepers, connected_components, node_dtype

KEY_SHIFT = np.int64(32)

# One row per (record, piece): the record's key, id and whether a published version protects it (no churn), and
# its piece (link partition, label and the label's facts, size).
PIECE_ROWS = pa.schema([("key", pa.int64()), ("id", pa.string()), ("protected", pa.bool_()), ("part", pa.int32()),
                        ("label", pa.int64()), ("label_priority", pa.float64()), ("label_id", pa.string()),
                        ("size", pa.int64())])
# A protected linked record, with its best piece: the merge task finds the copies among them (`resolve_merges`).
PROTECTED = pa.schema([("key", pa.int64()), ("id", pa.string()), ("label", pa.int64()), ("size", pa.int64())])
# How many pieces of each size a link partition found.
PIECE_SIZES = pa.schema([("size", pa.int64()), ("pieces", pa.int64())])
# A piece joined to another (`into_`) through `nodes` records that lie in both.
_END = [("part", pa.int32()), ("label", pa.int64()), ("label_priority", pa.float64()), ("label_id", pa.string()),
        ("size", pa.int64())]
MERGES = pa.schema([*_END, *((f"into_{n}", t) for n, t in _END), ("nodes", pa.int64())])
# The survivor of each label that took part in a merge, by the label's shard; and (`copy` true, `label` the
# record's key) each protected record that is an exact copy of another in its cluster, so not protected.
FINAL = pa.schema([("shard", pa.int32()), ("label", pa.int64()), ("kept", pa.int64()), ("kept_id", pa.string()),
                   ("copy", pa.bool_())])


def link_routes(links: pa.Table) -> npt.NDArray[np.int64]:
    """The shard each link goes to for its piece: the shard of the smallest key its ``key`` links to among
    `links` (sorted by key, then linked key), so the links of a record travel together, to its cluster's
    smallest record when it links to that one. Pure."""
    key = links["key"].to_numpy()
    linked = links["linked_key"].to_numpy()
    if key.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(run_starts(key))
    first = np.repeat(linked[starts], np.diff(np.append(starts, key.size)))
    return (first >> KEY_SHIFT).astype(np.int64)


def priority_ranks(priority: npt.NDArray[np.float64], keys: npt.NDArray[np.int64]) -> npt.NDArray[np.signedinteger]:
    """Each of `keys` (ascending) ranked by its priority, then its key: the survivor order."""
    rank = np.empty(keys.size, dtype=node_dtype(keys.size))
    rank[np.argsort(priority, kind="stable")] = np.arange(keys.size, dtype=rank.dtype)
    return rank


def link_pieces(links: pa.Table, facts: pa.Table, part: int, protected: npt.NDArray[np.bool_] | None = None
                ) -> tuple[pa.Table, pa.Table]:
    """The pieces of one partition's `links` (``key``, ``linked_key``): (a `PIECE_ROWS` row per linked record,
    the `PIECE_SIZES` counts). `facts` holds every linked key once, sorted, with its ``id`` and ``priority``;
    `protected` (one per fact) marks the records a published version protects: they rank first. Pure."""
    keys = facts["key"].to_numpy()
    if links.num_rows == 0:
        return PIECE_ROWS.empty_table(), PIECE_SIZES.empty_table()
    mine = np.zeros(keys.size, dtype=bool) if protected is None else protected
    prio = np.where(mine, -np.inf, np.asarray(facts["priority"].to_numpy(), dtype=np.float64))
    labels = connected_components(keys.size, np.searchsorted(keys, links["key"].to_numpy()),
                                  np.searchsorted(keys, links["linked_key"].to_numpy()))
    best = choose_keepers(labels, priority_ranks(prio, keys)).astype(np.int64)
    size = np.bincount(best, minlength=keys.size)
    piece_sizes = size[best == np.arange(keys.size)]
    rows = pa.table({"key": keys, "id": facts["id"], "protected": mine,
                     "part": pa.array(np.full(keys.size, part, dtype=np.int32)),
                     "label": keys[best], "label_priority": prio[best], "label_id": facts["id"].take(pa.array(best)),
                     "size": size[best]}, schema=PIECE_ROWS)
    return rows, size_counts(piece_sizes, np.ones(piece_sizes.size, dtype=np.int64))


def size_counts(sizes: npt.NDArray[np.int64], counts: npt.NDArray[np.int64]) -> pa.Table:
    """`PIECE_SIZES`: `counts` summed per distinct size (counts may be negative: a correction). Pure."""
    order = np.argsort(sizes, kind="stable")
    s, c = sizes[order], counts[order]
    starts = np.flatnonzero(run_starts(s)) if s.size else np.zeros(0, dtype=np.int64)
    return pa.table({"size": s[starts], "pieces": np.add.reduceat(c, starts) if s.size else c}, schema=PIECE_SIZES)


def node_labels(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """One shard's records' piece rows (`PIECE_ROWS`, every piece each is in) -> (each record's best piece row,
    sorted by key; the `MERGES` that join every other piece of a record to its best, one row per pair of
    pieces with how many records joined them). Pure."""
    if rows.num_rows == 0:
        return PIECE_ROWS.empty_table(), MERGES.empty_table()
    rows = rows.sort_by([("key", "ascending"), ("label_priority", "ascending"), ("label", "ascending"),
                         ("part", "ascending")])
    first = run_starts(rows["key"].to_numpy())
    best_at = np.flatnonzero(first)
    best = rows.take(pa.array(best_at))
    extra = np.flatnonzero(~first)
    if extra.size == 0:
        return best, MERGES.empty_table()
    into = best_at[np.searchsorted(best_at, extra, side="right") - 1]  # the best row of each extra row's record
    ends = [n for n, _ in _END]
    pairs = pa.table({**{n: rows[n].take(pa.array(extra)) for n in ends},
                      **{f"into_{n}": rows[n].take(pa.array(into)) for n in ends}})
    pair = ("part", "label", "into_part", "into_label")
    pairs = pairs.sort_by([(c, "ascending") for c in pair])
    starts = np.flatnonzero(run_starts(*(pairs[c].to_numpy() for c in pair)))
    nodes = np.diff(np.append(starts, pairs.num_rows))
    merged = pairs.take(pa.array(starts)).append_column("nodes", pa.array(nodes, pa.int64()))
    return best, merged.select(MERGES.names).cast(MERGES)


def resolve_merges(merge_tables: Iterable[pa.Table], size_tables: Iterable[pa.Table],
                   protected_tables: Iterable[pa.Table] = ()) -> tuple[pa.Table, pa.Table]:
    """Components over the merge rows of every shard (`MERGES`) and the pieces of every link partition
    (`PIECE_SIZES`): (`FINAL`: the survivor of each label that took part in a merge, and the protected records
    that are copies (`protected_copies`); the clusters' `PIECE_SIZES`, a cluster counted once at the size the
    drop list gives it). Holds the merge rows and the protected linked records (`PROTECTED`) only. Pure."""
    merges = concat_or_empty(merge_tables, MERGES)
    totals = concat_or_empty(size_tables, PIECE_SIZES)
    sizes, counts = [totals["size"].to_numpy()], [totals["pieces"].to_numpy()]
    labels = kept = comp_size = np.zeros(0, dtype=np.int64)
    final = FINAL.empty_table()
    if merges.num_rows:
        ends = [n for n, _ in _END]
        both = pa.concat_tables([merges.select(ends),
                                 merges.select([f"into_{n}" for n in ends]).rename_columns(ends)])
        # Pieces in a merge, each once: their sizes are replaced by their components'.
        pieces = both.sort_by([("part", "ascending"), ("label", "ascending")])
        pieces = pieces.filter(pa.array(run_starts(pieces["part"].to_numpy(), pieces["label"].to_numpy())))
        # Labels (a piece's best record) are the nodes: pieces with one label share that record.
        by_label = pieces.sort_by([("label", "ascending")])
        labels_all = by_label["label"].to_numpy()
        at = np.flatnonzero(run_starts(labels_all))
        labels = labels_all[at]
        prio = np.asarray(by_label["label_priority"].to_numpy(), dtype=np.float64)[at]
        comp = connected_components(labels.size, np.searchsorted(labels, merges["label"].to_numpy()),
                                    np.searchsorted(labels, merges["into_label"].to_numpy()))
        kept = choose_keepers(comp, priority_ranks(prio, labels)).astype(np.int64)
        # A component's size: its pieces' sizes less the records counted in two pieces.
        comp_size = np.zeros(labels.size, dtype=np.int64)
        np.add.at(comp_size, kept[np.searchsorted(labels, pieces["label"].to_numpy())], pieces["size"].to_numpy())
        np.subtract.at(comp_size, kept[np.searchsorted(labels, merges["label"].to_numpy())],
                       merges["nodes"].to_numpy())
        roots = kept == np.arange(labels.size)
        piece_sizes = pieces["size"].to_numpy()
        sizes += [piece_sizes, comp_size[roots]]
        counts += [-np.ones(piece_sizes.size, dtype=np.int64), np.ones(int(roots.sum()), dtype=np.int64)]
        ids = by_label["label_id"].take(pa.array(at))
        final = pa.table({"shard": pa.array((labels >> KEY_SHIFT).astype(np.int32)), "label": labels,
                          "kept": labels[kept], "kept_id": ids.take(pa.array(kept)),
                          "copy": np.zeros(labels.size, dtype=bool)}, schema=FINAL)
    protected = concat_or_empty(protected_tables, PROTECTED)
    if protected.num_rows:
        copies, resized = protected_copies(protected, labels, kept, comp_size)
        final = pa.concat_tables([final, copies])
        sizes.append(resized["size"].to_numpy())
        counts.append(resized["pieces"].to_numpy())
    out = size_counts(np.concatenate(sizes), np.concatenate(counts))
    return final, out.filter(pa.array(out["pieces"].to_numpy() != 0))


def protected_copies(protected: pa.Table, labels: npt.NDArray[np.int64], kept: npt.NDArray[np.int64],
                     comp_size: npt.NDArray[np.int64]) -> tuple[pa.Table, pa.Table]:
    """The no-churn rule's side of the merge task, over the protected linked records (`PROTECTED`) and the
    merged components (`labels`, each one's survivor index `kept`, the survivors' `comp_size`): (`FINAL` rows
    naming each protected record whose cluster holds a protected record with its id and a smaller key: ids are
    content hashes, so it is an exact copy, and only the oldest row of an id is protected; the `PIECE_SIZES`
    corrections for clusters that keep several protected records, which the drop list does not count). Pure."""
    lab = protected["label"].to_numpy()
    cluster, size = lab, protected["size"].to_numpy()
    if labels.size:
        pos = np.minimum(np.searchsorted(labels, lab), labels.size - 1)
        hit = labels[pos] == lab
        cluster = np.where(hit, labels[kept[pos]], lab)
        size = np.where(hit, comp_size[kept[pos]], size)
    t = pa.table({"cluster": cluster, "id": protected["id"], "key": protected["key"], "size": size}).sort_by(
        [("cluster", "ascending"), ("id", "ascending"), ("key", "ascending")])
    c = t["cluster"].to_numpy()
    same_id = ~run_starts(c, t["id"].to_numpy(zero_copy_only=False))
    keys = t["key"].to_numpy()
    copies = pa.table({"shard": pa.array((keys[same_id] >> KEY_SHIFT).astype(np.int32)), "label": keys[same_id],
                       "kept": c[same_id], "kept_id": pa.nulls(int(same_id.sum()), pa.string()),
                       "copy": np.ones(int(same_id.sum()), dtype=bool)}, schema=FINAL)
    # A cluster keeps each of its protected ids' oldest record: all but its survivor stay out of its drop list.
    firsts = np.flatnonzero(~same_id)
    starts = np.flatnonzero(run_starts(c[firsts])) if firsts.size else np.zeros(0, dtype=np.int64)
    kept_protected = np.diff(np.append(starts, firsts.size))
    many = kept_protected >= 2
    at = firsts[starts[many]]
    before = t["size"].to_numpy()[at]
    after = before - (kept_protected[many] - 1)
    fixes = pa.table({"size": np.concatenate([before, after]),
                      "pieces": np.concatenate([-np.ones(at.size, dtype=np.int64), np.ones(at.size, dtype=np.int64)])},
                     schema=PIECE_SIZES)
    return copies, fixes


def protected_rows(best: pa.Table) -> pa.Table:
    """The protected records among one shard's best piece rows (`node_labels`), as the merge task reads them."""
    return best.filter(best["protected"]).select(PROTECTED.names).cast(PROTECTED)


def final_drops(best: pa.Table, final: Iterable[pa.Table]) -> tuple[npt.NDArray[np.int64], pa.Array]:
    """The records of one shard that do not survive, from their best piece rows (`node_labels`) and the
    merge task's `FINAL` rows (read one table at a time, only those `best` names kept): (their keys, sorted;
    the id of the record each one's cluster keeps). A protected record is never dropped, unless it is a copy.
    Pure."""
    if best.num_rows == 0:
        return np.zeros(0, dtype=np.int64), pa.array([], pa.string())
    best = best.sort_by("key")
    keys, labels = best["key"].to_numpy(), best["label"].to_numpy()
    protected = best["protected"].to_numpy(zero_copy_only=False).astype(bool)
    needed = unique_sorted(np.concatenate([labels, keys[protected]]))
    found = concat_or_empty((t.filter(pa.array(in_sorted(t["label"].to_numpy(), needed))) for t in final), FINAL)
    is_copy = found["copy"].to_numpy(zero_copy_only=False).astype(bool)
    merged = found.filter(pa.array(~is_copy)).sort_by("label")
    kept = labels.copy()
    kept_id = best["label_id"].combine_chunks()
    if merged.num_rows:
        m_labels = merged["label"].to_numpy()
        pos = np.minimum(np.searchsorted(m_labels, labels), m_labels.size - 1)
        hit = m_labels[pos] == labels
        kept = np.where(hit, merged["kept"].to_numpy()[pos], labels)
        kept_id = pc.if_else(pa.array(hit), merged["kept_id"].take(pa.array(pos)), kept_id)
    copies = unique_sorted(found["label"].to_numpy()[is_copy])
    dropped = np.flatnonzero((kept != keys) & (~protected | in_sorted(keys, copies)))
    return keys[dropped], kept_id.take(pa.array(dropped))


__all__ = ["FINAL", "MERGES", "PIECE_ROWS", "PIECE_SIZES", "PROTECTED", "final_drops", "link_pieces",
           "link_routes", "node_labels", "protected_copies", "protected_rows", "resolve_merges", "size_counts"]
