"""The paper's vocabulary and rules, each written once (Simonyan & Zisserman 2015).

Pure Python (no torch, no I/O): the config validation, the data loaders, the
evaluation and the report all ask this module.

- Architectures (Table 1) and their depths.
- Evaluation modes (Sec. 3.2, 4.1-4.3): a method (dense | multi-crop |
  multi-crop+dense) at single or multiple test scales, written "method@scales";
  a fusion member (Sec. 4.4) is "net:method@scales".
- Scales: a training scale is S or [Smin, Smax] (jittering, Sec. 3.1); the test
  scales Q follow from it (Sec. 3.2, 4.2). Every pixel constant of the protocol is
  given for 224-px crops and is translated to smaller crops with `at_crop`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

# Weight layers per net (Table 1); the x axis of the error-vs-depth plot.
DEPTH = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}
ARCHS = tuple(DEPTH)

METHODS = ("dense", "multi-crop", "multi-crop+dense")
BASE_METHODS = ("dense", "multi-crop")  # computed per Q; "multi-crop+dense" is their average
SCALES = ("single", "multi")
MODES = tuple(f"{m}@{s}" for s in SCALES for m in METHODS)

TRAIN_SCALES = ("256", "384", "256-512")  # the paper's, in table order
JITTER = (256, 512)  # Sec. 3.1: S in [256, 512]
PAPER_CROP = 224  # every pixel constant of the protocol is given for 224-px crops
Q_OFFSET = 32  # Sec. 4.2: a net trained at fixed S is tested at Q = {S-32, S, S+32}
TOPK = (1, 5)  # the errors the paper reports

Scale = int | tuple[int, int] | Sequence[int]


# ------------------------------------------------------------------ modes and members
def parse_mode(mode: str) -> tuple[str, str]:
    """"multi-crop+dense@multi" -> ("multi-crop+dense", "multi"); ValueError otherwise."""
    method, sep, scales = mode.partition("@")
    if not sep or method not in METHODS or scales not in SCALES:
        raise ValueError(f"{mode!r} is not method@scales with method one of {list(METHODS)} "
                         f"and scales single|multi")
    return method, scales


def parse_member(member: str) -> tuple[str, str]:
    """A fusion member "D-jit:dense@multi" -> ("D-jit", "dense@multi"); ValueError otherwise."""
    net, sep, mode = member.partition(":")
    if not sep or not net:
        raise ValueError(f"{member!r} is not net:method@scales")
    try:
        parse_mode(mode)
    except ValueError as e:
        raise ValueError(f"{member!r}: {e}") from None
    return net, mode


def slug(text: str) -> str:
    """An MLflow-safe key part (metric names may not hold '@', '+', ':' or spaces):
    "D-jit:multi-crop+dense@multi" -> "D-jit_multi-crop_dense_multi"."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text).strip("_")


_METHOD_SLUG = {"dense": "dense", "multi-crop": "multicrop", "multi-crop+dense": "multicrop_dense"}


def metric_name(mode: str, what: str) -> str:
    """("multi-crop+dense@multi", "top1_err") -> "multicrop_dense_multi_top1_err"; a bare
    method ("dense", "q37_top1_err") -> "dense_q37_top1_err"."""
    method, _, scales = mode.partition("@")
    return "_".join(p for p in (_METHOD_SLUG[method], scales, what) if p)


# ------------------------------------------------------------------ scales
def parse_scale(scale: Scale, crop: int, crop_key: str = "") -> tuple[int, int]:
    """S or [Smin, Smax] -> (Smin, Smax). ValueError unless Smin <= Smax and the crop fits
    in the rescaled image (crop <= Smin); `crop_key` names the crop's setting in the message."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) or type(v).__name__.startswith("int")

    if is_int(scale):
        lo = hi = int(scale)
    elif isinstance(scale, (tuple, list)) and len(scale) == 2 and all(map(is_int, scale)):
        lo, hi = int(scale[0]), int(scale[1])
    else:
        raise ValueError(f"expected S or [Smin, Smax], got {scale!r}")
    if lo > hi:
        raise ValueError(f"Smin ({lo}) must be <= Smax ({hi})")
    if crop > lo:
        raise ValueError(f"the crop ({crop_key + ' = ' if crop_key else ''}{crop}) is larger than the smallest scale {lo}")
    return lo, hi


def at_crop(pixels: int, crop: int) -> int:
    """One of the paper's pixel constants (given for crop 224) translated to `crop`:
    pixels * crop / 224, rounded (32 -> 32 at crop 224, 5 at crop 32, 9 at crop 64)."""
    return max(1, int(pixels * crop / PAPER_CROP + 0.5))


def jitter_at(crop: int) -> tuple[int, int]:
    """The paper's jittering range [256, 512] translated to `crop` ([37, 73] at crop 32)."""
    return at_crop(JITTER[0], crop), at_crop(JITTER[1], crop)


def scales_for_testing(smin: int, smax: int, crop: int) -> tuple[int, list[int]]:
    """The paper's test scales (Sec. 3.2, 4.2) for a training scale [smin, smax] (smin = smax:
    fixed S) at crop `crop`: (single Q, multi Qs). Fixed S: S and {S-d, S, S+d} with
    d = 32 * crop / 224 (the paper's +-32 at crop 224, scaled with the crop); jittered:
    the middle and {Smin, middle, Smax}. A Q below the crop is raised to it."""
    mid = (smin + smax) // 2
    if smin == smax:
        d = at_crop(Q_OFFSET, crop)
        multi = [smin - d, smin, smin + d]
    else:
        multi = [smin, mid, smax]
    return mid, [max(crop, q) for q in multi]


def single_test_scale(scale: Scale, crop: int) -> int:
    """Q for single-scale testing of a net trained at `scale`: S, or the middle of [Smin, Smax]."""
    return scales_for_testing(*parse_scale(scale, crop), crop)[0]


def multi_test_scales(scale: Scale, crop: int) -> list[int]:
    """Q for multi-scale testing of a net trained at `scale` (see `scales_for_testing`)."""
    return scales_for_testing(*parse_scale(scale, crop), crop)[1]


# ------------------------------------------------------------------ errors
def within_topk(scores, labels, k: int):
    """(N,) bool: whether each row's true class is among its k highest scores, for numpy
    arrays and torch tensors alike (evaluation scores numpy posteriors, training counts its
    hits on the device). Ties never help: the true class is within the top k only if fewer
    than k *other* classes score >= it, so a constant row is a miss for every k < K. A row
    with a non-finite score is a miss."""
    true = scores[range(len(labels)), labels][:, None]
    rivals = (scores >= true).sum(1) - 1  # other classes scoring >= the true one
    return (rivals < k) & (abs(scores) < math.inf).all(1)
