"""What the stages hand to each other: one typed view per kind of stage output.

Each class names the files of its output and reads them; the `write_*` functions
next to it are the only places that write them. A stage receives its inputs as
these objects (the runner wires them from the DAG's declarations in
`pipeline.dag`), so no stage knows another stage's file names.

    Shards        shard     train/ val/ Parquet shards, classes.json, stats.json
    Augmentation  augment   spec.json (vgg.data.augmentation.AugmentSpec)
    TrainedNet    train/*   model.pt (vgg.training.checkpoints), history.json
    Evaluation    evaluate  posteriors/<mode>.parquet, rows.json, health.json
    Fusion        fuse      posteriors/fused.parquet, fusion.json, member_rows.json
    Report        report    tables/*.json, results.md, claims.json, error_vs_depth.png

Light on purpose (no torch, DALI, Ray or pyarrow at import): the fuse and report
stages, the runner and `python -m vgg.ladder` import it. Posteriors are Parquet files
where pyarrow is installed (every pipeline install), NumPy .npz files elsewhere; both
are read.
"""

from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from vgg.storage import StageOutput, exists, list_dir, read_bytes, write_bytes, write_json
from vgg.data.augmentation import AugmentSpec
from vgg.results.metrics import Health, Posteriors, read_posteriors, write_posteriors
from vgg.results.metrics import health as metrics_health
from vgg.results.tables import EvalRow, FusionRow

if TYPE_CHECKING:  # torch: only where a net is loaded (vgg.training.checkpoints)
    from vgg.models import VGG


class MissingArtifact(FileNotFoundError):
    """A stage output lacks a file its consumer needs (an output of an older version)."""


@dataclass(frozen=True)
class Artifact:
    """A completed stage output, as its consumers see it."""

    out: StageOutput

    @property
    def uri(self) -> str:
        return self.out.uri

    @property
    def key(self) -> str:
        return self.out.key

    def _require(self, name: str, how: str) -> str:
        path = self.out.join(name)
        if not exists(self.out.fs, path):
            raise MissingArtifact(f"{self.out.uri} has no {name}; {how}")
        return path

    def _json(self, name: str, how: str) -> Any:
        self._require(name, how)
        return self.out.read_json(name)

    def has(self, name: str) -> bool:
        return exists(self.out.fs, self.out.join(name))


# ------------------------------------------------------------------ shards
CLASSES_FILE, STATS_FILE, CLASS_WORDS_FILE = "classes.json", "stats.json", "class_words.json"
SKIPPED_FILE, CONVERTED_FILE = "skipped.csv", "converted.csv"  # every file left out / converted
_RESHARD = "re-run the shard stage: python pipeline/run.py --stage shard --force"


@dataclass(frozen=True)
class Shards(Artifact):
    """Parquet shards of the train and val splits with the class index and RGB statistics."""

    def split(self, name: str) -> str:
        """URI (or local path) of a split's shard folder, for any process."""
        return self.out.file_uri(name)

    def classes(self) -> list[str]:
        return self._json(CLASSES_FILE, _RESHARD)

    def stats(self) -> dict[str, Any]:
        """Training-set mean RGB, RGB covariance and its eigen-decomposition (0-255 scale)."""
        return self._json(STATS_FILE, f"it holds the mean RGB and RGB eigen-decomposition; {_RESHARD}")


@dataclass(frozen=True)
class DatasetRef:
    """One split of a shard output, as a dataset a stage read (MLflow: `log_input`)."""

    name: str  # shards/<split>
    digest: str  # the shard stage's cache key
    uri: str
    rows: int
    columns: dict[str, str]  # column -> Arrow type
    context: str  # training | validation | evaluation


def split_dataset(shards: Shards, split: str, context: str) -> DatasetRef:
    """The DatasetRef of a split of `shards` (reads Parquet metadata only)."""
    from vgg.data.shards import num_rows, split_columns  # pyarrow: Parquet metadata

    uri = shards.split(split)
    return DatasetRef(f"shards/{split}", shards.key, uri, num_rows(uri, split),
                      split_columns(uri, split), context)


def shard_files_to_log(shards: Shards) -> list[str]:
    """The small files of a shard output (for MLflow)."""
    names = [STATS_FILE, CLASSES_FILE, CLASS_WORDS_FILE, SKIPPED_FILE, CONVERTED_FILE]
    return [n for n in names if shards.has(n)]


def write_shard_index(out: StageOutput, classes: Sequence[str], stats: Mapping[str, Any],
                      class_words: Mapping[str, str] | None = None) -> list[str]:
    """classes.json, stats.json (and class_words.json) of a shard output; -> the file names."""
    write_json(out.fs, out.join(CLASSES_FILE), list(classes))
    write_json(out.fs, out.join(STATS_FILE), dict(stats))
    files = [CLASSES_FILE, STATS_FILE]
    if class_words:
        write_json(out.fs, out.join(CLASS_WORDS_FILE), dict(class_words))
        files.append(CLASS_WORDS_FILE)
    return files


# ------------------------------------------------------------------ augmentation
SPEC_FILE = "spec.json"


@dataclass(frozen=True)
class Augmentation(Artifact):
    """The augmentation spec every train and evaluate stage builds its loaders from."""

    def spec(self) -> AugmentSpec:
        return AugmentSpec.from_dict(self._json(SPEC_FILE, "re-run the augment stage"))


def write_augmentation(out: StageOutput, spec: AugmentSpec) -> str:
    write_json(out.fs, out.join(SPEC_FILE), spec.to_dict())
    return SPEC_FILE


# ------------------------------------------------------------------ trained net
MODEL_FILE, HISTORY_FILE, INIT_FILE = "model.pt", "history.json", "init.json"


@dataclass(frozen=True)
class TrainedNet(Artifact):
    """A trained (or imported) net: model.pt in the format of `vgg.training.checkpoints`."""

    @property
    def model_uri(self) -> str:
        """URI (or local path) of model.pt, for any process."""
        self._require(MODEL_FILE, "re-run its train stage")
        return self.out.file_uri(MODEL_FILE)

    def load(self) -> tuple[VGG, dict[str, Any]]:
        """(net in eval mode, meta); see `vgg.training.checkpoints.load_model`."""
        from vgg.training.checkpoints import load_model  # torch, only when a net is loaded

        return load_model(self.model_uri)

    def history(self) -> dict[str, Any]:
        return self._json(HISTORY_FILE, "re-run its train stage")


def write_model(out: StageOutput, net: VGG, meta: Mapping[str, Any]) -> tuple[int, str]:
    """model.pt (`vgg.training.checkpoints.model_bytes`) into `out`; -> (bytes, sha256)."""
    from vgg.training.checkpoints import model_bytes, sha256  # torch, only when a net is saved

    data = model_bytes(net, meta)
    write_bytes(out.fs, out.join(MODEL_FILE), data)
    return len(data), sha256(data)


# ------------------------------------------------------------------ evaluation
POSTERIORS_DIR, ROWS_FILE, HEALTH_FILE = "posteriors", "rows.json", "health.json"


POSTERIORS_FORMATS = (".parquet", ".npz")  # vgg.results.metrics.write_posteriors


def posteriors_format() -> str:
    """The posteriors files written here: Parquet (pyarrow, every pipeline install), else
    NumPy's .npz (a run of the library alone on a machine without pyarrow)."""
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return ".npz"
    return ".parquet"


def posteriors_file(mode: str, ext: str = ".parquet") -> str:
    """Relative path of a mode's posteriors inside an evaluate output."""
    return posixpath.join(POSTERIORS_DIR, f"{mode}{ext}")


@dataclass(frozen=True)
class Evaluation(Artifact):
    """One net's evaluation: posteriors per mode (method@scales), its rows and health."""

    def rows(self) -> list[EvalRow]:
        return [EvalRow(**d) for d in self._json(ROWS_FILE, "re-run its evaluate stage")]

    def health(self, mode: str | None = None) -> Health | None:
        """The collapse check (health.json) of the net's best mode, or of `mode`; None
        where it was not recorded (health files before per-mode health hold the best only)."""
        if not self.has(HEALTH_FILE):
            return None
        best = dict(self.out.read_json(HEALTH_FILE))
        by_mode = best.pop("modes", {})
        if mode is None:
            return Health(**best)
        return Health(**by_mode[mode]) if mode in by_mode else None

    def modes(self) -> list[str]:
        """Modes with a posteriors file."""
        folder = self.out.join(POSTERIORS_DIR)
        if not exists(self.out.fs, folder):
            return []
        return sorted({posixpath.splitext(e.base_name)[0] for e in list_dir(self.out.fs, folder)
                       if posixpath.splitext(e.base_name)[1] in POSTERIORS_FORMATS})

    def _posteriors_file(self, mode: str) -> str | None:
        return next((f for f in (posteriors_file(mode, ext) for ext in POSTERIORS_FORMATS) if self.has(f)), None)

    def has_mode(self, mode: str) -> bool:
        return self._posteriors_file(mode) is not None

    def posteriors(self, mode: str) -> Posteriors:
        name = self._posteriors_file(mode)
        if name is None:
            raise MissingArtifact(f"{self.out.uri} has no mode {mode!r}; available modes: "
                                  f"{', '.join(self.modes()) or 'none'}")
        return read_posteriors(self.out.fs, self.out.join(name))


def write_evaluation(out: StageOutput, modes: Mapping[str, Posteriors], rows: Sequence[EvalRow],
                     health: Health) -> list[str]:
    """Posteriors of every mode, rows.json and health.json; -> the file names. health.json
    holds `health` (the best mode's) and, under "modes", the health of every mode (the one
    function `vgg.results.metrics.health`, so the report's check in any mode agrees)."""
    files, ext = [], posteriors_format()
    for mode, post in modes.items():
        write_posteriors(post, out.fs, out.join(posteriors_file(mode, ext)))
        files.append(posteriors_file(mode, ext))
    write_json(out.fs, out.join(ROWS_FILE), [dataclasses.asdict(r) for r in rows])
    write_json(out.fs, out.join(HEALTH_FILE), {**dataclasses.asdict(health), "modes": {
        mode: dataclasses.asdict(metrics_health(post)) for mode, post in modes.items()}})
    return [ROWS_FILE, HEALTH_FILE, *files]


# ------------------------------------------------------------------ fusion
FUSED_FILE, FUSION_FILE, MEMBER_ROWS_FILE = posixpath.join(POSTERIORS_DIR, "fused.parquet"), "fusion.json", "member_rows.json"
FUSED_NPZ = posixpath.join(POSTERIORS_DIR, "fused.npz")


@dataclass(frozen=True)
class Fusion(Artifact):
    """A softmax fusion: its posteriors, its row, and its members' rows."""

    def row(self) -> FusionRow:
        f = self._json(FUSION_FILE, "re-run the fuse stage")
        return FusionRow(f["members"], f["top1"], f.get("top5"))

    def member_rows(self) -> list[EvalRow]:
        return [EvalRow(**d) for d in self._json(MEMBER_ROWS_FILE, "re-run the fuse stage")]

    def has_posteriors(self) -> bool:
        return self.has(FUSED_FILE) or self.has(FUSED_NPZ)

    def posteriors(self) -> Posteriors:
        name = FUSED_NPZ if self.has(FUSED_NPZ) and not self.has(FUSED_FILE) else FUSED_FILE
        self._require(name, "re-run the fuse stage")
        return read_posteriors(self.out.fs, self.out.join(name))


def write_fusion(out: StageOutput, fused: Posteriors, row: FusionRow, member_rows: Sequence[EvalRow]) -> list[str]:
    write_posteriors(fused, out.fs, out.join(FUSED_FILE if posteriors_format() == ".parquet" else FUSED_NPZ))
    write_json(out.fs, out.join(FUSION_FILE), {"members": list(row.members), "top1": row.top1, "top5": row.top5})
    write_json(out.fs, out.join(MEMBER_ROWS_FILE), [dataclasses.asdict(r) for r in member_rows])
    return [FUSION_FILE, MEMBER_ROWS_FILE]


# ------------------------------------------------------------------ report
TABLES_DIR, MARKDOWN_FILE, CLAIMS_FILE, PLOT_FILE = "tables", "results.md", "claims.json", "error_vs_depth.png"


@dataclass(frozen=True)
class Report(Artifact):
    """The paper's tables from our runs, the claims judged, a plot."""

    def tables(self) -> dict[str, dict[str, list]]:
        names = self.out.read_json("manifest.json").get("tables", [])
        return {n: self.out.read_json(TABLES_DIR, n) for n in names}

    def markdown(self) -> str:
        return read_bytes(self.out.fs, self._require(MARKDOWN_FILE, "re-run the report stage")).decode()


def write_report(out: StageOutput, tables: Mapping[str, dict], markdown: str, claims: list[dict],
                 png: bytes) -> list[str]:
    """tables/<name>.json, results.md, claims.json, error_vs_depth.png; -> the files to log."""
    for name, table in tables.items():  # columns in their order: the result first (tables.COLUMNS)
        write_json(out.fs, out.join(TABLES_DIR, name), table, sort_keys=False)
    write_bytes(out.fs, out.join(MARKDOWN_FILE), markdown.encode())
    write_json(out.fs, out.join(CLAIMS_FILE), claims)
    write_bytes(out.fs, out.join(PLOT_FILE), png)
    return [MARKDOWN_FILE, PLOT_FILE, CLAIMS_FILE]
