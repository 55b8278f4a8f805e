"""Parquet files of softmax posteriors (`vgg.results.metrics`, format in its docstring):
the pyarrow adapter, imported only when a `.parquet` posteriors file is read or written.
Arrays in, arrays out: `vgg.results.metrics.Posteriors` checks them."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

FORMAT = "vgg-posteriors/1"  # schema metadata b"format"


def _to_table(keys: list[str], labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> pa.Table:
    k = len(classes)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel(), type=pa.float32()), k)
    meta = {b"classes": json.dumps(classes).encode(), b"format": FORMAT.encode()}
    schema = pa.schema([("key", pa.string()), ("label", pa.int32()),
                        ("probs", pa.list_(pa.float32(), k))], metadata=meta)
    return pa.Table.from_arrays(
        [pa.array(keys, type=pa.string()), pa.array(labels.astype(np.int32)), flat], schema=schema)


def write_posteriors(fs: pafs.FileSystem, path: str, keys: list[str], labels: np.ndarray,
                     probs: np.ndarray, classes: list[str]) -> None:
    """One Parquet file at `path` on `fs` (format: `vgg.results.metrics`)."""
    pq.write_table(_to_table(keys, labels, probs, classes), path, filesystem=fs)


def read_posteriors(fs: pafs.FileSystem, path: str) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(keys, labels, probs, classes) of a file written by `write_posteriors`."""
    table = pq.read_table(path, filesystem=fs)
    missing = {"key", "label", "probs"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: not a posteriors file, missing columns {sorted(missing)}")
    meta = table.schema.metadata or {}
    if b"classes" not in meta:
        raise ValueError(f"{path}: no b'classes' in the Parquet schema metadata")
    classes = json.loads(meta[b"classes"])
    probs = _probs_matrix(table.column("probs").combine_chunks(), len(table), len(classes), path)
    labels = table.column("label").to_numpy().astype(np.int64)
    return table.column("key").to_pylist(), labels, probs, classes


def _probs_matrix(col: pa.Array, n: int, k: int, path: str) -> np.ndarray:
    """(n, k) float32 view of a list / fixed-size-list column with k values per row."""
    if col.null_count:
        raise ValueError(f"{path}: {col.null_count} rows have null probs")
    if not pa.types.is_fixed_size_list(col.type):
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if n and (lengths != k).any():
            i = int(np.flatnonzero(lengths != k)[0])
            raise ValueError(f"{path}: row {i} has {lengths[i]} probs for {k} classes")
    elif col.type.list_size != k:
        raise ValueError(f"{path}: probs has {col.type.list_size} values per row for {k} classes")
    values = col.flatten()  # respects slicing/offsets, unlike .values
    if values.null_count:
        raise ValueError(f"{path}: probs contain {values.null_count} null values")
    return values.cast(pa.float32()).to_numpy().reshape(n, k)
