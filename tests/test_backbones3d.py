"""3D MONAI backbones: stage shapes, equality with MONAI's own networks, the MedicalNet ResNet
layout, checkpoint loading and its errors, gradients."""

import copy
import logging

import pytest
import torch
from monai.networks import nets
from safetensors.torch import save_file
from torch import nn

from mmdiag.models.backbones3d import (
    BACKBONES3D,
    create_backbone3d,
    load_backbone3d_checkpoint,
)

STAGE_CHANNELS = {
    "resnet18": (64, 64, 128, 256, 512),
    "resnet34": (64, 64, 128, 256, 512),
    "densenet121": (64, 256, 512, 1024, 1024),
}
# DenseNet's transitions pool without padding: 32 voxels is the least that reaches stage 4
INPUT_SIZE = {"resnet18": (16, 32, 32), "resnet34": (16, 32, 32), "densenet121": (32, 32, 32)}


@pytest.fixture(scope="module")
def backbones():
    """One backbone of each name in eval mode, built once (tests here do not change them)."""
    torch.manual_seed(0)
    return {name: create_backbone3d(name).eval() for name in BACKBONES3D}


def _volume(name, n=2, channels=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, *INPUT_SIZE[name], generator=generator)


def _monai_net(name):
    """MONAI's network with the same configuration and its classifier made an identity."""
    if name == "densenet121":
        net = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=3)
        net.class_layers.out = nn.Identity()
        return net
    return getattr(nets, name)(
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,
        feed_forward=False,
    )


@pytest.mark.parametrize("name", BACKBONES3D)
def test_stages_have_the_documented_shapes_and_compose_to_forward(backbones, name):
    backbone, x = backbones[name], _volume(name)
    assert backbone.stage_channels == STAGE_CHANNELS[name]
    assert backbone.num_features == STAGE_CHANNELS[name][-1] and backbone.num_stages == 5
    with torch.no_grad():
        stages, features = backbone.forward_stages(x), backbone(x)
        y = backbone.stem(x)  # a method inserting blocks between stages runs them one by one
        stepwise = [y]
        for index in range(1, backbone.num_stages):
            y = backbone.stage(index, y)
            stepwise.append(y)
    for index, (output, channels) in enumerate(zip(stages, STAGE_CHANNELS[name], strict=True)):
        spatial = tuple(-(-size // 2 ** (index + 1)) for size in INPUT_SIZE[name])
        assert output.shape == (2, channels, *spatial), f"stage {index}"
        torch.testing.assert_close(stepwise[index], output, rtol=0, atol=0)
    assert features.shape == (2, backbone.num_features) and torch.isfinite(features).all()
    torch.testing.assert_close(backbone.pool(y), features, rtol=0, atol=0)


@pytest.mark.parametrize("name", BACKBONES3D)
def test_forward_equals_the_monai_network_features(backbones, name):
    net = _monai_net(name).eval()
    # the backbone keeps MONAI's names: its state dict is MONAI's less the classifier, strictly
    net.load_state_dict(backbones[name].state_dict())
    x = _volume(name, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(backbones[name](x), net(x), rtol=1e-5, atol=1e-6)


def test_resnets_have_the_medicalnet_layout(backbones):
    assert [len(getattr(backbones["resnet34"], f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert [len(getattr(backbones["resnet18"], f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    backbone = backbones["resnet34"]
    stem = backbone.conv1
    assert (stem.kernel_size, stem.stride, stem.padding) == ((7,) * 3, (2,) * 3, (3,) * 3)
    assert backbone.layer1[0].downsample is None  # same width and resolution: identity
    for i in (2, 3, 4):
        downsample = getattr(backbone, f"layer{i}")[0].downsample
        conv, norm = downsample  # shortcut B: 1x1x1 convolution and batch norm
        assert isinstance(conv, nn.Conv3d) and isinstance(norm, nn.BatchNorm3d)
        assert conv.kernel_size == (1, 1, 1) and conv.stride == (2, 2, 2)
        assert conv.bias is None  # bias_downsample=False
        assert all(block.downsample is None for block in getattr(backbone, f"layer{i}")[1:])


def test_shortcut_a_has_no_shortcut_parameters_and_applies_to_resnets_only():
    backbone = create_backbone3d("resnet18", shortcut_type="A")
    assert not isinstance(backbone.layer2[0].downsample, nn.Module)
    assert not any("downsample" in key for key in backbone.state_dict())
    with pytest.raises(ValueError, match="ResNets only"):
        create_backbone3d("densenet121", shortcut_type="B")
    with pytest.raises(ValueError, match="'A' or 'B'"):
        create_backbone3d("resnet18", shortcut_type="C")


def test_stages_run_modules_replaced_in_place(backbones):
    backbone = copy.deepcopy(backbones["resnet18"])
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(backbone).eval()  # replaces bn1 in place
    assert isinstance(synced.stage_modules(0)[1], nn.SyncBatchNorm)
    x = _volume("resnet18")
    with torch.no_grad():
        torch.testing.assert_close(synced(x), backbones["resnet18"](x))


def _checkpoint_state(backbone, prefix="module.", head="fc."):
    """A state dict as MedicalNet and DataParallel write it: wrapped names, a classifier."""
    state = {f"{prefix}{k}": v.clone() for k, v in backbone.state_dict().items()}
    state[f"{prefix}{head}weight"] = torch.randn(2, backbone.num_features)
    state[f"{prefix}{head}bias"] = torch.zeros(2)
    return state


def _save(state, path):
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 7}, path)
    return path


def test_medicalnet_style_checkpoint_round_trip(backbones, tmp_path, caplog):
    source = backbones["resnet18"]
    path = _save(_checkpoint_state(source), tmp_path / "resnet_18.pth")
    with caplog.at_level(logging.INFO, logger="mmdiag.models.backbones3d"):
        loaded = create_backbone3d("resnet18", checkpoint=path).eval()
    assert "loaded" in caplog.text and str(path) in caplog.text
    x = _volume("resnet18", seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_safetensors_checkpoint_round_trip(backbones, tmp_path):
    source = backbones["densenet121"]
    state = _checkpoint_state(source, prefix="backbone.", head="class_layers.out.")
    # no batch-norm counters, as older torch versions wrote
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = _save(state, tmp_path / "densenet.safetensors")
    loaded = create_backbone3d("densenet121", checkpoint=path).eval()
    x = _volume("densenet121", seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s.pop("module.features.denseblock3.denselayer2.layers.norm2.running_var"),
            r"missing keys \['features\.denseblock3\.denselayer2\.layers\.norm2\.running_var'\]",
        ),
        (
            lambda s: s.update({"module.features.extra.weight": torch.zeros(1)}),
            r"unexpected keys \['features\.extra\.weight'\]",
        ),
        (
            lambda s: s.update({"module.features.conv0.weight": torch.zeros(64, 2, 7, 7, 7)}),
            r"shape mismatch for \['features\.conv0\.weight: checkpoint \(64, 2, 7, 7, 7\)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_checkpoint_that_does_not_fit_names_the_file_and_keys(backbones, tmp_path, change, message):
    state = _checkpoint_state(backbones["densenet121"], head="class_layers.out.")
    change(state)
    path = _save(state, tmp_path / "densenet.pt")
    with pytest.raises(ValueError, match=rf"densenet\.pt.*{message}"):
        create_backbone3d("densenet121", checkpoint=path)


def test_shortcut_a_weights_do_not_load_into_shortcut_b(backbones, tmp_path):
    # shortcut A weights (MedicalNet's ResNet-18/34) lack shortcut B's 1x1x1 convolutions
    state = _checkpoint_state(backbones["resnet18"])
    state = {k: v for k, v in state.items() if ".downsample." not in k}
    path = _save(state, tmp_path / "resnet_18_shortcut_a.safetensors")
    backbone = create_backbone3d("resnet18", shortcut_type="A")
    load_backbone3d_checkpoint(backbone, path)
    with pytest.raises(ValueError, match=r"shortcut_a\.safetensors.*layer2\.0\.downsample"):
        load_backbone3d_checkpoint(copy.deepcopy(backbones["resnet18"]), path)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_backbone3d_checkpoint(backbone, tmp_path / "absent.pt")


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])  # ResNet-34: ResNet-18's blocks
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    backbone = create_backbone3d(name, in_channels=2).train()
    features = backbone(_volume(name, channels=2))
    (features * torch.randn_like(features)).sum().backward()
    parameters = list(backbone.named_parameters())
    without = [key for key, p in parameters if p.grad is None]
    assert not without, f"no gradient for {without[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in parameters)
    assert sum(bool(p.grad.abs().sum() > 0) for _, p in parameters) > 0.9 * len(parameters)


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown 3D backbone 'resnet50'") as error:
        create_backbone3d("resnet50")
    assert all(name in str(error.value) for name in BACKBONES3D)
