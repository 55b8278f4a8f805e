"""The divergence rule (vgg.training.guard): non-finite or exploding training losses."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from vgg.training import guard
from vgg.training.guard import ceiling, explosion, message


def test_the_finite_explosion_of_lr_1000_is_caught_with_the_bound_it_broke():
    # issue 26: epoch 2 of A at lr 1000 had a mean loss of 9.7e35 after a first epoch near ln 5
    reason = explosion(9.7e35, first_epoch_loss=1.61, num_classes=5)
    assert reason == "training loss 9.7e+35 is above 16.1 (10 x the first epoch's 1.61)"


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_non_finite_losses_are_divergence_even_before_a_first_epoch(loss):
    assert explosion(loss, None, 5) == f"training loss is {loss}"


def test_a_net_that_trains_or_wobbles_is_not_stopped():
    first = 1.5
    for loss in (1.5, 0.2, 3.0, 10 * first):  # down, back up, up to the bound itself
        assert explosion(loss, first, 5) is None
    assert explosion(10 * first + 0.01, first, 5) is not None


def test_a_fine_tuned_net_that_started_near_zero_may_drift_up_to_chance():
    # D-jit from D: first epoch 0.02; ten times that (0.2) is still a sane loss
    assert explosion(0.5, 0.02, 5) is None
    assert explosion(math.log(5), 0.02, 5) is None
    assert "ln 5, the loss of a uniform guess" in explosion(math.log(5) + 0.01, 0.02, 5)


def test_without_a_first_epoch_or_after_one_that_exploded_the_absolute_cap_holds():
    cap = guard.ABSOLUTE_BOUND * math.log(10)
    assert ceiling(None, 10) == ceiling(math.nan, 10) == ceiling(1e30, 10) == pytest.approx(cap)
    assert explosion(cap * 0.99, None, 10) is None
    assert "100 x ln 10" in explosion(cap * 1.01, None, 10)
    assert "100 x ln 10" in explosion(cap * 1.01, 1e30, 10)


def test_fewer_than_two_classes_is_an_error():
    with pytest.raises(ValueError, match="num_classes must be >= 2, got 1"):
        ceiling(1.0, 1)


def test_the_failure_is_one_line_naming_epoch_step_and_lr():
    line = message("train/A", 2, 31, 1000.0, explosion(9.7e35, 1.61, 5))
    assert "\n" not in line
    assert line.startswith("train/A: training diverged at epoch 2, step 31 (lr 1000): training loss 9.7e+35")
    assert "nothing is published" in line
    assert "epoch 3 (lr 0.01)" in message("train/A", 3, None, 0.01, "training loss is nan")


def test_the_rule_imports_nothing_but_the_standard_library():
    code = ("import sys; import vgg.training.guard; "
            "bad = [m for m in ('torch', 'ray', 'mlflow', 'pyarrow', 'pipeline') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
