"""Images into an image prefix's condition: the encoder an image prefix names, opened once per process, and a batch's
image features bound to the prefix (`rlprefix.prefixes.image`). The one place where images meet a prefix, for every
stage, for `generate` and for the server; it reads the prefix by its interface (kind "image", `encoder`,
`feature_dim`, `bind`), so it sits beside the prefixes, not above them."""
from __future__ import annotations

import json

import torch

from rlprefix.images.data import load_image
from rlprefix.images.embedded import open_encoder

NEEDS_IMAGES = "an image prefix needs one image per prompt (pass images=, or an `images` column in the data)"
_OPEN: dict[str, object] = {}  # an encoder reference -> the encoder, opened once per process


def is_image_prefix(prefix) -> bool:
    """True for an image prefix (bound to a batch's features or not)."""
    return getattr(prefix, "kind", None) == "image"


def encoder_for(prefix):
    """The frozen encoder that `prefix` was trained on (opened once; its feature size checked)."""
    key = json.dumps(prefix.encoder, sort_keys=True)
    if key not in _OPEN:
        _OPEN[key] = open_encoder(prefix.encoder)
    encoder = _OPEN[key]
    if encoder.dim != prefix.feature_dim:
        raise ValueError(f"the image prefix takes {prefix.feature_dim}-d features but its encoder "
                         f"{prefix.encoder or 'rlprefix-small-cnn'} gives {encoder.dim}-d ones")
    return encoder


def image_features(prefix, images) -> torch.Tensor:
    """[len(images), feature_dim]: each image (PIL, path or bytes) through the prefix's encoder."""
    loaded = [load_image(im, f"image {i}") if im is not None else _missing(i) for i, im in enumerate(images)]
    return encoder_for(prefix).encode(loaded)


def _missing(i: int):
    raise ValueError(f"image {i}: missing; {NEEDS_IMAGES}")


def with_images(prefix, images=None):
    """What a stage passes on for rows with `images` (one per row, or None): an image prefix bound to their
    features; any other prefix unchanged. An image prefix without images, or images for a prefix that takes none,
    is a ValueError saying so."""
    unbound_image = is_image_prefix(prefix) and hasattr(prefix, "bind")
    if images is None:
        if unbound_image:
            raise ValueError(NEEDS_IMAGES)
        return prefix
    if not is_image_prefix(prefix):
        what = "no prefix" if prefix is None else f"a prefix of kind {getattr(prefix, 'kind', type(prefix).__name__)}"
        raise ValueError(f"images were given but the model runs {what}, which takes no images; train an image "
                         f"prefix (prefix.kind: image) to condition on images")
    if not unbound_image:
        raise ValueError("the image prefix is already bound to images; pass the prefix itself with images=")
    return prefix.bind(image_features(prefix, list(images)))


def image_column(columns: dict) -> list | None:
    """A batch's images from its data columns: `images` (one image per row, TRL's name) or `image`."""
    for name in ("images", "image"):
        if name in columns:
            return list(columns[name])
    return None
