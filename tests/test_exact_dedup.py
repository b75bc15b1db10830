"""Exact dedup across shards: the right copy survives, clusters join across scopes, the ledger holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.cli import build_step
from operators.core import storage
from operators.core.manifest import read_manifest, step_manifest_uri
from operators.core.runner import read_step_table, run_all
from operators.dedup.unionfind import connected_components
from operators.schema import CANONICAL_SCHEMA
from tests.conftest import run_step_as_tasks


def rec(rid: str, q: str, a: str, reward: float | None = None) -> dict[str, Any]:
    return {"id": rid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
            "label": None, "langdetect": "en", "source": "s", "reward": reward, "origin": None}


def write_shards(d: Path, shards: list[list[dict[str, Any]]]) -> str:
    d.mkdir()
    for i, rows in enumerate(shards):
        pq.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA), d / f"s{i}.parquet")
    return str(d)


def test_duplicates_across_shards_keep_the_best_copy(tmp_path: Path) -> None:
    src = write_shards(tmp_path / "in", [
        [rec("a1", "What is Rust?", "A language."), rec("u1", "Unique one?", "Yes.")],
        # Same text after normalization (case, punctuation, spaces), higher reward: this copy survives.
        [rec("a2", "what is  rust", "A LANGUAGE!", reward=0.9), rec("u2", "Unique two?", "Yes.")],
        # Same prompt, longer answer but no reward: still loses to the rewarded copy.
        [rec("a3", "What is Rust?", "A systems programming language.", reward=None)],
        # Same answer text under a different prompt: not a duplicate.
        [rec("u3", "What is Go?", "A language.")],
    ])
    out = storage.validate_uri(str(tmp_path / "out"))
    m = run_all(build_step("exact_dedup", {"target_shard_bytes": 1}), [src], out)
    assert m.stats.shards == 4
    assert m.stats.records_in == 6 and m.stats.dropped_by_reason == {"exact_duplicate": 2}
    assert sorted(read_step_table(out)["id"].to_pylist()) == ["a2", "u1", "u2", "u3"]
    dropped = read_step_table(out, "dropped")
    assert sorted(dropped["id"].to_pylist()) == ["a1", "a3"]
    assert set(dropped["detail"].to_pylist()) == {"duplicate of a2"}


def test_tie_breaks_on_answer_length_then_id_and_scope_choice(tmp_path: Path) -> None:
    src = write_shards(tmp_path / "in", [
        [rec("b", "Name a prime.", "2"), rec("c", "Name a prime.", "Seven is prime.")],
        [rec("a", "Name a prime.", "Seven is prime.")],
    ])
    out = storage.validate_uri(str(tmp_path / "out"))
    run_all(build_step("exact_dedup", {"target_shard_bytes": 1}), [src], out)
    assert read_step_table(out)["id"].to_pylist() == ["a"]  # longest answer, then smallest id
    out2 = storage.validate_uri(str(tmp_path / "out2"))
    run_all(build_step("exact_dedup", {"scopes": ["conversation"], "target_shard_bytes": 1}), [src], out2)
    assert sorted(read_step_table(out2)["id"].to_pylist()) == ["a", "b"]  # prompts may repeat now


def test_connected_components_transitive() -> None:
    labels = connected_components(6, np.array([0, 2, 4]), np.array([1, 1, 5]))
    assert labels.tolist() == [0, 0, 0, 3, 4, 4]
    assert connected_components(3, np.array([], dtype=np.int64), np.array([], dtype=np.int64)).tolist() == [0, 1, 2]
    rng = np.random.default_rng(0)
    left, right = rng.integers(0, 500, 400), rng.integers(0, 500, 400)
    labels = connected_components(500, left, right)
    assert all(labels[a] == labels[b] for a, b in zip(left, right, strict=True))
    assert all(labels[i] <= i for i in range(500))


def _random_corpus(seed: int, shards: int = 4, per_shard: int = 60) -> list[list[dict[str, Any]]]:
    """Records drawn from a few prompts and answers, with case, punctuation and whitespace variants, so exact
    duplicates cluster by conversation, by prompt, and transitively across both."""
    rng = np.random.default_rng(seed)
    prompts = [f"Question number {i}?" for i in range(25)]
    answers = [f"Answer {j}." for j in range(6)]
    variants = [lambda t: t, str.upper, lambda t: t.replace(" ", "  \t"), lambda t: t.rstrip("?.") + "!!"]
    out: list[list[dict[str, Any]]] = []
    n = 0
    for _ in range(shards):
        rows = []
        for _ in range(per_shard):
            q = variants[int(rng.choice(4, p=[0.55, 0.15, 0.15, 0.15]))](prompts[int(rng.integers(len(prompts)))])
            a = variants[int(rng.choice(4, p=[0.7, 0.1, 0.1, 0.1]))](answers[int(rng.integers(len(answers)))])
            reward = None if rng.random() < 0.3 else float(rng.integers(0, 4))
            rows.append(rec(f"r{n:04d}", q, a, reward))
            n += 1
        out.append(rows)
    return out


def _whole_set_drops(shards: list[list[dict[str, Any]]], scopes: list[str]) -> dict[str, str]:
    """The decision on one machine, in plain Python and nothing from the module under test: a dict per scope
    on the normalized text (case, punctuation and whitespace folded), a union-find over records that share a
    key, then per cluster the survivor by (reward desc with missing last, answer length desc, id)."""
    rows = [r for s in shards for r in s]

    def norm(text: str) -> str:
        return " ".join("".join(c if c.isalnum() or c == "_" else " " for c in text.lower()).split())

    def key(r: dict[str, Any], scope: str) -> tuple[str, ...]:
        turns = r["conversations"]
        if scope == "first_human":
            return (norm(next(t["value"] for t in turns if t["from"] == "human")),)
        return tuple(f"{t['from']} {norm(t['value'])}" for t in turns)

    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for scope in scopes:
        first: dict[tuple[str, ...], int] = {}
        for i, r in enumerate(rows):
            j = first.setdefault(key(r, scope), i)
            parent[find(i)] = find(j)
    clusters: dict[int, list[int]] = {}
    for i in range(len(rows)):
        clusters.setdefault(find(i), []).append(i)

    def rank(i: int) -> tuple[float, int, str]:
        r = rows[i]
        answer = sum(len(t["value"]) for t in r["conversations"] if t["from"] == "gpt")
        return (-(r["reward"] if r["reward"] is not None else -1e9), -answer, r["id"])

    drops = {}
    for members in clusters.values():
        best = min(members, key=rank)
        drops.update({rows[i]["id"]: f"duplicate of {rows[best]['id']}" for i in members if i != best})
    return drops


@pytest.mark.parametrize(("partitions", "scopes"), [(1, ["conversation", "first_human"]),
                                                    (5, ["conversation", "first_human"]),
                                                    (16, ["conversation"])])
def test_partitioned_groups_equal_the_whole_set_decision(tmp_path: Path, partitions: int,
                                                         scopes: list[str]) -> None:
    """Hashes shuffled into any number of partitions, each grouped by its own task, drop exactly what the
    single-machine decision drops, naming the same survivor; the ledger holds."""
    shards = _random_corpus(7)
    expected = _whole_set_drops(shards, scopes)
    assert 40 < len(expected) < 230
    out = storage.validate_uri(str(tmp_path / "out"))
    m = run_all(build_step("exact_dedup", {"target_shard_bytes": 1, "partitions": partitions, "scopes": scopes}),
                [write_shards(tmp_path / "in", shards)], out)
    dropped = read_step_table(out, "dropped")
    assert dict(zip(dropped["id"].to_pylist(), dropped["detail"].to_pylist(), strict=True)) == expected
    assert m.stats.records_in == 240 == m.stats.records_kept + m.stats.dropped_by_reason["exact_duplicate"]
    assert m.stats.counters["resolve.partitions"] == partitions
    folders = [p for p in (tmp_path / "out" / "_stages" / "keys").iterdir() if p.is_dir() and p.name[0] == "p"]
    assert len(folders) == partitions


def test_every_map_and_partition_task_as_its_own_process(tmp_path: Path) -> None:
    """As the orchestrator runs it: plan, each `keys` map and `resolve` partition task and each shard's run as a
    separate CLI process (a fresh step each time, state only in storage); the drops equal the whole-set's."""
    shards = _random_corpus(9, shards=2)
    expected = _whole_set_drops(shards, ["conversation", "first_human"])
    out = str(tmp_path / "out")
    src = write_shards(tmp_path / "in", shards)
    run_step_as_tasks("exact_dedup", {"target_shard_bytes": 1, "partitions": 5}, [src], out)
    m = read_manifest(step_manifest_uri(storage.validate_uri(out)))
    assert m is not None and m.stats.shards == 2 and m.stats.counters["resolve.partitions"] == 5
    dropped = read_step_table(storage.validate_uri(out), "dropped")
    assert dict(zip(dropped["id"].to_pylist(), dropped["detail"].to_pylist(), strict=True)) == expected
    assert m.stats.records_kept == 120 - len(expected)


def test_group_links_star_per_group() -> None:
    from operators.steps.dedup.exact import group_links

    keys = np.array([5, 3, 9, 3, 7, 1], dtype=np.int64)
    h1 = np.array([1, 1, 2, 1, 3, 2], dtype=np.uint64)
    h2 = np.array([0, 0, 0, 0, 0, 0], dtype=np.uint64)
    at, heads, first = group_links(keys, h1, h2)
    # Group (1, 0): keys 3, 3, 5 -> 5 links to 3 (3 repeated adds nothing); (2, 0): 1, 9 -> 9 to 1; key 7 alone.
    assert sorted(zip(keys[at].tolist(), heads.tolist(), strict=True)) == [(5, 3), (9, 1)]
    assert keys[first].tolist() == [3, 1, 7]  # one head per group, in hash order


def test_equal_conversations_have_equal_first_human_turns() -> None:
    """Why one scope suffices: the conversation hash normalizes turn by turn, so equal conversation hashes mean
    equal turns, hence equal first human turns; text that only moves across a turn boundary is not equal."""
    from operators.steps.dedup.exact import effective_scope, record_hashes

    a = [{"from": "human", "value": "Hello world"}, {"from": "gpt", "value": "Hi!"}]
    b = [{"from": "human", "value": "hello,  WORLD"}, {"from": "gpt", "value": "hi"}]
    moved = [{"from": "human", "value": "Hello world gpt Hi"}]
    conv = record_hashes([a, b, moved], "conversation")
    first = record_hashes([a, b, moved], "first_human")
    assert conv[0] == conv[1] and first[0] == first[1]
    assert conv[0] != conv[2] and first[0] != first[2]
    assert effective_scope(["conversation", "first_human"]) == "first_human"
    assert effective_scope(["conversation"]) == "conversation"


def test_partition_tasks_cover_every_partition_once_and_resume(tmp_path: Path) -> None:
    """Partition task k handles partitions k, k + shards, ...; a committed task is skipped on re-run, and a
    crashed attempt's files are removed before the task runs again."""
    from operators.core.manifest import read_manifest, shard_manifest_uri, stage_dir
    from operators.core.runner import StepFailed, make_plan, run_map_stage, run_partition_stage
    from operators.core.step import shuffle_partitions, slot_partitions

    for shards, parts in [(4, 10), (4, 3), (1, 5), (7, 7)]:
        assigned = [p for k in range(shards) for p in slot_partitions(k, shards, parts)]
        assert sorted(assigned) == list(range(parts))
    # At least 64; else the next power of two of the shard count, so a few new shards keep the partitions.
    assert shuffle_partitions(None, 3) == 64 and shuffle_partitions(None, 500) == 512
    assert shuffle_partitions(None, 65) == shuffle_partitions(None, 128) == 128
    assert shuffle_partitions(7, 500) == 7

    shards = _random_corpus(3, shards=3)
    out = storage.validate_uri(str(tmp_path / "out"))
    step = build_step("exact_dedup", {"target_shard_bytes": 1, "partitions": 5})
    plan = make_plan(step, [write_shards(tmp_path / "in", shards)], out)
    with pytest.raises(StepFailed, match="not committed"):
        run_partition_stage(step, out, plan, "resolve", 0)  # its map stage has not run yet
    for k in range(3):
        run_map_stage(step, out, plan, "keys", k)
    sdir = Path(stage_dir(out, "resolve").removeprefix("file://"))
    sdir.mkdir(parents=True)
    orphan = sdir / "part-00001-00000-deadbeef.parquet"
    orphan.write_bytes(b"left by a killed attempt")
    first = run_partition_stage(step, out, plan, "resolve", 1)
    assert not orphan.exists()
    assert first.stats.counters["partitions"] == 2  # partitions 1 and 4 of 5, over 3 tasks
    again = run_partition_stage(build_step("exact_dedup", {"target_shard_bytes": 1, "partitions": 5}), out,
                                plan, "resolve", 1)
    assert again.attempt == first.attempt  # skipped: the committed output stands
    committed = read_manifest(shard_manifest_uri(stage_dir(out, "resolve"), 1))
    assert committed is not None and committed.attempt == first.attempt


def test_a_plan_commits_its_upstream_step_first(tmp_path: Path) -> None:
    """`plan --after STEP` (how a chain runs: one task, one pod start fewer per step) commits the upstream step
    whose output is its input, then plans; an upstream with an uncommitted shard fails it naming the shard, and
    nothing is planned."""
    from operators.core.runner import load_plan
    from tests.conftest import run_cli

    src = write_shards(tmp_path / "in", _random_corpus(5, shards=2))
    up, down = str(tmp_path / "filter"), str(tmp_path / "exact")
    cfg = ["--config", json.dumps({"target_shard_bytes": 1})]
    assert run_cli("plan", "filter", *cfg, "--input", src, "--output", up).returncode == 0
    assert run_cli("run", "filter", *cfg, "--shard", "0", "--output", up).returncode == 0
    early = run_cli("plan", "exact_dedup", *cfg, "--after", "filter", "--input", up, "--output", down)
    assert early.returncode == 1 and "shard(s) [1] not committed" in early.stderr
    assert not (tmp_path / "exact" / "_plan.json").exists()
    assert run_cli("run", "filter", *cfg, "--shard", "1", "--output", up).returncode == 0
    r = run_cli("plan", "exact_dedup", *cfg, "--after", "filter", "--input", up, "--output", down)
    assert r.returncode == 0, r.stderr[-2000:]
    committed = read_manifest(step_manifest_uri(storage.validate_uri(up)))
    assert committed is not None and committed.stats.records_in == 120
    assert len(load_plan(storage.validate_uri(down)).shards) == 2
    two = run_cli("plan", "exact_dedup", *cfg, "--after", "filter", "--input", up, "--input", src, "--output", down)
    assert two.returncode == 2 and "exactly one --input" in two.stderr
