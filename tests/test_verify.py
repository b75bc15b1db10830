"""`verify_step` / `python -m operators verify`: a committed step folder is checked as a careful reader would."""

from __future__ import annotations

import json
from pathlib import Path

from operators.core import storage
from operators.core.runner import make_plan, run_all
from operators.core.verify import verify_step
from tests.conftest import run_cli
from tests.test_runner import KeepMultiples, ModConfig, write_inputs


def _committed(tmp_path: Path) -> tuple[str, Path]:
    src = write_inputs(tmp_path, files=3, rows=200)
    out = tmp_path / "out"
    run_all(KeepMultiples(ModConfig(target_shard_bytes=1, max_part_rows=40)), [src], storage.validate_uri(str(out)))
    return storage.validate_uri(str(out)), out


def test_a_sound_step_then_each_kind_of_damage(tmp_path: Path) -> None:
    uri, out = _committed(tmp_path)
    ok = verify_step(uri)
    assert ok.problems == [] and ok.files_checked == len(list(out.rglob("part-*"))) >= 6
    # A writer's temp file in flight is counted, not a problem: no reader lists it.
    (out / "part-00000-00009-cafe.parquet.tmp-1234abcd").write_bytes(b"in flight")
    assert verify_step(uri).problems == [] and verify_step(uri).temp_files == 1
    # A stray part (a crashed attempt's) is one: a folder reader would pick it up.
    (out / "part-00001-00000-deadbeef.parquet").write_bytes(b"stray")
    stray = verify_step(uri).problems
    assert any("outside every committed manifest" in p for p in stray) and any("folder reader" in p for p in stray)
    (out / "part-00001-00000-deadbeef.parquet").unlink()
    # Same size, other bytes: only the checksum sees it.
    victim = sorted(out.glob("part-*.parquet"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert verify_step(uri, checksums=False).problems == []
    assert verify_step(uri).problems == [f"listed file has the wrong checksum: {victim.name}"]
    victim.unlink()
    assert f"listed file missing: {victim.name}" in verify_step(uri, checksums=False).problems


def test_the_reduce_sweeps_temp_files_that_killed_writers_left(tmp_path: Path) -> None:
    import os
    import time

    from operators.core.runner import TEMP_MAX_AGE_S, reduce_step

    uri, out = _committed(tmp_path)
    old, young = out / "part-00000-00000-dead.parquet.tmp-0badf00d", out / "_shards" / "00001.json.tmp-1234abcd"
    for p in (old, young):
        p.write_bytes(b"x")
    long_ago = time.time() - TEMP_MAX_AGE_S - 60
    os.utime(old, (long_ago, long_ago))
    assert verify_step(uri).temp_files == 2
    (out / "_MANIFEST.json").unlink()  # the step's reduce runs again (as a re-run after a crash would)
    reduce_step("keep_multiples", uri)
    assert not old.exists() and young.exists()  # a young one may be a live writer's
    assert verify_step(uri).temp_files == 1 and verify_step(uri).problems == []


def test_cli_exit_codes_and_json(tmp_path: Path) -> None:
    uri, _ = _committed(tmp_path)
    empty = storage.validate_uri(str(tmp_path / "nothing"))
    (tmp_path / "x").mkdir()
    make_plan(KeepMultiples(ModConfig()), [write_inputs(tmp_path / "x", files=1, rows=5)], empty)
    r = run_cli("verify", uri)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True, r.stderr
    r = run_cli("verify", uri, empty, "--no-checksums")
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 1 and [c["ok"] for c in lines] == [True, False]
    assert lines[1]["problems"] == ["no committed step manifest"]


def test_verify_chain_checks_the_ledger_between_steps(tmp_path: Path) -> None:
    from operators.core.verify import verify_chain

    first, out = _committed(tmp_path)
    second = storage.validate_uri(str(tmp_path / "second"))
    run_all(KeepMultiples(ModConfig(target_shard_bytes=1)), [first], second)
    checks, chain = verify_chain([first, second])
    assert [c.problems for c in checks] == [[], []] and chain == []
    stats = json.loads((tmp_path / "second" / "stats.json").read_text())
    assert stats["records_in"] == json.loads((out / "stats.json").read_text())["records_kept"] == 300
    stats["records_in"] += 1  # a step that read a record the one before did not keep (and broke its ledger)
    (tmp_path / "second" / "stats.json").write_text(json.dumps(stats))
    _, chain = verify_chain([first, second])
    assert len(chain) == 2 and "in 301 != kept" in chain[0] and "read 301 records" in chain[1]
