"""Rollout engine throughput on the real default model, CPU: (a) engine vs the reference loop vs transformers
`generate` (dynamic cache, and static cache + torch.compile); (c) 8 different prefixes mixed in one batch of 64 vs 8 separate batches of 8.

Every run decodes a fixed number of tokens (min_new_tokens = max_new_tokens) so the methods do the same work;
prefixes are 16-token "kv" prefixes initialised from text. Peak RSS is the process's (ru_maxrss) after each part.

    python benchmarks/rollout_engine.py [--prompts 16 --tokens 32 --repeats 3 --mixed-tokens 16]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
from transformers import CompileConfig

from common import md_table, write_result
from rlprefix import Prefix, load_model
from rlprefix.decoding import engine
from rlprefix.decoding.bank import PrefixBank
from rlprefix.models import reference_sample
from rlprefix.decoding.prompts import encode_prompts

TOPICS = ["a coffee shop", "a motel", "a bicycle", "a museum", "a pizza", "a laptop", "a park", "a train ride",
          "a concert", "a bakery", "a hiking trail", "a phone", "a library", "a beach", "a cinema", "a gym"]
STYLES = ["Be enthusiastic.", "Be critical.", "Answer like a pirate.", "Be very formal.", "Use simple words.",
          "Be sarcastic.", "Mention the weather.", "Be poetic."]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(runs: dict, repeats: int) -> dict:
    """Best wall and best CPU seconds per method. The methods run round-robin (one warm-up round first) so load
    from other jobs on a shared machine spreads over all of them; CPU seconds (process time, all threads) are the
    steadier measure of work there."""
    for fn in runs.values():
        fn()
    wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return {k: (min(wall[k]), min(cpu[k]), wall[k], cpu[k]) for k in runs}


def table_rows(runs: dict, repeats: int, tokens: int, completions: int) -> list[dict]:
    rows = []
    for name, (wall, cpu, walls, cpus) in timed(runs, repeats).items():
        rows.append({"method": name, "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu,
                     "completions_per_s": completions / wall, "best_wall_s": wall, "best_cpu_s": cpu,
                     "wall_s": walls, "cpu_s": cpus})
        print(f"{name}: {tokens / wall:.1f} tok/s wall, {tokens / cpu:.1f} tok/CPU-s", flush=True)
    return rows


def compile_everywhere() -> CompileConfig:
    cfg = CompileConfig()
    cfg._compile_all_devices = True  # transformers compiles generate's forward on GPUs only unless this is set
    return cfg


def part_a(model, tok, prefix, args) -> list[dict]:
    prompts = [f"Write a one-sentence review of {t}." for t in (TOPICS * 4)[:args.prompts]]
    ids, mask = encode_prompts(tok, prompts)
    n = args.tokens
    kw = dict(max_new_tokens=n, min_new_tokens=n, temperature=1.0)
    seeds = list(range(len(prompts)))
    runs = {
        "engine, prefix": lambda: engine.sample(model, tok, ids, mask, prefix, row_seeds=seeds, **kw),
        "reference loop, prefix": lambda: reference_sample(model, tok, ids, mask, prefix, row_seeds=seeds, **kw),
        "engine, no prefix": lambda: engine.sample(model, tok, ids, mask, row_seeds=seeds, **kw),
        "reference loop, no prefix": lambda: reference_sample(model, tok, ids, mask, row_seeds=seeds, **kw),
        "transformers generate (dynamic cache), no prefix": lambda: model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=n, min_new_tokens=n,
            pad_token_id=tok.pad_token_id),
        # transformers' own fast path: a static cache and the forward compiled (it compiles on CPU only when asked)
        "transformers generate (static cache + compile), no prefix": lambda: model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=n, min_new_tokens=n,
            pad_token_id=tok.pad_token_id, cache_implementation="static", compile_config=compile_everywhere()),
    }
    rows = table_rows(runs, args.repeats, len(prompts) * n, len(prompts))
    ref = next(r for r in rows if r["method"] == "reference loop, prefix")
    for r in rows:
        r["x_reference_wall"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["x_reference_cpu"] = r["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"]
    return rows


def part_c(model, tok, prefixes, args) -> list[dict]:
    k, per = len(prefixes), args.mixed_rows // len(prefixes)
    prompts = [f"Write a one-sentence review of {t}." for t in (TOPICS * 8)[:per * k]]
    ids, mask = encode_prompts(tok, prompts)
    bank = PrefixBank(model, {s: p for s, p in zip(STYLES, prefixes)})
    index = torch.arange(k).repeat_interleave(per)
    n = args.mixed_tokens
    kw = dict(max_new_tokens=n, min_new_tokens=n, temperature=1.0)
    seeds = list(range(len(prompts)))

    def mixed():
        engine.sample(model, tok, ids, mask, bank=bank, prefix_index=index, row_seeds=seeds, **kw)

    def separate():
        for j in range(k):
            sl = slice(j * per, (j + 1) * per)
            engine.sample(model, tok, ids[sl], mask[sl], kv=bank.kv[j], row_seeds=seeds[sl], **kw)

    runs = {f"{k} prefixes mixed in one batch of {per * k}": mixed, f"{k} separate batches of {per}": separate}
    rows = table_rows(runs, args.repeats, len(prompts) * n, len(prompts))
    rows[0]["x_separate_wall"] = rows[1]["best_wall_s"] / rows[0]["best_wall_s"]
    rows[0]["x_separate_cpu"] = rows[1]["best_cpu_s"] / rows[0]["best_cpu_s"]
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mixed-rows", type=int, default=64)
    ap.add_argument("--mixed-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m-instruct")
    prefixes = [Prefix.from_text(model, tok, f"You write short reviews. {s}", length=16, kind="kv") for s in STYLES]
    result = {"settings": vars(args), "model": "smollm2-135m-instruct (fp32, dequantised GGUF)",
              "peak_rss_mib": {"after_load": peak_rss_mib()},
              "note": "ru_maxrss is the process peak, so later figures include earlier parts; CPU only, GPU unmeasured"}
    result["generation"] = part_a(model, tok, prefixes[0], args)
    result["peak_rss_mib"]["after_generation"] = peak_rss_mib()
    write_result("rollout_engine_cpu", result)  # keep part (a) even if part (c) is cut short
    result["mixed_prefixes"] = part_c(model, tok, prefixes, args)
    result["peak_rss_mib"]["after_mixed"] = peak_rss_mib()
    print(md_table(result["generation"], [("method", "method"), ("tokens_per_s", "tokens/s"),
                                          ("x_reference_wall", "x ref (wall)"),
                                          ("tokens_per_cpu_s", "tokens/CPU-s"), ("x_reference_cpu", "x ref (CPU)")]))
    print(md_table(result["mixed_prefixes"], [("method", "method"), ("tokens_per_s", "tokens/s"),
                                              ("tokens_per_cpu_s", "tokens/CPU-s"),
                                              ("x_separate_wall", "x separate (wall)"), ("x_separate_cpu", "x separate (CPU)")]))
    path = write_result("rollout_engine_cpu", result)
    print("wrote", path)


if __name__ == "__main__":
    main()
