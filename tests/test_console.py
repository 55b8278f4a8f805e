"""The console: the pipeline's own lines by default, Ray's and MLflow's own lines with --verbose.

The sample lines are real: what Ray forwarded to the driver in a run of the demo."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from pipeline import console
from tests.conftest import DEMO, ROOT

#: (process, line) as Ray forwarded them: ours, then Ray's, Ray Data's, Ray Train's and MLflow's own.
SAMPLE = [
    ("stage shard", "  [shard] 72 files, 3 classes: validating (decoding every image)"),
    ("stage shard", "Starting execution of Dataset dataset_0355NaMDnivlqdPM81bL5O_0. Full logs are in "
                    "/tmp/ray/session_2026-11-28_10-37-46_785196_28647/logs/ray-data"),
    ("stage shard", "2026-11-28 10:38:04,537\tINFO logging_progress.py:174 -- ======= Running Dataset: "
                    "dataset_0355NTptjto5VfhrsfOeUc_0 ======="),
    ("stage shard", "2026-11-28 10:38:04,537\tINFO logging_progress.py:225 -- Total Progress: 0/?"),
    ("stage shard", "[dataset]: A new progress UI is available. To enable, set "
                    "`ray.data.DataContext.get_current().enable_rich_progress_bars = True` and "
                    "`ray.data.DataContext.get_current().use_ray_tqdm = False`."),
    ("stage shard", "✔️  Dataset dataset_0355NaMDnivlqdPM81bL5O_0 execution finished in 0.19 seconds"),
    ("stage shard", "Data sink Parquet finished. 24 rows and 43.8KiB data written."),
    ("stage shard", "  [shard] val: 24 images in 2 shards"),
    ("stage shard", "2026-11-28 10:37:51,538\tINFO worker.py:2029 -- Connected to Ray cluster. View the "
                    "dashboard at \x1b[1m\x1b[32mhttp://127.0.0.1:8265 \x1b[39m\x1b[22m"),
    ("stage train/B-48", "  [train/B-48] running (cache key 9c0e66a5565c84ef)"),
    ("TrainController", "Requesting resources: {'CPU': 1.0} * 1"),
    ("TrainController", "Attempting to start training worker group of size 1 with the following resources: "
                        "[{'CPU': 1.0}] * 1"),
    ("TrainController", "[2026-11-28 10:38:56,990 E 30362 30392] core_worker.cc:2465: Actor with class name: "
                        "'PreemptionWatcher' and ID: 'e834e16247db5b31f7f53d2501000000' has constructor "
                        "arguments in the object store and max_restarts > 0"),
    ("TrainController", "Started training worker group of size 1: "),
    ("TrainController", "- (ip=127.0.0.1, pid=30430) world_rank=0, local_rank=0, node_rank=0"),
    ("RayTrainWorker", "Setting up process group for: env:// [rank=0, world_size=1]"),
    ("RayTrainWorker", "Moving model to device: cpu"),
    ("RayTrainWorker", "  [train/B-48] 1 worker(s) x batch 8, 6 steps/epoch, epochs 0..0"),
    ("RayTrainWorker", "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/tmp/w/stages/"
                       "train/B-48/_scratch/9c0e66a5565c84ef/ray_train/epoch_0000)"),
    ("RayTrainWorker", "Reporting training result 1: TrainingReport(checkpoint=Checkpoint(filesystem=local, "
                       "path=/tmp/w/ray_train/epoch_0000), metrics={'epoch': 0, 'val_top1_err': 0.58})"),
    ("RayTrainWorker", "  [train/B-48] epoch 1/1 loss 0.6411 val top-1 err 58.3% lr 0.001 488 img/s 0.1 s"),
    ("stage train/B-48", "  [train/B-48] WARNING: the net collapsed: COLLAPSED: only 2 of 3 classes are "
                         "ever predicted"),
    ("stage evaluate/A", "2026/11/28 10:37:57 INFO mlflow.store.db.utils: Creating initial MLflow database "
                         "tables..."),
]
OURS = [line for _, line in SAMPLE if line.startswith("  [")]

#: A Ray Train controller's error, as it printed it in a benchmark's run of the demo.
CONTROLLER_ERROR = [
    "Error in control loop iteration: The worker group startup timed out after 60.0 seconds waiting for 1 "
    "workers.",
    "Traceback (most recent call last):",
    '  File "/venv/lib/python3.11/site-packages/ray/train/v2/_internal/execution/controller/controller.py", '
    "line 914, in _run_control_loop_iteration",
    "    result = await self._step()",
    "             ^^^^^^^^^^^^^^^^^^",
    "ray.train.v2._internal.exceptions.WorkerGroupStartupTimeoutError: The worker group startup timed out "
    "after 60.0 seconds waiting for 1 workers.",
]

PREFIX = re.compile(r"^(?:\x1b\[\d+m)?\((?P<who>[^)]*)\)(?:\x1b\[0m)? (?P<line>.*)$")


def batch(process: str, lines: list[str], pid=30430) -> dict:
    """One batch of a worker's output as Ray's log subscriber hands it to the driver."""
    who = "task_name" if process.startswith("stage ") else "actor_name"
    return {"ip": "127.0.0.1", "localhost": "127.0.0.1", "pid": pid, "job": "01000000", "is_err": True,
            "lines": lines, who: process}


@pytest.fixture
def ray_prints(monkeypatch):
    """Ray's own printing of forwarded lines, with the console filter installed (undone after)."""
    import ray._private.worker as worker

    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # restored afterwards
    monkeypatch.setattr(console, "VERBOSE", False)
    assert console.install_filter()

    def prints(data: dict) -> None:
        worker.print_to_stdstream(data, ignore_prefix=False)

    return prints


def test_only_the_stages_lines_reach_the_console_without_rays_prefix(ray_prints, capsys):
    for process, line in SAMPLE:
        ray_prints(batch(process, [line]))
    ray_prints(batch("stage shard", [line for _, line in SAMPLE]))  # a batch of many lines too
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == OURS + OURS


def test_verbose_shows_every_line_as_ray_prints_it(ray_prints, capsys, monkeypatch):
    monkeypatch.setattr(console, "VERBOSE", True)
    ray_prints(batch("RayTrainWorker", [line for _, line in SAMPLE]))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(SAMPLE)
    for printed, (_, line) in zip(lines, SAMPLE):
        m = PREFIX.match(printed)
        assert m and m["who"] == "RayTrainWorker pid=30430" and m["line"] == line
    assert lines[-3].startswith("\x1b[36m(RayTrainWorker pid=30430)\x1b[0m   [train/B-48] epoch 1/1")


def test_trouble_reaches_the_console_with_rays_prefix(ray_prints, capsys):
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    ray_prints(batch("TrainController", CONTROLLER_ERROR + ["Requesting resources: {'CPU': 1.0} * 1"], pid=7669))
    # a traceback split over two batches: its end still belongs to it
    ray_prints(batch("stage report", ["  [report] writing tables", "Traceback (most recent call last):",
                                      '  File "/w/stages/report.py", line 3, in run'], pid=11))
    ray_prints(batch("stage report", ["    1 / 0", "ZeroDivisionError: division by zero", "plain noise"], pid=11))
    ray_prints(batch("stage train/A", [
        "2026-11-28 10:40:00,001\tWARNING streaming_executor.py:99 -- the cluster has no CPU left",
        "2026/11/28 10:40:01 ERROR mlflow.store.db.utils: the database is locked",
        "/w/vgg/training/worker.py:120: UserWarning: a warning from Python",
        "  warnings.warn(msg)",
        "[2026-11-28 10:40:02,000 C 1 2] core_worker.cc:100: An unexpected system state has occurred.",
        json.dumps({RAY_TQDM_MAGIC: True, "x": 3, "total": 10}),
    ], pid=12))
    ray_prints({"pid": "raylet", "is_err": False, "lines": [
        "WARNING: 4 PYTHON worker processes have been started on node: 89f63159 with address: 127.0.0.1, "
        "which is 4x the maximum expected startup concurrency (1)."]})
    ray_prints({"pid": "raylet", "is_err": False, "lines": [
        "Task was killed due to the node running low on memory."]})
    out, err = capsys.readouterr()
    shown = [(m["who"], m["line"]) if (m := PREFIX.match(line)) else (None, line) for line in err.splitlines()]
    # a traceback is condensed to its exception's line (once, with one notice saying so)
    assert shown == [
        (None, console.CONDENSED),
        ("TrainController pid=7669", CONTROLLER_ERROR[0]),
        ("TrainController pid=7669", CONTROLLER_ERROR[-1]),
        (None, "  [report] writing tables"),
        ("stage report pid=11", "ZeroDivisionError: division by zero"),
        ("stage train/A pid=12", "2026-11-28 10:40:00,001\tWARNING streaming_executor.py:99 -- the cluster has no "
                                 "CPU left"),
        ("stage train/A pid=12", "2026/11/28 10:40:01 ERROR mlflow.store.db.utils: the database is locked"),
        ("stage train/A pid=12", "/w/vgg/training/worker.py:120: UserWarning: a warning from Python"),
        ("stage train/A pid=12", "[2026-11-28 10:40:02,000 C 1 2] core_worker.cc:100: An unexpected system "
                                 "state has occurred."),
    ]
    m = PREFIX.match(out)  # the raylet's reports go to stdout, as Ray prints them
    assert m and (m["who"], m["line"]) == ("raylet", "Task was killed due to the node running low on memory.")
    assert len(out.splitlines()) == 1


def test_rays_notice_of_its_default_authentication_is_hidden_not_its_warning_that_auth_is_off(monkeypatch):
    import ray._private.worker as worker

    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)
    monkeypatch.setattr(console, "VERBOSE", False)
    assert console.prepare_ray() == {"logging_level": logging.WARNING}
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger(console._AUTH_LOGGER)  # the logger Ray's authentication set-up warns on
    log.addHandler(handler)
    try:
        log.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        log.warning("Token authentication is disabled for this Ray cluster. Anyone with network access to the "
                    "cluster can run arbitrary code and access its data.")
        monkeypatch.setattr(console, "VERBOSE", True)
        log.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
    finally:
        log.removeHandler(handler)
    assert [m.split(" for this")[0] for m in seen] == ["Token authentication is disabled",
                                                       "Token authentication is enabled"]


# ------------------------------------------------------------------ a real Ray run

RUN = r"""
import os, sys, time
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # bind every node to 127.0.0.1
from ray._private import ray_constants
ray_constants.ENABLE_RAY_CLUSTER = False
sys.path.insert(0, sys.argv[1])
mode, how, config, work = sys.argv[2:6]

from pipeline import console
from pipeline.config import load_config
from pipeline.runner import connect_ray, disconnect_ray

class Tee:
    '''The process's stderr, also kept: to wait until the task's last line arrived.'''
    def __init__(self, stream):
        self.stream, self.text = stream, []
    def write(self, s):
        self.text.append(s)
        return self.stream.write(s)
    def flush(self):
        self.stream.flush()
    def __getattr__(self, name):
        return getattr(self.stream, name)

sys.stderr = Tee(sys.stderr)
console.configure(mode == "verbose")
overrides = [f"work_dir={work}", "ray.num_cpus=1"]
cluster = None
if how == "join":  # an existing cluster, as under `ray submit` with ray.address: auto
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    overrides.append(f"ray.address={cluster.address}")
assert connect_ray(load_config(config, overrides))
import ray

@ray.remote(num_cpus=0, max_retries=0)
def stage():
    import sys, traceback
    for line in ["  [x] ours",
                 "2026-11-28 10:38:00,339\tINFO streaming_executor.py:215 -- Starting execution of Dataset d_0",
                 "[2026-11-28 10:38:18,907 E 29746 29777] core_worker.cc:2465: Actor with class name: "
                 "'PreemptionWatcher' has constructor arguments in the object store",
                 "2026-11-28 10:38:00,340\tWARNING streaming_executor.py:99 -- a warning that matters"]:
        print(line, file=sys.stderr, flush=True)
    try:
        1 / 0
    except ZeroDivisionError:
        traceback.print_exc()
    print("  [x] done", file=sys.stderr, flush=True)

ray.get(stage.options(name="stage x").remote())
deadline = time.time() + 60
while "  [x] done" not in "".join(sys.stderr.text) and time.time() < deadline:
    time.sleep(0.1)
disconnect_ray()
if cluster is not None:
    cluster.shutdown()
"""


def run_ray(mode: str, how: str, tmp_path) -> list[str]:
    """A driver that connects as the pipeline does (`connect_ray`) and runs a task that prints
    a stage's lines and Ray-like lines to stderr; -> the driver's stderr lines (not a TTY)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_LOGGING_LEVEL")}
    done = subprocess.run([sys.executable, "-c", RUN, str(ROOT), mode, how, str(DEMO), str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stderr.splitlines()
    assert "  [x] done" in done.stderr, done.stderr[-4000:]  # the task's last line arrived
    return lines


def test_joining_a_cluster_shows_the_stages_lines_and_trouble_and_says_where_the_rest_is(tmp_path):
    lines = run_ray("quiet", "join", tmp_path)
    text = "\n".join(lines)
    assert any(line.startswith("Connecting to Ray at 127.0.0.1:") for line in lines)
    notice = [line for line in lines if line.startswith("Ray's own log lines are hidden (--verbose shows them)")]
    assert len(notice) == 1, text
    logs = notice[0].split("Ray's full logs: ")[1]
    assert os.path.isdir(logs) and re.search(r"/session_[^/]+/logs$", logs)
    assert "  [x] ours" in lines and "  [x] done" in lines  # no "(stage x pid=...)" prefix
    assert "streaming_executor.py:215" not in text and "PreemptionWatcher" not in text
    assert "Connected to Ray cluster" not in text  # the "ray" logger of the driver below WARNING
    kept = [m["line"] for line in lines if (m := PREFIX.match(line)) and m["who"].startswith("stage x pid=")]
    assert kept[0] == "2026-11-28 10:38:00,340\tWARNING streaming_executor.py:99 -- a warning that matters"
    assert kept[1:] == ["ZeroDivisionError: division by zero"]  # the traceback condensed to its last line
    assert console.CONDENSED in lines
    # nothing lost: the hidden lines are in the worker's log file of the session's log directory
    errs = "".join(open(f, errors="replace").read() for f in glob.glob(os.path.join(logs, "worker-*.err")))
    assert "streaming_executor.py:215 -- Starting execution of Dataset d_0" in errs and "PreemptionWatcher" in errs


def test_verbose_shows_rays_lines_as_before(tmp_path):
    lines = run_ray("verbose", "local", tmp_path)
    text = "\n".join(lines)
    assert "Starting a local Ray instance on 127.0.0.1" in lines
    assert "Ray's own log lines are hidden" not in text
    assert re.search(r"^(\x1b\[\d+m)?\(stage x pid=\d+\)(\x1b\[0m)?   \[x\] ours$", text, re.M), text
    assert "streaming_executor.py:215 -- Starting execution" in text and "PreemptionWatcher" in text
    assert "Started a local Ray instance" in text  # the driver's "ray" logger at INFO, as Ray sets it
