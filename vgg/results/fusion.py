"""Softmax fusion of several nets' evaluations (paper Sec. 4.4, Table 6): members are
"net:method@scales" (`vgg.paper.parse_member`), each the posteriors of one mode of one
net's evaluation; they are averaged with equal weights (`vgg.results.metrics.average`:
same images, labels and classes, or a FusionError naming the member), and the fusion and
every member are scored. The fuse stage and `python -m vgg.ladder` run it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from vgg.artifacts import ROWS_FILE, Evaluation
from vgg.errors import DamagedFile
from vgg.paper import metric_name, parse_member, slug
from vgg.results.metrics import Posteriors, average, errors
from vgg.results.tables import EvalRow, FusionRow


@dataclass
class Fused:
    """A fusion's posteriors, its row, its members' rows, its error table and metrics."""

    posteriors: Posteriors
    row: FusionRow
    member_rows: list[EvalRow]
    table: dict[str, list]
    metrics: dict[str, float]


def fuse(members: list[str], evaluations: Mapping[str, Evaluation]) -> Fused:
    """Average the members' posteriors and score the fusion and each member (errors in %)."""
    repeated = sorted({m for m in members if members.count(m) > 1})
    if repeated:  # the config refuses them; members given in code must not be merged either
        raise ValueError(f"fuse.members: {', '.join(map(repr, repeated))} repeated in {members}; "
                         "name each member once")
    posts = {m: read_member(m, evaluations) for m in members}
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
    return Fused(fused, row, member_rows(members, evaluations), table, metrics)


def read_member(member: str, evaluations: Mapping[str, Evaluation]) -> Posteriors:
    """A member's posteriors; a missing evaluation or mode is an error naming what exists."""
    net, mode = parse_member(member)
    if net not in evaluations:
        have = ", ".join(f"evaluate/{n}" for n in sorted(evaluations)) or "none"
        raise ValueError(f"fuse member {member!r}: no evaluate/{net} output among the inputs ({have})")
    try:
        return evaluations[net].posteriors(mode)
    except FileNotFoundError as e:
        raise ValueError(f"fuse member {member!r}: evaluate/{net} {e}") from None
    except DamagedFile as e:
        raise DamagedFile(f"fuse member {member!r}: {e}", source=f"evaluate/{net}") from e


def metric_prefix(member: str) -> str:
    """"D-jit:multi-crop+dense@multi" -> "D-jit_multicrop_dense_multi" (MLflow-safe)."""
    net, mode = parse_member(member)
    return slug(f"{net}_{metric_name(mode, '')}")


def member_rows(members: list[str], evaluations: Mapping[str, Evaluation]) -> list[EvalRow]:
    """The members' rows from their evaluations (where they have them)."""
    out = []
    for m in members:
        evaluation = evaluations[parse_member(m)[0]]
        if evaluation.has(ROWS_FILE):
            out += [r for r in evaluation.rows() if r.member_id == m]
    return out
