"""Near-duplicate detection with MinHash and LSH: the pure core, built to run as map -> shuffle -> reduce.

The stages and what crosses between them:

1. **map** (per input shard, independent): ``minhash_signatures`` turns texts into ``(n, num_perm)``
   uint32 signatures; ``band_hashes`` turns those into ``(n, bands)`` uint64 bucket keys;
   ``band_rows(keys, hashes)`` lays them out as the rows to shuffle: ``(key, band, band_hash)``,
   with a global int64 key per record (e.g. ``shard << 32 | row``). A signature depends only on the
   text and the parameters (``MinHashParams.signature_fingerprint``), never on the batch or shard,
   so shards can be signed anywhere, in any order, and re-signed after a crash with the same result.
2. **shuffle** the band rows by bucket (e.g. ``band_hash % partitions``).
3. **reduce** per partition: ``candidate_pairs`` groups rows by ``(band, band_hash)`` and links each
   bucket's members to its smallest key (star links: linear in bucket size, not quadratic), keeping
   only links that ``jaccard_verifier`` accepts (estimated Jaccard >= threshold, from signatures
   fetched for the linked keys only).
4. **resolve** (one small task over all links): ``components_from_links`` runs a vectorized
   union-find and picks each component's kept record (smallest priority, then smallest key).

``duplicate_components`` is steps 1-4 for one in-memory set, with record ids and drop reasons.

Why it is fast: texts are tokenized a batch at a time with byte arithmetic in numpy (Unicode
lowercasing by Arrow for the texts that need it; non-ASCII characters classified by a table);
each distinct word of the batch is hashed once with xxh3-64 (Arrow's dictionary encoding finds
them); a word n-gram's hash is a vectorized combination of its words' hashes finished with the
MurmurHash3 64-bit mixer; the permutations run over all shingles of a batch at once, one
permutation at a time over cache-sized chunks, and ``np.minimum.reduceat`` takes each text's
minimum. No Python loop runs per record, token or shingle.

Permutation schemes (both bit-compatible with datasketch >= 2.0 given the same 32-bit token hashes):

- ``affine32`` (default, datasketch's default since 2.0): MurmurHash3 32-bit premix, then
  ``a*h + b mod 2^32`` with odd ``a``: a bijection of the 32-bit space, so the permutation adds no
  collisions, and it runs on native 32-bit SIMD lanes (about 7x the legacy scheme here).
- ``legacy``: ``(a*h + b mod 2^61-1) & (2^32-1)`` as datasketch computed it before 2.0 (including
  its 64-bit wraparound of ``a*h``). Kept for signatures made that way; its fold to 32 bits is not
  a bijection, which slightly inflates estimates on very large sets (datasketch issue 212).

Tokens: the text is lowercased; tokens are maximal runs of letters, digits and combining marks
(so punctuation, underscores and whitespace all separate tokens); each Han, Hiragana or Katakana
letter is a token of its own, since those scripts put no spaces between words. A text with fewer
than ``ngram`` tokens has one shingle (all its tokens); a text with no tokens is empty: its
signature is all ``EMPTY_VALUE``, its band hashes are ``EMPTY_BAND_HASH``, and it never joins a
duplicate group.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import unicodedata
from collections.abc import Callable, Sequence
from typing import Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.dedup.unionfind import choose_keepers, connected_components

U32Array: TypeAlias = npt.NDArray[np.uint32]
U64Array: TypeAlias = npt.NDArray[np.uint64]
I64Array: TypeAlias = npt.NDArray[np.int64]
BoolArray: TypeAlias = npt.NDArray[np.bool_]
Texts: TypeAlias = Sequence[str | None] | pa.Array | pa.ChunkedArray
Scheme: TypeAlias = Literal["affine32", "legacy"]
Verifier: TypeAlias = Callable[[I64Array, I64Array], BoolArray]

# Bump when tokenization, shingle hashing or a permutation scheme changes: signatures made under
# different versions must never be compared (the fingerprint carries it).
ALGORITHM_VERSION = 1
EMPTY_VALUE = np.uint32(0xFFFFFFFF)  # every slot of an empty text's signature
EMPTY_BAND_HASH = np.uint64(0)  # band hash of an empty text: never a bucket (real ones avoid 0)
MAX_NGRAM = 32

_M64 = (1 << 64) - 1
_MERSENNE = np.uint64((1 << 61) - 1)
_MAX_HASH32 = np.uint64((1 << 32) - 1)
# Texts are tokenized and hashed in batches of about _BATCH_BYTES of text (at most _BATCH_TEXTS
# texts): ~10 bytes of temporaries per byte of text, so a batch's working set stays in the tens of
# MB and is reused by the allocator instead of being faulted in fresh for every batch.
_BATCH_BYTES = 4 << 20
_BATCH_TEXTS = 8192
_CHUNK_SHINGLES = 1 << 16  # shingles per permutation pass: 256 KiB of uint32, stays in L2 cache


def _fmix64_int(x: int) -> int:
    """MurmurHash3's 64-bit finalizer on a Python int (derives constants)."""
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _M64
    return x ^ (x >> 33)


# One odd multiplier per n-gram position (so word order matters) and per band (so equal rows in
# different bands give different keys). Derived, not tabulated, so any size is reproducible.
_POSITION_MULT = np.array([_fmix64_int(0x9E3779B97F4A7C15 * (k + 1) & _M64) | 1 for k in range(MAX_NGRAM)],
                          dtype=np.uint64)
_BAND_SEED_BASE = 0x27D4EB2F165667C5
_BAND_MULT = np.uint64(0x9E3779B185EBCA87)


def _fmix64(h: U64Array) -> U64Array:
    """MurmurHash3's 64-bit finalizer, in place: full avalanche of the combined word hashes."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


def _fmix32(h: U32Array) -> U32Array:
    """MurmurHash3's 32-bit finalizer, in place (datasketch's affine32 premix)."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


# ----------------------------------------------------------------------------------------------------
# Parameters


class MinHashParams(BaseModel):
    """MinHash/LSH parameters shared by the map and reduce stages (a step config can embed this).

    ``bands``/``rows`` default to ``optimal_bands(num_perm, threshold)``. ``verify`` drops LSH
    candidates whose estimated Jaccard is below ``threshold`` (removes bucket false positives).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_perm: int = Field(128, ge=2, le=4096, description="Signature length (permutations).")
    ngram: int = Field(5, ge=1, le=MAX_NGRAM, description="Words per shingle.")
    seed: int = Field(1, ge=0, lt=2**32, description="Seed of the permutations; all shards must share it.")
    threshold: float = Field(0.7, gt=0.0, lt=1.0, description="Jaccard similarity that counts as duplicate.")
    bands: int | None = Field(None, ge=1, description="LSH bands; default: optimal for the threshold.")
    rows: int | None = Field(None, ge=1, description="Signature rows per band.")
    scheme: Scheme = Field("affine32", description="Permutation scheme (see module docs).")
    verify: bool = Field(True, description="Check candidates by estimated Jaccard >= threshold.")

    @model_validator(mode="after")
    def _check_bands(self) -> MinHashParams:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither")
        if self.bands is not None and self.rows is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands*rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        return self

    def lsh(self) -> tuple[int, int]:
        """The (bands, rows) in effect."""
        if self.bands is not None and self.rows is not None:
            return self.bands, self.rows
        return optimal_bands(self.num_perm, self.threshold)

    def signature_fingerprint(self) -> str:
        """Identifies what a signature depends on; store it beside signatures, refuse to mix two."""
        # The Unicode tables decide which characters are word characters (a Python upgrade can
        # move a newly assigned character), so their version is part of what a signature means.
        spec = {"v": ALGORITHM_VERSION, "num_perm": self.num_perm, "ngram": self.ngram, "seed": self.seed,
                "scheme": self.scheme, "unicode": unicodedata.unidata_version}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def band_fingerprint(self) -> str:
        """Identifies what a band hash depends on (the signature plus the banding)."""
        bands, rows = self.lsh()
        spec = {"sig": self.signature_fingerprint(), "bands": bands, "rows": rows}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@functools.cache  # pure, and a step asks once per batch: about 40 ms each at 128 permutations
def optimal_bands(num_perm: int, threshold: float, false_positive_weight: float = 0.5,
                  false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimizing the weighted false-positive and false-negative areas of the LSH curve.

    A pair of Jaccard ``s`` shares at least one band with probability ``1 - (1 - s**r)**b``. The
    false-positive area integrates it over ``[0, threshold]``, the false-negative area integrates its
    complement over ``[threshold, 1]``; as in datasketch, every ``b*r <= num_perm`` is tried (here
    all at once, with Simpson's rule on a fine grid instead of one adaptive quadrature per pair).
    """
    if num_perm < 1:
        raise ValueError("num_perm must be >= 1")
    if not 0.0 < threshold < 1.0:
        raise ValueError("threshold must lie in (0, 1)")
    if abs(false_positive_weight + false_negative_weight - 1.0) > 1e-9:
        raise ValueError("the two weights must sum to 1")
    pairs = [(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)]
    b = np.array([p[0] for p in pairs], dtype=np.float64)[:, None]
    r = np.array([p[1] for p in pairs], dtype=np.float64)[:, None]

    def simpson(lo: float, hi: float, complement: bool) -> npt.NDArray[np.float64]:
        s = np.linspace(lo, hi, 2049)[None, :]  # odd point count, as Simpson's rule needs
        p = 1.0 - (1.0 - s**r) ** b
        y = 1.0 - p if complement else p
        w = np.ones(s.shape[1])
        w[1:-1:2], w[2:-1:2] = 4.0, 2.0
        return np.asarray((y * w).sum(axis=1) * (hi - lo) / (3 * (s.shape[1] - 1)))

    error = (false_positive_weight * simpson(0.0, threshold, False)
             + false_negative_weight * simpson(threshold, 1.0, True))
    best = int(np.argmin(error))  # first minimum, in datasketch's (b, r) order
    return pairs[best]


# ----------------------------------------------------------------------------------------------------
# Tokens and shingles


def _as_text_array(texts: Texts) -> pa.Array:
    """Texts as one large_string Arrow array without nulls (a null text is an empty text)."""
    if isinstance(texts, pa.ChunkedArray):
        arr = texts.combine_chunks() if texts.num_chunks != 1 else texts.chunk(0)
    elif isinstance(texts, pa.Array):
        arr = texts
    else:
        arr = pa.array(list(texts), type=pa.large_string())
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.large_string())
    if arr.null_count:
        arr = pc.fill_null(arr, "")
    return arr


def _string_buffers(arr: pa.Array) -> tuple[I64Array, npt.NDArray[np.uint8]]:
    """(offsets rebased to 0, UTF-8 bytes) of a string array, without copying the bytes."""
    dtype = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=dtype)[arr.offset: arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    data = data[offsets[0]: offsets[-1]]
    return offsets - offsets[0], data


_SEPARATOR, _WORD, _CJK = 0, 1, 2  # character classes of the tokenizer
# Letters of these blocks are one token each: Han, Hiragana, Katakana (and their extensions).
_CJK_RANGES = ((0x2E80, 0x2FDF), (0x3005, 0x3006), (0x3040, 0x30FF), (0x31F0, 0x31FF), (0x3400, 0x4DBF),
               (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFF66, 0xFF9F), (0x20000, 0x323AF))


def _char_class(cp: int) -> int:
    """Tokenizer class of a code point: letters, digits and marks are word characters."""
    if 0xD800 <= cp <= 0xDFFF:
        return _SEPARATOR
    major = unicodedata.category(chr(cp))[0]
    if major not in "LNM":
        return _SEPARATOR  # punctuation, symbols, spaces, controls
    if major == "L" and any(lo <= cp <= hi for lo, hi in _CJK_RANGES):
        return _CJK
    return _WORD


@functools.cache
def _bmp_classes() -> npt.NDArray[np.uint8]:
    """Class of every Basic Multilingual Plane code point, as ``_char_class`` gives it (built once)."""
    major = np.frombuffer("".join(unicodedata.category(chr(cp))[0] for cp in range(0x10000)).encode("ascii"),
                          dtype=np.uint8)
    table = np.where(np.isin(major, np.frombuffer(b"LNM", dtype=np.uint8)), _WORD, _SEPARATOR).astype(np.uint8)
    letter = major == ord("L")
    for lo, hi in _CJK_RANGES:
        if lo <= 0xFFFF:
            block = slice(lo, min(hi, 0xFFFF) + 1)
            table[block][letter[block]] = _CJK
    return table


def _lowered(arr: pa.Array) -> pa.Array:
    """The texts lowercased: Unicode rules (Arrow's utf8_lower) for texts with non-ASCII characters.

    ASCII texts are left as they are: the byte tokenizer folds ASCII case itself, for free.
    """
    non_ascii = pc.invert(pc.string_is_ascii(arr))
    if not pc.any(non_ascii).as_py():
        return arr
    return pc.replace_with_mask(arr, non_ascii, pc.utf8_lower(arr.filter(non_ascii)))


def _utf8_classes(data: npt.NDArray[np.uint8], word: BoolArray) -> tuple[BoolArray, I64Array]:
    """Add the non-ASCII characters to ``word`` by their class; return it and the CJK cut points.

    Decodes only the lead bytes of multi-byte characters (vectorized), looks their class up, and
    gives every byte of a character its class. Cut points are the byte positions where a CJK
    character starts or ends, to make each one a token.
    """
    lead = np.flatnonzero(data >= 0xC0)
    if lead.size == 0:
        return word, np.zeros(0, dtype=np.int64)
    padded = np.concatenate([data, np.zeros(3, dtype=np.uint8)])
    b0 = data[lead].astype(np.int64)
    b1, b2, b3 = (padded[lead + k].astype(np.int64) & 0x3F for k in (1, 2, 3))
    width = 2 + (b0 >= 0xE0) + (b0 >= 0xF0)
    cp = np.where(width == 2, ((b0 & 0x1F) << 6) | b1,
                  np.where(width == 3, ((b0 & 0x0F) << 12) | (b1 << 6) | b2,
                           ((b0 & 0x07) << 18) | (b1 << 12) | (b2 << 6) | b3))
    cls = _bmp_classes()[np.minimum(cp, 0xFFFF)]
    astral = np.flatnonzero(cp > 0xFFFF)
    if astral.size:  # rare (emoji, historic scripts, CJK extensions): classify each distinct one
        uniq, inverse = np.unique(cp[astral], return_inverse=True)
        cls[astral] = np.array([_char_class(int(c)) for c in uniq], dtype=np.uint8)[inverse]
    word = word.copy()
    for k in range(4):
        has = width > k
        word[lead[has] + k] = cls[has] != _SEPARATOR
    cjk = cls == _CJK
    return word, np.concatenate([lead[cjk], lead[cjk] + width[cjk]]).astype(np.int64)


def _byte_tokens(arr: pa.Array) -> tuple[pa.Array, I64Array]:
    """Tokens of all texts by byte arithmetic in numpy: (flat tokens, per-text token offsets, n+1).

    Expects ``_lowered`` texts. A token is a maximal run of word characters (ASCII [a-z0-9] and
    non-ASCII letters, digits and marks), cut where a text ends and around each CJK character.
    """
    offsets, data = _string_buffers(arr)
    folded = data | np.uint8(0x20)  # ASCII upper -> lower case; lower case and digits keep the bit
    letter = (folded - np.uint8(ord("a"))) < np.uint8(26)  # uint8 wraparound makes this one compare
    word = letter | ((data - np.uint8(ord("0"))) < np.uint8(10))
    low = data | (letter.view(np.uint8) << np.uint8(5))
    word, cuts = _utf8_classes(data, word)
    # Token starts and ends alternate among the positions where `word` flips.
    flips = np.nonzero(np.diff(word.view(np.int8), prepend=np.int8(0), append=np.int8(0)) != 0)[0]
    starts, ends = flips[0::2], flips[1::2]
    # Cut the runs that must be split: at text seams (no separator between two texts) and around
    # CJK characters; a cut only matters inside a run (word bytes on both sides). A mask sorts and
    # dedupes the candidates in one linear pass.
    at_cut = np.zeros(len(data) + 1, dtype=bool)
    at_cut[offsets] = True
    at_cut[cuts] = True
    at_cut[0] = at_cut[-1] = False
    cuts = np.nonzero(at_cut)[0]
    cuts = cuts[word[cuts] & word[cuts - 1]]
    if cuts.size:
        at = np.searchsorted(starts, cuts, side="right")  # token at[i]-1 contains cuts[i]
        starts = np.insert(starts, at, cuts)
        ends = np.insert(ends, at - 1, cuts)
    token_offsets = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(ends - starts, out=token_offsets[1:])
    chars = low[word]
    tokens = pa.Array.from_buffers(pa.large_string(), len(starts),
                                   [None, pa.py_buffer(token_offsets), pa.py_buffer(chars)])
    return tokens, np.searchsorted(starts, offsets).astype(np.int64)


def _tokens(arr: pa.Array) -> tuple[pa.Array, I64Array]:
    """Flat tokens of all texts in order and per-text token offsets."""
    return _byte_tokens(_lowered(arr))


def tokenize(texts: Texts) -> list[list[str]]:
    """Normalized tokens of each text (lowercase, punctuation and whitespace removed)."""
    arr = _as_text_array(texts)
    tokens, offsets = _tokens(arr)
    flat = tokens.to_pylist()
    return [flat[offsets[i]: offsets[i + 1]] for i in range(len(arr))]


def normalize(text: str) -> str:
    """The text as the shingler sees it: lowercase tokens joined by single spaces."""
    return " ".join(tokenize([text])[0])


def shingles(text: str, ngram: int = 5) -> list[str]:
    """Distinct word n-gram shingles of the normalized text, in first-occurrence order.

    A text with fewer than ``ngram`` tokens has one shingle (all of them); an empty text has none.
    Reference form for tests and peers; ``shingle_hashes`` computes the same shingles' hashes fast.
    """
    if not 1 <= ngram <= MAX_NGRAM:
        raise ValueError(f"ngram must lie in [1, {MAX_NGRAM}]")
    toks = tokenize([text])[0]
    if not toks:
        return []
    if len(toks) < ngram:
        return [" ".join(toks)]
    return list(dict.fromkeys(" ".join(toks[i: i + ngram]) for i in range(len(toks) - ngram + 1)))


def _word_hashes(tokens: pa.Array) -> U64Array:
    """xxh3-64 of each token's UTF-8 bytes; each distinct token of the batch is hashed once."""
    if len(tokens) == 0:
        return np.zeros(0, dtype=np.uint64)
    encoded = pc.dictionary_encode(tokens)
    words = encoded.dictionary.cast(pa.large_binary()).to_pylist()
    table = np.fromiter((xxhash.xxh3_64_intdigest(w) for w in words), dtype=np.uint64, count=len(words))
    return np.asarray(table[encoded.indices.to_numpy()])


def _combine_ngrams(words: U64Array, token_offsets: I64Array, ngram: int) -> tuple[U64Array, I64Array]:
    """Hashes of each text's word n-grams from its word hashes: (flat shingle hashes, per-text offsets).

    hash = fmix64(sum_k word[j+k] * M_k mod 2^64): distinct odd multipliers per position make it
    order-sensitive; the finalizer avalanches the sum. Computed for every window of the flat token
    array with shifted slices, then one gather keeps the windows that lie inside a single text.
    """
    counts = np.diff(token_offsets)
    per_text = np.where(counts >= ngram, counts - ngram + 1, np.minimum(counts, 1))
    shingle_offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(per_text, out=shingle_offsets[1:])
    total = int(shingle_offsets[-1])
    out = np.empty(total, dtype=np.uint64)
    if total == 0:
        return out, shingle_offsets
    full = counts >= ngram
    n_windows = len(words) - ngram + 1
    if full.any() and n_windows > 0:
        acc = words[:n_windows] * _POSITION_MULT[0]
        for k in range(1, ngram):
            acc += words[k: k + n_windows] * _POSITION_MULT[k]
        # window starts of texts with >= ngram tokens: token_offsets[i] + 0..per_text[i]-1
        rows = np.flatnonzero(full)
        lens = per_text[rows]
        starts = np.repeat(token_offsets[rows], lens) + _ranges(lens)
        dest = np.repeat(shingle_offsets[rows], lens) + _ranges(lens)
        out[dest] = acc[starts]
    short = np.flatnonzero((counts > 0) & ~full)
    if short.size:
        # texts shorter than ngram: one shingle of all their tokens (same formula, fewer terms)
        acc_s = np.zeros(short.size, dtype=np.uint64)
        for k in range(min(ngram, int(counts[short].max()))):
            present = counts[short] > k
            idx = token_offsets[short[present]] + k
            acc_s[present] += words[idx] * _POSITION_MULT[k]
        out[shingle_offsets[short]] = acc_s
    return _fmix64(out), shingle_offsets


def _ranges(lengths: I64Array) -> I64Array:
    """Concatenated aranges: [0..lengths[0]-1, 0..lengths[1]-1, ...]."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    return np.arange(total, dtype=np.int64) - np.repeat(ends - lengths, lengths)


def shingle_hashes(texts: Texts, ngram: int = 5) -> tuple[U64Array, I64Array]:
    """64-bit hashes of every word n-gram of every text: (flat hashes, per-text offsets, len n+1).

    Shingles of text i are ``hashes[offsets[i]:offsets[i+1]]`` (repeats kept: a min ignores them).
    The hash of a shingle depends only on its words, never on the batch.
    """
    if not 1 <= ngram <= MAX_NGRAM:
        raise ValueError(f"ngram must lie in [1, {MAX_NGRAM}]")
    tokens, token_offsets = _tokens(_as_text_array(texts))
    return _combine_ngrams(_word_hashes(tokens), token_offsets, ngram)


def token_hashes32(shingle_hashes64: U64Array) -> U32Array:
    """The 32-bit token hashes the permutations see: the top half of each 64-bit shingle hash."""
    return (shingle_hashes64 >> np.uint64(32)).astype(np.uint32)


# ----------------------------------------------------------------------------------------------------
# Signatures


def permutations(num_perm: int, seed: int, scheme: Scheme = "affine32") -> tuple[npt.NDArray[np.unsignedinteger],
                                                                                   npt.NDArray[np.unsignedinteger]]:
    """The (a, b) coefficients of the permutations, drawn exactly as datasketch draws them for a seed."""
    gen = np.random.RandomState(seed)
    if scheme == "affine32":
        a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
        return a, b
    if scheme == "legacy":
        ab = np.array([(gen.randint(1, _MERSENNE, dtype=np.uint64), gen.randint(0, _MERSENNE, dtype=np.uint64))
                       for _ in range(num_perm)], dtype=np.uint64).T
        return ab[0], ab[1]
    raise ValueError(f"unknown scheme {scheme!r}")


def signatures_from_token_hashes(hashes: U32Array, offsets: I64Array, num_perm: int = 128, seed: int = 1,
                                 scheme: Scheme = "affine32") -> U32Array:
    """MinHash signatures ``(n, num_perm)`` uint32 of texts given as flat 32-bit token hashes + offsets.

    Equal to datasketch's ``MinHash(num_perm, seed, scheme=..., hashfunc=<these hashes>)``. A text
    with no tokens gets all ``EMPTY_VALUE``.
    """
    hashes = np.asarray(hashes, dtype=np.uint32)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    a, b = permutations(num_perm, seed, scheme)
    counts = np.diff(offsets)
    texts = np.flatnonzero(counts > 0)
    mins = np.empty((num_perm, texts.size), dtype=np.uint32)  # permutation-major: contiguous rows
    if texts.size:
        seg = offsets[texts]  # segment starts of the non-empty texts (reduceat needs no empty segment)
        end = int(offsets[texts[-1] + 1])
        if scheme == "affine32":
            x: npt.NDArray[np.unsignedinteger] = _fmix32(hashes[: end].copy())
            buf: npt.NDArray[np.unsignedinteger] = np.empty(0, dtype=np.uint32)
        else:
            x = hashes[: end].astype(np.uint64)
            buf = np.empty(0, dtype=np.uint64)
        # Chunk boundaries (indices into `texts`) every ~_CHUNK_SHINGLES shingles.
        cuts = np.unique(np.concatenate([np.searchsorted(seg, np.arange(0, end, _CHUNK_SHINGLES)), [texts.size]]))
        for lo, hi in itertools.pairwise(cuts.tolist()):
            s0 = int(seg[lo])
            s1 = int(seg[hi]) if hi < texts.size else end
            xs, rel = x[s0:s1], seg[lo:hi] - s0
            if buf.size < s1 - s0:
                buf = np.empty(s1 - s0, dtype=x.dtype)
            tmp = buf[: s1 - s0]
            for k in range(num_perm):
                np.multiply(xs, a[k], out=tmp)
                np.add(tmp, b[k], out=tmp)
                if scheme == "legacy":
                    np.remainder(tmp, _MERSENNE, out=tmp)
                    np.bitwise_and(tmp, _MAX_HASH32, out=tmp)
                    mins[k, lo:hi] = np.minimum.reduceat(tmp, rel)
                else:
                    np.minimum.reduceat(tmp, rel, out=mins[k, lo:hi])
    out = np.full((n, num_perm), EMPTY_VALUE, dtype=np.uint32)
    out[texts] = mins.T
    return out


def minhash_signatures(texts: Texts, num_perm: int = 128, ngram: int = 5, seed: int = 1,
                       scheme: Scheme = "affine32") -> U32Array:
    """MinHash signatures ``(len(texts), num_perm)`` uint32 of the texts' word n-gram shingles.

    Deterministic per (text, num_perm, ngram, seed, scheme): signing shards separately gives the
    same rows as signing the whole set. Empty texts (no tokens) get all ``EMPTY_VALUE``.
    """
    if not 1 <= ngram <= MAX_NGRAM:
        raise ValueError(f"ngram must lie in [1, {MAX_NGRAM}]")
    if num_perm < 1:
        raise ValueError("num_perm must be >= 1")
    # Chunk by chunk: a chunked column (e.g. a Parquet read) is never combined into one copy.
    chunks = texts.chunks if isinstance(texts, pa.ChunkedArray) else [texts]
    arrays = [_as_text_array(chunk) for chunk in chunks]
    out = np.empty((sum(len(a) for a in arrays), num_perm), dtype=np.uint32)
    base = 0
    for arr in arrays:
        for start, stop in _batches(arr):
            h64, offsets = shingle_hashes(arr.slice(start, stop - start), ngram)
            out[base + start: base + stop] = signatures_from_token_hashes(token_hashes32(h64), offsets, num_perm,
                                                                          seed, scheme)
        base += len(arr)
    return out


def _batches(arr: pa.Array) -> list[tuple[int, int]]:
    """(start, stop) row ranges of about _BATCH_BYTES of text each (never empty, never split a text)."""
    n = len(arr)
    if n == 0:
        return []
    offsets, _ = _string_buffers(arr)
    cuts = np.searchsorted(offsets, np.arange(_BATCH_BYTES, int(offsets[-1]), _BATCH_BYTES), side="right")
    cuts = np.unique(np.concatenate([[0], cuts, np.arange(_BATCH_TEXTS, n, _BATCH_TEXTS), [n]]))
    cuts = cuts[(cuts >= 0) & (cuts <= n)]
    return [(int(a), int(b)) for a, b in itertools.pairwise(cuts.tolist()) if b > a]


def empty_signatures(signatures: U32Array) -> BoolArray:
    """Rows that are empty texts' signatures (all slots ``EMPTY_VALUE``)."""
    return np.asarray((np.asarray(signatures) == EMPTY_VALUE).all(axis=1))


def estimated_jaccard(left: U32Array, right: U32Array) -> npt.NDArray[np.float64]:
    """Row-wise estimated Jaccard of two equally shaped signature matrices (0 where either is empty)."""
    left, right = np.atleast_2d(left), np.atleast_2d(right)
    if left.shape != right.shape:
        raise ValueError(f"signature shapes differ: {left.shape} vs {right.shape}")
    est = np.empty(left.shape[0], dtype=np.float64)
    step = max(1, (1 << 22) // max(1, left.shape[1]))  # bounds the temporary boolean matrix
    for i in range(0, left.shape[0], step):
        est[i: i + step] = (left[i: i + step] == right[i: i + step]).mean(axis=1)
    est[empty_signatures(left) | empty_signatures(right)] = 0.0
    return est


def jaccard_verifier(fetch: Callable[[I64Array], U32Array], threshold: float) -> Verifier:
    """A ``candidate_pairs`` verifier: accept a link when its estimated Jaccard is >= ``threshold``.

    ``fetch`` maps keys to their signature rows; in a distributed reduce it gathers them from the
    map stage's signature files (only the keys that have a candidate link are ever fetched).
    """
    def verify(a: I64Array, b: I64Array) -> BoolArray:
        return np.asarray(estimated_jaccard(fetch(a), fetch(b)) >= threshold)

    return verify


def signature_verifier(signatures: U32Array, threshold: float) -> Verifier:
    """A ``candidate_pairs`` verifier for keys that are row numbers of ``signatures``."""
    sig = np.asarray(signatures)
    return jaccard_verifier(lambda keys: sig[keys], threshold)


# ----------------------------------------------------------------------------------------------------
# LSH bands: the shuffle keys


def band_hashes(signatures: U32Array, bands: int, rows: int) -> U64Array:
    """``(n, bands)`` uint64 bucket key of each band of ``rows`` signature slots.

    A vectorized multiply-xorshift chain over the band's slots, seeded per band and finished with
    fmix64. Empty texts get ``EMPTY_BAND_HASH`` in every band (never a bucket); a real band that
    happens to hash to it is moved to 1.
    """
    sig = np.asarray(signatures, dtype=np.uint32)
    if sig.ndim != 2:
        raise ValueError("signatures must be a 2-D array")
    if bands < 1 or rows < 1 or bands * rows > sig.shape[1]:
        raise ValueError(f"bands*rows = {bands}*{rows} must be between 1 and num_perm = {sig.shape[1]}")
    n = sig.shape[0]
    slots = sig[:, : bands * rows].reshape(n, bands, rows)
    seeds = np.array([_fmix64_int((_BAND_SEED_BASE + i) & _M64) for i in range(bands)], dtype=np.uint64)
    h = np.repeat(seeds[None, :], n, axis=0)
    for k in range(rows):
        h ^= slots[:, :, k]
        h *= _BAND_MULT
        h ^= h >> np.uint64(29)
    h = _fmix64(h)
    h[h == EMPTY_BAND_HASH] = np.uint64(1)
    h[empty_signatures(sig)] = EMPTY_BAND_HASH
    return h


def band_rows(keys: npt.ArrayLike, hashes: U64Array) -> pa.Table:
    """The rows the map stage emits for the shuffle: ``key`` int64, ``band`` int32, ``band_hash`` uint64.

    One row per (text, band); empty texts emit nothing. Shuffle them by ``(band, band_hash)``.
    """
    keys_arr = np.asarray(keys, dtype=np.int64)
    hashes = np.asarray(hashes, dtype=np.uint64)
    if hashes.ndim != 2 or hashes.shape[0] != keys_arr.shape[0]:
        raise ValueError("hashes must be (len(keys), bands)")
    bands = hashes.shape[1]
    live = hashes[:, 0] != EMPTY_BAND_HASH
    flat_keys = np.repeat(keys_arr[live], bands)
    flat_bands = np.tile(np.arange(bands, dtype=np.int32), int(live.sum()))
    return pa.table({"key": flat_keys, "band": flat_bands, "band_hash": hashes[live].reshape(-1)})


def _unique_pairs(a: I64Array, b: I64Array) -> tuple[I64Array, I64Array, I64Array]:
    """Distinct (a, b) pairs and, for each input pair, the index of its distinct pair."""
    if a.size == 0:
        return a, b, np.zeros(0, dtype=np.int64)
    order = np.lexsort((b, a))
    sa, sb = a[order], b[order]
    new = np.empty(a.size, dtype=bool)
    new[0] = True
    new[1:] = (sa[1:] != sa[:-1]) | (sb[1:] != sb[:-1])
    group = np.cumsum(new) - 1
    inverse = np.empty(a.size, dtype=np.int64)
    inverse[order] = group
    return sa[new], sb[new], inverse


def candidate_pairs(rows: pa.Table, verify: Verifier | None = None, max_rounds: int = 4) -> pa.Table:
    """Duplicate links from band rows ``(key, band, band_hash)``: a table ``(key, linked_key)`` int64.

    Rows may come from any number of shards. Each ``(band, band_hash)`` bucket links its members to
    its smallest key (a star: ``size - 1`` links, not ``size^2/2``). With ``verify`` (e.g.
    ``jaccard_verifier``), a link is kept only if ``verify`` accepts it, and every member also tries
    the bucket's next smallest keys below it, up to ``max_rounds`` keys in all, keeping each link that
    verifies: a centre that is a false positive cannot cut its bucket's true duplicates apart, and a
    member just below the threshold against the centre still finds a closer duplicate. Cost stays
    linear in bucket size (at most ``max_rounds`` checks per member).
    A member's links depend only on the keys below it, so rows with larger keys added later (a
    night's appended shards) never change the links among the earlier ones: linking the new rows
    against each bucket's ``max_rounds`` smallest earlier keys (``operators/steps/dedup/near.py``'s
    index) gives the same links as linking everything again.
    Links are distinct, with ``key > linked_key``.
    """
    keys = np.asarray(rows.column("key").to_numpy(), dtype=np.int64)
    band = np.asarray(rows.column("band").to_numpy(), dtype=np.int64)
    bhash = np.asarray(rows.column("band_hash").to_numpy(), dtype=np.uint64)
    live = bhash != EMPTY_BAND_HASH
    keys, band, bhash = keys[live], band[live], bhash[live]
    empty = pa.table({"key": pa.array([], pa.int64()), "linked_key": pa.array([], pa.int64())})
    if keys.size < 2:
        return empty
    # Most buckets hold one row. One fast sort on the hash alone finds the rows whose hash recurs;
    # only those get the exact sort by (band, hash, key).
    by_hash = np.argsort(bhash)
    sorted_hash = bhash[by_hash]
    same = sorted_hash[1:] == sorted_hash[:-1]
    recurs = np.zeros(keys.size, dtype=bool)
    recurs[1:] |= same
    recurs[:-1] |= same
    chosen = by_hash[recurs]
    keys, band, bhash = keys[chosen], band[chosen], bhash[chosen]
    if keys.size < 2:
        return empty
    order = np.lexsort((keys, bhash, band))
    keys, band, bhash = keys[order], band[order], bhash[order]
    first = np.empty(keys.size, dtype=bool)
    first[0] = True
    first[1:] = (band[1:] != band[:-1]) | (bhash[1:] != bhash[:-1])
    # The same key twice in one bucket (a re-emitted shard) is one member.
    repeat = np.zeros(keys.size, dtype=bool)
    repeat[1:] = ~first[1:] & (keys[1:] == keys[:-1])
    keys, first = keys[~repeat], first[~repeat]
    group = np.cumsum(first) - 1
    size = np.bincount(group)
    multi = size[group] >= 2
    keys, group = keys[multi], group[multi]
    if keys.size == 0:
        return empty
    # Rows are sorted by (bucket, key): a member's position in its bucket is its rank by key.
    start = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))
    bucket_start = np.repeat(start, np.diff(np.append(start, keys.size)))
    position = np.arange(keys.size) - bucket_start
    src_parts: list[I64Array] = []
    dst_parts: list[I64Array] = []
    for centre_rank in range(max(1, max_rounds) if verify is not None else 1):
        trying = np.flatnonzero(position > centre_rank)  # every member tries this centre if it lies below it
        if trying.size == 0:
            break
        centre_row = bucket_start[trying] + centre_rank
        member, centre = keys[trying], keys[centre_row]
        src, dst = np.maximum(member, centre), np.minimum(member, centre)
        if verify is None:
            ok = np.ones(trying.size, dtype=bool)
        else:
            us, ud, inverse = _unique_pairs(src, dst)  # one pair recurs in every band it shares
            ok = np.asarray(verify(us, ud), dtype=bool)[inverse]
        src_parts.append(src[ok])
        dst_parts.append(dst[ok])
    if not src_parts:
        return empty
    src_all, dst_all, _ = _unique_pairs(np.concatenate(src_parts), np.concatenate(dst_parts))
    return pa.table({"key": src_all, "linked_key": dst_all})


# ----------------------------------------------------------------------------------------------------
# Components and the keep choice


def components_from_links(links: pa.Table,
                          priority: Callable[[I64Array], npt.ArrayLike | pa.Array] | None = None) -> pa.Table:
    """Connected components of duplicate links and the record each keeps: the reduce's last step.

    ``links`` is ``(key, linked_key)`` from ``candidate_pairs`` of any number of partitions
    (repeats are fine). The kept key of a component has the smallest ``priority(keys)`` (called once
    with the sorted distinct keys that have a link; e.g. ``-reward`` fetched from the map output),
    ties broken by the smallest key; without ``priority``, the smallest key.

    Returns one row per linked key, sorted by key: ``key``, ``keep_key``, ``keep`` (``key ==
    keep_key``), ``component_size``. Keys without a link have no duplicate and do not appear.
    """
    src = np.asarray(links.column("key").to_numpy(), dtype=np.int64)
    dst = np.asarray(links.column("linked_key").to_numpy(), dtype=np.int64)
    keys, inverse = np.unique(np.concatenate([src, dst]), return_inverse=True)
    labels = connected_components(len(keys), inverse[: len(src)], inverse[len(src):])
    if priority is None:
        rank = np.arange(len(keys), dtype=np.int64)  # keys are sorted: rank by key
    else:
        values = priority(keys)
        prio = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(np.asarray(values))
        if len(prio) != len(keys):
            raise ValueError(f"priority returned {len(prio)} values for {len(keys)} keys")
        order = pc.sort_indices(pa.table({"p": prio, "key": keys}),
                                sort_keys=[("p", "ascending"), ("key", "ascending")]).to_numpy()
        rank = np.empty(len(keys), dtype=np.int64)
        rank[order] = np.arange(len(keys), dtype=np.int64)
    keepers = choose_keepers(labels, rank)
    return pa.table({
        "key": pa.array(keys, pa.int64()),
        "keep_key": pa.array(keys[keepers], pa.int64()),
        "keep": pa.array(keepers == np.arange(len(keys))),
        "component_size": pa.array(np.bincount(labels, minlength=len(keys))[labels], pa.int64()),
    })


def _as_arrow(values: npt.ArrayLike | pa.Array | pa.ChunkedArray | Sequence[object]) -> pa.Array:
    """One Arrow array from an Arrow array, a chunked array, a numpy array or a Python sequence."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    return pa.array(values)


def duplicate_components(ids: npt.ArrayLike | pa.Array | pa.ChunkedArray | Sequence[object], hashes: U64Array, *,
                         signatures: U32Array | None = None, threshold: float | None = None,
                         priority: npt.ArrayLike | pa.Array | pa.ChunkedArray | None = None,
                         max_rounds: int = 4) -> pa.Table:
    """Near-duplicate groups of one in-memory set, and which record each group keeps.

    ``ids`` are the records' ids (any sortable Arrow type), ``hashes`` their ``band_hashes``. With
    ``signatures`` and ``threshold``, candidate links are verified by estimated Jaccard. The kept
    record of a group is the one with the smallest ``priority`` (e.g. ``-reward``), ties broken by
    the smallest id; without ``priority``, the smallest id. (The same as the distributed path:
    ``band_rows`` -> ``candidate_pairs`` -> ``components_from_links``, with row numbers as keys.)

    Returns one row per record that has a duplicate, in input order: ``id``, ``keep_id`` (the id
    its group keeps), ``keep`` (``id == keep_id``) and ``component_size``.
    """
    id_arr = _as_arrow(ids)
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(id_arr)
    if hashes.shape[0] != n:
        raise ValueError(f"{n} ids but {hashes.shape[0]} rows of band hashes")
    verify = None
    if signatures is not None and threshold is not None:
        if np.asarray(signatures).shape[0] != n:
            raise ValueError("signatures must have one row per id")
        verify = signature_verifier(signatures, threshold)
    links = candidate_pairs(band_rows(np.arange(n), hashes), verify=verify, max_rounds=max_rounds)
    # Rank every row by (priority, id) once; that rank is the components' priority (never tied).
    if priority is None:
        order = pc.sort_indices(id_arr).to_numpy()
    else:
        prio = _as_arrow(priority)
        if len(prio) != n:
            raise ValueError("priority must have one value per id")
        order = pc.sort_indices(pa.table({"p": prio, "id": id_arr}),
                                sort_keys=[("p", "ascending"), ("id", "ascending")]).to_numpy()
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64)
    comps = components_from_links(links, priority=lambda keys: rank[keys])
    return pa.table({
        "id": id_arr.take(comps.column("key")),
        "keep_id": id_arr.take(comps.column("keep_key")),
        "keep": comps.column("keep"),
        "component_size": comps.column("component_size"),
    })


def near_duplicate_drops(components: pa.Table) -> pa.Table:
    """The dropped records of a ``duplicate_components`` result: ``id``, ``keep_id``, ``reason``."""
    dropped = components.filter(pc.invert(components.column("keep")))
    reason = pc.binary_join_element_wise("near_duplicate of ", pc.cast(dropped.column("keep_id"), pa.string()), "")
    return pa.table({"id": dropped.column("id"), "keep_id": dropped.column("keep_id"), "reason": reason})
