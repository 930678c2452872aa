"""A caption-free reward for the built-in image tasks: a verifier looks at the image itself.

`caption_correctness` (rewards/images.py) needs each image's reference caption. RL can do without: a small CNN with
attribute heads (the embedded encoder's architecture and recipe, `rlprefix.images.embedded`, trained with another
seed on other draws of the training splits, so it is not the policy's own encoder) names the image's colour, shape
and position (or its digit), and the completion is scored with `caption_correctness` against what it names. So an
image prefix can learn on *uncaptioned* images, e.g. of compositions no caption showed it.

The verifier is only as right as its heads: `verifier.json` records their accuracy on fresh scenes of the held-out
compositions (v2 recipe, seed 1: shape 0.86, colour 0.90, position 1.0); a wrong head turns a right caption into a
low reward. Evaluate with the reference captions, never with the verifier that trained the prefix.

    reward:
      name: rlprefix.images.verifier:ImageVerifier
      task: shapes               # or digits
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rewards.base import Reward
from rewards.images import CaptionCorrectness

from rlprefix.files import atomic_save_tensors, atomic_write_json, json_hash, load_tensors, read_json
from rlprefix.images.data import caption
from rlprefix.images.embedded import HEADS, VERSION, train_small_cnn
from rlprefix.images.encoders import SmallCNN, pixels
from rlprefix.models.loading import cache_dir, freeze

FILES = ("verifier.safetensors", "verifier.json")
TASK_HEADS = {"shapes": ("colour", "shape", "position"), "digits": ("digit",)}


class Verifier:
    """The small CNN and its attribute heads, frozen: `name(images, task)` -> one caption per image."""

    def __init__(self, net: SmallCNN, heads: nn.ModuleDict, meta: dict):
        self.net, self.heads, self.meta = freeze(net), freeze(heads), meta

    @classmethod
    def load_or_train(cls, folder: str | Path | None = None, seed: int = 1, version: int = VERSION,
                      steps: int | None = None) -> "Verifier":
        """From `folder` (default: the model cache), trained and saved first if absent (seconds on a CPU)."""
        folder = Path(folder) if folder is not None else cache_dir() / f"image-verifier-v{version}-seed{seed}"
        if not (folder / FILES[1]).is_file():
            net, heads, meta = train_small_cnn(steps=steps, seed=seed, version=version)
            state = {**{f"net.{k}": v for k, v in net.state_dict().items()},
                     **{f"heads.{k}": v for k, v in heads.state_dict().items()}}
            meta = {**meta, "format": "rlprefix-image-verifier",
                    "note": "the attribute heads of a small CNN, a reward for rlprefix's built-in image data"}
            meta["sha256"] = json_hash(meta, [v.numpy().tobytes() for v in state.values()])
            atomic_save_tensors(folder / FILES[0], state)
            atomic_write_json(folder / FILES[1], meta)  # written last: its presence means complete
        meta = read_json(folder / FILES[1])
        if meta.get("format") != "rlprefix-image-verifier":
            raise ValueError(f"{folder}: not an rlprefix image verifier (format {meta.get('format')!r})")
        state = load_tensors(folder / FILES[0])
        net = SmallCNN(dim=int(meta["dim"]), width=int(meta["width"]), size=int(meta["size"]))
        net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        heads = nn.ModuleDict({h: nn.Linear(net.dim, len(v)) for h, v in HEADS.items()})
        heads.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("heads.")})
        return cls(net, heads, meta)

    @torch.no_grad()
    def name(self, images, task: str) -> list[str]:
        feats = self.net(pixels(images, self.net.size))
        picks = {h: self.heads[h](feats).argmax(-1).tolist() for h in TASK_HEADS[task]}
        named = {h: [i if h == "digit" else HEADS[h][i] for i in idx] for h, idx in picks.items()}
        return [caption({h: v[row] for h, v in named.items()}) for row in range(len(feats))]


class ImageVerifier(Reward):
    """`caption_correctness` of each completion against the caption the verifier names for its image (`images=`
    among the reward's keyword columns); the reference captions are not needed and not read."""

    name = "image_verifier"

    def __init__(self, task: str = "shapes", seed: int = 1, version: int = VERSION, wrong_penalty: float = 0.5,
                 folder: str | None = None):
        super().__init__()
        if task not in TASK_HEADS:
            raise ValueError(f"image_verifier: task must be one of {sorted(TASK_HEADS)}, got {task!r}")
        self.task = task
        self.verifier = Verifier.load_or_train(folder, seed=seed, version=version)
        self.correctness = CaptionCorrectness(wrong_penalty=wrong_penalty)

    def score(self, prompts, completions, **columns):
        images = columns.get("images", columns.get("image"))
        if images is None or len(images) != len(completions):
            raise ValueError("image_verifier needs the images as the 'images' column, one per completion")
        return self.correctness(prompts, completions, captions=self.verifier.name(list(images), self.task))
