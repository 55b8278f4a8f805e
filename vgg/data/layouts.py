"""The dataset layouts `data.layout` names: an image folder (`vgg.data.folders`) or
ILSVRC-2012 as people have it (`vgg.data.imagenet`: the official archives, or Kaggle's copy).
"""

from __future__ import annotations

from vgg.data import imagenet
from vgg.data.folders import LAYOUTS, DatasetError, Listing, list_image_folder


def list_dataset(root: str, layout: str = "folders") -> Listing:
    """List the dataset at `root` in the given layout (`data.layout`, see LAYOUTS);
    raises DatasetError naming the file."""
    if layout == "folders":
        return list_image_folder(root)
    if layout == "ilsvrc2012":
        return imagenet.list_ilsvrc2012(root)
    if layout == "kaggle":
        return imagenet.list_kaggle(root)
    raise DatasetError(f"data.layout: must be one of {list(LAYOUTS)}, got {layout!r}")
