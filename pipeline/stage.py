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
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.storage import StageOutput
from pipeline.system_metrics import SystemMetrics


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


class Progress:
    """A progress bar for long loops, as lines: `[train/A] epoch 2/10 [######----------]
    40% 80/200 steps 2.1/s 0:38 elapsed ETA 0:57 | loss 1.93`.

    One line at most every `every_s` seconds and one at the end, never carriage returns:
    the lines travel through Ray's log forwarding and `ray submit`'s non-TTY output, where
    a redrawn bar (tqdm's) would come out as a run-on line or as hundreds of lines.
    `active=False` (the other ranks) prints nothing.
    """

    WIDTH = 20

    def __init__(self, ctx_or_name: StageContext | str, what: str, total: int | None, every_s: float = 10.0,
                 unit: str = "", active: bool = True):
        self.name = ctx_or_name.stage_id if isinstance(ctx_or_name, StageContext) else ctx_or_name
        self.what, self.total, self.every_s, self.unit, self.active = what, total, every_s, unit, active
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if self.active and (now - self.last >= self.every_s or finished):
            self.last = now
            # not print(): inside a Ray Train worker its print patch would echo the line twice
            sys.stderr.write(f"  [{self.name}] {self.line(now - self.t0, note)}\n")
            sys.stderr.flush()

    def line(self, elapsed: float, note: str = "") -> str:
        rate = self.done / max(elapsed, 1e-9)
        unit = f" {self.unit}" if self.unit else ""
        if not self.total:
            text = f"{self.what}: {self.done}{unit} {rate:.1f}/s {_clock(elapsed)} elapsed"
        else:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * round(frac * self.WIDTH) + "-" * (self.WIDTH - round(frac * self.WIDTH))
            eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
            text = (f"{self.what} [{bar}] {frac:4.0%} {self.done}/{self.total}{unit} {rate:.1f}/s "
                    f"{_clock(elapsed)} elapsed ETA {eta}")
        return f"{text} | {note}" if note else text


def _clock(seconds: float) -> str:
    """h:mm:ss or m:ss."""
    s = int(round(max(seconds, 0)))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"
