"""`python -m operators`: the one door through which a local process or a Kubernetes pod runs a step.

    python -m operators plan   <step> --config JSON|PATH --input URI [--input URI ...] --output STEP_DIR
    python -m operators run    <step> --config JSON|PATH --input URI ... --output STEP_DIR [--shard K]
    python -m operators stage  <step> --stage NAME --config JSON|PATH --output STEP_DIR [--shard K]
    python -m operators reduce <step> --output STEP_DIR
    python -m operators validate --output STEP_DIR     # great-expectations suite; exit 1 on failure
    python -m operators export --input STEP_DIR --output DIR [--formats parquet,hf,sharegpt]  # the whole tail
    python -m operators export ... --plan | --shard K | --commit [--validate] [--run RUN_ROOT]  # as DAG tasks
    python -m operators report --output RUN_ROOT  # funnel, drops by reason, samples -> report.{json,md,html}
    python -m operators steps                    # registered steps and their config JSON schemas
    python -m operators verify STEP_DIR ... [--no-checksums]  # files, checksums, stray parts; exit 1 if unsound
    python -m operators datasets publish <name> --input STEP_DIR --run RUN_ROOT [--keep K]  # a new version
    python -m operators datasets list [<name>] | show <name> [vN] | diff <name> [vA vB]
    python -m operators datasets pin|unpin <name> vN | retain <name> --keep K     (--root DATA_ROOT)
    python -m operators sources list [<dataset>] | show <name>          (the source registry; --root)
    python -m operators train --stage stage1|stage2|one_stage --config TWO_STAGE_JSON --output TRAIN_DIR
    python -m operators train --config TRAIN_JOB_JSON --output RUN_DIR      # one run (bench, tests)
    python -m operators evaluate --stage base|stage1|stage2|one_stage --config TWO_STAGE_JSON --output TRAIN_DIR
    torchrun --nproc_per_node N -m operators train ...   # the same run over N processes (ZeRO-3)

Multi-stage steps (dedup, DSIR) run their auxiliary stages with `stage` after `plan` and before `run`:
map and partition stages once per shard (`--shard K`; a partition stage's task K reduces shuffle partitions
K, K + shards, ...), reduce stages once. `--shard K --of SLOTS` (stage, run, export) is task K of a grouped
wave: the light per-shard work a DAG runs in at most SLOTS tasks, each doing shards K, K + G, ... in turn (G =
min(SLOTS, shards)), each committed as its own task would. `run` without `--shard` plans, runs every stage and
shard and reduces in one process. The last stdout line is a
JSON summary; `--xcom-file` also writes it where Airflow's KubernetesPodOperator collects XComs.
Exit codes: 0 done, 1 step failed, 2 bad config or arguments (nothing was written).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from typing import Any

from pydantic import ValidationError

from operators.core import storage
from operators.core.fusion import Then, Through, adopt_heads, commit_through, head, run_then
from operators.core.manifest import Manifest, clear_off, read_manifest, read_off, step_manifest_uri, write_off
from operators.core.registry import STEPS, UnknownStepError, step_class
from operators.core.runner import (
    StepFailed,
    load_plan,
    make_plan,
    reduce_step,
    run_all,
    run_map_stage,
    run_partition_stage,
    run_reduce_stage,
    run_shard,
    shards_to_run,
)
from operators.core.stats import LedgerError
from operators.core.step import Step, slot_members

log = logging.getLogger("operators")


class ConfigError(ValueError):
    """The step config is invalid; the message names the field."""


def load_config_arg(value: str | None) -> dict[str, Any]:
    """Parse `--config`: inline JSON, or a path/URI of a JSON file."""
    if value is None or not value.strip():
        return {}
    text = value if value.lstrip().startswith("{") else storage.read_bytes(value).decode()
    data = _json_arg(text, "config", dict)
    assert isinstance(data, dict)
    return data


def _json_arg(text: str, what: str, kind: type[dict[str, Any]] | type[list[Any]]) -> Any:
    """`text` parsed as JSON of type `kind`, or ConfigError naming argument `what`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(data, kind):
        raise ConfigError(f"{what} must be a JSON {'object' if kind is dict else 'list'}")
    return data


def build_step(name: str, config: dict[str, Any]) -> Step[Any]:
    """Instantiate step `name` with a validated config, or raise ConfigError naming the bad fields."""
    cls = step_class(name)
    try:
        cfg = cls.config_model.model_validate(config)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid config for step {name!r}: {problems}") from None
    return cls(cfg)


def _then_steps(value: str | None) -> list[tuple[Then, Step[Any]]]:
    """`run --then`: the steps to fuse after the shard, validated (steps, configs, output URIs) before any work."""
    if value is None or not value.strip():
        return []
    out = []
    for item in _json_arg(value, "--then (a list of {step, config, output})", list):
        then = _validated(Then, item, "--then")
        storage.validate_uri(then.output)
        out.append((then, build_step(then.step, then.config)))
    return out


def _through_steps(value: str | None, step_input: list[str]) -> list[tuple[Through, Step[Any]]]:
    """`plan --through`: the stage-less steps between the upstream (the first one's input) and this step, in
    order, validated before any work: each reads the one before it, and this step (`step_input`) the last."""
    if value is None or not value.strip():
        return []
    out: list[tuple[Through, Step[Any]]] = []
    for item in _json_arg(value, "--through (a list of {step, config, input, output})", list):
        piece = _validated(Through, item, "--through")
        if head(step_class(piece.step)) != "run":
            raise ConfigError(f"--through: step {piece.step} has stages; only a stage-less step is committed on "
                              "the way")
        if out and storage.validate_uri(piece.input) != storage.validate_uri(out[-1][0].output):
            raise ConfigError(f"--through: step {piece.step} reads {piece.input}, not {out[-1][0].output}, the "
                              "output before it")
        out.append((piece, build_step(piece.step, piece.config)))
    if out and [storage.validate_uri(u) for u in step_input] != [storage.validate_uri(out[-1][0].output)]:
        raise ConfigError(f"--through: this step reads {step_input}, not {out[-1][0].output}, the last one's "
                          "output")
    return out


def _emit(result: dict[str, Any], xcom_file: str | None) -> None:
    line = json.dumps(result, sort_keys=True)
    if xcom_file:
        os.makedirs(os.path.dirname(xcom_file) or ".", exist_ok=True)
        with open(xcom_file, "w") as f:
            f.write(line)
    print(line, flush=True)


def _members(shard: int, of: int | None, num_shards: int) -> list[int]:
    """The shards a task does: `shard` alone, or with `--of`, its members in a grouped wave (`slot_members`)."""
    if of is None:
        return [shard]
    try:
        return slot_members(shard, of, num_shards)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _summed(manifests: list[Manifest], of: int | None, members: list[int]) -> dict[str, Any]:
    """One task's summary over the shards it committed: one shard's stats, or several shards' summed counts; a
    grouped task (`--of`) also lists its shards."""
    listed = {"shards": members} if of is not None else {}
    if len(manifests) == 1:
        return {**manifests[0].stats.model_dump(mode="json"), **listed}
    return {"records_in": sum(m.stats.records_in for m in manifests),
            "records_kept": sum(m.stats.records_kept for m in manifests), **listed}


def _reduce(step: str, output: str) -> dict[str, Any]:
    """Commit step `step` at `output` (its reduce; nothing when the step is off); its summary."""
    if read_off(output) is not None and read_manifest(step_manifest_uri(output)) is None:
        return {"step": step, "output": output, "off": True}
    m = reduce_step(step, output)
    return {"step": step, "output": output, **m.stats.model_dump(mode="json")}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m operators", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for cmd in ("plan", "stage", "run", "reduce"):
        sp = sub.add_parser(cmd)
        sp.add_argument("step")
        sp.add_argument("--output", required=True, help="step directory URI (file:// or s3://)")
        sp.add_argument("--xcom-file", default=None)
        if cmd != "reduce":
            sp.add_argument("--config", default=None, help="inline JSON or a path/URI to a JSON file")
            sp.add_argument("--input", action="append", default=[], help="input URI (repeatable)")
        if cmd in ("run", "stage"):
            sp.add_argument("--shard", type=int, default=None)
            sp.add_argument("--of", type=int, default=None, metavar="SLOTS",
                            help="with --shard K: this task is task K of a grouped wave of SLOTS tasks; it does "
                                 "shards K, K + G, K + 2G, ... (G = min(SLOTS, shards)), each committed on its own")
        if cmd == "run":
            sp.add_argument("--then", default=None, metavar="JSON",
                            help="with --shard: the chain's next steps, a JSON list of {step, config, output}; "
                                 "after the shard, their record-local work on it runs in this task "
                                 "(operators/core/fusion.py)")
        if cmd == "stage":
            sp.add_argument("--stage", required=True)
        if cmd == "plan":
            sp.add_argument("--after", default=None, metavar="STEP",
                            help="first commit STEP, the upstream step whose output is the one --input (its "
                                 "reduce, in this task: one task and one pod start fewer per step); plan aligned "
                                 "to its shards and commit what its fused shard tasks prepared")
            sp.add_argument("--through", default=None, metavar="JSON",
                            help="with --after: stage-less steps between STEP and this one, a JSON list of "
                                 "{step, config, input, output}, each reading the one before; commit each here "
                                 "(what STEP's fused shard tasks prepared, the rest run here) before planning")
            sp.add_argument("--fold-head", action="store_true",
                            help="with --after: the DAG has no task for this step's first map stage nor for a "
                                 "reduce stage right after it; run what the upstream's shard tasks did not "
                                 "prepare, and that reduce stage, here")
    vp = sub.add_parser("validate")
    vp.add_argument("--output", required=True, help="committed step directory to validate")
    vp.add_argument("--xcom-file", default=None)
    ep = sub.add_parser("export")
    ep.add_argument("--input", required=True, help="committed step directory to export")
    ep.add_argument("--output", required=True, help="export folder")
    ep.add_argument("--formats", default="parquet,hf,sharegpt")
    ep.add_argument("--name", default="dataset")
    part = ep.add_mutually_exclusive_group()
    part.add_argument("--plan", action="store_true", help="print the tail's shard list (the DAG maps over it)")
    part.add_argument("--shard", type=int, default=None, help="one shard task of the tail")
    ep.add_argument("--of", type=int, default=None, metavar="SLOTS",
                    help="with --shard K: task K of a grouped wave of SLOTS tasks (as for `stage`)")
    part.add_argument("--commit", action="store_true", help="commit the shard tasks' work (_EXPORT.json)")
    ep.add_argument("--validate", action="store_true", help="run the great-expectations suite (validation.json)")
    ep.add_argument("--after", default=None, metavar="STEP",
                    help="with --plan: first commit STEP, the step whose output is --input (its reduce, in this "
                         "task: one pod start fewer)")
    ep.add_argument("--run", default=None, help="run root: also index its dedup steps' survivors (for publish)")
    ep.add_argument("--xcom-file", default=None)
    rp = sub.add_parser("report")
    rp.add_argument("--output", required=True, help="run root URI holding committed steps")
    rp.add_argument("--run-context", default=None, help="JSON {dag_id, run_id, logical_date} of the Airflow run")
    rp.add_argument("--index", default=None, help="data root under which _reports/<dag>/<run>.json is written")
    rp.add_argument("--xcom-file", default=None)
    sub.add_parser("steps")
    verp = sub.add_parser("verify", help="check committed step folders: listed files, checksums, stray parts")
    verp.add_argument("step_dirs", nargs="+", help="committed step directory URIs")
    verp.add_argument("--no-checksums", action="store_true", help="check sizes only (no full read)")
    dp = sub.add_parser("datasets", help="dataset versions: publish, list, show, diff, pin, unpin, retain")
    dp.add_argument("action", choices=("publish", "list", "show", "diff", "pin", "unpin", "retain"))
    dp.add_argument("name", nargs="?", default=None)
    dp.add_argument("versions", nargs="*", default=[], help="show: [vN]; diff: [vA vB] (default: the two "
                    "latest); pin/unpin: vN")
    dp.add_argument("--root", default=None, help="data root (default: IIP_DATA_ROOT or ./.data)")
    dp.add_argument("--input", default=None, help="publish: the committed step directory")
    dp.add_argument("--run", default=None, help="publish: the run root (lineage, stats, report)")
    dp.add_argument("--config", default=None, help="publish: JSON {keep, licenses}")
    dp.add_argument("--keep", type=int, default=None)
    dp.add_argument("--run-context", default=None, help="publish: JSON {dag_id, run_id, logical_date}")
    dp.add_argument("--xcom-file", default=None)
    sp_ = sub.add_parser("sources", help="the source registry: list [dataset], show <name>")
    sp_.add_argument("action", choices=("list", "show"))
    sp_.add_argument("name", nargs="?", default=None, help="list: a dataset to filter by; show: a source name")
    sp_.add_argument("--root", default=None, help="data root (default: IIP_DATA_ROOT or ./.data)")
    for cmd in ("train", "evaluate"):
        tp = sub.add_parser(cmd)
        tp.add_argument("--config", required=True, help="inline JSON or a path/URI to a JSON file")
        tp.add_argument("--output", required=True, help="fine-tuning directory (local or mounted path)")
        tp.add_argument("--stage", default=None, required=cmd == "evaluate",
                        help="stage1, stage2, one_stage, a replay sweep's stage2_replay_<ratio>"
                        + (", base or report" if cmd == "evaluate" else ""))
        tp.add_argument("--xcom-file", default=None)
    return p


def _validated(model: Any, data: dict[str, Any], what: str) -> Any:
    """`model.model_validate(data)`, or ConfigError naming each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid {what} config: {problems}") from None


def _train_command(args: argparse.Namespace) -> dict[str, Any]:
    """`train` / `evaluate`: dispatch into operators.train (heavy imports happen only here)."""
    from operators.train.config import TwoStageConfig
    from operators.train.trainer import TrainJob

    data = load_config_arg(args.config)
    if args.command == "train" and args.stage is None:
        job = _validated(TrainJob, {**data, "output": args.output}, "train job")
    else:
        cfg = _validated(TwoStageConfig, data, "fine-tuning")
        storage.validate_uri(args.output)
    if args.stage is not None and args.stage != "report":
        from operators.train.stages import ABLATION_STAGE, STAGES, known_stage, sweep_ratio

        if args.stage not in ("base", *STAGES, ABLATION_STAGE) and sweep_ratio(args.stage) is None:
            raise ConfigError(f"unknown stage {args.stage!r}: use stage1, stage2, one_stage, {ABLATION_STAGE}, "
                              "stage2_replay_<ratio>" + (", base or report" if args.command == "evaluate" else ""))
        if args.stage == "base" and args.command == "train":
            raise ConfigError("the base model is not trained: 'base' is a stage of evaluate only")
        if not ((args.stage == "base" and cfg.evaluate_base) or known_stage(cfg, args.stage)):
            return {"skipped": True, "stage": args.stage, "reason": f"stage {args.stage} is not part of mode "
                    f"{cfg.mode}" + (" (evaluate_base is off)" if args.stage == "base" else
                                     f" with replay_ratios {cfg.replay_ratios} and ablation_foundational "
                                     f"{cfg.ablation_foundational}")}
    if args.command == "evaluate" and args.stage == "report":
        from operators.train.evaluate import write_report

        report = write_report(args.output, cfg)
        return {"stages": [r["stage"] for r in report["rows"]], "rows": report["rows"]}
    if args.command == "evaluate":
        from operators.train.evaluate import evaluate_stage

        result = evaluate_stage(cfg, args.stage, args.output)
        return {"stage": args.stage, "heldout_loss": result["heldout_loss"],
                "benchmarks": {k: v["score"] for k, v in result["benchmarks"].items()},
                "chat": result["chat"]["score"] if result["chat"] else None}
    from operators.train.trainer import run_training

    if args.stage is not None:
        from operators.train.stages import stage_job

        job = stage_job(cfg, args.stage, args.output)
    summary = run_training(job)
    return {k: summary[k] for k in ("output", "global_step", "first_loss", "last_loss", "tokens_per_s",
                                    "peak_rss_mb", "resumed_from", "world_size", "init_model")}


def _datasets_command(args: argparse.Namespace) -> int:
    """`datasets ...`: the version registry (operators.datasets); prints JSON (diff: one JSON line per group)."""
    from operators.datasets import versions as dv
    from operators.datasets.diff import diff_versions
    from operators.orchestration.settings import data_root

    root = args.root or data_root()
    if args.action == "list":
        for name in [args.name] if args.name else dv.names(root):
            latest = dv.read_latest(root, name)[0]
            print(json.dumps({"name": name, "latest": latest, "versions": dv.versions(root, name),
                              "pinned": sorted(dv.pinned(root, name))}), flush=True)
        return 0
    if not args.name:
        raise ConfigError(f"datasets {args.action} needs a dataset name")
    vs = [dv.parse_version(v) for v in args.versions]
    if args.action == "publish":
        if not args.input or not args.run:
            raise ConfigError("datasets publish needs --input STEP_DIR and --run RUN_ROOT")
        data = {**load_config_arg(args.config), "name": args.name}
        if args.keep is not None:
            data["keep"] = args.keep
        cfg = _validated(dv.PublishConfig, data, "publish")
        run = json.loads(args.run_context) if args.run_context else None
        # The run's export, when the tail committed one of this very step output: the version copies its files.
        export_dir = storage.join(storage.validate_uri(args.run), "export")
        _emit(dv.publish(root, cfg, args.input, args.run, run, export_dir), args.xcom_file)
    elif args.action == "show":
        print(json.dumps(dv.show(root, args.name, vs[0] if vs else None), indent=2))
    elif args.action == "diff":
        if not vs:
            vs = dv.versions(root, args.name)[-2:]
        if len(vs) != 2:
            raise ConfigError("datasets diff needs two versions (or a dataset with at least two)")
        for group in diff_versions(root, args.name, vs[0], vs[1]):
            print(json.dumps(group), flush=True)
    elif args.action in ("pin", "unpin"):
        if len(vs) != 1:
            raise ConfigError(f"datasets {args.action} needs one version")
        dv.pin(root, args.name, vs[0], on=args.action == "pin")
        print(json.dumps({"name": args.name, "pinned": sorted(dv.pinned(root, args.name))}))
    else:
        if args.keep is None:
            raise ConfigError("datasets retain needs --keep K")
        print(json.dumps({"name": args.name, "deleted": dv.retain(root, args.name, args.keep)}))
    return 0


def _export_command(args: argparse.Namespace) -> int:
    """The tail (operators/tail.py): whole, or one of its DAG tasks (plan, a shard, the commit)."""
    from operators.export import ExportError
    from operators.tail import export_step, tail_commit, tail_shard, tail_to_run
    from operators.validate import ValidationFailed

    formats = tuple(args.formats.split(","))
    try:
        if args.after and not args.plan:
            raise ConfigError("export --after is for --plan")
        if args.plan:
            if args.after:
                log.info("step %s committed: %s", args.after, _reduce(args.after, args.input))
            _emit({"shards": tail_to_run(args.input, args.output, formats, args.validate)}, args.xcom_file)
            return 0
        if args.shard is not None:
            from operators.tail import tail_shards

            counts: Counter[str] = Counter()
            done = []
            # Only a grouped task needs the shard count (an ungrouped one would list the step's parts for nothing).
            num_shards = len(tail_shards(args.input)) if args.of is not None else 0
            for k in _members(args.shard, args.of, num_shards):
                s = tail_shard(args.input, args.output, k, formats=formats, run_root=args.run,
                               validate=args.validate)
                counts.update(s["counts"])
                done.append(s["shard"])
            _emit({"shard": args.shard, "shards": done, "of": s["of"], "counts": dict(counts)}, args.xcom_file)
            return 0
        if args.commit:
            summary = tail_commit(args.input, args.output, formats=formats, name=args.name, validate=args.validate)
        else:
            summary = export_step(args.input, args.output, formats, args.name, run_root=args.run,
                                  validate=args.validate)
    except ExportError as e:
        log.error("%s", e)
        return 2
    except ValidationFailed as e:
        log.error("validation failed: %s", e)
        return 1
    _emit({"out_dir": summary["out_dir"], "counts": summary["counts"]}, args.xcom_file)
    return 0


def _sources_command(args: argparse.Namespace) -> int:
    """`sources list [dataset] | show <name>`: the source registry (operators.datasets.sources), as JSON."""
    from operators.datasets.sources import Registry, describe, load
    from operators.orchestration.settings import data_root

    registry, _ = load(args.root or data_root())
    if args.action == "list":
        shown = registry.of_dataset(args.name) if args.name else registry.sources
        out = describe(Registry(version=registry.version, sources=shown))
        if out:
            print(out, flush=True)
        return 0
    entry = registry.get(args.name or "")
    if entry is None:
        raise ConfigError(f"no source named {args.name!r} in the registry (version {registry.version})")
    print(json.dumps(entry.model_dump(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("IIP_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "steps":
            schemas = {n: step_class(n).config_model.model_json_schema() for n in sorted(STEPS)}
            print(json.dumps(schemas, indent=2))
            return 0
        if args.command == "validate":
            from operators.validate import ValidationFailed, validate_step

            try:
                report = validate_step(args.output)
            except ValidationFailed as e:
                log.error("validation failed: %s", e)
                return 1
            _emit({"records": report["records"], "success": report["success"]}, args.xcom_file)
            return 0
        if args.command == "export":
            return _export_command(args)
        if args.command == "sources":
            return _sources_command(args)
        if args.command == "verify":
            from operators.core.verify import verify_step

            checks = [verify_step(d, checksums=not args.no_checksums) for d in args.step_dirs]
            for c in checks:
                print(json.dumps(c.as_dict()), flush=True)
            return 0 if all(not c.problems for c in checks) else 1
        if args.command == "datasets":
            from operators.datasets.versions import PublishConflict, PublishError

            try:
                return _datasets_command(args)
            except PublishConflict as e:
                log.error("publish lost the race: %s", e)
                return 1
            except PublishError as e:
                log.error("%s", e)
                return 2
        if args.command in ("train", "evaluate"):
            from operators.llm.models import ModelNotFound
            from operators.train.trainer import TrainError

            try:
                _emit(_train_command(args), args.xcom_file)
            except (TrainError, ModelNotFound) as e:
                log.error("%s failed: %s", args.command, e)
                return 1
            return 0
        if args.command == "report":
            from operators.report import write_report

            run = json.loads(args.run_context) if args.run_context else None
            if run is not None and not isinstance(run, dict):
                raise ConfigError("--run-context must be a JSON object")
            _emit(write_report(args.output, run, args.index), args.xcom_file)
            return 0
        if args.command == "reduce":
            _emit(_reduce(args.step, args.output), args.xcom_file)
            return 0
        step = build_step(args.step, load_config_arg(args.config))
        if getattr(args, "then", None) and args.shard is None:
            raise ConfigError("run --then needs --shard: it goes on with one shard")
        if args.command == "plan" and args.fold_head and not args.after:
            raise ConfigError("plan --fold-head needs --after")
        if args.command == "plan" and args.through and not args.after:
            raise ConfigError("plan --through needs --after")
        committed: list[dict[str, Any]] = []  # a plan's upstream, then the steps it commits on the way
        if args.command == "plan" and args.after:
            if len(args.input) != 1:
                raise ConfigError("plan --after needs exactly one --input: the upstream step's output")
            through = _through_steps(args.through, args.input)
            committed.append(_reduce(args.after, through[0][0].input if through else args.input[0]))
            committed += [commit_through(st, piece) for piece, st in through]
            for upstream in committed:
                log.info("upstream step %s committed: %s", upstream["step"],
                         {k: upstream.get(k) for k in ("records_in", "records_kept", "off") if k in upstream})
        if args.command in ("plan", "run") and getattr(args, "shard", None) is None:
            if not args.input:
                raise ConfigError(f"{args.command} needs at least one --input")
            if step.is_off():  # nothing to plan or run: downstream reads this step's inputs instead
                write_off(args.output, args.input)
                log.info("step %s is off: %s passes its inputs on", args.step, args.output)
                _emit({"step": args.step, "output": args.output, "off": True, "shards": []}, args.xcom_file)
                return 0
            clear_off(args.output)
        if args.command == "plan":
            plan = make_plan(step, args.input, args.output, aligned=bool(args.after))
            to_run, adopted = shards_to_run(plan, args.output), 0
            if args.after:
                to_run, adopted = adopt_heads(step, args.output, plan, to_run, fold_head=args.fold_head)
            passed = {"through": [{k: c[k] for k in ("step", "prepared", "ran_here", "records_in", "records_kept")
                                   if k in c} for c in committed[1:]]} if committed[1:] else {}
            _emit({"shards": [s.index for s in plan.shards], "to_run": to_run, "config_hash": plan.config_hash,
                   "prepared": adopted, **passed}, args.xcom_file)
            return 0
        if args.command == "stage":
            plan = load_plan(args.output)
            kinds = {st.name: st.kind for st in step.stages}
            if args.stage not in kinds:
                raise ConfigError(f"step {args.step!r} has no stage {args.stage!r}; stages: {sorted(kinds)}")
            if kinds[args.stage] in ("map", "partition"):
                if args.shard is None:
                    raise ConfigError(f"{kinds[args.stage]} stage {args.stage!r} needs --shard")
                run_one = run_map_stage if kinds[args.stage] == "map" else run_partition_stage
                members = _members(args.shard, args.of, len(plan.shards))
                ms = [run_one(step, args.output, plan, args.stage, k) for k in members]
                _emit({"step": args.step, "stage": args.stage, "shard": args.shard,
                       **_summed(ms, args.of, members)}, args.xcom_file)
                return 0
            if args.of is not None:
                raise ConfigError(f"reduce stage {args.stage!r} runs once: --of is for per-shard stages")
            m = run_reduce_stage(step, args.output, plan, args.stage)
            _emit({"step": args.step, "stage": args.stage, "shard": args.shard, **m.stats.model_dump(mode="json")},
                  args.xcom_file)
            return 0
        if args.shard is None:
            if not args.input:
                raise ConfigError("run needs at least one --input")
            m = run_all(step, args.input, args.output)
            summary: dict[str, Any] = m.stats.model_dump(mode="json")
            fused: list[dict[str, Any]] = []
        else:
            then = _then_steps(args.then)
            plan = load_plan(args.output)
            done: list[Manifest] = []
            fused = []
            members = _members(args.shard, args.of, len(plan.shards))
            for k in members:
                done.append(run_shard(step, args.output, plan, k))
                fused += run_then(then, args.output, k, len(plan.shards)) if then else []
            summary = _summed(done, args.of, members)
        _emit({"step": args.step, "output": args.output, "shard": args.shard,
               **summary, **({"then": fused} if fused else {})}, args.xcom_file)
        return 0
    except storage.StorageFull as e:  # retryable: an operator frees space, the task's retry completes the step
        log.error("%s", e)
        return 1
    except storage.StorageUnavailable as e:  # an outage, not a bad input: the task's retry may get through
        log.error("storage unavailable: %s", e)
        return 1
    except (ConfigError, UnknownStepError, storage.StorageError) as e:
        log.error("%s", e)
        return 2
    except (StepFailed, LedgerError) as e:
        log.error("step failed: %s", e)
        return 1
