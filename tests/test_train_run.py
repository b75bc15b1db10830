"""Real DeepSpeed ZeRO-3 training on CPU with the real SmolLM2-135M: SIGKILL + resume equals an
uninterrupted run, two processes over gloo equal one process with the same global batch, checkpoints and
the model on S3 (moto's server on loopback), a crash mid-save discarded.

Every run here is the one-stage mode (both prepared sets mixed) for 2 optimizer steps with a global batch
of 2 windows and a checkpoint after each step. One uninterrupted single-process run (2 micro-batches of
accumulation) is the reference the others must reproduce:
- the same run killed after its checkpoint and resumed (local output): the losses of the resumed steps and
  the final weights equal the reference's;
- 2 processes (1 window each), output on S3, rank 1 killed after a checkpoint upload, re-run on a fresh
  scratch disk: same step count, same losses and final weights as the reference, within a tolerance (the
  gradient of 2 windows is summed over gloo instead of accumulated in one process: the float sums differ
  in order only).
Kept small for a 2-core machine: 128-token windows and only the last two decoder blocks trainable
(`train_layers`); the DeepSpeed / Trainer / checkpoint code paths are the full ones. torch runs one thread
per process (SERIAL_ENV: see test_train_prep).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port, run_cli
from tests.test_train_prep import SERIAL_ENV, prepare

STAGE = {"learning_rate": 5e-4, "warmup_steps": 0, "max_seq_len": 128, "bf16": False, "gradient_checkpointing": False,
         "train_layers": 2, "lr_scheduler": "constant_with_warmup", "max_steps": 2, "save_steps": 1,
         "global_batch_size": 2}
# Weights of two runs that must agree: an optimizer step moves a trained weight by up to ~lr (5e-4, Adam),
# so 2e-5 is far below one step's effect; float summation order alone stays below 1e-6 here.
WEIGHT_TOL = 2e-5
LOSS_TOL = 1e-4


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    tmp = tmp_path_factory.mktemp("sets")
    return prepare(tmp, "f", 12), prepare(tmp, "c", 8)


def _config(sets: tuple[str, str], **stage: Any) -> str:
    s = {**STAGE, **stage}
    return json.dumps({"foundational": sets[0], "conversational": sets[1], "mode": "one_stage", "stage1": s,
                       "stage2": s})


def _train_cmd(config: str, output: str, nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "operators"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
         str(free_port()), "-m", "operators"]
    return [*launcher, "train", "--stage", "one_stage", "--config", config, "--output", output]


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                       env={**os.environ, **SERIAL_ENV, **(env or {})})
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


def _kill_after(cmd: list[str], ready: Callable[[], bool], victim: Callable[[int], int], env: dict[str, str]) -> int:
    """Start `cmd`, wait until `ready()`, SIGKILL the process `victim(pid)` names; returns the exit code."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **SERIAL_ENV, **env})
    try:
        deadline = time.time() + 300
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert ready(), "no complete checkpoint appeared"
        os.kill(victim(proc.pid), signal.SIGKILL)  # a real crash: no cleanup, no final save
    finally:
        rc = proc.wait(timeout=120)
    return rc


def _rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=`rank` (a child of the launcher)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no rank {rank} worker under {launcher_pid}")


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_model(folder: Path, reference: Path) -> None:
    """Every tensor equal to the reference's within WEIGHT_TOL, and the trained ones really moved."""
    got, ref = _weights(folder), _weights(reference)
    assert got.keys() == ref.keys()
    worst = max(float((got[k].float() - ref[k].float()).abs().max()) for k in ref)
    assert worst <= WEIGHT_TOL, f"weights differ from the uninterrupted run by up to {worst:.3g}"


def _assert_same_losses(result: dict[str, Any], reference: dict[str, Any]) -> None:
    assert [x["step"] for x in result["losses"]] == [x["step"] for x in reference["losses"]] == [1, 2]
    for got, ref in zip(result["losses"], reference["losses"], strict=True):
        assert abs(got["loss"] - ref["loss"]) <= LOSS_TOL * max(1.0, abs(ref["loss"])), (result["losses"],
                                                                                         reference["losses"])


@pytest.fixture(scope="module")
def reference(sets: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The uninterrupted single-process run (2 windows accumulated per step): its result and model folder."""
    out = tmp_path_factory.mktemp("reference") / "ft"
    _run(_train_cmd(_config(sets, world_size=1), str(out)))
    result = json.loads((out / "one_stage" / "train_result.json").read_text())
    assert result["global_step"] == 2 and result["gradient_accumulation_steps"] == 2
    assert set(result["rows_per_set"]) == {"foundational", "conversational"}  # the mix, trained once
    base = _weights(Path(_base_model()))
    trained = _weights(out / "one_stage" / "model")
    moved = max(float((trained[k].float() - base[k].float()).abs().max()) for k in base)
    assert moved > 50 * WEIGHT_TOL  # training moved weights far more than the tolerance the tests allow
    return result, out / "one_stage" / "model"


def _base_model() -> str:
    from operators.llm.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


def test_sigkill_then_resume_equals_an_uninterrupted_run(sets: tuple[str, str], tmp_path: Path,
                                                         reference: tuple[dict[str, Any], Path]) -> None:
    ref_result, ref_model = reference
    config = _config(sets, world_size=1)
    out = tmp_path / "ft"
    ckpts = out / "one_stage" / "checkpoints"
    rc = _kill_after(_train_cmd(config, str(out)), (ckpts / "checkpoint-1" / "_COMPLETE").exists, lambda pid: pid, {})
    assert rc == -signal.SIGKILL
    assert not (out / "one_stage" / "_DONE.json").exists() and not (out / "one_stage" / "model").exists()
    # What a crash in the middle of the next save leaves: some of the checkpoint's files, no marker.
    shutil.rmtree(ckpts / "checkpoint-2", ignore_errors=True)
    shutil.copytree(ckpts / "checkpoint-1", ckpts / "checkpoint-2")
    (ckpts / "checkpoint-2" / "_COMPLETE").unlink()
    (ckpts / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2, "truncat')

    r = _run(_train_cmd(config, str(out)))
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == "checkpoint-1"  # not the half-saved checkpoint-2 ...
    assert not (ckpts / "checkpoint-2" / "global_step1").exists()  # ... whose files were deleted before
    assert json.loads((ckpts / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2  # a new save
    assert summary["global_step"] == 2
    result = json.loads((out / "one_stage" / "train_result.json").read_text())
    _assert_same_losses(result, ref_result)  # step 1 restored from the checkpoint, step 2 trained again
    _assert_same_model(out / "one_stage" / "model", ref_model)

    # Re-running a finished run is a no-op.
    r2 = run_cli("train", "--stage", "one_stage", "--config", config, "--output", str(out), env=SERIAL_ENV)
    assert r2.returncode == 0 and "already finished" in r2.stderr


def test_two_ranks_on_s3_resume_after_a_killed_rank(sets: tuple[str, str], tmp_path: Path, s3_bucket: str,
                                                    reference: tuple[dict[str, Any], Path]) -> None:
    import boto3

    from operators.core import storage
    from operators.train import remote

    ref_result, ref_model = reference
    config = _config(sets, world_size=2, save_total_limit=1)
    out = f"{s3_bucket}/runs/r1/ft"
    run_uri = f"{out}/one_stage"
    ckpts = f"{run_uri}/checkpoints"
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"], region_name="us-east-1")
    bucket = s3_bucket[len("s3://"):]

    def keys(prefix: str) -> list[str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix[len(s3_bucket) + 1:])
        return sorted(o["Key"] for p in pages for o in p.get("Contents", []))

    def uploaded() -> bool:
        return bool(keys(f"{ckpts}/checkpoint-1/_COMPLETE"))

    # Node A: 2 ranks, rank 1 killed once checkpoint-1 is uploaded and marked complete.
    rc = _kill_after(_train_cmd(config, out, nproc=2), uploaded, lambda pid: _rank_pid(pid, 1),
                     {"IIP_TRAIN_SCRATCH": str(tmp_path / "node-a")})
    assert rc != 0
    assert not storage.exists(f"{run_uri}/_DONE.json") and not keys(f"{run_uri}/model/")
    marker = remote.read_marker(f"{ckpts}/checkpoint-1")
    assert marker is not None and marker["world_size"] == 2
    assert {remote.file_rank(f) for f in marker["files"]} == {None, 0, 1}  # shared files + both ranks' shards
    # What a crash in the middle of the next upload leaves: some files, no marker.
    planted = [k for k in keys(f"{ckpts}/checkpoint-1/") if "/global_step1/" in k][:2]
    for key in planted:
        s3.copy_object(Bucket=bucket, Key=key.replace("checkpoint-1/", "checkpoint-2/"),
                       CopySource={"Bucket": bucket, "Key": key})

    # Node B (a rescheduled pod: empty scratch disk) resumes from what is on S3 only.
    _run(_train_cmd(config, out, nproc=2), env={"IIP_TRAIN_SCRATCH": str(tmp_path / "node-b")})
    result = json.loads(storage.read_bytes(f"{run_uri}/train_result.json"))
    assert result["resumed_from"] == "checkpoint-1" and result["global_step"] == 2
    assert result["world_size"] == 2 and result["gradient_accumulation_steps"] == 1  # 2 = 1 x 1 x 2 ranks
    # Each rank downloaded only its own shards; the shared files went to local rank 0 once.
    restored = result["restored_files"]
    assert restored["1"] and {remote.file_rank(f) for f in restored["1"]} == {1}
    assert {remote.file_rank(f) for f in restored["0"]} == {None, 0}
    # The half-uploaded checkpoint-2 was discarded (its files are gone; checkpoint-2 is the new save), and
    # checkpoint-1 was pruned once checkpoint-2 was complete (save_total_limit 1).
    assert planted and not [k for k in keys(f"{ckpts}/checkpoint-2/") if "/global_step1/" in k]
    assert remote.checkpoint_steps(ckpts) == {2: True}
    assert {c["step"] for c in result["checkpoints"]} == {2} and result["model_upload_s"] is not None

    _assert_same_losses(result, ref_result)
    model = remote.fetch(f"{run_uri}/model", tmp_path / "model")  # checksums checked against the marker
    _assert_same_model(model, ref_model)


def test_mode_skips_and_world_size_mismatch(sets: tuple[str, str], tmp_path: Path) -> None:
    cfg = json.loads(_config(sets, world_size=2))
    # The two-stage runs are not part of mode one_stage: asking for them is a skip, not a run.
    r = run_cli("train", "--stage", "stage1", "--config", json.dumps(cfg), "--output", str(tmp_path / "ft"),
                env=SERIAL_ENV)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["skipped"] is True
    # A world size that disagrees with the launcher fails clearly (exit 1), naming the field.
    r2 = run_cli("train", "--stage", "one_stage", "--config", _config(sets, world_size=1), "--output",
                 str(tmp_path / "ft2"), env={**SERIAL_ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    assert r2.returncode == 1 and "world_size" in r2.stderr
