"""Tests of vgg/models.py: layer tables, parameter counts, torchvision layout, dense mode,
initialisation (Sec. 3.1) and weight loading. CPU only; width-1 nets only where needed."""

import math

import pytest
import torch
import torchvision
from torch import nn

from vgg.models import (
    available_nets, build_vgg, conv_layers, conv_positions, fc_layers, forward_macs, init_from,
    load_full, map_torchvision_state, net_config, register_net,
)

NETS = ("A", "A-LRN", "B", "C", "D", "E")
# Table 2 (exact counts: torchvision's num_params for A/B/D/E; C = B + three 1x1 convs).
PARAMS = {"A": 132_863_336, "A-LRN": 132_863_336, "B": 133_047_848,
          "C": 133_638_952, "D": 138_357_544, "E": 143_667_240}
WEIGHT_LAYERS = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}  # Table 1
TORCHVISION = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}


def small(name, seed=0, **options):
    """A tiny net (width 0.25, crop 32, 10 classes) with a fixed seed."""
    torch.manual_seed(seed)
    return build_vgg(name, **{"width": 0.25, "crop": 32, "num_classes": 10, **options})


def lively(net, seed=0):
    """He-scale weights and non-zero biases, so outputs are O(1) and bias paths matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                m.bias.uniform_(-0.1, 0.1)
    return net.eval()


def randomize(model, seed=0):
    """Cheap random fill of every state tensor (uniform_ is ~4x faster than normal_ on CPU)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if not t.is_floating_point():
                t.zero_()
            elif key.endswith("running_var"):
                t.uniform_(0.5, 1.5, generator=gen)
            elif t.ndim > 1:
                bound = math.sqrt(6 / t[0].numel())  # He-uniform: keeps activations O(1)
                t.uniform_(-bound, bound, generator=gen)
            else:
                t.uniform_(-0.1, 0.1, generator=gen)
    return model.eval()


def meta_build(name, **options):
    """A net on the meta device: layout and parameter shapes only, no memory or init cost."""
    with torch.device("meta"):
        return build_vgg(name, **options)


def rel_err(a, b):
    return ((a.float() - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- registry and tables
def test_registry_lists_the_six_nets():
    assert available_nets() == NETS


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown VGG net 'F'.*A, A-LRN, B, C, D, E"):
        build_vgg("F")


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="already registered"):
        register_net("A", net_config("A"))


@pytest.mark.parametrize("option", [{"crop": 100}, {"width": 0}, {"init": "kaiming"},
                                    {"dropout": 1.0}, {"num_classes": 0}])
def test_bad_options_rejected(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        build_vgg("A", **option)


def test_c_has_1x1_convs_as_third_conv_of_blocks_3_to_5():
    kernels = [m.kernel_size[0] for _, m in conv_layers(meta_build("C"))]
    assert kernels == [3, 3, 3, 3, 3, 3, 1, 3, 3, 1, 3, 3, 1]


def test_a_lrn_has_alexnet_lrn_after_first_conv():
    feats = meta_build("A-LRN").features
    assert isinstance(feats[0], nn.Conv2d) and isinstance(feats[1], nn.ReLU)
    lrn = feats[2]
    assert isinstance(lrn, nn.LocalResponseNorm)
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 2.0)
    assert sum(isinstance(m, nn.LocalResponseNorm) for m in feats) == 1


@pytest.mark.parametrize("name", NETS)
def test_exact_parameter_count_and_depth(name):
    net = meta_build(name)  # width 1, crop 224, 1000 classes
    assert sum(p.numel() for p in net.parameters()) == PARAMS[name]
    assert len(conv_layers(net)) + len(fc_layers(net)) == WEIGHT_LAYERS[name]
    assert [p for p, _ in fc_layers(net)] == ["classifier.0", "classifier.3", "classifier.6"]
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in net.modules())
    assert (net.name, net.crop, net.width, net.num_classes) == (name, 224, 1.0, 1000)


def hand_macs(name, width=1.0, crop=224, classes=1000):
    """MACs from the layer table: every conv keeps the map size, every "M" halves it."""
    side, c_in, macs = crop, 3, 0
    for spec in net_config(name):
        if spec == "M":
            side //= 2
        elif spec != "LRN":
            c, k = (spec, 3) if isinstance(spec, int) else spec
            c = max(1, round(c * width))
            macs += side * side * c_in * c * k * k
            c_in = c
    hidden = max(1, round(4096 * width))
    return macs + c_in * side * side * hidden + hidden * hidden + hidden * classes


@pytest.mark.parametrize("name", NETS)
def test_forward_macs(name):
    """Conv + FC multiply-accumulates per image: the layer table's count, and at 224 the
    figures of torchvision's model cards (vgg11/13/16/19: 7.61/11.31/15.47/19.63 G)."""
    assert forward_macs(meta_build(name)) == hand_macs(name)
    assert forward_macs(meta_build(name, width=0.5, crop=32, num_classes=10)) == hand_macs(name, 0.5, 32, 10)
    if name in TORCHVISION:
        gmacs = {"A": 7.61, "B": 11.31, "D": 15.47, "E": 19.63}[name]
        assert round(forward_macs(meta_build(name)) / 1e9, 2) == gmacs


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("width", [0.125, 0.25])
@pytest.mark.parametrize("name", NETS)
def test_forward_small(name, width):
    net = small(name, width=width)
    y = net(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", NETS)
def test_forward_batch_norm_variant(name):
    net = small(name, batch_norm=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == len(conv_layers(net))
    y = net(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_width_scales_every_conv_and_fc():
    net = small("A", width=0.125, crop=64)
    assert [m.out_channels for _, m in conv_layers(net)] == [8, 16, 32, 32, 64, 64, 64, 64]
    assert [(m.in_features, m.out_features) for _, m in fc_layers(net)] == [
        (64 * 2 * 2, 512), (512, 512), (512, 10)]  # FC1 sees a (crop/32)^2 x C5 map


def test_forward_wrong_size_points_to_dense():
    with pytest.raises(ValueError, match="dense"):
        small("A")(torch.randn(1, 3, 64, 64))


# ---------------------------------------------------------------- torchvision layout
@pytest.mark.parametrize("name,batch_norm", [("A", False), ("B", False), ("D", False),
                                             ("E", False), ("A", True)])
def test_torchvision_state_loads_strict_and_matches(name, batch_norm):
    tv_name = TORCHVISION[name] + ("_bn" if batch_norm else "")
    with torch.device("meta"):
        tv = getattr(torchvision.models, tv_name)(weights=None)
    tv = randomize(tv.to_empty(device="cpu"))
    ours = meta_build(name, batch_norm=batch_norm).to_empty(device="cpu").eval()
    ours.load_state_dict(map_torchvision_state(tv.state_dict(), tv_name), strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x))


def test_map_torchvision_state_strips_ddp_prefix_and_validates_keys():
    state = small("A").state_dict()
    mapped = map_torchvision_state({"module." + k: v for k, v in state.items()}, "vgg11")
    assert list(mapped) == list(state)
    with pytest.raises(ValueError, match="unexpected.*avgpool.extra"):
        map_torchvision_state({**state, "avgpool.extra": torch.zeros(1)}, "A")
    with pytest.raises(ValueError, match="missing"):
        map_torchvision_state(small("B").state_dict(), "A")


# ---------------------------------------------------------------- dense evaluation (Sec. 3.2)
@pytest.mark.parametrize("batch_norm", [False, True])
def test_dense_equals_classifier_at_crop_size(batch_norm):
    net = lively(small("A", width=0.25, crop=64, batch_norm=batch_norm))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, score_map = net(x), net.dense(x)
    assert score_map.shape == (2, 10, 1, 1)
    torch.testing.assert_close(score_map[:, :, 0, 0], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net.dense_scores(x), ref, atol=1e-5, rtol=1e-5)


def test_dense_score_map_shape_on_non_square_input():
    net = lively(small("B", crop=64))
    x = torch.randn(2, 3, 96, 160)  # H/32 = 3 -> 3-2+1 = 2; W/32 = 5 -> 4
    with torch.no_grad():
        score_map = net.dense(x)
        scores = net.dense_scores(x)
    assert score_map.shape == (2, 10, 2, 4)
    torch.testing.assert_close(scores, score_map.mean(dim=(2, 3)))


def _floor_pools(net):
    """A copy of `net` whose max-pools round down (PyTorch's default, torchvision's VGG)."""
    import copy

    twin = copy.deepcopy(net)
    for m in twin.features:
        if isinstance(m, nn.MaxPool2d):
            m.ceil_mode = False
    return twin


@pytest.mark.parametrize("hw", [(64, 64), (96, 160), (128, 96)])
def test_ceil_pools_equal_floor_pools_at_multiples_of_32(hw):
    net = lively(small("D", crop=32)).eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        torch.testing.assert_close(net.dense(x), _floor_pools(net).dense(x))


def test_dense_loses_no_border_at_sizes_not_multiple_of_32():
    """Caffe's ceil rounding (the authors' dense evaluation): at 48 px the score map has 2
    cells per side, the second one centred on the bottom/right third of the image; floor
    pools give 1 cell, whose pool windows never reach the last 16 pixels."""
    net = lively(small("A", crop=32)).eval()
    x = torch.randn(1, 3, 48, 48)
    y = x.clone()
    y[..., 40:, 40:] += 3.0  # change only the bottom-right 8 x 8 corner
    with torch.no_grad():
        ceil_map, floor_map = net.dense(x), _floor_pools(net).dense(x)
        assert ceil_map.shape[-2:] == (2, 2) and floor_map.shape[-2:] == (1, 1)
        # the corner cell reacts most to the corner (it sees it through its own pool windows)
        change = (net.dense(y) - ceil_map).abs().sum(1)[0]  # (2, 2)
        assert change[1, 1] == change.max() and change[1, 1] > 0


def test_dense_uses_the_classifier_parameters():
    net = lively(small("A"))
    n_params = sum(p.numel() for p in net.parameters())
    net.dense_scores(torch.randn(1, 3, 64, 48)).sum().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0
               for _, m in fc_layers(net))
    assert sum(p.numel() for p in net.parameters()) == n_params


def test_dense_rejects_input_smaller_than_crop():
    with pytest.raises(ValueError, match="smaller than the crop 64"):
        small("A", crop=64).dense(torch.randn(1, 3, 64, 48))


# ---------------------------------------------------------------- initialisation (Sec. 3.1)
def test_default_init_is_normal_std_001_zero_bias():
    net = small("A")
    fc1 = net.classifier[0].weight  # 128 x 1024: enough samples for the std
    assert abs(fc1.std().item() - 0.01) < 5e-4 and abs(fc1.mean().item()) < 5e-4
    assert all((m.bias == 0).all() for _, m in conv_layers(net) + fc_layers(net))
    assert abs(small("A", init_std=0.1).classifier[0].weight.std().item() - 0.1) < 5e-3


def test_glorot_option_changes_the_init_distribution():
    net = small("A", init="glorot")
    for _, m in conv_layers(net) + fc_layers(net):
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert m.weight.abs().max() <= bound and (m.bias == 0).all()
    fc1 = net.classifier[0].weight
    assert abs(fc1.std().item() - math.sqrt(2 / (128 + 1024))) < 2e-3  # uniform, not N(0, .01)


def test_batch_norm_init():
    bns = [m for m in small("B", batch_norm=True).modules() if isinstance(m, nn.BatchNorm2d)]
    assert all((b.weight == 1).all() and (b.bias == 0).all() for b in bns)


# A's first four convs are conv1_1, conv2_1, conv3_1, conv3_2 (features.0/3/6/8); in the
# target they go to the convs at the same (block, index), the only placement whose shapes fit.
A_FIRST4 = ("features.0", "features.3", "features.6", "features.8")
TARGET_FIRST4 = {
    "A": A_FIRST4, "A-LRN": ("features.0", "features.4", "features.7", "features.9"),
    **dict.fromkeys("BCDE", ("features.0", "features.5", "features.10", "features.12")),
}
FCS = ("classifier.0", "classifier.3", "classifier.6")
WIDTH_ERROR = r"'features.0.weight'.*\(8, 3, 3, 3\) vs net \(16, 3, 3, 3\).*widths differ"


@pytest.mark.parametrize("name", NETS)
def test_conv_positions_are_caffe_block_indices(name):
    positions = conv_positions(meta_build(name))
    assert positions[:4] == ([(1, 1), (2, 1), (3, 1), (3, 2)] if name in ("A", "A-LRN")
                             else [(1, 1), (1, 2), (2, 1), (2, 2)])
    assert len(positions) == WEIGHT_LAYERS[name] - 3 and positions[-1][0] == 5


@pytest.mark.parametrize("target", ["A", "A-LRN", "B", "C", "D", "E"])
def test_init_from_a_copies_first_four_convs_and_the_fcs(target):
    src = small("A", seed=0)
    net = small(target, seed=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    copied = init_from(net, src.state_dict())
    pairs = list(zip(TARGET_FIRST4[target] + FCS, A_FIRST4 + FCS))
    assert copied == [f"{d}.{p}" for d, _ in pairs for p in ("weight", "bias")]
    after, src_state = net.state_dict(), src.state_dict()
    for d, s in pairs:
        for p in ("weight", "bias"):
            assert torch.equal(after[f"{d}.{p}"], src_state[f"{s}.{p}"])
    src_weights = [v for k, v in src_state.items() if k.endswith("weight")]
    for key in set(after) - set(copied):
        assert torch.equal(after[key], before[key])  # kept its own random init
        if key.endswith("weight"):
            assert not any(v.shape == after[key].shape and torch.equal(v, after[key])
                           for v in src_weights)


def test_init_from_accepts_a_ddp_state_and_rejects_a_non_a_state():
    net = small("D", seed=1)
    state = {"module." + k: v for k, v in small("A").state_dict().items()}
    assert len(init_from(net, state)) == 14
    with pytest.raises(ValueError, match="layout of net 'A'"):
        init_from(net, small("B").state_dict())


@pytest.mark.parametrize("src_options,match", [
    ({"width": 0.125}, WIDTH_ERROR),
    ({"num_classes": 20}, "'classifier.6.weight'.*num_classes differ"),
])
def test_init_from_shape_mismatch_is_clear_and_copies_nothing(src_options, match):
    net = small("D", seed=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        init_from(net, small("A", **src_options).state_dict())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


# ---------------------------------------------------------------- load_full
def test_load_full_round_trip_with_ddp_prefix():
    src, net = small("C", seed=0), small("C", seed=1)
    load_full(net, {"module." + k: v for k, v in src.state_dict().items()})
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("src_options,match", [
    ({"width": 0.125}, WIDTH_ERROR),
    ({"crop": 64}, "'classifier.0.weight'.*crop differs"),
])
def test_load_full_shape_mismatch_is_clear(src_options, match):
    with pytest.raises(ValueError, match=match):
        load_full(small("B"), small("B", **src_options).state_dict())


@pytest.mark.parametrize("src_name,src_bn", [("A-LRN", False), ("A", True)])
def test_load_full_rejects_other_architecture(src_name, src_bn):
    with pytest.raises(ValueError, match="layout of net 'A'"):
        load_full(small("A"), small(src_name, batch_norm=src_bn).state_dict())


# ---------------------------------------------------------------- memory format and dtype
def test_channels_last_matches_fp32():
    net = lively(small("D", crop=64))
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        ref, ref_dense = net(x[..., :64, :]), net.dense(x)
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        y, y_dense = net(x[..., :64, :]), net.dense(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y_dense, ref_dense, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["A-LRN", "D"])
def test_bf16_autocast_close_to_fp32(name):
    net = lively(small(name, crop=64, batch_norm=name == "D"))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref, ref_dense = net(x[..., :64]), net.dense_scores(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_dense = net(x[..., :64]), net.dense_scores(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert rel_err(y, ref) < 5e-2 and rel_err(y_dense, ref_dense) < 5e-2


def test_empty_net_builds_small_nets_without_the_meta_device_and_keeps_the_global_rng():
    """The meta device's first use in a process costs about 1.3 s of CPU: every train
    worker and evaluation task of the demo paid it for its quarter-width nets. Small nets
    are built on the CPU (their init is overwritten, and the global RNG left as it was);
    full-size ones still skip their random init on the meta device."""
    from vgg.training.checkpoints import empty_net, on_meta_device

    assert not on_meta_device(0.25, 32) and not on_meta_device(0.5, 64)  # the demo's, and width 0.5 at crop 64
    assert on_meta_device(1.0, 224) and on_meta_device(1.0, 96)
    src = small("D", seed=1, num_classes=5)
    torch.manual_seed(3)
    want = torch.rand(3)
    torch.manual_seed(3)
    net = empty_net("D", num_classes=5, width=0.25, crop=32)
    assert torch.equal(torch.rand(3), want)
    assert all(p.device.type == "cpu" for p in net.parameters())
    net.load_state_dict(src.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(net.eval()(x), src.eval()(x))
    big = empty_net("A", num_classes=5, width=1.0, crop=224)
    assert all(p.device.type == "cpu" for p in big.parameters())
