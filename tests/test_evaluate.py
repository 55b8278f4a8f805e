"""The evaluate stage on a tiny net and a tiny shard (CPU): methods, modes, Ray shares, outputs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from pipeline.config import EvaluateConfig, NetPlan, ShardConfig
from pipeline.stage import StageContext, TrackingInfo
from pipeline.storage import StageOutput
from pipeline.dag import EvaluateInputs, EvaluateSection
from stages import evaluate as stage
from vgg import paper
from vgg.artifacts import Augmentation, Evaluation, Shards, TrainedNet, posteriors_file, write_augmentation
from vgg.data.augmentation import AugmentSpec
from vgg.data.demo import make_image
from vgg.data.loaders import build_center_loader
from vgg.evaluation import shares as E
from vgg.results.metrics import Posteriors, bootstrap_errors, errors, interval, read_posteriors, topk_hits
from pipeline.sharding import shard
from vgg.results.report import build_report
from vgg.models import build_vgg
from vgg.training.steps import Precision
from tests.conftest import write_images

CROP, CLASSES = 32, 3
# Val images: squares (rescale to exactly CROP x CROP at Q = CROP) and non-squares.
VAL_SIZES = [(40, 40), (56, 56), (32, 32), (36, 50), (60, 44), (48, 48)]
SCALE = [32, 48]  # a jittered net: Q single 40, multi {32, 40, 48}


def local_output(root, stage_id: str) -> StageOutput:
    path = str(root / stage_id.replace("/", "_"))
    pafs.LocalFileSystem().create_dir(path, recursive=True)
    return StageOutput(stage_id, "test", pafs.LocalFileSystem(), path, path)


@pytest.fixture(scope="module")
def data(ray_session, tmp_path_factory):
    """Shard, augment and train outputs: 18 val images of 3 classes, a tiny net A."""
    tmp = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    root = tmp / "images"
    for label in range(CLASSES):
        cls = f"c{label}"
        write_images(root, "train", cls, [Image.fromarray(make_image(label, 40, 40, rng)) for _ in range(2)])
        write_images(root, "val", cls, [Image.fromarray(make_image(label, h, w, rng)) for h, w in VAL_SIZES])
    shard_out = local_output(tmp, "shard")
    shard(str(root), shard_out, ShardConfig(rows_per_shard=7), log=lambda m: None)
    spec = AugmentSpec.from_stats(shard_out.read_json("stats.json"), crop=CROP, device="cpu")
    augment_out = local_output(tmp, "augment")
    write_augmentation(augment_out, spec)
    train_out = local_output(tmp, "train/a")
    net = tiny_net()
    torch.save({"state_dict": net.state_dict(), "arch": "A", "width": 0.125, "crop": CROP,
                "num_classes": CLASSES, "batch_norm": False, "classes": [f"c{i}" for i in range(CLASSES)],
                "net": "a", "config": {}}, train_out.join("model.pt"))
    return {"tmp": tmp, "shard": shard_out, "augment": augment_out, "train": train_out, "spec": spec, "net": net}


def tiny_net():
    """Net A at width 1/8 whose posteriors vary from image to image: glorot init, then FC3
    centred on a few demo images and sharpened (a random net's scores barely differ)."""
    torch.manual_seed(0)
    net = build_vgg("A", num_classes=CLASSES, width=0.125, crop=CROP, init="glorot").eval()
    rng = np.random.default_rng(1)
    x = torch.tensor(np.stack([make_image(i % CLASSES, CROP, CROP, rng) for i in range(12)]))
    with torch.no_grad():
        fc3 = net.classifier[6]
        fc3.bias.sub_(net(x.permute(0, 3, 1, 2).float() - 110).mean(0))
        fc3.weight.mul_(5), fc3.bias.mul_(5)
    return net


def job(data, **kw) -> E.ShareJob:
    base = E.ShareJob(data["train"].join("model.pt"), data["shard"].join("val"), data["spec"].to_dict(),
                      (CROP,), tuple(f"c{i}" for i in range(CLASSES)), batch_size=4, threads=1,
                      bf16=False, channels_last=False)  # exact comparisons: float32 (auto: tests below)
    return dataclasses.replace(base, **kw)


def center_posteriors(data, q: int) -> dict[str, np.ndarray]:
    """The single centre-crop evaluation at Q: softmax of net(centre crop), by key."""
    out = {}
    with torch.no_grad():
        for images, _, keys in build_center_loader(data["shard"].join("val"), data["spec"], q, 5):
            out.update(zip(keys, data["net"](images).softmax(1).numpy()))
    return out


def share_posteriors(result: E.ShareResult, method: str, q: int) -> dict[str, np.ndarray]:
    keys, _, probs = result.posteriors[(method, q)]
    return dict(zip(keys, probs))


# ---------------------------------------------------------------- pure parts
def test_test_scales_follow_the_paper_and_the_config():
    cfg = EvaluateConfig()
    assert E.q_sets(256, 224, cfg) == (256, [224, 256, 288])
    assert E.q_sets([256, 512], 224, cfg) == (384, [256, 384, 512])
    assert E.q_sets(32, 32, cfg) == (32, [32, 37])  # S - 5 < crop: raised, then deduplicated
    assert E.q_sets(256, 224, EvaluateConfig(q_single=300, q_multi=[300, 240])) == (300, [240, 300])
    with pytest.raises(ValueError, match="at least two distinct"):
        E.q_sets(256, 224, EvaluateConfig(q_multi=[256]))


def test_mode_names():
    assert paper.MODES == ("dense@single", "multi-crop@single", "multi-crop+dense@single",
                       "dense@multi", "multi-crop@multi", "multi-crop+dense@multi")
    assert paper.metric_name("multi-crop+dense@multi", "top1_err") == "multicrop_dense_multi_top1_err"
    assert posteriors_file("dense@single") == "posteriors/dense@single.parquet"


def test_combine_modes_averages_over_q_then_methods():
    keys, labels, classes = ["a", "b"], [0, 1], ["x", "y", "z"]
    rng = np.random.default_rng(1)

    def post():
        p = rng.random((2, 3)) + 0.1
        return Posteriors(keys, labels, p / p.sum(1, keepdims=True), classes)

    per_q = {(m, q): post() for m in paper.BASE_METHODS for q in (32, 40, 48)}
    modes = E.combine_modes(per_q, 40, [32, 40, 48])
    assert tuple(modes) == paper.MODES
    np.testing.assert_array_equal(modes["dense@single"].probs, per_q[("dense", 40)].probs)
    dense = np.mean([per_q[("dense", q)].probs for q in (32, 40, 48)], axis=0)
    crops = np.mean([per_q[("multi-crop", q)].probs for q in (32, 40, 48)], axis=0)
    np.testing.assert_allclose(modes["dense@multi"].probs, dense, atol=1e-6)
    np.testing.assert_allclose(modes["multi-crop+dense@multi"].probs, (dense + crops) / 2, atol=1e-6)
    np.testing.assert_allclose(modes["multi-crop+dense@single"].probs,
                               (per_q[("dense", 40)].probs + per_q[("multi-crop", 40)].probs) / 2, atol=1e-6)


# ---------------------------------------------------------------- methods
def test_dense_at_crop_scale_equals_the_centre_crop(data):
    """Square images at Q = crop: the dense net sees exactly the centre crop (a 1x1 score map)."""
    res = E.evaluate_share(job(data, flips=False, methods=("dense",)))
    dense, center = share_posteriors(res, "dense", CROP), center_posteriors(data, CROP)
    square = [k for k in dense if k.endswith(tuple(f"/{i:03d}.jpg" for i, (h, w) in enumerate(VAL_SIZES) if h == w))]
    assert len(square) == 12 and len(dense) == 18
    for k in square:
        np.testing.assert_allclose(dense[k], center[k], atol=1e-5)  # the same pixels
    assert np.stack([dense[k] for k in square]).std(0).min() > 0.05  # the posteriors are not all alike


def test_multicrop_one_crop_without_flip_equals_the_centre_crop(data):
    q = 40  # every image (squares and the others) rescaled, then its centre crop
    res = E.evaluate_share(job(data, qs=(q,), grid=1, flips=False, methods=("multi-crop",)))
    crops, center = share_posteriors(res, "multi-crop", q), center_posteriors(data, q)
    assert sorted(crops) == sorted(center)
    for k in crops:
        np.testing.assert_allclose(crops[k], center[k], atol=3e-3)  # ROI vs whole-image resize rounding


def test_flips_average_the_image_and_its_mirror(data):
    res = E.evaluate_share(job(data, qs=(40,), grid=2, flips=True))
    plain = E.evaluate_share(job(data, qs=(40,), grid=2, flips=False))
    for method in paper.BASE_METHODS:
        a, b = share_posteriors(res, method, 40), share_posteriors(plain, method, 40)
        assert not np.allclose(np.stack(list(a.values())), np.stack([b[k] for k in a]), atol=1e-4)
    assert res.images == 18 and set(res.seconds) >= {"decode", "dense", "multi-crop", "total"}


# ---------------------------------------------------------------- the stage
def context(data, out_name: str) -> StageContext:
    return StageContext("evaluate/a", local_output(data["tmp"], out_name), TrackingInfo("", "", ""), "test")


def run_stage(data, ctx: StageContext, **cfg):
    config = EvaluateSection(EvaluateConfig(grid=2, batch_size=8, **cfg), NetPlan(arch="A", scale=SCALE), "a")
    inputs = EvaluateInputs(Shards(data["shard"]), Augmentation(data["augment"]), TrainedNet(data["train"]))
    return stage.run(config, inputs, ctx)


@pytest.fixture(scope="module")
def one_worker(data):
    ctx = context(data, "eval1")
    return ctx, run_stage(data, ctx)


def test_run_writes_every_mode_and_its_errors(one_worker):
    ctx, result = one_worker
    rows = Evaluation(ctx.out).rows()
    assert [r.mode for r in rows] == list(paper.MODES)
    assert result.params["q_single"] == 40 and result.params["q_multi"] == [32, 40, 48]
    table = result.tables["errors.json"]
    # the report's columns, the result first; the report's intervals
    assert list(table)[:5] == ["net", "method", "test Q", "top-1", "top-1 95% CI"]
    assert [f"{m}@{'single' if ',' not in q else 'multi'}" for m, q in zip(table["method"], table["test Q"])] \
        == list(paper.MODES) and table["test Q"][0] == "40" and table["test Q"][3] == "32,40,48"
    assert "top-5" not in table  # K = 3: not applicable in every row, so left out of the display
    for mode, row in zip(paper.MODES, rows):
        post = read_posteriors(ctx.out.fs, ctx.out.join(posteriors_file(mode)))
        assert len(post) == 18 and post.keys == sorted(post.keys)
        errs = errors(post, (1, 3))
        assert result.metrics[paper.metric_name(mode, "top1_err")] == pytest.approx(100 * errs["top1"])
        assert row.top1 == pytest.approx(100 * errs["top1"]) and row.top5 is None  # K = 3 < 5
        assert paper.metric_name(mode, "top5_err") not in result.metrics
        assert table["top-1"][paper.MODES.index(mode)] == round(row.top1, 1)  # shown rounded
        lo, hi = (100 * v for v in interval(bootstrap_errors({"m": topk_hits(post.probs, post.labels, 1)})["m"]))
        assert table["top-1 95% CI"][paper.MODES.index(mode)] == f"[{lo:.1f}, {hi:.1f}]"
    for name in ("dense_images_per_s", "multicrop_images_per_s", "images_per_s"):
        assert result.metrics[name] > 0
    assert result.metrics["dense_q48_top1_err"] >= 0 and "rows.json" in result.artifacts
    assert json.loads(json.dumps(result.manifest))["images"] == 18


def test_two_ray_workers_give_the_same_posteriors(data, one_worker):
    ctx1, _ = one_worker
    ctx2 = context(data, "eval2")
    result = run_stage(data, ctx2, num_workers=2)
    assert result.params["workers"] == 2
    for mode in paper.MODES:
        a = read_posteriors(ctx1.out.fs, ctx1.out.join(posteriors_file(mode)))
        b = read_posteriors(ctx2.out.fs, ctx2.out.join(posteriors_file(mode)))
        assert a.keys == b.keys and np.array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)


def test_report_from_evaluate_output(one_worker, tmp_path):
    ctx, _ = one_worker
    out = StageOutput("evaluate/a", "test", ctx.out.fs, ctx.out.path, ctx.out.uri)
    report = build_report({"a": Evaluation(out)}, None, tmp_path / "depth.png")
    assert set(report.tables) == {"table3.json", "table4.json", "table5.json", "claims.json"}
    assert report.tables["table3.json"]["method"] == ["dense", "multi-crop", "multi-crop+dense"]
    assert "Table 5" in report.markdown
    assert (tmp_path / "depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_that_does_not_fit_the_data_is_an_error(data, tmp_path):
    other = build_vgg("A", num_classes=4, width=0.125, crop=CROP)
    torch.save({"state_dict": other.state_dict(), "arch": "A", "width": 0.125, "crop": CROP,
                "num_classes": 4}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="4 classes, the shards 3"):
        E.evaluate_share(job(data, model_uri=str(tmp_path / "model.pt")))


def test_bf16_channels_last_share_is_close_to_fp32(data):
    fp32 = E.evaluate_share(job(data, qs=(40,), grid=2))
    bf16 = E.evaluate_share(job(data, qs=(40,), grid=2, bf16=True, channels_last=True))
    for mq, (keys, labels, probs) in fp32.posteriors.items():
        keys2, labels2, probs2 = bf16.posteriors[mq]
        assert keys == keys2 and np.array_equal(labels, labels2)
        np.testing.assert_allclose(probs, probs2, atol=0.05)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_chosen_on_the_tasks_device(data, monkeypatch, native):
    """"auto" resolves where the share runs: bf16 only on a CPU with native bf16 (the
    capability probes monkeypatched both ways), channels_last on every CPU, and the loader
    hands NHWC batches; the choice comes back with the result (the stage logs it)."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native)
    seen = []
    real = E.Scorer.of

    def spy(net, precision, compile=False):
        scorer = real(net, precision, compile)
        fn = scorer.dense_probs  # what the loader handed, before the scorer's own conversion
        scorer.dense_probs = lambda images, flips: (
            seen.append(images.is_contiguous(memory_format=torch.channels_last)), fn(images, flips))[1]
        return scorer

    monkeypatch.setattr(E.Scorer, "of", spy)
    res = E.evaluate_share(job(data, qs=(40,), grid=1, flips=False, methods=("dense",), bf16="auto",
                               channels_last="auto"))
    assert res.precision == Precision(bf16=native, channels_last=True)
    assert seen and all(seen)
