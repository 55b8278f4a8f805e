"""ImageNet's layouts (`data.layout`: ilsvrc2012, kaggle) on tiny fakes made here: the
official archives (a tar of per-class tars, the flat val tar, a devkit tar.gz with a real
meta.mat) and their extracted forms, and the Kaggle copy. Checked: the class index (sorted
wnids, not the devkit's ILSVRC2012_ID order), each image's label (the class is the image's
colour), byte ranges read in place, CMYK and PNG-named-.JPEG conversion, skipped entries,
and every error message."""

from __future__ import annotations

import csv
import io
import os
import shutil
import tarfile

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ConfigError, PipelineConfig, ShardConfig, load_config, validate
from pipeline.storage import Store, write_json
from tests.conftest import DEMO, write_images
from vgg.data import imagenet
from vgg.data.folders import DatasetError, list_image_folder
from vgg.data.layouts import list_dataset
from pipeline.sharding import _read, shard
from vgg.data.folders import subsample

# ILSVRC2012_ID 1, 2, 3 in this order: not sorted by wnid, on purpose; 4 is an inner node
DEVKIT_ORDER = ["n00000002", "n00000003", "n00000001"]
SORTED = sorted(DEVKIT_ORDER)
WORDS = {"n00000001": "tench, Tinca tinca", "n00000002": "goldfish, Carassius auratus",
         "n00000003": "great white shark, white shark, man-eater"}
COLOURS = {"n00000001": (220, 40, 40), "n00000002": (40, 200, 40), "n00000003": (40, 40, 220)}
TRAIN_PER_CLASS = 3
VAL_TRUTH = ["n00000003", "n00000001", "n00000002", "n00000001", "n00000003", "n00000002"]
CMYK = {"train/n00000001/n00000001_1.JPEG", "val/ILSVRC2012_val_00000002.JPEG"}
PNG = {"train/n00000003/n00000003_2.JPEG", "val/ILSVRC2012_val_00000005.JPEG"}


def image_bytes(key: str, wnid: str, i: int) -> bytes:
    """A solid image of the class's colour (sizes vary); CMYK JPEG or PNG for some keys."""
    im = Image.new("RGB", (24 + 4 * i, 20 + 3 * (i % 3)), COLOURS[wnid])
    buf = io.BytesIO()
    if key in CMYK:
        im.convert("CMYK").save(buf, "JPEG", quality=95)
    elif key in PNG:
        im.save(buf, "PNG")
    else:
        im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def truth() -> dict[str, tuple[str, bytes]]:
    """key -> (wnid, file bytes) of every image of the fake."""
    out = {}
    for wnid in DEVKIT_ORDER:
        for i in range(TRAIN_PER_CLASS):
            key = f"train/{wnid}/{wnid}_{i}.JPEG"
            out[key] = (wnid, image_bytes(key, wnid, i))
    for i, wnid in enumerate(VAL_TRUTH, 1):
        key = f"val/ILSVRC2012_val_{i:08d}.JPEG"
        out[key] = (wnid, image_bytes(key, wnid, i))
    return out


TRUTH = truth()


def tar_bytes(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


def meta_mat(synsets: list[tuple[int, str, str, int]]) -> bytes:
    """meta.mat in the devkit's layout: a struct array `synsets` (n x 1) with the devkit's
    fields, written by scipy (torchvision reads it with loadmat(squeeze_me=True))."""
    import scipy.io as sio

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    arr = np.zeros((len(synsets), 1), dtype=[(f, "O") for f in fields])
    for j, (ident, wnid, words, children) in enumerate(synsets):
        kids = np.arange(1, children + 1).reshape(1, -1) if children else np.zeros((1, 0))
        arr[j, 0] = (ident, wnid, words, f"gloss of {wnid}", children, kids, int(children > 0), 0 if children else 3)
    buf = io.BytesIO()
    sio.savemat(buf, {"synsets": arr})
    return buf.getvalue()


def devkit_files(truth_lines: list[int] | None = None, extra_leaf: bool = False) -> dict[str, bytes]:
    synsets = [(i, w, WORDS[w], 0) for i, w in enumerate(DEVKIT_ORDER, 1)]
    if extra_leaf:
        synsets.append((4, "n00000004", "extra", 0))
    synsets.append((len(synsets) + 1, "n09999999", "inner node", 2))  # not a class: num_children > 0
    lines = truth_lines if truth_lines is not None else [DEVKIT_ORDER.index(w) + 1 for w in VAL_TRUTH]
    return {
        "ILSVRC2012_devkit_t12/data/meta.mat": meta_mat(synsets),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": "".join(f"{n}\n" for n in lines).encode(),
        "ILSVRC2012_devkit_t12/readme.txt": b"devkit",
    }


def write_tree(root, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def class_tar(wnid: str, strays: bool) -> bytes:
    members = {k.split("/")[-1]: b for k, (w, b) in TRUTH.items() if k.startswith(f"train/{wnid}/")}
    if strays:
        return tar_bytes({**members, "notes.txt": b"not an image"}, links={"link.JPEG": f"{wnid}_0.JPEG"})
    return tar_bytes(members)


def val_members() -> dict[str, bytes]:
    return {k.split("/")[-1]: b for k, (_, b) in TRUTH.items() if k.startswith("val/")}


def make_ilsvrc(root, form: str, devkit: dict[str, bytes] | None = None):
    """form: "archives" (the three official files), "class_tars" (train/<wnid>.tar, flat val/,
    extracted devkit), "folders" (train/<wnid>/, flat val/, extracted devkit)."""
    root.mkdir(parents=True)
    devkit = devkit or devkit_files()
    if form == "archives":
        outer = {f"{w}.tar": class_tar(w, strays=(w == "n00000002")) for w in DEVKIT_ORDER}
        (root / imagenet.TRAIN_TAR).write_bytes(tar_bytes({**outer, "README.txt": b"x"}))
        (root / imagenet.VAL_TAR).write_bytes(tar_bytes({**val_members(), "LICENSE.txt": b"x"}))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for name, data in devkit.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        (root / imagenet.DEVKIT_TAR).write_bytes(buf.getvalue())
        return root
    write_tree(root, devkit)
    if form == "class_tars":
        for w in DEVKIT_ORDER:
            write_tree(root, {f"train/{w}.tar": class_tar(w, strays=False)})
    else:
        write_tree(root, {k: b for k, (_, b) in TRUTH.items() if k.startswith("train/")})
        write_tree(root, {"train/n00000002/notes.txt": b"not an image"})
    write_tree(root, {f"val/{n}": b for n, b in val_members().items()})
    write_tree(root, {"val/LICENSE.txt": b"x", "train/README.txt": b"x"})
    return root


def make_kaggle(root, csv_rows: list[tuple[str, str]] | None = None, mapping: list[str] | None = None):
    """The Kaggle copy: root/ILSVRC/Data/CLS-LOC/{train,val}, LOC_val_solution.csv and
    LOC_synset_mapping.txt (in the devkit's, unsorted, order)."""
    cls_loc = root / "ILSVRC" / "Data" / "CLS-LOC"
    write_tree(cls_loc, {k: b for k, (_, b) in TRUTH.items()})
    write_tree(cls_loc, {"train/n00000002/notes.txt": b"not an image", "val/LICENSE.txt": b"x",
                         "test/ILSVRC2012_test_00000001.JPEG": b"unlabelled, not read"})
    if csv_rows is None:
        csv_rows = [(k[4:-5], f"{w} 1 2 10 12 {w} 3 4 9 9") for k, (w, _) in TRUTH.items() if k.startswith("val/")]
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        csv.writer(f).writerows([("ImageId", "PredictionString"), *csv_rows])
    lines = mapping if mapping is not None else [f"{w} {WORDS[w]}" for w in DEVKIT_ORDER]
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{line}\n" for line in lines))
    return root


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    base = tmp_path_factory.mktemp("imagenet")
    out = {form: (make_ilsvrc(base / form, form), "ilsvrc2012") for form in ("archives", "class_tars", "folders")}
    kaggle = make_kaggle(base / "kaggle")
    out["kaggle"] = (kaggle, "kaggle")
    out["kaggle_cls_loc"] = (kaggle / "ILSVRC" / "Data" / "CLS-LOC", "kaggle")
    return out


FORMS = ["archives", "class_tars", "folders", "kaggle", "kaggle_cls_loc"]

SKIPPED = {
    "archives": {
        ("ILSVRC2012_img_train.tar/README.txt", "not a per-class archive <wnid>.tar"),
        ("train/n00000002/notes.txt", imagenet.NOT_IMAGE),
        ("train/n00000002/link.JPEG", "not a regular file in the archive (a link)"),
        ("val/LICENSE.txt", imagenet.NOT_IMAGE),
    },
    "class_tars": {
        ("train/README.txt", "not a per-class archive <wnid>.tar or class folder <wnid>/"),
        ("val/LICENSE.txt", imagenet.NOT_IMAGE),
    },
    "folders": {
        ("train/README.txt", "not a per-class archive <wnid>.tar or class folder <wnid>/"),
        ("train/n00000002/notes.txt", imagenet.NOT_IMAGE),
        ("val/LICENSE.txt", imagenet.NOT_IMAGE),
    },
    "kaggle": {("train/n00000002/notes.txt", imagenet.NOT_IMAGE), ("val/LICENSE.txt", imagenet.NOT_IMAGE)},
}
SKIPPED["kaggle_cls_loc"] = SKIPPED["kaggle"]


# ------------------------------------------------------------------ listing


@pytest.mark.parametrize("form", FORMS)
def test_every_form_lists_the_same_images_labels_and_sorted_classes(fakes, form):
    root, layout = fakes[form]
    listing = list_dataset(str(root), layout)
    assert listing.classes == SORTED == ["n00000001", "n00000002", "n00000003"]
    assert listing.class_words == WORDS
    rows = {k: c for split in ("train", "val") for k, _, c in listing.files[split]}
    assert rows == {k: w for k, (w, _) in TRUTH.items()}
    assert all(k.startswith(split + "/") for split in ("train", "val") for k, _, _ in listing.files[split])
    assert set(listing.skipped) == SKIPPED[form]
    assert subsample(listing, {"train": 1}, seed=0).class_words == WORDS
    # every image's bytes, read the way the shard stage's workers read them
    fs = pafs.LocalFileSystem()
    for split in ("train", "val"):
        for key, path, _ in listing.files[split]:
            assert _read(fs, path) == TRUTH[key][1], key
    if form == "archives":
        assert all(p.startswith("tar://") for s in ("train", "val") for _, p, _ in listing.files[s])


def test_the_fake_devkit_is_what_torchvisions_parser_reads(fakes, tmp_path, monkeypatch):
    """torchvision's parse_devkit_archive checks the md5 of the real file (skipped here) and
    writes meta.bin into its root; on our fake it must agree with our listing."""
    from torchvision.datasets import imagenet as tv

    monkeypatch.setattr(tv, "_verify_archive", lambda *a, **k: None)
    shutil.copy(fakes["archives"][0] / imagenet.DEVKIT_TAR, tmp_path / imagenet.DEVKIT_TAR)
    tv.parse_devkit_archive(str(tmp_path))
    wnid_to_classes, val_wnids = tv.load_meta_file(str(tmp_path))
    assert wnid_to_classes == {w: tuple(WORDS[w].split(", ")) for w in DEVKIT_ORDER}
    assert val_wnids == VAL_TRUTH
    listing = list_dataset(str(fakes["archives"][0]), "ilsvrc2012")
    assert [c for _, _, c in listing.files["val"]] == val_wnids


def test_archive_member_paths(tmp_path):
    data = tar_bytes({"a.JPEG": b"0123456789"})
    (tmp_path / "x.tar").write_bytes(data)
    off = data.index(b"0123456789")
    path = imagenet.member_path(str(tmp_path / "x.tar"), off, 10)
    assert path == f"tar://{tmp_path}/x.tar?offset={off}&size=10"
    assert imagenet.parse_member_path(path) == (f"{tmp_path}/x.tar", off, 10)
    fs = pafs.LocalFileSystem()
    assert _read(fs, path) == b"0123456789"
    assert _read(fs, str(tmp_path / "x.tar")) == data  # plain paths keep working
    with pytest.raises(OSError, match="truncated archive"):
        _read(fs, imagenet.member_path(str(tmp_path / "x.tar"), len(data) - 4, 10))
    with pytest.raises(ValueError, match="malformed"):
        imagenet.parse_member_path("tar:///x.tar?offset=a")


def test_folders_layout_is_unchanged(tmp_path):
    write_images(tmp_path / "d", "train", "b", [Image.new("RGB", (8, 8))] * 2)
    write_images(tmp_path / "d", "val", "b", [Image.new("RGB", (8, 8))])
    assert list_dataset(str(tmp_path / "d"), "folders") == list_image_folder(str(tmp_path / "d"))
    assert list_dataset(str(tmp_path / "d")).class_words is None
    with pytest.raises(DatasetError, match=r"data.layout: must be one of \['folders', 'ilsvrc2012', 'kaggle'\]"):
        list_dataset(str(tmp_path / "d"), "imagenet")


def test_config_key():
    assert PipelineConfig().data.layout == "folders"
    assert load_config(DEMO, ["data.layout=ilsvrc2012", "data.root=/data/imagenet"]).data.layout == "ilsvrc2012"
    with pytest.raises(ConfigError, match=r"data.layout: must be one of \['folders', 'ilsvrc2012', 'kaggle'\], got 'tars'"):
        load_config(DEMO, ["data.layout=tars"])
    with pytest.raises(ConfigError, match="data.layout: kaggle needs data.root"):
        load_config(DEMO, ["data.layout=kaggle"])
    cfg = PipelineConfig()
    cfg.data.layout = "x"
    with pytest.raises(ConfigError, match="data.layout: must be one of"):
        validate(cfg)


# ------------------------------------------------------------------ errors


def error(root, layout="ilsvrc2012") -> str:
    with pytest.raises(DatasetError) as e:
        list_dataset(str(root), layout)
    return str(e.value)


GT = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
META = "ILSVRC2012_devkit_t12/data/meta.mat"


@pytest.mark.parametrize("form", ["archives", "folders"])
def test_label_without_image(tmp_path, form):
    lines = [DEVKIT_ORDER.index(w) + 1 for w in VAL_TRUTH] + [1, 2]  # labels for images 7 and 8
    msg = error(make_ilsvrc(tmp_path / "d", form, devkit_files(lines)))
    assert "2 label(s) in" in msg and "ILSVRC2012_validation_ground_truth.txt name no image" in msg
    assert "line 7 (ILSVRC2012_val_00000007.JPEG)" in msg


def test_image_without_label(tmp_path):
    lines = [DEVKIT_ORDER.index(w) + 1 for w in VAL_TRUTH][:5]  # image 6 has no label
    msg = error(make_ilsvrc(tmp_path / "d", "archives", devkit_files(lines)))
    assert "1 validation image(s) in" in msg and "ILSVRC2012_img_val.tar have no label in" in msg
    assert "ILSVRC2012_val_00000006.JPEG" in msg and GT in msg


def test_label_that_is_not_a_class(tmp_path):
    lines = [DEVKIT_ORDER.index(w) + 1 for w in VAL_TRUTH]
    lines[2] = 5  # the inner node's id
    msg = error(make_ilsvrc(tmp_path / "d", "folders", devkit_files(lines)))
    assert f"{GT} line 3: ILSVRC2012_ID 5 is not a class of" in msg
    lines[2] = "three"
    assert "line 3: expected one ILSVRC2012_ID (an integer), got 'three'" in error(
        make_ilsvrc(tmp_path / "e", "folders", devkit_files(lines)))


def test_devkit_that_does_not_parse_or_has_the_wrong_number_of_classes(tmp_path):
    bad = {**devkit_files(), META: b"this is not a MATLAB file"}
    msg = error(make_ilsvrc(tmp_path / "a", "archives", bad))
    assert f"ILSVRC2012_devkit_t12.tar.gz: {META} does not parse as the devkit's meta.mat" in msg
    msg = error(make_ilsvrc(tmp_path / "b", "folders", devkit_files(extra_leaf=True)))
    assert "wrong number of classes" in msg and "meta.mat has 4 classes" in msg and "training data 3" in msg
    assert "without training images: n00000004" in msg
    no_gt = {k: v for k, v in devkit_files().items() if k != GT}
    assert "has no ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt" in error(
        make_ilsvrc(tmp_path / "c", "archives", no_gt))
    root = make_ilsvrc(tmp_path / "d", "folders")
    shutil.rmtree(root / "ILSVRC2012_devkit_t12")
    assert "no devkit in" in error(root) and "ILSVRC2012_devkit_t12.tar.gz" in error(root)


def test_training_class_absent_from_the_devkit(tmp_path):
    root = make_ilsvrc(tmp_path / "d", "folders")
    write_tree(root, {"train/n00000042/n00000042_0.JPEG": TRUTH["train/n00000001/n00000001_0.JPEG"][1]})
    msg = error(root)
    assert "1 training class(es) are not in" in msg and "meta.mat: n00000042" in msg


def test_half_extracted_class_and_broken_archives(tmp_path):
    root = make_ilsvrc(tmp_path / "a", "class_tars")
    write_tree(root, {"train/n00000001/n00000001_0.JPEG": b"x"})
    msg = error(root)
    assert "holds both n00000001.tar and n00000001/ (an interrupted extraction?)" in msg
    # a train tar cut short at a member boundary: tarfile alone would stop silently there
    root = make_ilsvrc(tmp_path / "b", "archives")
    data = (root / imagenet.TRAIN_TAR).read_bytes()
    first = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[0]
    (root / imagenet.TRAIN_TAR).write_bytes(data[: first.offset_data + first.size + (-first.size % 512)])
    assert "ILSVRC2012_img_train.tar is truncated or corrupt" in error(root)
    (root / imagenet.TRAIN_TAR).write_bytes(b"garbage" * 100)
    assert "ILSVRC2012_img_train.tar is not a readable tar archive" in error(root)


def test_val_arranged_in_class_folders_points_to_the_folders_layout(tmp_path):
    root = make_ilsvrc(tmp_path / "d", "folders")
    shutil.rmtree(root / "val")
    write_tree(root, {f"val/{w}/{k.split('/')[-1]}": b for k, (w, b) in TRUTH.items() if k.startswith("val/")})
    assert "use data.layout: folders" in error(root)


def test_kaggle_errors(tmp_path):
    rows = [(k[4:-5], f"{w} 1 2 3 4") for k, (w, _) in TRUTH.items() if k.startswith("val/")]
    msg = error(make_kaggle(tmp_path / "a", csv_rows=rows + [("ILSVRC2012_val_00000042", "n00000001 1 2 3 4")]), "kaggle")
    assert "1 label(s) in" in msg and "LOC_val_solution.csv name no image" in msg and "ImageId ILSVRC2012_val_00000042" in msg
    msg = error(make_kaggle(tmp_path / "b", csv_rows=rows[1:]), "kaggle")
    assert "1 validation image(s)" in msg and "have no label in" in msg and "ILSVRC2012_val_00000001.JPEG" in msg
    msg = error(make_kaggle(tmp_path / "c", csv_rows=rows + [("x", "n00000077 1 2 3 4")]), "kaggle")
    assert "LOC_val_solution.csv line 8: 'n00000077' (for x) is not a class of LOC_synset_mapping.txt" in msg
    mapping = [f"{w} {WORDS[w]}" for w in DEVKIT_ORDER] + ["n00000004 extra"]
    msg = error(make_kaggle(tmp_path / "d", mapping=mapping), "kaggle")
    assert "wrong number of classes" in msg and "LOC_synset_mapping.txt has 4 classes" in msg
    msg = error(make_kaggle(tmp_path / "e", mapping=["tench"]), "kaggle")
    assert "LOC_synset_mapping.txt line 1: expected '<wnid> <words>'" in msg
    root = make_kaggle(tmp_path / "f")
    os.remove(root / "LOC_val_solution.csv")
    msg = error(root, "kaggle")
    assert "LOC_val_solution.csv and LOC_synset_mapping.txt not found together in" in msg
    assert "holds neither ILSVRC/Data/CLS-LOC/ nor train/ and val/" in error(tmp_path / "f" / "ILSVRC", "kaggle")
    assert "does not exist" in error(tmp_path / "nowhere", "kaggle")


# ------------------------------------------------------------------ sharded end to end


def run_shard(root, layout, work_dir, key):
    out = Store(work_dir).begin("shard", key)
    m = shard(str(root), out, ShardConfig(rows_per_shard=4), log=lambda m: None, layout=layout)
    write_json(out.fs, out.join("manifest.json"), m)
    return out, m


def shard_rows(out, m, split):
    return [r for s in m["splits"][split]["shards"] for r in pq.read_table(out.join(s["file"])).to_pylist()]


def csv_rows(out, name):
    with open(out.join(name)) as f:
        return list(csv.reader(f))[1:]


@pytest.mark.parametrize("form", ["archives", "class_tars", "kaggle", "kaggle_cls_loc"])
def test_sharded_end_to_end(ray_session, fakes, work_dir, form):
    """Shards of the archives (read in place) and of the Kaggle copy: the sorted class
    index, every label (the image's colour), CMYK and PNG converted, skipped entries, the
    class words; the same rows, shards and statistics as the extracted folders."""
    root, layout = fakes[form]
    out, m = run_shard(root, layout, work_dir, form)
    assert m["layout"] == layout and m["classes"] == SORTED == out.read_json("classes.json")
    assert out.read_json("class_words.json") == WORDS and "class_words.json" in m["index_files"]
    for split in ("train", "val"):
        rows = shard_rows(out, m, split)
        assert sorted(r["key"] for r in rows) == sorted(k for k in TRUTH if k.startswith(split + "/"))
        for r in rows:
            wnid = TRUTH[r["key"]][0]
            assert r["class_name"] == wnid and r["label"] == SORTED.index(wnid)
            im = Image.open(io.BytesIO(r["image"]))
            assert im.format == "JPEG" and im.mode == "RGB"
            mean = np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(0)
            assert np.abs(mean - COLOURS[wnid]).max() < 8, (r["key"], mean)  # the colour is the class
    converted = dict(csv_rows(out, "converted.csv"))
    assert set(converted) == CMYK | PNG
    assert all("CMYK" in converted[k] for k in CMYK) and all("PNG" in converted[k] for k in PNG)
    assert {tuple(r) for r in csv_rows(out, "skipped.csv")} == SKIPPED[form]

    ref, mref = run_shard(fakes["folders"][0], "ilsvrc2012", work_dir, form + "-ref")
    for split in ("train", "val"):
        assert shard_rows(out, m, split) == shard_rows(ref, mref, split)
    a, b = out.read_json("stats.json"), ref.read_json("stats.json")
    assert a["num_pixels"] == b["num_pixels"]
    np.testing.assert_allclose(a["mean_rgb"], b["mean_rgb"], rtol=1e-12)
    np.testing.assert_allclose(a["cov_rgb"], b["cov_rgb"], rtol=1e-9, atol=1e-9)
