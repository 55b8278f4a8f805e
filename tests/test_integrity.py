"""Integrity (issue 25): a damaged file, an unusable work_dir or a bad name never blocks a
rerun, never costs finished work, and always ends in one line that names the fix.

Fast: the runner runs only the fuse and report stages (no Ray), on upstream outputs
published here with hand-made posteriors; the Store, the registry and the CLI directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, load_config, to_dict
from pipeline.dag import build_dag, cache_key
from pipeline.runner import PipelineError, run_pipeline
from pipeline.storage import DamagedOutput, Store, file_records, write_bytes
from tests.conftest import DEMO, ROOT, TINY

MEMBERS = 'fuse.members=["A:dense@multi","D:multi-crop+dense@multi"]'


def _one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err, err
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


# ------------------------------------------------------------------ work_dir (item 3)


@pytest.fixture
def no_ray(monkeypatch) -> list:
    """The calls to `pipeline.runner.connect_ray` (connecting to Ray, or starting a local
    Ray): a check that fails before Ray leaves this list empty (whatever Ray instance an
    earlier test of this process started)."""
    from pipeline import runner

    calls: list = []
    real = runner.connect_ray
    monkeypatch.setattr(runner, "connect_ray", lambda cfg: calls.append(cfg) or real(cfg))
    return calls


def _unusable(tmp_path, what: str) -> str:
    f = tmp_path / "a-file"
    f.write_text("x")
    return str(f) if what == "file" else str(f / "sub")


@pytest.mark.parametrize("what", ["file", "through a file"])
def test_a_work_dir_that_is_or_goes_through_a_file_fails_in_one_line_before_ray(tmp_path, capsys, what,
                                                                               no_ray):
    work = _unusable(tmp_path, what)
    db = tmp_path / "elsewhere.db"  # a SQLite store elsewhere: Ray used to start first
    assert main(["--set", f"work_dir={work}", f"mlflow.tracking_uri=sqlite:///{db}", *TINY,
                 "--stage", "shard"]) == 2
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert line.startswith(f"error: work_dir {work} ") and "not a directory" in line
    assert "Starting a local Ray" not in err and not no_ray and not db.exists()
    assert main(["--set", f"work_dir={work}", "--list"]) == 2  # --list says the same
    assert "not a directory" in _one_error_line(capsys.readouterr().err)


@pytest.fixture
def read_only(tmp_path):
    """A read-only tmpfs (root and mount rights needed; skipped otherwise)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("sub", ["", "work"])
def test_a_read_only_work_dir_fails_in_one_line_before_ray(read_only, capsys, sub):
    work = str(read_only / sub) if sub else str(read_only)
    assert main(["--set", f"work_dir={work}", *TINY, "--stage", "shard"]) == 2
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert line.startswith(f"error: work_dir {work} is not writable (Read-only file system")
    assert ".write-check-" not in line and "Starting a local Ray" not in err


# ------------------------------------------------------------------ names (item 4)


@pytest.mark.parametrize("override, key, says", [
    ('experiment="vgg\\0demo"', "experiment", "control character: 'vgg\\x00demo'"),
    ('experiment="vgg\\x1b[2Jdemo"', "experiment", "control character"),
    ("experiment=team/vgg", "experiment", "'team/vgg-best-net' contains '/'"),
    ("experiment=vgg:1", "experiment", "contains ':'"),
    ("experiment=..vgg", "experiment", "must not start with '..'"),
    ("mlflow.registered_model=a/b", "mlflow.registered_model", "contains '/'"),
    ('mlflow.registered_model="best\\tnet"', "mlflow.registered_model", "control character"),
    ("experiment=" + "x" * 501, "experiment", "MLflow allows 500"),
])
def test_names_mlflow_refuses_fail_at_load_naming_the_key(override, key, says):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [override])
    assert f": {key}: " in str(e.value) and says in str(e.value)


def test_names_mlflow_accepts_load():
    # an experiment name may hold "/" (MLflow allows it) when the registered model has its own name
    cfg = load_config(DEMO, ["experiment=team/vgg", "mlflow.registered_model=vgg-best"])
    assert (cfg.experiment, cfg.mlflow.registered_model) == ("team/vgg", "vgg-best")
    assert load_config(DEMO, ["experiment=vgg demo (2)"]).experiment == "vgg demo (2)"


def test_a_control_character_is_never_printed_raw(tmp_path, capsys):
    assert main(["--set", f"work_dir={tmp_path}", 'experiment="a\\0b\\x1b[31m"', "--stage", "shard"]) == 2
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert "\x00" not in err and "\x1b" not in err and "experiment: contains a control character" in line


# ------------------------------------------------------------------ a work_dir with hand-made upstream outputs


def _publish(store: Store, sid: str, key: str, section, write=None) -> None:
    tmp = store.begin(sid, key)
    from pipeline.storage import write_json

    write_json(tmp.fs, tmp.join("config.json"), to_dict(section))
    if write is not None:
        write(tmp)
    store.publish(tmp, {"stage_id": sid, "cache_key": key, "mlflow_run_id": "", "package_version": "test"})


def _fake_evaluation(out, name: str, plan, seed: int) -> None:
    """evaluate/<net> files as the stage writes them, from random posteriors."""
    from pipeline.config import EvaluateConfig
    from vgg.artifacts import write_evaluation
    from vgg.evaluation.shares import combine_modes, eval_rows, q_sets
    from vgg.paper import BASE_METHODS
    from vgg.results.metrics import Posteriors, health

    classes = ["a", "b", "c"]
    keys = [f"val/{c}/{i:03d}.jpg" for c in classes for i in range(4)]
    labels = [classes.index(k.split("/")[1]) for k in keys]
    rng = np.random.default_rng(seed)

    def post():
        logits = rng.normal(size=(len(keys), len(classes))) * 2
        logits[np.arange(len(keys)), labels] += 1.5
        p = np.exp(logits)
        return Posteriors(keys, labels, p / p.sum(1, keepdims=True), classes)

    q_single, q_multi = q_sets(plan.scale, 32, EvaluateConfig())
    per_q = {(m, q): post() for m in BASE_METHODS for q in {q_single, *q_multi}}
    modes = combine_modes(per_q, q_single, q_multi)
    rows = eval_rows(modes, name, plan, {"single": [q_single], "multi": q_multi})
    write_evaluation(out, modes, rows, health(modes["dense@single"]))


def _upstream(cfg) -> Store:
    """Every stage before fuse published (under this config's keys), evaluations with posteriors."""
    store = Store(cfg.work_dir)
    keys: dict[str, str] = {}
    for i, (sid, spec) in enumerate(build_dag(cfg).items()):
        keys[sid] = cache_key(spec, keys)
        if spec.kind in ("fuse", "report"):
            continue
        write = None
        if spec.kind == "train":  # stands for the weights (evaluate/<net> is not run here)
            write = lambda out: write_bytes(out.fs, out.join("model.pt"), bytes(range(256)) * 64)  # noqa: E731
        if spec.kind == "evaluate":
            write = lambda out, s=spec, i=i: _fake_evaluation(out, s.section.name, s.section.net, i)  # noqa: E731
        _publish(store, sid, keys[sid], spec.section, write)
    return store


@pytest.fixture
def fused(work_dir):
    """A work_dir whose upstream outputs exist, after `--stage fuse report` ran once."""
    over = [f"work_dir={work_dir}", *TINY, MEMBERS]
    cfg = load_config(DEMO, over)
    store = _upstream(cfg)
    run = run_pipeline(cfg, ["fuse", "report"])
    assert [r.status for r in run.records] == ["ran", "ran"]
    return cfg, over, store


def _posteriors(store: Store, net: str, mode: str = "dense@multi") -> str:
    return store.latest(f"evaluate/{net}").join("posteriors", f"{mode}.parquet")


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _scramble(path: str) -> None:
    """Same size, other content (a flipped block: only the hash tells)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xff" * 64)


# ------------------------------------------------------------------ damaged outputs (item 1)


def test_the_marker_records_every_file_and_reuse_checks_sizes_and_hashes(tmp_path):
    store = Store(str(tmp_path / "w"))
    tmp = store.begin("s", "k")
    write_bytes(tmp.fs, tmp.join("a.bin"), b"x" * 1000)
    write_bytes(tmp.fs, tmp.join("sub", "b.bin"), b"y" * 10)
    out = store.publish(tmp, {"stage_id": "s"})
    files = out.marker["files"]
    on_disk = file_records(out.fs, out.path)
    assert set(files) == {"a.bin", "sub/b.bin"} and files == {k: on_disk[k] for k in files}
    assert files["a.bin"]["size"] == 1000 and len(files["a.bin"]["sha256"]) == 64
    assert store.damage("s", "k") is None and store.damage("s", "k", hashes=True) is None
    _scramble(out.join("a.bin"))
    assert store.damage("s", "k") is None  # sizes alone cannot tell
    bad = store.damage("s", "k", hashes=True)
    assert bad.file_uri == out.join("a.bin") and "sha256 differs" in bad.why
    os.remove(out.join("sub", "b.bin"))
    assert str(store.damage("s", "k")) == f"{out.join('sub', 'b.bin')} is missing"
    with open(out.join("_SUCCESS.json"), "r+b") as f:
        f.truncate(7)
    assert "cannot be read" in str(store.damage("s", "k"))


def test_a_damaged_output_is_named_and_redone_by_a_plain_rerun(fused, capsys):
    cfg, _, store = fused
    fused_file = store.latest("fuse").join("posteriors", "fused.parquet")
    size = os.path.getsize(fused_file)
    _truncate(fused_file)
    capsys.readouterr()
    run = run_pipeline(cfg, ["fuse", "report"])
    err = capsys.readouterr().err
    assert run.status_of("fuse") == "ran" and run.status_of("report") == "reused"
    assert [x for x in err.splitlines() if "damaged output" in x] == [
        f"  [fuse] damaged output: {fused_file} is {size // 2} bytes, {size} when it was published; "
        "redoing the stage"]
    assert store.damage("fuse", store.latest("fuse").key) is None  # repaired
    again = run_pipeline(cfg, ["fuse", "report"])
    assert [r.status for r in again.records] == ["reused", "reused"]


def test_a_damaged_upstream_output_stops_a_stage_run_alone_naming_file_and_command(fused, capsys):
    cfg, over, store = fused
    path = _posteriors(store, "A")
    _truncate(path)
    hint = ["--config", "configs/demo.yaml", "--set", *over]
    for stage, force in (("fuse", True), ("report", True), ("fuse", False)):
        with pytest.raises(PipelineError) as e:
            run_pipeline(cfg, [stage], force=force, hint=hint)
        msg = str(e.value)
        assert f"needs the output of evaluate/A, which is damaged: {path} is " in msg
        assert "redo it with `python pipeline/run.py --config configs/demo.yaml --set work_dir=" in msg
        assert " --stage evaluate/A` (a run without --force redoes damaged outputs" in msg and "\n" not in msg
    # on the command line: one line, exit 2, no traceback
    capsys.readouterr()
    assert main(["--set", *over, "--stage", "fuse", "--force"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert path in line and "--stage evaluate/A`" in line


def test_damaged_weights_stop_an_evaluation_run_alone_before_anything_starts(fused, capsys, no_ray):
    cfg, over, store = fused
    model = store.latest("train/A").join("model.pt")
    _truncate(model)
    capsys.readouterr()
    assert main(["--set", *over, "--stage", "evaluate/A", "--force"]) == 2
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert f"evaluate/A needs the output of train/A, which is damaged: {model} is 8192 bytes, 16384 " in line
    assert "--stage train/A` (a run without --force" in line and not no_ray


def test_a_same_size_damage_is_named_when_read_and_caught_before_with_verify(fused, capsys):
    cfg, over, store = fused
    path = _posteriors(store, "A")
    _scramble(path)
    # sizes match: the stage reads it, fails, and the failure names the file (hashes compared)
    capsys.readouterr()
    assert main(["--set", *over, "--stage", "fuse", "--force"]) == 2
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert f"fuse could not read its input: {path} has other content than when it was published" in line
    assert "--stage evaluate/A --force`" in line and f"--set {over[0]}" in line
    assert "Traceback" not in err and "ArrowInvalid" not in err.replace(line, "")
    # --verify compares the hashes of what it reuses before anything runs
    with pytest.raises(PipelineError, match=r"evaluate/A, which is damaged: .*sha256 differs"):
        run_pipeline(cfg, ["fuse"], force=True, verify=True)


def test_fuse_names_a_damaged_posteriors_file_outside_the_runner(tmp_path):
    from tests.test_fuse import fake_evaluate, fuse

    nets = {"a": fake_evaluate(tmp_path, "a", "D", 256, seed=1)}
    path = nets["a"].out.join("posteriors", "dense@multi.parquet")
    _truncate(path)
    with pytest.raises(DamagedOutput, match=rf"cannot read the posteriors file {path}: ArrowInvalid.*"
                                            r"redo it with --stage evaluate/a --force"):
        fuse(tmp_path, ["a:dense@multi"], nets)


def test_list_says_damaged(fused, capsys):
    cfg, over, store = fused
    _truncate(_posteriors(store, "D"))
    capsys.readouterr()
    assert main(["--set", *over, "--list"]) == 0
    rows = {x.split()[0]: x.split()[1] for x in capsys.readouterr().out.splitlines()[1:] if x.strip()
            and not x.startswith(("critical", "expected"))}
    assert rows["evaluate/D"] == "damaged" and rows["evaluate/A"] == "done"


# ------------------------------------------------------------------ hints and notes (item 5)


def test_the_missing_upstream_hint_repeats_the_users_config_and_set(tmp_path, capsys):
    args = ["--config", str(DEMO), "--set", f"work_dir={tmp_path / 'w'}", "train.max_epochs=3", "--stage", "fuse"]
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert (f"`python pipeline/run.py --config {DEMO} --set work_dir={tmp_path / 'w'} train.max_epochs=3 "
            "--stage shard augment train/A") in line


def test_a_stage_run_alone_on_outputs_of_another_config_says_which_keys_differ(fused, capsys):
    cfg, over, store = fused
    changed = load_config(DEMO, [*over, "train.nets.A.lr=0.02", "evaluate.grid=3"])
    capsys.readouterr()
    run = run_pipeline(changed, ["fuse"], force=True)
    assert run.status_of("fuse") == "ran"
    notes = [x for x in capsys.readouterr().err.splitlines() if x.startswith("note:")]
    assert len(notes) == 1
    note = notes[0]
    assert note.startswith("note: fuse runs on upstream outputs made under another config than this one:")
    assert "evaluate/A (evaluate.grid: 5 -> 3, train.nets.A.lr: 0.005 -> 0.02)" in note
    assert "train/A (train.nets.A.lr: 0.005 -> 0.02)" in note and "evaluate/D (evaluate.grid: 5 -> 3)" in note
    capsys.readouterr()
    run_pipeline(cfg, ["fuse"], force=True)  # the same config: nothing to say
    assert "note:" not in capsys.readouterr().err


def test_the_lost_server_line_states_the_wait_it_measured():
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.runner import _free_port

    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens: connections are refused
    with tracking.environment(tracking.http_retry_env(120)):
        t0 = time.monotonic()
        with pytest.raises(Exception) as e:
            MlflowClient(uri).get_experiment_by_name("x")
        waited = time.monotonic() - t0
    assert tracking.lost_server(e.value)
    said = tracking.lost_wait(e.value, 120)
    assert said.startswith("it refused connections: each MLflow call gave up after 3 retries, about 6 s")
    assert 4 < waited < 12  # not 120 s
    assert "timed out: each waited about 119 s" in tracking.lost_wait(TimeoutError("Read timed out"), 120)


def test_a_full_disk_is_named_even_when_mlflow_hits_it_first(tmp_path):
    import sqlalchemy.exc

    from pipeline.scheduler import failure_note

    e = sqlalchemy.exc.OperationalError("INSERT INTO metrics", {}, Exception("database or disk is full"))
    note = failure_note(e, str(tmp_path))
    assert note == f"no space left on the device holding {tmp_path} (MLflow's store reported it)"
    assert "database" not in note.split("(")[0]


# ------------------------------------------------------------------ left open earlier (item 6)


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    """A real write failure: the file size limit (RLIMIT_FSIZE, as a full quota) hit mid-write."""
    script = f"""
import resource, signal, os
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
import pyarrow.fs as pafs
from pipeline.storage import write_bytes
try:
    write_bytes(pafs.LocalFileSystem(), {str(tmp_path / 'out' / 'f.bin')!r}, b"x" * (1 << 20))
except OSError as e:
    print("failed:", e.errno)
print(sorted(os.listdir({str(tmp_path / 'out')!r})))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["failed: 27", "[]"]  # EFBIG, and nothing left behind


def test_fuse_refuses_a_repeated_member_built_in_code(tmp_path):
    from tests.test_fuse import fake_evaluate, fuse

    nets = {"a": fake_evaluate(tmp_path, "a", "D", 256, seed=1), "b": fake_evaluate(tmp_path, "b", "D", 256, seed=2)}
    with pytest.raises(ValueError, match=r"fuse.members: 'a:dense@multi' repeated"):
        fuse(tmp_path, ["a:dense@multi", "b:dense@multi", "a:dense@multi"], nets)


def test_two_invocations_registering_at_the_same_instant_leave_one_version(tmp_path, monkeypatch):
    """Both look for the net's version before either creates one (forced here: the lookup
    finds nothing), so both create one; one is kept, the same for both."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from pipeline import registry, tracking
    from pipeline.stage import NetToLog
    from vgg.models import build_vgg

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("race", artifact_location=f"file://{tmp_path}/artifacts")
    torch.manual_seed(0)
    net = build_vgg("A", num_classes=3, width=0.125, crop=32)
    with tracking.using_tracking_uri(uri):
        with mlflow.start_run(experiment_id=exp):
            example = np.zeros((1, 3, 32, 32), np.float32)
            model_id = tracking.log_net(NetToLog(net, example, {}, {}), None)
        monkeypatch.setattr(registry, "_version_of", lambda *a: None)  # both checked before either registered
        cand = registry.Candidate("A", model_id, 30.0, None, "data", "")
        first = registry.register_best(client, "race-best-net", [cand], None)
        second = registry.register_best(client, "race-best-net", [cand], None)
    versions = client.search_model_versions("name = 'race-best-net'")
    assert [v.version for v in versions] == [1] or [str(v.version) for v in versions] == ["1"]
    assert first.version == second.version == "1" and second.champion == "1"


# ================================================================== issue 30: the second pass


# ------------------------------------------------------------------ 1. --verify repairs what it finds


def test_verify_redoes_a_same_size_change_and_says_no_other_invocation(fused, capsys):
    cfg, _, store = fused
    key = store.latest("fuse").key
    _scramble(store.latest("fuse").join("posteriors", "fused.parquet"))
    capsys.readouterr()
    run = run_pipeline(cfg, ["fuse", "report"], verify=True)
    err = capsys.readouterr().err
    assert "(sha256 differs); redoing the stage" in err and "another invocation" not in err
    assert run.status_of("fuse") == "ran" and store.damage("fuse", key, hashes=True) is None  # repaired
    again = run_pipeline(cfg, ["fuse", "report"], verify=True)
    assert [r.status for r in again.records] == ["reused", "reused"]
    assert "damaged" not in capsys.readouterr().err


# ------------------------------------------------------------------ 2. every damaged upstream at once


def test_a_stage_run_alone_names_every_damaged_upstream_with_one_command_that_redoes_them(fused, capsys):
    import shlex

    from pipeline.cli import parser
    from pipeline.runner import damaged_outputs, plan_keys

    cfg, over, store = fused
    model, post = store.latest("train/A").join("model.pt"), _posteriors(store, "A")
    _truncate(model)
    _truncate(post)
    capsys.readouterr()
    assert main(["--set", *over, "--stage", "fuse"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: stage fuse needs the outputs of 2 stages: train/A, which is damaged: "
                           f"{model} is 8192 bytes, 16384 when it was published; evaluate/A, which is damaged: "
                           f"{post} is ")
    assert "a run without --force redoes damaged outputs" in line
    cmd = line.split("`")[1]
    assert cmd.endswith(" --stage train/A evaluate/A") and "--force" not in cmd
    # the command redoes both: its plan finds them damaged (and its own upstream intact)
    args = parser().parse_args(shlex.split(cmd)[2:])
    again = load_config(DEMO, args.overrides)
    dag = build_dag(again)
    keys = plan_keys(dag, store, args.stage)
    assert set(damaged_outputs(store, args.stage, keys, args.force, args.verify)) == {"train/A", "evaluate/A"}


def test_missing_upstream_outputs_are_named_together(tmp_path):
    cfg = load_config(DEMO, [f"work_dir={tmp_path / 'w'}", *TINY])
    with pytest.raises(PipelineError) as e:
        run_pipeline(cfg, ["train/A"], hint=["--set", f"work_dir={tmp_path / 'w'}"])
    msg = str(e.value)
    assert msg.startswith("stage train/A needs the outputs of 2 stages: shard, which has no completed output")
    assert "; augment, which has no completed output" in msg
    assert f"`python pipeline/run.py --set work_dir={tmp_path / 'w'} --stage shard augment`" in msg


# ------------------------------------------------------------------ 3. numbers in exponent form


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("5E-4", 5e-4), ("1e+2", 100.0), ("2.5E1", 25.0)])
def test_numbers_in_exponent_form_are_numbers_in_set_and_yaml_for_pipeline_and_ladder(tmp_path, text, value):
    from vgg.config import load_experiment

    cfg = load_config(DEMO, [f"train.nets.A.lr={text}", f"train.weight_decay={text}"])
    assert cfg.train.nets["A"].lr == value and cfg.train.weight_decay == value
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(DEMO.read_text().replace("lr: 0.005", f"lr: {text}", 1))
    assert f"lr: {text}" in yaml_file.read_text()
    assert load_config(yaml_file).train.nets["A"].lr == value
    exp = load_experiment(yaml_file, [f"train.weight_decay={text}"])  # the ladder's loader
    assert (exp.train.nets["A"].lr, exp.train.weight_decay) == (value, value)


def test_the_ladder_reads_exponent_numbers_and_a_non_number_is_named(tmp_path, capsys):
    from vgg import ladder

    assert ladder.main([str(DEMO), "--cost", "100", "10", "--set", "train.weight_decay=5E-4",
                        "train.nets.A.lr=1e-3"]) == 0
    assert "expected a number" not in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"train\.nets\.A\.lr: expected a number, got str 'abc'"):
        load_config(DEMO, ["train.nets.A.lr=abc"])
    assert main(["--set", "train.nets.A.lr=1e-3x", "--list"]) == 2
    assert "expected a number, got str '1e-3x'" in _one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------ 4. registry hygiene


@pytest.fixture
def logged_nets(tmp_path):
    """An MLflow store with the same net logged twice (two logged models, as a redo that
    republishes the same weights makes)."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.stage import NetToLog
    from vgg.models import build_vgg

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("reg", artifact_location=f"file://{tmp_path}/artifacts")
    ids = []
    with tracking.using_tracking_uri(uri):
        for seed in (0, 0):
            torch.manual_seed(seed)
            net = build_vgg("A", num_classes=3, width=0.0625, crop=32)
            with mlflow.start_run(experiment_id=exp):
                ids.append(tracking.log_net(NetToLog(net, np.zeros((1, 3, 32, 32), np.float32), {}, {}), None))
    return uri, client, ids


def test_the_registry_adds_a_version_only_for_another_model_pt_and_says_what_it_compared(logged_nets, capfd):
    from pipeline import registry
    from pipeline.tracking import using_tracking_uri

    uri, client, ids = logged_nets
    name = "reg-best-net"
    cand = lambda i, sha, top1: registry.Candidate("A", ids[i], top1, 20.0, "shardkey", "", sha)  # noqa: E731
    capfd.readouterr()
    with using_tracking_uri(uri):
        first = registry.register_best(client, name, [cand(0, "a" * 64, 30.0)], None)
        out = capfd.readouterr()
        assert "already exists" not in out.err + out.out and (first.version, first.new) == ("1", True)
        assert first.line() == (f"registered {name} v1; champion: v1 (no champion yet; v1: A, "
                                "dense@multi top-1 error 30.00%)")
        # a redo republished the same model.pt under a new logged model: no new version
        redo = registry.register_best(client, name, [cand(1, "a" * 64, 30.0)], None)
        assert (redo.version, redo.new, redo.moved) == ("1", False, False)
        assert redo.line().startswith(f"{name} v1 already holds this model.pt (no new version); champion: v1")
        better = registry.register_best(client, name, [cand(0, "b" * 64, 25.0)], None)  # another model.pt
    assert (better.version, better.new, better.champion) == ("2", True, "2")
    assert better.reason == ("v2 (A) beats v1 (A): dense@multi top-1 error 25.00% vs 30.00% on the same "
                             "validation data")
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] in (["2", "1"], ["1", "2"])


# ------------------------------------------------------------------ 5. one numbering of epochs


def test_every_epoch_message_counts_finished_epochs_as_the_progress_lines_do(tmp_path):
    import torch

    from pipeline.ray_train import MANIFEST_FILE, STATE_FILE, best_and_last
    from pipeline.storage import StageOutput
    from tests.test_loop import OPTS, Batches, state_of, tiny_net
    from vgg.training.loop import fit

    said: list[str] = []
    fit(state_of(tiny_net()), Batches(1), Batches(1, seed=1), OPTS, start=2, say=said.append)
    assert said[0].endswith("epochs 3..4 of 4") and [x.split(" loss")[0] for x in said[1:]] == [
        "epoch 3/4", "epoch 4/4"]
    said.clear()
    fit(state_of(tiny_net()), Batches(1), Batches(1, seed=1), OPTS, start=4, say=said.append)
    assert said == [said[0]] and said[0].endswith("all 4 epochs done, none left to train")
    # the best epoch's checkpoint is gone: the warning counts as the progress lines do
    run = tmp_path / "ray_train-1"
    for epoch, score in ((1, 0.4), (2, 0.3)):  # 0-based epochs 1 and 2: the 2nd and 3rd
        d = run / f"epoch_{epoch:04d}"
        d.mkdir(parents=True)
        data = __import__("io").BytesIO()
        torch.save({"epoch": epoch, "progress": {"best": {"epoch": 0}, "history": []}}, data)
        (d / STATE_FILE).write_bytes(data.getvalue())
        (d / MANIFEST_FILE).write_text(json.dumps({"bytes": len(data.getvalue()), "epoch": epoch, "val_top1_acc": score,
                                                   "sha256": __import__("hashlib").sha256(data.getvalue()).hexdigest()}))
    import pyarrow.fs as pafs

    logged: list[str] = []
    best_and_last(StageOutput("train/A", "k", pafs.LocalFileSystem(), str(tmp_path), str(tmp_path)), "ray_train-1",
                  logged.append)
    assert logged == ["WARNING: the checkpoint of the selected epoch 1 is gone; using epoch 2 (val top-1 acc "
                      "0.400), the best complete one left"]


# ------------------------------------------------------------------ 6. a failed stage's duration


def test_a_failed_stage_has_its_real_duration_in_the_summary(tmp_path, monkeypatch, capsys):
    from pipeline import scheduler
    from pipeline.cli import print_summary
    from pipeline.runner import PipelineRun

    cfg = load_config(DEMO, [f"work_dir={tmp_path}", *TINY])
    dag = build_dag(cfg)

    def slow_failure(job, in_task=False):
        time.sleep(0.3)
        raise RuntimeError("boom")

    monkeypatch.setattr(scheduler, "run_stage", slow_failure)
    outcome = scheduler.schedule(dag, ["shard", "augment"], lambda sid: sid, 1, use_ray=False,
                                 on_done=lambda sid: None)
    shard, augment = outcome.records
    assert shard.status == "failed" and 0.3 <= shard.seconds < 5
    assert shard.seconds == pytest.approx(shard.ended - shard.started)
    assert (augment.status, augment.seconds) == ("blocked", 0.0)
    print_summary(PipelineRun("r", "e", "sqlite:///x", outcome.records))
    row = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("shard"))
    assert row.split()[4] == f"{shard.seconds:.1f}" != "0.0"


# ------------------------------------------------------------------ 7. divergence advice


def test_the_divergence_line_names_the_key_to_lower_and_no_force(tmp_path):
    from stages.train import diverged_message

    cfg = load_config(DEMO, [f"work_dir={tmp_path}", "train.nets.A.lr=1000"])
    section = build_dag(cfg)["train/A"].section
    line = diverged_message("train/A", section, {"epoch": 2, "step": 31, "lr": 1000.0,
                                                 "reason": "training loss 9.7e+35 is above 16.1"})
    assert line.startswith("train/A: training diverged at epoch 2, step 31 (lr 1000): training loss 9.7e+35")
    assert "--force" not in line.replace("no --force needed", "")
    assert line.endswith("(train.nets.A.lr = 1000; e.g. --set train.nets.A.lr=100: another lr is another cache "
                         "key, so the stage trains afresh, no --force needed)")


# ------------------------------------------------------------------ 9. traceback files beside the run


def test_a_traceback_file_goes_under_the_work_dir_and_the_line_names_it(fused, capsys, tmp_path, monkeypatch):
    cfg, over, store = fused
    _scramble(_posteriors(store, "A"))
    temp = tmp_path / "system-temp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    capsys.readouterr()
    assert main(["--set", *over, "--stage", "fuse", "--force"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    path = line.split("(traceback: ")[1].split(";")[0]
    assert os.path.dirname(path) == os.path.join(cfg.work_dir, "logs") and "DamagedOutput" in open(path).read()
    assert not os.listdir(temp)
    # the work_dir is the problem (a full disk there): the system's temporary folder
    from pipeline.cli import _save_traceback

    assert os.path.dirname(_save_traceback(OSError(28, "No space left on device"), None)) == str(temp)


# ------------------------------------------------------------------ 8. a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root and mount rights needed; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _checkpoint(folder, epoch: int, payload: bytes = b"") -> None:
    """A complete checkpoint folder as the workers write it (state file and manifest)."""
    import hashlib
    import io

    import torch

    from pipeline.ray_train import MANIFEST_FILE, STATE_FILE

    folder.mkdir(parents=True)
    buf = io.BytesIO()
    torch.save({"epoch": epoch, "pad": payload}, buf)
    data = buf.getvalue()
    (folder / STATE_FILE).write_bytes(data)
    (folder / MANIFEST_FILE).write_text(json.dumps({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                                    "epoch": epoch, "val_top1_acc": 0.5}))


def _fill(path) -> OSError:
    """Write `path` until the disk is full; -> the real ENOSPC error."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            return e


def test_a_full_disk_stops_every_rank_without_retry_and_removes_only_the_partial_checkpoint(small_disk):
    from types import SimpleNamespace

    from pipeline.ray_train import OUTCOME_SUFFIX, DiskFullStop, stop_on_full_disk
    from pipeline.storage import disk_full

    run = small_disk / "ray_train-1"
    _checkpoint(run / "epoch_0000", 0)
    partial = run / "epoch_0001"
    partial.mkdir()

    def report(state, record):  # Ray Train's upload of the epoch's checkpoint, on a full disk
        raise _fill(partial / "state.pt")

    state = SimpleNamespace(epoch=1)
    with pytest.raises(DiskFullStop) as e:
        stop_on_full_disk(report, None)(state, {})
    assert disk_full(OSError(28, e.value.cause)) and "No space left on device" in e.value.cause
    facts = e.value.facts(SimpleNamespace(outcome_uri=str(run) + OUTCOME_SUFFIX))
    assert facts["epoch"] == 2 and "No space left" in facts["disk_full"]
    assert sorted(os.listdir(run)) == ["epoch_0000"]  # the partial one gone, the complete one kept

    def other(state, record):
        raise ValueError("not a disk")

    with pytest.raises(ValueError, match="not a disk"):  # anything else is raised as before (Ray retries)
        stop_on_full_disk(other, None)(state, {})


def test_a_full_disk_in_training_is_one_line_saying_the_space_needed(small_disk, tmp_path):
    import pyarrow.fs as pafs

    from pipeline.stage import StageContext, TrackingInfo
    from pipeline.storage import StageOutput, disk_full
    from stages.train import no_space
    from vgg.models import build_vgg

    scratch = small_disk / "scratch"
    _checkpoint(scratch / "ray_train-1" / "epoch_0002", 2, b"x" * 300_000)
    partial = scratch / "ray_train-2" / "epoch_0003"
    partial.mkdir(parents=True)
    assert disk_full(_fill(partial / "state.pt"))
    fs = pafs.LocalFileSystem()
    ctx = StageContext("train/A", StageOutput("train/A", "k", fs, str(tmp_path), str(tmp_path)), TrackingInfo("", "", ""),
                       "k", StageOutput("train/A", "k", fs, str(scratch), str(scratch)))
    cfg = load_config(DEMO, [f"work_dir={tmp_path}", "train.keep_checkpoints=2"])
    err = no_space(ctx, build_dag(cfg)["train/A"].section, build_vgg("A", num_classes=3, width=0.0625, crop=32))
    line = str(err)
    assert line.startswith(f"no space left on the device holding {scratch}: train/A needs about ")
    assert "(3 checkpoints of 0.3 MB, model.pt and its MLflow copy " in line and " free. Partial checkpoints removed" in line
    assert line.endswith("run the same command again: the rerun resumes after epoch 3") and "\n" not in line
    assert not partial.exists() and (scratch / "ray_train-1" / "epoch_0002" / "state.pt").exists()
    assert err.keep_traceback is False


def test_workers_lines_about_a_full_disk_are_hidden_the_rest_shown():
    from pipeline.console import LineFilter

    lines = LineFilter()
    data = {"pid": 7, "ip": "127.0.0.1"}
    for text in ("OSError: [Errno 28] No space left on device: '/w/stages/train/A/_scratch/k/ray_train-1'",
                 "2026-12-04 20:00:00,000 ERROR checkpoint upload failed: No space left on device",
                 "sqlite3.OperationalError: database or disk is full"):
        assert lines.kind(data, text) is None, text
    assert lines.kind(data, "RuntimeError: something else") == "trouble"
