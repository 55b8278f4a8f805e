"""Dense evaluation vs 150-crop multi-crop evaluation: images per second (paper Sec. 3.2).

The paper's argument for dense evaluation: the fully-convolutional net runs
once per image (and its flip) at each scale Q, while multi-crop runs the net
on g*g*2 crops per scale, recomputing overlapping windows. Same net, same Q
set, same decoded images (vgg.evaluation.shares.evaluate_share with one method at a
time, in this process on the CPU, or the GPU with --gpu).

    python benchmarks/bench_evaluate.py                 # net D, width 0.25, crop 64, 64 images
    python benchmarks/bench_evaluate.py --threads 8     # on a machine with 8 free cores

On the 2-core shared dev machine (1 torch thread): dense ~10 images/s, multi-crop
~1.3 images/s, dense ~8x faster per image (forward passes; ~7.7x wall clock).

Images are generated (vgg.data.demo) with sides in [--min-side, --max-side]
and written to one Parquet shard; the jittered training scale --scale gives
Q = {Smin, (Smin+Smax)/2, Smax} (default {64, 96, 128}).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.config import EvaluateConfig  # noqa: E402
from vgg.data.augmentation import AugmentSpec  # noqa: E402
from vgg.data.demo import MAX_CLASSES, make_image  # noqa: E402
from vgg.evaluation.shares import ShareJob, evaluate_share, q_sets  # noqa: E402
from vgg.models import build_vgg  # noqa: E402

SCHEMA = pa.schema([("key", pa.string()), ("label", pa.int32()), ("class_name", pa.string()),
                    ("image", pa.binary()), ("height", pa.int32()), ("width", pa.int32())])
STATS = {"mean_rgb": [100.0, 100.0, 100.0], "eigvals": [1000.0, 100.0, 10.0],
         "eigvecs": np.eye(3).tolist()}


def write_shard(folder: Path, n: int, min_side: int, max_side: int, classes: int, seed: int = 0) -> None:
    """n generated JPEGs (random sides in [min_side, max_side]) as one Parquet file."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % classes
        h, w = (int(s) for s in rng.integers(min_side, max_side + 1, size=2))
        buf = io.BytesIO()
        Image.fromarray(make_image(label, h, w, rng)).save(buf, "JPEG", quality=90)
        rows.append(dict(key=f"val/c{label}/{i:05d}.jpg", label=label, class_name=f"c{label}",
                         image=buf.getvalue(), height=h, width=w))
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / "part-0.parquet", row_group_size=256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--arch", default="D")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--scale", type=int, nargs=2, default=[64, 128], metavar=("SMIN", "SMAX"))
    ap.add_argument("--min-side", type=int, default=72)
    ap.add_argument("--max-side", type=int, default=128)
    ap.add_argument("--grid", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    # More torch (OpenMP) threads than free cores makes them spin and run ~10x slower:
    # on a shared machine keep 1.
    ap.add_argument("--threads", type=int, default=1, help="torch threads (DALI uses as many)")
    ap.add_argument("--gpu", action="store_true", help="net and DALI decoding on the GPU")
    args = ap.parse_args()

    classes = min(MAX_CLASSES, 8)
    _, qs = q_sets(args.scale, args.crop, EvaluateConfig())
    torch.manual_seed(0)
    net = build_vgg(args.arch, num_classes=classes, width=args.width, crop=args.crop, init="glorot")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_shard(tmp / "val", args.images, args.min_side, args.max_side, classes)
        torch.save({"state_dict": net.state_dict(), "arch": args.arch, "width": args.width, "crop": args.crop,
                    "num_classes": classes, "batch_norm": False}, tmp / "model.pt")
        spec = AugmentSpec.from_stats(STATS, crop=args.crop, device="gpu" if args.gpu else "cpu",
                                      num_threads=max(1, args.threads))
        job = ShareJob(str(tmp / "model.pt"), str(tmp / "val"), spec.to_dict(), tuple(qs),
                       tuple(f"c{i}" for i in range(classes)), grid=args.grid, flips=True,
                       batch_size=args.batch_size, use_gpu=args.gpu, threads=args.threads, name="bench")
        # warm-up (pipelines, allocator, kernels) on a share of ~8 images
        evaluate_share(dataclasses.replace(job, qs=(qs[0],), world_size=max(1, args.images // 8)))
        results = {}
        for method in ("dense", "multi-crop"):
            t0 = time.perf_counter()
            res = evaluate_share(dataclasses.replace(job, methods=(method,)))
            results[method] = (res, time.perf_counter() - t0)

    n = args.images
    crops = args.grid * args.grid * 2
    device = torch.cuda.get_device_name() if args.gpu else f"CPU, {args.threads} torch threads"
    print(f"net {args.arch} width {args.width} crop {args.crop}, {n} images with sides in "
          f"[{args.min_side}, {args.max_side}], Q = {qs}, {device}")
    print(f"{'method':<11} {'net inputs/image':>17} {'forward img/s':>14} {'decode+fwd img/s':>17} {'wall img/s':>11}")
    for method, (res, wall) in results.items():
        inputs = f"{2 * len(qs)} images" if method == "dense" else f"{crops * len(qs)} crops"
        fwd = n / res.seconds[method]
        e2e = n / (res.seconds[method] + res.seconds["decode"])
        print(f"{method:<11} {inputs:>17} {fwd:14.1f} {e2e:17.1f} {n / wall:11.1f}")
    (d, dw), (m, mw) = results["dense"], results["multi-crop"]
    print(f"dense is {m.seconds['multi-crop'] / d.seconds['dense']:.1f}x faster per image in the net, "
          f"{(m.seconds['multi-crop'] + m.seconds['decode']) / (d.seconds['dense'] + d.seconds['decode']):.1f}x "
          f"with decoding, {mw / dw:.1f}x wall clock")


if __name__ == "__main__":
    main()
