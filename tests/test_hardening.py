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
    with pytest.raises(TrainingDiverged, match=r"train/A: training diverged at epoch 1, step \d+ \(lr 1000\): "
                                               r"training loss .* is above .*nothing is published.*"
                                               r"\(train\.nets\.A\.lr = 1000; "):
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
    assert sum(" reused" in o for o in outs) >= 1  # waited for the other, or found its output


def _start_mlflow_server(db: str, port: int):
    """`mlflow server` on 127.0.0.1:port (its own process group), answering /health."""
    import subprocess
    import sys
    import time
    import urllib.request

    folder = os.path.dirname(db)  # artifacts too: the server's default is ./mlartifacts
    log = open(os.path.join(folder, f"server-{port}.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--artifacts-destination", os.path.join(folder, "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=folder,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return proc
        except OSError:
            time.sleep(1)
    _stop(proc)
    raise RuntimeError(f"mlflow server did not start: {open(log.name, 'rb').read()[-3000:].decode(errors='replace')}")


def _stop(proc) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.slow
def test_a_lost_tracking_server_fails_the_stage_within_the_bound(ray_session, tmp_path, monkeypatch):
    import threading
    import time
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from pipeline.errors import TrackingServerLost
    from pipeline.runner import _free_port

    port, db = _free_port(), str(tmp_path / "server.db")
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    server = _start_mlflow_server(db, port)
    cfg = load_config(DEMO, [f"work_dir={tmp_path / 'work'}", *E2E, "train.max_epochs=4", "mlflow.retry_s=20"])
    killed = {}

    def kill_when_training():  # after the first epoch's checkpoint: training goes on without a server
        scratch = Path(cfg.work_dir) / "stages" / "train" / "A" / "_scratch"
        while not list(scratch.glob("*/ray_train-*/epoch_0000")):
            time.sleep(0.2)
        _stop(server)
        killed["at"] = time.monotonic()

    watcher = threading.Thread(target=kill_when_training, daemon=True)
    watcher.start()
    try:
        with pytest.raises(TrackingServerLost, match=rf"tracking server {uri}.*re-run"):
            run_pipeline(cfg, ["shard", "augment", "train/A"])
        assert time.monotonic() - killed["at"] < 120  # bounded: about 20 s per call, not a quarter hour
        assert Store(cfg.work_dir).latest("train/A") is None  # nothing published
        # a store that answers again (here: the work_dir's SQLite, to spare a second server
        # start): the rerun resumes, trains nothing more, and logs every epoch
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        run = run_pipeline(cfg, ["shard", "augment", "train/A"])
        assert run.status_of("train/A") == "ran"
        rec = next(r for r in run.records if r.stage_id == "train/A")
        steps = [m.step for m in MlflowClient(run.tracking_uri).get_metric_history(rec.run_id, "train_loss")]
        assert sorted(steps) == [0, 1, 2, 3]
    finally:
        if server.poll() is None:
            _stop(server)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs (root and mount rights needed; skipped otherwise)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_full_disk_fails_cleanly_and_the_rerun_completes(ray_session, small_disk, capsys):
    work = small_disk / "work"
    args = ["--set", f"work_dir={work}", *E2E, "train.max_epochs=2", "--stage", "shard", "augment", "train/A"]
    assert main(args[:-1]) == 0  # shard and augment fit
    ballast = small_disk / "ballast"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    # leave 512 kB: enough for the parent MLflow run and the stage's start (so that the
    # failure, and the clean-up checked below, happen inside train/A), not for its weights
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, free - (512 << 10)))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and line[0].startswith("error: no space left on the device") and str(work) in line[0]
    store = Store(str(work))
    assert store.latest("train/A") is None
    tmp = os.path.join(store.stage_root("train/A"), "_tmp")  # no temporary output left (the stage
    assert not os.path.isdir(tmp) or not os.listdir(tmp)  # may have failed before making one)
    ballast.unlink()  # space freed: the same command completes
    assert main(args) == 0 and store.latest("train/A") is not None


@pytest.mark.slow
def test_a_resume_with_nothing_left_to_train_is_counted(ray_session, tmp_path):
    """Killed after its last checkpoint but before publishing: the rerun trains nothing,
    publishes the same weights, and says it resumed."""
    import shutil

    cfg = load_config(DEMO, [f"work_dir={tmp_path / 'work'}", *E2E])
    first = run_pipeline(cfg, ["shard", "augment", "train/A"])
    out = Store(cfg.work_dir).latest("train/A")
    weights = open(out.join("model.pt"), "rb").read()
    shutil.rmtree(out.path)  # as if killed before the publish
    again = run_pipeline(cfg, ["train/A"])
    rec = next(r for r in again.records if r.stage_id == "train/A")
    assert rec.status == "ran" and first.status_of("train/A") == "ran"
    out = Store(cfg.work_dir).latest("train/A")
    assert open(out.join("model.pt"), "rb").read() == weights
    assert out.read_json("manifest.json")["resumes"] == 1
