"""backfill_source: a second corpus joins the dataset, deduplicated against the first, in a new version.

Two real `airflow dags test` runs over a local data root: corpus A (the first backfill, version 1), then
corpus B, which repeats some of A's records. The registry lists both, B's repeats are dropped as duplicates of
A's records (the survivors stay A's: no churn), the contribution report says so, and version 2 holds both.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from operators.datasets import sources as reg
from operators.datasets import versions as dv
from tests.conftest import dag_info, dags_test, migrated_airflow, run_cli, three_domain_conversations


def _lines(prefix: str, n: int) -> str:
    return "\n".join(three_domain_conversations(n, prefix)) + "\n"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return migrated_airflow(tmp_path_factory)[0]


def test_backfill_dag_parses(home: dict[str, str]) -> None:
    info = dag_info(home, "backfill_source")
    assert info["errors"] == {}
    assert {"register", "ingest.plan", "inputs", "caps", "exact_dedup.resolve", "select.reduce", "contributed",
            "publish", "report"} <= set(info["tasks"])
    assert {"source_uri", "source_name", "format", "cap", "dataset"} <= set(info["params"])


def test_a_second_corpus_lands_in_a_new_version_deduplicated_against_the_first(home: dict[str, str],
                                                                               tmp_path: Path) -> None:
    data = Path(home["IIP_DATA_ROOT"])
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(_lines("alpha", 30))
    b.write_text(_lines("beta", 12) + _lines("alpha", 4))  # 4 records repeat corpus A's first four
    budgets = {"math": 1.0, "code": 1.0, "general": 1.0}
    version_counts = []
    for name, path in (("corpusA", a), ("corpusB", b)):
        conf = {"source_uri": str(path), "source_name": name, "budgets": budgets}
        r = dags_test(home, "backfill_source", "-c", json.dumps(conf))
        assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
        by_source: dict[str, int] = {}
        for c in dv.show(str(data), "foundational")["counts"]["by_source_domain"]:
            by_source[c["source"]] = by_source.get(c["source"], 0) + c["records"]
        version_counts.append(by_source)

    registry, _ = reg.load(str(data))
    assert [s.name for s in registry.of_dataset("foundational")] == ["corpusA", "corpusB"]
    listed = run_cli("sources", "list", "--root", str(data))
    assert listed.returncode == 0 and [json.loads(x)["name"] for x in listed.stdout.splitlines()] == \
        ["corpusA", "corpusB"]
    assert dv.read_latest(str(data), "foundational")[0] == 2

    added = json.loads((data / "runs" / "foundational" / "contribution.json").read_text())
    assert added["source"] == "corpusB"
    assert added["duplicates_of"] == {"corpusA": 4} and added["duplicates_of_other_sources"] == 4
    exact = added["steps"]["exact_dedup"]
    assert exact["dropped_by_reason"] == {"exact_duplicate": 4}
    assert added["steps"]["filter"]["records_in"] == 16  # B's records in = kept + dropped, step by step
    for step, s in added["steps"].items():
        assert s["records_in"] == s["kept"] + sum(s["dropped_by_reason"].values()), step
    # Version 2 holds both corpora: every record of A that version 1 held (nothing taken back), and what B
    # added, as the contribution report says.
    v1, v2 = version_counts
    # Each version keeps its own backfill's contribution (the run folder's is overwritten by the next backfill).
    kept = [json.loads((data / "datasets" / "foundational" / dv.vname(v) / "contribution.json").read_text())
            for v in (1, 2)]
    assert [c["source"] for c in kept] == ["corpusA", "corpusB"] and kept[1] == added
    assert set(v1) == {"corpusA"} and v2["corpusA"] == v1["corpusA"] > 0
    assert v2 == added["selected_by_source"] and v2["corpusB"] == added["steps"]["select"]["kept"] > 0


def test_racing_registrations_both_land(tmp_path: Path) -> None:
    """Two backfills registering at once (threads at a barrier): the compare-and-swap loses neither entry."""
    root = str(tmp_path / "data")
    barrier = threading.Barrier(8)

    def add(i: int) -> None:
        barrier.wait()
        reg.register(root, reg.SourceEntry(name=f"s{i}", uri=str(tmp_path / f"s{i}"), dataset="foundational"))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    registry, _ = reg.load(root)
    assert sorted(s.name for s in registry.sources) == [f"s{i}" for i in range(8)] and registry.version == 8
    with pytest.raises(ValueError):
        reg.SourceEntry(name="../etc", uri=str(tmp_path), dataset="foundational")
