"""Throughput of the loaders' backends (DALI, torch) side by side, and of the DALI
training loader vs a torchvision + DataLoader pipeline.

Backends (``--backend dali|torch|both``): the loaders of `vgg.data.loaders` with
``augment.backend`` dali or torch, same spec and shards, on the CPU with the same
number of threads; images/s of the training loader and of the three evaluation
loaders (centre crop, dense, multi-crop) at Q = single_test_scale(S). The torch
backend runs once per ``--decoders`` entry (`vgg.data.decoding`: TorchCodec, the
default, or torchvision's deprecated decoder it replaces), interleaved in this process.

Baselines (``--tv-decode``, training only): the paper's training augmentation
(isotropic rescale to a per-image S ~ U[Smin, Smax], one random crop, random flip,
PCA colour shift, mean subtraction) from the same Parquet bytes with torchvision in a
DataLoader, as many workers as the backends have threads. ``--tv-decode`` with no
value skips them.

    tar xzf /work/shared/data/cifar10-jpeg.tar.gz -C /tmp
    python benchmarks/bench_augment.py --data /tmp/cifar10 --limit 5000
    python benchmarks/bench_augment.py --data /tmp/cifar10 --limit 2000 --tv-decode --backend both
    python benchmarks/bench_augment.py --data /tmp/cifar10 --limit 2000 --tv-decode --backend torch \
        --decoders torchcodec torchvision --repeats 4

Datasets: (a) CIFAR-10 JPEGs as they are, S in [32, 64], crop 32;
(b) the same images upscaled to 224x224 and re-encoded, S in [256, 512], crop 224.
"""

from __future__ import annotations

import argparse
import functools
import gc
import io
import random
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vgg.data import decoding  # noqa: E402
from vgg.data.augmentation import AugmentSpec  # noqa: E402
from vgg.data.loaders import build_eval_loader, build_train_loader  # noqa: E402
from vgg.paper import single_test_scale  # noqa: E402

KINDS = ("train", "center", "dense", "multicrop")

SCHEMA = pa.schema([("key", pa.string()), ("label", pa.int32()), ("class_name", pa.string()),
                    ("image", pa.binary()), ("height", pa.int32()), ("width", pa.int32())])


def list_images(root: Path, limit: int, seed: int = 0) -> list[tuple[Path, int, str]]:
    """(path, label, class) of up to ``limit`` training JPEGs, a random subset."""
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    items = [(p, i, c) for i, c in enumerate(classes)
             for p in sorted((root / "train" / c).glob("*.jpg"))]
    random.Random(seed).shuffle(items)
    return items[:limit]


def write_shard(items, out: Path, size: int | None, rows_per_group: int = 1024) -> Path:
    """One Parquet file of the images (re-encoded at size x size if size is given)."""
    rows = []
    for path, label, cls in items:
        data = path.read_bytes()
        img = Image.open(io.BytesIO(data)).convert("RGB")
        if size is not None:
            buf = io.BytesIO()
            img = img.resize((size, size), Image.BICUBIC)
            img.save(buf, format="JPEG", quality=90)
            data = buf.getvalue()
        rows.append(dict(key=f"train/{cls}/{path.name}", label=label, class_name=cls,
                         image=data, height=img.height, width=img.width))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out / "part-0.parquet",
                   row_group_size=rows_per_group)
    return out / "part-0.parquet"


def fake_stats() -> dict:
    """Roughly ImageNet-like RGB statistics on the 0-255 scale (values only set the noise)."""
    vecs = [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
    return {"mean_rgb": [123.68, 116.78, 103.94], "eigvals": [14300.0, 1230.0, 290.0],
            "eigvecs": vecs}


class TorchvisionTrainSet(Dataset):
    """Same ops with torchvision's transforms; ``decode`` "tensor": TorchCodec's decode_jpeg
    (`vgg.data.decoding`) and tensor transforms, "pil": PIL decode, PIL transforms, then
    PILToTensor."""

    def __init__(self, parquet: Path, spec: AugmentSpec, scale: tuple[int, int], decode: str):
        t = pq.read_table(parquet, columns=["image", "label"])
        self.jpegs = t.column("image").to_pylist()
        self.labels = t.column("label").to_pylist()
        self.spec, self.scale, self.decode = spec, scale, decode
        self.crop = transforms.RandomCrop(spec.crop)
        self.flip = transforms.RandomHorizontalFlip() if spec.flip else (lambda x: x)
        self.mean = torch.tensor(spec.mean_rgb, dtype=torch.float32)
        self.pca = torch.tensor(spec.pca_matrix(), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int):
        s = random.randint(*self.scale)  # scale jittering: S ~ U[Smin, Smax] per image
        resize = transforms.Resize(s, antialias=True)  # shorter side -> S
        if self.decode == "pil":
            img = Image.open(io.BytesIO(self.jpegs[i])).convert("RGB")
            img = TF.pil_to_tensor(self.flip(self.crop(resize(img))))  # (3, crop, crop) uint8
        else:
            img = decoding.decode_jpeg(torch.frombuffer(bytearray(self.jpegs[i]), dtype=torch.uint8))
            img = self.flip(self.crop(resize(img)))
        shift = self.pca @ (torch.randn(3) * self.spec.color_noise_std)  # AlexNet PCA noise
        return img.float() - (self.mean - shift)[:, None, None], self.labels[i]


def cpu_seconds() -> float:
    """CPU time of this process (DALI threads included) and its children (DataLoader workers)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def torchvision_batches(parquet, spec, scale, decode, batch, workers) -> Iterator:
    ds = TorchvisionTrainSet(parquet, spec, scale, decode)
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                    persistent_workers=True, drop_last=False)
    while True:
        yield from dl


def dali_batches(parquet, spec, scale, batch) -> Iterator:
    loader = build_train_loader([parquet], spec, scale, batch, seed=0)
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def backend_batches(parquet, spec, scale, kind, batch, eval_batch) -> Iterator:
    """Endless batches of one loader kind of spec.backend (passes repeated)."""
    if kind == "train":
        loader = build_train_loader([parquet], spec, scale, batch, seed=0)
        epoch = 0
        while True:
            yield from loader.epoch(epoch)
            epoch += 1
    q = single_test_scale(scale, spec.crop)
    loader = build_eval_loader([parquet], spec, q, eval_batch, mode=kind, grid=5, flips=True)
    while True:
        yield from loader


def timed(make: Callable[[], Iterator], n: int, warmup: int) -> tuple[float, float]:
    """(images/s, CPU microseconds per image) over n batches of a fresh loader.

    The loader is built, warmed up, timed, and torn down, so no other loader
    prefetches in the background meanwhile. Its queue is full when timing
    starts (DataLoader: 2 batches per worker, DALI: prefetch depth), so n
    should be well above that.
    """
    batches = make()
    for _ in range(warmup):
        next(batches)
    images, c0, t0 = 0, cpu_seconds(), time.perf_counter()
    for _ in range(n):
        images += next(batches)[0].shape[0]
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    batches.close()
    gc.collect()  # stops DataLoader workers / frees the DALI pipeline
    return images / wall, cpu / images * 1e6


def bench_case(parquet, spec, scale, args, timed_batches: int) -> dict[str, list]:
    """Interleaved repeats (the machine may be shared): {name: [(img/s, cpu-us/img)]}."""
    makers = {"DALI": lambda: dali_batches(parquet, spec, scale, args.batch)}
    for decode in args.tv_decode:
        makers[f"torchvision[{decode}]"] = functools.partial(
            torchvision_batches, parquet, spec, scale, decode, args.batch, args.threads)
    results = {name: [] for name in makers}
    for _ in range(args.repeats):
        for name, make in makers.items():
            results[name].append(timed(make, timed_batches, args.warmup))
    return results


def bench_backends(parquet, spec, scale, args, timed_batches: int) -> dict:
    """{(kind, backend): [(img/s, cpu-us/img)]}, interleaved repeats; the torch backend once
    per decoder ("torch[torchvision]" for a decoder other than the default)."""
    backends = ["dali", "torch"] if args.backend == "both" else [args.backend]
    runs = [(b, d) for b in backends for d in (args.decoders if b == "torch" else [None])]
    results: dict = {}
    for r in range(args.repeats):
        for kind in KINDS:
            n = timed_batches if kind == "train" else max(2, timed_batches // 2)
            for b, d in (runs if r % 2 == 0 else runs[::-1]):  # ABBA order
                decoding.use(d)
                make = functools.partial(backend_batches, parquet,
                                         dataclasses.replace(spec, backend=b), scale, kind,
                                         args.batch, args.eval_batch)
                name = b if d in (None, "torchcodec") or len(args.decoders) == 1 else f"{b}[{d}]"
                results.setdefault((kind, name), []).append(timed(make, n, args.warmup))
    decoding.use(None)
    return results


def report_backends(name: str, title: str, results: dict) -> None:
    backends = sorted({b for _, b in results})
    print(f"({name}) {title}: loaders by backend, CPU, images/s (median) and CPU us/image")
    print("    " + f"{'kind':10s}" + "".join(f"{b + ' img/s':>{max(14, len(b) + 8)}s}{'cpu-us/img':>12s}"
                                         for b in backends)
          + (f"   {backends[0]}/{backends[1]}" if len(backends) == 2 else ""))
    for kind in KINDS:
        med = {b: (float(np.median([r[0] for r in results[(kind, b)]])),
                   float(np.median([r[1] for r in results[(kind, b)]]))) for b in backends}
        line = f"    {kind:10s}" + "".join(f"{med[b][0]:{max(14, len(b) + 8)}.0f}{med[b][1]:12.0f}"
                                             for b in backends)
        if len(backends) == 2:
            line += f"   {med[backends[0]][0] / med[backends[1]][0]:8.2f}x"
        print(line)


def report(name: str, title: str, results: dict[str, list]) -> None:
    med = {k: (float(np.median([r[0] for r in v])), float(np.median([r[1] for r in v])))
           for k, v in results.items()}
    print(f"({name}) {title}")
    for k, (ips, cpu) in med.items():
        runs = ", ".join(f"{r[0]:.0f}" for r in results[k])
        print(f"    {k:20s} {ips:8.0f} img/s (median of {runs})  {cpu:8.1f} cpu-us/img")
    dali_ips, dali_cpu = med["DALI"]
    for k, (ips, cpu) in med.items():
        if k != "DALI":
            print(f"    DALI vs {k:20s} throughput {dali_ips / ips:5.2f}x   "
                  f"CPU cost per image {cpu / dali_cpu:5.2f}x lower")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="extracted cifar10/ folder")
    ap.add_argument("--limit", type=int, default=5000, help="images per dataset")
    ap.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs=2, default=[40, 16], metavar=("A", "B"),
                    help="timed batches per repeat for case (a) and (b)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats (median shown)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prefetch", type=int, default=2, help="DALI prefetch_queue_depth")
    ap.add_argument("--only", choices=["a", "b"], default=None)
    ap.add_argument("--tv-decode", nargs="*", choices=["pil", "tensor"], default=["pil", "tensor"],
                    help="torchvision baselines: PIL images, or TorchCodec's decode_jpeg + tensor transforms "
                         "(none given: no baselines)")
    ap.add_argument("--backend", choices=["dali", "torch", "both", "none"], default="both",
                    help="loaders' backends to time side by side (train, center, dense, "
                         "multicrop); none: only DALI vs the torchvision baselines")
    ap.add_argument("--decoders", nargs="+", choices=["torchcodec", "torchvision"], default=["torchcodec"],
                    help="the torch backend's JPEG decoders, timed in interleaved runs (torchvision: the "
                         "deprecated decoder TorchCodec replaces)")
    ap.add_argument("--eval-batch", type=int, default=16,
                    help="evaluation batch (multi-crop: 50 crops per image)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    items = list_images(args.data, args.limit)
    cases = {"a": ("CIFAR-10 32px, S in [32, 64], crop 32", None, (32, 64), 32),
             "b": ("224px JPEGs, S in [256, 512], crop 224", 224, (256, 512), 224)}
    print(f"{len(items)} images, batch {args.batch} (eval {args.eval_batch}), {args.threads} "
          f"loader threads = DataLoader workers, prefetch {args.prefetch}, {args.repeats} "
          f"interleaved repeats, load average {' '.join(f'{x:.1f}' for x in psutil.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (title, size, scale, crop)) in enumerate(cases.items()):
            if args.only and name != args.only:
                continue
            parquet = write_shard(items, Path(tmp) / name, size)
            spec = AugmentSpec.from_stats(fake_stats(), crop=crop, device="cpu",
                                          num_threads=args.threads, prefetch=args.prefetch)
            if args.backend != "none":
                report_backends(name, title, bench_backends(parquet, spec, scale, args,
                                                            args.batches[i]))
                print(f"    load average now {' '.join(f'{x:.1f}' for x in psutil.getloadavg())}")
            if args.tv_decode:
                report(name, title, bench_case(parquet, spec, scale, args, args.batches[i]))

if __name__ == "__main__":
    main()
