"""The train/<net> stages: one net of the training plan on Ray Train (paper section 3.1).

Recipe (Sec. 3.1): mini-batch SGD on the multinomial logistic loss, momentum 0.9,
weight decay 5e-4, dropout 0.5 on FC1/FC2, lr 1e-2 divided by 10 when the
validation accuracy stops improving (at most 3 times), a fixed epoch budget.
Deeper nets start from A's first four convs and three FCs (`init: {from_A: ...}`),
S=384 / jittered nets from a whole same-architecture net (`init: {full: ...}`).

How it runs: a `TorchTrainer` job with `train.num_workers` DDP workers
(`prepare_model`). Each worker feeds itself from its own DALI loader over its
share of the training shards (`stages.augment.build_train_loader`, shares
differ by at most one image); the global batch `train.batch_size` is split
across the workers. Every epoch ends with a single-scale centre-crop
validation (sharded, counts all-reduced) that drives the lr schedule, and a
checkpoint (rank 0) reported by every rank. Ray Train keeps the best
`keep_checkpoints` by validation top-1 accuracy plus the latest, restarts
failed workers from the latest checkpoint (`max_failures`), and - because the
run lives in the stage's scratch directory under a fixed name - resumes an
interrupted stage at the next epoch when it runs again with the same cache key.

Outputs: `model.pt` (the best epoch's weights, see `save_model`), `history.json`,
`learning_curves.png`, `init.json` (which tensors came from the source net).
`weights: <torchvision state_dict>` imports released weights instead of training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import posixpath
import signal
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from pipeline.config import NetPlan, TrainConfig, to_dict
from pipeline.errors import TrackingServerLost, UserError
from pipeline.stage import StageContext, StageResult
from pipeline.storage import StageOutput, exists, read_bytes, resolve_uri, write_bytes, write_json
from stages.metrics import Health, health_of, meaningful_topk
from stages.steps import TOPK, Precision, sgd_step, topk_hits
from stages.vgg import VGG, build_vgg, init_from, load_full, map_torchvision_state

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"  # inside each Ray Train checkpoint
INIT_FILE = "init_state.pt"  # in the scratch directory: the starting weights
OUTCOME_FILE = "worker_outcome.json"  # in the scratch directory: see _tell_driver
RUN_NAME = "ray_train"  # fixed: (scratch dir, name) identifies the run to resume
ARTIFACT_LIMIT = 50 * 2**20  # model.pt is an MLflow artifact only below this size
SCORE = "val_top1_acc"  # the checkpoint score (higher is better)

# Test-only fault hooks, read by the driver from its environment (workers may not
# share it) and handed to the workers with the plan.
KILL_ENV = "VGG_TRAIN_KILL_AT"  # "epoch:step:rank:marker": SIGKILL that worker once
HANG_ENV = "VGG_TRAIN_HANG_AFTER_EPOCH"  # "k": rank 0 stops after epoch k's checkpoint
DEBUG_ENV = "VGG_TRAIN_DEBUG_DIR"  # dir: every rank writes the rows it trained on per epoch


class TrainingDiverged(UserError, RuntimeError):
    """The loss or the weights became non-finite: nothing is published."""


# ---------------------------------------------------------------- lr schedule
class PlateauSchedule:
    """lr / factor when the validation accuracy has not improved by more than `threshold`
    for `patience` epochs in a row, at most `max_drops` times (Sec. 3.1: "decreased by a
    factor of 10 when the validation set accuracy stopped improving"; 3 times).

    An improvement resets the count; a drop resets it too (the new lr gets `patience`
    epochs of its own). Pure: `step` sees the accuracies, nothing else.
    """

    def __init__(self, lr: float, factor: float = 0.1, patience: int = 2,
                 threshold: float = 1e-3, max_drops: int = 3):
        self.lr, self.factor, self.patience = lr, factor, patience
        self.threshold, self.max_drops = threshold, max_drops
        self.best = -math.inf
        self.bad_epochs = 0
        self.drops: list[int] = []  # epochs after which the lr was divided

    def step(self, accuracy: float, epoch: int) -> bool:
        """Record one epoch's validation accuracy; True if the lr was divided after it."""
        if accuracy > self.best + self.threshold:
            self.best, self.bad_epochs = accuracy, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs < self.patience or len(self.drops) >= self.max_drops:
            return False
        self.lr *= self.factor
        self.bad_epochs = 0
        self.drops.append(epoch)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "best": self.best, "bad_epochs": self.bad_epochs, "drops": list(self.drops)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.lr, self.best = float(state["lr"]), float(state["best"])
        self.bad_epochs, self.drops = int(state["bad_epochs"]), list(state["drops"])


def schedule_of(t: TrainConfig, net: NetPlan) -> PlateauSchedule:
    """The plateau schedule of one net: the recipe's, with the net's own lr and patience."""
    patience = t.lr_patience if net.lr_patience is None else net.lr_patience
    return PlateauSchedule(net.lr, t.lr_factor, patience, t.lr_threshold, t.max_lr_drops)


# ---------------------------------------------------------------- model files
def save_model(out: StageOutput, net: VGG, meta: Mapping[str, Any]) -> tuple[int, str]:
    """Write model.pt = {"state_dict", "arch", "width", "crop", "num_classes", "batch_norm",
    **meta} into `out`; returns (bytes, sha256)."""
    payload = {"state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
               "arch": net.name, "width": net.width, "crop": net.crop,
               "num_classes": net.num_classes, "batch_norm": net.batch_norm, **meta}
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    write_bytes(out.fs, out.join(MODEL_FILE), data)
    return len(data), hashlib.sha256(data).hexdigest()


def load_model(output: StageOutput | str) -> tuple[VGG, dict[str, Any]]:
    """(net in eval mode, meta) from a train stage output (or a model.pt path / URI).

    meta holds everything of model.pt but the weights: arch, width, crop, num_classes,
    batch_norm, classes, net, config, epoch, val_top1_err, val_top5_err.
    """
    if isinstance(output, StageOutput):
        fs, path = output.fs, output.join(MODEL_FILE)
    else:
        fs, path = resolve_uri(output)
        if not path.endswith(".pt"):
            path = posixpath.join(path, MODEL_FILE)
    payload = torch.load(io.BytesIO(read_bytes(fs, path)), map_location="cpu", weights_only=True)
    state = payload.pop("state_dict")
    dropout = payload.get("config", {}).get("train", {}).get("dropout", 0.5)
    net = empty_net(payload["arch"], num_classes=payload["num_classes"], width=payload["width"],
                    crop=payload["crop"], dropout=dropout, batch_norm=payload.get("batch_norm", False))
    load_full(net, state)
    return net.eval(), payload


def empty_net(arch: str, **options: Any) -> VGG:
    """`build_vgg(arch, **options)` with uninitialised weights, to load a state into
    (skips the random init: seconds for a full-size net)."""
    with torch.device("meta"):
        net = build_vgg(arch, **options)
    return net.to_empty(device="cpu")


def initial_model(section: Mapping[str, Any], num_classes: int, crop: int,
                  inputs: Mapping[str, StageOutput]) -> tuple[VGG, dict[str, Any]]:
    """The net a train stage starts from, and a record of how it was initialised.

    "random": N(0, init_std^2) weights, zero biases; "glorot": Xavier-uniform (both seeded
    by train.seed); {from_A: train/X}: X's first four convs and three FCs copied over the
    random init (Sec. 3.1), which is N(0, init_std^2) or, with `rest: glorot`, Xavier;
    {full: train/X}: all of X's weights (same arch).
    """
    t, net_plan = section["train"], section["net"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        net = build_vgg(net_plan.arch, num_classes=num_classes, width=t.width, crop=crop,
                        dropout=t.dropout, batch_norm=t.batch_norm,
                        init=net_plan.random_init,
                        init_std=t.init_std)
    info: dict[str, Any] = {"init": net_plan.init if isinstance(net_plan.init, str) else dict(net_plan.init),
                            "copied": []}
    source = net_plan.init_source
    if source is None:
        return net, info
    src_net, meta = load_model(inputs[source])
    if "from_A" in net_plan.init:
        info["copied"] = init_from(net, src_net.state_dict(), meta["arch"])
    else:
        load_full(net, src_net.state_dict())
        info["copied"] = list(net.state_dict())
    info.update(source=source, source_uri=inputs[source].uri, source_epoch=meta.get("epoch"))
    return net, info


def import_weights(uri: str, arch: str, classes: list[str], crop: int,
                   dropout: float = 0.5) -> VGG:
    """A net of `arch` at width 1.0 holding a torchvision VGG state_dict (file path or URI).

    num_classes comes from the checkpoint and must equal the dataset's; the crop follows
    from FC1's input size (C5 x (crop/32)^2, 224 for torchvision) and must equal `crop`.
    """
    fs, path = resolve_uri(uri)
    if not exists(fs, path):
        raise FileNotFoundError(f"net.weights: {uri} does not exist")
    state = torch.load(io.BytesIO(read_bytes(fs, path)), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:  # a model.pt-like wrapper
        state = state["state_dict"]
    state = map_torchvision_state(state, arch)
    fc1, fc3 = state["classifier.0.weight"], state["classifier.6.weight"]
    if fc3.shape[0] != len(classes):
        raise ValueError(f"net.weights: {uri} has {fc3.shape[0]} classes, the dataset has "
                         f"{len(classes)}; import weights trained on the same classes")
    c5 = max(v.shape[0] for k, v in state.items() if k.startswith("features.") and v.ndim == 4)
    grid = math.isqrt(fc1.shape[1] // c5)
    if grid * grid * c5 != fc1.shape[1] or 32 * grid != crop:
        raise ValueError(f"net.weights: FC1 of {uri} takes {fc1.shape[1]} inputs, i.e. crop "
                         f"{32 * grid} (C5 = {c5}); augment.crop is {crop}")
    bn = any(k.endswith("running_mean") for k in state)
    net = empty_net(arch, num_classes=len(classes), width=1.0, crop=crop, dropout=dropout,
                    batch_norm=bn)
    load_full(net, state)
    return net


# ---------------------------------------------------------------- the worker
@dataclass(frozen=True)
class Hooks:
    """Test-only fault injection and tracing (see KILL_ENV, HANG_ENV, DEBUG_ENV)."""

    kill_at: tuple[int, int, int, str] | None = None
    hang_after_epoch: int | None = None
    debug_dir: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Hooks":
        kill = None
        if env.get(KILL_ENV):
            e, s, r, marker = env[KILL_ENV].split(":", 3)
            kill = (int(e), int(s), int(r), marker)
        hang = int(env[HANG_ENV]) if env.get(HANG_ENV) else None
        return cls(kill, hang, env.get(DEBUG_ENV) or None)


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a training worker needs (picklable)."""

    stage_id: str
    section: dict[str, Any]  # the stage's typed section: train, net, name
    shard_dir: str
    spec: dict[str, Any]  # AugmentSpec.to_dict()
    num_classes: int
    init_uri: str  # starting weights (used when there is no checkpoint)
    epochs: int
    tracking_uri: str
    run_id: str
    hooks: Hooks = field(default_factory=Hooks)
    mlflow_env: dict[str, str] = field(default_factory=dict)  # tracking.http_retry_env
    outcome_uri: str = ""  # where workers leave what the driver must know (_tell_driver)

    @property
    def train(self) -> TrainConfig:
        return self.section["train"]

    @property
    def net(self) -> NetPlan:
        return self.section["net"]

    @property
    def per_worker_batch(self) -> int:
        return max(1, self.train.batch_size // self.train.num_workers)

    @property
    def precision(self) -> Precision:
        return Precision(self.train.bf16, self.train.channels_last)


class Chief:
    """Rank 0's side effects (progress lines, MLflow), no-ops on the other ranks.

    MLflow calls run on a background thread, so training does not wait for them (the
    first one imports mlflow, seconds); `close` waits for them at the end. Once a call
    fails (the tracking server is lost: each call gives up after mlflow.retry_s), the
    later ones are not tried: `failure` says what happened, and the driver fails the
    stage after training; the rerun resumes and logs the epochs again.
    """

    def __init__(self, plan: WorkerPlan, rank: int):
        self.plan, self.active = plan, rank == 0
        self._client = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mlflow") if self.active else None
        self._pending: list[Future] = []
        self.failure: str | None = None

    def say(self, msg: str) -> None:
        if self.active:  # not print(): Ray Train's print patch would echo the line twice
            sys.stderr.write(f"  [{self.plan.stage_id}] {msg}\n")
            sys.stderr.flush()

    def log_epochs(self, records: list[dict[str, Any]]) -> None:
        """Per-epoch metrics into the stage's MLflow run, step = epoch."""
        if self.active and self.plan.run_id and records:
            self._pending.append(self._pool.submit(self._log_batch, [dict(r) for r in records]))

    def close(self) -> str | None:
        """Wait for the MLflow calls; -> the first failure, if any (training went on)."""
        for f in self._pending:
            f.exception()
        self._pending.clear()
        return self.failure

    def _log_batch(self, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        if self.failure is not None:
            return
        try:
            self._log(records, Metric, MlflowClient)
        except Exception as e:  # noqa: BLE001 - recorded, and the stage fails after training
            self.failure = f"{type(e).__name__}: {e}"[:500]
            self.say(f"WARNING: MLflow logging failed, training goes on: {self.failure}")

    def _log(self, records, Metric, MlflowClient) -> None:
        self._client = self._client or MlflowClient(self.plan.tracking_uri)
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(r[k]), now, r["epoch"]) for r in records for k in EPOCH_METRICS
                   if r.get(k) is not None]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self._client.log_batch(self.plan.run_id, metrics=metrics[i:i + 1000])


EPOCH_METRICS = ("train_loss", "train_top1_err", "train_top5_err", "val_top1_err", "val_top5_err",
                 "lr", "images_per_s", "epoch_seconds")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: restore or initialise, then train/validate/checkpoint per epoch."""
    import ray.train
    import ray.train.torch

    plan: WorkerPlan = config["plan"]
    t, ctx = plan.train, ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))  # leave the rest to DALI
    device = ray.train.torch.get_device()
    chief = Chief(plan, rank)

    os.environ.update(plan.mlflow_env)  # bounded MLflow retries, on this node too
    net, optimizer, schedule, progress, start = _restore(plan, device, ctx, chief)
    loader, val_loader = _loaders(plan, rank, world, device, start)
    steps = _all_max(len(loader), device)  # ranks with a smaller share pad with empty steps
    chief.say(f"{world} worker(s) x batch {plan.per_worker_batch}, {steps} steps/epoch, "
              f"epochs {start}..{plan.epochs - 1}")
    for epoch in range(start, plan.epochs):
        torch.manual_seed(_seed(t.seed, epoch, rank))  # dropout: depends on (seed, epoch, rank) only
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr
        t0 = time.perf_counter()
        train, bad_step = train_one_epoch(net, loader, optimizer, steps, epoch, plan, device, chief, rank)
        if bad_step is not None or not _finite_weights(net, device):
            _report_divergence(plan, epoch, bad_step, train, chief, rank)  # same facts on every rank
            break
        t1 = time.perf_counter()
        val = evaluate(_unwrap(net), val_loader, plan, device)
        record = _epoch_record(epoch, schedule.lr, train, val, t1 - t0, time.perf_counter() - t0,
                               plan.num_classes)
        record["lr_dropped"] = schedule.step(record[SCORE], epoch)
        progress["history"].append(record)
        if progress["best"] is None or record[SCORE] >= progress["best"][SCORE]:  # ties: later (as Ray)
            progress["best"] = {k: record.get(k) for k in ("epoch", SCORE, "val_top1_err",
                                                             "val_top5_err", "val_health")}
        _checkpoint(plan, net, optimizer, schedule, progress, epoch, rank)
        chief.log_epochs([record])
        chief.say(_line(record, plan.epochs))
        if plan.hooks.hang_after_epoch == epoch and rank == 0:
            time.sleep(3600)  # test hook: the driver gets killed while we wait
    failure = chief.close()
    if failure is not None:
        _tell_driver(plan, {"mlflow_failed": failure})


def _restore(plan: WorkerPlan, device: torch.device, ctx, chief: Chief):
    """(DDP net, optimizer, schedule, progress, first epoch) from the latest checkpoint or init."""
    import ray.train
    import ray.train.torch

    t = plan.train
    net = empty_net(plan.net.arch, num_classes=plan.num_classes, width=t.width,
                    crop=plan.spec["crop"], dropout=t.dropout, batch_norm=t.batch_norm)
    checkpoint = ray.train.get_checkpoint()
    state = _read_checkpoint(checkpoint) if checkpoint is not None else None
    if state is None:
        fs, path = resolve_uri(plan.init_uri)
        net.load_state_dict(torch.load(io.BytesIO(read_bytes(fs, path)), map_location="cpu",
                                       weights_only=True))
    else:
        net.load_state_dict(state["model"])
    net = plan.precision.net(net)
    net = ray.train.torch.prepare_model(net)  # DDP (world > 1); broadcasts rank 0's weights
    if t.compile:  # the whole DDP module, as PyTorch recommends; checkpoints use _unwrap(net)
        net = torch.compile(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=plan.net.lr, momentum=t.momentum,
                                weight_decay=t.weight_decay)
    schedule = schedule_of(t, plan.net)
    progress: dict[str, Any] = {"history": [], "best": None, "resumes": [], "workers": []}
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        progress, start = state["progress"], state["epoch"] + 1
        progress["resumes"].append({"after_epoch": state["epoch"], "time": time.time(),
                                    "mlflow_run_id": plan.run_id})
        if state.get("mlflow_run_id") != plan.run_id:  # a new stage run: re-log the past epochs
            chief.log_epochs(progress["history"])
        chief.say(f"resumed from the checkpoint of epoch {state['epoch']}")
    progress["workers"] = _placement(ctx, device)
    return net, optimizer, schedule, progress, start


def _read_checkpoint(checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def _loaders(plan: WorkerPlan, rank: int, world: int, device: torch.device, start: int):
    """This worker's DALI training loader (its share) and centre-crop validation loader."""
    from stages.augment import AugmentSpec, build_center_loader, build_train_loader, center_scale

    spec = AugmentSpec.from_dict(plan.spec)
    device_id = device.index if device.type == "cuda" else None
    if device_id is None and spec.device == "auto":
        spec = dataclasses.replace(spec, device="cpu")  # a CPU worker decodes on its CPU
    scale = tuple(plan.net.scale) if isinstance(plan.net.scale, list) else plan.net.scale
    b = plan.per_worker_batch
    loader = build_train_loader(plan.shard_dir, spec, scale, b, rank=rank, world_size=world,
                                seed=plan.train.seed, device_id=device_id, start_epoch=start,
                                debug=plan.hooks.debug_dir is not None)
    val = build_center_loader(plan.shard_dir, spec, center_scale(scale, spec.crop), b,
                              rank=rank, world_size=world, device_id=device_id)
    return loader, val


def train_one_epoch(net: nn.Module, loader, optimizer, steps: int, epoch: int, plan: WorkerPlan,
                    device: torch.device, chief: Chief, rank: int) -> tuple[torch.Tensor, int | None]:
    """One epoch of SGD; returns the all-reduced [loss sum, images, top-1 hits, top-5 hits]
    and the first step (on any rank) whose loss was not finite, or None.

    Every rank runs `steps` steps; a rank whose share ran out runs an empty batch, which
    takes part in DDP's gradient all-reduce with zero gradients and then applies the same
    averaged gradient, so weights and momentum stay identical on all ranks (unlike
    DDP's Join, whose joined ranks skip optimizer steps and fall out of sync).
    The loss is the per-image sum over the local batch / the per-worker batch, so after
    DDP's averaging every image weighs 1 / global batch (also in partial batches).
    """
    net.train()
    sums = torch.zeros(2 + len(TOPK), dtype=torch.float64, device=device)
    # first step with a non-finite loss; kept on the device (no sync per step), read at the end
    bad_step = torch.tensor(steps, dtype=torch.long, device=device)
    batches = iter(loader.epoch(epoch))
    rows: list[int] = []
    for step in range(steps):
        _maybe_kill(plan.hooks, epoch, step, rank)
        batch = next(batches, None)
        if batch is None:
            images, labels = _empty_batch(plan, device)
        else:
            images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            if plan.hooks.debug_dir is not None:
                rows += batch[2]["row"].tolist()
        step_sums = _sgd_step(net, optimizer, images, labels, plan)
        bad_step = torch.where(torch.isfinite(step_sums[0]), bad_step, bad_step.clamp(max=step))
        sums += step_sums
        if plan.train.log_every and (step + 1) % plan.train.log_every == 0:
            loss = step_sums[0].item() / max(len(labels), 1)
            chief.say(f"epoch {epoch + 1} step {step + 1}/{steps} loss {loss:.4f}")
    if next(batches, None) is not None:  # also lets the loader finish its pass cleanly
        raise RuntimeError("the training loader yielded more batches than it announced")
    if plan.hooks.debug_dir is not None:
        _write_debug(plan.hooks.debug_dir, epoch, rank, rows, steps)
    first_bad = _all_min(bad_step)
    return _all_sum(sums), (first_bad if first_bad < steps else None)


def _finite_weights(net: nn.Module, device: torch.device) -> bool:
    """Whether every parameter is finite (identical on all ranks: DDP keeps them in sync)."""
    ok = torch.stack([torch.isfinite(p).all() for p in net.parameters()]).all()
    return bool(ok.to(device).item())


def _report_divergence(plan: WorkerPlan, epoch: int, step: int | None, sums: torch.Tensor,
                       chief: Chief, rank: int) -> None:
    """Tell the driver that training diverged (no checkpoint of it is made)."""
    where = f"epoch {epoch + 1}" + (f" step {step + 1}" if step is not None else "")
    chief.say(f"training diverged at {where}: loss {sums[0].item() / max(sums[1].item(), 1):.4g}")
    if rank == 0:
        _tell_driver(plan, {"diverged": where})


def _tell_driver(plan: WorkerPlan, facts: dict[str, Any]) -> None:
    """What the driver must know after fit() but Ray Train's Result does not carry (it keeps
    the metrics of checkpoints only): a file in the stage's scratch directory."""
    fs, path = resolve_uri(plan.outcome_uri)
    write_json(fs, path, facts)


def _has_checkpoint(scratch: StageOutput) -> bool:
    """Whether an earlier run of this stage and key left a Ray Train checkpoint (a resume)."""
    import pyarrow.fs as pafs

    run = scratch.join(RUN_NAME)
    if not exists(scratch.fs, run):
        return False
    return any(i.base_name.startswith("epoch_") for i in scratch.fs.get_file_info(pafs.FileSelector(run)))


def _read_outcome(uri: str, remove: bool = True) -> dict[str, Any]:
    """The workers' `_tell_driver` facts ({} if none); removed once read."""
    fs, path = resolve_uri(uri)
    if not exists(fs, path):
        return {}
    facts = json.loads(read_bytes(fs, path))
    if remove:
        fs.delete_file(path)
    return facts


def _sgd_step(net: nn.Module, optimizer, images: torch.Tensor, labels: torch.Tensor,
              plan: WorkerPlan) -> torch.Tensor:
    """steps.sgd_step with the plan's batch and precision."""
    return sgd_step(net, optimizer, images, labels, plan.per_worker_batch, plan.precision)


def _empty_batch(plan: WorkerPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    crop = plan.spec["crop"]
    return (torch.zeros((0, 3, crop, crop), device=device),
            torch.zeros((0,), dtype=torch.long, device=device))


@torch.no_grad()
def evaluate(net: nn.Module, loader, plan: WorkerPlan, device: torch.device) -> torch.Tensor:
    """Centre-crop validation over this rank's share; all-reduced [images, top-1 hits,
    top-5 hits, then the (3, K) `metrics.prediction_stats` sums, flattened] (for the
    collapse check).

    Runs on the unwrapped net: ranks may see different numbers of batches, and DDP's
    forward would try to sync buffers with the others.
    """
    k, precision = plan.num_classes, plan.precision
    net.eval()
    sums = torch.zeros(1 + len(TOPK) + 3 * k, dtype=torch.float64, device=device)
    if loader.num_samples:
        for images, labels, _keys in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with precision.autocast(device):
                logits = net(precision.images(images)).float()
            probs = logits.softmax(1).double()  # (B, K)
            counts = torch.bincount(logits.argmax(1), minlength=k).double()
            sums += torch.cat([torch.tensor([float(len(labels))], device=device, dtype=torch.float64),
                               torch.stack(topk_hits(logits, labels)),
                               counts, probs.sum(0), (probs * probs).sum(0)])
    return _all_sum(sums)


def _epoch_record(epoch: int, lr: float, train: torch.Tensor, val: torch.Tensor,
                  train_s: float, epoch_s: float, num_classes: int) -> dict[str, Any]:
    """One history entry; errors are fractions; top-k error is None for k > classes
    (as in stages.metrics.errors)."""
    loss, n, *hits = train.tolist()
    nv, *vhits = val[:1 + len(TOPK)].tolist()
    rec: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": loss / max(n, 1),
                           "train_images": int(n), "val_images": int(nv),
                           "images_per_s": n / max(train_s, 1e-9), "epoch_seconds": epoch_s}
    shown = meaningful_topk(TOPK, num_classes)
    for k, h, vh in zip(TOPK, hits, vhits):
        rec[f"train_top{k}_err"] = 1 - h / max(n, 1) if k in shown else None
        rec[f"val_top{k}_err"] = 1 - vh / max(nv, 1) if k in shown else None
    rec[SCORE] = vhits[0] / max(nv, 1)
    if nv:
        rec["val_health"] = dataclasses.asdict(
            health_of(np.asarray(val[1 + len(TOPK):].tolist()).reshape(3, num_classes)))
    return rec


def _checkpoint(plan: WorkerPlan, net: nn.Module, optimizer, schedule: PlateauSchedule,
                progress: dict[str, Any], epoch: int, rank: int) -> None:
    """Report the epoch on every rank; rank 0 attaches the checkpoint (all ranks hold the
    same weights and optimizer state). No RNG state: every epoch reseeds from (seed, epoch, rank)."""
    import ray.train

    record = progress["history"][-1]
    metrics = {k: record[k] for k in ("epoch", SCORE, "val_top1_err", "val_top5_err", "train_loss", "lr")}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            state = {"model": {k: v.cpu() for k, v in _unwrap(net).state_dict().items()},
                     "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "epoch": epoch, "progress": progress, "config": to_dict(plan.section),
                     "mlflow_run_id": plan.run_id}
            torch.save(state, os.path.join(tmp, STATE_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch:04d}")


def _line(r: dict[str, Any], epochs: int) -> str:
    top5 = f" top-5 {r['val_top5_err']:.1%}" if r.get("val_top5_err") is not None else ""
    drop = " (lr divided)" if r["lr_dropped"] else ""
    return (f"epoch {r['epoch'] + 1}/{epochs} loss {r['train_loss']:.4f} val top-1 err "
            f"{r['val_top1_err']:.1%}{top5} lr {r['lr']:.2g}{drop} {r['images_per_s']:.0f} img/s "
            f"{r['epoch_seconds']:.1f} s")


def _unwrap(net: nn.Module) -> nn.Module:
    """The plain net inside torch.compile's and DDP's wrappers (clean state-dict keys)."""
    while True:
        if isinstance(net, nn.parallel.DistributedDataParallel):
            net = net.module
        elif hasattr(net, "_orig_mod"):  # torch.compile's OptimizedModule
            net = net._orig_mod
        else:
            return net


def _seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _all_min(x: torch.Tensor) -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return int(x.item())


def _all_max(n: int, device: torch.device) -> int:
    import torch.distributed as dist

    x = torch.tensor([n], dtype=torch.long, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.item())


def _placement(ctx, device: torch.device) -> list[dict[str, Any]]:
    """Every rank's node (id, rank) and device, gathered on all ranks."""
    import ray
    import torch.distributed as dist

    me = {"rank": ctx.get_world_rank(), "node_rank": ctx.get_node_rank(),
          "node_id": ray.get_runtime_context().get_node_id(), "device": str(device)}
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [me]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    return everyone


def _maybe_kill(hooks: Hooks, epoch: int, step: int, rank: int) -> None:
    """Test hook: SIGKILL this worker at (epoch, step, rank), once (the marker file says so)."""
    if hooks.kill_at is None or hooks.kill_at[:3] != (epoch, step, rank):
        return
    marker = hooks.kill_at[3]
    if os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"killed pid {os.getpid()} at epoch {epoch} step {step} rank {rank}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _write_debug(folder: str, epoch: int, rank: int, rows: list[int], steps: int) -> None:
    import ray

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"epoch{epoch}_rank{rank}_{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump({"epoch": epoch, "rank": rank, "rows": rows, "steps": steps,
                   "node_id": ray.get_runtime_context().get_node_id()}, f)


# ---------------------------------------------------------------- the driver
def run(ctx: StageContext) -> StageResult:
    """DAG entry of train/<net>: train (or import) one net; outputs model.pt, history, plots."""
    from stages.augment import AugmentSpec

    t, net_plan = ctx.section["train"], ctx.section["net"]
    classes = ctx.inputs["shard"].read_json("classes.json")
    spec = AugmentSpec.from_dict(ctx.inputs["augment"].read_json("spec.json"))
    if net_plan.weights is not None:
        return _run_import(ctx, classes, spec.crop)
    if ctx.scratch is None:
        raise ValueError(f"{ctx.stage_id}: needs ctx.scratch (Ray Train's storage, for resuming)")
    net, init = initial_model(ctx.section, len(classes), spec.crop, ctx.inputs)
    write_json(ctx.out.fs, ctx.out.join("init.json"), init)
    epochs = net_plan.epochs if net_plan.epochs is not None else t.max_epochs
    params = {"per_worker_batch": max(1, t.batch_size // t.num_workers),
              "global_batch": max(1, t.batch_size // t.num_workers) * t.num_workers,
              "epochs_planned": epochs, "init_copied_tensors": len(init["copied"]),
              "num_classes": len(classes), "crop": spec.crop}
    if params["global_batch"] != t.batch_size:
        ctx.log(f"train.batch_size {t.batch_size} is not a multiple of {t.num_workers} workers: "
                f"the global batch is {params['global_batch']}")
    if epochs == 0:  # nothing to train: the initial weights are the result
        meta = _meta(ctx, classes, epoch=None, errs=(None, None), origin="initial")
        return _finish(ctx, net, meta, {"epochs": [], "lr_drops": [], "resumes": []}, params,
                       "0 epochs: wrote the initial weights")
    init_uri = _write_init(ctx.scratch, net)
    plan = WorkerPlan(ctx.stage_id, dict(ctx.section), ctx.inputs["shard"].uri, spec.to_dict(),
                      len(classes), init_uri, epochs, ctx.tracking.tracking_uri, ctx.tracking.run_id,
                      Hooks.from_env(), {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP_")},
                      posixpath.join(ctx.scratch.uri, OUTCOME_FILE))
    _read_outcome(plan.outcome_uri)  # an earlier attempt's
    resuming = _has_checkpoint(ctx.scratch)
    result = _trainer(plan, ctx.scratch).fit()
    outcome = _read_outcome(plan.outcome_uri)
    if outcome.get("mlflow_failed"):
        raise TrackingServerLost(
            f"{ctx.stage_id}: training finished, but logging its epochs to the MLflow tracking "
            f"server {ctx.tracking.tracking_uri} failed ({outcome['mlflow_failed']}); "
            "nothing is published. Start the server again and re-run: the stage resumes from "
            "its last checkpoint and logs the epochs again")
    if outcome.get("diverged"):
        raise TrainingDiverged(
            f"{ctx.stage_id}: training diverged at {outcome['diverged']} (the loss or the "
            f"weights became NaN or infinite); nothing is published. Lower the learning rate "
            f"(train.nets.{ctx.section['name']}.lr = {net_plan.lr:g}) and run the stage again "
            f"with --force (a rerun without it resumes from the last finite checkpoint)")
    best_state, last_state = _best_and_last(result)
    history = _history(last_state["progress"], last_state["schedule"])
    if resuming and not any(r.get("mlflow_run_id") == ctx.tracking.run_id for r in history["resumes"]):
        # killed after its last checkpoint: nothing was left to train, so no checkpoint
        # recorded this resume
        history["resumes"].append({"after_epoch": last_state["epoch"], "time": time.time(),
                                   "mlflow_run_id": ctx.tracking.run_id})
    best = last_state["progress"]["best"]
    net.load_state_dict(best_state["model"])
    meta = _meta(ctx, classes, epoch=best_state["epoch"],
                 errs=(best["val_top1_err"], best["val_top5_err"]), origin="trained")
    params.update(resumes=len(history["resumes"]), ray_run=posixpath.join(ctx.scratch.uri, RUN_NAME))
    last = history["epochs"][-1]
    summary = (f"best epoch {best['epoch'] + 1}/{epochs}: val top-1 err {best['val_top1_err']:.1%}"
               + (f", top-5 {best['val_top5_err']:.1%}" if best["val_top5_err"] is not None else "")
               + f"; final loss {last['train_loss']:.4f}, lr drops {len(history['lr_drops'])}, "
               f"{len(history['resumes'])} resume(s)")
    result = _finish(ctx, net, meta, history, params, summary)
    if best.get("val_health") is not None:
        result.manifest["val_health"] = best["val_health"]
        result.tags.update(collapse_tags(Health(**best["val_health"]), net_plan, ctx.log))
    return result


def collapse_tags(h: Health, net_plan: NetPlan, log) -> dict[str, str]:
    """MLflow tags for the collapse check of a net's validation predictions; a collapse
    is also said on the console, with its likely cause."""
    if not h.collapsed:
        return {"collapsed": "false", "health": h.describe()}
    if net_plan.init_source is not None and "from_A" in net_plan.init and net_plan.random_init == "normal":
        cause = ("likely cause: the layers A does not provide start at N(0, train.init_std^2), too "
                 "small or large a signal for this depth (cf. fbcunn issue 75 on VGG-E); try "
                 "init: {from_A: ..., rest: glorot}, another train.init_std, or more epochs")
    elif net_plan.random_init == "normal" and net_plan.init_source is None:
        cause = ("likely cause: N(0, train.init_std^2) initialisation of a deep net (the paper "
                 "trains A first and copies its layers); try init: glorot or a lower lr")
    else:
        cause = "likely cause: too few epochs or too high a learning rate for this net"
    log(f"WARNING: the net collapsed: {h.describe()}; {cause}")
    return {"collapsed": "true", "health": f"{h.describe()}; {cause}"}


def _trainer(plan: WorkerPlan, scratch: StageOutput):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = plan.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=scratch.uri,
            # Ray keeps the best `num_to_keep` by score *and* always the latest.
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                               checkpoint_score_attribute=SCORE,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
    )


def _best_and_last(result) -> tuple[dict[str, Any], dict[str, Any]]:
    """States of the best checkpoint (max val top-1 accuracy, the later epoch on ties) and the latest."""
    if result.checkpoint is None or not result.best_checkpoints:
        raise RuntimeError(f"the training run left no checkpoint ({result.path})")
    best_ckpt, _ = max(result.best_checkpoints, key=lambda cm: (cm[1][SCORE], cm[1]["epoch"]))
    last = _read_checkpoint(result.checkpoint)
    best = last if best_ckpt.path == result.checkpoint.path else _read_checkpoint(best_ckpt)
    return best, last


def _history(progress: Mapping[str, Any], schedule: Mapping[str, Any]) -> dict[str, Any]:
    return {"epochs": progress["history"], "best": progress["best"], "lr_drops": schedule["drops"],
            "resumes": progress["resumes"], "workers": progress["workers"]}


def _meta(ctx: StageContext, classes: list[str], epoch: int | None,
          errs: tuple[float | None, float | None], origin: str) -> dict[str, Any]:
    return {"classes": list(classes), "net": ctx.section["name"], "config": to_dict(ctx.section),
            "epoch": epoch, "val_top1_err": errs[0], "val_top5_err": errs[1], "origin": origin}


def _finish(ctx: StageContext, net: VGG, meta: dict[str, Any], history: dict[str, Any],
            params: dict[str, Any], summary: str) -> StageResult:
    """Write model.pt, history.json, learning_curves.png; the StageResult."""
    size, sha = save_model(ctx.out, net, meta)
    write_json(ctx.out.fs, ctx.out.join("history.json"), history)
    artifacts = ["history.json"]
    if history["epochs"]:
        write_bytes(ctx.out.fs, ctx.out.join("learning_curves.png"), plot_curves(history, ctx.stage_id))
        artifacts.append("learning_curves.png")
    if exists(ctx.out.fs, ctx.out.join("init.json")):
        artifacts.append("init.json")
    if size <= ARTIFACT_LIMIT:
        artifacts.append(MODEL_FILE)
    # "best_": the per-epoch series are val_top1_err etc.; a value logged under the same
    # name at step 0 would hide among them (the UI shows the last epoch's).
    metrics = {k: v for k, v in (("best_val_top1_err", meta["val_top1_err"]),
                                 ("best_val_top5_err", meta["val_top5_err"])) if v is not None}
    if history["epochs"]:
        last = history["epochs"][-1]
        metrics.update(best_epoch=meta["epoch"], epochs=len(history["epochs"]),
                       final_train_loss=last["train_loss"], lr_drops=len(history["lr_drops"]),
                       resumes=len(history["resumes"]),
                       images_per_s=float(np.mean([r["images_per_s"] for r in history["epochs"]])))
    manifest = {"model": {"uri": ctx.final_uri(MODEL_FILE), "bytes": size, "sha256": sha},
                "arch": net.name, "width": net.width, "crop": net.crop, "num_classes": net.num_classes,
                "epoch": meta["epoch"], "val_top1_err": meta["val_top1_err"],
                "val_top5_err": meta["val_top5_err"], "origin": meta["origin"], **params}
    return StageResult(metrics=metrics, params=params, artifacts=artifacts, manifest=manifest, summary=summary)


def _run_import(ctx: StageContext, classes: list[str], crop: int) -> StageResult:
    """`weights:` released torchvision weights into model.pt, no training."""
    net_plan = ctx.section["net"]
    net = import_weights(net_plan.weights, net_plan.arch, classes, crop, ctx.section["train"].dropout)
    meta = _meta(ctx, classes, epoch=None, errs=(None, None), origin=f"imported {net_plan.weights}")
    history = {"epochs": [], "lr_drops": [], "resumes": [], "imported": net_plan.weights}
    params = {"imported_weights": net_plan.weights, "num_classes": len(classes), "crop": crop}
    return _finish(ctx, net, meta, history, params, f"imported {net_plan.weights} ({net.name}, width 1.0)")


def _write_init(scratch: StageOutput, net: VGG) -> str:
    """The starting weights, in the scratch dir where every worker can read them; -> URI."""
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    write_bytes(scratch.fs, scratch.join(INIT_FILE), buf.getvalue())
    return posixpath.join(scratch.uri, INIT_FILE)


# ---------------------------------------------------------------- plots
def plot_curves(history: Mapping[str, Any], title: str) -> bytes:
    """PNG: training loss, and top-1/top-5 error (train, val) vs epoch; lr drops marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = history["epochs"]
    x = [r["epoch"] + 1 for r in recs]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(x, [r["train_loss"] for r in recs], "o-", label="train loss")
    ax_loss.set(xlabel="epoch", ylabel="loss", title=f"{title}: training loss")
    for split, style in (("train", "--"), ("val", "-")):
        for k in TOPK:
            ys = [r.get(f"{split}_top{k}_err") for r in recs]
            if all(y is not None for y in ys):
                ax_err.plot(x, [100 * y for y in ys], style, marker="o", label=f"{split} top-{k}")
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="top-1 / top-5 error")
    for ax in (ax_loss, ax_err):
        for i, e in enumerate(history["lr_drops"]):  # the lr changes between epoch e and e+1
            ax.axvline(e + 1.5, color="grey", ls=":", label="lr / 10" if i == 0 else None)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
