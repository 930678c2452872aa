"""The embedded default image encoder, trained at first use: a small CNN (`rlprefix.images.encoders.SmallCNN`)
learns the built-in data's attributes (colour, shape, position of the training scenes; the digit of the training
digits) in seconds on a CPU, deterministically, and is cached as safetensors + JSON (never pickle).

It is a small encoder for rlprefix's built-in image data, not CLIP: on other images its features mean little."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rewards.images import COLOURS, DIGIT_WORDS, POSITIONS, SHAPES

from rlprefix.files import atomic_save_tensors, atomic_write_json, json_hash
from rlprefix.images.data import digits_task, shapes_task
from rlprefix.images.encoders import CNN_FILES, SMALL_CNN, SmallCNN, SmallCNNEncoder, load_vision_encoder, pixels
from rlprefix.models.loading import cache_dir

VERSION = 1
HEADS = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS), "digit": DIGIT_WORDS}


def _examples(per_combo: int, seed: int):
    """Pixels and per-head labels (-100 where a head does not apply) of the training splits only."""
    examples = shapes_task("train", 48 * per_combo, seed=seed) + digits_task("train")
    def index(head, value):
        return value if head == "digit" else HEADS[head].index(value)

    labels = {h: torch.tensor([index(h, x.labels[h]) if h in x.labels else -100 for x in examples]) for h in HEADS}
    return pixels([x.image for x in examples], 32), labels


def train_small_cnn(steps: int = 300, dim: int = 64, per_combo: int = 6, seed: int = 0) -> tuple[SmallCNN, dict]:
    """Train the encoder (deterministic for a seed on one machine); returns it and its metadata."""
    torch.manual_seed(seed)
    x, labels = _examples(per_combo, seed)
    net = SmallCNN(dim=dim)
    heads = nn.ModuleDict({h: nn.Linear(dim, len(v)) for h, v in HEADS.items()})
    opt = torch.optim.AdamW([*net.parameters(), *heads.parameters()], lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        feats = net(x[idx])
        losses = [loss_fn(heads[h](feats), labels[h][idx]) for h in HEADS if (labels[h][idx] >= 0).any()]
        opt.zero_grad()
        torch.stack(losses).sum().backward()
        opt.step()
    with torch.no_grad():
        feats = net(x)
        acc = {h: float((heads[h](feats).argmax(-1) == labels[h])[labels[h] >= 0].float().mean()) for h in HEADS}
    meta = {"format": "rlprefix-small-cnn", "version": VERSION, "dim": dim, "width": 16, "size": 32,
            "steps": steps, "seed": seed, "train_accuracy": acc,
            "note": "a small encoder for rlprefix's built-in image data (shapes, digits), not CLIP"}
    return net, meta


def default_encoder(folder: str | Path | None = None, steps: int = 300) -> SmallCNNEncoder:
    """The embedded default encoder: loaded from the cache, trained and cached first if absent."""
    folder = Path(folder) if folder is not None else cache_dir() / f"small-cnn-v{VERSION}"
    if not (folder / CNN_FILES[1]).is_file():
        # two processes training at once write the same files atomically: no lock needed
        net, meta = train_small_cnn(steps=steps)
        state = net.state_dict()
        meta["sha256"] = json_hash(meta, [v.numpy().tobytes() for v in state.values()])
        atomic_save_tensors(folder / CNN_FILES[0], state)
        atomic_write_json(folder / CNN_FILES[1], meta)  # written last: its presence means complete
    return SmallCNNEncoder.load(folder)


def open_encoder(reference: str | dict | None = None):
    """The encoder an image prefix names: None or "rlprefix-small-cnn" (the embedded default), a folder with the
    small CNN's files, or a transformers vision encoder by hub id or folder (a reference dict as encoders give)."""
    name = reference.get("name") if isinstance(reference, dict) else reference
    if name in (None, SMALL_CNN, "builtin"):
        return default_encoder()
    return load_vision_encoder(str(name))
