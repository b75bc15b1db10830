"""An index of benchmark prompts, and the pure check of many texts against it.

Three rules, each reported under its own name:

- `exact`: the whole text is a benchmark prompt (after `match_tokens` normalization: case, spacing,
  punctuation, Unicode variants).
- `ngram`: the text shares a word n-gram (default 13, as in GPT-3's and the paper's decontamination)
  with a benchmark prompt; n-grams made of digits and letters (hex tables, number runs) are not
  indexed: they occur in countless unrelated texts.
- `containment`: the text contains a whole benchmark prompt. Prompts shorter than n can only be caught
  this way, and chat benchmarks are full of them. Guards keep generic short prompts ("Which of the
  following is true?", "How can we reverse this process?", "Neural networks:") from dropping innocent
  records: a short prompt needs `min_tokens` words to be looked for inside a text; one with at least
  `min_informative` informative tokens (not stopwords or exam/chat boilerplate, at least two
  characters) matches anywhere; one with fewer must also make up at least `min_coverage` of the
  informative tokens of the text (it is the request, not a phrase inside one); one with none only
  matches exactly. A long prompt none of whose n-grams is informative is found the same way, from its
  first n-gram.

Texts are checked a batch at a time: tokens are hashed once, rolling hashes of every window length the
index holds are computed with numpy over the whole batch, and only windows whose hash is indexed are
compared token by token (which also rules out hash collisions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from operators.text.normalize import match_tokens

EXACT, NGRAM, CONTAINMENT = "exact", "ngram", "containment"
_PRIORITY = {EXACT: 0, NGRAM: 1, CONTAINMENT: 2}
# How a window hit becomes a match: an informative n-gram on its own; a long prompt's anchor n-gram or a
# short prompt only when the whole prompt is there (a short prompt's window is the whole prompt).
_NGRAM, _ANCHOR, _ANYWHERE, _COVERAGE = 0, 1, 2, 3
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the rolling hash (wraps mod 2**64)

# English function words plus the boilerplate of exam and chat prompts. A token in this set carries no
# evidence that a text quotes one particular benchmark item.
_STOPWORDS = """
a an the of to in on at by for from with without into onto upon about above below over under and or but nor
so yet if then than that this these those there here is are was were be been being am do does did doing done
have has had having will would shall should can could may might must it its itself i me my mine we us our
ours you your yours he him his she her hers they them their theirs what which who whom whose when where why
how not no yes all any each every some such only own same other another more most much many few very just
also too as dont doesnt isnt arent wasnt werent cant wont let lets like
following true false correct incorrect statement statements best describes describe example answer answers
question questions write explain please help tell give list make show use using used given find response
reply previous earlier one two thing things way ways something anything
"""
STOPWORDS = frozenset(_STOPWORDS.split())


def informative(gram: list[str] | tuple[str, ...]) -> bool:
    """True unless most tokens are single characters or numbers.

    Benchmarks contain runs like '0 1 2 3 4 5 6 7 8 9 a b c' (hex digits in HumanEval) that occur in
    countless unrelated texts; indexing them would drop innocent records.
    """
    return sum(1 for t in gram if len(t) >= 2 and not t.isdigit()) * 2 >= len(gram)


def informative_tokens(tokens: list[str] | tuple[str, ...]) -> int:
    """How many tokens are evidence of a particular text: two characters or more, not a stopword."""
    return sum(1 for t in tokens if len(t) >= 2 and t not in STOPWORDS)


def _window_hashes(hashes: np.ndarray, length: int) -> np.ndarray:
    """Rolling hash of every window of `length` tokens (one value per start position)."""
    h = hashes.copy()
    for k in range(1, length):
        h = h[:-1] * _MULT + hashes[k:]
    return h


# Window tables are probed first in a bitmap of about 64 bits per key (at most 2**27 bits, 16 MiB, for
# the n-grams: about a million for MMLU + MATH), addressed by the hash's top bits: a binary search over
# the whole table for every window of every text cost more than tokenizing.
@dataclass(frozen=True)
class _Bitmap:
    bits: np.ndarray  # uint8, 2**log2 bytes
    shift: np.uint64  # byte = hash >> shift
    bit_shift: np.uint64  # bit = (hash >> bit_shift) & 7

    @classmethod
    def of(cls, keys: np.ndarray) -> _Bitmap:
        log2 = int(min(24, max(9, np.ceil(np.log2(max(keys.size, 1) * 8)))))
        bm = cls(np.zeros(1 << log2, dtype=np.uint8), np.uint64(64 - log2), np.uint64(61 - log2))
        np.bitwise_or.at(bm.bits, keys >> bm.shift, bm.bit(keys))
        return bm

    def bit(self, h: np.ndarray) -> np.ndarray:
        return np.left_shift(np.uint8(1), ((h >> self.bit_shift) & np.uint64(7)).astype(np.uint8))

    def maybe(self, h: np.ndarray) -> np.ndarray:
        """Positions of `h` that may be keys (no false negatives, about 1/64 false positives)."""
        return np.flatnonzero(self.bits[h >> self.shift] & self.bit(h))


def _token_hashes(tokens: list[str]) -> np.ndarray:
    return np.fromiter(map(hash, tokens), dtype=np.int64, count=len(tokens)).view(np.uint64)


@dataclass(frozen=True)
class Match:
    """One text's benchmark hit: which prompt, by which rule, and where (token offsets in the text)."""

    benchmark: str
    item: int
    kind: str  # exact | ngram | containment
    start: int
    length: int


@dataclass
class ContaminationIndex:
    """Normalized benchmark prompts: whole-prompt hashes, window hashes per length, the prompts' tokens."""

    n: int = 13
    short_prompts: bool = True
    min_tokens: int = 3
    min_informative: int = 3
    min_coverage: float = 0.5
    names: list[str] = field(default_factory=list)
    prompts: list[list[str]] = field(default_factory=list)  # bench -> item -> original prompt text
    tokens: list[list[tuple[str, ...]]] = field(default_factory=list)  # bench -> item -> tokens
    exact: dict[int, tuple[int, int]] = field(default_factory=dict)  # hash(tokens) -> (bench, item)
    windows: dict[int, dict[int, tuple[int, int, int, int]]] = field(default_factory=dict)  # L -> hash -> entry
    _sorted: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _bitmaps: dict[int, _Bitmap] = field(default_factory=dict, repr=False)

    def add(self, name: str, prompts: list[str]) -> None:
        """Index one benchmark's prompts."""
        b = len(self.names)
        self.names.append(name)
        self.prompts.append(list(prompts))
        toks_b: list[tuple[str, ...]] = []
        for i, p in enumerate(prompts):
            toks = tuple(match_tokens(p))
            toks_b.append(toks)
            if not toks:
                continue
            self.exact.setdefault(hash(toks), (b, i))
            if len(toks) >= self.n:
                self._add_long(b, i, toks)
            elif self.short_prompts and len(toks) >= self.min_tokens and (inf := informative_tokens(toks)) > 0:
                rule = _ANYWHERE if inf >= self.min_informative else _COVERAGE
                self._put(len(toks), _window_hashes(_token_hashes(list(toks)), len(toks))[0], (b, i, 0, rule))
        self.tokens.append(toks_b)
        self._sorted.clear()
        self._bitmaps.clear()

    def _put(self, length: int, key: np.uint64, entry: tuple[int, int, int, int]) -> bool:
        table = self.windows.setdefault(length, {})
        if int(key) in table:
            return False
        table[int(key)] = entry
        return True

    def _add_long(self, b: int, i: int, toks: tuple[str, ...]) -> None:
        n = self.n
        grams = _window_hashes(_token_hashes(list(toks)), n)
        indexed = 0
        for j, key in enumerate(grams):
            if informative(toks[j:j + n]):
                indexed += self._put(n, key, (b, i, j, _NGRAM))
        if indexed == 0 and self.short_prompts:  # no informative n-gram: find the whole prompt instead
            for j, key in enumerate(grams[:1]):
                self._put(n, key, (b, i, j, _ANCHOR))

    def _keys(self, length: int) -> np.ndarray:
        if length not in self._sorted:
            self._sorted[length] = np.array(sorted(self.windows.get(length, {})), dtype=np.uint64)
            self._bitmaps[length] = _Bitmap.of(self._sorted[length])
        return self._sorted[length]

    def prepare(self) -> None:
        """Build the lookup tables now (else the first `match_many` does): call after the last `add`."""
        for length in self.windows:
            self._keys(length)

    def _indexed(self, length: int, h: np.ndarray) -> np.ndarray:
        """Positions of `h` whose hash is in the table of window `length`."""
        keys = self._keys(length)
        cand = self._bitmaps[length].maybe(h)
        hc = h[cand]
        pos = np.minimum(np.searchsorted(keys, hc), keys.size - 1)
        return cand[keys[pos] == hc]

    def match(self, text: str) -> Match | None:
        """The best hit of one text (see `match_many`)."""
        return self.match_many([text])[0]

    def match_many(self, texts: list[str]) -> list[Match | None]:
        """For each text, its best benchmark hit (exact, then n-gram, then containment; earliest first)."""
        toks_list = [match_tokens(t) for t in texts]
        best: list[Match | None] = [None] * len(texts)
        for t, toks in enumerate(toks_list):
            hit = self.exact.get(hash(tuple(toks))) if toks else None
            if hit is not None and self.tokens[hit[0]][hit[1]] == tuple(toks):
                best[t] = Match(self.names[hit[0]], hit[1], EXACT, 0, len(toks))
        lengths = np.fromiter(map(len, toks_list), dtype=np.int64, count=len(toks_list))
        if not self.windows or not lengths.sum():
            return best
        ends = np.cumsum(lengths)
        starts = ends - lengths
        flat = [tok for toks in toks_list for tok in toks]
        turn_of = np.repeat(np.arange(len(texts)), lengths)
        room = ends[turn_of] - np.arange(len(flat))  # tokens left in the text from each position
        hashes = _token_hashes(flat)
        h = hashes
        inf_cache: dict[int, int] = {}
        for length in range(1, max(self.windows) + 1):
            if length > 1:
                h = h[:-1] * _MULT + hashes[length - 1:]
            if length not in self.windows or h.size == 0:
                continue
            hits = self._indexed(length, h)
            for j in hits[room[hits] >= length].tolist():
                t = int(turn_of[j])
                if best[t] is not None and best[t].kind == EXACT:  # type: ignore[union-attr]
                    continue
                m = self._verify(toks_list[t], j - int(starts[t]), length, int(h[j]), t, inf_cache)
                if m is not None and (best[t] is None or _better(m, best[t])):  # type: ignore[arg-type]
                    best[t] = m
        return best

    def _verify(self, toks: list[str], j: int, length: int, key: int, t: int,
                inf_cache: dict[int, int]) -> Match | None:
        b, i, pos, rule = self.windows[length][key]
        prompt = self.tokens[b][i]
        if tuple(toks[j:j + length]) != prompt[pos:pos + length]:  # a hash collision
            return None
        if rule == _NGRAM:
            return Match(self.names[b], i, NGRAM, j, length)
        if rule == _ANCHOR and tuple(toks[j:j + len(prompt)]) != prompt:
            return None
        if rule == _COVERAGE:
            if t not in inf_cache:
                inf_cache[t] = informative_tokens(toks)
            if informative_tokens(prompt) < self.min_coverage * inf_cache[t]:
                return None
        return Match(self.names[b], i, CONTAINMENT, j, len(prompt))


def _better(a: Match, b: Match) -> bool:
    return (_PRIORITY[a.kind], a.start) < (_PRIORITY[b.kind], b.start)
