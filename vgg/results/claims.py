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
- a claim with no comparison in this plan is "not testable", naming the nets it needs.
"""

from __future__ import annotations

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


def judge(comps: Sequence[Comparison], replicates: Mapping[str, np.ndarray],
          point: Mapping[str, float], confidence: float = 0.95,
          collapsed: Sequence[str] = ()) -> list[ClaimRow]:
    """One ClaimRow per comparison, and a "not testable" row for each claim without one.

    `replicates`: member id -> bootstrap replicates of its top-1 error (fractions, shared
    resamples); `point`: member id -> its top-1 error (fraction); `collapsed`: net names
    whose predictions collapsed (named in the note of any row they take part in)."""
    out = []
    for c in comps:
        diff = 100.0 * (point[c.first] - point[c.second])
        lo, hi = (100.0 * v for v in interval(replicates[c.first] - replicates[c.second], confidence))
        nets = {m.split(":", 1)[0] for m in (c.first, c.second)}
        bad = sorted(nets & set(collapsed))
        note = "no significant gain" if c.expect == "no gain" and verdict(lo, hi, c.expect) == "held" else ""
        if bad:
            note = "; ".join(filter(None, [note, f"collapsed net: {', '.join(bad)}"]))
        out.append(ClaimRow(c.claim, c.label, diff, lo, hi, verdict(lo, hi, c.expect), note))
    tested = {c.claim for c in comps}
    out += [ClaimRow(n, "-", None, None, None, "not testable", f"needs {NEEDS[n]}")
            for n in CLAIMS if n not in tested]
    return sorted(out, key=lambda r: r.claim)


def summary(rows: Sequence[ClaimRow]) -> dict[int, str]:
    """One verdict per claim: held / contradicted if all its comparisons agree, "mixed"
    when they disagree, inconclusive when none decides, or not testable."""
    out = {}
    for n in CLAIMS:
        vs = {r.verdict for r in rows if r.claim == n}
        decided = vs - {"inconclusive"}
        if vs == {"not testable"}:
            out[n] = "not testable"
        elif not decided:
            out[n] = "inconclusive"
        elif len(decided) == 1:
            v = decided.pop()
            out[n] = v if "inconclusive" not in vs else f"{v} (partly inconclusive)"
        else:
            out[n] = "mixed"
    return out


def table(rows: Sequence[ClaimRow]) -> dict[str, list]:
    """The Claims table as columns (mlflow.log_table / to_markdown)."""
    cols: dict[str, list] = {c: [] for c in ("claim", "statement", "comparison", "difference (pp)",
                                              "95% CI", "verdict", "note")}
    for r in rows:
        ci = None if r.lo is None else f"[{r.lo:+.1f}, {r.hi:+.1f}]"
        values = (r.claim, CLAIMS[r.claim], r.comparison,
                  None if r.diff is None else f"{r.diff:+.1f}", ci, r.verdict, r.note or None)
        for c, v in zip(cols, values):
            cols[c].append(v)
    return cols


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
