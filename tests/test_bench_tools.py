"""benchmarks/compare_runs.py and benchmarks/bench_phases.py on small made-up inputs: the
figures they print are the ones the inputs imply."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.conftest import ROOT
from vgg.results.metrics import Posteriors, write_posteriors
from vgg.storage import resolve_uri


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare_runs = _load("compare_runs")
bench_phases = _load("bench_phases")


def _posteriors(run, net: str, mode: str, right: np.ndarray, order: np.ndarray, pipeline: bool) -> None:
    """A run whose net gets image i right where right[i], its rows written in `order`."""
    n = len(right)
    labels = np.arange(n) % 3
    pred = np.where(right, labels, (labels + 1) % 3)
    probs = np.full((n, 3), 0.1, np.float32)
    probs[np.arange(n), pred] = 0.8
    post = Posteriors([f"img{i:03d}" for i in order], labels[order], probs[order], ["a", "b", "c"])
    folder = run / "stages" / "evaluate" / net / "k123" if pipeline else run / "evaluate" / net
    write_posteriors(post, *resolve_uri(str(folder / "posteriors" / f"{mode}.parquet")))


def test_compare_runs_pairs_images_by_key_in_both_layouts(tmp_path):
    rng = np.random.default_rng(0)
    a_right = rng.random(200) < 0.8
    b_right = a_right.copy()
    b_right[:20] = ~b_right[:20]  # 20 images change: the errors differ by (b - a) on those
    _posteriors(tmp_path / "ladder", "A", "multi-crop@single", a_right, np.arange(200), pipeline=False)
    _posteriors(tmp_path / "work", "A", "multi-crop@single", b_right, rng.permutation(200), pipeline=True)
    assert compare_runs.nets_of(tmp_path / "ladder") == ["A"] == compare_runs.nets_of(tmp_path / "work")
    r = compare_runs.paired(tmp_path / "ladder", tmp_path / "work", "A", "multi-crop@single")
    assert r["n"] == 200
    assert r["a"] == pytest.approx(100 * (1 - a_right.mean()))
    assert r["b"] == pytest.approx(100 * (1 - b_right.mean()))
    lo, hi = r["diff_ci"]
    assert lo <= r["a"] - r["b"] <= hi and hi - lo < 10
    same = compare_runs.paired(tmp_path / "ladder", tmp_path / "ladder", "A", "multi-crop@single")
    assert same["diff_ci"] == (0.0, 0.0)  # a run against itself: no difference on any resample
    with pytest.raises(SystemExit, match="no dense@single posteriors of net A"):
        compare_runs.paired(tmp_path / "ladder", tmp_path / "work", "A", "dense@single")


def test_bench_phases_splits_a_training_stage_as_its_timers_say():
    r = lambda pid, name, t0, t1: {"pid": pid, "name": name, "t0": t0, "t1": t1}  # noqa: E731
    records = [
        r(1, "process_boot:run.py", 0.0, 0.0),
        r(1, "runner.tracking.setup_experiment", 1.0, 2.5),
        r(1, "runner.connect_ray", 2.5, 6.5),
        r(1, "execution.run_stage", 10.0, 30.0),
        r(1, "data_parallel_trainer.DataParallelTrainer.fit", 10.5, 27.0),
        r(7, "process_boot:default_worker.py", 11.0, 11.0),
        *[r(pid, "ray_train.train_loop_per_worker", 19.0, 26.0) for pid in (7, 8)],
        *[r(pid, "ray_train._restore", 19.0, 21.0) for pid in (7, 8)],
        r(7, "ray_train.MlflowLogger.log_params", 19.5, 20.5),
        *[r(pid, "ray_train._loaders", 21.0, 21.5) for pid in (7, 8)],
        r(7, "loop.fit", 21.5, 25.5), r(8, "loop.fit", 21.6, 25.9),
        r(1, "train._finish", 27.0, 28.0),
        r(1, "execution.tracking.log_net", 28.0, 29.5),
        r(1, "runner.disconnect_ray", 30.5, 31.5),
        r(7, "import:torch", 12.0, 13.5), r(8, "import:torch", 12.0, 14.0),
    ]
    rows = bench_phases.breakdown(records)
    assert rows[0][:2] == ("before the first stage", 10.0)
    assert "Ray start 4.0, MLflow store 1.5" in rows[0][2]
    part, secs, detail = rows[1]
    assert (part, secs) == ("stage 1", 20.0)
    for text in ("Ray Train start until the workers run 8.5", "model and DDP 2.0",
                 "rank 0's first MLflow call 1.0", "loaders 0.5", "the epochs 4.4",
                 "fit() returns 1.0", "model file and plot 1.0", "MLflow model 1.5", "1 new processes"):
        assert text in detail, (text, detail)
    assert rows[2] == ("after the last stage", 1.5, "Ray shutdown 1.0")
    assert rows[3][1] == pytest.approx(3.5) and "torch: 2 processes, median 1.8 s" in rows[3][2]
