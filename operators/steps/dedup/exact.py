"""`exact_dedup` step: drop records whose normalized text repeats, keeping the best copy of each.

Stages (each resumable on its own):
  keys (map)       per record: hashes of the normalized whole conversation and of the first human turn,
                   with the facts that decide which copy survives (reward, answer length, id)
  resolve (reduce) group equal hashes across all shards, join groups that share a record (a copy may
                   match one record by conversation and another by prompt), pick one survivor per
                   cluster: highest reward, then longest answer, then smallest id; emit per-shard
                   drop lists
  transform        drop the listed rows of each shard with reason `exact_duplicate`
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import xxhash
from pydantic import Field

from operators.core.step import Artifacts, Stage, StageOutput, StepConfig, partition_by_shard
from operators.dedup.unionfind import connected_components
from operators.steps.dedup.droplist import DropListStep
from operators.text.normalize import normalize_text

Scope = Literal["conversation", "first_human"]
DEFAULT_SCOPES: tuple[Scope, ...] = ("conversation", "first_human")
KEY_TYPE = pa.binary(16)
REASON = "exact_duplicate"


class ExactDedupConfig(StepConfig):
    """Which texts must be unique."""

    scopes: list[Scope] = Field(default_factory=lambda: list(DEFAULT_SCOPES), min_length=1,
                                description="Hash the whole conversation and/or the first human turn.")


def _hash(text: str) -> bytes:
    return xxhash.xxh3_128_digest(normalize_text(text).encode())


def record_keys(conversations: list[list[dict[str, str]]], scope: Scope) -> list[bytes]:
    """Normalized-text hash of each record in `scope`. Pure."""
    if scope == "conversation":
        return [_hash("\x1e".join(f"{t['from']}\x1f{t['value']}" for t in conv)) for conv in conversations]
    return [_hash(next((t["value"] for t in conv if t["from"] == "human"), "")) for conv in conversations]


def answer_lengths(conversations: list[list[dict[str, str]]]) -> list[int]:
    return [sum(len(t["value"]) for t in conv if t["from"] == "gpt") for conv in conversations]


def choose_survivors(keys: Mapping[str, np.ndarray], reward: np.ndarray, answer_len: np.ndarray,
                     ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For n records with per-scope keys, return (is_duplicate mask, index of the survivor of each record).

    Records sharing any key are one cluster (transitively); the survivor has the highest reward (missing
    rewards rank last), then the longest answers, then the smallest id. Pure and deterministic.
    """
    n = len(ids)
    left: list[np.ndarray] = []
    right: list[np.ndarray] = []
    for k in keys.values():
        order = np.argsort(k, kind="stable")
        sk = k[order]
        same = np.empty(n, dtype=bool)
        if n:
            same[0] = False
            same[1:] = sk[1:] == sk[:-1]
        # Link each record to the previous record with the same key: a chain per group, linear in n.
        left.append(order[same])
        right.append(order[np.roll(same, -1)] if n else order)
    comp = connected_components(n, np.concatenate(left) if left else np.empty(0),
                                np.concatenate(right) if right else np.empty(0))
    # Rank records within components: lexsort's last key is the primary one.
    rank = np.lexsort((ids, -answer_len, -np.nan_to_num(reward, nan=-np.inf), comp))
    survivor_of_comp = np.full(n, -1, dtype=np.int64)
    first_in_comp = np.ones(n, dtype=bool)
    sc = comp[rank]
    first_in_comp[1:] = sc[1:] != sc[:-1]
    survivor_of_comp[sc[first_in_comp]] = rank[first_in_comp]
    survivor = survivor_of_comp[comp]
    return survivor != np.arange(n), survivor


class ExactDedupStep(DropListStep[ExactDedupConfig]):
    """Drop exact duplicates (after normalization) across all shards, keeping one copy of each."""

    name: ClassVar[str] = "exact_dedup"
    config_model: ClassVar[type[StepConfig]] = ExactDedupConfig
    stages: ClassVar[tuple[Stage, ...]] = (Stage("keys", "map"), Stage("resolve", "reduce"))
    drop_reason: ClassVar[str] = REASON
    detail_prefix: ClassVar[str] = "duplicate of"

    def map_stage(self, stage: str, batch: pa.RecordBatch, shard: int) -> pa.Table:
        convs = batch.column("conversations").to_pylist()
        n = len(convs)
        cols: dict[str, Any] = {
            "shard": pa.array([shard] * n, pa.int32()),
            "row": pa.array(np.arange(self._row, self._row + n), pa.int64()),
            "id": batch.column("id"),
            "reward": batch.column("reward"),
            "answer_len": pa.array(answer_lengths(convs), pa.int64()),
        }
        for scope in self.config.scopes:
            cols[f"key_{scope}"] = pa.array(record_keys(convs, scope), KEY_TYPE)
        self._row += n
        return pa.table(cols)

    def reduce_stage(self, stage: str, artifacts: Artifacts, num_shards: int) -> StageOutput:
        tables = list(artifacts.iter_tables("keys"))
        t = pa.concat_tables(tables) if tables else pa.table({"shard": pa.array([], pa.int32())})
        if t.num_rows == 0:
            return StageOutput(summary={"records": 0, "duplicates": 0})
        keys: dict[str, np.ndarray] = {
            s: np.asarray(t[f"key_{s}"].combine_chunks().to_pylist(), dtype="S16") for s in self.config.scopes
        }
        reward = t["reward"].to_numpy(zero_copy_only=False).astype(np.float64)
        ids = np.asarray(t["id"].to_pylist(), dtype=object)
        is_dup, survivor = choose_survivors(keys, reward, t["answer_len"].to_numpy(), ids)
        dup_idx = np.flatnonzero(is_dup)
        shard = t["shard"].to_numpy()[dup_idx]
        drops = pa.table({"shard": shard, "row": t["row"].to_numpy()[dup_idx],
                          "kept_id": pa.array(ids[survivor[dup_idx]].tolist(), pa.string())})
        return StageOutput(partitions=partition_by_shard(drops),
                           summary={"records": t.num_rows, "duplicates": len(dup_idx)})
