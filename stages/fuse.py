"""The fuse stage: softmax fusion of several nets' evaluations (paper Sec. 4.4, Table 6).

Members are "net:method@scales" strings (e.g. "D-jit:dense@multi"); each names
a posteriors file of the stage evaluate/<net>. Their posteriors are averaged
(metrics.average: same images, labels and classes, or a FusionError naming
the member), and the fusion and every member are scored. No model, no Ray.

Outputs: posteriors/fused.parquet, fusion.json (paper.FusionRow: members,
top1, top5 in %), member_rows.json (the members' paper.EvalRow, so a report
can resolve them from this output alone), the "fusion_errors.json" table and
metrics fusion_top1_err / fusion_top5_err / <member>_top1_err ...
"""

from __future__ import annotations

import dataclasses
import posixpath
import re

import pyarrow.fs as pafs

from pipeline.config import FuseConfig
from pipeline.stage import StageContext, StageResult
from pipeline.storage import StageOutput, exists, write_json
from stages.evaluate import METHOD_SLUG, POSTERIORS_DIR, posteriors_file, rows_from_json
from stages.metrics import Posteriors, average, errors, read_posteriors, write_posteriors

FUSED_FILE = posixpath.join(POSTERIORS_DIR, "fused.parquet")


def parse_member(member: str) -> tuple[str, str]:
    """"D-jit:dense@multi" -> ("D-jit", "dense@multi")."""
    net, sep, mode = member.partition(":")
    if not sep or not net or "@" not in mode:
        raise ValueError(f"fuse.members: {member!r} is not net:method@scales")
    return net, mode


def available_modes(out: StageOutput) -> list[str]:
    """Modes with a posteriors file in an evaluate output."""
    folder = out.join(POSTERIORS_DIR)
    if not exists(out.fs, folder):
        return []
    infos = out.fs.get_file_info(pafs.FileSelector(folder))
    return sorted(i.base_name[: -len(".parquet")] for i in infos if i.base_name.endswith(".parquet"))


def read_member(member: str, inputs: dict[str, StageOutput]) -> Posteriors:
    """A member's posteriors; a missing stage or mode is an error naming what exists."""
    net, mode = parse_member(member)
    out = inputs.get(f"evaluate/{net}")
    if out is None:
        have = ", ".join(sorted(inputs)) or "none"
        raise ValueError(f"fuse member {member!r}: no evaluate/{net} output among the inputs ({have})")
    path = out.join(posteriors_file(mode))
    if not exists(out.fs, path):
        raise ValueError(f"fuse member {member!r}: evaluate/{net} ({out.uri}) has no mode {mode!r}; "
                         f"available modes: {', '.join(available_modes(out)) or 'none'}")
    return read_posteriors(out.fs, path)


def metric_prefix(member: str) -> str:
    """"D-jit:multi-crop+dense@multi" -> "D-jit_multicrop_dense_multi" (MLflow-safe)."""
    net, mode = parse_member(member)
    method, scales = mode.split("@", 1)
    name = f"{net}_{METHOD_SLUG.get(method, method)}_{scales}"
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def fuse(members: list[str], inputs: dict[str, StageOutput]) -> tuple[Posteriors, dict[str, Posteriors]]:
    """(fused posteriors, each member's), averaged with equal weights."""
    dup = sorted({m for m in members if members.count(m) > 1})
    if not members or dup:
        raise ValueError(f"fuse.members: {'repeated: ' + ', '.join(dup) if dup else 'empty'}")
    posts = {m: read_member(m, inputs) for m in members}
    return average(list(posts.values()), names=members), posts


def _percent(post: Posteriors) -> dict[str, float]:
    return {k: 100.0 * v for k, v in errors(post).items()}


def run(ctx: StageContext) -> StageResult:
    """Stage entry (DAG: fuse); see the module docstring."""
    cfg: FuseConfig = ctx.section["fuse"]
    members = list(cfg.members)
    fused, posts = fuse(members, ctx.inputs)
    write_posteriors(fused, ctx.out.fs, ctx.out.join(FUSED_FILE))
    table: dict[str, list] = {"member": [], "top-1 %": [], "top-5 %": []}
    metrics: dict[str, float] = {}
    for name, post in [("fusion", fused), *posts.items()]:
        errs = _percent(post)
        prefix = "fusion" if name == "fusion" else metric_prefix(name)
        metrics.update({f"{prefix}_{k}_err": v for k, v in errs.items()})
        for col, v in zip(table, (name, errs["top1"], errs.get("top5"))):
            table[col].append(v)
    top1, top5 = table["top-1 %"][0], table["top-5 %"][0]
    write_json(ctx.out.fs, ctx.out.join("fusion.json"), {"members": members, "top1": top1, "top5": top5})
    write_json(ctx.out.fs, ctx.out.join("member_rows.json"), _member_rows(members, ctx.inputs))
    ctx.log(f"fused {len(members)} members over {len(fused)} images")
    return StageResult(
        metrics=metrics,
        tables={"fusion_errors.json": table},
        artifacts=["fusion.json", "member_rows.json"],
        manifest={"members": members, "images": len(fused), "posteriors": FUSED_FILE},
        summary=f"{' + '.join(members)}: top-1 {top1:.1f}%" + (f", top-5 {top5:.1f}%" if top5 is not None else ""),
    )


def _member_rows(members: list[str], inputs: dict[str, StageOutput]) -> list[dict]:
    """The members' rows from their evaluate outputs' rows.json (where there is one)."""
    out = []
    for m in members:
        src = inputs[f"evaluate/{parse_member(m)[0]}"]
        if exists(src.fs, src.join("rows.json")):
            out += [dataclasses.asdict(r) for r in rows_from_json(src.read_json("rows.json"))
                    if r.member_id == m]
    return out
