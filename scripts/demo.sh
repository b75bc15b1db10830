#!/usr/bin/env bash
# The main job on the embedded default: local files, SQLite Airflow metadata, local step processes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/.venv/bin
export AIRFLOW_HOME=$ROOT/.airflow/demo
export AIRFLOW__CORE__DAGS_FOLDER=$ROOT/dags
export AIRFLOW__CORE__PLUGINS_FOLDER=$ROOT/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export IIP_DATA_ROOT=${IIP_DATA_ROOT:-$ROOT/.data}
export IIP_EXECUTION_MODE=local
RAW=$IIP_DATA_ROOT/raw/demo
mkdir -p "$AIRFLOW_HOME"

echo "== Airflow metadata DB (SQLite) at $AIRFLOW_HOME"
# The editable install leaves the repository uncompiled; each step process would compile it again.
$BIN/python -m compileall -q -j 0 "$ROOT/operators" "$ROOT/dags" "$ROOT/plugins" >/dev/null
$BIN/airflow db migrate >"$AIRFLOW_HOME/migrate.log" 2>&1 || { tail -20 "$AIRFLOW_HOME/migrate.log"; exit 1; }

echo "== demo corpus -> $RAW"
[ -f "$RAW/malformed.jsonl" ] || $BIN/python scripts/demo_corpus.py --out "$RAW"

echo "== ingest_source (plan -> ingest per shard -> reduce -> report) via airflow dags test"
CONF=$(printf '{"source_uri": "%s", "source_name": "sharegpt_demo", "target_shard_mb": 32}' "$RAW")
$BIN/airflow dags test ingest_source -c "$CONF" >"$AIRFLOW_HOME/ingest_source.log" 2>&1 \
  || { grep -E "ERROR|error|Traceback" "$AIRFLOW_HOME/ingest_source.log" | tail -30; exit 1; }

OUT=$IIP_DATA_ROOT/sources/sharegpt_demo
$BIN/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
stats = json.load(open(f"{out}/ingest/stats.json"))
print(f"ingest: in {stats['records_in']}, kept {stats['records_kept']}, dropped "
      f"{sum(stats['dropped_by_reason'].values())} {stats['dropped_by_reason']}")
print(f"output   : {out}/ingest  (part-*.parquet, listed in _MANIFEST.json)")
print(f"dropped  : {out}/ingest/dropped  (raw record + reason + detail)")
print(f"stats    : {out}/ingest/stats.json")
print(f"report   : {out}/report.md  (also report.html, report.json)")
PY
echo "Airflow log of this run: $AIRFLOW_HOME/ingest_source.log"

echo "== foundational_selection (filter -> pii -> exact_dedup -> near_dedup -> decontaminate -> route -> dsir -> select -> validate -> export)"
CONF='{"sources": ["sharegpt_demo"], "run_name": "demo", "budgets": {"math": 0.5, "code": 0.3, "general": 0.2}}'
$BIN/airflow dags test foundational_selection -c "$CONF" >"$AIRFLOW_HOME/foundational_selection.log" 2>&1 \
  || { grep -E "ERROR|error|Traceback" "$AIRFLOW_HOME/foundational_selection.log" | tail -30; exit 1; }
RUN=$IIP_DATA_ROOT/runs/demo
$BIN/python - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
from operators.core.registry import FOUNDATIONAL_STEPS
for step in FOUNDATIONAL_STEPS:
    s = json.load(open(f"{run}/{step}/stats.json"))
    print(f"{step:14s} in {s['records_in']:6d}  kept {s['records_kept']:6d}  dropped {s['dropped_by_reason']}")
c = json.load(open(f"{run}/select/stats.json"))["counters"]
print("KL reduction (DSIR vs random, same size):", {k.split('.')[-1]: v for k, v in c.items() if 'kl_reduction' in k})
print(f"foundational set : {run}/export  (parquet/, hf/, sharegpt/; replay split for stage 2)")
print(f"validation       : {run}/select/validation.html")
print(f"report           : {run}/report.md")
PY

echo "== conversational_synthesis (label -> label_vocab -> seed_score -> seed_select -> evolve -> respond -> diagnose"
echo "   -> supplement round -> conversational_set), on the packaged SmolLM2-135M-Instruct on CPU, tiny budgets"
CONF='{"foundational": "demo", "run_name": "demo-synthesis", "pool_budgets": {"math": 3, "code": 3, "general": 3},
       "seed_budget": 4, "supplement_budget": 2, "evolution_rounds": 2, "max_new_tokens": 48,
       "min_turns": 2, "max_turns": 3, "probes_per_ability": 1, "min_label_samples": 2}'
$BIN/airflow dags test conversational_synthesis -c "$CONF" >"$AIRFLOW_HOME/conversational_synthesis.log" 2>&1 \
  || { grep -E "ERROR|error|Traceback" "$AIRFLOW_HOME/conversational_synthesis.log" | tail -30; exit 1; }
SYN=$IIP_DATA_ROOT/runs/demo-synthesis
$BIN/python - "$SYN" <<'PY'
import json, sys
run = sys.argv[1]
for step in ("pool", "label", "label_vocab", "seed_score", "seed_select_r1", "evolve_r1", "respond_r1", "diagnose_r1",
             "seed_select_r2", "evolve_r2", "respond_r2", "conversational_set"):
    s = json.load(open(f"{run}/{step}/stats.json"))
    print(f"{step:18s} in {s['records_in']:5d}  kept {s['records_kept']:5d}  dropped {s['dropped_by_reason']}")
r = json.load(open(f"{run}/report.json"))
print("LLM usage:", r["llm"])
for d in r["diagnosis"]:
    print(f"ability scores ({d['step']}):", d["scores"])
print(f"conversational set : {run}/export")
print(f"report             : {run}/report.md")
PY

echo "== two_stage_finetune (train_prep -> stage 1 -> eval -> stage 2 with replay -> eval), DeepSpeed ZeRO-3 on CPU"
CONF=$(printf '{"foundational": "%s", "conversational": "%s", "run_name": "demo-finetune", "mode": "two_stage",
  "max_seq_len": 256, "bf16": false, "gradient_checkpointing": false, "train_layers": 2, "learning_rate": 5e-4,
  "warmup_steps": 0, "global_batch_size": 2, "max_steps": 4, "save_steps": 100, "heldout_fraction": 0.1,
  "evaluation": {"max_new_tokens": 32, "heldout_max_windows": 4, "chat_questions": null, "benchmarks": [
    {"name": "arithmetic", "uri": "builtin://arithmetic", "format": "gsm8k", "limit": 8},
    {"name": "humaneval", "uri": "humaneval://", "format": "humaneval", "limit": 4},
    {"name": "arithmetic_mc", "uri": "builtin://arithmetic_mc", "format": "mmlu", "limit": 8}]}}' \
  "$IIP_DATA_ROOT/runs/demo/select" "$SYN/conversational_set")
$BIN/airflow dags test two_stage_finetune -c "$CONF" >"$AIRFLOW_HOME/two_stage_finetune.log" 2>&1 \
  || { grep -E "ERROR|error|Traceback" "$AIRFLOW_HOME/two_stage_finetune.log" | tail -30; exit 1; }
FT=$IIP_DATA_ROOT/runs/demo-finetune/finetune
cat "$FT/eval_report.md"
echo "models: $FT/stage1/model, $FT/stage2/model (Hugging Face format)"
echo
echo "== done. See it in the Airflow UI: make airflow  (then open http://127.0.0.1:8080/, log in as printed;"
echo "   each run has a Report tab, and Browse > Dataset reports lists every run's report)"
