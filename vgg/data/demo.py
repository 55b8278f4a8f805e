"""A small synthetic image folder for the embedded default config.

Each class has its own shape (structure) and hue (colour), drawn at a random
position and size on a noisy background, at varied image sizes and aspect
ratios so that isotropic rescaling matters. Deterministic for a given seed.

Colour alone must not solve the task (a net that reads the hue reaches ~0% error, and
then nets of any depth tie): a quarter of the objects get a random colour instead of
their class's, so those are told apart by shape only, at a few pixels after rescaling.
Not more: with half of them in random colours the 16-layer D never learnt the disc
(class 0 never predicted, a partial collapse), while three quarters with their class's
colour give every class a cue that any net that trains picks up.
Written as JPEG files in the usual layout: <root>/{train,val}/<class>/*.jpg.
"""

from __future__ import annotations

import io
import posixpath

import numpy as np
from PIL import Image

from vgg.config import DemoDataConfig

# (class name, shape, base RGB colour). Names sort in this order.
CLASSES = [
    ("c0_disc", "disc", (220, 60, 50)),
    ("c1_square", "square", (60, 200, 70)),
    ("c2_hstripes", "hstripes", (50, 90, 230)),
    ("c3_vstripes", "vstripes", (230, 210, 40)),
    ("c4_ring", "ring", (200, 60, 210)),
    ("c5_cross", "cross", (40, 210, 210)),
    ("c6_checker", "checker", (240, 140, 30)),
    ("c7_triangle", "triangle", (150, 150, 150)),
]
MAX_CLASSES = len(CLASSES)
#: Share of objects drawn in their class's colour; the others get a random colour.
CLASS_COLOUR_SHARE = 0.75


def _mask(shape: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean (h, w) mask of one object of the given shape at a random place and size."""
    s = min(h, w)
    r = rng.uniform(0.25, 0.45) * s
    cy = rng.uniform(r, h - r)
    cx = rng.uniform(r, w - r)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = y - cy, x - cx
    inside = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    period = max(4.0, r / 2)
    if shape == "disc":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return inside
    if shape == "hstripes":
        return inside & ((y // (period / 2)) % 2 == 0)
    if shape == "vstripes":
        return inside & ((x // (period / 2)) % 2 == 0)
    if shape == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.6 * r) ** 2)
    if shape == "cross":
        t = r / 3
        return inside & ((np.abs(dy) <= t) | (np.abs(dx) <= t))
    if shape == "checker":
        return inside & (((y // (period / 2)) + (x // (period / 2))) % 2 == 0)
    if shape == "triangle":
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape}")


def make_image(label: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One (h, w, 3) uint8 image of class `label`."""
    _, shape, colour = CLASSES[label]
    bg = rng.uniform(20, 120, size=3)
    ramp = np.linspace(0, 1, w, dtype=np.float32)[None, :, None] * rng.uniform(-40, 40, size=3)
    img = np.broadcast_to(bg + ramp, (h, w, 3)).astype(np.float32)
    # A quarter of the objects in a random colour: the hue is a cue, not the answer.
    base = np.array(colour) if rng.random() < CLASS_COLOUR_SHARE else rng.uniform(30, 255, size=3)
    fg = np.clip(base + rng.normal(0, 20, size=3), 0, 255)
    img = np.where(_mask(shape, h, w, rng)[..., None], fg, img)
    img = img + rng.normal(0, 12, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def generate(fs, root: str, cfg: DemoDataConfig) -> int:
    """Write the demo image folder under `root`; returns the number of images."""
    if cfg.num_classes > MAX_CLASSES:
        raise ValueError(f"data.demo.num_classes: at most {MAX_CLASSES} demo classes, got {cfg.num_classes}")
    rng = np.random.default_rng(cfg.seed)
    n = 0
    for split, per_class in (("train", cfg.train_per_class), ("val", cfg.val_per_class)):
        for label in range(cfg.num_classes):
            folder = posixpath.join(root, split, CLASSES[label][0])
            fs.create_dir(folder, recursive=True)
            for i in range(per_class):
                h, w = rng.integers(cfg.min_side, cfg.max_side + 1, size=2)
                buf = io.BytesIO()
                Image.fromarray(make_image(label, int(h), int(w), rng)).save(buf, "JPEG", quality=90)
                with fs.open_output_stream(posixpath.join(folder, f"{i:05d}.jpg")) as f:
                    f.write(buf.getvalue())
                n += 1
    return n
