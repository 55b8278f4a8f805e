"""The fuse stage: softmax fusion of several nets' evaluations (paper Sec. 4.4, Table 6).

Members are "net:method@scales" (`vgg.paper.parse_member`), e.g. "D-jit:dense@multi";
each names the posteriors of one mode of evaluate/<net>; `vgg.results.fusion` averages
and scores them. No net, no Ray.

Output (`vgg.artifacts.Fusion`): posteriors/fused.parquet, fusion.json, member_rows.json
(the members' rows, so a report can resolve them from this output alone); the
"fusion_errors.json" table and metrics fusion_top1_err, <member>_top1_err, ...
"""

from __future__ import annotations

from pipeline.dag import FuseInputs, FuseSection
from pipeline.stage import StageContext, StageResult
from pipeline.storage import DamagedOutput
from vgg.artifacts import FUSED_FILE, write_fusion
from vgg.errors import DamagedFile
from vgg.results.fusion import fuse


def run(config: FuseSection, inputs: FuseInputs, ctx: StageContext) -> StageResult:
    members = list(config.fuse.members)
    try:
        f = fuse(members, inputs.evaluations)
    except DamagedFile as e:
        raise DamagedOutput(f"{e}; redo it with --stage {e.source or 'evaluate/<net>'} --force") from e
    files = write_fusion(ctx.out, f.posteriors, f.row, f.member_rows)
    ctx.log(f"fused {len(members)} members over {len(f.posteriors)} images")
    row = f.row
    return StageResult(
        metrics=f.metrics,
        tables={"fusion_errors.json": f.table},
        artifacts=files,
        manifest={"members": members, "images": len(f.posteriors), "posteriors": FUSED_FILE},
        summary=f"{' + '.join(members)}: top-1 {row.top1:.1f}%" + (f", top-5 {row.top5:.1f}%" if row.top5 is not None else ""),
    )
