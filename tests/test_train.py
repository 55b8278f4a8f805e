"""train/<net> stages on tiny data (CPU, 2 Ray Train workers): learning, init from A,
the plateau schedule, worker and driver failures with exact resumption, two nodes,
and the import of torchvision weights."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import DemoDataConfig, NetPlan, ShardConfig, TrainConfig
from pipeline.dag import TrainInputs, TrainSection
from pipeline.stage import StageContext, TrackingInfo
from pipeline.storage import StageOutput, Store, write_json
from stages import train as T
from tests.conftest import ROOT, TWO_NODE_CLUSTER
from tests.faults import HangAfterEpoch, KillAt, RecordRows
from vgg.artifacts import Augmentation, Shards, TrainedNet, write_augmentation
from vgg.data import demo as demo_data
from vgg.data.augmentation import AugmentSpec
from pipeline.sharding import shard
from vgg.models import build_vgg
from pipeline import ray_train
from vgg.training import loop
from vgg.artifacts import write_model
from vgg.training.checkpoints import initial_model
from vgg.training.schedule import PlateauSchedule, schedule_of
from vgg.training.steps import topk_hits

# 51 training images: shares of 25 and 26 at 5 images per worker -> 5 and 6 batches,
# so rank 0 pads its epoch with one empty step; 15 validation images -> 7 and 8.
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 17, 5
CROP, SCALE = 32, 36


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(ray_session, tmp_path_factory):
    """Shard and augment outputs of a tiny demo set, and an MLflow store."""
    tmp = tmp_path_factory.mktemp("train")
    demo = DemoDataConfig(num_classes=CLASSES, train_per_class=TRAIN_PER_CLASS,
                          val_per_class=VAL_PER_CLASS, min_side=36, max_side=60, seed=1)
    demo_data.generate(pafs.LocalFileSystem(), str(tmp / "images"), demo)
    store = Store(str(tmp / "work"))
    shard_out = store.begin("shard", "k")
    manifest = shard(str(tmp / "images"), shard_out, ShardConfig(rows_per_shard=10), log=lambda m: None)
    write_json(shard_out.fs, shard_out.join("manifest.json"), manifest)
    stats = shard_out.read_json("stats.json")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    exp = MlflowClient(uri).create_experiment("train-tests")
    return SimpleNamespace(tmp=tmp, shard=shard_out, stats=stats, uri=uri, exp=exp,
                           augment=augment_output(tmp, stats, CROP))


def augment_output(tmp: Path, stats: dict, crop: int):
    """An augment stage output: spec.json (what the augment stage will write)."""
    out = Store(str(tmp / "work")).begin("augment", f"crop{crop}")
    spec = AugmentSpec.from_stats(stats, crop=crop, device="cpu", num_threads=1)
    write_augmentation(out, spec)
    return out


def section(name: str = "A", arch: str = "A", epochs: int = 2, init="glorot", **net) -> TrainSection:
    """A tiny recipe: width 1/8, global batch 10 on 2 workers x 1 CPU, keep 1 (+ the latest)."""
    t = TrainConfig(batch_size=10, width=0.125, num_workers=2, cpus_per_worker=1.0,
                    max_epochs=epochs, keep_checkpoints=1, max_failures=2, log_every=0, seed=0)
    return TrainSection(t, NetPlan(arch=arch, scale=SCALE, lr=0.01, init=init, epochs=epochs, **net), name)


class Job:
    """One train stage run as the runner sets it up: config, typed inputs, and a context
    (fresh output dir, scratch per key, an MLflow run)."""

    def __init__(self, config: TrainSection, inputs: TrainInputs, ctx: StageContext):
        self.config, self.inputs, self.ctx = config, inputs, ctx
        self.out, self.scratch, self.tracking = ctx.out, ctx.scratch, ctx.tracking

    def args(self, callbacks=()) -> tuple:
        return self.config, self.inputs, self.ctx, list(callbacks)

    def run(self, callbacks=()):
        return T.run(*self.args(callbacks))


def make_ctx(data, work: Path, sec: TrainSection, init: StageOutput | None = None, augment=None) -> Job:
    store, sid, key = Store(str(work)), f"train/{sec.name}", "key0"
    run = MlflowClient(data.uri).create_run(data.exp, run_name=sid)
    inputs = TrainInputs(Shards(data.shard), Augmentation(augment or data.augment),
                         TrainedNet(init) if init is not None else None)
    ctx = StageContext(sid, store.begin(sid, key), TrackingInfo(data.uri, data.exp, run.info.run_id), key,
                       store.scratch(sid, key))
    return Job(sec, inputs, ctx)


def load_model(out: StageOutput):
    return TrainedNet(out).load()


def optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def checkpoint_dirs(ctx: Job, epoch: str = "*") -> list[Path]:
    """The checkpoint folders of every Ray run of the stage's scratch dir, oldest run first."""
    return sorted(Path(ctx.scratch.path).glob(f"{ray_train.RUN_PREFIX}-*/epoch_{epoch}"))


def checkpoint_state(ctx: Job, epoch: int) -> dict:
    path = checkpoint_dirs(ctx, f"{epoch:04d}")[-1] / ray_train.STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True)


def history(ctx: Job) -> dict:
    return json.loads(Path(ctx.out.join("history.json")).read_text())


def assert_same_weights(a: dict, b: dict) -> float:
    """Exact equality of two state dicts; returns the max abs difference (0.0)."""
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff == 0.0, f"weights differ by up to {diff}"
    return diff


@pytest.fixture(scope="module")
def trained_a(data, tmp_path_factory):
    """Net A trained for 2 epochs on 2 workers, uninterrupted: the reference run."""
    ctx = make_ctx(data, tmp_path_factory.mktemp("a") / "work", section())
    return SimpleNamespace(ctx=ctx, result=ctx.run())


# ---------------------------------------------------------------- the schedule
def test_plateau_schedule_divides_at_the_right_epochs_at_most_three_times():
    accs = [0.10, 0.20, 0.20, 0.2005, 0.30, 0.30, 0.30, 0.30, 0.30, 0.30, 0.30, 0.30]
    # e0, e1 improve; e2, e3 do not (+0.0005 is below the threshold) -> drop after e3;
    # e4 improves; e5, e6 flat -> drop after e6; e7, e8 -> drop after e8; then no more.
    s = PlateauSchedule(optimizer(0.01), factor=0.1, patience=2, threshold=1e-3, max_drops=3)
    lrs, dropped = [], []
    for epoch, acc in enumerate(accs):
        lrs.append(s.lr)
        if s.step(acc, epoch):
            dropped.append(epoch)
    assert dropped == [3, 6, 8] == s.drops
    assert lrs == pytest.approx([1e-2] * 4 + [1e-3] * 3 + [1e-4] * 2 + [1e-5] * 3)

    # state_dict round trip mid-way continues identically (what resuming relies on, with the
    # optimizer's state, which holds the lr)
    a = PlateauSchedule(optimizer(0.01), 0.1, 2, 1e-3, 3)
    for epoch, acc in enumerate(accs[:5]):
        a.step(acc, epoch)
    b = PlateauSchedule(optimizer(0.01), 0.1, 2, 1e-3, 3)
    b.optimizer.load_state_dict(a.optimizer.state_dict())  # a resume restores both (ray_train._restore)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for epoch, acc in enumerate(accs[5:], 5):
        assert a.step(acc, epoch) == b.step(acc, epoch)
    assert a.state_dict() == b.state_dict()



def test_a_net_may_override_the_plateau_patience():
    t = TrainConfig(lr_patience=1, lr_threshold=0.005, lr_factor=0.1, max_lr_drops=3)
    own = schedule_of(optimizer(0.02), t, NetPlan(arch="B", lr=0.02, lr_patience=2))
    default = schedule_of(optimizer(0.01), t, NetPlan(arch="A", lr=0.01))
    assert (own.lr, own.patience, own.threshold) == (0.02, 2, 0.005)
    assert (default.lr, default.patience) == (0.01, 1)
    accs = [0.50, 0.52, 0.522, 0.53, 0.532, 0.534]  # +0.2 points is not an improvement
    assert [e for e, a in enumerate(accs) if default.step(a, e)] == [2, 4, 5]
    assert [e for e, a in enumerate(accs) if own.step(a, e)] == [5]


# ---------------------------------------------------------------- training
@pytest.mark.slow
def test_a_trains_two_epochs_on_two_workers(trained_a, data):
    ctx, result = trained_a.ctx, trained_a.result
    h = history(ctx)
    epochs = h["epochs"]
    assert [r["epoch"] for r in epochs] == [0, 1] and h["resumes"] == []
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    assert all(r["train_images"] == CLASSES * TRAIN_PER_CLASS for r in epochs)  # every image once
    assert all(r["val_images"] == CLASSES * VAL_PER_CLASS for r in epochs)
    assert sorted(w["rank"] for w in h["workers"]) == [0, 1]

    # model.pt holds the best epoch (max val accuracy, the later one on ties)
    best = max(epochs, key=lambda r: (r["val_top1_acc"], r["epoch"]))
    net, meta = load_model(ctx.out)
    assert meta["epoch"] == best["epoch"] and meta["val_top1_err"] == pytest.approx(best["val_top1_err"])
    assert (meta["arch"], meta["width"], meta["crop"], meta["num_classes"]) == ("A", 0.125, CROP, CLASSES)
    assert meta["classes"] == data.shard.read_json("classes.json") and meta["net"] == "A"
    assert meta["config"]["train"]["batch_size"] == 10 and meta["config"]["net"]["arch"] == "A"
    assert_same_weights(net.state_dict(), checkpoint_state(ctx, best["epoch"])["model"])

    # Ray Train kept the best checkpoint and the latest (keep_checkpoints=1)
    kept = {p.name for p in checkpoint_dirs(ctx)}
    assert kept == {f"epoch_{best['epoch']:04d}", "epoch_0001"}
    last = checkpoint_state(ctx, 1)
    assert {"model", "optimizer", "schedule", "epoch", "progress", "config"} <= last.keys()
    assert last["config"]["name"] == "A" and last["progress"]["best"]["epoch"] == best["epoch"]

    # outputs, StageResult, MLflow (rank 0 alone logs: one value per epoch and metric)
    assert Path(ctx.out.join("learning_curves.png")).read_bytes()[:4] == b"\x89PNG"
    assert {"history.json", "learning_curves.png", "init.json"} <= set(result.artifacts)
    # the net goes to MLflow as a logged model (the runner logs result.model), with the
    # selected epoch's validation errors measured on the val split it names
    assert_same_weights(result.model.net.state_dict(), net.state_dict())
    assert result.model.step == best["epoch"] and result.model.input_example.shape == (2, 3, CROP, CROP)
    assert result.model.metrics["best_val_top1_err"] == result.metrics["best_val_top1_err"]
    assert [(d.name, d.context, d.digest) for d in result.datasets] == [
        ("shards/train", "training", data.shard.key), ("shards/val", "validation", data.shard.key)]
    assert result.model.dataset is result.datasets[1] and result.datasets[0].rows > 0
    assert result.params["per_worker_batch"] == 5 and result.metrics["best_epoch"] == best["epoch"]
    assert result.manifest["model"]["bytes"] == os.path.getsize(ctx.out.join("model.pt"))
    client = MlflowClient(data.uri)
    for key in ("train_loss", "val_top1_err", "train_top1_err", "lr", "images_per_s", "epoch_seconds"):
        assert sorted(m.step for m in client.get_metric_history(ctx.tracking.run_id, key)) == [0, 1]
    assert client.get_metric_history(ctx.tracking.run_id, "val_top5_err") == []  # 3 classes < 5
    # the checkpoint score is the accuracy; the collapse check sees every validation image
    for r in epochs:
        assert r["val_top1_acc"] == pytest.approx(1 - r["val_top1_err"])
        assert r["val_health"]["num_classes"] == CLASSES
        assert r["val_health"]["classes_predicted"] <= CLASSES
        assert r["val_health"]["top1_error"] == pytest.approx(r["val_top1_err"])  # both workers' hits
    assert result.tags["collapsed"] in ("true", "false")
    assert result.manifest["val_health"] == best["val_health"]


def test_epoch_record_scores_accuracy_and_judges_collapse():
    k, n = 4, 8
    probs = torch.full((n, k), 0.25, dtype=torch.float64)  # a constant output: class 0 for all
    labels = torch.arange(n) % k
    val = torch.cat([torch.tensor([n, 2.0, 8.0], dtype=torch.float64),
                     torch.bincount(torch.zeros(n, dtype=torch.long), minlength=k).double(),
                     probs.sum(0), (probs * probs).sum(0),
                     torch.bincount(labels, minlength=k).double(), torch.tensor([2.0, 0, 0, 0])])
    train = torch.tensor([4.0, n, 3.0, 8.0], dtype=torch.float64)
    rec = loop.epoch_record(0, 0.01, train, val, 1.0, 2.0, k)
    assert rec["val_top1_acc"] == 0.25 and rec["val_top1_err"] == 0.75
    assert rec["val_top5_err"] is None  # 4 classes: top-5 cannot miss
    assert rec["val_health"]["collapsed"] and rec["val_health"]["classes_predicted"] == 1
    assert rec["val_health"]["top1_error"] == 0.75 and rec["val_health"]["unlearnt"] == [0, 1, 2, 3]


def test_hits_count_non_finite_logits_as_misses():
    logits = torch.tensor([[float("nan"), 1.0], [0.0, 1.0]])
    assert [h.item() for h in topk_hits(logits, torch.tensor([1, 1]))] == [1.0, 1.0]


def test_b_starts_from_a(trained_a, data, tmp_path):
    """B (epochs 0: the starting state is the result) takes A's first four convs (at the same
    block positions) and its three FC layers; everything else is B's own random init."""
    a_net, _ = load_model(trained_a.ctx.out)
    ctx = make_ctx(data, tmp_path / "work", section("B", "B", epochs=0, init={"from_A": "train/A"}),
                   trained_a.ctx.out)
    result = ctx.run()
    b_net, meta = load_model(ctx.out)
    copied = json.loads(Path(ctx.out.join("init.json")).read_text())["copied"]
    assert result.params["init_copied_tensors"] == len(copied) == 2 * (4 + 3)
    a_state, b_state = a_net.state_dict(), b_net.state_dict()
    # A: features.{0,3,6,8} are conv1_1, conv2_1, conv3_1, conv3_2; in B those are
    # features.{0,5,10,12}; FC1-3 are classifier.{0,3,6} in both.
    pairs = {"features.0": "features.0", "features.5": "features.3", "features.10": "features.6",
             "features.12": "features.8", "classifier.0": "classifier.0", "classifier.3": "classifier.3",
             "classifier.6": "classifier.6"}
    assert sorted(copied) == sorted(f"{b}.{p}" for b in pairs for p in ("weight", "bias"))
    for b_key, a_key in pairs.items():
        for p in ("weight", "bias"):
            assert torch.equal(b_state[f"{b_key}.{p}"], a_state[f"{a_key}.{p}"])
    others = [k for k in b_state if k not in copied and k.endswith("weight")]
    assert others and all(not torch.equal(b_state[k], a_state.get(k, torch.empty(0))) for k in others)
    assert meta["origin"] == "initial" and meta["epoch"] is None



@pytest.mark.parametrize("rest", [None, "random", "glorot"])
def test_from_a_rest_initialises_the_other_layers(tmp_path, rest):
    """`rest` picks the init of the layers A does not provide: N(0, init_std^2) by default
    (the paper), or Glorot; the copied ones are A's either way (no Ray needed)."""
    sec = section("B", "B", init={"from_A": "train/A", **({"rest": rest} if rest else {})})
    t = sec.train
    a_net = build_vgg("A", num_classes=CLASSES, width=t.width, crop=CROP, init="glorot")
    a_out = Store(str(tmp_path)).begin("train/A", "k")
    write_model(a_out, a_net, {"epoch": 3})
    net, info = initial_model(sec.train, sec.net, CLASSES, CROP, TrainedNet(a_out))
    torch.manual_seed(t.seed)
    ref = build_vgg("B", num_classes=CLASSES, width=t.width, crop=CROP, dropout=t.dropout,
                      init="glorot" if rest == "glorot" else "normal", init_std=t.init_std).state_dict()
    state, a_state = net.state_dict(), a_net.state_dict()
    assert len(info["copied"]) == 14 and info["source_epoch"] == 3
    a_key = {"features.5": "features.3", "features.10": "features.6", "features.12": "features.8"}
    for k in info["copied"]:
        layer, p = k.rsplit(".", 1)
        assert torch.equal(state[k], a_state[f"{a_key.get(layer, layer)}.{p}"])
    others = [k for k in state if k not in info["copied"]]
    assert others and all(torch.equal(state[k], ref[k]) for k in others)
    conv1_2 = state["features.2.weight"]  # 4 -> 4 channels at width 1/8: fan_in = fan_out = 36
    if rest == "glorot":
        assert conv1_2.abs().max() <= (6 / 72) ** 0.5
    else:
        assert abs(conv1_2.std().item() - t.init_std) < 0.3 * t.init_std


# ---------------------------------------------------------------- failures
@pytest.mark.slow
def test_killed_worker_restarts_from_the_last_checkpoint(trained_a, data, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    ctx = make_ctx(data, tmp_path / "work", section())
    ctx.run([KillAt(1, 2, 1, str(marker))])  # epoch 1, step 2, rank 1: mid-epoch
    assert marker.exists()
    h = history(ctx)
    assert [r["epoch"] for r in h["epochs"]] == [0, 1]  # epoch 0 not repeated
    assert [r["after_epoch"] for r in h["resumes"]] == [0]  # restored from epoch 0's checkpoint
    # the restart is exact: same final weights as the uninterrupted run
    assert_same_weights(checkpoint_state(ctx, 1)["model"], checkpoint_state(trained_a.ctx, 1)["model"])


DRIVER = """
import pickle, sys
sys.path.insert(0, sys.argv[3])
import ray
from ray._private import ray_constants
ray_constants.ENABLE_RAY_CLUSTER = False  # the cluster is bound to 127.0.0.1 (conftest)
ray.init(address=sys.argv[2], log_to_driver=False)
from stages.train import run
run(*pickle.load(open(sys.argv[1], "rb")))  # config, inputs, ctx, callbacks
"""


def has_complete(ctx: Job, epoch: int) -> bool:
    """Whether a complete checkpoint of `epoch` is on disk (what a rerun resumes from)."""
    return any(c.epoch == epoch for c in ray_train.scan_checkpoints(ctx.scratch)[0])


@pytest.mark.slow
def test_interrupted_stage_resumes_at_the_next_epoch_exactly(trained_a, data, tmp_path, ray_session):
    """Kill the driver (its whole process group) the moment epoch 0's checkpoint is complete
    on disk (before Ray may have recorded it in its snapshot: such a kill used to lose the
    epoch), run the stage again: it resumes at epoch 1 and ends with bit-identical weights
    to the uninterrupted run (fixed seed; data order, augmentation and dropout depend only
    on (seed, epoch, rank), weights and optimizer state are identical on all ranks)."""
    sec = section()
    first = make_ctx(data, tmp_path / "work", sec)
    # rank 0 waits after epoch 0's checkpoint
    (tmp_path / "ctx.pkl").write_bytes(pickle.dumps(first.args([HangAfterEpoch(0)])))
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / "ctx.pkl"),
                             ray_session.get_runtime_context().gcs_address, str(ROOT)],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "driver.log", "wb"))
    try:
        deadline = time.monotonic() + 240
        while not has_complete(first, 0):
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "epoch 0 never finished"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not has_complete(first, 1)
    killed_runs = {p.parent.name for p in checkpoint_dirs(first)}

    again = make_ctx(data, tmp_path / "work", sec)  # same key -> same scratch, new output dir
    again.run()
    h = history(again)
    assert [r["epoch"] for r in h["epochs"]] == [0, 1]
    assert [r["after_epoch"] for r in h["resumes"]] == [0]
    assert _same_but_timing(h, trained_a.ctx)  # losses, errors, lrs: all equal
    assert_same_weights(checkpoint_state(again, 1)["model"], checkpoint_state(trained_a.ctx, 1)["model"])
    ref_opt, opt = checkpoint_state(trained_a.ctx, 1)["optimizer"], checkpoint_state(again, 1)["optimizer"]
    assert all(torch.equal(ref_opt["state"][i]["momentum_buffer"], opt["state"][i]["momentum_buffer"])
               for i in ref_opt["state"])
    # the rerun wrote into a Ray run folder of its own (the killed run's processes cannot)
    assert {p.parent.name for p in checkpoint_dirs(again, "0001")}.isdisjoint(killed_runs)
    # the new MLflow run got the epochs of the killed one too
    steps = MlflowClient(data.uri).get_metric_history(again.tracking.run_id, "val_top1_err")
    assert sorted(m.step for m in steps) == [0, 1]


@pytest.mark.slow
def test_a_rerun_resumes_from_the_newest_complete_checkpoint(trained_a, data, tmp_path, capfd):
    """The checkpoints a kill or a full disk leaves: a checkpoint folder written partly (a
    kill while it was copied), Ray's snapshot empty (Ray writes it in place), the newest
    checkpoint damaged afterwards. Each rerun resumes from the newest complete checkpoint,
    names what it skipped, and trains only the epochs after it."""
    sec = section(epochs=3)
    job = make_ctx(data, tmp_path / "work", sec)
    shutil.copytree(trained_a.ctx.scratch.path, job.scratch.path)  # epochs 0-1 done, 2 epochs planned then
    run_dir = checkpoint_dirs(job, "0001")[-1].parent
    partial = run_dir / "epoch_0002"
    shutil.copytree(run_dir / "epoch_0001", partial)
    data_len = (partial / ray_train.STATE_FILE).stat().st_size
    with open(partial / ray_train.STATE_FILE, "r+b") as f:
        f.truncate(data_len // 2)  # killed half way through the copy
    (run_dir / "checkpoint_manager_snapshot.json").write_text("")  # what a full disk left once
    job.run()
    err = capfd.readouterr().err
    assert "skipping the checkpoint" in err and "epoch_0002" in err and "resuming after epoch 2" in err
    h = history(job)
    assert [r["epoch"] for r in h["epochs"]] == [0, 1, 2] and [r["after_epoch"] for r in h["resumes"]] == [1]

    # the newest checkpoint (this rerun's epoch 2) damaged: the next rerun takes epoch 1's
    newest = checkpoint_dirs(job, "0002")[-1] / ray_train.STATE_FILE
    newest.write_bytes(newest.read_bytes()[:-100])
    again = make_ctx(data, tmp_path / "work", sec)
    again.run()
    err = capfd.readouterr().err
    assert f"skipping the checkpoint {newest.parent}" in err and "resuming after epoch 2" in err
    h = history(again)
    # the resumed state is epoch 1's of the first run: its lineage has this one resume
    assert [r["epoch"] for r in h["epochs"]] == [0, 1, 2] and [r["after_epoch"] for r in h["resumes"]] == [1]


def _same_but_timing(h: dict, ref_ctx: Job) -> bool:
    """Epoch records equal apart from the wall-clock fields."""
    drop = ("images_per_s", "epoch_seconds")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]  # noqa: E731
    return strip(h["epochs"]) == strip(history(ref_ctx)["epochs"])


# ---------------------------------------------------------------- two nodes
TWO_NODES = """
import os, pickle, sys
sys.path.insert(0, sys.argv[2])
""" + TWO_NODE_CLUSTER + """from pipeline.runner import check_shared_work_dir
assert check_shared_work_dir(sys.argv[3]) == 2  # both nodes see the (same machine's) work_dir
from stages.train import run
try:
    run(*pickle.load(open(sys.argv[1], "rb")))  # config, inputs, ctx, callbacks
finally:
    import ray
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
def test_two_nodes_one_worker_each_use_both_shares(data, tmp_path):
    """A simulated 2-node cluster (1 CPU each, in a subprocess: one cluster per process):
    the two workers land on different nodes and together see every training image once."""
    debug = tmp_path / "rows"
    ctx = make_ctx(data, tmp_path / "work", section(epochs=1))
    (tmp_path / "ctx.pkl").write_bytes(pickle.dumps(ctx.args([RecordRows(str(debug))])))
    done = subprocess.run([sys.executable, "-c", TWO_NODES, str(tmp_path / "ctx.pkl"), str(ROOT),
                           str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    workers = history(ctx)["workers"]
    # different nodes (Ray Train's node_rank groups workers by IP: both nodes are 127.0.0.1 here)
    assert sorted(w["rank"] for w in workers) == [0, 1] and len({w["node_id"] for w in workers}) == 2
    seen = [json.loads(p.read_text()) for p in debug.glob("epoch0_rank*.json")]
    assert sorted(s["rank"] for s in seen) == [0, 1]
    assert {s["node_id"] for s in seen} == {w["node_id"] for w in workers}
    rows = sorted(r for s in seen for r in s["rows"])
    assert rows == list(range(CLASSES * TRAIN_PER_CLASS))  # the whole split, each image once
    assert sorted(len(s["rows"]) for s in seen) == [25, 26] and {s["steps"] for s in seen} == {6}


# ---------------------------------------------------------------- imported weights
def test_torchvision_weights_are_imported_without_training(data, tmp_path):
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.vgg11(num_classes=CLASSES).state_dict()
    torch.save(state, tmp_path / "vgg11.pth")
    augment = augment_output(tmp_path, data.stats, 224)  # torchvision's FC1 sees 7x7: crop 224
    sec = section("A_tv", epochs=0, init="random", weights=str(tmp_path / "vgg11.pth"))
    ctx = make_ctx(data, tmp_path / "work", sec, augment=augment)
    result = ctx.run()
    net, meta = load_model(ctx.out)
    assert (meta["arch"], meta["width"], meta["crop"], meta["num_classes"]) == ("A", 1.0, 224, CLASSES)
    assert meta["origin"].startswith("imported")
    for k, v in state.items():
        assert torch.equal(net.state_dict()[k], v), k
    # ~0.5 GB: logged as an MLflow model like any other net (result.model), not as a file
    assert "model.pt" not in result.artifacts and len(result.manifest["model"]["sha256"]) == 64
    assert result.model is not None and result.model.net.num_classes == CLASSES
    assert result.manifest["model"]["bytes"] == os.path.getsize(ctx.out.join("model.pt"))

    # 4 classes (the class count is checked first: the other tensors may be dummies)
    four = {k: torch.zeros(1) for k in state} | {"classifier.6.weight": torch.zeros(4, 4096)}
    torch.save(four, tmp_path / "vgg11_4.pth")
    with pytest.raises(ValueError, match="has 4 classes, the dataset has 3"):
        make_ctx(data, tmp_path / "w2", section("A_tv", epochs=0, init="random",
                                                weights=str(tmp_path / "vgg11_4.pth")), augment=augment).run()
    with pytest.raises(ValueError, match=r"crop 224 .*augment.crop is 32"):
        make_ctx(data, tmp_path / "w3", sec).run()


def test_the_trainer_runs_with_a_fast_controller_poll_unless_the_user_chose_one(monkeypatch):
    """Ray Train's controller polls every 2 s by default, and a worker's report waits for the
    poll that takes the previous one: the pipeline's runs poll every ray_train.POLL_S (Ray
    Train passes the variable on from the driver's environment at fit()); a user's value wins."""
    seen = []
    fake = SimpleNamespace(fit=lambda: seen.append(os.environ.get(ray_train.POLL_ENV)) or "result")
    monkeypatch.delenv(ray_train.POLL_ENV, raising=False)
    assert ray_train.fit_trainer(fake) == "result"
    assert seen == [str(ray_train.POLL_S)] and float(seen[0]) < 2.0
    assert ray_train.POLL_ENV not in os.environ  # restored afterwards
    monkeypatch.setenv(ray_train.POLL_ENV, "3")
    ray_train.fit_trainer(fake)
    assert seen[-1] == "3" and os.environ[ray_train.POLL_ENV] == "3"


def _imports_after(code: str, *modules: str) -> dict[str, bool]:
    """Which of `modules` a fresh interpreter has imported after running `code`."""
    probe = code + f"\nimport sys; print(' '.join(str(m in sys.modules) for m in {list(modules)!r}))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(zip(modules, (w == "True" for w in out.stdout.split()[-len(modules):])))


def test_ray_trains_controller_does_not_import_the_worker_code(tmp_path):
    """Ray Train hands train_loop_config to its controller inside the run context, and the
    controller never runs the training function: the plan travels pickled, so that the
    controller's process does not import pipeline.ray_train and MLflow (0.7 s of CPU in every
    training stage here, before any worker starts); the workers get the plan back."""
    plan = ray_train.WorkerPlan("train/A", SimpleNamespace(train=TrainConfig()), str(tmp_path), {}, 3,
                                str(tmp_path / "init.pt"), 1, "sqlite:///x.db", "run-id")
    t = ray_train.trainer(plan, SimpleNamespace(uri=str(tmp_path / "scratch")), "run")
    assert pickle.loads(t.train_loop_config["plan"]) == plan
    blob = tmp_path / "context.pkl"
    blob.write_bytes(pickle.dumps(t.train_run_context))
    seen = _imports_after(f"import pickle; pickle.loads(open({str(blob)!r}, 'rb').read())",
                          "pipeline.ray_train", "mlflow", "vgg.training.loop")
    assert seen == {"pipeline.ray_train": False, "mlflow": False, "vgg.training.loop": False}


def test_a_logged_nets_requirements_do_not_import_torchvision():
    """The requirements pin torch and torchvision from the installed metadata: importing
    torchvision (and with it torch._dynamo) cost the driver's first logged net about 1.5 s."""
    seen = _imports_after("from pipeline.tracking import requirements\n"
                          "reqs = requirements()\n"
                          "assert any(r.startswith('torchvision==') for r in reqs), reqs",
                          "torchvision", "torch._dynamo")
    assert seen == {"torchvision": False, "torch._dynamo": False}
