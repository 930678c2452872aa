"""The server's state and its side of a request: the model, the prefix store and the decode thread; preparing a request
(parse, validate, tokenise, fit the context) off the event loop, and queueing its rows.

Preparation runs on one worker thread (`off_loop`), so a long prompt or chat template never holds up the event loop
(`/health`, other requests' streams), and one thread calls the tokenizer at a time; a request's image goes through
its image prefix's encoder there too (`image_input`). Before tokenising, a prompt longer
than the context could hold in any tokenisation (more characters than the context times the longest token, twice
over for normalisation) is refused at once, so tokenising is bounded by the context, not by the body.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rlprefix.models import family_of
from rlprefix.serve.batcher import Batcher, Row
from rlprefix.serve.calls import Call, RowSink
from rlprefix.serve.continuous import BankCache, RunningBatch
from rlprefix.serve.image_input import request_kv
from rlprefix.serve.metrics import Metrics
from rlprefix.serve.protocol import APIError, ChatRequest, CompletionRequest, parse_body, validate
from rlprefix.serve.store import PrefixStore, ServedPrefix
from rlprefix.serve.text import TextStream
from rlprefix.settings import ServeSettings, default_of

log = logging.getLogger("rlprefix.serve.server")
CHAT_DEFAULT_MAX_TOKENS = 256


def context_length(model, tok) -> int:
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    return int(min(getattr(tok, "model_max_length", 2048), 1 << 20))


def longest_token(tok) -> int:
    """The most characters one token of `tok` stands for (its longest vocabulary entry; byte-level entries count
    bytes, which is at least their characters)."""
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    return max((len(p) for p in pieces if isinstance(p, str)), default=1)


@dataclass
class Job:
    """A request ready to decode: validated, its prefix resolved (and, for an image prefix, its image turned into its
    K/V), its prompts tokenised and fitted to the context."""
    req: CompletionRequest | ChatRequest
    chat: bool
    entry: ServedPrefix
    kv: object                    # its rows' K/V [layers, 2, P, kv_dim]: the entry's, or its image's; None: base
    prompts: list[list[int]]
    echo: list[str]               # per prompt: the text a choice repeats before its completion ("" unless echo)
    max_tokens: int
    stops: list[str]
    top: int | None               # log-probs: best alternatives per token (None: no log-probs)

    @property
    def prompt_tokens(self) -> int:
        """usage.prompt_tokens: each prompt once, however many choices (n) it has."""
        return sum(len(p) for p in self.prompts)


class Server:
    def __init__(self, model, tok, store: PrefixStore, model_name: str,
                 max_batch: int = default_of(ServeSettings, "max_batch"),
                 wait_s: float = default_of(ServeSettings, "batch_wait_ms") / 1000,
                 max_queue: int = default_of(ServeSettings, "max_queue")):
        family_of(model).require("serve", model, hint=f"{model_name}: the running batch's slot cache is decoder-only")
        self.model, self.tok, self.store, self.model_name = model, tok, store, model_name
        self.max_queue = max_queue
        self.metrics = Metrics()
        self.context = context_length(model, tok)
        self.max_prompt_chars = 2 * self.context * max(longest_token(tok), 1)
        self.banks = BankCache(model, metrics=self.metrics)
        self.running = RunningBatch(model, tok, self.banks, max_batch, self.context, self.metrics)
        self.eos = self.running.eos
        self.batcher = Batcher(self.running, wait_s, self.metrics)
        self.token_text = functools.lru_cache(maxsize=1 << 16)(self._token_text)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlprefix-prepare")
        self._last_scan = 0.0

    def start(self) -> None:
        self.batcher.start()
        self.metrics.set("rlprefix_prefixes", len(self.store.entries()))

    def stop(self) -> None:
        self.batcher.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _token_text(self, token: int) -> str:
        return self.tok.decode([token], skip_special_tokens=False)

    async def off_loop(self, fn, *args):
        """`fn(*args)` on the preparation thread, awaited."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    # ---- the served prefixes
    async def rescan(self) -> dict:
        self._last_scan = time.monotonic()  # before: concurrent unknown names trigger one scan, not one each
        report = await asyncio.to_thread(self.store.scan)
        self.metrics.set("rlprefix_prefixes", len(self.store.entries()))
        return report

    async def resolve(self, name: str) -> ServedPrefix:
        entry = self.store.get(name)
        if entry is None and self.store.root is not None and time.monotonic() - self._last_scan > 1.0:
            try:  # a directory added since the last scan is picked up on first use
                await self.rescan()
            except OSError as e:  # the prefix directory itself is gone: keep serving what is loaded
                log.warning("rescanning %s failed: %s", self.store.root, e)
            entry = self.store.get(name)
        if entry is None:
            raise APIError(404, f"model {name[:200]!r} does not exist; GET /v1/models lists the served ones", "model",
                           "model_not_found")
        return entry

    # ---- a request, off the event loop
    async def prepare(self, body: bytes, chat: bool) -> Job:
        req = await self.off_loop(_parse, ChatRequest if chat else CompletionRequest, body)
        entry = await self.resolve(req.model)
        return await self.off_loop(self._job, req, entry, chat)

    def _job(self, req, entry: ServedPrefix, chat: bool) -> Job:
        if chat:
            top, prompts, echo = req.top_logprobs_wanted(), self.encode_chat(req), [""]
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        else:
            top, prompts, max_tokens = req.top_logprobs(), self.encode_completion(req.prompt), req.max_tokens
            echo = [p if isinstance(p, str) else self.tok.decode(p, skip_special_tokens=True)
                    for p in _prompt_list(req.prompt)] if req.echo else [""] * len(prompts)
        max_tokens = self.check_context(entry, prompts, max_tokens, "messages" if chat else "prompt")
        stops = req.stops()
        kv = request_kv(entry, self.model, req.image() if chat else None, chat)  # last: the costliest check
        return Job(req, chat, entry, kv, prompts, echo, max_tokens, stops, top)

    def _check_chars(self, chars: int, field: str) -> None:
        if chars > self.max_prompt_chars:
            raise APIError(400, f"{field} is {chars} characters: more than the model's context of {self.context} "
                           f"tokens can hold", field, "context_length_exceeded")

    def encode_completion(self, prompt) -> list[list[int]]:
        out = []
        for p in _prompt_list(prompt):
            if isinstance(p, str):
                self._check_chars(len(p), "prompt")
            ids = self.tok(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", "prompt")
            if min(ids) < 0 or max(ids) >= self.model.config.vocab_size:
                raise APIError(400, f"prompt token ids must lie in [0, {self.model.config.vocab_size})", "prompt")
            out.append(ids)
        return out

    def encode_chat(self, req: ChatRequest) -> list[list[int]]:
        if not getattr(self.tok, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        self._check_chars(sum(len(m["content"]) for m in messages), "messages")
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template refused these messages (e.g. a role it does not support)
            raise APIError(400, f"the model's chat template refused the messages: {str(e)[:300]}", "messages") from None
        return [self.tok(text, add_special_tokens=False)["input_ids"]]

    def check_context(self, entry: ServedPrefix, prompts: list[list[int]], max_tokens: int | None,
                      field: str) -> int:
        """The max_tokens to use; a prompt (plus prefix) or budget that does not fit the context is a 400."""
        longest, ctx = max(len(p) for p in prompts), self.context
        room = ctx - entry.length - longest
        if room <= 0:
            raise APIError(400, f"{field} is {longest} tokens; with {entry.length} prefix tokens it does not fit the "
                           f"model's context of {ctx} tokens", field, "context_length_exceeded")
        if max_tokens is None:
            return min(room, CHAT_DEFAULT_MAX_TOKENS)
        if max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} + {longest} {field} tokens + {entry.length} prefix tokens "
                           f"exceed the model's context of {ctx} tokens", "max_tokens", "context_length_exceeded")
        return max_tokens

    # ---- its rows
    def submit(self, job: Job) -> Call:
        """Queue one row per prompt and choice; streamed rows and rows with stop strings get their tokens per step."""
        loop, call, req = asyncio.get_running_loop(), Call(self.metrics), job.req
        rows, waiting = len(job.prompts) * req.n, self.batcher.waiting()
        if waiting + rows > self.max_queue:
            raise APIError(429, f"the server is busy: {waiting} rows wait for a slot and this request adds {rows} "
                                f"(at most {self.max_queue} may wait); retry later", None, "rate_limit_exceeded",
                           type="rate_limit_error")
        for ids in job.prompts:
            for j in range(req.n):
                seed = req.seed + j if req.seed is not None else secrets.randbits(62)
                sink = RowSink(loop, TextStream(self.tok, job.stops), set() if req.ignore_eos else self.eos,
                               job.max_tokens, call.wake, logprobs=job.top is not None)
                row = Row(job.entry.name, job.kv, ids, job.max_tokens, req.temperature, req.top_p, seed,
                          sink=sink if req.stream or job.stops else None, logprobs=job.top, ignore_eos=req.ignore_eos)
                call.add(row, sink)
                self.batcher.submit(row)
        self.metrics.inc("rlprefix_prompt_tokens_total", job.prompt_tokens * req.n)  # prefilled once per row
        return call


def _parse(cls, body: bytes):
    return validate(cls, parse_body(body))


def _prompt_list(prompt) -> list:
    """A completion request's prompt as a list of prompts (each a string or a list of token ids)."""
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    return [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else list(prompt)
