"""ingest_source: register a raw corpus and normalize it into canonical records (also the backfill entry).

ingest.plan (group input files into shards) -> ingest.run[shard] (mapped) -> ingest.reduce -> report
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import dag

from operators.orchestration.dag_builder import report_task, step_group
from operators.orchestration.params import param, source_params
from operators.orchestration.settings import data_root, safe_name

OUTPUT = "{{ params.output_uri or (data_root ~ '/sources/' ~ safe_name(params.source_name)) }}"


@dag(
    dag_id="ingest_source",
    description="Normalize a raw instruction corpus (ShareGPT, OpenAI, Alpaca, Infinity-Instruct) into "
    "canonical records; quarantine bad rows with reasons.",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=4,
    render_template_as_native_obj=True,
    user_defined_macros={"data_root": data_root(), "safe_name": safe_name},
    tags=["iip", "phase-1", "ingest"],
    params={
        **source_params("demo", "Name recorded in each record's `source`."),
        "output_uri": param(None, type=["null", "string"],
                            description="Where to write; blank = <data root>/sources/<source_name>."),
        "split_conversations": param("rejoin", enum=["rejoin", "trim", "quarantine"],
                                     description="ShareGPT-style parts <id>_<n> of one conversation: rejoin them "
                                     "(in one file), trim a leading answer, or quarantine them."),
        "max_record_bytes": param(1 << 20, type="integer", minimum=256,
                                  description="Records above this size are quarantined as oversize."),
        "target_shard_mb": param(1024, type="number", exclusiveMinimum=0,
                                 description="Input files are grouped into parallel shards of about this size."),
    },
)
def ingest_source() -> None:
    ingest = step_group(
        "ingest",
        inputs=["{{ params.source_uri }}"],
        output_uri=OUTPUT + "/ingest",
        config={
            "source_name": "{{ params.source_name }}",
            "format": "{{ params.format }}",
            "split_conversations": "{{ params.split_conversations }}",
            "max_record_bytes": "{{ params.max_record_bytes }}",
            "target_shard_bytes": "{{ (params.target_shard_mb * 1048576) | int }}",
        },
    )
    ingest >> report_task(OUTPUT)


ingest_source()
