"""Adversarial inputs: a diverged net is never published, bad datasets stop before any work
starts in one line, expected errors exit with status 2 and no traceback on the console."""

from __future__ import annotations

import os

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.runner import run_pipeline
from pipeline.storage import Store
from stages.train import TrainingDiverged
from tests.conftest import DEMO
from tests.test_e2e import E2E


def test_dataset_errors_stop_before_mlflow_and_ray_in_one_line(tmp_path, capsys):
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        (root / split / "cat" / "a.jpg").write_bytes(b"x")
    (root / "train" / "dog").mkdir()  # an empty class folder
    work = tmp_path / "work"
    code = main(["--set", f"work_dir={work}", f"data.root={root}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: data.root: class folder") and "dog is empty" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (work / "mlflow.db").exists()  # neither MLflow nor Ray started


def test_expected_errors_keep_their_traceback_out_of_the_console(tmp_path, capsys, monkeypatch):
    import pipeline.runner

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "work" / "stages"))

    monkeypatch.setattr(pipeline.runner, "run_pipeline", full)
    assert main(["--set", f"work_dir={tmp_path / 'work'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on the device holding") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    log = err.split("(traceback: ")[1].split(";")[0]
    assert "OSError" in open(log).read()
    os.remove(log)
    assert main(["--verbose", "--set", f"work_dir={tmp_path / 'work'}"]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.slow
def test_a_diverged_net_fails_and_publishes_nothing(ray_session, tmp_path):
    cfg = load_config(DEMO, [f"work_dir={tmp_path / 'work'}", *E2E, "train.max_epochs=2",
                             "train.nets.A.lr=1000.0"])
    with pytest.raises(TrainingDiverged, match=r"train/A: training diverged at epoch 1 step \d+.*"
                                               r"Lower the learning rate \(train\.nets\.A\.lr = 1000\)"):
        run_pipeline(cfg, ["shard", "augment", "train/A"])
    store = Store(cfg.work_dir)
    assert store.latest("train/A") is None
    assert not os.listdir(os.path.join(store.stage_root("train/A"), "_tmp"))


@pytest.mark.slow
def test_two_invocations_at_once_on_a_fresh_work_dir(tmp_path):
    """Both finish; each (stage, cache key) runs once (the other waits, then reuses it);
    the MLflow store, created by both at once, holds every run."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from pipeline.tracking import tracking_uri
    from tests.conftest import ROOT, TINY

    work = tmp_path / "work"
    args = [sys.executable, str(ROOT / "pipeline" / "run.py"), "--set", f"work_dir={work}", *TINY,
            "--stage", "shard", "augment"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    cfg = load_config(DEMO, [f"work_dir={work}", *TINY])
    client = MlflowClient(tracking_uri(cfg))
    runs = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id])
    stage_runs = sorted(r.data.tags["stage_id"] for r in runs if "stage_id" in r.data.tags)
    assert stage_runs == ["augment", "shard"]  # each ran once, in one of the two
    assert len([r for r in runs if "stage_id" not in r.data.tags]) == 2  # both parent runs
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sum("reused  (made by another invocation" in o or "reused  (cache key" in o for o in outs) >= 1
