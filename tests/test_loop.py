"""The training loop of the library (`vgg.training.loop.fit`) on one process, with PyTorch
alone: epochs, the best epoch, callbacks, a resume that continues bit for bit, and the
divergence guard on a finite explosion."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vgg.models import build_vgg
from vgg.training.loop import FitOptions, TrainCallback, TrainState, fit
from vgg.training.schedule import PlateauSchedule

CLASSES, CROP = 3, 32


class Batches:
    """A loader over fixed batches: `.epoch(e)` (training) and iteration with keys (validation)."""

    def __init__(self, n_batches: int = 3, batch: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.batches = [(torch.randn(batch, 3, CROP, CROP, generator=g),
                         torch.randint(0, CLASSES, (batch,), generator=g)) for _ in range(n_batches)]
        self.num_samples = n_batches * batch

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int):
        return iter(self.batches)

    def __iter__(self):
        return iter((x, y, [f"k{i}" for i in range(len(y))]) for x, y in self.batches)


class Count(TrainCallback):
    def __init__(self):
        self.steps, self.ends = 0, []

    def on_step(self, epoch: int, step: int, rank: int) -> None:
        self.steps += 1

    def on_epoch_end(self, record) -> None:
        self.ends.append(record["epoch"])


def state_of(net: nn.Module, lr: float = 0.01) -> TrainState:
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return TrainState(net, opt, PlateauSchedule(opt))


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return build_vgg("A", num_classes=CLASSES, width=0.0625, crop=CROP, init="glorot")


OPTS = FitOptions(epochs=4, num_classes=CLASSES, per_worker_batch=8, log_every=0, name="test", crop=CROP)


def test_fit_runs_every_epoch_keeps_the_best_and_calls_back():
    state, count, sunk = state_of(tiny_net()), Count(), []
    result = fit(state, Batches(), Batches(seed=1), OPTS, callbacks=[count],
                 checkpoint=lambda s, r: sunk.append((s.epoch, r["epoch"])))
    assert result.diverged is None and count.steps == 4 * 3 and count.ends == [0, 1, 2, 3]
    assert sunk == [(e, e) for e in range(4)]
    history = state.progress["history"]
    assert [r["epoch"] for r in history] == [0, 1, 2, 3] and all(r["val_images"] == 24 for r in history)
    best = max(history, key=lambda r: (r["val_top1_acc"], r["epoch"]))
    assert result.best["epoch"] == best["epoch"]


def test_a_resumed_fit_continues_bit_for_bit():
    whole = state_of(tiny_net())
    fit(whole, Batches(), Batches(seed=1), OPTS)
    half = state_of(tiny_net())
    fit(half, Batches(), Batches(seed=1), FitOptions(**{**OPTS.__dict__, "epochs": 2}))
    saved = copy.deepcopy(half.state_dict())  # what a checkpoint holds
    resumed = state_of(tiny_net())
    resumed.load_state_dict(saved)
    fit(resumed, Batches(), Batches(seed=1), OPTS, start=saved["epoch"] + 1)
    for a, b in zip(whole.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)
    timeless = lambda h: [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_seconds")}  # noqa: E731
                          for r in h]
    assert timeless(resumed.progress["history"]) == timeless(whole.progress["history"])


def test_a_finite_explosion_stops_training_naming_epoch_step_lr_and_bound():
    """lr 1e4 on a linear classifier: the loss grows large but stays finite (the quoted
    failure: epoch 2 loss 9.7e35 passed a guard that checked NaN only)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * CROP * CROP, CLASSES))
    state, sunk = state_of(net, lr=1e4), []
    result = fit(state, Batches(), Batches(seed=1), OPTS, checkpoint=lambda s, r: sunk.append(r["epoch"]))
    d = result.diverged
    assert d is not None and d.lr == 1e4
    assert torch.isfinite(torch.tensor(d.loss)) and "is above" in d.reason, d
    assert d.step is not None and d.where.startswith(f"epoch {d.epoch + 1} step {d.step + 1}")
    assert d.epoch not in sunk  # the diverged epoch is never checkpointed
    assert all(torch.isfinite(p).all() for p in net.parameters())  # finite: only the guard saw it


@pytest.mark.parametrize("lr", [1e30])
def test_a_non_finite_loss_is_divergence_too(lr):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * CROP * CROP, CLASSES))
    result = fit(state_of(net, lr=lr), Batches(), Batches(seed=1), OPTS)
    assert result.diverged is not None and result.diverged.epoch == 0
