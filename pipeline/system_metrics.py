"""System metrics where the work is: sampled on the nodes a stage's workers run on.

MLflow's own `log_system_metrics` samples the process that opened the run: here, a
stage's driver task, which does no work. Instead every worker of a train or evaluate
stage (Ray Train worker, evaluation share task) enters `sampling(spec)`: one of the
workers on each node - whichever holds the node's lock file for this run - runs MLflow's
`SystemMetricsMonitor` (CPU, memory, disk, network; GPU utilisation and memory through
NVML where a GPU is present) into the stage's run, with the node in the metric names
(`system/<node>/cpu_utilization_percentage`). When that worker ends, another worker of
the node that is still running takes over and continues the steps, so a node is sampled
while any of its workers runs.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import filelock


@dataclass(frozen=True)
class SystemMetrics:
    """Where and how often to sample (picklable: it travels to the workers)."""

    tracking_uri: str
    run_id: str
    interval_s: float = 5.0


def node_label() -> str:
    """The node's name in metric names: its Ray node id (first 12 hex digits) and address."""
    try:
        import ray

        if not ray.is_initialized():  # get_runtime_context() would start a Ray instance
            raise RuntimeError("not in Ray")
        ctx = ray.get_runtime_context()
        node = ctx.get_node_id()[:12]
        ip = ray.util.get_node_ip_address()
        return f"node-{ip}-{node}"
    except Exception:  # noqa: BLE001 - outside Ray (tests, a local loop): the host
        import socket

        return f"node-{socket.gethostname()}"


@contextmanager
def sampling(spec: SystemMetrics | None) -> Iterator[None]:
    """Sample this node's system metrics into `spec.run_id` while the block runs, unless
    another worker of this node already does (see the module docstring)."""
    if spec is None or not spec.run_id:
        yield
        return
    label = node_label()
    lock = filelock.FileLock(os.path.join(tempfile.gettempdir(), "vgg-system-metrics",
                                          f"{spec.run_id}-{re.sub(r'[^A-Za-z0-9.-]', '_', label)}.lock"))
    os.makedirs(os.path.dirname(lock.lock_file), exist_ok=True)
    stop = threading.Event()
    thread = threading.Thread(target=_sample_when_elected, args=(spec, label, lock, stop), daemon=True,
                              name="system-metrics")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


def _sample_when_elected(spec: SystemMetrics, label: str, lock: filelock.FileLock,
                         stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            lock.acquire(timeout=1.0)
        except filelock.Timeout:
            continue
        try:
            _sample(spec, label, stop)
        finally:
            lock.release()
        return


def _sample(spec: SystemMetrics, label: str, stop: threading.Event) -> None:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # its INFO lines ("Started monitoring system metrics.") would reach the console from every node
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        monitor = SystemMetricsMonitor(spec.run_id, sampling_interval=spec.interval_s, node_id=label,
                                       tracking_uri=spec.tracking_uri, resume_logging=True)
        monitor.start()
    except Exception as e:  # noqa: BLE001 - metrics must never stop the work
        logging.getLogger(__name__).warning("system metrics not sampled on %s: %s", label, e)
        return
    stop.wait()
    monitor.finish()
    # MLflow's loop drops the samples of an unfinished interval when it stops: publish
    # them, so a worker shorter than one interval still leaves its node's figures
    try:
        last = monitor.aggregate_metrics()
        if last:
            monitor.publish_metrics(last)
            monitor.mlflow_logger.flush()
    except Exception as e:  # noqa: BLE001 - the run may be over already
        logging.getLogger(__name__).warning("last system-metric sample of %s not logged: %s", label, e)
