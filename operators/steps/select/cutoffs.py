"""Exact per-domain and per-source cutoffs from key histograms: the selection without a table of every candidate.

`decide` (step.py) picks the best keys per source cap and per domain budget over one table of all candidates:
about 32 bytes per candidate in one task, 2 GB at 69M. The same answer comes from histograms:

1. every shard counts its candidates per (domain, capped source or none, key bin) (`key_bins`: the top
   `KEY_BITS` bits of the key's order-preserving integer, so a higher bin means a higher key);
2. the sums give each capped source the bin its cap falls in, and each domain a range of bins its budget falls
   in (`domain_bounds`): a range, not one bin, because which of a capped source's boundary-bin records pass
   is not known yet, and they change the domain's pool;
3. each shard sends back only the records whose fate the bins leave open (the boundary records: a capped
   source's boundary bin, a domain's range), and counts for the rest;
4. the exact decision over the boundary records, by key with the candidates' order breaking ties, equals the
   one over every candidate (`resolve`): every record above a domain's range is selected, every one below it
   is not.

The replay sample works the same way over `rkey_bins` of the selected records. A task then holds histograms
(at most `2**KEY_BITS` counts per group) and the boundary records (a few bins' worth), never one row per
candidate. Pure functions; the step does the I/O.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

KEY_BITS = 20  # sign, exponent and 8 mantissa bits of a float64: a bin is 1/256 of an octave
RKEY_BITS = 12  # replay keys are uniform in [0, 1): 4096 equal bins
KEY_TOP = 1 << KEY_BITS  # "no bin is above": nothing is selected above the range
KEEP_ALL = -1  # a domain whose budget keeps its whole pool: every bin is above its range
UNCAPPED = -2  # a source without a binding cap: every record passes

IntArray = npt.NDArray[np.int64]


def key_bins(key: npt.NDArray[np.float64]) -> IntArray:
    """Bin of each key: higher key, higher or equal bin. NaN, which the selection ranks last, gets bin 0."""
    key = np.ascontiguousarray(key, dtype=np.float64) + 0.0  # -0.0 becomes 0.0: equal keys share a bin
    u = key.view(np.uint64)
    ordered = np.where(u >> np.uint64(63), ~u, u | np.uint64(1 << 63))
    bins = (ordered >> np.uint64(64 - KEY_BITS)).astype(np.int64)
    bins[np.isnan(key)] = 0
    return bins


def rkey_bins(rkey: npt.NDArray[np.float64]) -> IntArray:
    """Bin of each replay key in [0, 1): lower key, lower or equal bin."""
    return np.clip((np.asarray(rkey, dtype=np.float64) * (1 << RKEY_BITS)).astype(np.int64), 0,
                   (1 << RKEY_BITS) - 1)


def budget_take(budget: float, n: int) -> int:
    """How many of a pool of `n` a budget takes: a fraction (<= 1) of it, rounded down, or a count."""
    return min(n, math.floor(budget * n) if budget <= 1 else int(budget))


def keeps_all(budget: float, n: int) -> bool:
    """Whether the budget takes the whole of any pool of at most `n`."""
    return budget >= 1 and (budget == 1 or int(budget) >= n)


def bin_of_kth_highest(hist: IntArray, k: int) -> int:
    """The bin holding the k-th highest counted item (k >= 1); 0 when fewer than k are counted; `KEY_TOP` when
    k <= 0 (no item)."""
    if k <= 0:
        return KEY_TOP
    above = np.cumsum(hist[::-1])
    i = int(np.searchsorted(above, k))
    return 0 if i >= len(hist) else len(hist) - 1 - i


def bin_of_kth_lowest(hist: IntArray, k: int) -> int:
    """The bin holding the k-th lowest counted item (k >= 1), -1 when k <= 0 (no item), and the number of bins
    when k exceeds the count (every item)."""
    if k <= 0:
        return -1
    below = np.cumsum(hist)
    i = int(np.searchsorted(below, k))
    return min(i, len(hist))


def cap_bin(hist: IntArray, cap: int) -> int:
    """The key bin in which a source's cap falls, given its key histogram; `UNCAPPED` when the cap does not
    bind (the source has at most `cap` records). A cap of 0 passes nothing: `KEY_TOP`."""
    total = int(hist.sum())
    if total <= cap:
        return UNCAPPED
    return bin_of_kth_highest(hist, cap)


def domain_bounds(sure: IntArray, maybe: IntArray, budget: float) -> tuple[int, int]:
    """(lo, hi): the bins between which a domain's cutoff falls, given the histograms of its records that surely
    pass their source's cap (`sure`) and of those that might (`maybe`: capped sources' boundary bins).

    Whatever part of `maybe` passes, every passing record above `hi` is within budget and none below `lo` is:
    the cutoff is the k-th best of a pool P with sure <= P <= sure + maybe and k between budget_take(|sure|)
    and budget_take(|sure + maybe|). (KEEP_ALL, KEEP_ALL) when the budget takes every passing record."""
    n_sure, n_all = int(sure.sum()), int(sure.sum() + maybe.sum())
    if keeps_all(budget, n_all):
        return KEEP_ALL, KEEP_ALL
    k_lo, k_hi = budget_take(budget, n_sure), budget_take(budget, n_all)
    hi = bin_of_kth_highest(sure + maybe, k_lo)
    lo = bin_of_kth_highest(sure, k_hi) if k_hi <= n_sure else 0
    return min(lo, hi), hi


def take_best(order_keys: npt.NDArray[np.float64], n: int, ascending: bool = False) -> IntArray:
    """Indices of the `n` best of `order_keys` (highest first, or lowest with `ascending`), ties by position:
    the order `decide`'s stable argsort gives."""
    keys = order_keys if ascending else -order_keys
    return np.argsort(keys, kind="stable")[:max(0, n)]


def sparse_counts(values: IntArray) -> tuple[IntArray, IntArray]:
    """(distinct values ascending, how many times each occurs)."""
    if values.size == 0:
        return values.astype(np.int64), np.zeros(0, dtype=np.int64)
    s = np.sort(values)
    starts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))
    return s[starts], np.diff(np.append(starts, s.size)).astype(np.int64)


def dense(bins: IntArray, counts: IntArray, size: int) -> IntArray:
    """A dense histogram of `size` bins from sparse (bin, count) pairs (pairs may repeat a bin)."""
    return np.bincount(bins, weights=counts, minlength=size).astype(np.int64)[:size]
