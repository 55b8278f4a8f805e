"""The pipeline's report: our analogues of the paper's Tables 3-6 and an error-vs-depth plot.

A plain function of completed stage outputs (no MLflow: the runner logs what it
returns). Rows come from each evaluate output's rows.json (paper.EvalRow) and
from the fuse output's fusion.json / member_rows.json; the paper's numbers are
filled in beside ours only where the configuration matches (stages.paper).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from pipeline.storage import StageOutput, exists
from stages import paper
from stages.paper import EvalRow, FusionRow

TITLES = {
    "table3.json": "Table 3: single test scale",
    "table4.json": "Table 4: multi-scale test, dense",
    "table5.json": "Table 5: dense vs multi-crop vs both (multi-scale test)",
    "table6.json": "Table 6: fusion of softmax posteriors",
}


@dataclass
class Report:
    #: artifact name -> column dict (for mlflow.log_table); empty tables are left out.
    tables: dict[str, dict[str, list]]
    #: every table, as one Markdown document.
    markdown: str


def collect(outputs: Mapping[str, StageOutput]) -> tuple[list[EvalRow], list[FusionRow]]:
    """EvalRows of the evaluate outputs (plus the fuse members', if not evaluated here)
    and the FusionRow of the fuse output."""
    from stages.evaluate import rows_from_json

    rows: dict[str, EvalRow] = {}
    for sid in sorted(outputs):
        if sid.startswith("evaluate/") and exists(outputs[sid].fs, outputs[sid].join("rows.json")):
            rows.update((r.member_id, r) for r in rows_from_json(outputs[sid].read_json("rows.json")))
    fusions = []
    fuse = outputs.get("fuse")
    if fuse is not None and exists(fuse.fs, fuse.join("fusion.json")):
        f = fuse.read_json("fusion.json")
        fusions.append(FusionRow(f["members"], f["top1"], f.get("top5")))
        for r in rows_from_json(fuse.read_json("member_rows.json")):
            rows.setdefault(r.member_id, r)
    return list(rows.values()), fusions


def build_report(outputs: Mapping[str, StageOutput], png_path: str | os.PathLike | None = None) -> Report:
    """Tables 3-6 (column dicts and Markdown) from evaluate/fuse outputs; the error-vs-depth
    PNG (paper.plot_error_vs_depth) is written to `png_path` when given."""
    rows, fusions = collect(outputs)
    built = {
        "table3.json": paper.table3(rows),
        "table4.json": paper.table4(rows),
        "table5.json": paper.table5(rows),
        "table6.json": paper.table6(fusions, rows),
    }
    tables = {name: t for name, t in built.items() if any(t.values())}
    parts = ["## Results against the paper (top-1 / top-5 error, %)", "",
             "Paper values only where the configuration matches (architecture, training scale, "
             "test scales Q and method); ILSVRC-2012 validation in the paper.", ""]
    for name, title in TITLES.items():
        parts.append(paper.to_markdown(tables[name], title) if name in tables else f"### {title}\n\n(no rows)\n")
    if png_path is not None:
        paper.plot_error_vs_depth(rows, os.fspath(png_path))
    return Report(tables, "\n".join(parts))
