"""The one interface every LLM backend implements, and the config that picks a backend.

Steps never talk to a backend directly: they go through `LLMClient` (cache, accounting, structured
output). A backend only turns batches of chat requests into generations and scores answer losses.

Three backends implement it: `transformers` (CPU, the embedded default and the tests), `vllm` (the
offline engine inside GPU pods) and `openai` (any OpenAI-compatible server, e.g. a vLLM deployment).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}


class SamplingConfig(BaseModel):
    """Decoding parameters; part of every cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1, le=32768)
    seed: int = Field(0, description="Sampling seed; with temperature > 0 the same seed gives the same text.")
    stop: list[str] = Field(default_factory=list)


class LLMConfig(BaseModel):
    """Which model answers, through which backend, and how hard to push it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    model: str = Field("smollm2-135m-instruct",
                       description="A packaged model name, a local Hugging Face folder, or (openai) the served name.")
    base_url: str | None = Field(None, description="openai backend: server URL, e.g. http://vllm:8000/v1.")
    api_key_env: str | None = Field(
        None, description="openai backend: name of the environment variable holding the key (never the key).")
    batch_size: int = Field(16, ge=1, le=4096, description="Requests handed to the backend at once.")
    max_concurrency: int = Field(8, ge=1, le=1024, description="openai backend: requests in flight.")
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(4, ge=0, le=20, description="Retries of transient failures (timeouts, 429, 5xx).")
    max_model_len: int = Field(2048, ge=128)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm backend on GPU: share of GPU memory.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="vllm backend: GPUs one engine spans.")
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="vllm backend on CPU: KV cache size.")
    retry_base_s: float = Field(0.5, gt=0, description="First backoff delay; doubles per retry, with jitter.")
    retry_max_s: float = Field(30.0, gt=0, description="Longest backoff delay.")
    cost_per_1k_prompt_tokens: float = Field(0.0, ge=0)
    cost_per_1k_completion_tokens: float = Field(0.0, ge=0)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not v.replace("_", "").isalnum():
            raise ValueError("api_key_env must name an environment variable (letters, digits, _), not hold a key")
        return v


@dataclass
class Generation:
    """One completion, with the token counts that were paid for it."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    cached: bool = False


@dataclass
class LossScore:
    """Mean token cross-entropy of an answer (prompt tokens masked), and how many tokens it averaged."""

    loss: float
    answer_tokens: int


class LLMError(RuntimeError):
    """A request failed for good (after retries); the row gets a failure reason, the run goes on."""


class TransientLLMError(LLMError):
    """A request failed in a way worth retrying (timeout, 429, 5xx, connection reset)."""


class Backend(ABC):
    """Chat generation and answer-loss scoring over batches."""

    name: str = "backend"

    @property
    @abstractmethod
    def model_id(self) -> str:
        """Stable identity of the weights (goes into cache keys)."""

    @abstractmethod
    def chat(self, requests: list[list[Message]], sampling: SamplingConfig,
             json_schema: dict[str, Any] | None = None) -> list[Generation]:
        """One generation per request, in order. With `json_schema`, backends that can constrain decoding
        do; the caller validates either way."""

    @abstractmethod
    def score_loss(self, prompts: list[list[Message]], answers: list[str]) -> list[LossScore]:
        """Mean loss of each answer given its prompt (an empty prompt scores the answer alone)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model or connections."""


def request_key(model_id: str, sampling: SamplingConfig, prompt_version: str, messages: list[Message],
                json_schema: dict[str, Any] | None = None) -> str:
    """Cache key of one request: same model, decoding, prompt version and prompt text -> same key."""
    blob = json.dumps({"m": model_id, "s": sampling.model_dump(mode="json"), "v": prompt_version,
                       "p": messages, "j": json_schema}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()
