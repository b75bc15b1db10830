"""Collecting: what a run committed (manifests, stats, a few sampled rows) -> one report dict.

Reads only what steps committed, never a directory of uncommitted parts, so a report can be rebuilt at any time,
of a finished, failed or running run. Every read is bounded: samples stop after N rows per drop reason, profiles
read only the columns they need part by part, and survivor lookups read only the `id` column. The dict is
written as report.json and is all the drawing and rendering layers see.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators import schema
from operators.core import storage
from operators.core.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    read_manifest,
    read_off,
    stage_dir,
    step_manifest_uri,
)
from operators.text.pii import redact_all

REPORT_VERSION = 2
SAMPLES_PER_REASON = 3
TEXT_CHARS = 420
TOP_TAGS = 20
LENGTH_EDGES = (0, 100, 200, 500, 1000, 2000, 4000, 8000, 16000, 32000)
TURN_BINS = (2, 3, 4, 5, 6, 8, 10, 20)
# A report reads bounded samples, never a whole corpus: the kept set's profile comes from at most this many
# records, spread over its parts, and a duplicate's survivor is looked up in at most this many parts.
PROFILE_SAMPLE = 200_000
SURVIVOR_PARTS = 32
PII_SAMPLES = 5  # masked samples per PII type
SURVIVOR = re.compile(r"^(?:near |semantic )?duplicate of (\S+)")


def clip(text: str | None, limit: int = TEXT_CHARS) -> str:
    """`text` with personal data and secrets redacted (a report shows no raw value, whatever the run's `pii`
    settings were), cut at a word boundary before `limit` characters, with an ellipsis when cut."""
    text = redact_all((text or "").strip())
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit * 0.6 else cut).rstrip() + " …"


def first_exchange(conversations: list[dict[str, Any]] | None) -> tuple[str, str]:
    """The first human turn and the answer after it (either may be empty), clipped for reading."""
    human, answer = schema.first_exchange(conversations)
    return clip(human), clip(answer)


def parse_detail(detail: str | None) -> Any:
    """A drop's detail: a JSON object when the step wrote one (e.g. contamination), else the text."""
    if detail and detail.lstrip().startswith("{"):
        try:
            return json.loads(detail)
        except ValueError:
            pass
    return detail or ""


# --- reading committed steps -------------------------------------------------------------------------------


def _plan_inputs(step_dir: str) -> list[str]:
    uri = storage.join(step_dir, "_plan.json")
    if not storage.exists(uri):
        return []
    return _through_off([storage.validate_uri(i).rstrip("/") for i in json.loads(storage.read_bytes(uri)).get(
        "inputs", [])])


def _through_off(inputs: list[str], depth: int = 0) -> list[str]:
    """`inputs`, each step that was off replaced by what it passed on (an optional step switched off commits
    nothing: the step after it read its inputs)."""
    out: list[str] = []
    for i in inputs:
        passed_on = read_off(i) if depth < 8 else None
        out.extend(_through_off([storage.validate_uri(p).rstrip("/") for p in passed_on], depth + 1)
                   if passed_on is not None else [i])
    return out


def find_steps(files: list[str]) -> list[tuple[str, Manifest]]:
    """Every committed step among `files` (a listing of the run root; not stage manifests) in data-flow order: a
    step after the steps whose output it read (from its plan's inputs), then by commit time; timestamps alone tie
    within a second."""
    found: dict[str, Manifest] = {}
    for uri in files:
        if uri.endswith("/" + MANIFEST_NAME) and "/_stages/" not in uri:
            m = read_manifest(uri)
            if m is not None:
                found[uri[: -len(MANIFEST_NAME) - 1]] = m
    inputs = {d: [i for i in _plan_inputs(d) if i in found and i != d] for d in found}
    depth: dict[str, int] = {}

    def level(d: str, seen: frozenset[str] = frozenset()) -> int:
        if d not in depth:
            depth[d] = 1 + max((level(i, seen | {d}) for i in inputs[d] if i not in seen), default=-1)
        return depth[d]

    return sorted(found.items(), key=lambda kv: (level(kv[0]), kv[1].created_at, kv[0]))


BATCH_ROWS = 16_384  # rows decoded at a time: bounds memory by a slice of a part, not by the part


def _read(step_dir: str, rel: str, columns: list[str] | None = None) -> pa.Table:
    with storage.open_input(storage.join(step_dir, rel)) as fh:
        pf = pq.ParquetFile(fh)
        cols = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
        return pf.read(columns=cols)


def _rows(step_dir: str, rel: str, indices: list[int], columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows `indices` (sorted) of one part file, decoding only the row groups that hold them."""
    out: list[dict[str, Any]] = []
    with storage.open_input(storage.join(step_dir, rel)) as fh:
        pf = pq.ParquetFile(fh)
        cols = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
        start = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            local = [i - start for i in indices if start <= i < start + n]
            if local:
                out += pf.read_row_group(g, columns=cols).take(pa.array(local)).to_pylist()
            start += n
    return out


def iter_parts(step_dir: str, m: Manifest, kind: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The step's committed `kind` files ("data" or "dropped") as tables of at most BATCH_ROWS rows."""
    for f in m.files:
        if f.kind == kind and f.rows:
            with storage.open_input(storage.join(step_dir, f.path)) as fh:
                pf = pq.ParquetFile(fh)
                cols = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
                    yield pa.Table.from_batches([batch])


def _sample_row(row: dict[str, Any]) -> dict[str, Any]:
    human, answer = first_exchange(row.get("conversations"))
    out: dict[str, Any] = {"id": row.get("id"), "reason": row.get("reason"), "detail": parse_detail(row.get("detail")),
                           "human": human, "answer": answer}
    if not human and row.get("raw"):
        out["raw"] = clip(str(row["raw"]))
    if row.get("source"):
        out["source"] = row["source"]
    return out


def dropped_samples(step_dir: str, m: Manifest,
                    per_reason: int = SAMPLES_PER_REASON) -> dict[str, list[dict[str, Any]]]:
    """Up to `per_reason` readable dropped records per reason; reads the `reason` column of each part first and
    the full rows only of parts that still owe a sample."""
    wanted = {r: per_reason for r, n in m.stats.dropped_by_reason.items() if n}
    out: dict[str, list[dict[str, Any]]] = {r: [] for r in wanted}
    for f in m.files:
        if not any(wanted.values()):
            break
        if f.kind != "dropped" or not f.rows:
            continue
        reasons = _read(step_dir, f.path, ["reason"]).column("reason").to_pylist()
        take = []
        for i, r in enumerate(reasons):
            if wanted.get(r, 0) > 0:
                wanted[r] -= 1
                take.append(i)
        if take:
            for row in _rows(step_dir, f.path, take):
                out[row["reason"]].append(_sample_row(row))
    return {r: s for r, s in out.items() if s}


def kept_samples(step_dir: str, m: Manifest, n: int = SAMPLES_PER_REASON) -> list[dict[str, Any]]:
    """The first `n` kept records, readable."""
    for t in iter_parts(step_dir, m, "data", ["id", "conversations", "source"]):
        return [_sample_row(r) for r in t.slice(0, n).to_pylist()]
    return []


def attach_survivors(step_dir: str, m: Manifest, samples: dict[str, list[dict[str, Any]]]) -> None:
    """For duplicate drops ("duplicate of <id>"), put the kept survivor's text beside the dropped one."""
    want: dict[str, list[dict[str, Any]]] = {}
    for rows in samples.values():
        for s in rows:
            if isinstance(s["detail"], str) and (hit := SURVIVOR.match(s["detail"])):
                want.setdefault(hit.group(1), []).append(s)
    if not want:
        return
    for f in m.data_files()[:SURVIVOR_PARTS]:  # a survivor in a later part is not shown: the page stays cheap
        if not want:
            break
        ids = _read(step_dir, f.path, ["id"]).column("id")
        idx = np.flatnonzero(pc.is_in(ids, value_set=pa.array(list(want), pa.string())).to_numpy(zero_copy_only=False))
        if idx.size:
            for row in _rows(step_dir, f.path, idx.tolist(), ["id", "conversations"]):
                human, answer = first_exchange(row["conversations"])
                for s in want.pop(row["id"], []):
                    s["survivor"] = {"id": row["id"], "human": human, "answer": answer}


def step_entry(root: str, step_dir: str, m: Manifest) -> dict[str, Any]:
    """One step's funnel figures, counters and samples."""
    s = m.stats
    samples = dropped_samples(step_dir, m)
    attach_survivors(step_dir, m, samples)
    return {
        "step": m.step,
        "dir": step_dir[len(root):].lstrip("/") or ".",
        "config_hash": m.config_hash,
        "created_at": m.created_at,
        "shards": s.shards,
        "records_in": s.records_in,
        "records_kept": s.records_kept,
        "records_dropped": s.records_dropped,
        "keep_rate": round(s.records_kept / s.records_in, 4) if s.records_in else None,
        "dropped_by_reason": dict(sorted(s.dropped_by_reason.items(), key=lambda kv: -kv[1])),
        "seconds": s.seconds,
        "records_per_s": round(s.records_in / s.seconds, 1) if s.seconds else None,
        "peak_rss_mb": s.peak_rss_mb,
        "bytes_in": s.bytes_in,
        "bytes_out": s.bytes_out,
        "counters": s.counters,
        "dropped_samples": samples,
        "kept_samples": kept_samples(step_dir, m),
        **({"pii": pii_summary(step_dir, m)} if m.step == "pii" else {}),
    }


def pii_summary(step_dir: str, m: Manifest, per_type: int = PII_SAMPLES, max_parts: int = SURVIVOR_PARTS
                ) -> dict[str, Any]:
    """Per PII type: how many values were found and what was done with them (from the step's counters), and a
    few masked samples read from the `pii` column of at most `max_parts` parts, kept and dropped."""
    c = m.stats.counters
    types = sorted({k.split(".", 1)[1] for k in c if k.startswith("found.")})
    counts = {t: {a: int(c.get(f"{a}.{t}", 0)) for a in ("found", "redacted", "dropped", "flagged")} for t in types}
    samples: dict[str, list[str]] = {t: [] for t in types}
    parts = [f for f in m.files if f.kind in ("data", "dropped") and f.rows][:max_parts]
    for f in parts:
        if all(len(v) >= per_type for v in samples.values()):
            break
        for found in _read(step_dir, f.path, ["pii"]).column("pii").to_pylist() if types else []:
            for entry in found or []:
                got = samples.setdefault(entry["type"], [])
                label = entry["masked"] + (f" ({entry['subtype']})" if entry.get("subtype") else "")
                if len(got) < per_type and label not in got:
                    got.append(label)
    return {"types": counts, "samples": samples, "records_redacted": int(c.get("records_redacted", 0)),
            "records_flagged": int(c.get("records_flagged", 0))}


# --- derived sections (pure over step entries and small reads) -------------------------------------------------


def _by_prefix(counters: dict[str, float], prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: v for k, v in counters.items() if k.startswith(prefix)}


def _bin_order(label: str) -> float:
    """Sort key of DSIR histogram labels like '<-20', '[-2,-1)', '>=20'."""
    nums = re.findall(r"-?\d+(?:\.\d+)?", label)
    if not nums:
        return 0.0
    v = float(nums[0])
    return v - 1e-6 if label.startswith("<") else v


def selection_section(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Domain mix before/after, KL reduction, DSIR weight histograms, duplicate cluster sizes."""
    out: dict[str, Any] = {}
    selections: dict[str, dict[str, Any]] = {}
    for s in steps:
        c = s["counters"]
        if s["step"] == "select":
            selections[s["dir"]] = _selection_of(c)
        if s["step"] == "dsir":
            hist: dict[str, dict[str, float]] = {}
            for key, v in _by_prefix(c, "log_weight_hist.").items():
                domain, _, label = key.partition(".")
                hist.setdefault(domain, {})[label] = v
            if hist:
                out["dsir_log_weight_hist"] = {d: sorted(h.items(), key=lambda kv: _bin_order(kv[0]))
                                               for d, h in sorted(hist.items())}
        sizes = _by_prefix(c, "resolve.cluster_sizes.")
        if sizes:
            out.setdefault("cluster_sizes", {})[s["dir"]] = sorted(sizes.items(), key=lambda kv: _bin_order(kv[0]))
    # The run's selection is the `select` folder; another select step (`select_random`, the DSIR-vs-random
    # ablation) is shown beside it, not in its place.
    main = next((d for d in selections if d.rsplit("/", 1)[-1] == "select"), next(iter(sorted(selections)), None))
    if main is not None:
        out.update({k: v for k, v in selections[main].items() if v})
        others = {d: v for d, v in sorted(selections.items()) if d != main}
        if others:
            out["ablation"] = ablation_rows(main, selections[main], others)
    return out


def _selection_of(c: dict[str, float]) -> dict[str, Any]:
    """A select step's domain mix (pool and chosen per domain) and KL figures, from its counters."""
    pool, chosen = _by_prefix(c, "decide.pool."), _by_prefix(c, "decide.chosen.")
    return {"domain_mix": {d: {"before": pool[d], "after": chosen.get(d, 0.0)} for d in sorted(pool)},
            "kl": {d: {"selected": c.get(f"kl.kl_selected.{d}"), "random": c.get(f"kl.kl_random.{d}"),
                       "reduction": v} for d, v in _by_prefix(c, "kl.kl_reduction.").items()}}


def ablation_rows(main: str, sel: dict[str, Any], others: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per domain, the run's selection beside each other selection of the same pool: records chosen and the KL
    divergence of the chosen set to the domain's DSIR target (lower is closer)."""
    domains = sorted(set(sel["domain_mix"]).union(*(o["domain_mix"] for o in others.values())))
    rows = []
    for d in domains:
        row: dict[str, Any] = {"domain": d, "pool": sel["domain_mix"].get(d, {}).get("before")}
        for name, s in (("selection", sel), *others.items()):
            row[f"{name}.chosen"] = s["domain_mix"].get(d, {}).get("after")
            row[f"{name}.kl"] = s["kl"].get(d, {}).get("selected")
        rows.append(row)
    return {"main": main, "others": list(others), "rows": rows}


def _bucket(values: np.ndarray, edges: tuple[int, ...]) -> list[tuple[str, int]]:
    labels = [f"{lo:,}" if hi - lo == 1 else f"{lo:,}-{hi - 1:,}" for lo, hi in itertools.pairwise(edges)] + \
        [f">={edges[-1]:,}"]
    # A value below the first edge has no bin (a run whose last committed step is `evolve` holds one-turn
    # instructions, below the 2-turn first bin): it is left out rather than crash the report.
    idx = np.searchsorted(np.asarray(edges), values, side="right") - 1
    counts = np.bincount(idx[idx >= 0], minlength=len(labels))
    return [(label, int(n)) for label, n in zip(labels, counts[: len(labels)], strict=True)]


def profile_parts(m: Manifest, sample: int) -> tuple[list[FileEntry], int]:
    """The data parts a profile of at most about `sample` records reads (spread evenly over the set, so a
    sample is not just its first shards), and the set's record count."""
    parts = [f for f in m.files if f.kind == "data" and f.rows]
    total = sum(f.rows for f in parts)
    if total <= sample:
        return parts, total
    wanted = math.ceil(sample * len(parts) / total)  # parts of average size that hold the sample
    return parts[::max(1, len(parts) // wanted)], total


def kept_profile(step_dir: str, m: Manifest, sample: int = PROFILE_SAMPLE) -> dict[str, Any] | None:
    """Language, turn-count and length distributions of a step's kept records (vectorized, part by part); from
    a sample of about `sample` records spread over the parts when the set is larger (`sampled` says how many)."""
    langs: Counter[str] = Counter()
    turns: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    parts, total = profile_parts(m, sample)
    seen = 0
    for f in parts:
        if seen >= sample:
            break
        with storage.open_input(storage.join(step_dir, f.path)) as fh:
            pf = pq.ParquetFile(fh)
            cols = [c for c in ("langdetect", "conversations") if c in pf.schema_arrow.names]
            if "conversations" not in cols:
                return None
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
                t = pa.Table.from_batches([batch]).slice(0, sample - seen)
                seen += t.num_rows
                if "langdetect" in t.column_names:
                    langs.update(x or "unknown" for x in t.column("langdetect").to_pylist())
                conv = t.column("conversations").combine_chunks()
                turns.append(pc.list_value_length(conv).fill_null(0).to_numpy(zero_copy_only=False))
                flat = pc.list_flatten(conv)
                chars = pc.utf8_length(flat.field("value")).fill_null(0).to_numpy(zero_copy_only=False)
                parents = pc.list_parent_indices(conv).to_numpy(zero_copy_only=False)
                lengths.append(np.bincount(parents, weights=chars, minlength=len(conv)).astype(np.int64))
                if seen >= sample:
                    break
    if not turns:
        return None
    n_turns, n_chars = np.concatenate(turns), np.concatenate(lengths)
    profile = {
        "records": total,
        "languages": dict(langs.most_common(12)),
        "turns": _bucket(n_turns, TURN_BINS),
        "length_chars": _bucket(n_chars, LENGTH_EDGES),
        "median_chars": float(np.median(n_chars)) if n_chars.size else 0.0,
    }
    if n_turns.size < total:
        profile["sampled"] = int(n_turns.size)
    return profile


def _vocab_tags(step_dir: str) -> list[tuple[str, int]]:
    m = read_manifest(step_manifest_uri(stage_dir(step_dir, "vocab")))
    if m is None:
        return []
    counts: dict[str, int] = {}
    for f in m.files:
        t = _read(stage_dir(step_dir, "vocab"), f.path, ["canonical", "canonical_count"])
        if "canonical" in t.column_names:
            for tag, n in zip(t["canonical"].to_pylist(), t["canonical_count"].to_pylist(), strict=True):
                counts[tag] = max(counts.get(tag, 0), int(n))
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TAGS]


def _abilities(step_dir: str, m: Manifest) -> dict[str, int]:
    c: Counter[str] = Counter()
    for t in iter_parts(step_dir, m, "data", ["label"]):
        for lab in t.column("label").to_pylist():
            c.update((lab or {}).get("cate_ability_en") or ["(none)"])
    return dict(c.most_common())


def _evolution(step_dir: str, m: Manifest) -> list[dict[str, Any]]:
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for kind in ("data", "dropped"):
        for t in iter_parts(step_dir, m, kind, ["lineage", "reason"]):
            if "lineage" not in t.column_names:
                return []
            reasons = t.column("reason").to_pylist() if kind == "dropped" else [None] * t.num_rows
            for lin, reason in zip(t.column("lineage").to_pylist(), reasons, strict=True):
                key = (int((lin or {}).get("round") or 0), str((lin or {}).get("strategy") or "?"))
                row = rows.setdefault(key, {"round": key[0], "strategy": key[1], "kept": 0, "dropped": {}})
                if reason is None:
                    row["kept"] += 1
                else:
                    row["dropped"][reason] = row["dropped"].get(reason, 0) + 1
    return [rows[k] for k in sorted(rows)]


def llm_by_role(steps: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Tokens, requests, cache hits and cost per model role, summed over the run's steps."""
    names = ("prompt_tokens", "completion_tokens", "scored_tokens", "requests", "backend_requests", "cache_hits",
             "cost_usd", "invalid", "repaired")
    out: dict[str, dict[str, float]] = {}
    for s in steps:
        for k, v in s["counters"].items():
            parts = k.split(".")
            if parts[0] != "llm" or len(parts) not in (2, 3) or parts[-1] not in names:
                continue
            role = out.setdefault(parts[1] if len(parts) == 3 else "main", {})  # `llm.<name>` is the main model
            role[parts[-1]] = round(role.get(parts[-1], 0.0) + v, 6)
    return dict(sorted(out.items()))


def llm_totals(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Tokens, cost and cache hits of every LLM step of the run, summed over all model roles."""
    totals: dict[str, float] = {}
    for per in llm_by_role(steps).values():
        for k, v in per.items():
            if k != "requests":
                totals[k] = round(totals.get(k, 0.0) + v, 6)
    return dict(sorted(totals.items()))


def diagnosis(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: mean judge score per ability and candidate model, and the abilities too thin to judge (records
    in the pool), from diagnose steps' counters."""
    from operators.steps.synth.diagnose import ability_scores, thin_abilities

    return [{"step": s["dir"], "scores": ability_scores(s["counters"]), "thin": thin_abilities(s["counters"]),
             "min_label_samples": int(s["counters"].get("probes.min_label_samples", 0))}
            for s in steps if s["step"] == "diagnose"]


DEFAULT_MIN_LABEL_SAMPLES = 100  # the diagnose step's default, when no diagnose step ran
THIN_ROWS = 200  # rows of thin labels a report lists (the chart counts them all)


def label_coverage(step_dir: str, m: Manifest, min_samples: int) -> dict[str, Any]:
    """Records per (first-level ability, second-level label) of a labeled step, and the labels below
    `min_samples`: too few for a diagnosis of that ability to rest on. A record counts under its first (primary)
    ability, the one diagnose probes it for, once per distinct label it carries."""
    pairs: Counter[tuple[str, str]] = Counter()
    for t in iter_parts(step_dir, m, "data", ["label"]):
        for lab in t.column("label").to_pylist():
            lab = lab or {}
            ability = (lab.get("cate_ability_en") or ["(none)"])[0]
            pairs.update((ability, tag) for tag in dict.fromkeys(lab.get("ability_en") or ["(none)"]))
    per: dict[str, dict[str, int]] = {}
    for (ability, _), n in sorted(pairs.items()):
        row = per.setdefault(ability, {"labels": 0, "thin_labels": 0})
        row["labels"] += 1
        row["thin_labels"] += n < min_samples
    thin = sorted(((a, t, n) for (a, t), n in pairs.items() if n < min_samples), key=lambda x: (x[0], x[2], x[1]))
    return {"min_label_samples": min_samples, "per_ability": per, "thin_labels": len(thin),
            "thin": [{"ability": a, "label": t, "records": n} for a, t, n in thin[:THIN_ROWS]]}


def phase2_section(root: str, found: list[tuple[str, Manifest]], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Abilities, top second-level tags, the evolution funnel, diagnosis and LLM usage per role."""
    out: dict[str, Any] = {}
    for step_dir, m in found:
        rel = step_dir[len(root):].lstrip("/")
        if m.step == "label":
            out["abilities"] = _abilities(step_dir, m)
        elif m.step == "label_vocab":
            out["top_tags"] = _vocab_tags(step_dir)
        elif m.step == "evolve":
            out.setdefault("evolution", []).extend({"step": rel, **row} for row in _evolution(step_dir, m))
    if diag := diagnosis(steps):
        out["diagnosis"] = diag
    labeled = [(d, m) for d, m in found if m.step == "label_vocab"] or [(d, m) for d, m in found if m.step == "label"]
    if labeled:
        minimum = next((d["min_label_samples"] for d in diag or [] if d["min_label_samples"]),
                       DEFAULT_MIN_LABEL_SAMPLES)
        out["label_coverage"] = label_coverage(*labeled[-1], minimum)
    if any(m.step == "evolve" for _, m in found):
        from operators.review.stats import review_summary

        if (review := review_summary(root)) is not None:  # people marked a sample in the run's Review tab
            out["drift_review"] = review
    if roles := llm_by_role(steps):
        out["llm_by_role"] = roles
    return out


def training_section(files: list[str]) -> dict[str, Any]:
    """Loss curves per stage and the evaluation table of a fine-tuning folder among `files`, if any."""
    out: dict[str, Any] = {}
    for uri in files:
        name = uri.rsplit("/", 1)[-1]
        if name == "train_result.json" and "/checkpoints/" not in uri:
            tr = json.loads(storage.read_bytes(uri))
            stage = uri.rsplit("/", 2)[-2]
            out.setdefault("stages", {})[stage] = {
                "losses": [(h["step"], h["loss"]) for h in tr.get("losses", [])],
                **{k: tr.get(k) for k in ("global_step", "tokens_per_s", "seconds", "world_size", "train_loss",
                                          "peak_rss_mb")}}
        elif name == "eval_report.json":
            out["eval"] = json.loads(storage.read_bytes(uri))
    return out


def validation_section(found: list[tuple[str, Manifest]], root: str) -> list[dict[str, Any]]:
    """The validation results steps wrote (validation.json beside a committed step)."""
    out = []
    for step_dir, _ in found:
        uri = storage.join(step_dir, "validation.json")
        if storage.exists(uri):
            v = json.loads(storage.read_bytes(uri))
            v["dir"] = step_dir[len(root):].lstrip("/")
            out.append(v)
    return out


def exports_section(root: str, files: list[str]) -> list[dict[str, Any]]:
    """Exported datasets among `files` under the run root: folder, formats and file counts."""
    out = []
    for uri in files:
        if uri.endswith("/_EXPORT.json"):
            summary = json.loads(storage.read_bytes(uri))
            summary["dir"] = uri[len(root):].lstrip("/").rsplit("/", 1)[0]
            out.append(summary)
    return out


def build_report(root: str, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Collect every committed step under `root` into one report dict."""
    root = storage.validate_uri(root)
    files = storage.list_files(root)  # one listing serves steps, training and exports (a run holds many parts)
    found = find_steps(files)
    steps = [step_entry(root, d, m) for d, m in found]
    data_steps = [(d, m) for d, m in found if m.step not in ("train_prep",)]
    profile = None
    if data_steps:
        final_dir, final_m = data_steps[-1]
        profile = kept_profile(final_dir, final_m)
        if profile is not None:
            profile["dir"] = final_dir[len(root):].lstrip("/")
    return {
        "version": REPORT_VERSION,
        "root": root,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": run or {},
        "steps": steps,
        "selection": selection_section(steps),
        "kept_profile": profile,
        "phase2": phase2_section(root, found, steps),
        "llm": llm_totals(steps),
        "diagnosis": diagnosis(steps),
        "training": training_section(files),
        "validation": validation_section(found, root),
        "exports": exports_section(root, files),
    }
