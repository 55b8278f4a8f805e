"""The train/<net> stages: one net of the training plan on Ray Train (paper section 3.1).

Deeper nets start from A's first four convs and three FCs (`init: {from_A: ...}`),
S=384 / jittered nets from a whole same-architecture net (`init: {full: ...}`);
`weights: <torchvision state_dict>` imports released weights instead of training.
The recipe: `vgg.training.loop`; how it runs on Ray Train: `pipeline.ray_train`.

Output (`vgg.artifacts.TrainedNet`): model.pt (the best epoch's weights), history.json,
learning_curves.png, init.json (which tensors came from the source net).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.config import NetPlan, to_dict
from pipeline.dag import TrainInputs, TrainSection
from pipeline.stage import NetToLog, StageContext, StageResult
from pipeline.storage import disk_full, is_local, write_bytes, write_json
from vgg.artifacts import HISTORY_FILE, INIT_FILE, MODEL_FILE, DatasetRef, split_dataset, write_model
from vgg.models import VGG
from vgg.results.metrics import Health
from vgg.training.checkpoints import import_weights, initial_model, write_init_weights
from vgg.training.curves import plot_curves
from pipeline.ray_train import (NoSpace, SavedCheckpoint, TrainCallback, TrainingDiverged, WorkerPlan,  # noqa: F401
                                 best_and_last, check_outcome, diverged_message, fit_trainer, free_bytes,
                                 new_run_name, no_space, outcome_uri, read_outcome, scan_checkpoints, trainer)

CURVES_FILE = "learning_curves.png"


def run(config: TrainSection, inputs: TrainInputs, ctx: StageContext,
        callbacks: Sequence[TrainCallback] = ()) -> StageResult:
    """Train (or import) one net. `callbacks` run inside every worker (tests use them)."""
    t, net_plan = config.train, config.net
    classes = inputs.shards.classes()
    spec = inputs.augmentation.spec()
    datasets = [split_dataset(inputs.shards, "train", "training"),
                split_dataset(inputs.shards, "val", "validation")]
    if net_plan.weights is not None:
        return _run_import(config, ctx, classes, spec.crop, datasets)
    net, init = initial_model(t, net_plan, len(classes), spec.crop, inputs.init)
    write_json(ctx.out.fs, ctx.out.join(INIT_FILE), init)
    epochs = net_plan.epochs if net_plan.epochs is not None else t.max_epochs
    params = {"per_worker_batch": t.batch_size // t.num_workers, "global_batch": t.batch_size,
              "epochs_planned": epochs, "init_copied_tensors": len(init["copied"]),
              "num_classes": len(classes), "crop": spec.crop}
    if epochs == 0:  # nothing to train: the initial weights are the result
        meta = _meta(config, classes, epoch=None, errs=(None, None), origin="initial")
        return _finish(ctx, net, meta, {"epochs": [], "lr_drops": [], "resumes": []}, params,
                       "0 epochs: wrote the initial weights", datasets)
    resume = _resume_point(ctx)
    run_name = new_run_name()  # this run's own folder: a killed run's processes cannot write here
    plan = WorkerPlan(ctx.stage_id, config, inputs.shards.uri, spec.to_dict(), len(classes),
                      write_init_weights(ctx.scratch, net), epochs, ctx.tracking.tracking_uri,
                      ctx.tracking.run_id, tuple(callbacks),
                      {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP_")},
                      outcome_uri(ctx.scratch, run_name), ctx.system_metrics,
                      resume.uri if resume is not None else "")
    try:
        fit_trainer(trainer(plan, ctx.scratch, run_name))
    except Exception as e:
        if disk_full(e):  # e.g. Ray Train's own files: one line, not Ray's error
            raise no_space(ctx, config, net) from None
        raise
    outcome = read_outcome(plan.outcome_uri)
    if outcome.get("disk_full") or disk_full(RuntimeError(outcome.get("mlflow_failed") or "")):
        raise no_space(ctx, config, net)
    check_outcome(outcome, config, ctx)
    best_state, last_state = best_and_last(ctx.scratch, run_name, ctx.log)
    if last_state["epoch"] + 1 < epochs:  # stopped early, and no outcome said why: publish nothing
        free = free_bytes(ctx.scratch.path) if is_local(ctx.scratch.fs) else None
        if free is not None and free < (1 << 20):
            raise no_space(ctx, config, net)
        raise RuntimeError(f"{ctx.stage_id}: training stopped after epoch {last_state['epoch'] + 1} of "
                           f"{epochs} without saying why; nothing is published")
    resuming = resume is not None
    progress = last_state["progress"]
    history = {"epochs": progress["history"], "best": progress["best"],
               "lr_drops": last_state["schedule"]["drops"], "resumes": progress["resumes"],
               "workers": progress["workers"]}
    if resuming and not any(r.get("mlflow_run_id") == ctx.tracking.run_id for r in history["resumes"]):
        # killed after its last checkpoint: nothing was left to train, so no checkpoint
        # recorded this resume
        history["resumes"].append({"after_epoch": last_state["epoch"], "time": time.time(),
                                   "mlflow_run_id": ctx.tracking.run_id})
    best = progress["best"]
    net.load_state_dict(best_state["model"])
    meta = _meta(config, classes, epoch=best_state["epoch"],
                 errs=(best["val_top1_err"], best["val_top5_err"]), origin="trained")
    params.update(resumes=len(history["resumes"]), ray_run=ctx.scratch.file_uri(run_name))
    last = history["epochs"][-1]
    summary = (f"best epoch {best['epoch'] + 1}/{epochs}: val top-1 err {best['val_top1_err']:.1%}"
               + (f", top-5 {best['val_top5_err']:.1%}" if best["val_top5_err"] is not None else "")
               + f"; final loss {last['train_loss']:.4f}, lr drops {len(history['lr_drops'])}, "
               f"{len(history['resumes'])} resume(s)")
    result = _finish(ctx, net, meta, history, params, summary, datasets)
    if best.get("val_health") is not None:
        result.manifest["val_health"] = best["val_health"]
        result.tags.update(collapse_tags(Health(**best["val_health"]), net_plan, ctx.log))
    return result


def _resume_point(ctx: StageContext) -> SavedCheckpoint | None:
    """The newest complete checkpoint of an earlier run of this stage and key (None: start
    from the initial weights); the damaged or partial ones are named and skipped."""
    found, skipped = scan_checkpoints(ctx.scratch)
    for uri, why in skipped:
        ctx.log(f"skipping the checkpoint {uri}: {why}")
    if found:
        ctx.log(f"resuming after epoch {found[0].epoch + 1} from {found[0].uri} (checkpoint folders count from 0)")
    return found[0] if found else None


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


def _meta(config: TrainSection, classes: list[str], epoch: int | None,
          errs: tuple[float | None, float | None], origin: str) -> dict[str, Any]:
    return {"classes": list(classes), "net": config.name, "config": to_dict(config),
            "epoch": epoch, "val_top1_err": errs[0], "val_top5_err": errs[1], "origin": origin}


def _finish(ctx: StageContext, net: VGG, meta: dict[str, Any], history: dict[str, Any],
            params: dict[str, Any], summary: str, datasets: list[DatasetRef]) -> StageResult:
    """Write model.pt, history.json, learning_curves.png; the StageResult (with the net as
    an MLflow model, whatever its size, and the splits it saw as its datasets)."""
    size, sha = write_model(ctx.out, net, meta)
    write_json(ctx.out.fs, ctx.out.join(HISTORY_FILE), history)
    artifacts = [HISTORY_FILE]
    if history["epochs"]:
        write_bytes(ctx.out.fs, ctx.out.join(CURVES_FILE), plot_curves(history, ctx.stage_id))
        artifacts.append(CURVES_FILE)
    if "imported" not in history:
        artifacts.append(INIT_FILE)
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
    example = torch.randn((2, 3, net.crop, net.crop), generator=torch.Generator().manual_seed(0)).numpy()
    model = NetToLog(net, example, {k: v for k, v in metrics.items() if k.startswith("best_val_")},
                     meta["config"], dataset=datasets[1], step=meta["epoch"] or 0)
    return StageResult(metrics=metrics, params=params, artifacts=artifacts, manifest=manifest, summary=summary,
                       datasets=datasets, model=model)


def _run_import(config: TrainSection, ctx: StageContext, classes: list[str], crop: int,
                datasets: list[DatasetRef]) -> StageResult:
    """`weights:` released torchvision weights into model.pt, no training."""
    net_plan = config.net
    net = import_weights(net_plan.weights, net_plan.arch, classes, crop, config.train.dropout)
    meta = _meta(config, classes, epoch=None, errs=(None, None), origin=f"imported {net_plan.weights}")
    history = {"epochs": [], "lr_drops": [], "resumes": [], "imported": net_plan.weights}
    params = {"imported_weights": net_plan.weights, "num_classes": len(classes), "crop": crop}
    return _finish(ctx, net, meta, history, params, f"imported {net_plan.weights} ({net.name}, width 1.0)",
                   datasets)
