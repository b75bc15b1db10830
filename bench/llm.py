"""LLM layer benchmark: ability labeling on the CPU model, batched vs one request at a time, and a cached re-run.

    python bench/llm.py --records 32 [--batch-size 16] [--max-tokens 40]

Measures, on the same instructions (self-instruct seed tasks from ../shared/data when present, else a
built-in list), in the same run:
  - batched labeling: the client hands the backend `--batch-size` requests at once (padded batches);
  - sequential labeling: batch size 1, the way a naive per-record loop calls a model;
  - a re-run against the first run's result cache (tokens paid: should be 0);
  - the structured-output validity rate (valid after parse, normalization, schema and the repair prompt).
On a machine with a CUDA GPU and vllm installed, it also measures the vLLM offline engine on the same
requests (tokens/s). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.core.stats import peak_rss_mb
from operators.llm.base import LLMConfig
from operators.llm.cache import ResultCache
from operators.llm.client import LLMClient
from operators.steps.synth.label import LabelConfig, LabelStep

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "self_instruct" / "seed_tasks.jsonl"
FALLBACK = ["Solve for x: 3x + 5 = 20.", "Write a Python function that reverses a linked list.",
            "What are the symptoms of diabetes?", "Write a short poem about autumn leaves.",
            "Explain the causes of World War I.", "How do I negotiate a higher salary?",
            "Translate 'good morning' into French.", "What is the time complexity of quicksort?"]


def instructions(n: int) -> list[str]:
    """`n` real instructions (self-instruct seed tasks when available)."""
    if SHARED.is_file():
        items = [json.loads(line)["instruction"] for line in SHARED.read_text().splitlines() if line.strip()]
    else:
        items = FALLBACK
    return [items[i % len(items)] for i in range(n)]


def label_run(step: LabelStep, cfg: LLMConfig, texts: list[str], cache: ResultCache) -> dict[str, Any]:
    """Label `texts` once with `cfg`; seconds, tokens and validity."""
    client = LLMClient(cfg, cache)
    rows = [{"instruction": t, "taxonomy": step._taxonomy_text} for t in texts]
    client.backend  # load the model outside the timed region  # noqa: B018
    t0 = time.perf_counter()
    results = client.run_task(step.task, rows, normalize=step.normalize)
    seconds = time.perf_counter() - t0
    usage = client.drain_counters()
    client.close()
    return {"seconds": round(seconds, 2), "records_per_s": round(len(texts) / seconds, 3),
            "completion_tokens": int(usage.get("llm.completion_tokens", 0)),
            "prompt_tokens": int(usage.get("llm.prompt_tokens", 0)),
            "tokens_per_s": round(usage.get("llm.completion_tokens", 0) / seconds, 2),
            "cache_hits": int(usage.get("llm.cache_hits", 0)),
            "valid_rate": round(sum(r.failure is None for r in results) / len(results), 3)}


def vllm_run(texts: list[str], step: LabelStep, max_tokens: int) -> dict[str, Any] | None:
    """The same labeling requests on vLLM's offline engine when a CUDA GPU and vllm are present."""
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    cfg = LLMConfig(backend="vllm", batch_size=len(texts), max_model_len=2048)
    return label_run(step, cfg, texts, ResultCache())


def main() -> None:
    """Run the benchmark and print its figures; the last line is JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=40)
    args = ap.parse_args()
    texts = instructions(args.records)
    step = LabelStep(LabelConfig(max_tokens=args.max_tokens))
    with tempfile.TemporaryDirectory() as tmp:
        batched = label_run(step, LLMConfig(batch_size=args.batch_size), texts, ResultCache(tmp, 0, "first"))
        print(f"batched (batch {args.batch_size}): {batched}", flush=True)
        rerun = label_run(step, LLMConfig(batch_size=args.batch_size), texts, ResultCache(tmp, 0, "rerun"))
        print(f"re-run from the cache: {rerun}", flush=True)
    sequential = label_run(step, LLMConfig(batch_size=1), texts, ResultCache())
    print(f"sequential (batch 1): {sequential}", flush=True)
    gpu = vllm_run(texts, step, args.max_tokens)
    print(f"vLLM on GPU: {gpu if gpu else 'not measured (no CUDA GPU or no vllm here)'}")
    out = {"records": args.records, "batch_size": args.batch_size,
           "batched_records_per_s": batched["records_per_s"], "sequential_records_per_s": sequential["records_per_s"],
           "batched_speedup": round(batched["records_per_s"] / sequential["records_per_s"], 2),
           "batched_tokens_per_s": batched["tokens_per_s"], "sequential_tokens_per_s": sequential["tokens_per_s"],
           "rerun_tokens": rerun["completion_tokens"] + rerun["prompt_tokens"], "rerun_cache_hits": rerun["cache_hits"],
           "valid_json_rate": batched["valid_rate"], "sequential_valid_json_rate": sequential["valid_rate"],
           "vllm_gpu_tokens_per_s": gpu["tokens_per_s"] if gpu else None, "peak_rss_mb": peak_rss_mb()}
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
