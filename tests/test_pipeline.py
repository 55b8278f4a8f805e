"""The spine end to end: caching, single-stage re-runs, interruption, MLflow records, CLI."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.runner import PipelineError, run_pipeline, states
from pipeline.storage import Store
from pipeline.tracking import tracking_uri
from tests.conftest import DEMO, ROOT, TINY


def child_runs(cfg, parent_run_id):
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.experiment)
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


def all_stage_runs(cfg):
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if "stage" in r.data.tags]


def state_of(cfg, sid):
    return {spec.id: st for spec, _, st in states(cfg)}[sid]


def test_run_records_mlflow_then_reuses(ray_session, tiny_cfg):
    cfg = tiny_cfg()
    assert state_of(cfg, "shard") == "missing"
    first = run_pipeline(cfg, ["shard"])
    assert first.status_of("shard") == "ran"
    assert state_of(cfg, "shard") == "done"

    (run,) = child_runs(cfg, first.parent_run_id)
    key = [s for s in states(cfg) if s[0].id == "shard"][0][1]
    assert run.data.tags["stage"] == "shard" and run.data.tags["stage_id"] == "shard"
    assert run.data.tags["cache_key"] == key
    assert run.data.params["shard.rows_per_shard"] == "10"
    assert run.data.params["data.demo.num_classes"] == "3"
    assert run.data.metrics["train_images"] == 24 and run.data.metrics["val_images"] == 12
    assert run.data.metrics["skipped"] == 0
    client = MlflowClient(tracking_uri(cfg))
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "stats.json", "classes.json", "skipped.csv", "config.json", "class_counts.json"} <= names
    out = Store(cfg.work_dir).latest("shard")
    assert run.data.tags["output_uri"] == out.uri and out.marker["mlflow_run_id"] == run.info.run_id

    t0 = time.monotonic()
    second = run_pipeline(cfg, ["shard"])
    assert time.monotonic() - t0 < 30
    assert second.status_of("shard") == "reused"
    assert child_runs(cfg, second.parent_run_id) == []  # nothing re-ran...
    parent = client.get_run(second.parent_run_id)
    assert parent.data.tags["stage.shard"] == f"reused {key}"  # ...and the reuse is visible
    assert parent.data.metrics["stages_reused"] == 1
    assert "stages.json" in {a.path for a in client.list_artifacts(second.parent_run_id)}


def test_config_change_misses_the_cache(ray_session, tiny_cfg):
    cfg = tiny_cfg()
    run_pipeline(cfg, ["shard"])
    changed = tiny_cfg("shard.rows_per_shard=5")
    assert state_of(changed, "shard") == "stale"
    assert run_pipeline(changed, ["shard"]).status_of("shard") == "ran"
    assert state_of(changed, "shard") == "done" and state_of(cfg, "shard") == "done"
    # an unrelated key (the MLflow experiment) does not change the stage's key
    assert state_of(tiny_cfg("experiment=other"), "shard") == "done"


def test_stage_force_reruns_exactly_that_stage(ray_session, tiny_cfg, work_dir, capsys):
    cfg = tiny_cfg()
    run_pipeline(cfg, ["shard"])
    before = len(all_stage_runs(cfg))
    args = ["--config", str(DEMO), "--set", f"work_dir={work_dir}", *TINY, "--stage", "shard", "--force"]
    assert main(args) == 0
    after = all_stage_runs(cfg)
    assert len(after) == before + 1
    assert sorted(r.data.tags["stage"] for r in after).count("shard") == 2


def test_unknown_stage_is_an_error(tiny_cfg):
    with pytest.raises(PipelineError, match="unknown stage train/Z; stages of this config: shard, augment, train/A"):
        run_pipeline(tiny_cfg(), ["train/Z"])


def test_failed_stage_leaves_nothing_reusable(ray_session, tiny_cfg, monkeypatch):
    import stages.shard

    cfg = tiny_cfg("pipeline.max_parallel_stages=1")  # in this process: the crash is patched in here

    def crash(root, out, cfg, log, per_class=None, **options):  # options: e.g. the folder layout
        out.fs.create_dir(out.join("train"))
        with out.fs.open_output_stream(out.join("train", "half.parquet")) as f:
            f.write(b"partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(stages.shard, "shard", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_pipeline(cfg, ["shard"])
    store = Store(cfg.work_dir)
    assert state_of(cfg, "shard") == "missing" and store.latest("shard") is None
    assert not os.listdir(os.path.join(store.stage_root("shard"), "_tmp"))
    (failed,) = all_stage_runs(cfg)
    assert failed.info.status == "FAILED" and "disk on fire" in failed.data.tags["error"]
    monkeypatch.undo()
    assert run_pipeline(cfg, ["shard"]).status_of("shard") == "ran"


@pytest.mark.slow
def test_killed_stage_is_rerun(ray_session, tiny_cfg, work_dir):
    """kill -9 in the middle of the shard stage: nothing is taken for a result; the next run redoes it."""
    args = [sys.executable, str(ROOT / "pipeline" / "run.py"), "--config", str(DEMO), "--set", f"work_dir={work_dir}", *TINY, "--stage", "shard"]
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp_root = Path(work_dir) / "stages" / "shard" / "_tmp"
    deadline = time.monotonic() + 120
    while not list(tmp_root.glob("*/demo_data")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    cfg = tiny_cfg()
    assert state_of(cfg, "shard") == "missing"
    assert list(tmp_root.iterdir())  # the debris is there, and is not taken for an output
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.experiment)
    killed = client.search_runs([exp.experiment_id])
    assert {r.info.status for r in killed} == {"RUNNING"}  # nothing could mark them
    rerun = run_pipeline(cfg, ["shard"])
    assert rerun.status_of("shard") == "ran"
    assert not list(tmp_root.iterdir())  # the re-run swept it
    # the next invocation marked the dead one's parent and stage runs KILLED
    after = {r.info.run_id: r.info.status for r in client.search_runs([exp.experiment_id])}
    assert {after[r.info.run_id] for r in killed} == {"KILLED"} and len(killed) == 2
    assert after[rerun.parent_run_id] == "FINISHED"


def test_run_py_works_copied_alone(tmp_path, work_dir):
    """`ray submit` copies pipeline/run.py alone: it must import the installed package."""
    lonely = tmp_path / "elsewhere"
    lonely.mkdir()
    shutil.copy(ROOT / "pipeline" / "run.py", lonely / "run.py")
    (lonely / "config.py").write_text("raise SystemExit('a sibling file was imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "run.py", "--list", "--set", f"work_dir={work_dir}"],
        cwd=lonely, env=env, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "shard" in res.stdout and "missing" in res.stdout  # found configs/demo.yaml in the project
    res = subprocess.run([sys.executable, "run.py", "--help"], cwd=lonely, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "--stage" in res.stdout and "data.root" in res.stdout


def test_cli_config_error_exit_code(capsys):
    assert main(["--config", str(DEMO), "--set", "shard.rows_per_shard=many"]) == 2
    err = capsys.readouterr().err
    assert "demo.yaml" in err and "shard.rows_per_shard: expected an integer" in err
