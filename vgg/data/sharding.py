"""Sharding: an image folder -> Parquet shards, class index, RGB statistics.

Input: a `vgg.data.folders.Listing`. Output (under the given output directory)::

    train/*.parquet, val/*.parquet   key, label, class_name, image (JPEG bytes), height, width
    classes.json                     class names in label order (sorted by name)
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
   number of rows, +-1).
"""

from __future__ import annotations

import csv
import io
import math
import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from pipeline.config import ShardConfig
from pipeline.storage import StageOutput, resolve_uri, write_bytes
from vgg.artifacts import CONVERTED_FILE, SKIPPED_FILE, write_shard_index
from vgg.data.folders import DatasetError, Listing, list_image_folder

SHARD_COLUMNS = ["key", "label", "class_name", "image", "height", "width"]


# ------------------------------------------------------------------ one image


def _to_8bit_rgb(im: Image.Image) -> Image.Image:
    """Any decodable PIL image -> 8-bit RGB (16-bit and float scaled, alpha dropped)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")


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
    rgb = _to_8bit_rgb(ImageOps.exif_transpose(im) if orientation not in (0, 1) else im)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=quality)
    out = buf.getvalue()
    return out, np.asarray(Image.open(io.BytesIO(out)).convert("RGB")), f"converted from {note}"


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


# ------------------------------------------------------------------ pass 1: validate


class Validate:
    """Ray Data batch function: decode every image, keep per-image pixel sums."""

    def __init__(self, root: str, quality: int):
        self.root, self.quality = root, quality

    def __call__(self, batch: dict) -> dict:
        fs, _ = resolve_uri(self.root)
        out = {k: [] for k in ("key", "ok", "reason", "height", "width", "npix", "rgb_sum", "rgb_outer", "nbytes")}
        for key, path in zip(batch["key"], batch["path"]):
            try:
                data, rgb, note = normalise_image(_read(fs, path), self.quality)
                px = rgb.reshape(-1, 3).astype(np.float64)
                out["ok"].append(True)
                out["reason"].append(note)
                out["height"].append(rgb.shape[0])
                out["width"].append(rgb.shape[1])
                out["npix"].append(px.shape[0])
                out["rgb_sum"].append(px.sum(0).tolist())
                out["rgb_outer"].append((px.T @ px).ravel().tolist())
                out["nbytes"].append(len(data))
            except (ValueError, OSError) as e:
                out["ok"].append(False)
                out["reason"].append(str(e)[:300])
                for k, v in (("height", 0), ("width", 0), ("npix", 0), ("rgb_sum", [0.0] * 3)):
                    out[k].append(v)
                out["rgb_outer"].append([0.0] * 9)
                out["nbytes"].append(0)
            out["key"].append(key)
        return out


# ------------------------------------------------------------------ pass 2: write


class Encode:
    """Ray Data batch function: the stored bytes of each valid image (re-converted if needed)."""

    def __init__(self, root: str, quality: int):
        self.root, self.quality = root, quality

    def __call__(self, batch: dict) -> pa.Table:
        fs, _ = resolve_uri(self.root)
        images = [normalise_image(_read(fs, p), self.quality)[0] for p in batch["path"]]
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


# ------------------------------------------------------------------ statistics


def rgb_statistics(npix: int, rgb_sum: np.ndarray, rgb_outer: np.ndarray) -> dict:
    """Mean RGB (over all pixels) and the 3x3 RGB covariance with its eigen-decomposition.

    Values on the 0-255 scale; eigenvalues descending, eigvecs[:, i] the i-th
    eigenvector (AlexNet's PCA colour noise uses them).
    """
    mean = rgb_sum / npix
    cov = rgb_outer.reshape(3, 3) / npix - np.outer(mean, mean)
    cov = (cov + cov.T) / 2
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    vecs = vecs * np.where(vecs.sum(0) < 0, -1.0, 1.0)  # a deterministic sign
    return {
        "mean_rgb": mean.tolist(),
        "cov_rgb": cov.tolist(),
        "eigvals": vals.tolist(),
        "eigvecs": vecs.tolist(),
        "num_pixels": int(npix),
    }


# ------------------------------------------------------------------ the stage function


def subsample(listing: Listing, per_class: dict[str, int | None], seed: int) -> Listing:
    """At most per_class[split] files of each class of each split: a seeded random subset,
    in the listing's order (None: every file)."""
    files = {}
    for split, rows in listing.files.items():
        limit = per_class.get(split)
        if limit is None:
            files[split] = rows
            continue
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        by_class: dict[str, list[int]] = {}
        for i, (_, _, c) in enumerate(rows):
            by_class.setdefault(c, []).append(i)
        keep = sorted(j for idx in by_class.values()
                      for j in (idx if len(idx) <= limit else rng.choice(idx, limit, replace=False)))
        files[split] = [rows[j] for j in keep]
    return Listing(listing.classes, files, listing.skipped)


def shard(root: str, out: StageOutput, cfg: ShardConfig, log=print,
          per_class: dict[str, int | None] | None = None) -> dict:
    """Shard an image folder into `out` (at most per_class[split] images of each class,
    see `subsample`); returns the manifest (see the module docstring)."""
    import ray

    t0 = time.monotonic()
    listing = subsample(list_image_folder(root), per_class or {}, cfg.seed)
    classes = listing.classes
    label_of = {c: i for i, c in enumerate(classes)}
    recs = {
        split: [{"key": k, "path": p, "label": label_of[c], "class_name": c, "split": split} for k, p, c in rows]
        for split, rows in listing.files.items()
    }
    total = sum(len(r) for r in recs.values())
    log(f"{total} files, {len(classes)} classes: validating (decoding every image)")
    all_recs = recs["train"] + recs["val"]
    blocks = max(1, min(math.ceil(len(all_recs) / 64), 1000))
    meta = (
        ray.data.from_items([{"key": r["key"], "path": r["path"]} for r in all_recs], override_num_blocks=blocks)
        .map_batches(Validate(root, cfg.jpeg_quality), batch_size=64)
        .take_all()
    )
    info = {m["key"]: m for m in meta}
    skipped = list(listing.skipped)
    skipped += [(m["key"], m["reason"]) for m in meta if not m["ok"]]
    converted = [(m["key"], m["reason"]) for m in meta if m["ok"] and m["reason"]]
    log(f"validated in {time.monotonic() - t0:.1f} s: {len(skipped)} skipped, {len(converted)} converted")

    manifest: dict = {"root": root, "classes": classes, "splits": {}, "skipped": len(skipped), "converted": len(converted)}
    for split in ("train", "val"):
        good = [dict(r, height=info[r["key"]]["height"], width=info[r["key"]]["width"]) for r in recs[split] if info[r["key"]]["ok"]]
        if not good:
            raise DatasetError(f"data.root: no decodable image in the {split} split of {root}")
        manifest["splits"][split] = _write_split(root, out, split, good, cfg, classes, info)
        log(f"{split}: {len(good)} images in {len(manifest['splits'][split]['shards'])} shards")

    train_meta = [info[r["key"]] for r in recs["train"] if info[r["key"]]["ok"]]
    stats = rgb_statistics(
        sum(m["npix"] for m in train_meta),
        np.sum([m["rgb_sum"] for m in train_meta], axis=0),
        np.sum([m["rgb_outer"] for m in train_meta], axis=0),
    )
    write_shard_index(out, classes, stats)
    write_bytes(out.fs, out.join(SKIPPED_FILE), _csv([("key", "reason"), *skipped]))
    write_bytes(out.fs, out.join(CONVERTED_FILE), _csv([("key", "reason"), *converted]))
    manifest["seconds"] = round(time.monotonic() - t0, 3)
    return manifest


def _write_split(
    root: str, out: StageOutput, split: str, rows: list[dict], cfg: ShardConfig, classes: list[str], info: dict
) -> dict:
    """Write one split as balanced shards (classes mixed by a seeded shuffle) with Ray Data."""
    import ray

    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    n_shards = math.ceil(len(rows) / cfg.rows_per_shard)
    path = out.join(split)
    # A fresh directory (the stage's temporary output): Ray Data appends by default,
    # so writing into an existing shard folder would duplicate rows.
    (
        ray.data.from_items(rows, override_num_blocks=n_shards)
        .map_batches(Encode(root, cfg.jpeg_quality), batch_size=None, batch_format="numpy")
        .write_parquet(path, filesystem=out.fs)
    )
    shards = []
    for fi in sorted(out.fs.get_file_info(pafs.FileSelector(path)), key=lambda i: i.path):
        if fi.base_name.endswith(".parquet"):
            with out.fs.open_input_file(fi.path) as f:
                n = pq.ParquetFile(f).metadata.num_rows
            shards.append({"file": posixpath.join(split, fi.base_name), "rows": n, "bytes": fi.size})
    per_class = {c: 0 for c in classes}
    for r in rows:
        per_class[r["class_name"]] += 1
    return {
        "images": len(rows),
        "bytes": sum(s["bytes"] for s in shards),
        "image_bytes": sum(info[r["key"]]["nbytes"] for r in rows),
        "per_class": per_class,
        "shards": shards,
    }


def _csv(rows: list[tuple]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode()
