"""The paper's tables as data, our rows next to them, Markdown and the depth plot (vgg.results.tables)."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest

from vgg.results.tables import (PAPER, EvalRow, FusionRow, depth_figure, display, paper_match, paper_value,
                          plot_error_vs_depth, table3, table4, table5, table6, to_markdown, train_scale_key)

JIT = (256, 512)
MQ = [256, 384, 512]  # the paper's multi-scale Q for S in [256, 512]


def row(net, arch, s, method="dense", q=(256,), top1=30.0, top5=10.0):
    return EvalRow(net, arch, s, method, "single" if len(q) == 1 else "multi", list(q), top1, top5)


# ------------------------------------------------------------------ the paper's numbers
@pytest.mark.parametrize("table, net, scale, mode, expected", [
    (3, "A", 256, "dense", (29.6, 10.4)),
    (3, "A-LRN", "256", "dense", (29.7, 10.5)),
    (3, "C", 384, "dense", (28.1, 9.3)),
    (3, "E", (256, 512), "dense", (25.5, 8.0)),
    (3, "D", "[256;512]", "dense", (25.6, 8.1)),
    (4, "B", 256, "dense", (28.2, 9.6)),
    (4, "D", 384, "dense", (26.5, 8.6)),
    (4, "C", [256, 512], "dense", (26.3, 8.2)),
    (5, "E", "256-512", "multi-crop", (24.6, 7.4)),
    (5, "D", JIT, "multi-crop+dense", (24.4, 7.2)),
    (6, "D+E", JIT, "dense", (24.0, 7.1)),
    (6, "D+E", JIT, "multi-crop", (23.9, 7.2)),
    (6, "D+E", JIT, "multi-crop+dense", (23.7, 6.8)),
    (6, "7 nets", "mixed", "dense", (24.7, 7.5)),
])
def test_paper_value_matches_paper_md(table, net, scale, mode, expected):
    assert paper_value(table, net, scale, mode) == expected


def test_paper_value_is_none_where_the_paper_has_no_row():
    assert paper_value(3, "A", 384) is None  # A only at S = 256
    assert paper_value(4, "A", 256) is None  # no A in Table 4
    assert paper_value(5, "D", 256, "multi-crop") is None  # Table 5 is jittered only
    assert paper_value(3, "D", 32) is None


def test_paper_tables_are_complete():
    sizes = {t: sum(1 for k in PAPER if k[0] == t) for t in (3, 4, 5, 6)}
    assert sizes == {3: 12, 4: 10, 5: 6, 6: 4}
    assert train_scale_key(" [256 ; 512] ") == "256-512" and train_scale_key(384) == "384"


# ------------------------------------------------------------------ rows
def test_eval_row_validation_and_from_errors():
    r = EvalRow.from_errors("D-jit", "D", [256, 512], "dense", MQ, {"top1": 0.248, "top5": 0.075})
    assert r.scales == "multi" and r.train_scale == JIT and r.member_id == "D-jit:dense@multi"
    assert r.top1 == pytest.approx(24.8) and r.top5 == pytest.approx(7.5)
    assert EvalRow.from_errors("x", "A", 32, "dense", [32], {"top1": 0.5}).top5 is None
    with pytest.raises(ValueError, match="arch 'F'"):
        row("x", "F", 256)
    with pytest.raises(ValueError, match="does not fit q"):
        EvalRow("x", "A", 256, "dense", "multi", [256], 30.0, 10.0)
    with pytest.raises(ValueError, match="\\(Smin, Smax\\)"):
        row("x", "D", (256, 384, 512))
    with pytest.raises(ValueError, match="percentage"):
        row("x", "A", 256, top1=0.3 * 1000)


# ------------------------------------------------------------------ builders
ROWS = [
    row("demo-D", "D", 32, q=(32,), top1=80.0, top5=None),  # width-0.25 demo: no paper row
    row("A-256", "A", 256, q=(256,)),
    row("D-256-q224", "D", 256, q=(224,)),  # single scale, but not the paper's Q = S
    row("D-jit", "D", JIT, q=(384,)),
    row("D-jit", "D", JIT, q=MQ),
    row("D-jit", "D", JIT, "multi-crop", q=MQ),
    row("E-jit", "E", JIT, "multi-crop+dense", q=MQ),
    row("E-jit", "E", JIT, q=MQ),
    row("C-384", "C", 384, q=(352, 384, 416)),
    row("B-256", "B", 256, "multi-crop", q=(256,)),  # single-scale multi-crop: not in Table 3
]


def test_table3_fills_paper_only_for_matching_configurations():
    t = table3(ROWS)
    assert t["net"] == ["A-256", "B-256", "D-256-q224", "D-jit", "demo-D"]  # sorted by arch, then S
    got = {n: (p1, p5) for n, p1, p5 in zip(t["net"], t["paper top-1"], t["paper top-5"])}
    assert got == {"A-256": (29.6, 10.4), "B-256": (None, None), "D-256-q224": (None, None),
                   "D-jit": (25.6, 8.1), "demo-D": (None, None)}
    assert t["train S"][t["net"].index("D-jit")] == "256-512" and t["top-5"][-1] is None
    json.dumps(t)  # what mlflow.log_table(data=...) needs


def test_table4_and_table5():
    t4 = table4(ROWS)
    assert t4["net"] == ["C-384", "D-jit", "E-jit"] and set(t4["method"]) == {"dense"}
    assert list(zip(t4["paper top-1"], t4["paper top-5"])) == [(27.8, 9.2), (24.8, 7.5), (24.8, 7.5)]
    t5 = table5(ROWS)
    papers = {(n, m): (p1, p5) for n, m, p1, p5 in zip(t5["net"], t5["method"], t5["paper top-1"], t5["paper top-5"])}
    assert papers == {("C-384", "dense"): (None, None),  # Table 5 has D and E only
                      ("D-jit", "dense"): (24.8, 7.5), ("D-jit", "multi-crop"): (24.6, 7.5),
                      ("E-jit", "dense"): (24.8, 7.5), ("E-jit", "multi-crop+dense"): (24.4, 7.1)}
    assert len({len(v) for v in t5.values()}) == 1


def test_paper_match_needs_the_papers_test_scales():
    assert paper_match(row("D-jit", "D", JIT, q=(256, 512))) is None
    assert paper_match(row("D-jit", "D", JIT, q=(512, 384, 256))) == (24.8, 7.5)  # order is irrelevant


def test_table6_fusion_matches():
    fusions = [
        FusionRow(["D-jit:dense@multi", "E-jit:dense@multi"], 24.1, 7.2),
        # "net:method" is enough where it is unambiguous (D-jit has dense at one and at three Q)
        FusionRow(["D-jit:dense@multi", "D-jit:multi-crop", "E-jit:dense", "E-jit:multi-crop"], 23.8, 6.9),
        FusionRow(["D-jit:dense", "E-jit:dense"], 24.1, 7.2),  # ambiguous member
        FusionRow(["D-jit:dense@multi", "E-jit:multi-crop+dense@multi"], 24.0, 7.0),  # methods differ
        FusionRow(["D-jit:dense@multi", "C-384:dense@multi"], 25.0, 7.9),  # not D+E
        FusionRow(["D-jit:dense@single", "E-jit:dense@multi"], 25.0, 7.9),  # D single-scale
        FusionRow(["D-jit:dense@multi", "nope:dense"], 25.0, 7.9),  # unknown member
    ]
    rows = ROWS + [row("E-jit", "E", JIT, "multi-crop", q=MQ)]
    t = table6(fusions, rows)
    assert t["members"][0] == "D-jit:dense@multi + E-jit:dense@multi"
    assert list(zip(t["paper top-1"], t["paper top-5"])) == [(24.0, 7.1), (23.7, 6.8)] + [(None, None)] * 5
    assert table6(fusions[:1])["paper top-1"] == [None]  # members cannot be resolved without rows


# ------------------------------------------------------------------ output
def test_to_markdown():
    md = to_markdown(table3(ROWS[:2]), "Table 3")
    lines = md.strip().splitlines()
    assert lines[0] == "### Table 3"
    # the result first: net, method, test scales, top-1 and its interval
    assert lines[2] == ("| net | method | test Q | top-1 | top-1 95% CI | top-5 | top-5 95% CI | train S | "
                        "arch | paper top-1 | paper top-5 |")
    assert lines[3].count("---") == 11
    assert lines[4] == "| A-256 | dense | 256 | 30.0 | - | 10.0 | - | 256 | A | 29.6 | 10.4 |"
    # no top-5 with <= 5 classes: not applicable; no paper value: "-"
    assert lines[5] == "| demo-D | dense | 32 | 80.0 | - | n/a | - | 32 | D | - | - |"
    with_ci = dataclasses.replace(ROWS[0], top1_ci=(28.04, 31.96))
    assert "| 80.0 | [28.0, 32.0] |" in to_markdown(table3([with_ci]))
    with pytest.raises(ValueError, match="unequal length"):
        to_markdown({"a": [1.0], "b": []})


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "depth.png"
    assert plot_error_vs_depth(ROWS, str(path)) == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    buf = io.BytesIO()
    plot_error_vs_depth([], buf)  # no rows: an empty plot, still a PNG
    assert buf.getvalue()[:4] == b"\x89PNG"


def test_the_depth_plot_draws_the_compared_mode_only_with_its_intervals_and_the_paper_beside():
    rows = []
    for arch, top1 in (("A", 30.0), ("B", 29.0), ("D", 27.5)):
        for method in ("dense", "multi-crop", "multi-crop+dense"):
            for scales, q in (("single", [256]), ("multi", [224, 256, 288])):
                rows.append(EvalRow(arch, arch, 256, method, scales, q, top1, top1_ci=(top1 - 2.0, top1 + 3.0)))
    ax = depth_figure(rows, ["dense@single"]).axes[0]
    bars = ax.containers
    assert len(bars) == 1  # one line, not one per mode and train scale (issue 26: 12 overlapping)
    line, _, (segments,) = bars[0].lines
    assert list(line.get_ydata()) == [30.0, 29.0, 27.5]
    # error bars span each row's 95% interval
    assert [tuple(seg[:, 1]) for seg in segments.get_segments()] == [(28.0, 33.0), (27.0, 32.0), (25.5, 30.5)]
    # the paper's Table 3 values for A, B, D at S = Q = 256 stand beside ours
    paper = [c for c in ax.collections if c is not segments and len(c.get_offsets())]
    assert sorted(y for c in paper for _, y in c.get_offsets()) == [27.0, 28.7, 29.6]
    assert len(depth_figure(rows).axes[0].containers) == 6  # no modes given: every mode


def test_display_tables_round_to_one_decimal_and_leave_the_rest():
    shown = display({"top-1": [66.6666666667, None], "Q": [40, 36], "ci": [(1.04, 2.06), None], "m": ["a", "b"],
                     "paper top-1": [None, None]})
    # a column empty in every row is left out (issue 31: the paper's columns were null on the demo)
    assert shown == {"top-1": [66.7, None], "Q": [40, 36], "ci": [(1.0, 2.1), None], "m": ["a", "b"]}
    assert display({"a": [], "b": []}) == {"a": [], "b": []}
