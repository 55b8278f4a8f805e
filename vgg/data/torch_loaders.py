"""The torch backend of the loaders (`augment.backend: torch`): the paper's augmentation
(Sec. 3.1-3.2) with TorchCodec's decoder and torch ops, wherever PyTorch runs (CPU, NVIDIA, AMD,
Apple). Imported only when used (`vgg.data.loaders.backend`).

The same spec, per-sample parameters and batch plans as the DALI backend
(`vgg.data.dali`): rows come from the Parquet shards through `RowFetcher` in the
order of `share_rows` / `share_bounds`, and S, the crop window (y0, x0) in the
S-rescaled image, the flip and the PCA colour shift from `vgg.data.augmentation`,
drawn from a Generator seeded by (seed, epoch, TAG_PARAMS, rank) batch by batch.
A caller cannot tell the backends apart except by the pixels, which differ by the
resize kernels (DALI's ROI-decoded linear resize vs torch's antialiased bilinear
of the whole image; tests/test_torch_loaders.py states the measured difference).

Per image: `vgg.data.decoding.decode_jpeg` (TorchCodec, libjpeg-turbo; RGB, EXIF
orientation applied, as the shard stage applies it) -> isotropic rescale to (rh, rw) with
`F.interpolate(..., antialias=True)` -> crop (y0, x0, crop) -> flip -> x - (mean - shift),
float32 (B, 3, crop, crop). The whole image is decoded and resized (no ROI decoding:
that is DALI's advantage). On a GPU (device_id given) a batch is decoded at once with
nvJPEG (`decoding.decode_jpegs`) and the rest runs there; on the CPU the images of a
batch are processed by a pool of `spec.num_threads` threads (torch ops and the decoder
release the GIL), `spec.prefetch` batches ahead of the consumer.

Imports: torch, TorchCodec (or torchvision's decoder), numpy and vgg.* only (never
nvidia.dali, ray, mlflow).
"""

from __future__ import annotations

import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vgg.data import decoding
from vgg.data.augmentation import AugmentSpec, resized_hw, train_params
from vgg.data.sampling import (center_batches, check_eval_loader, check_int, dense_batches, share_bounds,
                               train_batches)
from vgg.data.shards import RowFetcher, ShardIndex, read_sizes, shard_files
from vgg.evaluation.scoring import grid_crops
from vgg.paper import Scale, parse_scale

# spec.interp -> F.interpolate mode. torch has no Lanczos filter: "lanczos3" runs as
# antialiased bicubic (the closest torch kernel; pixels differ slightly from DALI's).
_MODES = {"linear": "bilinear", "cubic": "bicubic", "lanczos3": "bicubic"}


# --------------------------------------------------------------------------
# Batch plans (which rows, in which order, per batch): vgg.data.sampling's, as DALI's


def train_plan(index: ShardIndex, batch_size: int, rank: int, world_size: int, seed: int,
               epoch: int, window_blocks: int) -> tuple[list[np.ndarray], np.random.Generator]:
    """`vgg.data.sampling.train_batches` over the shards' row groups."""
    return train_batches(index.num_rows, batch_size, rank, world_size, seed, epoch,
                         block_sizes=index.block_sizes, window_blocks=window_blocks)


def center_plan(index: ShardIndex, batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    return center_batches(index.num_rows, batch_size, rank, world_size)


def dense_plan(index: ShardIndex, batch_size: int, q: int, rank: int,
               world_size: int) -> list[np.ndarray]:
    """`vgg.data.sampling.dense_batches` of rank's share at shorter side Q."""
    lo, hi = share_bounds(index.num_rows, rank, world_size)
    h, w = read_sizes(index, lo, hi)
    return dense_batches(lo, *resized_hw(h, w, np.full(len(h), q)), batch_size)


# --------------------------------------------------------------------------
# Image ops


def _as_tensor(jpeg: np.ndarray) -> torch.Tensor:
    """uint8 CPU tensor of the encoded bytes (read-only Arrow views are copied: cheap)."""
    return torch.from_numpy(jpeg if jpeg.flags.writeable else jpeg.copy())


def rescale(img: torch.Tensor, size: tuple[int, int], interp: str) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, rh, rw) uint8, antialiased (isotropic when size is from
    `resized_hw`). Rounded to uint8 like DALI's resize of uint8 images."""
    mode = _MODES[interp]
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    if img.device.type == "cpu" and mode == "bilinear":  # torch's fast uint8 kernel (AVX2)
        return F.interpolate(img[None], size=size, mode=mode, antialias=True,
                             align_corners=False)[0]
    out = F.interpolate(img[None].float(), size=size, mode=mode, antialias=True,
                        align_corners=False)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _window(img: torch.Tensor, y0: int, x0: int, crop: int, mirror: bool,
            mean: torch.Tensor) -> torch.Tensor:
    """crop x crop window at (y0, x0), flipped if mirror, minus mean: float32 (3, crop, crop)."""
    win = img[:, y0:y0 + crop, x0:x0 + crop]
    if mirror:
        win = win.flip(-1)
    return win.float() - mean[:, None, None]


# --------------------------------------------------------------------------
# Loaders


class _Loader:
    """Runs a plan: fetches each batch's rows (in order, on the caller's thread), and
    processes it on the GPU or in a thread pool, `spec.prefetch` batches ahead."""

    def __init__(self, fetcher: RowFetcher, spec: AugmentSpec, batch_size: int,
                 device_id: int | None, rank: int, world_size: int):
        self.fetcher, self.spec, self.batch_size = fetcher, spec, batch_size
        self.device_id, self.rank, self.world_size = device_id, rank, world_size
        self.device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        self._pool: ThreadPoolExecutor | None = None
        self._gpu_decode = True  # False after batched GPU decoding proved unavailable
        idx = fetcher.index
        self.num_samples = int(np.diff(share_bounds(idx.num_rows, rank, world_size))[0])

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.spec.num_threads,
                                            thread_name_prefix="vgg-torch-augment")
        return self._pool

    def _decode(self, jpegs: list, rows: np.ndarray) -> list[torch.Tensor]:
        """RGB uint8 (3, h, w) images of a batch on the device (GPU: one batched call).

        Where batched GPU decoding fails although every image decodes on the CPU (a GPU
        build of torch without nvJPEG, e.g. ROCm), the batch is decoded on the CPU and
        moved to the device, and so are later batches (with a warning, once)."""
        data = [_as_tensor(j) for j in jpegs]
        if self.device.type == "cuda" and self._gpu_decode:
            try:
                return decoding.decode_jpegs(data, self.device)
            except Exception as exc:  # noqa: BLE001 - undecodable bytes or no GPU decoder
                imgs = [self._decode_one(d, r) for d, r in zip(data, rows.tolist())]
                self._gpu_decode = False
                warnings.warn(f"augment: GPU JPEG decoding failed ({exc}); decoding on the "
                              f"CPU and moving the images to {self.device}", RuntimeWarning)
                return [img.to(self.device) for img in imgs]
        imgs = [self._decode_one(d, r) for d, r in zip(data, rows.tolist())]
        return [img.to(self.device) for img in imgs]

    def _decode_one(self, data: torch.Tensor, row: int) -> torch.Tensor:
        try:
            return decoding.decode_jpeg(data)
        except Exception as exc:  # noqa: BLE001 - undecodable bytes: say where they are
            f, r = self.fetcher.index.locate(row)
            raise RuntimeError(f"augment: undecodable sample: shard file {f} row {r}: "
                               f"{exc}") from exc

    def _run(self, plan: list[np.ndarray], make: Callable) -> Iterator[tuple]:
        """Yield (images, labels, rows, extra) per batch of the plan.

        ``make(jpegs, labels, h, w, rows)`` runs on this thread in plan order (it draws
        the random parameters) and returns (one, assemble, extra): ``one(i, image)``
        turns the i-th decoded image into its output (rescale, crop, ...),
        ``assemble(outputs)`` makes the batch. On the CPU each image (decode + ``one``)
        is a task of the pool, up to ``spec.prefetch`` batches ahead; on a GPU the
        batch is decoded at once and the ops are queued on the stream.
        """
        self.fetcher.plan(np.concatenate(plan) if plan else np.zeros(0, np.int64))
        ahead = self.spec.prefetch if self.device.type == "cpu" else 0
        pending: deque = deque()
        for rows in plan:
            jpegs, labels, h, w = self.fetcher.fetch(rows)
            one, assemble, extra = make(jpegs, labels, h, w, rows)
            if ahead:
                pool = self._executor()
                outs = [pool.submit(self._process, one, i, _as_tensor(j), r)
                        for i, (j, r) in enumerate(zip(jpegs, rows.tolist()))]
            else:
                outs = [one(i, img) for i, img in enumerate(self._decode(jpegs, rows))]
            labels = torch.from_numpy(np.asarray(labels, np.int64)).to(self.device)
            pending.append((outs, assemble, labels, rows, extra))
            while len(pending) > ahead:
                yield self._done(*pending.popleft())
        while pending:
            yield self._done(*pending.popleft())

    def _process(self, one: Callable, i: int, data: torch.Tensor, row: int) -> torch.Tensor:
        return one(i, self._decode_one(data, row))

    @staticmethod
    def _done(outs, assemble, labels, rows, extra) -> tuple:
        outs = [o.result() if isinstance(o, Future) else o for o in outs]
        return assemble(outs), labels, rows, extra


class TrainLoader(_Loader):
    """Per-worker training loader. ``loader.epoch(e)`` yields (images, labels);
    with ``debug=True`` it yields (images, labels, info) where info holds the
    per-sample ``scale`` (S applied), ``shift`` (RGB colour shift, 0-255),
    crop window ``y0``/``x0`` in the S-rescaled image, ``mirror`` and ``row``.

    images: float32 (B, 3, crop, crop) (channels_last memory format if the spec
    says so), labels: int64 (B,). The last batch of an epoch may be partial.
    (As `vgg.data.dali.TrainLoader`.)
    """

    def __init__(self, fetcher: RowFetcher, spec: AugmentSpec, scale: tuple[int, int],
                 batch_size: int, rank: int, world_size: int, seed: int,
                 device_id: int | None, debug: bool, start_epoch: int):
        super().__init__(fetcher, spec, batch_size, device_id, rank, world_size)
        self.scale, self.seed, self.debug = scale, seed, debug
        self.next_epoch = start_epoch

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple]:
        """Iterate one epoch (deterministic order and augmentation for (seed, epoch, rank))."""
        self.next_epoch = epoch + 1
        plan, rng = train_plan(self.fetcher.index, self.batch_size, self.rank,
                               self.world_size, self.seed, epoch, self.spec.window_blocks)
        spec = self.spec

        def make(jpegs, labels, h, w, rows):
            p = train_params(rng, h, w, self.scale, spec)
            rh, rw = resized_hw(h, w, p["scale"])
            mean = torch.from_numpy(p["mean"]).to(self.device)  # mean - shift, per image

            def one(i: int, img: torch.Tensor) -> torch.Tensor:
                img = rescale(img, (int(rh[i]), int(rw[i])), spec.interp)
                return _window(img, int(p["y0"][i]), int(p["x0"][i]), spec.crop,
                               bool(p["mirror"][i]), mean[i])

            def assemble(outs: list[torch.Tensor]) -> torch.Tensor:
                out = torch.stack(outs)
                if spec.channels_last:
                    out = out.contiguous(memory_format=torch.channels_last)
                return out

            info = None
            if self.debug:
                info = {k: torch.from_numpy(p[k]) for k in ("scale", "y0", "x0", "mirror")}
                info["row"] = torch.from_numpy(np.asarray(rows, np.int64))
                info["shift"] = torch.from_numpy(p["shift"])  # (B, 3) RGB shift, 0-255
            return one, assemble, info

        for images, labels, _, info in self._run(plan, make):
            yield (images, labels, info) if self.debug else (images, labels)

    def __iter__(self) -> Iterator[tuple]:
        return self.epoch(self.next_epoch)


class EvalLoader(_Loader):
    """Evaluation loader at test scale Q, modes center / dense / multicrop; yields exactly
    what `vgg.data.dali.EvalLoader` yields (see there)."""

    def __init__(self, fetcher: RowFetcher, spec: AugmentSpec, q: int, batch_size: int,
                 rank: int, world_size: int, device_id: int | None, mode: str, grid: int,
                 flips: bool):
        super().__init__(fetcher, spec, batch_size, device_id, rank, world_size)
        self.q, self.mode, self.grid, self.flips = q, mode, grid, flips
        self._plan: list[np.ndarray] | None = None

    def plan(self) -> list[np.ndarray]:
        if self._plan is None:
            idx = self.fetcher.index
            self._plan = (center_plan(idx, self.batch_size, self.rank, self.world_size)
                          if self.mode == "center" else
                          dense_plan(idx, self.batch_size, self.q, self.rank, self.world_size))
        return self._plan

    def __len__(self) -> int:
        return len(self.plan())

    def _make(self, jpegs, labels, h, w, rows):
        spec, crop = self.spec, self.spec.crop
        rh, rw = resized_hw(h, w, np.full(len(h), self.q))
        mean = torch.tensor(spec.mean_rgb, dtype=torch.float32, device=self.device)
        y0, x0 = (rh - crop) // 2, (rw - crop) // 2  # the window of augmentation.center_params

        def one(i: int, img: torch.Tensor) -> torch.Tensor:
            img = rescale(img, (int(rh[i]), int(rw[i])), spec.interp)
            if self.mode == "center":
                return _window(img, int(y0[i]), int(x0[i]), crop, False, mean)
            return img

        def assemble(outs: list[torch.Tensor]) -> torch.Tensor:
            if self.mode == "center":
                out = torch.stack(outs)
                if spec.channels_last:
                    out = out.contiguous(memory_format=torch.channels_last)
                return out
            out = torch.stack(outs).float() - mean[None, :, None, None]  # one (H, W) per batch
            if self.mode == "multicrop":
                out = grid_crops(out, crop, self.grid, self.flips)
            return out

        return one, assemble, None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        keys = self.fetcher.keys
        for images, labels, rows, _ in self._run(self.plan(), self._make):
            yield images, labels, [keys.pop(r) for r in rows.tolist()]


# --------------------------------------------------------------------------
# Builders (public API; the signatures of vgg.data.dali's)


def build_train_loader(source: str | Path | Sequence[str | Path], spec: AugmentSpec,
                       scale: Scale, batch_size: int, *, rank: int = 0, world_size: int = 1,
                       seed: int = 0, device_id: int | None = None, start_epoch: int = 0,
                       split: str = "train", debug: bool = False) -> TrainLoader:
    """Training loader for worker ``rank`` of ``world_size`` at scale S or (Smin, Smax).

    ``source``: a shard dir (reads ``<dir>/<split>/*.parquet``) or Parquet files.
    ``device_id``: GPU for decoding and augmentation (None and no CUDA: CPU).
    """
    check_int("batch_size", batch_size, 1)
    rng_scale = parse_scale(scale, spec.crop)
    share_bounds(1, rank, world_size)  # validates rank/world_size
    fetcher = RowFetcher(ShardIndex(shard_files(source, split)))
    return TrainLoader(fetcher, spec, rng_scale, batch_size, rank, world_size, seed,
                       device_id, debug, start_epoch)


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
    return EvalLoader(fetcher, spec, q, batch_size, rank, world_size,
                      device_id, mode, grid, flips)


def build_center_loader(source, spec: AugmentSpec, q: int, batch_size: int, **kw) -> EvalLoader:
    """Centre crop at scale Q (per-epoch validation; Q = vgg.paper.single_test_scale(S))."""
    return build_eval_loader(source, spec, q, batch_size, mode="center", **kw)
