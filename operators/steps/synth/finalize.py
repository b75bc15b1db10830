"""`conversational_set` step: the final synthesized set in the Infinity-Instruct schema (Phase 2, last).

Reads every round's `respond` output and conforms each record to the canonical schema: conversations
alternate human/gpt and end with an answer (`broken_turns` otherwise), first-level labels are present
(`unlabeled` otherwise), `langdetect` is set from the text, `source` says how it was made
(`synthesized/<strategy>`), and lineage and seed columns stay beside the canonical ones. The result is
validated (great-expectations) and exported like the foundational set.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from operators.core.arrays import replace_column
from operators.core.step import BatchResult, Step, StepConfig, dropped_table
from operators.text.langid import detect_language


class ConversationalSetConfig(StepConfig):
    """No knobs: the checks are the schema's."""


def conversation_problem(conv: list[dict[str, Any]]) -> str | None:
    """Why a conversation is not a valid training conversation, or None."""
    turns = [t for t in conv if t["from"] != "system"]
    if len(turns) < 2:
        return f"{len(turns)} turn(s)"
    for i, t in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if t["from"] != want or not (t["value"] or "").strip():
            return f"turn {i} is {t['from']!r}{' and empty' if not (t['value'] or '').strip() else ''}"
    if turns[-1]["from"] != "gpt":
        return "does not end with an answer"
    return None


class ConversationalSetStep(Step[ConversationalSetConfig]):
    """Conform, check and label the synthesized conversations."""

    name: ClassVar[str] = "conversational_set"
    config_model: ClassVar[type[StepConfig]] = ConversationalSetConfig

    def transform(self, batch: pa.RecordBatch) -> BatchResult:
        table = pa.Table.from_batches([batch])
        convs = table["conversations"].to_pylist()
        problems = [conversation_problem(c) for c in convs]
        ok = pa.array([p is None for p in problems])
        kept = table.filter(ok)
        kept_convs = [c for c, p in zip(convs, problems, strict=True) if p is None]
        lineage = kept["lineage"].to_pylist() if "lineage" in kept.column_names else [None] * kept.num_rows
        labels = []
        unlabeled = 0
        for lab in kept["label"].to_pylist():
            lab = dict(lab or {})
            if not lab.get("cate_ability_en"):
                lab["cate_ability_en"] = ["unlabeled"]
                unlabeled += 1
            labels.append(lab)
        kept = replace_column(kept, "label", pa.array(labels, table.schema.field("label").type))
        kept = replace_column(kept, "source", [f"synthesized/{(lin or {}).get('strategy') or 'seed'}"
                                               for lin in lineage], pa.string())
        kept = replace_column(kept, "langdetect", [detect_language(" ".join(t["value"] for t in c[:2]))
                                                   for c in kept_convs], pa.string())
        bad = [p for p in problems if p is not None]
        dropped = dropped_table(table.filter(pc.invert(ok)), ["broken_turns"] * len(bad), bad)
        return BatchResult(kept=kept, dropped=dropped, counters={"unlabeled": float(unlabeled)})
