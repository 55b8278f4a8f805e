"""The paper's ladder in one process, with PyTorch alone: train every net of a config's plan
(A from scratch, deeper nets from A, fine-tuned scale-jittered nets), evaluate each (dense,
multi-crop, both; single and multi-scale), fuse, and build the report (Tables 3-6 with
intervals, the claims judged, the depth plot).

    python -m vgg.ladder configs/imagenette.yaml --data /data/imagenette-128 --out /tmp/ladder
    python -m vgg.ladder configs/imagenette.yaml --cost 9469 1966     # FLOPs per net, expected time

A run survives what a long run meets: a rerun with the same `--out` keeps every finished
net and evaluation (their files verified against the sizes and SHA-256 recorded when they
were written, and named as reused); the interrupted net resumes from its newest complete
checkpoint (one per epoch, written atomically with a manifest, under <out>/_checkpoints);
`--fresh` starts over. Undecodable or empty images are skipped and non-RGB ones
converted, as the shard stage does, and listed in <out>/data_problems.csv. `--out`,
`--data` and the config are checked before any training (one `error:` line, exit 2).

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
    <out>/summary.json   per net: epochs, wall seconds, images/s, TFLOP/s, MFU; the total
    <out>/*/<net>/_SUCCESS.json   every file's size and SHA-256, and the key it was made under
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from vgg.artifacts import (HISTORY_FILE, MODEL_FILE, ROWS_FILE, Evaluation, Fusion, write_evaluation, write_fusion, write_model,
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
from vgg.progress import clock as _clock
from vgg.storage import (HASH, MARKER, StageOutput, damage, exists, file_records, list_dir, write_bytes,
                         write_json)
from vgg.training.checkpoints import (SCORE, check_checkpoint, initial_model, load_model, read_checkpoint,
                                      write_checkpoint)
from vgg.training.loop import FitOptions, TrainCallback, TrainState, fit, plain_net
from vgg.training.schedule import schedule_of
from vgg.training.steps import Precision, describe_choice, mfu

SUMMARY_FILE = "summary.json"
PROBLEMS_FILE = "data_problems.csv"  # images skipped or converted
CHECKPOINTS_DIR = "_checkpoints"  # <out>/_checkpoints/<net>/<key>/epoch_NNNN: removed once the net is published
LADDER_DIRS = ("train", "evaluate", "fuse", "report")


class LadderError(UserError, RuntimeError):
    """A ladder run that cannot go on (a diverged net, unusable data)."""


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


# ---------------------------------------------------------------- checks before any work
def check_plan(cfg: ExperimentConfig) -> None:
    """What the ladder cannot run, refused before any data is read or net trained."""
    t, e = cfg.train, cfg.evaluate
    if cfg.data.layout != "folders":
        raise LadderError(f"data.layout: the ladder reads image folders (<data>/train/<class>/*, "
                          f"<data>/val/<class>/*), not {cfg.data.layout!r}; the pipeline reads that layout")
    for name, plan in t.nets.items():
        if plan.weights is not None:
            raise LadderError(f"train.nets.{name}.weights: importing released weights is the pipeline's "
                              "(python pipeline/run.py); the ladder trains every net")
        src = plan.init_source
        if src is not None and src.removeprefix("train/") not in t.nets:
            raise LadderError(f"train.nets.{name}.init: {src} is not a net of train.nets")
    evaluated = set(e.nets if e.nets is not None else t.nets)
    for member in cfg.fuse.members:
        net = member.split(":", 1)[0]
        if net not in evaluated:
            raise LadderError(f"fuse.members: {member!r} names {net!r}, which is not evaluated "
                              f"(evaluated: {', '.join(sorted(evaluated))})")


def check_out(out_dir: str) -> None:
    """`--out` must be a directory the ladder can write (or create): one line otherwise."""
    path = os.path.abspath(out_dir)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise LadderError(f"--out {out_dir}: {probe} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise LadderError(f"--out {out_dir}: cannot write there ({err.strerror or err})") from None


def check_data(root: str) -> None:
    """`--data` must be an image folder with train/ and val/ (the listing checks the rest)."""
    if not os.path.isdir(root):
        raise LadderError(f"--data {root}: " + ("is a file, not a folder" if os.path.exists(root) else "does not exist"))
    missing = [d for d in ("train", "val") if not os.path.isdir(os.path.join(root, d))]
    if "val" in missing and os.path.isdir(os.path.join(root, "test")):
        missing.remove("val")
    if missing:
        raise LadderError(f"--data {root}: no {' or '.join(d + '/' for d in missing)} folder "
                          "(expected <data>/train/<class>/*, <data>/val/<class>/*)")


def fresh_start(out_dir: str, say) -> None:
    """--fresh: remove what an earlier ladder run wrote into `out_dir` (its folders only)."""
    for name in (*LADDER_DIRS, CHECKPOINTS_DIR, SUMMARY_FILE, PROBLEMS_FILE):
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    say(f"--fresh: the earlier ladder outputs in {out_dir} are removed")


# ---------------------------------------------------------------- published outputs
def key_of(*parts: Any) -> str:
    """The key an output is made under: the config sections and inputs that make it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def reusable(out: StageOutput, key: str, say, what: str) -> dict[str, Any] | None:
    """The marker of a finished output made under `key` whose files are intact (sizes and
    SHA-256 as written), or None (with a line saying why, where there was an output)."""
    if not exists(out.fs, out.join(MARKER)):
        return None
    try:
        marker = out.read_json(MARKER)
    except (OSError, ValueError):
        say(f"{what}: its {MARKER} cannot be read; redoing it")
        return None
    if marker.get("key") != key:
        say(f"{what}: the output in {out.path} was made under another config or input; redoing it")
        return None
    bad = damage(out.fs, out.path, marker.get("files", {}), hashes=True)
    if bad is not None:
        say(f"{what}: damaged output: {bad[0]} {bad[1]}; redoing it")
        return None
    return marker


def publish(out: StageOutput, key: str, names: list[str], **facts: Any) -> None:
    """Mark `out` finished: its files' sizes and SHA-256 and its key, written last."""
    write_json(out.fs, out.join(MARKER), {"key": key, "files": file_records(out.fs, out.path, names), **facts})


def unpublish(out: StageOutput) -> None:
    if exists(out.fs, out.join(MARKER)):
        out.fs.delete_file(out.join(MARKER))


# ---------------------------------------------------------------- the ladder
def run_ladder(cfg: ExperimentConfig, data_root: str, out_dir: str, device: torch.device,
               say=_say, fresh: bool = False) -> dict[str, Any]:
    """Train, evaluate, fuse and report every net of `cfg`'s plan; -> the summary.
    Finished nets and evaluations in `out_dir` are reused (verified); an interrupted net
    resumes from its newest complete checkpoint; `fresh` starts over."""
    from vgg.data import memory  # the images in `device` memory

    t_start = time.perf_counter()
    t, e = cfg.train, cfg.evaluate
    check_plan(cfg)
    check_data(data_root)
    check_out(out_dir)
    if fresh:
        fresh_start(out_dir, say)
    per_class = {"train": cfg.data.train_per_class, "val": cfg.data.val_per_class}
    problems: list[tuple[str, str, str]] = []
    classes, train_set, val_set = memory.folder_stores(data_root, device, per_class=per_class,
                                                       seed=cfg.shard.seed, problems=problems)
    out = StageOutput.at(out_dir)
    _write_problems(out, problems, say)
    if not len(train_set) or not len(val_set):
        raise LadderError(f"--data {data_root}: no usable image in "
                          f"{'train/' if not len(train_set) else 'val/'} (see {out.join(PROBLEMS_FILE)})")
    say(f"data: {len(train_set)} training and {len(val_set)} validation images of {len(classes)} "
        f"classes in {device} memory ({time.perf_counter() - t_start:.1f} s)")
    spec = spec_from_config(cfg.augment, memory.rgb_stats(train_set))
    precision = Precision.choose(t.bf16, t.channels_last, device)
    say(describe_choice(t.bf16, t.channels_last, precision, device) + " (training)")
    spec = dataclasses.replace(spec, channels_last=precision.channels_last)  # the loaders hand NHWC
    data_key = key_of(to_dict(cfg.data), to_dict(cfg.shard), to_dict(cfg.augment), classes,
                      len(train_set), len(val_set))
    trained: dict[str, _Trained] = {}
    evaluations: dict[str, Evaluation] = {}
    summary: dict[str, Any] = {"device": _device_name(device), "precision": precision.describe(), "nets": {}}
    order = plan_order(t.nets)
    evaluated = set(e.nets if e.nets is not None else t.nets)
    clock = LadderClock(plan_cost(cfg, len(train_set), len(val_set)), evaluated)
    for i, name in enumerate(order, 1):
        plan = t.nets[name]
        src = plan.init_source.removeprefix("train/") if plan.init_source else None
        key = key_of(data_key, {k: v for k, v in to_dict(t).items() if k != "nets"}, to_dict(plan), trained[src].sha256 if src else None)
        tout = StageOutput.at(os.path.join(out_dir, "train", name))
        say(f"[{i}/{len(order)}] train/{name}: {plan.arch} at S={plan.scale}, lr {plan.lr:g}, "
            f"init {plan.init}; ladder ETA {clock.eta()}")
        marker = reusable(tout, key, say, f"train/{name}")
        if marker is not None:
            net, meta = load_model(tout.file_uri(MODEL_FILE))
            history = tout.read_json(HISTORY_FILE)
            say(f"  train/{name}: reused (model.pt and history.json verified, made under the same config)")
            clock.skip(name, "train")
        else:
            unpublish(tout)
            t0 = time.perf_counter()
            net, meta, history = _train(cfg, name, plan, key, classes, spec, train_set, val_set, trained,
                                        precision, device, out_dir, clock, say)
            write_model(tout, net, meta)
            write_json(tout.fs, tout.join(HISTORY_FILE), history)
            publish(tout, key, [MODEL_FILE, HISTORY_FILE], seconds=time.perf_counter() - t0)
            shutil.rmtree(os.path.join(out_dir, CHECKPOINTS_DIR, name), ignore_errors=True)
            marker = tout.read_json(MARKER)
        trained[name] = _Trained(tout.file_uri(MODEL_FILE), net, meta, marker["files"][MODEL_FILE][HASH])
        entry = _train_entry(plan, net, history, marker, summary["device"], device)
        if name in evaluated:
            eout = StageOutput.at(os.path.join(out_dir, "evaluate", name))
            ekey = key_of({k: v for k, v in to_dict(e).items() if k != "nets"}, to_dict(cfg.augment), data_key,
                          trained[name].sha256)
            emarker = reusable(eout, ekey, say, f"evaluate/{name}")
            if emarker is not None:
                say(f"  evaluate/{name}: reused (posteriors verified)")
                clock.skip(name, "evaluate")
            else:
                unpublish(eout)
                t1 = time.perf_counter()
                names = _evaluate(cfg, name, plan, net, classes, spec, val_set, eout, device)
                publish(eout, ekey, names, seconds=time.perf_counter() - t1)
                clock.evaluated(name, time.perf_counter() - t1)
                emarker = eout.read_json(MARKER)
            evaluations[name] = Evaluation(eout)
            entry["evaluate_seconds"] = emarker.get("seconds")
            entry["best_mode"] = min(evaluations[name].rows(), key=lambda r: r.top1).mode
        summary["nets"][name] = entry
        say(f"  train/{name}: {entry['epochs']} epochs in {entry['train_seconds']:.1f} s, "
            f"{entry['images_per_s']:.0f} images/s, {entry['train_tflops']:.2f} TFLOP/s"
            + (f", MFU {entry['mfu']:.1%}" if entry["mfu"] else "")
            + (f"; evaluated in {entry['evaluate_seconds']:.1f} s" if entry.get("evaluate_seconds") else "")
            + f"; ladder ETA {clock.eta()}")
    ckpt_root = os.path.join(out_dir, CHECKPOINTS_DIR)
    if os.path.isdir(ckpt_root) and not os.listdir(ckpt_root):
        os.rmdir(ckpt_root)
    report = fuse_and_report(cfg, evaluations, out_dir, say)
    summary["claims"] = {str(k): v for k, v in claims.summary(report.claims).items()} if report.claims else {}
    summary["collapsed"] = report.collapsed
    summary["data_problems"] = len(problems)
    summary["wall_seconds"] = time.perf_counter() - t_start  # this invocation's
    summary["work_seconds"] = sum(n["train_seconds"] + (n.get("evaluate_seconds") or 0)
                                  for n in summary["nets"].values())  # every net's, reused ones too
    write_json(out.fs, out.join(SUMMARY_FILE), summary)
    say(report.markdown)
    say(f"ladder done in {summary['wall_seconds']:.1f} s on {summary['device']}: {out_dir}")
    return summary


@dataclass
class _Trained:
    """A finished net, as `initial_model` wants its source (`uri`, `load()`)."""

    uri: str
    net: VGG
    meta: dict[str, Any]
    sha256: str  # of its model.pt: the key of everything made from it

    def load(self) -> tuple[VGG, dict[str, Any]]:
        return self.net, self.meta


def _train_entry(plan: NetPlan, net: VGG, history: dict[str, Any], marker: dict[str, Any], device_name: str,
                 device: torch.device) -> dict[str, Any]:
    """The summary's line of a net: epochs, seconds, images/s, TFLOP/s, MFU (from its history)."""
    epochs = history["epochs"]
    rates = [r["images_per_s"] for r in epochs[1:] or epochs]  # the first epoch warms up (and compiles)
    macs = forward_macs(net)
    entry = {"arch": plan.arch, "scale": plan.scale, "epochs": len(epochs),
             "train_seconds": sum(r["epoch_seconds"] for r in epochs),
             "images_per_s": sum(rates) / len(rates) if rates else 0.0, "forward_macs": macs,
             "resumes": len(history.get("resumes", []))}
    entry["train_tflops"] = 6 * macs * entry["images_per_s"] / 1e12
    entry["mfu"] = mfu(entry["images_per_s"], macs, device_name)
    return entry


class LadderClock:
    """The ladder's ETA from its planned FLOPs (`plan_cost`) and the rates measured so far in
    this invocation (training and evaluation apart; evaluation at training's rate until one
    has run)."""

    def __init__(self, cost: dict[str, dict[str, float]], evaluated: set[str]):
        self.left = {(n, "train"): c["train_pflop"] * 1e15 for n, c in cost.items()}
        self.left.update({(n, "evaluate"): c["evaluate_pflop"] * 1e15 for n, c in cost.items() if n in evaluated})
        self.per_epoch = {n: c["train_pflop"] * 1e15 / max(c["epochs"], 1) for n, c in cost.items()}
        self.flop = {"train": 0.0, "evaluate": 0.0}
        self.seconds = {"train": 0.0, "evaluate": 0.0}

    def skip(self, net: str, what: str) -> None:
        self.left.pop((net, what), None)

    def epoch(self, net: str, seconds: float) -> None:
        flop = self.per_epoch[net]
        self.left[(net, "train")] = max(self.left.get((net, "train"), 0.0) - flop, 0.0)
        self.flop["train"] += flop
        self.seconds["train"] += seconds

    def evaluated(self, net: str, seconds: float) -> None:
        self.flop["evaluate"] += self.left.pop((net, "evaluate"), 0.0)
        self.seconds["evaluate"] += seconds

    def rate(self, what: str) -> float | None:
        if self.seconds[what] > 0:
            return self.flop[what] / self.seconds[what]
        return self.rate("train") if what == "evaluate" else None

    def seconds_left(self, net: str | None = None) -> float | None:
        total = 0.0
        for (n, what), flop in self.left.items():
            if net is not None and (n, what) != (net, "train"):
                continue
            r = self.rate(what)
            if r is None:
                return None
            total += flop / r
        return total

    def eta(self, net: str | None = None) -> str:
        s = self.seconds_left(net)
        return "?" if s is None else _clock(s)


class _EpochClock(TrainCallback):
    """Each finished epoch feeds the ladder's clock and prints the ETAs."""

    def __init__(self, clock: LadderClock, name: str, say):
        self.clock, self.name, self.say = clock, name, say

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        self.clock.epoch(self.name, record["epoch_seconds"])
        self.say(f"  [train/{self.name}] ETA: this net {self.clock.eta(self.name)}, the ladder {self.clock.eta()}")


def _train(cfg: ExperimentConfig, name: str, plan: NetPlan, key: str, classes: list[str], spec: AugmentSpec,
           train_set, val_set, trained: dict[str, _Trained], precision: Precision, device: torch.device,
           out_dir: str, clock: LadderClock, say) -> tuple[VGG, dict[str, Any], dict[str, Any]]:
    """One net of the plan: its initial weights (or its newest complete checkpoint), then
    `fit` with a checkpoint per epoch; -> (the best epoch's net, its meta, its history)."""
    from vgg.data.memory import MemoryEvalLoader, MemoryTrainLoader

    t = cfg.train
    source = trained.get(plan.init_source.removeprefix("train/")) if plan.init_source else None
    net, init = initial_model(t, plan, len(classes), spec.crop, source)
    epochs = plan.epochs if plan.epochs is not None else t.max_epochs
    meta = {"arch": plan.arch, "classes": list(classes), "net": name,
            "config": {"train": to_dict(t), "net": to_dict(plan)}, "init": init}
    if epochs == 0:
        meta.update(epoch=None, val_top1_err=None, val_top5_err=None, origin="initial")
        return net.eval(), meta, {"epochs": [], "lr_drops": []}
    net = precision.net(net.to(device))
    run = torch.compile(net) if t.compile else net
    optimizer = torch.optim.SGD(run.parameters(), lr=plan.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    state = TrainState(run, optimizer, schedule_of(optimizer, t, plan))
    ckpts = StageOutput.at(os.path.join(out_dir, CHECKPOINTS_DIR, name, key[:16]))
    start = _resume(state, ckpts, name, say)
    scale = tuple(plan.scale) if isinstance(plan.scale, list) else plan.scale
    loader = MemoryTrainLoader(train_set, spec, scale, t.batch_size, seed=t.seed)
    val = MemoryEvalLoader(val_set, spec, single_test_scale(scale, spec.crop), t.batch_size, mode="center")

    def save(s: TrainState, record: dict[str, Any]) -> None:  # one complete checkpoint per epoch
        write_checkpoint(ckpts.fs, ckpts.join(_epoch_dir(s.epoch)), s.state_dict(), s.epoch, record[SCORE])
        keep = {_epoch_dir(s.epoch), _epoch_dir(s.progress["best"]["epoch"])}  # the newest and the best
        for entry in list_dir(ckpts.fs, ckpts.path):
            if entry.is_dir and entry.base_name not in keep:
                shutil.rmtree(entry.path, ignore_errors=True)

    opts = FitOptions(epochs=epochs, num_classes=len(classes), per_worker_batch=t.batch_size,
                      precision=precision, seed=t.seed, log_every=0, name=f"train/{name}", crop=spec.crop)
    result = fit(state, loader, val, opts, start=start, device=device, checkpoint=save,
                 callbacks=[_EpochClock(clock, name, say)])
    if result.diverged is not None:
        d = result.diverged
        raise LadderError(f"train/{name} diverged at {d.where} (loss {d.loss:.4g}, lr {d.lr:g}): {d.reason}; "
                          f"lower train.nets.{name}.lr and run again (the nets before it are kept)")
    b = result.best
    plain = plain_net(run)
    if b["epoch"] != state.epoch:
        plain.load_state_dict(read_checkpoint(ckpts.fs, ckpts.join(_epoch_dir(b["epoch"])))["model"])
    history = {"epochs": state.progress["history"], "best": b, "lr_drops": state.schedule.drops,
               "resumes": state.progress["resumes"]}
    meta.update(epoch=b["epoch"], val_top1_err=b["val_top1_err"], val_top5_err=b["val_top5_err"],
                origin="trained")
    return plain.eval(), meta, history


def _epoch_dir(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def _resume(state: TrainState, ckpts: StageOutput, name: str, say) -> int:
    """Load the newest complete checkpoint into `state` (damaged or partial ones are named
    and skipped); -> the first epoch to run."""
    if not exists(ckpts.fs, ckpts.path):
        return 0
    found = []
    for entry in list_dir(ckpts.fs, ckpts.path):
        if entry.is_dir and entry.base_name.startswith("epoch_"):
            try:
                found.append((check_checkpoint(ckpts.fs, entry.path)[0], entry.path))
            except ValueError as why:
                say(f"  [train/{name}] skipping the checkpoint {entry.path}: {why}")
    if not found:
        return 0
    epoch, folder = max(found)
    state.load_state_dict(read_checkpoint(ckpts.fs, folder))
    state.progress["resumes"].append({"after_epoch": epoch, "time": time.time()})
    say(f"  [train/{name}] resuming after {epoch + 1} finished epochs, from {folder}")
    return epoch + 1


def _evaluate(cfg: ExperimentConfig, name: str, plan: NetPlan, net: VGG, classes: list[str],
              spec: AugmentSpec, val_set, out: StageOutput, device: torch.device) -> list[str]:
    """Dense, multi-crop and both at single and multi-scale (`score_share` over the images in
    memory), written as an evaluate output; -> the names of the files written."""
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
    return write_evaluation(out, modes, rows, health(modes[best.mode]))  # names relative to `out`


def _write_problems(out: StageOutput, problems: list[tuple[str, str, str]], say) -> None:
    """The images skipped or converted (the shard stage's skipped.csv / converted.csv, as one
    file), named on the console."""
    if not problems:
        return
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["key", "action", "reason"])
    w.writerows(problems)
    write_bytes(out.fs, out.join(PROBLEMS_FILE), buf.getvalue().encode())
    counts = {a: sum(1 for _, b, _ in problems if b == a) for a in ("skipped", "converted")}
    say(f"data: {counts['skipped']} image(s) skipped, {counts['converted']} converted: "
        f"{out.join(PROBLEMS_FILE)}")
    for key, action, reason in problems[:5]:
        say(f"  {action}: {key}: {reason}")
    if len(problems) > 5:
        say(f"  ... and {len(problems) - 5} more")


def fuse_and_report(cfg: ExperimentConfig, evaluations: dict[str, Evaluation], out_dir: str, say=_say):
    """The fusion of `cfg.fuse.members` and the report (Tables 3-6, the claims, the plot), from
    the evaluations' posteriors alone (seconds)."""
    fusion = None
    if cfg.fuse.members:
        f = fuse(list(cfg.fuse.members), evaluations)
        fuse_out = StageOutput.at(os.path.join(out_dir, "fuse"))
        write_fusion(fuse_out, f.posteriors, f.row, f.member_rows)
        fusion = Fusion(fuse_out)
        say(f"fuse: {' + '.join(cfg.fuse.members)}: top-1 {f.row.top1:.1f}%")
    return _report(cfg, evaluations, fusion, out_dir)


def report_only(cfg: ExperimentConfig, out_dir: str, say=_say) -> dict[str, Any]:
    """--report-only: the fusion and the report again from the evaluations in `out_dir` (after
    a change to the report's rules or config; nothing is trained or evaluated). The summary
    keeps its nets and gets the new verdicts."""
    t, e = cfg.train, cfg.evaluate
    names = [n for n in plan_order(t.nets) if n in set(e.nets if e.nets is not None else t.nets)]
    missing = [n for n in names if not os.path.isfile(os.path.join(out_dir, "evaluate", n, ROWS_FILE))]
    if missing:
        raise LadderError(f"--report-only: no evaluation of {', '.join(missing)} in {out_dir}; run the ladder")
    evaluations = {n: Evaluation(StageOutput.at(os.path.join(out_dir, "evaluate", n))) for n in names}
    report = fuse_and_report(cfg, evaluations, out_dir, say)
    out = StageOutput.at(out_dir)
    summary = out.read_json(SUMMARY_FILE) if exists(out.fs, out.join(SUMMARY_FILE)) else {"nets": {}}
    summary["claims"] = {str(k): v for k, v in claims.summary(report.claims).items()} if report.claims else {}
    summary["collapsed"] = report.collapsed
    write_json(out.fs, out.join(SUMMARY_FILE), summary)
    say(report.markdown)
    return summary


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


def plan_cost(cfg: ExperimentConfig, train_images: int, val_images: int) -> dict[str, dict[str, float]]:
    """FLOPs of the ladder per net (`vgg.models.forward_macs` at the crop): training is
    6 x MACs per image (forward 2, backward 4 FLOPs per MAC) x images x epochs, plus each
    epoch's centre-crop validation (2 x MACs x validation images); evaluation is 2 x MACs x
    (the grid's crops, flips, + 2 dense passes weighted by (Q/crop)^2) per image per test
    scale."""
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
                     "train_pflop": (6 * train_images + 2 * val_images) * macs * epochs / 1e15,
                     "evaluate_pflop": 2 * macs * val_images * per_image / 1e15}
    return out


def measure_rates(cfg: ExperimentConfig, device: torch.device, steps: int = 2) -> dict[str, tuple[float, float]]:
    """arch -> (training, evaluation) FLOP/s measured on `device`: a few SGD steps
    (`vgg.training.steps.sgd_step`) and no_grad forwards at the config's crop, width, batch
    sizes and precision, on random data (no data read)."""
    from vgg.models import build_vgg
    from vgg.training.steps import sgd_step

    t, e, crop = cfg.train, cfg.evaluate, cfg.augment.crop
    tp, ep = Precision.choose(t.bf16, t.channels_last, device), Precision.choose(e.bf16, e.channels_last, device)
    rates = {}
    for arch in sorted({plan.arch for plan in t.nets.values()}):
        net = tp.net(build_vgg(arch, num_classes=10, width=t.width, crop=crop).to(device))
        macs = forward_macs(net)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        x = torch.randn(t.batch_size, 3, crop, crop, device=device)
        y = torch.randint(0, 10, (t.batch_size,), device=device)
        train = _timed(lambda: sgd_step(net, opt, x, y, t.batch_size, tp), steps, device)
        net = ep.net(net.eval())
        xe = ep.images(torch.randn(e.batch_size, 3, crop, crop, device=device))

        def forward():
            with torch.no_grad(), ep.autocast(device):
                net(xe)

        rates[arch] = (6 * macs * t.batch_size / train, 2 * macs * e.batch_size / _timed(forward, steps, device))
    return rates


def _timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of `fn` after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def _print_cost(args) -> int:
    cfg = load_experiment(args.config, [*args.set, "data.root=/unused"])
    cost = plan_cost(cfg, *args.cost)
    device = _device(args.device)
    rates = measure_rates(cfg, device)
    print(f"{'net':8} {'GMACs':>6} {'epochs':>6} {'train PFLOP':>11} {'eval PFLOP':>10} "
          f"{'train TFLOP/s':>13} {'eval TFLOP/s':>12} {'expected':>9}")
    total_s = 0.0
    for name, c in cost.items():
        tr, ev = rates[cfg.train.nets[name].arch]
        seconds = c["train_pflop"] * 1e15 / tr + c["evaluate_pflop"] * 1e15 / ev
        total_s += seconds
        print(f"{name:8} {c['forward_gmacs']:6.2f} {c['epochs']:6d} {c['train_pflop']:11.3f} "
              f"{c['evaluate_pflop']:10.3f} {tr / 1e12:13.2f} {ev / 1e12:12.2f} {_clock(seconds):>9}")
    total = sum(c["train_pflop"] + c["evaluate_pflop"] for c in cost.values())
    print(f"total {total * 1e3:.0f} TFLOP: about {_clock(total_s)} on {_device_name(device)} at the rates just "
          f"measured here (random data, {cfg.train.batch_size}-image steps; add the data loading and a "
          "few seconds per net)")
    return 0


def _device(name: str | None) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vgg.ladder", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a config file (configs/imagenette.yaml)")
    p.add_argument("--data", help="the image folder (<data>/train/<class>/*, <data>/val/<class>/*); "
                                  "default: the config's data.root")
    p.add_argument("--out", help="the output folder (required unless --cost)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if there is one)")
    p.add_argument("--cost", nargs=2, type=int, metavar=("TRAIN_IMAGES", "VAL_IMAGES"),
                   help="print the FLOPs of every net's training and evaluation and the expected wall time "
                        "at rates measured on this device (a few steps on random data), and exit")
    p.add_argument("--report-only", action="store_true",
                   help="only fuse and report again, from the evaluations already in --out (seconds)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: remove the earlier ladder outputs in --out (default: reuse the finished "
                        "nets and evaluations, resume the interrupted net)")
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
        if args.report_only:
            summary = report_only(cfg, args.out)
        else:
            summary = run_ladder(cfg, root, args.out, _device(args.device), fresh=args.fresh)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("device", "wall_seconds", "claims", "collapsed") if k in summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
