"""The report stage: the paper's Tables 3-6 from our own runs, with bootstrap intervals,
the paper's five claims judged, and an error-vs-depth plot (`vgg.results.report`).

Reads only the evaluations and the fusion: no net, no Ray, seconds to re-run
(`python pipeline/run.py --stage report`). Output (`vgg.artifacts.Report`):
tables/*.json, results.md, claims.json, error_vs_depth.png.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

from pipeline.dag import ReportInputs, ReportSection
from pipeline.stage import StageContext, StageResult
from vgg.artifacts import write_report
from vgg.results import claims
from vgg.results.report import build_report
from vgg.results.tables import display


def run(config: ReportSection, inputs: ReportInputs, ctx: StageContext) -> StageResult:
    cfg = config.report
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "plot.png")
        report = build_report(inputs.evaluations, inputs.fusion, png, cfg)
        with open(png, "rb") as f:
            files = write_report(ctx.out, report.tables, report.markdown,
                                 [dataclasses.asdict(r) for r in report.claims], f.read())
    metrics, tags = claims.metrics_and_tags(report.claims) if report.claims else ({}, {})
    tags["collapsed_nets"] = ", ".join(report.collapsed) or "none"
    tags["dense_distorted"] = "; ".join(f"{k}: {v}" for k, v in report.distorted.items()) or "no"
    tags["compare_mode"] = report.compare_mode
    verdicts = claims.summary(report.claims) if report.claims else {}
    return StageResult(
        metrics=metrics,
        tags=tags,
        tables={name: display(t) for name, t in report.tables.items()},  # files keep full precision
        artifacts=files,
        manifest={"tables": sorted(report.tables), "claims": {str(k): v for k, v in verdicts.items()},
                  "collapsed": report.collapsed, "dense_distorted": report.distorted,
                  "compare_mode": report.compare_mode},
        summary=("claims: " + ", ".join(f"{k} {v}" for k, v in verdicts.items())) if verdicts
        else "tables built (no posteriors: no intervals, no claims)",
    )
