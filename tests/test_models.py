"""Architecture facts pinned to the paper (Sec. 3.3, 4.1, 4.2; Tables 1 and 6)."""
import copy
import re

import pytest
import torch
import torchvision
from torch import nn

from repro.complexity import count_parameters
from repro.errors import SpecError
from repro.models import build_model, cifar, registered_models, response_layers
from repro.models.blocks import BasicBlock, Bottleneck, ZeroPadShortcut
from repro.models.networks import NETWORKS, Network
from repro.spec import ModelSpec, validate

# Exact counts for option A (conv weights without bias, BN scale and shift, FC with bias): PAPER.md.
CIFAR_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962, 1202: 19_421_274}
# torchvision's resnet18/34 use projections where dimensions increase: our option B.
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672}


@pytest.mark.parametrize("depth", CIFAR_PARAMS)
def test_cifar_parameter_counts_are_exact_and_plain_equals_resnet(depth):
    assert count_parameters(build_model(f"cifar_resnet{depth}")) == CIFAR_PARAMS[depth]
    assert count_parameters(build_model(f"cifar_plain{depth}")) == CIFAR_PARAMS[depth]


@pytest.mark.parametrize("depth", TORCHVISION_PARAMS)
def test_imagenet_option_b_matches_torchvision(depth):
    ours = count_parameters(build_model(f"imagenet_resnet{depth}", shortcut="B"))
    theirs = count_parameters(getattr(torchvision.models, f"resnet{depth}")())
    assert ours == theirs == TORCHVISION_PARAMS[depth]


def test_v15_bottleneck_matches_torchvision_resnet50_shapes():
    ours = build_model("imagenet_resnet50", shortcut="B", bottleneck_stride="v1.5")
    theirs = torchvision.models.resnet50()
    ours_shapes = sorted(p.shape for p in ours.parameters())
    assert ours_shapes == sorted(p.shape for p in theirs.parameters())
    # v1 strides the first 1x1 conv of conv3_1, v1.5 the 3x3
    v1 = build_model("imagenet_resnet50", shortcut="B", bottleneck_stride="v1").stages[1][0]
    v15 = ours.stages[1][0]
    assert (v1.conv1.stride, v1.conv2.stride) == ((2, 2), (1, 1))
    assert (v15.conv1.stride, v15.conv2.stride) == ((1, 1), (2, 2))


@pytest.mark.parametrize("depth", (18, 34, 50, 101, 152))
def test_option_a_adds_no_parameters_and_b_c_add_exactly_the_projections(depth):
    plain = count_parameters(build_model(f"imagenet_plain{depth}"))
    counts = {s: count_parameters(build_model(f"imagenet_resnet{depth}", shortcut=s)) for s in "ABC"}
    assert counts["A"] == plain

    def projection_params(model):
        return sum(count_parameters(m.shortcut) for m in model.modules()
                   if isinstance(m, (BasicBlock, Bottleneck)) and isinstance(m.shortcut, nn.Sequential))

    for option in "BC":
        model = build_model(f"imagenet_resnet{depth}", shortcut=option)
        assert counts[option] - plain == projection_params(model) > 0
    # B projects only where the shape changes (one block per stage at most), C everywhere
    b = build_model(f"imagenet_resnet{depth}", shortcut="B")
    c = build_model(f"imagenet_resnet{depth}", shortcut="C")
    blocks = [m for m in c.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert all(isinstance(m.shortcut, nn.Sequential) for m in blocks)
    projected_b = [m for m in b.modules() if isinstance(m, (BasicBlock, Bottleneck)) and isinstance(m.shortcut, nn.Sequential)]
    assert len(projected_b) == (3 if depth in (18, 34) else 4)


@pytest.mark.parametrize("name", registered_models())
def test_output_shape_of_every_registered_network(name):
    if name in ("cifar_plain1202", "cifar_resnet1202"):
        pytest.skip("covered by the parameter count; a forward pass of 1202 layers is slow on 2 cores")
    model = build_model(name).eval()
    side = 32 if name.startswith("cifar") else (224 if name.startswith("vgg") else 64)
    classes = 10 if name.startswith("cifar") else 1000
    with torch.no_grad():
        assert model(torch.randn(2, 3, side, side)).shape == (2, classes)


def zero_last_bn_scales(model):
    for m in model.modules():
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
            nn.init.zeros_(m.bn2.bias)


def test_plain_means_plain_and_residual_means_relu_of_shortcut():
    x = torch.randn(4, 16, 8, 8)
    residual = BasicBlock(16, 32, stride=2, shortcut="A").eval()
    plain = BasicBlock(16, 32, stride=2, shortcut=None).eval()
    for block in (residual, plain):
        zero_last_bn_scales(block)
    with torch.no_grad():
        assert torch.equal(residual(x), torch.relu(ZeroPadShortcut(16, 32, 2)(x)))
        assert torch.equal(plain(x), torch.zeros(4, 32, 4, 4))
        # the whole CIFAR ResNet with every residual branch silenced passes the stem's output through
        net = build_model("cifar_resnet20").eval()
        zero_last_bn_scales(net)
        stem = torch.relu(net.bn(net.conv(torch.randn(2, 3, 32, 32))))
        assert torch.equal(net.stages(stem), torch.relu(ZeroPadShortcut(16, 64, 4)(stem)))


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.arange(2 * 4 * 6 * 6, dtype=torch.float32).reshape(2, 4, 6, 6)
    y = ZeroPadShortcut(4, 8, stride=2)(x)
    assert y.shape == (2, 8, 3, 3)
    assert torch.equal(y[:, :4], x[:, :, ::2, ::2])
    assert torch.equal(y[:, 4:], torch.zeros(2, 4, 3, 3))


def test_cifar_layout_is_the_papers():
    net = build_model("cifar_resnet56")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 6 * 9  # first layer + 2n per stage; + the FC layer = 6n+2
    assert {m.out_channels for m in convs} == {16, 32, 64}
    assert all(m.kernel_size == (3, 3) for m in convs)
    assert [s[0].conv1.stride for s in net.stages] == [(1, 1), (2, 2), (2, 2)]
    assert net.fc.out_features == 10
    assert len(response_layers(net)) == 55  # every 3x3 layer has one response


def test_he_initialisation():
    conv = build_model("cifar_plain56").stages[2][0].conv2  # 64 -> 64, 3x3
    expected_std = (2 / (3 * 3 * 64)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)


@pytest.mark.parametrize("name, message", [
    ("cifar_resnet21", "6n+2"),
    ("cifar_plain4", "6n+2"),
    ("imagenet_resnet20", "18, 34, 50, 101, 152"),
    ("resnet56", "valid: cifar_plain20"),
    ("cifar_resnet", "valid:"),
])
def test_bad_names_and_depths_say_what_is_valid(name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_model(name)


def test_bad_shortcut_options_are_rejected():
    with pytest.raises(ValueError, match="one of A, B, C"):
        build_model("imagenet_resnet18", shortcut="D")
    with pytest.raises(ValueError, match="option A"):
        build_model("cifar_resnet20", shortcut="B")
    with pytest.raises(ValueError, match="plain net"):
        build_model("imagenet_plain18", shortcut="C")


@pytest.mark.parametrize("model, message", [
    ({"block": "preact"}, "block: cifar networks are built of basic blocks, got 'preact'"),
    ({"arch": "imagenet", "depth": 18, "block": "wide"}, "block: imagenet networks are built of basic or bottleneck"),
    ({"arch": "imagenet", "depth": 50, "block": "basic"}, "block: Table 1's 50-layer network has bottleneck blocks"),
    ({"shortcut": "D"}, "shortcut: must be one of A, B, C"),
    ({"residual": False, "shortcut": "B"}, "shortcut: a plain net has no shortcuts"),
])
def test_the_lookup_refuses_a_spec_it_cannot_build_and_lists_the_choices(model, message):
    dataset = "imagenet" if model.get("arch") == "imagenet" else "cifar10"
    with pytest.raises(SpecError, match=re.escape(f"s.yaml: model: {message}")):
        validate({"name": "s", "model": model, "data": {"dataset": dataset}}, "s.yaml")


@pytest.mark.parametrize("arch, depth, block", [("cifar", 20, "basic"), ("imagenet", 18, "basic"),
                                               ("imagenet", 50, "bottleneck")])
def test_a_spec_that_names_no_block_gets_the_papers(arch, depth, block):
    unset = ModelSpec(arch=arch, depth=depth).build()
    named = ModelSpec(arch=arch, depth=depth, block=block).build()
    assert [type(m) for m in unset.modules()] == [type(m) for m in named.modules()]
    assert any(isinstance(m, NETWORKS[(arch, block)].block) for m in unset.modules())


class ReluFirstBlock(BasicBlock):
    """A throwaway block type: the ReLU before the addition."""

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out) + self.shortcut(x)


def test_a_new_block_type_is_a_lookup_entry_and_a_spec_naming_it(monkeypatch):
    monkeypatch.setitem(NETWORKS, ("cifar", "relu_first"),
                        Network(cifar.CifarNet, ReluFirstBlock, cifar.blocks_per_stage, shortcuts=("A",)))
    spec = validate({"name": "s", "model": {"block": "relu_first", "depth": 14}}, "s.yaml")
    net = spec.model.build()
    assert [type(m) for m in net.modules() if isinstance(m, BasicBlock)] == [ReluFirstBlock] * 6
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(SpecError, match="6n\\+2"):  # the entry's depth rule holds
        validate({"name": "s", "model": {"block": "relu_first", "depth": 15}}, "s.yaml")


def _out_of_place(block, x):
    """The block's arithmetic with `out + shortcut`, the reference of the in-place addition."""
    out = torch.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = torch.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    return torch.relu(out + block.shortcut(x))


@pytest.mark.parametrize("block, in_channels, stride, shortcut", [
    (BasicBlock, 16, 1, "A"), (BasicBlock, 16, 2, "A"), (Bottleneck, 64, 2, "B"), (Bottleneck, 256, 1, "C")])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_residual_addition_is_in_place_with_the_same_bits_and_gradients(block, in_channels, stride, shortcut,
                                                                             channels_last):
    """Issue 22: the shortcut is added into the last BN's output (no new tensor), and autograd accepts it."""
    torch.manual_seed(0)
    ours = block(in_channels, 32 if block is BasicBlock else 16, stride, shortcut)
    reference = copy.deepcopy(ours)
    x = torch.randn(4, in_channels, 8, 8)
    if channels_last:
        ours, reference = (m.to(memory_format=torch.channels_last) for m in (ours, reference))
        x = x.to(memory_format=torch.channels_last)
    last_bn = ours.bn3 if block is Bottleneck else ours.bn2
    seen = []
    last_bn.register_forward_hook(lambda module, inputs, output: seen.append(output))
    x_ours, x_reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ours(x_ours)
    expected = _out_of_place(reference, x_reference)
    assert torch.equal(torch.relu(seen[0]), out)  # BN's output holds the sum: the addition wrote into it
    assert torch.equal(out, expected)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.equal(x_ours.grad, x_reference.grad)
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name
