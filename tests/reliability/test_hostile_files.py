"""Hostile files: bad records by the ten thousand, hostile containers, a 100 MB line and decompression bombs.

Ingest runs as a child process (the CLI, as a pod runs it) so that its peak RSS is measured on its own. The
invariants: the run never crashes, every record of every file comes out kept or quarantined (the ledger
holds and the counts per file match what was written), every quarantined row has a reason, and memory
stays bounded whatever the size of a line or the expansion of a compressed file.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench._common import ChildResult, run_child
from operators.core.step import REASON, ShardSpec
from operators.steps.ingest.readers import CONTAINER_REASONS, ContainerError, check_parquet_expansion
from operators.steps.ingest.step import IngestConfig, IngestStep
from tests.reliability.hostile import write_json_array, write_jsonl, write_parquet

PER_FORMAT = 10_000
N_LINES = 10_000
MIB = 1 << 20


def _ingest(inp: Path, out: Path) -> tuple[ChildResult, dict[str, Any]]:
    """Run ingest over `inp` as a child process; its result and stats."""
    cmd = [sys.executable, "-m", "operators", "run", "ingest", "--config", json.dumps({"source_name": "hostile"}),
           "--input", str(inp), "--output", str(out)]
    r = run_child(cmd, env={**os.environ, "IIP_LOG_LEVEL": "WARNING"}).check("ingest")
    return r, json.loads((out / "stats.json").read_text())


def _per_file(out: Path) -> tuple[Counter[str], Counter[str], list[str | None]]:
    """Kept records per input file, quarantined rows per input file, and the reason of every quarantined row."""
    kept: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    reasons: list[str | None] = []
    for p in sorted(out.glob("part-*.parquet")):
        kept.update(Path(o["file"]).name for o in pq.read_table(p, columns=["origin"]).column("origin").to_pylist())
    for p in sorted((out / "dropped").glob("part-*.parquet")):
        t = pq.read_table(p, columns=["file", REASON])
        dropped.update(Path(f).name for f in t.column("file").to_pylist())
        reasons += t.column(REASON).to_pylist()
    return kept, dropped, reasons


def _ledger(stats: dict[str, Any]) -> None:
    assert stats["records_in"] == stats["records_kept"] + sum(stats["dropped_by_reason"].values())


def test_ten_thousand_hostile_records_per_format_are_all_accounted_for(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    expected = {
        "bad.jsonl": write_jsonl(inp / "bad.jsonl", PER_FORMAT, seed=1),
        "bad.json": write_json_array(inp / "bad.json", PER_FORMAT, seed=2),
        "bad.parquet": write_parquet(inp / "bad.parquet", PER_FORMAT, seed=3),
    }
    r, stats = _ingest(inp, tmp_path / "out")
    _ledger(stats)
    assert stats["records_in"] == sum(expected.values())
    kept, dropped, reasons = _per_file(tmp_path / "out")
    for name, n in expected.items():  # no record of any file is lost
        assert kept[name] + dropped[name] == n, name
    assert len(reasons) == sum(stats["dropped_by_reason"].values()) and all(reasons)
    # The generators mix valid records in: some survive, and many distinct reasons are exercised.
    assert stats["records_kept"] > 0 and len(stats["dropped_by_reason"]) >= 8
    print(f"hostile records: {sum(expected.values())} in, {stats['records_kept']} kept, "
          f"{stats['dropped_by_reason']}; peak RSS {r.peak_rss_mb} MiB")


def _compressed(path: Path, codec: str, data: bytes) -> None:
    with pa.CompressedOutputStream(str(path), codec) as f:
        f.write(data)


def test_hostile_containers_are_quarantined_with_a_reason(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    rng = random.Random(5)  # random text: a stream of ~1 MB, so the decompressors hand out data before the cut
    lines = b"".join(json.dumps({"instruction": f"q{i}", "output": rng.randbytes(40).hex()}).encode() + b"\n"
                     for i in range(N_LINES))
    for codec, ext in (("gzip", "gz"), ("zstd", "zst")):
        _compressed(tmp_path / f"full.{ext}", codec, lines)
        whole = (tmp_path / f"full.{ext}").read_bytes()
        (inp / f"truncated.jsonl.{ext}").write_bytes(whole[: len(whole) * 3 // 5])
    pq.write_table(pa.table({"x": [1, 2, 3]}), tmp_path / "ok.parquet")
    good = (tmp_path / "ok.parquet").read_bytes()
    (inp / "corrupt_footer.parquet").write_bytes(good[:-12] + b"\xff" * 8 + b"PAR1")
    pq.write_table(pa.table({"a": list(range(100)), "b": ["x"] * 100}), inp / "wrong_schema.parquet")
    (tmp_path / "outside.jsonl").write_bytes(lines[:500])
    os.symlink(tmp_path / "outside.jsonl", inp / "link.jsonl")
    os.symlink(inp, inp / "loop")  # a listing that followed links would never end
    _, stats = _ingest(inp, tmp_path / "out")
    _ledger(stats)
    kept, dropped, reasons = _per_file(tmp_path / "out")
    assert all(reasons)
    by_file = _reasons_by_file(tmp_path / "out")
    for ext in ("gz", "zst"):  # what was read before the cut is kept; the cut itself is on the ledger
        name = f"truncated.jsonl.{ext}"
        assert 0 < kept[name] < N_LINES and by_file[name] == {"truncated_stream"}, (name, kept[name], by_file[name])
    assert by_file["corrupt_footer.parquet"] == {"corrupt_container"} and kept["corrupt_footer.parquet"] == 0
    assert by_file["wrong_schema.parquet"] == {"unknown_format"} and dropped["wrong_schema.parquet"] == 100
    assert by_file["link.jsonl"] == {"refused_symlink"} and kept["link.jsonl"] == 0
    assert not any("loop" in f for f in kept)


def _reasons_by_file(out: Path) -> dict[str, set[str]]:
    by: dict[str, set[str]] = {}
    for p in sorted((out / "dropped").glob("part-*.parquet")):
        t = pq.read_table(p, columns=["file", REASON])
        for f, r in zip(t.column("file").to_pylist(), t.column(REASON).to_pylist(), strict=True):
            by.setdefault(Path(f).name, set()).add(r)
    return by


def test_dotdot_in_an_input_name_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    cmd = [sys.executable, "-m", "operators", "run", "ingest", "--config", '{"source_name": "x"}',
           "--input", f"{tmp_path}/in/../in", "--output", str(tmp_path / "out")]
    r = run_child(cmd)
    assert r.returncode == 2 and "'..'" in r.stderr


def _gzip_bomb(path: Path, expanded: int) -> None:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip container
    chunk = b"a" * MIB
    with path.open("wb") as f:
        for _ in range(expanded // MIB):
            f.write(comp.compress(chunk))
        f.write(comp.flush())


def test_100mb_line_and_decompression_bombs_run_in_bounded_memory(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    rec = json.dumps({"instruction": "q", "output": "a"}).encode()
    (small / "s.jsonl").write_bytes(rec + b"\n")
    base, _ = _ingest(small, tmp_path / "out_small")

    big = tmp_path / "big"
    big.mkdir()
    with (big / "line.jsonl").open("wb") as f:
        f.write(rec + b"\n" + b'{"instruction": "')
        for _ in range(100):
            f.write(b"x" * MIB)
        f.write(b'", "output": "a"}\n' + rec.replace(b'"q"', b'"q2"') + b"\n")
    _gzip_bomb(big / "bomb.jsonl.gz", 1 << 30)  # 1 GiB of 'a' in about 1 MB
    with pa.CompressedOutputStream(str(big / "bomb.jsonl.zst"), "zstd") as f:
        for _ in range(1024):
            f.write(b"b" * MIB)
    stored = {p.name: p.stat().st_size for p in big.iterdir()}
    r, stats = _ingest(big, tmp_path / "out_big")
    _ledger(stats)
    by_file = _reasons_by_file(tmp_path / "out_big")
    assert by_file == {"line.jsonl": {"oversize_record"}, "bomb.jsonl.gz": {"decompression_bomb"},
                       "bomb.jsonl.zst": {"decompression_bomb"}}
    assert stats["records_kept"] == 2  # the records around the 100 MB line
    # Holding the 100 MB line, or inflating a bomb, even once would add >= 100 MiB over a one-record run.
    assert r.peak_rss_mb < base.peak_rss_mb + 64, (r.peak_rss_mb, base.peak_rss_mb)
    print(f"100 MB line + bombs {stored}: peak RSS {r.peak_rss_mb} MiB vs {base.peak_rss_mb} MiB for one record, "
          f"{r.seconds:.1f}s")


def test_parquet_row_groups_that_claim_a_huge_expansion_are_refused_before_reading() -> None:
    check_parquet_expansion(10 << 20, 1 << 20)  # 10x: an ordinary file
    try:
        check_parquet_expansion(100 << 30, 1 << 20)
    except ContainerError as e:
        assert e.reason in CONTAINER_REASONS and e.reason == "decompression_bomb"
    else:
        raise AssertionError("a 100 GiB expansion of a 1 MiB file was accepted")


def _read_all(path: Path) -> tuple[int, int, list[str]]:
    """records in, records out (kept + quarantined), reasons, running ingest's read + transform in process."""
    step = IngestStep(IngestConfig(source_name="h"))
    n_in = n_out = 0
    reasons: list[str] = []
    for batch in step.read(ShardSpec(index=0, uris=[f"file://{path}"], bytes=path.stat().st_size)):
        res = step.transform(batch)
        n_in += batch.num_rows
        n_out += res.kept.num_rows + res.dropped.num_rows
        reasons += res.dropped.column(REASON).to_pylist()
    return n_in, n_out, reasons


_line = st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" "))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_line, max_size=30), seed=st.integers(0, 2**32))
def test_any_bytes_in_jsonl_never_crash_and_never_lose_a_record(tmp_path: Path, lines: list[bytes],
                                                                 seed: int) -> None:
    # Hypothesis' arbitrary bytes, with seeded hostile lines mixed in.
    rng = random.Random(seed)
    from tests.reliability.hostile import hostile_line

    lines = lines + [hostile_line(rng, i) for i in range(5)]
    rng.shuffle(lines)
    lines.insert(0, b'{"x": 1}')  # a file whose first byte is "[" is a JSON array, not JSON Lines (by design)
    path = tmp_path / f"h{seed}.jsonl"
    path.write_bytes(b"\n".join(lines))
    n_in, n_out, reasons = _read_all(path)
    assert n_in == n_out and all(reasons)
    assert n_in == sum(1 for ln in lines if (p := ln.removesuffix(b"\r")) and not p.isspace())


_json = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(
                         ["conversations", "from", "value", "messages", "role", "content", "instruction", "output",
                          "id", "x"]) | st.text(max_size=5), c, max_size=4), max_leaves=20)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(_json, max_size=20), gz=st.booleans())
def test_any_json_values_in_an_array_never_crash_and_never_lose_a_record(tmp_path: Path, values: list[Any],
                                                                         gz: bool) -> None:
    data = json.dumps(values, allow_nan=True).encode()
    path = tmp_path / ("a.json.gz" if gz else "a.json")
    path.write_bytes(gzip.compress(data) if gz else data)
    n_in, n_out, reasons = _read_all(path)
    assert n_in == n_out == len(values) and all(reasons)


def test_a_skipped_array_element_is_quarantined_as_itself_not_with_the_elements_after_it(tmp_path: Path) -> None:
    # Elements too big to decode (an integer past Python's digit limit) are stepped over undecoded; their
    # quarantined text once ran on for 64 KiB into the next elements, so memory grew with the file.
    elements = [b'{"reward": ' + b"9" * 5000 + b', "instruction": "a", "output": "b%d"}' % i for i in range(40)]
    path = tmp_path / "ints.json"
    path.write_bytes(b"[" + b", ".join(elements) + b"]")
    step = IngestStep(IngestConfig(source_name="h"))
    raws = [r for b in step.read(ShardSpec(index=0, uris=[f"file://{path}"], bytes=path.stat().st_size))
            for r in step.transform(b).dropped.column("raw").to_pylist()]
    assert [r.encode() for r in raws] == elements
