"""Dataset versions: publish makes an immutable, complete version with a card and lineage; LATEST moves by
compare-and-swap (two racing publishers cannot both win, locally and on the S3 API); diff streams ids per
source and domain; retention keeps the last K, LATEST and pins."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from operators.cli import build_step
from operators.core import storage
from operators.core.runner import read_step_table, run_all
from operators.datasets import ids
from operators.datasets import versions as dv
from operators.datasets.diff import diff_versions
from tests.conftest import run_cli
from tests.test_exports_consumers import SCHEMA, pool


def _select(src: str, out: str, budgets: dict[str, Any]) -> str:
    out = storage.validate_uri(out)
    run_all(build_step("select", {"budgets": budgets, "target_shard_bytes": 1, "replay_fraction": 0.2}), [src], out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two runs of one pipeline: `upstream/select` (outside the runs: a source with a manifest) feeding
    `runA/select` and `runB/select` with different budgets."""
    tmp = tmp_path_factory.mktemp("runs")
    (tmp / "raw").mkdir()
    rows = pool(120)
    for f in range(2):
        pq.write_table(pa.Table.from_pylist(rows[f::2], schema=SCHEMA), tmp / "raw" / f"p{f}.parquet")
    up = _select(str(tmp / "raw"), str(tmp / "upstream" / "select"), {})
    a = _select(up, str(tmp / "runA" / "select"), {"math": 20, "code": 0.5})
    b = _select(up, str(tmp / "runB" / "select"), {"math": 30, "code": 0.25, "general": 0.5})
    (tmp / "runA" / "report.json").write_text('{"steps": []}')  # a stale folder report: the version renders its own
    return {"up": up, "a": a, "b": b, "runA": storage.validate_uri(str(tmp / "runA")),
            "runB": storage.validate_uri(str(tmp / "runB"))}


def test_publish_version_folder_card_and_lineage(runs: dict[str, str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path)
    cfg = dv.PublishConfig(name="found", licenses={"upstream/select": "cc-by-4.0"})
    out = dv.publish(root, cfg, runs["a"], runs["runA"], {"dag_id": "foundational_selection", "run_id": "manual__1"})
    assert out["version"] == 1 and dv.read_latest(root, "found")[0] == 1
    vdir = tmp_path / "datasets" / "found" / "v0001"
    table = read_step_table(runs["a"])
    m = json.loads((vdir / "_VERSION.json").read_text())
    # Every file the manifest lists exists with its size: the folder is complete before LATEST moved.
    assert all((vdir / f["path"]).stat().st_size == f["bytes"] for f in m["files"])
    # The version's report is its own, of the committed select (not the folder's stale report.json), and the
    # manifest and card link to it.
    report = json.loads((vdir / "report.json").read_text())
    assert [(s["step"], s["records_kept"]) for s in report["steps"]] == [("select", table.num_rows)]
    assert m["report"] == storage.join(storage.validate_uri(str(vdir)), "report.html")
    assert (vdir / "report.html").exists()
    assert (vdir / "stats" / "select.json").exists()
    assert m["counts"]["splits"] == {"train": table.num_rows, "replay": sum(table["replay"].to_pylist())}
    by = {(r["source"], r["domain"]): r["records"] for r in m["counts"]["by_source_domain"]}
    assert sum(by.values()) == table.num_rows and by[("src0", "math")] > 0
    # Lineage: the step inside the run with its config hash; the upstream step as a source with its checksum.
    assert m["lineage"]["steps"]["select"]["config_hash"] == json.loads(
        storage.read_bytes(storage.join(runs["a"], "_MANIFEST.json")))["config_hash"]
    [source] = m["lineage"]["sources"]
    assert source["uri"] == runs["up"] and source["manifest_sha256"] == storage.sha256_hex(
        storage.read_bytes(storage.join(runs["up"], "_MANIFEST.json")))
    # The card: YAML the Hub reads, and the folder loads with `datasets` (offline, no project code).
    card = (vdir / "hf" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "cc-by-4.0" and meta["size_categories"] == ["n<1K"]
    assert {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]} == m["counts"]["splits"]
    assert "manual__1" in card and m["lineage"]["steps"]["select"]["config_hash"] in card
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    ds = datasets.load_dataset(str(vdir / "hf"))
    assert sorted(ds["train"]["id"]) == sorted(table["id"].to_pylist())
    # The card's features are exactly what `datasets` reads from the data, and its split counts are used.
    assert datasets.Features._from_yaml_list(meta["dataset_info"]["features"]) == ds["train"].features
    assert ds["train"].info.splits["replay"].num_examples == m["counts"]["splits"]["replay"]


def test_diff_retention_pins_and_cli(runs: dict[str, str], tmp_path: Path) -> None:
    root = str(tmp_path)
    cfg = dv.PublishConfig(name="found")
    for d, r in (("a", "runA"), ("b", "runB"), ("a", "runA")):
        dv.publish(root, cfg, runs[d], runs[r])
    ids_a, ids_b = (read_step_table(runs[k]).select(["id", "source", "domain"]).to_pylist() for k in "ab")
    groups = list(diff_versions(root, "found", 1, 2))
    added = {i for g in groups if g["change"] == "added" for i in g["ids"]}
    removed = {i for g in groups if g["change"] == "removed" for i in g["ids"]}
    assert added == {r["id"] for r in ids_b} - {r["id"] for r in ids_a} and added
    assert removed == {r["id"] for r in ids_a} - {r["id"] for r in ids_b} and removed
    dom = {r["id"]: (r["source"], r["domain"]) for r in ids_a + ids_b}
    assert all(dom[i] == (g["source"], g["domain"]) for g in groups[:-1] for i in g["ids"])
    # The CLI streams the same groups as JSON lines; diff 1 -> 3 (same data) is empty.
    r = run_cli("datasets", "diff", "found", "v1", "v2", "--root", root)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in r.stdout.splitlines()] == groups
    r = run_cli("datasets", "diff", "found", "v1", "v3", "--root", root)
    assert [json.loads(line)["change"] for line in r.stdout.splitlines()] == ["summary"]
    # Retention: pin v1, keep 1 -> v2 goes, v1 (pinned) and v3 (LATEST) stay; unpinned v1 goes next time.
    assert run_cli("datasets", "pin", "found", "v1", "--root", root).returncode == 0
    r = run_cli("datasets", "retain", "found", "--keep", "1", "--root", root)
    assert json.loads(r.stdout)["deleted"] == [2]
    assert dv.versions(root, "found") == [1, 3] and not list((tmp_path / "datasets/found/v0002").rglob("*.parquet"))
    dv.pin(root, "found", 1, on=False)
    assert dv.retain(root, "found", 1) == [1]
    r = run_cli("datasets", "list", "--root", root)
    assert json.loads(r.stdout) == {"name": "found", "latest": 3, "versions": [3], "pinned": []}
    # A new publish never reuses a number, even of a deleted version.
    assert dv.publish(root, cfg, runs["b"], runs["runB"])["version"] == 4
    assert json.loads(run_cli("datasets", "show", "found", "--root", root).stdout)["version"] == 4


def test_id_index_buckets_and_a_diff_across_bucket_counts(runs: dict[str, str], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A version of more records than a bucket holds splits its id index by hash; a diff between versions with
    different bucket counts still finds exactly the added and removed ids."""
    root = str(tmp_path)
    cfg = dv.PublishConfig(name="found")
    monkeypatch.setattr(ids, "IDS_PER_BUCKET", 8)
    dv.publish(root, cfg, runs["a"], runs["runA"])
    monkeypatch.setattr(ids, "IDS_PER_BUCKET", 2_000_000)
    dv.publish(root, cfg, runs["b"], runs["runB"])
    table = read_step_table(runs["a"])
    buckets = dv.show(root, "found", 1)["id_buckets"]
    assert buckets >= 4 and dv.show(root, "found", 2)["id_buckets"] == 1
    seen: list[str] = []
    for b in range(buckets):
        for t in dv.iter_ids(root, "found", 1, b, buckets):
            assert all(h % buckets == b for h in t["h"].to_pylist())
            seen += t["id"].to_pylist()
    assert sorted(seen) == sorted(table["id"].to_pylist())
    ids_a, ids_b = ({r["id"] for r in read_step_table(runs[k]).select(["id"]).to_pylist()} for k in "ab")
    groups = list(diff_versions(root, "found", 1, 2))
    assert {i for g in groups if g["change"] == "added" for i in g["ids"]} == ids_b - ids_a
    assert {i for g in groups if g["change"] == "removed" for i in g["ids"]} == ids_a - ids_b


def _race(root: str, runs: dict[str, str]) -> list[Any]:
    """Two publishers build their versions, wait at a barrier, then both try to move LATEST."""
    barrier = threading.Barrier(2, timeout=60)  # a publisher that fails breaks the barrier
    results: list[Any] = [None, None]

    def publisher(k: int) -> None:
        draft = dv.build_version(root, "race", runs["ab"[k]], runs["run" + "AB"[k]])
        barrier.wait()
        try:
            results[k] = dv.move_latest(draft)["version"]
        except dv.PublishConflict as e:
            results[k] = e

    threads = [threading.Thread(target=publisher, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_racing_publishers_cannot_both_win(where: str, runs: dict[str, str], tmp_path: Path,
                                               request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    for _attempt in range(2):  # from an absent LATEST (If-None-Match), then from an existing one (If-Match)
        before = dv.read_latest(root, "race")[0]
        results = _race(root, runs)
        winners = [r for r in results if isinstance(r, int)]
        assert len(winners) == 1 and sum(isinstance(r, dv.PublishConflict) for r in results) == 1, results
        assert dv.read_latest(root, "race")[0] == winners[0] != before
    # Both losers' versions are complete (committed manifests), just not LATEST; numbers never collide.
    assert dv.versions(root, "race") == [1, 2, 3, 4]


def test_publishing_latest_output_again_makes_no_version(runs: dict[str, str], tmp_path: Path) -> None:
    """A second publish of the step output LATEST already holds (a night with nothing new) is a skip, not a copy."""
    root = str(tmp_path)
    cfg = dv.PublishConfig(name="found")
    first = dv.publish(root, cfg, runs["a"], runs["runA"])
    again = dv.publish(root, cfg, runs["a"], runs["runA"])
    assert first["version"] == again["version"] == 1 and "skipped" not in first
    assert again["skipped"] is True and "v0001 unchanged" in again["reason"]
    assert dv.versions(root, "found") == [1] and not (tmp_path / "datasets/found/_claims/v0002").exists()
    # A different output, then the first again: each is new relative to LATEST, so each is a version.
    assert [dv.publish(root, cfg, runs[d], runs["run" + d.upper()])["version"] for d in "ba"] == [2, 3]
    r = run_cli("datasets", "publish", "found", "--input", runs["a"], "--run", runs["runA"], "--root", root)
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["skipped"] is True, r.stderr


@pytest.mark.parametrize("where", ["local", "s3"])
def test_racing_publishers_of_one_output_publish_one_version(where: str, runs: dict[str, str], tmp_path: Path,
                                                              request: pytest.FixtureRequest,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs of one pipeline publish the same committed step at once: both drafts are built, both try to move
    LATEST at the same moment (a barrier), one wins, and the loser adopts the winner's version and removes its
    own draft. Different outputs racing still end with one winner and one PublishConflict (the test above)."""
    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    barrier = threading.Barrier(2, timeout=60)
    real_move = dv.move_latest

    def move_together(draft: dv.Draft) -> dict[str, Any]:
        barrier.wait()
        return real_move(draft)

    monkeypatch.setattr(dv, "move_latest", move_together)
    results: list[Any] = [None, None]

    def publisher(k: int) -> None:
        try:
            results[k] = dv.publish(root, dv.PublishConfig(name="same"), runs["a"], runs["runA"])
        except Exception as e:  # reported below
            results[k] = e
            barrier.abort()

    threads = [threading.Thread(target=publisher, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, dict) for r in results), results
    assert sorted(bool(r.get("skipped")) for r in results) == [False, True], results
    winner = next(r["version"] for r in results if not r.get("skipped"))
    assert {r["version"] for r in results} == {winner} and dv.read_latest(root, "same")[0] == winner
    assert dv.versions(root, "same") == [winner]  # the loser's complete draft is gone, its number stays claimed
    assert sorted(dv._claimed(dv.dataset_root(root, "same"))) == [1, 2]
    loser = 3 - winner
    assert storage.list_files(storage.join(dv.dataset_root(root, "same"), dv.vname(loser))) == []


def test_compare_and_swap_primitive(tmp_path: Path, s3_bucket: str) -> None:
    for base in (str(tmp_path), s3_bucket):
        uri = storage.join(storage.validate_uri(base), "p", "LATEST")
        assert storage.read_versioned(uri) == (None, None)
        assert storage.compare_and_swap(uri, None, b"1") and not storage.compare_and_swap(uri, None, b"x")
        data, token = storage.read_versioned(uri)
        assert data == b"1" and token
        assert storage.compare_and_swap(uri, token, b"2")
        assert not storage.compare_and_swap(uri, token, b"3")  # stale token
        assert storage.read_versioned(uri)[0] == b"2"


def test_a_crashed_publish_is_invisible_and_its_number_not_reused(runs: dict[str, str], tmp_path: Path) -> None:
    root = str(tmp_path)
    cfg = dv.PublishConfig(name="found")
    dv.publish(root, cfg, runs["a"], runs["runA"])
    # A publisher that died after claiming v2 and writing part of its folder, before its manifest.
    base = tmp_path / "datasets" / "found"
    (base / "_claims" / "v0002").write_bytes(b"")
    (base / "v0002" / "hf" / "data").mkdir(parents=True)
    (base / "v0002" / "hf" / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 half")
    assert dv.versions(root, "found") == [1] and dv.read_latest(root, "found")[0] == 1
    with pytest.raises(dv.PublishError, match="no version 2"):
        dv.show(root, "found", 2)
    assert dv.publish(root, cfg, runs["b"], runs["runB"])["version"] == 3
    assert dv.versions(root, "found") == [1, 3]
    r = run_cli("datasets", "publish", "found", "--input", str(tmp_path / "nothing"), "--run", runs["runA"],
                "--root", root)
    assert r.returncode == 2 and "no committed step" in r.stderr


def test_a_reader_never_sees_half_a_version(runs: dict[str, str], tmp_path: Path) -> None:
    """A reader polling LATEST while versions are published always finds the version it points at complete."""
    root = str(tmp_path)
    done, seen, problems = threading.Event(), set(), list[str]()

    def reader() -> None:
        while not done.is_set():
            latest = dv.read_latest(root, "found")[0]
            if latest is None:
                continue
            seen.add(latest)
            vdir = tmp_path / "datasets" / "found" / dv.vname(latest)
            try:
                m = json.loads((vdir / "_VERSION.json").read_text())
                problems.extend(f["path"] for f in m["files"] if (vdir / f["path"]).stat().st_size != f["bytes"])
            except (OSError, ValueError) as e:
                problems.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for d, r in (("a", "runA"), ("b", "runB"), ("a", "runA")):
            dv.publish(root, dv.PublishConfig(name="found"), runs[d], runs[r])
    finally:
        done.set()
        t.join()
    assert problems == [] and seen and seen <= {1, 2, 3}
