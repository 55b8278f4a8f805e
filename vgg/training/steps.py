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
#: A config's `bf16` / `channels_last` value that lets the hardware choose (`Precision.choose`).
AUTO = "auto"


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 convolutions and matmuls run natively on `device`, so bf16 autocast is
    faster than float32 there: a CUDA device with bf16 (Ampere and later), or a CPU whose
    oneDNN has bf16 instructions to use (AMX tiles or AVX512-BF16). Elsewhere oneDNN
    emulates bf16 and it is slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(probe() for probe in probes if probe is not None)


@dataclass(frozen=True)
class Precision:
    """bf16 autocast and channels_last memory layout. `Precision.choose` resolves the
    config's `auto` for a device; posteriors and losses are computed in float32 either way."""

    bf16: bool = False
    channels_last: bool = False

    @classmethod
    def choose(cls, bf16: bool | str, channels_last: bool | str, device: torch.device) -> "Precision":
        """Explicit true/false as given; `auto`: bf16 where it is native (`native_bf16`), and
        channels_last on CUDA and on CPUs (cuDNN's and oneDNN's convolutions are NHWC-native:
        on this project's CPU, fp32 NHWC trained 1.0-1.4x and evaluated 1.3-2.0x faster than
        NCHW, README "Benchmarks"); NCHW on other devices."""
        return cls(native_bf16(device) if bf16 == AUTO else bool(bf16),
                   device.type in ("cuda", "cpu") if channels_last == AUTO else bool(channels_last))

    def describe(self) -> str:
        return f"{'bf16 autocast' if self.bf16 else 'float32'}, {'channels_last' if self.channels_last else 'NCHW'}"

    def params(self) -> dict[str, bool]:
        """The resolved choice as MLflow params."""
        return {"precision.bf16": self.bf16, "precision.channels_last": self.channels_last}

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def net(self, net: nn.Module) -> nn.Module:
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)


def describe_choice(bf16: bool | str, channels_last: bool | str, chosen: Precision, device: torch.device) -> str:
    """One line: what runs, and why (the config's values, the device)."""
    how = "auto" if AUTO in (bf16, channels_last) else "as configured"
    native = "with" if native_bf16(device) else "without"
    where = f"{'CUDA' if device.type == 'cuda' else device.type.upper()} {native} native bf16"
    return f"precision: {chosen.describe()} ({how}; {where})"


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

