"""`label` step: two-level ability labels for every instruction (paper, Phase 2: ability labeling).

The labeling model reads the first human turn and answers with first-level abilities (from the project's
taxonomy, `operators/resources/taxonomy.yaml` or `taxonomy` in the config) and free second-level tags.
First-level labels outside the taxonomy are mapped to the nearest entry (string similarity) or to
`other`, and every mapping is recorded in `label_notes`. Second-level tags are kept raw here; the
`label_vocab` step normalizes and merges them globally. A record whose answer stays invalid after the
repair prompt is dropped with reason `label_invalid` and the model's raw output in `detail`, so it can
be relabeled later.
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import Field, field_validator

from operators.core.arrays import replace_column
from operators.core.step import BatchResult, StepConfig, dropped_table
from operators.schema import LABEL_TYPE, first_exchange
from operators.steps.synth.base import LLMStep, LLMStepConfig


def packaged_taxonomy() -> tuple[list[str], str]:
    """(first-level abilities, the catch-all label) as shipped in operators/resources/taxonomy.yaml."""
    data = yaml.safe_load((resources.files("operators") / "resources" / "taxonomy.yaml").read_text())
    return list(data["first_level"]), str(data["other"])


class LabelConfig(LLMStepConfig):
    """Taxonomy and how strictly labels must match it."""

    taxonomy: list[str] = Field(default_factory=lambda: packaged_taxonomy()[0], min_length=1)
    other_label: str = "other"
    match_cutoff: float = Field(0.75, gt=0, le=1, description="Similarity needed to map a label onto the taxonomy.")
    max_instruction_chars: int = Field(2000, ge=50, description="Longer instructions are cut for the prompt.")

    @field_validator("taxonomy")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [x.strip().lower() for x in v if x.strip()]


def map_ability(label: str, taxonomy: list[str], cutoff: float) -> str | None:
    """The taxonomy entry `label` means, or None: exact, unique prefix, close spelling, then shared words
    ('medical treatment' -> 'medical, pharmaceutical and health knowledge'; word stems match on 4+ letters)."""
    lab = " ".join(str(label).lower().replace("_", " ").split())
    if lab in taxonomy:
        return lab
    starts = [t for t in taxonomy if t.startswith(lab) and len(lab) >= 6]
    if len(starts) == 1:
        return starts[0]
    close = difflib.get_close_matches(lab, taxonomy, n=1, cutoff=cutoff)
    if close:
        return close[0]
    words = [w for w in re.findall(r"[a-z]+", lab) if len(w) >= 4 and w not in _GENERIC]
    best, best_score = None, 0
    for entry in taxonomy:
        entry_words = [w for w in re.findall(r"[a-z]+", entry) if len(w) >= 4]
        score = sum(any(e.startswith(w[:5]) or w.startswith(e[:5]) for e in entry_words) for w in words)
        if score > best_score:
            best, best_score = entry, score
    return best


# Words that appear in many taxonomy entries and so say nothing about which one is meant.
_GENERIC = frozenset({"knowledge", "ability", "skills", "understanding", "task", "tasks", "general", "about"})


def normalize_tag(tag: str) -> str:
    """Case, whitespace and punctuation at the edges of a free tag."""
    return " ".join(str(tag).lower().strip(" .,:;!?\"'`-_*").split())


class LabelStep(LLMStep[LabelConfig]):
    """Add `label.cate_ability_en` (first level), `label.ability_en` (second level), `label_notes`."""

    name: ClassVar[str] = "label"
    config_model: ClassVar[type[StepConfig]] = LabelConfig
    prompt_names: ClassVar[tuple[str, ...]] = ("label_abilities",)

    def __init__(self, config: LabelConfig) -> None:
        super().__init__(config)
        task = self.prompts["label_abilities"]
        schema = dict(task.output_schema or {})
        props = dict(schema.get("properties", {}))
        allowed = [*config.taxonomy, config.other_label]
        props["abilities"] = {**props.get("abilities", {"type": "array"}), "items": {"type": "string", "enum": allowed}}
        schema["properties"] = props
        # The schema (with the taxonomy as an enum) is what vLLM's guided decoding enforces and what the
        # client validates; an edited taxonomy changes it and so the cache key.
        self.task = task.model_copy(update={"output_schema": schema})
        self.max_abilities = int(props["abilities"].get("maxItems", 3))
        self.max_tags = int(props.get("tags", {}).get("maxItems", 5))
        self._taxonomy_text = "\n".join(f"- {t}" for t in config.taxonomy)

    def normalize(self, value: Any) -> Any:
        """Map first-level labels onto the taxonomy and clean tags; mappings go under `_notes`."""
        if isinstance(value, list):  # small models sometimes answer with the bare list of abilities
            value = {"abilities": value}
        if not isinstance(value, dict):
            return value
        mapped: list[str] = []
        notes: list[str] = []
        raw_abilities = [str(x) for x in value.get("abilities") or []]
        if not value.get("tags") and raw_abilities:
            # No tags given: the model's own ability phrases are specific enough to serve as tags.
            value = {**value, "tags": [a for a in raw_abilities if a.strip().lower() not in self.config.taxonomy]}
            notes.append("tags taken from the ability phrases")
        for raw in raw_abilities:
            m = map_ability(raw, self.config.taxonomy, self.config.match_cutoff)
            if m is None:
                notes.append(f"{raw!r}->{self.config.other_label}")
                m = self.config.other_label
            elif m != str(raw).strip().lower():
                notes.append(f"{raw!r}->{m!r}")
            if m not in mapped:
                mapped.append(m)
        if len(mapped) > self.max_abilities:  # small models list everything: keep the first, most salient
            notes.append(f"kept first {self.max_abilities} of {len(mapped)} abilities")
            mapped = mapped[: self.max_abilities]
        tags = [t for t in dict.fromkeys(normalize_tag(x) for x in value.get("tags") or []) if t][: self.max_tags]
        return {"abilities": mapped, "tags": tags, "_notes": notes}

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        table = pa.Table.from_batches([batch])
        rows = [{"instruction": first_exchange(c)[0][: self.config.max_instruction_chars],
                 "taxonomy": self._taxonomy_text} for c in table["conversations"].to_pylist()]
        results = self.client.run_task(self.task, rows, normalize=self.normalize)
        notes_per_row = ["; ".join(r.value["_notes"]) if r.value is not None else "" for r in results]
        ok = [r.failure is None for r in results]
        labels = table["label"].to_pylist() if "label" in table.column_names else [None] * table.num_rows
        new_labels = []
        for lab, r in zip(labels, results, strict=True):
            if r.value is None:
                continue
            base = dict(lab or {})
            base["cate_ability_en"] = r.value["abilities"]
            base["ability_en"] = r.value["tags"]
            base.setdefault("ability_zh", None)
            base.setdefault("cate_ability_zh", None)
            new_labels.append(base)
        mask = pa.array(ok)
        kept = table.filter(mask)
        kept = replace_column(kept, "label", pa.array(new_labels, LABEL_TYPE))
        kept = replace_column(kept, "label_raw", [r.raw for r in results if r.failure is None], pa.string())
        kept = replace_column(kept, "label_notes", [n for n, k in zip(notes_per_row, ok, strict=True) if k],
                              pa.string())
        bad = [r for r in results if r.failure is not None]
        dropped = dropped_table(table.filter(pc.invert(mask)), ["label_invalid"] * len(bad),
                                [f"{r.failure} | raw: {r.raw[:300]}" for r in bad])
        counters = self.drain_counters()
        counters["mapped_to_other"] = float(sum(n.count(f"->{self.config.other_label}") for n in notes_per_row))
        return BatchResult(kept=kept, dropped=dropped, counters=counters)
