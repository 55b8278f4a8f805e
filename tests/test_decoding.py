"""vgg.data.decoding: TorchCodec's JPEG decoder for the torch backend and the in-memory store;
EXIF orientation applied as the shard stage applies it (PIL's exif_transpose); torchvision's
deprecated decoder only as a fallback, with one warning naming why."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from vgg.data import decoding

ROOT = Path(__file__).resolve().parent.parent


def exif_jpeg(a: np.ndarray, orientation: int, quality: int = 95) -> bytes:
    """JPEG of pixels ``a`` (as stored) with the EXIF orientation tag set."""
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def upright_pil(b: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(b))).convert("RGB"))


@pytest.fixture
def torchvision_decoder():
    decoding.use("torchvision")
    yield
    decoding.use(None)


def test_the_default_decoder_is_torchcodec():
    assert decoding.backend().startswith("TorchCodec ")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_the_shard_stage_applies_it(orientation):
    a = np.random.default_rng(orientation).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    b = exif_jpeg(a, orientation)
    ref = upright_pil(b)  # what pipeline.sharding.normalise_image rotates to
    assert decoding.exif_orientation(b) == orientation
    got = decoding.decode_jpeg(tensor(b)).permute(1, 2, 0).numpy()
    assert np.array_equal(got, ref)
    # the fallback's GPU path rotates with torch ops: the same result
    as_stored = torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1)
    assert np.array_equal(decoding.orient(as_stored, orientation).permute(1, 2, 0).numpy(), ref)
    with Image.open(io.BytesIO(b)) as im:
        assert decoding.upright_hw(im) == ref.shape[:2]


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_torchcodec_and_torchvision_decode_the_same_pixels(mode, torchvision_decoder):
    rng = np.random.default_rng(3)
    blobs = []
    for h, w in [(17, 23), (40, 31), (64, 64)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(buf, "JPEG")
        blobs.append(tensor(buf.getvalue()))
    old = [decoding.decode_jpeg(d) for d in blobs]
    decoding.use("torchcodec")
    new = decoding.decode_jpegs(blobs, torch.device("cpu"))
    assert all(o.shape[0] == 3 and torch.equal(o, n) for o, n in zip(old, new))


def test_an_undecodable_jpeg_raises_runtime_error():
    with pytest.raises(RuntimeError):
        decoding.decode_jpeg(tensor(b"\xff\xd8\xff not a jpeg at all"))


def test_torchvision_fallback_warns_once_and_names_the_reason():
    """TorchCodec not importable: torchvision's decoder, one RuntimeWarning saying why,
    EXIF orientation still applied."""
    code = textwrap.dedent(f"""
        import sys, warnings, io
        sys.modules["torchcodec"] = None  # import torchcodec -> ImportError
        import numpy as np, torch
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_decoding import exif_jpeg, tensor, upright_pil
        from vgg.data import decoding
        b = exif_jpeg(np.random.default_rng(0).integers(0, 256, (10, 16, 3), dtype=np.uint8), 6)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            imgs = [decoding.decode_jpeg(tensor(b)) for _ in range(3)]
            name = decoding.backend()
        mine = [str(x.message) for x in w if x.category is RuntimeWarning]
        assert len(mine) == 1, mine
        print(mine[0]); print(name)
        assert all(np.array_equal(i.permute(1, 2, 0).numpy(), upright_pil(b)) for i in imgs)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    warning, name = r.stdout.strip().splitlines()[-2:]
    assert re.search(r"TorchCodec cannot be imported \((ModuleNotFoundError|ImportError): .*torchvision", warning)
    assert name.startswith("torchvision ")


def test_use_rejects_unknown_names():
    with pytest.raises(ValueError, match="'pil'"):
        decoding.use("pil")
