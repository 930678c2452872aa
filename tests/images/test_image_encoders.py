"""Frozen image encoders: tiny random transformers vision models (CLIP vision, ViT, a full CLIP) saved with their
slow image processors, and the embedded small CNN trained deterministically at first use and cached."""
import json

import pytest
import torch
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel, GPT2Config,
                          ViTConfig, ViTImageProcessor, ViTModel)

import rlprefix.images.embedded as ve
from rlprefix.images.encoders import SmallCNNEncoder, TransformersVisionEncoder, load_vision_encoder
from rlprefix.images.data import shapes_task

TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8)


def _save(model, processor, path):
    torch.manual_seed(0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def images():
    return [x.image for x in shapes_task("train", 3)]


@pytest.mark.parametrize("kind", ["clip-vision", "vit", "clip-full"])
def test_image_transformers_encoders_are_frozen_and_deterministic(tmp_path, images, kind):
    torch.manual_seed(0)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    if kind == "clip-vision":
        path = _save(CLIPVisionModel(CLIPVisionConfig(**TINY)), proc, tmp_path)
    elif kind == "vit":
        path = _save(ViTModel(ViTConfig(**TINY)), ViTImageProcessor(size={"height": 32, "width": 32}), tmp_path)
    else:
        text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
        path = _save(CLIPModel(CLIPConfig(text_config=text, vision_config=TINY, projection_dim=16)), proc, tmp_path)
    try:
        enc = load_vision_encoder(path)
    except ImportError as e:  # transformers 5.4 (the oldest tested) loads image processors only with torchvision
        if "Torchvision" not in str(e):
            raise
        pytest.skip("this transformers' image processors need torchvision, which the CPU torch file here lacks")
    assert isinstance(enc, TransformersVisionEncoder) and enc.dim == 32
    assert enc.reference == {"kind": "transformers", "name": path}
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    a, b = enc.encode(images), enc.encode(images[:1])
    assert a.shape == (3, 32) and torch.allclose(a[:1], b, atol=1e-5)
    assert not torch.allclose(a[0], a[1])                      # different images, different features


def test_image_text_model_is_refused_as_an_encoder(tmp_path):
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a vision encoder"):
        load_vision_encoder(str(tmp_path))


def test_image_small_cnn_is_trained_once_deterministically_and_cached(tmp_path, monkeypatch, images):
    a, _, meta = ve.train_small_cnn(steps=3)
    b, _, _ = ve.train_small_cnn(steps=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    enc = ve.default_encoder(tmp_path / "cnn", steps=120)            # chance is 0.25; 1000 steps (the default) reach 1.0
    saved = json.loads((tmp_path / "cnn" / "encoder.json").read_text())
    assert saved["train_accuracy"]["colour"] > 0.6 and "not CLIP" in saved["note"]
    assert saved["version"] == ve.VERSION and set(saved["heldout_composition_accuracy"]) == {"colour", "shape",
                                                                                              "position"}
    assert enc.reference["name"] == "rlprefix-small-cnn" and enc.reference["sha256"] == saved["sha256"]
    monkeypatch.setattr(ve, "train_small_cnn", lambda **kw: pytest.fail("retrained a cached encoder"))
    again = ve.default_encoder(tmp_path / "cnn")
    assert isinstance(again, SmallCNNEncoder)
    assert torch.equal(enc.encode(images), again.encode(images)) and enc.encode(images).shape == (3, 64)
    assert isinstance(load_vision_encoder(str(tmp_path / "cnn")), SmallCNNEncoder)


def test_image_small_cnn_versions_keep_their_recipe(monkeypatch):
    """An image prefix trained on an older embedded encoder opens that version (its own features), not the newest;
    a version this rlprefix does not know is refused with one line."""
    asked = []
    monkeypatch.setattr(ve, "default_encoder", lambda folder=None, steps=None, version=ve.VERSION: asked.append(version))
    ve.open_encoder({"kind": "small-cnn", "name": "rlprefix-small-cnn", "version": 1, "sha256": "x"})
    ve.open_encoder(None)
    ve.open_encoder("rlprefix-small-cnn")
    assert asked == [1, ve.VERSION, ve.VERSION] and ve.VERSION == 2
    with pytest.raises(ValueError, match="versions \\[1, 2\\], not 9: upgrade rlprefix"):
        ve.train_small_cnn(steps=1, version=9)
    a, _, meta = ve.train_small_cnn(steps=3, version=1)
    assert meta["version"] == 1 and meta["grayscale_share"] == 0.0
