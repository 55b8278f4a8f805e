"""Two runs of the same nets on the same validation images, compared net by net: each
run's top-1 error with its 95% bootstrap interval, and the paired-bootstrap interval of
their difference (`vgg.results.metrics`), per evaluation mode. For a change that should
not move the results (bf16 against float32, one loader against another), or one that
should.

    python benchmarks/compare_runs.py /work/runs/ladder-cpu /work/runs/ladder-fp32 --nets A D
    python benchmarks/compare_runs.py runs-bf16 runs-fp32 --modes multi-crop@single dense@multi

A run is a ladder output folder (`<out>/evaluate/<net>/posteriors/<mode>.parquet`, from
`python -m vgg.ladder`) or a pipeline work_dir (`<work_dir>/stages/evaluate/<net>/<key>/
posteriors/...`). Prints a Markdown table. Not a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("multi-crop@single", "dense@single", "multi-crop+dense@multi")


def posteriors_file(run: Path, net: str, mode: str) -> Path:
    """The run's posteriors of one net and mode (a ladder folder or a pipeline work_dir)."""
    found = sorted(run.glob(f"evaluate/{net}/posteriors/{mode}.*")) or sorted(
        run.glob(f"stages/evaluate/{net}/*/posteriors/{mode}.*"))
    if not found:
        raise SystemExit(f"error: {run} has no {mode} posteriors of net {net}")
    return found[0]


def nets_of(run: Path) -> list[str]:
    """The nets a run evaluated."""
    folder = run / "evaluate" if (run / "evaluate").is_dir() else run / "stages" / "evaluate"
    return [d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("_")] if folder.is_dir() else []


def paired(a: Path, b: Path, net: str, mode: str, samples: int = 2000) -> dict[str, float]:
    """Errors (%) of run a and run b, their 95% intervals, and that of (a - b), paired."""
    from vgg.results.metrics import bootstrap_errors, interval, read_posteriors
    from vgg.storage import resolve_uri

    hits, keys = {}, {}
    for name, run in (("a", a), ("b", b)):
        post = read_posteriors(*resolve_uri(str(posteriors_file(run, net, mode))))
        order = np.argsort(post.keys)
        keys[name] = np.asarray(post.keys)[order]
        hits[name] = post.probs.argmax(1)[order] == post.labels[order]
    if not np.array_equal(keys["a"], keys["b"]):
        raise SystemExit(f"error: the two runs scored different images for {net} {mode}")
    reps = bootstrap_errors(hits, samples=samples, seed=0)
    out = {"n": len(keys["a"])}
    for name in ("a", "b"):
        out[name] = 100 * (1 - hits[name].mean())
        out[f"{name}_ci"] = tuple(100 * x for x in interval(reps[name]))
    out["diff_ci"] = tuple(100 * x for x in interval(reps["a"] - reps["b"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="the first run (e.g. bf16)")
    p.add_argument("b", type=Path, help="the second run (e.g. float32)")
    p.add_argument("--nets", nargs="+", help="default: every net both runs evaluated")
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument("--names", nargs=2, default=("a", "b"), help="column names of the two runs")
    args = p.parse_args()
    nets = args.nets or sorted(set(nets_of(args.a)) & set(nets_of(args.b)))
    na, nb = args.names
    print(f"top-1 error %, [95% bootstrap interval]; {na} - {nb}: paired-bootstrap interval (pp)\n")
    print(f"| net | mode | images | {na} | {nb} | {na} - {nb} |")
    print("|---|---|---|---|---|---|")
    for net in nets:
        for mode in args.modes:
            r = paired(args.a, args.b, net, mode)
            ci = lambda c: f"[{c[0]:.1f}, {c[1]:.1f}]"  # noqa: E731
            print(f"| {net} | {mode} | {r['n']:,} | {r['a']:.1f} {ci(r['a_ci'])} | {r['b']:.1f} {ci(r['b_ci'])} "
                  f"| {r['a'] - r['b']:+.1f} [{r['diff_ci'][0]:+.1f}, {r['diff_ci'][1]:+.1f}] |")


if __name__ == "__main__":
    main()
