"""Augment stage: DALI training/evaluation loaders on tiny deterministic shards (CPU)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import nvidia.dali.fn as fn
from nvidia.dali.pipeline import Pipeline

from vgg import paper
from vgg.data import augmentation, loaders, shards
from vgg.evaluation import scoring

SCHEMA = pa.schema([("key", pa.string()), ("label", pa.int32()), ("class_name", pa.string()),
                    ("image", pa.binary()), ("height", pa.int32()), ("width", pa.int32()),
                    ("mean_r", pa.float32())])
# (height, width): landscape, portrait, square, very wide, and large (downscaled at S<=56).
SIZES = [(40, 60), (64, 48), (50, 50), (37, 80), (120, 160), (150, 100)]
CROP = 32


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """Deterministic smooth RGB image (sinusoids), so interpolation differences stay small."""
    rng = np.random.default_rng(seed)
    period, phase = rng.uniform(9, 25, 3), rng.uniform(0, 6, 3)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = [np.sin(x / period[0] + phase[0]), np.cos(y / period[1] + phase[1]),
             np.sin((x + y) / period[2] + phase[2])]
    return np.clip(np.stack([128 + 90 * c for c in chans], -1), 0, 255).astype(np.uint8)


def encode(img: np.ndarray, progressive: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95, progressive=progressive)
    return buf.getvalue()


def write_split(folder: Path, n: int, seed: int, files: int = 2, row_group: int = 4) -> None:
    rows = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        rows.append(dict(key=f"{folder.name}/c{i % 3}/{i:04d}.jpg", label=i % 3,
                         class_name=f"c{i % 3}",
                         image=encode(smooth_image(h, w, seed + i), progressive=i % 5 == 0),
                         height=h, width=w, mean_r=0.0))
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f in range(files):
        part = table.slice(bounds[f], bounds[f + 1] - bounds[f])
        pq.write_table(part, folder / f"part-{f}.parquet", row_group_size=row_group)


STATS = {
    "mean_rgb": [121.0, 117.0, 104.0],
    "eigvals": [14000.0, 1200.0, 300.0],
    "eigvecs": np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0].tolist(),
}


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    """Shard dir: train 25 rows (2 files, several row groups), val 13 rows; stats.json."""
    root = tmp_path_factory.mktemp("shard")
    write_split(root / "train", 25, seed=100)
    write_split(root / "val", 13, seed=500, files=1, row_group=5)
    (root / "stats.json").write_text(json.dumps(STATS))
    return root


@pytest.fixture(scope="module")
def spec() -> augmentation.AugmentSpec:
    return augmentation.AugmentSpec.from_stats(STATS, crop=CROP, device="cpu", num_threads=2)


def table(shard: Path, split: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in shards.shard_files(shard, split))


def epoch_batches(loader, epoch):
    return [tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in b)
            for b in loader.epoch(epoch)]


# ---------------------------------------------------------------------- spec


def test_spec_roundtrip_json(spec):
    d = json.loads(json.dumps(spec.to_dict()))
    assert augmentation.AugmentSpec.from_dict(d) == spec
    assert d["crop"] == CROP and d["color_noise_std"] == 0.1 and d["flip"] is True


@pytest.mark.parametrize("bad, match", [
    (dict(crop=0), "crop"),
    (dict(mean_rgb=[1.0, 2.0]), "mean_rgb"),
    (dict(eigvals=[1.0, 2.0, 3.0, 4.0]), "eigvals"),
    (dict(eigvecs=[[1.0, 0.0, 0.0]]), "eigvecs"),
    (dict(eigvals=[1.0, -2.0, 0.0]), "eigvals"),
    (dict(device="tpu"), "device"),
    (dict(interp="nearest"), "interp"),
    (dict(color_noise_std=-0.1), "color_noise_std"),
    (dict(color_noise_std="0.1"), "color_noise_std"),
    (dict(flip="yes"), "flip"),
])
def test_spec_validation(spec, bad, match):
    with pytest.raises(ValueError, match=match):
        augmentation.AugmentSpec.from_dict({**spec.to_dict(), **bad})


def test_spec_unknown_key(spec):
    with pytest.raises(ValueError, match="bogus"):
        augmentation.AugmentSpec.from_dict({**spec.to_dict(), "bogus": 1})


@pytest.mark.parametrize("scale, match", [((64, 48), r"Smin \(64\) must be <= Smax \(48\)"),
                                          (24, r"the crop \(32\) is larger than the smallest scale 24"),
                                          ((30, 40), r"the crop \(32\) is larger than the smallest scale 30"),
                                          ("256", "expected S or")])
def test_bad_scale(shard, spec, scale, match):
    with pytest.raises(ValueError, match=match):
        loaders.build_train_loader(shard, spec, scale, 4)


def test_device_resolution(spec):
    import dataclasses
    assert loaders.resolve_device_id(spec, None) is None  # device="cpu"
    assert loaders.resolve_device_id(dataclasses.replace(spec, device="cpu"), 0) is None
    if not torch.cuda.is_available():
        assert loaders.resolve_device_id(dataclasses.replace(spec, device="auto"), None) is None
        with pytest.raises(ValueError, match="gpu"):
            loaders.resolve_device_id(dataclasses.replace(spec, device="gpu"), None)


def test_scale_helpers():
    assert paper.single_test_scale(256, 224) == 256 and paper.single_test_scale((256, 512), 224) == 384
    assert paper.multi_test_scales(256, 224) == [224, 256, 288]
    assert paper.multi_test_scales(384, 224) == [352, 384, 416]
    assert paper.multi_test_scales((256, 512), 224) == [256, 384, 512]
    rh, rw = augmentation.resized_hw(np.array([375, 500, 10]), np.array([500, 375, 10]),
                          np.array([256, 256, 7]))
    assert rh.tolist() == [256, 341, 7] and rw.tolist() == [341, 256, 7]


# ---------------------------------------------------------------------- shares


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shares_disjoint_complete(world):
    blocks = [4, 4, 1, 5, 5, 3, 7]
    n = sum(blocks)
    for epoch in (0, 1):
        shares = [shards.share_rows(n, r, world, seed=3, epoch=epoch, block_sizes=blocks,
                               window_blocks=2) for r in range(world)]
        allrows = np.concatenate(shares)
        assert sorted(allrows.tolist()) == list(range(n))  # each row exactly once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        expected = [-(-len(s) // 4) for s in shares]
        assert [shards.num_batches(n, r, world, 4) for r in range(world)] == expected


def test_shares_reshuffle_and_determinism():
    a0 = shards.share_rows(100, 1, 3, seed=7, epoch=0)
    assert np.array_equal(a0, shards.share_rows(100, 1, 3, seed=7, epoch=0))
    assert not np.array_equal(a0, shards.share_rows(100, 1, 3, seed=7, epoch=1))
    assert not np.array_equal(a0, shards.share_rows(100, 1, 3, seed=8, epoch=0))
    assert np.array_equal(shards.share_rows(10, 0, 1, 0, 0, shuffle=False), np.arange(10))


def test_shares_read_few_blocks():
    """Two-level order: a rank touches ~1/world of the blocks (+ window edges)."""
    blocks, window, world = [10] * 40, 4, 4
    for rank in range(world):
        rows = shards.share_rows(400, rank, world, seed=1, epoch=2, block_sizes=blocks,
                            window_blocks=window)
        touched = np.unique(rows // 10)
        assert len(touched) <= 40 // world + 2 * window


def test_loader_shares_cover_split(shard, spec):
    n = table(shard, "train").num_rows
    for world in (1, 3):
        rows = []
        for rank in range(world):
            loader = loaders.build_train_loader(shard, spec, 40, 4, rank=rank, world_size=world,
                                          debug=True)
            batches = epoch_batches(loader, 0)
            assert len(batches) == len(loader) == shards.num_batches(n, rank, world, 4)
            rows += [r for b in batches for r in b[2]["row"].tolist()]
        assert sorted(rows) == list(range(n))


# ---------------------------------------------------------------------- training


def test_train_batches(shard, spec):
    loader = loaders.build_train_loader(shard, spec, (32, 48), 8, seed=1, debug=True)
    t = table(shard, "train")
    batches = epoch_batches(loader, 0)
    assert len(batches) == len(loader) == 4  # 25 rows: 8 + 8 + 8 + 1, partial batch kept
    assert [b[0].shape[0] for b in batches] == [8, 8, 8, 1]
    labels = t.column("label").to_numpy()
    for images, lab, info in batches:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, CROP, CROP)
        assert lab.dtype == torch.int64
        assert torch.equal(lab, torch.from_numpy(labels[info["row"].numpy()]).long())
        assert torch.isfinite(images).all()
        assert images.min() >= -130 and images.max() <= 160  # uint8 - mean + a few levels of shift
    assert abs(torch.cat([b[0] for b in batches]).mean().item()) < 40  # roughly zero-mean


def test_channels_last(shard, spec):
    import dataclasses
    loader = loaders.build_train_loader(shard, dataclasses.replace(spec, channels_last=True), 40, 8)
    ref = loaders.build_train_loader(shard, spec, 40, 8)
    images, ref_images = next(iter(loader))[0], next(iter(ref))[0]
    assert images.shape == (8, 3, CROP, CROP)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images, ref_images)
    # the centre crops of per-epoch validation too (they came out (B, H, W, C) before)
    cl = next(iter(loaders.build_center_loader(shard, dataclasses.replace(spec, channels_last=True), 40, 8)))[0]
    plain = next(iter(loaders.build_center_loader(shard, spec, 40, 8)))[0]
    assert cl.shape == (8, 3, CROP, CROP) and torch.equal(cl, plain)


def test_scale_fixed_and_jittered(shard, spec):
    fixed = loaders.build_train_loader(shard, spec, 44, 16, debug=True)
    s = torch.cat([b[2]["scale"] for b in fixed.epoch(0)])
    assert (s == 44).all()
    jit = loaders.build_train_loader(shard, spec, (36, 56), 16, debug=True)
    s = torch.cat([b[2]["scale"] for e in (0, 1) for b in jit.epoch(e)])
    assert s.min() >= 36 and s.max() <= 56 and len(set(s.tolist())) >= 8


def dali_full_resize(jpegs: list[bytes], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Naive DALI reference: decode the whole image, resize it whole to (rh, rw)."""
    size_arr = np.asarray(sizes, np.float32)
    pipe = Pipeline(batch_size=len(jpegs), num_threads=1, device_id=None)
    with pipe:
        j, s = fn.external_source(lambda: [[np.frombuffer(b, np.uint8) for b in jpegs], size_arr],
                                  num_outputs=2, batch=True)
        pipe.set_outputs(fn.resize(fn.decoders.image(j), size=s))
    pipe.build()
    out = pipe.run()[0]
    return [np.array(out[i]) for i in range(len(jpegs))]


def test_roi_decode_matches_naive(shard, spec):
    """ROI decode + resize of the region == decode, resize whole image to S, crop.

    Reached: vs naive DALI, max |diff| <= 1 level (rounding); vs PIL bilinear
    (antialiased when shrinking), mean |diff| ~0.15 levels (asserted < 0.5).
    """
    loader = loaders.build_train_loader(shard, spec, (32, 56), 32, seed=5, debug=True)
    images, _, info = next(iter(loader))
    t = table(shard, "train").take(pa.array(info["row"].numpy()))
    jpegs = t.column("image").to_pylist()
    h, w = t.column("height").to_numpy(), t.column("width").to_numpy()
    rh, rw = augmentation.resized_hw(h, w, info["scale"].numpy())
    assert (np.minimum(rh, rw) == info["scale"].numpy()).all()
    # Undo normalisation and colour shift: back to the uint8 crop.
    mean = torch.tensor(spec.mean_rgb)[None, :, None, None] - info["shift"][:, :, None, None]
    got = (images + mean).permute(0, 2, 3, 1).numpy()
    naive = dali_full_resize(jpegs, list(zip(rh.tolist(), rw.tolist())))
    pil_diffs = []
    for i in range(len(jpegs)):
        y, x = int(info["y0"][i]), int(info["x0"][i])
        ref = naive[i][y:y + CROP, x:x + CROP].astype(np.float32)
        pil = np.asarray(Image.open(io.BytesIO(jpegs[i])).convert("RGB").resize(
            (int(rw[i]), int(rh[i])), Image.BILINEAR))[y:y + CROP, x:x + CROP].astype(np.float32)
        if info["mirror"][i]:
            ref, pil = ref[:, ::-1], pil[:, ::-1]
        assert np.abs(got[i] - ref).max() <= 1.01, i
        pil_diffs.append(np.abs(got[i] - pil).mean())
    assert np.mean(pil_diffs) < 0.5 and max(pil_diffs) < 1
    assert info["mirror"].any() and not info["mirror"].all()


def test_pca_noise_covariance(spec):
    rng = np.random.default_rng(0)
    n = 40000
    shifts = augmentation.pca_shift(rng, n, spec)
    vecs, vals = np.asarray(STATS["eigvecs"]), np.asarray(STATS["eigvals"])
    expected = vecs @ np.diag((spec.color_noise_std * vals / 255.0) ** 2) @ vecs.T
    emp = np.cov(shifts.T)
    # Sample covariance of n Gaussian draws: relative error ~ sqrt(2/n) ~ 0.7%.
    assert np.linalg.norm(emp - expected) / np.linalg.norm(expected) < 0.03
    assert np.abs(shifts.mean(0)).max() < 0.05 * np.sqrt(expected.diagonal()).max()
    assert 3 < np.sqrt(expected[0, 0] + expected[1, 1] + expected[2, 2]) < 10  # a few levels


def test_pca_noise_applied_in_pipeline(shard, spec):
    """Same seed with and without noise: the outputs differ exactly by the per-image RGB shift."""
    import dataclasses
    noisy = loaders.build_train_loader(shard, spec, 40, 8, seed=2, debug=True)
    clean = loaders.build_train_loader(shard, dataclasses.replace(spec, color_noise_std=0.0), 40, 8,
                                 seed=2, debug=True)
    (a, _, info), (b, _, info0) = next(iter(noisy)), next(iter(clean))
    assert torch.equal(info["row"], info0["row"]) and (info0["shift"] == 0).all()
    diff = a - b
    assert torch.allclose(diff, info["shift"][:, :, None, None].expand_as(diff), atol=1e-4)
    assert info["shift"].abs().max() > 0.5


def test_determinism(shard, spec):
    first = epoch_batches(loaders.build_train_loader(shard, spec, (32, 48), 8, seed=9), 1)
    again = epoch_batches(loaders.build_train_loader(shard, spec, (32, 48), 8, seed=9), 1)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(first, again))
    loader = loaders.build_train_loader(shard, spec, (32, 48), 8, seed=9)
    other = epoch_batches(loader, 2)
    assert not torch.equal(first[0][0], other[0][0])
    # Abandoning an epoch midway, then asking for epoch 1 again, gives the same batches.
    next(iter(loader.epoch(0)))
    repeat = epoch_batches(loader, 1)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(first, repeat))


def test_shards_read_through_a_remote_filesystem(shard, spec, monkeypatch):
    """A work_dir on s3:// etc.: shards are listed and read through pyarrow.fs, not paths.
    "fake://" is the shard dir behind a non-local pyarrow filesystem (SubTreeFileSystem)."""
    import pyarrow.fs as pafs

    from pipeline import storage

    remote = pafs.SubTreeFileSystem(str(shard.parent), pafs.LocalFileSystem())
    opened = []

    def resolve(uri):
        if uri.startswith("fake://"):
            opened.append(uri)
            return remote, uri[len("fake://"):]
        return storage.resolve_uri(uri)

    monkeypatch.setattr(shards, "resolve_uri", resolve)
    uri = f"fake://{shard.name}"
    files = shards.shard_files(uri, "train")
    assert files == [f"fake://{shard.name}/train/{Path(f).name}" for f in shards.shard_files(shard, "train")]
    got = epoch_batches(loaders.build_train_loader(uri, spec, (32, 48), 8, seed=3), 0)
    want = epoch_batches(loaders.build_train_loader(shard, spec, (32, 48), 8, seed=3), 0)
    assert len(got) == len(want) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
                                         for x, y in zip(got, want))
    assert any(u.endswith(".parquet") for u in opened)  # the files were opened through it
    with pytest.raises(ValueError, match="no Parquet files"):
        shards.shard_files("fake://nowhere", "train")


def test_undecodable_sample_names_file_and_row(tmp_path, spec):
    t = table_of(tmp_path)
    images = t.column("image").to_pylist()
    images[5] = b"\xff\xd8 this is not a JPEG" * 4
    bad = t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    path = tmp_path / "bad.parquet"
    pq.write_table(bad, path, row_group_size=4)
    loader = loaders.build_train_loader([path], spec, 40, 4)
    with pytest.raises(RuntimeError, match=rf"shard file {path} row 5\b"):
        for _ in loader.epoch(0):
            pass


def table_of(tmp_path: Path) -> pa.Table:
    write_split(tmp_path / "t", 8, seed=900, files=1)
    return pq.read_table(tmp_path / "t" / "part-0.parquet")


# ---------------------------------------------------------------------- evaluation


def test_grid_positions():
    assert scoring.grid_positions(100, 32, 1).tolist() == [34]  # centre
    pos = scoring.grid_positions(100, 32, 5)
    assert pos[0] == 0 and pos[-1] == 100 - 32 and len(pos) == 5 and np.all(np.diff(pos) > 0)
    with pytest.raises(ValueError):
        scoring.grid_positions(20, 32, 5)


def test_grid_crops():
    img = torch.arange(2 * 3 * 40 * 50, dtype=torch.float32).reshape(2, 3, 40, 50)
    crops = scoring.grid_crops(img, 32, 5, flips=True)
    assert crops.shape == (2, 50, 3, 32, 32)
    assert torch.equal(crops[:, 0], img[:, :, :32, :32])  # top-left corner
    assert torch.equal(crops[:, 24], img[:, :, -32:, -32:])  # bottom-right corner
    assert torch.equal(crops[:, 25 + 7], crops[:, 7].flip(-1))
    assert torch.equal(scoring.grid_crops(img, 32, 1, flips=False)[:, 0], img[:, :, 4:36, 9:41])


def test_eval_dense_and_multicrop(shard, spec):
    q = 40
    val = table(shard, "val")
    key_to_label = dict(zip(val.column("key").to_pylist(), val.column("label").to_pylist()))
    dense = loaders.build_eval_loader(shard, spec, q, 4, mode="dense")
    seen = []
    batches = list(dense)
    assert len(batches) == len(dense)
    for images, labels, keys in batches:
        assert images.dim() == 4 and min(images.shape[2:]) == q and len(keys) == images.shape[0]
        assert [key_to_label[k] for k in keys] == labels.tolist()
        seen += keys
    assert sorted(seen) == sorted(key_to_label)
    multi = loaders.build_eval_loader(shard, spec, q, 4, mode="multicrop", grid=2, flips=True)
    for (crops, labels, keys), (images, _, keys2) in zip(multi, batches):
        assert keys == keys2 and crops.shape == (len(keys), 8, 3, CROP, CROP)
        assert torch.equal(crops[:, 3], images[:, :, -CROP:, -CROP:])
    # Centre crops (ROI decode) == the centre of the dense image, up to rounding.
    center = loaders.build_center_loader(shard, spec, q, 5)
    dense_by_key = {k: im for images, _, keys in batches for k, im in zip(keys, images)}
    n = 0
    for images, labels, keys in center:
        assert images.shape[1:] == (3, CROP, CROP)
        for k, im in zip(keys, images):
            full = dense_by_key[k]
            y, x = (full.shape[1] - CROP) // 2, (full.shape[2] - CROP) // 2
            assert (im - full[:, y:y + CROP, x:x + CROP]).abs().max() <= 1.01
            n += 1
    assert n == val.num_rows


def test_eval_shares_and_errors(shard, spec):
    keys = []
    for rank in range(2):
        loader = loaders.build_center_loader(shard, spec, 36, 4, rank=rank, world_size=2)
        keys += [k for _, _, ks in loader for k in ks]
    assert len(keys) == len(set(keys)) == table(shard, "val").num_rows
    loader = loaders.build_center_loader(shard, spec, 36, 4)  # a second pass reuses the pipeline
    first, second = ([(im.clone(), ks) for im, _, ks in loader] for _ in range(2))
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, second))
    with pytest.raises(ValueError, match="Q=30 < crop=32"):
        loaders.build_eval_loader(shard, spec, 30, 4, mode="multicrop")
    with pytest.raises(ValueError, match="mode"):
        loaders.build_eval_loader(shard, spec, 40, 4, mode="tencrop")


# ---------------------------------------------------------------------- diagnostics


def test_sample_grid_and_one_epoch(shard, spec):
    grid = loaders.sample_grid(shard, spec, (32, 48), n=6, cols=3, pad=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 * (CROP + 2) + 2, 3 * (CROP + 2) + 2, 3)
    assert grid.std() > 10  # real image content, not a constant
    loader = loaders.build_train_loader(shard, spec, 40, 8)
    n = sum(images.shape[0] for images, _ in loader.epoch(0))
    assert n == loader.num_samples > 0


def test_stage_spec_and_checks(shard):
    """The augment stage's pieces: the spec from config + statistics, and the pipeline checks."""
    from pipeline.config import AugmentConfig

    spec = augmentation.spec_from_config(AugmentConfig(crop=CROP, device="cpu", num_threads=1), STATS)
    assert spec.crop == CROP and spec.mean_rgb == tuple(STATS["mean_rgb"]) and spec.device == "cpu"
    assert augmentation.AugmentSpec.from_dict(spec.to_dict()) == spec
    rates = loaders.check_pipelines(str(shard), spec, (32, 48), batches=2, batch_size=4, seed=0, log=lambda m: None)
    assert set(rates) == {"train", "center", "dense", "multicrop"} and all(r > 0 for r in rates.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (mixed decoding)")
def test_gpu_pipeline_matches_cpu(shard, spec):
    """device_id=int: the same pipeline, "mixed" decoding: CUDA tensors ~ the CPU result."""
    import dataclasses
    gpu_spec = dataclasses.replace(spec, device="gpu")
    gpu = loaders.build_train_loader(shard, gpu_spec, (32, 56), 8, seed=4, device_id=0, debug=True)
    cpu = loaders.build_train_loader(shard, spec, (32, 56), 8, seed=4, debug=True)
    for (g, gl, gi), (c, cl, ci) in zip(gpu.epoch(0), cpu.epoch(0)):
        assert g.is_cuda and gl.is_cuda and g.shape == c.shape
        assert torch.equal(gl.cpu(), cl) and torch.equal(gi["scale"], ci["scale"])
        diff = (g.cpu() - c).abs()
        assert diff.mean() < 1.0 and diff.max() < 12  # nvJPEG vs libjpeg-turbo IDCT, GPU resize
    dense = loaders.build_eval_loader(shard, gpu_spec, 40, 4, mode="multicrop", grid=2, device_id=0)
    crops, labels, keys = next(iter(dense))
    assert crops.is_cuda and crops.shape[1:] == (8, 3, CROP, CROP) and len(keys) == len(labels)
