"""Image-caption data that ships offline, and the user's own: every image arrives as an RGB PIL image.

- `shapes_task`: 64x64 scenes of one coloured shape at one position, drawn deterministically with Pillow, with
  templated captions ("a red circle at the top left"). The held-out split holds colour/shape/position combinations
  never drawn in training (each colour, shape and position alone is seen in training): compositional.
- `digits_task`: scikit-learn's bundled 8x8 handwritten digits (1,797 real images), upscaled, captioned
  "the digit seven"; every fifth image is held out.
- `load_caption_jsonl`: `{"image": path, "caption": ...}` per line, paths relative to the JSONL file.
- `from_dataset`: a `datasets` dataset (or any sequence of dicts) with an image column.
- `load_image_captions`: one of the above by spec ("builtin:shapes", "builtin:shapes:heldout", "builtin:digits",
  a .jsonl path).

Bad input (missing file, unreadable or corrupt image, an unsupported mode, an empty image, a missing caption)
raises one ValueError naming the file and the line."""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, UnidentifiedImageError

from rewards.images import COLOURS, DIGIT_WORDS, POSITIONS, SHAPES

MODES = ("RGB", "RGBA", "L", "LA", "P", "1")  # converted to RGB; others (16-bit, float, CMYK...) are refused
SPLITS = ("train", "heldout")
_CENTRES = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
            "bottom right": (0.73, 0.73), "centre": (0.5, 0.5)}


@dataclass
class ImageCaption:
    """One example: an RGB image, its reference caption, and the attributes the caption names (may be empty)."""

    image: Image.Image
    caption: str
    labels: dict = field(default_factory=dict)


def combinations(split: str) -> list[tuple[str, str, str]]:
    """The (colour, shape, position) combinations of a split: one in five held out, on a diagonal that leaves
    every colour, shape and position in training."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    combos = [(c, s, p) for ci, c in enumerate(COLOURS) for si, s in enumerate(SHAPES)
              for pi, p in enumerate(POSITIONS)]
    held = {(c, s, p) for (c, s, p) in combos
            if (list(COLOURS).index(c) + SHAPES.index(s) + POSITIONS.index(p)) % 5 == 0}
    return [x for x in combos if (x in held) == (split == "heldout")]


def draw_scene(colour: str, shape: str, position: str, size: int = 64, rng: random.Random | None = None):
    """One scene on a light grey background; `rng` jitters the centre and size a little (deterministic per seed)."""
    if colour not in COLOURS or shape not in SHAPES or position not in _CENTRES:
        raise ValueError(f"unknown scene ({colour!r}, {shape!r}, {position!r}); colours {list(COLOURS)}, "
                         f"shapes {list(SHAPES)}, positions {list(POSITIONS)}")
    rng = rng or random.Random(0)
    img = Image.new("RGB", (size, size), (235, 235, 235))
    cx, cy = (v * size + rng.uniform(-0.05, 0.05) * size for v in _CENTRES[position])
    r = size * rng.uniform(0.13, 0.18)
    box = (cx - r, cy - r, cx + r, cy + r)
    draw, fill = ImageDraw.Draw(img), COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def caption(labels: dict) -> str:
    """The built-in tasks' caption of a scene's colour, shape and position, or of a digit (0-9)."""
    if "digit" in labels:
        return f"the digit {DIGIT_WORDS[labels['digit']]}"
    where = "in the centre" if labels["position"] == "centre" else f"at the {labels['position']}"
    return f"a {labels['colour']} {labels['shape']} {where}"


def shapes_task(split: str = "train", n: int | None = None, seed: int = 0, size: int = 64) -> list[ImageCaption]:
    """`n` scenes (default: one per combination of the split), cycling through the split's combinations."""
    combos = combinations(split)
    rng = random.Random(f"shapes-{split}-{seed}")
    out = []
    for i in range(len(combos) if n is None else n):
        c, s, p = combos[i % len(combos)]
        labels = {"colour": c, "shape": s, "position": p}
        out.append(ImageCaption(draw_scene(c, s, p, size, rng), caption(labels), labels))
    return out


def digits_task(split: str = "train", n: int | None = None, size: int = 32) -> list[ImageCaption]:
    """scikit-learn's bundled digits as RGB images (white strokes on black), every fifth one held out."""
    from sklearn.datasets import load_digits  # here, not at the top: slow to import, only this data set needs it

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    digits = load_digits()
    rows = [i for i in range(len(digits.target)) if (i % 5 == 0) == (split == "heldout")]
    out = []
    for i in rows[:n]:
        pixels = (digits.images[i] * (255.0 / 16.0)).round().astype("uint8")
        img = Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST).convert("RGB")
        d = int(digits.target[i])
        out.append(ImageCaption(img, caption({"digit": d}), {"digit": d}))
    return out


def as_rgb(img, where: str) -> Image.Image:
    """Validate a PIL image and return it as RGB; `where` names the source in the error."""
    if not isinstance(img, Image.Image):
        raise ValueError(f"{where}: expected an image, got {type(img).__name__}")
    if img.mode not in MODES:
        raise ValueError(f"{where}: image mode {img.mode!r} is not supported (use one of {', '.join(MODES)})")
    if min(img.size) < 1:
        raise ValueError(f"{where}: the image is empty ({img.size[0]}x{img.size[1]})")
    return img.convert("RGB")


def load_image(source, where: str | None = None) -> Image.Image:
    """An RGB image from a path, bytes or a PIL image, fully decoded (a truncated file fails here, not later)."""
    if isinstance(source, Image.Image):
        return as_rgb(source, where or "image")
    where = where or ("image bytes" if isinstance(source, (bytes, bytearray)) else str(source))
    try:
        if isinstance(source, (bytes, bytearray)):
            img = Image.open(io.BytesIO(source))
        elif not isinstance(source, (str, Path)):
            raise ValueError(f"{where}: expected an image, a path or bytes, got {type(source).__name__}")
        else:
            if not Path(source).is_file():
                raise ValueError(f"{where}: image file {str(source)!r} not found")
            img = Image.open(source)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{where}: cannot read the image ({type(e).__name__}: {e})") from None
    return as_rgb(img, where)


def load_caption_jsonl(path) -> list[ImageCaption]:
    """Read `{"image": path, "caption": ...}` lines; image paths are relative to the JSONL file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"caption file {str(path)!r} not found")
    out = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise ValueError(f"{where}: each line needs an 'image' path (a string)")
        if not isinstance(row.get("caption"), str) or not row["caption"].strip():
            raise ValueError(f"{where}: each line needs a non-empty 'caption' string")
        image_path = path.parent / row["image"]
        out.append(ImageCaption(load_image(image_path, f"{where} ({row['image']})"), row["caption"]))
    if not out:
        raise ValueError(f"caption file {str(path)!r} has no examples")
    return out


def from_dataset(dataset, image_column: str = "image", caption_column: str = "caption") -> list[ImageCaption]:
    """Examples from a `datasets` dataset (or any sequence of dicts) with an image column (PIL images, paths
    or bytes, or datasets' {"bytes", "path"} dicts) and a caption column."""
    out = []
    for i, row in enumerate(dataset):
        where = f"dataset row {i}"
        if image_column not in row or caption_column not in row:
            raise ValueError(f"{where}: needs columns {image_column!r} and {caption_column!r}, has {list(row)}")
        image = row[image_column]
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        caption = row[caption_column]
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{where}: the {caption_column!r} column must be a non-empty string")
        out.append(ImageCaption(load_image(image, where), caption))
    return out


def load_image_captions(spec: str, n: int | None = None, seed: int = 0) -> list[ImageCaption]:
    """Examples by spec: "builtin:shapes[:train|:heldout]", "builtin:digits[:train|:heldout]", or a .jsonl path."""
    if spec.startswith("builtin:"):
        name, _, split = spec.removeprefix("builtin:").partition(":")
        split = split or "train"
        if name == "shapes":
            return shapes_task(split, n, seed)
        if name == "digits":
            return digits_task(split, n)
        raise ValueError(f"unknown built-in image data {spec!r}: use builtin:shapes or builtin:digits")
    return load_caption_jsonl(spec)[:n]


def caption_records(spec: str, prompt: str, n: int | None = None) -> list[dict]:
    """Image-caption data as any stage's rows: the `prompt`, the caption as the warm start's `completion` and as the
    rewards' `captions` column, and the image (`images`, the keyword rewards receive)."""
    return [{"prompt": prompt, "completion": x.caption, "captions": x.caption, "images": x.image}
            for x in load_image_captions(spec, n)]
