"""DSIR, the pure core: hashed n-gram features, bag-of-ngrams models, importance weights, Gumbel top-k.

Data Selection with Importance Resampling (Xie et al. 2023, "Data Selection for Language Models via
Importance Resampling") picks the k records of a raw pool that look most like a target set:

1. featurize every record as counts of its word unigrams and bigrams hashed into ``num_buckets``
   buckets (:func:`hashed_ngram_counts`);
2. fit a bag-of-ngrams model (a categorical distribution over buckets) to the target set and another
   to the raw pool (:func:`fit_model`, from summed counts);
3. score each raw record by its log importance weight, the sum over its features of
   ``log p_target - log p_raw`` (:func:`log_importance_weights`);
4. resample k records without replacement with probability proportional to the weight: Gumbel top-k,
   ``keys = log_w + Gumbel noise`` and keep the k largest keys (:func:`gumbel_keys`, :func:`top_k`).

Everything here is a pure function over numpy arrays (and lists of strings or Arrow string arrays), so
each stage runs anywhere and the expensive ones are additive over shards:

* map 1 (per shard): :func:`hashed_ngram_counts` -> :meth:`HashedFeatures.total_counts`, a
  ``num_buckets`` integer vector; shards' vectors are summed (the target set's the same way);
* reduce 1: :meth:`DSIRModel.fit` on the two summed vectors (the global models, a few hundred KB);
* map 2 (per shard): :func:`log_importance_weights` and :func:`gumbel_keys`, then :func:`top_k` keeps
  that shard's k best candidates;
* reduce 2: :func:`merge_top_k` over the shards' candidates gives *exactly* the single-machine top-k,
  because the Gumbel noise of a record depends only on (seed, record id) and ties are broken by id.

Feature extraction matches the reference implementation (the ``data-selection`` package,
``HashedNgramDSIR``): the text is lowercased and split with nltk's ``WordPunctTokenizer`` pattern
``\\w+|[^\\w\\s]+``, n-grams do not cross record boundaries, and unigrams and bigrams share the
same buckets. The pattern runs on the third-party ``regex`` engine, as nltk 3.10 runs it (older nltk
used the stdlib ``re``): its ``\\w`` is Unicode's word class, so a word keeps its combining marks
(Hindi, decomposed accents) where ``re`` cuts it at every mark; otherwise they differ only on rare
characters (some digit-like symbols, the ASCII separators ``\\x1c``-``\\x1f``).

Only the bucket hash differs: the reference takes ``sha256(token) mod num_buckets`` per token and per
joined bigram string, a few microseconds each; here every distinct word of a batch is hashed once with
seeded xxh3-64 and bigram hashes are combined from word hashes in numpy. Both are uniform hashes, so
the models are statistically the same, though bucket numbers differ.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import regex
import xxhash

from operators.core.arrays import count_repeats, run_starts

NUM_BUCKETS = 10_000
"""Buckets of the hashed feature space, as in the paper and the reference implementation."""

TOKEN_PATTERN = regex.compile(r"\w+|[^\w\s]+", regex.UNICODE | regex.MULTILINE | regex.DOTALL)
"""nltk's ``WordPunctTokenizer`` pattern: runs of word characters, or runs of other non-space characters."""

_U64 = np.uint64
# Odd 64-bit constants: the golden ratio and the murmur3/splitmix64 finalizer multipliers.
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
U64Array = npt.NDArray[np.uint64]


# ----------------------------------------------------------------------------------------------------
# Features


@dataclass(frozen=True)
class HashedFeatures:
    """Hashed n-gram counts of a batch of records, one CSR row per record.

    Row ``i`` holds the buckets of record ``i`` in ``indices[indptr[i]:indptr[i + 1]]`` (sorted, no
    duplicates) with their counts in ``counts`` at the same positions. ``n_tokens[i]`` is the record's
    word-token count (the reference filters on it; here it is metadata for a later length rule).
    """

    indptr: IntArray
    indices: npt.NDArray[np.int32]
    counts: npt.NDArray[np.int32]
    n_tokens: IntArray
    num_buckets: int

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def row_ids(self) -> IntArray:
        """The record (row) of each stored entry, aligned with ``indices`` and ``counts``."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.indptr))

    def total_counts(self, rows: npt.ArrayLike | None = None) -> IntArray:
        """Summed counts per bucket over all records, or over the records in `rows` (indices or a mask).

        This is the map stage's output: additive, so per-shard vectors sum to the whole pool's.
        """
        indices, counts = self.indices, self.counts
        if rows is not None:
            selected = np.zeros(len(self), dtype=bool)
            selected[np.asarray(rows)] = True
            keep = np.repeat(selected, np.diff(self.indptr))
            indices, counts = indices[keep], counts[keep]
        # Float weights are exact for sums below 2**53, far beyond any shard's token count.
        summed = np.bincount(indices, weights=counts, minlength=self.num_buckets)
        return np.rint(summed).astype(np.int64)

    def to_scipy(self) -> Any:
        """The same matrix as ``scipy.sparse.csr_matrix`` (records x buckets); needs scipy installed."""
        from scipy.sparse import csr_matrix  # optional: only callers that want scipy pay for it

        return csr_matrix((self.counts, self.indices, self.indptr), shape=(len(self), self.num_buckets))


def tokenize(text: str) -> list[str]:
    """Lowercased word/punctuation tokens of `text`, exactly as the reference's featurizer sees them."""
    return TOKEN_PATTERN.findall(text.lower())


def _as_string_array(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.LargeStringArray:
    """`texts` as one contiguous large_string Arrow array; a null text becomes "" (no tokens)."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks else pa.array([], pa.large_string())
    if isinstance(texts, pa.Array):
        arr = texts
    else:
        texts = list(texts)
        try:
            arr = pa.array(texts, type=pa.large_string())
        except (UnicodeEncodeError, pa.ArrowException):
            # A lone surrogate (JSON "\ud800" decodes to one) has no UTF-8 form: it becomes "?" (the
            # encoder's replacement) instead of failing the whole batch.
            arr = pa.array([t if t is None else t.encode("utf-8", "replace").decode("utf-8") for t in texts],
                           type=pa.large_string())
    if arr.type != pa.large_string():
        arr = arr.cast(pa.large_string())
    if arr.null_count:
        arr = arr.fill_null("")
    return arr


def _ascii_tables() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Per ASCII byte: its class (0 space, 1 word, 2 other) and its lowercase byte.

    The classes are asked of the tokenizer's own engine and flags, so the byte-level tokenizer below
    agrees with :data:`TOKEN_PATTERN` by construction (``regex`` and ``re`` disagree on \\x1c-\\x1f).
    """
    word = regex.compile(r"\w", TOKEN_PATTERN.flags)
    space = regex.compile(r"\s", TOKEN_PATTERN.flags)
    cls = np.full(256, 2, dtype=np.uint8)
    lower = np.arange(256, dtype=np.uint8)
    for c in range(128):
        ch = chr(c)
        cls[c] = 1 if word.fullmatch(ch) else 0 if space.fullmatch(ch) else 2
        lower[c] = ord(ch.lower())
    return cls, lower


_ASCII_CLASS, _ASCII_LOWER = _ascii_tables()


def _word_hashes(vocab: pa.Array, seed: int) -> U64Array:
    """Seeded xxh3-64 of each distinct word's UTF-8 bytes: the only per-word Python work."""
    vocab = vocab.cast(pa.large_string()) if vocab.type != pa.large_string() else vocab
    n = len(vocab)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    # Hash memoryview slices of the Arrow buffer: no str object, no re-encoding per word.
    offsets = np.frombuffer(vocab.buffers()[1], dtype=np.int64)[vocab.offset : vocab.offset + n + 1].tolist()
    data = memoryview(vocab.buffers()[2]) if vocab.buffers()[2] is not None else memoryview(b"")
    digest = xxhash.xxh3_64_intdigest
    return np.fromiter((digest(data[a:b], seed) for a, b in pairwise(offsets)),
                       dtype=np.uint64, count=n)


def _ascii_token_hashes(arr: pa.LargeStringArray, seed: int) -> tuple[U64Array, IntArray]:
    """Word hashes of every token (in order) and tokens per record, for all-ASCII texts, in numpy.

    A token is a maximal run of one byte class (word or other) within a record, which is what
    ``\\w+|[^\\w\\s]+`` matches on ASCII. Dropping the space bytes makes the tokens contiguous, so they
    become an Arrow string array without one Python object per token, and Arrow dictionary-encodes it.
    """
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    lo, hi = int(offsets[0]), int(offsets[-1])
    if hi == lo:
        return np.zeros(0, dtype=np.uint64), np.zeros(n, dtype=np.int64)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[lo:hi]
    offsets = offsets - lo
    cls = _ASCII_CLASS[data]
    kept = cls != 0
    starts = np.empty(len(data), dtype=bool)
    starts[0] = True
    np.not_equal(cls[1:], cls[:-1], out=starts[1:])
    starts[offsets[:-1][offsets[:-1] < len(data)]] = True  # no token runs across two records
    # In the space-free byte string the tokens are contiguous: their starts, renumbered, are its offsets.
    compact_starts = starts[kept]
    compact = _ASCII_LOWER[data[kept]]
    token_offsets = np.append(np.flatnonzero(compact_starts), len(compact)).astype(np.int64)
    n_all = len(token_offsets) - 1
    tokens = pa.LargeStringArray.from_buffers(n_all, pa.py_buffer(token_offsets), pa.py_buffer(compact))
    encoded = tokens.dictionary_encode()
    hashes = _word_hashes(encoded.dictionary, seed)[encoded.indices.to_numpy(zero_copy_only=False)]
    # Tokens per record: how many token starts precede each record boundary (per record, not per token).
    token_pos = np.flatnonzero(starts & kept)
    before = np.searchsorted(token_pos, offsets, side="left")
    return hashes, np.diff(before).astype(np.int64)


def _regex_token_hashes(texts: list[str], seed: int) -> tuple[U64Array, IntArray]:
    """Word hashes of every token (in order) and tokens per record, through the regex engine."""
    findall = TOKEN_PATTERN.findall
    tokens = pa.array([findall(t.lower()) for t in texts], type=pa.large_list(pa.large_string()))
    encoded = tokens.values.dictionary_encode()
    hashes = _word_hashes(encoded.dictionary, seed)[encoded.indices.to_numpy(zero_copy_only=False)]
    return hashes, np.diff(tokens.offsets.to_numpy()).astype(np.int64)


def _mix64(x: U64Array) -> U64Array:
    """splitmix64's finalizer, in place on a fresh array: spreads every input bit over the high bits."""
    x ^= x >> _U64(30)
    x *= _MIX1
    x ^= x >> _U64(27)
    x *= _MIX2
    x ^= x >> _U64(31)
    return x


def _bucket(h: U64Array, num_buckets: int) -> npt.NDArray[np.int64]:
    # Lemire's multiply-shift range reduction on the high 32 bits: uniform like `% num_buckets` for
    # well-mixed hashes, and several times cheaper than a 64-bit modulo in numpy.
    return (((h >> _U64(32)) * _U64(num_buckets)) >> _U64(32)).astype(np.int64)


def _ngram_keys(h: U64Array, token_row: IntArray, ngrams: int, num_buckets: int) -> list[IntArray]:
    """``row * num_buckets + bucket`` of every 1..`ngrams`-gram; `h` holds each record's tokens in order."""
    keys = [token_row * num_buckets + _bucket(h, num_buckets)]
    gram = h
    for order in range(2, ngrams + 1):
        span = len(h) - order + 1
        if span <= 0:
            break
        # An `order`-gram starting at token i exists when token i + order - 1 is in the same record.
        gram = _mix64(gram[:span] * _GOLDEN + h[order - 1 :])
        same_row = token_row[:span] == token_row[order - 1 :]
        keys.append(token_row[:span][same_row] * num_buckets + _bucket(gram[same_row], num_buckets))
    return keys


K = TypeVar("K")


class ShardCountSums(Generic[K]):
    """Hashed n-gram counts summed per key (a domain, say) over one shard, emitted once when the shard is done:
    a row per batch would make whatever reads them read a table that grows with the shard."""

    def __init__(self) -> None:
        self._sums: dict[K, tuple[int, IntArray]] = {}

    def add(self, key: K, texts: pa.Array | pa.ChunkedArray, num_buckets: int, seed: int) -> None:
        """Count `texts` into `key`'s sums (`hashed_ngram_counts` with `num_buckets` and `seed`)."""
        feats = hashed_ngram_counts(texts, num_buckets, seed=seed)
        n, counts = self._sums.get(key, (0, np.zeros(num_buckets, np.int64)))
        self._sums[key] = (n + len(texts), counts + feats.total_counts().astype(np.int64))

    def drain(self) -> list[tuple[K, int, IntArray]]:
        """Every key's (texts, counts), sorted by key; the sums start again empty."""
        done, self._sums = sorted(self._sums.items()), {}
        return [(k, n, c) for k, (n, c) in done]


def hashed_ngram_counts(
    texts: Sequence[str] | pa.Array | pa.ChunkedArray,
    num_buckets: int = NUM_BUCKETS,
    seed: int = 0,
    ngrams: int = 2,
    *,
    ascii_fast_path: bool = True,
) -> HashedFeatures:
    """Hash each record's word 1..`ngrams`-grams into `num_buckets` buckets and count them.

    Word tokens follow :data:`TOKEN_PATTERN` on the lowercased text. A word's hash is seeded xxh3-64 of
    its UTF-8 bytes, computed once per distinct word of the batch; an n-gram's hash folds its words'
    hashes in numpy (order matters: "a b" and "b a" differ). N-grams never span two records. `seed`
    picks an independent hash family: the same texts with another seed land in other buckets.

    All-ASCII texts are tokenized on their bytes in numpy (several times faster than the regex, with
    identical tokens); the others go through the regex. `ascii_fast_path=False` sends every text
    through the regex, for tests that check the two agree.
    """
    if not 0 < num_buckets < 2**31:
        raise ValueError(f"num_buckets must be in [1, 2**31), got {num_buckets}")
    if ngrams < 1:
        raise ValueError(f"ngrams must be >= 1, got {ngrams}")
    seed = int(seed) & _MASK64
    arr = _as_string_array(texts)
    n = len(arr)
    if ascii_fast_path and n:
        is_ascii = pc.string_is_ascii(arr).to_numpy(zero_copy_only=False)
    else:
        is_ascii = np.zeros(n, dtype=bool)

    n_tokens = np.zeros(n, dtype=np.int64)
    keys: list[IntArray] = []
    for rows, fast in ((np.flatnonzero(is_ascii), True), (np.flatnonzero(~is_ascii), False)):
        if not len(rows):
            continue
        subset = arr if len(rows) == n else arr.take(pa.array(rows))
        if fast:
            h, counts = _ascii_token_hashes(subset, seed)
        else:
            h, counts = _regex_token_hashes(subset.to_pylist(), seed)
        n_tokens[rows] = counts
        # Each part keeps a record's tokens contiguous and in order; the sort below merges the parts.
        keys += _ngram_keys(h, np.repeat(rows, counts), ngrams, num_buckets)

    # Canonical CSR: sort (row, bucket) keys and run-length encode them. A plain sort plus a mask is
    # several times faster than np.unique; 32-bit keys sort faster still when they fit.
    key_dtype = np.uint32 if n * num_buckets < 2**32 else np.int64
    flat = np.sort(np.concatenate(keys).astype(key_dtype, copy=False)) if keys else np.zeros(0, key_dtype)
    if len(flat):
        starts = np.flatnonzero(run_starts(flat))
        unique_keys = flat[starts].astype(np.int64)
        counts32 = np.diff(np.append(starts, len(flat))).astype(np.int32)
    else:
        unique_keys = np.zeros(0, dtype=np.int64)
        counts32 = np.zeros(0, dtype=np.int32)
    rows_of_keys = unique_keys // num_buckets
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows_of_keys, minlength=n), out=indptr[1:])
    indices = (unique_keys - rows_of_keys * num_buckets).astype(np.int32)
    return HashedFeatures(indptr=indptr, indices=indices, counts=counts32, n_tokens=n_tokens, num_buckets=num_buckets)


# ----------------------------------------------------------------------------------------------------
# Models and weights


def fit_model(total_counts: npt.ArrayLike, smoothing: float = 1.0) -> FloatArray:
    """Log probabilities of a bag-of-ngrams model from summed bucket counts, with additive smoothing.

    ``log p[b] = log((c[b] + smoothing) / (sum(c) + smoothing * num_buckets))``. The pseudo-count
    keeps a bucket the target never saw from vetoing every record that has it, in proportion to how
    much evidence there is; the reference instead adds 1e-8 to the probabilities, which pins such a
    bucket at log(1e-8) = -18.4 whatever the sample sizes.
    """
    c = np.asarray(total_counts, dtype=np.float64)
    if c.ndim != 1 or len(c) == 0:
        raise ValueError("total_counts must be a non-empty 1-D vector of bucket counts")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}")
    if (c < 0).any():
        raise ValueError("bucket counts must be non-negative")
    return np.log(c + smoothing) - math.log(float(c.sum()) + smoothing * len(c))


@dataclass(frozen=True)
class DSIRModel:
    """The global target and raw models (reduce 1's output): what every map-2 task needs to score.

    `seed` and `ngrams` are the featurizer's settings the counts were made with; map 2 must featurize
    with the same ones (``hashed_ngram_counts(texts, model.num_buckets, model.seed, model.ngrams)``).
    """

    log_p_target: FloatArray
    log_p_raw: FloatArray
    seed: int
    smoothing: float
    ngrams: int = 2

    @classmethod
    def fit(cls, target_counts: npt.ArrayLike, raw_counts: npt.ArrayLike, *, seed: int,
            smoothing: float = 1.0, ngrams: int = 2) -> DSIRModel:
        """Fit both models from summed bucket counts made with featurizer settings `seed` and `ngrams`."""
        log_p_target = fit_model(target_counts, smoothing)
        log_p_raw = fit_model(raw_counts, smoothing)
        if log_p_target.shape != log_p_raw.shape:
            raise ValueError(f"target has {len(log_p_target)} buckets but raw has {len(log_p_raw)}")
        return cls(log_p_target, log_p_raw, int(seed), float(smoothing), int(ngrams))

    @property
    def num_buckets(self) -> int:
        """Buckets of the feature space the models live in."""
        return len(self.log_p_target)

    @property
    def log_ratio(self) -> FloatArray:
        """``log p_target - log p_raw`` per bucket: a record's weight is its counts dotted with this."""
        return self.log_p_target - self.log_p_raw

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable form (floats round-trip exactly through ``repr``)."""
        return {"num_buckets": self.num_buckets, "seed": self.seed, "smoothing": self.smoothing,
                "ngrams": self.ngrams, "log_p_target": self.log_p_target.tolist(),
                "log_p_raw": self.log_p_raw.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DSIRModel:
        """Inverse of :meth:`to_dict`."""
        model = cls(np.asarray(data["log_p_target"], dtype=np.float64),
                    np.asarray(data["log_p_raw"], dtype=np.float64),
                    int(data["seed"]), float(data["smoothing"]), int(data.get("ngrams", 2)))
        if model.num_buckets != int(data["num_buckets"]) or len(model.log_p_raw) != model.num_buckets:
            raise ValueError("model vectors do not match num_buckets")
        return model

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> DSIRModel:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def log_importance_weights(features: HashedFeatures, log_p_target: FloatArray, log_p_raw: FloatArray) -> FloatArray:
    """Per record, ``sum over its buckets of count * (log p_target - log p_raw)`` (map stage 2).

    A record with no tokens weighs 0 (log 1): it carries no evidence either way.
    """
    log_ratio = np.asarray(log_p_target, dtype=np.float64) - np.asarray(log_p_raw, dtype=np.float64)
    if log_ratio.shape != (features.num_buckets,):
        raise ValueError(f"models have {log_ratio.shape} buckets, features have {features.num_buckets}")
    contributions = log_ratio[features.indices] * features.counts
    # bincount with float weights already returns float64; astype(copy=False) only informs the type checker.
    return np.bincount(features.row_ids, weights=contributions, minlength=len(features)).astype(np.float64, copy=False)


# ----------------------------------------------------------------------------------------------------
# Gumbel top-k


def _ids_array(record_ids: Sequence[Any] | npt.ArrayLike | pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(record_ids, pa.Array | pa.ChunkedArray):
        record_ids = record_ids.to_pylist()
    ids = np.asarray(record_ids)
    if ids.ndim != 1:
        raise ValueError("record_ids must be one-dimensional")
    if ids.dtype.kind not in "iuUS":
        raise TypeError(f"record ids must be integers or strings, got dtype {ids.dtype}")
    return ids


def _id_hashes(ids: np.ndarray, seed: int) -> U64Array:
    """A uniform 64-bit hash of each record id under `seed`, independent of where the record sits."""
    seed = int(seed) & _MASK64
    if ids.dtype.kind in "iu":
        # Integer ids hash in numpy: two splitmix64 rounds over the id offset by a seeded constant.
        seeded = _mix64(np.array([seed], dtype=np.uint64))[0]
        x = ids.astype(np.int64).view(np.uint64) ^ seeded
        return _mix64(_mix64(x + _GOLDEN))
    digest = xxhash.xxh3_64_intdigest
    encoded = (i.encode("utf-8") for i in ids.tolist()) if ids.dtype.kind == "U" else iter(ids.tolist())
    return np.fromiter((digest(b, seed) for b in encoded), dtype=np.uint64, count=len(ids))


def gumbel_keys(log_w: npt.ArrayLike, seed: int, record_ids: Sequence[Any] | npt.ArrayLike) -> FloatArray:
    """Gumbel top-k keys ``log_w + G`` with ``G ~ Gumbel(0, 1)`` drawn deterministically per record.

    The noise of a record is a function of (`seed`, its id) only, never of a global RNG stream, so a
    record gets the same key whichever shard or machine scores it; taking the k largest keys samples k
    records without replacement with probability proportional to ``exp(log_w)``. Integer and string ids
    hash differently (ids 7 and "7" get different noise): keep one id type across shards.
    """
    w = np.asarray(log_w, dtype=np.float64)
    ids = _ids_array(record_ids)
    if w.shape != ids.shape:
        raise ValueError(f"{len(w)} weights but {len(ids)} record ids")
    # The top 53 bits give a uniform double strictly inside (0, 1), so neither log below can blow up.
    u = ((_id_hashes(ids, seed) >> _U64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return w - np.log(-np.log(u))


class Candidates(NamedTuple):
    """The best records of a shard or of the whole pool: keys (descending) and their record ids."""

    keys: FloatArray
    ids: np.ndarray


def top_k(keys: npt.ArrayLike, k: int, record_ids: Sequence[Any] | npt.ArrayLike | None = None) -> IntArray:
    """Positions of the `k` largest keys, best first; ties broken by record id (or position), ascending.

    The (key descending, id ascending) order is total when ids are unique, which is what makes a top-k
    of per-shard top-ks equal the top-k of everything. NaN keys rank below every number.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    key = np.asarray(keys, dtype=np.float64)
    key = np.where(np.isnan(key), -np.inf, key)
    n = len(key)
    tie = np.arange(n) if record_ids is None else _ids_array(record_ids)
    if len(tie) != n:
        raise ValueError(f"{n} keys but {len(tie)} record ids")
    k = min(k, n)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if k < n:
        # argpartition finds the k-th largest key in O(n); every record at or above it is a candidate,
        # so records tied at the boundary are all seen by the exact sort below.
        threshold = key[np.argpartition(-key, k - 1)[k - 1]]
        candidates = np.flatnonzero(key >= threshold)
    else:
        candidates = np.arange(n)
    order = np.lexsort((tie[candidates], -key[candidates]))
    return candidates[order[:k]].astype(np.int64)


def shard_candidates(keys: npt.ArrayLike, record_ids: Sequence[Any] | npt.ArrayLike, k: int) -> Candidates:
    """A shard's k best (key, id) pairs: all that a global top-k can ever need from it."""
    key = np.asarray(keys, dtype=np.float64)
    ids = _ids_array(record_ids)
    best = top_k(key, k, ids)
    return Candidates(key[best], ids[best])


def merge_top_k(candidates: Iterable[Candidates | tuple[npt.ArrayLike, npt.ArrayLike]], k: int) -> Candidates:
    """The global top-k from per-shard candidate lists (reduce stage 2), best first.

    Streams: it keeps a running top-k and folds in one list at a time, so memory is O(k + one list)
    however many shards there are (top-k of (top-k of A) and B is top-k of A and B under a total
    order). Record ids must be unique across shards; a duplicate met in the working set is an error,
    and ids must all be integers or all be strings.
    """
    best = Candidates(np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64))
    for i, item in enumerate(candidates):
        keys = np.asarray(item[0], dtype=np.float64)
        ids = _ids_array(item[1])
        if keys.shape != ids.shape:
            raise ValueError(f"candidate list {i} has {len(keys)} keys but {len(ids)} ids")
        if i == 0:
            best = Candidates(keys, ids)
        else:
            if (best.ids.dtype.kind in "iu") != (ids.dtype.kind in "iu"):
                raise TypeError("candidate lists mix integer and string record ids")
            keys = np.concatenate([best.keys, keys])
            ids = np.concatenate([best.ids, ids])
        if count_repeats(ids):
            raise ValueError("duplicate record ids across candidate lists: the merge would not be exact")
        chosen = top_k(keys, k, ids)
        best = Candidates(keys[chosen], ids[chosen])
    return best


# ----------------------------------------------------------------------------------------------------
# Evaluation


def hashed_kl(target_counts: npt.ArrayLike, selected_counts: npt.ArrayLike, smoothing: float = 1.0) -> float:
    """KL(target || selected) between two hashed-feature distributions, both additively smoothed.

    The DSIR paper's "KL reduction" is ``hashed_kl(target, random) - hashed_kl(target, selected)``:
    how much closer to the target the selection is than a random subset of the same size.
    """
    log_p = fit_model(target_counts, smoothing)
    log_q = fit_model(selected_counts, smoothing)
    if log_p.shape != log_q.shape:
        raise ValueError(f"target has {len(log_p)} buckets but the set has {len(log_q)}")
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))


def kl_reduction(target_counts: npt.ArrayLike, selected_counts: npt.ArrayLike,
                 random_counts: npt.ArrayLike | Sequence[npt.ArrayLike], smoothing: float = 1.0) -> float:
    """``KL(target || random) - KL(target || selected)``; several random subsets' KLs are averaged."""
    rand = np.asarray(random_counts, dtype=np.float64)
    rand_kl = float(np.mean([hashed_kl(target_counts, r, smoothing) for r in np.atleast_2d(rand)]))
    return rand_kl - hashed_kl(target_counts, selected_counts, smoothing)


# ----------------------------------------------------------------------------------------------------
# One machine, end to end


def dsir_select(
    raw_texts: Sequence[str] | pa.Array | pa.ChunkedArray,
    target_texts: Sequence[str] | pa.Array | pa.ChunkedArray,
    k: int,
    *,
    record_ids: Sequence[Any] | npt.ArrayLike | None = None,
    seed: int = 0,
    num_buckets: int = NUM_BUCKETS,
    smoothing: float = 1.0,
) -> tuple[IntArray, FloatArray]:
    """Select `k` of `raw_texts` toward `target_texts`; return (positions best first, log weights).

    The composition of the stages on one machine, for tests and small jobs; distributed runs call the
    stages themselves (see the module docstring). `record_ids` default to positions.
    """
    raw = hashed_ngram_counts(raw_texts, num_buckets, seed)
    target = hashed_ngram_counts(target_texts, num_buckets, seed)
    model = DSIRModel.fit(target.total_counts(), raw.total_counts(), seed=seed, smoothing=smoothing)
    log_w = log_importance_weights(raw, model.log_p_target, model.log_p_raw)
    ids = np.arange(len(raw), dtype=np.int64) if record_ids is None else _ids_array(record_ids)
    keys = gumbel_keys(log_w, seed, ids)
    return top_k(keys, k, ids), log_w
