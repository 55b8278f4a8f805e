"""Which rows a worker reads in an epoch, in which order (numpy only): the same plan for
every loader backend and every storage of the rows (Parquet shards, images in memory).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# Stream tags, so the block order and the per-sample parameters never share
# random numbers even for equal (seed, epoch).
TAG_ORDER, TAG_PARAMS = 0, 1


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


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
    rng = np.random.default_rng([seed, epoch, TAG_ORDER])
    perm = rng.permutation(len(sizes))
    parts = []
    for w0 in range(0, len(perm), window_blocks):
        blocks = perm[w0:w0 + window_blocks]
        rows = np.concatenate([np.arange(starts[b], starts[b] + sizes[b]) for b in blocks])
        parts.append(rng.permutation(rows))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def share_bounds(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous chunk; sizes differ by at most one."""
    check_int("world_size", world_size, 1)
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
    check_int("batch_size", batch_size, 1)
    lo, hi = share_bounds(num_rows, rank, world_size)
    return -(-(hi - lo) // batch_size)


# --------------------------------------------------------------------------
# Batch plans: the same for every loader backend (DALI, torch, images in memory)


def train_batches(num_rows: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, *,
                  block_sizes: Sequence[int] | None = None, window_blocks: int = 8
                  ) -> tuple[list[np.ndarray], np.random.Generator]:
    """Batches of rows of rank's share of an epoch (`share_rows`), and the Generator the
    per-sample parameters (`vgg.data.augmentation.train_params`) are drawn from, batch by
    batch: both depend on (seed, epoch, rank) only."""
    rows = share_rows(num_rows, rank, world_size, seed, epoch, block_sizes=block_sizes,
                      window_blocks=window_blocks)
    rng = np.random.default_rng([seed, epoch, TAG_PARAMS, rank])
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)], rng


def center_batches(num_rows: int, batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """Rank's contiguous share in row order, in batches (validation, centre crops)."""
    lo, hi = share_bounds(num_rows, rank, world_size)
    rows = np.arange(lo, hi, dtype=np.int64)
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def dense_batches(lo: int, rh: np.ndarray, rw: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Rows lo, lo+1, ... (rescaled to sizes (rh, rw)) in batches of one size each: a bucket
    is emitted when full, partial ones at the end (whole images at one test scale)."""
    pending: dict[tuple[int, int], list[int]] = {}
    plan: list[np.ndarray] = []
    for i, key in enumerate(zip(np.asarray(rh).tolist(), np.asarray(rw).tolist())):
        bucket = pending.setdefault(key, [])
        bucket.append(lo + i)
        if len(bucket) == batch_size:
            plan.append(np.asarray(pending.pop(key), np.int64))
    plan.extend(np.asarray(b, np.int64) for b in pending.values())
    return plan


EVAL_MODES = ("dense", "multicrop", "center")


def check_eval_loader(crop: int, q: int, batch_size: int, grid: int, mode: str, rank: int,
                      world_size: int) -> None:
    """The arguments every evaluation loader takes (any backend), checked alike."""
    check_int("batch_size", batch_size, 1)
    check_int("grid", grid, 1)
    check_int("Q", q, 1)
    if mode not in EVAL_MODES:
        raise ValueError(f"mode must be 'dense', 'multicrop' or 'center', got {mode!r}")
    if mode != "dense" and q < crop:
        raise ValueError(f"Q={q} < crop={crop}: crops would not fit")
    share_bounds(1, rank, world_size)  # validates rank/world_size
