"""benchmarks/bench_cpu.py at a toy size: its table and JSON rows, and its bad-input errors."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_cpu", ROOT / "benchmarks" / "bench_cpu.py")
bench_cpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_cpu)

TOY = ["--nets", "A", "A-LRN", "--sizes", "0.0625:32:2", "--rounds", "2", "--steps", "1",
       "--roofline-n", "64", "--threads", "1"]


def test_toy_run_prints_and_writes_positive_figures_per_net_and_variant(tmp_path, capsys):
    bench_cpu.main([*TOY, "--json", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [(r["net"], r["variant"]) for r in rows] == [
        (net, v) for net in ("A", "A-LRN") for v in ("fp32-nchw", "fp32-nhwc", "bf16-nhwc")]
    for r in rows:
        assert (r["width"], r["crop"], r["batch"]) == (0.0625, 32, 2)
        for key in ("train_images_s", "eval_images_s", "train_tflops", "eval_tflops",
                    "train_of_bf16_roofline", "train_of_fp32_roofline", "eval_of_bf16_roofline",
                    "eval_of_fp32_roofline", "forward_gmacs"):
            assert r[key] > 0, key
        assert r["roofline_tflops"]["bf16"] > 0 and r["roofline_tflops"]["fp32"] > 0
        # TFLOP/s are 6 (training) and 2 (evaluation) x the forward MACs per image
        assert r["train_tflops"] == pytest.approx(6e9 * r["forward_gmacs"] * r["train_images_s"] / 1e12)
        assert r["eval_tflops"] == pytest.approx(2e9 * r["forward_gmacs"] * r["eval_images_s"] / 1e12)
    out = capsys.readouterr().out
    assert out.count("| A | 0.0625, 32, 2 |") == 3 and out.count("| A-LRN | 0.0625, 32, 2 |") == 3
    assert "roofline" in out and "load average" in out


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "0.5:60:8"], "crop a multiple of 32"),
    (["--sizes", "0.5x64"], "WIDTH:CROP:BATCH"),
    (["--nets", "F"], "invalid choice: 'F'"),
    (["--rounds", "0"], "must be >= 1"),
])
def test_bad_input_is_one_error_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench_cpu.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error:" in err and message in err
