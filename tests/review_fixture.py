"""A small synthesis run folder for the drift review's tests, written by the project's own runner: seeds committed by
the real `label_vocab` step, and evolve steps committed by the real runner from `EvolveStep` with its model call
replaced by a fixed rewrite (the review reads what evolve commits; which words a model chose does not matter
to it, and a real model would make the UI test wait minutes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from operators.cli import build_step
from operators.core.runner import run_all
from operators.core.step import BatchResult, dropped_table
from operators.schema import CANONICAL_SCHEMA, first_exchange
from operators.steps.synth.evolve import LINEAGE_TYPE, EvolveConfig, EvolveStep, strategy_for

TOPICS = ("prime numbers", "binary search", "photosynthesis", "the French revolution", "SQL joins", "haiku writing",
          "compound interest", "TCP handshakes", "sorting a list in Python", "the water cycle")


class FixedRewriteEvolve(EvolveStep):
    """EvolveStep's lineage, ids and ledger, with a fixed rewrite instead of a model's."""

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        seeds = pa.Table.from_batches([batch]).to_pylist()
        current = {s["id"]: (s["id"], first_exchange(s["conversations"])[0]) for s in seeds}
        kept: list[dict[str, Any]] = []
        for r in range(1, self.config.rounds + 1):
            for s in seeds:
                st = strategy_for(s["id"], r, self.config.strategies, self.config.seed)
                parent_id, text = current[s["id"]]
                child = f"{text} Rewritten by {st} in round {r}: explain each step."
                rec = self._candidate(s, parent_id, st, r, child)
                kept.append(rec)
                current[s["id"]] = (rec["id"], child)
        schema = CANONICAL_SCHEMA.append(pa.field("lineage", LINEAGE_TYPE))
        return BatchResult(kept=pa.Table.from_pylist(kept, schema),
                           dropped=dropped_table(pa.Table.from_pylist([], schema), [], []))


def seed_rows(n: int) -> list[dict[str, Any]]:
    """`n` canonical seed records, each a short question."""
    return [{"id": f"seed{i:03d}", "conversations": [
        {"from": "human", "value": f"Question {i}: explain {TOPICS[i % len(TOPICS)]} to a beginner."},
        {"from": "gpt", "value": "An answer."}],
        "label": {"ability_en": ["explanation"], "ability_zh": None, "cate_ability_en": ["stem knowledge"],
                  "cate_ability_zh": None},
        "langdetect": "en", "source": "fixture", "reward": None, "origin": None} for i in range(n)]


def synthesis_run(run: Path, seeds: int = 40, rounds: int = 2) -> Path:
    """Write `run`/seed_select_r1 and `run`/evolve_r1 (seeds x rounds evolved instructions); returns `run`."""
    raw = run.parent / f"{run.name}-raw"
    raw.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(seed_rows(seeds), schema=CANONICAL_SCHEMA), raw / "seeds.parquet")
    run_all(build_step("label_vocab", {}), [str(raw)], str(run / "seed_select_r1"))
    run_all(FixedRewriteEvolve(EvolveConfig(rounds=rounds)), [str(run / "seed_select_r1")], str(run / "evolve_r1"))
    return run
