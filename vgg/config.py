"""The experiment's typed configuration: YAML -> dataclasses, dotted overrides, validation.

Every key is declared once, with its type and default, in the dataclasses below: the
sections of an experiment (data, shard, augment, train, evaluate, fuse, report), read by
the library (`python -m vgg.ladder`) and by the workflow, whose `pipeline.config.PipelineConfig`
adds its own sections (work_dir, experiment, pipeline, mlflow, ray). Loading a file checks
it completely before anything runs: an unknown key, a wrong type, a missing required value
or an impossible combination is a `ConfigError` whose one-line message names the file and
the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, Union, get_args, get_origin

import yaml

from vgg.errors import UserError
from vgg.paper import ARCHS, jitter_at, parse_member, parse_mode, parse_scale


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 does: `1e-3`, `5E-4` and `1e+2` are
    floats (YAML 1.1, PyYAML's default, wants a dot and a signed exponent, `1.0e-3`, and reads
    the others as strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader


class ConfigError(UserError, ValueError):
    """A configuration problem, reported as '<source>: <dotted.key>: <what is wrong>'."""

    keep_traceback = False


# ---------------------------------------------------------------- sections


@dataclass
class DemoDataConfig:
    """The small synthetic image folder used when `data.root` is not given."""

    num_classes: int = 5
    train_per_class: int = 60
    val_per_class: int = 20
    #: Image sides are drawn from [min_side, max_side] (varied sizes and
    #: aspect ratios, so that isotropic rescaling matters).
    min_side: int = 40
    max_side: int = 96
    seed: int = 0


@dataclass
class DataConfig:
    #: The dataset, in the layout `layout` names: a local path or a pyarrow filesystem
    #: URI. None: the generated demo set (a plain image folder).
    root: str | None = None
    #: How `root` is laid out (README, "ImageNet (ILSVRC-2012) as you have it"):
    #: "folders": <root>/train/<class>/*, <root>/val/<class>/* (or test/);
    #: "ilsvrc2012": the official ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and
    #: ILSVRC2012_devkit_t12.tar.gz in root (read in place, not extracted), or their
    #: extracted forms; "kaggle": the Kaggle copy (ILSVRC/Data/CLS-LOC, LOC_val_solution.csv,
    #: LOC_synset_mapping.txt). Classes are sorted by name (ImageNet: by wnid) in every layout.
    layout: Literal["folders", "ilsvrc2012", "kaggle"] = "folders"
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    #: At most this many images per class of the training / validation split (None: all):
    #: a seeded random subset (shard.seed), for runs sized to a small machine.
    train_per_class: int | None = None
    val_per_class: int | None = None


@dataclass
class ShardConfig:
    #: Target rows per Parquet shard; shards of a split are balanced.
    rows_per_shard: int = 1000
    #: Quality of the JPEGs written for images that must be converted
    #: (grayscale, CMYK, PNG, 16-bit, ...). Valid RGB JPEGs are kept as they are.
    jpeg_quality: int = 95
    #: Seed of the row order across shards (classes are mixed in every shard).
    seed: int = 0


@dataclass
class AugmentConfig:
    """The augmentation spec (paper section 3.1) shared by every train and evaluate stage."""

    #: Training crop (the paper: 224). Every net's smallest training scale must be >= crop.
    crop: int = 224
    #: AlexNet's PCA colour noise: alpha ~ N(0, color_noise_std) per eigenvector.
    color_noise_std: float = 0.1
    flip: bool = True
    #: The loaders' backend (vgg.data.loaders): "dali" (NVIDIA DALI: ROI decoding, GPU "mixed"
    #: decoding on GPU workers; Linux + NVIDIA CUDA wheels only) or "torch" (TorchCodec's
    #: JPEG decoders, batched on the GPU where there is one, and torch ops: any PyTorch machine).
    backend: Literal["dali", "torch"] = "dali"
    #: Decoding: "auto" (on the GPU where the worker has one), "cpu" or "gpu".
    device: Literal["auto", "cpu", "gpu"] = "auto"
    #: CPU threads per pipeline (DALI) / decoding threads (torch).
    num_threads: int = 2
    #: DALI prefetch queue depth.
    prefetch: int = 2
    #: Resampling filter of the rescale.
    interp: Literal["linear", "cubic", "lanczos3"] = "linear"
    #: Checks of the augment stage: batches of each pipeline kind run, their
    #: batch size, and the training scale range used ([Smin, Smax]; None: the
    #: paper's [256, 512] relative to the crop, i.e. [crop*8/7, crop*16/7]).
    check_batches: int = 20
    check_batch_size: int = 64
    check_scale: list[int] | None = None
    seed: int = 0


@dataclass
class NetPlan:
    """One entry of the training plan (paper section 3.1, "training image size")."""

    #: A, A-LRN, B, C, D or E (Table 1).
    arch: str = "???"
    #: Training scale: a fixed S (shorter side) or [Smin, Smax] (scale jittering).
    scale: int | list[int] = 256
    #: Initial learning rate (paper: 1e-2; 1e-3 when fine-tuning from a smaller S).
    lr: float = 0.01
    #: "random" | "glorot" | {from_A: train/<net>} (the paper's partial init: first four
    #: convs and the three FC layers from A) | {full: train/<net>} (fine-tuning).
    #: from_A may add `rest: glorot` or `rest: he` (default `random`): how the layers A
    #: does not provide are initialised (the paper: random, N(0, init_std^2)).
    init: str | dict[str, str] = "random"
    #: Epoch budget of this net (None: train.max_epochs).
    epochs: int | None = None
    #: Plateau patience of this net's lr schedule (None: train.lr_patience).
    lr_patience: int | None = None
    #: Import released weights instead of training: a path or URI of a torchvision
    #: VGG state_dict (e.g. vgg16 for arch D). No training epochs run.
    weights: str | None = None

    @property
    def init_source(self) -> str | None:
        """The train stage this net is initialised from, if any."""
        if not isinstance(self.init, dict):
            return None
        return self.init.get("from_A", self.init.get("full"))

    @property
    def random_init(self) -> str:
        """How the layers not copied from a source net are initialised: normal or glorot."""
        if isinstance(self.init, dict):
            return self.init.get("rest") if self.init.get("rest") in ("glorot", "he") else "normal"
        return "glorot" if self.init == "glorot" else "normal"


@dataclass
class TrainConfig:
    """The training recipe (paper section 3.1) and how it runs on Ray Train."""

    #: Global mini-batch (the paper: 256), split across the workers.
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dropout: float = 0.5
    #: Multiplier on every conv/FC width (1.0 = the paper; small values for CPU runs).
    width: float = 1.0
    #: Random init std (the paper's text says "10^-2 variance", i.e. std 0.1; the
    #: released Caffe models and torchvision use std 0.01, the default here).
    init_std: float = 0.01
    batch_norm: bool = False
    #: Epoch budget (the paper stopped after 74 epochs).
    max_epochs: int = 74
    #: The lr is multiplied by lr_factor when the validation accuracy has not
    #: improved by more than lr_threshold for lr_patience epochs, at most max_lr_drops times.
    lr_factor: float = 0.1
    lr_patience: int = 2
    lr_threshold: float = 1e-3
    max_lr_drops: int = 3
    #: Ray Train: workers, GPUs, CPUs per worker (leave CPUs for DALI), restarts.
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    #: Checkpoints kept: the best N by validation top-1 accuracy, plus the latest.
    keep_checkpoints: int = 2
    #: bf16 autocast and channels_last memory layout: true, false, or "auto" (the default):
    #: bf16 where the device runs it natively (CUDA with bf16; a CPU with AMX or
    #: AVX512-BF16), channels_last on CUDA and CPUs (`vgg.training.steps.Precision.choose`).
    bf16: bool | Literal["auto"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    #: torch.compile the training net (GPU speed; minutes of compilation first, so off by
    #: default and not worth it on a CPU). Checkpoints load either way.
    compile: bool = False
    seed: int = 0
    #: Step metrics (step_loss, step_lr, step_images_per_s; step = the global step) into
    #: MLflow every this many steps; 0: none. (Progress lines come every 10 s regardless.)
    log_every: int = 50
    #: The plan: net name -> NetPlan. Stage ids are train/<name>.
    nets: dict[str, NetPlan] = field(default_factory=dict)


@dataclass
class EvaluateConfig:
    """Testing (paper section 3.2): dense, multi-crop, both; single and multi-scale."""

    #: Multi-crop grid g x g (the paper: 5) and flips (x2).
    grid: int = 5
    flips: bool = True
    #: Test scales. None: the paper's rule — single Q = S (mid-range for jittered);
    #: multi {S-32, S, S+32} for fixed S, {Smin, (Smin+Smax)/2, Smax} for jittered.
    q_single: int | None = None
    q_multi: list[int] | None = None
    #: Max-pool output sizes in dense evaluation: "ceil" (Caffe's, which the authors used:
    #: no border of an image whose sides are not multiples of 32 is lost) or "floor"
    #: (PyTorch's default). Identical at multiples of 32; see the README for both measured.
    pool_rounding: Literal["ceil", "floor"] = "ceil"
    #: Images per batch (dense batches group images of equal size).
    batch_size: int = 32
    #: Evaluate in this many Ray tasks (one per GPU when there are GPUs).
    num_workers: int = 1
    use_gpu: bool = False
    #: bf16 autocast, channels_last and torch.compile, as train.bf16 / channels_last / compile
    #: (posteriors are computed in float32 from the bf16 scores); "auto" as train's.
    bf16: bool | Literal["auto"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool = False
    cpus_per_worker: float = 1.0
    #: Only these nets (None: every net of train.nets).
    nets: list[str] | None = None


@dataclass
class FuseConfig:
    """Softmax fusion (paper section 4.4): members are "net:mode" strings, where mode is
    method@scales with method dense | multi-crop | multi-crop+dense and scales single | multi."""

    members: list[str] = field(default_factory=list)


@dataclass
class ReportConfig:
    """The report: Tables 3-6 with bootstrap intervals and the paper's claims judged."""

    #: Bootstrap resamples of the validation images, for every interval.
    bootstrap_samples: int = 1000
    #: Coverage of the intervals.
    confidence: float = 0.95
    seed: int = 0
    #: The evaluation mode (method@scales) nets are compared in for claims 1-3 (LRN,
    #: depth, jittering). The paper's Table 3: dense@single. At small crops the dense
    #: mode can be distorted (README, "Results you can trust"): where some healthy net's
    #: dense and multi-crop errors at these test scales differ by more than 3 points (the
    #: whole interval; `vgg.results.claims.DENSE_DISTORTION_BOUND`), the report says so and
    #: judges claims 1-3 in multi-crop at the same scales instead (a dense or
    #: multi-crop+dense mode moves to multi-crop@<scales>); claims 4-5's comparisons that
    #: use dense there are "not testable (dense distorted at crop N)".
    compare_mode: str = "dense@single"


@dataclass
class ExperimentConfig:
    """An experiment: the data, the augmentation, the training plan, the testing, the fusion
    and the report (the paper's Sec. 3-4)."""

    data: DataConfig = field(default_factory=DataConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


#: Top-level keys of the workflow's config files (`pipeline.config.PipelineConfig`) that a
#: run of the library alone (`load_experiment`) ignores: where the workflow keeps its outputs,
#: how it runs and tracks them.
WORKFLOW_KEYS = ("work_dir", "experiment", "pipeline", "mlflow", "ray")


# ---------------------------------------------------------------- checks


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


#: Net names become stage ids (train/<name>), folder names and MLflow keys: letters,
#: digits, "_", "-" and ".", starting with a letter or digit.
NET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def _check_seeds(obj: Any, prefix: str = "") -> None:
    """Every `seed` of the config is a non-negative integer (numpy's seeds are)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), _join(prefix, f.name)
        if dataclasses.is_dataclass(value):
            _check_seeds(value, key)
        elif f.name == "seed":
            _check(value >= 0, key, f"must be >= 0, got {value}")


def validate_experiment(cfg: ExperimentConfig) -> None:
    """Cross-field checks: impossible values fail here, before anything runs."""
    _check_seeds(cfg)
    d = cfg.data.demo
    _check(d.num_classes >= 2, "data.demo.num_classes", f"must be >= 2, got {d.num_classes}")
    _check(d.train_per_class >= 1, "data.demo.train_per_class", "must be >= 1")
    _check(d.val_per_class >= 1, "data.demo.val_per_class", "must be >= 1")
    _check(d.min_side >= 8, "data.demo.min_side", f"must be >= 8, got {d.min_side}")
    _check(
        d.max_side >= d.min_side,
        "data.demo.max_side",
        f"must be >= data.demo.min_side ({d.min_side}), got {d.max_side}",
    )
    layouts = get_args(typing.get_type_hints(DataConfig)["layout"])
    _check(cfg.data.layout in layouts, "data.layout", f"must be one of {list(layouts)}, got {cfg.data.layout!r}")
    _check(cfg.data.layout == "folders" or cfg.data.root is not None, "data.layout",
           f"{cfg.data.layout} needs data.root (without it the generated demo set, an image folder, is used)")
    for split in ("train", "val"):
        n = getattr(cfg.data, f"{split}_per_class")
        _check(n is None or n >= 1, f"data.{split}_per_class", f"must be >= 1 (or null: all images), got {n}")
    s = cfg.shard
    _check(s.rows_per_shard >= 1, "shard.rows_per_shard", f"must be >= 1, got {s.rows_per_shard}")
    _check(1 <= s.jpeg_quality <= 100, "shard.jpeg_quality", f"must be in [1, 100], got {s.jpeg_quality}")
    a = cfg.augment
    _check(a.crop >= 32 and a.crop % 32 == 0, "augment.crop", f"must be a multiple of 32 (five 2x2 pools), got {a.crop}")
    _check(a.color_noise_std >= 0, "augment.color_noise_std", "must be >= 0")
    _check(a.num_threads >= 1, "augment.num_threads", "must be >= 1")
    _check(a.prefetch >= 1, "augment.prefetch", f"must be >= 1, got {a.prefetch}")
    _check(a.check_batches >= 1, "augment.check_batches", "must be >= 1")
    _check(a.check_batch_size >= 1, "augment.check_batch_size", "must be >= 1")
    if a.check_scale is not None:
        _check_scale(a.check_scale, a.crop, "augment.check_scale")
    _validate_train(cfg)
    _validate_evaluate(cfg)
    r = cfg.report
    _check(r.bootstrap_samples >= 100, "report.bootstrap_samples", f"must be >= 100, got {r.bootstrap_samples}")
    _check(0.5 <= r.confidence < 1, "report.confidence", f"must be in [0.5, 1), got {r.confidence}")
    try:
        parse_mode(r.compare_mode)
    except ValueError as e:
        raise ConfigError(f"report.compare_mode: {e}") from None




def _validate_train(cfg: ExperimentConfig) -> None:
    t = cfg.train
    for key, v in (("batch_size", t.batch_size), ("max_epochs", t.max_epochs), ("num_workers", t.num_workers)):
        _check(v >= 1, f"train.{key}", f"must be >= 1, got {v}")
    _check(t.batch_size % t.num_workers == 0, "train.batch_size", f"must be a multiple of train.num_workers ({t.num_workers}): the global batch is split evenly, got {t.batch_size}")
    _check(0 < t.width <= 4, "train.width", f"must be in (0, 4], got {t.width}")
    _check(0 <= t.dropout < 1, "train.dropout", "must be in [0, 1)")
    _check(0 <= t.momentum < 1, "train.momentum", f"must be in [0, 1), got {t.momentum}")
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _check(t.init_std > 0, "train.init_std", f"must be > 0, got {t.init_std}")
    _check(t.cpus_per_worker > 0, "train.cpus_per_worker", f"must be > 0, got {t.cpus_per_worker}")
    _check(t.lr_threshold >= 0, "train.lr_threshold", f"must be >= 0, got {t.lr_threshold}")
    _check(t.log_every >= 0, "train.log_every", f"must be >= 0 (0: no step metrics), got {t.log_every}")
    _check(0 < t.lr_factor < 1, "train.lr_factor", "must be in (0, 1)")
    _check(t.max_lr_drops >= 0 and t.lr_patience >= 1, "train.lr_patience", "must be >= 1 (and max_lr_drops >= 0)")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _check(t.max_failures >= 0, "train.max_failures", "must be >= 0")
    for name, net in t.nets.items():
        key = f"train.nets.{name}"
        _check(NET_NAME.fullmatch(name) is not None, key,
               f"net names are letters, digits, '_', '-' and '.', starting with a letter or digit "
               f"(they become stage ids, folder names and MLflow keys), got {name!r}")
        _check(net.arch in ARCHS, f"{key}.arch", f"must be one of {list(ARCHS)}, got {net.arch!r}")
        _check_scale(net.scale, cfg.augment.crop, f"{key}.scale")
        _check(net.lr > 0, f"{key}.lr", "must be > 0")
        if net.epochs is not None:
            _check(net.epochs >= 0, f"{key}.epochs", "must be >= 0")
        if net.lr_patience is not None:
            _check(net.lr_patience >= 1, f"{key}.lr_patience", "must be >= 1")
        if isinstance(net.init, str):
            _check(net.init in ("random", "glorot"), f"{key}.init", f"must be random, glorot, {{from_A: train/<net>}} or {{full: train/<net>}}, got {net.init!r}")
        else:
            kinds = [k for k in net.init if k in ("from_A", "full")]
            _check(len(kinds) == 1 and set(net.init) <= {"from_A", "full", "rest"}, f"{key}.init", f"must be {{from_A: train/<net>}} (optionally with rest: random|glorot) or {{full: train/<net>}}, got {net.init}")
            _check("rest" not in net.init or (kinds == ["from_A"] and net.init["rest"] in ("random", "glorot", "he")), f"{key}.init.rest", f"must be random, glorot or he, and only with from_A, got {net.init}")
            src = net.init_source
            _check(src.startswith("train/") and src[6:] in t.nets, f"{key}.init", f"{src!r} is not a train stage of this plan (train/<net> with <net> in train.nets)")
            _check(src[6:] != name, f"{key}.init", "a net cannot be initialised from itself")
            other = t.nets[src[6:]]
            if "full" in net.init:
                _check(other.arch == net.arch, f"{key}.init", f"full init needs the same architecture: {src} is {other.arch}, this net is {net.arch}")
            else:
                _check(other.arch == "A", f"{key}.init", f"from_A needs an A net as the source, {src} is {other.arch}")
        if net.weights is not None:
            _check(net.init == "random", f"{key}.weights", "imported weights exclude init")
    _check_acyclic(t.nets)


def _check_acyclic(nets: dict[str, NetPlan]) -> None:
    for name in nets:
        seen, cur = {name}, nets[name].init_source
        while cur is not None:
            cur = cur[6:]
            _check(cur not in seen, f"train.nets.{name}.init", "the init chain has a cycle")
            seen.add(cur)
            cur = nets[cur].init_source


def _validate_evaluate(cfg: ExperimentConfig) -> None:
    e = cfg.evaluate
    crop = cfg.augment.crop
    _check(e.grid >= 1, "evaluate.grid", "must be >= 1")
    _check(e.batch_size >= 1 and e.num_workers >= 1, "evaluate.batch_size", "batch_size and num_workers must be >= 1")
    _check(e.cpus_per_worker > 0, "evaluate.cpus_per_worker", f"must be > 0, got {e.cpus_per_worker}")
    if e.q_single is not None:
        _check(e.q_single >= crop, "evaluate.q_single", f"must be >= augment.crop ({crop})")
    if e.q_multi is not None:
        _check(len(set(e.q_multi)) >= 2 and min(e.q_multi) >= crop, "evaluate.q_multi", f"needs at least 2 distinct Q, every Q >= augment.crop ({crop}), got {e.q_multi}")
    for n in e.nets or []:
        _check(n in cfg.train.nets, "evaluate.nets", f"{n!r} is not in train.nets ({', '.join(cfg.train.nets)})")
    evaluated = e.nets if e.nets is not None else list(cfg.train.nets)
    _check(len(set(cfg.fuse.members)) == len(cfg.fuse.members), "fuse.members", f"repeated members in {cfg.fuse.members}")
    for m in cfg.fuse.members:
        try:
            net, _ = parse_member(m)
        except ValueError as e:
            raise ConfigError(f"fuse.members: {e}") from None
        _check(net in cfg.train.nets, "fuse.members", f"{m!r}: net {net!r} is not in train.nets")
        _check(net in evaluated, "fuse.members", f"{m!r}: net {net!r} is not evaluated (evaluate.nets = {evaluated})")


def _check_scale(scale: int | list[int], crop: int, key: str) -> tuple[int, int]:
    """A training scale S or [Smin, Smax] (vgg.paper.parse_scale)."""
    try:
        return parse_scale(scale, crop, "augment.crop")
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def check_scale_of(a: AugmentConfig) -> tuple[int, int]:
    """The [Smin, Smax] used by the augment stage's checks: the paper's [256, 512] at the crop."""
    if a.check_scale is not None:
        return tuple(a.check_scale)  # type: ignore[return-value]
    return jitter_at(a.crop)


# ---------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


MISSING = "???"  # a value the user must supply (e.g. data.root in configs/cifar10.yaml)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (dataclasses built)."""
    if isinstance(value, str) and value == MISSING:
        raise ConfigError(f"{key}: required value is missing (give it with --set {key}=...)")
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            _check(type(None) in args, key, "must not be null")
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        _check(value in get_args(tp), key, f"must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        _check(isinstance(value, (list, tuple)), key, f"expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            _check(len(value) == len(args), key, f"expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__} {value!r}")
        _, vt = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if value is None:
        raise ConfigError(f"{key}: must not be null (expected {_type_name(tp)})")
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, key, f"expected a number, got {type(value).__name__} {value!r}")
        _check(math.isfinite(value), key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    """Build dataclass `cls` from mapping `raw`, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{_join(prefix, str(k))}: unknown key (known keys here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required value is missing")
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', value parsed as a YAML scalar/list)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text}: empty key")
    try:
        value = _yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
    return key, value


def apply_override(raw: dict, key: str, value: Any) -> None:
    """Set a dotted key inside a raw (not yet typed) config mapping."""
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a mapping")
        node = child
    node[parts[-1]] = value




C = TypeVar("C")


def load_yaml(path: str | os.PathLike, overrides: list[str] | tuple[str, ...], cls: type[C],
              check: Callable[[C], None], ignore: tuple[str, ...] = ()) -> C:
    """Load the YAML file `path` into the dataclass `cls`, apply `--set` overrides, run
    `check`; top-level keys in `ignore` are dropped. Raises ConfigError naming file and key."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{source}: config file not found")
    try:
        raw = _yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    if overrides:
        source += " (with --set " + " ".join(overrides) + ")"
    try:
        for text in overrides:
            apply_override(raw, *parse_override(text))
        cfg = _build(cls, {k: v for k, v in raw.items() if k not in ignore}, "")
        check(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_experiment(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """An experiment from a config file of the workflow's format (its WORKFLOW_KEYS ignored)."""
    return load_yaml(path, overrides, ExperimentConfig, validate_experiment, ignore=WORKFLOW_KEYS)


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain JSON-able structure (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = _join(prefix, str(k))
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
