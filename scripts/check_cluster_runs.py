"""Check what a cluster run left in MLflow (used by scripts/local_cluster_e2e.sh).

Expects, in `--experiment`, two pipeline invocations (parent runs), the older first:
  1. the whole pipeline: nested stage runs of every stage kind (the report too), all FINISHED;
  2. `--stage fuse --force`: exactly one nested run, of the fuse stage.
Exits non-zero with the reason when that is not what the tracking server holds.
"""

from __future__ import annotations

import argparse
import json
import sys

KINDS = {"shard", "augment", "train", "evaluate", "fuse", "report"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--experiment", required=True)
    p.add_argument("--out", help="write a JSON summary here")
    a = p.parse_args(argv)

    from mlflow import MlflowClient

    client = MlflowClient(a.tracking_uri)
    exp = client.get_experiment_by_name(a.experiment)
    if exp is None:
        return _fail(f"no experiment {a.experiment!r} at {a.tracking_uri}")
    runs = client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if len(parents) != 2:
        return _fail(f"expected 2 pipeline runs, found {len(parents)}")
    children = {
        p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id] for p in parents
    }
    full, fuse_only = (children[p.info.run_id] for p in parents)

    summary = {
        "tracking_uri": a.tracking_uri,
        "pipeline_run": {
            "run_id": parents[0].info.run_id,
            "status": parents[0].info.status,
            "stages": sorted(r.data.tags.get("stage_id", "?") for r in full),
        },
        "fuse_run": {
            "run_id": parents[1].info.run_id,
            "status": parents[1].info.status,
            "stages": sorted(r.data.tags.get("stage_id", "?") for r in fuse_only),
        },
    }
    fuse_runs = [r for r in full + fuse_only if r.data.tags.get("stage") == "fuse"]
    summary["fuse_artifacts"] = sorted(f.path for f in client.list_artifacts(fuse_runs[-1].info.run_id)) if fuse_runs else []
    print(json.dumps(summary, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=2)

    kinds = {r.data.tags.get("stage") for r in full}
    if kinds != KINDS:
        return _fail(f"the pipeline run has stage kinds {sorted(k or '?' for k in kinds)}, expected {sorted(KINDS)}")
    not_finished = [r.data.tags.get("stage_id") for r in full + fuse_only if r.info.status != "FINISHED"]
    if not_finished or any(p.info.status != "FINISHED" for p in parents):
        return _fail(f"runs not FINISHED: {not_finished or [p.info.run_id for p in parents]}")
    if [r.data.tags.get("stage") for r in fuse_only] != ["fuse"]:
        return _fail(f"the --stage fuse run re-ran {summary['fuse_run']['stages']}, expected only fuse")
    if not summary["fuse_artifacts"]:
        return _fail("the fuse run has no artifacts on the tracking server")
    print("OK: every stage kind ran once; the second invocation re-ran only fusion")
    return 0


def _fail(msg: str) -> int:
    print(f"check_cluster_runs: {msg}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
