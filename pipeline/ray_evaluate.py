"""Ray adapter of the evaluation (`vgg.evaluation.shares`): one Ray task per share of the
validation split (one GPU each when the job asks for GPUs), each sampling its node's
system metrics for MLflow while it runs."""

from __future__ import annotations

import dataclasses
import time

import ray

from pipeline.system_metrics import SystemMetrics, sampling
from vgg.evaluation.shares import ShareJob, ShareResult, evaluate_share


def _evaluate_share(job: ShareJob, system_metrics: SystemMetrics | None) -> ShareResult:
    with sampling(system_metrics):  # this node's CPU/GPU/memory, while it evaluates
        return evaluate_share(job)


def run_shares(job: ShareJob, num_workers: int, cpus_per_worker: float, log=print,
               every_s: float = 60.0, system_metrics: SystemMetrics | None = None) -> list[ShareResult]:
    """Evaluate every share in its own Ray task (one GPU each when job.use_gpu), by rank.

    A line per finished share, and one every `every_s` while none finishes; a
    failed share cancels the others and raises its error.
    """
    task = ray.remote(_evaluate_share).options(
        num_cpus=cpus_per_worker, num_gpus=1 if job.use_gpu else 0, name=f"{job.name} share")
    pending = [task.remote(dataclasses.replace(job, rank=r, world_size=num_workers), system_metrics)
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
