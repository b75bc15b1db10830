"""`semantic_dedup` step: records that ask the same thing in other words (SemDeDup, Abbas et al. 2023).

Stages (each resumable on its own; no task holds the whole corpus):
  embed (map)          per record: a unit vector of its first prompt (optionally with its answer), from the
                       embedding cache beside the step when it has it. Writes the shard's own rows (key, id,
                       keep priority -reward, vector) and a bottom-k sample of them (by a hash of the key) for
                       the fit
  fit (reduce)         spherical k-means on the sample (at most `max_sample` vectors): the centroids. A re-run
                       keeps the centroids it committed before (same encoder, same cluster count), so a
                       night's new records fall into the clusters the old ones are in
  assign (map)         per shard: each record's nearest centroid; (key, cluster, vector) shuffled by cluster
                       into `cluster_partitions` partitions, so every cluster lies in one partition
  pairs (partition)    per cluster: cosine similarity of every pair, in blocks of `block_rows` rows; pairs at or
                       above `threshold` are edges, their connected components are linked to their smallest
                       key (star links: a component of n records costs n - 1 links, however dense)
  resolve (reduce)     the union-find shared with exact and near dedup over the links only: each component
                       keeps its highest-reward record (then the smallest key); per-shard drop lists
  transform            drop listed rows with reason `semantic_duplicate` (detail: the kept record's id)
Peak memory per task: one shard's vectors (768 B per record with MiniLM), one partition's vectors (about a
shard's worth), a block of `block_rows` x cluster-size similarities, or the sample.
A pair split across two clusters is not compared: that is the method's recall cost, measured in
`bench/semdedup.py` against comparing every pair.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import ClassVar, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from pydantic import Field

from operators.core import storage
from operators.core.step import (
    Artifacts,
    PartitionResult,
    ShardSpec,
    Stage,
    StageOutput,
    StageRows,
    StepConfig,
    concat_or_empty,
    shuffle_partitions,
    table_digest,
)
from operators.dedup.unionfind import connected_components
from operators.llm.embed import (
    EmbedConfig,
    EmbeddingCache,
    Vectors,
    embed_cached,
    load_embedder,
    vector_column,
    vector_matrix,
)
from operators.schema import first_exchange
from operators.steps.dedup.droplist import (
    DropListStep,
    NoChurnConfig,
    drop_lists,
    links_table,
    resolve_links,
    shuffle_rows,
)

REASON = "semantic_duplicate"
CACHE_DIR = "_embed_cache"
SAMPLE_PARTITION = 0  # the embed stage's shuffle partition that holds each shard's sample for the fit
KEYS = pa.schema([("key", pa.int64())])


class SemanticDedupConfig(NoChurnConfig):
    """The encoder, what it reads, the similarity that makes two records duplicates, and the clustering."""

    enabled: bool = Field(True, description="False: the step is off and passes its input on unchanged (the DAGs' "
                          "Param `semantic_dedup`, off by default: it embeds every record).")
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    text: Literal["prompt", "prompt_answer"] = Field(
        "prompt", description="What is embedded: the first human turn, or it and the answer after it.")
    threshold: float = Field(
        0.9, gt=0, le=1, description="Cosine similarity at or above which two records are duplicates (SemDeDup's "
        "1 - eps). Calibrated in bench/semdedup.py: see docs/semantic-dedup.md.")
    clusters: int | None = Field(
        None, ge=1, le=1 << 20, description="k-means clusters; default: records / records_per_cluster.")
    records_per_cluster: int = Field(2000, ge=10, description="Cluster size the default cluster count aims at.")
    same_numbers: bool = Field(
        True, description="Only prompts holding the same numbers can be duplicates: an encoder hardly tells "
        "'add 73 and 23' from 'add 73 and 21' (bench/semdedup.py).")
    sample_per_shard: int = Field(2048, ge=1, description="Vectors each shard offers the fit.")
    max_sample: int = Field(65_536, ge=16, description="Vectors the fit uses at most (the task's memory).")
    kmeans_iterations: int = Field(20, ge=1, le=500)
    seed: int = 0
    cluster_partitions: int | None = Field(
        None, ge=1, le=65_536, description="Partitions the clusters are shuffled into; default: one per shard, "
        "at least 64.")
    block_rows: int = Field(1024, ge=16, description="Rows per similarity block (memory: block x cluster size).")
    cache_uri: str | None = Field(None, description="Where vectors are cached; default: beside the step.")


def semantic_texts(table: pa.Table, text: str) -> list[str]:
    """What is embedded per record: its first prompt, or the prompt and its answer."""
    out = []
    for conv in table.column("conversations").to_pylist():
        prompt, answer = first_exchange(conv)
        out.append(prompt if text == "prompt" else f"{prompt}\n\n{answer}")
    return out


def unit_rows(x: Vectors) -> Vectors:
    """`x` with every row scaled to length 1 (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def number_keys(texts: list[str]) -> npt.NDArray[np.int64]:
    """A key of the numbers each text holds, in order (0: none). Two prompts that differ only in their numbers
    ("add 73 and 23" / "add 73 and 21") are different questions, and a sentence encoder barely sees numbers:
    with `same_numbers`, only records with equal keys can be duplicates."""
    out = np.zeros(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        found = _NUMBER.findall(t)
        if found:
            out[i] = int.from_bytes(hashlib.blake2b("|".join(found).encode(), digest_size=8).digest(), "little",
                                    signed=True)
    return out


def key_hash(keys: npt.NDArray[np.int64], seed: int) -> npt.NDArray[np.uint64]:
    """A seeded, well-mixed 64-bit hash of each key (splitmix64): the sample's order."""
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def bottom_k(table: pa.Table, k: int) -> pa.Table:
    """The `k` rows of `table` with the smallest `u` (its sample hash): a sample that does not depend on how
    the rows were split into shards or batches."""
    if table.num_rows <= k:
        return table
    u = table.column("u").to_numpy()
    return table.take(pa.array(np.sort(np.argpartition(u, k - 1)[:k])))


def spherical_kmeans(x: Vectors, k: int, iterations: int, seed: int) -> Vectors:
    """`k` unit centroids of the unit vectors `x` (cosine k-means): a seeded k-means++ start, then Lloyd rounds,
    each centroid the normalized mean of its members; an empty cluster is re-seeded at the worst-fit point."""
    rng = np.random.default_rng(seed)
    k = max(1, min(k, len(x)))
    centroids = x[kmeans_plus_plus(x, k, rng)].copy()
    for _ in range(iterations):
        assign, best = nearest(x, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            sums[empty] = x[np.argsort(best)[:empty.size]]
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        moved = sums / np.maximum(norms, 1e-12)
        if np.allclose(moved, centroids, atol=1e-6):
            break
        centroids = moved.astype(np.float32)
    return centroids


def kmeans_plus_plus(x: Vectors, k: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Rows of `x` to start k-means from, each drawn with probability proportional to its squared distance to
    the nearest row drawn so far (Arthur and Vassilvitskii 2007). A random start puts two centroids into one
    tight group of near-duplicates and splits it at noise level; this start almost never does. Costs about one
    Lloyd round."""
    n = len(x)
    chosen = np.zeros(k, dtype=np.int64)
    chosen[0] = rng.integers(n)
    d2 = np.maximum(2.0 - 2.0 * (x @ x[chosen[0]]), 0.0)  # squared distance of unit vectors
    for i in range(1, k):
        total = float(d2.sum())
        chosen[i] = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
        d2 = np.minimum(d2, np.maximum(2.0 - 2.0 * (x @ x[chosen[i]]), 0.0))
    return chosen


def nearest(x: Vectors, centroids: Vectors, block: int = 8192) -> tuple[npt.NDArray[np.int64], Vectors]:
    """Each row's nearest centroid by cosine, and that cosine (in blocks: memory is block x k)."""
    assign = np.zeros(len(x), dtype=np.int64)
    best = np.zeros(len(x), dtype=np.float32)
    for lo in range(0, len(x), block):
        sims = x[lo:lo + block] @ centroids.T
        assign[lo:lo + block] = sims.argmax(axis=1)
        best[lo:lo + block] = sims.max(axis=1)
    return assign, best


def cluster_links(keys: npt.NDArray[np.int64], clusters: npt.NDArray[np.int64], vectors: Vectors,
                  threshold: float, block: int, numbers: npt.NDArray[np.int64] | None = None
                  ) -> tuple[pa.Table, dict[str, float]]:
    """Links of every group of records that are similar within their cluster, and what it took. Pure.

    Within each cluster, every pair with cosine >= `threshold` (and, given `numbers`, equal number keys) is
    an edge; each connected component is linked to its smallest key. Rows may come in any order; vectors
    are re-normalized (float16 storage leaves a norm off by up to 1e-4, which would miss identical rows at a
    threshold of 1)."""
    if keys.size == 0:
        return links_table(keys, keys), {"clusters": 0.0, "pairs_compared": 0.0, "links": 0.0}
    order = np.lexsort((keys, clusters))
    keys, clusters, vectors = keys[order], clusters[order], unit_rows(vectors[order])
    nums = None if numbers is None else numbers[order]
    limit = threshold - 1e-6  # float32 rounding of a unit vector's dot with itself
    starts = np.flatnonzero(np.r_[True, clusters[1:] != clusters[:-1]])
    ends = np.r_[starts[1:], keys.size]
    src: list[npt.NDArray[np.int64]] = []
    dst: list[npt.NDArray[np.int64]] = []
    compared = 0
    for lo, hi in zip(starts, ends, strict=True):
        m = hi - lo
        if m < 2:
            continue
        members = vectors[lo:hi]
        for b in range(0, m, block):
            sims = members[b:b + block] @ members[b:].T  # rows b.. against columns b..: the upper triangle
            compared += sims.size
            i, j = np.nonzero(sims >= limit)
            keep = j > i  # column index is relative to b: j > i is a pair above the diagonal
            if nums is not None:
                keep &= nums[lo + b + i] == nums[lo + b + j]
            src.append(lo + b + i[keep])
            dst.append(lo + b + j[keep])
    counters = {"clusters": float(starts.size), "pairs_compared": float(compared)}
    if not src or not sum(s.size for s in src):
        counters["links"] = 0.0
        return links_table(np.zeros(0, np.int64), np.zeros(0, np.int64)), counters
    u, v = np.concatenate(src), np.concatenate(dst)
    counters["similar_pairs"] = float(u.size)
    label = connected_components(keys.size, u, v)  # label = smallest row = smallest key of its cluster group
    linked = np.flatnonzero(label != np.arange(keys.size))
    counters["links"] = float(linked.size)
    return links_table(keys[linked], keys[label[linked]]), counters


class SemanticDedupStep(DropListStep[SemanticDedupConfig]):
    """Drop records whose prompt means what another record's prompt means, keeping one per group."""

    name: ClassVar[str] = "semantic_dedup"
    config_model: ClassVar[type[StepConfig]] = SemanticDedupConfig
    stages: ClassVar[tuple[Stage, ...]] = (Stage("embed", "map"), Stage("fit", "reduce"), Stage("assign", "map"),
                                           Stage("pairs", "partition"), Stage("resolve", "reduce"))
    drop_reason: ClassVar[str] = REASON
    detail_prefix: ClassVar[str] = "semantic duplicate of"

    def __init__(self, config: SemanticDedupConfig) -> None:
        super().__init__(config)
        self._cache: EmbeddingCache | None = None
        self._sample: list[pa.Table] = []
        self._centroids: Vectors | None = None
        self._counters: dict[str, float] = {}

    def is_off(self) -> bool:
        return not self.config.enabled

    def stage_partitions(self, stage: str) -> int:
        return shuffle_partitions(self.config.cluster_partitions, self.num_shards)

    # -- embed ---------------------------------------------------------------------------------------------
    def prepare_stage(self, stage: str, artifacts: Artifacts, shard: int) -> None:
        self._counters = {}
        if stage == "embed":
            uri = self.config.cache_uri or storage.join(artifacts.step_dir, CACHE_DIR)
            self._cache = EmbeddingCache(uri, shard)
            self._sample = []
        elif stage == "assign":
            fitted = artifacts.partition("fit", 0)
            if fitted is None:
                raise ValueError("semantic_dedup: the fit committed no centroids")
            self._centroids = vector_matrix(fitted, "centroid")

    def map_input(self, stage: str, artifacts: Artifacts, shard: ShardSpec) -> Iterator[pa.RecordBatch]:
        if stage == "embed":
            return self.read(shard)
        return (b for t in artifacts.shard_rows("embed", shard.index) for b in t.to_batches())

    def map_stage(self, stage: str, batch: pa.RecordBatch, shard: int) -> StageRows:
        table = pa.Table.from_batches([batch])
        if stage == "assign":
            return self._assign(table)
        assert self._cache is not None
        texts = semantic_texts(table, self.config.text)
        vectors, embedded = embed_cached(load_embedder(self.config.embed), self._cache, texts)
        self._count("embedded", embedded)
        self._count("cache_hits", table.num_rows - embedded)
        keys = self.next_keys(shard, table.num_rows)
        reward = table.column("reward").to_numpy(zero_copy_only=False).astype(np.float64)
        own = pa.table({"key": pa.array(keys), "id": table.column("id"),
                        "priority": pa.array(np.where(np.isnan(reward), np.inf, -reward)),
                        "numbers": pa.array(number_keys(texts)), "vector": vector_column(vectors)})
        self._sample = [bottom_k(pa.concat_tables([*self._sample, own.append_column(
            "u", pa.array(key_hash(keys, self.config.seed)))]), self.config.sample_per_shard)]
        return own

    def finish_map(self, stage: str, shard: int) -> StageRows | None:
        if stage != "embed" or not self._sample:
            return None
        sample, self._sample = self._sample[0], []
        return {SAMPLE_PARTITION: sample}

    def stage_counters(self, stage: str) -> dict[str, float]:
        return dict(self._counters)

    def _count(self, name: str, n: float) -> None:
        self._counters[name] = self._counters.get(name, 0.0) + n

    # -- fit -------------------------------------------------------------------------------------------------
    def reduce_stage(self, stage: str, artifacts: Artifacts, num_shards: int) -> StageOutput:
        if stage == "fit":
            return self._fit(artifacts)
        drops, records, groups = resolve_links(
            artifacts, links_stage="pairs", rows_stage="embed", columns=["priority"],
            priority=lambda r: r["priority"].to_numpy(), protected=self.protected)
        return drop_lists(drops, {"records": records, "semantic_duplicates": drops.num_rows, "groups": groups})

    def _fit(self, artifacts: Artifacts) -> StageOutput:
        cfg = self.config
        sample = KEYS.empty_table()
        for t in artifacts.shuffled("embed", SAMPLE_PARTITION):  # one shard's sample at a time
            sample = bottom_k(concat_or_empty([sample, t], KEYS), cfg.max_sample)
        k = cfg.clusters or max(1, round(self._records(artifacts) / cfg.records_per_cluster))
        fingerprint = f"{cfg.embed.fingerprint()}|k={k}|seed={cfg.seed}"
        previous = artifacts.previous_summary("fit")
        kept = artifacts.previous_partition("fit", 0)
        if previous and previous.get("fingerprint") == fingerprint and kept is not None:
            centroids = vector_matrix(kept, "centroid")
            reused = True
        else:
            x = vector_matrix(sample, "vector") if sample.num_rows else np.zeros((0, 1), np.float32)
            if not len(x):
                return StageOutput(summary={"clusters": 0, "sample": 0, "fingerprint": fingerprint})
            centroids = spherical_kmeans(x, k, cfg.kmeans_iterations, cfg.seed)
            reused = False
        table = pa.table({"centroid": vector_column(centroids)})
        return StageOutput(partitions={0: table}, summary={
            "clusters": len(centroids), "sample": sample.num_rows, "centroids_reused": int(reused),
            "fingerprint": fingerprint})

    def _records(self, artifacts: Artifacts) -> int:
        return sum(t.num_rows for t in artifacts.iter_tables("embed", columns=["key"]))

    # -- assign and pairs ------------------------------------------------------------------------------------
    def _assign(self, own: pa.Table) -> StageRows:
        if self._centroids is None or not len(self._centroids):
            return {}
        vectors = vector_matrix(own, "vector")
        cluster, _ = nearest(vectors, self._centroids)
        rows = pa.table({"key": own.column("key"), "cluster": pa.array(cluster), "numbers": own.column("numbers"),
                         "vector": own.column("vector")})
        return shuffle_rows(rows, cluster % self.stage_partitions("pairs"))

    def map_digest(self, stage: str, artifacts: Artifacts, shard: int) -> str | None:
        if stage == "assign":  # reads its shard's vectors and the centroids: reusable while both are unchanged
            return f"{table_digest(artifacts.partition('fit', 0))},pairs={self.stage_partitions('pairs')}"
        return super().map_digest(stage, artifacts, shard)

    def partition_stage(self, stage: str, artifacts: Artifacts, partition: int) -> PartitionResult:
        rows = concat_or_empty(artifacts.shuffled("assign", partition),
                               pa.schema([("key", pa.int64()), ("cluster", pa.int64()), ("numbers", pa.int64())]))
        vectors = vector_matrix(rows, "vector") if rows.num_rows else np.zeros((0, 1), np.float32)
        numbers = rows["numbers"].to_numpy() if self.config.same_numbers else None
        links, counters = cluster_links(rows["key"].to_numpy(), rows["cluster"].to_numpy(), vectors,
                                        self.config.threshold, self.config.block_rows, numbers)
        return PartitionResult(links, rows.num_rows, counters)


__all__ = ["SemanticDedupConfig", "SemanticDedupStep", "cluster_links", "nearest", "semantic_texts",
           "spherical_kmeans"]
