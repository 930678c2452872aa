"""Frozen image encoders: PIL images in, one feature vector per image out.

Two kinds, one interface (`encode(images) -> [B, dim]`, `dim`, `reference`):
- `TransformersVisionEncoder`: any transformers vision encoder by hub id or local path (CLIP vision, SigLIP, ViT,
  or the vision tower of a full CLIP/SigLIP model) through the Auto classes and its image processor (the slow,
  PIL-based one: rlprefix does not need torchvision). The feature is the pooled output, else the mean token.
- `SmallCNNEncoder`: the embedded default, a small CNN (`SmallCNN`) for rlprefix's built-in image data, stored as
  safetensors + JSON. It is not CLIP: it knows coloured shapes and digits, nothing else. It is trained
  deterministically at first use by `rlprefix.images.embedded` (seconds on a CPU).

`reference` is what an artifact records to find the encoder again (never the weights of a transformers encoder)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from rlprefix.files import load_tensors, read_json
from rlprefix.models.loading import freeze

SMALL_CNN = "rlprefix-small-cnn"  # the name an artifact records for the embedded default
CNN_FILES = ("encoder.safetensors", "encoder.json")


class SmallCNN(nn.Module):
    """Three stride-2 convolutions and a mean pool: [B, 3, S, S] in [0, 1] -> [B, dim]."""

    def __init__(self, dim: int = 64, width: int = 16, size: int = 32):
        super().__init__()
        self.size, self.dim = size, dim
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU())
        self.head = nn.Linear(2 * width * (size // 8) ** 2, dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(pixels).flatten(1))


def pixels(images, size: int) -> torch.Tensor:
    """RGB PIL images -> [B, 3, size, size] floats in [0, 1] (bilinear resize)."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class SmallCNNEncoder:
    """The embedded default encoder, loaded from a folder holding `encoder.safetensors` and `encoder.json`."""

    def __init__(self, net: SmallCNN, meta: dict):
        self.net, self.meta = freeze(net), meta
        self.dim = net.dim
        self.reference = {"kind": "small-cnn", "name": SMALL_CNN, "version": meta.get("version"),
                          "sha256": meta.get("sha256")}

    @classmethod
    def load(cls, folder) -> "SmallCNNEncoder":
        folder = Path(folder)
        meta = read_json(folder / CNN_FILES[1])
        net = SmallCNN(dim=int(meta["dim"]), width=int(meta["width"]), size=int(meta["size"]))
        net.load_state_dict(load_tensors(folder / CNN_FILES[0]))
        return cls(net, meta)

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        return self.net(pixels(images, self.net.size))


class TransformersVisionEncoder:
    """A frozen transformers vision model and its (slow, PIL-based) image processor."""

    def __init__(self, name_or_path: str, device: str | torch.device = "cpu"):
        config = AutoConfig.from_pretrained(name_or_path)
        is_vision = getattr(config, "vision_config", None) is not None or hasattr(config, "image_size")
        if getattr(config, "is_encoder_decoder", False) or not is_vision:
            raise ValueError(f"{name_or_path!r} is not a vision encoder (model type {config.model_type!r})")
        self.processor = AutoImageProcessor.from_pretrained(name_or_path, use_fast=False)
        model = AutoModel.from_pretrained(name_or_path)
        self.model = freeze(getattr(model, "vision_model", model)).to(device)
        hidden = getattr(self.model.config, "hidden_size", None)
        if hidden is None:
            raise ValueError(f"{name_or_path!r}: cannot tell the feature size of its vision model")
        self.dim, self.device = int(hidden), torch.device(device)
        self.reference = {"kind": "transformers", "name": str(name_or_path)}

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        batch = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        out = self.model(pixel_values=batch["pixel_values"].to(self.device, self.model.dtype))
        pooled = getattr(out, "pooler_output", None)
        feats = pooled if pooled is not None else out.last_hidden_state.mean(dim=1)
        return feats.float().cpu()


def load_vision_encoder(name_or_path: str, device: str | torch.device = "cpu"):
    """A folder with the small CNN's files, or a transformers vision encoder (hub id or folder)."""
    if Path(name_or_path, CNN_FILES[1]).is_file():
        return SmallCNNEncoder.load(name_or_path)
    return TransformersVisionEncoder(name_or_path, device)
