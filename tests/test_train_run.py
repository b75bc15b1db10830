"""Real DeepSpeed ZeRO-3 training on CPU with the real SmolLM2-135M: loss goes down, SIGKILL + resume,
two processes over gloo (torchrun), the one-stage mode.

Kept small for a 2-core machine: 128-token windows, a handful of optimizer steps, and only the last two
decoder blocks trainable (`train_layers`), which keeps a step at seconds instead of tens of seconds; the
DeepSpeed / Trainer / checkpoint code paths are the full ones. torch runs one thread per process
(SERIAL_ENV: see test_train_prep).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, run_cli
from tests.test_train_prep import SERIAL_ENV, one_torch_thread, prepare

TINY = {"global_batch_size": 1, "learning_rate": 5e-4, "warmup_steps": 0, "max_seq_len": 128, "bf16": False,
        "gradient_checkpointing": False, "train_layers": 2, "lr_scheduler": "constant_with_warmup"}


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    tmp = tmp_path_factory.mktemp("sets")
    return prepare(tmp, "f", 12), prepare(tmp, "c", 8)


def _job(data: list[dict[str, Any]], **train: Any) -> str:
    return json.dumps({"data": data, "train": {**TINY, **train}})


def test_zero3_run_survives_sigkill_resumes_and_lowers_the_loss(sets: tuple[str, str], tmp_path: Path) -> None:
    foundational, _ = sets
    out = tmp_path / "run"
    job = _job([{"name": "foundational", "uri": foundational}], max_steps=4, save_steps=2)
    cmd = [sys.executable, "-m", "operators", "train", "--config", job, "--output", str(out)]
    marker = out / "checkpoints" / "checkpoint-2" / "_COMPLETE"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **SERIAL_ENV})
    try:
        deadline = time.time() + 180
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "no complete checkpoint appeared"
        os.kill(proc.pid, signal.SIGKILL)  # a real crash: no cleanup, no final save
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "_DONE.json").exists() and not (out / "model").exists()

    r = run_cli("train", "--config", job, "--output", str(out), env=SERIAL_ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == "checkpoint-2"
    assert summary["global_step"] == 4  # the same step count an uninterrupted run reaches
    result = json.loads((out / "train_result.json").read_text())
    assert [x["step"] for x in result["losses"]] == [1, 2, 3, 4]  # history restored from the checkpoint
    assert (out / "_DONE.json").exists()

    # The consolidated ZeRO-3 model loads as a plain Hugging Face model, and it fits the training windows
    # better than the base model did: the loss went down.
    from operators.train.evaluate import ModelRunner
    from operators.train.trainer import DataSelection, packed_windows, read_prepared

    windows, _ = packed_windows([read_prepared(DataSelection(name="f", uri=foundational), "train")], 128,
                                "position_ids")
    with one_torch_thread():
        before = ModelRunner("smollm2-135m-instruct").window_loss(windows)
        after = ModelRunner(str(out / "model")).window_loss(windows)
    assert after[1] == before[1] > 0
    assert after[0] / after[1] < 0.8 * before[0] / before[1], (before, after)

    # Re-running a finished run is a no-op.
    r2 = run_cli("train", "--config", job, "--output", str(out), env=SERIAL_ENV, timeout=300)
    assert r2.returncode == 0 and "already finished" in r2.stderr


def test_one_stage_mode_on_two_processes_over_gloo(sets: tuple[str, str], tmp_path: Path) -> None:
    foundational, conversational = sets
    # One optimizer step is enough to prove the two ranks train together: each computes its window's
    # gradient and ZeRO-3 reduce-scatters them over gloo before the step.
    stage = {**TINY, "max_steps": 1, "world_size": 2, "global_batch_size": 2, "save_steps": 100}
    cfg = {"foundational": foundational, "conversational": conversational, "mode": "one_stage",
           "stage1": stage, "stage2": stage}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(_free_port()), "-m", "operators", "train", "--stage", "one_stage", "--config",
                        json.dumps(cfg), "--output", str(tmp_path / "ft")],
                       cwd=ROOT, capture_output=True, text=True, timeout=400, env={**os.environ, **SERIAL_ENV})
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    result = json.loads((tmp_path / "ft" / "one_stage" / "train_result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 1 and result["tokens_seen"] > 0
    assert result["gradient_accumulation_steps"] == 1  # 2 = 1 per device x 1 x 2 processes
    assert set(result["rows_per_set"]) == {"foundational", "conversational"}  # the mix, trained once
    assert (tmp_path / "ft" / "one_stage" / "model" / "model.safetensors").exists()
    # The two-stage runs are not part of mode one_stage: asking for them is a skip, not a run.
    r2 = run_cli("train", "--stage", "stage1", "--config", json.dumps(cfg), "--output", str(tmp_path / "ft"),
                 env=SERIAL_ENV)
    assert r2.returncode == 0 and json.loads(r2.stdout.strip().splitlines()[-1])["skipped"] is True
    # A world size that disagrees with the launcher fails clearly (exit 1), naming the field.
    bad = {**cfg, "stage1": {**stage, "world_size": 1, "global_batch_size": 1}}
    r3 = run_cli("train", "--stage", "one_stage", "--config", json.dumps(bad), "--output", str(tmp_path / "ft2"),
                 env={**SERIAL_ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": str(_free_port())})
    assert r3.returncode == 1 and "world_size" in r3.stderr


def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()
