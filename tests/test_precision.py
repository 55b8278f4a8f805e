"""Precision and memory layout chosen by the hardware (`train.bf16` / `channels_last`
`auto`): bf16 where the device runs it natively, channels_last on CUDA and CPUs; explicit
values kept; the config accepts true, false and auto."""

from __future__ import annotations

import pytest
import torch

from vgg.config import ConfigError, load_experiment
from vgg.training import steps
from vgg.training.steps import AUTO, Precision, describe_choice, native_bf16

CPU = torch.device("cpu")


def _cpu_bf16(monkeypatch, native: bool) -> None:
    """Make the CPU capability probes (AMX tiles, AVX512-BF16) say `native`."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native)


def test_auto_picks_bf16_and_channels_last_on_a_cpu_with_native_bf16(monkeypatch):
    _cpu_bf16(monkeypatch, True)
    assert native_bf16(CPU)
    assert Precision.choose(AUTO, AUTO, CPU) == Precision(bf16=True, channels_last=True)
    assert "bf16 autocast, channels_last (auto; CPU with native bf16)" in describe_choice(AUTO, AUTO, Precision.choose(AUTO, AUTO, CPU), CPU)


def test_auto_falls_back_to_float32_nhwc_on_a_cpu_without_bf16(monkeypatch):
    _cpu_bf16(monkeypatch, False)
    assert not native_bf16(CPU)
    chosen = Precision.choose(AUTO, AUTO, CPU)
    assert chosen == Precision(bf16=False, channels_last=True)
    assert describe_choice(AUTO, AUTO, chosen, CPU) == "precision: float32, channels_last (auto; CPU without native bf16)"


def test_auto_without_onednn_is_float32(monkeypatch):
    _cpu_bf16(monkeypatch, True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert Precision.choose(AUTO, False, CPU) == Precision(bf16=False, channels_last=False)


def test_explicit_values_are_kept(monkeypatch):
    for native in (True, False):
        _cpu_bf16(monkeypatch, native)
        assert Precision.choose(True, False, CPU) == Precision(bf16=True, channels_last=False)
        assert Precision.choose(False, True, CPU) == Precision(bf16=False, channels_last=True)
    assert Precision.choose(AUTO, AUTO, torch.device("meta")) == Precision(False, False)


def test_the_resolved_choice_as_mlflow_params():
    assert Precision(True, False).params() == {"precision.bf16": True, "precision.channels_last": False}


def test_config_takes_auto_true_false_and_refuses_other_words(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {bf16: true}\nevaluate: {channels_last: false}\n")
    c = load_experiment(str(f), [])
    assert (c.train.bf16, c.train.channels_last, c.evaluate.bf16, c.evaluate.channels_last) == (True, AUTO, AUTO, False)
    with pytest.raises(ConfigError, match="train.bf16"):
        load_experiment(str(f), ["train.bf16=yes please"])


@pytest.mark.skipif(not native_bf16(CPU), reason="this CPU has no native bf16")
def test_this_machine_trains_in_bf16_by_default():
    """The shipped default on this project's CPU (AMX / AVX512-BF16): bf16 and NHWC."""
    c = load_experiment("configs/demo.yaml", [])
    assert Precision.choose(c.train.bf16, c.train.channels_last, CPU) == Precision(True, True)
    assert steps.Precision.choose(c.evaluate.bf16, c.evaluate.channels_last, CPU) == Precision(True, True)
