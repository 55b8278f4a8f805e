"""The per-batch computations of training: one SGD step and its top-k hits, at the
configured precision (bf16 autocast, channels_last).

Torch only (no DALI, Ray, MLflow or pyarrow import): the training worker runs these,
and so does `benchmarks/bench_gpu.py --synthetic` on a bare GPU box.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vgg.paper import TOPK, within_topk


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
    """Top-k hit counts per k (the rule of `vgg.paper.within_topk`), on the device."""
    return [within_topk(logits, labels, k).sum().double() for k in ks]


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


# ---------------------------------------------------------------- utilisation
#: Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "H200": 989.4, "A100": 312.0}


def peak_tflops(name: str) -> float | None:
    """The table's peak for a CUDA device name (longest matching key), or None."""
    hits = [k for k in PEAK_BF16_TFLOPS if k in name]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def mfu(images_per_s: float, forward_macs: int, device_name: str) -> float | None:
    """Model FLOP utilisation of training: 6 x forward MACs (forward 2, backward 4 FLOPs per
    MAC) x images/s over the device's bf16 peak; None where the peak is not known."""
    peak = peak_tflops(device_name)
    return None if peak is None else 6 * forward_macs * images_per_s / (peak * 1e12)

