"""One stage, executed: claim its (stage, cache key), reuse what another invocation made
meanwhile, or run it in a nested MLflow run of the invocation's parent run and publish its
output atomically. The same function runs in the driver (one stage at a time) or in a
Ray task (stages at once, `pipeline.scheduler`).
"""

from __future__ import annotations

import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import mlflow

from pipeline import tracking
from pipeline.config import to_dict
from pipeline.dag import StageSpec, package_version
from pipeline.errors import TrackingServerLost, UserError
from pipeline.stage import StageContext, StageResult, TrackingInfo
from pipeline.storage import DamagedOutput, StageOutput, Store, write_json
from pipeline.system_metrics import SystemMetrics


@dataclass
class StageRecord:
    stage_id: str
    kind: str
    cache_key: str
    status: str  # ran | reused | failed | blocked
    seconds: float = 0.0
    output_uri: str = ""
    run_id: str = ""  # the MLflow run that produced the output
    started: float = 0.0  # wall clock (time.time()) of the stage's start and end
    ended: float = 0.0
    note: str = ""  # failed: the error; blocked: the stage that blocked it


@dataclass(frozen=True)
class StageJob:
    """Everything needed to execute one stage in any process (picklable)."""

    spec: StageSpec
    key: str
    #: Completed outputs of its upstream stages, by stage id.
    inputs: dict[str, StageOutput]
    work_dir: str
    #: The tracking store, experiment and the invocation's parent run.
    parent: TrackingInfo
    force: bool = False
    #: Seconds between system-metric samples on the stage's worker nodes (None: off).
    system_metrics_s: float | None = None
    #: Environment of the MLflow client (bounded HTTP retries), for another process.
    mlflow_env: dict[str, str] = field(default_factory=dict)
    #: The invocation's owner tags (its driver's pid and host): if the driver dies, the
    #: next invocation marks the stage's run KILLED (tracking.mark_stale_runs).
    owner: dict[str, str] = field(default_factory=dict)
    #: Its completed output is damaged (`Store.damage`): run it although it is complete.
    redo: bool = False
    #: The user's own `--config` / `--set` arguments, repeated in the commands of hints.
    hint: tuple[str, ...] = ()


def command(hint: tuple[str, ...] | list[str], stages: list[str], force: bool = False) -> str:
    """The command line that runs `stages` with the user's own --config and --set."""
    import shlex

    args = [*hint, "--stage", *stages, *(["--force"] if force else [])]
    return "python pipeline/run.py " + shlex.join(args)


#: Exceptions that reading a damaged file raises (pyarrow's ArrowInvalid is a ValueError,
#: its IO errors OSErrors; torch.load raises RuntimeError "PytorchStreamReader failed ..."
#: or an UnpicklingError), and texts that say so when a Ray task wrapped them.
_READ_ERRORS = (OSError, EOFError, ValueError)
_READ_TEXTS = ("PytorchStreamReader", "zip archive", "Parquet", "parquet", "magic bytes", "Unpickling",
               "unpickling", "Expecting value", "Invalid flatbuffers", "Couldn't deserialize thrift")


#: After a failure, inputs up to this size are read again to compare their hashes (a bug
#: that raises a ValueError in a stage on ImageNet shards must not cost a re-read of them).
HASH_ON_FAILURE_MAX_BYTES = 2 << 30


def _reads_a_file(e: BaseException) -> bool:
    import pickle
    import zipfile

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (*_READ_ERRORS, pickle.UnpicklingError, zipfile.BadZipFile)) or any(
                t in str(e) for t in _READ_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return False


def damaged_input(store: Store, job: StageJob, error: BaseException) -> DamagedOutput | None:
    """After a stage failed: whether one of its inputs is damaged (sizes; also content
    hashes when the error is one that reading a damaged file raises). -> the one-line
    error naming the file and the command that redoes it, or None."""
    if isinstance(error, UserError) and not isinstance(error, DamagedOutput):
        return None  # already says what to fix (a DamagedOutput gets the user's own command)
    hashes = _reads_a_file(error)
    for sid, out in job.inputs.items():
        if sid not in job.spec.upstream:
            continue
        bad = store.damage(sid, out.key, hashes=hashes, max_hash_bytes=HASH_ON_FAILURE_MAX_BYTES)
        if bad is not None:
            return DamagedOutput(
                f"{job.spec.id} could not read its input: {bad} (the output of {sid} is damaged); "
                f"redo it with `{command(job.hint, [sid], force=True)}`")
    return None


def say(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def run_stage(job: StageJob, in_task: bool = False) -> StageRecord:
    """Reuse or execute one stage; -> its record. Raises what the stage raised."""
    spec, key = job.spec, job.key
    store = Store(job.work_dir)
    with ExitStack() as stack:
        if in_task:  # a Ray worker: point MLflow at the invocation's store, bound its retries
            stack.enter_context(tracking.using_tracking_uri(job.parent.tracking_uri))
            stack.enter_context(tracking.environment(job.mlflow_env))
        if not job.force and not job.redo and store.is_complete(spec.id, key):
            return reuse(store, spec, key)
        seen = _publication(store, spec.id, key)  # the output found damaged (redo), or None
        with store.claim(spec.id, key, lambda who: say(f"  [{spec.id}] waiting: {who} is running it")):
            # reused only if another invocation published it meanwhile (a new marker): the
            # damaged output this run was told to redo is still the one it found, whatever
            # its sizes say (a same-size change is found by hashes, --verify)
            if not job.force and store.is_complete(spec.id, key) and _publication(store, spec.id, key) != seen:
                return reuse(store, spec, key, "made by another invocation")
            say(f"  [{spec.id}] running (cache key {key})")
            if job.force:  # a forced re-run starts over: no resuming from old checkpoints
                store.clear_scratch(spec.id, key)
            return _execute(store, job)


def _publication(store: Store, stage_id: str, key: str) -> str | None:
    """What tells one publication of (stage, key) from the next: its marker's text (None:
    not complete)."""
    from pipeline.storage import MARKER, read_bytes

    out = store.output(stage_id, key)
    try:
        return read_bytes(out.fs, out.join(MARKER)).decode(errors="replace")
    except OSError:
        return None


def reuse(store: Store, spec: StageSpec, key: str, note: str = "") -> StageRecord:
    out = store.output(spec.id, key)
    now = time.time()
    return StageRecord(spec.id, spec.kind, key, "reused", 0.0, out.uri, out.marker.get("mlflow_run_id", ""),
                       now, now, note)


def _execute(store: Store, job: StageJob) -> StageRecord:
    spec, key, parent = job.spec, job.key, job.parent
    store.sweep_tmp(spec.id, key)
    tmp = store.begin(spec.id, key)
    tags = {"stage": spec.kind, "stage_id": spec.id, "cache_key": key, "package_version": package_version(),
            **(job.owner or tracking.owner_tags(store.work_dir))}
    started, t0 = time.time(), time.monotonic()
    try:  # whatever fails (the store too, e.g. on a full disk), the temporary output goes
        with mlflow.start_run(
            experiment_id=parent.experiment_id,
            run_name=spec.id,
            nested=mlflow.active_run() is not None,
            parent_run_id=parent.run_id or None,
            tags=tags,
        ) as run:
            info = TrackingInfo(parent.tracking_uri, parent.experiment_id, run.info.run_id)
            tracking.log_params(tracking.params_of(spec.section))
            ups = {u: job.inputs[u] for u in spec.upstream}
            mlflow.set_tags({f"input.{u}": f"{o.key} {o.uri}" for u, o in ups.items()})
            sampling = (SystemMetrics(parent.tracking_uri, run.info.run_id, job.system_metrics_s)
                        if job.system_metrics_s else None)
            ctx = StageContext(spec.id, tmp, info, key, store.scratch(spec.id, key),
                               published_uri=store.output(spec.id, key).uri, system_metrics=sampling)
            try:
                try:
                    result: StageResult = spec.load()(spec.section, spec.inputs(ups), ctx)
                except Exception as e:  # a damaged input: one line naming the file
                    damaged = damaged_input(store, job, e)
                    if damaged is None:
                        raise
                    raise damaged from e
                seconds = time.monotonic() - t0
                model_id = _log_result(tmp, result, seconds, spec.section)
                final = store.publish(
                    tmp,
                    {
                        "stage_id": spec.id,
                        "cache_key": key,
                        "mlflow_run_id": run.info.run_id,
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "seconds": round(seconds, 3),
                        "package_version": package_version(),
                        "upstream": {u: o.key for u, o in ups.items()},
                        **({"mlflow_model_id": model_id} if model_id else {}),
                    },
                )
                mlflow.set_tag("output_uri", final.uri)
            except BaseException as e:
                store.discard(tmp)  # first: on a full disk this frees what MLflow needs to mark the run
                if isinstance(e, TrackingServerLost) or tracking.lost_server(e):
                    tracking.fail_fast()  # marking the runs FAILED cannot reach the server either
                mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
                if not isinstance(e, (KeyboardInterrupt, SystemExit)):
                    mlflow.log_text(traceback.format_exc(), "error.txt")
                raise
    except BaseException:
        store.discard(tmp)
        raise
    if result.summary:
        say(f"  [{spec.id}] {result.summary}")
    return StageRecord(spec.id, spec.kind, key, "ran", seconds, final.uri, run.info.run_id, started, time.time())


def _log_result(out: StageOutput, result: StageResult, seconds: float, section: Any) -> str | None:
    """The stage's small results: params, metrics, tables, manifest, resolved config, files;
    its input datasets and its net as an MLflow model. -> the logged model's id, if any."""
    datasets = tracking.log_datasets(result.datasets)
    model_id = None
    if result.model is not None:
        on = next((d for d, ref in zip(datasets, result.datasets) if ref is result.model.dataset), None)
        model_id = tracking.log_net(result.model, on)
        mlflow.set_tag("model_id", model_id)
    if result.params:
        tracking.log_params({k: str(v) for k, v in result.params.items()})
    mlflow.log_metrics({**result.metrics, "stage_seconds": seconds})
    if result.tags:
        mlflow.set_tags(result.tags)
    for name, table in result.tables.items():
        mlflow.log_table(table, artifact_file=name)
    # The resolved config travels with every output (STYLE: write it next to every artifact).
    write_json(out.fs, out.join("config.json"), to_dict(section))
    files = ["config.json", *result.artifacts]
    if result.manifest:
        write_json(out.fs, out.join("manifest.json"), result.manifest)
        files.append("manifest.json")
    tracking.log_output_files(out, files)
    return model_id
