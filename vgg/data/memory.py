"""A split held decoded in (GPU) memory, augmented there (paper Sec. 3.1-3.2): the loaders
of a dataset small enough to decode once (Imagenette at 128 px: 0.56 GB), so that the
training step rate is the model's, not the decoder's.

- `ImageStore`: the decoded images of one split on a device, ragged (no padding): one flat
  uint8 buffer of all pixels (HWC interleaved, image after image) with per-image offsets,
  heights and widths; labels and keys. Decoded with TorchCodec (`vgg.data.decoding`:
  nvJPEG batched on a GPU, libjpeg-turbo on the CPU; EXIF orientation applied).
- `sample_windows`: a batched bilinear sampler of arbitrary per-image source coordinates
  (gathers from the flat buffer; no per-image Python loop). A window of the image rescaled
  from (h, w) to (rh, rw) samples the source at (y0 + i + 0.5) * h / rh - 0.5, clamped at
  the edges: `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`
  followed by a crop, without computing the rescaled image.
- `MemoryTrainLoader`, `MemoryEvalLoader`: the interface of the DALI backend's loaders
  (`vgg.data.dali.TrainLoader`, `EvalLoader`) with the same rows in the same order and the
  same per-sample parameters (`vgg.data.augmentation.train_params` / `center_params`,
  seeded by (seed, epoch, TAG_PARAMS, rank); `vgg.data.sampling.share_rows`).

One difference from DALI: the resize is plain bilinear, not antialiased, so a rescale that
shrinks the image (S below its shorter side) aliases where DALI's filter would widen.
Imports torch, TorchCodec (or torchvision's decoder), numpy, PIL and PyTorch-only `vgg`
modules (no pyarrow/DALI).
"""

from __future__ import annotations

import io
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from vgg.data import decoding
from vgg.data.augmentation import AugmentSpec, resized_hw, train_params
from vgg.data.folders import list_image_folder, subsample
from vgg.data.sampling import (center_batches, check_eval_loader, check_int, dense_batches, share_bounds, share_rows,
                               train_batches)
from vgg.data.statistics import rgb_statistics
from vgg.evaluation.scoring import grid_crops
from vgg.paper import Scale, parse_scale


# --------------------------------------------------------------------------
# The store


class ImageStore:
    """Decoded 8-bit RGB images of one split on one device, ragged.

    ``pixels``: uint8 (sum of h*w*3,), image i at ``pixels[offsets[i]:offsets[i] + h*w*3]``
    as (h, w, 3) row-major; ``offsets``, ``heights``, ``widths``, ``labels``: int64 (N,) on
    the device; ``keys``: N strings. Host copies of the sizes (``h_np``, ``w_np``) plan
    batches without a device sync.
    """

    def __init__(self, pixels: torch.Tensor, heights, widths, labels, keys: Sequence[str]):
        self.h_np = np.asarray(heights, np.int64).reshape(-1)
        self.w_np = np.asarray(widths, np.int64).reshape(-1)
        n = len(self.h_np)
        if len(self.w_np) != n or len(keys) != n or len(labels) != n:
            raise ValueError("heights, widths, labels and keys must have one entry per image")
        sizes = self.h_np * self.w_np * 3
        if pixels.dtype != torch.uint8 or pixels.dim() != 1 or pixels.numel() != int(sizes.sum()):
            raise ValueError(f"pixels must be a flat uint8 tensor of {int(sizes.sum())} values, "
                             f"got {pixels.dtype} {tuple(pixels.shape)}")
        dev = pixels.device
        self.pixels = pixels
        self.device = dev
        off = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.offsets = torch.from_numpy(off).to(dev)
        self.heights = torch.from_numpy(self.h_np.copy()).to(dev)
        self.widths = torch.from_numpy(self.w_np.copy()).to(dev)
        self.labels = torch.as_tensor(np.asarray(labels, np.int64)).to(dev)
        self.keys = list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_pixels(self) -> int:
        return int((self.h_np * self.w_np).sum())

    @property
    def nbytes(self) -> int:
        """Bytes of the pixel buffer (total pixels x 3)."""
        return self.pixels.numel()

    def image(self, i: int) -> torch.Tensor:
        """Image i as a (h, w, 3) uint8 view."""
        h, w = int(self.h_np[i]), int(self.w_np[i])
        o = int(self.offsets[i])
        return self.pixels[o:o + h * w * 3].view(h, w, 3)

    @classmethod
    def from_files(cls, paths: Sequence[str], labels: Sequence[int], keys: Sequence[str],
                   device: str | torch.device = "cpu", batch: int = 256,
                   progress: Callable[[int], None] | None = None,
                   problems: list[tuple[str, str, str]] | None = None) -> "ImageStore":
        """Decode image files into a store on ``device``: 8-bit RGB, EXIF orientation applied.

        JPEGs (RGB, grey, CMYK) go through `vgg.data.decoding` (TorchCodec): on a CUDA
        device nvJPEG, ``batch`` files per call (a batch it refuses is decoded on the CPU);
        on the CPU libjpeg-turbo. Other formats (PNG, ...) through PIL and the shard stage's
        conversion (`decoding.to_8bit_rgb`). The sizes are read from the file headers first
        (PIL), so the buffer is allocated once: peak memory is the store plus one batch.
        ``progress(done)`` is called after each batch.

        A file that does not decode (empty, truncated, not an image): ValueError naming it;
        or, with ``problems`` a list, it is left out and ``(key, "skipped", reason)``
        appended. With ``problems``, a file the shard stage would convert (not an RGB JPEG,
        or EXIF-rotated) adds ``(key, "converted", reason)``; the reasons are the shard
        stage's (its skipped.csv / converted.csv), the pixels its conversion's without the
        JPEG re-encoding.
        """
        check_int("batch", batch, 1)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        n = len(paths)
        if len(labels) != n or len(keys) != n:
            raise ValueError("paths, labels and keys must have the same length")

        def bad(i: int, reason: str) -> None:
            if problems is None:
                raise ValueError(f"{paths[i]}: {reason}")
            problems.append((keys[i], "skipped", reason))

        rows, data, hw, jpeg = [], [], [], []  # of the files whose header reads
        for i, p in enumerate(paths):
            try:
                with open(p, "rb") as f:
                    b = f.read()
                h, w, is_jpeg, note = _probe(b)
            except (OSError, ValueError) as e:
                bad(i, str(e))
                continue
            if note and problems is not None:
                problems.append((keys[i], "converted", note))
            rows.append(i)
            data.append(torch.frombuffer(bytearray(b), dtype=torch.uint8))
            hw.append((h, w))
            jpeg.append(is_jpeg)
        hw = np.asarray(hw, np.int64).reshape(-1, 2)
        pixels = torch.empty(int((hw[:, 0] * hw[:, 1]).sum()) * 3, dtype=torch.uint8, device=device)
        kept, pos = [], 0
        for lo in range(0, len(rows), batch):
            hi = min(len(rows), lo + batch)
            for j, img in zip(range(lo, hi), _decode(data[lo:hi], jpeg[lo:hi], device)):
                data[j] = None  # the encoded bytes are no longer needed
                h, w = int(hw[j, 0]), int(hw[j, 1])
                if isinstance(img, torch.Tensor) and tuple(img.shape) != (3, h, w):
                    img = f"decoded to {tuple(img.shape)}, its header says {h}x{w} RGB"
                if isinstance(img, str):
                    bad(rows[j], img)
                    continue
                pixels[pos:pos + h * w * 3].view(h, w, 3).copy_(img.permute(1, 2, 0))
                pos += h * w * 3
                kept.append(j)
            if progress is not None:
                progress(rows[hi - 1] + 1 if hi < len(rows) else n)
        if not rows and progress is not None:
            progress(n)
        return cls(pixels[:pos], hw[kept, 0], hw[kept, 1], [labels[rows[j]] for j in kept],
                   [keys[rows[j]] for j in kept])


def _probe(b: bytes) -> tuple[int, int, bool, str]:
    """From the header (PIL): (h, w) once upright, whether it is a JPEG, and the shard
    stage's conversion note ("" for an RGB JPEG without rotation). ValueError: not an image."""
    if not b:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(b)) as im:
            fmt, mode = im.format, im.mode
            h, w = decoding.upright_hw(im)
            orientation = im.getexif().get(0x0112, 1) if fmt in ("JPEG", "MPO") else 1
    except Exception as e:  # PIL raises many types for bad data
        raise ValueError(f"not a decodable image: {type(e).__name__}: {e}") from None
    if fmt == "JPEG" and mode == "RGB" and orientation in (0, 1):
        return h, w, True, ""
    note = f"{fmt} {mode}" + (f" EXIF orientation {orientation}" if orientation not in (0, 1) else "")
    return h, w, fmt in ("JPEG", "MPO"), f"converted from {note}"


def _decode(data: list[torch.Tensor], jpeg: list[bool], device: torch.device) -> list[torch.Tensor | str]:
    """(3, h, w) uint8 RGB on ``device`` per file, or why it does not decode (see from_files)."""
    out: list = [None] * len(data)
    if device.type == "cuda":
        idx = [i for i, j in enumerate(jpeg) if j]
        try:
            for i, img in zip(idx, decoding.decode_jpegs([data[i] for i in idx], device) if idx else []):
                out[i] = img
        except RuntimeError:
            pass  # a file nvJPEG refuses: this batch's JPEGs on the CPU (names the bad one)
    for i, (d, j) in enumerate(zip(data, jpeg)):
        if out[i] is None:
            out[i] = _decode_cpu(d, j)
            if isinstance(out[i], torch.Tensor):
                out[i] = out[i].to(device)
    return out


def _decode_cpu(data: torch.Tensor, jpeg: bool) -> torch.Tensor | str:
    try:
        if jpeg:
            return decoding.decode_jpeg(data)
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            return torch.from_numpy(np.array(decoding.to_8bit_rgb(im))).permute(2, 0, 1)
    except Exception as e:  # noqa: BLE001 - the decoders raise RuntimeError, PIL many types
        return f"not a decodable image: {type(e).__name__}: {e}"


def folder_stores(root: str, device: str | torch.device = "cpu", batch: int = 256,
                  progress: Callable[[str, int, int], None] | None = None,
                  per_class: dict[str, int | None] | None = None, seed: int = 0,
                  problems: list[tuple[str, str, str]] | None = None
                  ) -> tuple[list[str], ImageStore, ImageStore]:
    """(classes, train store, val store) of an image folder `<root>/{train,val}/<class>/*`
    (`vgg.data.folders.list_image_folder`: rows sorted by key, labels = class index in
    sorted class order; at most per_class[split] images of each class, the shard stage's
    seeded subset). ``progress(split, done, total)`` after each decoded batch.

    ``problems``: None, and a file that does not decode raises ValueError naming it; or a
    list, and such files are left out: ``(key, "skipped" | "converted", reason)`` is
    appended per file left out or converted (`ImageStore.from_files`), and per entry the
    listing left out (files outside class folders, ...), as the shard stage's skipped.csv
    and converted.csv list them.
    """
    listing = subsample(list_image_folder(root), per_class or {}, seed)
    if problems is not None:
        problems.extend((k, "skipped", why) for k, why in listing.skipped)
    index = {c: i for i, c in enumerate(listing.classes)}
    stores = []
    for split in ("train", "val"):
        rows = listing.files[split]
        cb = None if progress is None else (lambda d, s=split, t=len(rows): progress(s, d, t))
        stores.append(ImageStore.from_files([p for _, p, _ in rows], [index[c] for _, _, c in rows],
                                            [k for k, _, _ in rows], device, batch, cb, problems))
    return listing.classes, stores[0], stores[1]


def rgb_stats(store: ImageStore, chunk: int = 1 << 22) -> dict:
    """The shard stage's RGB statistics (`vgg.data.statistics.rgb_statistics`: mean RGB, covariance,
    its eigen-decomposition) of the store's pixels, with the exact integer pixel sums computed
    on the store's device in int64, ``chunk`` pixels at a time."""
    px = store.pixels.view(-1, 3)
    total = torch.zeros(3, dtype=torch.int64, device=store.device)
    outer = torch.zeros(3, 3, dtype=torch.int64, device=store.device)
    pairs = [(a, b) for a in range(3) for b in range(a, 3)]
    for lo in range(0, px.shape[0], chunk):
        c = px[lo:lo + chunk].T.to(torch.int32)  # (3, n); a product of two 8-bit values fits
        total += c.sum(1, dtype=torch.int64)
        for a, b in pairs:
            outer[a, b] += (c[a] * c[b]).sum(dtype=torch.int64)
    outer = torch.triu(outer) + torch.triu(outer, 1).T
    return rgb_statistics(store.num_pixels, total.cpu().numpy().astype(np.float64),
                          outer.cpu().numpy().ravel().astype(np.float64))


# --------------------------------------------------------------------------
# The sampler


def _taps(src: torch.Tensor, size: torch.Tensor):
    """Bilinear taps along one axis from source coordinates ``src`` (B, n) as torch's
    upsample_bilinear2d takes them: coordinates below 0 clamp to 0, the upper tap clamps to
    size - 1. Returns (i0, i1, weight of i1 as float32)."""
    src = src.clamp_min(0)
    last = (size - 1)[:, None]
    i0 = torch.minimum(src.floor().long(), last)
    i1 = torch.minimum(i0 + 1, last)
    lam1 = (src - i0.to(src.dtype)).clamp(0, 1).to(torch.float32)
    return i0, i1, lam1


def window_taps(start: torch.Tensor, size: torch.Tensor, rsize: torch.Tensor, n: int,
                mirror: torch.Tensor | None = None):
    """Taps (see `_taps`) of the window [start, start + n) of an axis rescaled from ``size``
    to ``rsize`` (each (B,) int), reversed where ``mirror``, in exact integer arithmetic:
    src = (dst + 0.5) * size / rsize - 0.5 = N / D with N = (2 dst + 1) size - rsize,
    D = 2 rsize; only the weight N mod D / D is rounded (to float32)."""
    k = torch.arange(n, device=start.device, dtype=torch.int64)
    if mirror is not None:
        k = torch.where(mirror.bool()[:, None], n - 1 - k, k)
    dst = start.to(torch.int64)[:, None] + k
    size, rsize = size.to(torch.int64)[:, None], rsize.to(torch.int64)[:, None]
    num, den = (2 * dst + 1) * size - rsize, 2 * rsize
    i0 = torch.div(num, den, rounding_mode="floor")
    lam1 = (num - i0 * den).to(torch.float32) / den.to(torch.float32)
    neg = num < 0  # src < 0 clamps to pixel 0
    i0, lam1 = i0.clamp_min(0), lam1.masked_fill(neg, 0.0)
    i0 = torch.minimum(i0, size - 1)
    return i0, torch.minimum(i0 + 1, size - 1), lam1


def window_coords(start: torch.Tensor, size: torch.Tensor, rsize: torch.Tensor, n: int,
                  mirror: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n) float64 source coordinates (y0 + i + 0.5) * h / rh - 0.5 of the window
    [start, start + n) of an axis rescaled from ``size`` to ``rsize`` (each (B,)), reversed
    where ``mirror``: the input of `sample_windows` (float64: torch's float32 interpolate
    rounds h / rh and is off the exact resize by up to ~3e-3 at 128 -> 250 px)."""
    k = torch.arange(n, device=start.device, dtype=torch.int64)
    if mirror is not None:
        k = torch.where(mirror.bool()[:, None], n - 1 - k, k)
    dst = (start.to(torch.int64)[:, None] + k).to(torch.float64)
    return (dst + 0.5) * size.to(torch.float64)[:, None] / rsize.to(torch.float64)[:, None] - 0.5


def _sample_hwc(store: ImageStore, idx: torch.Tensor, ytaps, xtaps) -> torch.Tensor:
    """(B, Ho, Wo, 3) float32 bilinear samples of images idx at the taps of each axis."""
    (y0, y1, ly), (x0, x1, lx) = ytaps, xtaps
    b, ho, wo = idx.shape[0], y0.shape[1], x0.shape[1]
    w = store.widths[idx][:, None]
    base = (store.offsets[idx] // 3)[:, None]  # pixel index of each image's first pixel
    r0, r1 = base + y0 * w, base + y1 * w  # (B, Ho)
    px = store.pixels.view(-1, 3)

    def gather(r, x):  # (B, Ho, Wo, 3) float32
        i = (r[:, :, None] + x[:, None, :]).reshape(-1)
        return px.index_select(0, i).view(b, ho, wo, 3).to(torch.float32)

    lx1, ly1 = lx[:, None, :, None], ly[:, :, None, None]
    lx0, ly0 = 1 - lx1, 1 - ly1
    top = gather(r0, x0).mul_(lx0).add_(gather(r0, x1).mul_(lx1)).mul_(ly0)
    bot = gather(r1, x0).mul_(lx0).add_(gather(r1, x1).mul_(lx1)).mul_(ly1)
    return top.add_(bot)


def sample_windows(store: ImageStore, idx: torch.Tensor, y_src: torch.Tensor,
                   x_src: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of images ``idx`` (B,) at source rows ``y_src`` (B, Ho) x source
    columns ``x_src`` (B, Wo) (pixel-centre coordinates, edge-clamped like
    ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``): (B, 3, Ho, Wo)
    float32 on the store's device, 0-255 scale. For the window (y0, x0) of the image rescaled
    from (h, w) to (rh, rw): ``y_src[b, i] = (y0 + i + 0.5) * h / rh - 0.5`` (`window_coords`).
    Coordinates are used in their dtype (pass float64 for exactness); weights are float32."""
    idx = idx.to(store.device, torch.int64)
    ytaps = _taps(y_src.to(store.device), store.heights[idx])
    xtaps = _taps(x_src.to(store.device), store.widths[idx])
    return _sample_hwc(store, idx, ytaps, xtaps).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------
# Loaders


class _Uploader:
    """One host -> device copy per batch of the per-sample parameters: int64 columns and
    float32 columns packed into one byte buffer (pinned and asynchronous on CUDA, a ring of
    buffers, each reused only after its copy has completed)."""

    def __init__(self, device: torch.device, slots: int = 4):
        self.device, self.slots = device, slots
        self._ring: list[tuple[torch.Tensor, torch.cuda.Event] | None] = [None] * slots
        self._k = 0

    def __call__(self, ints: np.ndarray, floats: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ints = np.ascontiguousarray(ints, np.int64)
        floats = np.ascontiguousarray(floats, np.float32)
        buf = np.concatenate([ints.view(np.uint8).reshape(-1), floats.view(np.uint8).reshape(-1)])
        if self.device.type == "cuda":
            slot = self._ring[self._k]
            if slot is None or slot[0].numel() < buf.size:
                slot = (torch.empty(max(buf.size, 4096), dtype=torch.uint8).pin_memory(),
                        torch.cuda.Event())
                self._ring[self._k] = slot
            host, event = slot
            event.synchronize()  # the previous copy out of this buffer is done
            host[:buf.size].numpy()[:] = buf
            dev = host[:buf.size].to(self.device, non_blocking=True)
            event.record()
            self._k = (self._k + 1) % self.slots
        else:
            dev = torch.from_numpy(buf).to(self.device)
        ni = ints.size * 8
        return (dev[:ni].view(torch.int64).view(ints.shape),
                dev[ni:].view(torch.float32).view(floats.shape))


def _finish(out: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(B, H, W, 3) -> (B, 3, H, W): a view in channels_last memory, or contiguous NCHW."""
    out = out.permute(0, 3, 1, 2)
    return out if channels_last else out.contiguous()


def _windows(store: ImageStore, ints: torch.Tensor, floats: torch.Tensor, crop: int) -> torch.Tensor:
    """(B, crop, crop, 3) windows minus per-image means. ints columns: row, h, w, rh, rw,
    y0, x0, mirror; floats: the 3 values subtracted."""
    row, h, w, rh, rw, y0, x0, mirror = ints.unbind(1)
    ytaps = window_taps(y0, h, rh, crop)
    xtaps = window_taps(x0, w, rw, crop, mirror)
    return _sample_hwc(store, row, ytaps, xtaps).sub_(floats[:, None, None, :])


class MemoryTrainLoader:
    """Training loader over an `ImageStore`, interchangeable with `vgg.data.dali.TrainLoader`:
    ``loader.epoch(e)`` yields (images, labels), or (images, labels, info) with ``debug``
    (info: ``scale``, ``y0``, ``x0``, ``mirror``, ``row`` (B,), ``shift`` (B, 3), on the CPU).

    Per epoch: rows = ``share_rows(n, rank, world_size, seed, e, block_sizes=[n],
    window_blocks=spec.window_blocks)``, i.e. the whole split is ONE block (a full shuffle;
    the Parquet backend shuffles within windows of row groups), rank's contiguous chunk of
    it; batches of ``batch_size`` (the last may be partial); per batch
    ``train_params(np.random.default_rng([seed, e, TAG_PARAMS, rank]), h, w, scale, spec)``
    (one generator per epoch, drawn batch after batch, as the DALI source does). images:
    float32 (B, 3, crop, crop) on the store's device = the window (y0, x0) of the image
    rescaled to shorter side S, mirrored if ``mirror``, minus (mean - shift); channels_last
    memory if ``spec.channels_last``. labels: int64 (B,) on the store's device.
    """

    def __init__(self, store: ImageStore, spec: AugmentSpec, scale: Scale, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, start_epoch: int = 0,
                 debug: bool = False):
        check_int("batch_size", batch_size, 1)
        self.scale = parse_scale(scale, spec.crop)
        lo, hi = share_bounds(len(store), rank, world_size)  # validates rank/world_size
        self.store, self.spec, self.batch_size = store, spec, batch_size
        self.rank, self.world_size, self.seed, self.debug = rank, world_size, seed, debug
        self.next_epoch = start_epoch
        self.num_samples = hi - lo
        self._upload = _Uploader(store.device)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def rows(self, epoch: int) -> np.ndarray:
        """The store rows this rank reads in ``epoch``, in order."""
        n = len(self.store)
        return share_rows(n, self.rank, self.world_size, self.seed, epoch, block_sizes=[n],
                          window_blocks=self.spec.window_blocks)

    def epoch(self, epoch: int) -> Iterator[tuple]:
        """Iterate one epoch (deterministic order and augmentation for (seed, epoch, rank))."""
        self.next_epoch = epoch + 1
        st, spec = self.store, self.spec
        n = len(st)
        plan, rng = train_batches(n, self.batch_size, self.rank, self.world_size, self.seed, epoch,
                                  block_sizes=[n], window_blocks=spec.window_blocks)
        for r in plan:
            h, w = st.h_np[r], st.w_np[r]
            p = train_params(rng, h, w, self.scale, spec)
            rh, rw = resized_hw(h, w, p["scale"])
            ints = np.stack([r, h, w, rh, rw, p["y0"], p["x0"], p["mirror"]], 1)
            ints, floats = self._upload(ints, p["mean"])
            images = _finish(_windows(st, ints, floats, spec.crop), spec.channels_last)
            labels = st.labels[ints[:, 0]]
            if self.debug:
                info = {k: torch.from_numpy(np.ascontiguousarray(p[k]))
                        for k in ("scale", "y0", "x0", "mirror", "shift")}
                info["row"] = torch.from_numpy(np.asarray(r, np.int64))
                yield images, labels, info
            else:
                yield images, labels

    def __iter__(self) -> Iterator[tuple]:
        return self.epoch(self.next_epoch)


class MemoryEvalLoader:
    """Evaluation loader over an `ImageStore` at test scale Q, interchangeable with
    `vgg.data.dali.EvalLoader`; each iteration is one pass over rank's contiguous share.

    mode "center": (images (B, 3, crop, crop), labels, keys): the centre window of the image
    rescaled to shorter side Q (`center_params`), minus the mean (channels_last memory if the
    spec says so);
    mode "dense": (images (B, 3, H, W), labels, keys): the whole image rescaled to shorter
    side Q minus the mean, one (H, W) per batch: rows walk the share in order into per-size
    buckets, a bucket is emitted when full, partial ones at the end (the DALI dense plan);
    mode "multicrop": (crops (B, n, 3, crop, crop), labels, keys): `grid_crops` of the dense
    image (g*g windows, row-major, then their flips if ``flips``).
    """

    def __init__(self, store: ImageStore, spec: AugmentSpec, q: int, batch_size: int,
                 mode: str = "center", grid: int = 5, flips: bool = True, rank: int = 0,
                 world_size: int = 1):
        check_eval_loader(spec.crop, q, batch_size, grid, mode, rank, world_size)
        lo, hi = share_bounds(len(store), rank, world_size)
        self.store, self.spec, self.q, self.batch_size = store, spec, q, batch_size
        self.mode, self.grid, self.flips = mode, grid, flips
        self.rank, self.world_size = rank, world_size
        self.num_samples = hi - lo
        self._plan = self._make_plan(lo, hi)
        self._upload = _Uploader(store.device)

    def _make_plan(self, lo: int, hi: int) -> list[np.ndarray]:
        if self.mode == "center":
            return center_batches(len(self.store), self.batch_size, self.rank, self.world_size)
        rh, rw = resized_hw(self.store.h_np[lo:hi], self.store.w_np[lo:hi], np.full(hi - lo, self.q))
        return dense_batches(lo, rh, rw, self.batch_size)

    def batches_plan(self) -> list[np.ndarray]:
        """The store rows of each batch, in order."""
        return list(self._plan)

    def __len__(self) -> int:
        return len(self._plan)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        st, spec = self.store, self.spec
        mean = np.asarray(spec.mean_rgb, np.float32)
        for r in self._plan:
            h, w = st.h_np[r], st.w_np[r]
            rh, rw = resized_hw(h, w, np.full(len(r), self.q))
            floats = np.tile(mean, (len(r), 1))
            if self.mode == "center":
                y0, x0 = (rh - spec.crop) // 2, (rw - spec.crop) // 2  # as center_params
                ints = np.stack([r, h, w, rh, rw, y0, x0, np.zeros_like(r)], 1)
                ints, floats = self._upload(ints, floats)
                images = _finish(_windows(st, ints, floats, spec.crop), spec.channels_last)
            else:
                ints, floats = self._upload(np.stack([r, h, w, rh, rw], 1), floats)
                row, hd, wd, rhd, rwd = ints.unbind(1)
                zero = torch.zeros_like(row)
                ytaps = window_taps(zero, hd, rhd, int(rh[0]))
                xtaps = window_taps(zero, wd, rwd, int(rw[0]))
                images = _sample_hwc(st, row, ytaps, xtaps).sub_(floats[:, None, None, :])
                images = images.permute(0, 3, 1, 2).contiguous()
                if self.mode == "multicrop":
                    images = grid_crops(images, spec.crop, self.grid, self.flips)
            yield images, st.labels[ints[:, 0]], [st.keys[i] for i in r.tolist()]
