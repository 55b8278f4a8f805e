"""The model registry at the end of a run: the best single net, registered; the alias
`champion` moved to it only when it beats the current champion on the same validation data.

"Best" is the lowest top-1 error (then top-5) in the multi-scale dense evaluation, the
mode of the report's Table 4 (`SELECTION_MODE`). Each train stage logs its net as an
MLflow model and its output records the model's id (`mlflow_model_id`); evaluations
published before that have none and are skipped, with a line saying so.

Every version carries tags: the evaluation it won on (mode, errors, the validation data's
digest = the shard stage's cache key, the evaluate run), and the run's fusion (members,
errors), so the registry page says how to reproduce the best ensemble too.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.dag import StageSpec
from pipeline.storage import StageOutput
from pipeline.tracking import using_tracking_uri
from vgg.artifacts import MODEL_FILE, Evaluation, Fusion, MissingArtifact

CHAMPION = "champion"
SELECTION_MODE = "dense@multi"  # Table 4: multi-scale test, dense


@dataclass(frozen=True)
class Candidate:
    net: str
    model_id: str
    top1: float  # percent
    top5: float | None
    data: str  # digest of the validation data (the shard stage's cache key)
    evaluate_run: str
    model_sha256: str = ""  # of the train stage's published model.pt (its marker)

    def beats(self, top1: float, top5: float | None) -> bool:
        mine = (self.top1, self.top5 if self.top5 is not None else 0.0)
        return mine < (top1, top5 if top5 is not None else 0.0)


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    champion: str  # the version the alias points at afterwards
    moved: bool
    reason: str  # what was compared, and the outcome
    new: bool = True  # a new version (False: an existing one holds the same model.pt)

    def line(self) -> str:
        """The console line of the outcome."""
        what = (f"registered {self.name} v{self.version}" if self.new
                else f"{self.name} v{self.version} already holds this model.pt (no new version)")
        return f"{what}; champion: v{self.champion} ({self.reason})"


def model_name(experiment: str, configured: str | None) -> str:
    """The registered model's name: configured, or derived from the experiment."""
    return configured or f"{experiment}-best-net"


def candidates(dag: dict[str, StageSpec], outputs: dict[str, StageOutput],
               log: Callable[[str], None]) -> list[Candidate]:
    """One candidate per evaluated net with a logged model: its SELECTION_MODE errors."""
    shard = next(sid for sid, s in dag.items() if s.kind == "shard")
    out = []
    for sid, spec in dag.items():
        if spec.kind != "evaluate" or sid not in outputs:
            continue
        train = spec.wiring["net"]
        if train not in outputs:
            continue
        model_id = outputs[train].marker.get("mlflow_model_id")
        try:
            row = next(r for r in Evaluation(outputs[sid]).rows() if r.mode == SELECTION_MODE)
        except (MissingArtifact, StopIteration):
            continue
        if not model_id:
            log(f"registry: {train} has no MLflow model (published by an older version; "
                f"`--stage {train} --force` logs one): not a candidate")
            continue
        files = outputs[train].marker.get("files") or {}
        out.append(Candidate(row.net, model_id, row.top1, row.top5, outputs[shard].key,
                             outputs[sid].marker.get("mlflow_run_id", ""),
                             (files.get(MODEL_FILE) or {}).get("sha256", "")))
    return out


def register_best(client: MlflowClient, name: str, cands: list[Candidate],
                  fusion: Fusion | None) -> Registration | None:
    """Register the best candidate (a new version only for a model.pt no version holds:
    a rerun that republishes the same weights adds none) and move `champion` to it if it
    is better than the current champion on the same validation data."""
    if not cands:
        return None
    best = min(cands, key=lambda c: (c.top1, c.top5 if c.top5 is not None else 0.0))
    _ensure_model(client, name)
    version = _version_of(client, name, best)
    new = version is None
    version = _one_version(client, name, best, version or _register(client, name, best, fusion))
    mode = f"{SELECTION_MODE} top-1 error"
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champ = None
    v, mine = version.version, f"{best.top1:.2f}%"
    if champ is None:
        moved, reason = True, f"no champion yet; v{v}: {best.net}, {mode} {mine}"
    elif str(champ.version) == str(v):
        moved, reason = False, f"v{v} is the champion already: {best.net}, {mode} {mine}"
    elif champ.tags.get("val_data") != best.data:
        moved, reason = False, (f"not compared: champion v{champ.version} was evaluated on other "
                                f"validation data ({champ.tags.get('val_data')} vs {best.data})")
    else:
        theirs = f"{float(champ.tags['top1_err']):.2f}%"
        moved = best.beats(float(champ.tags["top1_err"]), _float(champ.tags.get("top5_err")))
        reason = (f"v{v} ({best.net}) {'beats' if moved else 'does not beat'} v{champ.version} "
                  f"({champ.tags.get('net', '?')}): {mode} {mine} vs {theirs} on the same validation data")
    if moved:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    client.set_model_version_tag(name, version.version, "champion_decision", reason)
    return Registration(name, str(version.version), str(version.version if moved else champ.version),
                        moved, reason, new)


def _float(text: str | None) -> float | None:
    return None if text in (None, "", "None") else float(text)


def _ensure_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(
            name, description=f"The best single net of each run ({SELECTION_MODE} top-1 error, the "
                              f"report's Table 4); alias `{CHAMPION}`: the best on the same "
                              "validation data so far.")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _same(mv, best: Candidate) -> bool:
    """Whether a version holds the candidate's net: the same model.pt (by sha256; a redo
    republishes the same weights under a new logged model), or the same logged model."""
    if best.model_sha256 and mv.tags.get("model_sha256"):
        return mv.tags["model_sha256"] == best.model_sha256
    return mv.tags.get("model_id") == best.model_id


def _version_of(client: MlflowClient, name: str, best: Candidate):
    """The version (the lowest) that already holds this net, or None."""
    same = [mv for mv in client.search_model_versions(f"name = '{name}'") if _same(mv, best)]
    return min(same, key=lambda mv: int(mv.version)) if same else None


def _one_version(client: MlflowClient, name: str, best: Candidate, mine):
    """Two invocations that register the same net at the same instant both find no version
    and both create one: the lowest version of the net is kept and the others deleted, by
    whichever invocation sees them (both agree on which stays). -> the version kept."""
    same = [mv for mv in client.search_model_versions(f"name = '{name}'") if _same(mv, best)]
    if len(same) <= 1:
        return mine
    same.sort(key=lambda mv: int(mv.version))
    for extra in same[1:]:
        try:
            client.delete_model_version(name, extra.version)
        except MlflowException as e:  # the other invocation deleted it first
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    return same[0]


def _register(client: MlflowClient, name: str, best: Candidate, fusion: Fusion | None):
    tags = {"model_id": best.model_id, "net": best.net, "mode": SELECTION_MODE,
            "top1_err": f"{best.top1:.4f}", "top5_err": "" if best.top5 is None else f"{best.top5:.4f}",
            "val_data": best.data, "evaluate_run": best.evaluate_run,
            **({"model_sha256": best.model_sha256} if best.model_sha256 else {})}
    if fusion is not None:
        row = fusion.row()
        tags.update({"fusion.members": " + ".join(row.members), "fusion.top1_err": f"{row.top1:.4f}",
                     "fusion.top5_err": "" if row.top5 is None else f"{row.top5:.4f}"})
    # mlflow.register_model (not client.create_model_version): it also links the version to
    # the logged model, so the model's page and the runs table's Models column show it
    with _quiet(), ExitStack() as stack:
        if mlflow.get_tracking_uri() != client.tracking_uri:  # else the runner's (do not reset it)
            stack.enter_context(using_tracking_uri(client.tracking_uri))
        return mlflow.register_model(f"models:/{best.model_id}", name, tags=tags)


@contextmanager
def _quiet():
    """Without MLflow's own console lines (`register_model` prints "Registered model ...
    already exists. Creating a new version" even on a first run, the model created by
    `_ensure_model`; the outcome is our one line, `Registration.line`)."""
    from mlflow.utils import logging_utils

    stream = logging_utils.MLFLOW_LOGGING_STREAM
    before = stream.enabled
    stream.enabled = False
    try:
        yield
    finally:
        stream.enabled = before
