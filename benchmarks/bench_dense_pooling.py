"""Dense evaluation with Caffe's ceil-mode pools vs PyTorch's floor-mode pools, and the
centre crop, on a trained net at several test scales Q (top-1 error, %).

At sides that are multiples of 32 the two roundings are identical; elsewhere ceil keeps
the last, partial feature cell (the authors' Caffe did) and floor drops it. This prints
what that does to a net's dense error, next to a single centre crop of the same image.

    python benchmarks/bench_dense_pooling.py --work-dir /tmp/ladder_runs --net A --q 32 37 42 48 64

Reads the latest train/<net>, shard and augment outputs of the work_dir; CPU, one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from pipeline.storage import Store
from vgg.data.loaders import build_eval_loader
from vgg.evaluation.scoring import grid_crops
from vgg.artifacts import Augmentation, Shards, TrainedNet
from vgg.models import set_pool_rounding


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--net", default="A", help="plan name of the net (train/<net>)")
    p.add_argument("--q", type=int, nargs="+", default=[32, 37, 42, 48, 64])
    p.add_argument("--limit", type=int, default=2000, help="validation images per Q")
    p.add_argument("--batch-size", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(1)
    store = Store(args.work_dir)
    outs = {sid: store.latest(sid) for sid in ("shard", "augment", f"train/{args.net}")}
    missing = [sid for sid, o in outs.items() if o is None]
    if missing:
        raise SystemExit(f"no completed output of {', '.join(missing)} in {args.work_dir}")
    spec = dataclasses.replace(Augmentation(outs["augment"]).spec(), device="cpu")
    net, meta = TrainedNet(outs[f"train/{args.net}"]).load()
    print(f"net {args.net} ({meta['arch']}, width {meta['width']}, crop {meta['crop']}, trained at "
          f"S = {meta['config']['net']['scale']}); top-1 error %, first {args.limit} validation images")
    print(f"{'Q':>4} {'dense ceil':>11} {'dense floor':>12} {'centre crop':>12} {'images':>7} {'s':>6}")
    for q in args.q:
        wrong = dict.fromkeys(("ceil", "floor", "centre"), 0)
        n, t0 = 0, time.perf_counter()
        loader = build_eval_loader(Shards(outs["shard"]).split("val"), spec, q, args.batch_size, mode="dense")
        with torch.inference_mode():
            for images, labels, _ in loader:  # (B, 3, H, W), one size per batch
                for rounding in ("ceil", "floor"):
                    scores = set_pool_rounding(net, rounding).dense_scores(images)
                    wrong[rounding] += (scores.argmax(1) != labels).sum().item()
                centre = grid_crops(images, net.crop, 1, False)[:, 0]  # (B, 3, crop, crop)
                wrong["centre"] += (net(centre).argmax(1) != labels).sum().item()
                n += len(labels)
                if n >= args.limit:
                    break
        err = {k: 100.0 * v / n for k, v in wrong.items()}
        print(f"{q:>4} {err['ceil']:>11.1f} {err['floor']:>12.1f} {err['centre']:>12.1f} {n:>7} "
              f"{time.perf_counter() - t0:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
