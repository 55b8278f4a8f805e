"""Model files: model.pt (the trained net and what made it), the starting weights of a
train stage (random, Glorot, from A, from a whole net) and imported torchvision weights.

`model_bytes` / `load_model` are the only writer and reader of the model.pt format
(`vgg.artifacts.write_model` and `TrainedNet` name the file).
"""

from __future__ import annotations

import hashlib
import json
import io
import math
import posixpath
from typing import Any, Mapping, Protocol

import torch

from vgg.config import NetPlan, TrainConfig
from vgg.errors import DamagedFile
from vgg.storage import StageOutput, exists, read_bytes, resolve_uri, write_bytes
from vgg.models import VGG, build_vgg, init_from, load_full, map_torchvision_state

INIT_WEIGHTS_FILE = "init_state.pt"  # in the scratch directory: the starting weights


class SourceNet(Protocol):
    """A trained net to initialise from (`vgg.artifacts.TrainedNet`, or the ladder's)."""

    uri: str

    def load(self) -> tuple[VGG, dict[str, Any]]: ...


def model_bytes(net: VGG, meta: Mapping[str, Any]) -> bytes:
    """The model.pt format: {"state_dict", "arch", "width", "crop", "num_classes",
    "batch_norm", **meta}, as torch.save writes it."""
    payload = {"state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
               "arch": net.name, "width": net.width, "crop": net.crop,
               "num_classes": net.num_classes, "batch_norm": net.batch_norm, **meta}
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_model(uri: str) -> tuple[VGG, dict[str, Any]]:
    """(net in eval mode, meta) from a model.pt path or URI (`TrainedNet.model_uri`).

    meta holds everything of model.pt but the weights: arch, width, crop, num_classes,
    batch_norm, classes, net, config, epoch, val_top1_err, val_top5_err.
    """
    fs, path = resolve_uri(uri)
    return model_from_bytes(read_bytes(fs, path), uri)


def model_from_bytes(data: bytes, where: str = "<bytes>") -> tuple[VGG, dict[str, Any]]:
    """(net in eval mode, meta) from the bytes of a model.pt (`load_model`); bytes that are
    no model.pt (truncated, corrupt) raise `vgg.errors.DamagedFile` naming `where`."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, pickle errors...
        raise DamagedFile(f"cannot read the model file {where} ({len(data)} bytes): {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    state = payload.pop("state_dict")
    dropout = payload.get("config", {}).get("train", {}).get("dropout", 0.5)
    net = empty_net(payload["arch"], num_classes=payload["num_classes"], width=payload["width"],
                    crop=payload["crop"], dropout=dropout, batch_norm=payload.get("batch_norm", False))
    load_full(net, state)
    return net.eval(), payload


#: `empty_net` builds nets of up to about this many weights on the CPU, initialised (a few
#: tenths of a second at most), and larger ones on the meta device, uninitialised: its first
#: use in a process costs about 1.3 s of CPU (PyTorch loads its meta kernels; measured on
#: 2 cores), which every Ray Train worker and evaluation task of the demo paid.
META_MIN_WEIGHTS = 20_000_000


def empty_net(arch: str, **options: Any) -> VGG:
    """`build_vgg(arch, **options)` with weights to be overwritten, to load a state into
    (a large net skips the random init: seconds for a full-size net). The global RNG is
    left as it was."""
    if not on_meta_device(options.get("width", 1.0), options.get("crop", 224)):
        with torch.random.fork_rng(devices=[]):
            return build_vgg(arch, **options)
    with torch.device("meta"):
        net = build_vgg(arch, **options)
    return net.to_empty(device="cpu")


def on_meta_device(width: float, crop: int) -> bool:
    """Whether `empty_net` builds a net of this width and crop on the meta device: when it
    has more than META_MIN_WEIGHTS weights, roughly (D: 15 M conv, FC1 512 x (crop/32)^2 x
    4096, FC2 4096 x 4096, all times width^2)."""
    return width * width * (15e6 + 512 * 4096 * (crop / 32) ** 2 + 4096 * 4096) > META_MIN_WEIGHTS


def initial_model(t: TrainConfig, net_plan: NetPlan, num_classes: int, crop: int,
                  source: SourceNet | None) -> tuple[VGG, dict[str, Any]]:
    """The net a train stage starts from, and a record of how it was initialised.

    "random": N(0, init_std^2) weights, zero biases; "glorot": Xavier-uniform (both seeded
    by train.seed); {from_A: train/X}: X's first four convs and three FCs copied over the
    random init (Sec. 3.1), which is N(0, init_std^2) or, with `rest: glorot`, Xavier;
    {full: train/X}: all of X's weights (same arch).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        net = build_vgg(net_plan.arch, num_classes=num_classes, width=t.width, crop=crop,
                        dropout=t.dropout, batch_norm=t.batch_norm,
                        init=net_plan.random_init,
                        init_std=t.init_std)
    info: dict[str, Any] = {"init": net_plan.init if isinstance(net_plan.init, str) else dict(net_plan.init),
                            "copied": []}
    if net_plan.init_source is None:
        return net, info
    if source is None:
        raise ValueError(f"init {net_plan.init}: the net {net_plan.init_source} is not among the inputs")
    src_net, meta = source.load()
    if "from_A" in net_plan.init:
        info["copied"] = init_from(net, src_net.state_dict(), meta["arch"])
    else:
        load_full(net, src_net.state_dict())
        info["copied"] = list(net.state_dict())
    info.update(source=net_plan.init_source, source_uri=source.uri, source_epoch=meta.get("epoch"))
    return net, info


def import_weights(uri: str, arch: str, classes: list[str], crop: int,
                   dropout: float = 0.5) -> VGG:
    """A net of `arch` at width 1.0 holding a torchvision VGG state_dict (file path or URI).

    num_classes comes from the checkpoint and must equal the dataset's; the crop follows
    from FC1's input size (C5 x (crop/32)^2, 224 for torchvision) and must equal `crop`.
    """
    fs, path = resolve_uri(uri)
    if not exists(fs, path):
        raise FileNotFoundError(f"net.weights: {uri} does not exist")
    state = torch.load(io.BytesIO(read_bytes(fs, path)), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:  # a model.pt-like wrapper
        state = state["state_dict"]
    state = map_torchvision_state(state, arch)
    fc1, fc3 = state["classifier.0.weight"], state["classifier.6.weight"]
    if fc3.shape[0] != len(classes):
        raise ValueError(f"net.weights: {uri} has {fc3.shape[0]} classes, the dataset has "
                         f"{len(classes)}; import weights trained on the same classes")
    c5 = max(v.shape[0] for k, v in state.items() if k.startswith("features.") and v.ndim == 4)
    grid = math.isqrt(fc1.shape[1] // c5)
    if grid * grid * c5 != fc1.shape[1] or 32 * grid != crop:
        raise ValueError(f"net.weights: FC1 of {uri} takes {fc1.shape[1]} inputs, i.e. crop "
                         f"{32 * grid} (C5 = {c5}); augment.crop is {crop}")
    bn = any(k.endswith("running_mean") for k in state)
    net = empty_net(arch, num_classes=len(classes), width=1.0, crop=crop, dropout=dropout,
                    batch_norm=bn)
    load_full(net, state)
    return net


def write_init_weights(scratch: StageOutput, net: VGG) -> str:
    """The starting weights, in the scratch dir where every worker can read them; -> URI."""
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    write_bytes(scratch.fs, scratch.join(INIT_WEIGHTS_FILE), buf.getvalue())
    return posixpath.join(scratch.uri, INIT_WEIGHTS_FILE)


def read_weights(uri: str) -> dict[str, torch.Tensor]:
    """A state_dict written by `write_init_weights`."""
    fs, path = resolve_uri(uri)
    return torch.load(io.BytesIO(read_bytes(fs, path)), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- training checkpoints
STATE_FILE = "state.pt"  # a checkpoint's training state (`TrainState.state_dict` and more)
MANIFEST_FILE = "state.json"  # beside it, written after it: its size and SHA-256, epoch and score
SCORE = "val_top1_acc"  # the checkpoint score (`vgg.training.loop.SCORE`)


def write_checkpoint(fs, folder: str, saved: Mapping[str, Any], epoch: int, score: float) -> None:
    """One checkpoint folder: STATE_FILE, then MANIFEST_FILE (each written atomically), so a
    crash leaves a folder that `check_checkpoint` refuses, never one it takes for complete."""
    data, manifest = checkpoint_bytes(saved, epoch, score)
    write_bytes(fs, posixpath.join(folder, STATE_FILE), data)
    write_bytes(fs, posixpath.join(folder, MANIFEST_FILE), manifest)


def checkpoint_bytes(saved: Mapping[str, Any], epoch: int, score: float) -> tuple[bytes, bytes]:
    """(STATE_FILE's bytes, MANIFEST_FILE's bytes) of a checkpoint."""
    buf = io.BytesIO()
    torch.save(dict(saved), buf)
    data = buf.getvalue()
    manifest = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "epoch": epoch, SCORE: score}
    return data, json.dumps(manifest).encode()


def check_checkpoint(fs, folder: str) -> tuple[int, float]:
    """(epoch, score) of a complete checkpoint folder; raises ValueError saying what is wrong."""
    state_path, manifest_path = posixpath.join(folder, STATE_FILE), posixpath.join(folder, MANIFEST_FILE)
    if not exists(fs, state_path):
        raise ValueError(f"no {STATE_FILE} (written partly)")
    data = read_bytes(fs, state_path)
    if exists(fs, manifest_path):
        try:
            m = json.loads(read_bytes(fs, manifest_path))
            want = (m["bytes"], m["sha256"])
            epoch, score = int(m["epoch"]), float(m[SCORE])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"unreadable {MANIFEST_FILE} ({type(e).__name__})") from None
        if (len(data), hashlib.sha256(data).hexdigest()) != want:
            raise ValueError(f"{STATE_FILE} has {len(data)} bytes or a SHA-256 other than its "
                             f"{MANIFEST_FILE} says (written partly, or damaged)")
        return epoch, score
    try:  # a checkpoint of an earlier version (no manifest): complete if it loads
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return int(state["epoch"]), float(state["progress"]["history"][-1][SCORE])
    except Exception as e:  # noqa: BLE001 - any failure to load means: not usable
        raise ValueError(f"{STATE_FILE} does not load ({type(e).__name__}: {str(e)[:120]})") from None


def read_checkpoint(fs, folder: str) -> dict[str, Any]:
    """The saved state of a checkpoint folder (CPU tensors)."""
    return torch.load(io.BytesIO(read_bytes(fs, posixpath.join(folder, STATE_FILE))), map_location="cpu",
                      weights_only=True)
