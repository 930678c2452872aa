"""Compression of a trained prefix: rank -> bytes, compression ratio, per-token KL, reward gain retained.

Reward retained = (R_compressed - R_base) / (R_full - R_base), on held-out prompts with a fixed sampling seed
(the base model, the full prefix and every compressed one see the same random stream).

    python benchmarks/compression_table.py runs/sentiment/prefix_ppo [--variants matrix:anchor:float16 ...]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from common import ROOT, md_table, write_result
from rewards import build_reward
from rlprefix import Prefix, compress, evaluate_reward, load_model, load_prefix
from rlprefix.train.compress import next_token_kl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("prefix", help="a trained (merged) prefix dir, e.g. runs/sentiment/prefix_ppo")
    ap.add_argument("--prompts", default=str(ROOT / "examples" / "data" / "review_prompts_heldout.jsonl"))
    ap.add_argument("--reward", default="sentiment")
    ap.add_argument("--variants", nargs="+", default=["matrix:anchor:float16", "whole:anchor:float16",
                                                       "shared:anchor:float16", "shared:plain:float32"],
                    help="scope:anchor|plain:dtype")
    ap.add_argument("--ranks", nargs="+", type=int, default=[0, 1, 2, 4, 8])
    ap.add_argument("--samples", type=int, default=4, help="samples per held-out prompt")
    ap.add_argument("--tokens", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok = load_model()
    full = load_prefix(args.prefix, model)
    if not getattr(full, "init_ids", None):  # saved before init ids were recorded: recover them from the run config
        run_cfg = yaml.safe_load((Path(args.prefix).parent / "config.yaml").read_text())["prefix"]
        full.init_ids = Prefix.from_text(model, tok, run_cfg["init_text"], full.length, "kv").init_ids
    reward = build_reward(args.reward)
    kw = dict(seed=0, max_new_tokens=args.tokens, samples_per_prompt=args.samples)
    base = evaluate_reward(model, tok, None, args.prompts, reward, **kw).mean
    full_r = evaluate_reward(model, tok, full, args.prompts, reward, **kw)
    gain = full_r.mean - base
    full_bytes = full.kv.numel() * 4
    rows = [{"scope": "full K/V", "anchored": "-", "dtype": "float32", "rank": "-", "bytes": full_bytes, "ratio": 1.0,
             "kl_per_token": 0.0, "reward": full_r.mean, "retained": 1.0}]
    for variant in args.variants:
        scope, anchor, dtype = variant.split(":")
        for r in args.ranks:
            if r == 0 and anchor != "anchor":
                continue
            comp = compress(full, rank=r, scope=scope, model=model, anchor=anchor == "anchor", dtype=dtype)
            if comp.compression_ratio() <= 1:
                break
            kl = next_token_kl(model, tok, full, comp, args.prompts, max_new_tokens=args.tokens, seed=0)
            rew = evaluate_reward(model, tok, comp, args.prompts, reward, **kw).mean
            rows.append({"scope": scope, "anchored": anchor == "anchor", "dtype": dtype, "rank": max(comp.ranks),
                         "bytes": comp.nbytes(), "ratio": comp.compression_ratio(), "kl_per_token": kl, "reward": rew,
                         "retained": (rew - base) / gain if abs(gain) > 1e-9 else float("nan")})
            print(rows[-1], flush=True)
    table = md_table(rows, [("scope", "scope"), ("anchored", "anchored"), ("dtype", "dtype"), ("rank", "rank"),
                            ("bytes", "bytes"), ("ratio", "x smaller"),
                            ("kl_per_token", "KL/token"), ("reward", "reward"), ("retained", "gain retained")])
    print(f"base reward {base:.3f}, full prefix {full_r.mean:.3f} (gain {gain:+.3f})\n{table}")
    write_result("compression_table", {"settings": vars(args), "base_reward": base, "full_reward": full_r.mean,
                                       "rows": rows, "table_md": table})


if __name__ == "__main__":
    main()
