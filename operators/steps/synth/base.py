"""What every LLM-backed step shares: its LLM config, a client per shard with a cache beside the data,
and helpers to read and write conversations in the canonical schema."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Generic, TypeVar

import pyarrow as pa
from pydantic import Field

from operators.core import storage
from operators.core.step import Step, StepConfig
from operators.llm.base import LLMConfig, Message
from operators.llm.cache import ResultCache
from operators.llm.client import LLMClient
from operators.llm.prompts import PromptTask, load_prompt
from operators.schema import TURN_TYPE

log = logging.getLogger(__name__)

CACHE_DIR = "_llm_cache"
ROLE_TO_CHAT = {"human": "user", "gpt": "assistant", "system": "system"}
CHAT_TO_ROLE = {v: k for k, v in ROLE_TO_CHAT.items()}


class LLMStepConfig(StepConfig):
    """Config shared by LLM steps. LLM work is slow per record: batches are small so progress shows."""

    batch_rows: int = Field(64, ge=1, description="Records per transform batch (and per cache flush).")
    llm: LLMConfig = Field(default_factory=LLMConfig)
    prompt_dir: str | None = Field(None, description="Folder of prompt YAML files overriding the packaged ones.")
    cache_uri: str | None = Field(
        None, description="Where LLM results are cached; default: `_llm_cache/` inside the step's output.")
    max_tokens: int | None = Field(
        None, ge=1, description="Caps every generation of this step (overrides the prompts' own limits).")


C = TypeVar("C", bound=LLMStepConfig)


class LLMStep(Step[C], Generic[C]):
    """A step whose transform asks an LLM; one client (model + cache) per shard."""

    prompt_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: C) -> None:
        super().__init__(config)
        # Load prompts now so a missing or malformed prompt fails before any work starts.
        self.prompts: dict[str, PromptTask] = {n: self._capped(load_prompt(n, config.prompt_dir))
                                               for n in self.prompt_names}
        self._clients: dict[str, LLMClient] = {}
        self._cache_at: tuple[str, int, str] | None = None

    def _capped(self, task: PromptTask) -> PromptTask:
        cap = self.config.max_tokens
        if cap is None or task.sampling.max_tokens <= cap:
            return task
        return task.model_copy(update={"sampling": task.sampling.model_copy(update={"max_tokens": cap})})

    @property
    def client(self) -> LLMClient:
        """The client of the step's main model (`llm`)."""
        return self.client_for("main", self.config.llm)

    def client_for(self, role: str, cfg: LLMConfig) -> LLMClient:
        """The shard's client for `role` (each role caches under its own folder; in-memory outside a runner)."""
        if role not in self._clients:
            cache = ResultCache()
            if self._cache_at is not None:
                uri, shard, attempt = self._cache_at
                cache = ResultCache(storage.join(uri, role), shard, attempt)
            # Roles played by the same model share one loaded backend.
            twin = next((c for c in self._clients.values() if c.cfg == cfg), None)
            self._clients[role] = LLMClient(cfg, cache, backend=twin.backend if twin else None)
        return self._clients[role]

    def open_shard(self, step_dir: str, shard: int, attempt: str) -> None:
        self._cache_at = (self.config.cache_uri or storage.join(step_dir, CACHE_DIR), shard, attempt)

    def close_shard(self) -> None:
        for role, client in self._clients.items():
            st = client.cache.stats
            log.info("step %s [%s]: llm cache hits %d, misses %d, segments written %d", self.name, role, st.hits,
                     st.misses, st.segments_written)
            client.close()
        self._clients.clear()
        self._cache_at = None

    def drain_counters(self) -> dict[str, float]:
        """Every client's usage since the last batch, prefixed by role (`llm.` for the main model)."""
        out: dict[str, float] = {}
        for role, client in self._clients.items():
            out.update(client.drain_counters("llm." if role == "main" else f"llm.{role}."))
        return out


def to_messages(conversation: list[dict[str, Any]]) -> list[Message]:
    """Canonical turns (`from`/`value`) -> chat messages (`role`/`content`)."""
    return [{"role": ROLE_TO_CHAT.get(t["from"], "user"), "content": t["value"]} for t in conversation]






CONVERSATION_TYPE = pa.list_(TURN_TYPE)
