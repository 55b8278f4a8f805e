"""The torch backend (`augment.backend: torch`, vgg/data/torch_loaders.py) against the DALI
backend (the default, tested in test_augment.py) on the same tiny shards (CPU): same rows,
labels and per-sample parameters, pixels within a stated tolerance, same per-image
statistics; the torch backend runs without DALI, Ray or MLflow installed."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from test_augment import CROP, shard, spec, table  # noqa: F401 - shared shards + spec fixtures
from vgg.data import decoding, loaders

SCALE = (32, 56)  # jittered S: downscales the large images, upscales the small ones
Q = 40


@pytest.fixture(scope="module")
def specs(spec):
    return {b: dataclasses.replace(spec, backend=b) for b in ("dali", "torch")}


def train_epoch(shard, spec, world_size=1, rank=0, seed=5, batch=8):
    loader = loaders.build_train_loader(shard, spec, SCALE, batch, seed=seed, rank=rank,
                                        world_size=world_size, debug=True)
    batches = [(x.clone(), y.clone(), {k: v.clone() for k, v in i.items()})
               for x, y, i in loader.epoch(1)]
    return loader, batches


@pytest.fixture(scope="module")
def train_both(shard, specs):
    return {b: train_epoch(shard, s) for b, s in specs.items()}


@pytest.fixture(scope="module")
def eval_both(shard, specs):
    out = {}
    for b, s in specs.items():
        made = {"center": loaders.build_center_loader(shard, s, Q, 5),
                "dense": loaders.build_eval_loader(shard, s, Q, 4, mode="dense"),
                "multicrop": loaders.build_eval_loader(shard, s, Q, 4, mode="multicrop", grid=2)}
        out[b] = {m: (ld, [(x.clone(), y.clone(), k) for x, y, k in ld]) for m, ld in made.items()}
    return out


# ---------------------------------------------------------------------- parameters


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1)])
def test_train_same_rows_and_parameters(shard, specs, train_both, world_size, rank):
    both = (train_both if world_size == 1 else
            {b: train_epoch(shard, s, world_size, rank, seed=11, batch=5) for b, s in specs.items()})
    (dl, dali), (tl, torch_) = both["dali"], both["torch"]
    assert len(dl) == len(tl) == len(dali) == len(torch_) and dl.num_samples == tl.num_samples
    assert dl.next_epoch == tl.next_epoch == 2
    for (di, dy, dinfo), (ti, ty, tinfo) in zip(dali, torch_):
        assert ti.shape == di.shape and ti.dtype == di.dtype == torch.float32
        assert torch.equal(dy, ty) and ty.dtype == torch.int64
        assert set(dinfo) == set(tinfo) == {"scale", "y0", "x0", "mirror", "row", "shift"}
        for k in dinfo:
            assert tinfo[k].dtype == dinfo[k].dtype, k
            assert torch.equal(tinfo[k], dinfo[k]), k


def test_eval_same_batches(eval_both):
    for mode in ("center", "dense", "multicrop"):
        (dl, dali), (tl, torch_) = eval_both["dali"][mode], eval_both["torch"][mode]
        assert len(dl) == len(tl) == len(dali) == len(torch_) and dl.num_samples == tl.num_samples
        for (di, dy, dk), (ti, ty, tk) in zip(dali, torch_):
            assert dk == tk and torch.equal(dy, ty), mode
            assert ti.shape == di.shape and ti.dtype == di.dtype, mode


# ---------------------------------------------------------------------- pixels

# Measured on these shards (smooth sinusoid JPEGs 37-160 px, S in [32, 56] so both up-
# and downscaling, Q = 40): DALI decodes the crop's region (libjpeg-turbo) and resizes it
# with its antialiased linear filter from sub-pixel ROI coordinates; torch decodes the
# whole image (libjpeg-turbo too) and resizes it with F.interpolate(bilinear,
# antialias=True), both rounded to uint8. On the 0-255 scale: training crops mean |diff|
# 0.131, max 2; centre crops mean 0.108, max 1; dense images (and their multi-crops) mean
# 0.111, max 2. Per-image channel means agree within 0.074 levels, stds within 0.056.
# Bounds: about 4x / 2x those figures.
MEAN_ABS, MAX_ABS, IMAGE_MEAN, IMAGE_STD = 0.5, 4.0, 0.25, 0.25


def pixel_diffs(pairs):
    d = torch.cat([(a - b).abs().flatten() for a, b in pairs])
    return d.mean().item(), d.max().item()


def test_train_pixels_agree(train_both):
    pairs = [(d[0], t[0]) for d, t in zip(train_both["dali"][1], train_both["torch"][1])]
    mean, mx = pixel_diffs(pairs)
    print(f"train: mean |diff| {mean:.3f}, max {mx:.1f}")
    assert mean < MEAN_ABS and mx <= MAX_ABS


@pytest.mark.parametrize("mode", ["center", "dense", "multicrop"])
def test_eval_pixels_agree(eval_both, mode):
    pairs = [(d[0], t[0]) for d, t in zip(eval_both["dali"][mode][1], eval_both["torch"][mode][1])]
    mean, mx = pixel_diffs(pairs)
    print(f"{mode}: mean |diff| {mean:.3f}, max {mx:.1f}")
    assert mean < MEAN_ABS and mx <= MAX_ABS


def test_per_image_statistics_agree(train_both, eval_both):
    """Each image's per-channel mean and std (what the net sees) agree across backends."""
    images = {b: torch.cat([x[0] for x in train_both[b][1]] +
                           [x[0] for x in eval_both[b]["center"][1]]) for b in ("dali", "torch")}
    dm, tm = images["dali"].mean((2, 3)), images["torch"].mean((2, 3))
    ds, ts = images["dali"].std((2, 3)), images["torch"].std((2, 3))
    print(f"per-image mean: max |diff| {(dm - tm).abs().max():.3f}; "
          f"std: max |diff| {(ds - ts).abs().max():.3f}")
    assert (dm - tm).abs().max() < IMAGE_MEAN and (ds - ts).abs().max() < IMAGE_STD
    assert ts.min() > 5  # real image content, not a constant


# ---------------------------------------------------------------------- torch backend alone


def test_channels_last_and_interp(shard, specs):
    s = specs["torch"]
    ref = next(iter(loaders.build_train_loader(shard, s, 40, 8)))[0]
    cl = next(iter(loaders.build_train_loader(shard, dataclasses.replace(s, channels_last=True),
                                              40, 8)))[0]
    assert cl.shape == (8, 3, CROP, CROP) and cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, ref)
    for interp in ("cubic", "lanczos3"):  # lanczos3 runs as bicubic in torch
        other = next(iter(loaders.build_train_loader(
            shard, dataclasses.replace(s, interp=interp), 40, 8)))[0]
        assert other.shape == ref.shape and 0 < (other - ref).abs().mean() < 2


def test_determinism_and_errors(shard, specs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    s = specs["torch"]
    loader = loaders.build_train_loader(shard, s, SCALE, 8, seed=9, start_epoch=1)
    first = [x.clone() for x, _ in loader]  # epoch 1 (start_epoch)
    assert loader.next_epoch == 2
    next(iter(loader.epoch(0)))  # an abandoned epoch does not disturb the next one
    assert all(torch.equal(a, b) for a, (b, _) in zip(first, loader.epoch(1)))
    with pytest.raises(ValueError, match="Q=30 < crop=32"):
        loaders.build_eval_loader(shard, s, 30, 4, mode="multicrop")
    t = table(shard, "train").slice(0, 8)
    images = t.column("image").to_pylist()
    images[5] = b"\xff\xd8 this is not a JPEG" * 4
    bad = t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    path = tmp_path / "bad.parquet"
    pq.write_table(bad, path, row_group_size=4)
    with pytest.raises(RuntimeError, match=rf"shard file {path} row 5\b"):
        for _ in loaders.build_train_loader([path], s, 40, 4).epoch(0):
            pass


def test_training_step_on_a_torch_batch(shard, specs):
    from vgg.models import build_vgg
    from vgg.training.steps import Precision, sgd_step

    torch.manual_seed(0)
    net = build_vgg("A", num_classes=3, width=0.125, crop=CROP, dropout=0.0)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    images, labels = next(iter(loaders.build_train_loader(shard, specs["torch"], SCALE, 8)))
    out = sgd_step(net, opt, images, labels, 8, Precision())
    assert torch.isfinite(out).all() and out[1].item() == 8


def test_stage_diagnostics(shard, specs):
    """The augment stage's sample grid and pipeline checks run on the torch backend."""
    grid = loaders.sample_grid(shard, specs["torch"], SCALE, n=4, cols=2)
    assert grid.dtype == np.uint8 and grid.std() > 10
    rates = loaders.check_pipelines(str(shard), specs["torch"], SCALE, batches=1, batch_size=4,
                                    seed=0, log=lambda m: None)
    assert set(rates) == {"train", "center", "dense", "multicrop"}


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")
def test_decoder_pixels_equal_torchvisions(shard):
    """The backend's decoder (TorchCodec) gives the pixels of the one it replaces
    (torchvision's decode_jpeg) on every test JPEG of both splits."""
    blobs = [torch.frombuffer(bytearray(b), dtype=torch.uint8)
             for split in ("train", "val") for b in table(shard, split).column("image").to_pylist()]
    assert decoding.backend().startswith("TorchCodec")
    new = decoding.decode_jpegs(blobs, torch.device("cpu"))
    decoding.use("torchvision")
    try:
        old = [decoding.decode_jpeg(b) for b in blobs]
    finally:
        decoding.use(None)
    assert len(blobs) == 38 and all(torch.equal(o, n) for o, n in zip(old, new))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (batched GPU decoding)")
def test_gpu_matches_cpu(shard, specs):
    """device_id=int: nvJPEG (decoding.decode_jpegs on the GPU) and the ops there ~ the CPU result."""
    gpu_spec = dataclasses.replace(specs["torch"], device="gpu")
    gpu = loaders.build_train_loader(shard, gpu_spec, SCALE, 8, seed=4, device_id=0, debug=True)
    cpu = loaders.build_train_loader(shard, specs["torch"], SCALE, 8, seed=4, debug=True)
    for (g, gl, gi), (c, cl, ci) in zip(gpu.epoch(0), cpu.epoch(0)):
        assert g.is_cuda and gl.is_cuda and g.shape == c.shape
        assert torch.equal(gl.cpu(), cl) and torch.equal(gi["scale"], ci["scale"])
        diff = (g.cpu() - c).abs()
        assert diff.mean() < 1.0 and diff.max() < 12  # nvJPEG vs libjpeg-turbo, float vs uint8
    for mode in ("center", "dense", "multicrop"):
        g = loaders.build_eval_loader(shard, gpu_spec, Q, 4, mode=mode, grid=2, device_id=0)
        c = loaders.build_eval_loader(shard, specs["torch"], Q, 4, mode=mode, grid=2)
        for (gx, gy, gk), (cx, cy, ck) in zip(g, c):
            assert gx.is_cuda and gk == ck and torch.equal(gy.cpu(), cy)
            assert (gx.cpu() - cx).abs().mean() < 1.0


BLOCKED = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("nvidia", "ray", "mlflow", "pipeline", "stages"):
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Block())
"""


def test_runs_without_dali_ray_mlflow(shard, specs):
    """Build and iterate every torch loader in a fresh interpreter where importing nvidia,
    ray, mlflow or the workflow raises ImportError."""
    code = BLOCKED + textwrap.dedent(f"""
        import dataclasses, json
        from vgg.data import decoding, loaders
        from vgg.data.augmentation import AugmentSpec
        spec = AugmentSpec.from_dict(json.loads({json.dumps(specs["torch"].to_dict())!r}))
        shard = {str(shard)!r}
        x, y = next(iter(loaders.build_train_loader(shard, spec, (32, 48), 4)))
        assert x.shape == (4, 3, {CROP}, {CROP}) and y.shape == (4,)
        for mode in ("center", "dense", "multicrop"):
            n = sum(len(k) for _, _, k in loaders.build_eval_loader(shard, spec, 40, 4, mode=mode))
            assert n == 13, (mode, n)
        try:
            loaders.backend("dali")
        except ImportError as exc:
            assert "blocked: nvidia" in str(exc)
        else:
            raise AssertionError("DALI imported despite the block")
        assert not any(m.split(".")[0] in ("nvidia", "ray", "mlflow") for m in sys.modules)
        print("OK")
    """)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=root, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]
