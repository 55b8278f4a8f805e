"""How a trained net scores an image (Sec. 3.2): a grid of crop-sized windows (multi-crop)
or the fully-convolutional net over the whole image (dense), at the configured precision.

Torch and numpy only (like `vgg.training.steps`): `benchmarks/bench_gpu.py --synthetic`
runs it on a bare GPU box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from vgg.training.steps import Precision


# ---------------------------------------------------------------- evaluation
def grid_positions(length: int, crop: int, g: int) -> np.ndarray:
    """g offsets of crop windows evenly spaced from 0 to length-crop (g=1: centre)."""
    if crop > length:
        raise ValueError(f"crop={crop} larger than the rescaled side {length}")
    if g == 1:
        return np.array([(length - crop) // 2])
    return np.floor(np.linspace(0, length - crop, g) + 0.5).astype(np.int64)


def grid_crops(images: torch.Tensor, crop: int, g: int, flips: bool) -> torch.Tensor:
    """(B, C, H, W) -> (B, g*g[*2], C, crop, crop): a g x g regular grid of windows
    from (0, 0) to (H-crop, W-crop) (g=1: the centre), then their flips."""
    _, _, h, w = images.shape
    ys, xs = grid_positions(h, crop, g), grid_positions(w, crop, g)
    crops = [images[:, :, y:y + crop, x:x + crop] for y in ys.tolist() for x in xs.tolist()]
    out = torch.stack(crops, 1)
    return torch.cat([out, out.flip(-1)], 1) if flips else out


@dataclass
class Scorer:
    """How evaluation runs a net (vgg.models.VGG): class scores of crop-sized windows, and
    the spatially averaged score map of the fully-convolutional net (Sec. 3.2), each at
    the configured precision, optionally through torch.compile."""

    crops: Callable[[torch.Tensor], torch.Tensor]  # (N, 3, crop, crop) -> (N, K)
    dense: Callable[[torch.Tensor], torch.Tensor]  # (N, 3, H, W) -> (N, K)
    crop: int
    precision: Precision

    @classmethod
    def of(cls, net, precision: Precision = Precision(), compile: bool = False) -> "Scorer":
        net = precision.net(net.eval())
        crops, dense = net, net.dense_scores
        if compile:  # dense inputs change size with every image size: a dynamic graph
            crops, dense = torch.compile(net), torch.compile(net.dense_scores, dynamic=True)
        return cls(crops, dense, net.crop, precision)

    def _run(self, fn, x: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast(x.device):
            return fn(self.precision.images(x)).float()

    def dense_probs(self, images: torch.Tensor, flips: bool) -> torch.Tensor:
        """Dense evaluation: softmax of the averaged score map, averaged with that of the
        flipped image when `flips`. (B, 3, H, W) -> (B, K) float32."""
        probs = self._run(self.dense, images).softmax(dim=1)
        if flips:
            probs = (probs + self._run(self.dense, images.flip(-1)).softmax(dim=1)) / 2
        return probs

    def multicrop_probs(self, images: torch.Tensor, grid: int, flips: bool, batch: int) -> torch.Tensor:
        """Multi-crop evaluation: softmax posteriors averaged over the grid x grid windows
        (and flips). The windows of several images go through one forward pass of about
        `batch` crops. (B, 3, H, W) -> (B, K) float32."""
        n = grid * grid * (2 if flips else 1)
        step = max(1, batch // n)  # images per forward pass
        out = []
        for i in range(0, images.shape[0], step):
            crops = grid_crops(images[i:i + step], self.crop, grid, flips)  # (b, n, 3, c, c)
            b = crops.shape[0]
            probs = self._run(self.crops, crops.flatten(0, 1)).softmax(dim=1)  # (b * n, K)
            out.append(probs.view(b, n, -1).mean(dim=1))
        return torch.cat(out)
