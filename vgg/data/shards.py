"""Reading the Parquet shards a row group at a time (pyarrow; no DALI, no torch): the
Parquet adapter of the loaders. Which rows a worker reads in an epoch: `vgg.data.sampling`.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vgg.data.sampling import TAG_ORDER, TAG_PARAMS, check_int, epoch_order, num_batches, share_bounds, share_rows
from vgg.storage import is_local, resolve_uri, to_uri

__all__ = ["COLUMNS", "TAG_ORDER", "TAG_PARAMS", "RowFetcher", "ShardIndex", "check_int", "epoch_order",
           "num_batches", "num_rows", "read_sizes", "share_bounds", "share_rows", "shard_files",
           "split_columns"]

COLUMNS = ("image", "label", "height", "width", "key")  # what the loaders read
# --------------------------------------------------------------------------
# Reading Parquet shards


def shard_files(source: str | Path | Sequence[str | Path], split: str = "train") -> list[str]:
    """Parquet files of a split: a shard dir (uses ``<dir>/<split>/*.parquet``) or a list.

    The dir may be a local path or a filesystem URI (``s3://...``, ``gs://...``); files
    are then returned as URIs, which ``open_parquet`` opens through pyarrow.fs.
    """
    if isinstance(source, (str, Path)):
        fs, root = resolve_uri(str(source))
        folder = posixpath.join(root, split)
        if fs.get_file_info(folder).type != pafs.FileType.Directory:
            folder = root
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        files = sorted(to_uri(fs, i.path, str(source)) for i in infos
                       if i.is_file and i.path.endswith(".parquet"))
    else:
        files = [str(p) for p in source]
    if not files:
        raise ValueError(f"no Parquet files found for {source!r} (split {split!r})")
    return files


def open_parquet(path: str) -> pq.ParquetFile:
    """A Parquet file by local path or filesystem URI (opened through pyarrow.fs)."""
    fs, p = resolve_uri(path)
    return pq.ParquetFile(p if is_local(fs) else fs.open_input_file(p))


class ShardIndex:
    """Row-group metadata of a list of Parquet files; global row id -> (file, row)."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)
        blocks = []  # (file index, row group, rows, first row of the group in its file)
        for i, path in enumerate(self.files):
            meta = open_parquet(path).metadata
            missing = set(COLUMNS) - set(meta.schema.names)
            if missing:
                raise ValueError(f"{path}: missing columns {sorted(missing)}")
            offset = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if n:
                    blocks.append((i, g, n, offset))
                offset += n
        cols = np.asarray(blocks, np.int64).reshape(-1, 4).T
        self.block_file, self.block_rg, self.block_sizes, self.block_file_row0 = cols
        self.block_start = np.concatenate([[0], np.cumsum(self.block_sizes)]).astype(np.int64)
        self.num_rows = int(self.block_start[-1])

    def block_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.block_start, rows, side="right") - 1

    def locate(self, row: int) -> tuple[str, int]:
        """(file path, row index within that file) of a global row id."""
        b = int(self.block_of(np.asarray([row]))[0])
        in_file = self.block_file_row0[b] + row - self.block_start[b]
        return self.files[self.block_file[b]], int(in_file)


def _binary_views(arr: pa.Array) -> list[np.ndarray]:
    """Zero-copy uint8 views of the values of a (large_)binary array."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        arr = arr.cast(pa.large_binary())  # e.g. binary_view
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], off_type)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return [data[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


class _Block:
    """The planned rows of one row group: sorted global ids and their columns."""

    def __init__(self, rows: np.ndarray, table: pa.Table, with_keys: bool, copy_rows: bool):
        self.rows = rows
        self.jpegs = np.empty(len(rows), object)
        views = _binary_views(table.column("image"))  # uint8 views into one Arrow buffer
        # Copies can be freed one by one (rows that wait long, e.g. in dense buckets).
        self.jpegs[:] = [v.copy() for v in views] if copy_rows else views
        self.cols = {c: table.column(c).to_numpy().astype(np.int64)
                     for c in ("label", "height", "width")}
        self.keys = np.asarray(table.column("key").to_pylist(), object) if with_keys else None
        self.remaining = len(rows)


class RowFetcher:
    """Loads rows on demand, one row group at a time, keeping only planned rows.

    ``plan(rows)`` declares the rows of a pass; when ``fetch`` meets a row whose
    row group is not loaded, the planned rows of that group are read (only the
    needed columns of that one row group) and kept until all were fetched.
    With ``with_keys`` the keys of fetched rows go to ``keys`` (row -> key)
    until the consumer pops them. With ``copy_rows`` each JPEG is copied out of
    the Arrow buffer, so memory is freed row by row rather than per row group.
    """

    def __init__(self, index: ShardIndex, with_keys: bool = False, copy_rows: bool = False):
        self.index, self.with_keys, self.copy_rows = index, with_keys, copy_rows
        self.keys: dict[int, str] = {}
        self._columns = list(COLUMNS) if with_keys else [c for c in COLUMNS if c != "key"]
        self._files: dict[int, pq.ParquetFile] = {}
        self._planned: dict[int, np.ndarray] = {}
        self._loaded: dict[int, _Block] = {}

    def plan(self, rows: np.ndarray) -> None:
        self._loaded.clear()
        self.keys.clear()
        blocks = self.index.block_of(rows)
        order = np.argsort(rows, kind="stable")
        uniq, first = np.unique(blocks[order], return_index=True)
        self._planned = dict(zip(uniq.tolist(), np.split(rows[order], first[1:])))

    def fetch(self, rows: np.ndarray) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
        """(jpeg views, labels, heights, widths) of rows, in order."""
        n = len(rows)
        blocks = self.index.block_of(rows)
        jpegs = np.empty(n, object)
        cols = {c: np.empty(n, np.int64) for c in ("label", "height", "width")}
        for b in np.unique(blocks).tolist():
            block = self._loaded.get(b) or self._load(b)
            where = np.flatnonzero(blocks == b)
            pos = np.searchsorted(block.rows, rows[where])
            jpegs[where] = block.jpegs[pos]
            block.jpegs[pos] = None  # the source keeps them alive until DALI copied them
            for c, arr in cols.items():
                arr[where] = block.cols[c][pos]
            if self.with_keys:
                self.keys.update(zip(rows[where].tolist(), block.keys[pos].tolist()))
            block.remaining -= len(where)
            if block.remaining <= 0:
                del self._loaded[b]
        return jpegs.tolist(), cols["label"], cols["height"], cols["width"]

    def _load(self, b: int) -> _Block:
        idx = self.index
        f = int(idx.block_file[b])
        if f not in self._files:
            self._files[f] = open_parquet(idx.files[f])
        rows = self._planned.pop(b)
        table = self._files[f].read_row_group(int(idx.block_rg[b]), columns=self._columns,
                                              use_threads=False)  # DALI owns the cores
        table = table.take(pa.array(rows - idx.block_start[b]))
        self._loaded[b] = _Block(rows, table, self.with_keys, self.copy_rows)
        return self._loaded[b]



def read_sizes(index: ShardIndex, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """height, width columns of global rows [lo, hi) (reads only those row groups)."""
    hs, ws = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if hi > lo:
        first, last = index.block_of(np.asarray([lo, hi - 1])).tolist()
        opened: dict[int, pq.ParquetFile] = {}  # one open per file, not per row group
        for b in range(first, last + 1):
            f = int(index.block_file[b])
            if f not in opened:
                opened[f] = open_parquet(index.files[f])
            t = opened[f].read_row_group(
                int(index.block_rg[b]), columns=["height", "width"])
            start = index.block_start[b]
            a, z = max(lo, start) - start, min(hi, index.block_start[b + 1]) - start
            hs.append(t.column("height").to_numpy()[a:z])
            ws.append(t.column("width").to_numpy()[a:z])
    return np.concatenate(hs).astype(np.int64), np.concatenate(ws).astype(np.int64)



def num_rows(shards: str, split: str) -> int:
    """Rows of a split (Parquet metadata only)."""
    return sum(open_parquet(f).metadata.num_rows for f in shard_files(shards, split))


def split_columns(shards: str, split: str) -> dict[str, str]:
    """Column name -> Arrow type of a split's shards (the first file's schema)."""
    files = shard_files(shards, split)
    if not files:
        return {}
    return {f.name: str(f.type) for f in open_parquet(files[0]).schema_arrow}
