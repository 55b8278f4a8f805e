"""Command line of the pipeline: `python pipeline/run.py [--config FILE] [--stage ID ...] ...`."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

from pipeline import console, tracking
from pipeline.config import DEFAULT_CONFIG, load_config
from pipeline.errors import UserError
from pipeline.storage import WorkDirError, check_work_dir, disk_full, is_local, no_space, resolve_uri

EPILOG = """\
stage ids:
  shard            image folder -> Parquet shards, class index, mean RGB and RGB eigen-decomposition
  augment          DALI augmentation spec, checked on a few batches (throughput, sample grid)
  train/<net>      Ray Train (DDP) training of one net of the config's plan
  evaluate/<net>   dense / multi-crop / multi-scale evaluation of one trained net
  fuse             softmax fusion of chosen (net, mode) members
  report           the paper's Tables 3-6 with intervals, and its claims judged, from the saved posteriors
  (`--list` shows the stages of a config and whether each is done, stale or missing)

config keys (YAML, typed; every key can be overridden with --set dotted.key=value):
  work_dir               where outputs live: a path or a filesystem URI such as s3://bucket/vgg (default ./runs)
  experiment             MLflow experiment name
  mlflow.tracking_uri    default sqlite:///<work_dir>/mlflow.db; the env variable MLFLOW_TRACKING_URI wins
  ray.address            default: $RAY_ADDRESS if set, else a private local Ray instance; "auto" on a cluster
  data.root              image folder <root>/{train,val}/<class>/*; unset: a generated demo dataset
  pipeline.max_parallel_stages   stages at once (default auto: on one machine only as many as its CPUs/GPUs
                                 fit, on a cluster as its resources allow; 1: one by one; null: no limit)

caching: a stage whose cache key (hash of its config section, its upstream stages'
keys and the package version) has a completed output is reused, not re-run.

examples:
  python pipeline/run.py                                   # the whole demo pipeline
  python pipeline/run.py --list                            # the DAG and the state of each stage
  python pipeline/run.py --stage shard --force             # re-run one stage on its upstream's latest outputs
  python pipeline/run.py --config configs/cifar10.yaml --set data.root=/data/cifar10
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeline/run.py",
        description="Train and evaluate very deep ConvNets (VGG) as in Simonyan & Zisserman (2015): "
        "a DAG of stages on Ray, DALI and MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", default=None, help=f"YAML config (default: {DEFAULT_CONFIG})")
    p.add_argument(
        "--stage",
        metavar="ID",
        nargs="+",
        action="extend",
        default=None,
        help="run only these stages, on the latest completed outputs of their upstream stages",
    )
    p.add_argument("--force", action="store_true", help="re-run the selected stages even when cached")
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        help="override a config key, e.g. --set shard.rows_per_shard=500 (value parsed as YAML, type-checked)",
    )
    p.add_argument("--list", action="store_true", help="print the DAG with each stage's state and exit")
    p.add_argument("--verify", action="store_true",
                   help="check the content (sha256) of every completed output it reuses, not only "
                        "the sizes of its files (a damaged output is redone, or named)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's and MLflow's own log lines too (Ray Data progress, Ray Train's "
                        "controller, ...; hidden by default, kept in Ray's session logs, whose "
                        "directory the run names), and print the traceback of an expected error "
                        "(config, dataset, diverged training, server, disk) on the console")
    return p


def find_config(path: str | None) -> Path:
    """The config file: as given (relative to the current directory), else relative to the
    project checkout the package was installed from (`ray submit` runs from the home directory)."""
    p = Path(path or DEFAULT_CONFIG)
    if p.is_file() or p.is_absolute():
        return p
    import pipeline

    in_project = Path(pipeline.__file__).resolve().parent.parent / p
    return in_project if in_project.is_file() else p


def print_dag(cfg) -> None:
    """The stages with their state, the critical path, and the plan's expected wall time,
    serial and concurrent, from the durations of earlier runs of each stage in MLflow."""
    from pipeline.dag import build_dag
    from pipeline.runner import earlier_durations, states
    from pipeline.scheduler import critical_path

    rows = states(cfg)
    seconds = earlier_durations(cfg, [spec.id for spec, _, _ in rows])
    print(f"{'stage':<20} {'state':<8} {'cache key':<17} {'last s':>7}  upstream")
    for spec, key, state in rows:
        last = f"{seconds[spec.id]:.0f}" if spec.id in seconds else "-"
        print(f"{spec.id:<20} {state:<8} {key:<17} {last:>7}  {', '.join(spec.upstream) or '-'}")
    path, longest = critical_path(build_dag(cfg), seconds)
    print(f"\ncritical path: {' -> '.join(path)}")
    if not seconds:
        print("expected wall time: unknown (no earlier run of these stages in MLflow)")
        return
    unknown = [spec.id for spec, _, _ in rows if spec.id not in seconds]
    print(f"expected wall time from earlier runs: serial {sum(seconds.values()):.0f} s, concurrent "
          f"{longest:.0f} s (the critical path; if the cluster fits every stage that is ready)"
          + (f"; no earlier run of {', '.join(unknown)} (counted 0 s)" if unknown else ""))


def print_summary(run) -> None:
    """Every stage: ran / reused / failed / blocked, its start and end, its output (or why not)."""
    print(f"\n{'stage':<20} {'status':<8} {'start':>8} {'end':>8} {'seconds':>8}  output")
    clock = lambda t: time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"  # noqa: E731
    for r in run.records:
        where = r.output_uri if r.status in ("ran", "reused") else (
            f"blocked by {r.note}" if r.status == "blocked" else r.note)
        print(f"{r.stage_id:<20} {r.status:<8} {clock(r.started):>8} {clock(r.ended):>8} {r.seconds:>8.1f}  {where}")
    print(f"MLflow parent run: {run.parent_run_id} (experiment id {run.experiment_id}, {run.tracking_uri})")
    print(tracking.ui_hint(run.tracking_uri, run.experiment_id))


def user_error(e: BaseException) -> BaseException | None:
    """The user-fixable error behind `e` (itself, or the cause a Ray task wrapped), or None.

    Expected: UserError (config, dataset, diverged training, ...), an unreachable server
    (ConnectionError) and a full disk (ENOSPC, or SQLite's "database or disk is full")."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (UserError, ConnectionError)) or _disk_full(e):
            return getattr(e, "cause", None) if isinstance(getattr(e, "cause", None), BaseException) else e
        e = e.__cause__ or e.__context__
    return None


_disk_full = disk_full


def _message(e: BaseException, work_dir: str | None = None) -> str:
    if _disk_full(e):
        return (f"{no_space(e, work_dir)}; free some space (or move work_dir) and run the same "
                "command again: completed stages are reused, an interrupted training resumes")
    return str(e)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Control characters (a NUL or an escape sequence in a config value) as escapes, so
    that an error line is one line and never drives the terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text).replace("\n", " ")


def _save_traceback(e: BaseException, work_dir: str | None = None) -> str:
    """The traceback in a file (not on the console), beside the run it belongs to:
    <work_dir>/logs/ (a local work_dir), else (no usable work_dir, a full disk, object
    storage) the system's temporary folder; -> its path."""
    fd = None
    if work_dir:
        fs, root = resolve_uri(work_dir)
        if is_local(fs) and os.path.isdir(root):
            try:
                os.makedirs(os.path.join(root, "logs"), exist_ok=True)
                fd, path = tempfile.mkstemp(prefix=f"error-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log",
                                            dir=os.path.join(root, "logs"))
            except OSError:
                fd = None
    if fd is None:
        fd, path = tempfile.mkstemp(prefix="vgg-pipeline-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        traceback.print_exception(type(e), e, e.__traceback__, file=f)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console.configure(args.verbose)  # before MLflow and Ray start
    from pipeline.runner import run_pipeline

    cfg = None
    try:
        cfg_path = find_config(args.config)
        cfg = load_config(cfg_path, args.overrides)
        if args.list:
            check_work_dir(cfg.work_dir, write=False)
            print_dag(cfg)
            return 0
        hint = [*(["--config", args.config] if args.config else []),
                *(["--set", *args.overrides] if args.overrides else [])]
        run = run_pipeline(cfg, args.stage, args.force, str(cfg_path), hint=hint, verify=args.verify)
    except Exception as e:  # noqa: BLE001 - expected errors in one line, others as they are
        if getattr(e, "pipeline_run", None) is not None:
            print_summary(e.pipeline_run)  # every stage: which ran, failed, or were blocked
        known = user_error(e)
        if known is None:
            raise
        line = f"error: {printable(_message(known, cfg and cfg.work_dir))}"
        if args.verbose:
            traceback.print_exception(type(e), e, e.__traceback__)
        elif getattr(known, "keep_traceback", True):
            here = None if isinstance(known, WorkDirError) or _disk_full(known) else cfg and cfg.work_dir
            line += f" (traceback: {_save_traceback(e, here)}; --verbose prints it)"
        print(line, file=sys.stderr)
        return 2
    print_summary(run)
    return 0
