"""`respond` step: answers by the strong model, then extension into multi-turn conversations (Phase 2).

Each accepted instruction is answered by `llm` (the responder). The conversation is then extended to
a number of user turns drawn per record in [min_turns, max_turns] (default 2-4): a role-played user
(`user_llm`, default the responder's model) writes a follow-up that builds on the last answer, and the
responder answers it. Rejected, with reasons: `llm_error`, `empty_response`, `refusal` (on the first
answer). A failed follow-up ends the extension early (recorded in `turns_note`), it does not lose the
record.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from pydantic import Field, model_validator

from operators.core.arrays import replace_column
from operators.core.step import BatchResult, StepConfig, dropped_table
from operators.llm.base import LLMConfig, LLMError, Message
from operators.llm.client import LLMClient
from operators.schema import first_exchange
from operators.steps.synth.base import (
    CONVERSATION_TYPE,
    LLMStep,
    LLMStepConfig,
    to_messages,
)
from operators.steps.synth.evolve import REFUSAL_HEADS


class RespondConfig(LLMStepConfig):
    """Responder (`llm`), role-played user, and conversation length."""

    user_llm: LLMConfig | None = Field(None, description="Model playing the user; default: the responder's.")
    min_turns: int = Field(2, ge=1, le=8)
    max_turns: int = Field(4, ge=1, le=8)
    min_answer_chars: int = Field(2, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _range(self) -> RespondConfig:
        if self.max_turns < self.min_turns:
            raise ValueError(f"max_turns ({self.max_turns}) < min_turns ({self.min_turns})")
        return self


def target_turns(record_id: str, lo: int, hi: int, seed: int) -> int:
    """User turns this record's conversation should reach (stable across re-runs)."""
    return lo + xxhash.xxh3_64_intdigest(f"{seed}:turns:{record_id}".encode()) % (hi - lo + 1)


def render_transcript(messages: list[Message]) -> str:
    """A conversation as plain text for the role-played user's prompt."""
    return "\n\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages
                       if m["role"] != "system")


class RespondStep(LLMStep[RespondConfig]):
    """instruction -> multi-turn conversation in the canonical schema."""

    name: ClassVar[str] = "respond"
    config_model: ClassVar[type[StepConfig]] = RespondConfig
    prompt_names: ClassVar[tuple[str, ...]] = ("respond", "follow_up")

    @property
    def user(self) -> LLMClient:
        """The role-played user's client."""
        return self.client_for("user", self.config.user_llm or self.config.llm)

    def _answer(self, chats: list[list[Message]]) -> list[tuple[str, str | None]]:
        task = self.prompts["respond"]
        try:
            gens = self.client.chat(chats, task.sampling, task.cache_version)
        except LLMError as e:  # the backend gave up (after its own retries): these rows fail with the reason
            return [("", f"llm_error: {e}")] * len(chats)
        return [(g.text.strip(), None) for g in gens]

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        table = pa.Table.from_batches([batch])
        records = table.to_pylist()
        chats: list[list[Message]] = [[{"role": "user", "content": first_exchange(r["conversations"])[0]}]
                                      for r in records]
        reasons: list[str | None] = [None] * len(records)
        details = [""] * len(records)
        for i, (text, err) in enumerate(self._answer(chats)):
            if err:
                reasons[i], details[i] = "llm_error", err
            elif len(text) < self.config.min_answer_chars:
                reasons[i], details[i] = "empty_response", f"{len(text)} chars"
            elif any(text.lower().startswith(p) for p in REFUSAL_HEADS):
                reasons[i], details[i] = "refusal", text[:120]
            else:
                chats[i].append({"role": "assistant", "content": text})
        goal = [target_turns(r["id"], self.config.min_turns, self.config.max_turns, self.config.seed)
                for r in records]
        notes = [""] * len(records)
        for turn in range(2, self.config.max_turns + 1):
            active = [i for i in range(len(records)) if reasons[i] is None and not notes[i] and goal[i] >= turn]
            if not active:
                break
            questions = self._follow_ups([chats[i] for i in active])
            asked = [(i, q) for i, q in zip(active, questions, strict=True) if q]
            for i, q in zip(active, questions, strict=True):
                if not q:
                    notes[i] = f"follow-up {turn} failed; stopped at {turn - 1} turn(s)"
            for i, q in asked:
                chats[i].append({"role": "user", "content": q})
            for (i, _), (text, err) in zip(asked, self._answer([chats[i] for i, _ in asked]), strict=True):
                if err or len(text) < self.config.min_answer_chars:
                    chats[i].pop()
                    notes[i] = f"answer to follow-up {turn} failed; stopped at {turn - 1} turn(s)"
                else:
                    chats[i].append({"role": "assistant", "content": text})
        ok = pa.array([r is None for r in reasons])
        conversations = [_to_turns(chats[i]) for i in range(len(records)) if reasons[i] is None]
        kept = table.filter(ok)
        kept = replace_column(kept, "conversations", pa.array(conversations, CONVERSATION_TYPE))
        kept = replace_column(kept, "turns_note", [notes[i] for i in range(len(records)) if reasons[i] is None],
                              pa.string())
        bad = [i for i in range(len(records)) if reasons[i] is not None]
        dropped = dropped_table(table.filter(pc.invert(ok)), [str(reasons[i]) for i in bad], [details[i] for i in bad])
        counters = self.drain_counters()
        counters["turns"] = float(sum(len(c) // 2 for c in conversations))
        return BatchResult(kept=kept, dropped=dropped, counters=counters)

    def _follow_ups(self, chats: list[list[Message]]) -> list[str]:
        task = self.prompts["follow_up"]
        results = self.user.run_task(task, [{"conversation": render_transcript(c)} for c in chats])
        return [str(r.value or "").strip().strip('"').strip() if r.failure is None else "" for r in results]


def _to_turns(messages: list[Message]) -> list[dict[str, Any]]:
    return [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in messages]


__all__ = ["RespondConfig", "RespondStep", "render_transcript", "target_turns", "to_messages"]
