"""The dataset card: a Hugging Face README.md with YAML metadata (configs, splits, features, size category,
licenses) and a lineage section (sources and their manifest checksums, each step's config hash, the DAG run,
counts, the report). Pure: a version manifest dict in, Markdown text out."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import yaml

from operators.schema import CANONICAL_SCHEMA

# The columns the Hugging Face folder holds (export writes exactly these).
_SIZE_BOUNDS = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))


def size_category(n: int) -> str:
    """The Hub's `size_categories` tag for `n` records."""
    for bound, tag in _SIZE_BOUNDS:
        if n < bound:
            return tag
    return "n>1T" if n >= 1_000_000_000_000 else "1B<n<10B"


def _feature(t: pa.DataType) -> dict[str, Any]:
    """A `datasets` feature description of an Arrow type (the subset the canonical schema uses)."""
    if pa.types.is_struct(t):
        return {"struct": [{"name": t.field(i).name, **_feature(t.field(i).type)} for i in range(t.num_fields)]}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _feature(t.value_type)
        # Hub convention: a list of structs is `list: [fields]`, a list of scalars is `sequence: dtype`.
        return {"list": inner["struct"]} if "struct" in inner else {"sequence": inner["dtype"]}
    return {"dtype": {"large_string": "string", "double": "float64", "float": "float32"}.get(str(t), str(t))}


def features(schema: pa.Schema = CANONICAL_SCHEMA) -> list[dict[str, Any]]:
    """`dataset_info.features` for `schema`."""
    return [{"name": f.name, **_feature(f.type)} for f in schema]


def render_card(manifest: dict[str, Any]) -> str:
    """README.md for one version: YAML front matter the Hub reads, then lineage for people."""
    counts: dict[str, int] = manifest["counts"]["splits"]
    splits = [s for s in ("train", "replay") if counts.get(s)]
    licenses = sorted({s.get("license") or "unknown" for s in manifest["lineage"]["sources"]}) or ["unknown"]
    meta = {
        "pretty_name": f"{manifest['name']} v{manifest['version']:04d}",
        "license": "other" if licenses != [licenses[0]] or licenses == ["unknown"] else licenses[0],
        "source_licenses": licenses,
        "size_categories": [size_category(counts.get("train", 0))],
        "task_categories": ["text-generation"],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": s, "path": f"data/{s}-*"} for s in splits]}],
        "dataset_info": {"features": features(),
                         "splits": [{"name": s, "num_bytes": manifest["counts"]["split_bytes"][s],
                                     "num_examples": counts[s]} for s in splits]},
    }
    lin = manifest["lineage"]
    run = manifest.get("run") or {}
    lines = [f"# {manifest['name']} — version {manifest['version']}", "",
             "Instruction data in the Infinity-Instruct schema (`id`, `conversations[{from, value}]`, `label`, "
             "`langdetect`, `source`, `reward`), published by the iip platform. Load it with "
             "`datasets.load_dataset(<this folder>)`.", "",
             "## Counts", "", *[f"- `{s}`: {counts[s]} records" for s in counts], "",
             "| source | domain | records |", "|---|---|---|",
             *[f"| {r['source']} | {r['domain']} | {r['records']} |" for r in manifest["counts"]["by_source_domain"]],
             "", "## Lineage", "",
             f"- DAG run: `{run.get('dag_id', '')}` / `{run.get('run_id', '')}`",
             f"- run folder: `{manifest['run_root']}`", f"- published step: `{manifest['step_dir']}`",
             f"- report: [{manifest['report']}]({manifest['report']})", "", "### Sources", "",
             "| source | license | manifest sha256 | records |", "|---|---|---|---|",
             *[f"| `{s['uri']}` | {s.get('license') or 'unknown'} | `{s['manifest_sha256'] or '-'}` | "
               f"{s['records'] if s['records'] is not None else '-'} |" for s in lin["sources"]],
             "", "### Steps", "", "| step | config hash | in | kept |", "|---|---|---|---|",
             *[f"| {k} ({v['step']}) | `{v['config_hash']}` | {v['records_in']} | {v['records_kept']} |"
               for k, v in lin["steps"].items()], ""]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n" + "\n".join(lines)
