"""Drive VLLMBackend inside the vLLM environment (.venv-vllm) and write what it did as JSON.

tests/test_llm_vllm.py runs this once per module: `python vllm_driver.py JOB.json OUT.json`. The job names
the model folder and the inputs; the output holds texts, token counts, losses and timings, which the test
checks against transformers in the main environment. Starting the engine once keeps the test fast.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


def main(job_path: str, out_path: str) -> int:
    """Run every case of the job on one engine; always close the engine, even after a failure."""
    from operators.llm.backends.vllm_engine import VLLMBackend
    from operators.llm.base import LLMConfig, LLMError, SamplingConfig
    from operators.llm.models import resolve_model

    logging.basicConfig(level=logging.WARNING)
    with open(job_path) as f:
        job: dict[str, Any] = json.load(f)
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    backend = VLLMBackend(LLMConfig(backend="vllm", model=job["model"], max_model_len=job["max_model_len"]))
    out["startup_s"] = time.monotonic() - t0
    out["model_path"] = backend.model_path
    out["model_id"] = backend.model_id
    out["resolved"] = resolve_model(job["model"])
    try:
        t = time.monotonic()
        gens = backend.chat(job["chat"], SamplingConfig(max_tokens=job["max_tokens"]))
        out["chat_s"] = time.monotonic() - t
        out["chat"] = [g.__dict__ for g in gens]

        t = time.monotonic()
        gens = backend.chat(job["json_chat"], SamplingConfig(max_tokens=96), json_schema=job["schema"])
        out["json_s"] = time.monotonic() - t
        out["json"] = [g.__dict__ for g in gens]

        sampled = SamplingConfig(temperature=1.0, top_p=0.95, max_tokens=24, seed=7)
        out["seeded"] = [backend.chat(job["chat"][:1], sampled)[0].text for _ in range(2)]
        out["seeded_other"] = backend.chat(job["chat"][:1], sampled.model_copy(update={"seed": 8}))[0].text

        # Stop at a word from the middle of the greedy answer: the same greedy run must end right before it.
        free = backend.chat(job["stop_chat"], SamplingConfig(max_tokens=48))[0].text
        words = free.split()
        stop = " " + words[len(words) // 2]
        stopped = backend.chat(job["stop_chat"], SamplingConfig(max_tokens=48, stop=[stop]))[0]
        out["stop"] = {"free": free, "stop": stop, "stopped": stopped.__dict__}

        t = time.monotonic()
        scores = backend.score_loss(job["score_prompts"], job["score_answers"])
        out["score_s"] = time.monotonic() - t
        out["scores"] = [s.__dict__ for s in scores]

        try:
            backend.chat([[{"role": "user", "content": "word " * (job["max_model_len"] * 2)}]],
                         SamplingConfig(max_tokens=8))
            out["too_long"] = "no error"
        except LLMError as e:
            out["too_long"] = f"LLMError: {e}"
    finally:
        backend.close()
    try:
        backend.chat(job["chat"][:1], SamplingConfig(max_tokens=4))
        out["after_close"] = "no error"
    except LLMError as e:
        out["after_close"] = f"LLMError: {e}"
    with open(out_path, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":  # vLLM's engine core forks workers: the guard keeps them from re-running this
    sys.exit(main(sys.argv[1], sys.argv[2]))
