"""Ray Train overhead: images/s of the train stage's training loop on 1 and 2 Ray Train
(DDP) workers vs a plain single-process PyTorch loop, on the same model, global batch
and in-memory random data (no data loading, so only the machinery differs).

All three run `vgg.training.loop.train_one_epoch` (the stage's own step: forward, loss / per-
worker batch, backward, SGD with momentum and weight decay, top-k accounting). The plain
loop uses every CPU as torch threads; each Ray worker gets `--cpus / workers` CPUs and as
many torch threads. Throughput is timed inside the workers between barriers, after a
warm-up epoch, so Ray's start-up does not count; each run reports its best timed epoch
(on a shared machine, the least disturbed one).

    python benchmarks/bench_train.py                     # VGG-A, width 0.25, crop 64, batch 64
    python benchmarks/bench_train.py --width 0.5 --batch 32 --epochs 3 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vgg.config import TrainConfig  # noqa: E402
from vgg.training.loop import FitOptions  # noqa: E402
from vgg.models import build_vgg  # noqa: E402
from vgg.training.steps import Precision  # noqa: E402


class MemoryLoader:
    """`steps` batches cycling over a few random (images, labels) batches, like TrainLoader."""

    def __init__(self, batch: int, crop: int, classes: int, steps: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.data = [(torch.randn(batch, 3, crop, crop, generator=g),
                      torch.randint(0, classes, (batch,), generator=g)) for _ in range(4)]
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int):
        for i in range(self.steps):
            yield self.data[i % len(self.data)]


@dataclass(frozen=True)
class Plan:
    """The recipe (momentum, weight decay, workers, CPUs) and the loop's options."""

    train: TrainConfig
    opts: FitOptions

    @property
    def per_worker_batch(self) -> int:
        return self.opts.per_worker_batch


def precision_of(args) -> Precision:
    """--precision auto: what the pipeline's `auto` chooses on this CPU; fp32: float32 NCHW."""
    choice = "auto" if args.precision == "auto" else False
    return Precision.choose(choice, choice, torch.device("cpu"))


def make_plan(args, workers: int, cpus: float) -> Plan:
    t = TrainConfig(batch_size=args.batch, width=args.width, num_workers=workers,
                    cpus_per_worker=cpus, log_every=0)
    return Plan(t, FitOptions(epochs=1, num_classes=args.classes, per_worker_batch=args.batch // workers,
                              precision=precision_of(args), log_every=0, name="bench", crop=args.crop))


def timed_epochs(net, plan, rank: int, device, args, barrier=lambda: None) -> float:
    """A warm-up epoch, then args.epochs timed epochs of args.steps steps; -> the best
    global images/s (the machine is shared: the least disturbed epoch is the figure)."""
    import time

    import torch

    from vgg.training.loop import LOCAL, TorchDistributed, train_one_epoch

    t = plan.train
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=t.momentum, weight_decay=t.weight_decay)
    comm = TorchDistributed() if t.num_workers > 1 else LOCAL
    b = plan.per_worker_batch
    warm = MemoryLoader(b, args.crop, args.classes, args.warmup, seed=rank)
    train_one_epoch(net, warm, optimizer, args.warmup, 0, plan.opts, comm, device)
    loader = MemoryLoader(b, args.crop, args.classes, args.steps, seed=rank)
    best = 0.0
    for epoch in range(1, args.epochs + 1):
        barrier()
        t0 = time.perf_counter()
        train_one_epoch(net, loader, optimizer, args.steps, epoch, plan.opts, comm, device)
        barrier()
        best = max(best, args.steps * b * t.num_workers / (time.perf_counter() - t0))
    return best


def plain(args) -> float:
    """One process, no Ray, no DDP, all CPUs as torch threads (run it in a fresh process:
    inside the Ray driver process the same loop measures ~2x slower here)."""
    torch.set_num_threads(args.cpus)
    torch.manual_seed(0)
    plan = make_plan(args, 1, args.cpus)
    net = plan.opts.precision.net(build_vgg(args.arch, num_classes=args.classes, width=args.width, crop=args.crop))
    return timed_epochs(net, plan, 0, torch.device("cpu"), args)


def ray_worker(config: dict) -> float:
    """Ray Train worker: the same loop on a DDP net (prepare_model)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    import torch

    from vgg.models import build_vgg

    args, plan = config["args"], config["plan"]
    torch.set_num_threads(max(1, int(plan.train.cpus_per_worker)))
    torch.manual_seed(0)
    net = plan.opts.precision.net(build_vgg(args.arch, num_classes=args.classes, width=args.width, crop=args.crop))
    net = ray.train.torch.prepare_model(net)
    rank = ray.train.get_context().get_world_rank()
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    return timed_epochs(net, plan, rank, ray.train.torch.get_device(), args, barrier)


def with_ray(args, workers: int) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cpus = args.cpus / workers
    plan = make_plan(args, workers, cpus)
    trainer = TorchTrainer(ray_worker, train_loop_config={"args": args, "plan": plan},
                           scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
                           run_config=RunConfig(storage_path=args.storage, name=f"bench-{workers}-{time.time_ns()}"))
    return trainer.fit().return_value


def plain_in_subprocess(argv: list[str]) -> float:
    """`plain` in a fresh interpreter (a plain PyTorch script, nothing of Ray loaded)."""
    out = subprocess.run([sys.executable, __file__, *argv, "--plain-only"], check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="A")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per run; best kept")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="rounds of (plain, 1 worker, 2 workers)")
    p.add_argument("--settle", type=float, default=10.0, help="seconds to wait after starting Ray")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--precision", choices=("auto", "fp32"), default="auto",
                   help="auto: the pipeline's default choice on this CPU (bf16 and channels_last where "
                        "native); fp32: float32 NCHW")
    p.add_argument("--storage", default="/tmp/bench_train_ray")
    p.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.plain_only:
        print(plain(args))
        return

    from pipeline.runner import start_local_ray

    start_local_ray(args.cpus, "127.0.0.1", log_to_driver=False)
    time.sleep(args.settle)  # Ray's own processes start up busy: do not time against them
    print(f"VGG-{args.arch} width {args.width} crop {args.crop}, global batch {args.batch}, "
          f"{precision_of(args).params()}, "
          f"best of {args.epochs} epochs x {args.steps} steps, {args.cpus} CPUs; load average before: {os.getloadavg()}", flush=True)
    runs: dict[str, list[float]] = {"plain": [], "ray x1": [], "ray x2": []}
    for r in range(args.repeats):
        runs["plain"].append(plain_in_subprocess(argv))
        runs["ray x1"].append(with_ray(args, 1))
        runs["ray x2"].append(with_ray(args, 2))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in runs.items()), flush=True)
    best = {k: max(v) for k, v in runs.items()}
    median = {k: statistics.median(v) for k, v in runs.items()}
    print(f"load average after: {os.getloadavg()}")
    print(f"{'loop':<8} {'best img/s':>11} {'vs plain':>9} {'median img/s':>13} {'vs plain':>9}")
    for k in runs:
        print(f"{k:<8} {best[k]:>11.1f} {best[k] / best['plain']:>8.2f}x "
              f"{median[k]:>13.1f} {median[k] / median['plain']:>8.2f}x")


if __name__ == "__main__":
    main()
