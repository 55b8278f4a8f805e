"""Kubernetes: k8s/rayjob.yaml against KubeRay's own CRD schema, the Dockerfile's extras
against pyproject.toml, and the RayJob's entrypoint and runtime env through the Ray Jobs API
(`ray job submit`) against a Ray head started here, on 127.0.0.1."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY

#: KubeRay's rayjobs CRD, pinned (tests/data/README.md: release, source, checksum).
CRD = ROOT / "tests" / "data" / "ray.io_rayjobs.v1.7.0.yaml.gz"
CRD_SHA256 = "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5"
MANIFEST = ROOT / "k8s" / "rayjob.yaml"
FUSE_OVERLAY = ROOT / "k8s" / "fuse" / "kustomization.yaml"


def strict(schema: dict) -> dict:
    """A CRD's OpenAPI schema as kubectl's strict field validation reads it (kubectl's
    default since 1.27): an object with `properties` takes no other field unless it says so
    (`additionalProperties`, `x-kubernetes-preserve-unknown-fields`). Plain JSON Schema
    would accept any unknown field, so a misspelt key would pass."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    return s


@pytest.fixture(scope="module")
def rayjob_schema() -> dict:
    raw = gzip.decompress(CRD.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == CRD_SHA256, "tests/data's CRD is not the pinned release's"
    crd = yaml.safe_load(raw)
    assert crd["metadata"]["name"] == "rayjobs.ray.io"
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict(v1["schema"]["openAPIV3Schema"])


def documents(path: Path) -> dict[str, dict]:
    """kind -> document of a multi-document manifest."""
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def rayjob() -> dict:
    return documents(MANIFEST)["RayJob"]


def errors(schema: dict, doc: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc))


def fuse_rayjob() -> dict:
    """k8s/fuse's RayJob: the base manifest with the overlay's JSON patches applied (the
    `replace` operations kustomize applies; the overlay uses no other)."""
    overlay = yaml.safe_load(FUSE_OVERLAY.read_text())
    assert overlay["resources"] == [".."]
    assert yaml.safe_load((ROOT / "k8s" / "kustomization.yaml").read_text())["resources"] == ["rayjob.yaml"]
    doc = copy.deepcopy(rayjob())
    for p in overlay["patches"]:
        assert p["target"] == {"kind": "RayJob", "name": doc["metadata"]["name"]}
        for op in yaml.safe_load(p["patch"]):
            assert op["op"] == "replace"
            *parents, last = [int(k) if k.isdigit() else k for k in op["path"].strip("/").split("/")]
            node = doc
            for k in parents:
                node = node[k]
            node[last]  # replace needs the path to exist
            node[last] = op["value"]
    return doc


# ------------------------------------------------------------------ the manifest


def test_the_rayjob_follows_kuberays_crd(rayjob_schema):
    assert errors(rayjob_schema, rayjob()) == []
    assert errors(rayjob_schema, fuse_rayjob()) == []


@pytest.mark.parametrize("path, value, message", [
    (("spec", "shutdownAfterJobFinish"), True, "Additional properties are not allowed"),  # misspelt
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "maxReplica"), 4, "Additional properties"),
    (("spec", "ttlSecondsAfterFinished"), "600", "is not of type 'integer'"),
    (("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"), 4, "is not of type 'string'"),
])
def test_a_wrong_field_fails_the_schema(rayjob_schema, path, value, message):
    doc = copy.deepcopy(rayjob())
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    found = errors(rayjob_schema, doc)
    assert any(message in e for e in found), found


def test_the_rayjob_runs_the_papers_plan_on_gpus_with_shared_storage_and_mlflow():
    docs = documents(MANIFEST)
    job = docs["RayJob"]["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:4] == ["python", "pipeline/run.py", "--config", "configs/imagenet.yaml"]
    assert (ROOT / argv[3]).is_file()
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    cluster = job["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(head)  # a CPU head
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and cluster["enableInTreeAutoscaling"]
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # every pod: the shared volume at configs/imagenet.yaml's work_dir, MLflow's Secret
    work_dir = yaml.safe_load((ROOT / "configs" / "imagenet.yaml").read_text())["work_dir"]
    pvc = docs["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod in (head, gpu["template"]["spec"]):
        (c,) = pod["containers"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert claims == {"vgg-data": pvc["metadata"]["name"]}
        assert work_dir.startswith(mounts["vgg-data"] + "/")
        assert "--set data.root=" + mounts["vgg-data"] in job["entrypoint"]
        assert c["envFrom"] == [{"secretRef": {"name": "vgg-mlflow"}}]
        assert c["image"] == head["containers"][0]["image"]
    import ray

    assert cluster["rayVersion"] == ray.__version__  # the Ray the tests run
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py\d+-gpu$",
                     (ROOT / "Dockerfile").read_text(), re.M)


def test_the_fuse_overlay_reruns_fusion_alone():
    base, fuse = rayjob(), fuse_rayjob()
    assert fuse["metadata"]["name"] != base["metadata"]["name"]
    assert fuse["spec"]["entrypoint"] == base["spec"]["entrypoint"] + " --stage fuse --force"
    assert fuse["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 0


def test_the_dockerfile_installs_every_extra_of_pyproject():
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    installs = re.findall(r"pip install [^\n]*?\"\.\[([^\]]*)\]\"", (ROOT / "Dockerfile").read_text())
    assert len(installs) == 1, installs
    assert set(installs[0].split(",")) == extras


# ------------------------------------------------------------------ the Ray Jobs API

#: The RayJob's entrypoint at tiny size: the demo's 3-class data, 1 epoch, net A alone,
#: shard -> augment -> train -> evaluate (the plumbing, not accuracy; the report needs every net).
JOB_SIZE = [*TINY, "train.max_epochs=1", "train.width=0.125", "train.batch_size=8",
            "augment.check_batches=1", "augment.check_batch_size=8", "evaluate.grid=2",
            "evaluate.batch_size=8", "mlflow.system_metrics=false"]
JOB_STAGES = ["shard", "augment", "train/A", "evaluate/A"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ray(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("ray")), *args]


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop the head this test started, and only it: its process group (`ray start --block`
    and the Ray processes it started), then any process left whose command line names this
    head's temp dir (a worker in a session of its own), each by its pid."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` on 127.0.0.1 with the dashboard (the Jobs API), in its own
    temp dir and process group, every port free-picked; yields the dashboard's address."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a limit
    gcs, dash, client, agent, agent_grpc, metrics, env_agent, nm, om = _free_ports(9)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled", "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "ray-head.log", "wb")
    proc = subprocess.Popen(
        _ray("start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--temp-dir", temp_dir, "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
             "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
             "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
             "--runtime-env-agent-port", str(env_agent), "--node-manager-port", str(nm),
             "--object-manager-port", str(om), "--disable-usage-stats"),
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{(tmp_path / 'ray-head.log').read_text()[-4000:]}")
            done = subprocess.run(_ray("job", "list", "--address", address), env=env,
                                  capture_output=True, text=True)
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the Jobs API at {address} did not answer in 180 s:\n{done.stderr[-3000:]}")
            time.sleep(2)
        yield address, env
    finally:
        _stop_head(proc, temp_dir)
        log.close()
        subprocess.run(["rm", "-rf", temp_dir], check=False)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_rayjobs_entrypoint_runs_through_the_jobs_api(ray_head, tmp_path):
    """What KubeRay's submitter does, against a local head: `ray job submit --working-dir .
    --runtime-env-json <the RayJob's runtimeEnvYAML> -- <its entrypoint>`, the paper's config
    swapped for the demo's at tiny size (no GPU, no ImageNet here). The job succeeds and every
    stage it ran is a FINISHED MLflow run under the invocation's parent run."""
    from mlflow.tracking import MlflowClient

    address, env = ray_head
    job = rayjob()["spec"]
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    argv = shlex.split(job["entrypoint"])
    assert argv[:4] == ["python", "pipeline/run.py", "--config", "configs/imagenet.yaml"]
    work = tmp_path / "work"
    entrypoint = [*argv[:3], "configs/demo.yaml", "--set", f"work_dir={work}", *JOB_SIZE,
                  "--stage", *JOB_STAGES]
    t0 = time.monotonic()
    done = subprocess.run(
        _ray("job", "submit", "--address", address, "--working-dir", str(ROOT),
             "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint),
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=840)
    seconds = time.monotonic() - t0
    print(f"ray job submit: {seconds:.0f} s")
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert "succeeded" in done.stdout, done.stdout[-3000:]
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    exp = client.get_experiment_by_name("vgg-demo")
    runs = client.search_runs([exp.experiment_id])
    stages = {r.data.tags["stage_id"]: r for r in runs if "stage_id" in r.data.tags}
    assert sorted(stages) == sorted(JOB_STAGES)
    parents = {r.data.tags.get("mlflow.parentRunId") for r in stages.values()}
    assert len(parents) == 1 and all(r.info.status == "FINISHED" for r in stages.values())
    assert client.get_run(parents.pop()).info.status == "FINISHED"
