"""The paper's five conclusions, judged on our own evaluations (the report's "Claims" table).

Pure library code. Each claim of the paper ("What the paper concludes") becomes the
comparisons that a run's plan allows: pairs of evaluations (`EvalRow.member_id`, or
"fusion") whose top-1 errors the claim orders. A comparison's difference is
err(first) - err(second) in percentage points, with a paired bootstrap interval
(`vgg.results.metrics.bootstrap_errors`: both members scored on the same resamples of
the same images). Verdicts:

- "lower" comparisons (first should have the lower error): held if the whole
  interval is below 0, contradicted if it is above 0, inconclusive if it contains 0;
- claim 1 is a no-gain claim (A-LRN is no better than A): contradicted if A-LRN is
  significantly better (interval below 0), held otherwise ("no significant gain");
- a claim with no comparison in this plan is "not testable", naming the nets it needs;
- a comparison that involves a net collapsed in the compared mode (`vgg.results.metrics.health`), or that
  rests on a distorted evaluation mode (`distorted_scales`), is "not testable" whatever
  its interval says (the difference is still shown): "not testable (collapsed: D)" tests
  nothing about depth, only that D did not train. The claim's summary names the nets to
  retrain.

The report checks its own protocol: at a small crop (32 px: the last pool leaves a 1x1
map) dense evaluation can be distorted, scoring a net 35 points apart from multi-crop of
the same net at the same test scales, where the paper's Table 5 has them within 0.2
points. Where some healthy net's dense and multi-crop errors at the same scales differ
by more than `DENSE_DISTORTION_BOUND` points (the whole interval beyond it), dense is
distorted at those scales: claims 1-3 move to multi-crop at the same scales
(`sound_mode`), and the comparisons of claims 4 and 5 that use dense there become
"not testable (dense distorted at crop N)".
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vgg.paper import slug
from vgg.results.metrics import interval
from vgg.results.tables import EvalRow, FusionRow, train_scale_key

CLAIMS = {
    1: "LRN does not help (A-LRN ~ A)",
    2: "Error falls with depth (A > B > C/D/E); 3x3 beats 1x1 at equal depth (D < C)",
    3: "Scale jittering at training beats a fixed S, even with one test scale",
    4: "Multi-scale testing beats single-scale; multi-crop and dense are complementary, "
       "and their combination is best",
    5: "Fusing a few strong nets beats any single net",
}
NEEDS = {
    1: "nets A and A-LRN trained at the same S",
    2: "at least two of A, B, C, D, E trained at the same S",
    3: "a scale-jittered net and a fixed-S net of the same architecture",
    4: "an evaluated net",
    5: "a fuse stage",
}
FUSION = "fusion"  # the member id of the fused posteriors
BASE_MODE = "dense@single"  # Table 3's protocol: nets are compared at their own single Q
# Claim 2's orderings A > B > C/D/E and D < C: (deeper or 3x3, [shallower or 1x1 nets,
# in order of preference]); a deep net is compared with B, or with A where B is not trained.
DEPTH_PAIRS = (("B", ("A",)), ("C", ("B", "A")), ("D", ("B", "A")), ("E", ("B", "A")), ("D", ("C",)))
VERDICTS = ("held", "contradicted", "inconclusive", "not testable")
#: Points of top-1 error by which dense and multi-crop of one net at the same test scales
#: may differ before dense counts as distorted. The paper's Table 5: 0.2 (D and E); our
#: bound is 15 times that, and the whole paired interval must lie beyond it, so that the
#: noise of a few hundred validation images does not trip it.
DENSE_DISTORTION_BOUND = 3.0


@dataclass(frozen=True)
class Comparison:
    """One ordered pair a claim rests on: `first` should have the lower error
    (expect="lower"), or should not be lower (expect="no gain")."""

    claim: int
    first: str  # member id ("net:method@scales" or FUSION)
    second: str
    expect: str = "lower"

    @property
    def label(self) -> str:
        return f"{self.first} vs {self.second}"


@dataclass(frozen=True)
class ClaimRow:
    """A judged comparison (percentage points), or a claim this plan cannot test."""

    claim: int
    comparison: str
    diff: float | None
    lo: float | None
    hi: float | None
    verdict: str
    note: str = ""


def _by_scale(rows: Sequence[EvalRow], mode: str) -> dict[str, dict[str, list[str]]]:
    """train scale -> arch -> net names evaluated in `mode` there (plan order)."""
    out: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        if r.mode == mode:
            nets = out.setdefault(train_scale_key(r.train_scale), {}).setdefault(r.arch, [])
            if r.net not in nets:
                nets.append(r.net)
    return out


def comparisons(rows: Sequence[EvalRow], fusion: FusionRow | None,
                errors: Mapping[str, float], mode: str = BASE_MODE) -> list[Comparison]:
    """Every comparison the evaluated plan allows, claim by claim.

    `errors`: member id -> top-1 error (to pick a fusion's best member); `mode`: the
    evaluation mode nets are compared in for claims 1-3 (default: Table 3's)."""
    have = {r.member_id for r in rows}
    base = lambda net: f"{net}:{mode}"  # noqa: E731
    out: list[Comparison] = []
    groups = _by_scale(rows, mode)
    for archs in groups.values():  # claims 1 and 2: nets trained at the same S
        for lrn in archs.get("A-LRN", []):
            out += [Comparison(1, base(lrn), base(a), "no gain") for a in archs.get("A", [])]
    for archs in groups.values():
        for deep, shallower in DEPTH_PAIRS:
            ref = next((a for a in shallower if archs.get(a)), None)
            if ref is not None:
                out += [Comparison(2, base(x), base(y)) for x in archs.get(deep, []) for y in archs[ref]]
    jittered = [r for r in rows if r.mode == mode and isinstance(r.train_scale, tuple)]
    fixed = [r for r in rows if r.mode == mode and not isinstance(r.train_scale, tuple)]
    out += [Comparison(3, j.member_id, f.member_id) for j in jittered for f in fixed if f.arch == j.arch]
    for net in dict.fromkeys(r.net for r in rows):  # claim 4, net by net
        pairs = [("dense@multi", "dense@single"), ("multi-crop+dense@multi", "dense@multi"),
                 ("multi-crop+dense@multi", "multi-crop@multi")]
        out += [Comparison(4, f"{net}:{a}", f"{net}:{b}") for a, b in pairs
                if f"{net}:{a}" in have and f"{net}:{b}" in have]
    if fusion is not None and all(m in errors for m in fusion.members):
        best = min(fusion.members, key=lambda m: errors[m])
        out.append(Comparison(5, FUSION, best))
    return out


def verdict(lo: float, hi: float, expect: str = "lower") -> str:
    """The verdict of a difference err(first) - err(second) with interval [lo, hi]."""
    if expect == "no gain":
        return "contradicted" if hi < 0 else "held"
    if expect != "lower":
        raise ValueError(f"expect must be 'lower' or 'no gain', got {expect!r}")
    if hi < 0:
        return "held"
    if lo > 0:
        return "contradicted"
    return "inconclusive"


def distorted_scales(rows: Sequence[EvalRow], replicates: Mapping[str, np.ndarray],
                     point: Mapping[str, float], confidence: float = 0.95,
                     collapsed: Sequence[str] = ()) -> dict[str, str]:
    """Test scales ("single" / "multi") at which dense evaluation is distorted -> the evidence.

    Distorted: for some net not in `collapsed` (a broken net says nothing about the
    protocol), err(dense@s) - err(multi-crop@s) has its whole interval beyond
    +-DENSE_DISTORTION_BOUND points. The evidence names the net with the largest gap,
    e.g. "D: dense@single 58.1% vs multi-crop@single 22.7%"."""
    worst: dict[str, tuple[float, str]] = {}
    for r in rows:
        if r.method != "dense" or r.net in collapsed:
            continue
        dense, crop = r.member_id, f"{r.net}:multi-crop@{r.scales}"
        if not all(m in point and m in replicates for m in (dense, crop)):
            continue
        lo, hi = (100.0 * v for v in interval(replicates[dense] - replicates[crop], confidence))
        gap = 100.0 * (point[dense] - point[crop])
        if (lo > DENSE_DISTORTION_BOUND or hi < -DENSE_DISTORTION_BOUND) and abs(gap) > worst.get(r.scales, (0.0,))[0]:
            worst[r.scales] = (abs(gap), f"{r.net}: dense@{r.scales} {100 * point[dense]:.1f}% vs "
                                         f"multi-crop@{r.scales} {100 * point[crop]:.1f}%")
    return {scales: text for scales, (_, text) in sorted(worst.items())}


def sound_mode(mode: str, distorted: Mapping[str, str]) -> str:
    """The mode claims 1-3 compare nets in: `mode`, or multi-crop at the same test scales
    when `mode` uses dense evaluation (dense or multi-crop+dense) at distorted scales."""
    method, scales = mode.split("@")
    return f"multi-crop@{scales}" if "dense" in method and scales in distorted else mode


def rests_on_distorted(member: str, distorted: Mapping[str, str],
                       fusion_members: Sequence[str] = ()) -> bool:
    """Whether an evaluation ("net:method@scales", or FUSION of `fusion_members`) uses dense
    evaluation at distorted test scales."""
    if member == FUSION:
        return any(rests_on_distorted(m, distorted) for m in fusion_members)
    method, _, scales = member.split(":", 1)[-1].partition("@")
    return "dense" in method and scales in distorted


def judge(comps: Sequence[Comparison], replicates: Mapping[str, np.ndarray],
          point: Mapping[str, float], confidence: float = 0.95,
          collapsed: Sequence[str] = (), untestable: Mapping[str, str] | None = None) -> list[ClaimRow]:
    """One ClaimRow per comparison, and a "not testable" row for each claim without one.

    `replicates`: member id -> bootstrap replicates of its top-1 error (fractions, shared
    resamples); `point`: member id -> its top-1 error (fraction); `collapsed`: net names
    whose predictions collapsed; `untestable`: member id -> why a comparison with it tests
    nothing (e.g. FUSION -> "collapsed: D", "D:dense@multi" -> "dense distorted at crop 32").
    A comparison with a collapsed net or an untestable member is "not testable", its note
    says why ("collapsed: D"); its difference and interval are kept for the record."""
    untestable = untestable or {}
    out = []
    for c in comps:
        diff = 100.0 * (point[c.first] - point[c.second])
        lo, hi = (100.0 * v for v in interval(replicates[c.first] - replicates[c.second], confidence))
        nets = {m.split(":", 1)[0] for m in (c.first, c.second)}
        bad = sorted(nets & set(collapsed))
        reasons = [f"collapsed: {', '.join(bad)}"] if bad else []
        for m in (c.first, c.second):  # each reason once ("dense distorted at crop 32" for both)
            why = untestable.get(m)
            if why and why not in reasons:
                reasons.append(why)
        if reasons:
            out.append(ClaimRow(c.claim, c.label, diff, lo, hi, "not testable", "; ".join(reasons)))
            continue
        note = "no significant gain" if c.expect == "no gain" and verdict(lo, hi, c.expect) == "held" else ""
        out.append(ClaimRow(c.claim, c.label, diff, lo, hi, verdict(lo, hi, c.expect), note))
    tested = {c.claim for c in comps}
    out += [ClaimRow(n, "-", None, None, None, "not testable", f"needs {NEEDS[n]}")
            for n in CLAIMS if n not in tested]
    return sorted(out, key=lambda r: r.claim)


def summary(rows: Sequence[ClaimRow]) -> dict[int, str]:
    """One verdict per claim: held / contradicted if all its testable comparisons agree,
    "mixed" when they disagree, inconclusive when none decides, or not testable. Where
    comparisons were made but test nothing, it says why and which nets to retrain, e.g.
    "not testable (collapsed: D; retrain D)" or "held; 1 comparison not testable
    (collapsed: D; retrain D)"."""
    out = {}
    for n in CLAIMS:
        mine = [r for r in rows if r.claim == n]
        vs = {r.verdict for r in mine} - {"not testable"}
        decided = vs - {"inconclusive"}
        if not vs:
            v = "not testable"
        elif not decided:
            v = "inconclusive"
        elif len(decided) == 1:
            v = decided.pop()
            v = v if "inconclusive" not in vs else f"{v} (partly inconclusive)"
        else:
            v = "mixed"
        blocked = [r for r in mine if r.verdict == "not testable" and r.diff is not None]
        if blocked:
            why = _blocked_reasons(blocked)
            v = (f"not testable ({why})" if not vs else
                 f"{v}; {len(blocked)} comparison{'s' if len(blocked) > 1 else ''} not testable ({why})")
        out[n] = v
    return out


def _blocked_reasons(rows: Sequence[ClaimRow]) -> str:
    """The distinct reasons of not-testable comparisons, and the collapsed nets to retrain."""
    reasons = list(dict.fromkeys(p for r in rows for p in r.note.split("; ") if p))
    nets = list(dict.fromkeys(n.strip() for p in reasons if p.startswith("collapsed: ")
                              for n in p[len("collapsed: "):].split(",")))
    return "; ".join(reasons + ([f"retrain {', '.join(nets)}"] if nets else []))


#: The Claims table's columns: the result first (MLflow's table view shows them in this
#: order); the statement, long, last and once per claim.
COLUMNS = ("claim", "comparison", "difference (pp)", "95% CI", "verdict", "note", "statement")
#: The width of the claims' Markdown, which the console prints: a 120-column terminal.
WIDTH = 120


def table(rows: Sequence[ClaimRow]) -> dict[str, list]:
    """The Claims table as columns (mlflow.log_table): a row per comparison; each claim's
    statement once, beside its first comparison."""
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    seen: set[int] = set()
    for r in rows:
        values = (r.claim, r.comparison, None if r.diff is None else f"{r.diff:+.1f}", _ci(r), r.verdict,
                  r.note or None, None if r.claim in seen else CLAIMS[r.claim])
        seen.add(r.claim)
        for c, v in zip(cols, values):
            cols[c].append(v)
    return cols


def _ci(r: ClaimRow) -> str | None:
    return None if r.lo is None else f"[{r.lo:+.1f}, {r.hi:+.1f}]"


def markdown(rows: Sequence[ClaimRow], width: int = WIDTH) -> str:
    """The claims as Markdown, claim by claim: its statement and verdict once, then a table
    of its comparisons; a note is a numbered footnote under the table (the same note, one
    number), so that every line fits `width` columns, the statement wrapped."""
    verdicts = summary(rows)
    parts: list[str] = []
    for n, statement in CLAIMS.items():
        mine = [r for r in rows if r.claim == n]
        parts += [textwrap.fill(f"**Claim {n}.** {statement}: **{verdicts[n]}**", width), ""]
        parts += [textwrap.fill(f"Not testable here: {r.note}.", width) + "\n" for r in mine if r.diff is None]
        judged = [r for r in mine if r.diff is not None]
        if not judged:
            continue
        notes = list(dict.fromkeys(r.note for r in judged if r.note))
        mark = lambda r: f" ({notes.index(r.note) + 1})" if r.note else ""  # noqa: E731
        parts += ["| comparison | difference (pp) | 95% CI | verdict |", "|---|---|---|---|"]
        parts += [f"| {r.comparison} | {r.diff:+.1f} | {_ci(r)} | {r.verdict}{mark(r)} |" for r in judged]
        parts.append("")
        if notes:
            parts += [textwrap.fill(f"- ({i}) {note}", width, subsequent_indent="  ") for i, note in
                      enumerate(notes, 1)] + [""]
    return "\n".join(parts)


def metrics_and_tags(rows: Sequence[ClaimRow]) -> tuple[dict[str, float], dict[str, str]]:
    """Per comparison: metrics claimN.<slug>.diff/.lo/.hi (pp) and a tag claimN.<slug> =
    verdict; per claim: a tag claimN = the summary verdict; counts of each verdict."""
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    for r in rows:
        if r.diff is None:
            continue
        key = f"claim{r.claim}.{slug(r.comparison)}"
        metrics.update({f"{key}.diff": r.diff, f"{key}.lo": r.lo, f"{key}.hi": r.hi})
        tags[key] = r.verdict
    for n, v in summary(rows).items():
        tags[f"claim{n}"] = v
    for v in VERDICTS:
        metrics[f"claims_{v.replace(' ', '_')}"] = float(sum(r.verdict == v for r in rows))
    return metrics, tags
