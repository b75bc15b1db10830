"""MinHash + LSH near-duplicate core: tokens, signatures, sharding invariance, buckets, components.

Fast (a few seconds): small corpora built from a seeded vocabulary, so every expectation is exact
or bounded by the binomial error of a 128-slot estimate.
"""

from __future__ import annotations

import random
from itertools import combinations, pairwise

import numpy as np
import pyarrow as pa
import pytest

from operators.dedup import (
    EMPTY_BAND_HASH,
    EMPTY_VALUE,
    MinHashParams,
    band_hashes,
    band_rows,
    candidate_pairs,
    components_from_links,
    connected_components,
    duplicate_components,
    empty_signatures,
    estimated_jaccard,
    jaccard_verifier,
    minhash_signatures,
    near_duplicate_drops,
    normalize,
    optimal_bands,
    shingle_hashes,
    shingles,
    signatures_from_token_hashes,
    token_hashes32,
    tokenize,
)
from operators.dedup import minhash as mh

NUM_PERM, NGRAM, THRESHOLD = 128, 5, 0.7
BANDS, ROWS = optimal_bands(NUM_PERM, THRESHOLD)


def _vocab(rng: random.Random, size: int = 3000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return list(dict.fromkeys("".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(size)))


def _paragraph(rng: random.Random, vocab: list[str], n: int | None = None) -> list[str]:
    return rng.choices(vocab, k=n or rng.randint(80, 160))


def _light_edit(rng: random.Random, words: list[str], rate: float = 0.005) -> list[str]:
    out = list(words)
    for _ in range(max(1, int(len(out) * rate))):
        i = rng.randrange(len(out) - 1)
        if rng.random() < 0.5:
            out[i], out[i + 1] = out[i + 1], out[i]
        else:
            del out[i]
    return out


def _exact_jaccard(a: str, b: str, ngram: int = NGRAM) -> float:
    sa, sb = set(shingles(a, ngram)), set(shingles(b, ngram))
    return len(sa & sb) / len(sa | sb) if sa | sb else 0.0


# ----------------------------------------------------------------------------------------------------
# Tokens and shingles


def test_normalization_lowercases_strips_punctuation_and_collapses_whitespace() -> None:
    assert normalize("  Hello,   WORLD!\n\tIt's  a_test... (really)  ") == "hello world it s a test really"
    assert normalize("Café NAÏVE — “quoted” Zürich") == "café naïve quoted zürich"
    assert normalize("") == normalize("  !!! ... ---  ") == ""
    # Han/Kana characters are one token each; Devanagari keeps its combining marks inside the word.
    assert tokenize(["中文字，ひらがな。 हिन्दी भाषा"])[0] == ["中", "文", "字", "ひ", "ら", "が", "な", "हिन्दी", "भाषा"]
    # A token never runs from one text into the next, whatever the batch looks like.
    assert tokenize(["abc", "", "def", "Ghi."]) == [["abc"], [], ["def"], ["ghi"]]


def test_byte_tokenizer_matches_a_per_character_reference() -> None:
    """The vectorized byte tokenizer equals a plain per-character loop over str.lower()."""
    def reference(text: str) -> list[str]:
        out: list[str] = []
        cur: list[str] = []
        for ch in text.lower():
            cls = mh._char_class(ord(ch))
            if cls == mh._WORD:
                cur.append(ch)
                continue
            if cur:
                out.append("".join(cur))
                cur = []
            if cls == mh._CJK:
                out.append(ch)
        if cur:
            out.append("".join(cur))
        return out

    rng = random.Random(3)
    alphabet = list("abcXYZ019 ,.;_-'\n\t!?\"()") + list("éÜñßçøÅ“”’—…，。、中文ひらカタनहीπΩЖжا😀𠀀\u00a0\u3000")
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(2000)]
    assert tokenize(texts) == [reference(t) for t in texts]


def test_shingles_short_and_empty_texts() -> None:
    assert shingles("The quick brown fox jumps over", 3) == [
        "the quick brown", "quick brown fox", "brown fox jumps", "fox jumps over"]
    assert shingles("Just two", 5) == ["just two"]  # shorter than ngram: one shingle of everything
    assert shingles("  ...  ", 5) == []
    assert shingles("a b a b a b", 2) == ["a b", "b a"]  # distinct, first-occurrence order


def test_shingle_hashes_are_one_per_shingle_and_order_sensitive() -> None:
    texts = ["one two three four five six", "six five four three two one", "x", ""]
    hashes, offsets = shingle_hashes(texts, 3)
    assert offsets.tolist() == [0, 4, 8, 9, 9]
    first, second = set(hashes[0:4].tolist()), set(hashes[4:8].tolist())
    assert len(first) == 4 and not first & second  # reversed word order shares no 3-gram


# ----------------------------------------------------------------------------------------------------
# Signatures


def test_identical_texts_identical_signatures_and_formatting_is_ignored() -> None:
    rng = random.Random(1)
    text = " ".join(_paragraph(rng, _vocab(rng)))
    variant = "  " + text.upper().replace(" ", " ,\n ") + " !!"
    sig = minhash_signatures([text, text, variant], NUM_PERM, NGRAM, seed=5)
    assert sig.shape == (3, NUM_PERM) and sig.dtype == np.uint32
    assert (sig[0] == sig[1]).all() and (sig[0] == sig[2]).all()
    assert not (sig[0] == minhash_signatures([text], NUM_PERM, NGRAM, seed=6)[0]).all()  # the seed matters


def test_empty_texts_get_the_empty_signature() -> None:
    sig = minhash_signatures(["", "   ", "?!", None, "real words here"], NUM_PERM, NGRAM)  # type: ignore[list-item]
    assert empty_signatures(sig).tolist() == [True, True, True, True, False]
    assert (sig[0] == EMPTY_VALUE).all()
    assert estimated_jaccard(sig[0:1], sig[1:2])[0] == 0.0  # two empties are not similar


@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
def test_signatures_equal_datasketch_bit_for_bit(scheme: str) -> None:
    """Given the same 32-bit token hashes, our vectorized permutations equal datasketch's MinHash."""
    import datasketch  # the bench extra, installed by make test: missing is an error, not a skip
    rng = random.Random(2)
    vocab = _vocab(rng)
    texts = [" ".join(_paragraph(rng, vocab, rng.randint(1, 40))) for _ in range(20)] + [""]
    h64, offsets = shingle_hashes(texts, NGRAM)
    tokens = token_hashes32(h64)
    ours = signatures_from_token_hashes(tokens, offsets, 64, seed=11, scheme=scheme)  # type: ignore[arg-type]
    for i in range(len(texts)):
        m = datasketch.MinHash(num_perm=64, seed=11, scheme=scheme, hashfunc=int)
        chunk = tokens[offsets[i]: offsets[i + 1]].tolist()
        if chunk:
            m.update_batch(chunk)
        assert m.hashvalues.astype(np.uint64).tolist() == ours[i].astype(np.uint64).tolist(), i


def test_estimate_tracks_exact_jaccard_on_random_pairs() -> None:
    """Estimated vs exact shingle Jaccard over pairs spanning 0..1: unbiased, within binomial error."""
    rng = random.Random(4)
    vocab = _vocab(rng)
    left, right, exact = [], [], []
    for _ in range(60):
        words = _paragraph(rng, vocab, 150)
        keep = rng.uniform(0.0, 1.0)
        other = [w if rng.random() < keep else rng.choice(vocab) for w in words]
        left.append(" ".join(words))
        right.append(" ".join(other))
        exact.append(_exact_jaccard(left[-1], right[-1]))
    sig = minhash_signatures(left + right, NUM_PERM, NGRAM, seed=3)
    est = estimated_jaccard(sig[:60], sig[60:])
    err = est - np.array(exact)
    sd = np.sqrt(np.maximum(np.array(exact) * (1 - np.array(exact)), 0.01) / NUM_PERM)
    assert np.all(np.abs(err) <= 5 * sd + 1e-9), list(zip(exact, est, strict=True))
    assert abs(err.mean()) < 0.02
    assert max(exact) > 0.8 and min(exact) < 0.1  # the pairs really span the range


def test_sharded_signatures_equal_whole_set_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(5)
    vocab = _vocab(rng)
    texts = [" ".join(_paragraph(rng, vocab, rng.randint(0, 60))) for _ in range(300)]
    texts[7] = "Ünïcode café “quotes” and 中文字符 here"
    texts[8] = ""
    whole = minhash_signatures(texts, NUM_PERM, NGRAM, seed=9)
    cuts = [0, 1, 37, 38, 150, 299, 300]
    shards = [minhash_signatures(pa.array(texts[a:b]), NUM_PERM, NGRAM, seed=9) for a, b in pairwise(cuts)]
    assert (np.vstack(shards) == whole).all()
    # Internal batching (a few hundred bytes per batch here) must not change anything either.
    monkeypatch.setattr(mh, "_BATCH_BYTES", 300)
    monkeypatch.setattr(mh, "_CHUNK_SHINGLES", 64)
    assert (minhash_signatures(pa.chunked_array([texts[:100], texts[100:]]), NUM_PERM, NGRAM, seed=9) == whole).all()


# ----------------------------------------------------------------------------------------------------
# LSH, candidates, components


def _corpus(seed: int, n_clusters: int = 25, n_unrelated: int = 150) -> tuple[list[str], list[int]]:
    """Planted clusters (a paragraph and 1-3 light edits of it) among unrelated paragraphs, shuffled."""
    rng = random.Random(seed)
    vocab = _vocab(rng)
    texts: list[str] = []
    cluster: list[int] = []
    for c in range(n_clusters):
        base = _paragraph(rng, vocab, rng.randint(200, 300))  # one edit keeps exact Jaccard >= ~0.93
        texts.append(" ".join(base))
        cluster.append(c)
        for _ in range(rng.randint(1, 3)):
            texts.append(" ".join(_light_edit(rng, base)))
            cluster.append(c)
    for _ in range(n_unrelated):
        texts.append(" ".join(_paragraph(rng, vocab)))
        cluster.append(-1)
    order = list(range(len(texts)))
    rng.shuffle(order)
    return [texts[i] for i in order], [cluster[i] for i in order]


def _groups(labels: np.ndarray) -> set[frozenset[int]]:
    by: dict[int, set[int]] = {}
    for i, label in enumerate(labels.tolist()):
        by.setdefault(label, set()).add(i)
    return {frozenset(g) for g in by.values() if len(g) > 1}


def _planted_groups(cluster: list[int]) -> set[frozenset[int]]:
    by: dict[int, set[int]] = {}
    for i, c in enumerate(cluster):
        if c >= 0:
            by.setdefault(c, set()).add(i)
    return {frozenset(g) for g in by.values()}


def test_planted_near_duplicates_found_across_shards_and_unrelated_not_merged() -> None:
    """The distributed shape: map per shard, shuffle band rows by bucket, reduce per partition, components.

    Keys are global, ``shard << 32 | row``, as a map stage would assign them; the reduce fetches
    only the signatures of keys that have a candidate link.
    """
    texts, cluster = _corpus(6)
    n = len(texts)
    shard_cuts = [0, n // 3, n // 3 + 1, 2 * n // 3, n]
    shard_sigs, row_parts, key_to_row = [], [], {}
    for shard, (a, b) in enumerate(pairwise(shard_cuts)):  # map: every shard alone
        sig = minhash_signatures(texts[a:b], NUM_PERM, NGRAM)
        keys = (np.int64(shard) << np.int64(32)) | np.arange(b - a, dtype=np.int64)
        shard_sigs.append(sig)
        row_parts.append(band_rows(keys, band_hashes(sig, BANDS, ROWS)))
        key_to_row.update({int(k): a + i for i, k in enumerate(keys)})
    rows = pa.concat_tables(row_parts)
    fetched: set[int] = set()

    def fetch(keys: np.ndarray) -> np.ndarray:
        fetched.update(keys.tolist())
        return np.stack([shard_sigs[int(k) >> 32][int(k) & 0xFFFFFFFF] for k in keys])

    verify = jaccard_verifier(fetch, THRESHOLD)
    partition = (rows.column("band_hash").to_numpy() % np.uint64(4)).astype(np.int64)  # shuffle by bucket
    links = pa.concat_tables([candidate_pairs(rows.filter(pa.array(partition == p)), verify=verify)
                              for p in range(4)])
    comps = components_from_links(links)
    found: dict[int, set[int]] = {}
    for key, keep_key in zip(comps.column("key").to_pylist(), comps.column("keep_key").to_pylist(), strict=True):
        found.setdefault(keep_key, set()).add(key_to_row[key])
    assert {frozenset(g) for g in found.values()} == _planted_groups(cluster)
    assert all(key_to_row[k] == min(g) for k, g in found.items())  # smallest key = earliest shard/row
    assert len(fetched) < n // 2  # only linked candidates were fetched, not every signature
    # Some planted clusters do straddle the shard boundaries, so the test covers that case.
    shard_of = np.searchsorted(shard_cuts, np.arange(n), side="right")
    assert any(len({int(shard_of[i]) for i in g}) > 1 for g in _planted_groups(cluster))


def test_components_from_links_priority_and_repeats() -> None:
    links = pa.table({"key": [5, 9, 9, 30, 31], "linked_key": [1, 5, 5, 20, 20]})
    comps = components_from_links(links)
    assert comps.to_pydict() == {"key": [1, 5, 9, 20, 30, 31], "keep_key": [1, 1, 1, 20, 20, 20],
                                 "keep": [True, False, False, True, False, False],
                                 "component_size": [3, 3, 3, 3, 3, 3]}
    reward = {1: 0.1, 5: 0.9, 9: 0.9, 20: 0.5, 30: 0.5, 31: 0.7}
    comps = components_from_links(links, priority=lambda keys: np.array([-reward[int(k)] for k in keys]))
    assert comps.column("keep_key").to_pylist() == [5, 5, 5, 31, 31, 31]  # ties (5, 9) go to the smaller key
    assert components_from_links(pa.table({"key": pa.array([], pa.int64()),
                                           "linked_key": pa.array([], pa.int64())})).num_rows == 0


def test_duplicate_components_in_memory_matches_planted_clusters() -> None:
    texts, cluster = _corpus(7)
    sig = minhash_signatures(texts, NUM_PERM, NGRAM)
    comps = duplicate_components([f"r{i:04d}" for i in range(len(texts))], band_hashes(sig, BANDS, ROWS),
                                 signatures=sig, threshold=THRESHOLD)
    found: dict[str, set[int]] = {}
    for rid, keep_id in zip(comps.column("id").to_pylist(), comps.column("keep_id").to_pylist(), strict=True):
        found.setdefault(keep_id, set()).add(int(rid[1:]))
    assert {frozenset(g) for g in found.values()} == _planted_groups(cluster)
    for g in found.values():  # default keep choice: the smallest id of the group
        assert f"r{min(g):04d}" in found


def test_empty_texts_are_never_grouped() -> None:
    texts = ["", "   ", "...", "!!!", "", "same words in this text", "same words in this text"]
    sig = minhash_signatures(texts, NUM_PERM, NGRAM)
    keys = band_hashes(sig, BANDS, ROWS)
    assert (keys[:5] == EMPTY_BAND_HASH).all() and (keys[5:] != EMPTY_BAND_HASH).all()
    assert band_rows(np.arange(7), keys).num_rows == 2 * BANDS  # empties emit no rows
    comps = duplicate_components(list(range(7)), keys)  # even without signatures to verify with
    assert comps.column("id").to_pylist() == [5, 6]
    # Band rows that do carry the empty sentinel (a careless map stage) still never link.
    forced = pa.table({"key": np.arange(5), "band": np.zeros(5, np.int32), "band_hash": keys[:5, 0]})
    assert candidate_pairs(forced).num_rows == 0


def test_keep_choice_is_deterministic_and_honours_priority() -> None:
    rng = random.Random(8)
    vocab = _vocab(rng)
    base = _paragraph(rng, vocab)
    texts = [" ".join(base)] + [" ".join(_light_edit(rng, base, 0.005)) for _ in range(3)]
    texts += [" ".join(_paragraph(rng, vocab)) for _ in range(4)]
    ids = ["d", "b", "c", "a", "x1", "x2", "x3", "x4"]
    reward = [0.9, 0.1, 0.5, 0.2, 0.0, 0.0, 0.0, 0.0]
    sig = minhash_signatures(texts, NUM_PERM, NGRAM)
    keys = band_hashes(sig, BANDS, ROWS)

    def run(order: list[int], priority: list[float] | None) -> dict[str, str]:
        comps = duplicate_components([ids[i] for i in order], keys[order], signatures=sig[order], threshold=0.5,
                                     priority=None if priority is None else [priority[i] for i in order])
        return dict(zip(comps.column("id").to_pylist(), comps.column("keep_id").to_pylist(), strict=True))

    default = run(list(range(8)), None)
    assert default == {"a": "a", "b": "a", "c": "a", "d": "a"}
    best_reward = run(list(range(8)), [-r for r in reward])  # lower priority wins: -reward keeps the best
    assert set(best_reward.values()) == {"d"}
    shuffled = list(range(8))
    random.Random(0).shuffle(shuffled)
    assert run(shuffled, None) == default and run(shuffled, [-r for r in reward]) == best_reward
    comps = duplicate_components(ids, keys, signatures=sig, threshold=0.5)
    drops = near_duplicate_drops(comps)
    assert sorted(drops.column("reason").to_pylist()) == ["near_duplicate of a"] * 3
    assert sorted(drops.column("id").to_pylist()) == ["b", "c", "d"]


def test_big_bucket_gives_linear_star_links() -> None:
    sig = minhash_signatures(["the very same text in every record"] * 2000, NUM_PERM, NGRAM)
    links = candidate_pairs(band_rows(np.arange(2000), band_hashes(sig, BANDS, ROWS)))
    assert links.num_rows == 1999  # one link per member to the smallest key, deduplicated over bands
    assert set(links.column("linked_key").to_pylist()) == {0}


def test_verification_regroups_members_when_the_centre_is_a_false_positive() -> None:
    """Bucket {0, 1, 2}: 1 and 2 are duplicates, 0 is not; 1-2 must be linked whoever joins the centre."""
    rows = pa.table({"key": [2, 0, 1, 1], "band": [0, 0, 0, 0], "band_hash": np.array([7, 7, 7, 7], np.uint64)})
    similar = {(2, 1)}

    def verify(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.array([(int(x), int(y)) in similar for x, y in zip(a, b, strict=True)], dtype=bool)

    assert candidate_pairs(rows, verify=verify).to_pydict() == {"key": [2], "linked_key": [1]}
    assert candidate_pairs(rows, verify=verify, max_rounds=1).num_rows == 0
    assert candidate_pairs(rows).to_pydict() == {"key": [1, 2], "linked_key": [0, 0]}
    # 2 links to the centre at once; 1 fails the centre but is close to 2: it must still find 2.
    similar.add((2, 0))
    assert candidate_pairs(rows, verify=verify).to_pydict() == {"key": [2, 2], "linked_key": [0, 1]}


def test_connected_components_equal_a_python_union_find() -> None:
    rng = np.random.default_rng(10)
    for n, m in [(1, 0), (10, 0), (50, 40), (500, 300), (2000, 3000)]:
        src, dst = rng.integers(0, n, m), rng.integers(0, n, m)
        parent = list(range(n))

        def find(x: int, parent: list[int] = parent) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a, b in zip(src.tolist(), dst.tolist(), strict=True):
            ra, rb = find(a), find(b)
            parent[max(ra, rb)] = min(ra, rb)
        expected = [min(i for i in range(n) if find(i) == find(j)) for j in range(n)] if n <= 50 else None
        labels = connected_components(n, src, dst)
        groups = {}
        for i in range(n):
            groups.setdefault(find(i), set()).add(i)
        assert _groups(labels) == {frozenset(g) for g in groups.values() if len(g) > 1}
        assert all(labels[i] == min(groups[find(i)]) for i in range(n))  # label = smallest member
        if expected is not None:
            assert labels.tolist() == expected
    chain = np.arange(9999)  # a long path, worst case for label propagation
    assert (connected_components(10_000, chain[::-1], chain[::-1] + 1) == 0).all()


def test_edges_joined_in_batches_end_where_all_at_once_does() -> None:
    """`join_edges` one batch at a time (what a streamed resolve does) gives the labels of one call."""
    from operators.dedup.unionfind import join_edges

    rng = np.random.default_rng(11)
    for n, m, batches in [(50, 40, 3), (2000, 3000, 7), (5000, 4000, 1)]:
        src, dst = rng.integers(0, n, m), rng.integers(0, n, m)
        parent = np.arange(n, dtype=np.int64)
        for cut in np.array_split(np.arange(m), batches):
            parent = join_edges(parent, src[cut], dst[cut])
        assert parent.tolist() == connected_components(n, src, dst).tolist()


# ----------------------------------------------------------------------------------------------------
# Parameters


def test_optimal_bands_is_sane_and_matches_datasketch() -> None:
    previous_rows = 0
    for threshold in (0.3, 0.5, 0.7, 0.8, 0.9):
        bands, rows = optimal_bands(128, threshold)
        assert bands * rows <= 128
        approx = (1 / bands) ** (1 / rows)  # where the S-curve is steepest
        assert abs(approx - threshold) < 0.12, (threshold, bands, rows)
        assert rows >= previous_rows  # a stricter threshold needs more rows per band
        previous_rows = rows
    assert optimal_bands(128, 0.7) == (14, 9)
    from datasketch import lsh
    for num_perm, threshold in ((128, 0.5), (128, 0.7), (128, 0.85), (256, 0.8), (64, 0.6)):
        assert optimal_bands(num_perm, threshold) == lsh._optimal_param(threshold, num_perm, 0.5, 0.5)


def test_params_validate_and_fingerprint() -> None:
    params = MinHashParams()
    assert params.lsh() == (14, 9)
    assert MinHashParams(bands=16, rows=8).lsh() == (16, 8)
    with pytest.raises(ValueError, match="exceeds num_perm"):
        MinHashParams(bands=20, rows=8)
    with pytest.raises(ValueError, match="both bands and rows"):
        MinHashParams(bands=16)
    assert params.signature_fingerprint() == MinHashParams(threshold=0.9).signature_fingerprint()
    assert params.signature_fingerprint() != MinHashParams(seed=2).signature_fingerprint()
    assert params.band_fingerprint() != MinHashParams(threshold=0.9).band_fingerprint()


def test_all_pairs_of_a_tiny_set_agree_with_exact_jaccard_decisions() -> None:
    """Pairs far from the threshold are decided as exact Jaccard decides them."""
    texts, _ = _corpus(11, n_clusters=6, n_unrelated=20)
    sig = minhash_signatures(texts, NUM_PERM, NGRAM)
    comps = duplicate_components(list(range(len(texts))), band_hashes(sig, BANDS, ROWS), signatures=sig,
                                 threshold=THRESHOLD)
    keep_of = dict(zip(comps.column("id").to_pylist(), comps.column("keep_id").to_pylist(), strict=True))
    for i, j in combinations(range(len(texts)), 2):
        jac = _exact_jaccard(texts[i], texts[j])
        together = i in keep_of and keep_of.get(i) == keep_of.get(j)
        if jac >= 0.85:
            assert together, (i, j, jac)
        elif jac <= 0.3:
            assert not together, (i, j, jac)
