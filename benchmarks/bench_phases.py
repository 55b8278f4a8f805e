"""Where a pipeline run's wall time goes outside the arithmetic (issue 29): runs
`pipeline/run.py` with phase timers in every process (`benchmarks/phases/sitecustomize.py`
on PYTHONPATH: the driver, Ray's workers and actors) and prints, per stage, its wall
time split into start-up, the work itself and what comes after.

    python benchmarks/bench_phases.py                        # the embedded default, fresh work_dir
    python benchmarks/bench_phases.py --set train.num_workers=1 train.cpus_per_worker=2
    python benchmarks/bench_phases.py --analyse phases.jsonl  # a file an earlier run left

The timers add a few milliseconds a call. Run it on a quiet machine: every figure is wall
time. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(sets: list[str], phases: Path, work_dir: str) -> tuple[float, str]:
    env = dict(os.environ, VGG_PHASES=str(phases),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "benchmarks" / "phases"), os.environ.get("PYTHONPATH")])))
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "pipeline" / "run.py"), "--set", f"work_dir={work_dir}", *sets],
                          env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit(f"the run failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall, done.stdout


def _span(calls: list[dict]) -> float:
    return max(c["t1"] for c in calls) - min(c["t0"] for c in calls) if calls else 0.0


def breakdown(records: list[dict]) -> list[tuple[str, float, str]]:
    """(part, seconds, what is inside) rows: before the first stage, each stage, after."""
    stages = sorted((r for r in records if r["name"] == "execution.run_stage"), key=lambda r: r["t0"])
    if not stages:
        raise SystemExit("no stage ran under the timers (was every stage reused?)")
    driver = stages[0]["pid"]
    boot = min(r["t0"] for r in records if r["pid"] == driver)
    end = max(r["t1"] for r in records if r["pid"] == driver)
    named = lambda name, inside: [r for r in inside if r["name"] == name]  # noqa: E731
    one = lambda name, inside: sum(r["t1"] - r["t0"] for r in named(name, inside))  # noqa: E731
    driver_only = [r for r in records if r["pid"] == driver and r["t1"] <= stages[0]["t0"]]
    rows = [("before the first stage", stages[0]["t0"] - boot,
             f"Ray start {one('runner.connect_ray', driver_only):.1f}, MLflow store "
             f"{one('runner.tracking.setup_experiment', driver_only):.1f}, the rest imports")]
    for i, st in enumerate(stages):
        inside = [r for r in records if st["t0"] <= r["t0"] <= st["t1"] and r is not st]
        wall = st["t1"] - st["t0"]
        loops = named("ray_train.train_loop_per_worker", inside)
        shares = named("ray_evaluate._evaluate_share", inside)
        validate = named("sharding._validate", inside)
        if loops:
            fit = named("data_parallel_trainer.DataParallelTrainer.fit", inside)[0]
            start = min(r["t0"] for r in loops)
            restored = max(r["t1"] for r in named("ray_train._restore", inside))
            loaders = max(r["t1"] for r in named("ray_train._loaders", inside))
            epochs = _span(named("loop.fit", inside))
            first = named("ray_train.MlflowLogger.log_params", inside)
            detail = (f"Ray Train start until the workers run {start - fit['t0']:.1f}; model and DDP "
                      f"{restored - start:.1f}"
                      + (f" (rank 0's first MLflow call {one('ray_train.MlflowLogger.log_params', inside):.1f})" if first else "")
                      + "; "
                      f"loaders {loaders - restored:.1f}; the epochs {epochs:.1f}; end of training until "
                      f"fit() returns {fit['t1'] - max(r['t1'] for r in loops):.1f}; model file and plot "
                      f"{one('train._finish', inside):.1f}; MLflow model {one('execution.tracking.log_net', inside):.1f}")
        elif shares:
            scoring = _span(named("shares.score_share", inside))
            detail = (f"tasks start until they evaluate {min(r['t0'] for r in shares) - st['t0']:.1f}; "
                      f"scoring {scoring:.1f}; after {st['t1'] - max(r['t1'] for r in shares):.1f}")
        elif validate:
            detail = f"validation (Ray Data) {one('sharding._validate', inside):.1f}"
        else:
            detail = ""
        procs = {r["pid"] for r in inside if r["name"].startswith("process_boot")}
        if procs:
            detail += f"; {len(procs)} new processes"
        rows.append((f"stage {i + 1}", wall, detail))
    rows.append(("after the last stage", end - stages[-1]["t1"], f"Ray shutdown {one('runner.disconnect_ray', records):.1f}"))
    imports, heavy = {}, ("torch", "torch._dynamo", "mlflow")  # none imports another
    for mod in heavy:
        d = [r["t1"] - r["t0"] for r in records if r["name"] == f"import:{mod}"]
        if d:
            imports[mod] = f"{len(d)} processes, median {statistics.median(d):.1f} s, total {sum(d):.1f} s"
    if imports:
        total = sum(r["t1"] - r["t0"] for r in records if r["name"] in {f"import:{m}" for m in heavy})
        rows.append(("imports (summed over processes; inside the rows above)", total,
                     "; ".join(f"{k}: {v}" for k, v in imports.items())))
    return rows


def print_table(rows, names: list[str], wall: float | None) -> None:
    print("| part | seconds | inside (s) |\n|---|---|---|")
    for (part, secs, detail) in rows:
        if part.startswith("stage "):
            part = names.pop(0) if names else part
        print(f"| {part} | {secs:.1f} | {detail} |")
    if wall is not None:
        print(f"| **the whole run** | **{wall:.1f}** | `pipeline/run.py` from start to exit |")


def stage_names(stdout: str) -> list[str]:
    """The stage ids in run order, from the closing summary ("<id> ran <start> <end> ...")."""
    lines = [ln.split() for ln in stdout.splitlines()]
    return [w[0] for w in lines if len(w) >= 5 and w[1] == "ran"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", nargs="*", default=[], help="config overrides for pipeline/run.py")
    p.add_argument("--work-dir", help="default: a fresh temporary folder (a fresh MLflow store too)")
    p.add_argument("--keep", type=Path, help="also keep the phase records in this file")
    p.add_argument("--analyse", type=Path, help="print the breakdown of an earlier phase-records file")
    p.add_argument("--log", type=Path, help="with --analyse: that run's console output (names the stages)")
    args = p.parse_args()
    if args.analyse:
        names = stage_names(args.log.read_text()) if args.log else []
        print_table(breakdown([json.loads(ln) for ln in args.analyse.read_text().splitlines()]), names, None)
        return
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_phases_")
    phases = args.keep or Path(work) / "phases.jsonl"
    print(f"pipeline/run.py --set work_dir={work} {' '.join(args.set)}; load average before "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    wall, stdout = run(args.set, phases, work)
    records = [json.loads(ln) for ln in phases.read_text().splitlines()]
    print_table(breakdown(records), stage_names(stdout), wall)
    print(f"load average after {os.getloadavg()[0]:.1f}; phase records in {phases}")


if __name__ == "__main__":
    main()
