#!/usr/bin/env python
"""The README's screenshots of MLflow's UI, made the way the browser test reads it
(tests/browser.py): `mlflow ui` on 127.0.0.1 over a finished pipeline run, headless Chromium.

    python docs/screenshots.py --work-dir /tmp/shots_demo          # a finished run's work_dir
    python docs/screenshots.py --work-dir /tmp/shots_demo --run    # run the demo there first

Writes into docs/img/ (or --out):
  mlflow-runs.png           the experiment's runs: every stage run, its dataset and model
  mlflow-results-table.png  the parent run's Table 3 (tables/table3.json, as a table)
  mlflow-claims-table.png   the parent run's claims (tables/claims.json, as a table)
  mlflow-train-run.png      a train run: its datasets, metrics and the model they belong to
  mlflow-model.png          that train run's logged model

The pages are the model-training view with MLflow Assistant's panel closed (the UI is
served under a host alias, see tests/browser.py), in a 1600-pixel-wide window.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlflow.tracking import MlflowClient  # noqa: E402

from tests import browser  # noqa: E402

#: The host name Chromium reaches `mlflow ui` by (mapped to 127.0.0.1 in Chromium only).
ALIAS = "mlflow-ui"


def find_run(client: MlflowClient):
    """(experiment id, parent run, train run, logged model id or None) of the newest
    invocation whose parent run has a Table 3 and train stage runs. The train run: the one
    with a registered model version (the pipeline's best single net), else the first."""
    exps = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(exps, "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
    for run in parents:
        rid, eid = run.info.run_id, run.info.experiment_id
        if "mlflow.parentRunId" in run.data.tags:
            continue
        if not any(a.path == "tables/table3.json" for a in client.list_artifacts(rid, "tables")):
            continue
        children = client.search_runs([eid], f"tags.`mlflow.parentRunId` = '{rid}'",
                                      order_by=["attributes.start_time ASC"])
        trains = [c for c in children if c.data.tags.get("stage") == "train"]
        if not trains:
            continue
        registered = [c for c in trains if client.search_model_versions(f"run_id = '{c.info.run_id}'")]
        train = (registered or trains)[0]
        models = [m.model_id for m in client.search_logged_models(experiment_ids=[eid])
                  if m.source_run_id == train.info.run_id]
        return eid, run, train, (models[0] if models else None)
    sys.exit("no finished pipeline run with tables/table3.json and train runs in this store")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True, help="the pipeline's work_dir (its MLflow store: mlflow.db)")
    p.add_argument("--run", action="store_true", help="first run `python pipeline/run.py --set work_dir=...`")
    p.add_argument("--out", default=str(ROOT / "docs" / "img"), help="where the PNGs go (default: docs/img)")
    p.add_argument("--only", nargs="+", metavar="PNG", help="make only these screenshots (file names)")
    args = p.parse_args(argv)
    if browser.chromium_path() is None:
        sys.exit("chromium is not installed (Debian: apt-get install -y chromium)")
    work = Path(args.work_dir).resolve()
    if args.run:
        subprocess.run([sys.executable, "pipeline/run.py", "--set", f"work_dir={work}"], cwd=ROOT, check=True)
    db = work / "mlflow.db"
    if not db.is_file():
        sys.exit(f"{db} does not exist: run the pipeline there first (--run)")
    uri = f"sqlite:///{db}"
    eid, parent, train, model_id = find_run(MlflowClient(uri))
    out = Path(args.out)
    pages = [
        ("mlflow-runs.png", lambda base: browser.runs_url(base, eid), (1600, 900)),
        # the window of the issue-31 check (tests/test_e2e.py): the result in the first screen
        ("mlflow-results-table.png",
         lambda base: browser.run_url(base, eid, parent.info.run_id, "tables/table3.json"), (1600, 1100)),
        ("mlflow-claims-table.png",
         lambda base: browser.run_url(base, eid, parent.info.run_id, "tables/claims.json"), (1600, 1100)),
        ("mlflow-train-run.png", lambda base: browser.run_url(base, eid, train.info.run_id), (1600, 1300)),
    ]
    if model_id:
        pages.append(("mlflow-model.png", lambda base: browser.model_url(base, eid, model_id), (1600, 1000)))
    pages = [p for p in pages if not args.only or p[0] in args.only]
    with browser.serve_mlflow_ui(uri, alias=ALIAS) as base:
        for name, url, window in pages:
            png = browser.screenshot(url(base), out / name, window=window)
            print(f"{png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}  {url(base)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
