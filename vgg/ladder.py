"""The paper's ladder in one process, with PyTorch alone: train every net of a config's plan
(A from scratch, deeper nets from A, fine-tuned scale-jittered nets), evaluate each (dense,
multi-crop, both; single and multi-scale), fuse, and build the report (Tables 3-6 with
intervals, the claims judged, the depth plot).

    python -m vgg.ladder configs/imagenette.yaml --data /data/imagenette-128 --out /tmp/ladder
    python -m vgg.ladder configs/imagenette.yaml --cost 9469 1966     # FLOPs per net, no run

The same config file runs on a Ray cluster through `python pipeline/run.py --config ...`;
this entry point takes its experiment sections (the workflow's keys are ignored) and runs
the library's own code for every step the stages run: `vgg.training.loop.fit` with the
plateau schedule, `vgg.training.checkpoints.initial_model` (init from A),
`vgg.data.augmentation`'s per-sample parameters, `vgg.evaluation.shares.score_share`,
`vgg.results.fusion.fuse` and `vgg.results.report.build_report`. The images are decoded
once into the device's memory and augmented there (`vgg.data.memory`), so on a GPU the
step rate is the model's.

Output (the layout of the stages' outputs, so the workflow's report stage can read it):

    <out>/train/<net>/model.pt, history.json
    <out>/evaluate/<net>/posteriors/<mode>.npz (.parquet where pyarrow is installed), rows.json, health.json
    <out>/fuse/posteriors/fused.*, fusion.json, member_rows.json
    <out>/report/results.md, claims.json, tables/*.json, error_vs_depth.png
    <out>/summary.json   per net: epochs, wall seconds, images/s, MFU; the total
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from vgg.artifacts import (HISTORY_FILE, MODEL_FILE, Evaluation, Fusion, write_evaluation, write_fusion, write_model,
                           write_report)
from vgg.config import ExperimentConfig, NetPlan, load_experiment, to_dict
from vgg.data.augmentation import AugmentSpec, spec_from_config
from vgg.errors import UserError
from vgg.evaluation.scoring import Scorer
from vgg.evaluation.shares import combine_modes, eval_rows, gather, q_sets, score_share
from vgg.models import VGG, forward_macs, set_pool_rounding
from vgg.paper import single_test_scale
from vgg.results import claims
from vgg.results.fusion import fuse
from vgg.results.metrics import health
from vgg.results.report import build_report
from vgg.storage import StageOutput, write_json
from vgg.training.checkpoints import initial_model
from vgg.training.loop import FitOptions, TrainState, fit, plain_net
from vgg.training.schedule import schedule_of
from vgg.training.steps import Precision, describe_choice, mfu

SUMMARY_FILE = "summary.json"


class LadderError(UserError, RuntimeError):
    """A ladder run that cannot go on (a diverged net, unusable data)."""


@dataclass
class _Trained:
    """A net trained in this run, as `initial_model` wants its source (`uri`, `load()`)."""

    uri: str
    net: VGG
    meta: dict[str, Any]

    def load(self) -> tuple[VGG, dict[str, Any]]:
        return self.net, self.meta


def plan_order(nets: dict[str, NetPlan]) -> list[str]:
    """The nets in an order where every net comes after the net it is initialised from."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        src = nets[name].init_source
        if src is not None:
            visit(src.removeprefix("train/"))
        order.append(name)

    for name in nets:
        visit(name)
    return order


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_ladder(cfg: ExperimentConfig, data_root: str, out_dir: str, device: torch.device,
               say=_say) -> dict[str, Any]:
    """Train, evaluate, fuse and report every net of `cfg`'s plan; -> the summary."""
    from vgg.data import memory  # torchvision's decoder; the images in `device` memory

    t_start = time.perf_counter()
    t, e = cfg.train, cfg.evaluate
    if cfg.data.layout != "folders":
        raise LadderError(f"data.layout: the ladder reads image folders (<data>/train/<class>/*, "
                          f"<data>/val/<class>/*), not {cfg.data.layout!r}; the pipeline reads that layout")
    per_class = {"train": cfg.data.train_per_class, "val": cfg.data.val_per_class}
    classes, train_set, val_set = memory.folder_stores(data_root, device, per_class=per_class,
                                                       seed=cfg.shard.seed)
    say(f"data: {len(train_set)} training and {len(val_set)} validation images of {len(classes)} "
        f"classes in {device} memory ({time.perf_counter() - t_start:.1f} s)")
    spec = spec_from_config(cfg.augment, memory.rgb_stats(train_set))
    precision = Precision.choose(t.bf16, t.channels_last, device)
    say(describe_choice(t.bf16, t.channels_last, precision, device) + " (training)")
    spec = dataclasses.replace(spec, channels_last=precision.channels_last)  # the loaders hand NHWC
    out = StageOutput.at(out_dir)
    trained: dict[str, _Trained] = {}
    evaluations: dict[str, Evaluation] = {}
    summary: dict[str, Any] = {"device": _device_name(device), "nets": {}}
    order = plan_order(t.nets)
    evaluated = set(e.nets if e.nets is not None else t.nets)
    for i, name in enumerate(order, 1):
        plan = t.nets[name]
        say(f"[{i}/{len(order)}] train/{name}: {plan.arch} at S={plan.scale}, lr {plan.lr:g}, "
            f"init {plan.init}; ETA of the ladder {_eta(summary, len(order), time.perf_counter() - t_start)}")
        t0 = time.perf_counter()
        net, record = _train(cfg, name, plan, classes, spec, train_set, val_set, trained, precision, device, say)
        uri = StageOutput.at(os.path.join(out_dir, "train", name))
        write_model(uri, net, record["meta"])
        write_json(uri.fs, uri.join(HISTORY_FILE), record["history"])
        trained[name] = _Trained(uri.file_uri(MODEL_FILE), net, record["meta"])
        entry = {"arch": plan.arch, "scale": plan.scale, "epochs": len(record["history"]["epochs"]),
                 "train_seconds": time.perf_counter() - t0, "images_per_s": record["images_per_s"],
                 "forward_macs": forward_macs(net)}
        entry["mfu"] = mfu(entry["images_per_s"], entry["forward_macs"], summary["device"])
        if name in evaluated:
            t1 = time.perf_counter()
            evaluations[name] = _evaluate(cfg, name, plan, net, classes, spec, val_set, out_dir, device)
            entry["evaluate_seconds"] = time.perf_counter() - t1
            entry["best_mode"] = min(evaluations[name].rows(), key=lambda r: r.top1).mode
        summary["nets"][name] = entry
        say(f"  train/{name}: {entry['epochs']} epochs in {entry['train_seconds']:.1f} s, "
            f"{entry['images_per_s']:.0f} images/s" + (f", MFU {entry['mfu']:.1%}" if entry["mfu"] else "")
            + (f"; evaluated in {entry['evaluate_seconds']:.1f} s" if "evaluate_seconds" in entry else ""))
    fusion = None
    if cfg.fuse.members:
        f = fuse(list(cfg.fuse.members), evaluations)
        fuse_out = StageOutput.at(os.path.join(out_dir, "fuse"))
        write_fusion(fuse_out, f.posteriors, f.row, f.member_rows)
        fusion = Fusion(fuse_out)
        say(f"fuse: {' + '.join(cfg.fuse.members)}: top-1 {f.row.top1:.1f}%")
    report = _report(cfg, evaluations, fusion, out_dir)
    summary["claims"] = {str(k): v for k, v in claims.summary(report.claims).items()} if report.claims else {}
    summary["collapsed"] = report.collapsed
    summary["wall_seconds"] = time.perf_counter() - t_start
    write_json(out.fs, out.join(SUMMARY_FILE), summary)
    say(report.markdown)
    say(f"ladder done in {summary['wall_seconds']:.1f} s on {summary['device']}: {out_dir}")
    return summary


def _train(cfg: ExperimentConfig, name: str, plan: NetPlan, classes: list[str], spec: AugmentSpec,
           train_set, val_set, trained: dict[str, _Trained], precision: Precision, device: torch.device,
           say) -> tuple[VGG, dict[str, Any]]:
    """One net of the plan: its initial weights, then `fit`; -> (the best epoch's net, records)."""
    from vgg.data.memory import MemoryEvalLoader, MemoryTrainLoader

    t = cfg.train
    if plan.weights is not None:
        raise LadderError(f"train.nets.{name}.weights: importing released weights is the pipeline's "
                          "(python pipeline/run.py); the ladder trains every net")
    source = trained.get(plan.init_source.removeprefix("train/")) if plan.init_source else None
    net, init = initial_model(t, plan, len(classes), spec.crop, source)
    epochs = plan.epochs if plan.epochs is not None else t.max_epochs
    meta = {"arch": plan.arch, "classes": list(classes), "net": name, "config": {"train": to_dict(t), "net": to_dict(plan)},
            "init": init}
    if epochs == 0:
        meta.update(epoch=None, val_top1_err=None, val_top5_err=None, origin="initial")
        return net.eval(), {"meta": meta, "history": {"epochs": [], "lr_drops": []}, "images_per_s": 0.0}
    net = precision.net(net.to(device))
    run = torch.compile(net) if t.compile else net
    optimizer = torch.optim.SGD(run.parameters(), lr=plan.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    state = TrainState(run, optimizer, schedule_of(optimizer, t, plan))
    scale = tuple(plan.scale) if isinstance(plan.scale, list) else plan.scale
    loader = MemoryTrainLoader(train_set, spec, scale, t.batch_size, seed=t.seed)
    val = MemoryEvalLoader(val_set, spec, single_test_scale(scale, spec.crop), t.batch_size, mode="center")
    best: dict[str, Any] = {}

    def keep_best(s: TrainState, record: dict[str, Any]) -> None:  # the checkpoint sink: in memory
        if s.progress["best"]["epoch"] == record["epoch"]:
            best["model"] = {k: v.detach().clone() for k, v in plain_net(s.net).state_dict().items()}

    opts = FitOptions(epochs=epochs, num_classes=len(classes), per_worker_batch=t.batch_size,
                      precision=precision, seed=t.seed, log_every=0, name=f"train/{name}", crop=spec.crop)
    result = fit(state, loader, val, opts, device=device, checkpoint=keep_best)
    if result.diverged is not None:
        d = result.diverged
        raise LadderError(f"train/{name} diverged at {d.where} (loss {d.loss:.4g}, lr {d.lr:g}): {d.reason}; "
                          f"lower train.nets.{name}.lr")
    plain = plain_net(run)
    plain.load_state_dict(best["model"])
    b = result.best
    history = {"epochs": state.progress["history"], "best": b, "lr_drops": state.schedule.drops}
    meta.update(epoch=b["epoch"], val_top1_err=b["val_top1_err"], val_top5_err=b["val_top5_err"],
                origin="trained")
    rates = [r["images_per_s"] for r in history["epochs"][1:] or history["epochs"]]  # the first compiles
    return plain.eval(), {"meta": meta, "history": history, "images_per_s": sum(rates) / len(rates)}


def _evaluate(cfg: ExperimentConfig, name: str, plan: NetPlan, net: VGG, classes: list[str],
              spec: AugmentSpec, val_set, out_dir: str, device: torch.device) -> Evaluation:
    """Dense, multi-crop and both at single and multi-scale (`score_share` over the images in
    memory), written as an evaluate output."""
    from vgg.data.memory import MemoryEvalLoader

    e = cfg.evaluate
    q_single, q_multi = q_sets(plan.scale, spec.crop, e)
    qs = {"single": [q_single], "multi": q_multi}
    net = set_pool_rounding(net, e.pool_rounding).to(device)
    precision = Precision.choose(e.bf16, e.channels_last, device)
    spec = dataclasses.replace(spec, channels_last=precision.channels_last)
    scorer = Scorer.of(net, precision, e.compile)

    def loader(q: int):
        return MemoryEvalLoader(val_set, spec, q, e.batch_size, mode="dense")

    res = score_share(scorer, loader, sorted({q_single, *q_multi}), device, grid=e.grid, flips=e.flips,
                      batch_size=e.batch_size, name=f"evaluate/{name}")
    modes = combine_modes(gather([res], classes), q_single, q_multi)
    rows = eval_rows(modes, name, plan, qs)
    best = min(rows, key=lambda r: r.top1)
    out = StageOutput.at(os.path.join(out_dir, "evaluate", name))
    write_evaluation(out, modes, rows, health(modes[best.mode]))
    return Evaluation(out)


def _report(cfg: ExperimentConfig, evaluations: dict[str, Evaluation], fusion: Fusion | None, out_dir: str):
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "plot.png")
        report = build_report(evaluations, fusion, png, cfg.report)
        with open(png, "rb") as f:
            write_report(StageOutput.at(os.path.join(out_dir, "report")), report.tables, report.markdown,
                         [dataclasses.asdict(r) for r in report.claims], f.read())
    return report


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def _eta(summary: dict[str, Any], total: int, elapsed: float) -> str:
    done = len(summary["nets"])
    if not done:
        return "?"
    s = int(elapsed / done * (total - done))
    return f"{s // 60}:{s % 60:02d}"


def plan_cost(cfg: ExperimentConfig, train_images: int, val_images: int) -> dict[str, dict[str, float]]:
    """FLOPs of the ladder per net (`vgg.models.forward_macs` at the crop): training is
    6 x MACs per image (forward 2, backward 4 FLOPs per MAC) x images x epochs; evaluation
    is 2 x MACs x (the grid's crops, flips, + 2 dense passes weighted by (Q/crop)^2) per
    image per test scale."""
    from vgg.models import build_vgg

    t, e, crop = cfg.train, cfg.evaluate, cfg.augment.crop
    out = {}
    for name in plan_order(t.nets):
        plan = t.nets[name]
        with torch.device("meta"):
            net = build_vgg(plan.arch, num_classes=10, width=t.width, crop=crop)
        macs = forward_macs(net)
        epochs = plan.epochs if plan.epochs is not None else t.max_epochs
        q_single, q_multi = q_sets(plan.scale, crop, e)
        qs = sorted({q_single, *q_multi})
        crops = e.grid * e.grid * (2 if e.flips else 1)
        per_image = sum(crops + (2 if e.flips else 1) * (q / crop) ** 2 for q in qs)
        out[name] = {"forward_gmacs": macs / 1e9, "epochs": epochs,
                     "train_pflop": 6 * macs * train_images * epochs / 1e15,
                     "evaluate_pflop": 2 * macs * val_images * per_image / 1e15}
    return out


def _print_cost(args) -> int:
    cfg = load_experiment(args.config, [*args.set, "data.root=/unused"])
    cost = plan_cost(cfg, *args.cost)
    print(f"{'net':8} {'GMACs':>6} {'epochs':>6} {'train PFLOP':>11} {'eval PFLOP':>10}")
    for name, c in cost.items():
        print(f"{name:8} {c['forward_gmacs']:6.2f} {c['epochs']:6d} {c['train_pflop']:11.2f} "
              f"{c['evaluate_pflop']:10.2f}")
    total = sum(c["train_pflop"] + c["evaluate_pflop"] for c in cost.values())
    print(f"total {total:.1f} PFLOP: {total * 1e15 / 300e12:.0f} s at 300 TFLOP/s (30% of an H100's bf16 peak)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vgg.ladder", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a config file (configs/imagenette.yaml)")
    p.add_argument("--data", help="the image folder (<data>/train/<class>/*, <data>/val/<class>/*); "
                                  "default: the config's data.root")
    p.add_argument("--out", help="the output folder (required unless --cost)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if there is one)")
    p.add_argument("--cost", nargs=2, type=int, metavar=("TRAIN_IMAGES", "VAL_IMAGES"),
                   help="print the FLOPs of every net's training and evaluation and exit (no data read)")
    args = p.parse_args(argv)
    if not args.out and not args.cost:
        p.error("--out is required")
    try:
        if args.cost:
            return _print_cost(args)
        cfg = load_experiment(args.config, [*args.set, *([f"data.root={args.data}"] if args.data else [])])
        root = cfg.data.root
        if root is None:
            raise LadderError("no data: give --data DIR (an image folder with train/ and val/)")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        summary = run_ladder(cfg, root, args.out, device)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("device", "wall_seconds", "claims", "collapsed")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
