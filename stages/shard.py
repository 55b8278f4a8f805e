"""The shard stage: a dataset -> Parquet shards, class index, RGB statistics
(`pipeline.sharding`). `data.layout`: an image folder (`vgg.data.folders`), or ILSVRC-2012
as its official archives or the Kaggle copy (`vgg.data.imagenet`). Without `data.root`,
a small synthetic dataset is generated inside the output first (`vgg.data.demo`).

Output (`vgg.artifacts.Shards`): train/ and val/ Parquet shards, classes.json,
stats.json, skipped.csv and converted.csv (every file left out or converted, with
the reason), the class counts as a table.
"""

from __future__ import annotations

import posixpath

from pipeline.dag import ShardInputs, ShardSection
from pipeline.stage import StageContext, StageResult
from vgg.artifacts import Shards, shard_files_to_log
from vgg.data import demo
from vgg.data.layouts import list_dataset
from pipeline.sharding import shard


def check(config: ShardSection) -> None:
    """Preflight (before MLflow and Ray start): the dataset's layout (`data.layout`), if a
    dataset is given."""
    if config.data.root is not None:
        list_dataset(config.data.root, config.data.layout)


def run(config: ShardSection, inputs: ShardInputs, ctx: StageContext) -> StageResult:
    data = config.data
    root = data.root
    if root is None:
        root = posixpath.join(ctx.out.uri, "demo_data")
        n = demo.generate(ctx.out.fs, ctx.out.join("demo_data"), data.demo)
        ctx.log(f"generated the demo dataset: {n} images in {root}")
    m = shard(root, ctx.out, config.shard, log=ctx.log,
              per_class={"train": data.train_per_class, "val": data.val_per_class}, layout=data.layout)
    if data.root is None:
        m["root"] = "demo_data/ (generated inside this output)"
    splits = m["splits"]
    metrics = {f"{s}_images": v["images"] for s, v in splits.items()}
    metrics.update({f"{s}_shards": len(v["shards"]) for s, v in splits.items()})
    metrics.update({f"{s}_bytes": v["bytes"] for s, v in splits.items()})
    metrics.update(
        skipped=m["skipped"], converted=m["converted"], num_classes=len(m["classes"]),
        images_per_s=sum(v["images"] for v in splits.values()) / max(m["seconds"], 1e-9),
    )
    shards = Shards(ctx.out)
    mean = shards.stats()["mean_rgb"]
    metrics.update({f"mean_{c}": v for c, v in zip("rgb", mean)})
    table = {"class": m["classes"], **{s: [splits[s]["per_class"][c] for c in m["classes"]] for s in ("train", "val")}}
    return StageResult(
        metrics=metrics,
        params={"data_root_resolved": root},
        tables={"class_counts.json": table},
        artifacts=shard_files_to_log(shards),
        manifest=m,
        summary=(f"{metrics['train_images']} train / {metrics['val_images']} val images, "
                 f"{m['skipped']} skipped, {m['converted']} converted, mean RGB "
                 + ", ".join(f"{v:.1f}" for v in mean)),
    )
