"""The run report: funnel per step, drops by reason, samples of kept and dropped records.

Reads only what steps committed (step manifests and stats), so it can be rebuilt at any time and the
Airflow plugin can serve it without calling step code. Written as report.json (machine-readable),
report.md and report.html beside the data.
"""

from __future__ import annotations

import html
import json
from typing import Any

import pyarrow.parquet as pq

from operators.core import storage
from operators.core.manifest import MANIFEST_NAME, Manifest, read_manifest

SAMPLES = 3


def _find_steps(root: str) -> list[tuple[str, Manifest]]:
    steps = []
    for uri in storage.list_files(root):
        if uri.endswith("/" + MANIFEST_NAME) and "/_stages/" not in uri:
            step_dir = uri[: -len(MANIFEST_NAME) - 1]
            m = read_manifest(uri)
            if m is not None:
                steps.append((step_dir, m))
    return sorted(steps, key=lambda s: s[1].created_at)


def _sample(step_dir: str, m: Manifest, kind: str, n: int) -> list[dict[str, Any]]:
    for f in m.files:
        if f.kind == kind and f.rows:
            with storage.open_input(storage.join(step_dir, f.path)) as fh:
                rows = pq.ParquetFile(fh).read_row_group(0).slice(0, n).to_pylist()
            return [{k: (v[:300] + "…" if isinstance(v, str) and len(v) > 300 else v) for k, v in r.items()}
                    for r in rows]
    return []


def build_report(root: str) -> dict[str, Any]:
    """Collect every committed step under `root` into one report dict."""
    root = storage.validate_uri(root)
    steps = []
    for step_dir, m in _find_steps(root):
        s = m.stats
        steps.append({
            "step": m.step,
            "dir": step_dir[len(root):].lstrip("/") or ".",
            "config_hash": m.config_hash,
            "shards": s.shards,
            "records_in": s.records_in,
            "records_kept": s.records_kept,
            "records_dropped": s.records_dropped,
            "keep_rate": round(s.records_kept / s.records_in, 4) if s.records_in else None,
            "dropped_by_reason": s.dropped_by_reason,
            "seconds": s.seconds,
            "records_per_s": round(s.records_in / s.seconds, 1) if s.seconds else None,
            "peak_rss_mb": s.peak_rss_mb,
            "bytes_in": s.bytes_in,
            "bytes_out": s.bytes_out,
            "counters": s.counters,
            "kept_samples": _sample(step_dir, m, "data", SAMPLES),
            "dropped_samples": _sample(step_dir, m, "dropped", SAMPLES),
        })
    return {"root": root, "steps": steps, "llm": _llm_totals(steps), "diagnosis": _diagnosis(steps)}


def _llm_totals(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Tokens, cost and cache hits of every LLM step of the run, summed over all model roles."""
    totals: dict[str, float] = {}
    for s in steps:
        for k, v in s["counters"].items():
            if k.startswith("llm."):
                name = k.rsplit(".", 1)[-1]
                if name in ("prompt_tokens", "completion_tokens", "scored_tokens", "cache_hits", "cost_usd",
                            "backend_requests", "invalid", "repaired"):
                    totals[name] = round(totals.get(name, 0.0) + v, 6)
    return dict(sorted(totals.items()))


def _diagnosis(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: mean judge score per ability and candidate model (from diagnose steps' counters)."""
    from operators.steps.synth.diagnose import ability_scores

    return [{"step": s["dir"], "scores": ability_scores(s["counters"])} for s in steps if s["step"] == "diagnose"]


def render_markdown(report: dict[str, Any]) -> str:
    """Human-readable report."""
    lines = [f"# Run report: {report['root']}", "", "## Funnel", "",
             "| step | in | kept | dropped | keep rate | records/s | peak MiB |", "|---|---|---|---|---|---|---|"]
    for s in report["steps"]:
        lines.append(f"| {s['dir']} | {s['records_in']} | {s['records_kept']} | {s['records_dropped']} | "
                     f"{s['keep_rate']} | {s['records_per_s']} | {s['peak_rss_mb']} |")
    if report.get("llm"):
        lines += ["", "## LLM usage (all steps, all roles)", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v:g} |" for k, v in report["llm"].items()]
    for d in report.get("diagnosis", []):
        models = sorted({m for per in d["scores"].values() for m in per})
        lines += ["", f"## Ability scores: {d['step']} (mean judge score, 1-10)", ""]
        if not models:
            lines.append("No probe was judged (see the step's `judge_failures.*`).")
            continue
        lines += ["| ability | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(str(per.get(m, "")) for m in models) + " |"
                  for a, per in d["scores"].items()]
    for s in report["steps"]:
        lines += ["", f"## {s['dir']} ({s['step']}, config {s['config_hash']})", "", "Drops by reason:", ""]
        lines += [f"- `{r}`: {n}" for r, n in s["dropped_by_reason"].items()] or ["- none"]
        if s["counters"]:
            # Stage summaries and step figures: domain mix (decide.chosen.*), KL reduction (kl.*), DSIR
            # weight histograms (log_weight_hist.*), duplicates found (resolve.*).
            lines += ["", "Figures:", "", "| figure | value |", "|---|---|"]
            lines += [f"| `{k}` | {v:g} |" for k, v in sorted(s["counters"].items())]
        if s["dropped_samples"]:
            lines += ["", "Dropped samples:", ""]
            lines += [f"- `{d.get('reason')}` {d.get('detail', '')}: `{str(d.get('raw', ''))[:160]}`"
                      for d in s["dropped_samples"]]
    return "\n".join(lines) + "\n"


def render_html(report: dict[str, Any]) -> str:
    """Standalone HTML page of the report (served by the Airflow plugin)."""
    body = html.escape(render_markdown(report))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>IIP report</title></head>"
            f"<body><pre>{body}</pre></body></html>")


def write_report(root: str) -> dict[str, str]:
    """Build the report for `root` and write report.json/.md/.html there; returns their URIs."""
    report = build_report(root)
    out = {
        "json": storage.join(root, "report.json"),
        "markdown": storage.join(root, "report.md"),
        "html": storage.join(root, "report.html"),
    }
    storage.write_bytes(out["json"], json.dumps(report, indent=2, default=str).encode())
    storage.write_bytes(out["markdown"], render_markdown(report).encode())
    storage.write_bytes(out["html"], render_html(report).encode())
    return out
