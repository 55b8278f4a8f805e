"""Shared fixtures: one local Ray instance per test session (on loopback), temp work dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"

# Small demo data so that end-to-end tests take seconds.
TINY = [
    "data.demo.num_classes=3",
    "data.demo.train_per_class=8",
    "data.demo.val_per_class=4",
    "data.demo.min_side=36",
    "data.demo.max_side=60",
    "shard.rows_per_shard=10",
]


#: Python source that starts a simulated two-node Ray cluster (1 CPU per node, every node on
#: 127.0.0.1) and connects to it; for test scripts run in a subprocess (one cluster per process).
TWO_NODE_CLUSTER = """
import os
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # bind every node to 127.0.0.1
from ray._private import ray_constants
ray_constants.ENABLE_RAY_CLUSTER = False
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
"""


@pytest.fixture(autouse=True)
def _no_env_tracking(monkeypatch):
    """Tests use their own SQLite stores; a user's MLFLOW_TRACKING_URI / RAY_ADDRESS must not leak in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture(scope="session")
def ray_session():
    """A private local Ray instance bound to 127.0.0.1, shared by the tests that need one."""
    import ray

    from pipeline.runner import start_local_ray

    if not ray.is_initialized():
        start_local_ray(2, "127.0.0.1", log_to_driver=False)
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    yield ray
    ray.shutdown()


@pytest.fixture
def work_dir(tmp_path) -> str:
    return str(tmp_path / "work")


@pytest.fixture
def tiny_cfg(work_dir):
    """The demo config with tiny data in a temp work_dir."""
    from pipeline.config import load_config

    def make(*extra: str):
        return load_config(DEMO, [f"work_dir={work_dir}", *TINY, *extra])

    return make


def write_images(root: Path, split: str, cls: str, images) -> None:
    """Save PIL images as JPEG files <root>/<split>/<cls>/<i>.jpg."""
    d = root / split / cls
    d.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(d / f"{i:03d}.jpg", "JPEG", quality=95)


os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train polls its workers every 2 s by default; faster polling shortens every training's
# start, end and failure detection in every test (the driver passes it to Ray Train's
# controller and workers; subprocesses of the tests inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
