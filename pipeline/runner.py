"""Executes the DAG: cache keys, reuse, one MLflow parent run, a nested run per stage.

This is the thin layer around the stage functions: it decides what runs,
gives each stage a temporary output directory, logs the stage's result to
MLflow and publishes the output atomically.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field

import mlflow
from mlflow.exceptions import MlflowException

from pipeline import tracking
from pipeline.config import PipelineConfig, flatten, to_dict
from pipeline.errors import TrackingServerLost, UserError
from pipeline.dag import StageSpec, build_dag, cache_key, package_version, upstream_closure
from pipeline.execution import StageJob, StageRecord, command
from pipeline.scheduler import schedule, timeline_png, with_times
from pipeline.stage import TrackingInfo
from pipeline.storage import Damage, StageOutput, Store, check_work_dir, is_local, resolve_uri
from vgg.artifacts import MARKDOWN_FILE, PLOT_FILE, TABLES_DIR, Fusion, Report
from vgg.results.tables import display


class PipelineError(UserError, RuntimeError):
    """A problem the user can fix (unknown stage, missing upstream output, ...)."""

    keep_traceback = False


@dataclass
class PipelineRun:
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    records: list[StageRecord] = field(default_factory=list)

    def status_of(self, sid: str) -> str:
        return next((r.status for r in self.records if r.stage_id == sid), "not run")


# ------------------------------------------------------------------ planning


def select(dag: dict[str, StageSpec], stage_ids: list[str] | None) -> list[str]:
    """The stages to execute, in DAG order. Unknown ids are an error listing the known ones."""
    if not stage_ids:
        return list(dag)
    unknown = [s for s in stage_ids if s not in dag]
    if unknown:
        raise PipelineError(f"unknown stage {', '.join(unknown)}; stages of this config: {', '.join(dag)}")
    return [s for s in dag if s in stage_ids]


def plan_keys(dag: dict[str, StageSpec], store: Store, selected: list[str], hint: tuple[str, ...] = (),
              verify: bool = False) -> dict[str, str]:
    """Cache keys of the selected stages; stages outside the selection contribute their
    latest completed output (the contract of `--stage`), which must exist and be intact
    (`Store.damage`: sizes, and hashes with `verify`). Every upstream output that is missing
    or damaged is named in one error, with one command that makes them all."""
    keys: dict[str, str] = {}
    needed = set(selected)
    for sid in selected:
        needed.update(upstream_closure(dag, sid))
    problems: dict[str, str] = {}  # upstream stage -> what is wrong with its output
    damaged = False
    for sid in dag:
        if sid not in needed:
            continue
        if sid in selected:
            keys[sid] = cache_key(dag[sid], keys)
            continue
        latest = store.latest(sid)
        if latest is None:
            problems[sid] = f"has no completed output in {store.work_dir}"
            keys[sid] = ""
            continue
        bad = store.damage(sid, latest.key, hashes=verify)
        if bad is not None:
            problems[sid] = f"is damaged: {bad}"
            damaged = True
        keys[sid] = latest.key
    if problems:
        raise PipelineError(_upstream_problems(dag, selected, problems, damaged, hint, verify))
    return keys


def _upstream_problems(dag: dict[str, StageSpec], selected: list[str], problems: dict[str, str],
                       damaged: bool, hint: tuple[str, ...], verify: bool) -> str:
    """One line: which selected stages need which missing or damaged outputs, and the one
    command that makes them all (a run without --force redoes a damaged output: no --force,
    so a damaged training resumes from its checkpoints rather than starting over)."""
    users = [s for s in selected if any(u in problems for u in upstream_closure(dag, s))] or selected
    ids = list(problems)  # in DAG order
    what = (f"the output of {ids[0]}, which {problems[ids[0]]}" if len(ids) == 1 else
            f"the outputs of {len(ids)} stages: " + "; ".join(f"{u}, which {problems[u]}" for u in ids))
    redo = command([*hint, *(["--verify"] if verify and damaged and "--verify" not in hint else [])], ids)
    why = (" (a run without --force redoes damaged outputs; the whole pipeline, without --stage, "
           "would too)" if damaged else " (or run the whole pipeline)")
    return (f"stage {', '.join(users)} needs {what}; {'redo' if damaged else 'produce'} "
            f"{'it' if len(ids) == 1 else 'them'} with `{redo}`{why}")


def other_config(dag: dict[str, StageSpec], store: Store, selected: list[str], keys: dict[str, str]) -> str:
    """When a stage runs alone (`--stage`) on upstream outputs made under another config
    than the current one: one line saying which stages and which keys differ ("" if none).
    Compares each upstream output's recorded config.json with the current config section."""
    current: dict[str, str] = {}
    for sid, spec in dag.items():
        current[sid] = cache_key(spec, current)
    changed: dict[str, list[str]] = {}  # upstream stage -> its keys that differ
    for sid in dag:
        if sid in selected or sid not in keys or keys[sid] == current[sid]:
            continue
        out = store.output(sid, keys[sid])
        try:
            made = flatten(out.read_json("config.json"))
        except (OSError, ValueError):
            made = None
        now = flatten(to_dict(dag[sid].section))
        if made is None:
            changed[sid] = ["(its config.json is unreadable)"]
            continue
        prefix = f"train.nets.{dag[sid].section.name}." if hasattr(dag[sid].section, "net") else ""
        diffs = [f"{prefix + k[4:] if k.startswith('net.') else k}: {made.get(k, '-')!r} -> {now.get(k, '-')!r}"
                 for k in sorted(set(made) | set(now)) if made.get(k) != now.get(k)]
        if diffs:
            changed[sid] = diffs
        elif out.marker.get("package_version") != package_version():
            changed[sid] = [f"package version {out.marker.get('package_version')} -> {package_version()}"]
    if not changed:
        return ""
    users = [s for s in selected if any(u in changed for u in upstream_closure(dag, s))]
    parts = "; ".join(f"{sid} ({', '.join(d[:4])}{f', +{len(d) - 4} more' if len(d) > 4 else ''})"
                      for sid, d in changed.items())
    return (f"note: {', '.join(users)} runs on upstream outputs made under another config than "
            f"this one: {parts}; add those stages to --stage to redo them with this config")


def damaged_outputs(store: Store, selected: list[str], keys: dict[str, str], force: bool,
                    verify: bool) -> dict[str, Damage]:
    """The selected stages whose completed output is damaged (they are redone)."""
    if force:
        return {}
    out = {}
    for sid in selected:
        if store.is_complete(sid, keys[sid]):
            bad = store.damage(sid, keys[sid], hashes=verify)
            if bad is not None:
                out[sid] = bad
    return out


def preflight(dag: dict[str, StageSpec], to_run: list[str]) -> None:
    """The checks of the stages about to run (e.g. the dataset's layout), before MLflow
    and Ray start: a bad input fails in a second, not after minutes of start-up."""
    for sid in to_run:
        check = dag[sid].load_check()
        if check is not None:
            check(dag[sid].section)


def states(cfg: PipelineConfig) -> list[tuple[StageSpec, str, str]]:
    """(stage, current cache key, done|damaged|stale|missing) for every stage."""
    dag = build_dag(cfg)
    store = Store(cfg.work_dir)
    keys: dict[str, str] = {}
    out = []
    for sid, spec in dag.items():
        keys[sid] = cache_key(spec, keys)
        if store.is_complete(sid, keys[sid]):
            state = "damaged" if store.damage(sid, keys[sid]) is not None else "done"
        elif store.latest(sid) is not None:
            state = "stale"
        else:
            state = "missing"
        out.append((spec, keys[sid], state))
    return out


def earlier_durations(cfg: PipelineConfig, stage_ids: list[str]) -> dict[str, float]:
    """Seconds of the latest FINISHED MLflow run of each stage (any cache key), where there
    is one: what `--list` estimates the plan's wall time from. Creates no store."""
    uri = tracking.tracking_uri(cfg)
    db = tracking.sqlite_file(uri)
    if db is not None and not os.path.exists(db):
        return {}
    try:
        client = mlflow.tracking.MlflowClient(uri)
        exp = client.get_experiment_by_name(cfg.experiment)
    except Exception:  # noqa: BLE001 - no store, no server: no estimate
        return {}
    if exp is None:
        return {}
    out = {}
    for sid in stage_ids:
        runs = client.search_runs([exp.experiment_id], f"tags.stage_id = '{sid}' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs and "stage_seconds" in runs[0].data.metrics:
            out[sid] = runs[0].data.metrics["stage_seconds"]
    return out


# ------------------------------------------------------------------ execution


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_pipeline(
    cfg: PipelineConfig,
    stage_ids: list[str] | None = None,
    force: bool = False,
    config_path: str = "",
    hint: list[str] | tuple[str, ...] | None = None,
    verify: bool = False,
) -> PipelineRun:
    """Run the selected stages (default: all) in dependency order.

    `hint`: the user's own `--config` / `--set` arguments, repeated in the commands that
    error lines suggest (default: `--config config_path`). `verify`: check the content
    hashes of the completed outputs it reuses, not only their sizes."""
    hint = tuple(hint if hint is not None else (["--config", config_path] if config_path else []))
    check_work_dir(cfg.work_dir)  # before anything is created there, and before Ray starts
    dag = build_dag(cfg)
    selected = select(dag, stage_ids)
    store = Store(cfg.work_dir)
    keys = plan_keys(dag, store, selected, hint, verify)
    if stage_ids:
        note = other_config(dag, store, selected, keys)
        if note:
            _say(note)
    damaged = damaged_outputs(store, selected, keys, force, verify)
    for sid, bad in damaged.items():
        _say(f"  [{sid}] damaged output: {bad}; redoing the stage")
    preflight(dag, [s for s in selected if force or s in damaged or not store.is_complete(s, keys[s])])
    uri = tracking.tracking_uri(cfg)
    tracking.check_reachable(uri)
    with tracking.using_tracking_uri(uri), tracking.environment(tracking.http_retry_env(cfg.mlflow.retry_s)):
        try:
            return _run(cfg, dag, selected, keys, store, uri, force, config_path, bool(stage_ids),
                        set(damaged), hint)
        except Exception as e:
            if isinstance(e, TrackingServerLost) or tracking.lost_server(e):
                raise TrackingServerLost(
                    f"the MLflow tracking server {uri} stopped answering ({tracking.lost_wait(e, cfg.mlflow.retry_s)}): "
                    "start it again and re-run the same command; completed stages are reused and "
                    "an interrupted training resumes and logs the epochs that could not be logged") from e
            raise


def _run(
    cfg: PipelineConfig,
    dag: dict[str, StageSpec],
    selected: list[str],
    keys: dict[str, str],
    store: Store,
    uri: str,
    force: bool,
    config_path: str,
    partial: bool,
    redo: set[str] = frozenset(),
    hint: tuple[str, ...] = (),
) -> PipelineRun:
    """The parent MLflow run: the selected stages reused or executed (`pipeline.scheduler`),
    then the report into the parent run. Raises the first failure once every stage that
    could run has run."""
    exp_id = tracking.setup_experiment(cfg, uri)
    stale = tracking.mark_stale_runs(uri, exp_id, store.work_dir)
    if stale:
        _say(f"marked {len(stale)} MLflow run(s) of an interrupted invocation KILLED")
    outputs = {sid: store.output(sid, keys[sid]) for sid in keys if sid not in selected}
    to_run = [s for s in selected if force or s in redo or not store.is_complete(s, keys[s])]
    ray_started = any(dag[s].needs_ray for s in to_run) and connect_ray(cfg)
    use_ray = ray_started or _ray_is_up()  # stage tasks also on a Ray this process joined before
    name = "stage " + " ".join(selected) if partial else "pipeline"
    with mlflow.start_run(experiment_id=exp_id, run_name=name) as parent:
        run = PipelineRun(parent.info.run_id, exp_id, uri)
        _log_parent_start(cfg, config_path, selected, force, store)
        _say(f"MLflow run {parent.info.run_id} (experiment {cfg.experiment!r}) at {uri}")
        info = TrackingInfo(uri, exp_id, parent.info.run_id)
        mlflow_env = tracking.http_retry_env(cfg.mlflow.retry_s)

        def job(sid: str) -> StageJob:
            ups = {u: outputs[u] for u in dag[sid].upstream}
            return StageJob(dag[sid], keys[sid], ups, cfg.work_dir, info, force,
                            cfg.mlflow.system_metrics_interval_s if cfg.mlflow.system_metrics else None,
                            mlflow_env, tracking.owner_tags(store.work_dir), sid in redo, hint)

        def done(sid: str) -> None:
            outputs[sid] = store.output(sid, keys[sid])

        try:
            outcome = schedule(dag, selected, job, cfg.pipeline.max_parallel_stages,
                               use_ray=use_ray, on_done=done, work_dir=cfg.work_dir)
            run.records = outcome.records
            if "report" in selected and run.status_of("report") in ("ran", "reused"):
                _log_report(outputs["report"])
                _register_best(cfg, dag, outputs, uri, hint)
        finally:
            try:
                _log_parent_end(run)
            finally:
                if ray_started:
                    disconnect_ray()
    if outcome.failures:
        sid, error = outcome.failures[0]
        error.pipeline_run = run  # the CLI prints the closing summary before the error
        raise error
    return run


def _log_parent_start(cfg: PipelineConfig, config_path: str, selected: list[str], force: bool, store: Store) -> None:
    mlflow.set_tags(
        {
            "config_file": config_path,
            "stages": " ".join(selected),
            "force": str(force),
            "package_version": package_version(),
            **tracking.owner_tags(store.work_dir),
        }
    )
    tracking.log_params(tracking.params_of(to_dict(cfg)))
    mlflow.log_dict(to_dict(cfg), "config.json")


def _log_parent_end(run: PipelineRun) -> None:
    """stages.json (every stage: status, start and end, output, run), a timeline PNG of the
    stages over wall time, tags and counts."""
    if not run.records:
        return
    rows = [with_times(r) for r in run.records]
    cols = ["stage_id", "kind", "status", "started", "ended", "seconds", "cache_key", "output_uri", "run_id", "note"]
    mlflow.log_table({c: [row[c] for row in rows] for c in cols}, artifact_file="stages.json")
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "timeline.png")
        timeline_png(run.records, png)
        mlflow.log_artifact(png)
    mlflow.set_tags({f"stage.{r.stage_id}": f"{r.status} {r.cache_key}".strip() for r in run.records})
    counts = {f"stages_{status}": sum(r.status == status for r in run.records)
              for status in ("ran", "reused", "failed", "blocked")}
    starts = [r.started for r in run.records if r.started]
    ends = [r.ended for r in run.records if r.ended]
    if starts and ends:
        counts["stages_wall_seconds"] = max(ends) - min(starts)
    mlflow.log_metrics(counts)


def _log_report(output: StageOutput) -> None:
    """The report stage's tables, Markdown and plot, also into the parent run (where a
    reader of the invocation looks first), and its Markdown on the console."""
    report = Report(output)
    for name, table in report.tables().items():  # rounded for display; the JSON files keep full precision
        mlflow.log_table(display(table), artifact_file=f"{TABLES_DIR}/{name}")
    markdown = report.markdown()
    mlflow.log_text(markdown, f"{TABLES_DIR}/{MARKDOWN_FILE}")
    tracking.log_output_files(output, [PLOT_FILE], TABLES_DIR)
    print("\n" + markdown, flush=True)


def _register_best(cfg: PipelineConfig, dag: dict[str, StageSpec], outputs: dict[str, StageOutput],
                   uri: str, hint: tuple[str, ...] = ()) -> None:
    """The best single net of the report into the model registry (`pipeline.registry`);
    the outcome as tags of the parent run and one console line."""
    from pipeline import registry

    fuse = next((sid for sid, s in dag.items() if s.kind == "fuse" and sid in outputs), None)
    name = registry.model_name(cfg.experiment, cfg.mlflow.registered_model)
    try:
        done = registry.register_best(mlflow.tracking.MlflowClient(uri), name,
                                      registry.candidates(dag, outputs, _say),
                                      Fusion(outputs[fuse]) if fuse else None)
    except MlflowException as e:  # e.g. a server whose user may not write the registry
        if tracking.lost_server(e):
            raise
        # every stage is published: the run's results stand; say what was not registered
        mlflow.set_tag("registry.error", str(e)[:5000])
        _say(f"WARNING: the best net was not registered in the model registry ({e}); "
             f"results are complete. Fix the cause and re-run `{command(hint, ['report'])}` to register it")
        return
    if done is None:
        return
    mlflow.set_tags({"registry.model": done.name, "registry.version": done.version,
                     "registry.champion": done.champion, "registry.decision": done.reason})
    _say(done.line())


# ------------------------------------------------------------------ ray


def _ray_is_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def connect_ray(cfg: PipelineConfig) -> bool:
    """Join the configured cluster, or start a private local one. -> whether we connected."""
    import ray

    from pipeline import console

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    console_args = console.prepare_ray()  # Ray's own lines on the console only with --verbose
    if address:
        _say(f"Connecting to Ray at {address}")
        ray.init(address=address, log_to_driver=True, **console_args)
        console.ray_connected()
        check_shared_work_dir(cfg.work_dir)
    else:
        _say(f"Starting a local Ray instance on {cfg.ray.node_ip_address}")
        start_local_ray(cfg.ray.num_cpus, cfg.ray.node_ip_address, **console_args)
        console.ray_connected()
    return True


def check_shared_work_dir(work_dir: str, timeout_s: float = 120.0) -> int:
    """On a multi-node cluster a local work_dir must be a filesystem every node mounts:
    shards, checkpoints and posteriors written on one node are read on others. A marker
    file is written here and a task on every alive node reads it back. -> nodes checked.
    Raises PipelineError naming the nodes that cannot see it."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    fs, root = resolve_uri(work_dir)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not is_local(fs) or len(nodes) < 2:
        return 0  # object storage (s3://, gs://, ...) is shared by nature; one node shares with itself
    token = uuid.uuid4().hex
    marker = os.path.join(root, "_tmp", f"shared-check-{token}")
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w") as f:
        f.write(token)

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(path: str, expected: str) -> bool:
        try:
            with open(path) as f:
                return f.read() == expected
        except OSError:
            return False

    try:
        refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(marker, token) for n in nodes]
        seen = ray.get(refs, timeout=timeout_s)
    finally:
        os.remove(marker)
    blind = [f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]})" for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise PipelineError(
            f"work_dir {work_dir} is not shared: {len(blind)} of {len(nodes)} nodes cannot see it "
            f"({', '.join(blind)}). Use a filesystem every node mounts (NFS, EFS, ...) or object "
            "storage (s3://bucket/path)"
        )
    _say(f"work_dir {work_dir} is shared by all {len(nodes)} nodes")
    return len(nodes)


def start_local_ray(num_cpus: int | None, node_ip: str = "127.0.0.1", **kwargs) -> None:
    """A private single-machine Ray instance whose processes all bind to `node_ip`."""
    import ray

    if node_ip in ("127.0.0.1", "localhost"):
        # ray.init turns 127.0.0.1 into the machine's routable address, except in
        # its single-machine mode (what it uses on macOS/Windows): switch that on,
        # for this process and the Ray processes it starts.
        from ray._private import ray_constants

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    else:
        kwargs["_node_ip_address"] = node_ip
    # The dashboard serves the State API, which Ray Train's placement-group cleaner polls
    # every second from a Ray worker. Auto-detection of the API server fails when other
    # Ray instances run on the machine, so the Ray processes started here inherit
    # RAY_API_SERVER_ADDRESS; this process's environment is restored afterwards (another
    # Ray cluster started later from here must not inherit this one's address).
    port = _free_port()
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, **kwargs)
    finally:
        if before is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = before


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def disconnect_ray() -> None:
    import ray

    ray.shutdown()
