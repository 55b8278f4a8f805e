"""The fuse stage and the report, on hand-made evaluate outputs (no model, no Ray)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from pipeline.config import ConfigError, EvaluateConfig, FuseConfig, NetPlan, load_config
from pipeline.dag import FuseInputs, FuseSection
from pipeline.stage import StageContext, TrackingInfo
from pipeline.storage import StageOutput
from stages import fuse as F
from vgg.artifacts import FUSED_FILE, Evaluation, Fusion, posteriors_file, write_evaluation
from vgg.evaluation.shares import combine_modes, eval_rows, q_sets
from vgg.paper import BASE_METHODS
from vgg.results.metrics import FusionError, Posteriors, errors, health, read_posteriors
from vgg.results.report import build_report

CLASSES = [f"k{i}" for i in range(6)]
KEYS = [f"val/{c}/{i:03d}.jpg" for c in CLASSES for i in range(4)]
LABELS = [CLASSES.index(k.split("/")[1]) for k in KEYS]


def output(tmp_path, stage_id: str) -> StageOutput:
    path = str(tmp_path / stage_id.replace("/", "_"))
    pafs.LocalFileSystem().create_dir(path, recursive=True)
    return StageOutput(stage_id, "test", pafs.LocalFileSystem(), path, path)


def random_posteriors(rng, keys=KEYS, labels=LABELS, classes=CLASSES) -> Posteriors:
    logits = rng.normal(size=(len(keys), len(classes))) * 2
    logits[np.arange(len(keys)), labels] += 1.5  # better than chance
    p = np.exp(logits)
    return Posteriors(keys, labels, p / p.sum(1, keepdims=True), classes)


def fake_evaluate(tmp_path, net: str, arch: str, scale, seed: int, cfg=EvaluateConfig(), **kw) -> Evaluation:
    """An evaluate/<net> output as the stage writes it, from random per-(method, Q) posteriors."""
    rng = np.random.default_rng(seed)
    plan = NetPlan(arch=arch, scale=scale)
    q_single, q_multi = q_sets(scale, 224, cfg)
    per_q = {(m, q): random_posteriors(rng, **kw) for m in BASE_METHODS for q in {q_single, *q_multi}}
    modes = combine_modes(per_q, q_single, q_multi)
    out = output(tmp_path, f"evaluate/{net}")
    rows = eval_rows(modes, net, plan, {"single": [q_single], "multi": q_multi})
    write_evaluation(out, modes, rows, health(modes["dense@single"]))
    return Evaluation(out)


class Fused:
    """A run of the fuse stage: its result and its output."""

    def __init__(self, tmp_path, members, evaluations: dict[str, Evaluation]):
        self.out = output(tmp_path, "fuse")
        ctx = StageContext("fuse", self.out, TrackingInfo("", "", ""), "test")
        self.result = F.run(FuseSection(FuseConfig(members=list(members))), FuseInputs(evaluations), ctx)


def fuse(tmp_path, members, evaluations) -> Fused:
    return Fused(tmp_path, members, evaluations)


def read(out: StageOutput | Evaluation, name: str) -> Posteriors:
    out = out.out if isinstance(out, Evaluation) else out
    return read_posteriors(out.fs, out.join(name))


@pytest.fixture
def nets(tmp_path):
    return {
        "D-jit": fake_evaluate(tmp_path, "D-jit", "D", [256, 512], seed=1),
        "E-jit": fake_evaluate(tmp_path, "E-jit", "E", [256, 512], seed=2),
    }


def test_fusing_one_member_reproduces_it(tmp_path, nets):
    ctx = fuse(tmp_path, ["D-jit:dense@multi"], nets)
    result = ctx.result
    member = read(nets["D-jit"], posteriors_file("dense@multi"))
    fused = read(ctx.out, FUSED_FILE)
    assert fused.keys == member.keys and np.array_equal(fused.probs, member.probs)
    errs = errors(member)
    assert result.metrics["fusion_top1_err"] == pytest.approx(100 * errs["top1"])
    assert result.metrics["D-jit_dense_multi_top5_err"] == pytest.approx(100 * errs["top5"])


def test_fusing_identical_members_leaves_it_unchanged(tmp_path):
    a = fake_evaluate(tmp_path / "a", "a", "D", 256, seed=3)
    b = fake_evaluate(tmp_path / "b", "b", "D", 256, seed=3)  # the same posteriors
    ctx = fuse(tmp_path, ["a:multi-crop@single", "b:multi-crop@single"], {"a": a, "b": b})
    member = read(a, posteriors_file("multi-crop@single"))
    assert np.array_equal(read(ctx.out, FUSED_FILE).probs, member.probs)


def test_fusion_averages_and_reports_every_member(tmp_path, nets):
    members = ["D-jit:multi-crop+dense@multi", "E-jit:dense@single"]
    ctx = fuse(tmp_path, members, nets)
    result = ctx.result
    d = read(nets["D-jit"], posteriors_file("multi-crop+dense@multi"))
    e = read(nets["E-jit"], posteriors_file("dense@single"))
    fused = read(ctx.out, FUSED_FILE)
    np.testing.assert_allclose(fused.probs, (d.probs + e.probs) / 2, atol=1e-6)
    table = result.tables["fusion_errors.json"]
    assert table["member"] == ["fusion", *members]
    assert table["top-1 %"][0] == pytest.approx(100 * errors(fused)["top1"])
    assert result.metrics["D-jit_multicrop_dense_multi_top1_err"] == pytest.approx(100 * errors(d)["top1"])
    assert ctx.out.read_json("fusion.json")["members"] == members
    assert [r["net"] for r in ctx.out.read_json("member_rows.json")] == ["D-jit", "E-jit"]


def test_mismatched_member_names_the_member(tmp_path, nets):
    other = fake_evaluate(tmp_path / "x", "X", "A", 256, seed=5, keys=[k.replace("val/", "other/") for k in KEYS])
    inputs = {**nets, "X": other}
    with pytest.raises(FusionError, match=r"member 'X:dense@single': 24 keys not in 'D-jit:dense@multi'"):
        fuse(tmp_path, ["D-jit:dense@multi", "X:dense@single"], inputs)
    relabelled = fake_evaluate(tmp_path / "y", "Y", "A", 256, seed=6, labels=[(x + 1) % 6 for x in LABELS])
    with pytest.raises(FusionError, match=r"member 'Y:dense@multi': labels differ"):
        fuse(tmp_path, ["E-jit:dense@multi", "Y:dense@multi"], {**nets, "Y": relabelled})


def test_missing_mode_lists_the_available_ones(tmp_path, nets):
    (Path(nets["D-jit"].out.join(posteriors_file("dense@single")))).unlink()
    with pytest.raises(ValueError, match=r"'D-jit:dense@single'.*available modes: dense@multi, "
                                         r"multi-crop\+dense@multi"):
        fuse(tmp_path, ["D-jit:dense@single"], nets)
    with pytest.raises(ValueError, match=r"'D-jit:dense@triple'.* is not method@scales"):
        fuse(tmp_path, ["D-jit:dense@triple"], nets)
    with pytest.raises(ValueError, match="no evaluate/Z output"):
        fuse(tmp_path, ["Z:dense@multi"], nets)


def test_repeated_and_malformed_members_fail_at_config_load(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  nets:\n    A: {arch: A, scale: 256}\n")
    with pytest.raises(ConfigError, match="repeated members"):
        load_config(cfg, ["fuse.members=[A:dense@multi, A:dense@multi]"])
    with pytest.raises(ConfigError, match="fuse.members: 'A:dense@triple': 'dense@triple' is not method@scales"):
        load_config(cfg, ["fuse.members=[A:dense@triple]"])


def test_report_tables_markdown_and_plot(tmp_path, nets):
    a = fake_evaluate(tmp_path, "A-256", "A", 256, seed=7)
    fuse_out = fuse(tmp_path, ["D-jit:multi-crop+dense@multi", "E-jit:multi-crop+dense@multi"], nets)
    fusion = Fusion(fuse_out.out)
    png = tmp_path / "report" / "error_vs_depth.png"
    png.parent.mkdir()
    report = build_report({**nets, "A-256": a}, fusion, png)
    assert set(report.tables) == {"table3.json", "table4.json", "table5.json", "table6.json", "claims.json"}
    t3 = report.tables["table3.json"]
    # Table 3: single scale, every method; the paper's number only for dense at its Q.
    assert t3["net"] == ["A-256"] * 3 + ["D-jit"] * 3 + ["E-jit"] * 3
    dense_d = t3["method"].index("dense", 3)
    assert (t3["paper top-1"][dense_d], t3["paper top-5"][dense_d]) == (25.6, 8.1)
    assert t3["paper top-1"][0] == 29.6  # A, S = 256, Q = 256
    assert t3["paper top-1"][dense_d + 1] is None  # multi-crop is not in Table 3
    t5 = report.tables["table5.json"]
    both_e = [i for i, (n, m) in enumerate(zip(t5["net"], t5["method"])) if n == "E-jit" and m == "multi-crop+dense"]
    assert t5["paper top-1"][both_e[0]] == 24.4
    t6 = report.tables["table6.json"]
    assert t6["paper top-1"] == [23.7] and t6["paper top-5"] == [6.8]
    assert t6["top-1"][0] == pytest.approx(fuse_out.out.read_json("fusion.json")["top1"])
    for title in ("Table 3", "Table 4", "Table 5", "Table 6"):
        assert f"### {title}" in report.markdown
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The fuse output alone resolves its members (member_rows.json) for the Table 6 match.
    only = build_report({}, fusion)
    assert only.tables["table6.json"]["paper top-1"] == [23.7]


def test_fuse_and_report_stay_light():
    """No torch, DALI or Ray import: the fuse stage must take seconds."""
    code = ("import sys, stages.fuse, stages.report; "
            "print(sorted(m for m in ('torch', 'nvidia.dali', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
