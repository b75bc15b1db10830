"""transformers on CPU: the embedded default backend and the one the tests run.

Batches are left-padded so every row's generation starts at the same position; rows are grouped by
prompt length first so a batch pads little. The backend cannot constrain decoding to a JSON schema, so
structured output relies on the prompt, a tolerant JSON extraction and the client's repair retry.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from operators.llm.base import Backend, Generation, LLMConfig, LossScore, Message, SamplingConfig
from operators.llm.models import resolve_model
from operators.llm.scoring import scoring_ids, token_ids

log = logging.getLogger(__name__)


class TransformersBackend(Backend):
    """A causal LM from a local folder (or a packaged model), run with torch on CPU."""

    name = "transformers"

    def __init__(self, cfg: LLMConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.folder = resolve_model(cfg.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # fp32 on CPU: bf16 matmuls are slower on most CPUs and lose precision in loss scoring.
        self.model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32)
        self.model.eval()
        self._torch = torch
        self._lock = threading.Lock()
        self._model_id = f"{cfg.model}@{_weights_fingerprint(self.folder)}"

    @property
    def model_id(self) -> str:
        return self._model_id

    def chat(self, requests: list[list[Message]], sampling: SamplingConfig,
             json_schema: dict[str, Any] | None = None) -> list[Generation]:
        out: list[Generation | None] = [None] * len(requests)
        encoded = [self._prompt_ids(m) for m in requests]
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), self.cfg.batch_size):
            idx = order[start:start + self.cfg.batch_size]
            for i, gen in zip(idx, self._generate([encoded[i] for i in idx], sampling), strict=True):
                out[i] = gen
        return [g for g in out if g is not None]

    def _prompt_ids(self, messages: list[Message]) -> list[int]:
        # A trailing assistant message is a response prefix: continue it rather than open a new turn.
        prefixed = bool(messages) and messages[-1]["role"] == "assistant"
        ids = token_ids(self.tokenizer.apply_chat_template(messages, add_generation_prompt=not prefixed,
                                                           continue_final_message=prefixed, tokenize=True))
        return ids[-(self.cfg.max_model_len - 16):]  # keep the end: the instruction and the generation prompt

    def _generate(self, batch: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        torch = self._torch
        pad = self.tokenizer.pad_token_id
        shared = _shared_prefix(batch)
        if len(batch) < 2 or shared < MIN_SHARED_PREFIX:
            shared = 0
        # Rows are [shared prefix][pads][own suffix]: the prefix (system prompt, few-shot examples, the
        # taxonomy) is computed once and its KV cache copied to every row, so a batch pays the long common
        # part once instead of once per row. Position ids follow the attention mask, so the pads in the
        # middle change nothing (greedy outputs are identical; tested).
        tail = max(len(ids) for ids in batch) - shared
        input_ids = torch.tensor([batch[0][:shared] + [pad] * (tail - (len(ids) - shared)) + ids[shared:]
                                  for ids in batch])
        attention = torch.tensor([[1] * shared + [0] * (tail - (len(ids) - shared)) + [1] * (len(ids) - shared)
                                  for ids in batch])
        width = shared + tail
        max_new = max(1, min(sampling.max_tokens, self.cfg.max_model_len - width))
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": pad}
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with self._lock, torch.inference_mode():
            torch.manual_seed(sampling.seed)
            if shared:
                kwargs["cache"] = self._prefix_cache(input_ids[:1, :shared], len(batch), width + max_new)
            generated = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        results = []
        eos = self.tokenizer.eos_token_id
        for row, ids in zip(generated[:, width:].tolist(), batch, strict=True):
            n = row.index(eos) if eos in row else len(row)
            text = str(self.tokenizer.decode(row[:n], skip_special_tokens=True))
            finish = "stop" if n < len(row) else "length"
            for s in sampling.stop:
                if s and s in text:
                    text, finish = text[: text.index(s)], "stop"
            results.append(Generation(text=text, prompt_tokens=len(ids), completion_tokens=min(n + 1, len(row)),
                                      finish_reason=finish))
        return results

    def _prefix_cache(self, prefix: Any, rows: int, max_len: int) -> Any:
        """A static KV cache for `rows` rows holding `prefix`'s keys and values, computed once.

        Static rather than dynamic: a dynamic cache re-concatenates every layer's keys and values at each
        decoding step, which for a long shared prompt copies hundreds of MB per token (1.6x slower here).
        """
        torch = self._torch
        from transformers import DynamicCache, StaticCache

        once = self.model(input_ids=prefix, cache=DynamicCache(), use_cache=True).past_key_values
        cache = StaticCache(config=self.model.config, max_cache_len=max_len)
        positions = torch.arange(prefix.shape[1])
        for i, layer in enumerate(once.layers):
            cache.update(layer.keys.expand(rows, -1, -1, -1).contiguous(),
                         layer.values.expand(rows, -1, -1, -1).contiguous(), i, {"cache_position": positions})
        return cache

    def score_loss(self, prompts: list[list[Message]], answers: list[str]) -> list[LossScore]:
        torch = self._torch
        scores: list[LossScore] = []
        for prompt, answer in zip(prompts, answers, strict=True):
            ids, start = scoring_ids(self.tokenizer, prompt, answer)
            ids = ids[: self.cfg.max_model_len]
            if start >= len(ids):
                scores.append(LossScore(loss=float("nan"), answer_tokens=0))
                continue
            x = torch.tensor([ids])
            with self._lock, torch.inference_mode():
                logits = self.model(input_ids=x).logits[0, :-1].float()
            targets = x[0, 1:]
            nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[start - 1:]
            scores.append(LossScore(loss=float(nll.mean()), answer_tokens=int(nll.numel())))
        return scores


MIN_SHARED_PREFIX = 32  # below this, computing the prefix separately costs more than it saves


def _shared_prefix(batch: list[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own."""
    limit = min(len(ids) for ids in batch) - 1
    n = 0
    first = batch[0]
    while n < limit and all(ids[n] == first[n] for ids in batch):
        n += 1
    return n


def _weights_fingerprint(folder: str) -> str:
    """Short identity of the weights: size and mtime-free content hash of config + first MiB of weights."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        p = Path(folder) / name
        if p.is_file():
            h.update(str(p.stat().st_size).encode())
            with p.open("rb") as f:
                h.update(f.read(1 << 20))
    return h.hexdigest()[:12]
