"""Rollout engine throughput on the real default model, CPU: (a) engine vs the reference loop vs transformers
`generate` (dynamic cache); (c) 8 different prefixes mixed in one batch of 64 vs 8 separate batches of 8.

Every run decodes a fixed number of tokens (min_new_tokens = max_new_tokens) so the methods do the same work;
prefixes are 16-token "kv" prefixes initialised from text. Peak RSS is the process's (ru_maxrss) after each part.

    python benchmarks/rollout_engine.py [--prompts 16 --tokens 32 --repeats 3 --mixed-tokens 16]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from common import md_table, write_result

TOPICS = ["a coffee shop", "a motel", "a bicycle", "a museum", "a pizza", "a laptop", "a park", "a train ride",
          "a concert", "a bakery", "a hiking trail", "a phone", "a library", "a beach", "a cinema", "a gym"]
STYLES = ["Be enthusiastic.", "Be critical.", "Answer like a pirate.", "Be very formal.", "Use simple words.",
          "Be sarcastic.", "Mention the weather.", "Be poetic."]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up (not timed)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def part_a(model, tok, prefix, args) -> list[dict]:
    from rlprefix import engine, generation
    from rlprefix.generation import encode_prompts

    prompts = [f"Write a one-sentence review of {t}." for t in (TOPICS * 4)[:args.prompts]]
    ids, mask = encode_prompts(tok, prompts)
    n = args.tokens
    kw = dict(max_new_tokens=n, min_new_tokens=n, temperature=1.0)
    seeds = list(range(len(prompts)))
    runs = {
        "engine, prefix": lambda: engine.sample(model, tok, ids, mask, prefix, row_seeds=seeds, **kw),
        "reference loop, prefix": lambda: generation.sample(model, tok, ids, mask, prefix, row_seeds=seeds, **kw),
        "engine, no prefix": lambda: engine.sample(model, tok, ids, mask, row_seeds=seeds, **kw),
        "reference loop, no prefix": lambda: generation.sample(model, tok, ids, mask, row_seeds=seeds, **kw),
        "transformers generate (dynamic cache), no prefix": lambda: model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=n, min_new_tokens=n,
            pad_token_id=tok.pad_token_id),
    }
    rows = []
    for name, fn in runs.items():
        times = timed(fn, args.repeats)
        best = min(times)
        rows.append({"method": name, "tokens_per_s": len(prompts) * n / best, "best_s": best, "times_s": times})
        print(f"{name}: {rows[-1]['tokens_per_s']:.1f} tok/s (best of {args.repeats}: {best:.2f} s)", flush=True)
    ref = next(r for r in rows if r["method"] == "reference loop, prefix")["tokens_per_s"]
    for r in rows:
        r["vs_reference_with_prefix"] = r["tokens_per_s"] / ref
    return rows


def part_c(model, tok, prefixes, args) -> list[dict]:
    from rlprefix import engine
    from rlprefix.generation import encode_prompts

    k, per = len(prefixes), args.mixed_rows // len(prefixes)
    prompts = [f"Write a one-sentence review of {t}." for t in (TOPICS * 8)[:per * k]]
    ids, mask = encode_prompts(tok, prompts)
    bank = engine.PrefixBank(model, {s: p for s, p in zip(STYLES, prefixes)})
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

    rows = []
    for name, fn in ((f"{k} prefixes mixed in one batch of {per * k}", mixed),
                     (f"{k} separate batches of {per}", separate)):
        times = timed(fn, args.repeats)
        best = min(times)
        rows.append({"method": name, "completions_per_s": len(prompts) / best, "tokens_per_s": len(prompts) * n / best,
                     "best_s": best, "times_s": times})
        print(f"{name}: {rows[-1]['tokens_per_s']:.1f} tok/s (best {best:.2f} s)", flush=True)
    rows[0]["speedup_vs_separate"] = rows[1]["best_s"] / rows[0]["best_s"]
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
    from rlprefix import Prefix, load_model

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
                                          ("vs_reference_with_prefix", "x ref")]))
    print(md_table(result["mixed_prefixes"], [("method", "method"), ("tokens_per_s", "tokens/s"),
                                              ("completions_per_s", "completions/s")]))
    path = write_result("rollout_engine_cpu", result)
    print("wrote", path)


if __name__ == "__main__":
    main()
