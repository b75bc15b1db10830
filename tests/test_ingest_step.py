"""The ingest step end to end over real files: every container and format, quarantine, stable ids,
config errors, S3 storage, and a kill -9 in the middle followed by a re-run."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.cli import build_step
from operators.core import storage
from operators.core.manifest import read_manifest, shard_manifest_uri, step_manifest_uri
from operators.core.runner import read_step_table, run_all
from operators.steps.ingest.step import RAW_BATCH_SCHEMA, IngestConfig, normalize_batch
from tests.conftest import ROOT, run_cli

EN_Q = "How do I reverse a list in Python without modifying the original list?"
EN_A = "Use slicing: reversed_copy = items[::-1] creates a new list in reverse order."
ZH_Q = "请解释一下光合作用的基本过程，以及它对地球生态系统的重要性。"
ZH_A = "光合作用是植物利用光能把二氧化碳和水转化为葡萄糖并释放氧气的过程。"


def sharegpt(q: str, a: str) -> dict[str, Any]:
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


def write_corpus(d: Path) -> dict[str, int]:
    """One file per container/format; returns expected kept count per origin format."""
    d.mkdir(parents=True, exist_ok=True)
    with (d / "a_sharegpt.jsonl").open("w") as f:
        for i in range(3):
            f.write(json.dumps(sharegpt(f"{EN_Q} ({i})", EN_A)) + "\n")
        f.write("\n")  # blank lines are not records
    (d / "b_openai.json").write_text(json.dumps([
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ZH_Q},
                      {"role": "assistant", "content": ZH_A}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": EN_Q}]},
                      {"role": "assistant", "content": EN_A}]},
    ], ensure_ascii=False))
    pq.write_table(pa.Table.from_pylist([
        {"instruction": "Translate to French", "input": "Good morning", "output": "Bonjour"},
        {"instruction": EN_Q, "input": "", "output": EN_A},
    ]), d / "c_alpaca.parquet")
    with gzip.open(d / "d_infinity.jsonl.gz", "wt") as f:
        f.write(json.dumps({
            "id": 42, "conversations": sharegpt(EN_Q + " infinity", EN_A)["conversations"],
            "label": {"ability_en": ["python"], "ability_zh": [], "cate_ability_en": ["programming"],
                      "cate_ability_zh": []},
            "langdetect": "en", "source": "upstream", "reward": 0.5}) + "\n")
    return {"sharegpt": 3, "openai": 2, "alpaca": 2, "infinity": 1}


def test_every_container_and_format_normalizes(tmp_path: Path) -> None:
    expected = write_corpus(tmp_path / "raw")
    out = storage.validate_uri(str(tmp_path / "out"))
    m = run_all(build_step("ingest", {"source_name": "mixed"}), [str(tmp_path / "raw")], out)
    assert m.stats.records_in == sum(expected.values())
    assert m.stats.records_kept == sum(expected.values()) and m.stats.dropped_by_reason == {}
    rows = read_step_table(out).to_pylist()
    by_format: dict[str, int] = {}
    for r in rows:
        by_format[r["origin"]["format"]] = by_format.get(r["origin"]["format"], 0) + 1
        assert r["source"] == "mixed"
        roles = [t["from"] for t in r["conversations"]]
        assert roles[-1] == "gpt" and roles[0] in ("human", "system")
    assert by_format == expected
    zh = next(r for r in rows if r["conversations"][-1]["value"] == ZH_A)
    assert zh["langdetect"] == "zh" and zh["conversations"][0] == {"from": "system", "value": "Be brief."}
    alpaca = next(r for r in rows if r["conversations"][-1]["value"] == "Bonjour")
    assert alpaca["conversations"][0]["value"] == "Translate to French\n\nGood morning"
    assert alpaca["langdetect"] == "en"
    inf = next(r for r in rows if r["origin"]["format"] == "infinity")
    assert inf["label"]["cate_ability_en"] == ["programming"] and inf["reward"] == 0.5
    assert inf["origin"]["id"] == "42" and inf["origin"]["source"] == "upstream"
    # Stable content ids: another run elsewhere gives the same ids; same content -> same id.
    out2 = storage.validate_uri(str(tmp_path / "out2"))
    run_all(build_step("ingest", {"source_name": "other"}), [str(tmp_path / "raw")], out2)
    assert sorted(r["id"] for r in rows) == sorted(read_step_table(out2)["id"].to_pylist())
    # The OpenAI and Alpaca files both hold the plain EN_Q/EN_A exchange: one content, one id.
    same = [r["id"] for r in rows if [t["value"] for t in r["conversations"]] == [EN_Q, EN_A]]
    assert len(same) == 2 and same[0] == same[1]
    assert len({r["id"] for r in rows}) == len(rows) - 1


def test_forced_format_and_undetectable_files_quarantine_with_reasons(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "s.jsonl").write_text(json.dumps(sharegpt(EN_Q, EN_A)) + "\n")
    (raw / "weird.jsonl").write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    out = storage.validate_uri(str(tmp_path / "out"))
    m = run_all(build_step("ingest", {"source_name": "s", "format": "alpaca"}), [str(raw / "s.jsonl")], out)
    assert m.stats.dropped_by_reason == {"missing_field": 1}
    out2 = storage.validate_uri(str(tmp_path / "out2"))
    m2 = run_all(build_step("ingest", {"source_name": "s"}), [str(raw)], out2)
    assert m2.stats.records_kept == 1 and m2.stats.dropped_by_reason == {"unknown_format": 1}
    dropped = read_step_table(out2, "dropped").to_pylist()
    assert json.loads(dropped[0]["raw"]) == {"prompt": "x", "completion": "y"}  # nothing lost
    assert dropped[0]["file"].endswith("weird.jsonl") and dropped[0]["line"] == 1


def test_every_quarantine_reason_through_the_step(tmp_path: Path) -> None:
    raw = tmp_path / "bad.jsonl"
    lines = [
        json.dumps(sharegpt(EN_Q, EN_A)).encode(),  # good: decides the file's format
        b'{"conversations": [',  # bad_json
        b'["a list"]',  # not_an_object
        b'{"conversations": [{"from": "human", "value": "\xff\xfe"}]}',  # invalid_utf8
        json.dumps(sharegpt("x" * 5000, "y")).encode(),  # oversize_record (max 2048 below)
        b'{"messages": []}',  # missing_field for a ShareGPT file
        b'{"conversations": "nope"}',  # bad_field_type
        json.dumps({"conversations": [{"from": "wizard", "value": "hi"}]}).encode(),  # unknown_role
        json.dumps(sharegpt("  ", EN_A)).encode(),  # empty_turn
        json.dumps({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}).encode(),
        json.dumps({"conversations": [{"from": "system", "value": "only a system turn"}]}).encode(),  # no_exchange
    ]
    raw.write_bytes(b"\n".join(lines) + b"\n")
    out = storage.validate_uri(str(tmp_path / "out"))
    m = run_all(build_step("ingest", {"source_name": "s", "max_record_bytes": 2048}), [str(raw)], out)
    assert m.stats.dropped_by_reason == {
        "bad_json": 1, "bad_field_type": 1, "broken_role_order": 1, "empty_turn": 1, "invalid_utf8": 1,
        "missing_field": 1, "no_exchange": 1, "not_an_object": 1, "oversize_record": 1, "unknown_role": 1,
    }
    assert m.stats.records_kept == 1
    dropped = read_step_table(out, "dropped")
    assert dropped.num_rows == len(lines) - 1
    assert sorted(dropped["line"].to_pylist()) == list(range(2, len(lines) + 1))
    assert all(d for d in dropped["detail"].to_pylist())


raw_text = st.one_of(
    st.text(max_size=200),
    st.builds(json.dumps, st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                       lambda c: st.lists(c, max_size=4) | st.dictionaries(
                                           st.sampled_from(["conversations", "from", "value", "messages", "role",
                                                            "content", "instruction", "output", "x"]), c, max_size=4),
                                       max_leaves=12)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(raw_text, st.sampled_from(["sharegpt", "openai", "alpaca", "infinity", ""])),
                min_size=1, max_size=30))
def test_transform_never_crashes_and_keeps_the_ledger(rows: list[tuple[str, str]]) -> None:
    batch = pa.record_batch([
        pa.array([r for r, _ in rows], pa.string()), pa.array(range(len(rows)), pa.int64()),
        pa.nulls(len(rows), pa.string()), pa.array(["f"] * len(rows), pa.string()),
        pa.array([f for _, f in rows], pa.string())], schema=RAW_BATCH_SCHEMA)
    res = normalize_batch(batch, IngestConfig(source_name="fuzz"))
    assert res.kept.num_rows + res.dropped.num_rows == len(rows)
    assert all(res.dropped["reason"].to_pylist())
    # Nothing lost: every dropped row keeps its raw text, unchanged, and its line.
    assert sorted(res.dropped["line"].to_pylist() + res.kept["origin"].combine_chunks().field("line").to_pylist()) == (
        list(range(len(rows))))
    for line, raw in zip(res.dropped["line"].to_pylist(), res.dropped["raw"].to_pylist(), strict=True):
        assert raw == rows[line][0], line


def test_cli_rejects_bad_config_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps(sharegpt(EN_Q, EN_A)) + "\n")
    r = run_cli("run", "ingest", "--config", '{"source_name": "bad name!", "max_record_bytes": 3}',
                "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "source_name" in r.stderr and "max_record_bytes" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing was written
    r = run_cli("run", "ingest", "--config", '{"source_name": "ok", "colour": "red"}', "--input",
                str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and "colour" in r.stderr
    r = run_cli("run", "nosuchstep", "--input", "x", "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown step" in r.stderr
    r = run_cli("run", "ingest", "--config", '{"source_name": "ok"}', "--input", str(tmp_path / "missing"),
                "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_cli("run", "ingest", "--config", '{"source_name": "ok"}', "--input", "/etc/../etc/passwd",
                "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and ".." in r.stderr


def _big_corpus(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps(sharegpt(f"{EN_Q} variant {i} " + "lorem ipsum " * (i % 7), f"{EN_A} #{i}")) + "\n")
            if i % 997 == 0:
                f.write('{"conversations": [{"from": "human", "value": ""}]}\n')


def _canonical(step_dir: str) -> list[dict[str, Any]]:
    rows = read_step_table(step_dir).to_pylist()
    return sorted(rows, key=lambda r: (r["origin"]["line"], r["id"]))


def test_kill_9_mid_step_then_rerun_equals_uninterrupted_run(tmp_path: Path) -> None:
    """Three files, one shard each, run in one process: killed after the first shard committed and while the
    second was writing parts. The re-run keeps the committed shard as it is, redoes the rest, and equals an
    uninterrupted run."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("a", "b", "c"):
        _big_corpus(raw / f"{name}.jsonl", 12_000)
    cfg = json.dumps({"source_name": "k9", "max_part_rows": 1000, "batch_rows": 1000, "target_shard_bytes": 1})
    killed = storage.validate_uri(str(tmp_path / "killed"))
    shard0 = tmp_path / "killed" / "_shards" / "00000.json"
    proc = subprocess.Popen([sys.executable, "-m", "operators", "run", "ingest", "--config", cfg, "--input",
                             str(raw), "--output", killed], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if shard0.exists() and list((tmp_path / "killed").glob("part-00001-*.parquet")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the step finished before it could be killed; make the corpus bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = read_manifest(shard_manifest_uri(killed, 0))
    assert committed is not None  # the kill landed after the first shard's commit ...
    assert read_manifest(shard_manifest_uri(killed, 1)) is None  # ... and before the second's
    assert read_manifest(step_manifest_uri(killed)) is None
    assert list((tmp_path / "killed").glob("part-00001-*.parquet"))  # shard 1's uncommitted parts are there

    r = run_cli("run", "ingest", "--config", cfg, "--input", str(raw), "--output", killed)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "shard 0: already committed" in r.stderr
    assert "shard 1: removed" in r.stderr and "of other, uncommitted attempts" in r.stderr  # swept after its commit
    again = read_manifest(shard_manifest_uri(killed, 0))
    assert again is not None and again.attempt == committed.attempt  # kept, not redone
    clean = storage.validate_uri(str(tmp_path / "clean"))
    r2 = run_cli("run", "ingest", "--config", cfg, "--input", str(raw), "--output", clean)
    assert r2.returncode == 0, r2.stderr[-2000:]
    a, b = read_manifest(step_manifest_uri(killed)), read_manifest(step_manifest_uri(clean))
    assert a is not None and b is not None and a.stats.shards == b.stats.shards == 3
    assert (a.stats.records_in, a.stats.records_kept, a.stats.dropped_by_reason) == (
        b.stats.records_in, b.stats.records_kept, b.stats.dropped_by_reason)
    assert _canonical(killed) == _canonical(clean)
    # Only the committed attempts' files remain on disk.
    on_disk = {p.relative_to(tmp_path / "killed").as_posix() for p in (tmp_path / "killed").rglob("part-*.parquet")}
    assert on_disk == {f.path for f in a.files}


def test_zst_and_bz2_inputs_read_like_plain_files(tmp_path: Path) -> None:
    """Zstandard and bzip2 containers (JSONL and a JSON array) give the same records as the plain files."""
    import bz2

    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    packed.mkdir()
    lines = "".join(json.dumps(sharegpt(f"{EN_Q} ({i})", f"{EN_A} {i}")) + "\n" for i in range(300))
    lines += '{"conversations": [\n'  # a torn last record: quarantined as bad_json in both
    array = json.dumps([sharegpt(f"{ZH_Q} {i}", ZH_A) for i in range(40)], ensure_ascii=False)
    (plain / "a.jsonl").write_text(lines)
    (plain / "b.json").write_text(array)
    with pa.CompressedOutputStream(str(packed / "a.jsonl.zst"), "zstd") as f:
        f.write(lines.encode())
    (packed / "b.json.bz2").write_bytes(bz2.compress(array.encode()))
    assert (packed / "a.jsonl.zst").read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # really a zstd frame
    results = []
    for folder in (plain, packed):
        out = storage.validate_uri(str(tmp_path / f"out-{folder.name}"))
        m = run_all(build_step("ingest", {"source_name": "z"}), [str(folder)], out)
        assert m.stats.records_in == 341 and m.stats.records_kept == 340
        assert m.stats.dropped_by_reason == {"bad_json": 1}
        rows = read_step_table(out).to_pylist()
        results.append(sorted((r["id"], r["conversations"][0]["value"], r["origin"]["line"], r["langdetect"])
                              for r in rows))
    assert results[0] == results[1]


@pytest.mark.integration
def test_ingest_reads_and_writes_s3(s3_bucket: str, tmp_path: Path) -> None:
    import boto3

    write_corpus(tmp_path / "raw")
    client = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"], region_name="us-east-1")
    bucket = s3_bucket.removeprefix("s3://")
    for p in (tmp_path / "raw").iterdir():
        client.upload_file(str(p), bucket, f"raw/{p.name}")
    r = run_cli("run", "ingest", "--config", '{"source_name": "s3src"}', "--input", f"{s3_bucket}/raw",
                "--output", f"{s3_bucket}/sources/s3src/ingest")
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_manifest(step_manifest_uri(f"{s3_bucket}/sources/s3src/ingest"))
    assert m is not None and m.stats.records_kept == 8 and m.stats.records_in == 8
    assert len(read_step_table(f"{s3_bucket}/sources/s3src/ingest")) == 8


def test_deep_nesting_and_control_characters(tmp_path: Path) -> None:
    raw = tmp_path / "odd.jsonl"
    good = json.dumps(sharegpt(EN_Q, EN_A))
    ctrl = '{"conversations": [{"from": "human", "value": "tab\there"}, {"from": "gpt", "value": "ok"}]}'
    raw.write_text(good + "\n" + "[" * 100_000 + "\n" + ctrl + "\n")
    out = storage.validate_uri(str(tmp_path / "out"))
    m = run_all(build_step("ingest", {"source_name": "odd"}), [str(raw)], out)
    assert m.stats.records_kept == 2  # a raw tab inside a string is accepted, as in JSON arrays
    assert m.stats.dropped_by_reason == {"bad_json": 1}
