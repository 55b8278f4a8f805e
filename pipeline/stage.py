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

    def final_uri(self, *parts: str) -> str:
        """URI of a file of the output as it will be after publishing."""
        return posixpath.join(self.published_uri or self.out.uri, *parts)

    def log(self, msg: str) -> None:
        """One progress line, prefixed with the stage id."""
        print(f"  [{self.stage_id}] {msg}", file=sys.stderr, flush=True)


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


class Progress:
    """A periodic 'done/total' line for long loops (at most one line every `every_s`)."""

    def __init__(self, ctx_or_name: StageContext | str, what: str, total: int | None, every_s: float = 10.0):
        self.name = ctx_or_name.stage_id if isinstance(ctx_or_name, StageContext) else ctx_or_name
        self.what, self.total, self.every_s = what, total, every_s
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s or (self.total is not None and self.done >= self.total):
            self.last = now
            self._print(now)

    def _print(self, now: float) -> None:
        rate = self.done / max(now - self.t0, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        print(f"  [{self.name}] {self.what}: {self.done}{of} ({rate:.1f}/s)", file=sys.stderr, flush=True)
