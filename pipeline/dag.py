"""The pipeline as data: a table of stages, their upstream stages and config sections.

Stage ids: `shard`, `augment`, `train/<net>`, `evaluate/<net>`, `fuse` (net names
come from the config). Each stage names the module function that runs it
(imported only when the stage runs, so listing the DAG stays fast), the
config sections it depends on, and its upstream stages. Its cache key hashes
exactly those sections, its upstream stages' keys and the package version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable

from pipeline.config import PipelineConfig, to_dict

PACKAGE = "vgg-pipeline"


@dataclass(frozen=True)
class StageSpec:
    id: str
    kind: str  # shard | augment | train | evaluate | fuse | report
    upstream: tuple[str, ...]
    #: The resolved config this stage depends on: {name: dataclass or value}.
    section: dict[str, Any]
    #: "module:function" taking a StageContext and returning a StageResult.
    entry: str
    #: Whether the stage needs a Ray cluster.
    needs_ray: bool = True
    #: "module:function" taking the section: checks what can be checked before any work
    #: starts (e.g. the dataset's layout), raising a UserError.
    check: str | None = None

    def load(self) -> Callable:
        return _resolve(self.entry)

    def load_check(self) -> Callable | None:
        return _resolve(self.check) if self.check else None


def _resolve(entry: str) -> Callable:
    module, fn = entry.split(":")
    return getattr(importlib.import_module(module), fn)


@lru_cache(maxsize=1)
def package_version() -> str:
    try:
        return version(PACKAGE)
    except PackageNotFoundError:  # running from a source tree without installing
        return "0+source"


def cache_key(spec: StageSpec, upstream_keys: dict[str, str]) -> str:
    """Hash of (resolved config section, upstream cache keys, package version)."""
    payload = {
        "stage": spec.id,
        "section": to_dict(spec.section),
        "upstream": {k: upstream_keys[k] for k in spec.upstream},
        "version": package_version(),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_dag(cfg: PipelineConfig) -> dict[str, StageSpec]:
    """All stages of this config, in dependency (topological) order."""
    stages = [
        StageSpec(
            id="shard",
            kind="shard",
            upstream=(),
            section={"data": cfg.data, "shard": cfg.shard},
            entry="stages.shard:run",
            check="stages.shard:check",
        ),
        StageSpec(
            id="augment",
            kind="augment",
            upstream=("shard",),
            section={"augment": cfg.augment},
            entry="stages.augment:run_stage",
        ),
    ]
    # Training plan: train/<net> depends on the data, the augmentation spec and,
    # through `init`, on the net it starts from (paper section 3.1).
    common = dataclasses.replace(cfg.train, nets={})
    for name, net in cfg.train.nets.items():
        ups = ("shard", "augment") + ((net.init_source,) if net.init_source else ())
        stages.append(
            StageSpec(
                id=f"train/{name}",
                kind="train",
                upstream=ups,
                section={"train": common, "net": net, "name": name},
                entry="stages.train:run",
            )
        )
    evaluated = cfg.evaluate.nets if cfg.evaluate.nets is not None else list(cfg.train.nets)
    for name in evaluated:
        stages.append(
            StageSpec(
                id=f"evaluate/{name}",
                kind="evaluate",
                upstream=("shard", "augment", f"train/{name}"),
                section={"evaluate": dataclasses.replace(cfg.evaluate, nets=None), "net": cfg.train.nets[name], "name": name},
                entry="stages.evaluate:run",
            )
        )
    if cfg.fuse.members:
        members = sorted({m.split(":", 1)[0] for m in cfg.fuse.members})
        stages.append(
            StageSpec(
                id="fuse",
                kind="fuse",
                upstream=tuple(f"evaluate/{n}" for n in members),
                section={"fuse": cfg.fuse},
                entry="stages.fuse:run",
                needs_ray=False,
            )
        )
    results = tuple(s.id for s in stages if s.kind in ("evaluate", "fuse"))
    if results:  # the paper's tables and claims from every evaluation and the fusion
        stages.append(
            StageSpec(
                id="report",
                kind="report",
                upstream=results,
                section={"report": cfg.report},
                entry="stages.report:run",
                needs_ray=False,
            )
        )
    stages = _topological(stages)
    dag = {s.id: s for s in stages}
    _check_order(dag)
    return dag


def _topological(stages: list[StageSpec]) -> list[StageSpec]:
    """Order stages so that each comes after its upstream stages (stable otherwise)."""
    by_id = {s.id: s for s in stages}
    done: dict[str, StageSpec] = {}

    def visit(s: StageSpec, path: tuple[str, ...]) -> None:
        if s.id in done:
            return
        if s.id in path:
            raise ValueError(f"the DAG has a cycle: {' -> '.join(path + (s.id,))}")
        for up in s.upstream:
            if up not in by_id:
                raise ValueError(f"stage {s.id} depends on unknown stage {up}")
            visit(by_id[up], path + (s.id,))
        done[s.id] = s

    for s in stages:
        visit(s, ())
    return list(done.values())


def _check_order(dag: dict[str, StageSpec]) -> None:
    seen: set[str] = set()
    for sid, spec in dag.items():
        for up in spec.upstream:
            if up not in dag:
                raise ValueError(f"stage {sid} depends on unknown stage {up}")
            if up not in seen:
                raise ValueError(f"stage {sid} is listed before its upstream stage {up}")
        seen.add(sid)


def upstream_closure(dag: dict[str, StageSpec], sid: str) -> list[str]:
    """All transitive upstream stages of `sid`, in DAG order."""
    need: set[str] = set()
    todo = list(dag[sid].upstream)
    while todo:
        s = todo.pop()
        if s not in need:
            need.add(s)
            todo.extend(dag[s].upstream)
    return [s for s in dag if s in need]
