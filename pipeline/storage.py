"""Stage outputs under `work_dir`, on any pyarrow filesystem (local, s3://, gs://, ...).

Layout::

    <work_dir>/stages/<stage_id>/<cache_key>/...            completed output
    <work_dir>/stages/<stage_id>/<cache_key>/_SUCCESS.json   written last: the run, and
                                                             each file's size and sha256
    <work_dir>/stages/<stage_id>/LATEST                      key of the newest one
    <work_dir>/stages/<stage_id>/_tmp/<key>-<nonce>/         work in progress
    <work_dir>/stages/<stage_id>/_locks/<key>.lock           held while an invocation works on it

A stage writes into a fresh temporary directory; on success it is moved to its
final place and the `_SUCCESS.json` marker is written after the move. An output
counts as completed only if the marker exists, so an interrupted stage (Ctrl-C,
kill -9, a crash) never leaves anything that could be taken for a result. The marker
records every file's size and sha256; reuse checks the sizes (and with `--verify` the
hashes), so a file damaged since (truncated, overwritten, deleted) is noticed.
"""

from __future__ import annotations

import errno
import os
import posixpath
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import filelock
import pyarrow.fs as pafs

from pipeline.errors import UserError
from vgg.storage import StageOutput as _Output
from vgg.storage import (HASH, MARKER, digest, exists, file_records, file_sizes, is_local, read_bytes, read_json,  # noqa: F401
                         resolve_uri, to_uri, write_bytes, write_json)

__all__ = ["MARKER", "Damage", "DamagedOutput", "StageOutput", "Store", "WorkDirError", "check_work_dir",
           "digest", "disk_full", "exists", "file_records", "file_sizes", "is_local", "no_space",
           "read_bytes", "read_json", "resolve_uri", "to_uri", "write_bytes", "write_json"]



def disk_full(e: BaseException) -> bool:
    """ENOSPC here, in a Ray worker (its error carries the remote traceback as text), or in
    SQLite (the MLflow store: "database or disk is full")."""
    text = str(e)
    return ((isinstance(e, OSError) and e.errno == errno.ENOSPC) or "database or disk is full" in text
            or "No space left on device" in text)


def no_space(e: BaseException, work_dir: str | None = None) -> str:
    """The line for a full disk: the disk, never "the database" (SQLite says "database or
    disk is full" when MLflow is the first to hit it)."""
    where = getattr(e, "filename", None) or work_dir
    if not where:
        return "no space left on the device"
    if "database or disk is full" in str(e) and work_dir:
        where = f"{work_dir} (MLflow's store reported it)"
    return f"no space left on the device holding {where}"


class WorkDirError(UserError, RuntimeError):
    """work_dir cannot hold outputs (a path through a file, read-only, no permission)."""

    keep_traceback = False


def check_work_dir(work_dir: str, write: bool = True) -> None:
    """A local work_dir must be (or become) a writable directory: checked before MLflow
    and Ray start, so that an unusable one fails in one line naming the path and the
    reason (`write=False`: only that no file is in the way, creating nothing). Object
    storage (s3://, ...) is left to its first write."""
    fs, root = resolve_uri(work_dir)
    if not is_local(fs):
        return
    probe = root
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if os.path.lexists(probe) and not os.path.isdir(probe):
        what = "is a file" if probe == root else f"goes through {probe}, which is a file"
        raise WorkDirError(f"work_dir {work_dir} {what}, not a directory: choose another work_dir "
                           "(--set work_dir=PATH) or move the file away")
    if not write:
        return
    try:
        os.makedirs(root, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=".write-check-", dir=root)
        os.close(fd)
        os.remove(path)
    except OSError as e:
        reason = e.strerror or str(e)
        raise WorkDirError(f"work_dir {work_dir} is not writable ({reason}"
                           f"{f': {e.filename}' if e.filename and os.path.dirname(str(e.filename)) != root else ''}): "
                           "choose a writable work_dir (--set work_dir=PATH)") from None


class DamagedOutput(UserError, RuntimeError):
    """A completed output whose files are not those it was published with."""


@dataclass(frozen=True)
class Damage:
    """What is wrong with a completed output: the first file that differs, and how."""

    stage_id: str
    file_uri: str
    why: str

    def __str__(self) -> str:
        return f"{self.file_uri} {self.why}"


@dataclass(frozen=True)
class StageOutput(_Output):
    """A stage's output folder (`vgg.storage.StageOutput`) and its success marker."""

    @property
    def marker(self) -> dict:
        return self.read_json(MARKER)


class Store:
    """Completed and in-progress stage outputs under one work_dir."""

    def __init__(self, work_dir: str):
        self.work_dir = work_dir
        self.fs, self.root = resolve_uri(work_dir)

    # ------------------------------------------------------------ naming
    def uri(self, path: str) -> str:
        return to_uri(self.fs, path, self.work_dir)

    def stage_root(self, stage_id: str) -> str:
        return posixpath.join(self.root, "stages", stage_id)

    def output(self, stage_id: str, key: str) -> StageOutput:
        path = posixpath.join(self.stage_root(stage_id), key)
        return StageOutput(stage_id, key, self.fs, path, self.uri(path))

    # ------------------------------------------------------------ queries
    def is_complete(self, stage_id: str, key: str) -> bool:
        return exists(self.fs, posixpath.join(self.stage_root(stage_id), key, MARKER))

    def damage(self, stage_id: str, key: str, hashes: bool = False,
               max_hash_bytes: float = float("inf")) -> Damage | None:
        """Whether a completed output still holds the files it was published with: their
        sizes always (one listing), their sha256 too with `hashes` (reads every file; not if
        the output holds more than `max_hash_bytes`).
        -> the first difference, or None. Outputs published before the marker recorded
        its files are taken as they are."""
        out = self.output(stage_id, key)
        try:
            marker = out.marker
            files = marker.get("files") if isinstance(marker, dict) else None
        except (OSError, ValueError) as e:  # a truncated or garbled marker
            return Damage(stage_id, out.file_uri(MARKER), f"cannot be read ({type(e).__name__})")
        if not isinstance(files, dict):
            return None
        sizes = file_sizes(self.fs, out.path)
        for name, rec in sorted(files.items()):
            if name not in sizes:
                return Damage(stage_id, out.file_uri(name), "is missing")
            if sizes[name] != rec.get("size"):
                return Damage(stage_id, out.file_uri(name),
                              f"is {sizes[name]} bytes, {rec.get('size')} when it was published")
        if hashes and sum(sizes[n] for n in files) <= max_hash_bytes:
            for name, rec in sorted(files.items()):
                if rec.get(HASH) and digest(self.fs, out.join(name)) != rec[HASH]:
                    return Damage(stage_id, out.file_uri(name),
                                  "has other content than when it was published (sha256 differs)")
        return None

    def latest(self, stage_id: str) -> StageOutput | None:
        """The most recently published completed output of a stage, if any."""
        pointer = posixpath.join(self.stage_root(stage_id), "LATEST")
        if not exists(self.fs, pointer):
            return None
        key = read_bytes(self.fs, pointer).decode().strip()
        if not self.is_complete(stage_id, key):
            return None
        return self.output(stage_id, key)

    # ------------------------------------------------------------ writing
    def begin(self, stage_id: str, key: str) -> StageOutput:
        """A fresh temporary directory for a stage's work."""
        nonce = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        path = posixpath.join(self.stage_root(stage_id), "_tmp", f"{key}-{nonce}")
        self.fs.create_dir(path, recursive=True)
        return StageOutput(stage_id, key, self.fs, path, self.uri(path))

    def scratch(self, stage_id: str, key: str) -> StageOutput:
        """A per-(stage, key) directory that outlives interrupted runs (for resuming; created on use)."""
        path = posixpath.join(self.stage_root(stage_id), "_scratch", key)
        return StageOutput(stage_id, key, self.fs, path, self.uri(path))

    def clear_scratch(self, stage_id: str, key: str) -> None:
        """Delete a stage's scratch directory (e.g. its checkpoints, so that it starts over)."""
        scratch = self.scratch(stage_id, key)
        if exists(self.fs, scratch.path):
            self.fs.delete_dir(scratch.path)

    @contextmanager
    def claim(self, stage_id: str, key: str, on_wait: Callable[[str], None] = lambda owner: None
              ) -> Iterator[None]:
        """Hold the lock of (stage, key) while working on it: two invocations on one work_dir
        never run the same stage and key at once; the second waits (`on_wait` is told who
        holds it) and then finds the output done. A file lock (flock, through `filelock`):
        the OS releases it when its holder dies, kill -9 included, so no lock goes stale.
        Local (and NFS) work_dirs; object stores have no locks."""
        if not is_local(self.fs):
            yield
            return
        path = os.path.join(self.stage_root(stage_id), "_locks", f"{key}.lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock, owner_file = filelock.FileLock(path), path + ".owner"
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            try:
                with open(owner_file) as f:
                    on_wait(f.read().strip())
            except OSError:
                on_wait("another invocation")
            lock.acquire()
        try:
            with open(owner_file, "w") as f:
                f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}")
            yield
        finally:
            lock.release()

    def discard(self, tmp: StageOutput) -> None:
        """Remove a temporary output (after a failure)."""
        if exists(self.fs, tmp.path):
            self.fs.delete_dir(tmp.path)

    def publish(self, tmp: StageOutput, marker: dict) -> StageOutput:
        """Move a finished temporary output into place, then mark it complete."""
        final = self.output(tmp.stage_id, tmp.key)
        # what reuse checks (`damage`): every file's size and content hash, recorded last
        marker = {**marker, "files": file_records(self.fs, tmp.path)}
        if exists(self.fs, final.path):  # --force, a damaged output, or debris of an interrupted publish
            self.fs.delete_dir(final.path)
        self.fs.move(tmp.path, final.path)
        write_json(self.fs, final.join(MARKER), marker)
        write_bytes(self.fs, posixpath.join(self.stage_root(tmp.stage_id), "LATEST"), tmp.key.encode())
        return final

    def sweep_tmp(self, stage_id: str, key: str, stale_after_s: float = 86400.0) -> int:
        """Delete temporary outputs left by interrupted runs; returns how many.

        Removes earlier attempts at the same key, and anything older than
        `stale_after_s` (a concurrent run of another key is left alone).
        """
        tmp_root = posixpath.join(self.stage_root(stage_id), "_tmp")
        if not exists(self.fs, tmp_root):
            return 0
        now = time.time()
        n = 0
        for info in self.fs.get_file_info(pafs.FileSelector(tmp_root)):
            age = now - info.mtime.timestamp() if info.mtime else float("inf")
            if info.type == pafs.FileType.Directory and (
                info.base_name.startswith(f"{key}-") or age >= stale_after_s
            ):
                self.fs.delete_dir(info.path)
                n += 1
        return n
