"""Fault injection and tracing for the training tests: `TrainCallback`s handed to
`stages.train.run(..., callbacks=...)`. They run inside the Ray Train workers, so this
module is pickled by value (the workers need not import `tests`)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import ray
import ray.cloudpickle

from vgg.training.loop import TrainCallback

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class KillAt(TrainCallback):
    """SIGKILL the worker of `rank` before step `step` of epoch `epoch`, once (the marker
    file says it happened: the restarted worker goes on)."""

    def __init__(self, epoch: int, step: int, rank: int, marker: str):
        self.at, self.marker = (epoch, step, rank), str(marker)

    def on_step(self, epoch: int, step: int, rank: int) -> None:
        if (epoch, step, rank) != self.at or os.path.exists(self.marker):
            return
        with open(self.marker, "w") as f:
            f.write(f"killed pid {os.getpid()} at epoch {epoch} step {step} rank {rank}\n")
        # Ray Train's controller collects a reported checkpoint at its next poll (0.2 s in the
        # tests): a worker killed sooner after the report dies before Ray knows the checkpoint,
        # and the restart starts over (bf16 steps at toy size come that fast). Wait past a poll.
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)


class HangAfterEpoch(TrainCallback):
    """Rank 0 stops (sleeps) once epoch `epoch`'s checkpoint is reported: the test kills
    the driver meanwhile."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def after_checkpoint(self, epoch: int, rank: int) -> None:
        if epoch == self.epoch and rank == 0:
            time.sleep(3600)


class RecordRows(TrainCallback):
    """Every rank writes the shard rows it trained on, per epoch, into `folder`."""

    wants_rows = True

    def __init__(self, folder: str):
        self.folder = str(folder)

    def on_epoch_rows(self, epoch: int, rank: int, rows: list[int], steps: int) -> None:
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"epoch{epoch}_rank{rank}_{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump({"epoch": epoch, "rank": rank, "rows": rows, "steps": steps,
                       "node_id": ray.get_runtime_context().get_node_id()}, f)
