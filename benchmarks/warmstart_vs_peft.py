"""Warm start: rlprefix vs PEFT's PrefixTuningConfig(prefix_projection=True), same data, batches, steps, LR.

Both train an MLP-reparameterised prefix of the same length and MLP size on the frozen default model with
AdamW, the same warm-up/cosine schedule, gradient clipping and the same micro-batches in the same order;
both are evaluated on the same held-out split. Reported: final and best eval loss, trainable parameters,
training steps per second (evaluation excluded).

    python benchmarks/warmstart_vs_peft.py [--steps 30]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from common import ROOT, md_table, write_result
from rlprefix import Prefix, load_model
from rlprefix.train.data import collate_sft, load_records, tokenize_sft
from rlprefix.train.schedule import lr_at
from rlprefix.train.warm_start import WarmStartConfig, _epoch_order, split_dataset, warm_start


def peft_run(model, tok, train, evals, cfg: WarmStartConfig, length: int, hidden: int) -> dict:
    from peft import PrefixTuningConfig, get_peft_model  # optional (the test extra): only this comparison needs it

    torch.manual_seed(cfg.seed)
    pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length,
                                                  prefix_projection=True, encoder_hidden_size=hidden))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    pad = tok.pad_token_id

    def nll(batch):
        out = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        targets = batch["labels"][:, 1:]
        return F.cross_entropy(out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-100, reduction="sum"), int((targets != -100).sum())

    @torch.no_grad()
    def eval_loss():
        tot, n = 0.0, 0
        for i in range(0, len(evals), 16):
            a, b = nll(collate_sft(evals[i:i + 16], pad))
            tot, n = tot + a.item(), n + b
        return tot / n

    per_epoch = max(1, math.ceil(len(train) / cfg.batch_size))
    train_time, best, losses = 0.0, math.inf, []
    for step in range(cfg.steps):
        order = _epoch_order(len(train), cfg.seed, step // per_epoch)
        start = (step % per_epoch) * cfg.batch_size
        batch = collate_sft([train[i] for i in order[start:start + cfg.batch_size]], pad)
        t = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.decay, cfg.min_lr_ratio)
        opt.zero_grad()
        loss, n = nll(batch)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        train_time += time.perf_counter() - t
        losses.append(loss.item() / n)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            best = min(best, eval_loss())
    final = eval_loss()
    pm.unload() if hasattr(pm, "unload") else None
    return {"eval_loss_final": final, "eval_loss_best": min(best, final), "trainable_params": sum(p.numel() for p in params),
            "steps_per_s": cfg.steps / train_time, "train_loss_last": losses[-1]}


def ours_run(model, tok, ds, cfg, length, hidden, init: str) -> dict:
    if init == "text":
        prefix = Prefix.from_text(model, tok, "Write a warm, friendly and positive reply.", length, "mlp", mlp_hidden=hidden)
    else:
        prefix = Prefix.for_model(model, length, "mlp", mlp_hidden=hidden, generator=torch.Generator().manual_seed(cfg.seed))
    n_params = prefix.num_parameters()
    res = warm_start(model, tok, prefix, ds, cfg)
    return {"eval_loss_final": res.final_eval_loss, "eval_loss_best": res.best_eval_loss, "trainable_params": n_params,
            "train_loss_last": res.history[-1]["loss"], "history": res.history}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--length", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok = load_model()
    data = load_records(str(ROOT / "examples" / "data" / "reviews.jsonl"))
    cfg = WarmStartConfig(steps=args.steps, batch_size=8, lr=args.lr, warmup_steps=5, eval_every=10, progress=False,
                          merge=False, seed=0)
    train_ds, eval_ds = split_dataset(data, cfg.eval_fraction, cfg.seed)
    train, evals = tokenize_sft(train_ds, tok), tokenize_sft(eval_ds, tok)

    rows = []
    for name, init in (("rlprefix (random init)", "random"), ("rlprefix (init from text)", "text")):
        r = ours_run(model, tok, data, cfg, args.length, args.hidden, init)
        r["steps_per_s"] = args.steps / sum(h["time/step"] for h in r.pop("history"))
        rows.append({"method": name, **r})
    rows.append({"method": "PEFT PrefixTuning (prefix_projection=True)",
                 **peft_run(model, tok, train, evals, cfg, args.length, args.hidden)})
    peft_row = rows[-1]
    for r in rows:
        r["steps_per_s_vs_peft"] = r["steps_per_s"] / peft_row["steps_per_s"]
    table = md_table(rows, [("method", "method"), ("eval_loss_final", "final eval loss"),
                            ("eval_loss_best", "best eval loss"), ("trainable_params", "trainable params"),
                            ("steps_per_s", "steps/s"), ("steps_per_s_vs_peft", "speed vs PEFT")])
    print(table)
    write_result("warmstart_vs_peft", {"settings": vars(args) | {"batch_size": 8, "warmup": 5, "schedule": "cosine"},
                                       "rows": rows, "table_md": table})


if __name__ == "__main__":
    main()
