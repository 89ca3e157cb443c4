"""Backbones: shapes and strides for every name, trainable-layer semantics, local weight loading."""

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from oddetr.errors import CheckpointError, ConfigError
from oddetr.models.backbone import BACKBONE_NAMES, Backbone, downsample_mask

# name -> channels at strides (8, 16, 32) (torchvision's architectures)
EXPECTED_CHANNELS = {
    "resnet18": [128, 256, 512],
    "resnet34": [128, 256, 512],
    "resnet50": [512, 1024, 2048],
    "resnet101": [512, 1024, 2048],
    "mobilenet_v2": [32, 96, 1280],
    "mobilenet_v3_small": [24, 48, 576],
    "mobilenet_v3_large": [40, 112, 960],
}


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_output_shapes_and_strides(name):
    torch.manual_seed(0)
    bb = Backbone(name).eval()
    assert bb.strides == [8, 16, 32]
    assert bb.num_channels == EXPECTED_CHANNELS[name]
    with torch.no_grad():
        outs = bb(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [
        (2, c, 64 // s, 64 // s) for c, s in zip(bb.num_channels, bb.strides)
    ]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())
    frozen = [m for m in bb.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen
    # torchvision's MobileNetV3 uses BN eps 1e-3; keep it so pretrained statistics mean the same
    assert {m.eps for m in frozen} == ({1e-3} if name.startswith("mobilenet_v3") else {1e-5})


def test_resnet_trainable_layers_and_gradients():
    bb = Backbone("resnet50")  # default trainable_layers=3: layer2..layer4 train
    params = dict(bb.named_parameters())
    assert params, "backbone has no parameters"
    for n, p in params.items():
        should_train = n.split(".")[1] in ("layer2", "layer3", "layer4")
        assert p.requires_grad == should_train, n
    outs = bb(torch.randn(1, 3, 64, 64))
    sum(o.sum() for o in outs).backward()
    for n, p in params.items():
        if p.requires_grad:
            assert p.grad is not None, f"{n} is meant to train but gets no gradient"

    stages = {0: (), 1: ("layer4",), 4: ("layer1", "layer2", "layer3", "layer4")}
    for k, trained in stages.items():
        bb = Backbone("resnet18", trainable_layers=k)
        for n, p in bb.named_parameters():
            assert p.requires_grad == (n.split(".")[1] in trained), (k, n)
    bb = Backbone("resnet18", trainable_layers=5)
    assert all(p.requires_grad for p in bb.parameters())
    assert "body.conv1.weight" in dict(bb.named_parameters())


def test_mobilenet_trainable_layers_by_stride():
    # mobilenet_v2 features: blocks 7..13 are at stride 16, 14..18 at stride 32
    bb = Backbone("mobilenet_v2", trainable_layers=2)
    for n, p in bb.named_parameters():
        assert p.requires_grad == (int(n.split(".")[1]) >= 7), n
    bb = Backbone("mobilenet_v2", trainable_layers=5)
    assert all(p.requires_grad for p in bb.parameters())


def test_return_strides_and_truncation():
    bb = Backbone("resnet18", return_strides=(4, 8, 16))
    assert bb.num_channels == [64, 128, 256]
    assert "layer4" not in bb.body  # unused blocks are dropped
    outs = bb(torch.randn(1, 3, 64, 64))
    assert [o.shape[-1] for o in outs] == [16, 8, 4]
    bb = Backbone("mobilenet_v3_large", return_strides=(32,))
    assert bb.num_channels == [960]


def test_bn_norm_option():
    bb = Backbone("resnet18", norm="bn", trainable_layers=1)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())
    assert bb.body["layer4"][0].bn1.weight.requires_grad
    assert not bb.body["layer3"][0].bn1.weight.requires_grad


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "resnet51"}, "resnet18, resnet34"),
        ({"name": "resnet18", "norm": "gn"}, "norm"),
        ({"name": "resnet18", "trainable_layers": 6}, "trainable_layers"),
        ({"name": "resnet18", "return_strides": (16, 8)}, "return_strides"),
        ({"name": "resnet18", "return_strides": (64,)}, "return_strides"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Backbone(**kwargs)


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
@pytest.mark.parametrize("with_counters", [True, False])
def test_load_local_torchvision_weights(tmp_path, norm, with_counters):
    """Downloaded files carry BatchNorm's num_batches_tracked; files saved from a frozen-BN model do not.

    Either loads into either norm (the counter is not a weight).
    """
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None)  # ordinary BatchNorm2d, like the downloaded files
    with torch.no_grad():
        ref.bn1.running_mean.normal_()
        ref.layer3[0].bn2.running_var.uniform_(0.5, 2.0)
    state = ref.state_dict()
    assert any(k.endswith("num_batches_tracked") for k in state)
    if not with_counters:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(state, path)

    bb = Backbone("resnet18", weights=str(path), norm=norm)
    torch.testing.assert_close(bb.body["conv1"].weight, state["conv1.weight"])
    torch.testing.assert_close(bb.body["layer3"][0].conv1.weight, state["layer3.0.conv1.weight"])
    torch.testing.assert_close(bb.body["bn1"].running_mean, state["bn1.running_mean"])
    torch.testing.assert_close(bb.body["layer3"][0].bn2.running_var, state["layer3.0.bn2.running_var"])
    # trainability is applied after loading
    assert not bb.body["conv1"].weight.requires_grad and bb.body["layer4"][0].conv1.weight.requires_grad


def test_weight_file_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="nope.pth"):
        Backbone("resnet18", weights=missing)

    state = torchvision.models.resnet18(weights=None).state_dict()
    bad = {("module." + k if k.startswith("layer1") else k): v for k, v in state.items()}
    del bad["conv1.weight"]
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(
        CheckpointError,
        match=r"bad\.pth.*missing keys: conv1\.weight, layer1.*unexpected keys: module\.layer1",
    ):
        Backbone("resnet18", weights=path)

    # a resnet34 file does not fit resnet18; a resnet18 file with classifier removed does
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, tmp_path / "nofc.pth")
    Backbone("resnet18", weights=tmp_path / "nofc.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        Backbone("resnet18", weights=garbage)
    torch.save({"model": state}, tmp_path / "wrapped.pth")
    with pytest.raises(CheckpointError, match="wrapped.pth.*got a dict with keys model"):
        Backbone("resnet18", weights=tmp_path / "wrapped.pth")
    shaped = dict(state)
    shaped["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(shaped, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="shape mismatch: conv1.weight"):
        Backbone("resnet18", weights=tmp_path / "shape.pth")


def test_downsample_mask():
    mask = torch.zeros(2, 8, 12, dtype=torch.bool)
    mask[0, :, 6:] = True  # right half padded
    mask[1, 4:, :] = True  # bottom half padded
    out = downsample_mask(mask, (4, 6))
    assert out.shape == (2, 4, 6) and out.dtype == torch.bool
    expected = torch.zeros(2, 4, 6, dtype=torch.bool)
    expected[0, :, 3:] = True
    expected[1, 2:, :] = True
    assert torch.equal(out, expected)
    # non-divisible sizes: nearest picks source index floor(i * H / h)
    out = downsample_mask(mask, (3, 5))
    assert torch.equal(out[0, 0], mask[0, 0, [0, 2, 4, 7, 9]])


def _randomise_norms(module: torch.nn.Module, generator: torch.Generator) -> int:
    """Give every norm non-trivial statistics and affine parameters (a fresh norm is the identity,
    which would hide a wrong fold); returns how many norms there are."""
    norms = [m for m in module.modules() if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))]
    for m in norms:
        c = m.running_mean.numel()
        m.running_mean.copy_(torch.randn(c, generator=generator, dtype=torch.float64) * 0.5)
        m.running_var.copy_(torch.rand(c, generator=generator, dtype=torch.float64) + 0.5)
        with torch.no_grad():
            m.weight.copy_(torch.rand(c, generator=generator, dtype=torch.float64) + 0.5)
            m.bias.copy_(torch.randn(c, generator=generator, dtype=torch.float64) * 0.2)
    return len(norms)


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_fuse_norms_matches_the_unfused_backbone(name, norm):
    """Oracle: the same backbone before folding (float64, so only the fold's own rounding shows)."""
    torch.manual_seed(0)
    bb = Backbone(name, norm=norm).double().eval()
    n_norms = _randomise_norms(bb, torch.Generator().manual_seed(1))
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        expected = bb(images)
        assert bb.fuse_norms() == n_norms > 0
        got = bb(images)
    assert not any(isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)) for m in bb.modules())
    for e, g in zip(expected, got, strict=True):  # float64 rounding, grown through up to 100 layers
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9 * e.abs().max().item())


def test_fuse_norms_refuses_batch_statistics():
    bb = Backbone("resnet18", norm="bn").train()
    with pytest.raises(RuntimeError, match="eval mode"):
        bb.fuse_norms()
