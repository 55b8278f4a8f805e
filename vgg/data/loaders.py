"""Loaders of the paper's augmentation (Sec. 3.1-3.2) by backend, chosen by `augment.backend`
(`AugmentSpec.backend`):

- "dali" (`vgg.data.dali`, the default): NVIDIA DALI decodes the crop window only (ROI
  decoding), GPU "mixed" decoding on GPU workers, the same pipeline on CPU elsewhere.
  Linux with an NVIDIA CUDA wheel only.
- "torch" (`vgg.data.torch_loaders`): TorchCodec decodes (`vgg.data.decoding`, batched on the
  GPU when the worker has one) and torch ops rescale, crop, flip and shift colours.
  Runs wherever PyTorch runs (AMD, Apple, CPU-only machines).

Both implement the same spec with the same per-sample parameters
(`vgg.data.augmentation`); a backend is imported only when a loader of it is built.
Each module exposes `build_train_loader`, `build_eval_loader` and `build_center_loader`
with the signatures below; the loaders iterate alike.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from types import ModuleType

import numpy as np
import torch

from vgg.data.augmentation import AugmentSpec
from vgg.paper import Scale, single_test_scale

BACKENDS = {"dali": "vgg.data.dali", "torch": "vgg.data.torch_loaders"}


def backend(name: str) -> ModuleType:
    """The loader module of a backend (imported now)."""
    if name not in BACKENDS:
        raise ValueError(f"augment.backend must be one of {list(BACKENDS)}, got {name!r}")
    return importlib.import_module(BACKENDS[name])


def resolve_device_id(spec: AugmentSpec, device_id: int | None) -> int | None:
    """GPU id for decoding and augmentation, or None for the CPU (spec.device overrides auto)."""
    if spec.device == "cpu":
        return None
    if device_id is None and torch.cuda.is_available():
        device_id = torch.cuda.current_device()
    if spec.device == "gpu" and device_id is None:
        raise ValueError("spec.device='gpu' but no device_id given and CUDA is unavailable")
    return device_id


def build_train_loader(source, spec: AugmentSpec, scale: Scale, batch_size: int, *,
                       device_id: int | None = None, **kw):
    """Training loader of `spec.backend` (see `vgg.data.dali.build_train_loader`); `device_id`:
    the worker's GPU, if any (None: the current CUDA device where spec.device allows)."""
    return backend(spec.backend).build_train_loader(source, spec, scale, batch_size,
                                                    device_id=resolve_device_id(spec, device_id), **kw)


def build_eval_loader(source, spec: AugmentSpec, q: int, batch_size: int, *,
                      device_id: int | None = None, **kw):
    """Evaluation loader of `spec.backend` (see `vgg.data.dali.build_eval_loader`)."""
    return backend(spec.backend).build_eval_loader(source, spec, q, batch_size,
                                                   device_id=resolve_device_id(spec, device_id), **kw)


def build_center_loader(source, spec: AugmentSpec, q: int, batch_size: int, **kw):
    """Centre crop at scale Q (per-epoch validation; Q = vgg.paper.single_test_scale(S))."""
    return build_eval_loader(source, spec, q, batch_size, mode="center", **kw)


# --------------------------------------------------------------------------
# Diagnostics (any backend)


def sample_grid(source, spec: AugmentSpec, scale: Scale, *, n: int = 16, cols: int = 4,
                seed: int = 0, pad: int = 2, split: str = "train") -> np.ndarray:
    """uint8 (H, W, 3) grid of n augmented training samples (training mean added back)."""
    cpu = dataclasses.replace(spec, device="cpu", channels_last=False)
    loader = build_train_loader(source, cpu, scale, n, seed=seed, split=split)
    images = next(iter(loader.epoch(0)))[0]
    imgs = images.permute(0, 2, 3, 1).cpu().numpy() + np.asarray(spec.mean_rgb, np.float32)
    imgs = np.clip(np.rint(imgs), 0, 255).astype(np.uint8)
    rows = -(-len(imgs) // cols)
    c = spec.crop + pad
    grid = np.full((rows * c + pad, cols * c + pad, 3), 255, np.uint8)
    for i, im in enumerate(imgs):
        y, x = pad + (i // cols) * c, pad + (i % cols) * c
        grid[y:y + spec.crop, x:x + spec.crop] = im
    return grid


def check_pipelines(shards: str, spec: AugmentSpec, scale: tuple[int, int], batches: int,
                    batch_size: int, seed: int, log=print) -> dict[str, float]:
    """Run `batches` batches of every loader kind (train, centre, dense, multi-crop);
    check shapes and values; return images/s of each (CPU or GPU as the spec says)."""
    q = single_test_scale(scale, spec.crop)
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
