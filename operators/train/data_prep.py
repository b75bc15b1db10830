"""`train_prep` step: conversations -> chat-template tokens with assistant-only labels, plus packing.

Per record: render the conversation with the model's own chat template, tokenize it once (with character
offsets), and label exactly the tokens of each assistant turn (its content and the end-of-turn token);
system and human tokens get -100. Each assistant turn's labeled tokens are decoded back and compared
with the turn's text, so a template or tokenizer that breaks the mapping drops the record as
`mask_mismatch` instead of silently training on the wrong tokens.

Records out = one row per kept record (ids, labels, counts, held-out split); the ledger holds 1:1.
Packing is a pure function over lengths (best-fit decreasing), applied again when training builds its
windows from whatever mix of sets a stage uses (stage 2 mixes two sets, so windows can't be fixed here);
this step reports the packing efficiency its rows reach on their own.

Drop reasons: `no_assistant_tokens` (no assistant turn, or truncation removed all of them), `too_long`
(longer than `max_seq_len` with truncation off), `template_error`, `mask_mismatch`.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from operators.core.step import BatchResult, Step, dropped_table
from operators.train.config import IGNORE_INDEX, PackMode, PrepConfig

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
TOKEN_COLUMNS = pa.schema([
    pa.field("id", pa.string()),
    pa.field("source", pa.string()),
    pa.field("replay", pa.bool_()),
    pa.field("split", pa.string()),
    pa.field("input_ids", pa.list_(pa.int32())),
    pa.field("labels", pa.list_(pa.int32())),
    pa.field("n_tokens", pa.int32()),
    pa.field("n_label_tokens", pa.int32()),
    pa.field("truncated", pa.bool_()),
])


class MaskError(ValueError):
    """The chat template or tokenizer does not map assistant text to tokens one-to-one."""

    def __init__(self, message: str, reason: str = "mask_mismatch") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Encoded:
    """One tokenized conversation: ids, labels, and the token range of each assistant turn."""

    input_ids: list[int]
    labels: list[int]
    assistant_spans: list[tuple[int, int]]


def to_messages(turns: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Canonical `conversations[{from, value}]` -> chat messages `[{role, content}]`."""
    out = []
    for t in turns:
        role = ROLES.get(str(t.get("from")))
        if role is None:
            raise MaskError(f"unknown role {t.get('from')!r}", "template_error")
        out.append({"role": role, "content": str(t.get("value") or "")})
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return str(text)


def assistant_char_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant reply (content + end of turn).

    The span of turn i starts where the template's generation prompt for turns[:i] ends and stops where
    turns[:i+1] ends (minus trailing whitespace: formatting between turns, not the reply). This needs a
    prefix-stable template (rendering a prefix of the turns gives a prefix of the text), which is checked.
    """
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise MaskError("conversation starts with an assistant turn", "template_error")
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise MaskError("chat template is not prefix-stable: cannot locate assistant turns", "template_error")
        spans.append((len(prompt), len(upto.rstrip())))
    return text, spans


def label_tokens(offsets: Sequence[tuple[int, int]], input_ids: Sequence[int],
                 char_spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Labels (token id inside an assistant span, else -100) and each span's token range [a, b)."""
    labels = [IGNORE_INDEX] * len(input_ids)
    token_spans = []
    starts = [o[0] for o in offsets]
    for cs, ce in char_spans:
        a = bisect.bisect_left(starts, cs)
        b = bisect.bisect_left(starts, ce)
        for j in range(a, b):
            labels[j] = int(input_ids[j])
        token_spans.append((a, b))
    return labels, token_spans


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> Encoded:
    """Tokenize one conversation with assistant-only labels, verified turn by turn (MaskError if not exact)."""
    out = encode_batch(tokenizer, [messages])[0]
    if isinstance(out, MaskError):
        raise out
    return out


def encode_batch(tokenizer: Any, conversations: Sequence[list[dict[str, str]]]) -> list[Encoded | MaskError]:
    """Encode many conversations in one tokenizer call; a failure comes back as its MaskError."""
    rendered: list[tuple[str, list[tuple[int, int]]] | MaskError] = []
    for msgs in conversations:
        try:
            rendered.append(assistant_char_spans(tokenizer, msgs))
        except MaskError as e:
            rendered.append(e)
        except Exception as e:  # a template that raises on odd content is a bad record, not a crash
            rendered.append(MaskError(f"chat template failed: {type(e).__name__}: {e}", "template_error"))
    texts = [r[0] if not isinstance(r, MaskError) else "" for r in rendered]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out: list[Encoded | MaskError] = []
    for k, r in enumerate(rendered):
        if isinstance(r, MaskError):
            out.append(r)
            continue
        text, char_spans = r
        ids = [int(x) for x in enc["input_ids"][k]]
        labels, token_spans = label_tokens(enc["offset_mapping"][k], ids, char_spans)
        try:
            _verify(tokenizer, text, ids, labels, char_spans, token_spans)
        except MaskError as e:
            out.append(e)
            continue
        out.append(Encoded(ids, labels, token_spans))
    return out


def _verify(tokenizer: Any, text: str, ids: list[int], labels: list[int], char_spans: Sequence[tuple[int, int]],
            token_spans: Sequence[tuple[int, int]]) -> None:
    """Every labeled token sits in an assistant span and decodes back to exactly that turn's text."""
    covered = 0
    for (cs, ce), (a, b) in zip(char_spans, token_spans, strict=True):
        decoded = tokenizer.decode(ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if decoded != text[cs:ce]:
            raise MaskError(f"assistant turn decodes to {decoded[:60]!r}, expected {text[cs:ce][:60]!r}")
        covered += b - a
    if sum(1 for x in labels if x != IGNORE_INDEX) != covered:
        raise MaskError("labels outside the assistant turns")


# ----------------------------------------------------------------------------------------------------
# Packing (pure)


def pack_lengths(lengths: Sequence[int], capacity: int, mode: PackMode = "position_ids") -> list[list[int]]:
    """Group sample indices into windows of at most `capacity` tokens (best-fit decreasing).

    `off` puts every sample in its own window. Within a window, samples keep their input order.
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"a sample of {max(lengths)} tokens exceeds the window of {capacity}")
    if mode == "off":
        return [[i] for i in range(len(lengths))]
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining tokens, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            rem, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (rem - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return [sorted(b) for b in bins]


def build_window(samples: Sequence[tuple[Sequence[int], Sequence[int]]], mode: PackMode = "position_ids"
                 ) -> dict[str, list[int]]:
    """Concatenate (input_ids, labels) samples into one window with its position ids.

    `position_ids` restarts positions at every sample: attention implementations that read packed
    sequences from position ids (transformers' masks, flash-attention varlen) then keep samples from
    attending to each other. `concat` continues positions (plain concatenation: samples can see earlier
    ones, for models without that support).
    """
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for s_ids, s_labels in samples:
        start = len(ids) if mode == "concat" else 0
        ids.extend(int(x) for x in s_ids)
        labels.extend(int(x) for x in s_labels)
        pos.extend(range(start, start + len(s_ids)))
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def packing_efficiency(lengths: Sequence[int], windows: Sequence[Sequence[int]], capacity: int) -> float:
    """Non-pad share of the windows' token slots (1.0 = no padding)."""
    return sum(lengths) / (len(windows) * capacity) if windows else 0.0


# ----------------------------------------------------------------------------------------------------
# The step


class TrainPrepStep(Step[PrepConfig]):
    """Tokenize, mask and split canonical records for training; packing statistics per batch."""

    name = "train_prep"
    version = 1
    config_model = PrepConfig


    def is_off(self) -> bool:
        return not self.config.enabled

    def __init__(self, config: PrepConfig) -> None:
        super().__init__(config)
        self._tokenizer: Any = None

    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded once (edge: reads the local model folder)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from operators.llm.models import resolve_model

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.config.model))
        return self._tokenizer

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        from operators.steps.select.step import hash_unit

        cfg = self.config
        table = pa.Table.from_batches([batch])
        ids = [str(x) for x in table.column("id").to_pylist()]
        turns = table.column("conversations").to_pylist()
        sources = table.column("source").to_pylist() if "source" in table.column_names else [None] * len(ids)
        replay = table.column("replay").to_pylist() if "replay" in table.column_names else [False] * len(ids)
        heldout = hash_unit(ids, cfg.seed, "heldout") < cfg.heldout_fraction
        convs: list[list[dict[str, str]] | MaskError] = []
        for t in turns:
            try:
                convs.append(to_messages(t or []))
            except MaskError as e:
                convs.append(e)
        good = [c for c in convs if not isinstance(c, MaskError)]
        encoded_iter = iter(encode_batch(self.tokenizer(), good) if good else [])
        encoded = [c if isinstance(c, MaskError) else next(encoded_iter) for c in convs]

        keep_idx: list[int] = []
        rows: dict[str, list[Any]] = {f.name: [] for f in TOKEN_COLUMNS}
        drop_idx: list[int] = []
        reasons: list[str] = []
        details: list[str] = []
        counters: Counter[str] = Counter()
        for i, enc in enumerate(encoded):
            if isinstance(enc, MaskError):
                drop_idx.append(i)
                reasons.append(enc.reason)
                details.append(str(enc)[:300])
                continue
            n = len(enc.input_ids)
            truncated = n > cfg.max_seq_len
            if truncated and not cfg.truncate:
                drop_idx.append(i)
                reasons.append("too_long")
                details.append(f"{n} tokens > max_seq_len {cfg.max_seq_len}")
                continue
            input_ids, labels = enc.input_ids[: cfg.max_seq_len], enc.labels[: cfg.max_seq_len]
            n_label = sum(1 for x in labels if x != IGNORE_INDEX)
            if n_label == 0:
                drop_idx.append(i)
                reasons.append("no_assistant_tokens")
                details.append("truncated before the first assistant token" if truncated else "no assistant turn")
                continue
            keep_idx.append(i)
            split = "heldout" if heldout[i] else "train"
            for key, value in (("id", ids[i]), ("source", sources[i]), ("replay", bool(replay[i] or False)),
                               ("split", split), ("input_ids", input_ids), ("labels", labels),
                               ("n_tokens", len(input_ids)), ("n_label_tokens", n_label), ("truncated", truncated)):
                rows[key].append(value)
            counters[f"{split}.samples"] += 1
            counters[f"{split}.tokens"] += len(input_ids)
            counters[f"{split}.label_tokens"] += n_label
            counters["truncated"] += int(truncated)
        for split in ("train", "heldout"):
            lengths = [n for n, s in zip(rows["n_tokens"], rows["split"], strict=True) if s == split]
            windows = pack_lengths(lengths, cfg.max_seq_len, cfg.pack)
            counters[f"{split}.windows"] += len(windows)
            counters[f"{split}.window_slots"] += len(windows) * cfg.max_seq_len
        kept = pa.table(rows, schema=TOKEN_COLUMNS)
        dropped = dropped_table(table.take(pa.array(drop_idx, pa.int64())), reasons, details)
        return BatchResult(kept=kept, dropped=dropped, counters=dict(counters))


def stats_summary(counters: dict[str, float]) -> dict[str, float]:
    """Packing efficiency and totals from a `train_prep` step's (additive) counters."""
    out: dict[str, float] = {}
    for split in ("train", "heldout"):
        slots = counters.get(f"{split}.window_slots", 0.0)
        out[f"{split}_samples"] = counters.get(f"{split}.samples", 0.0)
        out[f"{split}_tokens"] = counters.get(f"{split}.tokens", 0.0)
        out[f"{split}_packing_efficiency"] = round(counters.get(f"{split}.tokens", 0.0) / slots, 4) if slots else 0.0
    out["truncated"] = counters.get("truncated", 0.0)
    return out
