"""The encoder registry (training.encoders, training.weights, training.backbone), issue 39.

- every registry entry builds on torch's meta device (no memory, no weights) and gives the
  feature dimension it states; `timm:NAME` takes its facts from timm;
- weights come offline from a Hugging Face cache folder the test makes, with HF_HUB_OFFLINE=1 and
  every socket refused; a missing checkpoint, a checkpoint of the wrong shape and a wrong
  weights name are clear errors;
- Phikon-v2's transformers (Dinov2) layout maps onto timm's ViT;
- `features` reads each slide at the encoder's stated scale, and `fit` refuses feature files of
  two encoders.
"""
from __future__ import annotations

import shutil
import socket

import numpy as np
import pytest
import torch

from core.bundle import LAYER_ENCODERS
from core.errors import ConfigError
from training.backbone import build_backbone
from training.encoders import ENCODERS, POOLINGS, encoder_spec, encoders_help
from training.weights import from_transformers_dinov2

TINY = "timm:vit_tiny_patch16_224"
TINY_REPO = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_every_entry_builds_on_meta_with_its_stated_dimension(name):
    spec = ENCODERS[name]
    backbone = build_backbone("none", encoder=name, device="meta")
    tiles = torch.zeros((2, spec.tile_size, spec.tile_size, 3), dtype=torch.uint8, device="meta")
    assert tuple(backbone(tiles).shape) == (2, spec.feature_dim)
    assert backbone.feature_dim == spec.feature_dim and backbone.encoder == name
    assert spec.pooling in POOLINGS and spec.licence and spec.help_line() in encoders_help()
    assert spec.hf_repo or spec.layer   # published weights: the Hub or torchvision's ImageNet
    if spec.layer:
        assert LAYER_ENCODERS[spec.layer] == name


def test_a_timm_name_is_an_encoder_with_timms_facts():
    spec = encoder_spec(TINY)
    assert (spec.feature_dim, spec.tile_size, spec.mean, spec.hf_repo) == \
        (192, 224, (0.5, 0.5, 0.5), TINY_REPO)
    backbone = build_backbone("none", encoder=TINY, seed=3)
    assert backbone(torch.zeros((2, 224, 224, 3), dtype=torch.uint8)).shape == (2, 192)
    with pytest.raises(ConfigError, match="timm has no model 'no_such_net'"):
        encoder_spec("timm:no_such_net")
    with pytest.raises(ConfigError, match="unknown encoder 'unii'.*uni2-h"):
        encoder_spec("unii")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty Hugging Face cache under tmp_path, offline mode, and no socket may connect."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return cache


def _put_in_cache(cache, repo: str, filename: str, state: dict) -> None:
    """The layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/REV/FILE}."""
    from safetensors.torch import save_file

    revision = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    (folder / "snapshots" / revision).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()},
              str(folder / "snapshots" / revision / filename))


def test_pretrained_weights_load_from_the_hugging_face_cache_offline(offline):
    published = build_backbone("none", encoder=TINY, seed=5)
    _put_in_cache(offline, TINY_REPO, "model.safetensors", published.trunk.state_dict())
    loaded = build_backbone("pretrained", encoder=TINY)
    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3),
                                                               dtype=np.uint8))
    with torch.inference_mode():
        assert torch.equal(loaded(tiles), published(tiles))
        assert not torch.equal(loaded(tiles), build_backbone("none", encoder=TINY)(tiles))
    assert loaded.weights == "pretrained" and loaded.describe()["encoder"] == TINY


def test_missing_weights_name_the_file_the_cache_and_the_access_page(offline):
    with pytest.raises(ConfigError) as error:
        build_backbone("pretrained", encoder="uni")
    message = str(error.value)
    for fact in ("model.safetensors or pytorch_model.bin", "MahmoodLab/UNI", str(offline),
                 "HF_HUB_CACHE", "https://huggingface.co/MahmoodLab/UNI", "request access",
                 "never downloads"):
        assert fact in message, (fact, message)
    with pytest.raises(ConfigError, match="imagenet names ResNet-50's ImageNet checkpoint"):
        build_backbone("imagenet", encoder="uni")


def test_a_checkpoint_of_another_shape_names_the_keys(tmp_path):
    from safetensors.torch import save_file

    state = build_backbone("none", encoder=TINY).trunk.state_dict()
    state["pos_embed"] = torch.zeros(1, 50, 192)            # a 112 px model's positions
    del state["blocks.11.mlp.fc2.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))
    with pytest.raises(ConfigError) as error:
        build_backbone(str(path), encoder=TINY)
    message = str(error.value)
    for fact in (str(path), "1 missing keys", "blocks.11.mlp.fc2.bias", "1 unexpected",
                 "extra.weight", "pos_embed: checkpoint [1, 50, 192]", "[1, 197, 192]"):
        assert fact in message, (fact, message)


def test_phikon_v2s_transformers_layout_maps_onto_timms_vit():
    """Owkin publishes Phikon-v2 as a transformers Dinov2Model; its keys, written here from a
    small timm ViT with LayerScale, load back into the same network."""
    import timm

    net = timm.create_model("vit_tiny_patch16_224", num_classes=0, init_values=1e-5)
    ours = net.state_dict()
    theirs = {"embeddings.cls_token": ours["cls_token"],
              "embeddings.position_embeddings": ours["pos_embed"],
              "embeddings.mask_token": torch.zeros(1, 192),
              "embeddings.patch_embeddings.projection.weight": ours["patch_embed.proj.weight"],
              "embeddings.patch_embeddings.projection.bias": ours["patch_embed.proj.bias"],
              "layernorm.weight": ours["norm.weight"], "layernorm.bias": ours["norm.bias"]}
    for i in range(len(net.blocks)):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        q, k, v = ours[b + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = ours[b + "attn.qkv.bias"].chunk(3)
        theirs.update({
            h + "attention.attention.query.weight": q, h + "attention.attention.query.bias": qb,
            h + "attention.attention.key.weight": k, h + "attention.attention.key.bias": kb,
            h + "attention.attention.value.weight": v, h + "attention.attention.value.bias": vb,
            h + "attention.output.dense.weight": ours[b + "attn.proj.weight"],
            h + "attention.output.dense.bias": ours[b + "attn.proj.bias"],
            h + "layer_scale1.lambda1": ours[b + "ls1.gamma"],
            h + "layer_scale2.lambda1": ours[b + "ls2.gamma"]})
        for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            for kind in ("weight", "bias"):
                theirs[f"{h}{part}.{kind}"] = ours[f"{b}{part}.{kind}"]
    mapped = from_transformers_dinov2(theirs)
    assert mapped.keys() == ours.keys()
    assert all(torch.equal(mapped[key], ours[key]) for key in ours)
    assert from_transformers_dinov2(ours) is ours   # a timm-layout file passes through


def _feature_args(*flags: str):
    import argparse

    from training.extraction import ExtractionOptions, FeatureModelOptions, add_feature_arguments

    parser = argparse.ArgumentParser()
    add_feature_arguments(parser)
    args = parser.parse_args(list(flags))
    return FeatureModelOptions.from_args(args), ExtractionOptions.from_args(args)


def test_features_read_at_the_scale_the_encoder_states():
    model, options = _feature_args("--encoder", "uni")
    assert model.encoder == "uni" and model.weights == "pretrained"
    assert (options.tiling.tile_size, options.tiling.target_mpp) == (224, 0.5)
    _, options = _feature_args("--encoder", "uni", "--mpp", "0.25")
    assert options.tiling.target_mpp == 0.25
    model, options = _feature_args()   # the default: ResNet-50 at Camelyon16's 40x
    assert (model.encoder, options.tiling.target_mpp) == ("resnet50", 0.243)
    model, _ = _feature_args("--layer", "layer3")   # the older spelling
    assert model.encoder == "resnet50-trunc"
    _, options = _feature_args("--tile-size", "256")   # a CNN pools any size
    assert options.tiling.tile_size == 256
    with pytest.raises(ConfigError, match="encoder uni takes 224 px tiles, not --tile-size 256"):
        _feature_args("--encoder", "uni", "--tile-size", "256")
    with pytest.raises(ConfigError, match="--layer layer3 is encoder resnet50-trunc"):
        _feature_args("--layer", "layer3", "--encoder", "uni")


def test_fit_refuses_feature_files_of_two_encoders(tmp_path, synthetic_slide):
    from training.extraction import ExtractionOptions, build_feature_model, extract_features
    from training.fit import FitOptions, fit

    features = tmp_path / "features" / "h5_files"
    options = ExtractionOptions(batch_size=4, workers=1, limit_tiles=4)
    names = {}
    for i, encoder in enumerate(("resnet50-trunc", TINY, TINY, "resnet50-trunc")):
        name = f"{'tumor' if i % 2 else 'normal'}_{i}"
        names[name] = encoder
        model = build_feature_model("none", encoder, 0, torch.device("cpu"), "torch")
        extract_features(synthetic_slide, features / f"{name}.h5", model, options, progress=False)
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"{n},{'Tumor' if n.startswith('tumor') else 'Normal'}\n"
                              for n in names))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ConfigError) as error:
        fit(tmp_path / "features", labels, FitOptions(folds=1, epochs=1), tracking_uri=uri)
    message = str(error.value)
    assert "disagree on encoder" in message and "one --encoder" in message
    assert "resnet50-trunc: normal_0, tumor_3" in message and f"{TINY}: normal_2, tumor_1" in message
    shutil.rmtree(tmp_path / "features")


def test_a_backbone_over_the_protobuf_limit_keeps_its_weights_beside_the_graph(tmp_path,
                                                                               monkeypatch):
    """ViT-H and ViT-g encoders (2.5-4.5 GB at fp32) cannot be one ONNX file: their weights go
    to backbone.onnx.data, listed in the manifest and covered by the bundle's digest. Shown on
    the small ViT with the limit lowered (a 4 GB export is minutes of this machine)."""
    import training.export as export
    from core.bundle import BACKBONE_DATA_ROLE, BundleManifest, bundle_digest
    from core.errors import BundleError
    from serving.engine import Engine
    from training.heads import build_head

    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 1 << 20)
    backbone = build_backbone("none", encoder=TINY)
    head = build_head({"kind": "chowder", "in_dim": 192}).eval()
    tiles = export.synthetic_parity_tiles(12)
    bundle = export.export_bundle(tmp_path / "b", backbone, head, int8_calibration=tiles)
    manifest = BundleManifest.read(bundle)
    assert manifest.files[BACKBONE_DATA_ROLE] == "backbone.onnx.data"
    assert (bundle / "backbone.onnx").stat().st_size < 1 << 20   # the graph, not the weights
    assert (bundle / "backbone.onnx.data").stat().st_size > 20 << 20
    assert manifest.int8["agreement"]["cosine_min"] >= 0.99
    engine = Engine(bundle, backend="onnxruntime", precision="fp32")
    try:
        with torch.inference_mode():
            expected = backbone(torch.from_numpy(tiles[:2])).numpy()
        assert np.abs(engine.score(tiles[:2])["features"] - expected).max() <= export.FEATURE_ATOL
    finally:
        engine.close()
    digest = bundle_digest(bundle)
    with open(bundle / "backbone.onnx.data", "r+b") as f:   # the digest covers the weights
        f.seek(1000)
        f.write(b"\x00" * 16)
    assert bundle_digest(bundle) != digest
    (bundle / "backbone.onnx.data").unlink()
    with pytest.raises(BundleError, match="backbone_data file 'backbone.onnx.data' is missing"):
        BundleManifest.read(bundle)
