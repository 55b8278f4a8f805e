"""The augment stage: the augmentation spec every train and evaluate stage builds its DALI
loaders from (`vgg.data.augmentation`: the config's options plus the shards' RGB
statistics), checked on a few batches of every pipeline kind (`vgg.data.loaders`), with
their throughput and a PNG grid of training samples.

Output (`vgg.artifacts.Augmentation`): spec.json, samples.png.
"""

from __future__ import annotations

import io

from PIL import Image

from pipeline.config import check_scale_of
from pipeline.dag import AugmentInputs, AugmentSection
from pipeline.stage import StageContext, StageResult
from pipeline.storage import write_bytes
from vgg.artifacts import write_augmentation
from vgg.data.augmentation import spec_from_config
from vgg.data.loaders import check_pipelines, resolve_device_id, sample_grid

SAMPLES_FILE = "samples.png"


def run(config: AugmentSection, inputs: AugmentInputs, ctx: StageContext) -> StageResult:
    cfg = config.augment
    spec = spec_from_config(cfg, inputs.shards.stats())
    shards = inputs.shards.uri  # a local path or a filesystem URI: read through pyarrow.fs
    scale = check_scale_of(cfg)
    rates = check_pipelines(shards, spec, scale, cfg.check_batches, cfg.check_batch_size, cfg.seed, ctx.log)
    grid = sample_grid(shards, spec, scale, n=16, seed=cfg.seed)
    zoom = max(1, 512 // grid.shape[1])  # small crops: enlarge (nearest) so a person can see them
    buf = io.BytesIO()
    Image.fromarray(grid.repeat(zoom, 0).repeat(zoom, 1)).save(buf, "PNG")
    write_bytes(ctx.out.fs, ctx.out.join(SAMPLES_FILE), buf.getvalue())
    spec_file = write_augmentation(ctx.out, spec)
    device = "gpu" if resolve_device_id(spec, None) is not None else "cpu"
    return StageResult(
        metrics={f"{k}_images_per_s": v for k, v in rates.items()},
        params={"decoder": "mixed" if device == "gpu" else "cpu", "check_scale": list(scale),
                "mean_rgb": [round(v, 3) for v in spec.mean_rgb]},
        artifacts=[spec_file, SAMPLES_FILE],
        manifest={"spec": spec.to_dict(), "check_scale": list(scale), "device": device,
                  "images_per_s": rates},
        summary=f"spec checked on {device}: train {rates['train']:.0f} images/s at S in {list(scale)}",
    )
