"""The evaluate stage: dense, multi-crop and both, at one and at several test scales (Sec. 3.2).

For one trained net on the validation split:

- dense: the fully-convolutional net on the whole image rescaled to shorter
  side Q; the class score map is averaged spatially, then softmax; the image
  and its horizontal flip are both scored and their posteriors averaged.
- multi-crop: a g x g grid of crop x crop windows (and their flips) of the
  image rescaled to Q; softmax posteriors averaged over the crops.
  (`evaluate.flips` switches the flips of both methods.)
- multi-crop+dense: the average of the two methods' posteriors.

Each method at a single scale (Q = S, or the middle of [Smin, Smax]) and at
several (Q = {S-32, S, S+32} or {Smin, mid, Smax}); posteriors are averaged
over Q. Six modes "method@scales" in all (Sec. 4.1-4.3, Tables 3-5).

Every Q is computed once: one DALI pass per Q decodes and rescales each image,
and both methods run on that same decoded batch (the multi-crop windows are
cut from it with `steps.grid_crops`, exactly what the "multicrop" loader
does). The modes are then averages of the per-(method, Q) posteriors.

Distribution: the validation split is cut into `num_workers` contiguous shares
(the eval loaders' rank/world_size); one Ray task per share loads the model
from its file URI, evaluates its share at every Q and returns the per-image
posteriors; the driver concatenates them and sorts by image key, so the
result does not depend on the number of workers.

Outputs: posteriors/<method>@<scales>.parquet (metrics.write_posteriors),
rows.json (paper.EvalRow per mode, for the report), top-1/top-5 error per mode
as metrics and the "errors.json" table, images/s per method.
"""

from __future__ import annotations

import dataclasses
import posixpath
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from pipeline.config import EvaluateConfig, NetPlan
from pipeline.stage import Progress, StageContext, StageResult
from pipeline.storage import StageOutput, exists, write_json
from stages.metrics import Posteriors, average, errors, health, write_posteriors
from stages.paper import EvalRow

if TYPE_CHECKING:  # torch, DALI and the nets are imported where they run: the fuse and
    import torch  # report stages import this module's naming helpers, and must stay light.

    from stages.vgg import VGG

BASE_METHODS = ("dense", "multi-crop")  # computed per Q; "multi-crop+dense" is their average
METHODS = ("dense", "multi-crop", "multi-crop+dense")
SCALES = ("single", "multi")
MODES = tuple(f"{m}@{s}" for s in SCALES for m in METHODS)
# MLflow metric names may not contain '@' or '+'.
METHOD_SLUG = {"dense": "dense", "multi-crop": "multicrop", "multi-crop+dense": "multicrop_dense"}
POSTERIORS_DIR = "posteriors"
MODEL_FILE = "model.pt"
HEALTH_FILE = "health.json"  # metrics.Health of the posteriors of the best mode
# Posteriors files are also logged to MLflow when they are this small in all (demo runs).
LOG_POSTERIORS_MAX_BYTES = 16 << 20


def posteriors_file(mode: str) -> str:
    """Relative path of a mode's posteriors inside an evaluate output."""
    return posixpath.join(POSTERIORS_DIR, f"{mode}.parquet")


def metric_name(mode: str, what: str) -> str:
    """"multi-crop+dense@multi", "top1_err" -> "multicrop_dense_multi_top1_err"."""
    method, scales = mode.split("@")
    return f"{METHOD_SLUG[method]}_{scales}_{what}"


# ---------------------------------------------------------------- test scales
def q_sets(scale: int | Sequence[int], crop: int, cfg: EvaluateConfig) -> tuple[int, list[int]]:
    """(single Q, multi Qs) for a net trained at `scale` (Sec. 3.2 / 4.2), unless cfg gives them.

    Fixed S: Q = S and {S-d, S, S+d}, d = the paper's 32 px scaled to the crop (32 at
    crop 224, 5 at crop 32); jittered [Smin, Smax]: the middle and {Smin, mid, Smax}
    (stages.paper.scales_for_testing). A Q below the crop is raised to the crop, and repeated
    Qs are dropped (e.g. S = crop).
    """
    from stages.augment import center_scale, eval_scales

    scale = scale if isinstance(scale, int) else tuple(scale)
    q_single = cfg.q_single if cfg.q_single is not None else center_scale(scale, crop)
    multi = cfg.q_multi if cfg.q_multi is not None else eval_scales(scale, crop)
    q_multi = sorted({max(int(q), crop) for q in multi})
    if len(q_multi) < 2:
        raise ValueError(f"evaluate.q_multi: multi-scale testing needs at least two distinct "
                         f"scales >= the crop ({crop}), got {list(multi)}")
    return int(q_single), q_multi


# ---------------------------------------------------------------- the model
def file_uri(out: StageOutput, name: str) -> str:
    """URI of a file inside a stage output (a path for local outputs), for another process."""
    if "://" in out.uri:
        return out.uri.rstrip("/") + "/" + name
    return out.join(name)


# ---------------------------------------------------------------- one share
@dataclass(frozen=True)
class ShareJob:
    """What one worker evaluates: its share of the validation split at every Q."""

    model_uri: str
    shards: str  # the validation Parquet shards: a local path or a filesystem URI
    spec: dict  # AugmentSpec.to_dict()
    qs: tuple[int, ...]
    classes: tuple[str, ...]
    grid: int = 5
    flips: bool = True
    batch_size: int = 32
    rank: int = 0
    world_size: int = 1
    use_gpu: bool = False
    threads: int = 0  # torch intra-op threads (0: leave as is)
    methods: tuple[str, ...] = BASE_METHODS
    name: str = "evaluate"  # prefix of progress lines
    pool_rounding: str = "ceil"  # vgg.set_pool_rounding
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False


@dataclass
class ShareResult:
    """Per-(method, Q) posteriors of a share, and where the time went (seconds)."""

    rank: int
    #: (method, Q) -> (keys, labels (n,) int64, probs (n, K) float32)
    posteriors: dict[tuple[str, int], tuple[list[str], np.ndarray, np.ndarray]]
    images: int
    seconds: dict[str, float] = field(default_factory=dict)  # decode, dense, multi-crop, total


def evaluate_share(job: ShareJob) -> ShareResult:
    """Evaluate one share (runs in a Ray task, or in-process); see the module docstring."""
    import torch

    from stages.augment import AugmentSpec, build_eval_loader
    from stages.steps import Precision, Scorer
    from stages.vgg import set_pool_rounding

    t_start = time.perf_counter()
    if job.threads:
        torch.set_num_threads(job.threads)
    bad = set(job.methods) - set(BASE_METHODS)
    if bad:
        raise ValueError(f"unknown methods {sorted(bad)}; expected some of {BASE_METHODS}")
    device, device_id, spec = _placement(AugmentSpec.from_dict(job.spec), job.use_gpu)
    from stages.train import load_model  # the train stage's model file format

    net, meta = load_model(job.model_uri)
    net = set_pool_rounding(net, job.pool_rounding).to(device)
    _check_model(net, meta, spec, job)
    scorer = Scorer.of(net, Precision(job.bf16, job.channels_last), job.compile)
    acc: dict[tuple[str, int], list] = {(m, q): [] for m in job.methods for q in job.qs}
    seconds = dict.fromkeys(("decode", *job.methods), 0.0)
    n_images = 0
    for q in job.qs:
        loader = build_eval_loader(job.shards, spec, q, job.batch_size, mode="dense", rank=job.rank,
                                   world_size=job.world_size, device_id=device_id)
        progress = Progress(f"{job.name} share {job.rank + 1}/{job.world_size}", f"Q={q} images",
                            loader.num_samples)
        t = time.perf_counter()
        with torch.inference_mode():
            for images, labels, keys in loader:  # images (B, 3, H, W), one size per batch
                images = images.to(device, non_blocking=True)
                seconds["decode"] += _lap(t, device)
                labels = labels.cpu().numpy().astype(np.int64)  # the iterator reuses its buffers
                for method in job.methods:
                    t = time.perf_counter()
                    probs = _METHOD_FNS[method](scorer, images, job)
                    acc[(method, q)].append((list(keys), labels, probs.cpu().numpy()))
                    seconds[method] += _lap(t, device)
                progress.update(len(keys))
                t = time.perf_counter()
        n_images = loader.num_samples
    out = {k: _concat(v) for k, v in acc.items()}
    seconds["total"] = time.perf_counter() - t_start
    return ShareResult(job.rank, out, n_images, seconds)


def _placement(spec, use_gpu: bool) -> tuple[torch.device, int | None, Any]:
    """(torch device, DALI device_id, spec): all on the CPU unless use_gpu."""
    import torch

    if not use_gpu:
        return torch.device("cpu"), None, dataclasses.replace(spec, device="cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("evaluate.use_gpu is set but this worker sees no CUDA device")
    dev = torch.cuda.current_device()
    return torch.device("cuda", dev), dev, spec


def _check_model(net: VGG, meta: dict, spec, job: ShareJob) -> None:
    """The net must fit the data: same crop as the augment spec, same classes as the shards."""
    if net.crop != spec.crop:
        raise ValueError(f"{job.model_uri}: the net was built for crop {net.crop}, the augment "
                         f"spec says crop {spec.crop}")
    if net.num_classes != len(job.classes):
        raise ValueError(f"{job.model_uri}: the net has {net.num_classes} classes, the shards "
                         f"{len(job.classes)}")
    if meta.get("classes") is not None and list(meta["classes"]) != list(job.classes):
        raise ValueError(f"{job.model_uri}: the net's class list differs from the shards' "
                         f"classes.json")


def _lap(t0: float, device: torch.device) -> float:
    if device.type == "cuda":  # GPU work is asynchronous
        import torch

        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


_METHOD_FNS = {  # method -> (scorer, images (B, 3, H, W), job) -> (B, K) posteriors
    "dense": lambda scorer, images, job: scorer.dense_probs(images, job.flips),
    "multi-crop": lambda scorer, images, job: scorer.multicrop_probs(images, job.grid, job.flips,
                                                                     job.batch_size),
}


def _concat(parts: list) -> tuple[list[str], np.ndarray, np.ndarray]:
    keys = [k for p in parts for k in p[0]]
    if not parts:
        return keys, np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return keys, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


# ---------------------------------------------------------------- all shares
def num_val_images(shards: str) -> int:
    """Rows of the validation shards (Parquet metadata only)."""
    from stages.augment import open_parquet, shard_files

    return sum(open_parquet(f).metadata.num_rows for f in shard_files(shards, "val"))


def run_shares(job: ShareJob, num_workers: int, cpus_per_worker: float, log=print,
               every_s: float = 60.0) -> list[ShareResult]:
    """Evaluate every share in its own Ray task (one GPU each when job.use_gpu), by rank.

    A line per finished share, and one every `every_s` while none finishes; a
    failed share cancels the others and raises its error.
    """
    import ray

    task = ray.remote(evaluate_share).options(
        num_cpus=cpus_per_worker, num_gpus=1 if job.use_gpu else 0, name=f"{job.name} share")
    pending = [task.remote(dataclasses.replace(job, rank=r, world_size=num_workers))
               for r in range(num_workers)]
    results: dict[int, ShareResult] = {}
    t0 = time.monotonic()
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=every_s)
            if not done:
                log(f"{len(results)}/{num_workers} shares done after {time.monotonic() - t0:.0f} s")
                continue
            res: ShareResult = ray.get(done[0])
            results[res.rank] = res
            log(f"share {res.rank + 1}/{num_workers} done: {res.images} images in "
                f"{res.seconds['total']:.1f} s; {len(results)}/{num_workers} shares after "
                f"{time.monotonic() - t0:.1f} s")
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
    return [results[r] for r in range(num_workers)]


def gather(results: Sequence[ShareResult], classes: Sequence[str]) -> dict[tuple[str, int], Posteriors]:
    """Concatenate the shares' posteriors per (method, Q), rows sorted by image key."""
    out = {}
    for mq in results[0].posteriors:
        keys, labels, probs = _concat([r.posteriors[mq] for r in results])
        post = Posteriors(keys, labels, probs, list(classes))
        out[mq] = post.select(sorted(keys))
    return out


def combine_modes(per_q: dict[tuple[str, int], Posteriors], q_single: int,
                  q_multi: Sequence[int]) -> dict[str, Posteriors]:
    """The six modes from the per-(method, Q) posteriors: averages over Q, then dense + multi-crop."""
    out = {}
    for scales, qs in (("single", [q_single]), ("multi", list(q_multi))):
        for method in BASE_METHODS:
            out[f"{method}@{scales}"] = average([per_q[(method, q)] for q in qs],
                                                names=[f"{method}@Q={q}" for q in qs])
        out[f"multi-crop+dense@{scales}"] = average(
            [out[f"dense@{scales}"], out[f"multi-crop@{scales}"]],
            names=[f"dense@{scales}", f"multi-crop@{scales}"])
    return {m: out[m] for m in MODES}


# ---------------------------------------------------------------- results
def error_table(modes: dict[str, Posteriors], qs: dict[str, list[int]]) -> tuple[dict[str, list], dict[str, float]]:
    """errors.json columns (mode, method, scales, Q, top-1 %, top-5 %) and the metrics."""
    table: dict[str, list] = {c: [] for c in ("mode", "method", "scales", "Q", "top-1 %", "top-5 %")}
    metrics = {}
    for mode, post in modes.items():
        method, scales = mode.split("@")
        errs = {k: 100.0 * v for k, v in errors(post).items()}
        for col, v in zip(table, (mode, method, scales, ",".join(map(str, qs[scales])),
                                  errs["top1"], errs.get("top5"))):
            table[col].append(v)
        metrics.update({metric_name(mode, f"{k}_err"): v for k, v in errs.items()})
    return table, metrics


def per_q_table(per_q: dict[tuple[str, int], Posteriors]) -> tuple[dict[str, list], dict[str, float]]:
    """Errors of each method at each single Q (errors_per_q.json) and their metrics."""
    table: dict[str, list] = {c: [] for c in ("method", "Q", "top-1 %", "top-5 %")}
    metrics = {}
    for (method, q), post in sorted(per_q.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        errs = {k: 100.0 * v for k, v in errors(post).items()}
        for col, v in zip(table, (method, q, errs["top1"], errs.get("top5"))):
            table[col].append(v)
        metrics.update({f"{METHOD_SLUG[method]}_q{q}_{k}_err": v for k, v in errs.items()})
    return table, metrics


def throughput(results: Sequence[ShareResult], wall_s: float, n_q: int) -> dict[str, float]:
    """Images/s: per method per worker (decode + that method's forward passes, at all Qs),
    the whole stage (all workers, wall clock), and the speed ratio of dense over multi-crop."""
    n = sum(r.images for r in results)
    sec = {k: sum(r.seconds.get(k, 0.0) for r in results) for k in ("decode", *BASE_METHODS)}
    rate = lambda s: n / s if s > 0 else float("nan")  # noqa: E731
    return {
        "dense_images_per_s": rate(sec["decode"] + sec["dense"]),
        "multicrop_images_per_s": rate(sec["decode"] + sec["multi-crop"]),
        "multicrop_dense_images_per_s": rate(sec["decode"] + sec["dense"] + sec["multi-crop"]),
        "decode_images_per_s": rate(sec["decode"] / max(n_q, 1)),
        "dense_speedup_vs_multicrop": sec["multi-crop"] / sec["dense"] if sec["dense"] > 0 else float("nan"),
        "images_per_s": rate(wall_s),
    }


def eval_rows(modes: dict[str, Posteriors], name: str, plan: NetPlan,
              qs: dict[str, list[int]]) -> list[EvalRow]:
    """One paper.EvalRow per mode (errors in %)."""
    scale = plan.scale if isinstance(plan.scale, int) else tuple(plan.scale)
    rows = []
    for mode, post in modes.items():
        method, scales = mode.split("@")
        errs = errors(post)
        top5 = errs.get("top5")
        rows.append(EvalRow(name, plan.arch, scale, method, scales, qs[scales], 100.0 * errs["top1"],
                            None if top5 is None else 100.0 * top5))
    return rows


def rows_to_json(rows: Sequence[EvalRow]) -> list[dict]:
    return [dataclasses.asdict(r) for r in rows]


def rows_from_json(data: Sequence[dict]) -> list[EvalRow]:
    return [EvalRow(**d) for d in data]


# ---------------------------------------------------------------- the stage
def run(ctx: StageContext) -> StageResult:
    """Stage entry (DAG: evaluate/<net>); see the module docstring."""
    from stages.augment import AugmentSpec

    cfg: EvaluateConfig = ctx.section["evaluate"]
    plan: NetPlan = ctx.section["net"]
    name: str = ctx.section["name"]
    shard, trained = ctx.inputs["shard"], ctx.inputs[f"train/{name}"]
    spec = AugmentSpec.from_dict(ctx.inputs["augment"].read_json("spec.json"))
    q_single, q_multi = q_sets(plan.scale, spec.crop, cfg)
    qs = {"single": [q_single], "multi": q_multi}
    all_q = tuple(sorted({q_single, *q_multi}))
    classes = shard.read_json("classes.json")
    model_uri = file_uri(trained, MODEL_FILE)
    if not exists(trained.fs, trained.join(MODEL_FILE)):
        raise FileNotFoundError(f"{trained.uri}: no {MODEL_FILE} in the output of train/{name}")
    val = posixpath.join(shard.uri, "val")  # a local path or a filesystem URI (pyarrow.fs)
    n_val = num_val_images(val)
    workers = max(1, min(cfg.num_workers, n_val))
    ctx.log(f"{n_val} images, Q single {q_single}, multi {q_multi}; grid {cfg.grid}x{cfg.grid}"
            f"{' with flips' if cfg.flips else ''}; {workers} worker(s)")
    job = ShareJob(model_uri, val, spec.to_dict(), all_q, tuple(classes), cfg.grid, cfg.flips,
                   cfg.batch_size, use_gpu=cfg.use_gpu, threads=max(1, int(cfg.cpus_per_worker)),
                   name=ctx.stage_id, pool_rounding=cfg.pool_rounding, bf16=cfg.bf16,
                   channels_last=cfg.channels_last, compile=cfg.compile)
    t0 = time.monotonic()
    results = run_shares(job, workers, cfg.cpus_per_worker, log=ctx.log)
    wall = time.monotonic() - t0
    per_q = gather(results, classes)
    modes = combine_modes(per_q, q_single, q_multi)
    for mode, post in modes.items():
        write_posteriors(post, ctx.out.fs, ctx.out.join(posteriors_file(mode)))
    rows = eval_rows(modes, name, plan, qs)
    write_json(ctx.out.fs, ctx.out.join("rows.json"), rows_to_json(rows))
    table, metrics = error_table(modes, qs)
    q_table, q_metrics = per_q_table(per_q)
    metrics.update(q_metrics)
    metrics.update(throughput(results, wall, len(all_q)))
    metrics["images"] = float(n_val)
    # The collapse check on the net's best mode: a net that learnt no classes must not pass
    # for a weak one (and a weak mode, e.g. dense at a tiny crop, must not pass for a collapse).
    h = health(modes[min(rows, key=lambda r: r.top1).mode])
    write_json(ctx.out.fs, ctx.out.join(HEALTH_FILE), dataclasses.asdict(h))
    if h.collapsed:
        ctx.log(f"WARNING: {name} {h.describe()}")
    files = [posteriors_file(m) for m in MODES]
    size = sum(ctx.out.fs.get_file_info(ctx.out.join(f)).size for f in files)
    best = min(rows, key=lambda r: r.top1)
    return StageResult(
        metrics=metrics,
        params={"q_single": q_single, "q_multi": q_multi, "workers": workers,
                "crops_per_scale": cfg.grid * cfg.grid * (2 if cfg.flips else 1),
                "model_uri": model_uri},
        tables={"errors.json": table, "errors_per_q.json": q_table},
        tags={"collapsed": str(h.collapsed).lower(), "health": h.describe()},
        artifacts=["rows.json", HEALTH_FILE, *(files if size <= LOG_POSTERIORS_MAX_BYTES else [])],
        manifest={"modes": list(MODES), "posteriors": {m: posteriors_file(m) for m in MODES},
                  "images": n_val, "classes": classes, "q_single": q_single, "q_multi": q_multi,
                  "workers": workers, "model_uri": model_uri, "health": dataclasses.asdict(h)},
        summary=(f"{n_val} images; best {best.mode}: top-1 {best.top1:.1f}%"
                 + (f", top-5 {best.top5:.1f}%" if best.top5 is not None else "")
                 + f"; dense {metrics['dense_images_per_s']:.1f} images/s, multi-crop "
                 f"{metrics['multicrop_images_per_s']:.1f} images/s per worker"),
    )
