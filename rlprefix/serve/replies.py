"""A prepared request's reply: wait for its rows and answer in one JSON body, or stream SSE chunks as its tokens are
decoded; either way with the log-probs it asked for and counted in /metrics."""
from __future__ import annotations

import asyncio
import time

from fastapi.responses import Response, StreamingResponse
from starlette.requests import Request

from rlprefix.serve.calls import Call, ClientGone
from rlprefix.serve.guard import endpoint_label
from rlprefix.serve.protocol import (APIError, TokenLogprob, chat_chunk, chat_logprobs, chat_response, completion_chunk,
                                     completion_logprobs, completion_response, new_id, sse, usage, usage_chunk)
from rlprefix.serve.server import Job, Server


async def reply(server: Server, request: Request, job: Job):
    start = time.perf_counter()
    call = server.submit(job)
    if job.req.stream:
        body = _stream(server, request, job, call, start)
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        while True:
            call.wake.clear()
            if call.done():
                break
            await call.wait(request)
    except (ClientGone, asyncio.CancelledError) as e:
        call.cancel()
        if isinstance(e, ClientGone):
            return Response(status_code=499)
        raise
    if call.failed() is not None:
        call.cancel(client_left=False)
        raise call.failed()
    tokens = sum(s.tokens for s in call.sinks)
    record(server, request, tokens, start)
    choices = []
    for i, sink in enumerate(call.sinks):
        echo = job.echo[i // job.req.n]
        choices.append((echo + sink.output, sink.reason, _logprobs(server, job, sink.logprobs, len(echo))[0]))
    build = chat_response if job.chat else completion_response
    return build(new_id("chatcmpl" if job.chat else "cmpl"), job.entry.name, choices, usage(job.prompt_tokens, tokens))


def record(server: Server, request: Request, tokens: int, start: float) -> None:
    m = server.metrics
    m.inc("rlprefix_requests_total", endpoint=endpoint_label(request.app.routes, request.scope), status=200)
    m.inc("rlprefix_completion_tokens_total", tokens)
    m.observe("rlprefix_request_latency_seconds", time.perf_counter() - start)


def _logprobs(server: Server, job: Job, entries: list[TokenLogprob] | None, offset: int) -> tuple[dict | None, int]:
    """These tokens' log-probs in the reply's shape (None when the request asked for none), and the text offset
    after them (completions)."""
    if entries is None:
        return None, offset
    if job.chat:
        return chat_logprobs(entries, server.token_text), offset
    return completion_logprobs(entries, server.token_text, offset)


async def _stream(server: Server, request: Request, job: Job, call: Call, start: float):
    """SSE: each choice's new text as its tokens are decoded (OpenAI chunks carrying the choice index, and the
    log-probs of the tokens since the previous chunk), a last chunk per choice with its finish_reason, optionally a
    usage chunk, then [DONE]. If the client goes away, its rows are cancelled: queued ones never run, decoding ones
    stop at the next step."""
    rid, name, chat = new_id("chatcmpl" if job.chat else "cmpl"), job.entry.name, job.chat
    finished = [False] * len(call.sinks)
    echoes = [job.echo[i // job.req.n] for i in range(len(call.sinks))]
    offsets = [len(e) for e in echoes]

    def chunk(index: int, text: str | None, reason: str | None = None, entries: list | None = None) -> str:
        lp = None
        if entries is not None and job.top is not None:
            lp, offsets[index] = _logprobs(server, job, entries, offsets[index])
        if chat:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            return sse(chat_chunk(rid, name, index, delta, reason, lp))
        return sse(completion_chunk(rid, name, index, text or "", reason, lp))

    try:
        for index, echo in enumerate(echoes):
            if chat or echo:  # the assistant role first; or the echoed prompt
                yield chunk(index, None if chat else echo)
        while True:
            call.wake.clear()  # before looking: whatever arrives while chunks are sent wakes the wait below at once
            for index, sink in enumerate(call.sinks):
                if finished[index]:
                    continue
                for piece, entries in sink.take():
                    yield chunk(index, piece, entries=entries)
                if sink.error is not None:
                    err = f"internal error: {type(sink.error).__name__}: {sink.error}"
                    yield sse(APIError(500, err, type="server_error").body())
                    call.cancel(client_left=False)
                    finished = [True] * len(call.sinks)
                    return
                if sink.reason is not None:
                    yield chunk(index, "", sink.reason, entries=sink.rest())
                    finished[index] = True
            if all(finished):
                break
            await call.wait(request)
        tokens = sum(s.tokens for s in call.sinks)
        if job.req.include_usage():
            yield sse(usage_chunk(rid, name, chat, usage(job.prompt_tokens, tokens)))
        yield sse("[DONE]")
        record(server, request, tokens, start)
    except ClientGone:
        pass
    finally:
        if not all(finished):  # the client left (or the reply failed) before every choice was complete
            call.cancel()
