"""Benchmark: data preparation + a DeepSpeed ZeRO-3 training run of SmolLM2-135M-Instruct on this machine.

    python bench/train.py --quick          # < 1 minute on 2 CPU cores: 256-token windows, 6 steps, last 2 blocks
    python bench/train.py [--records 400] [--max-seq-len 1024] [--steps 10] [--train-layers N]

1. Builds conversations from GSM8K train (question -> worked answer; ../shared/data, else the built-in
   arithmetic set) and runs the real `train_prep` step: chat template, assistant-only labels, packing.
2. Trains in a measured child process (`python -m operators train`, the CLI a pod runs): ZeRO-3 via the
   Hugging Face Trainer, torch AdamW, on CPU (gloo) or the GPU when present.
Prints human-readable lines, then LAST one JSON line with tokens_per_s, packing_efficiency, peak_rss_mb
(the training child's own peak), loss_first / loss_last, and the prep throughput.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: `python bench/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, last_json_line, print_json_line, run_child

SHARED_GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


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
                         "save_steps": 10_000, "lr_scheduler": "constant_with_warmup"}}
        child = run_child([sys.executable, "-m", "operators", "train", "--config", json.dumps(job), "--output",
                           str(Path(tmp) / "run")]).check("training")
        summary = last_json_line(child.stdout)
        result = json.loads((Path(tmp) / "run" / "train_result.json").read_text())
    print(f"train: {result['global_step']} steps on {result['device']} in {result['seconds']:.1f}s, "
          f"{result['tokens_per_s']:.0f} tokens/s, loss {result['first_loss']} -> {result['last_loss']}, "
          f"peak RSS {child.peak_rss_mb:.0f} MiB (child wall {child.seconds:.1f}s)")
    print_json_line({
        "bench": "train", "quick": args.quick, "device": result["device"], "max_seq_len": args.max_seq_len,
        "steps": result["global_step"], "train_layers": args.train_layers or "all",
        "tokens_per_s": result["tokens_per_s"], "tokens_seen": result["tokens_seen"],
        "packing_efficiency": result["data"]["packing_efficiency"],
        "prep_packing_efficiency": prep["train_packing_efficiency"],
        "prep_records_per_s": round(m.stats.records_in / prep_s, 1) if prep_s else 0.0,
        "peak_rss_mb": child.peak_rss_mb, "train_seconds": result["seconds"], "child_seconds": child.seconds,
        "loss_first": result["first_loss"], "loss_last": result["last_loss"],
        "resumed_from": summary.get("resumed_from"),
    })


if __name__ == "__main__":
    main()
