"""The workflow's typed configuration: the experiment's sections (`vgg.config`) plus where
the outputs live, how the DAG runs and how it is tracked (work_dir, experiment, pipeline,
mlflow, ray). `load_config` reads a YAML file into a `PipelineConfig` and checks it
completely before anything runs (`vgg.config.ConfigError` names the file and the key).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal

from vgg.config import (AugmentConfig, ConfigError, DataConfig, DemoDataConfig,
                        EvaluateConfig, ExperimentConfig, FuseConfig, NetPlan, ReportConfig,
                        ShardConfig, TrainConfig, _check, check_scale_of, flatten, load_yaml,
                        parse_override, to_dict, validate_experiment)

__all__ = ["AugmentConfig", "ConfigError", "DataConfig", "DemoDataConfig", "EvaluateConfig",
           "ExperimentConfig", "FuseConfig", "MlflowConfig", "NetPlan", "PipelineConfig",
           "PipelineOptions", "RayConfig", "ReportConfig", "ShardConfig", "TrainConfig",
           "check_scale_of", "flatten", "load_config", "parse_override", "to_dict", "validate"]

DEFAULT_CONFIG = "configs/demo.yaml"


# ---------------------------------------------------------------- sections


@dataclass
class MlflowConfig:
    #: Tracking URI. Default: sqlite:///<work_dir>/mlflow.db. The environment
    #: variable MLFLOW_TRACKING_URI wins over this value, as in MLflow itself.
    tracking_uri: str | None = None
    #: System metrics (CPU, memory, disk, network; GPU utilisation and memory where there
    #: is one) of train and evaluate stages, sampled on the nodes their workers run on.
    system_metrics: bool = True
    #: Seconds between system-metric samples.
    system_metrics_interval_s: float = 5.0
    #: The model-registry name of each run's best single net (alias `champion` = the best
    #: so far on the same validation data). None: "<experiment>-best-net".
    registered_model: str | None = None
    #: How long one MLflow call to a tracking server may take, retries included, before
    #: the stage fails naming the server (training goes on meanwhile; nothing is lost:
    #: the rerun resumes and logs what could not be logged).
    retry_s: float = 120.0


@dataclass
class RayConfig:
    #: None: the RAY_ADDRESS environment variable if set, else a private local
    #: Ray instance. "auto": the cluster this machine belongs to (ray submit).
    address: str | None = None
    #: CPUs of the private local instance (None: all of this machine's).
    num_cpus: int | None = None
    #: Node address of the private local instance (kept on loopback).
    node_ip_address: str = "127.0.0.1"


@dataclass
class PipelineOptions:
    """How the DAG runs (no stage's cache key depends on these)."""

    #: Stages running at once, each as a Ray task that holds no resources itself: its Ray
    #: Train or Ray Data job waits for what it needs, so stages that do not fit wait their
    #: turn. None: no limit beyond the cluster's resources. 1: one stage after the other,
    #: in this process. "auto" (default): on a cluster, as None; on one machine, stages
    #: start together only when its CPUs (and GPUs) cover what all of them ask for, and
    #: one after the other in this process when no two independent stages ever fit
    #: (`pipeline.scheduler.auto_parallel`): two stages sharing two cores ran slower
    #: than the same stages one by one.
    max_parallel_stages: int | Literal["auto"] | None = "auto"


@dataclass
class PipelineConfig(ExperimentConfig):
    """An experiment (`vgg.config.ExperimentConfig`) and how the workflow runs it."""

    #: Where every output lives: a local path or a filesystem URI (s3://...).
    work_dir: str = "./runs"
    #: MLflow experiment name.
    experiment: str = "vgg"
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)


#: Control characters (NUL, newline, escape, DEL, ...): never part of a name or a path.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _check_names(cfg: PipelineConfig) -> None:
    """The MLflow names, as MLflow 3 checks them (mlflow/utils/validation.py): an experiment
    name is non-empty and at most 500 characters; a registered model's name
    (`mlflow.registered_model`, else `<experiment>-best-net`) has no "/" or ":" and is not
    a path that normalises to another name (".", "..x", "a/./b"). Control characters are
    refused in both (MLflow stores them and the console prints them raw)."""
    import posixpath

    exp = cfg.experiment
    _check(bool(exp and exp.strip()), "experiment", "must not be empty")
    _check(not _CONTROL.search(exp), "experiment", f"contains a control character: {exp!r}")
    _check(len(exp) <= 500, "experiment", f"is {len(exp)} characters long, MLflow allows 500")
    own = cfg.mlflow.registered_model
    key = "mlflow.registered_model" if own is not None else "experiment"
    name = own if own is not None else f"{exp}-best-net"
    _check(bool(name.strip()), key, "must be a non-empty name, or null for <experiment>-best-net")
    _check(not _CONTROL.search(name), key, f"contains a control character: {name!r}")
    why = ("" if own is not None else f" (it names the registered model {name!r}; or set "
           "mlflow.registered_model to a name without them)")
    bad = [c for c in "/:" if c in name]
    _check(not bad, key, f"{name!r} contains {' and '.join(repr(c) for c in bad)}, which MLflow "
                         f"refuses in a registered model's name{why}")
    norm = posixpath.normpath(name)
    _check(norm == name and norm != "." and not norm.startswith(".."), key,
           f"{name!r} is not a name MLflow accepts for a registered model (it must not start "
           f"with '..' or be '.'){why}")


def validate(cfg: PipelineConfig) -> None:
    """Cross-field checks of the experiment and of the workflow's sections."""
    validate_experiment(cfg)
    _check(bool(cfg.work_dir), "work_dir", "must not be empty")
    _check(not _CONTROL.search(cfg.work_dir), "work_dir", f"contains a control character: {cfg.work_dir!r}")
    _check_names(cfg)
    n = cfg.pipeline.max_parallel_stages
    _check(n is None or n == "auto" or n >= 1, "pipeline.max_parallel_stages", f"must be >= 1, auto, or null (no limit), got {n}")
    _check(cfg.mlflow.retry_s >= 5, "mlflow.retry_s", f"must be >= 5 seconds, got {cfg.mlflow.retry_s}")
    _check(cfg.mlflow.system_metrics_interval_s >= 1, "mlflow.system_metrics_interval_s",
           f"must be >= 1 second, got {cfg.mlflow.system_metrics_interval_s}")
    if cfg.ray.num_cpus is not None:
        _check(cfg.ray.num_cpus >= 1, "ray.num_cpus", "must be >= 1")


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    """Load, override and validate a config. Raises ConfigError naming the file and key."""
    return load_yaml(path or DEFAULT_CONFIG, overrides, PipelineConfig, validate)

