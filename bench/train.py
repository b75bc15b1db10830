"""Benchmark: data preparation + a DeepSpeed ZeRO-3 training run of SmolLM2-135M-Instruct on this machine.

    python bench/train.py --quick          # ~1-2 minutes on 2 CPU cores: 256-token windows, 6 steps, last 2 blocks
    python bench/train.py [--records 400] [--max-seq-len 1024] [--steps 10] [--train-layers N] [--local]

1. Builds conversations from GSM8K train (question -> worked answer; ../shared/data, else the built-in
   arithmetic set) and runs the real `train_prep` step: chat template, assistant-only labels, packing.
2. Trains in a measured child process (`python -m operators train`, the CLI a pod runs): ZeRO-3 via the
   Hugging Face Trainer, torch AdamW, on CPU (gloo) or the GPU when present. Output goes to S3 (a moto
   server on loopback, unless --local): a checkpoint halfway, so the time to save a checkpoint and to upload
   it (with checksums, then the completion marker) and the final model's upload are measured.
3. Prints the model-FLOPs utilization formula and the paper's global batch 528 as per-device x accumulation
   x world size for 8, 16 and 64 GPUs (checked by TrainConfig). GPU figures print "not measured: no GPU"
   when no GPU is present.
Prints human-readable lines, then LAST one JSON line with tokens_per_s, packing_efficiency, peak_rss_mb
(the training child's own peak: one rank), checkpoint and upload seconds, loss_first / loss_last, and the
prep throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: `python bench/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, last_json_line, print_json_line, run_child

SHARED_GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
PAPER_GLOBAL_BATCH = 528
# Dense bf16 peak of the GPU the figures would be quoted for (H100 SXM; H200 has the same compute).
PEAK_FLOPS = {"H100/H200 SXM bf16 dense": 989e12}


def batch_decompositions(global_batch: int, world: int) -> list[tuple[int, int]]:
    """(per-device batch, accumulation) pairs with per-device x accumulation x world == global_batch, each
    checked by TrainConfig (the same validation a run gets); empty when world does not divide it."""
    from operators.train.config import TrainConfig

    if global_batch % world:
        return []
    out = []
    for per in range(1, global_batch // world + 1):
        if (global_batch // world) % per == 0:
            accum = global_batch // world // per
            TrainConfig(global_batch_size=global_batch, per_device_batch_size=per, world_size=world,
                        gradient_accumulation_steps=accum)
            out.append((per, accum))
    return out


def print_gpu_figures(n_params: float, cpu_tokens_per_s: float, on_gpu: bool) -> None:
    """The MFU formula with this model's size, and the paper's global batch for 8, 16, 64 GPUs."""
    print("MFU = 6 x N x tokens/s / (world_size x peak FLOP/s)    (6N: forward 2N + backward 4N per token;")
    print("      full fine-tuning, attention FLOPs 12 x layers x d_model x context per token left out)")
    print(f"      N = {n_params / 1e6:.1f}M here; CPU tokens/s {cpu_tokens_per_s:.0f} -> "
          f"{6 * n_params * cpu_tokens_per_s / 1e12:.3f} TFLOP/s if all N were trained (--quick trains 2 blocks)")
    for gpu, peak in PEAK_FLOPS.items():
        print(f"      {gpu}: peak {peak / 1e12:.0f} TFLOP/s per GPU; GPU tokens/s and MFU: "
              + ("see the JSON line" if on_gpu else "not measured: no GPU"))
    for world in (8, 16, 64):
        pairs = batch_decompositions(PAPER_GLOBAL_BATCH, world)
        if pairs:
            shown = ", ".join(f"{p} x {a} x {world}" for p, a in pairs)
            print(f"global batch {PAPER_GLOBAL_BATCH} on {world} GPUs = per-device x accumulation x world: {shown}")
        else:
            lo, hi = PAPER_GLOBAL_BATCH // world, PAPER_GLOBAL_BATCH // world + 1
            fit = max(d for d in range(1, world + 1) if PAPER_GLOBAL_BATCH % d == 0)
            print(f"global batch {PAPER_GLOBAL_BATCH} on {world} GPUs: no exact split (528 = 2^4 x 3 x 11 is not a "
                  f"multiple of {world}); nearest: {lo * world} = 1 x {lo} x {world} or {hi * world} = 1 x {hi} x "
                  f"{world}, or keep 528 on {fit} of them: 1 x {PAPER_GLOBAL_BATCH // fit} x {fit}")


def conversations(n: int) -> list[dict[str, Any]]:
    """`n` (question, worked answer) pairs as canonical conversations."""
    if SHARED_GSM8K.is_file():
        lines = SHARED_GSM8K.read_text().splitlines()[:n]
        pairs = [(json.loads(x)["question"], json.loads(x)["answer"]) for x in lines]
    else:
        from operators.train.builtin_sets import arithmetic

        pairs = [(r["question"], r["answer"]) for r in arithmetic(n)]
    return [{"id": f"g{i}", "source": "gsm8k", "conversations": [{"from": "human", "value": q},
                                                                  {"from": "gpt", "value": a}]}
            for i, (q, a) in enumerate(pairs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--global-batch", type=int, default=2)
    ap.add_argument("--train-layers", type=int, default=None, help="train only the last N blocks (default: all)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--local", action="store_true", help="write to a local folder instead of loopback S3")
    args = ap.parse_args()
    if args.quick:
        args.records, args.max_seq_len, args.steps, args.global_batch, args.train_layers = 120, 256, 6, 1, 2

    import pyarrow as pa
    import pyarrow.parquet as pq

    from operators.core.runner import run_all
    from operators.schema import TURN_TYPE
    from operators.train.config import PrepConfig
    from operators.train.data_prep import TrainPrepStep, stats_summary

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        recs = conversations(args.records)
        pq.write_table(pa.table({"id": [r["id"] for r in recs], "source": [r["source"] for r in recs],
                                 "conversations": pa.array([r["conversations"] for r in recs], pa.list_(TURN_TYPE))}),
                       raw / "part-0.parquet")
        t0 = time.perf_counter()
        m = run_all(TrainPrepStep(PrepConfig(max_seq_len=args.max_seq_len, heldout_fraction=0.0, truncate=True)),
                    [str(raw)], str(Path(tmp) / "prep"))
        prep_s = time.perf_counter() - t0
        prep = stats_summary(m.stats.counters)
        print(f"prep: {m.stats.records_in} records -> {prep['train_tokens']:.0f} tokens in {prep_s:.1f}s, "
              f"packing efficiency {prep['train_packing_efficiency']:.3f} at {args.max_seq_len} tokens")
        job = {"data": [{"name": "gsm8k", "uri": str(Path(tmp) / "prep")}],
               "train": {"max_steps": args.steps, "global_batch_size": args.global_batch, "learning_rate": 1e-4,
                         "warmup_steps": 0, "max_seq_len": args.max_seq_len, "bf16": args.bf16,
                         "gradient_checkpointing": not args.quick, "train_layers": args.train_layers,
                         "save_steps": max(1, args.steps // 2), "lr_scheduler": "constant_with_warmup"}}
        with _output(Path(tmp), args.local) as (output, env):
            child = run_child([sys.executable, "-m", "operators", "train", "--config", json.dumps(job), "--output",
                               output], env=env).check("training")
            summary = last_json_line(child.stdout)
            from operators.core import storage

            result = json.loads(storage.read_bytes(storage.join(storage.validate_uri(output), "train_result.json")))
    ckpt = result["checkpoints"][0] if result["checkpoints"] else {"save_s": None, "commit_s": None}  # the first
    print(f"train: {result['global_step']} steps on {result['device']} in {result['seconds']:.1f}s, "
          f"{result['tokens_per_s']:.0f} tokens/s, loss {result['first_loss']} -> {result['last_loss']}, "
          f"peak RSS {child.peak_rss_mb:.0f} MiB (child wall {child.seconds:.1f}s)")
    where = "local disk" if args.local else "S3 (moto, loopback)"
    for c in result["checkpoints"]:
        print(f"checkpoint-{c['step']} to {where}: save {c['save_s']}s, "
              f"{'checksums' if args.local else 'upload'} + marker {c['commit_s']}s")
    print(f"final model upload {result['model_upload_s']}s; training tokens/s exclude the checkpoint time")
    on_gpu = result["device"] == "cuda"
    print_gpu_figures(134.5e6, result["tokens_per_s"], on_gpu)
    print_json_line({
        "bench": "train", "quick": args.quick, "device": result["device"], "max_seq_len": args.max_seq_len,
        "steps": result["global_step"], "train_layers": args.train_layers or "all",
        "tokens_per_s": result["tokens_per_s"], "tokens_seen": result["tokens_seen"],
        "packing_efficiency": result["data"]["packing_efficiency"],
        "prep_packing_efficiency": prep["train_packing_efficiency"],
        "prep_records_per_s": round(m.stats.records_in / prep_s, 1) if prep_s else 0.0,
        "peak_rss_mb": child.peak_rss_mb, "train_seconds": result["seconds"], "child_seconds": child.seconds,
        "loss_first": result["first_loss"], "loss_last": result["last_loss"],
        "resumed_from": summary.get("resumed_from"), "output": "local" if args.local else "s3 (moto, loopback)",
        "checkpoint_save_s": ckpt["save_s"], "checkpoint_upload_s": ckpt["commit_s"],
        "model_upload_s": result["model_upload_s"], "checkpoints": result["checkpoints"],
        "gpu_tokens_per_s": result["tokens_per_s"] if on_gpu else "not measured: no GPU",
        "mfu": "6 * N * tokens_per_s / (world_size * peak_flops)" if not on_gpu else
        round(6 * 134.5e6 * result["tokens_per_s"] / (result["world_size"] * max(PEAK_FLOPS.values())), 4),
        "global_batch_528": {str(w): [f"{p}x{a}x{w}" for p, a in batch_decompositions(PAPER_GLOBAL_BATCH, w)]
                             for w in (8, 16, 64)},
    })


@contextlib.contextmanager
def _output(tmp: Path, local: bool) -> Iterator[tuple[str, dict[str, str]]]:
    """Where the run writes: a local folder, or a bucket on a moto S3 server started on loopback."""
    if local:
        yield str(tmp / "run"), {}
        return
    import os
    import shutil
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    server = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        env = {"S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
               "AWS_SECRET_ACCESS_KEY": "bench-only", "AWS_DEFAULT_REGION": "us-east-1",
               "IIP_TRAIN_SCRATCH": str(tmp / "scratch")}
        os.environ.update(env)
        import boto3

        for _ in range(100):
            try:
                boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"]).create_bucket(Bucket="bench-train")
                break
            except Exception:
                time.sleep(0.1)
        yield "s3://bench-train/run", env
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
