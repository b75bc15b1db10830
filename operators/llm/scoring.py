"""How an answer is laid out for loss scoring, shared by every backend so their losses agree.

Answer loss with the prompt (for difficulty and IFD's numerator): the conversation `prompt + [assistant:
answer]` rendered with the model's chat template; the loss averages the tokens after the rendered prompt
(with its generation prompt), i.e. the answer and its end-of-turn marker. Answer loss alone (IFD's
denominator): the raw answer text tokenized without any template; the first token has no context, so the
loss averages tokens 2..n (Li et al. 2024, "From Quantity to Quality", score the answer the same way).
"""

from __future__ import annotations

from typing import Any

from operators.llm.base import Message


def scoring_ids(tokenizer: Any, prompt: list[Message], answer: str) -> tuple[list[int], int]:
    """Token ids of (prompt, answer) and the index of the first answer token whose loss counts."""
    if not prompt:
        ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        return ids, 1
    head = token_ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
    full = token_ids(tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}],
                                              tokenize=True))
    # Templates render the prompt identically as a prefix; fall back to the shared prefix if one doesn't.
    start = len(head)
    if full[:start] != head:
        start = next((i for i, (a, b) in enumerate(zip(full, head, strict=False)) if a != b), len(head))
    return full, max(start, 1)


def token_ids(rendered: Any) -> list[int]:
    """Ids from apply_chat_template, which returns a list or (newer transformers) a BatchEncoding."""
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    return [int(t) for t in rendered]
