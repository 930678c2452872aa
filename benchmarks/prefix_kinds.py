"""Prefix parameterisations side by side: kv, mlp and shared at the same length, the same warm start.

Each kind is initialised from the same text (or at random with `--init random`), trained on the quickstart's
warm-start data (examples/data/reviews.jsonl) with the same steps, batches, schedule and learning rate, and
evaluated on the same held-out split. Reported per kind (and per learning rate, when several are given):
trainable parameters (and as a fraction of kv's), eval loss at the start, best and final eval loss, and
training steps per second (evaluation excluded). One learning rate suits each parameterisation differently, so
`--lr 1e-3 3e-3 1e-2` runs every kind at each and the table shows them all.

    python benchmarks/prefix_kinds.py [--steps 30] [--length 10] [--lr 1e-3] [--model smollm2-135m-instruct]
"""
from __future__ import annotations

import argparse

import torch

from common import ROOT, md_table, write_result
from rlprefix import Prefix, load_model
from rlprefix.train.data import load_records, tokenize_sft
from rlprefix.train.warm_start import WarmStartConfig, evaluate_loss, split_dataset, warm_start

KINDS = ("kv", "mlp", "shared")
INIT_TEXT = "Write a warm, friendly and positive reply."


def build(model, tok, kind: str, args, seed: int) -> Prefix:
    kw = dict(mlp_hidden=args.hidden, shared_dim=args.shared_dim)
    if args.init == "text":
        return Prefix.from_text(model, tok, INIT_TEXT, args.length, kind, **kw)
    return Prefix.for_model(model, args.length, kind, generator=torch.Generator().manual_seed(seed), **kw)


def run_kind(model, tok, data, evals, kind: str, lr: float, args) -> dict:
    cfg = WarmStartConfig(steps=args.steps, batch_size=8, lr=lr, warmup_steps=5, eval_every=args.eval_every,
                          progress=False, merge=False, seed=0)
    torch.manual_seed(cfg.seed)
    prefix = build(model, tok, kind, args, cfg.seed)
    n_params = prefix.num_parameters()
    start = evaluate_loss(model, prefix, evals, tok.pad_token_id)
    res = warm_start(model, tok, prefix, data, cfg)
    train_s = sum(h["time/step"] for h in res.history)
    return {"kind": kind, "lr": lr, "trainable_params": n_params,
            "shared_dim": getattr(prefix, "shared_dim", None) if kind == "shared" else None,
            "eval_loss_start": start, "eval_loss_best": res.best_eval_loss, "best_step": res.best_step,
            "eval_loss_final": res.final_eval_loss, "train_loss_last": res.history[-1]["loss"],
            "steps_per_s": args.steps / train_s if train_s else None,
            "eval_curve": [(h["step"], h["eval_loss"]) for h in res.history if "eval_loss" in h]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias, hub id or local dir")
    ap.add_argument("--data", default=str(ROOT / "examples" / "data" / "reviews.jsonl"))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-3], help="every kind runs at each")
    ap.add_argument("--length", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=512, help="MLP hidden width (kind mlp)")
    ap.add_argument("--shared-dim", type=int, default=None, help="d of kind shared (default ceil(length / 4))")
    ap.add_argument("--init", choices=["text", "random"], default="text")
    ap.add_argument("--name", default="prefix_kinds", help="results file benchmarks/results/NAME.json")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok = load_model(args.model)
    data = load_records(args.data)
    ref = WarmStartConfig(progress=False, seed=0)  # the split warm_start itself makes (eval_fraction, seed)
    _, eval_ds = split_dataset(data, ref.eval_fraction, ref.seed)
    evals = tokenize_sft(eval_ds, tok, ref.max_length)

    rows = []
    for lr in args.lr:
        for kind in args.kinds:
            r = run_kind(model, tok, data, evals, kind, lr, args)
            print(f"{kind} lr {lr:g}: {r['trainable_params']:,} params, eval loss {r['eval_loss_start']:.4f} -> "
                  f"best {r['eval_loss_best']:.4f} (step {r['best_step']})", flush=True)
            rows.append(r)
    kv_params = next((r["trainable_params"] for r in rows if r["kind"] == "kv"), None)
    for r in rows:
        r["params_vs_kv"] = r["trainable_params"] / kv_params if kv_params else None
    table = md_table(rows, [("kind", "kind"), ("lr", "lr"), ("trainable_params", "trainable params"),
                            ("params_vs_kv", "x kv params"), ("eval_loss_start", "eval loss at start"),
                            ("eval_loss_best", "best eval loss"), ("best_step", "best step"),
                            ("eval_loss_final", "final eval loss"), ("steps_per_s", "steps/s")])
    print(table)
    settings = {k: v for k, v in vars(args).items() if k != "name"}
    write_result(args.name, {"settings": settings | {"batch_size": 8, "warmup": 5, "schedule": "cosine",
                                                      "eval_examples": len(evals), "train_examples": len(data) - len(eval_ds)},
                             "rows": rows, "table_md": table})


if __name__ == "__main__":
    main()
