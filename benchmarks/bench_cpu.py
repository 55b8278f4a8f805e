"""CPU throughput of training and evaluation per net, size and variant, against this CPU's
matmul roofline measured in the same process.

For each net x size (width, crop, batch) x variant (fp32 NCHW, fp32 NHWC, bf16 NHWC, and
with --compile the same under torch.compile): training images/s (one SGD step of
`vgg.training.steps.sgd_step` at the variant's `Precision`, momentum and weight decay as
the paper's), evaluation images/s (a no_grad forward in eval mode), the achieved TFLOP/s
(6 x `vgg.models.forward_macs` per training image, 2 x per evaluation image) and its
fraction of a bf16 and of an fp32 4096 x 4096 matmul on the same threads. The variants
(and the matmuls) run interleaved, in --rounds rounds; figures are medians over the rounds.
A compiled variant reports its compile time (its first step, less a steady one) and after
how many training steps it pays that back against the same variant in eager mode.

    python benchmarks/bench_cpu.py                                    # A, D, E at 3 sizes
    python benchmarks/bench_cpu.py --nets A A-LRN --sizes 0.25:96:64  # the LRN layer's cost
    python benchmarks/bench_cpu.py --nets A-LRN --sizes 0.25:96:64 --torch-lrn --profile  # PyTorch's LRN
    python benchmarks/bench_cpu.py --nets A --sizes 0.0625:32:4 --rounds 1 --steps 1 \\
        --roofline-n 256                                               # toy size, seconds

PyTorch and the project's model and step code only (no DALI, Ray, MLflow or pyarrow).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vgg.models import available_nets, build_vgg, forward_macs  # noqa: E402
from vgg.training.steps import Precision, sgd_step  # noqa: E402

VARIANTS = {"fp32-nchw": Precision(False, False), "fp32-nhwc": Precision(False, True),
            "bf16-nhwc": Precision(True, True)}
SIZES = ("0.25:32:100", "0.5:64:64", "1.0:96:32")  # width:crop:batch
CLASSES = 10
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def size_spec(text: str) -> tuple[float, int, int]:
    """'WIDTH:CROP:BATCH' -> (width, crop, batch); argparse turns a ValueError into 'error:'."""
    try:
        w, c, b = text.split(":")
        width, crop, batch = float(w), int(c), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTH:CROP:BATCH (e.g. 0.5:64:64)")
    if width <= 0 or crop < 32 or crop % 32 or batch < 1:
        raise argparse.ArgumentTypeError(f"size {text!r}: width > 0, crop a multiple of 32, batch >= 1")
    return width, crop, batch


def matmul_tflops(n: int, dtype: torch.dtype, reps: int) -> float:
    """TFLOP/s of an n x n x n matmul (2 n^3 FLOPs), best of `reps` after one warm-up."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        a @ b
        best = min(best, clock() - t0)
    return 2 * n**3 / best / 1e12


def seconds(fn, calls: int) -> float:
    """Seconds (by --clock) of `calls` calls of fn."""
    t0 = clock()
    for _ in range(calls):
        fn()
    return clock() - t0


class Variant:
    """One net at one precision / layout, eager or compiled: its SGD step and its forward."""

    def __init__(self, name: str, net: torch.nn.Module, batch: int, crop: int, compiled: bool):
        self.name, self.prec, self.batch = name, VARIANTS[name.removesuffix("+compile")], batch
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 3, crop, crop, generator=g)
        self.labels = torch.randint(0, CLASSES, (batch,), generator=g)
        self.net = self.prec.net(copy.deepcopy(net))
        self.run = torch.compile(self.net) if compiled else self.net
        self.opt = torch.optim.SGD(self.net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        self.first_step_s = seconds(self.train, 1)  # compilation, oneDNN's first-call set-up
        self.first_eval_s = seconds(self.eval, 1)

    def train(self) -> None:
        self.run.train()
        sgd_step(self.run, self.opt, self.images, self.labels, self.batch, self.prec)

    def eval(self) -> None:
        self.run.eval()
        with torch.no_grad(), self.prec.autocast(self.images.device):
            self.run(self.prec.images(self.images))


def bench_size(net_name: str, width: float, crop: int, batch: int, args) -> list[dict]:
    """Rows (one per variant) of one net at one size, the variants interleaved in rounds."""
    torch.manual_seed(0)
    net = build_vgg(net_name, num_classes=CLASSES, width=width, crop=crop)
    macs = forward_macs(net)
    if args.torch_lrn:  # PyTorch's own layer in place of vgg.models' fast path
        for i, m in enumerate(net.features):
            if isinstance(m, nn.LocalResponseNorm):
                net.features[i] = nn.LocalResponseNorm(m.size, m.alpha, m.beta, m.k)
        net_name += " (torch LRN)" if "LRN" in net_name else ""
    names = list(args.variants) + ([f"{v}+compile" for v in args.variants] if args.compile else [])
    variants = [Variant(n, net, batch, crop, n.endswith("+compile")) for n in names]
    times = {n: {"train": [], "eval": []} for n in names}
    roof = {"bf16": [], "fp32": []}
    for _ in range(args.rounds):
        for v in variants:
            times[v.name]["train"].append(seconds(v.train, args.steps) / args.steps)
            times[v.name]["eval"].append(seconds(v.eval, args.steps) / args.steps)
        roof["fp32"].append(matmul_tflops(args.roofline_n, torch.float32, 2))
        roof["bf16"].append(matmul_tflops(args.roofline_n, torch.bfloat16, 2))
    roofline = {k: statistics.median(r) for k, r in roof.items()}
    if args.profile:
        for v in variants:
            with torch.profiler.profile() as prof:
                v.train()
            print(f"torch.profiler, one training step of {net_name} at {width:g}:{crop}:{batch}, "
                  f"{v.name}:\n{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=12)}")
    rows = []
    for v in variants:
        step_s, eval_s = (statistics.median(times[v.name][k]) for k in ("train", "eval"))
        train_tflops, eval_tflops = 6 * macs * batch / step_s / 1e12, 2 * macs * batch / eval_s / 1e12
        row = {"net": net_name, "width": width, "crop": crop, "batch": batch, "variant": v.name,
               "train_images_s": batch / step_s, "eval_images_s": batch / eval_s,
               "train_tflops": train_tflops, "eval_tflops": eval_tflops,
               "train_of_bf16_roofline": train_tflops / roofline["bf16"],
               "train_of_fp32_roofline": train_tflops / roofline["fp32"],
               "eval_of_bf16_roofline": eval_tflops / roofline["bf16"],
               "eval_of_fp32_roofline": eval_tflops / roofline["fp32"],
               "roofline_tflops": roofline, "forward_gmacs": macs / 1e9}
        if v.name.endswith("+compile"):
            eager = statistics.median(times[v.name.removesuffix("+compile")]["train"])
            compile_s = v.first_step_s - step_s
            row["compile_s"] = compile_s
            row["payback_steps"] = compile_s / (eager - step_s) if eager > step_s else None
        rows.append(row)
    return rows


def print_header() -> None:
    print("| net | width, crop, batch | variant | train img/s | eval img/s | train TFLOP/s "
          "(of bf16 / fp32 roofline) | eval TFLOP/s (of bf16 / fp32) | compile s, payback steps |")
    print("|---|---|---|---|---|---|---|---|", flush=True)


def print_rows(rows: list[dict]) -> None:
    """Markdown table rows: images/s (ratio to fp32 NCHW), TFLOP/s and roofline fractions."""
    base = {(r["net"], r["width"], r["crop"]): r for r in rows if r["variant"] == "fp32-nchw"}
    for r in rows:
        b = base.get((r["net"], r["width"], r["crop"]))

        def rate(key: str) -> str:
            return f"{r[key]:,.0f}" + (f" ({r[key] / b[key]:.1f}x)" if b and b is not r else "")

        comp = "-"
        if "compile_s" in r:
            pay = "never" if r["payback_steps"] is None else f"{r['payback_steps']:,.0f}"
            comp = f"{r['compile_s']:.0f} s, {pay}"
        print(f"| {r['net']} | {r['width']:g}, {r['crop']}, {r['batch']} | {r['variant']} "
              f"| {rate('train_images_s')} | {rate('eval_images_s')} "
              f"| {r['train_tflops']:.3f} ({r['train_of_bf16_roofline']:.0%} / {r['train_of_fp32_roofline']:.0%}) "
              f"| {r['eval_tflops']:.3f} ({r['eval_of_bf16_roofline']:.0%} / {r['eval_of_fp32_roofline']:.0%}) "
              f"| {comp} |", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", nargs="+", choices=available_nets(), default=["A", "D", "E"])
    p.add_argument("--sizes", nargs="+", type=size_spec, default=[size_spec(s) for s in SIZES],
                   metavar="WIDTH:CROP:BATCH", help=f"default {' '.join(SIZES)}")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--compile", action="store_true",
                   help="also each variant under torch.compile (minutes of compilation per net)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians")
    p.add_argument("--steps", type=int, default=2, help="timed steps (and forwards) per round")
    p.add_argument("--roofline-n", type=int, default=4096, help="side of the roofline matmuls")
    p.add_argument("--torch-lrn", action="store_true",
                   help="A-LRN with torch.nn.LocalResponseNorm instead of vgg.models' fast path")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's top ops of one training step per variant")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="cpu: the process's CPU time, not wall time; with --threads 1 it stands "
                        "in for a quiet machine's figures on a loaded one")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if min(args.rounds, args.steps, args.roofline_n, args.threads) < 1:
        p.error("--rounds, --steps, --roofline-n and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    print(f"bench_cpu: torch {torch.__version__}, {args.threads} threads, {args.clock} clock, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    print_header()
    rows = []
    for width, crop, batch in args.sizes:
        for net_name in args.nets:
            rows += bench_size(net_name, width, crop, batch, args)
            print_rows(rows[-len(args.variants) * (1 + args.compile):])
    roofs = [r["roofline_tflops"] for r in rows]
    print(f"roofline (medians of each net and size's rounds): fp32 {min(r['fp32'] for r in roofs):.3f}-"
          f"{max(r['fp32'] for r in roofs):.3f}, bf16 {min(r['bf16'] for r in roofs):.3f}-"
          f"{max(r['bf16'] for r in roofs):.3f} TFLOP/s ({args.roofline_n}^2 matmul); "
          f"load average now {os.getloadavg()[0]:.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "clock": args.clock,
                                                   "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
