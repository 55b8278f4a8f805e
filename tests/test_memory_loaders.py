"""vgg.data.memory: decoded splits held on a device, augmented there (CPU here; the device is a
parameter). References: PIL decoding, F.interpolate in float64, vgg.data.augmentation's
per-sample parameters and vgg.data.sampling's row order (those of the DALI backend)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import write_images
from vgg.data.augmentation import AugmentSpec, center_params, resized_hw, train_params
from vgg.data.memory import (ImageStore, MemoryEvalLoader, MemoryTrainLoader, folder_stores,
                             rgb_stats, sample_windows, window_coords)
from vgg.data.sampling import TAG_PARAMS, share_bounds, share_rows
from vgg.data.statistics import pixel_sums, rgb_statistics
from vgg.evaluation.scoring import grid_crops

ROOT = Path(__file__).resolve().parent.parent
CROP = 24
# Sizes (h, w): portrait, landscape, square; repeats so that dense batches bucket.
SIZES = [(40, 52), (52, 40), (30, 30), (40, 52), (36, 60), (30, 30), (45, 45), (40, 52)]


def _spec(**kw) -> AugmentSpec:
    v = np.linalg.qr(np.random.default_rng(5).normal(size=(3, 3)))[0]
    return AugmentSpec(mean_rgb=(124.0, 116.5, 103.25), eigvals=(900.0, 80.0, 10.0),
                       eigvecs=v.tolist(), crop=CROP, color_noise_std=0.5, **kw)


def _image(rng, h, w, gray=False) -> Image.Image:
    # smooth content plus noise, so bilinear errors show
    y, x = np.mgrid[:h, :w]
    base = np.stack([(x * 5) % 256, (y * 7) % 256, ((x + y) * 3) % 256], -1)
    a = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(a)
    return im.convert("L") if gray else im


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("memfolder")
    rng = np.random.default_rng(0)
    for c, cls in enumerate(["cat", "dog", "eel"]):
        write_images(root, "train", cls, [_image(rng, h, w, gray=(c == 1 and i == 2))
                                          for i, (h, w) in enumerate(SIZES[c:] + SIZES[:c])])
        write_images(root, "val", cls, [_image(rng, h, w) for h, w in SIZES[2 * c:2 * c + 4]])
    _image(rng, 33, 41).save(root / "val" / "eel" / "zz.png")  # not a JPEG: decode_image
    return root


@pytest.fixture(scope="module")
def stores(folder):
    return folder_stores(str(folder), "cpu", batch=5)


def _pil(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _resize64(rgb: np.ndarray, rh: int, rw: int) -> torch.Tensor:
    """(3, rh, rw) float64: the reference isotropic rescale."""
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].double()
    return F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False)[0]


def _path(folder, key) -> Path:
    return folder / key


# ---------------------------------------------------------------- store, statistics


def test_store_holds_the_decoded_images(folder, stores):
    classes, train, val = stores
    assert classes == ["cat", "dog", "eel"]
    assert len(train) == 24 and len(val) == 13
    assert train.keys == sorted(train.keys) and train.keys[0].startswith("train/cat/")
    assert train.labels.tolist() == [["cat", "dog", "eel"].index(k.split("/")[1]) for k in train.keys]
    for st in (train, val):
        assert st.pixels.dtype == torch.uint8 and st.pixels.dim() == 1
        assert st.nbytes == int((st.h_np * st.w_np).sum()) * 3 == st.num_pixels * 3
        assert st.offsets.dtype == st.heights.dtype == st.widths.dtype == torch.int64
        for i, key in enumerate(st.keys):  # grey JPEG and PNG come out RGB, bit-equal to PIL
            assert np.array_equal(st.image(i).numpy(), _pil(_path(folder, key))), key
    assert any(k.endswith(".png") for k in val.keys)


def test_rgb_stats_equal_the_shard_stages_numpy_path(folder, stores):
    train = stores[1]
    sums = [pixel_sums(_pil(_path(folder, k))) for k in train.keys]
    npix = sum(_pil(_path(folder, k)).shape[0] * _pil(_path(folder, k)).shape[1] for k in train.keys)
    ref = rgb_statistics(npix, np.sum([s for s, _ in sums], 0).astype(np.float64),
                         np.sum([o for _, o in sums], 0).astype(np.float64))
    got = rgb_stats(train, chunk=1000)  # several chunks
    assert got["num_pixels"] == ref["num_pixels"]
    for k in ("mean_rgb", "cov_rgb", "eigvals", "eigvecs"):
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_undecodable_file_is_named(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match="bad.jpg"):
        ImageStore.from_files([str(bad)], [0], ["bad.jpg"])


def _corner_marked(h, w) -> np.ndarray:
    """Grey image with a red block in its top-left corner (an orientation shows)."""
    a = np.full((h, w, 3), 128, np.uint8)
    a[:h // 3, :w // 3] = (255, 0, 0)
    return a


def test_exif_rotated_jpeg_is_upright_in_the_store_and_the_shard_stages_output(tmp_path):
    """A photo saved sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view):
    the ladder's store and the shard stage (`pipeline.sharding.normalise_image`, whose JPEG
    the torch loaders decode) both hold it upright, with the same pixels up to the shard
    stage's JPEG re-encoding."""
    pytest.importorskip("pyarrow")
    from pipeline.sharding import normalise_image
    from vgg.data.decoding import decode_jpeg

    upright = _corner_marked(48, 32)  # portrait, red block top-left
    stored = np.rot90(upright, 1).copy()  # as the camera stored it: landscape
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    im.save(path, "JPEG", quality=95, exif=exif.tobytes())

    problems = []
    store = ImageStore.from_files([str(path)], [0], ["train/a/photo.jpg"], problems=problems)
    assert (int(store.h_np[0]), int(store.w_np[0])) == (48, 32)
    got = store.image(0).numpy().astype(int)
    assert np.abs(got - upright).mean() < 3 and got[2, 2, 0] > 200 and got[-3, -3, 0] < 160
    assert problems == [("train/a/photo.jpg", "converted", "converted from JPEG RGB EXIF orientation 6")]

    data, rgb, note = normalise_image(path.read_bytes(), 95)
    assert note == "converted from JPEG RGB EXIF orientation 6" and rgb.shape == (48, 32, 3)
    sharded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).permute(1, 2, 0)
    assert np.array_equal(sharded.numpy(), rgb)  # what the torch loaders decode from the shard
    assert np.abs(sharded.numpy().astype(int) - got).mean() < 2


def test_bad_files_are_skipped_and_odd_ones_converted_when_asked(tmp_path):
    """problems=[]: undecodable and empty files are left out and listed with the shard
    stage's reasons, grey/PNG files converted and listed; the rest is as without them."""
    rng = np.random.default_rng(4)
    for split in ("train", "val"):
        write_images(tmp_path, split, "a", [_image(rng, 20, 24) for _ in range(3)])
    write_images(tmp_path, "train", "b", [_image(rng, 22, 18), _image(rng, 16, 16, gray=True)])
    (tmp_path / "train" / "b" / "empty.jpg").write_bytes(b"")
    (tmp_path / "train" / "b" / "junk.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    good = (tmp_path / "train" / "a" / "000.jpg").read_bytes()
    (tmp_path / "train" / "b" / "cut.jpg").write_bytes(good[:len(good) // 2])  # header reads
    _image(rng, 10, 14).save(tmp_path / "val" / "a" / "x.png")
    (tmp_path / "val" / "stray.jpg").write_bytes(good)  # outside a class folder
    (tmp_path / "val" / "b").mkdir()
    (tmp_path / "val" / "b" / "0.jpg").write_bytes(good)

    with pytest.raises(ValueError, match=r"cut\.jpg|empty\.jpg|junk\.jpg"):
        folder_stores(str(tmp_path), "cpu", batch=2)
    problems = []
    classes, train, val = folder_stores(str(tmp_path), "cpu", batch=2, problems=problems)
    assert classes == ["a", "b"]
    assert train.keys == ["train/a/000.jpg", "train/a/001.jpg", "train/a/002.jpg",
                          "train/b/000.jpg", "train/b/001.jpg"]
    assert val.keys == ["val/a/000.jpg", "val/a/001.jpg", "val/a/002.jpg", "val/a/x.png", "val/b/0.jpg"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1]
    for st in (train, val):
        for i, key in enumerate(st.keys):
            assert np.array_equal(st.image(i).numpy(), _pil(tmp_path / key)), key
    by_key = {k: (action, reason) for k, action, reason in problems}
    assert by_key.pop("train/b/empty.jpg") == ("skipped", "empty file")
    assert by_key.pop("train/b/001.jpg") == ("converted", "converted from JPEG L")
    assert by_key.pop("val/a/x.png") == ("converted", "converted from PNG RGB")
    assert by_key.pop("val/stray.jpg") == ("skipped", "file is not in a class folder")
    action, reason = by_key.pop("train/b/junk.jpg")
    assert action == "skipped" and reason.startswith("not a decodable image: ")
    action, reason = by_key.pop("train/b/cut.jpg")  # fails in the decoder, not the header
    assert action == "skipped" and "not a decodable image" in reason
    assert by_key == {}


# ---------------------------------------------------------------- sampler


def test_sampler_equals_interpolate_then_crop():
    rng = np.random.default_rng(1)
    sizes = [(37, 50), (64, 41), (20, 20), (128, 128), (9, 70)]
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    st = ImageStore(torch.from_numpy(np.concatenate([a.ravel() for a in imgs])),
                    [h for h, _ in sizes], [w for _, w in sizes], range(5), list("abcde"))
    c = 16
    for targets in ([(53, 71), (30, 25), (64, 41), (100, 100), (250, 250)],
                    [(16, 21), (112, 72), (20, 20), (112, 112), (16, 124)]):
        idx = torch.arange(5)
        rh = torch.tensor([t[0] for t in targets])
        rw = torch.tensor([t[1] for t in targets])
        y0 = torch.tensor([int(rng.integers(0, r - c + 1)) for r in rh.tolist()])
        x0 = torch.tensor([int(rng.integers(0, r - c + 1)) for r in rw.tolist()])
        mirror = torch.tensor([0, 1, 0, 1, 1])
        h, w = st.heights[idx], st.widths[idx]
        out = sample_windows(st, idx, window_coords(y0, h, rh, c), window_coords(x0, w, rw, c, mirror))
        assert out.shape == (5, 3, c, c) and out.dtype == torch.float32
        for b in range(5):
            ref = _resize64(imgs[b], int(rh[b]), int(rw[b]))[:, y0[b]:y0[b] + c, x0[b]:x0[b] + c]
            ref = ref.flip(-1) if mirror[b] else ref
            assert (out[b].double() - ref).abs().max() < 1e-4
            # torch's float32 interpolate rounds h / rh: within a few thousandths
            ref32 = F.interpolate(torch.from_numpy(imgs[b]).permute(2, 0, 1)[None].float(),
                                  size=(int(rh[b]), int(rw[b])), mode="bilinear", align_corners=False)[0]
            ref32 = ref32[:, y0[b]:y0[b] + c, x0[b]:x0[b] + c]
            assert (out[b] - (ref32.flip(-1) if mirror[b] else ref32)).abs().max() < 1e-2


# ---------------------------------------------------------------- training loader


@pytest.mark.parametrize("channels_last", [False, True])
def test_train_loader_has_the_dali_backends_rows_and_parameters(folder, stores, channels_last):
    train = stores[1]
    spec = _spec(channels_last=channels_last)
    seed, epoch, rank, world, bs, scale = 3, 2, 1, 2, 5, (26, 48)
    loader = MemoryTrainLoader(train, spec, scale, bs, rank=rank, world_size=world, seed=seed,
                               start_epoch=epoch, debug=True)
    n = len(train)
    lo, hi = share_bounds(n, rank, world)
    assert loader.num_samples == hi - lo == 12 and len(loader) == 3
    rows = share_rows(n, rank, world, seed, epoch, block_sizes=[n], window_blocks=spec.window_blocks)
    rng = np.random.default_rng([seed, epoch, TAG_PARAMS, rank])
    batches = list(loader)  # __iter__: start_epoch
    assert [len(b[1]) for b in batches] == [5, 5, 2]
    assert loader.next_epoch == epoch + 1
    for k, (images, labels, info) in enumerate(batches):
        r = rows[k * bs:(k + 1) * bs]
        h, w = train.h_np[r], train.w_np[r]
        p = train_params(rng, h, w, scale, spec)
        assert info["row"].tolist() == r.tolist()
        assert labels.dtype == torch.int64 and labels.tolist() == train.labels[r].tolist()
        for name in ("scale", "y0", "x0", "mirror"):
            assert info[name].tolist() == p[name].tolist(), name
        assert torch.equal(info["shift"], torch.from_numpy(p["shift"]))
        assert images.shape == (len(r), 3, CROP, CROP) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last if channels_last
                                    else torch.contiguous_format)
        rh, rw = resized_hw(h, w, p["scale"])
        for b, row in enumerate(r.tolist()):
            ref = _resize64(_pil(_path(folder, train.keys[row])), int(rh[b]), int(rw[b]))
            y, x = int(p["y0"][b]), int(p["x0"][b])
            ref = ref[:, y:y + CROP, x:x + CROP]
            ref = ref.flip(-1) if p["mirror"][b] else ref
            ref = ref - torch.from_numpy(p["mean"][b]).double()[:, None, None]
            assert (images[b].double() - ref).abs().max() < 1e-3
    again = list(loader.epoch(epoch))  # deterministic
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    other = next(iter(loader.epoch(epoch + 1)))
    assert other[2]["row"].tolist() != batches[0][2]["row"].tolist()


def test_train_loader_ranks_partition_the_split(stores):
    train = stores[1]
    seen = []
    for rank in range(3):
        ld = MemoryTrainLoader(train, _spec(flip=False), 30, 4, rank=rank, world_size=3, seed=1)
        for images, labels in ld.epoch(0):
            assert images.shape[1:] == (3, CROP, CROP)
        seen += [r for _, _, info in MemoryTrainLoader(train, _spec(), 30, 4, rank=rank, world_size=3,
                                                       seed=1, debug=True).epoch(0)
                 for r in info["row"].tolist()]
    assert sorted(seen) == list(range(len(train)))


# ---------------------------------------------------------------- evaluation loaders


def test_center_loader(folder, stores):
    val = stores[2]
    spec, q = _spec(), 30
    ld = MemoryEvalLoader(val, spec, q, 5, mode="center", rank=1, world_size=2)
    lo, hi = share_bounds(len(val), 1, 2)
    assert ld.num_samples == hi - lo and len(ld) == 2
    keys, n = [], 0
    for images, labels, k in ld:
        assert images.shape == (len(k), 3, CROP, CROP)
        rows = list(range(lo + n, lo + n + len(k)))
        n += len(k)
        assert labels.tolist() == val.labels[rows].tolist()
        h, w = val.h_np[rows], val.w_np[rows]
        rh, rw = resized_hw(h, w, np.full(len(rows), q))
        cp = center_params(h, w, q, spec)  # its window start, in source pixels: anchor + roi_start
        for b, row in enumerate(rows):
            y, x = (int(rh[b]) - CROP) // 2, (int(rw[b]) - CROP) // 2
            np.testing.assert_allclose(cp["anchor"][b] + cp["roi_start"][b],
                                       [y * h[b] / rh[b], x * w[b] / rw[b]], atol=1e-4)
            ref = _resize64(_pil(_path(folder, val.keys[row])), int(rh[b]), int(rw[b]))
            ref = ref[:, y:y + CROP, x:x + CROP] - torch.tensor(spec.mean_rgb).double()[:, None, None]
            assert (images[b].double() - ref).abs().max() < 1e-3
        keys += k
    assert keys == val.keys[lo:hi]
    with pytest.raises(ValueError, match="Q=20 < crop"):
        MemoryEvalLoader(val, spec, 20, 5, mode="center")


def _bucket_plan(h, w, q, bs, lo):
    rh, rw = resized_hw(h, w, np.full(len(h), q))
    pending, plan = {}, []
    for i, key in enumerate(zip(rh.tolist(), rw.tolist())):
        pending.setdefault(key, []).append(lo + i)
        if len(pending[key]) == bs:
            plan.append(pending.pop(key))
    return plan + list(pending.values())


def test_dense_and_multicrop_loaders(folder, stores):
    val = stores[2]
    spec, q, bs = _spec(), 32, 2
    dense = MemoryEvalLoader(val, spec, q, bs, mode="dense")
    plan = _bucket_plan(val.h_np, val.w_np, q, bs, 0)
    assert [b.tolist() for b in dense.batches_plan()] == plan and len(dense) == len(plan)
    assert dense.num_samples == len(val)
    assert any(len(b) == bs for b in plan) and any(len(b) < bs for b in plan)
    batches = list(dense)
    keys = []
    for (images, labels, k), rows in zip(batches, plan):
        rh, rw = resized_hw(val.h_np[rows], val.w_np[rows], np.full(len(rows), q))
        assert len(set(zip(rh.tolist(), rw.tolist()))) == 1  # one (H, W) per batch
        assert images.shape == (len(rows), 3, int(rh[0]), int(rw[0])) and images.is_contiguous()
        assert k == [val.keys[r] for r in rows] and labels.tolist() == val.labels[rows].tolist()
        for b, row in enumerate(rows):
            ref = _resize64(_pil(_path(folder, val.keys[row])), int(rh[b]), int(rw[b]))
            ref = ref - torch.tensor(spec.mean_rgb).double()[:, None, None]
            assert (images[b].double() - ref).abs().max() < 1e-3
        keys += k
    assert sorted(keys) == sorted(val.keys)

    multi = MemoryEvalLoader(val, spec, q, bs, mode="multicrop", grid=3, flips=True)
    for (crops, labels, k), (images, _, k2) in zip(multi, batches):
        assert k == k2 and crops.shape == (len(k), 18, 3, CROP, CROP)
        assert torch.equal(crops, grid_crops(images, CROP, 3, True))
    with pytest.raises(ValueError, match="mode"):
        MemoryEvalLoader(val, spec, q, bs, mode="tencrop")


# ---------------------------------------------------------------- PyTorch alone


BLOCK_HOOK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pyarrow", "nvidia", "ray", "mlflow", "pipeline"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, _Block())
"""


def test_memory_loaders_run_with_pytorch_alone(folder):
    code = BLOCK_HOOK + f"""
from vgg.data.augmentation import AugmentSpec
from vgg.data.memory import MemoryEvalLoader, MemoryTrainLoader, folder_stores, rgb_stats
classes, train, val = folder_stores({str(folder)!r}, "cpu")
spec = AugmentSpec.from_stats(rgb_stats(train), crop={CROP})
images, labels = next(iter(MemoryTrainLoader(train, spec, (24, 40), 4).epoch(0)))
crops, _, keys = next(iter(MemoryEvalLoader(val, spec, 32, 4, mode="multicrop")))
assert images.shape == (4, 3, {CROP}, {CROP}) and crops.shape[1:] == (50, 3, {CROP}, {CROP})
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("pyarrow", "nvidia", "ray", "mlflow", "pipeline"))
assert not bad, bad
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
