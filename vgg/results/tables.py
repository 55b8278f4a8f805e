"""The paper's result tables (Simonyan & Zisserman 2015, Tables 3-6) next to ours.

Pure library code: the paper's numbers as data, result-row dataclasses, and
builders that return column dicts (`{column: [values]}`, for
`mlflow.log_table(data=...)` or `pandas.DataFrame`), Markdown, and a plot.

All errors in this module are in **percent** (ILSVRC-2012 val, like the paper);
`EvalRow.from_errors` converts the fractions of `vgg.results.metrics.errors`.

Vocabulary:
- train scale: an int S, or (Smin, Smax) for scale jittering; the paper's are
  256, 384 and (256, 512), keyed "256", "384", "256-512".
- method: "dense" | "multi-crop" | "multi-crop+dense" (Sec. 3.2, Table 5).
- scales: "single" (one test scale Q) | "multi" (several Q, Sec. 4.2).

Which table a row belongs to, and when it matches the paper:
- Table 3: single test scale, dense, Q = S (Q = 384 for jittered S).
- Table 4: multi-scale dense, Q = {S-32, S, S+32} (Q = {256, 384, 512} jittered).
- Table 5: multi-scale, every method; the paper has D and E jittered only.
- Table 6: fusion of nets (`FusionRow`); the paper's D+E rows.
A row matches when arch, train scale, method, scales and the set of Q all equal
the paper's; nothing else (dataset, width) is recorded in a row, so comparing
like with like (ImageNet, full width) is the caller's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vgg.paper import ARCHS, DEPTH, JITTER, METHODS, PAPER_CROP, SCALES, TRAIN_SCALES, scales_for_testing

# (table, net, train scale, method) -> (top-1, top-5) error %, ILSVRC-2012 val.
PAPER: dict[tuple[int, str, str, str], tuple[float, float]] = {
    # Table 3: single test scale, dense
    (3, "A", "256", "dense"): (29.6, 10.4),
    (3, "A-LRN", "256", "dense"): (29.7, 10.5),
    (3, "B", "256", "dense"): (28.7, 9.9),
    (3, "C", "256", "dense"): (28.1, 9.4),
    (3, "C", "384", "dense"): (28.1, 9.3),
    (3, "C", "256-512", "dense"): (27.3, 8.8),
    (3, "D", "256", "dense"): (27.0, 8.8),
    (3, "D", "384", "dense"): (26.8, 8.7),
    (3, "D", "256-512", "dense"): (25.6, 8.1),
    (3, "E", "256", "dense"): (27.3, 9.0),
    (3, "E", "384", "dense"): (26.9, 8.7),
    (3, "E", "256-512", "dense"): (25.5, 8.0),
    # Table 4: multi-scale test, dense
    (4, "B", "256", "dense"): (28.2, 9.6),
    (4, "C", "256", "dense"): (27.7, 9.2),
    (4, "C", "384", "dense"): (27.8, 9.2),
    (4, "C", "256-512", "dense"): (26.3, 8.2),
    (4, "D", "256", "dense"): (26.6, 8.6),
    (4, "D", "384", "dense"): (26.5, 8.6),
    (4, "D", "256-512", "dense"): (24.8, 7.5),
    (4, "E", "256", "dense"): (26.9, 8.7),
    (4, "E", "384", "dense"): (26.7, 8.6),
    (4, "E", "256-512", "dense"): (24.8, 7.5),
    # Table 5: S in [256, 512], Q = {256, 384, 512}
    (5, "D", "256-512", "dense"): (24.8, 7.5),
    (5, "D", "256-512", "multi-crop"): (24.6, 7.5),
    (5, "D", "256-512", "multi-crop+dense"): (24.4, 7.2),
    (5, "E", "256-512", "dense"): (24.8, 7.5),
    (5, "E", "256-512", "multi-crop"): (24.6, 7.4),
    (5, "E", "256-512", "multi-crop+dense"): (24.4, 7.1),
    # Table 6: fusion (D+E: both jittered, multi-scale Q = {256, 384, 512})
    (6, "7 nets", "mixed", "dense"): (24.7, 7.5),
    (6, "D+E", "256-512", "dense"): (24.0, 7.1),
    (6, "D+E", "256-512", "multi-crop"): (23.9, 7.2),
    (6, "D+E", "256-512", "multi-crop+dense"): (23.7, 6.8),
}
# Table 6's top-5 errors on the ILSVRC test set, where the paper gives them.
PAPER_TEST_TOP5 = {("7 nets", "dense"): 7.3, ("D+E", "dense"): 7.0, ("D+E", "multi-crop+dense"): 6.8}

CI = "95% CI"  # the bootstrap interval columns (filled by the report stage)
#: The result first: MLflow's table view shows the columns in this order, and at 1600 px its
#: first screen holds about ten of them (tests/test_e2e.py reads it in Chromium).
COLUMNS = ["net", "method", "test Q", "top-1", f"top-1 {CI}", "top-5", f"top-5 {CI}", "train S",
           "arch", "paper top-1", "paper top-5"]
FUSION_COLUMNS = ["members", "top-1", f"top-1 {CI}", "top-5", f"top-5 {CI}", "paper top-1",
                  "paper top-5"]
#: Columns where None means "not applicable" (top-5 with 5 classes or fewer), not "no value".
NA_COLUMNS = ("top-5",)


# ------------------------------------------------------------------ keys
def train_scale_key(train_scale: Any) -> str:
    """256 / "256" -> "256"; (256, 512) / [256, 512] / "256-512" / "[256;512]" -> "256-512"."""
    if isinstance(train_scale, str):
        parts = train_scale.strip("[]() ").replace(";", "-").replace(",", "-").split("-")
        return "-".join(p.strip() for p in parts)
    if isinstance(train_scale, (tuple, list)):
        if len(train_scale) != 2:
            raise ValueError(f"a jittered train scale is (Smin, Smax), got {train_scale!r}")
        return f"{int(train_scale[0])}-{int(train_scale[1])}"
    return str(int(train_scale))


def paper_value(table: int, net: str, train_scale: Any, mode: str = "dense") -> tuple[float, float] | None:
    """The paper's (top-1, top-5) error % for a table row, or None if the paper has no such row.

    table: 3..6; net: "A".."E" ("D+E" or "7 nets" in Table 6); train_scale: see
    `train_scale_key` ("mixed" for the 7-net ensemble); mode: a method in METHODS.
    """
    return PAPER.get((int(table), net, train_scale_key(train_scale), mode))


def paper_test_q(train_scale: Any, scales: str) -> list[int] | None:
    """The paper's test scales Q for a train scale (Sec. 3.2); None if it has no rule for it."""
    key = train_scale_key(train_scale)
    if key not in TRAIN_SCALES:
        return None
    bounds = [int(p) for p in key.split("-")]  # [S] or [Smin, Smax]
    single, multi = scales_for_testing(bounds[0], bounds[-1], PAPER_CROP)
    return [single] if scales == "single" else multi


# ------------------------------------------------------------------ rows
@dataclass(frozen=True)
class EvalRow:
    """One of our evaluations: a net at one method and set of test scales. Errors in percent."""

    net: str  # plan name, e.g. "D-jit"
    arch: str  # "A", "A-LRN", "B", "C", "D", "E"
    train_scale: int | tuple[int, int]  # S, or (Smin, Smax) when jittered
    method: str  # "dense" | "multi-crop" | "multi-crop+dense"
    scales: str  # "single" | "multi"
    q: list[int]  # the test scales used
    top1: float
    top5: float | None = None  # None when K <= 5 (the top-5 error cannot be above 0)
    #: Bootstrap intervals (percent) of top1 / top5, where computed (the report stage).
    top1_ci: tuple[float, float] | None = None
    top5_ci: tuple[float, float] | None = None

    def __post_init__(self):
        if self.arch not in DEPTH:
            raise ValueError(f"arch {self.arch!r} is not one of {ARCHS}")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {METHODS}")
        if self.scales not in SCALES:
            raise ValueError(f"scales {self.scales!r} is not one of {SCALES}")
        q = [int(x) for x in self.q]
        if not q or (self.scales == "single") != (len(q) == 1):
            raise ValueError(f"scales={self.scales!r} does not fit q={q}")
        object.__setattr__(self, "q", q)
        ts = self.train_scale
        if isinstance(ts, (list, tuple)):
            if len(ts) != 2:
                raise ValueError(f"a jittered train_scale is (Smin, Smax), got {ts!r}")
            ts = (int(ts[0]), int(ts[1]))
        object.__setattr__(self, "train_scale", ts if isinstance(ts, tuple) else int(ts))
        for name in ("top1", "top5"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 100:
                raise ValueError(f"{name} = {v} is not a percentage in [0, 100]")

    @classmethod
    def from_errors(cls, net: str, arch: str, train_scale: int | tuple[int, int], method: str,
                    q: Sequence[int], errs: dict[str, float]) -> EvalRow:
        """A row from `vgg.results.metrics.errors` output (fractions); scales follows from len(q)."""
        top5 = errs.get("top5")
        return cls(net, arch, train_scale, method, "single" if len(q) == 1 else "multi", list(q),
                   100.0 * errs["top1"], None if top5 is None else 100.0 * top5)

    @property
    def mode(self) -> str:
        """e.g. "dense@multi": the method and the kind of test scales."""
        return f"{self.method}@{self.scales}"

    @property
    def member_id(self) -> str:
        """"net:mode", how a fusion names its members, e.g. "D-jit:dense@multi"."""
        return f"{self.net}:{self.mode}"

    @property
    def table(self) -> int:
        """The paper table this kind of row belongs to: 3 single-scale, 4 multi dense, 5 multi other."""
        if self.scales == "single":
            return 3
        return 4 if self.method == "dense" else 5


@dataclass(frozen=True)
class FusionRow:
    """A fusion of evaluations (softmax posteriors averaged). `members`: "net:mode" ids
    (`EvalRow.member_id`, or "net:method" when that is unambiguous). Errors in percent."""

    members: list[str]
    top1: float
    top5: float | None = None
    top1_ci: tuple[float, float] | None = None
    top5_ci: tuple[float, float] | None = None


def _paper_q_matches(row: EvalRow) -> bool:
    want = paper_test_q(row.train_scale, row.scales)
    return want is not None and sorted(row.q) == sorted(want)


def paper_match(row: EvalRow, table: int | None = None) -> tuple[float, float] | None:
    """The paper's numbers for the configuration of `row` in `table` (default: `row.table`), or None.

    Table 3 needs single-scale dense at the paper's Q; Tables 4 and 5 multi-scale at
    the paper's Q (Table 4 dense only). Table 5's dense rows equal Table 4's.
    """
    table = row.table if table is None else table
    if table == 3 and (row.scales != "single" or row.method != "dense"):
        return None
    if table == 4 and (row.scales != "multi" or row.method != "dense"):
        return None
    if table == 5 and row.scales != "multi":
        return None
    if table not in (3, 4, 5) or not _paper_q_matches(row):
        return None
    return paper_value(table, row.arch, row.train_scale, row.method)


def _resolve(member: str, rows: Sequence[EvalRow]) -> EvalRow | None:
    """The row a fusion member id names: exact "net:method@scales", or a unique "net:method"."""
    exact = [r for r in rows if r.member_id == member]
    if exact:
        return exact[0]
    loose = [r for r in rows if f"{r.net}:{r.method}" == member]
    return loose[0] if len(loose) == 1 else None


def fusion_paper_match(fusion: FusionRow, rows: Sequence[EvalRow]) -> tuple[float, float] | None:
    """The paper's Table 6 D+E numbers if `fusion` is that configuration, else None.

    Every member must resolve (via `rows`) to a jittered multi-scale evaluation at
    Q = {256, 384, 512}; the archs must be exactly D and E with the same number of
    members each, and each arch's methods must be one method, or {dense, multi-crop}
    (the equal-weight average of those is multi-crop+dense).
    """
    members = [_resolve(m, rows) for m in fusion.members]
    if not members or any(m is None or m.scales != "multi" or not _paper_q_matches(m)
                          or train_scale_key(m.train_scale) != "256-512" for m in members):
        return None
    by_arch: dict[str, list[str]] = {}
    for m in members:
        by_arch.setdefault(m.arch, []).append(m.method)
    if set(by_arch) != {"D", "E"} or len(by_arch["D"]) != len(by_arch["E"]):
        return None
    methods = {_combined_method(ms) for ms in by_arch.values()}
    if len(methods) != 1 or None in methods:
        return None
    return paper_value(6, "D+E", JITTER, methods.pop())


def _combined_method(methods: list[str]) -> str | None:
    if len(methods) == 1:
        return methods[0]
    return "multi-crop+dense" if sorted(methods) == ["dense", "multi-crop"] else None


# ------------------------------------------------------------------ tables
def _sort_key(row: EvalRow) -> tuple:
    ts = train_scale_key(row.train_scale)
    ts_rank = TRAIN_SCALES.index(ts) if ts in TRAIN_SCALES else len(TRAIN_SCALES)
    return ARCHS.index(row.arch), ts_rank, ts, METHODS.index(row.method), row.net


def _table(rows: Sequence[EvalRow], table: int | None, keep, order=_sort_key) -> dict[str, list]:
    out: dict[str, list] = {c: [] for c in COLUMNS}
    for r in sorted((r for r in rows if keep(r)), key=order):
        paper = paper_match(r, table)
        values = {"net": r.net, "method": r.method, "test Q": ",".join(map(str, r.q)), "top-1": r.top1,
                  f"top-1 {CI}": ci_text(r.top1_ci), "top-5": r.top5, f"top-5 {CI}": ci_text(r.top5_ci),
                  "train S": train_scale_key(r.train_scale), "arch": r.arch,
                  "paper top-1": paper[0] if paper else None, "paper top-5": paper[1] if paper else None}
        for c in COLUMNS:
            out[c].append(values[c])
    return out


def rows_table(rows: Sequence[EvalRow]) -> dict[str, list]:
    """Any rows (an evaluate stage's: one net, every mode), in their order, each matched
    with the paper's table of its kind (`EvalRow.table`)."""
    return _table(rows, None, lambda r: True, order=lambda r: 0)


def table3(rows: Sequence[EvalRow]) -> dict[str, list]:
    """Single test scale (the paper's Table 3): our single-scale rows, any method."""
    return _table(rows, 3, lambda r: r.scales == "single")


def table4(rows: Sequence[EvalRow]) -> dict[str, list]:
    """Multi-scale test, dense (the paper's Table 4)."""
    return _table(rows, 4, lambda r: r.scales == "multi" and r.method == "dense")


def table5(rows: Sequence[EvalRow]) -> dict[str, list]:
    """Multi-scale test, dense vs multi-crop vs both (the paper's Table 5): every multi-scale row."""
    return _table(rows, 5, lambda r: r.scales == "multi")


def table6(fusion_rows: Sequence[FusionRow], rows: Sequence[EvalRow] = ()) -> dict[str, list]:
    """Fusion (the paper's Table 6); `rows` resolve the member ids for the paper match."""
    out: dict[str, list] = {c: [] for c in FUSION_COLUMNS}
    for f in fusion_rows:
        paper = fusion_paper_match(f, rows)
        values = [" + ".join(f.members), f.top1, ci_text(f.top1_ci), f.top5, ci_text(f.top5_ci),
                  paper[0] if paper else None, paper[1] if paper else None]
        for c, v in zip(FUSION_COLUMNS, values):
            out[c].append(v)
    return out


def ci_text(ci: Sequence[float] | None) -> str | None:
    """A bootstrap interval as table text: "[23.1, 26.0]" (percent), None if there is none."""
    return None if ci is None else f"[{ci[0]:.1f}, {ci[1]:.1f}]"


def to_markdown(table: dict[str, list], title: str = "") -> str:
    """A column dict as a Markdown table; floats with 1 decimal, None as "-" ("n/a" in the
    NA_COLUMNS)."""
    cols = list(table)
    lengths = {len(v) for v in table.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns of unequal length: { {c: len(v) for c, v in table.items()} }")
    n = lengths.pop() if lengths else 0

    def cell(v: Any, col: str) -> str:
        if v is None:
            return "n/a" if col in NA_COLUMNS else "-"
        if isinstance(v, float):
            return f"{v:.1f}"
        return str(v).replace("|", "\\|")

    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(table[c][i], c) for c in cols) + " |" for i in range(n)]
    return "\n".join(lines) + "\n"


def display(table: dict[str, list], digits: int = 1) -> dict[str, list]:
    """A copy of a column dict for display (mlflow.log_table): floats rounded to `digits`
    decimals (errors in percent: one), as the Markdown shows them, and the columns that
    are empty (None) in every row left out (the paper's columns on a run that matches no
    row of the paper). The JSON files keep full precision and every column; this is for
    eyes only (66.6666666667 reads as 66.7)."""
    def r(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, digits)
        if isinstance(v, (tuple, list)) and v and all(isinstance(x, float) for x in v):
            return type(v)(round(x, digits) for x in v)
        return v

    return {c: [r(v) for v in vals] for c, vals in table.items()
            if not vals or any(v is not None for v in vals)}


# ------------------------------------------------------------------ plot
def plot_error_vs_depth(rows: Sequence[EvalRow], path: Any, modes: Sequence[str] | None = None) -> Any:
    """PNG of top-1 error against depth (weight layers, Table 1).

    Only the rows of `modes` (method@scales; default: every mode), the modes the report
    compares nets in: one line per mode and train scale (a line mixing train scales would
    jump up and down at one depth), with the 95% bootstrap interval as error bars where
    the row has one; the paper's value for the same configuration is a hollow square in
    the line's colour beside our point. `path`: a file name or a writable binary file
    object. Returns `path`.
    """
    fig = depth_figure(rows, modes)
    fig.savefig(path, format="png")
    return path


def depth_figure(rows: Sequence[EvalRow], modes: Sequence[str] | None = None) -> Any:
    """The matplotlib Figure of `plot_error_vs_depth` (its axes' containers are the lines)."""
    # Figure + Agg canvas directly: no pyplot, no global backend switch in a library.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    groups: dict[str, list[EvalRow]] = {}
    for r in sorted(rows, key=lambda r: (DEPTH[r.arch], _sort_key(r))):
        if modes is not None and r.mode not in modes:
            continue
        label = f"{r.mode}, S={train_scale_key(r.train_scale)}"
        groups.setdefault(label, []).append(r)
    any_paper = False
    for i, (label, grp) in enumerate(groups.items()):
        color = f"C{i % 10}"
        x = [DEPTH[r.arch] + 0.15 * (i - (len(groups) - 1) / 2) for r in grp]  # apart, not on top
        y = [r.top1 for r in grp]
        err = [[0.0 if r.top1_ci is None else r.top1 - r.top1_ci[0] for r in grp],
               [0.0 if r.top1_ci is None else r.top1_ci[1] - r.top1 for r in grp]]
        ax.errorbar(x, y, yerr=err, fmt="o-", color=color, capsize=3, label=label)
        for xi, r in zip(x, grp):
            ax.annotate(r.net, (xi, r.top1), textcoords="offset points", xytext=(4, 4), fontsize=7)
        pts = [(xi + 0.3, p[0]) for xi, r in zip(x, grp) if (p := paper_match(r)) is not None]
        if pts:
            ax.scatter(*zip(*pts), facecolors="none", edgecolors=color, marker="s", s=70)
            any_paper = True
    if any_paper:  # one legend entry for all the paper's markers
        ax.scatter([], [], facecolors="none", edgecolors="black", marker="s", s=70, label="paper")
    ax.set_xticks(sorted(set(DEPTH.values())))
    ax.set_xlim(min(DEPTH.values()) - 1, max(DEPTH.values()) + 1)
    ax.set_xlabel("weight layers")
    ax.set_ylabel("top-1 error (%)")
    ax.set_title("Top-1 error vs depth (bars: 95% bootstrap interval)")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
