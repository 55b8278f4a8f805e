"""Listing an image folder: `<root>/train/<class>/*` and `<root>/val/<class>/*` (or `test/`);
`list_dataset` dispatches on `data.layout` (ImageNet's layouts: `vgg.data.imagenet`).

The listing checks the layout (a `DatasetError` naming the path) and leaves nothing
out silently: every entry it skips is returned with the reason (the shard stage
writes them to skipped.csv).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from dataclasses import dataclass

import numpy as np

from vgg.errors import UserError
from vgg.storage import exists, is_local, resolve_uri

VAL_DIRS = ("val", "test")  # accepted names of the validation split
#: Values of `data.layout`: an image folder, the official ILSVRC-2012 archives, the Kaggle copy.
LAYOUTS = ("folders", "ilsvrc2012", "kaggle")


class DatasetError(UserError, ValueError):
    """The image folder is unusable as a whole (missing, empty, inconsistent)."""

    keep_traceback = False


@dataclass(frozen=True)
class Listing:
    classes: list[str]
    #: split -> list of (key, path, class name); key = path relative to the root.
    files: dict[str, list[tuple[str, str, str]]]
    #: (key, reason) of every entry left out: files outside a class folder, folders inside
    #: one, names that are not UTF-8, broken links and link loops (all go to skipped.csv)
    skipped: list[tuple[str, str]]
    #: class name -> human-readable words (ImageNet: "tench, Tinca tinca"), or None
    class_words: dict[str, str] | None = None


LINK_PROBLEM = "broken symbolic link or link loop"
NAME_PROBLEM = "file name is not valid UTF-8"


@dataclass(frozen=True)
class _Entries:
    files: list[tuple[str, str]]  # (name, path) of regular files (links followed)
    dirs: list[tuple[str, str]]  # (name, path) of folders (links followed)
    problems: list[tuple[str, str]]  # (name, reason) of entries that are neither


def _entries(fs, path: str) -> _Entries:
    """The entries of a folder, hidden ones left out, sorted by name; nothing dropped
    silently. Local folders are read with os.scandir: pyarrow's listing leaves out broken
    links and link loops, and fails on names that are not UTF-8."""
    files, dirs, problems = [], [], []
    if is_local(fs):
        with os.scandir(os.fsencode(path)) as it:
            for e in it:
                name = e.name.decode("utf-8", "backslashreplace")
                if name.startswith("."):
                    continue
                try:
                    e.name.decode("utf-8")
                except UnicodeDecodeError:
                    problems.append((name, NAME_PROBLEM))
                    continue
                full = posixpath.join(path, name)
                try:
                    kind = "dir" if e.is_dir() else "file" if e.is_file() else None  # follows links
                except OSError:  # ELOOP: a link loop
                    kind = None
                if kind == "dir":
                    dirs.append((name, full))
                elif kind == "file":
                    files.append((name, full))
                else:
                    problems.append((name, LINK_PROBLEM if e.is_symlink() else "not a regular file"))
    else:
        import pyarrow.fs as pafs  # a filesystem URI (s3://, gs://, ...)

        for i in fs.get_file_info(pafs.FileSelector(path)):
            try:
                name, full = i.base_name, i.path
            except UnicodeDecodeError:
                problems.append(("<name that is not UTF-8>", NAME_PROBLEM))
                continue
            if name.startswith("."):
                continue
            kind = {pafs.FileType.Directory: dirs, pafs.FileType.File: files}.get(i.type)
            if kind is None:
                problems.append((name, "not a regular file"))
            else:
                kind.append((name, full))
    return _Entries(sorted(files), sorted(dirs), sorted(problems))


def list_image_folder(root: str) -> Listing:
    """List an image folder, checking its layout. Raises DatasetError naming the path."""
    fs, base = resolve_uri(root)
    if not exists(fs, base):
        raise DatasetError(f"data.root: {root} does not exist")
    train = posixpath.join(base, "train")
    if not exists(fs, train):
        raise DatasetError(f"data.root: no train/ folder in {root}")
    val_name = next((v for v in VAL_DIRS if exists(fs, posixpath.join(base, v))), None)
    if val_name is None:
        raise DatasetError(f"data.root: no val/ (or test/) folder in {root}")
    classes = [name for name, _ in _entries(fs, train).dirs]
    if not classes:
        raise DatasetError(f"data.root: {train} has no class folders (expected train/<class>/*)")
    files: dict[str, list] = {}
    skipped: list[tuple[str, str]] = []
    for split, folder in (("train", "train"), ("val", val_name)):
        split_path = posixpath.join(base, folder)
        top = _entries(fs, split_path)
        if not top.dirs:
            raise DatasetError(f"data.root: {split_path} has no class folders")
        unknown = sorted(set(n for n, _ in top.dirs) - set(classes))
        if unknown:
            raise DatasetError(f"data.root: classes {unknown} in {split_path} are absent from {train}")
        skipped += [(posixpath.join(folder, n), "file is not in a class folder") for n, _ in top.files]
        skipped += [(posixpath.join(folder, n), why) for n, why in top.problems]
        rows = []
        for name, cdir in top.dirs:
            inside = _entries(fs, cdir)
            if not inside.files:
                raise DatasetError(f"data.root: class folder {cdir} is empty (no files)")
            key = lambda n: posixpath.join(folder, name, n)  # noqa: E731
            rows += [(key(n), p, name) for n, p in inside.files]
            skipped += [(key(n), "folder inside a class folder (not searched)") for n, _ in inside.dirs]
            skipped += [(key(n), why) for n, why in inside.problems]
        files[split] = sorted(rows)
    return Listing(classes, files, sorted(skipped))


def subsample(listing: Listing, per_class: dict[str, int | None], seed: int) -> Listing:
    """At most per_class[split] files of each class of each split: a seeded random subset,
    in the listing's order (None: every file)."""
    files = {}
    for split, rows in listing.files.items():
        limit = per_class.get(split)
        if limit is None:
            files[split] = rows
            continue
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        by_class: dict[str, list[int]] = {}
        for i, (_, _, c) in enumerate(rows):
            by_class.setdefault(c, []).append(i)
        keep = sorted(j for idx in by_class.values()
                      for j in (idx if len(idx) <= limit else rng.choice(idx, limit, replace=False)))
        files[split] = [rows[j] for j in keep]
    return dataclasses.replace(listing, files=files)
