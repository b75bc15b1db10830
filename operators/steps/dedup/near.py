"""`near_dedup` step: MinHash + LSH near-duplicate removal across all shards.

Stages:
  signatures (map)  per record: MinHash signature of the conversation's word n-gram shingles, its LSH
                    band hashes, a global key (shard << 32 | row) and a keep priority (-reward)
  resolve (reduce)  candidate pairs from equal band hashes, verified by estimated Jaccard, connected
                    components across shards; each component keeps its highest-reward record (then the
                    smallest key); per-shard drop lists
  transform         drop listed rows with reason `near_duplicate` (detail: the kept record's id)
The resolve stage holds band hashes and signatures of all records in one process (~0.7 KB per record):
fine to tens of millions of records on one node. Beyond that, partition band rows by hash and run
`candidate_pairs` per partition (the core in operators/dedup/minhash.py supports it) — not built yet.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from operators.core.step import Artifacts, Stage, StageOutput, StepConfig, partition_by_shard
from operators.dedup.minhash import MinHashParams, band_hashes, duplicate_components, minhash_signatures
from operators.steps.dedup.droplist import DropListStep

REASON = "near_duplicate"


class NearDedupConfig(StepConfig):
    """MinHash/LSH parameters (num_perm, ngram, seed, threshold, bands/rows, verify)."""

    minhash: MinHashParams = Field(default_factory=MinHashParams)


def conversation_texts(table: pa.Table) -> list[str]:
    """The text compared for near-duplicates: every turn, in order."""
    return ["\n".join(t["value"] for t in conv) for conv in table.column("conversations").to_pylist()]


class NearDedupStep(DropListStep[NearDedupConfig]):
    """Drop near-duplicates, keeping one record per cluster."""

    name: ClassVar[str] = "near_dedup"
    config_model: ClassVar[type[StepConfig]] = NearDedupConfig
    stages: ClassVar[tuple[Stage, ...]] = (Stage("signatures", "map"), Stage("resolve", "reduce"))
    drop_reason: ClassVar[str] = REASON
    detail_prefix: ClassVar[str] = "near duplicate of"

    def map_stage(self, stage: str, batch: pa.RecordBatch, shard: int) -> pa.Table:
        p = self.config.minhash
        table = pa.Table.from_batches([batch])
        sig = minhash_signatures(conversation_texts(table), num_perm=p.num_perm, ngram=p.ngram, seed=p.seed,
                                 scheme=p.scheme)
        bands = band_hashes(sig, *p.lsh())
        n = table.num_rows
        keys = (np.int64(shard) << np.int64(32)) + np.arange(self._row, self._row + n, dtype=np.int64)
        self._row += n
        reward = table.column("reward").to_numpy(zero_copy_only=False).astype(np.float64)
        return pa.table({
            "key": pa.array(keys), "id": table.column("id"),
            "priority": pa.array(np.where(np.isnan(reward), np.inf, -reward)),
            "bands": pa.FixedSizeListArray.from_arrays(pa.array(bands.ravel()), bands.shape[1]),
            "signature": pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel()), sig.shape[1]),
        })

    def reduce_stage(self, stage: str, artifacts: Artifacts, num_shards: int) -> StageOutput:
        parts = list(artifacts.iter_tables("signatures"))
        if not parts:
            return StageOutput(summary={"records": 0, "near_duplicates": 0})
        t = pa.concat_tables(parts).combine_chunks()
        p = self.config.minhash
        bands, _ = p.lsh()
        hashes = t["bands"].combine_chunks().flatten().to_numpy().reshape(-1, bands)
        sig = t["signature"].combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
        comps = duplicate_components(t["key"], hashes, signatures=sig if p.verify else None,
                                     threshold=p.threshold if p.verify else None, priority=t["priority"])
        drops = comps.filter(pc.invert(comps["keep"]))
        key_to_id = dict(zip(t["key"].to_pylist(), t["id"].to_pylist(), strict=True))
        keys = np.asarray(drops["id"].to_pylist(), dtype=np.int64)
        kept_ids = [key_to_id[k] for k in drops["keep_id"].to_pylist()]
        table = pa.table({"shard": pa.array((keys >> 32).astype(np.int32)),
                          "row": pa.array(keys & 0xFFFFFFFF), "kept_id": pa.array(kept_ids, pa.string())})
        return StageOutput(partitions=partition_by_shard(table), summary={
            "records": t.num_rows, "near_duplicates": len(kept_ids),
            "clusters": int(comps.filter(comps["keep"]).num_rows)})
