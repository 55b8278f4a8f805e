"""GPU throughput of the train and evaluate stages' computations, and the model-FLOPs
utilisation (MFU). Two modes:

--synthetic: PyTorch and the project's model and step code only (vgg.models,
vgg.training.steps, vgg.evaluation.scoring: no DALI, Ray, MLflow or pyarrow import), random data, so it runs on a
bare GPU box. Per net (A, B, C, D, E at 224 by default): the training step's images/s
and MFU, eager and under torch.compile; dense and 150-crop multi-crop evaluation
images/s over Q = {256, 384, 512}, in bf16 and in fp32; peak GPU memory.

    python benchmarks/bench_gpu.py --synthetic                     # A-E, batch 128
    python benchmarks/bench_gpu.py --synthetic --archs D --batch 256
    python benchmarks/bench_gpu.py --synthetic --device cpu --archs A --width 0.125 --crop 32 \\
        --q 32 40 48 --batch 8 --eval-images 4 --steps 2 --warmup 1 --no-compile   # toy check

Default (DALI) mode: VGG-D at 224 with bf16 autocast and channels_last, fed by the DALI
training loader with "mixed" (GPU, nvJPEG) decoding, on a GPU node with the project
installed.

Three figures, one GPU, one process (the stage's own code, without Ray Train around it;
`bench_train.py` measures what Ray Train adds):
  decode  the DALI training loader alone: JPEG bytes from Parquet shards, mixed decoding,
          isotropic rescale to S ~ U[Smin, Smax], random crop, flip, PCA colour shift;
  step    the stage's SGD step (`vgg.training.steps.sgd_step`: forward, loss, backward, SGD with
          momentum and weight decay) on batches already in GPU memory;
  train   the stage's epoch loop (`vgg.training.loop.train_one_epoch`) fed by the loader.
MFU = images/s x training FLOPs per image / the GPU's dense bf16 peak. The training FLOPs
are 3 x 2 x the forward MACs, counted on the model (VGG-D at 224: 15.5 GMACs, so about
93 GFLOPs per image).

Data: --data <image folder> (train/<class>/*.jpg), or by default a generated folder of
JPEGs with sides in [256, 512] (vgg.data.demo), sharded by the shard stage (Ray Data).

    python benchmarks/bench_gpu.py                      # VGG-D, width 1, crop 224, batch 128
    python benchmarks/bench_gpu.py --no-bf16 --no-channels-last
    # the same code on a CPU, at a toy size (checks the script, measures nothing useful):
    python benchmarks/bench_gpu.py --device cpu --arch A --width 0.125 --crop 32 \\
        --scale 32 40 --batch 8 --images 64 --steps 4 --min-side 36 --max-side 60
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vgg.evaluation.scoring import Scorer  # noqa: E402
from vgg.training.steps import Precision, peak_tflops, sgd_step  # noqa: E402
from vgg.models import build_vgg, forward_macs  # noqa: E402

def make_data(args, work: Path) -> tuple[str, dict]:
    """(shard dir, stats) of --data or of a generated folder, sharded by the shard stage."""
    import pyarrow.fs as pafs

    from pipeline.config import DemoDataConfig, ShardConfig
    from pipeline.runner import start_local_ray
    from pipeline.storage import Store, write_json
    from vgg.data import demo as demo_data
    from pipeline.sharding import shard

    root = args.data
    if root is None:
        root = str(work / "images")
        per_class = -(-args.images // args.classes_data)
        cfg = DemoDataConfig(num_classes=args.classes_data, train_per_class=per_class,
                             val_per_class=1, min_side=args.min_side, max_side=args.max_side, seed=0)
        t0 = time.perf_counter()
        n = demo_data.generate(pafs.LocalFileSystem(), root, cfg)
        print(f"generated {n} JPEGs ({args.min_side}-{args.max_side} px) in {time.perf_counter() - t0:.1f} s",
              flush=True)
    start_local_ray(os.cpu_count() or 1, "127.0.0.1", log_to_driver=False)
    out = Store(str(work / "work")).begin("shard", "bench")
    manifest = shard(root, out, ShardConfig(rows_per_shard=args.rows_per_shard), log=lambda m: None)
    write_json(out.fs, out.join("manifest.json"), manifest)
    return out.path, out.read_json("stats.json")


def timed(fn, steps: int, batch: int, sync) -> float:
    """images/s of `steps` calls of fn (each one batch), after a synchronisation."""
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return steps * batch / (time.perf_counter() - t0)


def synthetic(args, device: torch.device, sync, name: str) -> None:
    """The --synthetic mode (see the module docstring)."""
    cuda = device.type == "cuda"
    peak = args.peak_tflops or (peak_tflops(name) if cuda else None)
    prec = Precision(args.bf16, args.channels_last)
    print(f"{name}: synthetic data, width {args.width}, crop {args.crop}, batch {args.batch}, "
          f"bf16 {args.bf16}, channels_last {args.channels_last}, Q {args.q}", flush=True)
    print(f"{'net':<4} {'mode':<9} {'step img/s':>11} {'MFU %':>6} {'dense img/s':>12} "
          f"{'dense fp32':>11} {'crops img/s':>12} {'peak GiB':>9}", flush=True)
    for arch in args.archs:
        torch.manual_seed(0)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        net = build_vgg(arch, num_classes=args.classes, width=args.width, crop=args.crop).to(device)
        flops = 6 * forward_macs(net)  # training FLOPs per image: 3 x 2 x the forward MACs
        images = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
        labels = torch.randint(0, args.classes, (args.batch,), device=device)
        for mode in ("eager", "compiled") if args.compile else ("eager",):
            model = prec.net(net.train())
            run = torch.compile(model) if mode == "compiled" else model
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
            step = lambda: sgd_step(run, opt, images, labels, args.batch, prec)  # noqa: E731
            timed(step, args.warmup, args.batch, sync)  # compilation and cuDNN autotuning
            rate = timed(step, args.steps, args.batch, sync)
            mfu = f"{100 * rate * flops / (peak * 1e12):6.1f}" if peak else f"{'n/a':>6}"
            evals = _eval_rates(net, args, device, sync, compile=mode == "compiled")
            mem = f"{torch.cuda.max_memory_allocated() / 2**30:9.1f}" if cuda else f"{'-':>9}"
            print(f"{arch:<4} {mode:<9} {rate:11.1f} {mfu} {evals['dense']:12.1f} "
                  f"{evals['dense_fp32']:11.1f} {evals['multi-crop']:12.1f} {mem}", flush=True)


def _eval_rates(net, args, device, sync, compile: bool) -> dict[str, float]:
    """Evaluation images/s over all Q (each image scored at every Q, as the evaluate stage
    does): dense at the run's precision and in fp32, and 5x5 multi-crop with flips."""
    n = args.eval_images
    batches = [torch.randn(n, 3, q, q * 4 // 3, device=device) for q in args.q]  # 4:3 images
    out = {}
    for key, prec in (("dense", Precision(args.bf16, args.channels_last)), ("dense_fp32", Precision()),
                      ("multi-crop", Precision(args.bf16, args.channels_last))):
        scorer = Scorer.of(net, prec, compile)
        if key == "multi-crop":
            def fn():
                return [scorer.multicrop_probs(b, 5, True, args.eval_batch) for b in batches]
        else:
            def fn():
                return [scorer.dense_probs(b, True) for b in batches]
        with torch.inference_mode():
            timed(fn, 1, n, sync)
            out[key] = timed(fn, args.eval_steps, n, sync)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synthetic", action="store_true",
                   help="random data, torch and the model/step code only (no DALI, Ray, MLflow)")
    p.add_argument("--archs", nargs="+", default=["A", "B", "C", "D", "E"], help="--synthetic: the nets")
    p.add_argument("--q", type=int, nargs="+", default=[256, 384, 512], help="--synthetic: test scales")
    p.add_argument("--eval-images", type=int, default=32, help="--synthetic: images per evaluation batch")
    p.add_argument("--eval-batch", type=int, default=250, help="--synthetic: crops per multi-crop forward pass")
    p.add_argument("--eval-steps", type=int, default=3, help="--synthetic: timed evaluation passes")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="--synthetic: eager only (torch.compile takes minutes per net)")

    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a toy-size check of the script)")
    p.add_argument("--arch", default="D")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--scale", type=int, nargs=2, default=[256, 512], metavar=("SMIN", "SMAX"))
    p.add_argument("--batch", type=int, default=128, help="images per step (the paper: 256 over 4 GPUs)")
    p.add_argument("--classes", type=int, default=1000, help="the net's output classes")
    p.add_argument("--steps", type=int, default=30, help="timed steps per figure")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (cuDNN autotuning)")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="DALI CPU threads")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--data", help="an image folder (train/<class>/*); default: generated")
    p.add_argument("--images", type=int, default=1536, help="generated training images")
    p.add_argument("--classes-data", type=int, default=5, help="generated classes")
    p.add_argument("--min-side", type=int, default=256)
    p.add_argument("--max-side", type=int, default=512)
    p.add_argument("--rows-per-shard", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    args = p.parse_args(argv)

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device here; run it on a GPU node "
                 "(or --device cpu at a toy size to check the script)")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    if args.synthetic:
        synthetic(args, device, sync, name)
        return
    dali_main(args, device, sync, name, cuda)


def dali_main(args, device, sync, name: str, cuda: bool) -> None:
    """The default mode: the DALI loader, the stage's step and its epoch loop."""
    from vgg.config import TrainConfig
    from vgg.training.loop import LOCAL, FitOptions, train_one_epoch
    from vgg.training.steps import Precision, sgd_step
    from vgg.data.augmentation import AugmentSpec
    from vgg.data.loaders import build_train_loader

    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        shards, stats = make_data(args, Path(tmp))
        spec = AugmentSpec.from_stats(stats, crop=args.crop, device="gpu" if cuda else "cpu",
                                      num_threads=args.threads, channels_last=args.channels_last)
        loader = build_train_loader(shards, spec, tuple(args.scale), args.batch,
                                    device_id=0 if cuda else None)
        per_epoch = len(loader)
        print(f"{name}: VGG-{args.arch} width {args.width} crop {args.crop}, S in {args.scale}, "
              f"batch {args.batch}, bf16 {args.bf16}, channels_last {args.channels_last}, "
              f"DALI {'mixed' if cuda else 'cpu'} decoding on {args.threads} threads, "
              f"{loader.num_samples} images = {per_epoch} batches per epoch", flush=True)

        # decode: whole epochs of the loader (one epoch warms it up)
        for _ in loader.epoch(0):
            pass
        epochs = max(1, -(-args.steps // per_epoch))
        sync()
        t0, n = time.perf_counter(), 0
        for e in range(1, epochs + 1):
            for images, _ in loader.epoch(e):
                n += len(images)
        sync()
        decode = n / (time.perf_counter() - t0)
        print(f"decode  {decode:9.1f} images/s  ({n} images, {epochs} epoch(s))", flush=True)

        # step: the stage's SGD step on one batch resident on the device
        t = TrainConfig(batch_size=args.batch, width=args.width, num_workers=1, bf16=args.bf16,
                        channels_last=args.channels_last, log_every=0)
        opts = FitOptions(epochs=1, num_classes=args.classes, per_worker_batch=args.batch, log_every=0,
                          precision=Precision(args.bf16, args.channels_last), name="bench", crop=args.crop)
        torch.manual_seed(0)
        net = build_vgg(args.arch, num_classes=args.classes, width=args.width, crop=args.crop).to(device)
        macs = forward_macs(net)
        if t.channels_last:
            net = net.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=t.momentum,
                                    weight_decay=t.weight_decay)
        images, _ = next(iter(loader.epoch(epochs + 1)))
        images = images.to(device)
        labels = torch.randint(0, args.classes, (len(images),), device=device)
        step = lambda: sgd_step(net, optimizer, images, labels, opts.per_worker_batch, opts.precision)  # noqa: E731
        timed(step, args.warmup, len(images), sync)
        step_rate = timed(step, args.steps, len(images), sync)
        if cuda:
            mem = torch.cuda.max_memory_allocated() / 2**30
        flops = 6 * macs
        print(f"step    {step_rate:9.1f} images/s  (forward {macs / 1e9:.2f} GMACs, "
              f"training {flops / 1e9:.1f} GFLOPs per image"
              + (f", peak memory {mem:.1f} GiB" if cuda else "") + ")", flush=True)

        # train: the stage's epoch loop, fed by the loader
        train_one_epoch(net, loader, optimizer, per_epoch, epochs + 2, opts, LOCAL, device)
        sync()
        t0 = time.perf_counter()
        for e in range(epochs):
            train_one_epoch(net, loader, optimizer, per_epoch, epochs + 3 + e, opts, LOCAL, device)
        sync()
        train = epochs * loader.num_samples / (time.perf_counter() - t0)
        peak = args.peak_tflops or (peak_tflops(name) if cuda else None)
        util = (f"MFU {100 * train * flops / (peak * 1e12):.1f}% of {peak:.0f} TFLOP/s bf16"
                if peak else "MFU n/a (give --peak-tflops)")
        step_util = f", {100 * step_rate * flops / (peak * 1e12):.1f}% for the step alone" if peak else ""
        print(f"train   {train:9.1f} images/s  ({epochs} epoch(s); {util}{step_util})")
        print(f"the loader keeps up with the step: {decode >= step_rate} "
              f"(decode / step = {decode / step_rate:.2f})")


if __name__ == "__main__":
    main()
