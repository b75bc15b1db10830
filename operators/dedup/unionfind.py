"""Connected components over integer edge lists, vectorized, and the keep choice per component.

A Python union-find costs about a microsecond per edge; the reduce step of near-duplicate removal
sees one edge per duplicate record (hundreds of millions at full scale), so the union-find here is
the data-parallel form of the same algorithm: every round hooks each tree's root under the smallest
root it shares an edge with (``np.minimum.at``), then compresses paths by pointer jumping until every
node points at its root. Hooking only ever moves a root under a smaller one, so the root of each
component is its smallest node, and the rounds stop once no edge joins two different roots.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


def _compress(parent: npt.NDArray[np.signedinteger]) -> npt.NDArray[np.signedinteger]:
    """Point every node straight at its root (pointer jumping: depth halves each pass)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def connected_components(n: int, src: npt.ArrayLike, dst: npt.ArrayLike) -> IntArray:
    """Component label of each of the nodes ``0..n-1`` under the undirected edges ``src[i] - dst[i]``.

    The label is the smallest node of the component, so labels are deterministic whatever the edge
    order, and a node without edges is its own label. Runs in O((n + edges) * rounds); with the star
    edges that LSH buckets produce, rounds stay at two or three.
    """
    return join_edges(np.arange(n, dtype=np.int64), src, dst)


def join_edges(parent: npt.NDArray[np.signedinteger], src: npt.ArrayLike, dst: npt.ArrayLike
               ) -> npt.NDArray[np.signedinteger]:
    """`parent` (every node pointing at its root, the smallest node of its component) with the undirected edges
    ``src[i] - dst[i]`` joined in; the same form back, the same integer type (`node_dtype`). Edges may come in
    any number of batches: joining them one batch at a time ends where joining them all at once does, so a
    caller holds one batch of edges."""
    n = parent.size
    u = np.asarray(src, dtype=parent.dtype)
    v = np.asarray(dst, dtype=parent.dtype)
    if u.shape != v.shape:
        raise ValueError(f"src and dst differ in length: {u.shape} vs {v.shape}")
    if u.size and (min(u.min(), v.min()) < 0 or max(u.max(), v.max()) >= n):
        raise ValueError(f"edge endpoints must lie in [0, {n})")
    while u.size:
        ru, rv = parent[u], parent[v]
        crossing = ru != rv
        if not crossing.any():
            break
        # Edges inside one tree can never matter again: dropping them keeps later rounds small.
        u, v, ru, rv = u[crossing], v[crossing], ru[crossing], rv[crossing]
        low = np.minimum(ru, rv)
        # Hook roots only (ru, rv are roots after the last compression), each under the smallest
        # root it touches: conflicting hooks resolve to the minimum, so no cycle can form.
        np.minimum.at(parent, ru, low)
        np.minimum.at(parent, rv, low)
        parent = _compress(parent)
    return parent


def node_dtype(n: int) -> type[np.signedinteger]:
    """The narrowest index type for `n` nodes: int32 below 2**31 (half the memory of a whole-corpus resolve)."""
    return np.int32 if n < 2**31 else np.int64


def choose_keepers(labels: npt.NDArray[np.signedinteger], rank: npt.NDArray[np.signedinteger]
                   ) -> npt.NDArray[np.signedinteger]:
    """For each node, the node its component keeps: the member with the smallest ``rank``.

    ``rank`` is a permutation of ``0..n-1`` (a total order of the nodes, e.g. by priority then id),
    which makes the choice independent of edge order, sharding and retries. Integer arrays of any width
    (`node_dtype`); the result has the labels' type.
    """
    labels, rank = np.asarray(labels), np.asarray(rank)
    if labels.shape != rank.shape:
        raise ValueError("labels and rank must have the same shape")
    n = labels.size
    best = np.full(n, np.iinfo(rank.dtype).max, dtype=rank.dtype)
    np.minimum.at(best, labels, rank)  # best rank per component, indexed by the component label
    node_of_rank = np.empty(n, dtype=labels.dtype)
    node_of_rank[rank] = np.arange(n, dtype=labels.dtype)
    return node_of_rank[best[labels]]
