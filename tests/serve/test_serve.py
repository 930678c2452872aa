"""`rlprefix serve` end to end: a real server process on 127.0.0.1, called with the `openai` client and raw HTTP.

One server for the module (a tiny random llama + tiny prefixes of every artifact kind); its replies must equal
the prompt sampled alone in-process (`encode_prompts` + `rlprefix.engine.sample` with the original prefix and the
row's seed, the engine `rlprefix.generate` runs), whatever else shares the batch and whenever the request joined
the running batch (continuous batching).
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from rlprefix import Prefix, compress, export_peft, kv_spec, load_model
from rlprefix.serve.batcher import Row
from rlprefix.serve.continuous import BankCache
from rlprefix.decoding.engine import sample
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.models import score_completions
from rlprefix.models.family import prefix_kv
from tiny import save_tiny, tiny_model

# The reference the server's running batch must match: the engine (per-row prefixes, counter-based per-row seeds).
SAMPLE = sample

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["hello world", "Write a one-sentence review of a coffee shop.", "The film was", "good great"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefix(spec, length: int, seed: int) -> Prefix:
    return Prefix(spec, length, "kv", init_std=1.0, generator=torch.Generator().manual_seed(seed))


class Served:
    def __init__(self, root: Path, port: int, proc: subprocess.Popen, log: Path, model, tok, prefixes: dict):
        self.root, self.port, self.proc, self.log = root, port, proc, log
        self.model, self.tok, self.prefixes = model, tok, prefixes
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def post(self, path: str, body) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read().decode()

    def reference(self, name: str, prompt: str, *, chat: bool, seed: int, max_tokens: int, temperature: float) -> str:
        """This prompt alone, sampled in-process with the original prefix and the row's seed (greedy at T=0)."""
        ids, mask = encode_prompts(self.tok, [prompt], chat=chat)
        kw = dict(do_sample=False) if temperature == 0 else dict(temperature=temperature)
        kv = prefix_kv(self.model, self.prefixes.get(name))
        return SAMPLE(self.model, self.tok, ids, mask, kv=kv, max_new_tokens=max_tokens, row_seeds=[seed], **kw).texts[0]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    save_tiny(root / "model", "llama")
    model, tok = load_model(str(root / "model"))
    spec = kv_spec(model)
    prefixes = {"alpha": _prefix(spec, 4, 1), "beta": _prefix(spec, 6, 2),
                "gamma": compress(_prefix(spec, 5, 3), rank=2, anchor=False), "delta": _prefix(spec, 3, 4)}
    for name in ("alpha", "beta", "gamma"):
        prefixes[name].save(root / "prefixes" / name)
    export_peft(prefixes["delta"], model, root / "prefixes" / "delta")  # served from the PEFT adapter files
    Prefix(kv_spec(tiny_model("gpt2")), 4, "kv").save(root / "prefixes" / "wrongarch")  # another architecture
    port, log = _free_port(), root / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "rlprefix.cli", "serve", "--model", str(root / "model"), "--prefixes",
           str(root / "prefixes"), "--host", "127.0.0.1", "--port", str(port), "--max-batch", "32",
           "--batch-wait-ms", "20"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        yield Served(root, port, proc, log, model, tok, prefixes)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_models_listed_and_other_architecture_refused(served):
    ids = [m.id for m in served.client.models.list().data]
    assert ids == ["base", "alpha", "beta", "delta", "gamma"]
    refusals = [line for line in served.log.read_text().splitlines() if "refusing prefix 'wrongarch'" in line]
    assert len(refusals) == 1 and "different model" in refusals[0]


@pytest.mark.parametrize("name", ["base", "alpha", "gamma", "delta"])
def test_completion_equals_in_process_sample(served, name):
    for temperature, seed in ((0.9, 11), (0.0, 0)):
        got = served.client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=12,
                                               temperature=temperature, seed=seed)
        want = served.reference(name, PROMPTS[1], chat=False, seed=seed, max_tokens=12, temperature=temperature)
        assert got.choices[0].text == want
        assert got.model == name and got.usage.completion_tokens <= 12


@pytest.mark.parametrize("name", ["base", "alpha", "delta"])
def test_chat_completion_equals_in_process_sample(served, name):
    got = served.client.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPTS[0]}],
                                                max_tokens=10, temperature=0.8, seed=5)
    want = served.reference(name, PROMPTS[0], chat=True, seed=5, max_tokens=10, temperature=0.8)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"


def test_langchain_openai_chat_model_gets_the_prefix_reply(served):
    """langchain-openai's ChatOpenAI, pointed at the server, gets the prefix's reply (invoke and stream)."""
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model="beta", base_url=served.url + "/v1", api_key="unused", max_tokens=10, temperature=0.8,
                      seed=5, max_retries=0, timeout=60)
    want = served.reference("beta", PROMPTS[1], chat=True, seed=5, max_tokens=10, temperature=0.8)
    assert chat.invoke(PROMPTS[1]).content == want
    assert "".join(chunk.content for chunk in chat.stream(PROMPTS[1])) == want
    assert want != served.reference("alpha", PROMPTS[1], chat=True, seed=5, max_tokens=10, temperature=0.8)


def _job(i: int) -> dict:
    return dict(model=["alpha", "beta", "gamma", "delta"][i % 4], prompt=PROMPTS[i % 3], seed=100 + i,
                max_tokens=4 + i % 9, temperature=[0.7, 1.0][i % 2])


def test_32_concurrent_requests_equal_their_single_results(served):
    jobs = [_job(i) for i in range(32)]
    alone = [served.post("/v1/completions", job)[1]["choices"][0]["text"] for job in jobs]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda job: served.client.completions.create(**job).choices[0].text, jobs))
    assert together == alone
    metrics = served.get("/metrics")
    rows = float(re.search(r"^rlprefix_batch_rows_sum (\S+)", metrics, re.M).group(1))
    batches = float(re.search(r"^rlprefix_batch_rows_count (\S+)", metrics, re.M).group(1))
    assert rows > batches  # some batches really held several rows


def test_n_choices_use_consecutive_seeds(served):
    got = served.client.completions.create(model="beta", prompt=PROMPTS[2], max_tokens=8, seed=40, n=3)
    for j, choice in enumerate(got.choices):
        assert choice.text == served.reference("beta", PROMPTS[2], chat=False, seed=40 + j, max_tokens=8,
                                               temperature=1.0)


def test_streaming_yields_the_same_text(served):
    """Streams arrive token by token (several content chunks) and join to the reply's text for the same seed."""
    kw = dict(model="gamma", max_tokens=14, seed=9, temperature=0.9)
    plain = served.client.completions.create(prompt=PROMPTS[3], **kw).choices[0].text
    chunks = list(served.client.completions.create(prompt=PROMPTS[3], stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == plain
    assert len([c for c in chunks if c.choices[0].text]) > 1
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    msgs = [{"role": "user", "content": PROMPTS[3]}]
    plain = served.client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    stream = list(served.client.chat.completions.create(messages=msgs, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in stream) == plain
    assert len([c for c in stream if c.choices[0].delta.content]) > 1 and stream[0].choices[0].delta.role == "assistant"


def test_streaming_n_choices_carry_their_index_and_usage(served):
    kw = dict(model="alpha", prompt=PROMPTS[2], max_tokens=10, seed=21, temperature=1.0, n=3)
    plain = [c.text for c in served.client.completions.create(**kw).choices]
    texts, reasons, use = ["", "", ""], [None] * 3, None
    for c in served.client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if c.usage is not None:
            assert not c.choices
            use = c.usage
            continue
        texts[c.choices[0].index] += c.choices[0].text
        reasons[c.choices[0].index] = reasons[c.choices[0].index] or c.choices[0].finish_reason
    assert texts == plain and None not in reasons
    assert use is not None and 3 <= use.completion_tokens <= 30


def test_stop_strings_end_the_text_and_are_never_streamed(served):
    kw = dict(model="beta", prompt=PROMPTS[0], max_tokens=24, seed=3, temperature=1.0)
    full = served.client.completions.create(**kw).choices[0].text
    assert len(full) > 12
    stop = full[len(full) // 2:len(full) // 2 + 3]  # cut in the middle of the text
    want = full[:full.find(stop)]
    plain = served.client.completions.create(stop=[stop, "\x00never"], **kw).choices[0]
    assert plain.text == want and plain.finish_reason == "stop"
    chunks = list(served.client.completions.create(stop=[stop, "\x00never"], stream=True, **kw))
    pieces = [c.choices[0].text for c in chunks]
    assert "".join(pieces) == want and chunks[-1].choices[0].finish_reason == "stop"
    assert not any(stop in p for p in pieces)


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
    ({"model": "alpha", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "alpha", "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ({"model": "alpha", "prompt": [5] * 300}, 400, "prompt"),
    ({"model": "alpha", "prompt": "hi", "max_tokens": 1000}, 400, "max_tokens"),
    ({"model": "alpha"}, 400, "prompt"),
    ({"model": "alpha", "prompt": []}, 400, "prompt"),
    ({"model": "alpha", "prompt": "hi", "n": 0}, 400, "n"),
    (b"{not json", 400, None),
])
def test_bad_requests_get_openai_errors(served, body, status, param):
    code, reply = served.post("/v1/completions", body)
    assert code == status and reply["error"]["param"] == param and reply["error"]["message"]
    code, reply = served.post("/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 3})
    assert code == 200 and len(reply["choices"]) == 1  # the server keeps serving


def test_chat_errors_and_openai_client_exceptions(served):
    code, reply = served.post("/v1/chat/completions", {"model": "alpha", "messages": []})
    assert code == 400 and reply["error"]["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        served.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        served.client.completions.create(model="base", prompt="hi", top_p=1.5)


def _metric(served, name: str) -> float:
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)", served.get("/metrics"), re.M)
    return float(m.group(1)) if m else 0.0


def _runs_to_max(served, kw: dict) -> dict:
    """`kw` with a seed whose completion runs to max_tokens when nothing stops it (a long-running row)."""
    for seed in range(40):
        if served.post("/v1/completions", {**kw, "seed": seed})[1]["usage"]["completion_tokens"] == kw["max_tokens"]:
            return {**kw, "seed": seed}
    raise AssertionError("no seed runs to max_tokens")


def test_client_disconnect_frees_its_slot(served):
    """Streaming clients that leave while their rows wait for a slot (a request of 32 rows fills every slot of the
    running batch): the rows never reach the model."""
    busy = dict(model="beta", max_tokens=200, temperature=0)
    busy = next({**busy, "prompt": p} for p in PROMPTS if served.post("/v1/completions", {**busy, "prompt": p})[1]
                ["usage"]["completion_tokens"] == 200)  # greedy rows that all run to max_tokens
    names = ("rlprefix_rows_cancelled_total", "rlprefix_rows_admitted_total")
    cancelled, admitted = (_metric(served, n) for n in names)
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        blocker = pool.submit(served.post, "/v1/completions", {**busy, "n": 32})
        time.sleep(0.2)
        body = json.dumps({"model": "alpha", "prompt": "hello", "max_tokens": 200, "stream": True, "n": 4}).encode()
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", served.port), timeout=5) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert blocker.result(timeout=120)[0] == 200
        busy_s = time.monotonic() - started
    deadline = time.monotonic() + 20
    while _metric(served, names[0]) < cancelled + 12 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(served, names[0]) == cancelled + 12
    assert served.client.completions.create(model="alpha", prompt="hi", max_tokens=3).choices  # still serving
    if busy_s > 0.8:  # the leavers were noticed while queued (polled every 0.1 s): only the 32 + 1 rows ran
        assert _metric(served, names[1]) == admitted + 33


def test_a_request_joins_a_running_batch(served):
    """A short request sent while a long one is decoding joins the running batch at its next step: it is admitted
    while the long row runs, its reply is complete while the long row is still decoding, and both texts equal their
    single results."""
    long = _runs_to_max(served, dict(model="alpha", prompt="hello", max_tokens=240, temperature=1.0))
    short = dict(model="delta", prompt=PROMPTS[2], max_tokens=4, temperature=0.9, seed=3)
    alone = [served.post("/v1/completions", job)[1]["choices"][0]["text"] for job in (long, short)]
    joined = _metric(served, "rlprefix_rows_joined_running_total")
    chunks = iter(served.client.completions.create(stream=True, **long))
    first = next(chunks)  # the long row is decoding
    got = served.client.completions.create(**short).choices[0].text
    assert _metric(served, "rlprefix_decode_rows") >= 1  # the long row has not finished
    assert _metric(served, "rlprefix_rows_joined_running_total") == joined + 1
    text = first.choices[0].text + "".join(c.choices[0].text for c in chunks)
    assert [text, got] == alone


def test_staggered_requests_joining_mid_decode_equal_their_single_results(served):
    """Requests arriving one after another (greedy and sampled, with and without stop strings, any prefix) join the
    running batch at different steps; each reply equals the same request served alone."""
    jobs = [{**_job(i), "temperature": 0.0} if i % 4 == 3 else _job(i) for i in range(12)]
    jobs[5]["stop"] = ["e"]
    alone = [served.post("/v1/completions", job)[1]["choices"][0]["text"] for job in jobs]
    long = _runs_to_max(served, dict(model="base", prompt="hello", max_tokens=240, temperature=1.0))
    joined = _metric(served, "rlprefix_rows_joined_running_total")

    def staggered(i: int) -> str:
        time.sleep(0.01 * i)
        return served.client.completions.create(**jobs[i]).choices[0].text

    chunks = iter(served.client.completions.create(stream=True, **long))
    next(chunks)  # a row is decoding: the others join it
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(staggered, range(len(jobs))))
    list(chunks)
    assert together == alone
    assert _metric(served, "rlprefix_rows_joined_running_total") > joined


def test_client_leaving_mid_stream_stops_its_decode(served):
    """A raw-HTTP client reads the first chunk and hangs up: its row is cancelled mid-decode (fewer tokens decoded
    than the reply it would have got, which runs to max_tokens), it leaves the rows being decoded, and the server
    serves the next request."""
    kw = _runs_to_max(served, dict(model="alpha", prompt="hello", max_tokens=230, temperature=1.0))
    names = ("rlprefix_requests_cancelled_total", "rlprefix_rows_cancelled_total", "rlprefix_decoded_tokens_total")
    before = {n: _metric(served, n) for n in names}
    body = json.dumps({**kw, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while b"data: " not in got:
            got += s.recv(4096)
        assert b"200 OK" in got
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (_metric(served, "rlprefix_requests_cancelled_total") == before[names[0]]
                                           or _metric(served, "rlprefix_decode_rows") != 0):
        time.sleep(0.05)
    after = {n: _metric(served, n) for n in names}
    assert after[names[0]] == before[names[0]] + 1 and after[names[1]] == before[names[1]] + 1
    assert 1 <= after[names[2]] - before[names[2]] < kw["max_tokens"]
    assert _metric(served, "rlprefix_decode_rows") == 0
    assert served.client.completions.create(model="alpha", prompt="hi", max_tokens=3).choices  # still serving


def test_reload_and_first_use_pick_up_new_prefixes(served):
    spec = kv_spec(served.model)
    served.prefixes["epsilon"] = _prefix(spec, 4, 5)
    served.prefixes["epsilon"].save(served.root / "prefixes" / "epsilon")
    code, report = served.post("/v1/prefixes/reload", {})
    assert code == 200 and report["loaded"] == ["epsilon"] and "epsilon" in report["models"]
    got = served.client.completions.create(model="epsilon", prompt=PROMPTS[0], max_tokens=6, seed=2)
    assert got.choices[0].text == served.reference("epsilon", PROMPTS[0], chat=False, seed=2, max_tokens=6,
                                                   temperature=1.0)
    shutil.rmtree(served.root / "prefixes" / "epsilon")
    served.prefixes["zeta"] = _prefix(spec, 2, 6)
    served.prefixes["zeta"].save(served.root / "prefixes" / "zeta")
    time.sleep(1.1)  # unknown names trigger a rescan at most once a second
    assert served.client.completions.create(model="zeta", prompt="hi", max_tokens=2).model == "zeta"
    assert [m.id for m in served.client.models.list().data] == ["base", "alpha", "beta", "delta", "gamma", "zeta"]


def test_health_and_metrics(served):
    assert json.loads(served.get("/health"))["status"] == "ok"
    served.post("/v1/completions", {"model": "nope", "prompt": "hi"})
    served.post("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 2})
    text = served.get("/metrics")
    for name in ("rlprefix_requests_total", "rlprefix_completion_tokens_total", "rlprefix_batch_rows_bucket",
                 "rlprefix_request_latency_seconds_count", "rlprefix_prefixes"):
        assert name in text
    assert 'status="404"' in text and 'status="200"' in text


def test_bank_cache_reuses_a_bank_per_set_of_prefixes():
    """One PrefixBank per set of (name, K/V) in a batch: reused for the same set in any order, rebuilt when a
    reload replaced a prefix's K/V, none for a batch of `base` rows; rows point at their own prefix."""
    model = tiny_model("llama")
    spec = kv_spec(model)
    kvs = {n: prefix_kv(model, _prefix(spec, length, i)) for i, (n, length) in enumerate([("a", 3), ("b", 5)])}

    def row(name: str) -> Row:
        return Row(name, kvs.get(name), [1, 2], 4, 1.0, 1.0, 0)

    banks = BankCache(model, size=2)
    bank, index = banks.lookup([row("b"), row("base"), row("a"), row("b")])
    assert bank.lengths == [3, 5] and index.tolist() == [1, -1, 0, 1]
    assert torch.equal(bank.kv[1, :, :, :5], kvs["b"])
    assert banks.lookup([row("a"), row("b")])[0] is bank
    assert banks.lookup([row("base")])[0] is None
    kvs["a"] = kvs["a"].clone()  # a reload replaced "a" while rows were queued
    assert banks.lookup([row("a"), row("b")])[0] is not bank


def test_text_stream_detokenises_incrementally_and_holds_back_stop_strings():
    """Token by token or all at once, the same text: multi-byte characters split over byte tokens come out whole
    (an incomplete trailing character is held back), a tail that may start a stop string waits, and the text ends
    before the first stop string to be completed. Random token runs (invalid UTF-8 included) as well."""
    import random

    from rlprefix.serve.app import TextStream
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    ts = TextStream(tok, [])
    ids = tok("a\U0001F600b", add_special_tokens=False)["input_ids"]
    pieces = [ts.add([i]) for i in ids] + [ts.close()]
    assert "".join(pieces) == "a\U0001F600b" and "\U0001F600" in pieces and not any("\ufffd" in p for p in pieces)
    ts = TextStream(tok, ["great\n"])
    ids = tok("good great great\nend", add_special_tokens=False)["input_ids"]
    pieces = [ts.add([i]) for i in ids] + [ts.close()]
    assert "".join(pieces) == "good great " and ts.stopped
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(320) for _ in range(rng.randrange(1, 25))]
        stops = rng.choice([[], ["e"], ["th", "\ufffd"], ["an", "re", "ll"], ["abcd", "c"]])
        whole = TextStream(tok, stops)
        one = TextStream(tok, stops)
        text = whole.add(ids) + whole.close()
        assert "".join([one.add([i]) for i in ids] + [one.close()]) == text
        assert not any(s in text for s in stops)
        if not stops:
            assert text == tok.decode(ids, skip_special_tokens=True)


# PEFT's own forward (the reference here) hands transformers >= 5.2x the prefix as the deprecated `past_key_values`
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_saved_by_peft_itself_is_read_exactly(tmp_path, arch):
    """An adapter PEFT wrote (not rlprefix's export) gives PEFT's logits when served from its two files."""
    from peft import PrefixTuningConfig, get_peft_model

    from rlprefix.serve.store import load_served
    from rlprefix.models.decoder_only import forward

    peft_model = get_peft_model(tiny_model(arch), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    peft_model.save_pretrained(tmp_path)
    base = tiny_model(arch)
    kind, kv = load_served(tmp_path, base)
    ids = torch.tensor([[5, 9, 12, 40]])
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    got = forward(base, ids, torch.ones_like(ids), kv=kv).logits
    assert kind == "peft" and torch.allclose(got, want, atol=1e-5)


# ---- log-probs: the policy the tokens were sampled from, as rlprefix scores them -------------------------------------
def _scored(served, name: str, prompt: str, *, chat: bool, seed: int, max_tokens: int, temperature: float):
    """(token ids, their log-probs, log-probs of the whole vocabulary per position) of the reply the server must give:
    the engine's tokens for this prompt alone (the other tests check the server gives them), scored by
    `rlprefix.models.score_completions` with the same prefix under softmax(logits / T) (T = 1 when greedy)."""
    ids, mask = encode_prompts(served.tok, [prompt], chat=chat)
    kw = dict(do_sample=False) if temperature == 0 else dict(temperature=temperature)
    kv = prefix_kv(served.model, served.prefixes.get(name))
    out = SAMPLE(served.model, served.tok, ids, mask, kv=kv, max_new_tokens=max_tokens, row_seeds=[seed], decode=False,
                 **kw)
    n = int(out.completion_mask.sum())
    t = temperature or 1.0
    with torch.no_grad():
        scores = score_completions(served.model, ids, mask, out.completion_ids[:, :n], out.completion_mask[:, :n],
                                   kv=kv, temperature=t)
    return out.completion_ids[0, :n].tolist(), scores.logprobs[0].tolist(), torch.log_softmax(scores.logits[0] / t, -1)


def _text(served, token: int) -> str:
    return served.tok.decode([token], skip_special_tokens=False)


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-4 for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["base", "gamma", "delta"])
@pytest.mark.parametrize("temperature, seed", [(0.8, 11), (0.0, 0)])
def test_completion_logprobs_equal_rlprefix_scoring(served, name, temperature, seed):
    kw = dict(model=name, prompt=PROMPTS[1], max_tokens=10, temperature=temperature, seed=seed, logprobs=3)
    got = served.client.completions.create(**kw).choices[0]
    tokens, want, logp = _scored(served, name, PROMPTS[1], chat=False, seed=seed, max_tokens=10,
                                 temperature=temperature)
    lp = got.logprobs
    assert lp.tokens == [_text(served, t) for t in tokens] and _close(lp.token_logprobs, want)
    assert lp.text_offset == list(itertools.accumulate([0] + [len(t) for t in lp.tokens[:-1]]))
    for i, top in enumerate(lp.top_logprobs):
        values, ids = logp[i].topk(3)
        expect = {_text(served, t): v for t, v in zip(ids.tolist(), values.tolist())}
        expect.setdefault(lp.tokens[i], want[i])  # the sampled token, when not among the best
        assert top.keys() == expect.keys() and _close([top[k] for k in expect], list(expect.values()))
    if temperature == 0:  # greedy: each token is the policy's most likely one
        assert _close(lp.token_logprobs, logp.max(-1).values.tolist())
    chunks = list(served.client.completions.create(stream=True, **kw))  # streamed: the same records, in pieces
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert [t for c in streamed for t in c.tokens] == lp.tokens
    assert _close([x for c in streamed for x in c.token_logprobs], lp.token_logprobs)
    assert [o for c in streamed for o in c.text_offset] == lp.text_offset


def test_logprobs_follow_each_choice_and_the_prefix(served):
    """n choices: each its own tokens' log-probs; and they are the prefix's policy, not the bare model's."""
    got = served.client.completions.create(model="alpha", prompt=PROMPTS[2], max_tokens=6, seed=30, n=2, logprobs=0)
    for j, choice in enumerate(got.choices):
        tokens, want, _ = _scored(served, "alpha", PROMPTS[2], chat=False, seed=30 + j, max_tokens=6, temperature=1.0)
        assert choice.logprobs.tokens == [_text(served, t) for t in tokens]
        assert _close(choice.logprobs.token_logprobs, want)
        assert [list(top) for top in choice.logprobs.top_logprobs] == [[t] for t in choice.logprobs.tokens]
    ids, mask = encode_prompts(served.tok, [PROMPTS[2]], chat=False)
    comp = torch.tensor([tokens])
    with torch.no_grad():
        bare = score_completions(served.model, ids, mask, comp, torch.ones_like(comp)).logprobs[0].tolist()
    assert not _close(bare, want)


@pytest.mark.parametrize("name, temperature, seed", [("alpha", 0.9, 5), ("delta", 0.0, 0)])
def test_chat_logprobs_equal_rlprefix_scoring(served, name, temperature, seed):
    kw = dict(model=name, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8, temperature=temperature,
              seed=seed, logprobs=True, top_logprobs=2)
    content = served.client.chat.completions.create(**kw).choices[0].logprobs.content
    tokens, want, logp = _scored(served, name, PROMPTS[0], chat=True, seed=seed, max_tokens=8,
                                 temperature=temperature)
    assert [c.token for c in content] == [_text(served, t) for t in tokens]
    assert _close([c.logprob for c in content], want)
    assert all(c.bytes == list(c.token.encode()) for c in content)
    for i, c in enumerate(content):
        values, ids = logp[i].topk(2)
        assert [a.token for a in c.top_logprobs] == [_text(served, t) for t in ids.tolist()]
        assert _close([a.logprob for a in c.top_logprobs], values.tolist())
    streamed = [e for ch in served.client.chat.completions.create(stream=True, **kw)
                if ch.choices and ch.choices[0].logprobs is not None for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [c.token for c in content]
    assert _close([e.logprob for e in streamed], [c.logprob for c in content])
    plain = served.client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None}).choices[0]
    assert plain.logprobs is None


def test_echo_and_logprob_options(served):
    kw = dict(model="alpha", prompt=PROMPTS[2], max_tokens=6, seed=4)
    plain = served.client.completions.create(**kw).choices[0].text
    assert served.client.completions.create(echo=True, **kw).choices[0].text == PROMPTS[2] + plain
    chunks = list(served.client.completions.create(echo=True, stream=True, **kw))
    assert chunks[0].choices[0].text == PROMPTS[2] and "".join(c.choices[0].text for c in chunks) == PROMPTS[2] + plain
    ids = served.tok(PROMPTS[2])["input_ids"]
    got = served.client.completions.create(**{**kw, "prompt": ids, "echo": True}).choices[0].text
    assert got == served.tok.decode(ids, skip_special_tokens=True) + plain
    for bad, param in ((dict(echo=True, logprobs=2), "echo"), (dict(logprobs=21), "logprobs"),
                       (dict(logprobs=-1), "logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            served.client.completions.create(**kw, **bad)
        assert e.value.body["param"] == param and e.value.body["message"]
    msgs = [{"role": "user", "content": "hi"}]
    for bad, param in ((dict(top_logprobs=2), "top_logprobs"), (dict(logprobs=True, top_logprobs=21), "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            served.client.chat.completions.create(model="alpha", messages=msgs, **bad)
        assert e.value.body["param"] == param


def test_usage_counts_each_prompt_once(served):
    """usage.prompt_tokens: each prompt once, whatever n (as OpenAI counts it)."""
    lengths = [len(served.tok(p)["input_ids"]) for p in PROMPTS[:2]]
    got = served.client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=3, n=3)
    assert got.usage.prompt_tokens == lengths[0] and len(got.choices) == 3
    got = served.client.completions.create(model="alpha", prompt=PROMPTS[:2], max_tokens=3, n=2)
    assert got.usage.prompt_tokens == sum(lengths) and len(got.choices) == 4
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    chat = int(encode_prompts(served.tok, [PROMPTS[0]], chat=True)[1].sum())
    got = served.client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPTS[0]}],
                                                max_tokens=3, n=3)
    assert got.usage.prompt_tokens == chat
    chunks = list(served.client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=3, n=3, stream=True,
                                                   stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == lengths[0]


def test_ignore_eos_gives_max_tokens_on_every_choice(served):
    """guidellm sends `ignore_eos` (vLLM's extension) to fix output lengths: every choice has max_tokens tokens."""
    status, got = served.post("/v1/completions", {"model": "beta", "prompt": PROMPTS[:2], "max_tokens": 24, "n": 3,
                                                  "temperature": 2.0, "ignore_eos": True})
    assert status == 200 and got["usage"]["completion_tokens"] == 2 * 3 * 24
    assert {c["finish_reason"] for c in got["choices"]} == {"length"}


@pytest.mark.parametrize("content", [
    [{"type": "text", "text": 5}], [{"type": "text"}], [{"type": "text", "text": None}], [{"type": "text", "text": ["a"]}],
    [{"text": "no type"}], [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}], [{"type": ["text"]}],
    [{"type": "text", "text": "ok"}, {"type": "input_audio", "input_audio": {}}], ["a string part"], [5], [None], 5, None,
    {"type": "text", "text": "not in a list"},
])
def test_malformed_content_parts_are_400(served, content):
    body = {"model": "alpha", "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    code, reply = served.post("/v1/chat/completions", body)
    assert code == 400 and reply["error"]["param"] == "messages.0.content" and reply["error"]["message"], reply
    code, reply = served.post("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "hi"}]})
    assert code == 200  # the server keeps serving


def test_text_content_parts_join(served):
    kw = dict(model="alpha", max_tokens=6, seed=8)
    parts = [{"type": "text", "text": PROMPTS[0][:4]}, {"type": "text", "text": PROMPTS[0][4:]}]
    whole = served.client.chat.completions.create(messages=[{"role": "user", "content": PROMPTS[0]}], **kw)
    split = served.client.chat.completions.create(messages=[{"role": "user", "content": parts}], **kw)
    assert split.choices[0].message.content == whole.choices[0].message.content


@pytest.mark.parametrize("body", [
    b"[" * 100000 + b"]" * 100000,                                          # nesting too deep for the JSON parser
    b'{"model": "alpha", "prompt": "hi", "seed": ' + b"9" * 5000 + b"}",   # an integer too long to convert
    b'{"model": "alpha", "prompt": "hi", "max_tokens": 1e400}',             # infinity
    b'{"model": "alpha", "prompt": "hi", "temperature": NaN}',
    b'{"model": "alpha", "prompt": "hi", "stop": [1]}',
    b'{"model": ["alpha"], "prompt": "hi"}',
    b'{"model": "alpha", "prompt": [[1, 2], "mixed"]}',
    b'{"model": "alpha", "prompt": [[]]}',
    b'{"model": "alpha", "prompt": "hi", "stream_options": 5}',
    b"\xff\xfe{}",
])
def test_hostile_bodies_are_400_not_500(served, body):
    code, reply = served.post("/v1/completions", body)
    assert code == 400 and reply["error"]["type"] == "invalid_request_error", reply
