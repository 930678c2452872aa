"""The OpenAI wire format the server speaks: request validation, error JSON, response and SSE chunk shapes, and the
two log-probability shapes (legacy completions: parallel lists; chat: one entry per token)."""
from __future__ import annotations

import json
import time
import uuid
from typing import Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for
TokenLogprob = tuple[int, float, list[tuple[int, float]]]  # (token id, its log-prob, [(id, log-prob)] best first)


class APIError(Exception):
    """An error the client gets as OpenAI error JSON with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=32)
    seed: int | None = None
    stop: Union[str, list[str], None] = Field(None)
    stream: bool = False
    stream_options: dict | None = None
    # vLLM's extension, sent by load generators (guidellm): decode max_tokens tokens whatever the model samples
    ignore_eos: bool = False

    def include_usage(self) -> bool:
        return bool(self.stream and (self.stream_options or {}).get("include_usage"))

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4:
            raise APIError(400, "stop may hold at most 4 sequences", "stop")
        return [s for s in stops if s]


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    def top_logprobs(self) -> int | None:
        """Alternatives per token to return (None: no log-probs)."""
        if self.echo and self.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported: the prompt's tokens are not scored; drop echo "
                           "or logprobs", "echo")
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict]]

    @field_validator("content")
    @classmethod
    def _parts(cls, content):
        """Text parts, each with a string `text`, and image parts (`image_url`: {"url": ...} or the URL string),
        which only an image prefix takes (`rlprefix.serve.image_input`); an audio or other part is refused, not
        dropped."""
        for i, part in enumerate(content if isinstance(content, list) else ()):
            kind = part.get("type")
            if kind == "image_url":
                if image_url(part) is None:
                    raise ValueError(f"content part {i} needs 'image_url': {{'url': a string}}")
                continue
            if kind != "text":
                raise ValueError(f"content part {i} has type {str(kind)[:40]!r}; only 'text' and 'image_url' parts "
                                 f"are supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} needs a string 'text'")
        return content

    def text(self) -> str:
        """The message's text: its text parts joined (image parts are the prefix's condition, not text)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content if part.get("type") == "text")

    def images(self) -> list[str]:
        """The URLs of its image parts."""
        if isinstance(self.content, str):
            return []
        return [image_url(part) for part in self.content if part.get("type") == "image_url"]


def image_url(part: dict) -> str | None:
    """The URL of an image_url content part (OpenAI's {"url": ..., "detail": ...} or a bare string), None if it has
    none."""
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    return url if isinstance(url, str) else None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def top_logprobs_wanted(self) -> int | None:
        """Alternatives per token to return (None: no log-probs)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def image(self) -> tuple[str, str] | None:
        """(param naming its content, URL) of the request's one image, None without one; a second image is a 400."""
        found = [(f"messages.{i}.content", url) for i, m in enumerate(self.messages) for url in m.images()]
        if len(found) > 1:
            raise APIError(400, f"a request may hold at most one image; it holds {len(found)} (the second in "
                           f"{found[1][0]})", found[1][0])
        return found[0] if found else None


def parse_body(raw: bytes) -> dict:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, an over-long integer, nesting too deep
        raise APIError(400, f"could not parse the request body as JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise APIError(400, "the request body must be a JSON object")
    return obj


def validate(cls: type[BaseModel], obj: dict):
    """Pydantic validation, with the first error turned into an OpenAI 400 naming the field."""
    try:
        return cls.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err["loc"]
        param = ".".join(map(str, loc[:3])) if loc and loc[0] == "messages" else (str(loc[0]) if loc else None)
        raise APIError(400, f"invalid value for '{param}': {err['msg']}", param or None) from None


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, choices: list[tuple[str, str, dict | None]], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": t, "logprobs": lp, "finish_reason": f}
                        for i, (t, f, lp) in enumerate(choices)],
            "usage": use}


def chat_response(rid: str, model: str, choices: list[tuple[str, str, dict | None]], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": lp,
                         "finish_reason": f} for i, (t, f, lp) in enumerate(choices)],
            "usage": use}


def completion_chunk(rid: str, model: str, index: int, text: str, finish: str | None,
                     logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


def _finite(lp: float) -> float:
    return max(lp, -9999.0)  # JSON has no -Infinity (a token the model rules out entirely)


def completion_logprobs(entries: list[TokenLogprob], text_of: Callable[[int], str], offset: int) -> tuple[dict, int]:
    """The legacy completions shape for these tokens (`text_of`: a token's text; `offset`: where the first one
    starts in the choice's text): tokens, token_logprobs, top_logprobs (the best ones plus the sampled token, as
    OpenAI returns up to logprobs + 1) and text_offset. Returns it and the offset after the last token."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, lp, top in entries:
        text = text_of(token)
        best = {text_of(t): _finite(v) for t, v in top}
        best.setdefault(text, _finite(lp))
        out["tokens"].append(text)
        out["token_logprobs"].append(_finite(lp))
        out["top_logprobs"].append(best)
        out["text_offset"].append(offset)
        offset += len(text)
    return out, offset


def chat_logprobs(entries: list[TokenLogprob], text_of: Callable[[int], str]) -> dict:
    """The chat shape for these tokens: one entry per token with its text, UTF-8 bytes, log-prob and the best
    alternatives (`top_logprobs` of them)."""
    def one(token: int, lp: float) -> dict:
        text = text_of(token)
        return {"token": text, "logprob": _finite(lp), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(t, lp), "top_logprobs": [one(a, v) for a, v in top]} for t, lp, top in entries],
            "refusal": None}


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def usage_chunk(rid: str, model: str, chat: bool, use: dict) -> dict:
    """The last chunk of a stream with `stream_options: {"include_usage": true}`: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [], "usage": use}
