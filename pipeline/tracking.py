"""MLflow: the store, the experiment, one parent run per invocation, nested stage runs.

Known traps handled here: several processes creating a fresh SQLite store at
once crash on the schema creation, and racing `set_experiment` calls can drop
runs into "Default" — so the driver creates the store and the experiment
before any worker starts, and everything else passes `experiment_id`.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Iterator

import filelock
import mlflow
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient

from pipeline.config import PipelineConfig, flatten, to_dict

from pipeline.storage import StageOutput, is_local, read_bytes, resolve_uri

MAX_PARAM_LEN = 6000


#: How long a writer to a SQLite store waits for another one (stages run at once, each in
#: its own process, and write to one file): SQLite's busy timeout, in seconds.
SQLITE_BUSY_TIMEOUT_S = 60


def tracking_uri(cfg: PipelineConfig) -> str:
    """MLFLOW_TRACKING_URI wins, then `mlflow.tracking_uri`, then SQLite under work_dir.
    A SQLite store gets a busy timeout (`?timeout=`) unless the URI sets one."""
    return with_busy_timeout(_tracking_uri(cfg))


def with_busy_timeout(uri: str) -> str:
    """sqlite:///f.db -> sqlite:///f.db?timeout=60: concurrent writers wait for each other
    instead of failing with "database is locked" (SQLite's default: 5 s)."""
    if uri.startswith("sqlite:") and "timeout=" not in uri:
        return f"{uri}{'&' if '?' in uri else '?'}timeout={SQLITE_BUSY_TIMEOUT_S}"
    return uri


def sqlite_file(uri: str) -> str | None:
    """The database file of a sqlite:/// URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return uri[len("sqlite:///"):].split("?", 1)[0]


def _tracking_uri(cfg: PipelineConfig) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    fs, root = resolve_uri(cfg.work_dir)
    if not is_local(fs):
        raise ValueError(
            f"work_dir {cfg.work_dir} is not local: set mlflow.tracking_uri (e.g. the head node's "
            "`mlflow server`, http://<head>:5000) or MLFLOW_TRACKING_URI"
        )
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{os.path.join(root, 'mlflow.db')}"


def check_reachable(uri: str, wait_s: float = 15.0) -> None:
    """Fail fast, with the fix, when `uri` is an MLflow server that does not answer within
    `wait_s` (the MLflow client itself would retry for minutes before the first stage)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
                return
        except urllib.error.HTTPError:
            return  # it answers (a proxy or an auth layer may refuse /health)
        except (OSError, ValueError) as e:
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"the MLflow tracking server {uri} does not answer ({e}). Start it (on a "
                    "cluster: the head's `mlflow server`, see README) or point "
                    "mlflow.tracking_uri / MLFLOW_TRACKING_URI elsewhere"
                ) from None
            time.sleep(1.0)


def artifact_location(cfg: PipelineConfig, uri: str) -> str | None:
    """Where a new experiment keeps artifacts: under work_dir, unless a server decides."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    fs, root = resolve_uri(cfg.work_dir)
    if is_local(fs):
        return "file://" + posixpath.join(root, "mlartifacts")
    return cfg.work_dir.rstrip("/") + "/mlartifacts"


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point the fluent MLflow API at `uri` for a while. `mlflow.set_tracking_uri` also sets
    the MLFLOW_TRACKING_URI environment variable (for subprocesses); restore it afterwards,
    or a later pipeline in the same process would log into this one's store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


def setup_experiment(cfg: PipelineConfig, uri: str) -> str:
    """Create (if needed) the store and the experiment, in this process. -> experiment_id.

    A fresh SQLite store is created under a file lock: two invocations creating it at once
    both run MLflow's schema migrations, and both die (and leave a store every later run
    dies on)."""
    with _store_lock(uri):
        return _setup_experiment(cfg, uri)


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive file lock beside a local SQLite store (none for other stores)."""
    db = sqlite_file(uri)
    if db is None:
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
    with filelock.FileLock(db + ".lock"):
        yield


def _setup_experiment(cfg: PipelineConfig, uri: str) -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        exp_id = client.create_experiment(cfg.experiment, artifact_location=artifact_location(cfg, uri))
    elif exp.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {cfg.experiment!r} is deleted in {uri}: restore it "
            "(mlflow experiments restore) or choose another `experiment` name"
        )
    else:
        exp_id = exp.experiment_id
    if exp is None or EXPERIMENT_KIND_TAG not in exp.tags:
        # MLflow 3's experiment kind (a kind the user chose in the UI is kept). MLflow 3.17's
        # UI opens the view of its `workflowType` URL parameter instead, whatever the tag
        # says (`ui_hint` prints that link); the tag is for the versions and tools that read it.
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    if exp is None or NOTE_TAG not in exp.tags:  # the description above every view of it
        client.set_experiment_tag(exp_id, NOTE_TAG, EXPERIMENT_NOTE)
    return exp_id


#: The experiment tag that MLflow 3's UI reads to open an experiment on its runs table
#: ("Model training") rather than on the GenAI overview.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the experiment's description in the UI
EXPERIMENT_NOTE = ("VGG pipeline runs: one parent run per invocation, a nested run per stage. "
                   "They are in the **Model training** view (sidebar switch), not in GenAI; "
                   "the registry holds each run's best net (alias `champion`).")


def ui_hint(uri: str, experiment_id: str) -> str:
    """How to open the experiment's runs table in the MLflow UI. MLflow 3.17's UI picks
    its view from the `workflowType` URL parameter (then remembers it in the browser),
    not from the experiment's kind tag: a plain link opens the GenAI overview."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"MLflow UI: {uri.rstrip('/')}/{page}"
    store = uri.split("?", 1)[0] if uri.startswith("sqlite:") else uri
    return f"MLflow UI: mlflow ui --backend-store-uri {store}  then open http://127.0.0.1:5000/{page}"


#: Retries of one MLflow HTTP call, and the backoff factor (waits 1, 2, 4 s between them).
HTTP_RETRIES, HTTP_BACKOFF = 3, 1


def http_retry_env(retry_s: float) -> dict[str, str]:
    """MLflow client settings that bound one call, retries included, to about `retry_s`
    (MLflow's defaults: 7 retries of up to 120 s each, a quarter of an hour)."""
    waits = HTTP_BACKOFF * (2 ** HTTP_RETRIES - 1)
    per_try = max(5.0, (retry_s - waits) / (HTTP_RETRIES + 1))  # a loaded server answers in seconds
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(HTTP_RETRIES),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(HTTP_BACKOFF),
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(per_try))}


def _call_bound_s(retry_s: float) -> int:
    """The longest one MLflow call takes under `http_retry_env(retry_s)` (every try timing out)."""
    waits = HTTP_BACKOFF * (2 ** HTTP_RETRIES - 1)
    return int(http_retry_env(retry_s)["MLFLOW_HTTP_REQUEST_TIMEOUT"]) * (HTTP_RETRIES + 1) + waits


def lost_wait(e: BaseException, retry_s: float) -> str:
    """How long the MLflow calls really waited before the server counted as lost, from the
    error: a refused connection gives up after the retries' backoff alone (0 + 2 + 4 s,
    measured 6.0 s), a server
    that accepts but does not answer after every try timed out (about `retry_s`)."""
    texts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(str(e))
        e = e.__cause__ or e.__context__
    text = " ".join(texts)
    waits = HTTP_BACKOFF * (2 ** HTTP_RETRIES - 2)  # urllib3 2: no backoff before the first retry
    if any(t in text for t in ("refused", "Failed to establish a new connection", "Name or service not known",
                               "nodename nor servname", "Connection reset")):
        return (f"it refused connections: each MLflow call gave up after {HTTP_RETRIES} retries, about "
                f"{waits} s; a server that accepts connections but does not answer is waited for up to "
                f"{_call_bound_s(retry_s)} s per call, mlflow.retry_s = {retry_s:g}")
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (f"its calls timed out: each waited about {_call_bound_s(retry_s)} s "
                f"(mlflow.retry_s = {retry_s:g}) before giving up")
    return f"each MLflow call gives up after at most {_call_bound_s(retry_s)} s, mlflow.retry_s = {retry_s:g}"


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for a while (this process, and the processes it starts)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fail_fast() -> None:
    """After the server was lost: further MLflow calls (marking runs failed) give up at once."""
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="2")


def lost_server(e: BaseException) -> bool:
    """Whether an MLflow error says that its HTTP requests found no server."""
    text = str(e)
    return type(e).__name__ == "MlflowException" and "API request to" in text and (
        "Max retries exceeded" in text or "Connection" in text or "timed out" in text.lower())


def owner_tags(work_dir: str) -> dict[str, str]:
    """Tags naming the process that owns a run: how a later invocation tells that a
    RUNNING run's process is gone (`mark_stale_runs`)."""
    return {"owner.pid": str(os.getpid()), "owner.host": socket.gethostname(), "work_dir": work_dir}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def mark_stale_runs(uri: str, experiment_id: str, work_dir: str) -> list[str]:
    """Mark KILLED the RUNNING runs of earlier invocations on this work_dir whose process
    is gone (kill -9, a lost machine: nothing could mark them FAILED). Only runs owned by
    a process of this host can be judged. -> their run ids."""
    client = MlflowClient(uri)
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                              max_results=5000)
    stale = []
    for r in runs:
        tags = r.data.tags
        if tags.get("work_dir") != work_dir or tags.get("owner.host") != host:
            continue
        pid = int(tags.get("owner.pid", "0") or 0)
        if pid and pid != os.getpid() and not _alive(pid):
            client.set_terminated(r.info.run_id, status="KILLED")
            stale.append(r.info.run_id)
    return stale


def params_of(section: Any) -> dict[str, str]:
    """A config section as MLflow params (dotted keys, values as strings, length-capped)."""
    out = {}
    for k, v in flatten(to_dict(section)).items():
        s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        out[k] = s if len(s) <= MAX_PARAM_LEN else s[: MAX_PARAM_LEN - 3] + "..."
    return out


def log_params(params: dict[str, Any]) -> None:
    items = list(params.items())
    for i in range(0, len(items), 100):  # MLflow's batch limit
        mlflow.log_params(dict(items[i : i + 100]))


def log_output_files(out: StageOutput, names: list[str], artifact_path: str | None = None) -> None:
    """Log files of a stage output as artifacts (downloaded first if the output is remote)."""
    if not names:
        return
    if is_local(out.fs):
        for name in names:
            mlflow.log_artifact(out.join(name), artifact_path=_subdir(name, artifact_path))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            local = os.path.join(tmp, name)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "wb") as f:
                f.write(read_bytes(out.fs, out.join(name)))
            mlflow.log_artifact(local, artifact_path=_subdir(name, artifact_path))


def _subdir(name: str, artifact_path: str | None) -> str | None:
    parent = posixpath.dirname(name)
    parts = [p for p in (artifact_path, parent) if p]
    return "/".join(parts) or None


# ------------------------------------------------------------------ datasets and models
#: Arrow type -> MLflow column type (mlflow.types.DataType) for dataset schemas.
_MLFLOW_TYPES = {"binary": "binary", "large_binary": "binary", "string": "string", "large_string": "string",
                 "int64": "long", "int32": "integer", "int16": "integer", "int8": "integer",
                 "uint8": "integer", "uint16": "integer", "uint32": "long", "double": "double",
                 "float": "float", "bool": "boolean"}


def log_datasets(refs: list[Any]) -> list[Any]:
    """Record the shard splits a stage read as the run's inputs (`mlflow.log_input`): the
    runs table's Dataset column. -> the MLflow datasets, by ref order."""
    return [_log_dataset(ref) for ref in refs]


class ShardSplit(MetaDataset):
    """A split of a shard output for MLflow: name, digest (the shard stage's cache key),
    source (its URI), schema, and its row count as the profile (MetaDataset has none)."""

    def __init__(self, source: Any, name: str, digest: str, schema: Any, rows: int):
        super().__init__(source, name=name, digest=digest, schema=schema)
        self.rows = rows

    @property
    def profile(self) -> dict[str, Any]:
        return {"num_rows": self.rows}

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}


def _log_dataset(ref: Any) -> ShardSplit:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.types import ColSpec, Schema

    schema = Schema([ColSpec(_MLFLOW_TYPES[t], name) for name, t in ref.columns.items() if t in _MLFLOW_TYPES])
    if "://" in ref.uri and not ref.uri.startswith("file://"):
        source = resolve_dataset_source(ref.uri)  # s3://, gs://, ... (MLflow's artifact sources)
    else:
        source = LocalArtifactDatasetSource(ref.uri if "://" in ref.uri else "file://" + os.path.abspath(ref.uri))
    dataset = ShardSplit(source, ref.name, ref.digest, schema if schema.inputs else None, ref.rows)
    mlflow.log_input(dataset, context=ref.context)
    return dataset


def requirements() -> list[str]:
    """The pip requirements of a logged net: this package's dependencies, with torch and
    torchvision pinned to the versions that pickled it."""
    from importlib import metadata

    # versions from the installed metadata: importing torchvision here cost the driver's
    # first logged net about 1.5 s (it imports torch._dynamo)
    pinned = {k: metadata.version(k).split("+")[0] for k in ("torch", "torchvision")}
    out = [f"{k}=={v}" for k, v in pinned.items()]
    for req in metadata.requires("vgg-pipeline") or []:
        name = req.split(";")[0].strip()
        base = name.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()
        if "extra ==" in req or base in pinned:
            continue
        out.append(name)
    return out


def log_net(model: Any, dataset: Any | None) -> str:
    """Log a trained net as an MLflow 3 logged model ("model"): the whole module pickled
    (with the `vgg` package as its code, so `mlflow.pytorch.load_model` needs no install),
    a tensor signature, an input example, the config as params, this package's requirements;
    its validation metrics are linked to it. -> the model id."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    import vgg

    net, example = model.net.eval(), np.asarray(model.input_example, dtype=np.float32)
    with torch.no_grad():
        classes = int(net(torch.from_numpy(example)).shape[1])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]))
    params = params_of(model.config)
    # MLflow warns that pickled models run code when loaded: this pipeline's own nets, and
    # the pickle is what gives back the module with its dense evaluation (net.dense).
    quiet = logging.getLogger("mlflow.pytorch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        info = mlflow.pytorch.log_model(
            net, name="model", signature=signature, input_example=example,
            pip_requirements=requirements(), code_paths=[os.path.dirname(vgg.__file__)],
            params=params, step=model.step,
            # the module itself (dense evaluation calls net.dense), not MLflow 3's default
            # torch.export program of its forward
            serialization_format="pickle")
    finally:
        quiet.setLevel(level)
    if model.metrics:
        mlflow.log_metrics(model.metrics, step=model.step, model_id=info.model_id, dataset=dataset)
    return info.model_id
