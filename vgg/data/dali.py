"""The DALI backend of the loaders (`augment.backend: dali`, the default): training and
evaluation loaders for the paper's augmentation (Sec. 3.1-3.2). Imported only when used
(`vgg.data.loaders.backend`); DALI needs Linux and an NVIDIA CUDA wheel.

DALI is the engine: encoded JPEG bytes enter through ``fn.external_source``
(read from the Parquet shards with pyarrow, `vgg.data.shards`); decoding,
resizing, flipping and normalisation are DALI ops; the per-sample parameters
come from `vgg.data.augmentation`, seeded by (seed, epoch, rank).

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

from collections import deque
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from nvidia.dali.tensors import TensorListCPU

from vgg.data.augmentation import AugmentSpec, center_params, resized_hw, train_params
from vgg.data.sampling import (center_batches, check_eval_loader, check_int, dense_batches, share_bounds,
                               train_batches)
from vgg.data.shards import RowFetcher, ShardIndex, read_sizes, shard_files
from vgg.evaluation.scoring import grid_crops
from vgg.paper import Scale, parse_scale

_INTERP = {"linear": types.INTERP_LINEAR, "cubic": types.INTERP_CUBIC,
           "lanczos3": types.INTERP_LANCZOS3}  # DALI's type of each vgg.data.augmentation filter


# External sources (called by DALI once per batch; must stay cheap)


class _Source:
    """Batch iterator for ``fn.external_source(cycle="raise")``.

    DALI calls ``__iter__`` right after an epoch's StopIteration, before the
    loader knows the next epoch; the pass is therefore started lazily, on the
    first ``__next__`` after a reset, from ``self.epoch``.
    """

    outputs: tuple[str, ...] = ()  # external_source outputs, in order
    extras: tuple[str, ...] = ()  # of those, the ones the pipeline also returns

    def __init__(self, fetcher: RowFetcher, batch_size: int):
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
        plan, self._rng = train_batches(idx.num_rows, self.batch_size, self.rank, self.world_size,
                                        self.seed, epoch, block_sizes=idx.block_sizes,
                                        window_blocks=self.spec.window_blocks)
        return plan

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
        return center_batches(self.fetcher.index.num_rows, self.batch_size, self.rank, self.world_size)

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
        h, w = read_sizes(idx, lo, hi)
        return dense_batches(lo, *resized_hw(h, w, np.full(len(h), self.q)), self.batch_size)

    def make_batch(self, jpegs, labels, h, w, rows) -> list:
        rh, rw = resized_hw(h, w, np.full(len(h), self.q))
        size = np.stack([rh, rw], 1).astype(np.float32)
        mean = np.tile(np.asarray(self.spec.mean_rgb, np.float32), (len(h), 1))
        return [jpegs, size, mean, labels, rows]



# --------------------------------------------------------------------------
# DALI pipelines


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
                           roi_end=x["roi_end"], interp_type=_INTERP[spec.interp],
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
        images = fn.resize(images, size=x["size"], interp_type=_INTERP[spec.interp],
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
    fetcher = RowFetcher(index)
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
            if self.spec.channels_last and self.mode == "center":  # the ROI pipeline's HWC
                images = images.permute(0, 3, 1, 2)  # (B, C, H, W) view, NHWC memory
            elif self.spec.channels_last:  # the whole-image pipeline gives CHW: NHWC memory here
                images = images.contiguous(memory_format=torch.channels_last)
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
    ``device_id``: GPU for "mixed" decoding, None: CPU pipeline (`vgg.data.loaders` resolves
    it from the spec's device).
    """
    check_int("batch_size", batch_size, 1)
    rng_scale = parse_scale(scale, spec.crop)
    share_bounds(1, rank, world_size)  # validates rank/world_size
    index = ShardIndex(shard_files(source, split))
    src = _TrainSource(RowFetcher(index), batch_size, spec, rng_scale, rank, world_size, seed,
                       debug)
    return TrainLoader(src, spec, batch_size, device_id, debug,
                       start_epoch)


def build_eval_loader(source: str | Path | Sequence[str | Path], spec: AugmentSpec, q: int,
                      batch_size: int, *, mode: str = "dense", grid: int = 5,
                      flips: bool = True, rank: int = 0, world_size: int = 1,
                      device_id: int | None = None, split: str = "val") -> EvalLoader:
    """Evaluation loader at test scale Q; mode "dense", "multicrop" or "center".

    Each rank gets a contiguous, unshuffled share; dense/multicrop batches are
    bucketed by rescaled size (a batch may hold fewer than ``batch_size``).
    """
    check_eval_loader(spec.crop, q, batch_size, grid, mode, rank, world_size)
    fetcher = RowFetcher(ShardIndex(shard_files(source, split)), with_keys=True,
                          copy_rows=mode != "center")
    dev = device_id
    if mode == "center":
        src = _CenterSource(fetcher, batch_size, spec, q, rank, world_size)
        return EvalLoader(src, _roi_pipeline, spec, batch_size, dev, mode, grid, flips)
    src = _DenseSource(fetcher, batch_size, spec, q, rank, world_size)
    return EvalLoader(src, _dense_pipeline, spec, batch_size, dev, mode, grid, flips)


def build_center_loader(source, spec: AugmentSpec, q: int, batch_size: int, **kw) -> EvalLoader:
    """Centre crop at scale Q (per-epoch validation; Q = vgg.paper.single_test_scale(S))."""
    return build_eval_loader(source, spec, q, batch_size, mode="center", **kw)
