"""The report's charts: one small function per chart, report sections in, `Figure` out (pure)."""

from __future__ import annotations

from typing import Any

from operators.report.figures import (
    DROPPED,
    PALETTE,
    Figure,
    bar_chart,
    funnel_chart,
    grouped_bars,
    heatmap,
    histogram,
    line_chart,
    scatter_chart,
    stacked_bars,
)

MERGED = "merged"  # a reason that is not a loss: the record lives on inside another one


def funnel(steps: list[dict[str, Any]]) -> Figure:
    """Records in, kept and dropped per step."""
    return funnel_chart("Funnel: records in and kept per step",
                        [(s["dir"], s["records_in"], s["records_kept"], s["dropped_by_reason"].get(MERGED, 0))
                         for s in steps],
                        caption="Each bar is a step's input; green is what it kept, grey what it merged into another "
                                "record (e.g. parts of a split conversation, rejoined), red what it dropped (every "
                                "drop has a reason, below). Ledger: in = kept + merged + dropped. Bars share one "
                                "scale unless inputs differ more than 20-fold; then each spans its own input.")


def drops_of_step(s: dict[str, Any]) -> Figure:
    """One step's drops by reason."""
    return bar_chart(f"{s['dir']}: drops by reason", list(s["dropped_by_reason"].items()), color=DROPPED,
                     value_header="records", caption=f"Records {s['dir']} dropped, by reason "
                     f"({sum(s['dropped_by_reason'].values()):,} in all).")


def drops_by_step(steps: list[dict[str, Any]]) -> Figure:
    """Drops by reason for every step that dropped something, stacked."""
    rows = [(s["dir"], dict(s["dropped_by_reason"])) for s in steps if s["dropped_by_reason"]]
    return stacked_bars("Drops by reason per step", rows,
                        caption="Each bar is the records a step dropped, split by reason.")


def domain_mix(mix: dict[str, dict[str, float]]) -> Figure:
    """Records per domain in the pool and in the selection."""
    cats = list(mix)
    return grouped_bars("Domain mix before and after selection", cats,
                        {"pool (before)": [mix[d]["before"] for d in cats],
                         "selected (after)": [mix[d]["after"] for d in cats]},
                        caption="Records per domain entering select and chosen by the per-domain budgets.")


def dsir_histogram(domain: str, bins: list[tuple[str, float]]) -> Figure:
    """A domain's DSIR log importance weights."""
    return histogram(f"DSIR log-weight histogram: {domain}", bins, color=PALETTE[4],
                     caption=f"log p_target(x)/p_raw(x) of the {domain} pool; selection prefers the right tail "
                             "(Gumbel top-k).")


def cluster_sizes(step_dir: str, bins: list[tuple[str, float]]) -> Figure:
    """How many duplicate clusters of each size a dedup step resolved."""
    return bar_chart(f"{step_dir}: duplicate cluster sizes", bins, color=PALETTE[5], value_header="clusters",
                     caption="Clusters of duplicates by size (one survivor kept per cluster).")


def kept_profile(prof: dict[str, Any]) -> list[Figure]:
    """Language, turn-count and length distributions of the kept set."""
    return [
        bar_chart("Languages of the kept set", list(prof["languages"].items()), value_header="records",
                  caption="fastText language id (langdetect column).", width=420),
        histogram("Turns per conversation", prof["turns"], caption="Turns (human + answer) per kept record.",
                  color=PALETTE[2], width=420),
        histogram("Characters per conversation", prof["length_chars"], color=PALETTE[1], width=420,
                  caption="Total characters of all turns per kept record."),
    ]


def abilities(counts: dict[str, int]) -> Figure:
    """First-level abilities assigned by the labeler."""
    return bar_chart("First-level abilities", list(counts.items()), value_header="records",
                     caption="Records per first-level ability (a record may carry several).")


def top_tags(tags: list[tuple[str, int]]) -> Figure:
    """The most frequent second-level tags after normalization and merging."""
    return bar_chart("Top second-level tags", tags, color=PALETTE[3], value_header="records",
                     caption="Most frequent merged second-level labels (the long tail is what seed selection keeps).")


def label_coverage(cov: dict[str, Any]) -> Figure:
    """Second-level labels per first-level ability: with enough records, and too few to diagnose on."""
    minimum = cov["min_label_samples"]
    rows = [(a, {f">= {minimum} records": v["labels"] - v["thin_labels"], f"< {minimum} records": v["thin_labels"]})
            for a, v in sorted(cov["per_ability"].items(), key=lambda kv: (-kv[1]["thin_labels"], kv[0]))]
    return stacked_bars("Label coverage: second-level labels per ability", rows,
                        caption=f"Second-level labels under each first-level ability, split at {minimum} records "
                                "(min_label_samples): below it, too few records for a diagnosis of that ability "
                                "to rest on. The thin labels are listed below.")


def evolution(rows: list[dict[str, Any]]) -> Figure:
    """Evolution candidates kept and eliminated per round and strategy."""
    stacked = [(f"{r['step']} r{r['round']} {r['strategy']}", {"kept": r["kept"], **r["dropped"]}) for r in rows]
    return stacked_bars("Evolution funnel by round and strategy", stacked,
                        caption="Candidates per (round, strategy): kept, and eliminated by reason.")


def drift_error_rates(review: dict[str, Any]) -> Figure:
    """Reviewed error rate per (strategy, round) of a drift review, in percent."""
    rows = [(f"{r['strategy']} r{r['round']}", round(100 * r["rate"], 1)) for r in review["strata"]
            if r["rate"] is not None]
    return bar_chart("Drift review: error rate per strategy and round (%)", rows, color=DROPPED,
                     value_header="error rate %",
                     caption=f"Share of reviewed evolved instructions marked drifted, factual error or unsafe, per "
                             f"(strategy, round); the gate is {100 * review['gate']:g}%. 95% intervals are in the "
                             "table below.")


def diagnosis(d: dict[str, Any]) -> Figure | None:
    """Mean judge score per ability and candidate model for one diagnosis round (None if nothing was judged)."""
    scores: dict[str, dict[str, float]] = d["scores"]
    models = sorted({m for per in scores.values() for m in per})
    if not models:
        return None
    values = {(a, m): v for a, per in scores.items() for m, v in per.items()}
    return heatmap(f"Diagnosis {d['step']}: mean judge score (1-10)", list(scores), models, values, lo=1, hi=10,
                   caption="Judge score per first-level ability and candidate model; low abilities get targeted "
                           "seeds in the next round.")


def llm_tokens(roles: dict[str, dict[str, float]]) -> Figure:
    """Prompt, completion and scored tokens per model role."""
    names = list(roles)
    return grouped_bars("LLM tokens per role", names,
                        {k: [roles[r].get(k, 0.0) for r in names]
                         for k in ("prompt_tokens", "completion_tokens", "scored_tokens")},
                        caption="Tokens paid per role (cache hits pay none).", width=720)


def loss_curves(stages: dict[str, dict[str, Any]]) -> Figure:
    """Training loss per step, one line per stage."""
    return line_chart("Training loss per stage", {k: v["losses"] for k, v in stages.items()}, y_label="loss",
                      caption="Logged training loss (assistant tokens only) per optimizer step.")


def replay_tradeoff(points: list[dict[str, Any]]) -> Figure | None:
    """The replay sweep: held-out loss on the foundational set against the conversational set, one point per
    ratio (joined, by ratio) beside stage 1, stage 2, the one-stage ablation and the base model."""
    drawn = [(p["label"], float(p["heldout_foundational"]), float(p["heldout_conversational"]),
              p["replay_ratio"] is not None) for p in points
             if p.get("heldout_foundational") is not None and p.get("heldout_conversational") is not None]
    if not any(joined for *_, joined in drawn):
        return None
    return scatter_chart(
        "Replay trade-off: foundational vs conversational held-out loss", drawn,
        x_label="held-out loss, foundational set (lower is better)",
        y_label="held-out loss, conversational (lower is better)",
        caption="Each blue point is stage 2 trained again with that share of the foundational set replayed (nested "
                "samples: a larger ratio's replay holds a smaller one's), all from the same stage-1 model; orange "
                "points are the other evaluated stages. Down and left is better on both sets. With few training "
                "steps and a small model the differences are noise; the curve is what a GPU-sized run reads.")
