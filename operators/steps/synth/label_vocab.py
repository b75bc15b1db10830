"""`label_vocab` step: normalize and merge the free second-level labels into one vocabulary with counts.

The labeling model writes thousands of free tags ("Equation solving", "solving equations",
"equation-solving"). Per shard, tags are normalized (case, punctuation, inflection by a light
rule-based lemmatizer) and counted (map); the counts are merged and near-synonyms folded into the most
frequent spelling (reduce): first tags with the same bag of lemmas, then, within a block sharing a
first lemma, tags whose character similarity is at least `merge_similarity`. The vocabulary (tag ->
canonical tag, counts) is the reduce stage's output; every record then gets its canonical tags in
`label.ability_en` (raw tags kept in `label_tags_raw`), plus the score columns seed selection uses:
`tag_min_count` (how rare its rarest tag is) and `n_abilities`.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter, defaultdict
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from operators.core.arrays import replace_column
from operators.core.step import Artifacts, BatchResult, Stage, StageOutput, Step, StepConfig, keep_all
from operators.schema import LABEL_TYPE

WORD = re.compile(r"[a-z0-9+#]+")
_IRREGULAR = {"analyses": "analysis", "children": "child", "data": "data", "people": "person", "indices": "index"}


def lemma(word: str) -> str:
    """A light English lemmatizer for tag words: plural and -ing/-ed forms to a shared stem."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    for suffix, repl, min_len in (("ies", "y", 5), ("sses", "ss", 5), ("ses", "s", 6), ("ing", "", 6), ("ed", "", 5),
                                  ("s", "", 4)):
        if word.endswith(suffix) and len(word) >= min_len and not word.endswith(("ss", "us", "is")):
            return word[: len(word) - len(suffix)] + repl
    return word


def normalize_label(tag: str) -> str:
    """The merge key of a tag: lowercase words, each lemmatized ('Solving Equations!' -> 'solv equation')."""
    return " ".join(lemma(lemma(w)) for w in WORD.findall(tag.lower()))


def display_form(tag: str) -> str:
    """How a tag is shown: lowercase words joined by single spaces."""
    return " ".join(WORD.findall(tag.lower()))


class LabelVocabConfig(StepConfig):
    """How aggressively near-synonyms are merged."""

    merge_similarity: float = Field(0.88, gt=0, le=1, description="Character similarity that merges two tags.")
    max_block: int = Field(2000, ge=10, description="Largest block compared pairwise (bounds the reduce's cost).")


def build_vocab(counts: dict[str, int], similarity: float, max_block: int) -> dict[str, str]:
    """tag -> canonical tag. Pure. Canonical = the most frequent member of a merged group."""
    canonical: dict[str, str] = {}
    by_bag: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for tag in counts:
        by_bag[tuple(sorted(tag.split()))].append(tag)
    heads: list[str] = []
    for members in by_bag.values():  # same lemmas in another order: the same label
        members.sort(key=lambda t: (-counts[t], t))
        for t in members:
            canonical[t] = members[0]
        heads.append(members[0])
    blocks: dict[str, list[str]] = defaultdict(list)
    for h in heads:
        blocks[h.split()[0] if h else ""].append(h)
    remap: dict[str, str] = {}
    for block in blocks.values():
        block.sort(key=lambda t: (-counts[t], t))
        kept: list[str] = []
        for h in block[:max_block]:
            match = difflib.get_close_matches(h, kept, n=1, cutoff=similarity) if kept else []
            if match:
                remap[h] = match[0]  # merged into a more frequent head, which is never itself remapped
            else:
                kept.append(h)
    return {t: remap.get(c, c) for t, c in canonical.items()}


class LabelVocabStep(Step[LabelVocabConfig]):
    """Count tags per shard, merge them globally, and write canonical tags onto every record."""

    name: ClassVar[str] = "label_vocab"
    config_model: ClassVar[type[StepConfig]] = LabelVocabConfig
    stages: ClassVar[tuple[Stage, ...]] = (Stage("tag_counts", "map"), Stage("vocab", "reduce"))

    def __init__(self, config: LabelVocabConfig) -> None:
        super().__init__(config)
        self._canonical: dict[str, str] = {}
        self._count: dict[str, int] = {}

    @staticmethod
    def _tags(table: pa.Table) -> list[list[str]]:
        return [list((lab or {}).get("ability_en") or []) for lab in table["label"].to_pylist()]

    def map_stage(self, stage: str, batch: pa.RecordBatch, shard: int) -> pa.Table:
        counts: Counter[tuple[str, str]] = Counter()
        for tags in self._tags(pa.Table.from_batches([batch])):
            counts.update({(k, display_form(t)) for t in tags if (k := normalize_label(t))})
        return pa.table({"key": [k for k, _ in counts], "tag": [d for _, d in counts],
                         "count": pa.array(list(counts.values()), pa.int64())})

    def reduce_stage(self, stage: str, artifacts: Artifacts, num_shards: int) -> StageOutput:
        counts: Counter[str] = Counter()
        spellings: dict[str, Counter[str]] = defaultdict(Counter)
        for t in artifacts.iter_tables("tag_counts"):
            for k, d, c in zip(t["key"].to_pylist(), t["tag"].to_pylist(), t["count"].to_pylist(), strict=True):
                counts[k] += c
                spellings[k][d] += c
        canonical = build_vocab(dict(counts), self.config.merge_similarity, self.config.max_block)
        merged: Counter[str] = Counter()
        for key, c in counts.items():
            merged[canonical[key]] += c
        shown = {k: min(sp.items(), key=lambda kv: (-kv[1], kv[0]))[0] for k, sp in spellings.items()}
        keys = sorted(counts, key=lambda k: (-merged[canonical[k]], canonical[k], -counts[k], k))
        vocab = pa.table({
            "key": keys, "tag": [shown[k] for k in keys], "canonical": [shown[canonical[k]] for k in keys],
            "count": pa.array([counts[k] for k in keys], pa.int64()),
            "canonical_count": pa.array([merged[canonical[k]] for k in keys], pa.int64())})
        top = sorted(((shown[k], c) for k, c in merged.items()), key=lambda kv: (-kv[1], kv[0]))[:25]
        # Partition 0 holds the whole vocabulary; every shard's transform reads it.
        return StageOutput(partitions={0: vocab}, summary={
            "raw_tags": len(counts), "canonical_tags": len(merged), "merged_away": len(counts) - len(merged),
            "top": dict(top)})

    def bind(self, artifacts: Artifacts, shard: int) -> None:
        vocab = artifacts.partition("vocab", 0)
        if vocab is None:
            self._canonical, self._count = {}, {}
            return
        self._canonical = dict(zip(vocab["key"].to_pylist(), vocab["canonical"].to_pylist(), strict=True))
        self._count = dict(zip(vocab["canonical"].to_pylist(), vocab["canonical_count"].to_pylist(), strict=True))

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        table = pa.Table.from_batches([batch])
        raw = self._tags(table)
        labels: list[dict[str, Any]] = []
        min_count: list[int | None] = []
        for lab, tags in zip(table["label"].to_pylist(), raw, strict=True):
            canon = list(dict.fromkeys(self._canonical.get(k, display_form(t)) for t in tags
                                       if (k := normalize_label(t))))
            labels.append({**(lab or {}), "ability_en": canon})
            counts = [self._count.get(c, 0) for c in canon]
            min_count.append(min(counts) if counts else None)
        n_abilities = [len((lab or {}).get("cate_ability_en") or []) for lab in labels]
        table = replace_column(table, "label_tags_raw", raw, pa.list_(pa.string()))
        table = replace_column(table, "label", pa.array(labels, LABEL_TYPE))
        table = replace_column(table, "tag_min_count", min_count, pa.int64())
        table = replace_column(table, "n_abilities", pa.array(np.asarray(n_abilities, np.int32)))
        return keep_all(table)
