"""The fuse stage: softmax fusion of several nets' evaluations (paper Sec. 4.4, Table 6).

Members are "net:method@scales" (`vgg.paper.parse_member`), e.g. "D-jit:dense@multi";
each names the posteriors of one mode of evaluate/<net>. They are averaged with
equal weights (`vgg.results.metrics.average`: same images, labels and classes, or a
FusionError naming the member), and the fusion and every member are scored. No net,
no Ray.

Output (`vgg.artifacts.Fusion`): posteriors/fused.parquet, fusion.json, member_rows.json
(the members' rows, so a report can resolve them from this output alone); the
"fusion_errors.json" table and metrics fusion_top1_err, <member>_top1_err, ...
"""

from __future__ import annotations

from pipeline.dag import FuseInputs, FuseSection
from pipeline.stage import StageContext, StageResult
from pipeline.storage import DamagedOutput
from vgg.artifacts import FUSED_FILE, ROWS_FILE, Evaluation, posteriors_file, write_fusion
from vgg.paper import metric_name, parse_member, slug
from vgg.results.metrics import Posteriors, average, errors
from vgg.results.tables import EvalRow, FusionRow


def run(config: FuseSection, inputs: FuseInputs, ctx: StageContext) -> StageResult:
    members = list(config.fuse.members)
    repeated = sorted({m for m in members if members.count(m) > 1})
    if repeated:  # config load refuses them; a FuseSection built in code must too (not merge them)
        raise ValueError(f"fuse.members: {', '.join(map(repr, repeated))} repeated in {members}; "
                         "name each member once")
    posts = {m: read_member(m, inputs.evaluations) for m in members}
    fused = average(list(posts.values()), names=members)
    table: dict[str, list] = {"member": [], "top-1 %": [], "top-5 %": []}
    metrics: dict[str, float] = {}
    for name, post in [("fusion", fused), *posts.items()]:
        errs = {k: 100.0 * v for k, v in errors(post).items()}
        prefix = "fusion" if name == "fusion" else metric_prefix(name)
        metrics.update({f"{prefix}_{k}_err": v for k, v in errs.items()})
        for col, v in zip(table, (name, errs["top1"], errs.get("top5"))):
            table[col].append(v)
    row = FusionRow(members, table["top-1 %"][0], table["top-5 %"][0])
    files = write_fusion(ctx.out, fused, row, member_rows(members, inputs.evaluations))
    ctx.log(f"fused {len(members)} members over {len(fused)} images")
    return StageResult(
        metrics=metrics,
        tables={"fusion_errors.json": table},
        artifacts=files,
        manifest={"members": members, "images": len(fused), "posteriors": FUSED_FILE},
        summary=f"{' + '.join(members)}: top-1 {row.top1:.1f}%" + (f", top-5 {row.top5:.1f}%" if row.top5 is not None else ""),
    )


def read_member(member: str, evaluations: dict[str, Evaluation]) -> Posteriors:
    """A member's posteriors; a missing evaluation or mode is an error naming what exists."""
    net, mode = parse_member(member)
    if net not in evaluations:
        have = ", ".join(f"evaluate/{n}" for n in sorted(evaluations)) or "none"
        raise ValueError(f"fuse member {member!r}: no evaluate/{net} output among the inputs ({have})")
    try:
        return evaluations[net].posteriors(mode)
    except FileNotFoundError as e:
        raise ValueError(f"fuse member {member!r}: evaluate/{net} {e}") from None
    except (OSError, ValueError) as e:  # a damaged file (pyarrow's ArrowInvalid is a ValueError)
        path = evaluations[net].out.file_uri(posteriors_file(mode))
        raise DamagedOutput(f"fuse member {member!r}: cannot read {path} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); the output of evaluate/{net} "
                            f"is damaged: redo it with --stage evaluate/{net} --force") from e


def metric_prefix(member: str) -> str:
    """"D-jit:multi-crop+dense@multi" -> "D-jit_multicrop_dense_multi" (MLflow-safe)."""
    net, mode = parse_member(member)
    return slug(f"{net}_{metric_name(mode, '')}")


def member_rows(members: list[str], evaluations: dict[str, Evaluation]) -> list[EvalRow]:
    """The members' rows from their evaluations (where they have them)."""
    out = []
    for m in members:
        evaluation = evaluations[parse_member(m)[0]]
        if evaluation.has(ROWS_FILE):
            out += [r for r in evaluation.rows() if r.member_id == m]
    return out
