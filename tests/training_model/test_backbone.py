"""build_backbone: weights sources, layers, in-graph normalisation, reproducible random init."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models import resnet50

from core.errors import MilroiError
from training.backbone import IMAGENET_MEAN, IMAGENET_STD, build_backbone


def test_imagenet_absent_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MilroiError) as err:
        build_backbone("imagenet")
    message = str(err.value)
    assert "resnet50-11ad3fa6.pth" in message  # IMAGENET1K_V2, torchvision's cache name
    assert str(tmp_path / "hub" / "checkpoints") in message


def test_imagenet_loads_from_cache_without_download(tmp_path, monkeypatch):
    """A file under the cache name is what gets loaded (here a seeded network's weights)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(5)
    reference = resnet50(weights=None)
    torch.save(reference.state_dict(), folder / "resnet50-0676ba61.pth")  # V1 name
    net = build_backbone("imagenet", layer="layer3")
    assert net.weights == "imagenet"
    assert torch.equal(net.trunk[0].weight, reference.conv1.weight)


def test_none_is_reproducible_and_seeded(real_tiles):
    a, b = build_backbone("none", seed=0), build_backbone("none", seed=0)
    c = build_backbone("none", seed=1)
    x = torch.from_numpy(real_tiles[:2])
    with torch.inference_mode():
        fa, fb, fc = a(x), b(x), c(x)
    assert fa.shape == (2, 2048) and fa.dtype == torch.float32
    assert torch.equal(fa, fb)
    assert not torch.allclose(fa, fc)


def test_state_dict_path_loads(tmp_path, real_tiles):
    torch.manual_seed(3)
    ref = resnet50(weights=None)
    path = tmp_path / "resnet.pt"
    torch.save(ref.state_dict(), path)
    net = build_backbone(str(path), layer="layer3")
    assert torch.equal(net.trunk[4][0].conv1.weight, ref.layer1[0].conv1.weight)
    # a Backbone's own state_dict round-trips too
    own = tmp_path / "backbone.pt"
    torch.save(net.state_dict(), own)
    again = build_backbone(str(own), layer="layer3")
    x = torch.from_numpy(real_tiles[:1])
    with torch.inference_mode():
        assert torch.equal(net(x), again(x))


def test_bad_weights_files(tmp_path):
    with pytest.raises(MilroiError, match="does not exist"):
        build_backbone(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(MilroiError, match=f"cannot load weights file {junk}"):
        build_backbone(str(junk))
    other = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(3)}, other)
    with pytest.raises(MilroiError, match="not a ResNet-50 state_dict"):
        build_backbone(str(other))
    with pytest.raises(MilroiError, match="unknown ResNet-50 layer"):
        build_backbone("none", layer="layer9")


def test_normalisation_inside_matches_torchvision_preprocessing(layer3_backbone, real_tiles):
    """uint8 NHWC in == torchvision's usual float NCHW normalised input to the same trunk."""
    x = torch.from_numpy(real_tiles[:2])
    manual = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) \
        / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.inference_mode():
        got = layer3_backbone(x)
        want = torch.flatten(layer3_backbone.trunk(manual), 1)
    assert got.shape == (2, 1024)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
