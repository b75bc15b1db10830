"""LLM backends and the one factory that picks among them.

The factory lives here, not in `operators.llm.base`: every backend imports the interface from `base`, so
`base` naming the backends would make each backend and the interface import each other.
"""

from __future__ import annotations

from operators.llm.base import Backend, LLMConfig


def make_backend(cfg: LLMConfig) -> Backend:
    """Instantiate the configured backend (imports its heavy dependencies only now)."""
    if cfg.backend == "transformers":
        from operators.llm.backends.transformers_cpu import TransformersBackend

        return TransformersBackend(cfg)
    if cfg.backend == "vllm":
        from operators.llm.backends.vllm_engine import VLLMBackend

        return VLLMBackend(cfg)
    from operators.llm.backends.openai_compat import OpenAICompatBackend

    return OpenAICompatBackend(cfg)
