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
import textwrap
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from vgg.config import ReportConfig
from vgg.artifacts import Evaluation, Fusion
from vgg.results import claims
from vgg.results import tables as paper
from vgg.results.metrics import (Health, Posteriors, bootstrap_errors, health_of, interval, meaningful_topk,
                                 prediction_stats, topk_hits)
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
    #: nets whose predictions collapsed in the mode the claims compare them in (the health
    #: of their posteriors there; evaluate's health.json for nets without them)
    collapsed: list[str] = dataclasses.field(default_factory=list)
    #: test scales ("single" / "multi") where dense evaluation is distorted -> the evidence
    #: (`claims.distorted_scales`)
    distorted: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the mode claims 1-3 were judged in: report.compare_mode, or multi-crop at the same
    #: scales where compare_mode's dense evaluation is distorted (`claims.sound_mode`)
    compare_mode: str = "dense@single"


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


def crop_of(evaluations: Mapping[str, Evaluation]) -> int | None:
    """The training crop of the evaluations (their manifests' "crop"), None if unrecorded."""
    for e in evaluations.values():
        if e.has("manifest.json") and (crop := e.out.read_json("manifest.json").get("crop")):
            return int(crop)
    return None


def per_image_hits(readers: Mapping[str, Callable[[], Posteriors]],
                   stats: dict[str, np.ndarray] | None = None) -> dict[int, dict[str, np.ndarray]]:
    """k -> member id -> (N,) bool hits, every member on the same images in the same
    order (the first one's). One posteriors file in memory at a time. `stats`, when
    given, receives member id -> `prediction_stats` (for the health in any mode)."""
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
        if stats is not None:
            stats[member] = prediction_stats(post.probs, post.labels)
    return hits


def build_report(evaluations: Mapping[str, Evaluation], fusion: Fusion | None = None,
                 png_path: str | os.PathLike | None = None, cfg: ReportConfig | None = None) -> ReportContent:
    """Tables 3-6 with bootstrap intervals, the Claims table (when posteriors are at hand)
    and Markdown, from the evaluations (net name -> Evaluation) and the fusion; the
    error-vs-depth PNG (tables.plot_error_vs_depth) is written to `png_path` when given."""
    cfg = cfg or ReportConfig()
    rows, fusions = collect(evaluations, fusion)
    stats: dict[str, np.ndarray] = {}
    hits = per_image_hits(_posteriors(evaluations, fusion, rows, fusions), stats)
    reps = {k: bootstrap_errors(h, cfg.bootstrap_samples, cfg.seed) for k, h in hits.items()}

    def ci(k: int, member: str) -> tuple[float, float] | None:
        r = reps.get(k, {}).get(member)
        return None if r is None else tuple(100.0 * v for v in interval(r, cfg.confidence))

    rows = [dataclasses.replace(r, top1_ci=ci(1, r.member_id), top5_ci=ci(5, r.member_id)) for r in rows]
    fusions = [dataclasses.replace(f, top1_ci=ci(1, claims.FUSION), top5_ci=ci(5, claims.FUSION))
               for f in fusions]
    collapsed = collapsed_nets(evaluations)
    judged, distorted, mode, mode_health = [], {}, cfg.compare_mode, {}
    if 1 in hits:
        point = {m: 1.0 - h.mean() for m, h in hits[1].items()}
        # The protocol first: dense at a small crop can be distorted (claims module docstring);
        # then the health of every net in the mode its verdicts will rest on.
        distorted = claims.distorted_scales(rows, reps[1], point, cfg.confidence, collapsed)
        mode = claims.sound_mode(cfg.compare_mode, distorted)
        mode_health = {r.net: health_of(stats[r.member_id]) for r in rows
                       if r.mode == mode and r.member_id in stats}
        # A net's collapse is judged in this mode (health.json records every mode's, by the
        # same function); a net without posteriors in it keeps its recorded best-mode verdict.
        collapsed = sorted({n for n, h in mode_health.items() if h.collapsed}
                           | {n for n in collapsed if n not in mode_health})
        crop = crop_of(evaluations)
        why = f"dense distorted at crop {crop}" if crop else "dense distorted at these test scales"
        members = fusions[0].members if fusions else []
        untestable = {m: why for m in [*point, claims.FUSION]
                      if claims.rests_on_distorted(m, distorted, members)}
        if bad := sorted({m.split(":", 1)[0] for m in members} & set(collapsed)):
            untestable.setdefault(claims.FUSION, f"collapsed: {', '.join(bad)}")
        comps = [c for c in claims.comparisons(rows, fusions[0] if fusions else None, point, mode)
                 if c.first in point and c.second in point]
        judged = claims.judge(comps, reps[1], point, cfg.confidence, collapsed, untestable)
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
        paper.plot_error_vs_depth(rows, os.fspath(png_path), [mode])  # the mode the claims compare in
    md = _markdown(tables, judged, collapsed, cfg, hits, distorted, mode, mode_health, crop_of(evaluations))
    return ReportContent(tables, md, judged, collapsed, distorted, mode)


def _markdown(tables: dict[str, dict], judged: list[claims.ClaimRow], collapsed: list[str],
              cfg: ReportConfig, hits: dict[int, dict[str, np.ndarray]], distorted: dict[str, str],
              mode: str, mode_health: dict[str, Health], crop: int | None) -> str:
    n = len(next(iter(hits[1].values()))) if hits.get(1) else 0
    parts = ["## Results against the paper (top-1 / top-5 error, %)", "",
             "Paper values only where the configuration matches (architecture, training scale, "
             "test scales Q and method); ILSVRC-2012 validation in the paper."
             + (f" Intervals: {cfg.confidence:.0%} percentile bootstrap over our {n} validation "
                f"images ({cfg.bootstrap_samples} resamples, seed {cfg.seed})." if n else ""), ""]
    if collapsed:
        how = "; ".join(f"{n} in {mode}: {h.reason}" for n, h in mode_health.items() if n in collapsed and h.collapsed)
        parts += [f"**Warning: collapsed nets** (their error is not clearly below chance, some "
                  f"classes' images are recognised no more often than chance, or they give "
                  f"nearly the same posteriors for every image; their errors "
                  f"say nothing about depth or scale, and every claim they take part in is not "
                  f"testable): {', '.join(collapsed)}" + (f" ({how})" if how else "")
                  + ". See their train and evaluate runs' `health` tag.", ""]
    for scales, evidence in distorted.items():
        line = (f"**Warning: dense evaluation is distorted at crop {crop or '?'}** ({scales} test "
                f"scale{'s' if scales == 'multi' else ''}; {evidence}; the paper's Table 5 has dense "
                f"and multi-crop within 0.2 points, our bound is {claims.DENSE_DISTORTION_BOUND:g})")
        if mode != cfg.compare_mode and mode.split("@")[1] == scales:
            line += f". Claims 1-3 are judged in {mode} instead of {cfg.compare_mode}"
        parts += [line + "; comparisons that use dense evaluation there are not testable.", ""]
    for name, title in TITLES.items():
        parts.append(paper.to_markdown(tables[name], title) if name in tables else f"### {title}\n\n(no rows)\n")
    if judged:
        intro = ("Difference = our top-1 error of the first minus the second, in points, "
                 "with a paired bootstrap interval (same resampled images for both). "
                 "Held / contradicted: the interval excludes 0 on the claimed / the other "
                 f"side; inconclusive: it contains 0; not testable: a collapsed net or a "
                 f"distorted mode takes part. Claims 1-3 compare nets in {mode}"
                 + (" (report.compare_mode)." if mode == cfg.compare_mode else
                    f" (report.compare_mode is {cfg.compare_mode}, distorted here)."))
        parts += ["## The paper's claims, judged on this run", "", textwrap.fill(intro, claims.WIDTH), "",
                  claims.markdown(judged)]
    return "\n".join(parts)
