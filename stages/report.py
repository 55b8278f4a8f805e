"""The report stage: our analogues of the paper's Tables 3-6 with bootstrap intervals,
the paper's five claims judged, and an error-vs-depth plot.

Reads only completed evaluate and fuse outputs (rows.json, the saved posteriors,
health.json): no net, no Ray, seconds to re-run (`--stage report`). Rows come from
each evaluate output's rows.json (paper.EvalRow) and from the fuse output's
fusion.json / member_rows.json; the paper's numbers are filled in beside ours only
where the configuration matches (stages.paper).

Uncertainty: every error gets a percentile bootstrap interval over the validation
images (`report.bootstrap_samples` resamples, seeded by `report.seed`); every
evaluation is scored on the same resamples, so the claims' differences are paired
(stages.claims).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from pipeline.config import ReportConfig
from pipeline.stage import StageContext, StageResult
from pipeline.storage import StageOutput, exists, write_bytes, write_json
from stages import claims, paper
from stages.metrics import bootstrap_errors, interval, meaningful_topk, read_posteriors, topk_hits
from stages.paper import EvalRow, FusionRow

TITLES = {
    "table3.json": "Table 3: single test scale",
    "table4.json": "Table 4: multi-scale test, dense",
    "table5.json": "Table 5: dense vs multi-crop vs both (multi-scale test)",
    "table6.json": "Table 6: fusion of softmax posteriors",
}
CLAIMS_FILE = "claims.json"
MARKDOWN_FILE = "results.md"
PLOT_FILE = "error_vs_depth.png"
# The files other stages write that the report reads (evaluate: rows, health,
# posteriors/<mode>.parquet; fuse: fusion.json, member_rows.json, posteriors/fused.parquet).
ROWS_FILE, HEALTH_FILE, FUSED_FILE = "rows.json", "health.json", "posteriors/fused.parquet"


@dataclass
class Report:
    #: artifact name -> column dict (for mlflow.log_table); empty tables are left out.
    tables: dict[str, dict[str, list]]
    #: every table, as one Markdown document.
    markdown: str
    #: the judged claims (empty when the report was built without posteriors).
    claims: list[claims.ClaimRow] = dataclasses.field(default_factory=list)
    #: nets whose predictions collapsed (evaluate's health.json)
    collapsed: list[str] = dataclasses.field(default_factory=list)


def _posteriors_path(mode: str) -> str:
    return f"posteriors/{mode}.parquet"


def collect(outputs: Mapping[str, StageOutput]) -> tuple[list[EvalRow], list[FusionRow]]:
    """EvalRows of the evaluate outputs (plus the fuse members', if not evaluated here)
    and the FusionRow of the fuse output."""
    rows: dict[str, EvalRow] = {}
    for sid in sorted(outputs):
        if sid.startswith("evaluate/") and exists(outputs[sid].fs, outputs[sid].join(ROWS_FILE)):
            rows.update((r.member_id, r) for r in _rows(outputs[sid].read_json(ROWS_FILE)))
    fusions = []
    fuse = outputs.get("fuse")
    if fuse is not None and exists(fuse.fs, fuse.join("fusion.json")):
        f = fuse.read_json("fusion.json")
        fusions.append(FusionRow(f["members"], f["top1"], f.get("top5")))
        for r in _rows(fuse.read_json("member_rows.json")):
            rows.setdefault(r.member_id, r)
    return list(rows.values()), fusions


def _rows(data) -> list[EvalRow]:
    return [EvalRow(**d) for d in data]


def collapsed_nets(outputs: Mapping[str, StageOutput]) -> list[str]:
    """Names of the evaluated nets whose health.json says they collapsed."""
    out = []
    for sid, o in sorted(outputs.items()):
        if sid.startswith("evaluate/") and exists(o.fs, o.join(HEALTH_FILE)):
            if o.read_json(HEALTH_FILE).get("collapsed"):
                out.append(sid.split("/", 1)[1])
    return out


def _member_files(outputs: Mapping[str, StageOutput], rows: list[EvalRow],
                  fusions: list[FusionRow]) -> dict[str, tuple[StageOutput, str]]:
    """member id -> (output, posteriors path) of every row (and the fusion) whose
    posteriors are at hand."""
    files = {}
    for r in rows:
        out = outputs.get(f"evaluate/{r.net}")
        if out is not None and exists(out.fs, out.join(_posteriors_path(r.mode))):
            files[r.member_id] = (out, out.join(_posteriors_path(r.mode)))
    fuse = outputs.get("fuse")
    if fusions and fuse is not None and exists(fuse.fs, fuse.join(FUSED_FILE)):
        files[claims.FUSION] = (fuse, fuse.join(FUSED_FILE))
    return files


def per_image_hits(files: Mapping[str, tuple[StageOutput, str]]) -> dict[int, dict[str, np.ndarray]]:
    """k -> member id -> (N,) bool hits, every member on the same images in the same
    order (the first file's). One posteriors file in memory at a time."""
    hits: dict[int, dict[str, np.ndarray]] = {}
    ref_keys: list[str] | None = None
    for member, (out, path) in files.items():
        post = read_posteriors(out.fs, path)
        if ref_keys is None:
            ref_keys = post.keys
        elif post.keys != ref_keys:
            if sorted(post.keys) != sorted(ref_keys):
                raise ValueError(f"{path}: its images differ from the other evaluations' "
                                 f"({len(post.keys)} vs {len(ref_keys)}); re-run the evaluate "
                                 "stages on the same shards")
            post = post.select(ref_keys)
        for k in meaningful_topk((1, 5), post.num_classes):
            hits.setdefault(k, {})[member] = topk_hits(post.probs, post.labels, k)
    return hits


def build_report(outputs: Mapping[str, StageOutput], png_path: str | os.PathLike | None = None,
                 cfg: ReportConfig | None = None) -> Report:
    """Tables 3-6 with bootstrap intervals, the Claims table (when posteriors are at hand)
    and Markdown, from evaluate/fuse outputs; the error-vs-depth PNG
    (paper.plot_error_vs_depth) is written to `png_path` when given."""
    cfg = cfg or ReportConfig()
    rows, fusions = collect(outputs)
    hits = per_image_hits(_member_files(outputs, rows, fusions))
    reps = {k: bootstrap_errors(h, cfg.bootstrap_samples, cfg.seed) for k, h in hits.items()}

    def ci(k: int, member: str) -> tuple[float, float] | None:
        r = reps.get(k, {}).get(member)
        return None if r is None else tuple(100.0 * v for v in interval(r, cfg.confidence))

    rows = [dataclasses.replace(r, top1_ci=ci(1, r.member_id), top5_ci=ci(5, r.member_id)) for r in rows]
    fusions = [dataclasses.replace(f, top1_ci=ci(1, claims.FUSION), top5_ci=ci(5, claims.FUSION))
               for f in fusions]
    collapsed = collapsed_nets(outputs)
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
    return Report(tables, _markdown(tables, judged, collapsed, cfg, hits), judged, collapsed)


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


# ---------------------------------------------------------------- the stage
def run(ctx: StageContext) -> StageResult:
    """Stage entry (DAG: report): the report from the evaluate and fuse outputs."""
    cfg: ReportConfig = ctx.section["report"]
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, PLOT_FILE)
        report = build_report(ctx.inputs, png, cfg)
        with open(png, "rb") as f:
            write_bytes(ctx.out.fs, ctx.out.join(PLOT_FILE), f.read())
    for name, table in report.tables.items():
        write_json(ctx.out.fs, ctx.out.join(f"tables/{name}"), table)
    write_bytes(ctx.out.fs, ctx.out.join(MARKDOWN_FILE), report.markdown.encode())
    write_json(ctx.out.fs, ctx.out.join(CLAIMS_FILE), [dataclasses.asdict(r) for r in report.claims])
    metrics, tags = claims.metrics_and_tags(report.claims) if report.claims else ({}, {})
    tags["collapsed_nets"] = ", ".join(report.collapsed) or "none"
    verdicts = claims.summary(report.claims) if report.claims else {}
    return StageResult(
        metrics=metrics,
        tags=tags,
        tables=report.tables,
        artifacts=[MARKDOWN_FILE, PLOT_FILE, CLAIMS_FILE],
        manifest={"tables": sorted(report.tables), "claims": {str(k): v for k, v in verdicts.items()},
                  "collapsed": report.collapsed},
        summary=("claims: " + ", ".join(f"{k} {v}" for k, v in verdicts.items())) if verdicts
        else "tables built (no posteriors: no intervals, no claims)",
    )
