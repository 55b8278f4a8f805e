"""ImageNet (ILSVRC-2012) as people have it: the official archives, their extracted forms,
and the Kaggle copy. Each lister returns a `vgg.data.folders.Listing` like an image
folder's: classes are the sorted WordNet ids (the order of torchvision's released
weights), keys are readable ids relative to the dataset (`train/n01440764/
n01440764_10026.JPEG`, `val/ILSVRC2012_val_00000001.JPEG`), and `class_words` holds
the human-readable names.

Layouts (`data.layout`):

``ilsvrc2012``: in `data.root`
    ILSVRC2012_img_train.tar      a tar of per-class tars n01440764.tar, ...
                                  (or a folder train/ of n01440764.tar files or n01440764/ folders)
    ILSVRC2012_img_val.tar        50,000 images ILSVRC2012_val_00000001.JPEG, ... flat
                                  (or a flat folder val/)
    ILSVRC2012_devkit_t12.tar.gz  data/meta.mat (the synsets: ILSVRC2012_ID, WNID, words,
                                  num_children) and data/ILSVRC2012_validation_ground_truth.txt
                                  (one ILSVRC2012_ID per validation image, in file-name order)
                                  (or the extracted folder ILSVRC2012_devkit_t12/)
    Where an archive and its extracted folder are both present, the archive is read
    (it is complete by construction; a folder may be half extracted) and the folder is
    listed in skipped.csv as not read.

``kaggle``: `data.root` holds ILSVRC/Data/CLS-LOC/{train/<wnid>/*, val/*} (val flat),
    LOC_val_solution.csv (ImageId,PredictionString: the first token is the wnid) and
    LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca"). `data.root` may also be the
    CLS-LOC folder itself; the two files are then looked for in it, one level up and
    three levels up (the Kaggle download's root).

Archives are read where they are, never extracted: their members are listed once with
`tarfile` and each image is recorded as a byte range of its archive (for a member of a
per-class tar inside the train tar: the outer member's data offset + the inner member's
data offset), encoded in the Listing's path as ``tar://<archive path>?offset=N&size=M``
(`member_path`); `pipeline.sharding` reads such a path with one seek + read
(`read_member`) from any Ray worker.

Checks: the devkit's meta.mat must parse; its leaf synsets (num_children == 0) must be
exactly the training classes; every validation label must be a leaf's ILSVRC2012_ID and
name an existing image; every validation image must have a label. Any failure is one
`DatasetError` naming the file, with an example. Nothing is dropped silently: members
that are not regular files, files whose names are not image names (.JPEG, .jpg, .png,
...), folders inside class folders and unread extracted copies go to `Listing.skipped`
with the reason.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import parse_qs

from vgg.storage import exists, is_local, resolve_uri
from vgg.data.folders import DatasetError, Listing, _entries

TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
DEVKIT_TAR, DEVKIT_DIR = "ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_devkit_t12"
META_MAT, VAL_TRUTH = "data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE_CLS_LOC = "ILSVRC/Data/CLS-LOC"
KAGGLE_VAL_CSV, KAGGLE_SYNSETS = "LOC_val_solution.csv", "LOC_synset_mapping.txt"

WNID = re.compile(r"n\d{8}")
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
#: File names taken for images (case-insensitive); the content decides later (a PNG
#: named .JPEG is converted by the shard stage, an undecodable file is skipped there).
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

NOT_IMAGE = "not an image file name (.JPEG, .jpg, .png, ...)"
SUBFOLDER = "folder inside a class folder (not searched)"
DUPLICATE = "duplicate name in the archive: a later member of the same name is read"


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


# ------------------------------------------------------------------ byte ranges of archives

TAR_SCHEME = "tar://"


def member_path(archive: str, offset: int, size: int) -> str:
    """The Listing path of `size` bytes at `offset` of `archive` (a path of the dataset's
    filesystem, as `resolve_uri(root)` gives it)."""
    return f"{TAR_SCHEME}{archive}?offset={offset}&size={size}"


def parse_member_path(path: str) -> tuple[str, int, int] | None:
    """(archive, offset, size) of a `member_path`; None for a plain path."""
    if not path.startswith(TAR_SCHEME):
        return None
    archive, sep, query = path[len(TAR_SCHEME):].rpartition("?")
    q = parse_qs(query)
    try:
        if not sep or not archive:
            raise ValueError("no ?offset=N&size=M")
        offset, size = int(q["offset"][0]), int(q["size"][0])
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
    except (KeyError, ValueError) as e:
        raise ValueError(f"malformed archive member path {path!r} ({e})") from None
    return archive, offset, size


def read_member(fs, path: str) -> bytes:
    """The bytes of a `member_path`: one positioned read; OSError if the archive is short."""
    archive, offset, size = parse_member_path(path)
    with fs.open_input_file(archive) as f:
        data = f.read_at(size, offset)
    if len(data) != size:
        raise OSError(f"{archive}: {size} bytes expected at offset {offset}, {len(data)} read (truncated archive?)")
    return data


class _Window(io.RawIOBase):
    """Bytes [start, start + size) of a seekable binary file, as a file of its own, for
    `tarfile` (a per-class tar inside the train tar). Every read seeks first, so windows on
    one file do not disturb each other."""

    def __init__(self, f, start: int, size: int):
        super().__init__()
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _open_random(fs, path: str):
    """(seekable binary file, its size)."""
    if is_local(fs):
        f = open(path, "rb")
        return f, os.fstat(f.fileno()).st_size
    f = fs.open_input_file(path)
    return f, f.size()


def _members(f, start: int, size: int, what: str) -> Iterator[tarfile.TarInfo]:
    """The members of the tar at bytes [start, start + size) of f, in archive order; a
    DatasetError naming `what` if it is not a readable tar, or if it is cut short: tarfile
    takes a header it cannot read after the first one for the end of the archive, so the
    end-of-archive marker (a zero block) is checked here."""
    try:
        tf = tarfile.open(fileobj=_Window(f, start, size), mode="r:")
        while True:
            m = tf.next()
            if m is None:
                break
            tf.members = []  # tarfile keeps every member; a class tar has ~1300, the val tar 50,000
            yield m
        end = _Window(f, start, size)
        end.seek(tf.offset)
        block = end.read(tarfile.BLOCKSIZE)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"data.root: {what} is not a readable tar archive: {type(e).__name__}: {e}") from None
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise DatasetError(f"data.root: {what} is truncated or corrupt: no readable member header and no "
                           f"end-of-archive marker at byte {tf.offset} of {size}")


def _member_name(m: tarfile.TarInfo) -> str:
    name = m.name
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def _member_problem(m: tarfile.TarInfo) -> str | None:
    """Why a member is not an image file to read, or None."""
    if m.isdir():
        return "folder inside the archive (not searched)"
    if m.issparse():
        return "sparse member (not readable as one byte range)"
    if not m.isreg():
        kind = "link" if (m.issym() or m.islnk()) else "special file"
        return f"not a regular file in the archive (a {kind})"
    return None


def _example(items: list, n: int = 3) -> str:
    return ", ".join(str(x) for x in items[:n]) + (", ..." if len(items) > n else "")


class _Rows:
    """Image rows (key, path, class) of one split with duplicate keys caught: a tar may hold
    two members of one name (extraction keeps the later one, and so does this)."""

    def __init__(self):
        self.rows: dict[str, tuple[str, str]] = {}
        self.skipped: list[tuple[str, str]] = []

    def add(self, key: str, path: str, cls: str) -> None:
        if key in self.rows:
            self.skipped.append((key, DUPLICATE))
        self.rows[key] = (path, cls)

    def sorted(self) -> list[tuple[str, str, str]]:
        return sorted((k, p, c) for k, (p, c) in self.rows.items())


# ------------------------------------------------------------------ official archives: train


def _class_tar(f, start: int, size: int, archive: str, wnid: str, what: str, rows: _Rows,
               skipped: list) -> int:
    """List one per-class tar (at bytes [start, start + size) of the open `archive`);
    -> the number of images found."""
    n = 0
    for m in _members(f, start, size, what):
        name = _member_name(m)
        if not name:
            continue  # the archive's own root entry "./"
        key = posixpath.join("train", wnid, name)
        problem = _member_problem(m)
        if problem is None and "/" in name:
            problem = f"in a subfolder of {wnid}.tar (not searched)"
        if problem is None and not is_image_name(name):
            problem = NOT_IMAGE
        if problem:
            skipped.append((key, problem))
            continue
        rows.add(key, member_path(archive, start + m.offset_data, m.size), wnid)
        n += 1
    return n


def _train_archive(fs, path: str, rows: _Rows, skipped: list) -> set[str]:
    """ILSVRC2012_img_train.tar: a tar of <wnid>.tar members; -> the classes found."""
    found: set[str] = set()
    f, size = _open_random(fs, path)
    with f:
        for m in _members(f, 0, size, TRAIN_TAR):
            name = _member_name(m)
            if not name:
                continue
            problem = _member_problem(m)
            stem = name[: -len(".tar")] if name.endswith(".tar") else None
            if problem is None and (stem is None or not WNID.fullmatch(stem)):
                problem = "not a per-class archive <wnid>.tar"
            if problem:
                skipped.append((posixpath.join(TRAIN_TAR, name), problem))
                continue
            if stem in found:
                raise DatasetError(f"data.root: {TRAIN_TAR} holds {name} twice")
            found.add(stem)
            what = f"{TRAIN_TAR} member {name}"
            if not _class_tar(f, m.offset_data, m.size, path, stem, what, rows, skipped):
                raise DatasetError(f"data.root: {what} holds no image")
    return found


def _class_folder(fs, cdir: str, folder_key: str, wnid: str, rows: _Rows, skipped: list) -> int:
    """List one class folder (images directly inside it); -> the number of images found."""
    inside = _entries(fs, cdir)
    n = 0
    for name, p in inside.files:
        key = posixpath.join(folder_key, name)
        if is_image_name(name):
            rows.add(key, p, wnid)
            n += 1
        else:
            skipped.append((key, NOT_IMAGE))
    skipped += [(posixpath.join(folder_key, n_), SUBFOLDER) for n_, _ in inside.dirs]
    skipped += [(posixpath.join(folder_key, n_), why) for n_, why in inside.problems]
    return n


def _train_folder(fs, path: str, rows: _Rows, skipped: list) -> set[str]:
    """train/ holding <wnid>.tar files and/or <wnid>/ folders; -> the classes found."""
    top = _entries(fs, path)
    tars = {n[: -len(".tar")]: p for n, p in top.files if n.endswith(".tar")}
    both = sorted(set(tars) & {n for n, _ in top.dirs})
    if both:
        raise DatasetError(f"data.root: {path} holds both {both[0]}.tar and {both[0]}/ (an interrupted "
                           f"extraction?): keep one of the two for {len(both)} class(es): {_example(both)}")
    skipped += [(posixpath.join("train", n), "not a per-class archive <wnid>.tar or class folder <wnid>/")
                for n, _ in top.files if not n.endswith(".tar")]
    skipped += [(posixpath.join("train", n), why) for n, why in top.problems]
    found: set[str] = set()
    for wnid, p in sorted(tars.items()):
        f, size = _open_random(fs, p)
        with f:
            if not _class_tar(f, 0, size, p, wnid, f"train/{wnid}.tar", rows, skipped):
                raise DatasetError(f"data.root: {p} holds no image")
        found.add(wnid)
    for wnid, cdir in top.dirs:
        if not _class_folder(fs, cdir, posixpath.join("train", wnid), wnid, rows, skipped):
            raise DatasetError(f"data.root: class folder {cdir} holds no image")
        found.add(wnid)
    if not found:
        raise DatasetError(f"data.root: {path} has neither per-class archives <wnid>.tar nor class folders <wnid>/")
    return found


# ------------------------------------------------------------------ official archives: val and devkit


@dataclass
class _ValImages:
    """Validation images found, by file name (without the val/ prefix)."""

    paths: dict[str, str]
    where: str  # the archive or folder, for messages


def _val_archive(fs, path: str, skipped: list) -> _ValImages:
    paths: dict[str, str] = {}
    f, size = _open_random(fs, path)
    with f:
        for m in _members(f, 0, size, VAL_TAR):
            name = _member_name(m)
            if not name:
                continue
            problem = _member_problem(m)
            if problem is None and "/" in name:
                problem = "in a subfolder of the flat validation archive (not searched)"
            if problem is None and not is_image_name(name):
                problem = NOT_IMAGE
            if problem is None and name in paths:
                skipped.append((posixpath.join("val", name), DUPLICATE))
            if problem:
                skipped.append((posixpath.join("val", name), problem))
                continue
            paths[name] = member_path(path, m.offset_data, m.size)
    return _ValImages(paths, path)


def _val_folder(fs, path: str, skipped: list, hint: str) -> _ValImages:
    """A flat folder of validation images."""
    top = _entries(fs, path)
    paths = {n: p for n, p in top.files if is_image_name(n)}
    if not paths and top.dirs:
        raise DatasetError(f"data.root: {path} holds folders ({_example([n for n, _ in top.dirs])}) and no "
                           f"image: the validation images are expected flat here; {hint}")
    skipped += [(posixpath.join("val", n), NOT_IMAGE) for n, _ in top.files if not is_image_name(n)]
    skipped += [(posixpath.join("val", n), "folder inside the flat val/ (not searched)") for n, _ in top.dirs]
    skipped += [(posixpath.join("val", n), why) for n, why in top.problems]
    return _ValImages(paths, path)


@dataclass
class _Devkit:
    id_to_wnid: dict[int, str]  # leaf synsets only (the 1000 classes)
    words: dict[str, str]
    truth: list[int]  # ILSVRC2012_ID of validation image i + 1
    meta_where: str
    truth_where: str


def parse_meta_mat(data: bytes, where: str) -> tuple[dict[int, str], dict[str, str]]:
    """The devkit's meta.mat -> ({ILSVRC2012_ID: wnid}, {wnid: words}) of its leaf synsets
    (num_children == 0: the classes), as torchvision's devkit parser reads it (scipy's
    loadmat, squeeze_me=True), by field name."""
    import numpy as np
    import scipy.io as sio

    try:
        synsets = np.atleast_1d(sio.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"])
        leaves = [(int(s["ILSVRC2012_ID"]), str(s["WNID"]), str(s["words"]))
                  for s in synsets if int(s["num_children"]) == 0]
    except Exception as e:  # scipy raises many types for a file that is not a .mat
        raise DatasetError(
            f"data.root: {where} does not parse as the devkit's meta.mat (a struct array 'synsets' with "
            f"fields ILSVRC2012_ID, WNID, words, num_children): {type(e).__name__}: {e}") from None
    if not leaves:
        raise DatasetError(f"data.root: {where} has no leaf synset (num_children == 0): no class")
    ids, wnids = [i for i, _, _ in leaves], [w for _, w, _ in leaves]
    dup = sorted({x for x in ids if ids.count(x) > 1}) or sorted({x for x in wnids if wnids.count(x) > 1})
    if dup:
        raise DatasetError(f"data.root: {where} lists a class twice (ILSVRC2012_ID or WNID), e.g. {dup[0]}")
    bad = [w for w in wnids if not WNID.fullmatch(w)]
    if bad:
        raise DatasetError(f"data.root: {where} has WNIDs that are not WordNet ids n########, e.g. {bad[0]!r}")
    return {i: w for i, w, _ in leaves}, {w: words for _, w, words in leaves}


def parse_val_truth(data: bytes, where: str) -> list[int]:
    """ILSVRC2012_validation_ground_truth.txt: one ILSVRC2012_ID a line; line i is the
    label of ILSVRC2012_val_<i, 8 digits>.JPEG."""
    lines = data.decode("utf-8", "replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for i, line in enumerate(lines, 1):
        try:
            out.append(int(line.strip()))
        except ValueError:
            raise DatasetError(f"data.root: {where} line {i}: expected one ILSVRC2012_ID (an integer), "
                               f"got {line.strip()[:60]!r}") from None
    if not out:
        raise DatasetError(f"data.root: {where} is empty (no validation label)")
    return out


def _devkit(fs, base: str, skipped: list) -> _Devkit:
    tar_path, dir_path = posixpath.join(base, DEVKIT_TAR), posixpath.join(base, DEVKIT_DIR)
    if exists(fs, tar_path):
        if exists(fs, dir_path):
            skipped.append((DEVKIT_DIR, f"not read: {DEVKIT_TAR} is read instead"))
        with fs.open_input_file(tar_path) as f:
            blob = f.read()
        found: dict[str, bytes] = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tf:
                for m in tf:
                    name = _member_name(m)
                    for want in (META_MAT, VAL_TRUTH):
                        if m.isreg() and (name == want or name.endswith("/" + want)):
                            found[want] = tf.extractfile(m).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DatasetError(f"data.root: {tar_path} is not a readable tar.gz archive: "
                               f"{type(e).__name__}: {e}") from None
        missing = [w for w in (META_MAT, VAL_TRUTH) if w not in found]
        if missing:
            raise DatasetError(f"data.root: {tar_path} has no {DEVKIT_DIR}/{missing[0]}")
        meta, truth = found[META_MAT], found[VAL_TRUTH]
        meta_where, truth_where = (f"{tar_path}: {DEVKIT_DIR}/{w}" for w in (META_MAT, VAL_TRUTH))
    elif exists(fs, dir_path):
        meta_where, truth_where = (posixpath.join(dir_path, w) for w in (META_MAT, VAL_TRUTH))
        for p in (meta_where, truth_where):
            if not exists(fs, p):
                raise DatasetError(f"data.root: the devkit folder {dir_path} has no {p[len(dir_path) + 1:]}")
        meta, truth = (_read_small(fs, p) for p in (meta_where, truth_where))
    else:
        raise DatasetError(f"data.root: no devkit in {base}: expected {DEVKIT_TAR} or the folder {DEVKIT_DIR}/")
    id_to_wnid, words = parse_meta_mat(meta, meta_where)
    return _Devkit(id_to_wnid, words, parse_val_truth(truth, truth_where), meta_where, truth_where)


def _read_small(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _pick(fs, base: str, archive: str, folder: str, skipped: list) -> tuple[str, str] | None:
    """("archive" | "folder", path) of a split, the archive first; None if neither."""
    a, d = posixpath.join(base, archive), posixpath.join(base, folder)
    if exists(fs, a):
        if exists(fs, d):
            skipped.append((folder + "/", f"not read: {archive} is read instead"))
        return "archive", a
    if exists(fs, d):
        return "folder", d
    return None


def _check_classes(found: set[str], expected: set[str], where: str, what: str) -> None:
    """The training classes must be exactly the classes of the label files."""
    extra, missing = sorted(found - expected), sorted(expected - found)
    if extra:
        raise DatasetError(f"data.root: {len(extra)} training class(es) are not in {where}: {_example(extra)}")
    if missing:
        raise DatasetError(f"data.root: wrong number of classes: {where} has {len(expected)} {what}, the "
                           f"training data {len(found)}; without training images: {_example(missing)}")


def _label_val(images: _ValImages, labels: dict[str, str], label_file: str,
               label_what: Callable[[str], str]) -> list[tuple[str, str, str]]:
    """Validation rows: every image needs a label and every label an image (`label_what`:
    where a file name's label is, for the message)."""
    unlabelled = sorted(n for n in images.paths if n not in labels)
    if unlabelled:
        raise DatasetError(f"data.root: {len(unlabelled)} validation image(s) in {images.where} have no label in "
                           f"{label_file}: {_example(unlabelled)}")
    orphans = sorted(n for n in labels if n not in images.paths)
    if orphans:
        raise DatasetError(f"data.root: {len(orphans)} label(s) in {label_file} name no image in {images.where}: "
                           f"{_example([f'{label_what(n)} ({n})' for n in orphans])}")
    return sorted((posixpath.join("val", n), p, labels[n]) for n, p in images.paths.items())


def list_ilsvrc2012(root: str) -> Listing:
    """List the official ILSVRC-2012 archives (or their extracted forms) in `root`."""
    fs, base = resolve_uri(root)
    if not exists(fs, base):
        raise DatasetError(f"data.root: {root} does not exist")
    skipped: list[tuple[str, str]] = []
    dk = _devkit(fs, base, skipped)
    train = _pick(fs, base, TRAIN_TAR, "train", skipped)
    if train is None:
        raise DatasetError(f"data.root: no training data in {root}: expected {TRAIN_TAR} or a folder train/")
    val = _pick(fs, base, VAL_TAR, "val", skipped)
    if val is None:
        raise DatasetError(f"data.root: no validation data in {root}: expected {VAL_TAR} or a flat folder val/")

    rows = _Rows()
    kind, path = train
    found = (_train_archive if kind == "archive" else _train_folder)(fs, path, rows, skipped)
    _check_classes(found, set(dk.words), dk.meta_where, "classes (leaf synsets, num_children == 0)")

    kind, path = val
    images = (_val_archive(fs, path, skipped) if kind == "archive"
              else _val_folder(fs, path, skipped, "for val/<wnid>/ folders (as torchvision's ImageNet arranges "
                               "them) use data.layout: folders"))
    labels: dict[str, str] = {}
    for i, ident in enumerate(dk.truth, 1):
        if ident not in dk.id_to_wnid:
            raise DatasetError(f"data.root: {dk.truth_where} line {i}: ILSVRC2012_ID {ident} is not a class of "
                               f"{dk.meta_where} (leaf ids: {min(dk.id_to_wnid)}..{max(dk.id_to_wnid)})")
        labels[f"ILSVRC2012_val_{i:08d}.JPEG"] = dk.id_to_wnid[ident]
    val_rows = _label_val(images, labels, dk.truth_where, lambda n: f"line {int(VAL_NAME.fullmatch(n)[1])}")
    classes = sorted(found)
    return Listing(classes, {"train": rows.sorted(), "val": val_rows}, sorted(skipped + rows.skipped),
                   class_words={w: dk.words[w] for w in classes})


# ------------------------------------------------------------------ Kaggle


def _kaggle_dirs(fs, base: str, root: str) -> tuple[str, str]:
    """(the CLS-LOC folder, the folder of the two label files)."""
    cls_loc = posixpath.join(base, KAGGLE_CLS_LOC)
    if exists(fs, cls_loc):
        candidates = [base]
    elif exists(fs, posixpath.join(base, "train")) and exists(fs, posixpath.join(base, "val")):
        cls_loc = base  # root is the CLS-LOC folder itself
        up1 = posixpath.dirname(base)
        candidates = [base, up1, posixpath.dirname(posixpath.dirname(up1))]
    else:
        raise DatasetError(f"data.root: {root} holds neither {KAGGLE_CLS_LOC}/ nor train/ and val/ "
                           f"(the Kaggle copy: data.root is the folder with ILSVRC/ and {KAGGLE_VAL_CSV})")
    for c in dict.fromkeys(candidates):
        if exists(fs, posixpath.join(c, KAGGLE_VAL_CSV)) and exists(fs, posixpath.join(c, KAGGLE_SYNSETS)):
            return cls_loc, c
    raise DatasetError(f"data.root: {KAGGLE_VAL_CSV} and {KAGGLE_SYNSETS} not found together in "
                       f"{' or '.join(dict.fromkeys(candidates))}")


def parse_synset_mapping(data: bytes, where: str) -> dict[str, str]:
    """LOC_synset_mapping.txt: "<wnid> <words>" a line -> {wnid: words}."""
    out: dict[str, str] = {}
    for i, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, words = line.strip().partition(" ")
        if not WNID.fullmatch(wnid):
            raise DatasetError(f"data.root: {where} line {i}: expected '<wnid> <words>', got {line.strip()[:60]!r}")
        if wnid in out:
            raise DatasetError(f"data.root: {where} line {i}: {wnid} is listed twice")
        out[wnid] = words.strip()
    if not out:
        raise DatasetError(f"data.root: {where} lists no class")
    return out


def parse_val_solution(data: bytes, where: str, classes: dict[str, str]) -> dict[str, str]:
    """LOC_val_solution.csv: ImageId,PredictionString -> {ImageId: wnid} (the first token)."""
    reader = csv.reader(io.StringIO(data.decode("utf-8", "replace")))
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
        raise DatasetError(f"data.root: {where}: expected the header ImageId,PredictionString, got {header}")
    out: dict[str, str] = {}
    for i, row in enumerate(reader, 2):
        if not row or not any(c.strip() for c in row):
            continue
        tokens = row[1].split() if len(row) > 1 else []
        if not tokens:
            raise DatasetError(f"data.root: {where} line {i}: no PredictionString for {row[0]!r}")
        image, wnid = row[0].strip(), tokens[0]
        if wnid not in classes:
            raise DatasetError(f"data.root: {where} line {i}: {wnid!r} (for {image}) is not a class of "
                               f"{KAGGLE_SYNSETS}")
        if image in out and out[image] != wnid:
            raise DatasetError(f"data.root: {where} line {i}: {image} is labelled twice ({out[image]}, {wnid})")
        out[image] = wnid
    if not out:
        raise DatasetError(f"data.root: {where} has no label")
    return out


def list_kaggle(root: str) -> Listing:
    """List the Kaggle copy of ILSVRC-2012 (ILSVRC/Data/CLS-LOC and the LOC_*.csv/txt files)."""
    fs, base = resolve_uri(root)
    if not exists(fs, base):
        raise DatasetError(f"data.root: {root} does not exist")
    cls_loc, labels_dir = _kaggle_dirs(fs, base, root)
    syn_path, csv_path = posixpath.join(labels_dir, KAGGLE_SYNSETS), posixpath.join(labels_dir, KAGGLE_VAL_CSV)
    words = parse_synset_mapping(_read_small(fs, syn_path), syn_path)
    solution = parse_val_solution(_read_small(fs, csv_path), csv_path, words)
    skipped: list[tuple[str, str]] = []

    train, val = posixpath.join(cls_loc, "train"), posixpath.join(cls_loc, "val")
    for p in (train, val):
        if not exists(fs, p):
            raise DatasetError(f"data.root: no {posixpath.basename(p)}/ folder in {cls_loc}")
    top = _entries(fs, train)
    skipped += [(posixpath.join("train", n), "file is not in a class folder") for n, _ in top.files]
    skipped += [(posixpath.join("train", n), why) for n, why in top.problems]
    rows = _Rows()
    for wnid, cdir in top.dirs:
        if not _class_folder(fs, cdir, posixpath.join("train", wnid), wnid, rows, skipped):
            raise DatasetError(f"data.root: class folder {cdir} holds no image")
    found = {n for n, _ in top.dirs}
    _check_classes(found, set(words), syn_path, "classes")

    images = _val_folder(fs, val, skipped, "for val/<wnid>/ folders use data.layout: folders")
    # ImageId is the file name without its extension
    labels = {}
    by_stem = {posixpath.splitext(n)[0]: n for n in images.paths}
    for image, wnid in solution.items():
        labels[by_stem.get(image, image + ".JPEG")] = wnid
    val_rows = _label_val(images, labels, csv_path, lambda n: f"ImageId {posixpath.splitext(n)[0]}")
    classes = sorted(found)
    return Listing(classes, {"train": rows.sorted(), "val": val_rows}, sorted(skipped + rows.skipped),
                   class_words={w: words[w] for w in classes})
