"""The training loop of the paper (Sec. 3.1) in plain PyTorch: epochs of mini-batch SGD,
a single-scale centre-crop validation after each, the plateau schedule, the best epoch.

Recipe: mini-batch SGD on the multinomial logistic loss, momentum 0.9, weight decay 5e-4,
dropout 0.5 on FC1/FC2, the lr divided by 10 when the validation accuracy stops improving
(`vgg.training.schedule`), a fixed epoch budget.

The launcher's services are handed in, as in Lightning Fabric: `comm` all-reduces across
the processes of a data-parallel job (`TorchDistributed()` under Ray Train or torchrun;
`LOCAL`, the default, on one process), `checkpoint(state)` stores an epoch's state
wherever the launcher keeps checkpoints, and `TrainCallback`s see every step and epoch
(progress, MLflow, fault injection). So one loop runs in a notebook on one CPU, on one GPU
(`python -m vgg.ladder`) and on a Ray cluster (`pipeline.ray_train`).

    net = build_vgg("A", num_classes=10, crop=112)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    state = TrainState(net, opt, PlateauSchedule(opt))
    result = fit(state, train_loader, val_loader, FitOptions(epochs=10, num_classes=10))
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vgg.paper import TOPK
from vgg.progress import Progress
from vgg.results.metrics import health_of, meaningful_topk
from vgg.training import guard
from vgg.training.checkpoints import SCORE  # the checkpoint score (higher is better)
from vgg.training.schedule import PlateauSchedule
from vgg.training.steps import Precision, sgd_step, topk_hits

PROGRESS_EVERY_S = 10.0  # at most one progress line per epoch every this many seconds
EPOCH_METRICS = ("train_loss", "train_top1_err", "train_top5_err", "val_top1_err", "val_top5_err",
                 "lr", "images_per_s", "epoch_seconds")


# ---------------------------------------------------------------- the launcher's services
class Comm(Protocol):
    """Reductions across the processes of a data-parallel job, in place on a tensor."""

    rank: int
    world: int

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class Local:
    """One process: every reduction is the identity."""

    rank: int = 0
    world: int = 1

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        return x


LOCAL = Local()


class TorchDistributed:
    """The default process group of `torch.distributed` (Ray Train's, torchrun's)."""

    _OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}

    def __init__(self):
        initialised = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if initialised else 0
        self.world = dist.get_world_size() if initialised else 1

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x, op=getattr(dist.ReduceOp, self._OPS[op]))
        return x


class TrainCallback:
    """Hooks into the loop on every process (picklable: under Ray they run inside the
    workers). The base class does nothing; the workflow logs to MLflow through them, the
    tests kill a worker, stall one, or record the rows each rank read."""

    #: Whether `on_epoch_rows` should receive the rows (the loader then returns them).
    wants_rows: bool = False

    def on_step(self, epoch: int, step: int, rank: int) -> None:
        """Before each training step."""

    def on_step_metrics(self, global_step: int, loss: float, lr: float, images_per_s: float) -> None:
        """Every `FitOptions.log_every` steps (rank 0 only): the step's mean loss and the rate."""

    def on_epoch_rows(self, epoch: int, rank: int, rows: list[int], steps: int) -> None:
        """After each epoch's steps: the shard rows this rank trained on (if wants_rows)."""

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        """After each epoch's checkpoint (rank 0 only): its history record."""

    def after_checkpoint(self, epoch: int, rank: int) -> None:
        """After each epoch's checkpoint was stored, on every rank."""


# ---------------------------------------------------------------- state and options
@dataclass
class TrainState:
    """What a checkpoint holds: the net, SGD's state, the schedule and the history."""

    net: nn.Module  # possibly wrapped (DDP, torch.compile); `plain_net` unwraps it
    optimizer: torch.optim.Optimizer
    schedule: PlateauSchedule
    #: history (one record per epoch), best (the selected epoch's record), resumes, workers
    progress: dict[str, Any] = field(default_factory=lambda: {"history": [], "best": None, "resumes": [],
                                                              "workers": []})
    epoch: int = -1  # the last finished epoch

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: model (CPU tensors), optimizer, schedule, epoch, progress."""
        return {"model": {k: v.cpu() for k, v in plain_net(self.net).state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "epoch": self.epoch, "progress": self.progress}

    def load_state_dict(self, state: dict[str, Any], with_model: bool = True) -> None:
        """Restore a `state_dict` (the net's weights too unless `with_model` is False)."""
        if with_model:
            plain_net(self.net).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.progress, self.epoch = state["progress"], state["epoch"]


@dataclass(frozen=True)
class FitOptions:
    """How `fit` runs (the recipe's numbers are in the optimizer and the schedule)."""

    epochs: int
    num_classes: int
    #: Images per step on this process (the global batch / the processes); the loss of a
    #: step is its sum / this, so after DDP's averaging every image weighs 1 / global batch.
    per_worker_batch: int = 256
    precision: Precision = Precision()
    seed: int = 0  # dropout's randomness: reseeded from (seed, epoch, rank) every epoch
    log_every: int = 50  # on_step_metrics every this many steps (0: never)
    name: str = "train"  # prefix of progress lines
    crop: int = 224  # the crop of the images (empty batches of padded steps)


@dataclass(frozen=True)
class Diverged:
    """Why training stopped: where, with what loss and learning rate."""

    epoch: int  # 0-based
    step: int | None  # 0-based, None: found in the weights after the epoch
    loss: float
    lr: float
    reason: str

    @property
    def where(self) -> str:
        return f"epoch {self.epoch + 1}" + (f" step {self.step + 1}" if self.step is not None else "")


@dataclass(frozen=True)
class FitResult:
    """The state after the last epoch run, and the divergence that stopped it, if any."""

    state: TrainState
    diverged: Diverged | None = None

    @property
    def best(self) -> dict[str, Any] | None:
        return self.state.progress["best"]


# ---------------------------------------------------------------- the loop
def fit(state: TrainState, loader, val_loader, opts: FitOptions, *, start: int = 0,
        comm: Comm = LOCAL, device: torch.device = torch.device("cpu"),
        checkpoint: Callable[[TrainState, dict[str, Any]], None] | None = None,
        callbacks: Sequence[TrainCallback] = (), say: Callable[[str], None] | None = None) -> FitResult:
    """Train epochs `start`..`opts.epochs - 1`: each a pass of `loader.epoch(e)`, a
    validation on `val_loader`, a schedule step, then `checkpoint(state, record)`.

    A divergence (`vgg.training.guard`: a non-finite loss or weight, or a finite loss above
    the guard's ceiling, on any step or for the epoch) ends training before the epoch's
    checkpoint: the result says where and why; nothing of that epoch is kept.
    """
    rank = comm.rank
    say = say or (_say(opts.name) if rank == 0 else (lambda msg: None))
    steps = _all(comm, len(loader), "max", device)  # ranks with a smaller share pad with empty steps
    say(f"{comm.world} worker(s) x batch {opts.per_worker_batch}, {steps} steps/epoch, "
        + epochs_left(start, opts.epochs))
    for epoch in range(start, opts.epochs):
        torch.manual_seed(epoch_seed(opts.seed, epoch, rank))  # dropout: (seed, epoch, rank) only
        t0 = time.perf_counter()
        history = state.progress["history"]
        first = history[0]["train_loss"] if history else None  # the guard's reference
        train, bad = train_one_epoch(state.net, loader, state.optimizer, steps, epoch, opts, comm, device,
                                     callbacks, ceiling=guard.ceiling(first, opts.num_classes))
        loss = train[0].item() / max(train[1].item(), 1)
        why = ((bad and (guard.explosion(bad[1], first, opts.num_classes)
                         or f"the loss of step {bad[0] + 1} broke the guard on another worker"))
               or guard.explosion(loss, first, opts.num_classes)
               or (None if finite_weights(state.net, device) else "the weights became NaN or infinite"))
        if why is not None:
            diverged = Diverged(epoch, bad[0] if bad else None, loss, state.schedule.lr, why)
            say(f"training diverged at {diverged.where}: {why}")
            return FitResult(state, diverged)
        t1 = time.perf_counter()
        val = validate(plain_net(state.net), val_loader, opts, comm, device)
        record = epoch_record(epoch, state.schedule.lr, train, val, t1 - t0, time.perf_counter() - t0,
                              opts.num_classes)
        record["lr_dropped"] = state.schedule.step(record[SCORE], epoch)
        progress = state.progress
        progress["history"].append(record)
        if progress["best"] is None or record[SCORE] >= progress["best"][SCORE]:  # ties: later (as Ray)
            progress["best"] = {k: record.get(k) for k in ("epoch", SCORE, "val_top1_err",
                                                             "val_top5_err", "val_health")}
        state.epoch = epoch
        if checkpoint is not None:
            checkpoint(state, record)
        if rank == 0:
            for cb in callbacks:
                cb.on_epoch_end(record)
        say(epoch_line(record, opts.epochs))
        for cb in callbacks:
            cb.after_checkpoint(epoch, rank)
    return FitResult(state)


def train_one_epoch(net: nn.Module, loader, optimizer, steps: int, epoch: int, opts: FitOptions,
                    comm: Comm, device: torch.device, callbacks: Sequence[TrainCallback] = (),
                    ceiling: float = float("inf")) -> tuple[torch.Tensor, tuple[int, float] | None]:
    """One epoch of SGD; returns the all-reduced [loss sum, images, top-1 hits, top-5 hits]
    and (step, this rank's mean loss there) of the first step (on any rank) whose mean loss
    was not finite or above `ceiling` (the divergence guard's), or None.

    Every rank runs `steps` steps; a rank whose share ran out runs an empty batch, which
    takes part in DDP's gradient all-reduce with zero gradients and then applies the same
    averaged gradient, so weights and momentum stay identical on all ranks (unlike
    DDP's Join, whose joined ranks skip optimizer steps and fall out of sync).
    """
    rank = comm.rank
    net.train()
    sums = torch.zeros(2 + len(TOPK), dtype=torch.float64, device=device)
    # the first step whose loss broke the guard, and that loss; kept on the device (no sync
    # per step), read at the end
    bad_step = torch.tensor(steps, dtype=torch.long, device=device)
    bad_loss = torch.zeros((), dtype=torch.float64, device=device)
    batches = iter(loader.epoch(epoch))
    wants_rows = any(cb.wants_rows for cb in callbacks)
    rows: list[int] = []
    bar = Progress(opts.name, f"epoch {epoch + 1}/{opts.epochs}", steps, every_s=PROGRESS_EVERY_S,
                   unit="steps", active=rank == 0)
    note, t_log = "", time.perf_counter()
    for step in range(steps):
        for cb in callbacks:
            cb.on_step(epoch, step, rank)
        batch = next(batches, None)
        if batch is None:
            images, labels = _empty_batch(opts.crop, device)
        else:
            images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            if wants_rows:
                rows += batch[2]["row"].tolist()
        step_sums = sgd_step(net, optimizer, images, labels, opts.per_worker_batch, opts.precision)
        mean = step_sums[0] / step_sums[1].clamp(min=1)
        broke = ~torch.isfinite(mean) | (mean > ceiling)
        bad_step = torch.where(broke, bad_step.clamp(max=step), bad_step)
        bad_loss = torch.where(bad_step == step, mean, bad_loss)
        sums += step_sums
        every = opts.log_every
        if every and (step + 1) % every == 0:
            loss = step_sums[0].item() / max(len(labels), 1)
            now = time.perf_counter()
            rate = opts.per_worker_batch * comm.world * every / max(now - t_log, 1e-9)
            t_log = now
            if rank == 0:
                for cb in callbacks:
                    cb.on_step_metrics(epoch * steps + step + 1, loss, optimizer.param_groups[0]["lr"], rate)
            note = f"loss {loss:.4f}, {rate:.0f} img/s"
        bar.update(1, note)
    if next(batches, None) is not None:  # also lets the loader finish its pass cleanly
        raise RuntimeError("the training loader yielded more batches than it announced")
    if wants_rows:
        for cb in callbacks:
            cb.on_epoch_rows(epoch, rank, rows, steps)
    first_bad = _all(comm, bad_step, "min", device)
    return comm.all_reduce(sums, "sum"), ((first_bad, bad_loss.item()) if first_bad < steps else None)


@torch.no_grad()
def validate(net: nn.Module, loader, opts: FitOptions, comm: Comm = LOCAL,
             device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Centre-crop validation over this rank's share; all-reduced [images, top-1 hits,
    top-5 hits, then the (5, K) `metrics.prediction_stats` sums, flattened] (for the
    collapse check).

    Runs on the unwrapped net: ranks may see different numbers of batches, and DDP's
    forward would try to sync buffers with the others.
    """
    k, precision = opts.num_classes, opts.precision
    net.eval()
    sums = torch.zeros(1 + len(TOPK) + 5 * k, dtype=torch.float64, device=device)
    if loader.num_samples:
        for images, labels, _keys in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with precision.autocast(device):
                logits = net(precision.images(images)).float()
            probs = logits.softmax(1).double()  # (B, K)
            pred = logits.argmax(1)
            sums += torch.cat([torch.tensor([float(len(labels))], device=device, dtype=torch.float64),
                               torch.stack(topk_hits(logits, labels)),
                               torch.bincount(pred, minlength=k).double(), probs.sum(0), (probs * probs).sum(0),
                               torch.bincount(labels, minlength=k).double(),
                               torch.bincount(labels[pred == labels], minlength=k).double()])
    return comm.all_reduce(sums, "sum")


def epoch_record(epoch: int, lr: float, train: torch.Tensor, val: torch.Tensor,
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
            health_of(np.asarray(val[1 + len(TOPK):].tolist()).reshape(5, num_classes)))
    return rec


def epochs_left(start: int, epochs: int) -> str:
    """The epochs a run trains, counted from 1 as the progress lines count them (`epoch 3/3`
    is the third); `start` epochs are done already."""
    if start >= epochs:
        return f"all {epochs} epochs done, none left to train"
    return f"epochs {start + 1}..{epochs} of {epochs}" if start else f"epochs 1..{epochs}"


def epoch_line(r: dict[str, Any], epochs: int) -> str:
    top5 = f" top-5 {r['val_top5_err']:.1%}" if r.get("val_top5_err") is not None else ""
    drop = " (lr divided)" if r["lr_dropped"] else ""
    return (f"epoch {r['epoch'] + 1}/{epochs} loss {r['train_loss']:.4f} val top-1 err "
            f"{r['val_top1_err']:.1%}{top5} lr {r['lr']:.2g}{drop} {r['images_per_s']:.0f} img/s "
            f"{r['epoch_seconds']:.1f} s")


# ---------------------------------------------------------------- helpers
def plain_net(net: nn.Module) -> nn.Module:
    """The plain net inside torch.compile's and DDP's wrappers (clean state-dict keys)."""
    while True:
        if isinstance(net, nn.parallel.DistributedDataParallel):
            net = net.module
        elif hasattr(net, "_orig_mod"):  # torch.compile's OptimizedModule
            net = net._orig_mod
        else:
            return net


def finite_weights(net: nn.Module, device: torch.device) -> bool:
    """Whether every parameter is finite (identical on all ranks: DDP keeps them in sync)."""
    ok = torch.stack([torch.isfinite(p).all() for p in net.parameters()]).all()
    return bool(ok.to(device).item())


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _all(comm: Comm, x: int | torch.Tensor, op: str, device: torch.device) -> int:
    t = x if isinstance(x, torch.Tensor) else torch.tensor([x], dtype=torch.long, device=device)
    return int(comm.all_reduce(t, op).item())


def _empty_batch(crop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros((0, 3, crop, crop), device=device),
            torch.zeros((0,), dtype=torch.long, device=device))


def _say(name: str) -> Callable[[str], None]:
    def say(msg: str) -> None:  # not print(): Ray Train's print patch would echo the line twice
        sys.stderr.write(f"  [{name}] {msg}\n")
        sys.stderr.flush()
    return say
