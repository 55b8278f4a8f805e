"""The evaluate/<net> stages: dense, multi-crop and both, at one and at several test
scales (Sec. 3.2), one Ray task per share of the validation split (`vgg.evaluation.shares`).

Output (`vgg.artifacts.Evaluation`): posteriors/<method>@<scales>.parquet, rows.json
(one `EvalRow` per mode, for the report), health.json (the collapse check of the best
mode, and of every mode under "modes"); top-1/top-5 error per mode and per Q as metrics
and tables, images/s per method.
"""

from __future__ import annotations

import dataclasses
import time

from pipeline.dag import EvaluateInputs, EvaluateSection
from pipeline.stage import StageContext, StageResult
from vgg.artifacts import split_dataset, write_evaluation
from pipeline.ray_evaluate import run_shares
from vgg.evaluation.shares import (ShareJob, combine_modes, error_table, eval_rows, gather, per_q_table, q_sets,
                                   throughput)
from vgg.data.shards import num_rows
from vgg.paper import MODES
from vgg.results.metrics import health
from vgg.results.tables import display

# Posteriors files are also logged to MLflow when they are this small in all (demo runs).
LOG_POSTERIORS_MAX_BYTES = 16 << 20


def run(config: EvaluateSection, inputs: EvaluateInputs, ctx: StageContext) -> StageResult:
    cfg, plan, name = config.evaluate, config.net, config.name
    spec = inputs.augmentation.spec()
    q_single, q_multi = q_sets(plan.scale, spec.crop, cfg)
    qs = {"single": [q_single], "multi": q_multi}
    all_q = tuple(sorted({q_single, *q_multi}))
    classes = inputs.shards.classes()
    model_uri = inputs.net.model_uri
    val = inputs.shards.split("val")
    n_val = num_rows(val, "val")
    workers = max(1, min(cfg.num_workers, n_val))
    ctx.log(f"{n_val} images, Q single {q_single}, multi {q_multi}; grid {cfg.grid}x{cfg.grid}"
            f"{' with flips' if cfg.flips else ''}; {workers} worker(s)")
    job = ShareJob(model_uri, val, spec.to_dict(), all_q, tuple(classes), cfg.grid, cfg.flips,
                   cfg.batch_size, use_gpu=cfg.use_gpu, threads=max(1, int(cfg.cpus_per_worker)),
                   name=ctx.stage_id, pool_rounding=cfg.pool_rounding, bf16=cfg.bf16,
                   channels_last=cfg.channels_last, compile=cfg.compile)
    t0 = time.monotonic()
    results = run_shares(job, workers, cfg.cpus_per_worker, log=ctx.log, system_metrics=ctx.system_metrics)
    wall = time.monotonic() - t0
    per_q = gather(results, classes)
    modes = combine_modes(per_q, q_single, q_multi)
    rows = eval_rows(modes, name, plan, qs)
    best = min(rows, key=lambda r: r.top1)
    # The collapse check on the net's best mode: a net that learnt no classes must not pass
    # for a weak one (and a weak mode, e.g. dense at a tiny crop, must not pass for a collapse).
    h = health(modes[best.mode])
    if h.collapsed:
        ctx.log(f"WARNING: {name} {h.describe()}")
    rows_file, health_file, *posteriors = write_evaluation(ctx.out, modes, rows, h)
    table, metrics = error_table(modes, rows)  # the report's intervals (ReportConfig defaults)
    q_table, q_metrics = per_q_table(per_q)
    metrics.update(q_metrics)
    metrics.update(throughput(results, wall, len(all_q)))
    metrics["images"] = float(n_val)
    size = sum(ctx.out.fs.get_file_info(ctx.out.join(f)).size for f in posteriors)
    return StageResult(
        metrics=metrics,
        params={"q_single": q_single, "q_multi": q_multi, "workers": workers,
                "crops_per_scale": cfg.grid * cfg.grid * (2 if cfg.flips else 1),
                "model_uri": model_uri, **results[0].precision.params()},
        # for display (one decimal); rows.json, the metrics and the posteriors keep full precision
        tables={"errors.json": display(table), "errors_per_q.json": display(q_table)},
        tags={"collapsed": str(h.collapsed).lower(), "health": h.describe()},
        artifacts=[rows_file, health_file, *(posteriors if size <= LOG_POSTERIORS_MAX_BYTES else [])],
        manifest={"modes": list(MODES), "posteriors": dict(zip(MODES, posteriors)),
                  "images": n_val, "classes": classes, "q_single": q_single, "q_multi": q_multi,
                  "workers": workers, "model_uri": model_uri, "health": dataclasses.asdict(h),
                  "crop": spec.crop},  # the report names the crop where dense is distorted
        datasets=[split_dataset(inputs.shards, "val", "evaluation")],
        summary=(f"{n_val} images; best {best.mode}: top-1 {best.top1:.1f}%"
                 + (f", top-5 {best.top5:.1f}%" if best.top5 is not None else "")
                 + f"; dense {metrics['dense_images_per_s']:.1f} images/s, multi-crop "
                 f"{metrics['multicrop_images_per_s']:.1f} images/s per worker"),
    )
