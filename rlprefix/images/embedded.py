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

VERSION = 2  # the recipe a new encoder is trained with; an image prefix records the version it was trained on
# Each version's training recipe, kept so that a prefix trained on an older encoder gets that encoder back (its
# features, not merely the same architecture). v2 (2026-12-06): 1000 steps, and half of each batch in grayscale with
# its colour label dropped, so the shape head cannot read the shape from the colour: on the 12 held-out colour/shape/
# position compositions (240 fresh scenes) v1's heads name the shape 0.55 and the colour 0.92 of the time, v2's
# 0.87 and 0.97 (position 1.0 both; training compositions: shape 0.87 -> 0.99).
RECIPES = {1: {"steps": 300, "gray": 0.0}, 2: {"steps": 1000, "gray": 0.5}}
HEADS = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS), "digit": DIGIT_WORDS}


def _labelled(examples) -> tuple[torch.Tensor, dict]:
    """Pixels and per-head labels (-100 where a head does not apply) of ImageCaption examples."""
    def index(head, value):
        return value if head == "digit" else HEADS[head].index(value)

    labels = {h: torch.tensor([index(h, x.labels[h]) if h in x.labels else -100 for x in examples]) for h in HEADS}
    return pixels([x.image for x in examples], 32), labels


def _examples(per_combo: int, seed: int):
    """Pixels and per-head labels of the training splits only."""
    return _labelled(shapes_task("train", 48 * per_combo, seed=seed) + digits_task("train"))


def _accuracy(net: SmallCNN, heads: nn.ModuleDict, x: torch.Tensor, labels: dict) -> dict:
    """Share of the labelled rows whose attribute each head names right (heads with no labelled row left out)."""
    with torch.no_grad():
        feats = net(x)
    return {h: float((heads[h](feats).argmax(-1) == labels[h])[labels[h] >= 0].float().mean())
            for h in HEADS if (labels[h] >= 0).any()}


def _grayscale(x: torch.Tensor, labels: dict, share: float, gen: torch.Generator):
    """A `share` of the batch in grayscale, their colour labels dropped (-100)."""
    gray = torch.rand(len(x), generator=gen) < share
    x = torch.where(gray.view(-1, 1, 1, 1), x.mean(1, keepdim=True).expand_as(x), x)
    return x, {**labels, "colour": labels["colour"].masked_fill(gray, -100)}


def train_small_cnn(steps: int | None = None, dim: int = 64, per_combo: int = 6, seed: int = 0,
                    version: int = VERSION) -> tuple[SmallCNN, nn.ModuleDict, dict]:
    """Train the encoder by `version`'s recipe (deterministic for a seed on one machine; `steps` overrides the
    recipe's); returns it, its attribute heads (`HEADS`, what `rlprefix.images.verifier` reads) and its metadata,
    with the heads' accuracy on held-out compositions (fresh scenes)."""
    if version not in RECIPES:
        raise ValueError(f"the embedded image encoder has versions {sorted(RECIPES)}, not {version!r}: upgrade "
                         "rlprefix to open an image prefix trained on a newer one")
    recipe = {**RECIPES[version], **({"steps": steps} if steps is not None else {})}
    torch.manual_seed(seed)
    x, labels = _examples(per_combo, seed)
    net = SmallCNN(dim=dim)
    heads = nn.ModuleDict({h: nn.Linear(dim, len(v)) for h, v in HEADS.items()})
    opt = torch.optim.AdamW([*net.parameters(), *heads.parameters()], lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    for _ in range(recipe["steps"]):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        xb, lb = x[idx], {h: labels[h][idx] for h in HEADS}
        if recipe["gray"]:
            xb, lb = _grayscale(xb, lb, recipe["gray"], gen)
        feats = net(xb)
        losses = [loss_fn(heads[h](feats), lb[h]) for h in HEADS if (lb[h] >= 0).any()]
        opt.zero_grad()
        torch.stack(losses).sum().backward()
        opt.step()
    acc = _accuracy(net, heads, x, labels)
    meta = {"format": "rlprefix-small-cnn", "version": version, "dim": dim, "width": 16, "size": 32,
            "steps": recipe["steps"], "grayscale_share": recipe["gray"], "seed": seed, "train_accuracy": acc,
            "heldout_composition_accuracy": _accuracy(net, heads, *_labelled(shapes_task("heldout", 240, seed=99))),
            "note": "a small encoder for rlprefix's built-in image data (shapes, digits), not CLIP"}
    return net, heads, meta


def default_encoder(folder: str | Path | None = None, steps: int | None = None, version: int = VERSION
                    ) -> SmallCNNEncoder:
    """The embedded default encoder of `version`: loaded from the cache, trained and cached first if absent."""
    folder = Path(folder) if folder is not None else cache_dir() / f"small-cnn-v{version}"
    if not (folder / CNN_FILES[1]).is_file():
        # two processes training at once write the same files atomically: no lock needed
        net, _, meta = train_small_cnn(steps=steps, version=version)
        state = net.state_dict()
        meta["sha256"] = json_hash(meta, [v.numpy().tobytes() for v in state.values()])
        atomic_save_tensors(folder / CNN_FILES[0], state)
        atomic_write_json(folder / CNN_FILES[1], meta)  # written last: its presence means complete
    return SmallCNNEncoder.load(folder)


def open_encoder(reference: str | dict | None = None):
    """The encoder an image prefix names: None or "rlprefix-small-cnn" (the embedded default), a folder with the
    small CNN's files, or a transformers vision encoder by hub id or folder (a reference dict as encoders give)."""
    name = reference.get("name") if isinstance(reference, dict) else reference
    if name in (None, SMALL_CNN, "builtin"):  # the version the prefix was trained on (1: recorded before versions)
        return default_encoder(version=(reference.get("version") or 1) if isinstance(reference, dict) else VERSION)
    return load_vision_encoder(str(name))
