"""Augmentation stage: DALI data loaders for training and evaluation.

Paper section 3.1 (training): one random ``crop x crop`` window per image per
iteration from the isotropically rescaled image (shorter side = S, fixed or
jittered per image in [Smin, Smax]), random horizontal flip, AlexNet's PCA
colour shift; the only normalisation is subtracting the training mean RGB.
Paper section 3.2 (testing): the image is rescaled isotropically to shorter
side Q and evaluated densely (whole image) or on a regular grid of crops.

DALI is the engine: encoded JPEG bytes enter through ``fn.external_source``
(read from the Parquet shards with pyarrow); decoding, resizing, flipping and
normalisation are DALI ops. All random numbers are drawn in numpy from a
Generator seeded by (seed, epoch, rank), so a batch depends only on those.

ROI decoding: the crop window is chosen in the coordinates of the image
rescaled to S, mapped back to the original image (we know its size from the
Parquet ``height``/``width`` columns), and only that region (plus a margin of
a few pixels for the resampling filter) is decoded and resized straight to
``crop x crop``; ``fn.resize``'s sub-pixel ``roi_start/roi_end`` make the
result equal to "resize the whole image to S, then crop" up to rounding.

The same pipeline definition runs on the CPU (``device_id=None``, decoders on
``"cpu"``) or on a GPU (``device_id=int``, decoders on ``"mixed"``, the rest
follows the data onto the GPU).
"""

from __future__ import annotations

import dataclasses
import posixpath
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from nvidia.dali.tensors import TensorListCPU

from pipeline.storage import is_local, resolve_uri, to_uri
from stages import paper
from stages.steps import grid_crops

if TYPE_CHECKING:  # only for annotations: the stage entry imports them when it runs
    from pipeline.config import AugmentConfig
    from pipeline.stage import StageContext, StageResult

Scale = int | tuple[int, int] | Sequence[int]

_INTERP = {  # name -> (DALI type, filter radius in source pixels at scale 1)
    "linear": (types.INTERP_LINEAR, 1),
    "cubic": (types.INTERP_CUBIC, 2),
    "lanczos3": (types.INTERP_LANCZOS3, 3),
}
_DEVICES = ("auto", "cpu", "gpu")
_COLUMNS = ("image", "label", "height", "width", "key")
# Stream tags, so the block order and the per-sample parameters never share
# random numbers even for equal (seed, epoch).
_TAG_ORDER, _TAG_PARAMS = 0, 1


# --------------------------------------------------------------------------
# Spec


@dataclass(frozen=True)
class AugmentSpec:
    """Everything train/evaluate need to build loaders, except the scale S or Q.

    Statistics are on the 0-255 pixel scale; ``eigvecs[:, i]`` (columns) are
    the eigenvectors of the RGB covariance, ``eigvals`` descending.
    """

    mean_rgb: tuple[float, float, float]
    eigvals: tuple[float, float, float]
    eigvecs: tuple[tuple[float, float, float], ...]
    crop: int = 224
    color_noise_std: float = 0.1  # AlexNet's PCA lighting noise
    flip: bool = True
    device: str = "auto"  # "auto" | "cpu" | "gpu"
    num_threads: int = 2
    prefetch: int = 2  # DALI prefetch_queue_depth
    interp: str = "linear"  # "linear" | "cubic" | "lanczos3" (antialiased)
    channels_last: bool = False
    window_blocks: int = 8  # row groups shuffled together (see epoch_order)

    def __post_init__(self) -> None:
        _set = lambda k, v: object.__setattr__(self, k, v)  # frozen dataclass
        _set("mean_rgb", _float_tuple("mean_rgb", self.mean_rgb, (3,)))
        _set("eigvals", _float_tuple("eigvals", self.eigvals, (3,)))
        _set("eigvecs", _float_tuple("eigvecs", self.eigvecs, (3, 3)))
        _check_int("crop", self.crop, 1)
        _check_int("num_threads", self.num_threads, 1)
        _check_int("prefetch", self.prefetch, 1)
        _check_int("window_blocks", self.window_blocks, 1)
        std = self.color_noise_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not std >= 0:
            raise ValueError(f"color_noise_std must be a number >= 0, got {std!r}")
        if min(self.eigvals) < 0:
            raise ValueError(f"eigvals must be >= 0 (a covariance), got {self.eigvals}")
        if self.device not in _DEVICES:
            raise ValueError(f"device must be one of {_DEVICES}, got {self.device!r}")
        if self.interp not in _INTERP:
            raise ValueError(f"interp must be one of {tuple(_INTERP)}, got {self.interp!r}")
        for k in ("flip", "channels_last"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"{k} must be a bool, got {getattr(self, k)!r}")

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any], **overrides: Any) -> "AugmentSpec":
        """Build from a ``stats.json`` dict (mean_rgb, eigvals, eigvecs) plus options."""
        return cls(mean_rgb=stats["mean_rgb"], eigvals=stats["eigvals"],
                   eigvecs=stats["eigvecs"], **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["eigvecs"] = [list(r) for r in self.eigvecs]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AugmentSpec":
        """Inverse of ``to_dict``; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AugmentSpec keys: {unknown}")
        return cls(**d)

    def pca_matrix(self) -> np.ndarray:
        """(3, 3) matrix M with shift_255 = M @ alpha, alpha ~ N(0, std^2 I).

        Units: stats are on the 0-255 scale, but AlexNet / fb.resnet define the
        noise on [0, 1]-scaled pixels: shift_01 = V (alpha * lambda_01) with
        lambda_01 = lambda_255 / 255^2. On the 0-255 scale that is
        shift_255 = 255 * shift_01 = V (alpha * lambda_255 / 255), a few
        intensity levels for ImageNet statistics, as in AlexNet.
        """
        vecs = np.asarray(self.eigvecs, np.float64)
        return vecs * (np.asarray(self.eigvals, np.float64) / 255.0)[None, :]


def _float_tuple(name: str, value: Any, shape: tuple[int, ...]) -> tuple:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric with shape {shape}") from exc
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return tuple(map(tuple, arr.tolist())) if arr.ndim == 2 else tuple(arr.tolist())


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------
# Scales (paper section 3.1 "training image size", 3.2 "testing")


def parse_scale(scale: Scale, crop: int) -> tuple[int, int]:
    """S or (Smin, Smax) -> (Smin, Smax); checks Smin <= Smax and crop <= Smin."""
    if isinstance(scale, (int, np.integer)) and not isinstance(scale, bool):
        lo = hi = int(scale)
    elif isinstance(scale, (tuple, list)) and len(scale) == 2 and all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in scale):
        lo, hi = int(scale[0]), int(scale[1])
    else:
        raise ValueError(f"scale must be an int S or a pair (Smin, Smax), got {scale!r}")
    if lo > hi:
        raise ValueError(f"scale: Smin={lo} > Smax={hi}")
    if crop > lo:
        raise ValueError(f"crop={crop} > Smin={lo}: the crop must fit in the rescaled image")
    return lo, hi


def center_scale(scale: Scale, crop: int) -> int:
    """Single test scale Q for a training scale: S, or (Smin+Smax)/2 if jittered."""
    return paper.scales_for_testing(*parse_scale(scale, crop), crop)[0]


def eval_scales(scale: Scale, crop: int) -> tuple[int, ...]:
    """Multi-scale test Q (paper 4.2, stages.paper.scales_for_testing): {S-d, S, S+d} with the
    paper's d = 32 scaled to the crop, or {Smin, mid, Smax}."""
    return tuple(paper.scales_for_testing(*parse_scale(scale, crop), crop)[1])


def resized_hw(h: np.ndarray, w: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Size after the isotropic rescale that makes the shorter side ``s``."""
    h, w, s = (np.asarray(a, np.int64) for a in (h, w, s))
    short = np.minimum(h, w)
    long_side = np.floor(np.maximum(h, w) * s / short + 0.5).astype(np.int64)
    long_side = np.maximum(long_side, s)
    return np.where(h <= w, s, long_side), np.where(h <= w, long_side, s)


# --------------------------------------------------------------------------
# Shares (which rows a worker reads per epoch)
#
# Two-level order, so that a rank only reads ~1/world of the row groups and
# memory is bounded: per epoch, the (file, row_group) blocks are permuted,
# consecutive runs of ``window_blocks`` blocks form windows, rows are shuffled
# within each window, and rank r takes the r-th contiguous chunk of that global
# order (chunk sizes differ by at most one). Rows of one block only ever mix
# with rows of the few blocks in the same window, so the shard stage should
# write rows in random order (not sorted by class).


def epoch_order(block_sizes: Sequence[int], seed: int, epoch: int,
                window_blocks: int = 8, shuffle: bool = True) -> np.ndarray:
    """Global order of all rows (ids = position in file/row-group order) for an epoch."""
    sizes = np.asarray(block_sizes, np.int64)
    total = int(sizes.sum())
    if not shuffle:
        return np.arange(total, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rng = np.random.default_rng([seed, epoch, _TAG_ORDER])
    perm = rng.permutation(len(sizes))
    parts = []
    for w0 in range(0, len(perm), window_blocks):
        blocks = perm[w0:w0 + window_blocks]
        rows = np.concatenate([np.arange(starts[b], starts[b] + sizes[b]) for b in blocks])
        parts.append(rng.permutation(rows))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def share_bounds(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous chunk; sizes differ by at most one."""
    _check_int("world_size", world_size, 1)
    if not (isinstance(rank, (int, np.integer)) and 0 <= rank < world_size):
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
    return rank * num_rows // world_size, (rank + 1) * num_rows // world_size


def share_rows(num_rows: int, rank: int, world_size: int, seed: int, epoch: int, *,
               block_sizes: Sequence[int] | None = None, window_blocks: int = 8,
               shuffle: bool = True) -> np.ndarray:
    """Row ids rank reads in this epoch, in order. Shares are disjoint and cover the split.

    ``block_sizes`` are the row counts of the (file, row_group) blocks; None
    means one block (a full shuffle).
    """
    sizes = [num_rows] if block_sizes is None else list(block_sizes)
    if sum(sizes) != num_rows:
        raise ValueError(f"block_sizes sum to {sum(sizes)}, expected num_rows={num_rows}")
    lo, hi = share_bounds(num_rows, rank, world_size)
    return epoch_order(sizes, seed, epoch, window_blocks, shuffle)[lo:hi]


def num_batches(num_rows: int, rank: int, world_size: int, batch_size: int) -> int:
    """Batches per epoch for rank: ceil(share / batch), the partial last batch kept."""
    _check_int("batch_size", batch_size, 1)
    lo, hi = share_bounds(num_rows, rank, world_size)
    return -(-(hi - lo) // batch_size)


# --------------------------------------------------------------------------
# Reading Parquet shards


def shard_files(source: str | Path | Sequence[str | Path], split: str = "train") -> list[str]:
    """Parquet files of a split: a shard dir (uses ``<dir>/<split>/*.parquet``) or a list.

    The dir may be a local path or a filesystem URI (``s3://...``, ``gs://...``); files
    are then returned as URIs, which ``open_parquet`` opens through pyarrow.fs.
    """
    if isinstance(source, (str, Path)):
        fs, root = resolve_uri(str(source))
        folder = posixpath.join(root, split)
        if fs.get_file_info(folder).type != pafs.FileType.Directory:
            folder = root
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        files = sorted(to_uri(fs, i.path, str(source)) for i in infos
                       if i.is_file and i.path.endswith(".parquet"))
    else:
        files = [str(p) for p in source]
    if not files:
        raise ValueError(f"no Parquet files found for {source!r} (split {split!r})")
    return files


def open_parquet(path: str) -> pq.ParquetFile:
    """A Parquet file by local path or filesystem URI (opened through pyarrow.fs)."""
    fs, p = resolve_uri(path)
    return pq.ParquetFile(p if is_local(fs) else fs.open_input_file(p))


class ShardIndex:
    """Row-group metadata of a list of Parquet files; global row id -> (file, row)."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)
        blocks = []  # (file index, row group, rows, first row of the group in its file)
        for i, path in enumerate(self.files):
            meta = open_parquet(path).metadata
            missing = set(_COLUMNS) - set(meta.schema.names)
            if missing:
                raise ValueError(f"{path}: missing columns {sorted(missing)}")
            offset = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if n:
                    blocks.append((i, g, n, offset))
                offset += n
        cols = np.asarray(blocks, np.int64).reshape(-1, 4).T
        self.block_file, self.block_rg, self.block_sizes, self.block_file_row0 = cols
        self.block_start = np.concatenate([[0], np.cumsum(self.block_sizes)]).astype(np.int64)
        self.num_rows = int(self.block_start[-1])

    def block_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.block_start, rows, side="right") - 1

    def locate(self, row: int) -> tuple[str, int]:
        """(file path, row index within that file) of a global row id."""
        b = int(self.block_of(np.asarray([row]))[0])
        in_file = self.block_file_row0[b] + row - self.block_start[b]
        return self.files[self.block_file[b]], int(in_file)


def _binary_views(arr: pa.Array) -> list[np.ndarray]:
    """Zero-copy uint8 views of the values of a (large_)binary array."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        arr = arr.cast(pa.large_binary())  # e.g. binary_view
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], off_type)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return [data[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


class _Block:
    """The planned rows of one row group: sorted global ids and their columns."""

    def __init__(self, rows: np.ndarray, table: pa.Table, with_keys: bool, copy_rows: bool):
        self.rows = rows
        self.jpegs = np.empty(len(rows), object)
        views = _binary_views(table.column("image"))  # uint8 views into one Arrow buffer
        # Copies can be freed one by one (rows that wait long, e.g. in dense buckets).
        self.jpegs[:] = [v.copy() for v in views] if copy_rows else views
        self.cols = {c: table.column(c).to_numpy().astype(np.int64)
                     for c in ("label", "height", "width")}
        self.keys = np.asarray(table.column("key").to_pylist(), object) if with_keys else None
        self.remaining = len(rows)


class _RowFetcher:
    """Loads rows on demand, one row group at a time, keeping only planned rows.

    ``plan(rows)`` declares the rows of a pass; when ``fetch`` meets a row whose
    row group is not loaded, the planned rows of that group are read (only the
    needed columns of that one row group) and kept until all were fetched.
    With ``with_keys`` the keys of fetched rows go to ``keys`` (row -> key)
    until the consumer pops them. With ``copy_rows`` each JPEG is copied out of
    the Arrow buffer, so memory is freed row by row rather than per row group.
    """

    def __init__(self, index: ShardIndex, with_keys: bool = False, copy_rows: bool = False):
        self.index, self.with_keys, self.copy_rows = index, with_keys, copy_rows
        self.keys: dict[int, str] = {}
        self._columns = list(_COLUMNS) if with_keys else [c for c in _COLUMNS if c != "key"]
        self._files: dict[int, pq.ParquetFile] = {}
        self._planned: dict[int, np.ndarray] = {}
        self._loaded: dict[int, _Block] = {}

    def plan(self, rows: np.ndarray) -> None:
        self._loaded.clear()
        self.keys.clear()
        blocks = self.index.block_of(rows)
        order = np.argsort(rows, kind="stable")
        uniq, first = np.unique(blocks[order], return_index=True)
        self._planned = dict(zip(uniq.tolist(), np.split(rows[order], first[1:])))

    def fetch(self, rows: np.ndarray) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
        """(jpeg views, labels, heights, widths) of rows, in order."""
        n = len(rows)
        blocks = self.index.block_of(rows)
        jpegs = np.empty(n, object)
        cols = {c: np.empty(n, np.int64) for c in ("label", "height", "width")}
        for b in np.unique(blocks).tolist():
            block = self._loaded.get(b) or self._load(b)
            where = np.flatnonzero(blocks == b)
            pos = np.searchsorted(block.rows, rows[where])
            jpegs[where] = block.jpegs[pos]
            block.jpegs[pos] = None  # the source keeps them alive until DALI copied them
            for c, arr in cols.items():
                arr[where] = block.cols[c][pos]
            if self.with_keys:
                self.keys.update(zip(rows[where].tolist(), block.keys[pos].tolist()))
            block.remaining -= len(where)
            if block.remaining <= 0:
                del self._loaded[b]
        return jpegs.tolist(), cols["label"], cols["height"], cols["width"]

    def _load(self, b: int) -> _Block:
        idx = self.index
        f = int(idx.block_file[b])
        if f not in self._files:
            self._files[f] = open_parquet(idx.files[f])
        rows = self._planned.pop(b)
        table = self._files[f].read_row_group(int(idx.block_rg[b]), columns=self._columns,
                                              use_threads=False)  # DALI owns the cores
        table = table.take(pa.array(rows - idx.block_start[b]))
        self._loaded[b] = _Block(rows, table, self.with_keys, self.copy_rows)
        return self._loaded[b]


# --------------------------------------------------------------------------
# Per-sample parameters (numpy, vectorised, deterministic)


def pca_shift(rng: np.random.Generator, n: int, spec: AugmentSpec) -> np.ndarray:
    """(n, 3) AlexNet PCA colour shifts on the 0-255 scale (see AugmentSpec.pca_matrix)."""
    alpha = rng.normal(0.0, spec.color_noise_std, size=(n, 3))
    return alpha @ spec.pca_matrix().T


def roi_window(h, w, rh, rw, y0, x0, crop: int, radius: int) -> dict[str, np.ndarray]:
    """Decode region and sub-pixel resize ROI for the window (y0, x0, crop) of the
    image rescaled from (h, w) to (rh, rw). Returns int32 ``anchor``/``shape``
    (y, x) of the region in the original image, float32 ``roi_start``/``roi_end``
    of the window inside that region.

    The margin covers the resampling filter (radius / scale source pixels when
    shrinking with antialias), so pixels near the window edges see the same
    source pixels as a resize of the whole image; the region is clamped to the
    image exactly where the full resize clamps at its borders.
    """
    axes = (_roi_axis(h, rh, y0, crop, radius), _roi_axis(w, rw, x0, crop, radius))
    first, length, start, end = (np.stack(v, 1) for v in zip(*axes))  # (n, 2) each
    return {"anchor": first.astype(np.int32), "shape": length.astype(np.int32),
            "roi_start": start.astype(np.float32), "roi_end": end.astype(np.float32)}


def _roi_axis(size, rsize, start, crop: int, radius: int) -> tuple[np.ndarray, ...]:
    """One axis: decoded span [first, first + length) and the window [a, b) inside it."""
    size = np.asarray(size, np.float64)
    scale = np.asarray(rsize, np.float64) / size  # rescale factor along this axis
    a = np.asarray(start, np.float64) / scale  # window in original pixel coordinates
    b = (np.asarray(start, np.float64) + crop) / scale
    margin = np.ceil(radius * np.maximum(1.0, 1.0 / scale)) + 1
    first = np.clip(np.floor(a) - margin, 0, size)
    last = np.clip(np.ceil(b) + margin, 0, size)
    return first, last - first, a - first, b - first


def train_params(rng: np.random.Generator, h: np.ndarray, w: np.ndarray,
                 scale: tuple[int, int], spec: AugmentSpec) -> dict[str, np.ndarray]:
    """Random S, crop window, flip and colour shift for a batch of images (h, w)."""
    n = len(h)
    s = rng.integers(scale[0], scale[1] + 1, size=n)  # S ~ U{Smin..Smax} per image
    rh, rw = resized_hw(h, w, s)
    y0 = np.floor(rng.random(n) * (rh - spec.crop + 1)).astype(np.int64)
    x0 = np.floor(rng.random(n) * (rw - spec.crop + 1)).astype(np.int64)
    mirror = (rng.random(n) < 0.5) if spec.flip else np.zeros(n, bool)
    shift = pca_shift(rng, n, spec)
    out = roi_window(h, w, rh, rw, y0, x0, spec.crop, _INTERP[spec.interp][1])
    # out = x - (mean - shift) = x - mean + shift, in one crop_mirror_normalize.
    out["mean"] = (np.asarray(spec.mean_rgb)[None, :] - shift).astype(np.float32)
    out["mirror"] = mirror.astype(np.int32)
    out.update(scale=s.astype(np.int32), shift=shift.astype(np.float32),
               y0=y0.astype(np.int32), x0=x0.astype(np.int32))
    return out


def center_params(h: np.ndarray, w: np.ndarray, q: int, spec: AugmentSpec) -> dict[str, np.ndarray]:
    """Centre crop window of the image rescaled to shorter side Q (no randomness)."""
    n = len(h)
    rh, rw = resized_hw(h, w, np.full(n, q))
    out = roi_window(h, w, rh, rw, (rh - spec.crop) // 2, (rw - spec.crop) // 2,
                     spec.crop, _INTERP[spec.interp][1])
    out["mean"] = np.tile(np.asarray(spec.mean_rgb, np.float32), (n, 1))
    out["mirror"] = np.zeros(n, np.int32)
    return out


# --------------------------------------------------------------------------
# External sources (called by DALI once per batch; must stay cheap)


class _Source:
    """Batch iterator for ``fn.external_source(cycle="raise")``.

    DALI calls ``__iter__`` right after an epoch's StopIteration, before the
    loader knows the next epoch; the pass is therefore started lazily, on the
    first ``__next__`` after a reset, from ``self.epoch``.
    """

    outputs: tuple[str, ...] = ()  # external_source outputs, in order
    extras: tuple[str, ...] = ()  # of those, the ones the pipeline also returns

    def __init__(self, fetcher: _RowFetcher, batch_size: int):
        self.fetcher = fetcher
        self.batch_size = batch_size
        self.epoch = 0
        self.sent: dict[int, np.ndarray] = {}  # batch index -> global rows (errors)
        self._keepalive: deque = deque(maxlen=8)
        self._gen: Iterator | None = None

    def __iter__(self) -> "_Source":
        self._gen = None
        return self

    def __next__(self) -> list:
        if self._gen is None:
            self.sent.clear()
            self._gen = self._batches(self.epoch)
        return next(self._gen)

    def batches_plan(self, epoch: int) -> list[np.ndarray]:
        raise NotImplementedError

    def _batches(self, epoch: int) -> Iterator[list]:
        plan = self.batches_plan(epoch)
        self.fetcher.plan(np.concatenate(plan) if plan else np.zeros(0, np.int64))
        for i, rows in enumerate(plan):
            self.sent[i] = rows
            self.sent.pop(i - 64, None)
            jpegs, labels, h, w = self.fetcher.fetch(rows)
            # The views stay referenced until DALI has copied them (a few batches on).
            self._keepalive.append(jpegs)
            batch = self.make_batch(TensorListCPU(jpegs, contiguous=False), labels, h, w, rows)
            yield batch

    def make_batch(self, jpegs, labels, h, w, rows) -> list:
        raise NotImplementedError


class _TrainSource(_Source):
    base_outputs = ("jpegs", "anchor", "shape", "roi_start", "roi_end", "mean", "mirror", "label")
    debug_outputs = ("scale", "shift", "y0", "x0", "row")  # + mirror, returned when debugging

    def __init__(self, fetcher, batch_size, spec, scale, rank, world_size, seed, debug):
        super().__init__(fetcher, batch_size)
        self.spec, self.scale, self.rank, self.world_size, self.seed = (
            spec, scale, rank, world_size, seed)
        self.outputs = self.base_outputs + (self.debug_outputs if debug else ())
        self.extras = self.debug_outputs + ("mirror",) if debug else ()
        self._rng: np.random.Generator | None = None

    def batches_plan(self, epoch: int) -> list[np.ndarray]:
        idx = self.fetcher.index
        rows = share_rows(idx.num_rows, self.rank, self.world_size, self.seed, epoch,
                          block_sizes=idx.block_sizes, window_blocks=self.spec.window_blocks)
        self._rng = np.random.default_rng([self.seed, epoch, _TAG_PARAMS, self.rank])
        return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def make_batch(self, jpegs, labels, h, w, rows) -> list:
        p = train_params(self._rng, h, w, self.scale, self.spec)
        p.update(jpegs=jpegs, label=labels, row=rows)
        return [p[name] for name in self.outputs]


class _CenterSource(_Source):
    outputs = ("jpegs", "anchor", "shape", "roi_start", "roi_end", "mean", "mirror",
               "label", "row")
    extras = ("row",)

    def __init__(self, fetcher, batch_size, spec, q, rank, world_size):
        super().__init__(fetcher, batch_size)
        self.spec, self.q, self.rank, self.world_size = spec, q, rank, world_size

    def batches_plan(self, epoch: int) -> list[np.ndarray]:
        lo, hi = share_bounds(self.fetcher.index.num_rows, self.rank, self.world_size)
        rows = np.arange(lo, hi, dtype=np.int64)
        return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def make_batch(self, jpegs, labels, h, w, rows) -> list:
        p = center_params(h, w, self.q, self.spec)
        return [jpegs, p["anchor"], p["shape"], p["roi_start"], p["roi_end"], p["mean"],
                p["mirror"], labels, rows]


class _DenseSource(_Source):
    """Whole images at shorter side Q, bucketed so a batch has one (H, W).

    The plan (from the cheap height/width columns) walks the rank's contiguous
    share in file order; images go into per-size buckets, a bucket is emitted
    when full and partial ones are flushed at the end. Rows are read a row
    group at a time and held only until their batch is emitted, so memory is
    bounded by one row group plus (number of distinct sizes x batch) images.
    """

    outputs = ("jpegs", "size", "mean", "label", "row")
    extras = ("row",)

    def __init__(self, fetcher, batch_size, spec, q, rank, world_size):
        super().__init__(fetcher, batch_size)
        self.spec, self.q, self.rank, self.world_size = spec, q, rank, world_size
        self._plan: list[np.ndarray] | None = None

    def batches_plan(self, epoch: int) -> list[np.ndarray]:
        if self._plan is None:
            self._plan = self._bucket_plan()
        return self._plan

    def _bucket_plan(self) -> list[np.ndarray]:
        idx = self.fetcher.index
        lo, hi = share_bounds(idx.num_rows, self.rank, self.world_size)
        h, w = _read_sizes(idx, lo, hi)
        rh, rw = resized_hw(h, w, np.full(len(h), self.q))
        pending: dict[tuple[int, int], list[int]] = {}
        plan: list[np.ndarray] = []
        for i, key in enumerate(zip(rh.tolist(), rw.tolist())):
            bucket = pending.setdefault(key, [])
            bucket.append(lo + i)
            if len(bucket) == self.batch_size:
                plan.append(np.asarray(pending.pop(key), np.int64))
        plan.extend(np.asarray(b, np.int64) for b in pending.values())
        return plan

    def make_batch(self, jpegs, labels, h, w, rows) -> list:
        rh, rw = resized_hw(h, w, np.full(len(h), self.q))
        size = np.stack([rh, rw], 1).astype(np.float32)
        mean = np.tile(np.asarray(self.spec.mean_rgb, np.float32), (len(h), 1))
        return [jpegs, size, mean, labels, rows]


def _read_sizes(index: ShardIndex, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """height, width columns of global rows [lo, hi) (reads only those row groups)."""
    hs, ws = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if hi > lo:
        first, last = index.block_of(np.asarray([lo, hi - 1])).tolist()
        opened: dict[int, pq.ParquetFile] = {}  # one open per file, not per row group
        for b in range(first, last + 1):
            f = int(index.block_file[b])
            if f not in opened:
                opened[f] = open_parquet(index.files[f])
            t = opened[f].read_row_group(
                int(index.block_rg[b]), columns=["height", "width"])
            start = index.block_start[b]
            a, z = max(lo, start) - start, min(hi, index.block_start[b + 1]) - start
            hs.append(t.column("height").to_numpy()[a:z])
            ws.append(t.column("width").to_numpy()[a:z])
    return np.concatenate(hs).astype(np.int64), np.concatenate(ws).astype(np.int64)


# --------------------------------------------------------------------------
# DALI pipelines


def resolve_device_id(spec: AugmentSpec, device_id: int | None) -> int | None:
    """GPU id for the pipeline, or None for CPU-only (spec.device overrides auto)."""
    if spec.device == "cpu":
        return None
    if device_id is None and torch.cuda.is_available():
        device_id = torch.cuda.current_device()
    if spec.device == "gpu" and device_id is None:
        raise ValueError("spec.device='gpu' but no device_id given and CUDA is unavailable")
    return device_id


_DTYPES = {"jpegs": types.UINT8, "anchor": types.INT32, "shape": types.INT32,
           "roi_start": types.FLOAT, "roi_end": types.FLOAT, "mean": types.FLOAT,
           "mirror": types.INT32, "label": types.INT64, "scale": types.INT32,
           "shift": types.FLOAT, "row": types.INT64, "size": types.FLOAT, "y0": types.INT32,
           "x0": types.INT32}


def _new_pipeline(spec: AugmentSpec, batch_size: int, device_id: int | None) -> Pipeline:
    return Pipeline(batch_size=batch_size, num_threads=spec.num_threads, device_id=device_id,
                    prefetch_queue_depth=spec.prefetch, exec_dynamic=True, seed=0)


def _inputs(source: _Source) -> dict[str, Any]:
    names = source.outputs
    nodes = fn.external_source(source, num_outputs=len(names), batch=True, cycle="raise",
                               dtype=[_DTYPES[n] for n in names])
    return dict(zip(names, nodes))


def _normalize(images, mean, mirror, layout: str):
    return fn.crop_mirror_normalize(images, mean=mean, mirror=mirror, dtype=types.FLOAT,
                                    output_layout=layout)


def _roi_pipeline(source: _Source, spec: AugmentSpec, batch_size: int,
                  device_id: int | None) -> tuple[Pipeline, list[str]]:
    """ROI decode -> resize ROI to crop x crop -> flip + (x - mean + shift).

    CPU or GPU differ only in the decoder device ("cpu" vs "mixed"); resize and
    normalisation run where their input is.
    """
    pipe = _new_pipeline(spec, batch_size, device_id)
    gpu = device_id is not None
    with pipe:
        x = _inputs(source)
        images = fn.decoders.image_slice(x["jpegs"], x["anchor"], x["shape"], axis_names="HW",
                                         device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.resize(images, size=[spec.crop, spec.crop], roi_start=x["roi_start"],
                           roi_end=x["roi_end"], interp_type=_INTERP[spec.interp][0],
                           antialias=True)
        images = _normalize(images, x["mean"], x["mirror"], "HWC" if spec.channels_last else "CHW")
        extra = source.extras
        pipe.set_outputs(images, x["label"].gpu() if gpu else x["label"], *(x[n] for n in extra))
    return pipe, ["images", "labels", *extra]


def _dense_pipeline(source: _Source, spec: AugmentSpec, batch_size: int,
                    device_id: int | None) -> tuple[Pipeline, list[str]]:
    """Full decode -> isotropic resize to shorter side Q -> (x - mean), CHW."""
    pipe = _new_pipeline(spec, batch_size, device_id)
    gpu = device_id is not None
    with pipe:
        x = _inputs(source)
        images = fn.decoders.image(x["jpegs"], device="mixed" if gpu else "cpu",
                                   output_type=types.RGB)
        images = fn.resize(images, size=x["size"], interp_type=_INTERP[spec.interp][0],
                           antialias=True)
        images = _normalize(images, x["mean"], 0, "CHW")
        pipe.set_outputs(images, x["label"].gpu() if gpu else x["label"], x["row"])
    return pipe, ["images", "labels", "row"]


# --------------------------------------------------------------------------
# Loaders


class _Loader:
    """DALI pipeline + external source + DALIGenericIterator, one pass at a time."""

    def __init__(self, source: _Source, build, spec: AugmentSpec, batch_size: int,
                 device_id: int | None):
        self.source, self._build = source, build
        self.spec, self.batch_size, self.device_id = spec, batch_size, device_id
        self._it: DALIGenericIterator | None = None
        self._names: list[str] = []
        self._clean = False  # True when the last pass ran to its end

    def _start(self, epoch: int) -> DALIGenericIterator:
        self.source.epoch = epoch
        if self._it is not None and self._clean:
            self._it.reset()
        else:  # first pass, or the previous one was abandoned / failed
            pipe, self._names = self._build(self.source, self.spec, self.batch_size,
                                            self.device_id)
            self._it = DALIGenericIterator(pipe, self._names, auto_reset=False,
                                           last_batch_policy=LastBatchPolicy.PARTIAL,
                                           prepare_first_batch=False)
        self._clean = False
        return self._it

    def _pass(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        it = self._start(epoch)
        k = 0
        while True:
            try:
                out = next(it)[0]
            except StopIteration:
                break
            except Exception as exc:
                raise RuntimeError(self._explain(k, exc)) from exc
            yield out
            k += 1
        self._clean = True

    def _explain(self, k: int, exc: Exception) -> str:
        rows = self.source.sent.get(k)
        if rows is None:
            return f"augment pipeline failed near batch {k}: {exc}"
        index = self.source.fetcher.index
        bad = []  # the failing batch is k; look at the ones in flight too, to be sure
        for j in range(k, k + self.spec.prefetch + 2):
            if not bad and j in self.source.sent:
                bad = _find_undecodable(index, self.source.sent[j])
        where = bad if bad else [index.locate(r) for r in rows.tolist()[:8]]
        what = "undecodable sample(s)" if bad else "batch rows (first 8)"
        lines = "; ".join(f"shard file {f} row {r}" for f, r in where)
        return f"augment pipeline failed on batch {k}: {what}: {lines}: {exc}"


def _find_undecodable(index: ShardIndex, rows: np.ndarray) -> list[tuple[str, int]]:
    """Error path only: decode each row of a failed batch alone with DALI (CPU)."""
    fetcher = _RowFetcher(index)
    fetcher.plan(rows)
    jpegs = fetcher.fetch(rows)[0]
    return [index.locate(r) for r, j in zip(rows.tolist(), jpegs) if not _decodes(j)]


def _decodes(jpeg: np.ndarray) -> bool:
    """Whether DALI's CPU decoder accepts these bytes (a one-sample pipeline)."""
    pipe = Pipeline(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    with pipe:  # a zero-argument callable: DALI would pass batch info to a 1-arg one
        pipe.set_outputs(fn.decoders.image(fn.external_source(lambda: [jpeg], batch=True)))
    try:
        pipe.build()
        pipe.run()
        return True
    except Exception:  # noqa: BLE001 - only locating the culprit of an earlier failure
        return False


class TrainLoader(_Loader):
    """Per-worker training loader. ``loader.epoch(e)`` yields (images, labels);
    with ``debug=True`` it yields (images, labels, info) where info holds the
    per-sample ``scale`` (S applied), ``shift`` (RGB colour shift, 0-255),
    crop window ``y0``/``x0`` in the S-rescaled image, ``mirror`` and ``row``.

    images: float32 (B, 3, crop, crop) (channels_last memory format if the spec
    says so), labels: int64 (B,). The last batch of an epoch may be partial.
    """

    def __init__(self, source: _TrainSource, spec, batch_size, device_id, debug: bool,
                 start_epoch: int):
        super().__init__(source, _roi_pipeline, spec, batch_size, device_id)
        self.debug = debug
        self.next_epoch = start_epoch
        idx = source.fetcher.index
        self.num_samples = int(np.diff(share_bounds(idx.num_rows, source.rank,
                                                     source.world_size))[0])

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple]:
        """Iterate one epoch (deterministic order and augmentation for (seed, epoch, rank))."""
        self.next_epoch = epoch + 1
        for out in self._pass(epoch):
            images = out["images"]
            if self.spec.channels_last:
                images = images.permute(0, 3, 1, 2)  # (B, C, H, W) view, NHWC memory
            labels = out["labels"].reshape(-1)
            if self.debug:
                info = {k: out[k] for k in ("scale", "y0", "x0", "mirror", "row")}
                info = {k: v.reshape(-1) for k, v in info.items()}
                info["shift"] = out["shift"]  # (B, 3) RGB shift on the 0-255 scale
                yield images, labels, info
            else:
                yield images, labels

    def __iter__(self) -> Iterator[tuple]:
        return self.epoch(self.next_epoch)


class EvalLoader(_Loader):
    """Evaluation loader at test scale Q; each iteration is one full pass.

    mode "center": (images (B, 3, crop, crop), labels, keys);
    mode "dense":  (images (B, 3, H, W), labels, keys), one (H, W) per batch
    (the paper also scores the flip: ``images.flip(-1)``, a cheap torch op);
    mode "multicrop": (crops (B, n, 3, crop, crop), labels, keys) with n = g*g
    grid crops (row-major) followed by their horizontal flips if ``flips``.
    """

    def __init__(self, source: _Source, build, spec, batch_size, device_id, mode: str,
                 grid: int, flips: bool):
        super().__init__(source, build, spec, batch_size, device_id)
        self.mode, self.grid, self.flips = mode, grid, flips
        self.num_samples = int(np.diff(share_bounds(source.fetcher.index.num_rows,
                                                    source.rank, source.world_size))[0])

    def __len__(self) -> int:
        return len(self.source.batches_plan(0))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        keys = self.source.fetcher.keys
        for out in self._pass(0):
            rows = out["row"].reshape(-1).tolist()
            images, labels = out["images"], out["labels"].reshape(-1)
            if self.mode == "multicrop":
                images = grid_crops(images, self.spec.crop, self.grid, self.flips)
            yield images, labels, [keys.pop(r) for r in rows]


# --------------------------------------------------------------------------
# Builders (public API)


def build_train_loader(source: str | Path | Sequence[str | Path], spec: AugmentSpec,
                       scale: Scale, batch_size: int, *, rank: int = 0, world_size: int = 1,
                       seed: int = 0, device_id: int | None = None, start_epoch: int = 0,
                       split: str = "train", debug: bool = False) -> TrainLoader:
    """Training loader for worker ``rank`` of ``world_size`` at scale S or (Smin, Smax).

    ``source``: a shard dir (reads ``<dir>/<split>/*.parquet``) or Parquet files.
    ``device_id``: GPU for "mixed" decoding (None and no CUDA: CPU pipeline).
    """
    _check_int("batch_size", batch_size, 1)
    rng_scale = parse_scale(scale, spec.crop)
    share_bounds(1, rank, world_size)  # validates rank/world_size
    index = ShardIndex(shard_files(source, split))
    src = _TrainSource(_RowFetcher(index), batch_size, spec, rng_scale, rank, world_size, seed,
                       debug)
    return TrainLoader(src, spec, batch_size, resolve_device_id(spec, device_id), debug,
                       start_epoch)


def build_eval_loader(source: str | Path | Sequence[str | Path], spec: AugmentSpec, q: int,
                      batch_size: int, *, mode: str = "dense", grid: int = 5,
                      flips: bool = True, rank: int = 0, world_size: int = 1,
                      device_id: int | None = None, split: str = "val") -> EvalLoader:
    """Evaluation loader at test scale Q; mode "dense", "multicrop" or "center".

    Each rank gets a contiguous, unshuffled share; dense/multicrop batches are
    bucketed by rescaled size (a batch may hold fewer than ``batch_size``).
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("grid", grid, 1)
    _check_int("Q", q, 1)
    if mode not in ("dense", "multicrop", "center"):
        raise ValueError(f"mode must be 'dense', 'multicrop' or 'center', got {mode!r}")
    if mode != "dense" and q < spec.crop:
        raise ValueError(f"Q={q} < crop={spec.crop}: crops would not fit")
    share_bounds(1, rank, world_size)
    fetcher = _RowFetcher(ShardIndex(shard_files(source, split)), with_keys=True,
                          copy_rows=mode != "center")
    dev = resolve_device_id(spec, device_id)
    if mode == "center":
        src = _CenterSource(fetcher, batch_size, spec, q, rank, world_size)
        return EvalLoader(src, _roi_pipeline, spec, batch_size, dev, mode, grid, flips)
    src = _DenseSource(fetcher, batch_size, spec, q, rank, world_size)
    return EvalLoader(src, _dense_pipeline, spec, batch_size, dev, mode, grid, flips)


def build_center_loader(source, spec: AugmentSpec, q: int, batch_size: int, **kw) -> EvalLoader:
    """Centre crop at scale Q (per-epoch validation; Q = center_scale(S))."""
    return build_eval_loader(source, spec, q, batch_size, mode="center", **kw)


# --------------------------------------------------------------------------
# Diagnostics


def sample_grid(source, spec: AugmentSpec, scale: Scale, *, n: int = 16, cols: int = 4,
                seed: int = 0, pad: int = 2, split: str = "train") -> np.ndarray:
    """uint8 (H, W, 3) grid of n augmented training samples (training mean added back)."""
    cpu = dataclasses.replace(spec, device="cpu", channels_last=False)
    loader = build_train_loader(source, cpu, scale, n, seed=seed, split=split)
    images = next(iter(loader.epoch(0)))[0]
    imgs = images.permute(0, 2, 3, 1).numpy() + np.asarray(spec.mean_rgb, np.float32)
    imgs = np.clip(np.rint(imgs), 0, 255).astype(np.uint8)
    rows = -(-len(imgs) // cols)
    c = spec.crop + pad
    grid = np.full((rows * c + pad, cols * c + pad, 3), 255, np.uint8)
    for i, im in enumerate(imgs):
        y, x = pad + (i // cols) * c, pad + (i % cols) * c
        grid[y:y + spec.crop, x:x + spec.crop] = im
    return grid


def measure_throughput(loader: TrainLoader, num_batches: int = 50, warmup: int = 5) -> float:
    """Images per second of a training loader over num_batches after warmup batches."""
    if len(loader) == 0:
        raise ValueError("the loader has no batches for this rank")

    def batches():
        e = loader.next_epoch
        while True:
            yield from loader.epoch(e)
            e += 1
    it = batches()
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(num_batches):
        n += next(it)[0].shape[0]
    if loader.device_id is not None:
        torch.cuda.synchronize(loader.device_id)
    return n / (time.perf_counter() - t0)


def spec_from_config(cfg: AugmentConfig, stats: Mapping[str, Any]) -> AugmentSpec:
    """The augmentation spec: the config's options plus the shard stage's RGB statistics."""
    return AugmentSpec.from_stats(
        stats,
        crop=cfg.crop,
        color_noise_std=cfg.color_noise_std,
        flip=cfg.flip,
        device=cfg.device,
        num_threads=cfg.num_threads,
        prefetch=cfg.prefetch,
        interp=cfg.interp,
    )


def check_pipelines(shards: str, spec: AugmentSpec, scale: tuple[int, int], batches: int,
                    batch_size: int, seed: int, log=print) -> dict[str, float]:
    """Run `batches` batches of every pipeline kind (train, centre, dense, multi-crop);
    check shapes and values; return images/s of each (CPU or GPU as the spec says)."""
    q = center_scale(scale, spec.crop)
    kinds = {
        "train": lambda: build_train_loader(shards, spec, scale, batch_size, seed=seed),
        "center": lambda: build_center_loader(shards, spec, q, batch_size),
        "dense": lambda: build_eval_loader(shards, spec, q, batch_size, mode="dense"),
        "multicrop": lambda: build_eval_loader(shards, spec, q, batch_size, mode="multicrop"),
    }
    rates = {}
    for kind, make in kinds.items():
        loader = make()
        n, t0 = 0, time.perf_counter()
        for i, batch in enumerate(loader):
            images, labels = batch[0], batch[1]
            if not torch.isfinite(images).all() or images.shape[0] != labels.shape[0]:
                raise RuntimeError(f"augment check: bad {kind} batch {i}: shape {tuple(images.shape)}")
            n += images.shape[0]
            if i + 1 >= batches:
                break
        rates[kind] = n / (time.perf_counter() - t0)
        log(f"{kind}: {n} images OK, {rates[kind]:.0f} images/s")
    return rates


def run_stage(ctx: StageContext) -> StageResult:
    """DAG entry: the augmentation spec train and evaluate use, checked on a few batches
    of every pipeline kind, with its throughput and a PNG grid of training samples."""
    import io as _io

    from PIL import Image

    from pipeline.config import check_scale_of
    from pipeline.stage import StageResult
    from pipeline.storage import write_bytes, write_json

    from pipeline.storage import exists

    cfg = ctx.section["augment"]
    shard = ctx.inputs["shard"]
    if not exists(shard.fs, shard.join("stats.json")):
        raise FileNotFoundError(
            f"the shard output {shard.uri} has no stats.json (mean RGB and RGB eigen-decomposition); "
            "re-run the shard stage: python pipeline/run.py --stage shard --force"
        )
    spec = spec_from_config(cfg, shard.read_json("stats.json"))
    shards = shard.uri  # a local path or a filesystem URI: read through pyarrow.fs
    scale = check_scale_of(cfg)
    rates = check_pipelines(shards, spec, scale, cfg.check_batches, cfg.check_batch_size, cfg.seed, ctx.log)
    grid = sample_grid(shards, spec, scale, n=16, seed=cfg.seed)
    zoom = max(1, 512 // grid.shape[1])  # small crops: enlarge (nearest) so a person can see them
    buf = _io.BytesIO()
    Image.fromarray(grid.repeat(zoom, 0).repeat(zoom, 1)).save(buf, "PNG")
    write_bytes(ctx.out.fs, ctx.out.join("samples.png"), buf.getvalue())
    write_json(ctx.out.fs, ctx.out.join("spec.json"), spec.to_dict())
    device = "gpu" if resolve_device_id(spec, None) is not None else "cpu"
    return StageResult(
        metrics={f"{k}_images_per_s": v for k, v in rates.items()},
        params={"decoder": "mixed" if device == "gpu" else "cpu", "check_scale": list(scale),
                "mean_rgb": [round(v, 3) for v in spec.mean_rgb]},
        artifacts=["spec.json", "samples.png"],
        manifest={"spec": spec.to_dict(), "check_scale": list(scale), "device": device,
                  "images_per_s": rates},
        summary=f"spec checked on {device}: train {rates['train']:.0f} images/s at S in {list(scale)}",
    )
