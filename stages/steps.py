"""The per-batch computations of training and evaluation: one SGD step, top-k hits, and
the two ways a trained net scores an image (multi-crop windows, dense), at the
configured precision.

Torch and numpy only (no DALI, Ray, MLflow or pyarrow import): the train and evaluate
stages run these, and so does `benchmarks/bench_gpu.py --synthetic` on a bare GPU box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TOPK = (1, 5)


# ---------------------------------------------------------------- precision
@dataclass(frozen=True)
class Precision:
    """bf16 autocast and channels_last memory layout (GPU speed; both work on a CPU too)."""

    bf16: bool = False
    channels_last: bool = False

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def net(self, net: nn.Module) -> nn.Module:
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)


# ---------------------------------------------------------------- training
def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks=TOPK) -> list[torch.Tensor]:
    """Top-k hits per k; ties count against the true class and a row with a non-finite
    score is a miss (as stages.metrics.topk_hits)."""
    true = logits.gather(1, labels[:, None])  # (B, 1)
    rivals = (logits >= true).sum(1) - 1  # other classes scoring >= the true one
    finite = torch.isfinite(logits).all(1)
    return [((rivals < k) & finite).sum().double() for k in ks]


def sgd_step(net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
             labels: torch.Tensor, per_worker_batch: int, precision: Precision) -> torch.Tensor:
    """One SGD step on a (possibly empty) batch; -> [loss sum, images, top-1 hits, top-5 hits].

    The loss is the per-image sum over the batch / the per-worker batch, so after DDP's
    gradient averaging every image weighs 1 / global batch (also in partial batches)."""
    images = precision.images(images)
    with precision.autocast(images.device):
        logits = net(images)  # (B, classes)
    loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    (loss_sum / per_worker_batch).backward()
    optimizer.step()
    with torch.no_grad():
        n = torch.tensor(float(len(labels)), dtype=torch.float64, device=images.device)
        return torch.stack([loss_sum.detach().double(), n, *topk_hits(logits.detach().float(), labels)])


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
    """How evaluation runs a net (stages.vgg.VGG): class scores of crop-sized windows, and
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
