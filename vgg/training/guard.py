"""The divergence guard's rule: when a training loss says the run has diverged.

Pure functions (math only; no torch, Ray or MLflow), so the rule can be read, tested and
called from any training loop. A run has diverged when its training loss is

- not finite (NaN or +-inf), or
- above `ceiling(first_epoch_loss, num_classes)`, the larger of

  * `RELATIVE_BOUND` x the first epoch's mean training loss (a net that trains never
    comes back to ten times the loss it started from; floored at ln K, the loss of a
    uniform guess, so that a net that started near 0 loss -- a fine-tuned one -- is not
    stopped for drifting back to chance: that is a collapse, the health check's case), and
    capped at
  * `ABSOLUTE_BOUND` x ln K (a loss a hundred times that of a uniform guess is an
    explosion whatever the first epoch did; it also covers the first epoch itself, before
    there is a first-epoch loss, and a first epoch that already exploded).

Why more than NaN: a finite explosion (lr 1000: epoch 2 loss 9.7e35, 100% validation
error) used to pass a guard that checked only non-finite values, and the epoch-1 net was
published as "best".

Use: after each step (or each epoch) call `explosion(loss, first_epoch_loss, K)`; a
non-None reason means stop, publish nothing, and fail with `message(...)`. In a loop that
avoids a device sync per step, compare the step losses with `ceiling(...)` on the device
(`~isfinite(l) | (l > ceiling)`) and call `explosion` on the first offending value for its
reason text.
"""

from __future__ import annotations

import math

#: A finite loss above this many times the first epoch's mean training loss is an explosion.
RELATIVE_BOUND = 10.0
#: A finite loss above this many times ln K (the loss of a uniform guess) is an explosion.
ABSOLUTE_BOUND = 100.0


def ceiling(first_epoch_loss: float | None, num_classes: int) -> float:
    """The largest finite training loss that is not an explosion (see the module docstring).

    `first_epoch_loss`: the first epoch's mean training loss, or None while it is not known
    (during the first epoch) or when it is not finite; then only the absolute bound holds.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    chance = math.log(num_classes)
    cap = ABSOLUTE_BOUND * chance
    if first_epoch_loss is None or not math.isfinite(first_epoch_loss) or first_epoch_loss < 0:
        return cap
    return min(cap, max(RELATIVE_BOUND * first_epoch_loss, chance))


def explosion(loss: float, first_epoch_loss: float | None, num_classes: int) -> str | None:
    """Why `loss` (a step's or an epoch's mean training loss) means divergence, or None.

    The reason is one clause naming the value and the bound it broke, e.g. "training loss
    9.7e+35 is above 16.1 (10 x the first epoch's 1.61)" or "training loss is nan".
    """
    loss = float(loss)
    if not math.isfinite(loss):
        return f"training loss is {loss}"
    bound = ceiling(first_epoch_loss, num_classes)
    if loss <= bound:
        return None
    chance = math.log(num_classes)
    if bound >= ABSOLUTE_BOUND * chance:
        why = f"{ABSOLUTE_BOUND:g} x ln {num_classes}, the loss of a uniform guess"
    elif bound > chance:
        why = f"{RELATIVE_BOUND:g} x the first epoch's {first_epoch_loss:.3g}"
    else:
        why = f"ln {num_classes}, the loss of a uniform guess"
    return f"training loss {loss:.3g} is above {bound:.3g} ({why})"


def message(stage: str, epoch: int, step: int | None, lr: float, reason: str) -> str:
    """The one-line failure of a diverged train stage. `epoch` and `step` count from 1."""
    where = f"epoch {epoch}" + (f", step {step}" if step is not None else "")
    return (f"{stage}: training diverged at {where} (lr {lr:g}): {reason}; nothing is "
            f"published. Lower this net's lr and re-run")
