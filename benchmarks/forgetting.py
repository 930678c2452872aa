"""Forgetting during the warm start, with and without general text mixed in (issue #16 item 5).

The same warm start (the quickstart's review data, the same prefix init, steps, batches and learning rate) at
each `--ratios` value of `warm_start.mix_ratio` with the built-in general text. Reported per ratio: the task's
best held-out loss, and the forgetting measure of the best prefix: perplexity of the frozen model on the
held-out general passages with the prefix vs without, and their ratio (1.0 = no forgetting).

    python benchmarks/forgetting.py [--steps 30] [--ratios 0 0.05 0.2] [--kind mlp] [--model smollm2-135m-instruct]
"""
from __future__ import annotations

import argparse

import torch

from common import ROOT, md_table, write_result
from rlprefix import Prefix, load_model
from rlprefix.train.warm_start import WarmStartConfig, warm_start

INIT_TEXT = "Write a warm, friendly and positive reply."


def run_ratio(model, tok, args, ratio: float) -> dict:
    cfg = WarmStartConfig(steps=args.steps, batch_size=8, lr=args.lr, warmup_steps=5, eval_every=args.eval_every,
                          progress=False, merge=False, seed=0, mix_ratio=ratio, forgetting_eval=args.passages)
    torch.manual_seed(cfg.seed)
    prefix = Prefix.from_text(model, tok, INIT_TEXT, args.length, args.kind)
    res = warm_start(model, tok, prefix, args.data, cfg)
    evals = [h for h in res.history if "eval_loss" in h]
    return {"mix_ratio": ratio, "mixed_examples": res.mixed, "best_eval_loss": res.best_eval_loss,
            "best_step": res.best_step, **{k: res.forgetting[k] for k in ("general_ppl", "general_ppl_base",
                                                                          "forgetting_ratio")},
            "final_eval_loss": res.final_eval_loss, "final_forgetting_ratio": evals[-1]["forgetting_ratio"],
            "curve": [(h["step"], h["eval_loss"], h["forgetting_ratio"]) for h in evals],
            "seconds": sum(h["time/step"] for h in res.history)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=str(ROOT / "examples" / "data" / "reviews.jsonl"))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.05, 0.2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--length", type=int, default=10)
    ap.add_argument("--kind", default="mlp", choices=["kv", "mlp", "shared"])
    ap.add_argument("--passages", type=int, default=32, help="held-out general passages (forgetting_eval)")
    ap.add_argument("--name", default="forgetting")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok = load_model(args.model)
    rows = []
    for ratio in args.ratios:
        r = run_ratio(model, tok, args, ratio)
        print(f"mix_ratio {ratio:g}: {r['mixed_examples']} general examples, best eval loss {r['best_eval_loss']:.4f} "
              f"(step {r['best_step']}), general ppl {r['general_ppl']:.2f} vs {r['general_ppl_base']:.2f} base, "
              f"ratio {r['forgetting_ratio']:.4f}", flush=True)
        rows.append(r)
    table = md_table(rows, [("mix_ratio", "mix_ratio"), ("mixed_examples", "general examples mixed in"),
                            ("best_eval_loss", "task best eval loss"), ("best_step", "best step"),
                            ("general_ppl", "general ppl with prefix"), ("general_ppl_base", "general ppl without"),
                            ("forgetting_ratio", "ratio (best prefix)"),
                            ("final_forgetting_ratio", "ratio (final step)")])
    print(table)
    write_result(args.name, {"settings": {k: v for k, v in vars(args).items() if k != "name"} |
                             {"batch_size": 8, "warmup": 5, "mix_data": "builtin", "seed": 0},
                             "rows": rows, "table_md": table})


if __name__ == "__main__":
    main()
