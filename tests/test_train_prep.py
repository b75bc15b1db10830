"""Fine-tuning configs and data preparation: batch arithmetic, masking token by token, packing without leakage.

Also holds the tiny corpora the other test_train_* files train on (real conversations in the canonical
schema, tokenized with the real SmolLM2 chat template), and the one-thread setting they all run torch with.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from operators.core.runner import read_step_table, run_all
from operators.schema import TURN_TYPE
from operators.train.config import IGNORE_INDEX, PrepConfig, TrainConfig, TwoStageConfig
from operators.train.data_prep import (
    TrainPrepStep,
    build_window,
    encode_conversation,
    pack_lengths,
    packing_efficiency,
    stats_summary,
    to_messages,
)
from tests.conftest import run_cli


def foundational_conv(i: int) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"What is {i} plus {i + 3}?"},
            {"from": "gpt", "value": f"{i} plus {i + 3} is {2 * i + 3}."}]


def conversational_conv(i: int) -> list[dict[str, str]]:
    return [{"from": "system", "value": "You are concise."},
            {"from": "human", "value": f"Name a color for item {i}."},
            {"from": "gpt", "value": "Blue is a calm color."},
            {"from": "human", "value": "Why?"},
            {"from": "gpt", "value": "Because it reminds people of the sky and the sea."}]


def write_set(folder: Path, kind: str, n: int) -> Path:
    """A canonical-schema Parquet file of `n` conversations (foundational ones carry a replay flag)."""
    folder.mkdir(parents=True, exist_ok=True)
    make = foundational_conv if kind == "f" else conversational_conv
    cols: dict[str, Any] = {
        "id": [f"{kind}{i}" for i in range(n)],
        "conversations": pa.array([make(i) for i in range(n)], pa.list_(TURN_TYPE)),
        "source": [kind] * n,
    }
    if kind == "f":
        cols["replay"] = [i % 4 == 0 for i in range(n)]
    pq.write_table(pa.table(cols), folder / "part-0.parquet")
    return folder


# torch on CPU runs one thread per core by default. On a 2-core machine whose other core is busy (another
# process of the same test, or anything else), its OpenMP threads wait on each other at every op and a
# 135M-parameter forward pass takes seconds instead of a fraction of one. Every training test therefore
# runs torch with one thread: in its child processes (this env) and in the pytest process (one_torch_thread).
SERIAL_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch in this process uses one thread inside the block (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare(tmp: Path, kind: str, n: int, max_seq_len: int = 128, heldout: float = 0.2) -> str:
    """Run the real `train_prep` step (in this process: its CLI door is exercised by the DAG test); returns
    its committed output dir."""
    raw = write_set(tmp / f"raw_{kind}", kind, n)
    out = tmp / f"prep_{kind}"
    m = run_all(TrainPrepStep(PrepConfig(max_seq_len=max_seq_len, heldout_fraction=heldout)), [str(raw)], str(out))
    assert m.stats.records_kept == n
    return str(out)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from operators.llm.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


# -- configs ------------------------------------------------------------------------------------------------


def test_paper_defaults_and_generated_deepspeed_config() -> None:
    cfg = TrainConfig(world_size=8, per_device_batch_size=1)
    assert (cfg.epochs, cfg.learning_rate, cfg.lr_scheduler, cfg.warmup_steps, cfg.max_seq_len) == (
        3.0, 5e-6, "cosine", 40, 4096)
    assert cfg.global_batch_size == 528 and cfg.grad_accum == 66  # 1 x 66 x 8
    ds = cfg.deepspeed_config()
    assert ds["train_batch_size"] == 528 and ds["gradient_accumulation_steps"] == 66
    assert ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    off = TrainConfig(optimizer="deepspeed_adamw", offload_optimizer=True, offload_params=True).deepspeed_config()
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert off["optimizer"]["type"] == "AdamW"


@pytest.mark.parametrize("fields, bad_field", [
    ({"global_batch_size": 528, "per_device_batch_size": 5}, "global_batch_size"),
    ({"global_batch_size": 16, "per_device_batch_size": 2, "gradient_accumulation_steps": 3}, "global_batch_size"),
    ({"offload_optimizer": True}, "offload_optimizer"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"zero_stage": 1}, "zero_stage"),
])
def test_bad_train_config_names_the_field(fields: dict[str, Any], bad_field: str) -> None:
    with pytest.raises(ValidationError) as e:
        TrainConfig(**fields)
    assert bad_field in [str(err["loc"][0]) for err in e.value.errors()]


def test_two_stage_config_validates_uris_and_cli_exits_2(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as e:
        TwoStageConfig(foundational="ftp://x/y", conversational=str(tmp_path))
    assert e.value.errors()[0]["loc"] == ("foundational",)
    r = run_cli("train", "--stage", "stage1", "--config",
                f'{{"foundational": "{tmp_path}", "conversational": "{tmp_path}", "stage1": {{"global_batch_size": 7,'
                ' "per_device_batch_size": 2}}', "--output", str(tmp_path / "ft"))
    assert r.returncode == 2
    assert "stage1.global_batch_size" in r.stderr
    assert not (tmp_path / "ft").exists()


# -- masking ------------------------------------------------------------------------------------------------


def test_labels_are_exactly_the_assistant_tokens(tokenizer: Any) -> None:
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2+2?"},
             {"from": "gpt", "value": "4.\nIt is four."}, {"from": "human", "value": "And 3+3? 日本"},
             {"from": "gpt", "value": " Six, 日本語 ok "}]
    messages = to_messages(turns)
    enc = encode_conversation(tokenizer, messages)
    assert len(enc.input_ids) == len(enc.labels)
    assert len(enc.assistant_spans) == 2
    # Token by token: inside an assistant span the label is the token itself, everywhere else -100.
    inside = {j for a, b in enc.assistant_spans for j in range(a, b)}
    for j, (tok, lab) in enumerate(zip(enc.input_ids, enc.labels, strict=True)):
        assert lab == (tok if j in inside else IGNORE_INDEX), j
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for (a, b), reply in zip(enc.assistant_spans, ("4.\nIt is four.", " Six, 日本語 ok "), strict=True):
        # The turn's labeled tokens are its text plus the end-of-turn token, nothing of the prompt.
        assert tokenizer.decode(enc.input_ids[a:b]) == reply + "<|im_end|>"
        assert enc.input_ids[b - 1] == end
        assert tokenizer.decode(enc.input_ids[a - 3:a]).endswith("assistant\n")  # the header stays masked
    masked_text = tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab == IGNORE_INDEX])
    for prompt in ("Be brief.", "What is 2+2?", "And 3+3? 日本"):
        assert prompt in masked_text
    # Per turn: system and human turns contribute no label at all.
    assert sum(lab != IGNORE_INDEX for lab in enc.labels) == sum(b - a for a, b in enc.assistant_spans)


# -- packing ------------------------------------------------------------------------------------------------


def test_best_fit_packing_and_window_positions() -> None:
    lengths = [90, 60, 40, 30, 10, 8, 2, 70]
    bins = pack_lengths(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) == 4 and packing_efficiency(lengths, bins, 100) == pytest.approx(310 / 400)
    assert pack_lengths(lengths, 100, "off") == [[i] for i in range(len(lengths))]
    w = build_window([([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9])])
    assert w == {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]}
    assert build_window([([5, 6], [5, 6]), ([8], [8])], "concat")["position_ids"] == [0, 1, 2]
    with pytest.raises(ValueError):
        pack_lengths([101], 100)


def test_packed_samples_do_not_attend_to_each_other(tokenizer: Any) -> None:
    """Logits of each sample inside a packed window equal its logits alone (no cross-sample leakage)."""
    import torch
    from transformers import AutoModelForCausalLM

    from operators.llm.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"), dtype=torch.float32).eval()
    a = encode_conversation(tokenizer, to_messages(foundational_conv(3)))
    b = encode_conversation(tokenizer, to_messages(conversational_conv(1)))
    w = build_window([(a.input_ids, a.labels), (b.input_ids, b.labels)])
    with torch.inference_mode(), one_torch_thread():
        packed = model(input_ids=torch.tensor([w["input_ids"]]), position_ids=torch.tensor([w["position_ids"]]),
                       use_cache=False).logits[0]
        alone_b = model(input_ids=torch.tensor([b.input_ids]), use_cache=False).logits[0]
        leaky = model(input_ids=torch.tensor([w["input_ids"]]), use_cache=False).logits[0]
    n = len(a.input_ids)
    assert torch.allclose(packed[n:], alone_b, atol=1e-3)
    assert not torch.allclose(leaky[n:], alone_b, atol=1e-3)  # plain concatenation would leak


# -- the step -----------------------------------------------------------------------------------------------


def test_prep_step_ledger_drops_and_stats(tmp_path: Path) -> None:
    rows = [foundational_conv(i) for i in range(30)]
    rows.append([{"from": "human", "value": "no answer here"}])  # no assistant turn
    rows.append([{"from": "human", "value": "long " * 200}, {"from": "gpt", "value": "ok"}])  # too long
    t = pa.table({"id": [f"r{i}" for i in range(len(rows))], "conversations": pa.array(rows, pa.list_(TURN_TYPE)),
                  "source": ["s"] * len(rows), "replay": [i < 5 for i in range(len(rows))]})
    (tmp_path / "raw").mkdir()
    pq.write_table(t, tmp_path / "raw" / "part-0.parquet")
    cfg = PrepConfig(max_seq_len=128, heldout_fraction=0.2)
    m = run_all(TrainPrepStep(cfg), [str(tmp_path / "raw")], str(tmp_path / "prep"))
    assert m.stats.records_in == 32 and m.stats.records_kept == 30
    assert m.stats.dropped_by_reason == {"no_assistant_tokens": 1, "too_long": 1}
    out = read_step_table(f"file://{tmp_path}/prep")
    assert set(out["split"].to_pylist()) == {"train", "heldout"}
    assert sum(out["replay"].to_pylist()) == 5
    for ids, labels in zip(out["input_ids"].to_pylist(), out["labels"].to_pylist(), strict=True):
        assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(ids, labels, strict=True))
    s = stats_summary(m.stats.counters)
    assert s["train_samples"] + s["heldout_samples"] == 30
    assert 0.5 < s["train_packing_efficiency"] <= 1.0
    # Truncation on: the long record is cut to the window; its answer is gone, so it is dropped with a reason.
    m2 = run_all(TrainPrepStep(PrepConfig(max_seq_len=128, truncate=True)), [str(tmp_path / "raw")],
                 str(tmp_path / "prep2"))
    assert m2.stats.dropped_by_reason == {"no_assistant_tokens": 2}
