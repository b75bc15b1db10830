"""Incremental re-runs: a night with new input files does only the new shards' work where it can.

The runner keeps the earlier plan's shards (same files, same indices) and appends shards for new files;
a shard whose content key (step code and config, its own input files, and a digest of the global results
its transform reads) is unchanged reuses its committed output. These tests run the real Phase 1 steps
twice in the same folders, the second time with more input, and compare with a fresh run over all of it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from operators.cli import build_step
from operators.core import storage
from operators.core.manifest import SHARDS_DIR, read_manifest, stage_dir, step_manifest_uri
from operators.core.runner import read_step_table, run_all
from operators.schema import CANONICAL_SCHEMA

_VOCABULARY = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
               "upsilon phi chi psi omega river mountain cloud signal vector matrix proof lemma integer prime")
WORDS = _VOCABULARY.split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _file(rng: random.Random, prefix: str, n: int, copies_of: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`n` fresh records, plus for each of `copies_of` an exact copy and a near copy with a lower reward (so the
    earlier record stays the survivor: the no-churn case)."""
    rows = []
    for i in range(n):
        rows.append({"id": f"{prefix}-{i}", "conversations": [
            {"from": "human", "value": f"Question {prefix} {i}: {_text(rng, 25)}?"},
            {"from": "gpt", "value": _text(rng, 60)}],
            "label": None, "langdetect": "en", "source": prefix[0], "reward": rng.uniform(0.5, 1.0), "origin": None})
    for j, orig in enumerate(copies_of):
        exact = {**orig, "id": f"{prefix}-x{j}", "reward": 0.1}
        conv = []
        for turn in orig["conversations"]:  # one word changed in the prompt and one in the answer
            words = turn["value"].split()
            words[5] = "changed"
            conv.append({"from": turn["from"], "value": " ".join(words)})
        rows += [exact, {**orig, "id": f"{prefix}-n{j}", "conversations": conv, "reward": 0.1}]
    return rows


def _write(folder: Path, files: list[list[dict[str, Any]]]) -> str:
    folder.mkdir(parents=True)
    for i, rows in enumerate(files):
        pq.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA), folder / f"part-{i}.parquet")
    return str(folder)


def _corpus(tmp_path: Path) -> tuple[str, str]:
    """Night 1: four files (with duplicates across them); night 2: two more files, some of whose records
    copy night 1's records exactly or nearly."""
    rng = random.Random(7)
    old = [_file(rng, f"a{f}", 30, []) for f in range(4)]
    old[3] += _file(rng, "a3dup", 0, old[0][:3])
    new = [_file(rng, f"b{f}", 30, old[f][5:9]) for f in range(2)]
    new[1].append({**old[1][0], "id": "b1-better", "reward": 2.0})  # a better copy: old shard 1's list changes
    return _write(tmp_path / "night1", old), _write(tmp_path / "night2", new)


def _chain(root: Path, inputs: list[str], target: str, published: str | None = None,
           freeze: bool = False) -> dict[str, str]:
    """filter -> exact_dedup -> near_dedup -> dsir -> select, one shard per upstream file."""
    one_file_shards = {"target_shard_bytes": 1}
    configs: dict[str, dict[str, Any]] = {
        "filter": {}, "exact_dedup": {"published": published}, "near_dedup": {"published": published},
        "dsir": {"targets": {"general": [{"name": "t", "uri": target, "format": "jsonl:text"}]}, "seed": 3,
                 "freeze": freeze},
        "select": {"budgets": {"general": 0.5}, "freeze": freeze},
    }
    dirs = {}
    for name, cfg in configs.items():
        out = str(root / name)
        run_all(build_step(name, {**cfg, **one_file_shards}), inputs, out)
        dirs[name] = out
        inputs = [out]
    return dirs


def _shard_manifests(step_dir: str, stage: str | None = None) -> list[Any]:
    folder = stage_dir(step_dir, stage) if stage else step_dir
    return [m for uri in sorted(storage.list_files(storage.join(folder, SHARDS_DIR)))
            if (m := read_manifest(uri)) is not None]


def _decisions(step_dir: str) -> tuple[list[str], dict[str, str]]:
    kept = sorted(read_step_table(step_dir)["id"].to_pylist())
    dropped = read_step_table(step_dir, "dropped")
    reasons = dict(zip(dropped["id"].to_pylist(), dropped["reason"].to_pylist(), strict=True)) \
        if dropped.num_rows else {}
    return kept, reasons


def test_a_night_with_new_files_reuses_old_shards_and_equals_a_full_run(tmp_path: Path) -> None:
    night1, night2 = _corpus(tmp_path)
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"text": f"Question about {w} and primes"}) + "\n" for w in WORDS))
    inc = tmp_path / "incremental"
    _chain(inc, [night1], str(target))
    # The new night's files come first in the input order (as a night's ingest dir sorts before the backfill's):
    # the old shards must keep their indices all the same.
    dirs = _chain(inc, [night2, night1], str(target))
    full = _chain(tmp_path / "full", [night2, night1], str(target))

    # The same output as a fresh run over all the input, step by step (kept ids and drop reasons).
    for name in dirs:
        assert _decisions(dirs[name]) == _decisions(full[name]), name
        m = read_manifest(step_manifest_uri(dirs[name]))
        assert m is not None and m.stats.records_in == m.stats.records_kept + m.stats.records_dropped

    # Record-local: the four old shards were reused, the two new ones computed.
    filt = _shard_manifests(dirs["filter"])
    assert [m.reused_from is not None for m in filt] == [True] * 4 + [False] * 2
    # Dedup: the old shards' map stages are reused. Most new copies lose to the old records, so those old
    # shards' drop lists are unchanged and their transforms are reused too; one new record is a better copy of
    # a record of old shard 1, whose drop list therefore changes: that shard is recomputed (and so is shard 1
    # of near_dedup, whose input file changed).
    exact_keys = [m.reused_from is not None for m in _shard_manifests(dirs["exact_dedup"], "keys")]
    assert exact_keys == [True] * 4 + [False] * 2
    changed = [True, False, True, True, False, False]
    assert [m.reused_from is not None for m in _shard_manifests(dirs["exact_dedup"])] == changed
    assert [m.reused_from is not None for m in _shard_manifests(dirs["near_dedup"], "signatures")] == changed
    assert [m.reused_from is not None for m in _shard_manifests(dirs["near_dedup"])] == changed
    assert read_manifest(step_manifest_uri(dirs["near_dedup"])).stats.counters["shards_reused"] == 3  # type: ignore[union-attr]
    reasons = {**_decisions(dirs["exact_dedup"])[1], **_decisions(dirs["near_dedup"])[1]}
    assert {r for i, r in reasons.items() if i.startswith("b")} == {"exact_duplicate", "near_duplicate"}
    assert [i for i in reasons if i.startswith("a") and "dup" not in i] == ["a1-0"]  # lost to b1-better
    # The run's report says how many shards each step reused (their seconds are the earlier run's).
    from operators.report import write_report

    html = storage.read_bytes(write_report(str(inc))["html"]).decode()
    assert "<td>6 (4 reused)</td>" in html and "<td>6 (3 reused)</td>" in html
    # DSIR refits on the grown corpus: new models, so every shard is rescored (not reused).
    assert not any(m.reused_from for m in _shard_manifests(dirs["dsir"]))
    assert [m.reused_from is not None for m in _shard_manifests(dirs["dsir"], "counts")] == changed


def test_an_unchanged_night_rewrites_nothing_and_a_config_change_reuses_nothing(tmp_path: Path) -> None:
    night1, night2 = _corpus(tmp_path)
    out = str(tmp_path / "filter")
    run_all(build_step("filter", {"target_shard_bytes": 1}), [night1, night2], out)
    listing = {u: storage.read_bytes(u) for u in storage.list_files(out)}
    run_all(build_step("filter", {"target_shard_bytes": 1}), [night1, night2], out)
    assert {u: storage.read_bytes(u) for u in storage.list_files(out)} == listing  # not one byte rewritten

    m = run_all(build_step("filter", {"target_shard_bytes": 1, "min_chars": 20}), [night1, night2], out)
    assert m.stats.counters.get("shards_reused", 0) == 0
    assert not any(s.reused_from for s in _shard_manifests(out))


def test_a_damaged_reused_output_is_recomputed_not_reused(tmp_path: Path) -> None:
    night1, night2 = _corpus(tmp_path)
    out = str(tmp_path / "filter")
    run_all(build_step("filter", {"target_shard_bytes": 1}), [night1], out)
    first = _shard_manifests(out)[0]
    victim = storage.join(out, first.files[0].path)
    storage.write_bytes(victim, b"not parquet")  # a different size: the file check refuses it
    m = run_all(build_step("filter", {"target_shard_bytes": 1}), [night1, night2], out)
    assert m.stats.counters["shards_reused"] == 3  # shards 1-3 reused, 0 recomputed, 4-5 new
    assert _shard_manifests(out)[0].reused_from is None
    assert sorted(read_step_table(out)["id"].to_pylist()) == sorted(
        read_step_table(str(_full_filter(tmp_path, night1, night2)))["id"].to_pylist())


def _full_filter(tmp_path: Path, *inputs: str) -> Path:
    out = tmp_path / "filter_full"
    run_all(build_step("filter", {"target_shard_bytes": 1}), list(inputs), str(out))
    return out


def test_no_churn_a_published_record_survives_a_better_copy_that_arrives_later(tmp_path: Path) -> None:
    """With `published` set, a record of the dataset's LATEST version is never dropped for a later duplicate
    (b1-better, reward 2.0, copies published a1-0): the newcomer is dropped instead, the other old shards are
    reused, and the night equals a fresh full run over all the input under the same rule."""
    from operators.datasets import versions as dv

    night1, night2 = _corpus(tmp_path)
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"text": f"Question about {w}"}) + "\n" for w in WORDS))
    root = str(tmp_path / "data")
    published = storage.join(root, "datasets", "foundational")
    inc = tmp_path / "runs" / "nightly"
    first = _chain(inc, [night1], str(target), published)
    dv.publish(root, dv.PublishConfig(name="foundational"), first["near_dedup"], str(inc))
    assert "a1-0" in read_step_table(first["near_dedup"])["id"].to_pylist()
    # The version records what each dedup step kept: the rule protects those records too, so old drop lists
    # never change when new records arrive.
    survivors = dv.show(root, "foundational")["dedup_survivors"]
    assert survivors == {s: read_step_table(first[s]).num_rows for s in ("exact_dedup", "near_dedup")}

    dirs = _chain(inc, [night2, night1], str(target), published)
    full = _chain(tmp_path / "full", [night2, night1], str(target), published)
    for name in dirs:
        assert _decisions(dirs[name]) == _decisions(full[name]), name
    exact_kept, exact_dropped = _decisions(dirs["exact_dedup"])
    assert "a1-0" in exact_kept and exact_dropped["b1-better"] == "exact_duplicate"
    assert [m.reused_from is not None for m in _shard_manifests(dirs["exact_dedup"])] == [True] * 4 + [False] * 2
    dropped = read_step_table(dirs["exact_dedup"], "dropped")
    detail = dict(zip(dropped["id"].to_pylist(), dropped["detail"].to_pylist(), strict=True))
    assert detail["b1-better"] == "duplicate of a1-0"

    # Without the rule the better newcomer wins, as the plain survivor rule says (the rule is what changes it).
    plain = _chain(tmp_path / "plain", [night2, night1], str(target))
    assert _decisions(plain["exact_dedup"])[1]["a1-0"] == "exact_duplicate"


def test_freeze_keeps_the_models_and_the_selection_and_adds_from_new_records(tmp_path: Path) -> None:
    """With `freeze`, dsir keeps its fitted models (old shards keep their keys and are reused) and select keeps
    every decision of the shards whose candidates are unchanged, choosing only among the other records with
    the domain's fraction applied to them."""
    night1, night2 = _corpus(tmp_path)
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"text": f"Question about {w}"}) + "\n" for w in WORDS))
    inc = tmp_path / "inc"
    first = _chain(inc, [night1], str(target), freeze=True)
    selected_before = set(read_step_table(first["select"])["id"].to_pylist())
    dirs = _chain(inc, [night2, night1], str(target), freeze=True)

    assert [m.reused_from is not None for m in _shard_manifests(dirs["dsir"])] == [True, False, True, True,
                                                                                    False, False]
    decide = read_manifest(step_manifest_uri(stage_dir(dirs["select"], "decide")))
    assert decide is not None and decide.summary["frozen_shards"] == 3  # old shards 0, 2, 3
    assert [m.reused_from is not None for m in _shard_manifests(dirs["select"])] == [True, False, True, True,
                                                                                      False, False]
    after = read_step_table(dirs["select"])
    now = set(after["id"].to_pylist())
    shards = _shard_manifests(dirs["dsir"])
    unchanged_old = {i for m in shards[:1] + shards[2:4] for f in m.files if f.kind == "data"
                     for i in pq.read_table(storage.join(dirs["dsir"], f.path))["id"].to_pylist()}
    assert selected_before & unchanged_old <= now  # nothing selected before was taken back
    # The others (new shards and the changed shard 1): half of their records, the best keys among them.
    pool = read_step_table(dirs["dsir"])
    others = pool.filter(pa.array([i not in unchanged_old for i in pool["id"].to_pylist()]))
    best = others.sort_by([("dsir_key", "descending")])["id"].to_pylist()[: others.num_rows // 2]
    assert now - unchanged_old == set(best)
    assert not (storage.exists(storage.join(stage_dir(dirs["select"], "decide"), "_PREVIOUS.json")))
