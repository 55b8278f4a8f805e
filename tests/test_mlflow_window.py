"""MLflow as the user's window: the experiment's kind, nets as logged models, datasets,
the registry's champion, system metrics on the worker nodes, progress lines."""

from __future__ import annotations

import json
import time

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import registry, tracking
from pipeline.stage import NetToLog, Progress
from pipeline.system_metrics import SystemMetrics, node_label, sampling
from vgg.artifacts import DatasetRef
from vgg.evaluation.scoring import Scorer
from vgg.models import build_vgg
from vgg.training.steps import Precision


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("window", artifact_location=f"file://{tmp_path}/artifacts")
    with tracking.using_tracking_uri(uri):
        yield uri, client, exp


def _dataset(tmp_path, digest="shardkey1", context="validation") -> DatasetRef:
    return DatasetRef("shards/val", digest, str(tmp_path / "val"), 12,
                      {"image": "binary", "label": "int64", "key": "string", "height": "int32"}, context)


def _log(exp, net, tmp_path, digest="shardkey1", top1=0.5) -> tuple[str, str]:
    with mlflow.start_run(experiment_id=exp) as run:
        ds = tracking.log_datasets([_dataset(tmp_path, digest)])
        example = np.random.default_rng(0).standard_normal((2, 3, net.crop, net.crop)).astype(np.float32)
        model_id = tracking.log_net(NetToLog(net, example, {"best_val_top1_err": top1}, {"train": {"lr": 0.01}},
                                             ds[0], step=3), ds[0])
    return run.info.run_id, model_id


def test_experiment_is_of_the_model_training_kind_described_and_linked_to_its_runs(tmp_path):
    from pipeline.config import load_config
    from tests.conftest import DEMO

    cfg = load_config(DEMO, [f"work_dir={tmp_path}", "experiment=kinds"])
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    old = client.create_experiment("old")  # made by an older version: no kind
    exp = tracking.setup_experiment(cfg, uri)
    assert client.get_experiment(exp).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert "Model training" in client.get_experiment(exp).tags["mlflow.note.content"]
    # MLflow 3.17's UI opens the view its URL names: the link the run prints
    assert tracking.ui_hint(uri + "?timeout=60", exp).endswith(
        f"then open http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning")
    assert f"--backend-store-uri {uri} " in tracking.ui_hint(uri + "?timeout=60", exp)
    cfg_old = load_config(DEMO, [f"work_dir={tmp_path}", "experiment=old"])
    assert tracking.setup_experiment(cfg_old, uri) == old
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.set_experiment_tag(old, tracking.EXPERIMENT_KIND_TAG, "finetuning")  # the user's choice
    tracking.setup_experiment(cfg_old, uri)
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "finetuning"


def test_a_logged_net_loads_back_and_runs_the_papers_dense_evaluation(store, tmp_path):
    uri, client, exp = store
    torch.manual_seed(0)
    net = build_vgg("A", num_classes=3, width=0.125, crop=32).eval()
    run_id, model_id = _log(exp, net, tmp_path)
    loaded = mlflow.pytorch.load_model(f"models:/{model_id}")
    assert type(loaded).__name__ == "VGG" and loaded.crop == 32
    x = torch.randn(2, 3, 48, 40)  # larger than the crop: the fully-convolutional net
    ours = Scorer.of(net, Precision(False, False), False).dense_probs(x, flips=True)
    theirs = Scorer.of(loaded.eval(), Precision(False, False), False).dense_probs(x, flips=True)
    assert torch.equal(ours, theirs)
    logged = client.get_logged_model(model_id)
    assert logged.name == "model" and logged.source_run_id == run_id and logged.params["train.lr"] == "0.01"
    (metric,) = logged.metrics  # linked to the model and to the data it was measured on
    assert (metric.key, metric.value, metric.step, metric.dataset_digest) == ("best_val_top1_err", 0.5, 3, "shardkey1")
    info = mlflow.models.get_model_info(f"models:/{model_id}")
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 3, 32, 32)
    assert tuple(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 3)
    reqs = mlflow.pyfunc.get_model_dependencies(f"models:/{model_id}")
    with open(reqs) as f:
        text = f.read()
    assert f"torch=={torch.__version__.split('+')[0]}" in text and "mlflow" in text


def test_a_runs_datasets_carry_the_shard_key_source_schema_and_rows(store, tmp_path):
    uri, client, exp = store
    with mlflow.start_run(experiment_id=exp) as run:
        tracking.log_datasets([_dataset(tmp_path, "abc", "training")])
    (inp,) = client.get_run(run.info.run_id).inputs.dataset_inputs
    d = inp.dataset
    assert (d.name, d.digest, [t.value for t in inp.tags]) == ("shards/val", "abc", ["training"])
    assert str(tmp_path / "val") in d.source and '"num_rows": 12' in d.profile
    assert {c["name"]: c["type"] for c in __import__("json").loads(d.schema)["mlflow_colspec"]} == {
        "image": "binary", "label": "long", "key": "string", "height": "integer"}


def test_the_champion_alias_moves_only_on_improvement_on_the_same_data(store, tmp_path):
    uri, client, exp = store
    torch.manual_seed(0)
    nets = [build_vgg("A", num_classes=3, width=0.125, crop=32) for _ in range(3)]
    ids = [_log(exp, n, tmp_path)[1] for n in nets]

    def cand(i, top1, data="shardkey1"):
        return registry.Candidate(f"net{i}", ids[i], top1, None, data, "")

    first = registry.register_best(client, "window-best-net", [cand(0, 30.0), cand(1, 40.0)], None)
    assert (first.version, first.champion, first.moved) == ("1", "1", True)
    # the same best net again (a rerun that reused everything): no new version
    again = registry.register_best(client, "window-best-net", [cand(0, 30.0)], None)
    assert (again.version, again.moved) == ("1", False) and "is the champion already" in again.reason
    worse = registry.register_best(client, "window-best-net", [cand(1, 35.0)], None)
    assert (worse.version, worse.champion, worse.moved) == ("2", "1", False)
    assert str(client.get_model_version_by_alias("window-best-net", "champion").version) == "1"
    other = registry.register_best(client, "window-best-net", [cand(2, 5.0, data="otherdata")], None)
    assert (other.champion, other.moved) == ("1", False) and "other validation data" in other.reason
    client.delete_model_version_tag("window-best-net", other.version, "model_id")  # register anew
    better = registry.register_best(client, "window-best-net", [cand(2, 25.0)], None)
    assert (better.champion, better.moved) == (better.version, True) and better.version == "4"
    mv = client.get_model_version_by_alias("window-best-net", "champion")
    assert (mv.tags["net"], mv.tags["top1_err"], mv.tags["val_data"], mv.tags["mode"]) == (
        "net2", "25.0000", "shardkey1", "dense@multi")
    assert mv.tags["model_id"] == ids[2] and ids[2] in mv.source
    # the logged model knows its registered version (its page and the runs table show it)
    linked = json.loads(client.get_logged_model(ids[2]).tags["mlflow.modelVersions"])
    assert {"name": "window-best-net", "version": 4} in linked or \
        {"name": "window-best-net", "version": "4"} in linked


def test_system_metrics_are_sampled_once_per_node_and_handed_over(store):
    uri, client, exp = store
    with mlflow.start_run(experiment_id=exp) as run:
        spec = SystemMetrics(uri, run.info.run_id, interval_s=1.0)
        with sampling(spec):  # the first worker of this node samples ...
            with sampling(spec):  # ... a second one waits
                time.sleep(3.5)
            time.sleep(0.5)
        with sampling(spec):  # a later worker of the node takes over and continues the steps
            time.sleep(2.5)
    key = f"system/{node_label()}/cpu_utilization_percentage"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
    assert len(steps) >= 3 and steps == sorted(set(steps)) == list(range(len(steps)))
    assert any(k.startswith(f"system/{node_label()}/system_memory_usage") for k in client.get_run(
        run.info.run_id).data.metrics)


def test_progress_lines_have_a_bar_and_an_eta_and_no_carriage_returns(capsys):
    p = Progress("train/A", "epoch 2/10", 200, every_s=0.0, unit="steps")
    p.t0 -= 20.0  # 20 s in
    p.update(80, "loss 1.9300")
    err = capsys.readouterr().err
    assert "\r" not in err and err.startswith("  [train/A] epoch 2/10 [########------------]  40% 80/200 steps")
    assert "ETA 0:30" in err and "0:20 elapsed" in err and err.rstrip().endswith("| loss 1.9300")
    Progress("x", "y", 10, every_s=0.0, active=False).update(10)
    assert capsys.readouterr().err == ""
