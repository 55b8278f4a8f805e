"""A slice of the real pipeline end to end on tiny data: every stage kind, caching,
re-running fusion alone, and the result tables in the parent MLflow run."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.runner import PipelineError, run_pipeline
from pipeline.tracking import tracking_uri
from tests.conftest import DEMO, TINY

E2E = [
    *TINY,
    "train.max_epochs=1",
    "train.width=0.125",
    "train.batch_size=8",
    "augment.check_batches=2",
    "augment.check_batch_size=8",
    "evaluate.grid=2",
    "evaluate.batch_size=8",
]


def stage_runs(cfg):
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if "stage" in r.data.tags]


@pytest.fixture(scope="module")
def demo(ray_session, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e") / "work"
    overrides = [f"work_dir={work}", *E2E]
    cfg = load_config(DEMO, overrides)
    first = run_pipeline(cfg, config_path=str(DEMO))
    return cfg, overrides, first


@pytest.mark.slow
def test_every_stage_runs_and_is_recorded(demo):
    cfg, _, first = demo
    kinds = {r.data.tags["stage"] for r in stage_runs(cfg)}
    assert kinds == {"shard", "augment", "train", "evaluate", "fuse", "report"}
    assert all(r.status == "ran" for r in first.records)
    client = MlflowClient(tracking_uri(cfg))
    arts = {a.path for a in client.list_artifacts(first.parent_run_id, "tables")}
    assert {"tables/table3.json", "tables/claims.json", "tables/results.md",
            "tables/error_vs_depth.png"} <= arts
    # every train and evaluate run says whether its net collapsed; the report names them
    report = next(r for r in stage_runs(cfg) if r.data.tags["stage"] == "report")
    for r in stage_runs(cfg):
        if r.data.tags["stage"] in ("train", "evaluate"):
            assert r.data.tags["collapsed"] in ("true", "false") and r.data.tags["health"]
    assert report.data.tags["claim2"] and "claims_held" in report.data.metrics
    # a manifest's URIs point at the published output, not at the temporary one
    for rec in first.records:
        if rec.kind == "train":
            out = Path(rec.output_uri)
            model = json.loads((out / "manifest.json").read_text())["model"]
            assert model["uri"] == str(out / "model.pt")
            assert hashlib.sha256(Path(model["uri"]).read_bytes()).hexdigest() == model["sha256"]
            # the selected epoch's error is its own metric, apart from the per-epoch series
            run = client.get_run(rec.run_id)
            assert run.data.metrics["best_val_top1_err"] == pytest.approx(
                json.loads((out / "manifest.json").read_text())["val_top1_err"])
            epochs = json.loads((out / "history.json").read_text())["epochs"]
            assert len(client.get_metric_history(rec.run_id, "val_top1_err")) == len(epochs)


@pytest.mark.slow
def test_second_run_reuses_everything(demo):
    cfg, _, _ = demo
    t0 = time.monotonic()
    again = run_pipeline(cfg)
    assert {r.status for r in again.records} == {"reused"}
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_fuse_alone_runs_exactly_one_stage(demo, capsys):
    cfg, overrides, _ = demo
    before = stage_runs(cfg)
    t0 = time.monotonic()
    members = '["A:dense@single","D:multi-crop@multi"]'
    assert main(["--config", str(DEMO), "--set", *overrides, f"fuse.members={members}", "--stage", "fuse"]) == 0
    assert time.monotonic() - t0 < 60
    new = [r for r in stage_runs(cfg) if r.info.run_id not in {b.info.run_id for b in before}]
    assert [r.data.tags["stage"] for r in new] == ["fuse"]


@pytest.mark.slow
def test_report_alone_rebuilds_tables_and_claims_from_saved_posteriors(demo, capsys):
    cfg, overrides, first = demo
    before = {r.info.run_id for r in stage_runs(cfg)}
    t0 = time.monotonic()
    assert main(["--config", str(DEMO), "--set", *overrides, "report.seed=1", "--stage", "report"]) == 0
    assert time.monotonic() - t0 < 60
    new = [r for r in stage_runs(cfg) if r.info.run_id not in before]
    assert [r.data.tags["stage"] for r in new] == ["report"]
    out = capsys.readouterr().out
    assert "Table 5" in out and "The paper's claims, judged on this run" in out
    # the same posteriors: the same errors as the first run's report, other resamples
    first_report = next(r for r in first.records if r.stage_id == "report")
    old = json.loads((Path(first_report.output_uri) / "tables" / "table3.json").read_text())
    new_out = Path(new[0].data.tags["output_uri"])
    new_t3 = json.loads((new_out / "tables" / "table3.json").read_text())
    assert new_t3["top-1"] == old["top-1"]


def test_stage_with_missing_upstream_says_how_to_produce_it(tiny_cfg):
    cfg = tiny_cfg(*E2E[len(TINY):])
    with pytest.raises(PipelineError, match=r"evaluate/A needs the output of shard.*--stage shard"):
        run_pipeline(cfg, ["evaluate/A"])


@pytest.mark.slow
def test_bad_files_are_counted_and_training_runs(ray_session, tmp_path):
    """Truncated, empty, non-image, PNG-named-.jpg, CMYK, grayscale, 16-bit files: the shards
    hold only decodable RGB JPEGs, so DALI trains on them without a crash."""
    import numpy as np
    import pyarrow.fs as pafs

    from pipeline.config import DemoDataConfig
    from vgg.data import demo as demo_data
    from tests.test_shard import bad_files

    root = tmp_path / "data"
    demo_data.generate(pafs.LocalFileSystem(), str(root), DemoDataConfig(3, 8, 4, 36, 60, 0))
    bad_files(root, np.random.default_rng(3), cls="c0_disc")
    cfg = load_config(DEMO, [f"work_dir={tmp_path / 'work'}", f"data.root={root}", *E2E])
    run = run_pipeline(cfg, ["shard", "augment", "train/A"])
    assert [r.status for r in run.records] == ["ran", "ran", "ran"]
    shard_run = next(r for r in stage_runs(cfg) if r.data.tags["stage"] == "shard")
    assert shard_run.data.metrics["skipped"] == 4 and shard_run.data.metrics["converted"] == 4
