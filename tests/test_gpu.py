"""The GPU path: bf16 / channels_last / torch.compile in evaluation, the synthetic GPU
benchmark's imports, and a CUDA smoke test of the train and evaluate computations
(skipped without CUDA). PyTorch alone: this file runs on a GPU box without Ray, MLflow,
DALI or pyarrow (tests/test_layout.py runs it so)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys

import pytest
import torch

from vgg.evaluation.scoring import Scorer
from vgg.training.loop import FitOptions, TorchDistributed, plain_net, train_one_epoch
from vgg.training.steps import Precision, sgd_step
from vgg.models import build_vgg
from tests.conftest import ROOT
from tests.test_vgg import lively

CUDA = torch.cuda.is_available()


def test_bf16_channels_last_posteriors_stay_close_to_fp32():
    net = lively(build_vgg("A", num_classes=10, width=0.25, crop=32))
    images = torch.randn(6, 3, 48, 64)
    fp32, bf16 = Scorer.of(net), Scorer.of(net, Precision(bf16=True, channels_last=True))
    with torch.inference_mode():
        for fn in (lambda s: s.dense_probs(images, True), lambda s: s.multicrop_probs(images, 3, True, 16)):
            a, b = fn(fp32), fn(bf16)
            assert b.dtype == torch.float32 and torch.allclose(b.sum(1), torch.ones(6), atol=1e-5)
            assert (a - b).abs().max() < 0.05 and (a.argmax(1) == b.argmax(1)).float().mean() >= 0.8


def test_a_compiled_net_checkpoints_with_plain_keys():
    net = build_vgg("A", num_classes=10, width=0.125, crop=32)
    compiled = torch.compile(net)  # wrapping compiles nothing yet
    assert list(plain_net(compiled).state_dict()) == list(net.state_dict())
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())


def test_synthetic_gpu_benchmark_needs_no_dali_ray_or_mlflow():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['bench_gpu.py', '--synthetic', '--device', 'cpu', '--archs', 'A', '--width', '0.125',"
        " '--crop', '32', '--q', '32', '48', '--batch', '4', '--eval-images', '2', '--steps', '1',"
        " '--warmup', '1', '--eval-steps', '1', '--no-compile']\n"
        f"runpy.run_path({str(ROOT / 'benchmarks' / 'bench_gpu.py')!r}, run_name='__main__')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'nvidia', 'pyarrow'))\n"
        "print('IMPORTED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout and "\nA    eager" in out.stdout


class MemoryBatches:
    """A test harness standing in for a training loader: the same few batches every epoch."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def epoch(self, epoch):
        return iter((x, y, {}) for x, y in self.batches)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_smoke_train_epoch_checkpoint_and_scoring():
    """On the GPU: a process group of one (NCCL), the train stage's epoch loop in bf16 and
    channels_last, a checkpoint saved and restored giving identical next-step weights,
    and the evaluate stage's scoring in bf16."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        device = torch.device("cuda", 0)
        opts = FitOptions(epochs=2, num_classes=10, per_worker_batch=8, log_every=0, name="train/smoke",
                          precision=Precision(bf16=True, channels_last=True), crop=32)
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randn(8, 3, 32, 32, generator=g).to(device),
                    torch.randint(0, 10, (8,), generator=g).to(device)) for _ in range(3)]

        def fresh():
            torch.manual_seed(0)
            net = DDP(opts.precision.net(build_vgg("A", num_classes=10, width=0.25, crop=32).to(device)))
            return net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        net, opt = fresh()
        sums, bad = train_one_epoch(net, MemoryBatches(batches), opt, 3, 0, opts, TorchDistributed(), device)
        assert bad is None and torch.isfinite(sums).all() and sums[1].item() == 24
        buf = io.BytesIO()
        torch.save({"model": plain_net(net).state_dict(), "optimizer": opt.state_dict()}, buf)
        buf.seek(0)
        state = torch.load(buf, map_location=device, weights_only=True)
        net2, opt2 = fresh()
        plain_net(net2).load_state_dict(state["model"])
        opt2.load_state_dict(state["optimizer"])
        for n, o in ((net, opt), (net2, opt2)):
            sgd_step(n, o, *batches[0], opts.per_worker_batch, opts.precision)
        for a, b in zip(plain_net(net).state_dict().values(), plain_net(net2).state_dict().values()):
            assert torch.equal(a, b)
        scorer = Scorer.of(plain_net(net).eval(), Precision(bf16=True, channels_last=True))
        with torch.inference_mode():
            probs = scorer.dense_probs(torch.randn(4, 3, 48, 64, device=device), True)
        assert probs.is_cuda and torch.allclose(probs.sum(1), torch.ones(4, device=device), atol=1e-4)
    finally:
        dist.destroy_process_group()


class SizedBatches:
    """Dense evaluation batches at one Q: images of a few sizes (one size per batch)."""

    def __init__(self, q: int, n: int = 3):
        g = torch.Generator().manual_seed(q)
        sizes = [(q, q), (q, q + 8), (q + 16, q)]
        self.batches = [(torch.randn(2, 3, *sizes[i % 3], generator=g), torch.zeros(2, dtype=torch.long),
                         [f"{q}-{i}-{j}" for j in range(2)]) for i in range(n)]
        self.num_samples = 2 * n

    def __iter__(self):
        return iter(self.batches)


def test_compiled_evaluation_compiles_a_few_graphs_not_one_per_image_size(monkeypatch):
    """Every test scale and image size through one compiled scorer (dynamo with the eager
    backend: the graphs and guards of torch.compile without code generation): a handful of
    graphs, no recompile storm (the stage's scoring once hit dynamo's recompile limit, 8,
    and fell back to eager: inference_mode vs not)."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    from vgg.evaluation.shares import score_share

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    net = build_vgg("A", num_classes=4, width=0.125, crop=32).eval()
    scorer = Scorer.of(net, compile=True)
    for _ in range(2):  # a second net's evaluation, or the next epoch's: no new graphs
        score_share(scorer, SizedBatches, [32, 40, 48], torch.device("cpu"), grid=2, batch_size=8)
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 6, dict(counters["stats"])
    assert not counters["recompiles"] or sum(counters["recompiles"].values()) < 8, dict(counters["recompiles"])
