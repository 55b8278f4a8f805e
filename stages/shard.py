"""The shard stage: an image folder -> Parquet shards, class index, RGB statistics.

Input: `<root>/train/<class>/*` and `<root>/val/<class>/*` (or `test/`).
Output (under the stage's output directory)::

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
import os
import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from pipeline.config import DataConfig, ShardConfig
from pipeline.errors import UserError
from pipeline.stage import StageContext, StageResult
from pipeline.storage import StageOutput, exists, is_local, resolve_uri, write_bytes, write_json

VAL_DIRS = ("val", "test")  # accepted names of the validation split
SHARD_COLUMNS = ["key", "label", "class_name", "image", "height", "width"]


class DatasetError(UserError, ValueError):
    """The image folder is unusable as a whole (missing, empty, inconsistent)."""

    keep_traceback = False


@dataclass(frozen=True)
class Listing:
    classes: list[str]
    #: split -> list of (key, path, class name); key = path relative to the root.
    files: dict[str, list[tuple[str, str, str]]]
    #: (key, reason) of every entry left out: files outside a class folder, folders inside
    #: one, names that are not UTF-8, broken links and link loops (all go to skipped.csv)
    skipped: list[tuple[str, str]]


# ------------------------------------------------------------------ listing

LINK_PROBLEM = "broken symbolic link or link loop"
NAME_PROBLEM = "file name is not valid UTF-8"


@dataclass(frozen=True)
class _Entries:
    files: list[tuple[str, str]]  # (name, path) of regular files (links followed)
    dirs: list[tuple[str, str]]  # (name, path) of folders (links followed)
    problems: list[tuple[str, str]]  # (name, reason) of entries that are neither


def _entries(fs: pafs.FileSystem, path: str) -> _Entries:
    """The entries of a folder, hidden ones left out, sorted by name; nothing dropped
    silently. Local folders are read with os.scandir: pyarrow's listing leaves out broken
    links and link loops, and fails on names that are not UTF-8."""
    files, dirs, problems = [], [], []
    if is_local(fs):
        with os.scandir(os.fsencode(path)) as it:
            for e in it:
                name = e.name.decode("utf-8", "backslashreplace")
                if name.startswith("."):
                    continue
                try:
                    e.name.decode("utf-8")
                except UnicodeDecodeError:
                    problems.append((name, NAME_PROBLEM))
                    continue
                full = posixpath.join(path, name)
                try:
                    kind = "dir" if e.is_dir() else "file" if e.is_file() else None  # follows links
                except OSError:  # ELOOP: a link loop
                    kind = None
                if kind == "dir":
                    dirs.append((name, full))
                elif kind == "file":
                    files.append((name, full))
                else:
                    problems.append((name, LINK_PROBLEM if e.is_symlink() else "not a regular file"))
    else:
        for i in fs.get_file_info(pafs.FileSelector(path)):
            try:
                name, full = i.base_name, i.path
            except UnicodeDecodeError:
                problems.append(("<name that is not UTF-8>", NAME_PROBLEM))
                continue
            if name.startswith("."):
                continue
            kind = {pafs.FileType.Directory: dirs, pafs.FileType.File: files}.get(i.type)
            if kind is None:
                problems.append((name, "not a regular file"))
            else:
                kind.append((name, full))
    return _Entries(sorted(files), sorted(dirs), sorted(problems))


def list_image_folder(root: str) -> Listing:
    """List an image folder, checking its layout. Raises DatasetError naming the path."""
    fs, base = resolve_uri(root)
    if not exists(fs, base):
        raise DatasetError(f"data.root: {root} does not exist")
    train = posixpath.join(base, "train")
    if not exists(fs, train):
        raise DatasetError(f"data.root: no train/ folder in {root}")
    val_name = next((v for v in VAL_DIRS if exists(fs, posixpath.join(base, v))), None)
    if val_name is None:
        raise DatasetError(f"data.root: no val/ (or test/) folder in {root}")
    classes = [name for name, _ in _entries(fs, train).dirs]
    if not classes:
        raise DatasetError(f"data.root: {train} has no class folders (expected train/<class>/*)")
    files: dict[str, list] = {}
    skipped: list[tuple[str, str]] = []
    for split, folder in (("train", "train"), ("val", val_name)):
        split_path = posixpath.join(base, folder)
        top = _entries(fs, split_path)
        if not top.dirs:
            raise DatasetError(f"data.root: {split_path} has no class folders")
        unknown = sorted(set(n for n, _ in top.dirs) - set(classes))
        if unknown:
            raise DatasetError(f"data.root: classes {unknown} in {split_path} are absent from {train}")
        skipped += [(posixpath.join(folder, n), "file is not in a class folder") for n, _ in top.files]
        skipped += [(posixpath.join(folder, n), why) for n, why in top.problems]
        rows = []
        for name, cdir in top.dirs:
            inside = _entries(fs, cdir)
            if not inside.files:
                raise DatasetError(f"data.root: class folder {cdir} is empty (no files)")
            key = lambda n: posixpath.join(folder, name, n)  # noqa: E731
            rows += [(key(n), p, name) for n, p in inside.files]
            skipped += [(key(n), "folder inside a class folder (not searched)") for n, _ in inside.dirs]
            skipped += [(key(n), why) for n, why in inside.problems]
        files[split] = sorted(rows)
    return Listing(classes, files, sorted(skipped))


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
    write_json(out.fs, out.join("stats.json"), stats)
    write_json(out.fs, out.join("classes.json"), classes)
    write_bytes(out.fs, out.join("skipped.csv"), _csv([("key", "reason"), *skipped]))
    write_bytes(out.fs, out.join("converted.csv"), _csv([("key", "reason"), *converted]))
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


# ------------------------------------------------------------------ DAG entry


def check(section: dict) -> None:
    """Preflight (before Ray starts): the image folder's layout, if one is given."""
    data: DataConfig = section["data"]
    if data.root is not None:
        list_image_folder(data.root)



def run(ctx: StageContext) -> StageResult:
    """DAG entry: shard `data.root` (or a generated demo set) into the stage output."""
    from stages import demo_data

    data: DataConfig = ctx.section["data"]
    cfg: ShardConfig = ctx.section["shard"]
    root = data.root
    if root is None:
        root = posixpath.join(ctx.out.uri, "demo_data")
        n = demo_data.generate(ctx.out.fs, ctx.out.join("demo_data"), data.demo)
        ctx.log(f"generated the demo dataset: {n} images in {root}")
    m = shard(root, ctx.out, cfg, log=ctx.log,
              per_class={"train": data.train_per_class, "val": data.val_per_class})
    if data.root is None:
        m["root"] = "demo_data/ (generated inside this output)"
    metrics = {f"{s}_images": v["images"] for s, v in m["splits"].items()}
    metrics.update({f"{s}_shards": len(v["shards"]) for s, v in m["splits"].items()})
    metrics.update({f"{s}_bytes": v["bytes"] for s, v in m["splits"].items()})
    metrics.update(
        skipped=m["skipped"], converted=m["converted"], num_classes=len(m["classes"]),
        images_per_s=sum(v["images"] for v in m["splits"].values()) / max(m["seconds"], 1e-9),
    )
    stats = ctx.out.read_json("stats.json")
    metrics.update({f"mean_{c}": v for c, v in zip("rgb", stats["mean_rgb"])})
    table = {
        "class": m["classes"],
        "train": [m["splits"]["train"]["per_class"][c] for c in m["classes"]],
        "val": [m["splits"]["val"]["per_class"][c] for c in m["classes"]],
    }
    return StageResult(
        metrics=metrics,
        params={"data_root_resolved": root},
        tables={"class_counts.json": table},
        artifacts=["stats.json", "classes.json", "skipped.csv", "converted.csv"],
        manifest=m,
        summary=(
            f"{metrics['train_images']} train / {metrics['val_images']} val images, "
            f"{m['skipped']} skipped, {m['converted']} converted, mean RGB "
            + ", ".join(f"{v:.1f}" for v in stats["mean_rgb"])
        ),
    )
