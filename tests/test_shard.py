"""The shard stage: counts, labels, balanced shards, statistics, bad input."""

from __future__ import annotations

import csv
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ShardConfig
from pipeline.storage import Store
from vgg.data.folders import DatasetError, list_image_folder
from pipeline.sharding import normalise_image, shard
from tests.conftest import write_images


def rand_image(rng, h, w, mode="RGB"):
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    # smooth-ish content so JPEG is realistic
    arr = (arr // 32 * 32).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for cls, n in (("cat", 7), ("dog", 5), ("ant", 4)):
        write_images(root, "train", cls, [rand_image(rng, 20 + i, 30 - i) for i in range(n)])
        write_images(root, "val", cls, [rand_image(rng, 24, 24) for _ in range(2)])
    return root


def read_split(out, split):
    tables = [pq.read_table(out.join(s["file"])) for s in out.read_json("manifest.json")["splits"][split]["shards"]]
    return tables


def run_shard(root, work_dir, **kw):
    store = Store(work_dir)
    out = store.begin("shard", "k")
    manifest = shard(str(root), out, ShardConfig(**kw), log=lambda m: None)
    from pipeline.storage import write_json

    write_json(out.fs, out.join("manifest.json"), manifest)
    return out, manifest


def test_counts_labels_and_balanced_shards(ray_session, folder, work_dir):
    out, m = run_shard(folder, work_dir, rows_per_shard=6)
    assert m["classes"] == ["ant", "cat", "dog"]  # sorted by name; label = index
    assert m["splits"]["train"]["images"] == 16 and m["splits"]["val"]["images"] == 6
    assert m["splits"]["train"]["per_class"] == {"ant": 4, "cat": 7, "dog": 5}
    tables = read_split(out, "train")
    sizes = sorted(t.num_rows for t in tables)
    assert len(tables) == 3 and sizes[-1] - sizes[0] <= 1  # ceil(16/6) shards, balanced
    rows = [r for t in tables for r in t.to_pylist()]
    assert sorted(r["key"] for r in rows) == sorted(
        f"train/{c}/{i:03d}.jpg" for c, n in (("cat", 7), ("dog", 5), ("ant", 4)) for i in range(n)
    )
    for r in rows:
        assert r["label"] == m["classes"].index(r["class_name"])
        assert r["key"].split("/")[1] == r["class_name"]
        im = Image.open(io.BytesIO(r["image"]))
        assert im.format == "JPEG" and im.mode == "RGB" and (im.height, im.width) == (r["height"], r["width"])
    assert out.read_json("classes.json") == ["ant", "cat", "dog"]
    # classes are mixed across shards, not one class per shard
    assert all(len({r["class_name"] for r in t.to_pylist()}) > 1 for t in tables)


def test_statistics_match_numpy(ray_session, folder, work_dir):
    out, _ = run_shard(folder, work_dir)
    px = np.concatenate(
        [
            np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"), dtype=np.float64).reshape(-1, 3)
            for t in read_split(out, "train")
            for r in t.to_pylist()
        ]
    )
    stats = out.read_json("stats.json")
    np.testing.assert_allclose(stats["mean_rgb"], px.mean(0), atol=1e-3)
    cov = np.cov(px.T, bias=True)
    np.testing.assert_allclose(stats["cov_rgb"], cov, atol=1e-3)
    vals, vecs = np.array(stats["eigvals"]), np.array(stats["eigvecs"])
    assert np.all(np.diff(vals) <= 0)
    np.testing.assert_allclose(vecs @ np.diag(vals) @ vecs.T, cov, atol=1e-3)
    np.testing.assert_allclose(np.sort(vals), np.linalg.eigvalsh(cov), atol=1e-3)


def bad_files(root, rng, cls="cat"):
    """One of each kind of bad or odd input, in train/<cls>."""
    d = root / "train" / cls
    good = io.BytesIO()
    rand_image(rng, 40, 40).save(good, "JPEG")
    (d / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.jpg").write_text("this is not an image")
    rand_image(rng, 30, 20).save(d / "png_named.jpg", "PNG")
    rand_image(rng, 30, 20, "CMYK").save(d / "cmyk.jpg", "JPEG")
    rand_image(rng, 30, 20, "L").save(d / "gray.jpg", "JPEG")
    Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16)).save(d / "deep16.png", "PNG")
    (root / "train" / "stray.jpg").write_bytes(good.getvalue())


def dali_decode_all(blobs):
    """Decode every blob with DALI on the CPU; raises if DALI cannot decode one."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(blobs), num_threads=1, device_id=None)
    def pipe():
        enc = fn.external_source(source=lambda: [np.frombuffer(b, np.uint8) for b in blobs], batch=True)
        return fn.decoders.image(enc, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.array(out[i]) for i in range(len(blobs))]


def test_bad_inputs_are_skipped_or_converted(ray_session, folder, work_dir):
    bad_files(folder, np.random.default_rng(1))
    out, m = run_shard(folder, work_dir)
    with open(out.join("skipped.csv")) as f:
        skipped = {r["key"]: r["reason"] for r in csv.DictReader(f)}
    assert set(skipped) == {
        "train/cat/truncated.jpg",
        "train/cat/empty.jpg",
        "train/cat/notes.jpg",
        "train/stray.jpg",
    }
    assert skipped["train/cat/empty.jpg"] == "empty file"
    assert "not a decodable image" in skipped["train/cat/notes.jpg"]
    assert m["skipped"] == 4
    with open(out.join("converted.csv")) as f:
        converted = {r["key"] for r in csv.DictReader(f)}
    assert converted == {"train/cat/png_named.jpg", "train/cat/cmyk.jpg", "train/cat/gray.jpg", "train/cat/deep16.png"}
    rows = [r for t in read_split(out, "train") for r in t.to_pylist()]
    assert len(rows) == 16 + 4
    # DALI (the augment stage's decoder) decodes every stored image, at the recorded size
    decoded = dali_decode_all([r["image"] for r in rows])
    for r, img in zip(rows, decoded):
        assert img.shape == (r["height"], r["width"], 3)


def test_normalise_keeps_valid_jpeg_bytes():
    buf = io.BytesIO()
    rand_image(np.random.default_rng(2), 10, 12).save(buf, "JPEG")
    data, rgb, note = normalise_image(buf.getvalue(), 95)
    assert data == buf.getvalue() and note == "" and rgb.shape == (10, 12, 3)


def test_layout_errors_name_the_path(tmp_path, folder):
    with pytest.raises(DatasetError, match="does not exist"):
        list_image_folder(str(tmp_path / "nope"))
    (folder / "train" / "empty_class").mkdir()
    (folder / "val" / "empty_class").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*train/empty_class is empty"):
        list_image_folder(str(folder))
    (folder / "train" / "empty_class").rmdir()
    with pytest.raises(DatasetError, match=r"classes \['empty_class'\] in .*val are absent from"):
        list_image_folder(str(folder))


def test_test_folder_is_the_validation_split(tmp_path, folder):
    (folder / "val").rename(folder / "test")
    listing = list_image_folder(str(folder))
    assert len(listing.files["val"]) == 6 and listing.files["val"][0][0].startswith("test/")
    (folder / "test").rename(folder / "other")
    with pytest.raises(DatasetError, match=r"no val/ \(or test/\) folder"):
        list_image_folder(str(folder))


def test_odd_names_and_links_are_listed_as_skipped_never_dropped(tmp_path, folder):
    """A file name that is not UTF-8, a broken link, two links pointing at each other and
    a class folder linked into itself: each is a line of the skipped list, not a crash."""
    import os

    cat = folder / "train" / "cat"
    (cat / "ok_link.jpg").symlink_to(cat / os.listdir(cat)[0])  # a good link is followed
    with open(os.fsencode(cat) + b"/\xff\xfe.jpg", "wb") as f:
        f.write(b"not even an image")
    (cat / "loop1.jpg").symlink_to(cat / "loop2.jpg")
    (cat / "loop2.jpg").symlink_to(cat / "loop1.jpg")
    (cat / "broken.jpg").symlink_to(tmp_path / "missing.jpg")
    (cat / "self").symlink_to(cat)
    listing = list_image_folder(str(folder))
    skipped = dict(listing.skipped)
    assert skipped == {
        "train/cat/\\xff\\xfe.jpg": "file name is not valid UTF-8",
        "train/cat/loop1.jpg": "broken symbolic link or link loop",
        "train/cat/loop2.jpg": "broken symbolic link or link loop",
        "train/cat/broken.jpg": "broken symbolic link or link loop",
        "train/cat/self": "folder inside a class folder (not searched)",
    }
    assert "train/cat/ok_link.jpg" in {k for k, _, _ in listing.files["train"]}


def test_subsample_takes_a_seeded_subset_per_class(folder):
    from vgg.data.folders import subsample

    listing = list_image_folder(str(folder))
    small = subsample(listing, {"train": 2, "val": None}, seed=0)
    per_class = {}
    for _, _, c in small.files["train"]:
        per_class[c] = per_class.get(c, 0) + 1
    assert set(per_class.values()) == {2} and small.files["val"] == listing.files["val"]
    assert subsample(listing, {"train": 2}, seed=0) == small
    assert set(small.files["train"]) <= set(listing.files["train"])
