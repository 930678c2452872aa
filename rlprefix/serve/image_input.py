"""A chat request's image (issue #26), for prefixes of kind "image": an OpenAI `image_url` content part holding a base64
data URL, decoded and checked here, then bound to the served image prefix through its encoder
(`rlprefix.images.with_images`), giving that request's own K/V [layers, 2, P, kv_dim], which its rows carry into the
running batch exactly as a stored prefix's K/V.

The server fetches nothing: an http(s) URL (or any URL that is not a data URL) is refused. A request holds at most one
image. Everything wrong with an image is a 400 naming the content part: an image for a text-only prefix or `base`, no
image for an image prefix, a URL that is not a base64 `data:image/...` URL, bytes that no image decoder reads (or a
truncated image), and an image over `MAX_IMAGE_BYTES` (decoded) or `MAX_IMAGE_PIXELS`.
"""
from __future__ import annotations

import base64
import binascii
import io

import torch
from PIL import Image

from rlprefix.images import with_images
from rlprefix.models.sampling import model_dtype
from rlprefix.serve.protocol import APIError

MAX_IMAGE_BYTES = 8 << 20          # a decoded image larger than this is refused (400); the body limit applies first
MAX_IMAGE_PIXELS = 4096 * 4096     # width x height above this is refused before the image is decoded (400)
DATA_URL_HINT = "send the image inline as a base64 data URL (data:image/png;base64,...)"


def decode_data_url(url: str, param: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The image bytes of a `data:image/<type>;base64,<data>` URL; anything else is a 400 for `param`."""
    head = url[:16].lower()
    if head.startswith(("http://", "https://")):
        raise APIError(400, f"image URLs are not fetched (the server reads nothing from the network); {DATA_URL_HINT}",
                       param)
    if not head.startswith("data:"):
        raise APIError(400, f"the image_url is not a data URL (it starts {url[:12]!r}); {DATA_URL_HINT}", param)
    meta, comma, payload = url[5:].partition(",")
    fields = [f.strip().lower() for f in meta.split(";")]
    if not comma or not fields[0].startswith("image/") or "base64" not in fields[1:]:
        raise APIError(400, f"bad image data URL (it starts {url[:40]!r}): it needs an image media type and base64 "
                       f"data; {DATA_URL_HINT}", param)
    payload = "".join(payload.split())
    if len(payload) > 4 * (max_bytes // 3 + 1):  # refused before decoding
        raise APIError(400, f"the image is larger than {max_bytes} bytes", param, "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "the image data URL's payload is not valid base64", param) from None
    if not data:
        raise APIError(400, "the image data URL holds no data", param)
    if len(data) > max_bytes:
        raise APIError(400, f"the image is {len(data)} bytes, more than the {max_bytes} a request may send", param,
                       "image_too_large")
    return data


def check_image(data: bytes, param: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """A 400 unless `data` is an image an image decoder recognises, of at most `max_pixels` (read from its header,
    before anything is decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise APIError(400, f"the image cannot be read ({type(e).__name__}); send a PNG, JPEG, GIF or WebP image",
                       param) from None
    if width * height > max_pixels:
        raise APIError(400, f"the image is {width}x{height} pixels, more than the {max_pixels} a request may send",
                       param, "image_too_large")


def takes_no_images(entry, param: str) -> APIError:
    what = "the bare model" if entry.kind == "base" else f"a prefix of kind {entry.kind}"
    return APIError(400, f"model {entry.name!r} is {what}, which takes no images; send images only to an image prefix "
                    f"(kind image)", param)


def needs_an_image(entry, param: str, chat: bool) -> APIError:
    where = "in the messages" if chat else "to /v1/chat/completions (completions take no images)"
    return APIError(400, f"model {entry.name!r} is an image prefix: it needs one image, sent {where} as an "
                    f"image_url content part with a data URL", param)


@torch.no_grad()
def request_kv(entry, model, image: tuple[str, str] | None, chat: bool) -> torch.Tensor | None:
    """The K/V a request's rows decode with: the stored prefix's, or, for an image prefix, the one its image gives
    ([layers, 2, P, kv_dim] on the model's device, in its dtype). `image`: (the content part's param, its URL).
    Runs on the preparation thread (the encoder, and for form "embedding" the frozen model, run here)."""
    if entry.image is None:
        if image is not None:
            raise takes_no_images(entry, image[0])
        return entry.kv
    if image is None:
        raise needs_an_image(entry, "messages" if chat else "prompt", chat)
    param, url = image
    data = decode_data_url(url, param)
    check_image(data, param)
    try:
        kv = with_images(entry.image, [data]).key_values(model)
    except ValueError as e:  # rlprefix.images' one-line reasons: a truncated or unsupported image, ...
        raise APIError(400, f"the image cannot be used: {' '.join(str(e).split())[:300]}", param) from None
    kv = kv[0].detach().to(device=model.device, dtype=model_dtype(model))
    if not torch.isfinite(kv).all():
        raise APIError(400, "this image gives the prefix non-finite K/V values", param)
    return kv
