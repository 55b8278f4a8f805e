"""Training one net on Ray Train (paper Sec. 3.1): the worker loop and the driver's
side of the job.

Recipe: mini-batch SGD on the multinomial logistic loss, momentum 0.9, weight
decay 5e-4, dropout 0.5 on FC1/FC2, the lr divided by 10 when the validation
accuracy stops improving (`vgg.training.schedule`), a fixed epoch budget.

How it runs: a `TorchTrainer` job with `train.num_workers` DDP workers
(`prepare_model`). Each worker feeds itself from its own DALI loader over its
share of the training shards (`vgg.data.loaders.build_train_loader`, shares differ
by at most one image); the global batch `train.batch_size` is split across the
workers. Every epoch ends with a single-scale centre-crop validation (sharded,
counts all-reduced) that drives the lr schedule, and a checkpoint (rank 0)
reported by every rank. Ray Train keeps the best `keep_checkpoints` by validation
top-1 accuracy plus the latest, restarts failed workers from the latest checkpoint
(`max_failures`), and - because the run lives in the stage's scratch directory
under a fixed name - resumes an interrupted run at the next epoch.

`TrainCallback`s see every step, epoch and checkpoint of every worker (the tests
inject faults and trace the rows each rank read with them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from pipeline.config import NetPlan, TrainConfig, to_dict
from pipeline.stage import Progress
from pipeline.storage import StageOutput, exists, read_bytes, resolve_uri, write_json
from pipeline.system_metrics import SystemMetrics, sampling
from vgg.data.augmentation import AugmentSpec
from vgg.data.loaders import build_center_loader, build_train_loader
from vgg.paper import TOPK, single_test_scale
from vgg.results.metrics import health_of, meaningful_topk
from vgg.training.checkpoints import empty_net, read_weights
from vgg.training.schedule import PlateauSchedule, schedule_of
from vgg.training.steps import Precision, sgd_step, topk_hits

STATE_FILE = "state.pt"  # inside each Ray Train checkpoint
OUTCOME_FILE = "worker_outcome.json"  # in the scratch directory: see _tell_driver
RUN_NAME = "ray_train"  # fixed: (scratch dir, name) identifies the run to resume
SCORE = "val_top1_acc"  # the checkpoint score (higher is better)


class TrainCallback:
    """Hooks into every worker's loop (picklable; they run inside the Ray workers). The
    base class does nothing; tests subclass it to kill a worker, stall one, or record
    the rows each rank trained on."""

    #: Whether `on_epoch_rows` should receive the rows (the loader then returns them).
    wants_rows: bool = False

    def on_step(self, epoch: int, step: int, rank: int) -> None:
        """Before each training step."""

    def on_epoch_rows(self, epoch: int, rank: int, rows: list[int], steps: int) -> None:
        """After each epoch's steps: the shard rows this rank trained on (if wants_rows)."""

    def after_checkpoint(self, epoch: int, rank: int) -> None:
        """After each epoch's checkpoint was reported."""


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a training worker needs (picklable)."""

    stage_id: str
    section: Any  # the stage's typed section (pipeline.dag.TrainSection): train, net, name
    shard_dir: str
    spec: dict[str, Any]  # AugmentSpec.to_dict()
    num_classes: int
    init_uri: str  # starting weights (used when there is no checkpoint)
    epochs: int
    tracking_uri: str
    run_id: str
    callbacks: tuple[TrainCallback, ...] = ()
    mlflow_env: dict[str, str] = field(default_factory=dict)  # tracking.http_retry_env
    outcome_uri: str = ""  # where workers leave what the driver must know (_tell_driver)
    system_metrics: SystemMetrics | None = None  # where each node's system metrics go

    @property
    def train(self) -> TrainConfig:
        return self.section.train

    @property
    def net(self) -> NetPlan:
        return self.section.net

    @property
    def wants_rows(self) -> bool:
        return any(cb.wants_rows for cb in self.callbacks)

    @property
    def per_worker_batch(self) -> int:
        return max(1, self.train.batch_size // self.train.num_workers)

    @property
    def precision(self) -> Precision:
        return Precision(self.train.bf16, self.train.channels_last)


class Chief:
    """Rank 0's side effects (progress lines, MLflow), no-ops on the other ranks.

    Epoch metrics go through MLflow's asynchronous logging (`log_batch(synchronous=False)`),
    so training does not wait for the tracking server; `close` waits for them at the end.
    If the tracking server is lost (each call gives up after mlflow.retry_s), training
    goes on; `close` says what failed, the driver fails the stage after training, and the
    rerun resumes and logs the epochs again.
    """

    def __init__(self, plan: WorkerPlan, rank: int):
        self.plan, self.active = plan, rank == 0
        self._client = None
        self._pending: list = []  # mlflow RunOperations
        self._failure: str | None = None  # the first failed MLflow call

    def say(self, msg: str) -> None:
        if self.active:  # not print(): Ray Train's print patch would echo the line twice
            sys.stderr.write(f"  [{self.plan.stage_id}] {msg}\n")
            sys.stderr.flush()

    def log_epochs(self, records: list[dict[str, Any]]) -> None:
        """Per-epoch metrics into the stage's MLflow run, step = epoch."""
        now = int(time.time() * 1000)
        self._log([Metric(k, float(r[k]), now, r["epoch"]) for r in records for k in EPOCH_METRICS
                   if r.get(k) is not None])

    def log_step(self, global_step: int, loss: float, lr: float, images_per_s: float) -> None:
        """Step-level metrics (every train.log_every steps), step = the global step."""
        now = int(time.time() * 1000)
        self._log([Metric(k, float(v), now, global_step) for k, v in
                   (("step_loss", loss), ("step_lr", lr), ("step_images_per_s", images_per_s))])

    def _log(self, metrics: list[Metric]) -> None:
        if not (self.active and self.plan.run_id and metrics):
            return
        self._client = self._client or MlflowClient(self.plan.tracking_uri)
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self._pending.append(self._client.log_batch(self.plan.run_id, metrics=metrics[i:i + 1000],
                                                        synchronous=False))

    def _settle(self, ops: list) -> None:
        for op in ops:
            try:
                op.wait()
            except Exception as e:  # noqa: BLE001 - recorded, and the stage fails after training
                self._failure = self._failure or f"{type(e).__name__}: {e}"[:500]

    def close(self) -> str | None:
        """Wait for the MLflow calls; -> the first failure, if any (training went on)."""
        self._settle(self._pending)
        self._pending.clear()
        if self._failure:
            self.say(f"WARNING: MLflow logging failed, training went on: {self._failure}")
        return self._failure


PROGRESS_EVERY_S = 10.0  # at most one progress line per epoch every this many seconds

EPOCH_METRICS = ("train_loss", "train_top1_err", "train_top5_err", "val_top1_err", "val_top5_err",
                 "lr", "images_per_s", "epoch_seconds")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: restore or initialise, then train/validate/checkpoint per epoch."""
    plan: WorkerPlan = config["plan"]
    t, ctx = plan.train, ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))  # leave the rest to DALI
    device = ray.train.torch.get_device()
    chief = Chief(plan, rank)

    os.environ.update(plan.mlflow_env)  # bounded MLflow retries, on this node too
    with sampling(plan.system_metrics):  # this node's CPU/GPU/memory, while it trains
        _train(plan, ctx, rank, world, device, chief)


def _train(plan: WorkerPlan, ctx, rank: int, world: int, device: torch.device, chief: Chief) -> None:
    t = plan.train
    net, optimizer, schedule, progress, start = _restore(plan, device, ctx, chief)
    loader, val_loader = _loaders(plan, rank, world, device, start)
    steps = _all_max(len(loader), device)  # ranks with a smaller share pad with empty steps
    chief.say(f"{world} worker(s) x batch {plan.per_worker_batch}, {steps} steps/epoch, "
              f"epochs {start}..{plan.epochs - 1}")
    for epoch in range(start, plan.epochs):
        torch.manual_seed(_seed(t.seed, epoch, rank))  # dropout: depends on (seed, epoch, rank) only
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
        for cb in plan.callbacks:
            cb.after_checkpoint(epoch, rank)
    failure = chief.close()
    if failure is not None:
        _tell_driver(plan, {"mlflow_failed": failure})


def _restore(plan: WorkerPlan, device: torch.device, ctx, chief: Chief):
    """(DDP net, optimizer, schedule, progress, first epoch) from the latest checkpoint or init."""
    t = plan.train
    net = empty_net(plan.net.arch, num_classes=plan.num_classes, width=t.width,
                    crop=plan.spec["crop"], dropout=t.dropout, batch_norm=t.batch_norm)
    checkpoint = ray.train.get_checkpoint()
    state = read_checkpoint(checkpoint) if checkpoint is not None else None
    if state is None:
        net.load_state_dict(read_weights(plan.init_uri))
    else:
        net.load_state_dict(state["model"])
    net = plan.precision.net(net)
    net = ray.train.torch.prepare_model(net)  # DDP (world > 1); broadcasts rank 0's weights
    if t.compile:  # the whole DDP module, as PyTorch recommends; checkpoints use _unwrap(net)
        net = torch.compile(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=plan.net.lr, momentum=t.momentum,
                                weight_decay=t.weight_decay)
    schedule = schedule_of(optimizer, t, plan.net)
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


def read_checkpoint(checkpoint) -> dict[str, Any]:
    """The state saved by `_checkpoint` in a Ray Train checkpoint."""
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def _loaders(plan: WorkerPlan, rank: int, world: int, device: torch.device, start: int):
    """This worker's DALI training loader (its share) and centre-crop validation loader."""
    spec = AugmentSpec.from_dict(plan.spec)
    device_id = device.index if device.type == "cuda" else None
    if device_id is None and spec.device == "auto":
        spec = dataclasses.replace(spec, device="cpu")  # a CPU worker decodes on its CPU
    scale = tuple(plan.net.scale) if isinstance(plan.net.scale, list) else plan.net.scale
    b = plan.per_worker_batch
    loader = build_train_loader(plan.shard_dir, spec, scale, b, rank=rank, world_size=world,
                                seed=plan.train.seed, device_id=device_id, start_epoch=start,
                                debug=plan.wants_rows)
    val = build_center_loader(plan.shard_dir, spec, single_test_scale(scale, spec.crop), b,
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
    bar = Progress(plan.stage_id, f"epoch {epoch + 1}/{plan.epochs}", steps, every_s=PROGRESS_EVERY_S,
                   unit="steps", active=chief.active)
    note, t_log = "", time.perf_counter()
    for step in range(steps):
        for cb in plan.callbacks:
            cb.on_step(epoch, step, rank)
        batch = next(batches, None)
        if batch is None:
            images, labels = _empty_batch(plan, device)
        else:
            images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            if plan.wants_rows:
                rows += batch[2]["row"].tolist()
        step_sums = _sgd_step(net, optimizer, images, labels, plan)
        bad_step = torch.where(torch.isfinite(step_sums[0]), bad_step, bad_step.clamp(max=step))
        sums += step_sums
        every = plan.train.log_every
        if every and (step + 1) % every == 0:
            loss = step_sums[0].item() / max(len(labels), 1)
            now = time.perf_counter()
            rate = plan.train.batch_size * every / max(now - t_log, 1e-9)
            t_log = now
            chief.log_step(epoch * steps + step + 1, loss, optimizer.param_groups[0]["lr"], rate)
            note = f"loss {loss:.4f}, {rate:.0f} img/s"
        bar.update(1, note)
    if next(batches, None) is not None:  # also lets the loader finish its pass cleanly
        raise RuntimeError("the training loader yielded more batches than it announced")
    if plan.wants_rows:
        for cb in plan.callbacks:
            cb.on_epoch_rows(epoch, rank, rows, steps)
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
    (as in vgg.results.metrics.errors)."""
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
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _all_min(x: torch.Tensor) -> int:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return int(x.item())


def _all_max(n: int, device: torch.device) -> int:
    x = torch.tensor([n], dtype=torch.long, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.item())


def _placement(ctx, device: torch.device) -> list[dict[str, Any]]:
    """Every rank's node (id, rank) and device, gathered on all ranks."""
    me = {"rank": ctx.get_world_rank(), "node_rank": ctx.get_node_rank(),
          "node_id": ray.get_runtime_context().get_node_id(), "device": str(device)}
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [me]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    return everyone


# ---------------------------------------------------------------- the driver's side
def has_checkpoint(scratch: StageOutput) -> bool:
    """Whether an earlier run of this stage and key left a Ray Train checkpoint (a resume)."""
    run = scratch.join(RUN_NAME)
    if not exists(scratch.fs, run):
        return False
    return any(i.base_name.startswith("epoch_") for i in scratch.fs.get_file_info(pafs.FileSelector(run)))


def read_outcome(uri: str, remove: bool = True) -> dict[str, Any]:
    """The workers' `_tell_driver` facts ({} if none); removed once read."""
    fs, path = resolve_uri(uri)
    if not exists(fs, path):
        return {}
    facts = json.loads(read_bytes(fs, path))
    if remove:
        fs.delete_file(path)
    return facts


def trainer(plan: WorkerPlan, scratch: StageOutput):
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


def best_and_last(result) -> tuple[dict[str, Any], dict[str, Any]]:
    """States of the best checkpoint (max val top-1 accuracy, the later epoch on ties) and the latest."""
    if result.checkpoint is None or not result.best_checkpoints:
        raise RuntimeError(f"the training run left no checkpoint ({result.path})")
    best_ckpt, _ = max(result.best_checkpoints, key=lambda cm: (cm[1][SCORE], cm[1]["epoch"]))
    last = read_checkpoint(result.checkpoint)
    best = last if best_ckpt.path == result.checkpoint.path else read_checkpoint(best_ckpt)
    return best, last
