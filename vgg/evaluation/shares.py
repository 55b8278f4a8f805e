"""Evaluation of one net on the validation split (Sec. 3.2): dense, multi-crop and both,
at one and at several test scales.

- dense: the fully-convolutional net on the whole image rescaled to shorter
  side Q; the class score map is averaged spatially, then softmax; the image
  and its horizontal flip are both scored and their posteriors averaged.
- multi-crop: a g x g grid of crop x crop windows (and their flips) of the
  image rescaled to Q; softmax posteriors averaged over the crops.
- multi-crop+dense: the average of the two methods' posteriors.

Each method at a single scale and at several (`vgg.paper` has the rule); posteriors
are averaged over Q. Six modes "method@scales" in all (Sec. 4.1-4.3, Tables 3-5).

Every Q is computed once: one DALI pass per Q decodes and rescales each image,
and both methods run on that same decoded batch (the multi-crop windows are cut
from it with `scoring.grid_crops`, exactly what the "multicrop" loader does). The
modes are then averages of the per-(method, Q) posteriors.

Distribution: the validation split is cut into `num_workers` contiguous shares
(the eval loaders' rank/world_size); one process per share (a Ray task:
`pipeline.ray_evaluate`; or this one: `evaluate_share` of each rank) loads the model
from its file URI, evaluates its share at every Q and returns the per-image
posteriors; `gather` concatenates them and sorts by image key, so the result
does not depend on the number of workers.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from vgg.config import EvaluateConfig, NetPlan, ReportConfig
from vgg.progress import Progress, say
from vgg.data.augmentation import AugmentSpec
from vgg.data.loaders import build_eval_loader
from vgg.evaluation.scoring import Scorer
from vgg.models import VGG, set_pool_rounding
from vgg.paper import BASE_METHODS, MODES, metric_name, multi_test_scales, single_test_scale
from vgg.results.metrics import Posteriors, average, bootstrap_errors, errors, interval, meaningful_topk, topk_hits
from vgg.results.tables import EvalRow, rows_table
from vgg.training.checkpoints import load_model
from vgg.training.steps import Precision, describe_choice

# ---------------------------------------------------------------- test scales
def q_sets(scale: int | Sequence[int], crop: int, cfg: EvaluateConfig) -> tuple[int, list[int]]:
    """(single Q, multi Qs) for a net trained at `scale` (Sec. 3.2 / 4.2), unless cfg gives them.

    Fixed S: Q = S and {S-d, S, S+d}, d = the paper's 32 px scaled to the crop (32 at
    crop 224, 5 at crop 32); jittered [Smin, Smax]: the middle and {Smin, mid, Smax}
    (vgg.paper.scales_for_testing). A Q below the crop is raised to the crop, and repeated
    Qs are dropped (e.g. S = crop).
    """
    q_single = cfg.q_single if cfg.q_single is not None else single_test_scale(scale, crop)
    multi = cfg.q_multi if cfg.q_multi is not None else multi_test_scales(scale, crop)
    q_multi = sorted({max(int(q), crop) for q in multi})
    if len(q_multi) < 2:
        raise ValueError(f"evaluate.q_multi: multi-scale testing needs at least two distinct "
                         f"scales >= the crop ({crop}), got {list(multi)}")
    return int(q_single), q_multi


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
    bf16: bool | str = "auto"  # Precision.choose resolves "auto" on the task's device
    channels_last: bool | str = "auto"
    compile: bool = False


@dataclass
class ShareResult:
    """Per-(method, Q) posteriors of a share, and where the time went (seconds)."""

    rank: int
    #: (method, Q) -> (keys, labels (n,) int64, probs (n, K) float32)
    posteriors: dict[tuple[str, int], tuple[list[str], np.ndarray, np.ndarray]]
    images: int
    seconds: dict[str, float] = field(default_factory=dict)  # decode, dense, multi-crop, total
    precision: Precision = Precision()  # what the task ran at (its device's choice for "auto")


def evaluate_share(job: ShareJob) -> ShareResult:
    """Evaluate one share (runs in a Ray task, or in-process); see the module docstring."""
    t_start = time.perf_counter()
    if job.threads:
        torch.set_num_threads(job.threads)
    device, device_id, spec = _placement(AugmentSpec.from_dict(job.spec), job.use_gpu)
    net, meta = load_model(job.model_uri)
    net = set_pool_rounding(net, job.pool_rounding).to(device)
    _check_model(net, meta, spec, job)
    precision = Precision.choose(job.bf16, job.channels_last, device)
    if job.rank == 0:
        say(job.name, describe_choice(job.bf16, job.channels_last, precision, device))
    spec = dataclasses.replace(spec, channels_last=precision.channels_last)  # the loader hands NHWC
    scorer = Scorer.of(net, precision, job.compile)

    def loader(q: int):
        return build_eval_loader(job.shards, spec, q, job.batch_size, mode="dense", rank=job.rank,
                                 world_size=job.world_size, device_id=device_id)

    res = score_share(scorer, loader, job.qs, device, methods=job.methods, grid=job.grid, flips=job.flips,
                      batch_size=job.batch_size, name=job.name, rank=job.rank, world_size=job.world_size)
    res.seconds["total"] = time.perf_counter() - t_start
    res.precision = precision
    return res


def score_share(scorer: Scorer, loader: Callable[[int], Any], qs: Sequence[int], device: torch.device, *,
                methods: Sequence[str] = BASE_METHODS, grid: int = 5, flips: bool = True,
                batch_size: int = 32, name: str = "evaluate", rank: int = 0,
                world_size: int = 1) -> ShareResult:
    """Per-(method, Q) posteriors of one share: `loader(q)` gives the share's whole images
    rescaled to Q (a "dense" evaluation loader of any backend: (images, labels, keys) batches,
    one size per batch); every method scores the same decoded batch."""
    t_start = time.perf_counter()
    bad = set(methods) - set(BASE_METHODS)
    if bad:
        raise ValueError(f"unknown methods {sorted(bad)}; expected some of {BASE_METHODS}")
    acc: dict[tuple[str, int], list] = {(m, q): [] for m in methods for q in qs}
    seconds = dict.fromkeys(("decode", *methods), 0.0)
    n_images, progress = 0, None
    for q in qs:
        batches = loader(q)
        if progress is None:  # every Q reads the same share: total = its images x Qs
            progress = Progress(name, f"evaluating (share {rank + 1}/{world_size})",
                                batches.num_samples * len(qs), unit="images", active=rank == 0)
        t = time.perf_counter()
        with torch.no_grad():  # not inference_mode: a compiled scorer must see one dispatch key set
            for images, labels, keys in batches:  # images (B, 3, H, W), one size per batch
                images = images.to(device, non_blocking=True)
                seconds["decode"] += _lap(t, device)
                labels = labels.cpu().numpy().astype(np.int64)  # the iterator reuses its buffers
                for method in methods:
                    t = time.perf_counter()
                    probs = _score(scorer, method, images, grid, flips, batch_size)
                    acc[(method, q)].append((list(keys), labels, probs.cpu().numpy()))
                    seconds[method] += _lap(t, device)
                progress.update(len(keys), f"Q={q}")
                t = time.perf_counter()
        n_images = batches.num_samples
    out = {k: _concat(v) for k, v in acc.items()}
    seconds["total"] = time.perf_counter() - t_start
    return ShareResult(rank, out, n_images, seconds)


def _placement(spec, use_gpu: bool) -> tuple[torch.device, int | None, Any]:
    """(torch device, DALI device_id, spec): all on the CPU unless use_gpu."""
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
                         f"class list")


def _lap(t0: float, device: torch.device) -> float:
    if device.type == "cuda":  # GPU work is asynchronous
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _score(scorer: Scorer, method: str, images: torch.Tensor, grid: int, flips: bool,
           batch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, K) posteriors of one method."""
    if method == "dense":
        return scorer.dense_probs(images, flips)
    return scorer.multicrop_probs(images, grid, flips, batch_size)


def _concat(parts: list) -> tuple[list[str], np.ndarray, np.ndarray]:
    keys = [k for p in parts for k in p[0]]
    if not parts:
        return keys, np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return keys, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


# ---------------------------------------------------------------- all shares
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
def error_table(modes: dict[str, Posteriors], rows: Sequence[EvalRow],
                report: ReportConfig | None = None) -> tuple[dict[str, list], dict[str, float]]:
    """errors.json: the net's `rows` (one per mode) as the report's tables show them
    (`tables.COLUMNS`: net, method, test Q, top-1 and its bootstrap interval, ...), and the
    metrics. The intervals are the report's (`report`'s resamples, seed and confidence:
    bootstrap replicates depend only on the number of images, so the report gives the
    same ones)."""
    report = report or ReportConfig()
    hits: dict[int, dict[str, np.ndarray]] = {}
    metrics = {}
    for mode, post in modes.items():
        for k in meaningful_topk((1, 5), post.num_classes):
            hits.setdefault(k, {})[mode] = topk_hits(post.probs, post.labels, k)
        metrics.update({metric_name(mode, f"{k}_err"): 100.0 * v for k, v in errors(post).items()})
    reps = {k: bootstrap_errors(h, report.bootstrap_samples, report.seed) for k, h in hits.items()}

    def ci(k: int, mode: str) -> tuple[float, float] | None:
        r = reps.get(k, {}).get(mode)
        return None if r is None else tuple(100.0 * v for v in interval(r, report.confidence))

    rows = [dataclasses.replace(r, top1_ci=ci(1, r.mode), top5_ci=ci(5, r.mode)) for r in rows]
    return rows_table(rows), metrics


def per_q_table(per_q: dict[tuple[str, int], Posteriors]) -> tuple[dict[str, list], dict[str, float]]:
    """Errors of each method at each single Q (errors_per_q.json) and their metrics."""
    table: dict[str, list] = {c: [] for c in ("method", "Q", "top-1 %", "top-5 %")}
    metrics = {}
    for (method, q), post in sorted(per_q.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        errs = {k: 100.0 * v for k, v in errors(post).items()}
        for col, v in zip(table, (method, q, errs["top1"], errs.get("top5"))):
            table[col].append(v)
        metrics.update({metric_name(method, f"q{q}_{k}_err"): v for k, v in errs.items()})
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


