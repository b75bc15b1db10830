"""Union-find over integer ids, for duplicate clusters that span shards and dedup scopes."""

from __future__ import annotations

import numpy as np


def connected_components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Component label (the smallest member index) of each of `n` nodes, given undirected edges.

    Vectorized label propagation with pointer jumping: each round every edge pulls both ends to the
    smaller label, then labels are compressed; it converges in O(log n) rounds on typical dedup graphs.
    """
    label = np.arange(n, dtype=np.int64)
    if len(left) == 0:
        return label
    left = np.asarray(left, dtype=np.int64)
    right = np.asarray(right, dtype=np.int64)
    while True:
        lo = np.minimum(label[left], label[right])
        before = label.copy()
        np.minimum.at(label, left, lo)
        np.minimum.at(label, right, lo)
        while True:  # pointer jumping: follow labels to their roots
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
        if np.array_equal(label, before):
            return label
