"""The DAG as a distributed workflow: every stage whose upstream stages are done starts at
once, as a Ray task, and the cluster's resources decide what runs when.

A stage's task asks Ray for no resources (`num_cpus=0`): the process that drives a
stage must not hold what its own Ray Train or Ray Data job needs. The job inside asks for
its workers' resources and waits for them, so on a small machine stages that do not fit
wait their turn and nothing deadlocks. `pipeline.max_parallel_stages` caps the stages
in flight; with 1 the stages run one after the other in this process, as before.
With "auto" (the default) a single machine runs stages together only when its CPUs and
GPUs cover what all of them ask for (`demand`), and runs them one by one in this process
when no two independent stages of the plan ever fit (`auto_parallel`): on two cores the
demo ran 331 s with stages overlapping, 290 s one by one. A cluster is unchanged.

A failed stage blocks its downstream stages (recorded as blocked, naming it);
independent branches run to completion. Completions arrive through `ray.wait` on the
tasks' ObjectRefs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.dag import StageSpec
from pipeline.execution import StageJob, StageRecord, reuse, run_stage, say
from pipeline.errors import UserError
from pipeline.storage import Store, disk_full, no_space


@dataclass
class Outcome:
    records: list[StageRecord]
    #: (stage id, exception) of every failed stage, in the order they failed.
    failures: list[tuple[str, BaseException]]


def stage_task(job: StageJob) -> StageRecord:
    """The body of a stage's Ray task."""
    return run_stage(job, in_task=True)


def schedule(dag: dict[str, StageSpec], selected: list[str], make_job: Callable[[str], StageJob],
             max_parallel: int | None, use_ray: bool, on_done: Callable[[str], None],
             work_dir: str | None = None) -> Outcome:
    """Run the selected stages in dependency order, up to `max_parallel` at once (None: no
    limit) as Ray tasks when `use_ray`, else one after the other in this process.
    `make_job(sid)` is called once its upstream stages are done; `on_done(sid)` after it
    ran or was reused."""
    capacity = None
    if max_parallel == AUTO:
        max_parallel, capacity = auto_parallel(dag, selected, use_ray)
    concurrent = use_ray and (max_parallel is None or max_parallel > 1)
    run = _Concurrent(max_parallel, capacity) if concurrent else _Serial()
    records: dict[str, StageRecord] = {}
    failures: list[tuple[str, BaseException]] = []
    waiting = list(selected)
    try:
        while waiting or run.busy:
            for sid in list(waiting):
                ups = [u for u in dag[sid].upstream if u in selected]
                bad = next((u for u in ups if u in records and records[u].status in ("failed", "blocked")), None)
                if bad is not None:
                    waiting.remove(sid)
                    why = records[bad].note if records[bad].status == "blocked" else bad
                    now = time.time()
                    records[sid] = StageRecord(sid, dag[sid].kind, "", "blocked", 0.0, started=now, ended=now,
                                               note=why)
                    say(f"  [{sid}] blocked: {why} failed")
                elif all(u in records for u in ups) and run.has_room(demand(dag[sid])):
                    waiting.remove(sid)
                    run.start(sid, make_job(sid))
            if not run.busy:
                continue
            sid, record, error = run.next_done()
            if error is not None:
                failures.append((sid, error))
                now = time.time()
                began = run.started.get(sid, now)
                record = StageRecord(sid, dag[sid].kind, "", "failed", now - began, started=began,
                                     ended=now, note=failure_note(error, work_dir)[:500])
                say(f"  [{sid}] FAILED: {record.note}")
            records[sid] = record
            if record.status in ("ran", "reused"):
                on_done(sid)
                what = (f"done in {record.seconds:.1f} s" if record.status == "ran"
                        else f"reused{' (' + record.note + ')' if record.note else ''}")
                say(f"[{len(records)}/{len(selected)}] {sid:<16} {what} -> {record.output_uri}")
    except BaseException:
        run.cancel()
        raise
    return Outcome([records[s] for s in selected if s in records], failures)


AUTO = "auto"


def demand(spec: StageSpec) -> tuple[float, float]:
    """(CPUs, GPUs) a stage asks the cluster for: its Ray Train workers (train) or its
    evaluation shares (evaluate); one CPU for a stage that works in its own process
    (shard, augment, fuse, report): it needs a core to do that work, Ray or not."""
    section = spec.section
    for name in ("train", "evaluate"):
        cfg = getattr(section, name, None)
        if cfg is not None and hasattr(cfg, "num_workers"):
            return (cfg.num_workers * cfg.cpus_per_worker,
                    float(cfg.num_workers) if getattr(cfg, "use_gpu", False) else 0.0)
    return 1.0, 0.0


def _fits(demands: list[tuple[float, float]], capacity: tuple[float, float]) -> bool:
    return all(sum(d[i] for d in demands) <= capacity[i] + 1e-9 for i in range(2))


def auto_parallel(dag: dict[str, StageSpec], selected: list[str], use_ray: bool,
                  nodes: int | None = None, capacity: tuple[float, float] | None = None
                  ) -> tuple[int | None, tuple[float, float] | None]:
    """`max_parallel_stages: auto` -> (the cap, the resources stages must fit in, or None).

    A cluster (more than one alive node): (None, None), no cap, as before. One machine:
    (1, None), one by one in this process, when no two selected stages that could run at
    once (neither upstream of the other) fit in its CPUs and GPUs together; else (None,
    its CPUs and GPUs), and a stage starts only while everything in flight still fits.
    `nodes` and `capacity` default to Ray's view of the running cluster."""
    if not use_ray:
        return 1, None
    if nodes is None or capacity is None:
        import ray

        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        res = ray.cluster_resources()
        capacity = (float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0)))
    if nodes > 1:
        return None, None
    ancestors: dict[str, set[str]] = {}
    for sid in dag:  # dag is in topological order
        ancestors[sid] = set().union(*({u} | ancestors.get(u, set()) for u in dag[sid].upstream)) \
            if dag[sid].upstream else set()
    chosen = [s for s in dag if s in selected]
    for i, a in enumerate(chosen):
        for b in chosen[i + 1:]:
            if a not in ancestors[b] and b not in ancestors[a] and _fits([demand(dag[a]), demand(dag[b])], capacity):
                return None, capacity
    return 1, None


def failure_note(error: BaseException, work_dir: str | None = None) -> str:
    """A failed stage's line: a full disk is named as such (SQLite's "database or disk is
    full" when MLflow hit it first), a user's error by its message alone."""
    if disk_full(error):
        return no_space(error, work_dir)
    if isinstance(error, UserError):
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{type(error).__name__}: {error}"


class _Serial:
    """One stage at a time, in this process."""

    def __init__(self):
        self.pending: list[tuple[str, StageJob]] = []
        self.started: dict[str, float] = {}

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    def has_room(self, need: tuple[float, float] = (0.0, 0.0)) -> bool:
        return not self.pending

    def start(self, sid: str, job: StageJob) -> None:
        self.pending.append((sid, job))

    def next_done(self) -> tuple[str, StageRecord | None, BaseException | None]:
        sid, job = self.pending.pop(0)
        self.started[sid] = time.time()
        try:
            return sid, run_stage(job), None
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - recorded; its downstream is blocked
            return sid, None, e

    def cancel(self) -> None:
        self.pending.clear()


class _Concurrent:
    """Stages as Ray tasks holding no resources; completions through ray.wait."""

    def __init__(self, max_parallel: int | None, capacity: tuple[float, float] | None = None):
        import ray

        self.ray, self.max_parallel, self.capacity = ray, max_parallel, capacity
        self.task = ray.remote(stage_task)
        self.refs: dict = {}  # ObjectRef -> stage id
        self.reused: list[tuple[str, StageRecord, None]] = []
        self.started: dict[str, float] = {}
        self.demands: dict[str, tuple[float, float]] = {}  # stage id in flight -> its demand

    @property
    def busy(self) -> bool:
        return bool(self.refs or self.reused)

    def has_room(self, need: tuple[float, float] = (0.0, 0.0)) -> bool:
        if self.max_parallel is not None and len(self.refs) >= self.max_parallel:
            return False
        # with a capacity (auto, one machine): everything in flight must fit; a stage that
        # asks for more than the machine has still runs, alone (its job waits as before)
        return self.capacity is None or not self.refs or _fits([*self.demands.values(), need], self.capacity)

    def start(self, sid: str, job: StageJob) -> None:
        store = Store(job.work_dir)
        if not job.force and not job.redo and store.is_complete(sid, job.key):  # no task needed to reuse it
            self.reused.append((sid, reuse(store, job.spec, job.key), None))
            return
        self.started[sid] = time.time()
        self.demands[sid] = demand(job.spec)
        task = self.task.options(num_cpus=0, max_retries=0, name=f"stage {sid}")
        self.refs[task.remote(job)] = sid

    def next_done(self) -> tuple[str, StageRecord | None, BaseException | None]:
        if self.reused:
            return self.reused.pop(0)
        (ref,), _ = self.ray.wait(list(self.refs), num_returns=1)
        sid = self.refs.pop(ref)
        self.demands.pop(sid, None)
        try:
            return sid, self.ray.get(ref), None
        except self.ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
            return sid, None, cause
        except self.ray.exceptions.RayError as e:  # the task's worker died (OOM, a lost node)
            return sid, None, e

    def cancel(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)
        self.refs.clear()


# ------------------------------------------------------------------ the plan's timing
def critical_path(dag: dict[str, StageSpec], seconds: dict[str, float]) -> tuple[list[str], float]:
    """The longest chain of stages by duration (stages without a duration count 0 s)."""
    finish: dict[str, tuple[float, list[str]]] = {}
    for sid, spec in dag.items():  # dag is in topological order
        before = max((finish[u] for u in spec.upstream if u in finish), default=(0.0, []),
                     key=lambda f: f[0])
        finish[sid] = (before[0] + seconds.get(sid, 0.0), [*before[1], sid])
    if not finish:
        return [], 0.0
    total, path = max(finish.values(), key=lambda f: f[0])
    return path, total


def timeline_png(records: list[StageRecord], path: str) -> None:
    """One bar per stage over wall time, coloured by status."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = {"ran": "tab:green", "reused": "tab:gray", "failed": "tab:red", "blocked": "tab:orange"}
    t0 = min((r.started for r in records if r.started), default=0.0)
    fig = Figure(figsize=(9, 0.4 * len(records) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, r in enumerate(records):
        start = (r.started or t0) - t0
        width = max((r.ended or r.started or t0) - (r.started or t0), 0.0)
        ax.barh(i, max(width, 0.2), left=start, color=colours.get(r.status, "black"))
        ax.text(start + max(width, 0.2) + 0.2, i, r.status, va="center", fontsize=8)
    ax.set_yticks(range(len(records)), [r.stage_id for r in records])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first stage started")
    ax.set_title("stages over wall time")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def with_times(record: StageRecord) -> dict:
    """A record as a row of stages.json (ISO times)."""
    row = dataclasses.asdict(record)
    for k in ("started", "ended"):
        row[k] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(row[k])) if row[k] else ""
    return row
