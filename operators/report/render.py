"""Rendering: the report dict + its figures -> one self-contained HTML page (inline CSS and SVG, no script, no
CDN), readable offline or as an e-mail attachment; plus one small page per step for the task view, and Markdown.

Everything from the data is escaped: sample texts are user data and may contain markup.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from typing import Any

from operators.report import charts
from operators.report.figures import Figure, fmt

CSS = """
:root{--fg:#0f172a;--muted:#64748b;--line:#e2e8f0;--bg:#f8fafc;--ok:#16a34a;--bad:#dc2626;--accent:#2563eb}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;
color:var(--fg);background:#fff}header{padding:16px 24px;background:var(--bg);border-bottom:1px solid var(--line)}
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;padding-top:8px;border-top:1px solid var(--line)}
h3{font-size:15px;margin:18px 0 6px}main{padding:0 24px 40px;max-width:1180px}
nav a{margin-right:14px;color:var(--accent);text-decoration:none}.meta{color:var(--muted);font-size:13px}
.kpis{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}.kpi{border:1px solid var(--line);border-radius:8px;
padding:8px 14px;min-width:140px;background:#fff}.kpi b{display:block;font-size:20px}.kpi span{color:var(--muted);
font-size:12px}figure{margin:10px 0 14px;max-width:100%;overflow-x:auto}figcaption{color:var(--muted);font-size:12px;
margin-top:2px}table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}th,td{border:1px solid var(--line);
padding:3px 8px;text-align:left;vertical-align:top}th{background:var(--bg)}td.n{text-align:right;
font-variant-numeric:tabular-nums}details{margin:4px 0 10px}summary{cursor:pointer;color:var(--accent)}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid var(--line);border-radius:8px;padding:8px 12px;
margin:8px 0;background:#fff;flex:1 1 420px;min-width:300px}.turn{white-space:pre-wrap;word-break:break-word;
margin:4px 0;padding:6px 8px;border-radius:6px;font-size:13px;max-height:220px;overflow:auto}.human{background:#eff6ff}
.gpt{background:#f0fdf4}.raw{background:#fef2f2;font-family:ui-monospace,monospace}.bench{background:#fff7ed}
.label{font-size:11px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}.reason{font-weight:600}
.ftitle{font-weight:600;margin:4px 0}.pass{color:var(--ok);font-weight:600}.fail{color:var(--bad);font-weight:600}
code{font-size:12px}
"""


def e(value: object) -> str:
    """Escape for HTML text and attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def anchor(step_dir: str) -> str:
    """The id of a step's section (also the name of its page)."""
    return "step-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in step_dir)


def table(headers: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    """An HTML table; numbers right-aligned and formatted."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f"<td class='n'>{fmt(c)}</td>" if isinstance(c, int | float) and not isinstance(c, bool) else f"<td>{e(c)}</td>"
        for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(fig: Figure) -> str:
    """A chart with its caption and, folded under it, the same numbers as a table."""
    return (f"<figure><div class='ftitle'>{e(fig.title)}</div>{fig.svg}<figcaption>{e(fig.caption)}</figcaption>"
            f"<details><summary>numbers: {e(fig.title)}</summary>{table(fig.headers, fig.rows)}</details></figure>")


def _turn(kind: str, label: str, text: str) -> str:
    return f"<div class='label'>{e(label)}</div><div class='turn {kind}'>{e(text) or '<i>(empty)</i>'}</div>"


def _detail(detail: Any) -> str:
    if isinstance(detail, dict):
        keys = [k for k in detail if k not in ("matched_text", "benchmark_prompt")]
        return "<br>".join(f"<span class='label'>{e(k)}</span> {e(detail[k])}" for k in keys)
    return f"<span class='label'>detail</span> {e(detail)}" if detail else ""


def sample_card(s: dict[str, Any]) -> str:
    """One dropped record, readable: its first exchange, why it was dropped, and what it was compared with."""
    parts = [f"<div class='card'><div class='reason'>{e(s.get('reason'))}</div>",
             f"<div class='meta'>id {e(s.get('id'))}{' · source ' + e(s['source']) if s.get('source') else ''}</div>",
             _detail(s.get("detail"))]
    if s.get("human") or s.get("answer"):
        parts += [_turn("human", "human", s.get("human", "")), _turn("gpt", "answer", s.get("answer", ""))]
    elif s.get("raw"):
        parts.append(_turn("raw", "raw input", s["raw"]))
    d = s.get("detail")
    if isinstance(d, dict) and (d.get("matched_text") or d.get("benchmark_prompt")):
        parts.append(_turn("raw", "matched text in this record", d.get("matched_text", "")))
        parts.append(_turn("bench", f"benchmark prompt ({d.get('benchmark', '?')} item {d.get('item', '?')})",
                           d.get("benchmark_prompt", "")))
    parts.append("</div>")
    if s.get("survivor"):
        sv = s["survivor"]
        parts.append(f"<div class='card'><div class='reason'>kept instead (survivor)</div>"
                     f"<div class='meta'>id {e(sv.get('id'))}</div>{_turn('human', 'human', sv.get('human', ''))}"
                     f"{_turn('gpt', 'answer', sv.get('answer', ''))}</div>")
        return f"<div class='grid'>{''.join(parts)}</div>"
    return "".join(parts)


def _shards(s: dict[str, Any]) -> str:
    """'15', or '15 (14 reused)' when an incremental run reused committed shards (their seconds are the
    original run's: the figures describe the output, not tonight's work)."""
    reused = int(s.get("counters", {}).get("shards_reused", 0))
    return f"{s['shards']} ({reused} reused)" if reused else str(s["shards"])


def _pii(p: dict[str, Any]) -> str:
    """Personal data found per type, what was done with it, and masked samples (never a value)."""
    if not p["types"]:
        return "<p>No personal data or secrets found.</p>"
    rows = [(t, c["found"], c["redacted"], c["dropped"], c["flagged"], ", ".join(p["samples"].get(t, [])))
            for t, c in p["types"].items()]
    return (f"<h4>Personal data and secrets: {fmt(p['records_redacted'])} records redacted, "
            f"{fmt(p['records_flagged'])} flagged</h4>"
            + table(("type", "found", "redacted", "dropped (records' values)", "flagged", "masked samples"), rows))


def step_section(s: dict[str, Any]) -> str:
    """A step's numbers, its drops by reason (chart + table) and readable samples of each reason."""
    out = [f"<section id='{anchor(s['dir'])}'><h3>{e(s['dir'])} <span class='meta'>({e(s['step'])}, "
           f"config {e(s['config_hash'])})</span></h3>",
           table(("records in", "kept", "dropped", "keep rate", "shards", "seconds", "records/s", "peak MiB"),
                 [(s["records_in"], s["records_kept"], s["records_dropped"],
                   f"{s['keep_rate']:.2%}" if s["keep_rate"] is not None else "–", _shards(s), s["seconds"],
                   s["records_per_s"] or "–", s["peak_rss_mb"])])]
    if s.get("pii"):
        out.append(_pii(s["pii"]))
    if s["dropped_by_reason"]:
        out.append(figure(charts.drops_of_step(s)))
    for reason, samples in s.get("dropped_samples", {}).items():
        out.append(f"<details{' open' if reason == next(iter(s['dropped_samples'])) else ''}><summary>"
                   f"{len(samples)} sample(s) dropped as <b>{e(reason)}</b> "
                   f"({fmt(s['dropped_by_reason'].get(reason, 0))} in all)</summary>"
                   + "".join(sample_card(x) for x in samples) + "</details>")
    if s["counters"]:
        out.append("<details><summary>all counters of this step</summary>"
                   + table(("counter", "value"), sorted(s["counters"].items())) + "</details>")
    out.append("</section>")
    return "".join(out)


def _kpis(report: dict[str, Any]) -> str:
    steps = report["steps"]
    if not steps:
        return ""
    first, last = steps[0], steps[-1]
    seconds = sum(s["seconds"] for s in steps)
    items = [("records in (first step)", fmt(first["records_in"])), ("kept (last step)", fmt(last["records_kept"])),
             ("overall keep rate", f"{last['records_kept'] / first['records_in']:.2%}" if first["records_in"] else "–"),
             ("steps", str(len(steps))), ("step seconds", fmt(round(seconds, 1)))]
    if report.get("llm", {}).get("completion_tokens"):
        items.append(("LLM tokens out", fmt(report["llm"]["completion_tokens"])))
    return "<div class='kpis'>" + "".join(f"<div class='kpi'><b>{e(v)}</b><span>{e(k)}</span></div>"
                                           for k, v in items) + "</div>"


def _header(report: dict[str, Any], title: str) -> str:
    run = report.get("run") or {}
    who = " · ".join(f"{k.replace('_', ' ')} {v}" for k, v in run.items() if k in ("dag_id", "run_id", "logical_date")
                     and v)
    return (f"<header><h1>{e(title)}</h1><div class='meta'>{e(who) or 'run'} · root <code>{e(report['root'])}</code>"
            f" · generated {e(report.get('generated_at', ''))}</div></header>")


def _page(title: str, header: str, body: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width,initial-scale=1'><title>{e(title)}</title><style>{CSS}</style></head>"
            f"<body>{header}<main>{body}</main></body></html>")


def _selection(report: dict[str, Any]) -> str:
    sel = report.get("selection") or {}
    prof = report.get("kept_profile")
    if not sel and not prof:
        return ""
    out = ["<h2 id='selection'>Selection</h2>"]
    if "domain_mix" in sel:
        out.append(figure(charts.domain_mix(sel["domain_mix"])))
    if "kl" in sel:
        out.append("<h3>DSIR: KL divergence to each domain's target (lower is closer)</h3>" + table(
            ("domain", "KL selected", "KL random (same size)", "reduction"),
            [(d, v["selected"], v["random"], v["reduction"]) for d, v in sel["kl"].items()]))
    if "ablation" in sel:
        out.append(_ablation(sel["ablation"]))
    for domain, bins in (sel.get("dsir_log_weight_hist") or {}).items():
        out.append(figure(charts.dsir_histogram(domain, bins)))
    for step_dir, bins in (sel.get("cluster_sizes") or {}).items():
        out.append(figure(charts.cluster_sizes(step_dir, bins)))
    if prof:
        sampled = f"; profile of a sample of {fmt(prof['sampled'])} spread over its parts" if "sampled" in prof else ""
        out.append(f"<h3>The kept set ({e(prof['dir'])}: {fmt(prof['records'])} records, median "
                   f"{fmt(prof['median_chars'])} characters{sampled})</h3><div class='grid'>")
        out += [f"<div>{figure(f)}</div>" for f in charts.kept_profile(prof)]
        out.append("</div>")
    return "".join(out)


def _ablation(ab: dict[str, Any]) -> str:
    """The selection ablation: the DSIR selection beside a random one of the same size per domain."""
    names = [ab["main"], *ab["others"]]
    head = ["domain", "pool"] + [f"{n}: chosen" for n in names] + [f"{n}: KL to target" for n in names]
    rows = [(r["domain"], r["pool"], *[r.get(f"{k}.chosen") for k in ("selection", *ab["others"])],
             *[r.get(f"{k}.kl") for k in ("selection", *ab["others"])]) for r in ab["rows"]]
    return ("<h3 id='selection-ablation'>Selection ablation: DSIR against random (same size per domain)</h3>"
            "<p class='muted'>Both chose from the same pool under the same budgets; a lower KL divergence to the "
            "domain's target means the selection looks more like it (a domain without a DSIR target has no KL). "
            "The random column here is the ablation's own selection; the KL table above compares with a random "
            "sample that <code>select</code> draws to estimate it, so their random figures differ a little. "
            "Training on each: the fine-tune run's report (two_stage_finetune with "
            "<code>ablation_foundational</code>).</p>" + table(head, rows))


def _phase2(report: dict[str, Any]) -> str:
    p2 = report.get("phase2") or {}
    if not p2:
        return ""
    out = ["<h2 id='phase2'>Conversational synthesis</h2>"]
    if p2.get("abilities"):
        out.append(figure(charts.abilities(p2["abilities"])))
    if p2.get("top_tags"):
        out.append(figure(charts.top_tags(p2["top_tags"])))
    if p2.get("evolution"):
        out.append(figure(charts.evolution(p2["evolution"])))
    if cov := p2.get("label_coverage"):
        out.append("<h3 id='label-coverage'>Label coverage</h3>" + figure(charts.label_coverage(cov)))
        if cov["thin"]:
            shown = len(cov["thin"])
            more = (f" (the first {fmt(shown)} of {fmt(cov['thin_labels'])})" if cov["thin_labels"] > shown else "")
            out.append(f"<p>Labels with fewer than {fmt(cov['min_label_samples'])} records{more}:</p>" + table(
                ("ability", "second-level label", "records"),
                [(r["ability"], r["label"], r["records"]) for r in cov["thin"]]))
    for d in p2.get("diagnosis", []):
        fig = charts.diagnosis(d)
        if fig or not d.get("thin"):
            out.append(figure(fig) if fig else f"<p>{e(d['step'])}: no probe was judged (see its judge_failures)."
                       "</p>")
        if d.get("thin"):
            out.append(f"<p>{e(d['step'])}: too thin to judge (fewer than {fmt(d['min_label_samples'])} records in "
                       "the pool; not probed, no score): " + ", ".join(
                           f"{e(a)} ({fmt(n)})" for a, n in d["thin"].items()) + "</p>")
    if review := p2.get("drift_review"):
        out.append("<h3 id='drift-review'>Drift review</h3>" + drift_review_html(review))
    if p2.get("llm_by_role"):
        roles = p2["llm_by_role"]
        cols = sorted({k for v in roles.values() for k in v})
        out.append("<h3>LLM usage per role</h3>" + table(("role", *cols), [(r, *(v.get(c, 0) for c in cols))
                                                                         for r, v in roles.items()]))
        out.append(figure(charts.llm_tokens(roles)))
    return "".join(out)


def _pct(rate: float | None) -> str:
    return "–" if rate is None else f"{100 * rate:.1f}%"


def _ci(row: dict[str, Any]) -> str:
    return f"{_pct(row['ci_low'])}–{_pct(row['ci_high'])}" if row["reviewed"] else "–"


def drift_review_html(review: dict[str, Any]) -> str:
    """A drift review's figures: the gate's verdict, error rates with 95% intervals per (strategy, round) and per
    strategy, reviewers and their agreement (also shown live on the review page)."""
    gate = review["gate"]
    overall = review["overall"]
    if review["needs_stronger_validator"]:
        verdict = (f"<p class='fail'>Needs a stronger validator: {e(', '.join(review['failing_strategies']))} "
                   f"above the {_pct(gate)} gate.</p>")
    elif review["reviewed"]:
        verdict = f"<p class='pass'>Within the {_pct(gate)} gate: no strategy above it.</p>"
    else:
        verdict = "<p>Nothing reviewed yet.</p>"
    out = [f"<div id='drift-verdict'>{verdict}</div>",
           f"<p>{fmt(review['reviewed'])} of {fmt(review['items'])} sampled items reviewed; overall error rate "
           f"{_pct(overall['rate'])} (95% CI {_ci(overall)}).</p>"]
    if any(r["rate"] is not None for r in review["strata"]):
        out.append(figure(charts.drift_error_rates(review)))
    out.append(table(("strategy", "round", "population", "sampled", "reviewed", "errors", "error rate", "95% CI",
                      "kinds"),
                     [(r["strategy"], r["round"], r["population"], r["sampled"], r["reviewed"], r["errors"],
                       _pct(r["rate"]), _ci(r), ", ".join(f"{k} {n}" for k, n in r["kinds"].items()))
                      for r in review["strata"]]))
    out.append(table(("strategy", "reviewed", "errors", "error rate", "95% CI", "gate"),
                     [(r["strategy"], r["reviewed"], r["errors"], _pct(r["rate"]), _ci(r),
                       "FAILS" if r["fails_gate"] else "ok")
                      for r in review["strategies"]]))
    reviewers = ", ".join(f"{e(r)} ({fmt(n)})" for r, n in review["reviewers"].items()) or "none yet"
    out.append(f"<p>Reviewers (items marked): {reviewers}.</p>")
    if agree := review.get("agreement"):
        kappa = "–" if agree["kappa"] is None else f"{agree['kappa']:.2f}"
        out.append(f"<p id='drift-agreement'>Agreement between reviewers: {_pct(agree['percent'])} of items both "
                   f"marked, Cohen's kappa {kappa} (mean over pairs).</p>" + table(
                       ("reviewer", "reviewer", "items both marked", "agreement", "kappa"),
                       [(p["a"], p["b"], p["items"], _pct(p["percent"]),
                         "–" if p["kappa"] is None else f"{p['kappa']:.2f}") for p in agree["pairs"]]))
    return "".join(out)


def _training(report: dict[str, Any]) -> str:
    tr = report.get("training") or {}
    if not tr:
        return ""
    out = ["<h2 id='training'>Training</h2>"]
    if tr.get("stages"):
        out.append(figure(charts.loss_curves(tr["stages"])))
        out.append(table(("stage", "steps", "train loss", "tokens/s", "seconds", "world size", "peak MiB"),
                         [(k, v.get("global_step"), v.get("train_loss"), v.get("tokens_per_s"), v.get("seconds"),
                           v.get("world_size"), v.get("peak_rss_mb")) for k, v in tr["stages"].items()]))
    if tr.get("eval"):
        ev = tr["eval"]
        out.append("<h3>Evaluation per stage (two-stage vs one-stage side by side)</h3>"
                   + table(ev["columns"], [[r.get(c, "") for c in ev["columns"]] for r in ev["rows"]]))
        if ev.get("tradeoff") and (chart := charts.replay_tradeoff(ev["tradeoff"]["points"])) is not None:
            points = ev["tradeoff"]["points"]
            out.append("<h3 id='replay-sweep'>Replay sweep</h3>" + figure(chart) + table(
                ("point", "replay ratio", "held-out foundational", "held-out conversational",
                 "foundational benchmarks (mean)", "chat"),
                [(p["label"], "" if p["replay_ratio"] is None else f"{p['replay_ratio']:.0%}",
                  p["heldout_foundational"], p["heldout_conversational"],
                  "" if p["foundational_benchmarks"] is None else p["foundational_benchmarks"],
                  "" if p["chat"] is None else p["chat"]) for p in points]))
        if ev.get("ablation"):
            out.append(_selection_ablation_eval(ev["ablation"]))
    return "".join(out)


SHORT_RUN_STEPS = 200  # fewer optimizer steps than this: a smoke run, whose evaluation deltas are noise


def _selection_ablation_eval(ab: dict[str, Any]) -> str:
    """Stage 1 trained on the DSIR selection beside stage 1 trained on the random one, per metric."""
    rows = [(m["metric"] + (" (loss, lower is better)" if m["lower_is_better"] else ""), m["dsir"], m["random"],
             m["delta"], m.get("two_se", ""),
             "" if "noise" not in m else ("within noise" if m["noise"] else "beyond 2 SE")) for m in ab["metrics"]]
    noisy = [m["metric"] for m in ab["metrics"] if m.get("noise")]
    steps = [s for s in ab.get("train_steps") or [] if isinstance(s, int)]
    short = not steps or min(steps) < SHORT_RUN_STEPS
    note = (f"Benchmark deltas within two standard errors are noise: {', '.join(noisy)}. " if noisy else "") + \
        (f"These runs trained for {min(steps) if steps else 'an unknown number of'} steps: too few for two "
         "selections to differ beyond noise (a CPU smoke run); read this table from a full-sized run." if short
         else "")
    return ("<h3 id='selection-ablation-eval'>Selection ablation: stage 1 on DSIR vs random selection</h3>"
            + table(("metric", "DSIR selection", "random selection", "delta (DSIR - random)", "2 SE", "verdict"),
                    rows) + f"<p class='muted'>{e(note)}</p>")


def validation_html(report: dict[str, Any]) -> str:
    """Each expectation with its observed value and pass/fail, per validated step, and links to the exports."""
    out: list[str] = []
    for v in report.get("validation") or []:
        verdict = "<span class='pass'>passed</span>" if v["success"] else "<span class='fail'>FAILED</span>"
        out.append(f"<h3>{e(v['dir'])}: {verdict} ({fmt(v['records'])} records)</h3>")
        rows = [(x["expectation"], x.get("column") or "", json.dumps(x.get("kwargs") or {}, default=str),
                 x.get("observed", ""), "pass" if x["success"] else "FAIL") for x in v.get("expectations", [])]
        out.append(table(("expectation", "column", "arguments", "observed", "result"), rows))
    for x in report.get("exports") or []:
        files = x.get("files", [])
        out.append(f"<h3>Export {e(x['dir'])}</h3><p>{', '.join(f'{e(k)}: {fmt(n)}' for k, n in x['counts'].items())}"
                   f" records; {len(files)} files</p><details><summary>files</summary><ul>"
                   + "".join(f"<li><a href='{e(_file_href(f))}'>{e(f)}</a></li>" for f in files) + "</ul></details>")
    return ("<h2 id='validation'>Validation and exports</h2>" + "".join(out)) if out else ""


def _file_href(uri: str) -> str:
    return uri if "://" in uri else "file://" + uri


def render_html(report: dict[str, Any]) -> str:
    """The whole run report as one standalone HTML page."""
    title = f"Run report: {report['root'].rstrip('/').rsplit('/', 1)[-1]}"
    steps = report["steps"]
    nav = ["<a href='#funnel'>Funnel</a>", "<a href='#drops'>Drops</a>"]
    for key, label, present in (("selection", "Selection", report.get("selection") or report.get("kept_profile")),
                                ("phase2", "Synthesis", report.get("phase2")), ("training", "Training",
                                report.get("training")), ("validation", "Validation",
                                report.get("validation") or report.get("exports"))):
        if present:
            nav.append(f"<a href='#{key}'>{label}</a>")
    body = [f"<nav>{''.join(nav)}</nav>", _kpis(report), "<h2 id='funnel'>Funnel</h2>"]
    if steps:
        body.append(figure(charts.funnel(steps)))
        body.append(table(("step", "in", "kept", "dropped", "keep rate", "records/s", "seconds", "peak MiB"),
                          [(s["dir"], s["records_in"], s["records_kept"], s["records_dropped"],
                            f"{s['keep_rate']:.2%}" if s["keep_rate"] is not None else "–", s["records_per_s"] or "–",
                            s["seconds"], s["peak_rss_mb"]) for s in steps]))
        body.append("<h2 id='drops'>Drops by reason</h2>")
        if any(s["dropped_by_reason"] for s in steps):
            body.append(figure(charts.drops_by_step(steps)))
        body += [step_section(s) for s in steps]
    else:
        body.append("<p>No step of this run has committed yet.</p>")
    body += [_selection(report), _phase2(report), _training(report), validation_html(report)]
    return _page(title, _header(report, title), "".join(body))


def render_step_page(report: dict[str, Any], step_dir: str) -> str:
    """One step's section as its own page (the task-instance view in the Airflow UI)."""
    s = next(x for x in report["steps"] if x["dir"] == step_dir)
    title = f"{step_dir}: {s['step']}"
    body = [figure(charts.funnel([s])), step_section(s)]
    if s["step"] in ("select", "dsir"):
        body.append(_selection(report))
    return _page(title, _header(report, title), "".join(body))


def render_validation_page(report: dict[str, Any]) -> str:
    """Validation and exports as their own page (the task view of validate/export tasks)."""
    return _page("Validation", _header(report, "Validation and exports"),
                 validation_html(report) or "<p>Nothing was validated or exported in this run yet.</p>")


def render_markdown(report: dict[str, Any]) -> str:
    """A plain-text summary (funnel, drops, LLM usage) for terminals and commit messages."""
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
        if d.get("thin"):
            lines += [f"Too thin to judge (fewer than {d['min_label_samples']} records in the pool; not probed): "
                      + ", ".join(f"{a} ({n})" for a, n in d["thin"].items()), ""]
        if not models:
            lines.append("No probe was judged" + (" (see the step's `judge_failures.*`)." if not d.get("thin")
                                                  else "."))
            continue
        lines += ["| ability | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(str(per.get(m, "")) for m in models) + " |"
                  for a, per in d["scores"].items()]
    for s in report["steps"]:
        lines += ["", f"## {s['dir']} ({s['step']}, config {s['config_hash']})", "", "Drops by reason:", ""]
        lines += [f"- `{r}`: {n}" for r, n in s["dropped_by_reason"].items()] or ["- none"]
        for t, c in (s.get("pii") or {}).get("types", {}).items():
            shown = ", ".join(s["pii"]["samples"].get(t, []))
            lines.append(f"- PII `{t}`: found {c['found']}, redacted {c['redacted']}, dropped {c['dropped']}, "
                         f"flagged {c['flagged']}; e.g. {shown}")
        for reason, samples in s.get("dropped_samples", {}).items():
            for x in samples[:1]:
                text = (x.get("human") or x.get("raw") or "").replace("\n", " ")[:160]
                lines.append(f"  - e.g. `{reason}`: {text}")
    return "\n".join(lines) + "\n"
