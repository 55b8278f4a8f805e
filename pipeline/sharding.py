"""Sharding with Ray Data (the shard stage's adapter): an image folder -> Parquet shards, class
index, RGB statistics.

Input: a `vgg.data.folders.Listing` (`vgg.data.layouts.list_dataset(root, layout)`: an image folder or
ImageNet's archives, whose images are byte ranges of the archives, read in place).
Output (under the given output directory)::

    train/*.parquet, val/*.parquet   key, label, class_name, image (JPEG bytes), height, width
    classes.json                     class names in label order (sorted by name)
    class_words.json                 class name -> human-readable words (ImageNet layouts only)
    stats.json                       training-set mean RGB, RGB covariance and its eigen-decomposition
    skipped.csv                      every file left out, with the reason
    manifest.json                    counts per split and class, bytes, shard list

Two distributed passes (Ray Data):
1. validate: every image is really decoded (not a header check). One
   undecodable image kills a DALI pipeline and DALI cannot skip it, so what
   does not decode is skipped and counted; what decodes but is odd for DALI
   (grayscale, CMYK, PNG, 16-bit, EXIF-rotated, ...) is converted to an RGB
   JPEG. Per-image pixel sums for the statistics come from this pass.
2. write: the valid images, in a seeded order that mixes classes, go to
   balanced shards (the row count is known, so every shard gets the same
   number of rows, +-1). Images stored as they are are not decoded again.

The driver keeps the listing as columns (Arrow tables, numpy arrays) and adds up the
pixel sums as the validate pass's batches stream back: its memory grows by a few
hundred bytes per image, not by a Python row per image.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from vgg.config import ShardConfig
from vgg.data.statistics import pixel_sums, rgb_statistics
from vgg.storage import StageOutput, resolve_uri, write_bytes
from vgg.artifacts import CONVERTED_FILE, SKIPPED_FILE, write_shard_index
from vgg.data.folders import DatasetError, subsample
from vgg.data.layouts import list_dataset
from vgg.data.imagenet import TAR_SCHEME, read_member
from vgg.data.decoding import to_8bit_rgb  # the one RGB conversion (the ladder's store uses it too)

SHARD_COLUMNS = ["key", "label", "class_name", "image", "height", "width"]


# ------------------------------------------------------------------ one image


def normalise_image(data: bytes, quality: int) -> tuple[bytes, np.ndarray, str]:
    """Decode fully; return (bytes to store, RGB pixels as stored, conversion note).

    Raises ValueError with the reason if the data is not a decodable image.
    A baseline/progressive 8-bit RGB JPEG without rotation is stored as is;
    anything else is converted to an RGB JPEG (the note says why).
    """
    if not data:
        raise ValueError("empty file")
    try:
        im = Image.open(io.BytesIO(data))
        fmt, mode = im.format, im.mode
        im.load()  # the full decode: truncated or corrupt data fails here
        orientation = im.getexif().get(0x0112, 1) if fmt == "JPEG" else 1
    except Exception as e:  # PIL raises many types for bad data
        raise ValueError(f"not a decodable image: {type(e).__name__}: {e}") from None
    if fmt == "JPEG" and mode == "RGB" and orientation in (0, 1):
        return data, np.asarray(im), ""
    note = f"{fmt} {mode}" + (f" EXIF orientation {orientation}" if orientation not in (0, 1) else "")
    rgb = to_8bit_rgb(ImageOps.exif_transpose(im) if orientation not in (0, 1) else im)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=quality)
    out = buf.getvalue()
    return out, np.asarray(Image.open(io.BytesIO(out)).convert("RGB")), f"converted from {note}"


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    """A file's bytes; for a member of an archive (`vgg.data.imagenet.member_path`:
    tar://<archive>?offset=N&size=M) its byte range, read in place."""
    if path.startswith(TAR_SCHEME):
        return read_member(fs, path)
    with fs.open_input_stream(path) as f:
        return f.read()


# ------------------------------------------------------------------ pass 1: validate


class Validate:
    """Ray Data batch function: decode every image; per image its size, stored byte count
    and exact integer pixel sums (sum of RGB, sum of RGB outer products) for the statistics.
    Rows are identified by "i", their index in the listing (the driver keeps columns, not
    rows)."""

    def __init__(self, root: str, quality: int):
        self.root, self.quality = root, quality

    def __call__(self, batch: dict) -> dict:
        fs, _ = resolve_uri(self.root)
        n = len(batch["path"])
        ok, reason = np.zeros(n, bool), [""] * n
        hw, nbytes, npix = np.zeros((n, 2), np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
        rgb_sum, rgb_outer = np.zeros((n, 3), np.int64), np.zeros((n, 9), np.int64)
        for j, path in enumerate(batch["path"]):
            try:
                data, rgb, note = normalise_image(_read(fs, path), self.quality)
            except (ValueError, OSError) as e:
                reason[j] = str(e)[:300]
                continue
            rgb_sum[j], rgb_outer[j] = pixel_sums(rgb)
            ok[j], reason[j], nbytes[j], npix[j] = True, note, len(data), rgb.shape[0] * rgb.shape[1]
            hw[j] = rgb.shape[:2]
        return {"i": np.asarray(batch["i"]), "ok": ok, "reason": np.array(reason, dtype=object),
                "height": hw[:, 0], "width": hw[:, 1], "nbytes": nbytes, "npix": npix,
                "rgb_sum": rgb_sum, "rgb_outer": rgb_outer}


@dataclasses.dataclass
class _Validated:
    """The validate pass's results, as columns indexed by listing position (no per-image
    Python objects but the reasons), and the training set's pixel sums."""

    ok: np.ndarray
    height: np.ndarray
    width: np.ndarray
    nbytes: np.ndarray
    reasons: dict[int, str]  # listing index -> reason (why skipped / converted)
    npix: int
    rgb_sum: np.ndarray  # int64, exact
    rgb_outer: np.ndarray


def _validate(root: str, paths: list[str], n_train: int, quality: int) -> _Validated:
    """Pass 1 over the whole listing (train first). Results stream back batch by batch:
    per-image values are scattered into arrays and the training pixel sums added up as
    they come, so the driver never holds a row per image (rows as dicts with 12 floats
    each took ~2 KiB of driver memory an image, measured at 5,000-20,000 images: ~2.7 GB
    at ImageNet's 1.28 M, extrapolated)."""
    import ray

    n = len(paths)
    table = pa.table({"i": pa.array(np.arange(n, dtype=np.int64)), "path": pa.array(paths, pa.string())})
    ds = ray.data.from_arrow(_blocks(table, _validate_blocks(n))).map_batches(
        Validate(root, quality), batch_size=64, batch_format="numpy")
    v = _Validated(np.zeros(n, bool), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64), {},
                   0, np.zeros(3, np.int64), np.zeros(9, np.int64))
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        i = b["i"]
        v.ok[i], v.height[i], v.width[i], v.nbytes[i] = b["ok"], b["height"], b["width"], b["nbytes"]
        v.reasons.update((int(k), str(r)) for k, r in zip(i, b["reason"]) if r)
        train = b["ok"] & (i < n_train)
        v.npix += int(b["npix"][train].sum())
        v.rgb_sum += b["rgb_sum"][train].sum(0)
        v.rgb_outer += b["rgb_outer"][train].sum(0)
    return v


def _validate_blocks(n: int) -> int:
    """Blocks (Ray tasks) of the validate pass: ~2000 images each, with at least 4 per CPU
    of the cluster and at least 64 images each, at most 1000 blocks. Blocks of 64 images
    used to make per-task overhead dominate (20,000 images: 15 s with 313 blocks, 8 s
    with 20 blocks, on 2 cores)."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(math.ceil(n / 64), 1000, max(4 * cpus, math.ceil(n / 2000))))


def _blocks(table: pa.Table, k: int) -> list[pa.Table]:
    """k consecutive slices of sizes differing by at most one, the larger first (as
    ray.data.from_items(..., override_num_blocks=k) splits its items)."""
    size, rem = divmod(table.num_rows, k)
    bounds = [i * size + min(i, rem) for i in range(k + 1)]
    return [table.slice(a, b - a) for a, b in zip(bounds, bounds[1:]) if b > a]


# ------------------------------------------------------------------ pass 2: write


class Encode:
    """Ray Data batch function: the stored bytes of each valid image: the file's own bytes,
    or re-converted where the validate pass converted it ("convert")."""

    def __init__(self, root: str, quality: int):
        self.root, self.quality = root, quality

    def __call__(self, batch: dict) -> pa.Table:
        fs, _ = resolve_uri(self.root)
        images = [normalise_image(_read(fs, p), self.quality)[0] if convert else _read(fs, p)
                  for p, convert in zip(batch["path"], batch["convert"])]
        return pa.table(
            {
                "key": pa.array(batch["key"], pa.string()),
                "label": pa.array(batch["label"], pa.int32()),
                "class_name": pa.array(batch["class_name"], pa.string()),
                "image": pa.array(images, pa.binary()),
                "height": pa.array(batch["height"], pa.int32()),
                "width": pa.array(batch["width"], pa.int32()),
            }
        )


# ------------------------------------------------------------------ the stage function


def shard(root: str, out: StageOutput, cfg: ShardConfig, log=print,
          per_class: dict[str, int | None] | None = None, *, layout: str = "folders") -> dict:
    """Shard the dataset at `root`, laid out as `layout` (`data.layout`, see
    `vgg.data.layouts.list_dataset`), into `out` (at most per_class[split] images of each
    class, see `subsample`); returns the manifest (see the module docstring)."""
    t0 = time.monotonic()
    listing = subsample(list_dataset(root, layout), per_class or {}, cfg.seed)
    classes = listing.classes
    label_of = {c: i for i, c in enumerate(classes)}
    rows = listing.files["train"] + listing.files["val"]  # listing index i = position here
    n_train = len(listing.files["train"])
    keys, paths = [k for k, _, _ in rows], [p for _, p, _ in rows]
    labels = np.array([label_of[c] for _, _, c in rows], dtype=np.int64)
    log(f"{len(rows)} files, {len(classes)} classes: validating (decoding every image)")
    v = _validate(root, paths, n_train, cfg.jpeg_quality)
    skipped = list(listing.skipped) + [(keys[i], v.reasons.get(i, "")) for i in np.flatnonzero(~v.ok)]
    converted = [(keys[i], v.reasons[i]) for i in sorted(v.reasons) if v.ok[i]]
    log(f"validated in {time.monotonic() - t0:.1f} s: {len(skipped)} skipped, {len(converted)} converted")

    manifest: dict = {"root": root, "layout": layout, "classes": classes, "splits": {}, "skipped": len(skipped),
                      "converted": len(converted)}
    for split, (lo, hi) in (("train", (0, n_train)), ("val", (n_train, len(rows)))):
        good = lo + np.flatnonzero(v.ok[lo:hi])
        if not len(good):
            raise DatasetError(f"data.root: no decodable image in the {split} split of {root}")
        table = pa.table({
            "key": pa.array([keys[i] for i in good], pa.string()),
            "path": pa.array([paths[i] for i in good], pa.string()),
            "label": pa.array(labels[good]),
            "class_name": pa.array([classes[c] for c in labels[good]], pa.string()),
            "height": pa.array(v.height[good]),
            "width": pa.array(v.width[good]),
            "convert": pa.array([i in v.reasons for i in good], pa.bool_()),
        })
        manifest["splits"][split] = _write_split(root, out, split, table, int(v.nbytes[good].sum()), cfg, classes)
        log(f"{split}: {len(good)} images in {len(manifest['splits'][split]['shards'])} shards")

    stats = rgb_statistics(v.npix, v.rgb_sum.astype(np.float64), v.rgb_outer.astype(np.float64))
    manifest["index_files"] = write_shard_index(out, classes, stats, class_words=listing.class_words)
    write_bytes(out.fs, out.join(SKIPPED_FILE), _csv([("key", "reason"), *skipped]))
    write_bytes(out.fs, out.join(CONVERTED_FILE), _csv([("key", "reason"), *converted]))
    manifest["seconds"] = round(time.monotonic() - t0, 3)
    return manifest


def _write_split(root: str, out: StageOutput, split: str, table: pa.Table, image_bytes: int, cfg: ShardConfig,
                 classes: list[str]) -> dict:
    """Write one split as balanced shards (classes mixed by a seeded shuffle) with Ray Data."""
    import ray

    order = np.random.default_rng(cfg.seed).permutation(table.num_rows)
    table = table.take(pa.array(order))
    n_shards = math.ceil(table.num_rows / cfg.rows_per_shard)
    path = out.join(split)
    # A fresh directory (the stage's temporary output): Ray Data appends by default,
    # so writing into an existing shard folder would duplicate rows.
    (
        ray.data.from_arrow(_blocks(table, n_shards))
        .map_batches(Encode(root, cfg.jpeg_quality), batch_size=None, batch_format="numpy")
        .write_parquet(path, filesystem=out.fs)
    )
    shards = []
    for fi in sorted(out.fs.get_file_info(pafs.FileSelector(path)), key=lambda i: i.path):
        if fi.base_name.endswith(".parquet"):
            with out.fs.open_input_file(fi.path) as f:
                n = pq.ParquetFile(f).metadata.num_rows
            shards.append({"file": posixpath.join(split, fi.base_name), "rows": n, "bytes": fi.size})
    counts = np.bincount(table.column("label").to_numpy(), minlength=len(classes))
    return {
        "images": table.num_rows,
        "bytes": sum(s["bytes"] for s in shards),
        "image_bytes": image_bytes,
        "per_class": {c: int(k) for c, k in zip(classes, counts)},
        "shards": shards,
    }


def _csv(rows: list[tuple]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode()
