"""Command line of the pipeline: `python pipeline/run.py [--config FILE] [--stage ID ...] ...`."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import traceback
from pathlib import Path

from pipeline.config import DEFAULT_CONFIG, load_config
from pipeline.errors import UserError

EPILOG = """\
stage ids:
  shard            image folder -> Parquet shards, class index, mean RGB and RGB eigen-decomposition
  augment          DALI augmentation spec, checked on a few batches (throughput, sample grid)
  train/<net>      Ray Train (DDP) training of one net of the config's plan
  evaluate/<net>   dense / multi-crop / multi-scale evaluation of one trained net
  fuse             softmax fusion of chosen (net, mode) members
  (`--list` shows the stages of a config and whether each is done, stale or missing)

config keys (YAML, typed; every key can be overridden with --set dotted.key=value):
  work_dir               where outputs live: a path or a filesystem URI such as s3://bucket/vgg (default ./runs)
  experiment             MLflow experiment name
  mlflow.tracking_uri    default sqlite:///<work_dir>/mlflow.db; the env variable MLFLOW_TRACKING_URI wins
  ray.address            default: $RAY_ADDRESS if set, else a private local Ray instance; "auto" on a cluster
  data.root              image folder <root>/{train,val}/<class>/*; unset: a generated demo dataset

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
    p.add_argument("--verbose", action="store_true",
                   help="print the traceback of an expected error (config, dataset, diverged training, "
                        "server, disk) on the console too")
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
    from pipeline.runner import states

    rows = states(cfg)
    print(f"{'stage':<20} {'state':<8} {'cache key':<17} upstream")
    for spec, key, state in rows:
        print(f"{spec.id:<20} {state:<8} {key:<17} {', '.join(spec.upstream) or '-'}")


def print_summary(run) -> None:
    print(f"\n{'stage':<20} {'status':<8} {'seconds':>8}  output")
    for r in run.records:
        print(f"{r.stage_id:<20} {r.status:<8} {r.seconds:>8.1f}  {r.output_uri}")
    print(f"MLflow parent run: {run.parent_run_id} (experiment id {run.experiment_id}, {run.tracking_uri})")


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


def _disk_full(e: BaseException) -> bool:
    """ENOSPC here, in a Ray worker (its error carries the remote traceback as text), or in
    SQLite (the MLflow store)."""
    text = str(e)
    return ((isinstance(e, OSError) and e.errno == errno.ENOSPC) or "database or disk is full" in text
            or "No space left on device" in text)


def _message(e: BaseException, work_dir: str | None = None) -> str:
    if _disk_full(e):
        where = getattr(e, "filename", None) or work_dir
        return (f"no space left on the device{f' holding {where}' if where else ''}; free some "
                "space (or move work_dir) and run the same command again: completed stages are "
                "reused, an interrupted training resumes")
    return str(e)


def _save_traceback(e: BaseException) -> str:
    """The traceback in a file (not on the console); -> its path."""
    fd, path = tempfile.mkstemp(prefix="vgg-pipeline-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        traceback.print_exception(type(e), e, e.__traceback__, file=f)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline.runner import run_pipeline

    cfg = None
    try:
        cfg_path = find_config(args.config)
        cfg = load_config(cfg_path, args.overrides)
        if args.list:
            print_dag(cfg)
            return 0
        run = run_pipeline(cfg, args.stage, args.force, str(cfg_path))
    except Exception as e:  # noqa: BLE001 - expected errors in one line, others as they are
        known = user_error(e)
        if known is None:
            raise
        line = f"error: {_message(known, cfg and cfg.work_dir)}"
        if args.verbose:
            traceback.print_exception(type(e), e, e.__traceback__)
        elif getattr(known, "keep_traceback", True):
            line += f" (traceback: {_save_traceback(e)}; --verbose prints it)"
        print(line, file=sys.stderr)
        return 2
    print_summary(run)
    return 0
