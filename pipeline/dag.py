"""The pipeline as data: each kind of stage declared once (`KINDS`: its code, typed
config section, typed inputs and output artifact, whether it needs Ray), and the
stages of a config (`build_dag`) with the upstream stage feeding each input.

Stage ids: `shard`, `augment`, `train/<net>`, `evaluate/<net>`, `fuse`, `report`
(net names come from the config). A stage's code is imported only when it runs, so
listing the DAG stays fast. Its cache key hashes exactly its config section, its
upstream stages' keys and the package version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Mapping

from pipeline.config import (AugmentConfig, DataConfig, EvaluateConfig, FuseConfig, NetPlan, PipelineConfig,
                             ReportConfig, ShardConfig, TrainConfig, to_dict)
from pipeline.storage import StageOutput
from vgg.artifacts import Augmentation, Evaluation, Fusion, Report, Shards, TrainedNet
from vgg.paper import parse_member

PACKAGE = "vgg-pipeline"


# ------------------------------------------------------------------ sections and inputs
# Each stage kind's config section (what its cache key hashes, passed to its `run` as
# `config`) and its inputs (typed artifacts, `vgg.artifacts`, passed as `inputs`).


@dataclass(frozen=True)
class ShardSection:
    data: DataConfig
    shard: ShardConfig


@dataclass(frozen=True)
class ShardInputs:
    pass


@dataclass(frozen=True)
class AugmentSection:
    augment: AugmentConfig


@dataclass(frozen=True)
class AugmentInputs:
    shards: Shards


@dataclass(frozen=True)
class TrainSection:
    train: TrainConfig  # the recipe (its `nets` left out: each net's plan is `net`)
    net: NetPlan
    name: str


@dataclass(frozen=True)
class TrainInputs:
    shards: Shards
    augmentation: Augmentation
    #: The net this one is initialised from (NetPlan.init: from_A or full), if any.
    init: TrainedNet | None = None


@dataclass(frozen=True)
class EvaluateSection:
    evaluate: EvaluateConfig  # its `nets` left out
    net: NetPlan
    name: str


@dataclass(frozen=True)
class EvaluateInputs:
    shards: Shards
    augmentation: Augmentation
    net: TrainedNet


@dataclass(frozen=True)
class FuseSection:
    fuse: FuseConfig


@dataclass(frozen=True)
class FuseInputs:
    #: net name -> its evaluation, for every net a member names
    evaluations: dict[str, Evaluation]


@dataclass(frozen=True)
class ReportSection:
    report: ReportConfig


@dataclass(frozen=True)
class ReportInputs:
    #: net name -> its evaluation, for every evaluated net
    evaluations: dict[str, Evaluation]
    fusion: Fusion | None = None


@dataclass(frozen=True)
class Kind:
    """The declaration of a kind of stage: its code, config section, inputs and output."""

    entry: str  # "module:function" run(config, inputs, ctx) -> StageResult
    section: type
    inputs: type
    output: type  # the Artifact its consumers receive
    needs_ray: bool = True
    check: str | None = None  # "module:function" check(config), before anything starts


KINDS = {
    "shard": Kind("stages.shard:run", ShardSection, ShardInputs, Shards, check="stages.shard:check"),
    "augment": Kind("stages.augment:run", AugmentSection, AugmentInputs, Augmentation),
    "train": Kind("stages.train:run", TrainSection, TrainInputs, TrainedNet),
    "evaluate": Kind("stages.evaluate:run", EvaluateSection, EvaluateInputs, Evaluation),
    "fuse": Kind("stages.fuse:run", FuseSection, FuseInputs, Fusion, needs_ray=False),
    "report": Kind("stages.report:run", ReportSection, ReportInputs, Report, needs_ray=False),
}


@dataclass(frozen=True)
class StageSpec:
    id: str
    kind: str  # a key of KINDS
    #: The stage's config section (a KINDS[kind].section instance).
    section: Any
    #: inputs field -> the upstream stage id feeding it (a dict field: a tuple of ids).
    wiring: dict[str, str | tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @property
    def decl(self) -> Kind:
        return KINDS[self.kind]

    @property
    def upstream(self) -> tuple[str, ...]:
        ids: list[str] = []
        for v in self.wiring.values():
            ids += [v] if isinstance(v, str) else list(v)
        return tuple(dict.fromkeys(ids))

    @property
    def needs_ray(self) -> bool:
        return self.decl.needs_ray

    def load(self) -> Callable:
        return _resolve(self.decl.entry)

    def load_check(self) -> Callable | None:
        return _resolve(self.decl.check) if self.decl.check else None

    def inputs(self, outputs: Mapping[str, StageOutput]) -> Any:
        """The typed inputs of this stage from the completed outputs of its upstream stages."""
        kinds = KINDS
        values = {}
        for name, source in self.wiring.items():
            if isinstance(source, str):
                values[name] = KINDS[_kind_of(source)].output(outputs[source])
            else:  # {net name: artifact}
                values[name] = {sid.split("/", 1)[1]: kinds[_kind_of(sid)].output(outputs[sid]) for sid in source}
        return self.decl.inputs(**values)


def _kind_of(stage_id: str) -> str:
    return stage_id.split("/", 1)[0]


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
        StageSpec("shard", "shard", ShardSection(cfg.data, cfg.shard)),
        StageSpec("augment", "augment", AugmentSection(cfg.augment), {"shards": "shard"}),
    ]
    # Training plan: train/<net> depends on the data, the augmentation spec and,
    # through `init`, on the net it starts from (paper section 3.1).
    common = dataclasses.replace(cfg.train, nets={})
    data = {"shards": "shard", "augmentation": "augment"}
    for name, net in cfg.train.nets.items():
        init = {"init": net.init_source} if net.init_source else {}
        stages.append(StageSpec(f"train/{name}", "train", TrainSection(common, net, name), {**data, **init}))
    evaluated = cfg.evaluate.nets if cfg.evaluate.nets is not None else list(cfg.train.nets)
    common_eval = dataclasses.replace(cfg.evaluate, nets=None)
    for name in evaluated:
        stages.append(StageSpec(f"evaluate/{name}", "evaluate",
                                EvaluateSection(common_eval, cfg.train.nets[name], name),
                                {**data, "net": f"train/{name}"}))
    if cfg.fuse.members:
        members = sorted({parse_member(m)[0] for m in cfg.fuse.members})
        stages.append(StageSpec("fuse", "fuse", FuseSection(cfg.fuse),
                                {"evaluations": tuple(f"evaluate/{n}" for n in members)}))
    evaluations = tuple(s.id for s in stages if s.kind == "evaluate")
    if evaluations:  # the paper's tables and claims from every evaluation and the fusion
        fusion = {"fusion": "fuse"} if cfg.fuse.members else {}
        stages.append(StageSpec("report", "report", ReportSection(cfg.report),
                                {"evaluations": evaluations, **fusion}))
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
