"""The DAG as a distributed workflow: stages whose inputs are ready run at once as Ray tasks,
a failure blocks only its downstream, and the results equal those of a serial run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.dag import build_dag
from pipeline.runner import run_pipeline
from pipeline.scheduler import critical_path
from stages.train import TrainingDiverged
from tests.conftest import DEMO, ROOT, TWO_NODE_CLUSTER
from tests.test_e2e import E2E

A = "{arch: A, scale: 40, lr: 0.005, init: glorot}"


def test_critical_path_is_the_longest_chain():
    cfg = load_config(DEMO)
    dag = build_dag(cfg)
    seconds = {"shard": 5, "augment": 2, "train/A": 30, "train/D": 30, "train/D-jit": 20,
               "evaluate/A": 100, "evaluate/D": 10, "evaluate/D-jit": 10, "fuse": 1, "report": 1}
    path, total = critical_path(dag, seconds)
    assert path == ["shard", "augment", "train/A", "evaluate/A", "report"] and total == 138
    seconds["evaluate/A"] = 1
    path, total = critical_path(dag, seconds)
    assert path == ["shard", "augment", "train/A", "train/D", "train/D-jit", "evaluate/D-jit", "fuse", "report"]
    assert total == 5 + 2 + 30 + 30 + 20 + 10 + 1 + 1


def test_auto_runs_stages_together_on_one_machine_only_when_they_fit():
    from pipeline.scheduler import _Concurrent, auto_parallel, demand

    cfg = load_config(DEMO)
    dag = build_dag(cfg)
    sel = list(dag)
    assert cfg.pipeline.max_parallel_stages == "auto"
    assert demand(dag["train/A"]) == (2.0, 0.0) and demand(dag["evaluate/A"]) == (2.0, 0.0)
    assert demand(dag["report"]) == (1.0, 0.0)
    # the demo on 2 cores: every pair that could overlap asks for more than 2 CPUs -> one by one
    assert auto_parallel(dag, sel, True, nodes=1, capacity=(2.0, 0.0)) == (1, None)
    # a bigger machine: together, within its CPUs; a cluster: no cap, as before
    assert auto_parallel(dag, sel, True, nodes=1, capacity=(4.0, 0.0)) == (None, (4.0, 0.0))
    assert auto_parallel(dag, sel, True, nodes=3, capacity=(2.0, 0.0)) == (None, None)
    assert auto_parallel(dag, sel, False) == (1, None)
    from pipeline.config import ConfigError
    with pytest.raises(ConfigError, match="max_parallel_stages: must be >= 1, auto, or null"):
        load_config(DEMO, ["pipeline.max_parallel_stages=0"])
    # in flight: train/D (2 CPUs) on 4 CPUs leaves room for evaluate/A (2), not for a third
    run = _Concurrent(None, (4.0, 0.0))
    assert run.has_room(demand(dag["train/D"]))
    run.refs["ref-D"], run.demands["train/D"] = "train/D", demand(dag["train/D"])
    assert run.has_room(demand(dag["evaluate/A"]))
    run.refs["ref-A"], run.demands["evaluate/A"] = "evaluate/A", demand(dag["evaluate/A"])
    assert not run.has_room(demand(dag["fuse"]))
    # GPUs count too: a 1-GPU machine fits one GPU training at a time
    gpu = load_config(DEMO, ["train.use_gpu=true", "train.num_workers=1", "evaluate.use_gpu=true",
                             "evaluate.num_workers=1"])
    gdag = build_dag(gpu)
    assert demand(gdag["train/D"]) == (1.0, 1.0)
    assert auto_parallel(gdag, list(gdag), True, nodes=1, capacity=(16.0, 1.0)) == (None, (16.0, 1.0))
    one = _Concurrent(None, (16.0, 1.0))
    one.refs["r"], one.demands["train/D"] = "train/D", demand(gdag["train/D"])
    assert not one.has_room(demand(gdag["evaluate/A"])) and one.has_room(demand(gdag["fuse"]))


@pytest.mark.slow
def test_a_failed_stage_blocks_only_its_downstream(ray_session, tmp_path, capsys):
    """X diverges: evaluate/X and the report (which needs every evaluation) are blocked; the
    independent branch A runs to completion, and the next invocation reuses it."""
    nets = f"train.nets={{A: {A}, X: {{arch: A, scale: 40, lr: 1000, init: glorot}}}}"
    cfg = load_config(DEMO, [f"work_dir={tmp_path / 'work'}", *E2E, nets, "fuse.members=[]"])
    with pytest.raises(TrainingDiverged) as failed:
        run_pipeline(cfg)
    run = failed.value.pipeline_run
    status = {r.stage_id: (r.status, r.note) for r in run.records}
    assert status["train/X"][0] == "failed" and "diverged" in status["train/X"][1]
    assert status["evaluate/X"] == ("blocked", "train/X") and status["report"] == ("blocked", "train/X")
    assert [status[s][0] for s in ("shard", "augment", "train/A", "evaluate/A")] == ["ran"] * 4
    assert all(r.started and r.ended >= r.started for r in run.records)
    client = MlflowClient(run.tracking_uri)
    stages = client.get_run(run.parent_run_id).data
    assert stages.metrics["stages_failed"] == 1 and stages.metrics["stages_blocked"] == 2
    names = {a.path for a in client.list_artifacts(run.parent_run_id)}
    assert {"stages.json", "timeline.png"} <= names
    # the CLI: the closing summary lists every stage, then the error in one line; exit 2
    capsys.readouterr()
    assert main(["--config", str(DEMO), "--set", f"work_dir={tmp_path / 'work'}", *E2E, nets,
                 "fuse.members=[]"]) == 2
    out, err = capsys.readouterr()
    for sid, word in (("train/A", "reused"), ("evaluate/A", "reused"), ("train/X", "failed"),
                      ("evaluate/X", "blocked"), ("report", "blocked")):
        assert any(line.split()[:2] == [sid, word] for line in out.splitlines()), out
    assert "blocked by train/X" in out and err.strip().splitlines()[-1].startswith("error: train/X: training diverged")
    # --list: the critical path and the plan's wall time from these runs' durations
    assert main(["--config", str(DEMO), "--set", f"work_dir={tmp_path / 'work'}", *E2E, nets,
                 "fuse.members=[]", "--list"]) == 0
    out = capsys.readouterr().out
    assert "critical path: shard -> augment -> train/" in out
    assert "expected wall time from earlier runs: serial" in out and "no earlier run of" in out


TWO_NODES = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
""" + TWO_NODE_CLUSTER + """from pipeline.config import load_config
from pipeline.runner import run_pipeline
out = {}
try:
    for mode, parallel in (("concurrent", "null"), ("serial", "1")):
        cfg = load_config(sys.argv[2], [f"work_dir={sys.argv[3]}/{mode}", *json.loads(sys.argv[4]),
                                        f"pipeline.max_parallel_stages={parallel}"])
        run = run_pipeline(cfg)
        out[mode] = {"uri": run.tracking_uri, "records": [[r.stage_id, r.status, r.output_uri, r.run_id]
                                                          for r in run.records]}
finally:
    import ray
    ray.shutdown()
    cluster.shutdown()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_two_trainings_from_a_run_at_once_on_two_nodes_and_equal_the_serial_run(tmp_path):
    """B1 and B2 both start from A (one worker, one CPU each): on two 1-CPU nodes they train
    at the same time; their weights equal those of the same plan run one stage at a time."""
    nets = (f"train.nets={{A: {A}, B1: {{arch: A, scale: 40, lr: 0.002, init: {{full: train/A}}}}, "
            f"B2: {{arch: A, scale: 40, lr: 0.001, init: {{full: train/A}}}}}}")
    overrides = [*E2E, nets, "train.num_workers=1", "train.batch_size=8", "evaluate.nets=[]",
                 "fuse.members=[]", "train.max_epochs=2"]
    done = subprocess.run([sys.executable, "-c", TWO_NODES, str(ROOT), str(DEMO), str(tmp_path),
                           json.dumps(overrides)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    conc = {sid: (status, uri, run_id) for sid, status, uri, run_id in result["concurrent"]["records"]}
    serial = {sid: (status, uri, run_id) for sid, status, uri, run_id in result["serial"]["records"]}
    assert {s for s, *_ in conc.values()} == {"ran"} and {s for s, *_ in serial.values()} == {"ran"}
    client = MlflowClient(result["concurrent"]["uri"])
    b1, b2 = (client.get_run(conc[s][2]).info for s in ("train/B1", "train/B2"))
    assert b1.start_time < b2.end_time and b2.start_time < b1.end_time  # they overlapped
    for sid in ("train/A", "train/B1", "train/B2"):
        a = torch.load(f"{conc[sid][1]}/model.pt", weights_only=True)["state_dict"]
        b = torch.load(f"{serial[sid][1]}/model.pt", weights_only=True)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sid
