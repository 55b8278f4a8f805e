"""`python -m vgg.ladder` at toy size on the CPU: a generated image folder, width 1/8, A and
two nets from A (one deeper, one fine-tuned with scale jittering), one or two epochs.

It runs in a subprocess in which ray, mlflow, pyarrow, nvidia and the workflow cannot be
imported (as on a bare GPU box); the posteriors, tables, claims and summary exist; and
the workflow's report stage rebuilds the same tables from the ladder's posteriors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, write_images
from tests.test_layout import BLOCK_HOOK

TOY = """
augment: {crop: 32}
train:
  batch_size: 16
  width: 0.125
  max_epochs: 2
  nets:
    A:     {arch: A, scale: 37, lr: 0.01, init: glorot}
    B:     {arch: B, scale: 37, lr: 0.01, init: {from_A: train/A, rest: glorot}}
    B-jit: {arch: B, scale: [37, 48], lr: 0.003, epochs: 1, init: {full: train/B}}
evaluate: {grid: 2, batch_size: 16}
fuse: {members: ["B:multi-crop@single", "B-jit:dense@multi"]}
report: {bootstrap_samples: 200, compare_mode: multi-crop@single}
"""


def _folder(root: Path, classes: int = 3, train: int = 8, val: int = 4) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        for split, n in (("train", train), ("val", val)):
            images = []
            for _ in range(n):
                h, w = rng.integers(36, 60, size=2)
                base = np.zeros((h, w, 3), np.uint8)
                base[..., c] = 160  # a class colour, with noise
                images.append(Image.fromarray(np.clip(base + rng.integers(0, 90, (h, w, 3)), 0, 255).astype(np.uint8)))
            write_images(root, split, f"class{c}", images)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ladder")
    _folder(tmp / "data")
    (tmp / "toy.yaml").write_text(TOY)
    out = tmp / "out"
    code = BLOCK_HOOK + (
        "import runpy\n"
        f"sys.argv = ['vgg.ladder', {str(tmp / 'toy.yaml')!r}, '--data', {str(tmp / 'data')!r}, '--out', {str(out)!r},"
        " '--device', 'cpu']\n"
        "try:\n"
        "    runpy.run_module('vgg.ladder', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "else:\n"
        "    code = 0\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'nvidia', 'pyarrow', 'pipeline'))\n"
        "print('IMPORTED', bad)\n"
        "sys.exit(code)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    return res, out


def test_the_ladder_runs_with_pytorch_alone(ladder):
    res, out = ladder
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "IMPORTED []" in res.stdout
    for net in ("A", "B", "B-jit"):
        assert (out / "train" / net / "model.pt").is_file()
        modes = sorted(p.name for p in (out / "evaluate" / net / "posteriors").iterdir())
        assert len(modes) == 6 and all(m.endswith(".npz") for m in modes)  # no pyarrow: NumPy files
    assert (out / "fuse" / "fusion.json").is_file()
    for name in ("table3.json", "table4.json", "table5.json", "table6.json", "claims.json"):
        assert (out / "report" / "tables" / name).is_file(), name
    claims = json.loads((out / "report" / "claims.json").read_text())
    assert {c["claim"] for c in claims} >= {2, 3, 5}  # depth (B vs A), jittering, fusion
    assert (out / "report" / "error_vs_depth.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["nets"]) == {"A", "B", "B-jit"} and summary["wall_seconds"] > 0
    assert all(n["images_per_s"] > 0 and n["epochs"] >= 1 for n in summary["nets"].values())
    assert "ladder done in" in res.stderr and "ETA" in res.stderr


def test_the_report_stage_rebuilds_the_report_from_the_ladders_posteriors(ladder, tmp_path):
    from pipeline.dag import ReportInputs, ReportSection
    from pipeline.stage import StageContext, TrackingInfo
    from pipeline.storage import StageOutput
    from stages import report as R
    from vgg.artifacts import Evaluation, Fusion
    from vgg.config import load_experiment

    res, out = ladder
    assert res.returncode == 0
    evaluations = {n: Evaluation(StageOutput.at(str(out / "evaluate" / n))) for n in ("A", "B", "B-jit")}
    inputs = ReportInputs(evaluations, Fusion(StageOutput.at(str(out / "fuse"))))
    cfg = load_experiment(str(Path(out).parent / "toy.yaml"))
    ctx = StageContext("report", StageOutput.at(str(tmp_path / "report")), TrackingInfo("", "", ""))
    result = R.run(ReportSection(cfg.report), inputs, ctx)
    assert result.tables  # the stage's tables (rounded for MLflow's display) ...
    for name in result.tables:  # ... and its files, at full precision, equal the ladder's
        ours = json.loads((out / "report" / "tables" / name).read_text())
        assert ours == json.loads((tmp_path / "report" / "tables" / name).read_text()), name
    assert (tmp_path / "report" / "claims.json").read_text() == (out / "report" / "claims.json").read_text()
