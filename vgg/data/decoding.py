"""JPEG decoding for the torch backend (`vgg.data.torch_loaders`) and the in-memory store
(`vgg.data.memory`): TorchCodec's decoders, libjpeg-turbo on the CPU, nvJPEG on a CUDA
device (a batch per call), RGB uint8 (3, h, w), EXIF orientation applied as the shard stage
applies it (PIL's `ImageOps.exif_transpose`).

torchvision deprecated its decoders in 0.29 for TorchCodec's. Where TorchCodec cannot be
imported but torchvision's decoders still exist, they are used instead, with one warning
naming the reason (EXIF orientation applied by torchvision on the CPU, here on a GPU).
`use("torchvision")` picks them on purpose (benchmarks, tests); `backend()` names the one
in use.
"""

from __future__ import annotations

import functools
import io
import warnings
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image


class _Decoder(NamedTuple):
    name: str
    one: Callable[[torch.Tensor], torch.Tensor]  # CPU, one image
    batch: Callable[[list, torch.device], list]  # CUDA, one call


@functools.cache
def _torchcodec() -> _Decoder:
    import torchcodec
    from torchcodec.decoders import decode_jpeg

    return _Decoder(f"TorchCodec {torchcodec.__version__}",
                    lambda d: decode_jpeg(d, mode="RGB"),
                    lambda ds, dev: decode_jpeg(list(ds), mode="RGB", device=dev))


@functools.cache
def _torchvision() -> _Decoder:
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    rgb = ImageReadMode.RGB

    def batch(ds, dev):  # nvJPEG cannot apply EXIF orientation: done here
        return [orient(img, exif_orientation(d))
                for img, d in zip(decode_jpeg(list(ds), mode=rgb, device=dev), ds)]

    return _Decoder(f"torchvision {torchvision.__version__}",
                    lambda d: decode_jpeg(d, mode=rgb, apply_exif_orientation=True), batch)


_chosen: str | None = None  # None: TorchCodec, else torchvision with a warning


@functools.cache
def _auto() -> _Decoder:
    try:
        return _torchcodec()
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError/RuntimeError of its libraries
        reason = f"{type(e).__name__}: {e}"
    try:
        dec = _torchvision()
    except ImportError as e:
        raise ImportError(f"no JPEG decoder: TorchCodec cannot be imported ({reason}) and "
                          f"torchvision has no decode_jpeg ({e}); pip install torchcodec") from None
    warnings.warn(f"TorchCodec cannot be imported ({reason}); decoding JPEGs with "
                  f"{dec.name}'s deprecated decode_jpeg instead", RuntimeWarning, stacklevel=3)
    return dec


def _decoder() -> _Decoder:
    if _chosen is None:
        return _auto()
    return _torchcodec() if _chosen == "torchcodec" else _torchvision()


def use(name: str | None) -> None:
    """Decode with "torchcodec", "torchvision" (deprecated), or None: TorchCodec where it
    imports, else torchvision with a warning (the default)."""
    global _chosen
    if name not in (None, "torchcodec", "torchvision"):
        raise ValueError(f"decoder: 'torchcodec', 'torchvision' or None, not {name!r}")
    _chosen = name


def backend() -> str:
    """The decoder in use, e.g. "TorchCodec 0.17.0"."""
    return _decoder().name


def decode_jpeg(data: torch.Tensor) -> torch.Tensor:
    """(3, h, w) uint8 RGB of one JPEG's bytes (1-D uint8 CPU tensor), on the CPU.
    Grey and CMYK JPEGs come out as RGB; RuntimeError for undecodable data."""
    return _decoder().one(data)


def decode_jpegs(data: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """`decode_jpeg` of each, on ``device``: on a CUDA device one nvJPEG call for the batch,
    on the CPU one call per image. Raises (RuntimeError) if any image does not decode."""
    dec = _decoder()
    if torch.device(device).type == "cuda":
        return dec.batch(data, torch.device(device))
    return [dec.one(d) for d in data]


# ---------------------------------------------------------------- EXIF orientation


def exif_orientation(data) -> int:
    """The EXIF orientation tag (1-8; 1 where absent or unreadable) of JPEG bytes."""
    try:
        buf = data.numpy().tobytes() if isinstance(data, torch.Tensor) else bytes(data)
        with Image.open(io.BytesIO(buf)) as im:
            o = int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - no or malformed EXIF: as stored
        return 1
    return o if 1 <= o <= 8 else 1


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, h, w) image as stored -> upright (PIL's exif_transpose for that tag)."""
    hw = (-2, -1)
    ops = {1: lambda x: x, 2: lambda x: x.flip(-1), 3: lambda x: x.flip(hw), 4: lambda x: x.flip(-2),
           5: lambda x: x.transpose(-2, -1), 6: lambda x: torch.rot90(x, -1, hw),
           7: lambda x: x.transpose(-2, -1).flip(hw), 8: lambda x: torch.rot90(x, 1, hw)}
    return ops[orientation](img).contiguous()


def upright_hw(im: Image.Image) -> tuple[int, int]:
    """(h, w) of an opened image once its EXIF orientation is applied (JPEG only)."""
    w, h = im.size
    if im.format == "JPEG":
        try:
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                return w, h
        except Exception:  # noqa: BLE001 - malformed EXIF: as stored
            pass
    return h, w


def to_8bit_rgb(im: Image.Image) -> Image.Image:
    """Any decodable PIL image -> 8-bit RGB (16-bit and float scaled, alpha composited on
    white): the conversion of the shard stage (`pipeline.sharding`) and of the ladder's store."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")
