"""Input-conditioned (dynamic) prefix vs static kv prefixes where the best prefix depends on the input
(issue #16 item 3).

Synthetic data, two styles told apart by the prompt's first word: "Loud: <three words>" wants the words in
capitals, "Backwards: <three words>" wants them in reverse order (e.g. "Loud: quiet green river" -> "QUIET GREEN
RIVER", "Backwards: quiet green river" -> "river green quiet"). The phrases are drawn with a fixed seed from
small word lists; the held-out phrases never occur in training. The same warm start (init text, steps, batches,
schedule, learning rate) trains:

- `kv` at length P (a static prefix of the same length),
- `kv` at length B*P (a static prefix with the dynamic one's bank parameters, i.e. about the same count),
- `dynamic` with a bank of B entries of length P (the router adds (hidden + 1) * B parameters).

Reported: trainable parameters, held-out loss at the start and best (all rows, and per style), and for the
dynamic prefix the router's mean weights per style (how far it separates the two).

    python benchmarks/dynamic_prefix.py [--steps 40] [--length 8] [--bank 2] [--lr 3e-3] [--model smollm2-135m-instruct]
"""
from __future__ import annotations

import argparse
import random

import torch

from common import md_table, write_result
from rlprefix import Prefix, load_model
from rlprefix.train.data import load_records, tokenize_sft
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.train.warm_start import WarmStartConfig, evaluate_loss, warm_start

ADJ = ["quiet", "green", "small", "bright", "old", "cold", "happy", "heavy", "soft", "quick", "dark", "sweet",
       "tall", "empty", "warm", "round"]
NOUN = ["river", "apple", "window", "garden", "horse", "letter", "candle", "bridge", "cloud", "basket", "mountain",
        "teacher", "kitchen", "forest", "pocket", "violin", "harbour", "ladder"]
STYLES = {"Loud": lambda words: " ".join(w.upper() for w in words),
          "Backwards": lambda words: " ".join(reversed(words))}
INIT_TEXT = "Rewrite the phrase as asked."


def phrases(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        words = [rng.choice(ADJ), rng.choice(ADJ), rng.choice(NOUN)]
        if words[0] != words[1] and tuple(words) not in seen:
            seen.add(tuple(words))
            out.append(words)
    return out


def dataset(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Every phrase in both styles; train and held-out phrases are disjoint."""
    ps = phrases(n_train + n_eval, seed)

    def rows(group):
        return [{"prompt": f"{style}: {' '.join(w)}", "completion": fn(w), "style": style}
                for w in group for style, fn in STYLES.items()]

    return rows(ps[:n_train]), rows(ps[n_train:])


def build(model, tok, kind: str, length: int, bank: int):
    kw = {"bank_size": bank} if kind == "dynamic" else {}
    torch.manual_seed(0)
    return Prefix.from_text(model, tok, INIT_TEXT, length, kind, generator=torch.Generator().manual_seed(0), **kw)


def run(model, tok, name: str, kind: str, length: int, args, train, evals) -> dict:
    prefix = build(model, tok, kind, length, args.bank)
    ev = {s: tokenize_sft(load_records([r for r in evals if r["style"] == s]), tok) for s in STYLES}
    all_ev = [e for s in STYLES for e in ev[s]]
    start = evaluate_loss(model, prefix, all_ev, tok.pad_token_id)
    cfg = WarmStartConfig(steps=args.steps, batch_size=8, lr=args.lr, warmup_steps=5, eval_every=args.eval_every,
                          progress=False, merge=False, seed=0, forgetting_eval=0)
    res = warm_start(model, tok, prefix, [{k: r[k] for k in ("prompt", "completion")} for r in train], cfg,
                     eval_dataset=[{k: r[k] for k in ("prompt", "completion")} for r in evals])
    row = {"prefix": name, "kind": kind, "length": length, "bank": args.bank if kind == "dynamic" else None,
           "trainable_params": prefix.num_parameters(), "eval_loss_start": start,
           "eval_loss_best": res.best_eval_loss, "best_step": res.best_step, "eval_loss_final": res.final_eval_loss,
           "seconds": sum(h["time/step"] for h in res.history),
           "curve": [(h["step"], h["eval_loss"]) for h in res.history if "eval_loss" in h]}
    for s in STYLES:  # the best prefix (loaded back by the warm start) on each style
        row[f"eval_loss_{s.lower()}"] = evaluate_loss(model, res.prefix, ev[s], tok.pad_token_id)
    if kind == "dynamic":
        with torch.no_grad():
            for s in STYLES:
                ids, mask = encode_prompts(tok, [r["prompt"] for r in evals if r["style"] == s])
                row[f"router_{s.lower()}"] = [round(x, 4) for x in res.prefix.weights(model, ids, mask).mean(0).tolist()]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--length", type=int, default=8)
    ap.add_argument("--bank", type=int, default=2)
    ap.add_argument("--train-phrases", type=int, default=60)
    ap.add_argument("--eval-phrases", type=int, default=12)
    ap.add_argument("--only", nargs="+", choices=["same-length", "same-params", "dynamic"],
                    help="run only these rows (default: all three)")
    ap.add_argument("--name", default="dynamic_prefix")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok = load_model(args.model)
    train, evals = dataset(args.train_phrases, args.eval_phrases)
    rows = []
    plan = {"same-length": (f"kv, length {args.length} (same length)", "kv", args.length),
            "same-params": (f"kv, length {args.bank * args.length} (same bank parameters)", "kv",
                            args.bank * args.length),
            "dynamic": (f"dynamic, bank {args.bank} x length {args.length}", "dynamic", args.length)}
    for name, kind, length in (plan[k] for k in (args.only or plan)):
        r = run(model, tok, name, kind, length, args, train, evals)
        print(f"{name}: {r['trainable_params']:,} params, eval loss {r['eval_loss_start']:.4f} -> best "
              f"{r['eval_loss_best']:.4f} (loud {r['eval_loss_loud']:.4f}, backwards {r['eval_loss_backwards']:.4f})"
              + (f", router loud {r['router_loud']} backwards {r['router_backwards']}" if kind == "dynamic" else ""),
              flush=True)
        rows.append(r)
    table = md_table(rows, [("prefix", "prefix"), ("trainable_params", "trainable params"),
                            ("eval_loss_start", "eval loss at start"), ("eval_loss_best", "best eval loss"),
                            ("best_step", "best step"), ("eval_loss_loud", "Loud (best prefix)"),
                            ("eval_loss_backwards", "Backwards (best prefix)"), ("seconds", "train s")])
    print(table)
    write_result(args.name, {"settings": {k: v for k, v in vars(args).items() if k != "name"} |
                             {"batch_size": 8, "warmup": 5, "init_text": INIT_TEXT, "seed": 0,
                              "train_rows": len(train), "eval_rows": len(evals)},
                             "rows": rows, "table_md": table})


if __name__ == "__main__":
    main()
