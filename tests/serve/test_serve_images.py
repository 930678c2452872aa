"""`rlprefix serve` with image prefixes (issue #26): OpenAI `image_url` content parts (base64 data URLs) in
/v1/chat/completions give a prefix of kind "image" that request's K/V, which decodes in the running batch like a
stored prefix's.

One app for the module, run in this process by uvicorn on a thread and called with the `openai` client: a tiny
random llama, a text prefix ("alpha"), and two image prefixes on a tiny CNN encoder ("captioner": form kv;
"painter": form embedding, whose K/V the frozen model computes). Each image reply must equal
`rlprefix.generate(..., images=[the same image bytes], do_sample=False)` in-process; each bad image is a 400 with
one clear message, and the server keeps serving.
"""
from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import openai
import pytest
import torch
from PIL import Image
from test_serve_security import Live as SecurityLive

from rlprefix import Prefix, generate, kv_spec, load_model
from rlprefix.images import image_features
from rlprefix.images.data import shapes_task
from rlprefix.images.embedded import default_encoder
from rlprefix.prefixes.dynamic import DynamicPrefix
from rlprefix.serve.app import build_server, create_app
from rlprefix.serve.image_input import MAX_IMAGE_PIXELS, decode_data_url
from rlprefix.serve.protocol import APIError
from rlprefix.serve.store import PrefixStore
from tiny import save_tiny

PROMPT = "Describe the image."
TOKENS = 8


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, text: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


class Live(SecurityLive):
    """The app served by uvicorn on a thread of this process (test_serve_security's), with an `openai` client."""

    def __init__(self, app):
        super().__init__(app)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_images")
    save_tiny(root / "model", "llama")
    model, tok = load_model(str(root / "model"))
    encoder = root / "cnn"
    default_encoder(encoder, steps=5)
    scenes = shapes_task("train", 6)
    prefixes = {"alpha": Prefix(kv_spec(model), 4, "kv", init_std=1.0, generator=torch.Generator().manual_seed(1))}
    for name, form, seed in (("captioner", "kv", 0), ("painter", "embedding", 1)):
        prefix = Prefix.for_model(model, 3, "image", form=form, feature_dim=64, encoder=str(encoder), hidden=32,
                                  basis=4, generator=torch.Generator().manual_seed(seed))
        if form == "kv":
            with torch.no_grad():
                prefix.basis.mul_(30.0)  # images far apart in K/V: different greedy replies on a random model
        prefix.fit_features(image_features(prefix, [s.image for s in scenes]))
        prefixes[name] = prefix.eval()
    for name, prefix in prefixes.items():
        prefix.save(root / "prefixes" / name)
    live = Live(create_app(build_server(model, tok, "tiny", root / "prefixes")))
    live.model, live.tok, live.prefixes = model, tok, prefixes
    live.images = [png(s.image) for s in scenes]
    try:
        yield live
    finally:
        live.server.should_exit = True
        live.thread.join(timeout=30)


def reference(served, name: str, image: bytes) -> str:
    return generate(served.model, served.tok, [PROMPT], served.prefixes[name], images=[image], chat=True,
                    do_sample=False, max_new_tokens=TOKENS)[0]


def test_image_prefixes_are_listed_with_their_kind(served):
    cards = {m.id: m for m in served.client.models.list().data}
    assert set(cards) == {"base", "alpha", "captioner", "painter"}
    assert cards["captioner"].model_extra["kind"] == "image" and cards["captioner"].model_extra["prefix_length"] == 3


@pytest.mark.parametrize("name", ["captioner", "painter"])
def test_image_request_equals_generate_with_that_image(served, name):
    """Each image's reply is `generate(..., images=[image])` greedy; two images give different replies."""
    replies = []
    for image in served.images[:2]:
        got = served.client.chat.completions.create(model=name, messages=image_message(data_url(image)),
                                                    max_tokens=TOKENS, temperature=0)
        assert got.choices[0].message.content == reference(served, name, image)
        assert got.model == name and got.usage.completion_tokens <= TOKENS
        replies.append(got.choices[0].message.content)
    if name == "captioner":
        assert replies[0] != replies[1]


def test_jpeg_image_and_streaming(served):
    jpeg = png(Image.open(io.BytesIO(served.images[2])), "JPEG")
    want = reference(served, "captioner", jpeg)
    messages = image_message(data_url(jpeg, "image/jpeg"))
    stream = served.client.chat.completions.create(model="captioner", messages=messages, max_tokens=TOKENS,
                                                   temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def test_images_and_text_prefixes_share_the_batch(served):
    """Concurrent image requests (two images, two image prefixes) and text requests: each gets its own reply."""
    from concurrent.futures import ThreadPoolExecutor

    def image_call(k: int) -> bool:
        name, image = ("captioner", "painter")[k % 2], served.images[k % 3]
        got = served.client.chat.completions.create(model=name, messages=image_message(data_url(image)),
                                                    max_tokens=TOKENS, temperature=0)
        return got.choices[0].message.content == reference(served, name, image)

    def text_call(k: int) -> bool:
        got = served.client.chat.completions.create(model=("alpha", "base")[k % 2], max_tokens=4, temperature=0,
                                                    messages=[{"role": "user", "content": PROMPT}])
        return bool(got.choices) and got.usage.completion_tokens <= 4

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda k: image_call(k) if k % 2 else text_call(k), range(12)))
    assert all(results)


def _bad(url: str = "", *, model: str = "captioner", messages: list | None = None) -> dict:
    return {"model": model, "messages": messages or image_message(url), "max_tokens": 2}


def _tall_png() -> bytes:
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1  # a few kB: one colour compresses well
    return png(Image.new("L", (side, side), 200))


BAD = {
    "text prefix": (lambda s: _bad(data_url(s.images[0]), model="alpha"), "messages.0.content",
                    "model 'alpha' is a prefix of kind kv, which takes no images"),
    "base": (lambda s: _bad(data_url(s.images[0]), model="base"), "messages.0.content",
             "model 'base' is the bare model, which takes no images"),
    "no image": (lambda s: _bad(messages=[{"role": "user", "content": PROMPT}]), "messages",
                 "model 'captioner' is an image prefix: it needs one image"),
    "two images": (lambda s: _bad(messages=image_message(data_url(s.images[0])) + image_message(data_url(s.images[1]))),
                   "messages.1.content", "at most one image"),
    "http": (lambda s: _bad("https://example.com/cat.png"), "messages.0.content", "image URLs are not fetched"),
    "file": (lambda s: _bad("file:///etc/passwd"), "messages.0.content", "the image_url is not a data URL"),
    "not base64 url": (lambda s: _bad("data:image/png,rawbytes"), "messages.0.content", "bad image data URL"),
    "not an image type": (lambda s: _bad("data:text/plain;base64,aGk="), "messages.0.content", "bad image data URL"),
    "bad base64": (lambda s: _bad("data:image/png;base64,@@@@"), "messages.0.content", "not valid base64"),
    "corrupt": (lambda s: _bad(data_url(b"this is not a picture at all")), "messages.0.content",
                "the image cannot be read"),
    "truncated": (lambda s: _bad(data_url(s.images[0][:len(s.images[0]) // 2])), "messages.0.content",
                  "the image cannot be used: image 0: cannot read the image"),
    "too many pixels": (lambda s: _bad(data_url(_tall_png())), "messages.0.content", "pixels, more than the"),
    "no url": (lambda s: _bad(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
               "messages.0.content", "needs 'image_url'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_image_requests_are_400_and_the_server_keeps_serving(served, case):
    make, param, message = BAD[case]
    code, reply = served.post("/v1/chat/completions", make(served))
    assert code == 400 and reply["error"]["type"] == "invalid_request_error", reply
    assert reply["error"]["param"] == param and message in reply["error"]["message"], reply
    with pytest.raises(openai.BadRequestError, match="400"):  # the same through the openai client
        served.client.chat.completions.create(**make(served))
    ok = served.client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}],
                                               max_tokens=2)
    assert ok.choices[0].message.content is not None
    assert served.post("/v1/chat/completions", _bad(data_url(served.images[0])))[0] == 200


def test_image_prefix_on_completions_is_400(served):
    code, reply = served.post("/v1/completions", {"model": "captioner", "prompt": PROMPT, "max_tokens": 2})
    assert code == 400 and reply["error"]["param"] == "prompt"
    assert "needs one image, sent to /v1/chat/completions" in reply["error"]["message"]


def test_image_size_cap_is_checked_before_decoding():
    url = data_url(b"x" * 64)
    with pytest.raises(APIError, match="larger than 30 bytes") as e:
        decode_data_url(url, "messages.0.content", max_bytes=30)
    assert e.value.status == 400 and e.value.code == "image_too_large"
    assert decode_data_url(url, "messages.0.content", max_bytes=64) == b"x" * 64


def test_store_keeps_image_prefixes_and_still_refuses_dynamic(served, tmp_path):
    for name in ("alpha", "captioner"):
        served.prefixes[name].save(tmp_path / name)
    DynamicPrefix(kv_spec(served.model), 3, bank_size=2).save(tmp_path / "dynamic")
    store = PrefixStore(served.model, tmp_path)
    report = store.scan()
    assert report["loaded"] == ["alpha", "captioner"] and "input-conditioned" in report["refused"]["dynamic"]
    entry = store.get("captioner")
    assert entry.kind == "image" and entry.kv is None and entry.length == 3 and entry.image.kind == "image"
    assert store.get("alpha").image is None and store.get("alpha").kv is not None
