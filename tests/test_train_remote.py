"""Training output on S3 without training (fast): which rank owns which checkpoint file, publish/fetch with
checksums against moto's S3 server on loopback, a half-uploaded checkpoint never taken for a complete one,
pruning. (The same code under real ZeRO-3 training with 2 ranks: test_train_run.py.)"""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from operators.core import storage
from operators.train import remote

CHECKPOINT = ["config.json", "latest", "trainer_state.json", "training_args.bin", "zero_to_fp32.py",
              "model.safetensors", "rng_state_0.pth", "rng_state_1.pth",
              "global_step4/zero_pp_rank_0_mp_rank_00_model_states.pt",
              "global_step4/zero_pp_rank_1_mp_rank_00_model_states.pt",
              "global_step4/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "global_step4/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_each_rank_owns_its_shards_and_rank0_the_shared_files() -> None:
    assert remote.file_rank("global_step4/bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert remote.file_rank("rng_state_3.pth") == 3 and remote.file_rank("rng_state.pth") is None
    assert remote.owned_files(CHECKPOINT, 1) == ["global_step4/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                                 "global_step4/zero_pp_rank_1_mp_rank_00_model_states.pt",
                                                 "rng_state_1.pth"]
    rank0 = remote.owned_files(CHECKPOINT, 0)
    assert "trainer_state.json" in rank0 and "rng_state_0.pth" in rank0 and "rng_state_1.pth" not in rank0
    assert "model.safetensors" not in rank0  # consolidated weights: not needed to resume, not uploaded
    # Downloads: rank 1 on another node (local rank 0) also needs the shared files; on rank 0's node it doesn't.
    assert "latest" in remote.needed_files(CHECKPOINT, 1, local_rank=0)
    assert {remote.file_rank(f) for f in remote.needed_files(CHECKPOINT, 1, local_rank=1)} == {1}


def _folder(tmp: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    return tmp


def test_publish_fetch_and_checksums_on_s3(s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(remote.SCRATCH_ENV, str(tmp_path / "scratch"))
    src = _folder(tmp_path / "model", {"config.json": b"{}", "sub/weights.bin": b"w" * 100_000})
    dest = f"{s3_bucket}/runs/r/stage1/model"
    files = remote.publish(src, dest)
    assert files["sub/weights.bin"]["size"] == 100_000
    got = remote.fetch(dest, tmp_path / "copy")
    assert (got / "sub/weights.bin").read_bytes() == b"w" * 100_000
    assert Path(remote.local_model(dest), "config.json").is_file()  # fetched into this node's scratch
    assert remote.local_model(dest).startswith(str(tmp_path / "scratch"))
    # The marker is a conditional create: a second writer is refused.
    assert remote.commit(dest, files) is False
    # A file changed after it was published fails the checksum on download; nothing is left half-written.
    boto3.client("s3", endpoint_url=storage.S3Settings.from_env().endpoint_url).put_object(
        Bucket=s3_bucket[5:], Key="runs/r/stage1/model/sub/weights.bin", Body=b"x" * 100_000)
    with pytest.raises(remote.RemoteError, match="sha256"):
        remote.fetch(dest, tmp_path / "copy2")
    assert not (tmp_path / "copy2" / "sub" / "weights.bin").exists()
    with pytest.raises(remote.RemoteError, match="_COMPLETE"):
        remote.fetch(f"{s3_bucket}/runs/r/nothing", tmp_path / "copy3")


def test_half_uploaded_checkpoint_is_ignored_discarded_and_old_ones_pruned(s3_bucket: str, tmp_path: Path) -> None:
    ckpts = f"{s3_bucket}/run/checkpoints"
    folder = _folder(tmp_path / "ckpt", {f: f.encode() for f in CHECKPOINT})
    for step in (2, 4):
        dest = f"{ckpts}/checkpoint-{step}"
        assert remote.commit(dest, remote.upload(folder, CHECKPOINT, dest), global_step=step, world_size=2)
    # A crash during the upload of checkpoint-6: some files are there, no marker.
    remote.upload(folder, CHECKPOINT[:4], f"{ckpts}/checkpoint-6")
    assert remote.checkpoint_steps(ckpts) == {2: True, 4: True, 6: False}
    found = remote.latest_complete(ckpts)
    assert found is not None and found[0] == 4 and found[1]["world_size"] == 2
    assert remote.discard_incomplete(ckpts) == [6]
    assert not storage.list_files(f"{ckpts}/checkpoint-6")
    assert remote.prune(ckpts, keep=1) == [2]
    assert remote.checkpoint_steps(ckpts) == {4: True}
    assert remote.read_marker(f"{ckpts}/checkpoint-4") is not None
