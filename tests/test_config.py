"""Config loading: every problem fails before anything runs, naming the file and the key."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, PipelineConfig, load_config, to_dict
from tests.conftest import DEMO, ROOT


def write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_demo_config_loads_with_defaults():
    cfg = load_config(DEMO)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.work_dir == "./runs"
    assert cfg.data.root is None
    assert cfg.shard.rows_per_shard == 100


@pytest.mark.parametrize("name", ["demo.yaml", "cifar10.yaml", "cifar10_paper.yaml", "imagenet.yaml",
                                  "imagenette.yaml"])
def test_shipped_configs_load_in_both_entry_points(name):
    """The workflow (pipeline/run.py) and the library alone (python -m vgg.ladder) read the
    same file into the same experiment."""
    from vgg.config import load_experiment

    overrides = ["data.root=/data/x"] if name != "demo.yaml" else []
    cfg = load_config(ROOT / "configs" / name, overrides)
    assert cfg.experiment
    alone = load_experiment(ROOT / "configs" / name, overrides)
    assert all(getattr(alone, f) == getattr(cfg, f) for f in alone.__dataclass_fields__)


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "shard:\n  rows_per_shrd: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "shard.rows_per_shrd" in msg and "unknown key" in msg


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, "shard:\n  rows_per_shard: many\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: shard\.rows_per_shard: expected an integer"):
        load_config(p)


def test_bool_is_not_an_int(tmp_path):
    p = write(tmp_path, "shard:\n  rows_per_shard: true\n")
    with pytest.raises(ConfigError, match="shard.rows_per_shard"):
        load_config(p)


def test_missing_required_value(tmp_path):
    p = write(tmp_path, "data:\n  root: ???\n")
    with pytest.raises(ConfigError, match=r"data\.root: required value is missing"):
        load_config(p)
    assert load_config(p, ["data.root=/somewhere"]).data.root == "/somewhere"


def test_impossible_value(tmp_path):
    p = write(tmp_path, "data:\n  demo:\n    min_side: 64\n    max_side: 32\n")
    with pytest.raises(ConfigError, match=r"data\.demo\.max_side: must be >= data\.demo\.min_side"):
        load_config(p)


def test_set_overrides_are_type_checked():
    cfg = load_config(DEMO, ["shard.rows_per_shard=7", "experiment=x", "mlflow.tracking_uri=sqlite:///a.db"])
    assert cfg.shard.rows_per_shard == 7 and cfg.experiment == "x"
    assert cfg.mlflow.tracking_uri == "sqlite:///a.db"
    with pytest.raises(ConfigError, match=r"--set shard\.rows_per_shard=x\).*shard\.rows_per_shard: expected an integer"):
        load_config(DEMO, ["shard.rows_per_shard=x"])
    with pytest.raises(ConfigError, match="shard.nope: unknown key"):
        load_config(DEMO, ["shard.nope=1"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(DEMO, ["shard.rows_per_shard"])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/c.yaml")


def test_to_dict_roundtrip_is_plain():
    d = to_dict(load_config(DEMO))
    assert d["shard"]["rows_per_shard"] == 100 and isinstance(d["data"]["demo"], dict)


def test_crop_larger_than_smallest_scale(tmp_path):
    p = write(tmp_path, "augment:\n  crop: 64\n  check_scale: [48, 96]\n")
    with pytest.raises(ConfigError, match=r"augment\.check_scale: the crop \(augment\.crop = 64\) is larger than the smallest scale 48"):
        load_config(p)
    p = write(tmp_path, "augment:\n  crop: 32\n  check_scale: [64, 48]\n")
    with pytest.raises(ConfigError, match=r"Smin \(64\) must be <= Smax \(48\)"):
        load_config(p)
    p = write(tmp_path, "augment:\n  crop: 40\n")
    with pytest.raises(ConfigError, match="augment.crop: must be a multiple of 32"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"augment\.device: must be one of \['auto', 'cpu', 'gpu'\]"):
        load_config(DEMO, ["augment.device=tpu"])


PLAN = """augment: {crop: 32}
train:
  nets:
    A: {arch: A, scale: 40, init: glorot}
    B: {arch: B, scale: 40, init: %s}
    A2: {arch: A, scale: 40, init: {full: train/A}}
"""


@pytest.mark.parametrize("init, error", [
    ("{from_A: train/A}", None),
    ("{rest: glorot, from_A: train/A}", None),
    ("{from_A: train/A, rest: random}", None),
    ("{from_A: train/A, rest: he}", None),
    ("kaiming", r"train\.nets\.B\.init: must be random, glorot"),
    ("{from_A: train/A, full: train/A}", r"train\.nets\.B\.init: must be \{from_A"),
    ("{from_A: train/A, std: high}", r"train\.nets\.B\.init: must be \{from_A"),
    ("{from_A: train/A, rest: kaiming}", r"train\.nets\.B\.init\.rest: must be random, glorot or he"),
    ("{full: train/A, rest: glorot}", r"train\.nets\.B\.init\.rest: must be random, glorot or he, and only with from_A"),
    ("{from_A: train/B}", r"train\.nets\.B\.init: a net cannot be initialised from itself"),
    ("{from_A: train/A2}", None),
    ("{from_A: train/C}", r"train\.nets\.B\.init: 'train/C' is not a train stage of this plan"),
    ("{full: train/A}", r"train\.nets\.B\.init: full init needs the same architecture"),
])
def test_training_plan_init_is_validated(tmp_path, init, error):
    p = write(tmp_path, PLAN % init)
    if error is None:
        cfg = load_config(p, ["data.root=/x"])
        net = cfg.train.nets["B"]
        assert net.init_source == ("train/A2" if "A2" in init else "train/A")
        assert net.random_init == ("glorot" if "rest: glorot" in init else "he" if "rest: he" in init else "normal")
    else:
        with pytest.raises(ConfigError, match=error):
            load_config(p, ["data.root=/x"])


def test_from_a_needs_an_a_net_and_no_cycles(tmp_path):
    p = write(tmp_path, "augment: {crop: 32}\ntrain:\n  nets:\n    B: {arch: B, scale: 40, init: {from_A: train/C}}\n"
                        "    C: {arch: C, scale: 40, init: {full: train/C2}}\n"
                        "    C2: {arch: C, scale: 40, init: {full: train/C}}\n")
    with pytest.raises(ConfigError, match=r"train\.nets\.B\.init: from_A needs an A net as the source, train/C is C"):
        load_config(p, ["data.root=/x"])
    p = write(tmp_path, "augment: {crop: 32}\ntrain:\n  nets:\n    C: {arch: C, scale: 40, init: {full: train/C2}}\n"
                        "    C2: {arch: C, scale: 40, init: {full: train/C}}\n")
    with pytest.raises(ConfigError, match="the init chain has a cycle"):
        load_config(p, ["data.root=/x"])


def test_net_lr_patience_is_validated(tmp_path):
    p = write(tmp_path, "augment: {crop: 32}\ntrain:\n  nets:\n    A: {arch: A, scale: 40, lr_patience: 0}\n")
    with pytest.raises(ConfigError, match=r"train\.nets\.A\.lr_patience: must be >= 1"):
        load_config(p, ["data.root=/x"])


@pytest.mark.parametrize("override, key, what", [
    ("train.nets.A.lr=1.0e+1000", "train.nets.A.lr", "finite"),  # YAML reads it as inf
    ("train.nets.A.lr=.inf", "train.nets.A.lr", "finite"),
    ("train.nets.A.lr=.nan", "train.nets.A.lr", "finite"),
    ("train.nets.A.lr=0", "train.nets.A.lr", "> 0"),
    ("train.momentum=-0.5", "train.momentum", r"\[0, 1\)"),
    ("train.momentum=1.0", "train.momentum", r"\[0, 1\)"),
    ("train.weight_decay=-1.0e-4", "train.weight_decay", ">= 0"),
    ("train.cpus_per_worker=-1", "train.cpus_per_worker", "> 0"),
    ("evaluate.cpus_per_worker=0", "evaluate.cpus_per_worker", "> 0"),
    ("train.init_std=0", "train.init_std", "> 0"),
    ("shard.seed=-1", "shard.seed", ">= 0"),
    ("train.seed=-3", "train.seed", ">= 0"),
    ("data.demo.seed=-1", "data.demo.seed", ">= 0"),
    ("report.seed=-1", "report.seed", ">= 0"),
    ("augment.color_noise_std=.inf", "augment.color_noise_std", "finite"),
    ("data.train_per_class=0", "data.train_per_class", ">= 1"),
])
def test_bad_values_are_refused_at_load_time_naming_the_key(override, key, what):
    with pytest.raises(ConfigError, match=rf"{key.replace('.', chr(92) + '.')}: .*{what}"):
        load_config(DEMO, [override])


@pytest.mark.parametrize("name", ["A+jit", "..", ".", "a/b", "a:b", "D@1", "a b", "a\x00b", "-x", "ü"])
def test_net_names_must_work_as_stage_ids_paths_and_mlflow_keys(tmp_path, name):
    p = write(tmp_path, "train:\n  nets:\n    " + repr(name).replace("'", '"') + ": {arch: A, scale: 40}\n"
              "augment:\n  crop: 32\nevaluate:\n  nets: []\n")
    with pytest.raises(ConfigError, match=r"letters, digits"):
        load_config(p)
    assert load_config(write(tmp_path, "augment:\n  crop: 32\ntrain:\n  nets:\n    D-jit_2.b: {arch: A, scale: 40}\n"))
