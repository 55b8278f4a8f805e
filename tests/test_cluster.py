"""Running on a Ray cluster: the cluster files, the MLflow server check, and the end-to-end
run of ray_cluster_local.yaml (sshd on loopback, ray up / submit / down) on this machine."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline import tracking

ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT / "scripts" / "local_cluster_e2e.sh"
# The demo, smaller still: 3 classes, 1 epoch per net (the check is the plumbing, not accuracy).
E2E_OVERRIDES = [
    "data.demo.num_classes=3", "data.demo.train_per_class=8", "data.demo.val_per_class=4",
    "data.demo.min_side=36", "data.demo.max_side=60", "shard.rows_per_shard=10",
    "train.max_epochs=1", "train.nets.D-jit.epochs=1",
]


@pytest.mark.parametrize("name", ["ray_cluster.yaml", "ray_cluster_local.yaml"])
def test_cluster_files_follow_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / name).read_text())
    validate_config(prepare_config(cfg))  # with the provider defaults filled in, as `ray up` does
    assert cfg["file_mounts"]["~/vgg-pipeline"] == "."
    assert ".venv" in cfg["rsync_exclude"]
    commands = " ".join(cfg["setup_commands"] + cfg.get("head_setup_commands", []))
    assert re.search(r'/bin/pip"? install -q -e "?(~|\$HOME)/vgg-pipeline', commands) and "/bin/activate" in commands
    head = " ".join(cfg["head_start_ray_commands"])
    assert "mlflow server" in head and "ray start --head" in head
    assert "MLFLOW_TRACKING_URI" in commands and "RAY_ADDRESS=auto" in commands


def test_the_aws_clusters_mlflow_requires_a_login():
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    assert "--app-name basic-auth" in " ".join(cfg["head_start_ray_commands"])
    assert cfg["file_mounts"]["~/.vgg"] == "~/.vgg"  # credentials from the launching machine
    setup = " ".join(cfg["setup_commands"])
    assert "[cluster]" in setup and ". ~/.vgg/mlflow.env" in setup


def test_local_cluster_file_has_no_node_types():
    """The local provider rejects available_node_types; its head is this machine's loopback."""
    cfg = yaml.safe_load((ROOT / "ray_cluster_local.yaml").read_text())
    assert cfg["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert "available_node_types" not in cfg
    assert "--node-ip-address=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])


def test_unreachable_tracking_server_fails_fast():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"127.0.0.1:{port} does not answer.*mlflow.tracking_uri"):
        tracking.check_reachable(f"http://127.0.0.1:{port}", wait_s=0.0)
    assert time.monotonic() - t0 < 5
    tracking.check_reachable("sqlite:////nonexistent/mlflow.db")  # not a server: nothing to check


def test_reachable_tracking_server_passes():
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracking.check_reachable(f"http://127.0.0.1:{server.server_port}", wait_s=0.0)
    finally:
        server.shutdown()


def test_run_py_reports_an_unreachable_server(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / "run.py"), "--set", f"work_dir={tmp_path}", "--stage", "shard"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: the MLflow tracking server http://127.0.0.1:{port} does not answer" in done.stderr


@pytest.mark.cluster
@pytest.mark.timeout(1000)
def test_local_cluster_end_to_end(tmp_path):
    """scripts/local_cluster_e2e.sh: ray up over SSH on 127.0.0.1, ray submit of the demo,
    every stage kind in the head's MLflow server, --stage fuse re-runs only fusion, ray down.
    Needs root (sshd, namespaces); skipped, with the script's reason, where it cannot run."""
    proc = subprocess.Popen(
        ["bash", str(E2E), "--dir", str(tmp_path), "--", *E2E_OVERRIDES],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # unshare dies, and with it the whole namespace
        out, _ = proc.communicate()
        pytest.fail("the end-to-end script took more than 15 minutes:\n" + out[-6000:])
    if proc.returncode == 77:
        pytest.skip(out.strip().splitlines()[-1])
    assert proc.returncode == 0, out[-8000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = summary["pipeline_run"]["stages"]
    assert {s.split("/")[0] for s in stages} == {"shard", "augment", "train", "evaluate", "fuse", "report"}
    assert {"train/A", "train/D", "train/D-jit", "evaluate/D", "evaluate/D-jit"} <= set(stages)
    assert summary["fuse_run"]["stages"] == ["fuse"]
    assert summary["tracking_uri"] == "http://127.0.0.1:5000" and summary["fuse_artifacts"]
    assert "PASSED" in out


def test_local_ray_serves_the_state_api(ray_session):
    """Ray Train's placement-group cleaner polls the State API every second from a Ray
    worker; the private local instance must serve it (a dashboard on 127.0.0.1) and its
    workers must find it even beside other Ray instances, or it warns every second."""
    import os

    @ray_session.remote(num_cpus=0)
    def nodes_seen_from_a_worker():
        from ray.util.state import list_nodes

        return [n.node_ip for n in list_nodes(timeout=30)], os.environ.get("RAY_API_SERVER_ADDRESS")

    ips, api = ray_session.get(nodes_seen_from_a_worker.remote(), timeout=120)
    assert ips == ["127.0.0.1"] and api.startswith("http://127.0.0.1:")
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # not left behind for other clusters


def test_mlflow_credentials_are_private_and_consistent(tmp_path):
    import configparser
    import stat
    import subprocess

    env = {**__import__("os").environ, "HOME": str(tmp_path)}
    subprocess.run(["bash", str(ROOT / "scripts" / "make_mlflow_credentials.sh")], env=env, check=True,
                   capture_output=True)
    d = tmp_path / ".vgg"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for f in ("mlflow-auth.ini", "mlflow.env"):
        assert stat.S_IMODE((d / f).stat().st_mode) == 0o600
    ini = configparser.ConfigParser()
    ini.read(d / "mlflow-auth.ini")
    exports = dict(line.removeprefix("export ").split("=", 1) for line in (d / "mlflow.env").read_text().splitlines())
    assert exports["MLFLOW_TRACKING_USERNAME"] == ini["mlflow"]["admin_username"]
    assert exports["MLFLOW_TRACKING_PASSWORD"] == ini["mlflow"]["admin_password"] != "password1234"
    before = (d / "mlflow.env").read_text()
    subprocess.run(["bash", str(ROOT / "scripts" / "make_mlflow_credentials.sh")], env=env, check=True,
                   capture_output=True)
    assert (d / "mlflow.env").read_text() == before  # kept unless --force
