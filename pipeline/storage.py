"""Stage outputs under `work_dir`, on any pyarrow filesystem (local, s3://, gs://, ...).

Layout::

    <work_dir>/stages/<stage_id>/<cache_key>/...            completed output
    <work_dir>/stages/<stage_id>/<cache_key>/_SUCCESS.json   written last
    <work_dir>/stages/<stage_id>/LATEST                      key of the newest one
    <work_dir>/stages/<stage_id>/_tmp/<key>-<nonce>/         work in progress
    <work_dir>/stages/<stage_id>/_locks/<key>.lock           held while an invocation works on it

A stage writes into a fresh temporary directory; on success it is moved to its
final place and the `_SUCCESS.json` marker is written after the move. An output
counts as completed only if the marker exists, so an interrupted stage (Ctrl-C,
kill -9, a crash) never leaves anything that could be taken for a result.
"""

from __future__ import annotations

import os
import posixpath
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import filelock
import pyarrow.fs as pafs

from vgg.storage import StageOutput as _Output
from vgg.storage import exists, is_local, read_bytes, read_json, resolve_uri, to_uri, write_bytes, write_json

__all__ = ["MARKER", "StageOutput", "Store", "exists", "is_local", "read_bytes", "read_json", "resolve_uri",
           "to_uri", "write_bytes", "write_json"]

MARKER = "_SUCCESS.json"


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
        if exists(self.fs, final.path):  # --force, or debris of an interrupted publish
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
