"""The report: our analogues of the paper's Tables 3-6 with bootstrap intervals, the
paper's five claims judged, and an error-vs-depth plot.

Reads only evaluations and a fusion (`vgg.artifacts`: their rows, posteriors and
health): no net, no Ray, seconds to re-run (`--stage report`). The paper's numbers
are filled in beside ours only where the configuration matches (`vgg.results.tables`).

Uncertainty: every error gets a percentile bootstrap interval over the validation
images (`report.bootstrap_samples` resamples, seeded by `report.seed`); every
evaluation is scored on the same resamples, so the claims' differences are paired
(`vgg.results.claims`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from vgg.config import ReportConfig
from vgg.artifacts import Evaluation, Fusion
from vgg.results import claims
from vgg.results import tables as paper
from vgg.results.metrics import Posteriors, bootstrap_errors, interval, meaningful_topk, topk_hits
from vgg.results.tables import EvalRow, FusionRow

TITLES = {
    "table3.json": "Table 3: single test scale",
    "table4.json": "Table 4: multi-scale test, dense",
    "table5.json": "Table 5: dense vs multi-crop vs both (multi-scale test)",
    "table6.json": "Table 6: fusion of softmax posteriors",
}

@dataclass
class ReportContent:
    #: artifact name -> column dict (for mlflow.log_table); empty tables are left out.
    tables: dict[str, dict[str, list]]
    #: every table, as one Markdown document.
    markdown: str
    #: the judged claims (empty when the report was built without posteriors).
    claims: list[claims.ClaimRow] = dataclasses.field(default_factory=list)
    #: nets whose predictions collapsed (evaluate's health.json)
    collapsed: list[str] = dataclasses.field(default_factory=list)


def collect(evaluations: Mapping[str, Evaluation], fusion: Fusion | None) -> tuple[list[EvalRow], list[FusionRow]]:
    """The evaluations' rows (plus the fusion members', if not evaluated here) and the fusion's row."""
    rows: dict[str, EvalRow] = {}
    for net in sorted(evaluations):
        rows.update((r.member_id, r) for r in evaluations[net].rows())
    fusions = []
    if fusion is not None:
        fusions.append(fusion.row())
        for r in fusion.member_rows():
            rows.setdefault(r.member_id, r)
    return list(rows.values()), fusions


def collapsed_nets(evaluations: Mapping[str, Evaluation]) -> list[str]:
    """Names of the evaluated nets whose health says they collapsed."""
    return [net for net, e in sorted(evaluations.items()) if (h := e.health()) is not None and h.collapsed]


def _posteriors(evaluations: Mapping[str, Evaluation], fusion: Fusion | None, rows: list[EvalRow],
                fusions: list[FusionRow]) -> dict[str, Callable[[], Posteriors]]:
    """member id -> reader of its posteriors, for every row (and the fusion) whose
    posteriors are at hand."""
    readers: dict[str, Callable[[], Posteriors]] = {}
    for r in rows:
        e = evaluations.get(r.net)
        if e is not None and e.has_mode(r.mode):
            readers[r.member_id] = lambda e=e, mode=r.mode: e.posteriors(mode)
    if fusions and fusion is not None and fusion.has_posteriors():
        readers[claims.FUSION] = fusion.posteriors
    return readers


def per_image_hits(readers: Mapping[str, Callable[[], Posteriors]]) -> dict[int, dict[str, np.ndarray]]:
    """k -> member id -> (N,) bool hits, every member on the same images in the same
    order (the first one's). One posteriors file in memory at a time."""
    hits: dict[int, dict[str, np.ndarray]] = {}
    ref_keys: list[str] | None = None
    for member, read in readers.items():
        post = read()
        if ref_keys is None:
            ref_keys = post.keys
        elif post.keys != ref_keys:
            if sorted(post.keys) != sorted(ref_keys):
                raise ValueError(f"{member}: its images differ from the other evaluations' "
                                 f"({len(post.keys)} vs {len(ref_keys)}); re-run the evaluate "
                                 "stages on the same shards")
            post = post.select(ref_keys)
        for k in meaningful_topk((1, 5), post.num_classes):
            hits.setdefault(k, {})[member] = topk_hits(post.probs, post.labels, k)
    return hits


def build_report(evaluations: Mapping[str, Evaluation], fusion: Fusion | None = None,
                 png_path: str | os.PathLike | None = None, cfg: ReportConfig | None = None) -> ReportContent:
    """Tables 3-6 with bootstrap intervals, the Claims table (when posteriors are at hand)
    and Markdown, from the evaluations (net name -> Evaluation) and the fusion; the
    error-vs-depth PNG (tables.plot_error_vs_depth) is written to `png_path` when given."""
    cfg = cfg or ReportConfig()
    rows, fusions = collect(evaluations, fusion)
    hits = per_image_hits(_posteriors(evaluations, fusion, rows, fusions))
    reps = {k: bootstrap_errors(h, cfg.bootstrap_samples, cfg.seed) for k, h in hits.items()}

    def ci(k: int, member: str) -> tuple[float, float] | None:
        r = reps.get(k, {}).get(member)
        return None if r is None else tuple(100.0 * v for v in interval(r, cfg.confidence))

    rows = [dataclasses.replace(r, top1_ci=ci(1, r.member_id), top5_ci=ci(5, r.member_id)) for r in rows]
    fusions = [dataclasses.replace(f, top1_ci=ci(1, claims.FUSION), top5_ci=ci(5, claims.FUSION))
               for f in fusions]
    collapsed = collapsed_nets(evaluations)
    judged = []
    if 1 in hits:
        point = {m: 1.0 - h.mean() for m, h in hits[1].items()}
        comps = [c for c in claims.comparisons(rows, fusions[0] if fusions else None, point,
                                               cfg.compare_mode)
                 if c.first in point and c.second in point]
        judged = claims.judge(comps, reps[1], point, cfg.confidence, collapsed)
    built = {
        "table3.json": paper.table3(rows),
        "table4.json": paper.table4(rows),
        "table5.json": paper.table5(rows),
        "table6.json": paper.table6(fusions, rows),
    }
    tables = {name: t for name, t in built.items() if any(t.values())}
    if judged:
        tables["claims.json"] = claims.table(judged)
    if png_path is not None:
        paper.plot_error_vs_depth(rows, os.fspath(png_path))
    return ReportContent(tables, _markdown(tables, judged, collapsed, cfg, hits), judged, collapsed)


def _markdown(tables: dict[str, dict], judged: list[claims.ClaimRow], collapsed: list[str],
              cfg: ReportConfig, hits: dict[int, dict[str, np.ndarray]]) -> str:
    n = len(next(iter(hits[1].values()))) if hits.get(1) else 0
    parts = ["## Results against the paper (top-1 / top-5 error, %)", "",
             "Paper values only where the configuration matches (architecture, training scale, "
             "test scales Q and method); ILSVRC-2012 validation in the paper."
             + (f" Intervals: {cfg.confidence:.0%} percentile bootstrap over our {n} validation "
                f"images ({cfg.bootstrap_samples} resamples, seed {cfg.seed})." if n else ""), ""]
    if collapsed:
        parts += [f"**Warning: collapsed nets** (they predict few classes, or nearly the same "
                  f"posteriors for every image; their errors say nothing about depth or "
                  f"scale): {', '.join(collapsed)}. See their train and evaluate runs' "
                  "`health` tag.", ""]
    for name, title in TITLES.items():
        parts.append(paper.to_markdown(tables[name], title) if name in tables else f"### {title}\n\n(no rows)\n")
    if judged:
        verdicts = claims.summary(judged)
        parts += ["## The paper's claims, judged on this run", "",
                  "Difference = our top-1 error of the first minus the second, in points, "
                  "with a paired bootstrap interval (same resampled images for both). "
                  "Held / contradicted: the interval excludes 0 on the claimed / the other "
                  f"side; inconclusive: it contains 0. Claims 1-3 compare nets in "
                  f"{cfg.compare_mode} (report.compare_mode).", ""]
        parts += [f"{n}. {claims.CLAIMS[n]}: **{v}**" for n, v in verdicts.items()] + [""]
        parts.append(paper.to_markdown(tables["claims.json"], "Claims"))
    return "\n".join(parts)
