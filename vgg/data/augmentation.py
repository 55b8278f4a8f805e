"""The augmentation of the paper (Sec. 3.1-3.2) as data: the spec and the per-sample
parameters, in numpy (no DALI, no torch).

Training: one random crop x crop window per image per iteration from the
isotropically rescaled image (shorter side S, fixed or jittered per image in
[Smin, Smax]), a random horizontal flip, AlexNet's PCA colour shift; the only
normalisation is subtracting the training mean RGB. Testing: the image rescaled
to shorter side Q, whole (dense) or as crop windows.

All random numbers are drawn from a Generator seeded by (seed, epoch, rank) by the
caller, so a batch depends only on those. `vgg.data.dali` runs these parameters
through DALI.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from vgg.config import AugmentConfig
from vgg.data.sampling import check_int

# Resampling filter -> its radius in source pixels at scale 1 (the decode margin).
FILTER_RADIUS = {"linear": 1, "cubic": 2, "lanczos3": 3}
DEVICES = ("auto", "cpu", "gpu")
BACKENDS = ("dali", "torch")  # vgg.data.loaders.BACKENDS


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
    backend: str = "dali"  # the loaders' backend: "dali" | "torch" (vgg.data.loaders)

    def __post_init__(self) -> None:
        _set = lambda k, v: object.__setattr__(self, k, v)  # frozen dataclass
        _set("mean_rgb", _float_tuple("mean_rgb", self.mean_rgb, (3,)))
        _set("eigvals", _float_tuple("eigvals", self.eigvals, (3,)))
        _set("eigvecs", _float_tuple("eigvecs", self.eigvecs, (3, 3)))
        check_int("crop", self.crop, 1)
        check_int("num_threads", self.num_threads, 1)
        check_int("prefetch", self.prefetch, 1)
        check_int("window_blocks", self.window_blocks, 1)
        std = self.color_noise_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not std >= 0:
            raise ValueError(f"color_noise_std must be a number >= 0, got {std!r}")
        if min(self.eigvals) < 0:
            raise ValueError(f"eigvals must be >= 0 (a covariance), got {self.eigvals}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.interp not in FILTER_RADIUS:
            raise ValueError(f"interp must be one of {tuple(FILTER_RADIUS)}, got {self.interp!r}")
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
        backend=cfg.backend,
    )


# --------------------------------------------------------------------------
# Rescaling (paper section 3.1 "training image size", 3.2 "testing")


def resized_hw(h: np.ndarray, w: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Size after the isotropic rescale that makes the shorter side ``s``."""
    h, w, s = (np.asarray(a, np.int64) for a in (h, w, s))
    short = np.minimum(h, w)
    long_side = np.floor(np.maximum(h, w) * s / short + 0.5).astype(np.int64)
    long_side = np.maximum(long_side, s)
    return np.where(h <= w, s, long_side), np.where(h <= w, long_side, s)



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
    out = roi_window(h, w, rh, rw, y0, x0, spec.crop, FILTER_RADIUS[spec.interp])
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
                     spec.crop, FILTER_RADIUS[spec.interp])
    out["mean"] = np.tile(np.asarray(spec.mean_rgb, np.float32), (n, 1))
    out["mirror"] = np.zeros(n, np.int32)
    return out


# --------------------------------------------------------------------------
