"""The shard stage at scale: `pipeline.sharding.shard` on a generated image folder of N
small JPEGs (or the same images packed as ILSVRC-2012's official archives), under a
private local Ray instance with every CPU of the machine.

Per folder size, in a fresh subprocess (so that the driver's peak RSS is that size's
alone): the listing time, the validate pass (decode every image, pixel sums) and the
write pass (balanced Parquet shards) in images/s, the total in images/s and per core,
and the driver's memory: RSS before `shard()`, its peak during `shard()` (psutil sampled
every 20 ms, and getrusage's ru_maxrss), the growth per image, and what the listing
alone takes per image. Ray's worker processes are not counted (they are not the driver's
children).

The phases are timed by the stage's own log lines: listing = start -> the "validating"
line, validate = -> the "validated" line, write = -> the last split's line; the rest of
`total` is the statistics and the index files. Ray's workers are started and warmed up
(imports) by a small job first, timed apart (the stage pays it once; --cold leaves it
out). Since the machine may be shared, each phase's CPU time is measured too (the
driver and its descendants: the Ray instance it started, workers included): CPU-ms per
image gives images/s per fully used core, which load does not change much.

    python benchmarks/bench_shard.py                          # 5,000 and 20,000 images, 100 classes
    python benchmarks/bench_shard.py --sizes 2000 --classes 20
    python benchmarks/bench_shard.py --layout ilsvrc2012       # the same, as ILSVRC-2012's archives
    python benchmarks/bench_shard.py --sizes 2000 --min-side 333 --max-side 500   # ImageNet-sized images
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def image_pool(min_side: int, max_side: int, rng, k: int = 64) -> list[bytes]:
    """k JPEGs of random sides in [min_side, max_side]: smooth random colour fields plus
    noise, so that JPEG sizes and decode times are realistic."""
    pool = []
    for _ in range(k):
        h, w = rng.integers(min_side, max_side + 1, size=2)
        small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        im = np.asarray(Image.fromarray(small).resize((int(w), int(h)), Image.BICUBIC), dtype=np.int16)
        im = np.clip(im + rng.integers(-20, 21, size=im.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "JPEG", quality=90)
        pool.append(buf.getvalue())
    return pool


def generate(root: Path, n: int, classes: int, min_side: int, max_side: int, val_fraction: float, seed: int,
             layout: str = "folders") -> dict:
    """n JPEGs (a val_fraction of them for validation) over `classes` classes. Fast: the
    bytes of 64 pre-encoded images are copied to the files.

    folders:    <root>/{train,val}/cNNN/NNNNNNN.jpg
    ilsvrc2012: the official archives in <root>: ILSVRC2012_img_train.tar (a tar of
                per-class tars n000000NN.tar), ILSVRC2012_img_val.tar (flat
                ILSVRC2012_val_NNNNNNNN.JPEG) and ILSVRC2012_devkit_t12.tar.gz (meta.mat with
                the classes in a shuffled ILSVRC2012_ID order, the ground-truth txt)."""
    rng = np.random.default_rng(seed)
    pool = image_pool(min_side, max_side, rng)
    n_val = int(round(n * val_fraction))
    picks = rng.integers(len(pool), size=n)
    total_bytes = int(sum(len(pool[p]) for p in picks))
    if layout == "folders":
        for i in range(n):
            split, j = ("val", i - (n - n_val)) if i >= n - n_val else ("train", i)
            d = root / split / f"c{j % classes:03d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{j:07d}.jpg").write_bytes(pool[picks[i]])
        return {"train": n - n_val, "val": n_val, "bytes": total_bytes}

    import tarfile

    import scipy.io as sio

    root.mkdir(parents=True, exist_ok=True)
    wnids = [f"n{j:08d}" for j in range(classes)]

    def add(tf, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for c, wnid in enumerate(wnids):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for i in range(c, n - n_val, classes):
                    add(inner, f"{wnid}_{i}.JPEG", pool[picks[i]])
            add(outer, f"{wnid}.tar", buf.getvalue())
    order = list(rng.permutation(classes))  # ILSVRC2012_ID k + 1 = wnids[order[k]]
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tf:
        for j in range(n_val):
            add(tf, f"ILSVRC2012_val_{j + 1:08d}.JPEG", pool[picks[n - n_val + j]])
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros((classes, 1), dtype=[(f, "O") for f in fields])
    for k, c in enumerate(order):
        synsets[k, 0] = (k + 1, wnids[c], f"class {c}", "", 0, np.zeros((1, 0)), 0, 0)
    mat = io.BytesIO()
    sio.savemat(mat, {"synsets": synsets})
    truth = "".join(f"{order.index(j % classes) + 1}\n" for j in range(n_val)).encode()
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tf:
        add(tf, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        add(tf, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)
    return {"train": n - n_val, "val": n_val, "bytes": total_bytes}


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS(threading.Thread):
    """The driver's peak RSS (bytes), sampled every `every` seconds until stopped."""

    def __init__(self, every: float = 0.02):
        super().__init__(daemon=True)
        self.every, self.peak, self._done = every, rss(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.peak = max(self.peak, rss())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, rss())


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its descendants (its Ray instance)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def measure(root: str, layout: str, num_cpus: int, rows_per_shard: int, work: str, cold: bool) -> dict:
    """One size, in this (fresh) process."""
    import ray

    from pipeline.config import ShardConfig
    from pipeline.storage import Store
    from vgg.data.layouts import list_dataset
    from pipeline.sharding import shard

    try:
        from pipeline.runner import start_local_ray

        start_local_ray(num_cpus, "127.0.0.1", log_to_driver=False)
    except ImportError:  # the runner is being restructured: a plain private instance
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)

    def warm(batch):  # nested: Ray pickles it by value
        import PIL.Image  # noqa: F401  (what the shard stage's workers import)
        import pyarrow.parquet  # noqa: F401

        return batch

    warm_s = 0.0
    if not cold:
        t = time.monotonic()
        ray.data.range(4 * num_cpus, override_num_blocks=4 * num_cpus).map_batches(warm, batch_size=None).materialize()
        warm_s = time.monotonic() - t

    # what the listing alone holds, per image
    gc.collect()
    r0 = rss()
    t = time.monotonic()
    listing = list_dataset(root, layout)
    list_only_s = time.monotonic() - t
    n = sum(len(v) for v in listing.files.values())
    listing_bytes = rss() - r0
    del listing
    gc.collect()

    marks: list[tuple[float, float, str]] = []
    out = Store(work).begin("shard", "bench")
    before = rss()
    sampler = PeakRSS()
    sampler.start()
    c0, t0 = cpu_seconds(), time.monotonic()
    m = shard(root, out, ShardConfig(rows_per_shard=rows_per_shard),
              log=lambda msg: marks.append((time.monotonic(), cpu_seconds(), msg)), layout=layout)
    total = time.monotonic() - t0
    peak = sampler.stop()
    load = os.getloadavg()
    ray.shutdown()

    def mark(word: str) -> tuple[float, float]:
        """(seconds, CPU seconds) since the start at the first log line with `word`."""
        return next((t - t0, c - c0) for t, c, msg in marks if word in msg)

    (t_list, c_list), (t_valid, c_valid) = mark(": validating"), mark("validated in")
    t_write, c_write = max(mark("train: "), mark("val: "))
    images = sum(v["images"] for v in m["splits"].values())
    validate_s, write_s = t_valid - t_list, t_write - t_valid
    return {
        "files": n, "images": images, "cpus": num_cpus, "warm_s": warm_s, "load_end": load,
        "listing_s": t_list, "listing_alone_s": list_only_s,
        "validate_s": validate_s, "validate_img_s": images / validate_s,
        "validate_cpu_ms": (c_valid - c_list) / images * 1e3,
        "write_s": write_s, "write_img_s": images / write_s, "write_cpu_ms": (c_write - c_valid) / images * 1e3,
        "stats_index_s": total - t_write, "total_s": total, "total_img_s": images / total,
        "img_s_per_core": images / total / num_cpus,
        "rss_before_mb": before / 2**20, "peak_rss_mb": peak / 2**20,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "growth_per_image_b": (peak - before) / images, "listing_per_image_b": listing_bytes / n,
        "shards": sum(len(v["shards"]) for v in m["splits"].values()), "skipped": m["skipped"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000], help="images per folder (one run each)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--min-side", type=int, default=64)
    ap.add_argument("--max-side", type=int, default=128)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--layout", choices=["folders", "ilsvrc2012"], default="folders",
                    help="an image folder, or the same images as ILSVRC-2012's official archives (read in place)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--rows-per-shard", type=int, default=1000)
    ap.add_argument("--cold", action="store_true", help="no warm-up job: Ray's worker start-up counts in the validate pass")
    ap.add_argument("--tmp", default=None, help="where the folders and outputs go (default: a temp dir, removed)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one folder, print JSON
    args = ap.parse_args()

    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args.layout, args.num_cpus, args.rows_per_shard, args.one + "-work", args.cold)))
        return

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}; Ray num_cpus={args.num_cpus}")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        results = []
        for n in args.sizes:
            folder = Path(tmp) / f"data{n}"
            t = time.monotonic()
            g = generate(folder, n, args.classes, args.min_side, args.max_side, args.val_fraction, seed=n,
                         layout=args.layout)
            print(f"\n{n} images as {args.layout} ({g['train']} train / {g['val']} val, {args.classes} classes, "
                  f"{args.min_side}-{args.max_side} px, {g['bytes'] / n / 1024:.1f} KiB each) generated "
                  f"in {time.monotonic() - t:.1f} s", flush=True)
            cmd = [sys.executable, __file__, "--one", str(folder), "--layout", args.layout, "--num-cpus", str(args.num_cpus),
                   "--rows-per-shard", str(args.rows_per_shard), *(["--cold"] if args.cold else [])]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if p.returncode or line is None:
                sys.exit(f"the measurement of {n} images failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
            r = json.loads(line[len("RESULT "):])
            results.append(r)
            print(f"  Ray warm-up        {r['warm_s']:7.2f} s  (before shard(); not in the figures below)")
            print(f"  listing            {r['listing_s']:7.2f} s  (alone: {r['listing_alone_s']:.2f} s)")
            print(f"  validate pass      {r['validate_s']:7.2f} s  {r['validate_img_s']:8.0f} images/s  "
                  f"{r['validate_cpu_ms']:.2f} CPU-ms per image ({1e3 / r['validate_cpu_ms']:.0f} images/s per busy core)")
            print(f"  write pass         {r['write_s']:7.2f} s  {r['write_img_s']:8.0f} images/s  "
                  f"{r['write_cpu_ms']:.2f} CPU-ms per image ({1e3 / r['write_cpu_ms']:.0f} images/s per busy core), "
                  f"{r['shards']} shards")
            print(f"  statistics, index  {r['stats_index_s']:7.2f} s")
            print(f"  total              {r['total_s']:7.2f} s  {r['total_img_s']:8.0f} images/s, "
                  f"{r['img_s_per_core']:.0f} per core ({r['cpus']} cores)")
            print(f"  driver RSS         {r['rss_before_mb']:.0f} MiB before shard(), peak {r['peak_rss_mb']:.0f} MiB "
                  f"(ru_maxrss {r['ru_maxrss_mb']:.0f} MiB): {r['growth_per_image_b'] / 1024:.2f} KiB per image; "
                  f"the listing alone {r['listing_per_image_b'] / 1024:.2f} KiB per image", flush=True)
            print(f"  load average at the end of shard(): {r['load_end']}", flush=True)
        print(f"\nload average after: {os.getloadavg()}")
        print("\nsizes:", " ".join(str(r["images"]) for r in results))
        print("total images/s:", " ".join(f"{r['total_img_s']:.0f}" for r in results))
        print("driver peak RSS MiB:", " ".join(f"{r['peak_rss_mb']:.0f}" for r in results))


if __name__ == "__main__":
    main()
