"""The sort-based unique helpers equal numpy's answer, on the key kinds the steps pass them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from operators.core.arrays import count_repeats, run_starts, unique_sorted


@pytest.mark.parametrize("values", [
    np.random.default_rng(1).integers(0, 50, 1000).astype(np.uint64),  # many repeats
    np.random.default_rng(2).integers(-(2**62), 2**62, 5000, dtype=np.int64),  # almost none
    np.array(["b", "a", "b", "c", "a"], dtype=object),  # string ids
    np.array([7], dtype=np.int64),
    np.zeros(0, dtype=np.uint64),
])
def test_unique_sorted_and_count_repeats_match_numpy(values: np.ndarray) -> None:
    expected = np.unique(values)
    got = unique_sorted(values)
    assert got.dtype == values.dtype and got.tolist() == expected.tolist()
    assert count_repeats(values) == len(values) - len(expected)


def test_run_starts_marks_the_first_of_each_run() -> None:
    assert run_starts(np.array([1, 1, 2, 3, 3, 3])).tolist() == [True, False, True, True, False, False]
    assert run_starts(np.zeros(0)).tolist() == []


def test_list_matrix_reads_count_vectors_without_python_lists() -> None:
    from operators.core.arrays import list_matrix

    col = pa.chunked_array([pa.array([[1, 2, 3], [4, 5, 6]]), pa.array([[7, 8, 9]])])
    m = list_matrix(col)
    assert m.dtype == np.int64 and m.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert list_matrix(pa.array([], pa.list_(pa.int64()))).shape == (0, 0)
    with pytest.raises(ValueError, match="unequal length"):
        list_matrix(pa.array([[1, 2], [3]]))
