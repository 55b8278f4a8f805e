"""VGG nets A, A-LRN, B, C, D, E (Simonyan & Zisserman 2015, Table 1), declared as data.

Pure model code: no I/O, no prints. The state-dict layout follows torchvision
(`features.N`, `classifier.{0,3,6}`), so torchvision's vgg11/13/16/19 weights load
into A/B/D/E with strict=True. There is no adaptive pool in front of the classifier:
FC1 sees exactly the (crop/32) x (crop/32) map (Sec. 2.1); other input sizes go
through `VGG.dense`, the fully-convolutional form of the same net (Sec. 3.2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# A layer spec: int c = 3x3 conv with c outputs; (c, k) = k x k conv; "M" = 2x2 max-pool;
# "LRN" = AlexNet's local response normalisation.
LayerSpec = int | tuple[int, int] | str

CFGS: dict[str, list[LayerSpec]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    # Table 1: A with LRN after the first conv (after its ReLU, as in AlexNet).
    "A-LRN": [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    # Table 1: B plus a 1x1 conv as the third conv of blocks 3, 4 and 5.
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M",
          512, 512, (512, 1), "M", 512, 512, (512, 1), "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
# torchvision names of the nets whose layout (and state dict) torchvision shares.
TORCHVISION_NAMES = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E",
                     "vgg11_bn": "A", "vgg13_bn": "B", "vgg16_bn": "D", "vgg19_bn": "E"}

FC_WIDTH = 4096  # Sec. 2.1: FC-4096, FC-4096, FC-classes
STRIDE = 32  # five 2x2 max-pools, stride 2 (Sec. 2.1)
N_INIT_CONVS = 4  # Sec. 3.1: deeper nets take their first four conv layers from A
INITS = ("normal", "glorot", "he")
_PREFIXES = ("module.", "_orig_mod.")  # DDP wrapper, torch.compile wrapper

_REGISTRY: dict[str, tuple[LayerSpec, ...]] = {}


# ---------------------------------------------------------------- registry
def register_net(name: str, cfg: Sequence[LayerSpec]) -> None:
    """Register a layer table under `name`; a duplicate name is a ValueError."""
    if name in _REGISTRY:
        raise ValueError(f"VGG net {name!r} is already registered")
    _check_cfg(name, cfg)
    _REGISTRY[name] = tuple(cfg)


def _conv_spec(spec: LayerSpec) -> tuple[int, int]:
    """(out_channels, kernel) of a conv spec."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        return spec, 3
    if isinstance(spec, tuple) and len(spec) == 2:
        return spec
    raise ValueError(f"bad layer spec {spec!r}")


def _check_cfg(name: str, cfg: Sequence[LayerSpec]) -> None:
    """Reject malformed specs and tables without exactly five pools (the /32 stride)."""
    for spec in cfg:
        if spec not in ("M", "LRN"):
            c, k = _conv_spec(spec)
            if c < 1 or k < 1 or k % 2 == 0:
                raise ValueError(f"net {name!r}: bad conv spec {spec!r}")
    if list(cfg).count("M") != 5:
        raise ValueError(f"net {name!r}: needs exactly 5 max-pools (stride {STRIDE})")


def available_nets() -> tuple[str, ...]:
    """Names of the registered nets, in registration order."""
    return tuple(_REGISTRY)


def net_config(name: str) -> tuple[LayerSpec, ...]:
    """The layer table of a registered net; an unknown name is a ValueError."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown VGG net {name!r}; valid names: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


for _name, _cfg in CFGS.items():
    register_net(_name, _cfg)


# ---------------------------------------------------------------- layers
def _scaled(channels: int, width: float) -> int:
    """Width multiplier for small-scale runs; width 1.0 is the paper's net."""
    return max(1, round(channels * width))


def _conv_block(c_in: int, c_out: int, k: int, batch_norm: bool) -> list[nn.Module]:
    """Conv (stride 1, 'same' padding, Sec. 2.1) [+ BN] + ReLU, torchvision's order."""
    conv = nn.Conv2d(c_in, c_out, kernel_size=k, padding=k // 2)
    bn = [nn.BatchNorm2d(c_out)] if batch_norm else []
    return [conv, *bn, nn.ReLU(inplace=True)]


class LocalResponseNorm(nn.LocalResponseNorm):
    """`torch.nn.LocalResponseNorm`'s numbers (AlexNet's cross-channel LRN), computed fast.

    y_c = x_c / (k + alpha / size * sum of x^2 over channels [c - size//2, c + (size-1)//2])^beta.
    PyTorch's own (`F.local_response_norm`) views x as 5-D, pads the channel axis and runs
    avg_pool3d, which has no bf16 CPU kernel (autocast runs it and the rest in fp32) and
    touches the whole tensor in about ten passes, forward and backward: A-LRN's training
    step took 4-5x A's in bf16 channels_last on a 2-core CPU. Here the channel window sum is
    one GEMM with a 0/1 band matrix in the tensor's own memory layout (exact sums), the work
    goes in chunks of images small enough to stay in cache, and the backward pass is written
    out and recomputes the denominator instead of storing it. Computed in float32 (float64
    stays float64); the output has the input's dtype and memory format. Under torch.compile
    PyTorch's own ops run (the compiler fuses them).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.is_meta or torch.compiler.is_compiling():
            return super().forward(x)
        return _LRN.apply(x, self.size, self.alpha, self.beta, self.k)


_LRN_CHUNK = 1 << 18  # elements per chunk (1 MiB in float32): the chunk's temporaries stay in cache


def _channel_window(c: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """The (c, c) 0/1 matrix whose row o picks channels o - size//2 .. o + (size-1)//2."""
    i = torch.arange(c, device=like.device)
    offset = i[None, :] - i[:, None]  # (out, in): in - out
    return ((offset >= -(size // 2)) & (offset <= (size - 1) // 2)).to(like.dtype)


def _channel_sum(t: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """window @ t over the channel axis of (N, C, H, W) t, one GEMM in t's memory layout."""
    if t.is_contiguous(memory_format=torch.channels_last) and t.shape[1] > 1:
        return (t.permute(0, 2, 3, 1) @ window.t()).permute(0, 3, 1, 2)
    return (window @ t.contiguous().flatten(2)).view(t.shape)


class _LRN(torch.autograd.Function):
    """LRN on (N, C, H, W), in chunks of images; saves only the input."""

    @staticmethod
    def denominator(xf, window, beta, k) -> tuple[torch.Tensor, torch.Tensor]:
        """(d, d^beta) with d = k + alpha / size * (sum of x^2 over the window); `window` holds
        alpha / size in place of 1."""
        d = _channel_sum(xf * xf, window).add_(k)
        if beta == 0.75:  # AlexNet's: a fractional pow costs 2.5x two sqrt and a mul on a CPU
            r = d.sqrt()
            return d, r * r.sqrt()
        return d, d.pow(beta)

    @staticmethod
    def chunks(x: torch.Tensor) -> list[slice]:
        step = max(1, _LRN_CHUNK * len(x) // max(1, x.numel()))  # images per chunk
        return [slice(i, i + step) for i in range(0, len(x), step)]

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        dtype = torch.promote_types(x.dtype, torch.float32)
        window = _channel_window(x.shape[1], size, x.new_empty(0, dtype=dtype)) * (alpha / size)
        y = torch.empty_like(x)
        with torch.autocast(x.device.type, enabled=False):
            for part in _LRN.chunks(x):
                xf = x[part].to(dtype)
                torch.div(xf, _LRN.denominator(xf, window, beta, k)[1], out=y[part])
        ctx.save_for_backward(x)
        ctx.constants = size, alpha, beta, k
        return y

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        size, alpha, beta, k = ctx.constants
        dtype = torch.promote_types(x.dtype, torch.float32)
        like = x.new_empty(0, dtype=dtype)
        window = _channel_window(x.shape[1], size, like) * (alpha / size)
        dx = torch.empty_like(x)
        with torch.autocast(x.device.type, enabled=False):
            for part in _LRN.chunks(x):
                xf = x[part].to(dtype)
                d, p = _LRN.denominator(xf, window, beta, k)
                g = grad[part].to(dtype) / p  # dL/dy / d^beta (not in place: grad may be dtype)
                # dx_j = g_j - 2 beta x_j * alpha / size * (sum over the windows c holding j of g_c x_c / d_c)
                dx[part] = g.addcmul_(xf, _channel_sum(g * xf / d, window.t()), value=-2 * beta)
        return dx, None, None, None, None


def make_features(cfg: Sequence[LayerSpec], width: float = 1.0,
                  batch_norm: bool = False) -> nn.Sequential:
    """The conv stack of a layer table, at torchvision's `features.N` indices."""
    layers: list[nn.Module] = []
    c_in = 3  # RGB input (Sec. 2.1)
    for spec in cfg:
        if spec == "M":
            # ceil_mode: Caffe's pooling output size, ceil((H - 2) / 2) + 1, which the authors'
            # dense evaluation used; a side that is not a multiple of 32 keeps its last partial
            # cell instead of losing up to 31 border pixels. Same output at multiples of 32.
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        elif spec == "LRN":  # AlexNet's constants (Krizhevsky et al. 2012)
            layers.append(LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0))
        else:
            c, k = _conv_spec(spec)
            layers += _conv_block(c_in, _scaled(c, width), k, batch_norm)
            c_in = _scaled(c, width)
    return nn.Sequential(*layers)


def _last_channels(cfg: Sequence[LayerSpec], width: float) -> int:
    """Channels of the last conv (C5), the depth of FC1's input map."""
    convs = [s for s in cfg if s not in ("M", "LRN")]
    return _scaled(_conv_spec(convs[-1])[0], width)


def make_classifier(in_features: int, hidden: int, num_classes: int,
                    dropout: float) -> nn.Sequential:
    """FC1, FC2, FC3 at torchvision's indices 0, 3, 6; dropout on FC1 and FC2 (Sec. 3.1)."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


# ---------------------------------------------------------------- model
class VGG(nn.Module):
    """A VGG net: `features` (conv stack) and `classifier` (FC1-FC3), no adaptive pool.

    `forward` takes crop x crop inputs only (training / multi-crop); `dense` runs the
    same parameters fully convolutionally on larger images (Sec. 3.2).
    """

    def __init__(self, name: str, cfg: Sequence[LayerSpec], *, num_classes: int = 1000,
                 width: float = 1.0, crop: int = 224, dropout: float = 0.5,
                 batch_norm: bool = False) -> None:
        super().__init__()
        self.name, self.cfg, self.num_classes = name, tuple(cfg), num_classes
        self.width, self.crop, self.batch_norm = width, crop, batch_norm
        self.features = make_features(cfg, width, batch_norm)
        c5, g = _last_channels(cfg, width), self.grid
        self.classifier = make_classifier(c5 * g * g, _scaled(FC_WIDTH, width),
                                          num_classes, dropout)

    @property
    def grid(self) -> int:
        """Side of the feature map FC1 sees: crop / 32."""
        return self.crop // STRIDE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (N, num_classes) of crop x crop images (N, 3, crop, crop)."""
        f = self.features(x)  # (N, C5, crop/32, crop/32)
        if tuple(f.shape[-2:]) != (self.grid, self.grid):
            raise ValueError(
                f"{self.name}: input {tuple(x.shape[-2:])} gives a {tuple(f.shape[-2:])} feature "
                f"map, FC1 expects {self.grid}x{self.grid} (crop {self.crop}); "
                "use net.dense(x) / net.dense_scores(x) for other input sizes")
        return self.classifier(torch.flatten(f, 1))  # torchvision's (C, H, W) flatten order

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Class score map (N, num_classes, h, w) of the fully-convolutional net (Sec. 3.2).

        FC1 acts as a (crop/32)^2 conv, FC2 and FC3 as 1x1 convs, using views of the
        Linear weights (no copies, no second model). Dropout is not applied; BN runs in
        whatever mode the net is in, so call `net.eval()` first.
        """
        if min(x.shape[-2:]) < self.crop:
            raise ValueError(f"{self.name}: dense input {tuple(x.shape[-2:])} is smaller "
                             f"than the crop {self.crop} on a side")
        h = self.features(x)  # (N, C5, ceil(H/32), ceil(W/32)): ceil-mode pools lose no border
        fc1, fc2, fc3 = (m for _, m in fc_layers(self))
        h = F.relu(F.conv2d(h, _as_conv(fc1, self.grid), fc1.bias))  # (N, 4096, ceil(H/32)-g+1, .)
        h = F.relu(F.conv2d(h, _as_conv(fc2, 1), fc2.bias))
        return F.conv2d(h, _as_conv(fc3, 1), fc3.bias)

    def dense_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial average of the dense score map (Sec. 3.2): (N, num_classes)."""
        return self.dense(x).mean(dim=(-2, -1))


def set_pool_rounding(net: VGG, rounding: str) -> VGG:
    """"ceil" (Caffe's, the default: dense evaluation loses no border) or "floor" (PyTorch's
    and torchvision's default) for every max-pool; the same at multiples of 32. -> net."""
    if rounding not in ("ceil", "floor"):
        raise ValueError(f"pool rounding must be 'ceil' or 'floor', got {rounding!r}")
    for m in net.features:
        if isinstance(m, nn.MaxPool2d):
            m.ceil_mode = rounding == "ceil"
    return net


def _as_conv(fc: nn.Linear, k: int) -> torch.Tensor:
    """A Linear weight viewed as a k x k conv kernel (out, C, k, k); (C, H, W) flatten order."""
    return fc.weight.view(fc.out_features, -1, k, k)


def _check_options(num_classes: int, width: float, crop: int, dropout: float,
                   init: str, init_std: float) -> None:
    """Reject option values that cannot build a net, naming the option."""
    checks = {
        "num_classes": isinstance(num_classes, int) and num_classes >= 1,
        "width": width > 0,
        "crop": isinstance(crop, int) and crop >= STRIDE and crop % STRIDE == 0,
        "dropout": 0.0 <= dropout < 1.0,
        "init": init in INITS,
        "init_std": init_std > 0,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"bad VGG option(s) {bad}: num_classes>=1, width>0, crop a positive "
                         f"multiple of {STRIDE}, 0<=dropout<1, init in {INITS}, init_std>0")


def build_vgg(name: str, *, num_classes: int = 1000, width: float = 1.0, crop: int = 224,
              dropout: float = 0.5, batch_norm: bool = False, init: str = "normal",
              init_std: float = 0.01) -> VGG:
    """Build a registered net by name and initialise it (see `init_weights`)."""
    cfg = net_config(name)
    _check_options(num_classes, width, crop, dropout, init, init_std)
    net = VGG(name, cfg, num_classes=num_classes, width=width, crop=crop,
              dropout=dropout, batch_norm=batch_norm)
    init_weights(net, init=init, std=init_std)
    return net


def forward_macs(net: VGG) -> int:
    """Multiply-accumulates of one forward pass of one net.crop x net.crop image through
    the conv and linear layers (VGG-D at 224: 15.5 G; a training step is about 3 x 2 x that
    in FLOPs). Counted on a twin built on the meta device: no memory, no compute."""
    crop, macs = net.crop, 0

    def hook(m: nn.Module, inputs, output) -> None:
        nonlocal macs
        if isinstance(m, nn.Conv2d):
            macs += output[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            macs += m.in_features * m.out_features

    with torch.device("meta"):
        ghost = build_vgg(net.name, num_classes=net.num_classes, width=net.width, crop=crop,
                          batch_norm=net.batch_norm).eval()
    for m in ghost.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        ghost(torch.empty(1, 3, crop, crop, device="meta"))
    return macs


# ---------------------------------------------------------------- initialisation
def init_weights(net: nn.Module, init: str = "normal", std: float = 0.01) -> None:
    """Random init (Sec. 3.1): conv/FC weights N(0, std^2), biases 0; BN weight 1, bias 0.

    The paper's text says "10^-2 variance" (std 0.1), but the released Caffe models and
    torchvision use std 0.01, hence the default. `init="glorot"` uses xavier_uniform_
    (the authors note it makes pre-training from A unnecessary). `init="he"` uses
    kaiming_normal_ (fan-in, ReLU gain): unlike Glorot's, it keeps the signal's variance
    through a deep ReLU stack, which is what lets a 16-layer net without BN train from a
    few new layers (He et al. 2015, Sec. 2.2 and Fig. 3: Xavier stalls a deep plain net).
    """
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if init == "glorot":
                nn.init.xavier_uniform_(m.weight)
            elif init == "he":
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, mean=0.0, std=std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv_layers(net: VGG) -> list[tuple[str, nn.Conv2d]]:
    """(state-dict prefix, module) of every conv layer, in depth order."""
    return [(f"features.{i}", m) for i, m in enumerate(net.features) if isinstance(m, nn.Conv2d)]


def fc_layers(net: VGG) -> list[tuple[str, nn.Linear]]:
    """(state-dict prefix, module) of FC1, FC2, FC3."""
    return [(f"classifier.{i}", m) for i, m in enumerate(net.classifier)
            if isinstance(m, nn.Linear)]


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP's "module." / torch.compile's "_orig_mod." key prefixes."""
    out = {}
    for key, value in state.items():
        for p in _PREFIXES:
            key = key.removeprefix(p)
        out[key] = value
    return out


def conv_positions(net: VGG) -> list[tuple[int, int]]:
    """(block, index in block), 1-based, of every conv in depth order: Caffe's conv{b}_{i}."""
    block, index, positions = 1, 0, []
    for m in net.features:
        if isinstance(m, nn.MaxPool2d):
            block, index = block + 1, 0
        elif isinstance(m, nn.Conv2d):
            index += 1
            positions.append((block, index))
    return positions


def _layout(name: str, batch_norm: bool) -> VGG:
    """A net's layout (keys, layer order) on the meta device: no memory, no init cost."""
    with torch.device("meta"):
        return VGG(name, net_config(name), width=1 / 64, crop=STRIDE, batch_norm=batch_norm)


def _layer_pairs(net: VGG, src: VGG) -> list[tuple[str, nn.Module, str]]:
    """(target prefix, target module, source prefix): the source's first four convs go to
    the convs at the same (block, index) in the target (Sec. 3.1), FC1-3 to FC1-3."""
    dst_convs = dict(zip(conv_positions(net), conv_layers(net)))
    src_convs = list(zip(conv_positions(src), conv_layers(src)))[:N_INIT_CONVS]
    missing = [pos for pos, _ in src_convs if pos not in dst_convs]
    if missing:
        raise ValueError(f"{net.name} has no conv at (block, index) {missing} "
                         f"to take {src.name}'s from")
    convs = [(*dst_convs[pos], src_prefix) for pos, (src_prefix, _) in src_convs]
    return convs + [(d, m, s) for (d, m), (s, _) in zip(fc_layers(net), fc_layers(src))]


def _shape_error(net: VGG, key: str, src: torch.Size, dst: torch.Size) -> ValueError:
    """A ValueError naming the key, both shapes and the option that most likely differs."""
    if key.startswith("classifier.6") and src[:1] != dst[:1]:
        cause = "num_classes differ"
    elif key == "classifier.0.weight" and src[0] == dst[0]:
        cause = "crop differs (FC1 input is C5 * (crop/32)^2)"
    else:
        cause = "widths differ"
    return ValueError(
        f"{net.name}: shape mismatch at {key!r}: state {tuple(src)} vs net {tuple(dst)}; "
        f"{cause} (net has width={net.width}, crop={net.crop}, num_classes={net.num_classes})")


def init_from(net: VGG, source_state: Mapping[str, torch.Tensor],
              source_name: str = "A") -> list[str]:
    """Copy net A's first four convs and its three FCs into `net` (Sec. 3.1); return the keys.

    `source_state` is a state dict of `source_name` (A) with the same width, crop and
    num_classes. A's first four convs (conv1_1, conv2_1, conv3_1, conv3_2) go to the convs
    at the same (block, index) in `net`, where their shapes fit (in B-E the first four
    convs by depth order are 64/64/128/128 wide and could not take A's 64/128/256/256);
    every other layer keeps its random init. All shapes are checked before any copy.
    """
    state = map_torchvision_state(source_state, source_name)
    src = _layout(source_name, _has_batch_norm(state))
    plan = []  # (target key, target tensor, source tensor)
    for dst, module, src_prefix in _layer_pairs(net, src):
        for p in ("weight", "bias"):
            target, value = getattr(module, p), state[f"{src_prefix}.{p}"]
            if target.shape != value.shape:
                raise _shape_error(net, f"{dst}.{p}", value.shape, target.shape)
            plan.append((f"{dst}.{p}", target, value))
    with torch.no_grad():
        for _, target, value in plan:
            target.copy_(value)
    return [key for key, _, _ in plan]


# ---------------------------------------------------------------- weight loading
def _check_keys(expected: Sequence[str], state: Mapping[str, torch.Tensor], name: str) -> None:
    """ValueError listing missing and unexpected keys, if any."""
    missing = [k for k in expected if k not in state]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"state does not match the layout of net {name!r}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                         f"{' (and more)' if len(missing) > 5 or len(unexpected) > 5 else ''}")


def map_torchvision_state(state: Mapping[str, torch.Tensor],
                          net_name: str) -> dict[str, torch.Tensor]:
    """Map a torchvision-layout state dict onto net `net_name`'s keys (pure, no loading).

    The layouts of A/B/D/E are torchvision's vgg11/13/16/19 (`net_name` may be either
    name), so the mapping is the identity after stripping a DDP "module." prefix; the
    keys are validated against the net's layout (BN inferred from `running_mean` keys).
    """
    name = TORCHVISION_NAMES.get(net_name, net_name)
    out = _strip_prefixes(state)
    _check_keys(list(_layout(name, _has_batch_norm(out)).state_dict()), out, name)
    return out


def _has_batch_norm(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict comes from a BN variant."""
    return any(k.endswith("running_mean") for k in state)


def load_full(net: VGG, state: Mapping[str, torch.Tensor]) -> None:
    """Load a whole same-architecture state (S=256 -> S=384 -> jittered, Sec. 3.1), strictly.

    Shape mismatches raise a ValueError naming the first mismatching key and both shapes.
    """
    state = map_torchvision_state(state, net.name)
    _check_keys(list(net.state_dict()), state, net.name)  # e.g. a BN state into a plain net
    for key, target in net.state_dict().items():
        if target.shape != state[key].shape:
            raise _shape_error(net, key, state[key].shape, target.shape)
    net.load_state_dict(state, strict=True)
