"""One training run: Hugging Face `Trainer` + DeepSpeed ZeRO-3 over packed windows of prepared sets.

    python -m operators train ...            (one process: CPU or one GPU)
    torchrun --nproc_per_node N -m operators train ...   (N processes; gloo on CPU, NCCL on GPUs)

Layout of a run directory (`s3://...`, or a local path / mounted shared volume, the same for every rank):

    checkpoints/checkpoint-N/   Trainer + DeepSpeed state; `_COMPLETE` (every file with its sha256) is written
                                by a conditional create after every rank's part was saved (and uploaded)
    model/                      final Hugging Face model, consolidated from the ZeRO-3 shards, + tokenizer
                                (on S3 with its own `_COMPLETE` marker)
    train_result.json           steps, loss curve, tokens/s, packing efficiency, peak memory, checkpoint times
    _DONE.json                  written last (create-if-absent): a finished run is skipped when re-run

With `s3://` output every rank works in a local scratch folder (`operators.train.remote`): each rank uploads
its own ZeRO-3 shard files, rank 0 the shared ones, and rank 0 commits the marker; resume downloads the newest
complete checkpoint, each rank only its own shards. A run that dies (OOM, preemption, SIGKILL) resumes from the
newest checkpoint carrying `_COMPLETE`; a half-written or half-uploaded one is deleted first, so a crash during
a save never poisons the resume. Old checkpoints are pruned to `save_total_limit`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from operators.core import storage
from operators.core.manifest import config_hash, read_manifest, step_manifest_uri
from operators.core.stats import peak_rss_mb
from operators.train import remote
from operators.train.config import DEFAULT_MODEL, IGNORE_INDEX, PackMode, TrainConfig
from operators.train.data_prep import build_window, pack_lengths, packing_efficiency

log = logging.getLogger("operators.train")

COMPLETE_MARKER = remote.COMPLETE_MARKER
DONE_NAME = "_DONE.json"
RESULT_NAME = "train_result.json"


class TrainError(RuntimeError):
    """Training could not run or finish; the message says why."""


class DataSelection(BaseModel):
    """Rows of one committed `train_prep` output that a run trains on (or scores)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    uri: str
    replay_only: bool = Field(False, description="Only the rows the select step flagged `replay`.")
    fraction: float = Field(1.0, ge=0.0, le=1.0, description="Share of the rows kept, by id hash.")
    seed: int = 0

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        try:
            return storage.validate_uri(v)
        except storage.StorageError as e:
            raise ValueError(str(e)) from None


class TrainJob(BaseModel):
    """What one run trains: the starting model, the data mix, the settings, where it writes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    init_model: str = Field(DEFAULT_MODEL, description="Packaged model name or a Hugging Face folder.")
    data: list[DataSelection] = Field(..., min_length=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: str = Field(..., description="Run directory: s3://..., or a local path / file:// URI on a shared "
                        "volume.")

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        try:
            return storage.validate_uri(v)
        except storage.StorageError as e:
            raise ValueError(str(e)) from None

    def local_dir(self) -> Path:
        """Where DeepSpeed and the Trainer write (plain file I/O): the run directory itself when it is a local
        path, else this node's scratch folder for it (files are then uploaded, see `CheckpointSync`)."""
        if remote.is_remote(self.output):
            return remote.scratch_dir(self.output)
        return Path(self.output[len("file://"):])


# ----------------------------------------------------------------------------------------------------
# Data: prepared rows -> packed windows


def read_prepared(sel: DataSelection, split: str) -> pa.Table:
    """Rows of `split` ("train" or "heldout") from a committed `train_prep` output, as selected."""
    from operators.steps.select.step import hash_unit

    m = read_manifest(step_manifest_uri(sel.uri))
    if m is None:
        raise TrainError(f"{sel.name}: no committed train_prep output at {sel.uri}")
    cols = ["id", "split", "replay", "input_ids", "labels", "n_tokens"]
    tables = []
    for f in m.data_files():
        with storage.open_input(storage.join(sel.uri, f.path)) as fh:
            tables.append(pq.read_table(fh, columns=cols))
    if not tables:
        return pa.table({c: [] for c in cols})
    t = pa.concat_tables(tables)
    t = t.filter(pc.equal(t["split"], split))
    if sel.replay_only:
        t = t.filter(pc.equal(t["replay"], True))
    if sel.fraction < 1.0 and t.num_rows:
        keep = hash_unit([str(x) for x in t["id"].to_pylist()], sel.seed, "replay_fraction") < sel.fraction
        t = t.filter(pa.array(keep))
    return t


def packed_windows(tables: Sequence[pa.Table], max_seq_len: int, mode: PackMode
                   ) -> tuple[list[dict[str, list[int]]], dict[str, float]]:
    """Pack the rows of all `tables` together into windows; returns windows and packing stats."""
    samples: list[tuple[list[int], list[int]]] = []
    for t in tables:
        samples.extend(zip(t["input_ids"].to_pylist(), t["labels"].to_pylist(), strict=True))
    lengths = [len(s[0]) for s in samples]
    groups = pack_lengths(lengths, max_seq_len, mode)
    windows = [build_window([samples[i] for i in g], mode) for g in groups]
    stats = {"samples": float(len(samples)), "windows": float(len(windows)), "tokens": float(sum(lengths)),
             "label_tokens": float(sum(sum(1 for x in s[1] if x != IGNORE_INDEX) for s in samples)),
             "packing_efficiency": round(packing_efficiency(lengths, groups, max_seq_len), 4)}
    return windows, stats


class WindowDataset:
    """A map-style dataset of packed windows (what the Trainer's sampler indexes)."""

    def __init__(self, windows: list[dict[str, list[int]]]) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.windows[i]


class WindowCollator:
    """Pads windows to the longest in the batch; padding is its own position-id block with labels -100.

    No attention mask is passed: with packed position ids, transformers builds the block-diagonal causal
    mask from them (samples never attend to each other, nor to the padding after them).
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self.tokens_seen = 0

    def __call__(self, items: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(x["input_ids"]) for x in items)
        ids, labels, pos = [], [], []
        for x in items:
            pad = width - len(x["input_ids"])
            self.tokens_seen += len(x["input_ids"])
            ids.append(x["input_ids"] + [self.pad_id] * pad)
            labels.append(x["labels"] + [IGNORE_INDEX] * pad)
            pos.append(x["position_ids"] + list(range(pad)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)}


# ----------------------------------------------------------------------------------------------------
# Distributed setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_launcher_world_size(world_size: int) -> None:
    """TrainError unless `world_size` is the number of processes the launcher started (1 without one)."""
    actual = int(os.environ.get("WORLD_SIZE", "1"))
    if actual != world_size:
        raise TrainError(f"train.world_size is {world_size} but the launcher started {actual} process(es): "
                         "set world_size to the number of processes (global batch arithmetic depends on it)")


def init_distributed(world_size: int) -> tuple[int, int, bool]:
    """Start the process group (gloo on CPU, NCCL on GPUs); returns (rank, world size, on GPU).

    Without a launcher (no WORLD_SIZE in the environment) this is a one-process group on loopback, which
    DeepSpeed needs even for a single process.
    """
    check_launcher_world_size(world_size)  # before the heavy imports: a wrong config fails in a second, not ten
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "WORLD_SIZE" not in os.environ:
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    actual = int(os.environ["WORLD_SIZE"])
    if not on_gpu and os.environ.get("IIP_DS_CPU_SHM", "0") != "1":
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory allreduce op on first use (~90 s). It only
        # speeds up collectives between processes on one host; gloo does the same job, so skip it unless asked.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import deepspeed

    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    return int(os.environ["RANK"]), actual, on_gpu


def last_complete_checkpoint(ckpt_dir: Path, clean: bool = False) -> Path | None:
    """Newest `checkpoint-N` with a completion marker; with `clean`, delete newer incomplete ones."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted((int(p.name.rsplit("-", 1)[1]), p) for p in ckpt_dir.glob("checkpoint-*")
                   if p.name.rsplit("-", 1)[1].isdigit())
    best: Path | None = None
    for _, p in found:
        if (p / COMPLETE_MARKER).exists():
            best = p
        elif clean:
            log.warning("deleting incomplete checkpoint %s (the run died while saving it)", p)
            shutil.rmtree(p, ignore_errors=True)
    return best


class CheckpointSync:
    """The commit point of each checkpoint, on a mounted path or on object storage.

    `restore` and `commit` are collective: every rank calls them (the Trainer calls `on_save` on every rank).
    """

    def __init__(self, job: TrainJob, rank: int, local_rank: int, world: int) -> None:
        self.remote = remote.is_remote(job.output)
        self.local = job.local_dir() / "checkpoints"
        self.uri = storage.join(job.output, "checkpoints")
        self.rank, self.local_rank, self.world = rank, local_rank, world
        self.keep = job.train.save_total_limit
        self.restored: list[str] = []  # files this rank downloaded to resume
        self.times: list[dict[str, float]] = []  # per checkpoint: save (Trainer + DeepSpeed) and commit seconds

    def restore(self) -> Path | None:
        """The local folder of the newest complete checkpoint (downloaded first when remote), or None."""
        import torch.distributed as dist

        if not self.remote:
            if self.rank == 0:
                self.local.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            resume = last_complete_checkpoint(self.local, clean=(self.rank == 0))
            dist.barrier()
            return resume
        if self.local_rank == 0:
            # This node's scratch copy may be stale or from another attempt: the bucket is the truth.
            shutil.rmtree(self.local, ignore_errors=True)
            self.local.mkdir(parents=True)
        if self.rank == 0:
            remote.discard_incomplete(self.uri)
        dist.barrier()
        found = remote.latest_complete(self.uri)
        folder = None
        if found is not None:
            step, marker = found
            if marker.get("world_size") != self.world:
                raise TrainError(f"checkpoint-{step} under {self.uri} holds ZeRO shards of {marker.get('world_size')} "
                                 f"ranks, this run has {self.world}: resume with the same world_size")
            folder = self.local / f"checkpoint-{step}"
            self.restored = remote.needed_files(marker["files"], self.rank, self.local_rank)
            remote.download(storage.join(self.uri, f"checkpoint-{step}"), marker["files"], self.restored, folder)
            log.info("rank %d: restored %d files of checkpoint-%d from %s", self.rank, len(self.restored), step,
                     self.uri)
        dist.barrier()
        return folder

    def commit(self, step: int, save_seconds: float) -> None:
        """After the Trainer saved checkpoint-`step`: upload (remote) or checksum (mounted) this rank's files,
        then rank 0 marks the checkpoint complete and prunes old ones."""
        import torch.distributed as dist

        t0 = time.perf_counter()
        folder = self.local / f"checkpoint-{step}"
        mine = remote.owned_files(remote.local_files(folder), self.rank) if folder.is_dir() else []
        dest = storage.join(self.uri, f"checkpoint-{step}") if self.remote else "file://" + str(folder)
        entries = remote.upload(folder, mine, dest) if self.remote else remote.checksum(folder, mine)
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, entries)  # also a barrier: every rank's part is saved before the marker
        if self.rank == 0:
            files = {k: v for part in parts for k, v in part.items()}
            if not remote.commit(dest, files, global_step=step, world_size=self.world):
                log.warning("checkpoint-%d was already marked complete (an earlier attempt)", step)
            if self.remote:
                remote.prune(self.uri, self.keep)
        dist.barrier()
        if self.remote and self.local_rank == 0:
            for old in self.local.glob("checkpoint-*"):  # this node's older copies are on storage now
                if old.name.rsplit("-", 1)[-1].isdigit() and int(old.name.rsplit("-", 1)[-1]) < step:
                    shutil.rmtree(old, ignore_errors=True)
        self.times.append({"step": step, "save_s": round(save_seconds, 3),
                           "commit_s": round(time.perf_counter() - t0, 3)})


def freeze_all_but_last(model: Any, n_layers: int) -> int:
    """Leave only the last `n_layers` decoder blocks and the final norm trainable; returns trainable params."""
    layers = model.model.layers
    if n_layers > len(layers):
        raise TrainError(f"train.train_layers is {n_layers} but the model has {len(layers)} layers")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in list(layers)[-n_layers:]:
        for p in block.parameters():
            p.requires_grad_(True)
    for p in model.model.norm.parameters():
        p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def job_hash(job: TrainJob) -> str:
    """Identity of a run: same job, same data manifests -> same hash (a finished run is then skipped)."""
    inputs = []
    for sel in job.data:
        m = read_manifest(step_manifest_uri(sel.uri))
        inputs.append(f"{sel.uri}:{m.config_hash if m else 'missing'}")
    return config_hash("train", 1, job.model_dump(mode="json"), inputs)


def finished(job: TrainJob) -> dict[str, Any] | None:
    """The result of an already finished identical run, else None."""
    done = storage.join(job.output, DONE_NAME)
    if storage.exists(done):
        info = json.loads(storage.read_bytes(done))
        if info.get("job_hash") == job_hash(job):
            return dict(json.loads(storage.read_bytes(storage.join(job.output, RESULT_NAME))))
    return None


# ----------------------------------------------------------------------------------------------------
# The run


def run_training(job: TrainJob) -> dict[str, Any]:
    """Train `job` (resuming from its last complete checkpoint) and return the result summary."""
    prior = finished(job)
    if prior is not None:
        log.info("training run %s already finished (step %s); skipping", job.output, prior.get("global_step"))
        return prior
    cfg = job.train
    rank, world, on_gpu = init_distributed(cfg.world_size)
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from operators.llm.models import resolve_model

    out = job.local_dir()
    ckpt_dir = out / "checkpoints"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if rank == 0:
        storage.delete(storage.join(job.output, DONE_NAME))
    sync = CheckpointSync(job, rank, local_rank, world)
    resume = sync.restore()

    tables = [read_prepared(sel, "train") for sel in job.data]
    per_set = {sel.name: t.num_rows for sel, t in zip(job.data, tables, strict=True)}
    windows, pstats = packed_windows(tables, cfg.max_seq_len, cfg.pack)
    if not windows:
        raise TrainError(f"no training rows in {[s.uri for s in job.data]}")
    log.info("rank %d/%d: %d windows from %s, packing efficiency %.3f, resume from %s", rank, world,
             len(windows), per_set, pstats["packing_efficiency"], resume)

    if job.init_model.startswith("s3://"):  # e.g. stage 2 starting from stage 1's model on S3
        if local_rank == 0:
            remote.local_model(job.init_model)  # one download per node
        dist.barrier()
    folder = resolve_model(remote.local_model(job.init_model))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # TrainingArguments must exist before the model is built so ZeRO-3 partitions it at load (zero.Init).
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        bf16=cfg.bf16,
        gradient_checkpointing=cfg.gradient_checkpointing,
        # Non-reentrant checkpointing also works when the blocks' inputs need no grad (frozen lower layers).
        gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        deepspeed=cfg.deepspeed_config(),
        use_cpu=not on_gpu,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        optim="adamw_torch",
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16 if cfg.bf16 else torch.float32, attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False  # no KV cache in training (and packed masks need it off)
    if cfg.train_layers is not None:
        freeze_all_but_last(model, cfg.train_layers)

    class _CommitCheckpoint(TrainerCallback):
        """Commits each checkpoint once every rank saved it (`on_save` runs on every rank after the save)."""

        step_end = 0.0

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step_end = time.perf_counter()  # the save (if any) follows this step

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync.commit(state.global_step, time.perf_counter() - self.step_end)

    collator = WindowCollator(pad_id)
    trainer = Trainer(model=model, args=args, train_dataset=WindowDataset(windows), data_collator=collator,
                      processing_class=tokenizer, callbacks=[_CommitCheckpoint()])
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - t0
    trainer.save_model(str(out / "model"))  # ZeRO-3: gathers the shards into one HF model on rank 0
    t1 = time.perf_counter()
    if rank == 0 and sync.remote:
        remote.publish(out / "model", storage.join(job.output, "model"))
    model_upload_s = time.perf_counter() - t1
    losses = [{"step": h["step"], "loss": round(float(h["loss"]), 5)} for h in trainer.state.log_history
              if "loss" in h]
    tokens = torch.tensor([collator.tokens_seen], dtype=torch.long)
    dist.all_reduce(tokens)
    ckpt_s = sum(t["save_s"] + t["commit_s"] for t in sync.times)
    compute_s = seconds - ckpt_s
    restored: list[Any] = [None] * world
    dist.all_gather_object(restored, sync.restored)
    summary: dict[str, Any] = {
        "output": job.output,
        "init_model": job.init_model,
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "epochs": round(float(trainer.state.epoch or 0.0), 4),
        "resumed_from": resume.name if resume else None,
        "world_size": world,
        "device": "cuda" if on_gpu else "cpu",
        "global_batch_size": cfg.global_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "rows_per_set": per_set,
        "data": pstats,
        "losses": losses,
        "first_loss": losses[0]["loss"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
        "train_loss": round(float(result.training_loss), 5),
        "seconds": round(seconds, 3),
        "tokens_seen": int(tokens.item()),
        # Training throughput without the time spent saving and uploading checkpoints (reported apart).
        "tokens_per_s": round(int(tokens.item()) / compute_s, 1) if compute_s > 0 else 0.0,
        "checkpoint_seconds": round(ckpt_s, 3),
        "peak_rss_mb": peak_rss_mb(),
        "checkpoints": sync.times,
        "model_upload_s": round(model_upload_s, 3) if sync.remote else None,
        "restored_files": {str(r): files for r, files in enumerate(restored)} if resume else {},
    }
    if rank == 0:
        storage.write_bytes(storage.join(job.output, RESULT_NAME), json.dumps(summary, indent=2).encode())
        done = {"job_hash": job_hash(job), "global_step": summary["global_step"]}
        storage.commit_if_absent(storage.join(job.output, DONE_NAME), json.dumps(done).encode())
        log.info("trained %d steps in %.1fs (%.0f tokens/s), loss %s -> %s, model in %s", summary["global_step"],
                 seconds, summary["tokens_per_s"], summary["first_loss"], summary["last_loss"],
                 storage.join(job.output, "model"))
    dist.barrier()
    dist.destroy_process_group()
    return summary
