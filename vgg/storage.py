"""Files by path or URI: local paths, or any pyarrow filesystem (s3://, gs://, hdfs://, ...).

`resolve_uri` turns a path or URI into (filesystem, path); the functions below read,
write (atomically where the filesystem can rename), test and list through it. The
workflow (`pipeline.storage`) keeps its stage outputs on top of these.

pyarrow is imported only where a URI needs it, or where it is installed: with pyarrow,
local paths go through `pyarrow.fs.LocalFileSystem` (as the Parquet readers and Ray Data
expect); without it (a bare GPU box with PyTorch alone), through `LocalFS` below, a
stand-in of the few `pyarrow.fs` calls the library makes on local files. Kept rather than
fsspec's because the workflow's Parquet and Ray Data code takes pyarrow filesystems.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple


class Entry(NamedTuple):
    """One directory entry (`list_dir`)."""

    path: str
    base_name: str
    is_dir: bool
    size: int | None
    mtime: float | None  # seconds since the epoch


class LocalFS:
    """Local files with the `pyarrow.fs.FileSystem` methods the library calls (see above)."""

    def create_dir(self, path: str, recursive: bool = True) -> None:
        os.makedirs(path, exist_ok=True) if recursive else os.mkdir(path)

    def open_input_stream(self, path: str) -> BinaryIO:
        return open(path, "rb")

    open_input_file = open_input_stream

    def open_output_stream(self, path: str) -> BinaryIO:
        return open(path, "wb")

    def delete_dir(self, path: str) -> None:
        shutil.rmtree(path)

    def delete_file(self, path: str) -> None:
        os.remove(path)

    def move(self, src: str, dest: str) -> None:
        os.replace(src, dest)


def _pafs():
    import pyarrow.fs as pafs  # only for URIs, or where pyarrow is installed

    return pafs


def _has_pyarrow() -> bool:
    try:
        _pafs()
    except ImportError:
        return False
    return True


def resolve_uri(uri: str):
    """A local path or filesystem URI -> (filesystem, path inside it)."""
    if "://" in uri:
        return _pafs().FileSystem.from_uri(uri)
    path = os.path.abspath(os.path.expanduser(uri))
    return (_pafs().LocalFileSystem() if _has_pyarrow() else LocalFS()), path


def is_local(fs) -> bool:
    return isinstance(fs, LocalFS) or type(fs).__name__ == "LocalFileSystem"


def to_uri(fs, path: str, like: str) -> str:
    """The inverse of `resolve_uri`: a path of `fs` as a URI with the scheme of `like`."""
    if is_local(fs):
        return path
    return f"{like.split('://', 1)[0]}://{path}"


def write_bytes(fs, path: str, data: bytes) -> None:
    """Write a whole file; on a local filesystem through a temporary file, fsync and rename,
    so that readers never see half of it, and a crash leaves the old file or the new one.
    A failed write removes its temporary file."""
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if not is_local(fs):  # object stores publish an object whole on close
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def read_bytes(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_json(fs, path: str, obj: Any, sort_keys: bool = True) -> None:
    """JSON, indented; keys sorted unless `sort_keys` is false (a table's columns keep
    their order)."""
    write_bytes(fs, path, json.dumps(obj, indent=2, sort_keys=sort_keys).encode())


def read_json(fs, path: str) -> Any:
    return json.loads(read_bytes(fs, path))


def exists(fs, path: str) -> bool:
    if isinstance(fs, LocalFS):
        return os.path.exists(path)
    return fs.get_file_info(path).type != _pafs().FileType.NotFound


def file_size(fs, path: str) -> int:
    if isinstance(fs, LocalFS):
        return os.path.getsize(path)
    return fs.get_file_info(path).size


def list_dir(fs, path: str) -> list[Entry]:
    """The entries of a directory (not recursive), sorted by name."""
    if isinstance(fs, LocalFS):
        out = []
        with os.scandir(path) as it:
            for e in it:
                st = e.stat()
                out.append(Entry(e.path, e.name, e.is_dir(), st.st_size, st.st_mtime))
    else:
        pafs = _pafs()
        out = [Entry(i.path, i.base_name, i.type == pafs.FileType.Directory, i.size,
                     i.mtime.timestamp() if i.mtime else None)
               for i in fs.get_file_info(pafs.FileSelector(path))]
    return sorted(out, key=lambda e: e.base_name)


@dataclass(frozen=True)
class StageOutput:
    """A folder of outputs: where it is (filesystem and path) and its URI for other processes."""

    stage_id: str
    key: str
    fs: Any  # a pyarrow FileSystem, or LocalFS
    path: str
    uri: str

    @classmethod
    def at(cls, uri: str, stage_id: str = "", key: str = "") -> "StageOutput":
        """The folder at a path or URI (created on first write)."""
        fs, path = resolve_uri(uri)
        return cls(stage_id, key, fs, path, to_uri(fs, path, uri))

    def join(self, *parts: str) -> str:
        """Path of a file inside the output (for `fs`)."""
        return posixpath.join(self.path, *parts)

    def file_uri(self, *parts: str) -> str:
        """URI of a file inside the output (a path for local outputs), for another process."""
        if "://" in self.uri:
            return "/".join([self.uri.rstrip("/"), *parts])
        return self.join(*parts)

    def read_json(self, *parts: str) -> Any:
        return read_json(self.fs, self.join(*parts))


# ---------------------------------------------------------------- published outputs
#: The file that marks a folder of outputs complete: every file's size and SHA-256, written
#: last (the workflow's stages and the ladder write it; reuse checks it).
MARKER = "_SUCCESS.json"
HASH = "sha256"


def digest(fs, path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def file_sizes(fs, root: str) -> dict[str, int]:
    """Every file under `root` (relative POSIX path) -> its size."""
    if not exists(fs, root):
        return {}
    out: dict[str, int] = {}
    for e in list_dir(fs, root):
        if e.is_dir:
            out.update({posixpath.join(e.base_name, k): v for k, v in file_sizes(fs, e.path).items()})
        else:
            out[e.base_name] = e.size
    return out


def file_records(fs, root: str, names=None) -> dict[str, dict[str, Any]]:
    """Files under `root` (all, or `names`) -> {"size", "sha256"}: what `damage` checks."""
    sizes = file_sizes(fs, root)
    return {name: {"size": sizes[name], HASH: digest(fs, posixpath.join(root, name))}
            for name in sorted(sizes if names is None else names)}


def damage(fs, root: str, files: dict[str, dict[str, Any]], hashes: bool = True) -> tuple[str, str] | None:
    """Whether the files under `root` are still those `files` (`file_records`) recorded:
    their sizes, and their sha256 with `hashes`. -> (the first differing file's path, why),
    or None."""
    sizes = file_sizes(fs, root)
    for name, rec in sorted(files.items()):
        path = posixpath.join(root, name)
        if name not in sizes:
            return path, "is missing"
        if sizes[name] != rec.get("size"):
            return path, f"is {sizes[name]} bytes, {rec.get('size')} when it was written"
    if hashes:
        for name, rec in sorted(files.items()):
            if rec.get(HASH) and digest(fs, posixpath.join(root, name)) != rec[HASH]:
                return posixpath.join(root, name), "has other content than when it was written (sha256 differs)"
    return None
