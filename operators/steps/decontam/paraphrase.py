"""`decontaminate_paraphrase` step: benchmark prompts rephrased so that no n-gram survives.

Yang et al. 2023 ("Rethinking Benchmark and Contamination for Language Models with Rephrased Samples") trained
a 13B model on rephrased MMLU and HumanEval items and matched GPT-4 on both, while n-gram decontamination
found nothing. Their llm-decontaminator embeds every training prompt, takes the top-k most similar benchmark
items, and asks an LLM whether each is a rephrasing. This step does the same after `decontaminate`:

  every human turn of at least `min_chars` characters -> a unit vector (the encoder of `semantic_dedup`,
  cached beside the step) -> cosine against every benchmark prompt (embedded once, cached for every task)
  -> judge off (the default): a record whose best similarity reaches `threshold` is dropped;
     judge on: its top-k pairs at or above `judge.floor` go to the LLM judge (a versioned prompt,
     `paraphrase_judge`), and a record is dropped when the judge says any of them is a rephrasing.

Drops carry reason `contamination` and a JSON detail like `decontaminate`'s, with `match: "paraphrase"`, the
similarity and the judge's verdict (null with the judge off), so the report shows the benchmark item beside
the turn. The default threshold is calibrated in `bench/paraphrase.py` (docs/decontamination.md).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from operators.benchmarks.loaders import load_prompts
from operators.core import storage
from operators.core.step import Artifacts, BatchResult, StepConfig, dropped_table
from operators.llm.embed import EmbedConfig, EmbeddingCache, Vectors, embed_cached, load_embedder
from operators.llm.prompts import coerce_bool_field
from operators.steps.decontam.step import REASON, BenchmarkSource
from operators.steps.synth.base import LLMStep, LLMStepConfig

CACHE_DIR = "_embed_cache"
BENCH_CACHE = "bench"  # the benchmark prompts' cache segments, shared by every task
SIM_BLOCK = 1024  # turns per similarity block: memory is a block x benchmark prompts


class JudgeConfig(BaseModel):
    """The LLM judge of candidate pairs (the step's `llm`): off by default, since a small CPU model judges badly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    floor: float = Field(0.6, gt=0, le=1, description="Pairs at or above this similarity go to the judge.")


class ParaphraseConfig(LLMStepConfig):
    """Which benchmarks to protect, the encoder, and when a turn counts as a rephrasing of one of them."""

    enabled: bool = Field(True, description="False: the step is off and passes its input on unchanged.")
    benchmarks: list[BenchmarkSource] = Field(
        default_factory=lambda: [BenchmarkSource(name="humaneval", uri="humaneval://", format="humaneval")],
        min_length=1)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    threshold: float = Field(0.75, gt=0, le=1, description="With the judge off: the cosine similarity of a turn "
                             "and a benchmark prompt at which the record is dropped.")
    top_k: int = Field(3, ge=1, le=50, description="Benchmark prompts per turn the judge may be asked about.")
    min_chars: int = Field(20, ge=1, description="Shorter turns are not checked ('thanks!' is like everything).")
    window_chars: int = Field(
        600, ge=100, description="A longer turn is also checked in overlapping windows of this many characters: "
        "the encoder reads 128 tokens and averages them, so a benchmark item pasted after a preamble would "
        "otherwise be missed.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    embed_cache_uri: str | None = Field(None, description="Where vectors are cached; default: beside the step.")


class ParaphraseDecontamStep(LLMStep[ParaphraseConfig]):
    """Drop records with a human turn that rephrases a benchmark prompt."""

    name: ClassVar[str] = "decontaminate_paraphrase"
    config_model: ClassVar[type[StepConfig]] = ParaphraseConfig
    prompt_names: ClassVar[tuple[str, ...]] = ("paraphrase_judge",)

    def __init__(self, config: ParaphraseConfig) -> None:
        super().__init__(config)
        self._cache: EmbeddingCache | None = None
        self._bench: Vectors | None = None
        self._items: list[tuple[str, int, str]] = []  # (benchmark, item, prompt) per row of `_bench`

    def is_off(self) -> bool:
        return not self.config.enabled

    def open_shard(self, step_dir: str, shard: int, attempt: str) -> None:
        super().open_shard(step_dir, shard, attempt)
        uri = self.config.embed_cache_uri or storage.join(step_dir, CACHE_DIR)
        self._cache = EmbeddingCache(uri, shard)
        if self._bench is None:
            self._bench = self._embed_benchmarks(EmbeddingCache(uri, name=BENCH_CACHE))

    def bind(self, artifacts: Artifacts, shard: int) -> None:
        """Nothing to read from stages; the benchmarks are embedded in `open_shard` (it knows the cache)."""

    def _embed_benchmarks(self, cache: EmbeddingCache) -> Vectors:
        self._items = [(b.name, i, p) for b in self.config.benchmarks for i, p in enumerate(load_prompts(b.uri,
                                                                                                        b.format))]
        vectors, _ = embed_cached(load_embedder(self.config.embed), cache, [p for _, _, p in self._items])
        return vectors

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        if self._bench is None or self._cache is None:
            # Outside a runner (a unit test of the transform): benchmarks embedded without a cache folder.
            self._cache = self._cache or EmbeddingCache()
            self._bench = self._embed_benchmarks(EmbeddingCache())
        table = pa.Table.from_batches([batch])
        texts: list[str] = []
        where: list[tuple[int, int]] = []  # (record, turn) of each checked text
        for r, conv in enumerate(table.column("conversations").to_pylist()):
            for t, turn in enumerate(conv):
                if turn["from"] == "human" and len(turn["value"].strip()) >= self.config.min_chars:
                    for window in turn_windows(turn["value"], self.config.window_chars):
                        texts.append(window)
                        where.append((r, t))
        vectors, embedded = embed_cached(load_embedder(self.config.embed), self._cache, texts)
        counters: dict[str, float] = {"turns_checked": float(len(set(where))), "windows": float(len(texts)),
                                      "embedded": float(embedded),
                                      "cache_hits": float(len(texts) - embedded)}
        candidates = self._candidates(vectors, where)
        hits = self._judged(candidates, texts, counters) if self.config.judge.enabled else {
            r: (pairs[0], None) for r, pairs in candidates.items() if pairs[0][0] >= self.config.threshold}
        details = [self._detail(texts, where, *hits[r]) for r in sorted(hits)]
        counters["dropped"] = float(len(hits))
        mask = pa.array([r not in hits for r in range(table.num_rows)], pa.bool_())
        counters.update(self.drain_counters())
        return BatchResult(kept=table.filter(mask), counters=counters,
                           dropped=dropped_table(table.filter(pc.invert(mask)), [REASON] * len(details), details))

    def _candidates(self, vectors: Vectors, where: list[tuple[int, int]]
                    ) -> dict[int, list[tuple[float, int, int]]]:
        """Per record, its best (similarity, text index, benchmark row) pairs, best first: the top-k of each
        checked turn at or above the lower of `threshold` and the judge's floor."""
        assert self._bench is not None
        cfg = self.config
        floor = min(cfg.threshold, cfg.judge.floor) if cfg.judge.enabled else cfg.threshold
        k = min(cfg.top_k, len(self._bench))
        out: dict[int, list[tuple[float, int, int]]] = {}
        for lo in range(0, len(vectors), SIM_BLOCK):
            sims = vectors[lo:lo + SIM_BLOCK] @ self._bench.T
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            for row in range(len(sims)):
                for b in top[row]:
                    s = float(sims[row, b])
                    if s >= floor:
                        out.setdefault(where[lo + row][0], []).append((s, lo + row, int(b)))
        for pairs in out.values():
            pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
        return out

    def _judged(self, candidates: dict[int, list[tuple[float, int, int]]], texts: list[str],
                counters: dict[str, float]) -> dict[int, tuple[tuple[float, int, int], bool | None]]:
        """Ask the judge about each record's candidate pairs (at most `top_k`); a yes drops the record."""
        asked = [(r, p) for r, pairs in candidates.items() for p in pairs[:self.config.top_k]]
        rows = [{"benchmark": self._items[b][2][:4000], "prompt": texts[t][:4000]} for _, (_, t, b) in asked]
        results = self.client.run_task(self.prompts["paraphrase_judge"], rows, normalize=_verdict) if rows else []
        hits: dict[int, tuple[tuple[float, int, int], bool | None]] = {}
        for (r, pair), res in zip(asked, results, strict=True):
            if res.failure is not None or not isinstance(res.value, dict):
                # No verdict: the threshold decides, as with the judge off (a failed call must not let
                # a contaminated record through).
                counters["judge.failed"] = counters.get("judge.failed", 0.0) + 1
                if pair[0] >= self.config.threshold and r not in hits:
                    hits[r] = (pair, None)
                continue
            yes = bool(res.value.get("rephrasing"))
            counters["judge.yes" if yes else "judge.no"] = counters.get("judge.yes" if yes else "judge.no", 0.0) + 1
            if yes and r not in hits:
                hits[r] = (pair, True)
        counters["judge.asked"] = float(len(asked))
        return hits

    def _detail(self, texts: list[str], where: list[tuple[int, int]], pair: tuple[float, int, int],
                verdict: bool | None) -> str:
        sim, t, b = pair
        bench, item, prompt = self._items[b]
        detail: dict[str, Any] = {"benchmark": bench, "item": item, "match": "paraphrase",
                                  "similarity": round(sim, 4), "verdict": verdict,
                                  "matched_text": texts[t][:300], "benchmark_prompt": prompt[:500],
                                  "turn": where[t][1]}
        return json.dumps(detail, ensure_ascii=False)


def turn_windows(text: str, size: int) -> list[str]:
    """The texts a turn is checked as: the whole turn, and for a longer one also windows of `size` characters
    overlapping by half (at most 16, cut at spaces where there is one nearby)."""
    if len(text) <= size:
        return [text]
    out = [text]
    step = size // 2
    for start in range(0, len(text) - step, step):
        if len(out) > 16:
            break
        lo = text.rfind(" ", max(0, start - 40), start) + 1 if start else 0
        out.append(text[lo:lo + size])
    return out


def _verdict(value: Any) -> Any:
    return coerce_bool_field(value, "rephrasing")


__all__ = ["JudgeConfig", "ParaphraseConfig", "ParaphraseDecontamStep"]
