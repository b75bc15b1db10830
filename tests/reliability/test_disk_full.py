"""Disk full: the data root on a small filesystem of its own, filled while a step writes.

The filesystem is a tmpfs the test mounts (with a size) over a folder of its own, so nothing outside it is
touched; mounting needs root, which `make test` has. The step fails with a clear "no space left" error naming
the path, commits nothing partial and leaves no part file of its attempt behind; every committed step still
verifies; once space is freed, the retry completes, equal to a run that never lacked space. The same for an
LLM step whose result cache cannot be written, and for a training checkpoint's upload to the train folder.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from operators.core import storage
from operators.core.manifest import read_manifest, shard_manifest_uri, step_manifest_uri
from operators.core.runner import read_step_table
from operators.core.verify import verify_step
from operators.steps.synth.base import CACHE_DIR
from tests.conftest import require_or_skip, run_cli, three_domain_conversations

KEEP_FREE = 16 << 10  # what a step gets to write before its disk is full


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(disk)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        require_or_skip("tmpfs", f"cannot mount a tmpfs for the disk-full tests (needs root): {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves about `leave` bytes free on `disk`; delete it to free the space."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def leftovers(step_dir: Path) -> list[str]:
    """Part files and temp files under a step folder: what an attempt that failed could have left."""
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
                  if p.is_file() and (p.name.startswith("part-") or ".tmp-" in p.name))


def assert_clear_failure(r: subprocess.CompletedProcess[str], under: Path) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])  # retryable, not "invalid input" (2)
    line = next((x for x in r.stderr.splitlines() if "no space left on device writing" in x), None)
    assert line is not None and str(under) in line, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_a_step_that_fills_the_disk_fails_clearly_commits_nothing_and_its_retry_completes(
        small_disk: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text("\n".join(three_domain_conversations(900, "a")) + "\n")
    ingest = small_disk / "ingest"
    r = run_cli("run", "ingest", "--config", '{"source_name": "s", "max_part_rows": 100}',
                "--input", str(raw), "--output", str(ingest))
    assert r.returncode == 0, r.stderr[-3000:]

    # filter writes parts of 50 records; 16 KB into its shard, the disk is full. (`run` with inputs plans,
    # runs every shard and reduces in one process: the task sequence in one.)
    cfg = json.dumps({"languages": [], "max_part_rows": 50})
    out = small_disk / "filter"
    filler = fill(small_disk, KEEP_FREE)
    r = run_cli("run", "filter", "--config", cfg, "--input", str(ingest), "--output", str(out))
    assert_clear_failure(r, out)
    assert "removed this attempt's" in r.stderr
    # Nothing partial: no shard or step commit, no part or temp file of the attempt, and the committed
    # upstream step still verifies.
    assert read_manifest(shard_manifest_uri(storage.validate_uri(str(out)), 0)) is None
    assert read_manifest(step_manifest_uri(storage.validate_uri(str(out)))) is None
    assert leftovers(out) == []
    assert verify_step(storage.validate_uri(str(ingest))).problems == []

    # Space freed: the retry (the same task again) completes, equal to a run that had the space.
    filler.unlink()
    r = run_cli("run", "filter", "--config", cfg, "--input", str(ingest), "--output", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    clean = tmp_path / "clean-filter"
    assert run_cli("run", "filter", "--config", cfg, "--input", str(ingest), "--output", str(clean)).returncode == 0
    for d in (out, clean):
        assert verify_step(storage.validate_uri(str(d))).problems == []
    got, want = (read_step_table(storage.validate_uri(str(d))) for d in (out, clean))
    assert got.num_rows == want.num_rows > 0 and got.column("id").to_pylist() == want.column("id").to_pylist()
    stats = [json.loads((d / "stats.json").read_text()) for d in (out, clean)]
    assert [(s["records_in"], s["records_kept"], s["dropped_by_reason"]) for s in stats] == \
        [(900, want.num_rows, stats[1]["dropped_by_reason"])] * 2


def test_an_llm_step_whose_cache_cannot_be_written_fails_clearly_and_its_retry_completes(
        small_disk: Path, tmp_path: Path) -> None:
    """The result cache is written after each batch of paid LLM calls; on a full disk that write fails the
    task clearly, and the retry, with space, produces what a run with space produces."""
    from bench.crash_anywhere import write_foundational

    # Two records, short answers: each CLI process loads the model, and three of them run here.
    corpus = write_foundational(tmp_path / "pool", 2, seed=1).parent
    cfg = json.dumps({"llm": {"batch_size": 1}, "max_tokens": 4, "batch_rows": 1, "max_part_rows": 1})
    out = small_disk / "label"
    filler = fill(small_disk, 4 << 10)  # the plan fits; the first cache segment does not
    r = run_cli("run", "label", "--config", cfg, "--input", str(corpus), "--output", str(out))
    assert_clear_failure(r, out / CACHE_DIR)
    assert read_manifest(shard_manifest_uri(storage.validate_uri(str(out)), 0)) is None
    assert leftovers(out) == []

    filler.unlink()
    assert run_cli("run", "label", "--config", cfg, "--input", str(corpus), "--output", str(out)).returncode == 0
    clean = tmp_path / "clean-label"
    assert run_cli("run", "label", "--config", cfg, "--input", str(corpus), "--output", str(clean)).returncode == 0
    got, want = (read_step_table(storage.validate_uri(str(d))) for d in (out, clean))
    assert got.num_rows == want.num_rows == 2
    assert got.select(["id", "label"]).to_pylist() == want.select(["id", "label"]).to_pylist()


def test_a_checkpoint_upload_that_fills_the_disk_fails_clearly_and_is_never_resumed_from(
        small_disk: Path, tmp_path: Path) -> None:
    """A rank uploads its checkpoint files to the train folder, then marks the checkpoint complete. On a full
    disk the upload fails clearly, no marker is written, the partial file is removed, and resume does not take
    that checkpoint (it is discarded as incomplete); with space, the same publish completes."""
    from operators.train import remote

    local = tmp_path / "scratch" / "checkpoint-2"  # what the Trainer saved on the rank's scratch disk
    (local / "global_step2").mkdir(parents=True)
    (local / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(256 << 10))
    (local / "trainer_state.json").write_text('{"global_step": 2}')
    ckpts = storage.validate_uri(str(small_disk / "ft" / "checkpoints"))
    dest = storage.join(ckpts, "checkpoint-2")

    filler = fill(small_disk, KEEP_FREE)
    with pytest.raises(storage.StorageFull, match=r"no space left on device writing .*checkpoint-2") as full:
        remote.publish(local, dest)
    assert str(small_disk) in str(full.value)
    assert remote.read_marker(dest) is None
    assert list((small_disk / "ft").rglob("*.pt")) == []  # the partial upload is gone
    assert remote.checkpoint_steps(ckpts) in ({}, {2: False})  # resume skips it ...
    assert remote.discard_incomplete(ckpts) in ([], [2])  # ... and deletes what is left of it

    filler.unlink()
    files = remote.publish(local, dest)
    assert remote.checkpoint_steps(ckpts) == {2: True}
    assert remote.read_marker(dest)["files"] == files == remote.checksum(local, files)
