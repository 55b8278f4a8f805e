"""What a stage function receives and returns.

A stage module exposes `run(config, inputs, ctx) -> StageResult`: `config` is its
typed config section and `inputs` its typed upstream artifacts (both declared in
`pipeline.dag`); it writes its (possibly large) outputs under `ctx.out` and returns
its small results. The runner does the rest: wiring, MLflow logging, publishing,
caching.
"""

from __future__ import annotations

import posixpath
import sys
from dataclasses import dataclass, field
from typing import Any

from pipeline.storage import StageOutput
from pipeline.system_metrics import SystemMetrics
from vgg.progress import Progress

__all__ = ["NetToLog", "Progress", "StageContext", "StageResult", "TrackingInfo"]


@dataclass(frozen=True)
class TrackingInfo:
    """Enough to log into the stage's MLflow run from any process (e.g. a Ray worker)."""

    tracking_uri: str
    experiment_id: str
    run_id: str


@dataclass
class StageContext:
    """The runtime services of one stage run (not its config or inputs)."""

    stage_id: str
    #: The (temporary) output directory; published atomically when run() returns.
    out: StageOutput
    tracking: TrackingInfo
    #: The stage's cache key.
    key: str = ""
    #: A directory that survives an interrupted run of the same key (e.g. Ray
    #: Train checkpoints for resuming); <work_dir>/stages/<id>/_scratch/<key>.
    scratch: StageOutput | None = None
    #: Where `out` will be once published (<work_dir>/stages/<id>/<key>): the URI to
    #: record in manifests ("" when not run by the runner: then `out.uri`).
    published_uri: str = ""
    #: Where the stage's workers sample their nodes' system metrics (None: off).
    system_metrics: SystemMetrics | None = None

    def final_uri(self, *parts: str) -> str:
        """URI of a file of the output as it will be after publishing."""
        return posixpath.join(self.published_uri or self.out.uri, *parts)

    def log(self, msg: str) -> None:
        """One progress line, prefixed with the stage id."""
        print(f"  [{self.stage_id}] {msg}", file=sys.stderr, flush=True)


@dataclass
class NetToLog:
    """A trained net the runner logs as an MLflow model (`mlflow.pytorch.log_model`)."""

    net: Any  # the torch module, pickled whole: `mlflow.pytorch.load_model` gives it back
    #: (N, 3, crop, crop) float32 images: the model's input example and signature.
    input_example: Any
    #: Its validation results, linked to the logged model (and to `dataset`).
    metrics: dict[str, float] = field(default_factory=dict)
    #: The config that made it (flattened into the model's params).
    config: dict[str, Any] = field(default_factory=dict)
    #: The dataset `metrics` were measured on.
    dataset: Any = None  # vgg.artifacts.DatasetRef
    step: int = 0  # the selected epoch


@dataclass
class StageResult:
    #: Scalar results, logged as MLflow metrics.
    metrics: dict[str, float] = field(default_factory=dict)
    #: Extra params beyond the config section (e.g. derived values).
    params: dict[str, Any] = field(default_factory=dict)
    #: Tables: artifact file name -> {column: values} (mlflow.log_table).
    tables: dict[str, dict[str, list]] = field(default_factory=dict)
    #: Small files inside the output directory to log as MLflow artifacts.
    artifacts: list[str] = field(default_factory=list)
    #: Written to manifest.json in the output and logged as an artifact.
    manifest: dict[str, Any] = field(default_factory=dict)
    #: MLflow tags of the stage run (e.g. a verdict that runs can be filtered by).
    tags: dict[str, str] = field(default_factory=dict)
    #: One line for the console.
    summary: str = ""
    #: The datasets the stage read (`vgg.artifacts.DatasetRef`: MLflow's run inputs).
    datasets: list[Any] = field(default_factory=list)
    #: A net to log as an MLflow model (train stages).
    model: NetToLog | None = None
