"""Ray Train adapter of the training loop (`vgg.training.loop`): one net as a `TorchTrainer`
(DDP) job, its checkpoints in Ray's run folder, its epochs logged to MLflow.

How it runs: `train.num_workers` DDP workers (`prepare_model`). Each worker feeds itself
from its own loader over its share of the training shards (`vgg.data.loaders`, by the
augment backend; shares differ by at most one image); the global batch `train.batch_size`
is split across the workers. Every epoch ends with a single-scale centre-crop validation
(sharded, counts all-reduced) that drives the lr schedule, and a checkpoint (rank 0)
reported by every rank. Ray Train keeps the best `keep_checkpoints` by validation top-1
accuracy plus the latest and restarts failed workers from the latest checkpoint
(`max_failures`).

Resuming an interrupted stage is ours, not Ray's snapshot's: every run of the stage is a
new Ray run (`ray_train-<time>-<token>` in the stage's scratch directory), started from
the newest checkpoint on disk that is complete (`scan_checkpoints`: a manifest with the
state file's size and SHA-256 beside it; damaged or partial ones are skipped and named).
A checkpoint counts only once complete, so a kill at any instant loses at most the epoch
in progress; and Ray's processes of a killed run (they outlive a kill by seconds) write
only into their own run's folder, never into the next run's.

The loop itself is the library's; this module passes it Ray's services: the process
group (`TorchDistributed`), the device, a checkpoint sink (`ray.train.report`) and an
MLflow callback (rank 0).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import posixpath
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import ray.train.torch
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.errors import TrackingServerLost, UserError
from pipeline.storage import StageOutput, disk_full, exists, is_local, read_bytes, resolve_uri, write_json
from pipeline.system_metrics import SystemMetrics, sampling
from vgg.config import NetPlan, TrainConfig, to_dict
from vgg.data.augmentation import AugmentSpec
from vgg.data.loaders import build_center_loader, build_train_loader
from vgg.paper import single_test_scale
from vgg.storage import LocalFS, list_dir
from vgg.training.checkpoints import (MANIFEST_FILE, STATE_FILE, check_checkpoint, empty_net, read_checkpoint as read_state,
                                       read_weights, write_checkpoint)
from vgg.training.loop import (EPOCH_METRICS, SCORE, FitOptions, TorchDistributed, TrainCallback,
                               TrainState, fit)
from vgg.training import guard
from vgg.training.schedule import schedule_of
from vgg.training.steps import Precision, describe_choice

if TYPE_CHECKING:
    from pipeline.dag import TrainSection
    from pipeline.stage import StageContext

RUN_PREFIX = "ray_train"  # each run of the stage: <scratch>/ray_train-<time>-<token>/epoch_NNNN/
OUTCOME_SUFFIX = ".outcome.json"  # <scratch>/<run name>.outcome.json: see _tell_driver
#: Seconds between the Ray Train controller's polls of its workers, unless the user set
#: RAY_TRAIN_HEALTH_CHECK_INTERVAL_S. Ray's default, 2 s, paced short epochs: a worker's
#: `ray.train.report` waits until a poll has taken the previous report (a queue of one),
#: and every run's start and end is seen only at a poll.
POLL_S = 0.2
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"

__all__ = ["MANIFEST_FILE", "STATE_FILE", "SavedCheckpoint", "TrainCallback", "WorkerPlan", "best_and_last",
           "fit_trainer", "new_run_name", "outcome_uri", "read_checkpoint", "read_outcome", "scan_checkpoints",
           "trainer"]


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
    resume_uri: str = ""  # the checkpoint folder to start from when this Ray run has none yet

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

    def precision(self, device: torch.device) -> Precision:
        """train.bf16 / channels_last on this worker's device ("auto" resolved there)."""
        return Precision.choose(self.train.bf16, self.train.channels_last, device)

    def fit_options(self, device: torch.device) -> FitOptions:
        return FitOptions(epochs=self.epochs, num_classes=self.num_classes,
                          per_worker_batch=self.per_worker_batch, precision=self.precision(device),
                          seed=self.train.seed, log_every=self.train.log_every, name=self.stage_id,
                          crop=self.spec["crop"])


class MlflowLogger(TrainCallback):
    """Rank 0's epoch and step metrics into the stage's MLflow run.

    Through MLflow's asynchronous logging (`log_batch(synchronous=False)`), so training does
    not wait for the tracking server; `close` waits for them at the end. If the tracking
    server is lost (each call gives up after mlflow.retry_s), training goes on; `close`
    says what failed, the driver fails the stage after training, and the rerun resumes and
    logs the epochs again.
    """

    def __init__(self, plan: WorkerPlan, rank: int):
        self.plan, self.active = plan, rank == 0
        self._client = None
        self._pending: list = []  # mlflow RunOperations
        self._failure: str | None = None  # the first failed MLflow call

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        self.log_epochs([record])

    def on_step_metrics(self, global_step: int, loss: float, lr: float, images_per_s: float) -> None:
        """Step-level metrics (every train.log_every steps), step = the global step."""
        now = int(time.time() * 1000)
        self._log([Metric(k, float(v), now, global_step) for k, v in
                   (("step_loss", loss), ("step_lr", lr), ("step_images_per_s", images_per_s))])

    def log_epochs(self, records: list[dict[str, Any]]) -> None:
        """Per-epoch metrics into the stage's MLflow run, step = epoch."""
        now = int(time.time() * 1000)
        self._log([Metric(k, float(r[k]), now, r["epoch"]) for r in records for k in EPOCH_METRICS
                   if r.get(k) is not None])

    def log_params(self, params: dict[str, Any]) -> None:
        """Params of the worker's own choices (the precision "auto" resolved to)."""
        self._log([], [Param(k, str(v)) for k, v in params.items()])

    def _log(self, metrics: list[Metric], params: list[Param] = ()) -> None:
        if not (self.active and self.plan.run_id and (metrics or params)):
            return
        self._client = self._client or MlflowClient(self.plan.tracking_uri)
        if params:
            self._pending.append(self._client.log_batch(self.plan.run_id, params=list(params), synchronous=False))
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self._pending.append(self._client.log_batch(self.plan.run_id, metrics=metrics[i:i + 1000],
                                                        synchronous=False))

    def close(self) -> str | None:
        """Wait for the MLflow calls; -> the first failure, if any (training went on)."""
        for op in self._pending:
            try:
                op.wait()
            except Exception as e:  # noqa: BLE001 - recorded, and the stage fails after training
                self._failure = self._failure or f"{type(e).__name__}: {e}"[:500]
        self._pending.clear()
        if self._failure and self.active:
            _say(self.plan, f"WARNING: MLflow logging failed, training went on: {self._failure}")
        return self._failure


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: restore or initialise, then the library's loop."""
    plan: WorkerPlan = pickle.loads(config["plan"])
    torch.set_num_threads(max(1, int(plan.train.cpus_per_worker)))  # leave the rest to the decoders
    os.environ.update(plan.mlflow_env)  # bounded MLflow retries, on this node too
    with sampling(plan.system_metrics):  # this node's CPU/GPU/memory, while it trains
        _train(plan)


def _train(plan: WorkerPlan) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    logger = MlflowLogger(plan, rank)
    state, start = _restore(plan, device, ctx, logger)
    loader, val_loader = _loaders(plan, rank, world, device, start)
    try:
        result = fit(state, loader, val_loader, plan.fit_options(device), start=start, comm=TorchDistributed(),
                     device=device, checkpoint=stop_on_full_disk(_reporter(plan, rank), device),
                     callbacks=(logger, *plan.callbacks))
    except DiskFullStop as e:  # every rank stops here and returns: no retry can find space
        if rank == 0:
            _tell_driver(plan, e.facts(plan))
        logger.close()
        return
    if result.diverged is not None and rank == 0:  # the same facts on every rank
        d = result.diverged
        _tell_driver(plan, {"diverged": d.where, "epoch": d.epoch + 1, "step": None if d.step is None else d.step + 1,
                            "lr": d.lr, "reason": d.reason})
    failure = logger.close()
    if failure is not None:
        _tell_driver(plan, {"mlflow_failed": failure})


def _restore(plan: WorkerPlan, device: torch.device, ctx, logger: MlflowLogger) -> tuple[TrainState, int]:
    """(state with the DDP net, first epoch) from the latest checkpoint or the initial weights."""
    t = plan.train
    net = empty_net(plan.net.arch, num_classes=plan.num_classes, width=t.width,
                    crop=plan.spec["crop"], dropout=t.dropout, batch_norm=t.batch_norm)
    checkpoint = ray.train.get_checkpoint()  # this Ray run's own, after a worker restart
    if checkpoint is not None:
        saved = read_checkpoint(checkpoint)
    else:  # an earlier run's, chosen by the driver (scan_checkpoints)
        saved = _read_state(plan.resume_uri) if plan.resume_uri else None
    net.load_state_dict(read_weights(plan.init_uri) if saved is None else saved["model"])
    precision = plan.precision(device)
    if rank_zero(ctx):
        _say(plan, describe_choice(t.bf16, t.channels_last, precision, device))
        logger.log_params(precision.params())
    net = precision.net(net)
    net = ray.train.torch.prepare_model(net)  # DDP (world > 1); broadcasts rank 0's weights
    if t.compile:  # the whole DDP module, as PyTorch recommends; checkpoints use plain_net(net)
        net = torch.compile(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=plan.net.lr, momentum=t.momentum,
                                weight_decay=t.weight_decay)
    state = TrainState(net, optimizer, schedule_of(optimizer, t, plan.net))
    start = 0
    if saved is not None:
        state.load_state_dict(saved, with_model=False)
        start = saved["epoch"] + 1
        state.progress["resumes"].append({"after_epoch": saved["epoch"], "time": time.time(),
                                          "mlflow_run_id": plan.run_id})
        if saved.get("mlflow_run_id") != plan.run_id:  # a new stage run: re-log the past epochs
            logger.log_epochs(state.progress["history"])
        if rank_zero(ctx):
            _say(plan, f"resumed after epoch {saved['epoch'] + 1}")
    state.progress["workers"] = _placement(ctx, device)
    return state, start


def rank_zero(ctx) -> bool:
    return ctx.get_world_rank() == 0


def read_checkpoint(checkpoint) -> dict[str, Any]:
    """The state saved by `_reporter` in a Ray Train checkpoint."""
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def _read_state(folder_uri: str) -> dict[str, Any]:
    return read_state(*resolve_uri(folder_uri))


def _loaders(plan: WorkerPlan, rank: int, world: int, device: torch.device, start: int):
    """This worker's training loader (its share) and centre-crop validation loader."""
    spec = AugmentSpec.from_dict(plan.spec)
    spec = dataclasses.replace(spec, channels_last=plan.precision(device).channels_last)  # NHWC batches
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


def _reporter(plan: WorkerPlan, rank: int):
    """The loop's checkpoint sink: report the epoch on every rank; rank 0 attaches the
    checkpoint (all ranks hold the same weights and optimizer state). No RNG state: every
    epoch reseeds from (seed, epoch, rank)."""

    def report(state: TrainState, record: dict[str, Any]) -> None:
        metrics = {k: record[k] for k in ("epoch", SCORE, "val_top1_err", "val_top5_err", "train_loss", "lr")}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                saved = {**state.state_dict(), "config": to_dict(plan.section), "mlflow_run_id": plan.run_id}
                write_checkpoint(LocalFS(), tmp, saved, state.epoch, record[SCORE])
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{state.epoch:04d}")

    return report


class DiskFullStop(Exception):
    """Rank 0 could not save a checkpoint: the disk is full. Every rank raises it (agreed
    through the process group) and the worker function returns normally, so that Ray Train
    does not retry (`FailureConfig.max_failures`) what no retry can fix; the driver reads
    the facts (`_tell_driver`) and fails the stage in one line."""

    def __init__(self, epoch: int, cause: str):
        super().__init__(cause)
        self.epoch, self.cause = epoch, cause

    def facts(self, plan: WorkerPlan) -> dict[str, Any]:
        """After removing the partial checkpoint of the epoch (it holds the space the facts
        need): what the driver is told."""
        fs, path = resolve_uri(plan.outcome_uri[:-len(OUTCOME_SUFFIX)])
        partial = posixpath.join(path, f"epoch_{self.epoch:04d}")
        if exists(fs, partial):
            fs.delete_dir(partial)
        return {"disk_full": self.cause[:500], "epoch": self.epoch + 1}


def stop_on_full_disk(report, device: torch.device):
    """The checkpoint sink `report`, stopping every rank with `DiskFullStop` when one could
    not save its checkpoint for a full disk (one flag all-reduced per epoch)."""
    import torch.distributed as dist

    def guarded(state: TrainState, record: dict[str, Any]) -> None:
        full = ""
        try:
            report(state, record)
        except Exception as e:  # noqa: BLE001 - any other failure is raised as before
            if not disk_full(e):
                raise
            full = f"{type(e).__name__}: {e}"
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1.0 if full else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0 and not full:
                full = "another rank could not save its checkpoint: no space left on device"
        if full:
            raise DiskFullStop(state.epoch, full)

    return guarded


def _tell_driver(plan: WorkerPlan, facts: dict[str, Any]) -> None:
    """What the driver must know after fit() but Ray Train's Result does not carry (it keeps
    the metrics of checkpoints only): a file in the stage's scratch directory."""
    fs, path = resolve_uri(plan.outcome_uri)
    earlier = json.loads(read_bytes(fs, path)) if exists(fs, path) else {}
    write_json(fs, path, {**earlier, **facts})  # a divergence and a lost server: both told


def _say(plan: WorkerPlan, msg: str) -> None:
    sys.stderr.write(f"  [{plan.stage_id}] {msg}\n")  # not print(): Ray Train's print patch
    sys.stderr.flush()


def _placement(ctx, device: torch.device) -> list[dict[str, Any]]:
    """Every rank's node (id, rank) and device, gathered on all ranks."""
    import torch.distributed as dist

    me = {"rank": ctx.get_world_rank(), "node_rank": ctx.get_node_rank(),
          "node_id": ray.get_runtime_context().get_node_id(), "device": str(device)}
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [me]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    return everyone


# ---------------------------------------------------------------- the driver's side
@dataclass(frozen=True)
class SavedCheckpoint:
    """A complete checkpoint on disk: its folder, epoch, score and the Ray run it belongs to."""

    uri: str  # the checkpoint folder
    run: str  # the Ray run's folder name (ray_train-...)
    epoch: int
    score: float


def new_run_name() -> str:
    """A fresh Ray run name for one run of a train stage (sorts by start time)."""
    return f"{RUN_PREFIX}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def outcome_uri(scratch: StageOutput, run: str) -> str:
    return scratch.file_uri(run + OUTCOME_SUFFIX)


def scan_checkpoints(scratch: StageOutput) -> tuple[list[SavedCheckpoint], list[tuple[str, str]]]:
    """Every complete checkpoint of every earlier Ray run of this stage and key, the newest
    epoch first (on ties, the later run), and the folders skipped with the reason."""
    found: list[SavedCheckpoint] = []
    skipped: list[tuple[str, str]] = []
    if not exists(scratch.fs, scratch.path):
        return found, skipped
    runs = [e for e in list_dir(scratch.fs, scratch.path) if e.is_dir and e.base_name.startswith(RUN_PREFIX)]
    for run in runs:
        for e in list_dir(scratch.fs, run.path):
            if not (e.is_dir and e.base_name.startswith("epoch_")):
                continue
            uri = scratch.file_uri(run.base_name, e.base_name)
            try:
                epoch, score = check_checkpoint(scratch.fs, e.path)
            except ValueError as why:
                skipped.append((uri, str(why)))
                continue
            found.append(SavedCheckpoint(uri, run.base_name, epoch, score))
    found.sort(key=lambda c: (c.epoch, c.run), reverse=True)
    return found, skipped


def read_outcome(uri: str, remove: bool = True) -> dict[str, Any]:
    """The workers' `_tell_driver` facts ({} if none); removed once read."""
    fs, path = resolve_uri(uri)
    if not exists(fs, path):
        return {}
    facts = json.loads(read_bytes(fs, path))
    if remove:
        fs.delete_file(path)
    return facts


def trainer(plan: WorkerPlan, scratch: StageOutput, run: str) -> TorchTrainer:
    """The TorchTrainer of one run of the stage, in <scratch>/<run>."""
    t = plan.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        # Pickled here: Ray Train hands train_loop_config to its controller too (in the run
        # context), which would otherwise import this module and MLflow to unpickle the
        # plan (0.7 s of CPU here, before any worker starts); only the workers need it.
        train_loop_config={"plan": pickle.dumps(plan)},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run,
            storage_path=scratch.uri,
            # Ray keeps the best `num_to_keep` by score *and* always the latest.
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                               checkpoint_score_attribute=SCORE,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
    )


def fit_trainer(trainer: TorchTrainer):
    """`trainer.fit()` with the controller polling every `POLL_S` (Ray Train passes the
    variable from this process to its controller and workers when it is set here)."""
    if os.environ.get(POLL_ENV):  # the user's choice
        return trainer.fit()
    os.environ[POLL_ENV] = str(POLL_S)
    try:
        return trainer.fit()
    finally:
        os.environ.pop(POLL_ENV, None)


def best_and_last(scratch: StageOutput, run: str, log=lambda msg: None) -> tuple[dict[str, Any], dict[str, Any]]:
    """States of the best checkpoint (the epoch the last state's history selected: max val
    top-1 accuracy, the later epoch on ties) and of the latest, from the complete checkpoints
    on disk (this run's first where epochs tie)."""
    found, _ = scan_checkpoints(scratch)
    if not found:
        raise RuntimeError(f"the training run left no complete checkpoint ({scratch.file_uri(run)})")
    mine = lambda c: c.run == run  # noqa: E731
    latest = max(found, key=lambda c: (c.epoch, mine(c), c.run))
    last = _read_state(latest.uri)
    want = (last["progress"].get("best") or {}).get("epoch")
    hits = [c for c in found if c.epoch == want]
    if hits:
        chosen = max(hits, key=lambda c: (mine(c), c.run))
    else:  # kept by no run (deleted, or damaged): the best complete one left
        chosen = max(found, key=lambda c: (c.score, c.epoch))
        log(f"WARNING: the checkpoint of the selected epoch {'?' if want is None else want + 1} is gone; using epoch {chosen.epoch + 1} "
            f"(val top-1 acc {chosen.score:.3f}), the best complete one left")
    best = last if chosen.uri == latest.uri else _read_state(chosen.uri)
    return best, last


# ---------------------------------------------------------------- what the driver makes of the workers' outcome
class TrainingDiverged(UserError, RuntimeError):
    """The loss or the weights broke the divergence guard (`vgg.training.guard`): nothing is
    published."""


def check_outcome(outcome: dict[str, Any], config: TrainSection, ctx: StageContext) -> None:
    """What the workers told the driver: a lost tracking server, or a divergence."""
    if outcome.get("mlflow_failed"):
        raise TrackingServerLost(
            f"{ctx.stage_id}: training finished, but logging its epochs to the MLflow tracking "
            f"server {ctx.tracking.tracking_uri} failed ({outcome['mlflow_failed']}); "
            "nothing is published. Start the server again and re-run: the stage resumes from "
            "its last checkpoint and logs the epochs again")
    if outcome.get("diverged"):
        raise TrainingDiverged(diverged_message(ctx.stage_id, config, outcome))


def diverged_message(stage_id: str, config: TrainSection, outcome: dict[str, Any]) -> str:
    """The one line of a divergence: where, why, and the key to lower (no --force needed:
    another lr is another cache key, so the stage trains afresh)."""
    key, lr = f"train.nets.{config.name}.lr", config.net.lr
    return (guard.message(stage_id, outcome["epoch"], outcome["step"], outcome["lr"], outcome["reason"])
            + f" ({key} = {lr:g}; e.g. --set {key}={lr / 10:g}: another lr is another cache key, so "
            "the stage trains afresh, no --force needed)")


class NoSpace(UserError, RuntimeError):
    """The disk holding work_dir filled up during training: the line says how much the
    stage needs; partial checkpoints are removed, complete ones kept for the resume."""

    keep_traceback = False


def no_space(ctx: StageContext, config: TrainSection, net: torch.nn.Module) -> NoSpace:
    """After a full disk stopped training: remove the partial checkpoints (the complete ones
    stay: the rerun resumes from the newest); -> the error saying what the stage needs."""
    found, skipped = scan_checkpoints(ctx.scratch)
    for uri, _ in skipped:
        fs, path = resolve_uri(uri)
        if exists(fs, path):
            fs.delete_dir(path)
    weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    sizes = [read_bytes_size(c.uri) for c in found]
    checkpoint = max(sizes) if sizes else 2 * weights  # the weights and SGD's momentum
    keep = config.train.keep_checkpoints + 1  # the best `keep_checkpoints` and the latest
    need = keep * checkpoint + 2 * weights  # and model.pt, and its copy as an MLflow model
    free = free_bytes(ctx.scratch.path) if is_local(ctx.scratch.fs) else None
    resume = f"the rerun resumes after epoch {found[0].epoch + 1}" if found else "the rerun starts over"
    return NoSpace(
        f"no space left on the device holding {ctx.scratch.uri}: {ctx.stage_id} needs about {_mb(need)} "
        f"({keep} checkpoints of {_mb(checkpoint)}, model.pt and its MLflow copy {_mb(2 * weights)}), "
        f"{_mb(sum(sizes))} of it in the complete checkpoints it keeps"
        + (f"; {_mb(free)} free" if free is not None else "")
        + f". Partial checkpoints removed; free some space (or move work_dir) and run the same command "
        f"again: {resume}")


def read_bytes_size(folder_uri: str) -> int:
    fs, path = resolve_uri(folder_uri)
    return fs.get_file_info(f"{path}/{STATE_FILE}").size or 0


def free_bytes(path: str) -> int | None:
    import shutil

    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or "/").free
    except OSError:
        return None


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"
