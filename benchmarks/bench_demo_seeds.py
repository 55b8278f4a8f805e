"""The embedded default under other seeds: does every net still train, and is the data
still hard enough to order nets? (Issue 26: whether D collapsed depended on the machine.)

    python benchmarks/bench_demo_seeds.py            # seeds 1 and 2
    python benchmarks/bench_demo_seeds.py --seeds 3 4 5

Runs `pipeline/run.py` on configs/demo.yaml once per seed, in fresh work_dirs, with the
data, shard and training seeds all set to it; prints, per net, the selected epoch's
validation error, the evaluate stage's health, the top-1 error of every single-scale mode,
the report's claims and its wall time. Not a test (minutes per seed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(seed: int, work: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "pipeline" / "run.py"), "--set", f"work_dir={work}",
           f"data.demo.seed={seed}", f"shard.seed={seed}", f"train.seed={seed}"]
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit(f"seed {seed}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    out = {"seed": seed, "wall_s": round(wall, 1), "nets": {}}
    stages = work / "stages"
    for ev in sorted((stages / "evaluate").glob("*/*/rows.json")):
        net = ev.parent.parent.name
        rows = json.loads(ev.read_text())
        health = json.loads((ev.parent / "health.json").read_text())
        train = json.loads(next((stages / "train" / net).glob("*/manifest.json")).read_text())
        out["nets"][net] = {
            "train_val_top1": round(100 * train["val_top1_err"], 1),
            "train_collapsed": (train.get("val_health") or {}).get("collapsed"),
            "eval_collapsed": health["collapsed"],
            "health": health.get("reason") or "ok",
            **{f"{r['method']}@{r['scales']}": round(r["top1"], 1) for r in rows if r["scales"] == "single"},
        }
    report = next((stages / "report").glob("*/manifest.json"))
    out["claims"] = json.loads(report.read_text()).get("claims")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_demo_seeds_"))
    results = [one(s, tmp / f"seed{s}") for s in args.seeds]
    for r in results:
        print(f"seed {r['seed']}: {r['wall_s']} s")
        for net, v in r["nets"].items():
            print(f"  {net:6} {json.dumps(v)}")
        print(f"  claims: {r['claims']}")
    bad = [(r["seed"], n) for r in results for n, v in r["nets"].items()
           if v["eval_collapsed"] or v["train_collapsed"]]
    print("collapsed: " + (", ".join(f"{n} (seed {s})" for s, n in bad) if bad else "none"))


if __name__ == "__main__":
    main()
