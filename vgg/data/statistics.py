"""The training set's RGB statistics (paper Sec. 2.1, AlexNet's PCA colour noise): exact
pixel sums per image, then the mean RGB and the RGB covariance's eigen-decomposition.
numpy only: the shard stage (`pipeline.sharding`) and `python -m vgg.ladder` use them."""

from __future__ import annotations

import numpy as np


def pixel_sums(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum of RGB (3,), sum of RGB outer products (9,)) over an 8-bit image, exact int64.
    Channels as contiguous rows; a product of two 8-bit values fits in uint16 (255**2 <
    2**16). At 500x375 px: 1.1 ms, against 4.9 ms for float64 px.T @ px (one core)."""
    c = np.ascontiguousarray(rgb.reshape(-1, 3).T)
    u = c.astype(np.uint16)
    outer = np.empty((3, 3), np.int64)
    for a in range(3):
        for b in range(a, 3):
            outer[a, b] = outer[b, a] = np.multiply(u[a], u[b]).sum(dtype=np.uint64)
    return c.sum(1, dtype=np.int64), outer.ravel()


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
