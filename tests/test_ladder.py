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


# ---------------------------------------------------------------- what a long run meets
def _ladder(tmp: Path, *args: str, kill_on: str | None = None) -> tuple[int, str]:
    """`python -m vgg.ladder toy.yaml --data data --out out ARGS` in a subprocess; with
    `kill_on`, SIGKILL it as soon as a line containing that text is printed. -> (rc, stderr)."""
    cmd = [sys.executable, "-m", "vgg.ladder", str(tmp / "toy.yaml"), "--data", str(tmp / "data"),
           "--out", str(tmp / "out"), "--device", "cpu", *args]
    if kill_on is None:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
        return res.returncode, res.stderr
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if kill_on in line:
            proc.kill()
            break
    proc.wait(timeout=60)
    return proc.returncode, "".join(lines)


def _weights(path: Path) -> dict:
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def resumed(ladder, tmp_path_factory):
    """The toy ladder with an undecodable and an empty JPEG in its folder, killed (SIGKILL)
    right after B's first checkpoint, then run again on the same --out."""
    tmp = tmp_path_factory.mktemp("resume")
    _folder(tmp / "data")
    (tmp / "data" / "train" / "class0" / "zz_empty.jpg").write_bytes(b"")
    (tmp / "data" / "val" / "class1" / "zz_garbage.jpg").write_bytes(b"\xff\xd8 not a JPEG at all")
    (tmp / "toy.yaml").write_text(TOY)
    killed = _ladder(tmp, kill_on="[train/B] epoch 1/2 loss")
    again = _ladder(tmp)
    return tmp, killed, again


def test_a_killed_ladder_resumes_where_it_stopped_and_ends_as_an_uninterrupted_run(ladder, resumed):
    _, full = ladder
    tmp, (rc_killed, _), (rc, err) = resumed
    out = tmp / "out"
    assert rc_killed != 0 and rc == 0, err[-3000:]
    assert "train/A: reused" in err  # A was finished: verified and kept
    assert "[train/B] resuming after 1 finished epochs" in err
    history = json.loads((out / "train" / "B" / "history.json").read_text())
    assert [r["epoch"] for r in history["epochs"]] == [0, 1] and len(history["resumes"]) == 1
    for net in ("A", "B", "B-jit"):  # bit for bit the weights of the run that was never stopped
        ours, theirs = _weights(out / "train" / net / "model.pt"), _weights(full / "train" / net / "model.pt")
        assert all(torch_equal(ours[k], theirs[k]) for k in theirs), net
    assert not (out / "_checkpoints").exists()  # scratch removed once every net is published


def torch_equal(a, b) -> bool:
    import torch
    return torch.equal(a, b)


def test_bad_images_are_skipped_and_listed(resumed):
    tmp, _, (rc, err) = resumed
    assert rc == 0
    rows = (tmp / "out" / "data_problems.csv").read_text().splitlines()
    assert rows[0] == "key,action,reason" and len(rows) == 3
    assert any(r.startswith("train/class0/zz_empty.jpg,skipped,") for r in rows)
    assert any(r.startswith("val/class1/zz_garbage.jpg,skipped,") for r in rows)
    assert "2 image(s) skipped" in err and "Traceback" not in err


def test_a_rerun_reuses_verified_outputs_and_redoes_a_damaged_one(resumed):
    tmp, _, _ = resumed
    out = tmp / "out"
    posteriors = sorted((out / "evaluate" / "B" / "posteriors").iterdir())[0]
    data = bytearray(posteriors.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    posteriors.write_bytes(bytes(data))
    rc, err = _ladder(tmp)
    assert rc == 0, err[-3000:]
    for net in ("A", "B", "B-jit"):
        assert f"train/{net}: reused" in err
    assert "evaluate/A: reused" in err and "evaluate/B-jit: reused" in err
    assert f"evaluate/B: damaged output: {posteriors}" in err and "sha256 differs" in err
    assert posteriors.read_bytes() != bytes(data)  # rewritten
    rc, err = _ladder(tmp, "--fresh")
    assert rc == 0 and "--fresh: the earlier ladder outputs" in err and "reused" not in err


@pytest.mark.parametrize("args, says", [
    (["--out", "FILE"], "--out {tmp}/file: {tmp}/file is a file, not a directory"),
    (["--out", "FILE/sub"], "--out {tmp}/file/sub: {tmp}/file is a file, not a directory"),
    (["--data", "MISSING"], "--data {tmp}/missing: does not exist"),
    (["--set", "train.nets.A.lr=fast"], "train.nets.A.lr: expected a number, got str 'fast'"),
    (["--set", "fuse.members=[X:dense@single]"], "fuse.members: 'X:dense@single': net 'X' is not in train.nets"),
    (["--set", "train.nets.A.weights=/w.pt", "train.nets.A.init=random"],
     "train.nets.A.weights: importing released weights is the pipeline's"),
])
def test_bad_arguments_stop_before_any_training_in_one_line(tmp_path, args, says):
    (tmp_path / "file").write_text("not a folder")
    _folder(tmp_path / "data", classes=2, train=2, val=1)
    (tmp_path / "toy.yaml").write_text(TOY)
    args = [a.replace("FILE", str(tmp_path / "file")).replace("MISSING", str(tmp_path / "missing")) for a in args]
    rc, err = _ladder(tmp_path, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert says.format(tmp=tmp_path) in lines[0]  # config errors name the file and the --set first


def test_imagenette_cpu_is_one_plan_through_both_entry_points(tmp_path):
    """configs/imagenette_cpu.yaml: the workflow's DAG (pipeline/run.py) and the ladder
    (python -m vgg.ladder) read the same nets, inits, evaluations and fusion from it; its net
    A runs through the ladder at toy size (one epoch, width 1/8, crop 32)."""
    from pipeline.config import load_config
    from pipeline.dag import build_dag
    from vgg.config import load_experiment
    from vgg.ladder import check_plan, plan_order

    path = ROOT / "configs" / "imagenette_cpu.yaml"
    workflow, alone = load_config(path, ["data.root=/data/x"]), load_experiment(path, ["data.root=/data/x"])
    check_plan(alone)
    dag = build_dag(workflow)
    trains = {s.id.split("/", 1)[1]: s for s in dag.values() if s.kind == "train"}
    order = plan_order(alone.train.nets)
    assert list(trains) == order  # the same dependency order: A first, D before D-jit
    for name, stage in trains.items():
        assert stage.section.net == alone.train.nets[name]
        assert stage.wiring.get("init") == alone.train.nets[name].init_source
    assert {s.id for s in dag.values() if s.kind == "evaluate"} == {f"evaluate/{n}" for n in order}
    assert dag["fuse"].section.fuse == alone.fuse
    _folder(tmp_path / "data", classes=2, train=4, val=2)
    cmd = [sys.executable, "-m", "vgg.ladder", str(path), "--data", str(tmp_path / "data"), "--out",
           str(tmp_path / "out"), "--device", "cpu", "--set", "augment.crop=32", "train.width=0.125",
           "train.batch_size=8", "evaluate.grid=1", "evaluate.batch_size=8", "report.bootstrap_samples=100",
           "fuse.members=[]", "train.nets={A: {arch: A, scale: 37, epochs: 1, init: glorot}}"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(meta["nets"]) == ["A"] and meta["nets"]["A"]["epochs"] == 1
