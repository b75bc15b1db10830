"""An n-gram index of benchmark prompts, and the pure check of one text against it."""

from __future__ import annotations

from dataclasses import dataclass, field

from operators.text.normalize import normalize_text


def informative(gram: list[str]) -> bool:
    """True unless most tokens are single characters or numbers.

    Benchmarks contain runs like '0 1 2 3 4 5 6 7 8 9 a b c' (hex digits in HumanEval) that occur in
    countless unrelated texts; indexing them would drop innocent records.
    """
    return sum(1 for t in gram if len(t) >= 2 and not t.isdigit()) * 2 >= len(gram)


@dataclass
class ContaminationIndex:
    """Word n-grams (hashed) and normalized full texts of every benchmark prompt."""

    n: int
    ngrams: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # hash -> (bench, item, position)
    exact: dict[str, tuple[int, int]] = field(default_factory=dict)  # normalized prompt -> (bench, item)
    names: list[str] = field(default_factory=list)
    tokens: list[list[list[str]]] = field(default_factory=list)  # bench -> item -> tokens

    def add(self, name: str, prompts: list[str]) -> None:
        """Index one benchmark's prompts."""
        b = len(self.names)
        self.names.append(name)
        toks_b: list[list[str]] = []
        for i, p in enumerate(prompts):
            norm = normalize_text(p)
            toks = norm.split()
            toks_b.append(toks)
            if norm:
                self.exact.setdefault(norm, (b, i))
            for j in range(len(toks) - self.n + 1):
                gram = toks[j:j + self.n]
                if informative(gram):
                    self.ngrams.setdefault(hash(tuple(gram)), (b, i, j))
        self.tokens.append(toks_b)

    def match(self, text: str) -> tuple[str, int, str] | None:
        """(benchmark, item, matched text) of the first benchmark n-gram or prompt found in `text`."""
        norm = normalize_text(text)
        if (hit := self.exact.get(norm)) is not None:
            return self.names[hit[0]], hit[1], "exact prompt"
        toks = norm.split()
        n = self.n
        for j in range(len(toks) - n + 1):
            if (g := self.ngrams.get(hash(tuple(toks[j:j + n])))) is not None:
                b, i, pos = g
                if self.tokens[b][i][pos:pos + n] == toks[j:j + n]:  # rule out a hash collision
                    return self.names[b], i, " ".join(toks[j:j + n])
        return None
