"""Throughput of the in-memory loaders (`vgg.data.memory`): decode a split once into an
ImageStore on the device, then time training epochs of MemoryTrainLoader (no model: the
images/s the augmentation alone allows) and one pass of each evaluation mode.

    tar xzf /work/shared/data/imagenette-128.tar.gz -C /tmp
    python benchmarks/bench_memory_loader.py --data /tmp/imagenette-128      # CUDA if present
    python benchmarks/bench_memory_loader.py --device cpu --threads 2         # generated images
    python benchmarks/bench_memory_loader.py --data /tmp/imagenette-128 --device cpu \
        --decoders torchcodec torchvision --rounds 4 --decode-only               # decoders compared

Without --data, --generate N images (short side 128 px, long side 128-192 px, 10 classes)
are written to a temporary folder. ``--decoders``: the stores are built with each
(`vgg.data.decoding`: TorchCodec, or torchvision's deprecated decoder it replaces) in
alternating rounds (ABBA order), in this process, so both see the same machine load.
Imports PyTorch, TorchCodec, numpy and PIL only (torchvision for its decoder).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vgg.data import decoding  # noqa: E402
from vgg.data.augmentation import AugmentSpec  # noqa: E402
from vgg.data.memory import MemoryEvalLoader, MemoryTrainLoader, folder_stores, rgb_stats  # noqa: E402
from vgg.paper import jitter_at, single_test_scale  # noqa: E402


def generate(root: Path, n: int, seed: int = 0) -> None:
    """n JPEGs (80% train, 20% val) in 10 class folders, shorter side 128 px."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        split = "val" if (i // 10) % 5 == 0 else "train"
        d = root / split / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        long_side = int(rng.integers(128, 193))
        h, w = (128, long_side) if i % 2 else (long_side, 128)
        y, x = np.mgrid[:h, :w]
        a = np.stack([(x * (i % 7 + 1)) % 256, (y * 3) % 256, ((x + y) * 2) % 256], -1)
        a = np.clip(a + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(d / f"{i:06d}.jpg", quality=90)


def machine(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"CPU {cpu}, {os.cpu_count()} cores, {threads} torch threads, load average "
            f"{os.getloadavg()[0]:.1f} (torch {torch.__version__})")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="image folder <data>/{train,val}/<class>/*")
    ap.add_argument("--generate", type=int, default=2000, help="images to generate without --data")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--crop", type=int, default=112)
    ap.add_argument("--scale", type=int, nargs="+", help="S or Smin Smax (default: the paper's "
                    "jitter range translated to the crop, [128, 256] at crop 112)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    ap.add_argument("--decoders", nargs="+", choices=["torchcodec", "torchvision"], default=["torchcodec"],
                    help="decoders to build the stores with, in alternating rounds (the last one's stores are used)")
    ap.add_argument("--rounds", type=int, default=1, help="store builds per decoder (interleaved)")
    ap.add_argument("--decode-only", action="store_true", help="stop after building the stores")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    scale = tuple(args.scale) if args.scale and len(args.scale) == 2 else (
        args.scale[0] if args.scale else jitter_at(args.crop))
    print(f"machine: {machine(device, args.threads)}")

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            root = str(Path(tmp) / "gen")
            generate(Path(root), args.generate)
            print(f"data: {args.generate} generated JPEGs, shorter side 128 px")
        rates: dict[str, list] = {d: [] for d in args.decoders}
        for r in range(args.rounds):
            for dec in (args.decoders if r % 2 == 0 else args.decoders[::-1]):
                decoding.use(dec)
                train = val = None
                t0, c0, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
                classes, train, val = folder_stores(root, device)
                sync(device)
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                n = len(train) + len(val)
                rates[dec].append((n / dt, n / cpu))
                print(f"decode ({decoding.backend()}): {len(train)} train + {len(val)} val images of "
                      f"{len(classes)} classes in {dt:.1f} s ({n / dt:.0f} images/s, {n / cpu:.0f} per "
                      f"CPU-second; listing and file reads included; load average {load:.1f}); store "
                      f"{train.nbytes + val.nbytes:,} bytes ({train.num_pixels + val.num_pixels:,} "
                      f"pixels x 3) on {device}")
        decoding.use(None)
        for dec, v in rates.items():
            print(f"DECODE {dec}: {np.median([x for x, _ in v]):.0f} images/s, "
                  f"{np.median([c for _, c in v]):.0f} per CPU-second (medians of {len(v)} rounds: "
                  f"{', '.join(f'{x:.0f}' for x, _ in v)})")
    if args.decode_only:
        return

    t0 = time.perf_counter()
    stats = rgb_stats(train)
    print(f"rgb_stats: {time.perf_counter() - t0:.2f} s, mean RGB "
          f"{[round(v, 2) for v in stats['mean_rgb']]}")
    spec = AugmentSpec.from_stats(stats, crop=args.crop)

    loader = MemoryTrainLoader(train, spec, scale, args.batch, seed=0)
    print(f"train: batch {args.batch}, crop {args.crop}, S {scale}, {len(loader)} batches/epoch")
    rates = []
    for e in range(args.epochs):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        k = 0
        for images, labels in loader.epoch(e):
            k += images.shape[0]
        sync(device)
        rates.append(k / (time.perf_counter() - t0))
        cpu = time.process_time() - c0
        print(f"  epoch {e}: {k} images, {rates[-1]:.0f} images/s ({cpu:.1f} CPU-s of this "
              f"process: {k / cpu:.0f} images per CPU-second)")
    if rates:
        print(f"TRAIN {max(rates):.0f} images/s (best epoch) on {machine(device, args.threads)}")

    q = single_test_scale(scale, args.crop)
    for mode in ("center", "dense", "multicrop"):
        ld = MemoryEvalLoader(val, spec, q, args.batch, mode=mode)
        sync(device)
        t0 = time.perf_counter()
        k, shape = 0, None
        for images, labels, keys in ld:
            k, shape = k + images.shape[0], tuple(images.shape[1:])
        sync(device)
        print(f"eval {mode} Q={q}: {k} images {shape}, {k / (time.perf_counter() - t0):.0f} images/s")


if __name__ == "__main__":
    main()
