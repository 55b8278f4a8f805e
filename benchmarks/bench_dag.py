"""Wall time of the DAG run one stage at a time vs. concurrently (pipeline.max_parallel_stages).

    python benchmarks/bench_dag.py demo            # the embedded default, serial vs concurrent
    python benchmarks/bench_dag.py paper [--nodes 4]  # the paper-shaped plan at toy sizes on a
                                                      # simulated multi-node cluster

`demo`: `pipeline/run.py` on its embedded default twice (fresh work_dirs, one after the
other), with `pipeline.max_parallel_stages=1` and with `--vs` (default `auto`, the
default; `null`: no limit).

`paper`: the paper's plan shape (A; B, C, D, E from A; each one's larger-S and jittered
successor from it; every net evaluated; a D+E fusion; the report) at toy sizes (tiny
images, width 1/8, one epoch, one worker per net) on a `ray.cluster_utils.Cluster` of
`--nodes` 1-CPU nodes: serial, then concurrent, on the same cluster. The bound is the
critical path of the serial run's stage durations (what no schedule can beat).

Prints the wall time of each and the per-stage start/end of the concurrent run. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOY = ["data.demo.num_classes=3", "data.demo.train_per_class=16", "data.demo.val_per_class=8",
       "data.demo.min_side=36", "data.demo.max_side=60", "shard.rows_per_shard=20",
       "train.max_epochs=1", "train.width=0.125", "train.batch_size=8", "train.num_workers=1",
       "augment.check_batches=2", "augment.check_batch_size=8", "evaluate.grid=2",
       "evaluate.batch_size=8", "evaluate.num_workers=1"]


def paper_plan() -> list[str]:
    """A; B, C, D, E from A; S=48 (the paper's 384 at toy scale) and jittered successors."""
    nets = {"A": "{arch: A, scale: 40, lr: 0.005, init: glorot}"}
    for arch in "BCDE":
        nets[arch] = f"{{arch: {arch}, scale: 40, lr: 0.005, init: {{from_A: train/A, rest: glorot}}}}"
        nets[f"{arch}-48"] = f"{{arch: {arch}, scale: 48, lr: 0.001, init: {{full: train/{arch}}}}}"
        nets[f"{arch}-jit"] = f"{{arch: {arch}, scale: [36, 64], lr: 0.001, init: {{full: train/{arch}}}}}"
    plan = ", ".join(f"{k}: {v}" for k, v in nets.items())
    return [f"train.nets={{{plan}}}", "fuse.members=[D-jit:multi-crop+dense@multi, E-jit:multi-crop+dense@multi]"]


def demo(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_dag_"))
    walls = {}
    print(f"load average before: {os.getloadavg()}")
    for mode, limit in (("serial", "1"), (args.vs, args.vs)):
        cmd = [sys.executable, str(ROOT / "pipeline" / "run.py"), "--set", f"work_dir={tmp / mode}",
               f"pipeline.max_parallel_stages={limit}"]
        t0 = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True)
        walls[mode] = time.monotonic() - t0
        if done.returncode != 0:
            raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
        print(f"{mode:>10}: {walls[mode]:6.1f} s  (pipeline/run.py, max_parallel_stages={limit})")
        print("\n".join(line for line in done.stdout.splitlines()
                        if line.split()[:1] and line.split()[0] in _stage_ids()))
    print(f"{args.vs} / serial: {walls[args.vs] / walls['serial']:.2f}")
    print(f"load average after: {os.getloadavg()}")


def _stage_ids() -> set[str]:
    from pipeline.config import load_config
    from pipeline.dag import build_dag

    return set(build_dag(load_config(ROOT / "configs" / "demo.yaml")))


def paper(args) -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on 127.0.0.1
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import load_config
    from pipeline.dag import build_dag
    from pipeline.runner import run_pipeline
    from pipeline.scheduler import critical_path

    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 1})
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_dag_paper_"))
    walls, runs = {}, {}
    try:
        for mode, limit in (("serial", "1"), ("concurrent", "null")):
            cfg = load_config(ROOT / "configs" / "demo.yaml",
                              [f"work_dir={tmp / mode}", *TOY, *paper_plan(), f"pipeline.max_parallel_stages={limit}"])
            t0 = time.monotonic()
            runs[mode] = run_pipeline(cfg)
            walls[mode] = time.monotonic() - t0
        dag = build_dag(cfg)
    finally:
        ray.shutdown()
        cluster.shutdown()
    seconds = {r.stage_id: r.ended - r.started for r in runs["serial"].records}
    path, bound = critical_path(dag, seconds)
    print(f"paper-shaped plan: {len(dag)} stages ({sum(s.kind == 'train' for s in dag.values())} trainings) "
          f"on {args.nodes} simulated 1-CPU nodes (this machine: {os.cpu_count()} cores)")
    print(f"serial:      {walls['serial']:7.1f} s  (sum of stage times {sum(seconds.values()):.1f} s)")
    print(f"concurrent:  {walls['concurrent']:7.1f} s")
    print(f"bound:       {bound:7.1f} s  critical path of the serial run's stage times: {' -> '.join(path)}")
    t0 = min(r.started for r in runs["concurrent"].records)
    for r in runs["concurrent"].records:
        print(f"  {r.stage_id:<16} {r.status:<7} {r.started - t0:7.1f} .. {r.ended - t0:7.1f} s")
    print(f"load average after: {os.getloadavg()}")
    print(json.dumps({"serial_s": walls["serial"], "concurrent_s": walls["concurrent"], "bound_s": bound}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["demo", "paper"])
    p.add_argument("--nodes", type=int, default=4, help="simulated 1-CPU nodes (paper)")
    p.add_argument("--vs", default="auto", choices=["auto", "null"],
                   help="demo: max_parallel_stages to compare with 1 (default: auto, the default)")
    args = p.parse_args()
    (demo if args.what == "demo" else paper)(args)


if __name__ == "__main__":
    main()
