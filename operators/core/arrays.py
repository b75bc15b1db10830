"""Array primitives the steps share, where numpy's general-purpose answer is slow at corpus scale.

numpy 2's `np.unique` (without `return_inverse`/`return_index`) deduplicates through a hash table: 7.6 s for
2M random uint64 keys on this machine, where a sort and a neighbour comparison take 0.1 s. Record ids, key
hashes and link endpoints are exactly such keys, and validate, publish and the dedup resolves take the
distinct values of millions of them.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

ScalarT = TypeVar("ScalarT", bound=np.generic)


def run_starts(sorted_values: npt.NDArray[np.generic], *more: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """For an ascending array: True where a run of equal values begins (the first element always). With `more`
    arrays of the same length (rows sorted by all of them together), a run is rows equal in every array."""
    first = np.empty(len(sorted_values), dtype=bool)
    if len(sorted_values):
        first[0] = True
        np.not_equal(sorted_values[1:], sorted_values[:-1], out=first[1:])
        for values in more:
            first[1:] |= values[1:] != values[:-1]
    return first


def unique_sorted(values: npt.NDArray[ScalarT]) -> npt.NDArray[ScalarT]:
    """The distinct values, ascending: `np.unique(values)` by a sort and a mask (see the module docstring)."""
    s = np.sort(values.ravel())
    return s[run_starts(s)]


def in_sorted(values: npt.NDArray[ScalarT], sorted_set: npt.NDArray[ScalarT]) -> npt.NDArray[np.bool_]:
    """`np.isin(values, sorted_set)` for an ascending, distinct `sorted_set`: a binary search per value, no
    sort of either (numpy 2's `isin` sorts both, or hashes)."""
    if sorted_set.size == 0:
        return np.zeros(values.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)
    return np.asarray(sorted_set[pos] == values)


def count_repeats(values: npt.NDArray[np.generic]) -> int:
    """How many elements repeat an earlier one (`len(values) - len(np.unique(values))`)."""
    s = np.sort(values.ravel())
    return int(len(s) - np.count_nonzero(run_starts(s)))


def replace_column(table: pa.Table, name: str, values: pa.Array | list[Any], type_: pa.DataType | None = None
                   ) -> pa.Table:
    """Set column `name` (appending it, or replacing an existing one in place)."""
    arr = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values, type_)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, arr)
    return table.append_column(name, arr)


def list_matrix(column: pa.Array | pa.ChunkedArray) -> npt.NDArray[np.int64]:
    """A column of equal-length integer lists (per-shard count vectors) as an ``(n, width)`` int64 matrix,
    straight from Arrow's buffers: as Python lists they cost a boxed int per element."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), np.int64)
    if not len(arr):
        return values.reshape(0, 0)
    lengths = np.asarray(pc.list_value_length(arr).to_numpy(zero_copy_only=False))
    if (lengths != lengths[0]).any():
        raise ValueError(f"lists of unequal length ({lengths.min()} to {lengths.max()}) cannot form a matrix")
    return values.reshape(len(arr), -1)
