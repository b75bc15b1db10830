"""A batch's conversations as Arrow columns of turns, so a step turns into Python strings only the turns it reads.

`conversations.to_pylist()` builds a dict and two strings per turn of every record; most checks read one turn
(the first prompt) or one column (lengths), and the answers are most of the bytes.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc


def turn_columns(conversations: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array, npt.NDArray[np.int64]]:
    """The flattened turns' `from` and `value` columns and the offsets of each record's turns in them (a null
    conversation has none). Pure."""
    conv = conversations.combine_chunks() if isinstance(conversations, pa.ChunkedArray) else conversations
    conv = pc.fill_null(conv, pa.scalar([], conv.type)) if conv.null_count else conv
    offsets = np.asarray(conv.offsets.to_numpy(), dtype=np.int64)
    turns = conv.values.slice(offsets[0], offsets[-1] - offsets[0])
    return turns.field("from"), turns.field("value"), offsets - offsets[0]


def joined_turns(values: pa.Array, offsets: npt.NDArray[np.int64], limit: int | None = None) -> pa.Array:
    """Each record's turns (each cut to `limit` characters when given) joined by newlines. Pure."""
    texts = pc.fill_null(values, "")
    if limit is not None:
        texts = pc.utf8_slice_codeunits(texts, 0, limit)
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), texts), "\n")


def first_turn(roles: pa.Array, values: pa.Array, offsets: npt.NDArray[np.int64], role: str) -> pa.Array:
    """Each record's first turn by `role` ("" for a record without one). Pure."""
    n = len(offsets) - 1
    match = np.asarray(pc.equal(roles, role).fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    pos = np.where(match, np.arange(match.size), match.size)
    first = np.full(n, match.size, dtype=np.int64)
    nonempty = offsets[1:] > offsets[:-1]
    if nonempty.any():
        first[nonempty] = np.minimum.reduceat(pos, offsets[:-1][nonempty]) if pos.size else match.size
    has = (first < np.minimum(offsets[1:], match.size)) & nonempty
    found = pc.take(values, pa.array(np.where(has, first, 0))) if len(values) else pa.nulls(n, pa.string())
    return pc.if_else(pa.array(has), pc.fill_null(found, ""), "")


def role_chars(roles: pa.Array, values: pa.Array, offsets: npt.NDArray[np.int64], role: str) -> npt.NDArray[np.int64]:
    """Per record, the characters (code points, as Python's `len`) of its turns by `role`. Pure."""
    n = len(offsets) - 1
    if len(values) == 0:
        return np.zeros(n, dtype=np.int64)
    match = np.asarray(pc.equal(roles, role).fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    chars = np.asarray(pc.utf8_length(pc.fill_null(values, "")).to_numpy(zero_copy_only=False), dtype=np.int64)
    record = np.searchsorted(offsets, np.arange(len(values)), side="right") - 1
    return np.bincount(record[match], weights=chars[match], minlength=n).astype(np.int64)


def turns_by_role(conversations: pa.ChunkedArray | pa.Array, roles: tuple[str, ...]
                  ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], pa.Array]:
    """(record, turn index, text) of every turn whose speaker is in `roles`, in record then turn order. Pure."""
    speakers, values, offsets = turn_columns(conversations)
    wanted = np.flatnonzero(np.asarray(pc.is_in(speakers, value_set=pa.array(list(roles)))
                                       .fill_null(False).to_numpy(zero_copy_only=False), bool))
    record = np.searchsorted(offsets, wanted, side="right") - 1
    return record, wanted - offsets[record], pc.fill_null(values.take(pa.array(wanted, pa.int64())), "")


def joined_role_turns(conversations: pa.ChunkedArray | pa.Array, role: str) -> pa.Array:
    """Each record's turns by `role`, joined by newlines ("" without one). Pure."""
    n = len(conversations)
    record, _, texts = turns_by_role(conversations, (role,))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(record, minlength=n))]) if n else np.zeros(1, np.int64)
    return joined_turns(texts, offsets)
