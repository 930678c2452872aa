"""Stage 1, supervised warm start: train the prefix (P_theta and its MLP) on prompt/completion pairs with
the base model frozen, keep the best prefix by eval loss, then merge it to plain per-layer K/V.

One readable loop: AdamW, warm-up + decay, gradient clipping and accumulation, optional bf16 autocast,
periodic eval (loss, perplexity), early stopping, and checkpoints that resume bit-for-bit.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import (load_module_tensors, load_optimizer_state, load_rng_state,
                         module_tensors, optimizer_state, resume_checkpoint, rng_state, save_checkpoint)
from .data import SFTExample, collate_sft, load_records, tokenize_sft
from .distributed import Dist
from .guards import assert_finite
from .sharding import local_rows, padding_starts
from .metrics import MetricLogger, plot_metrics
from .prefix import Prefix
from .runtime import forward
from .schedule import lr_at
from .settings import CLOSED_UNIT, NONNEG, POSITIVE, Check, Settings, at_least, one_of, setting


@dataclass
class WarmStartConfig(Settings):
    section = "warm_start"
    steps: int = setting(200, "optimiser steps", NONNEG)
    batch_size: int = setting(8, "examples per micro-batch", POSITIVE)
    grad_accum: int = setting(1, "micro-batches per optimiser step", POSITIVE)
    # measured on SmolLM2-135M + MLP: 5e-3 diverged, 3e-3 worse than 1e-3
    lr: float = setting(1e-3, "peak learning rate (AdamW)", POSITIVE)
    weight_decay: float = setting(0.0, "AdamW weight decay", NONNEG)
    warmup_steps: int = setting(20, "linear warm-up steps", NONNEG)
    decay: str = setting("cosine", "learning-rate decay after warm-up", one_of("cosine", "linear", "constant"))
    min_lr_ratio: float = setting(0.1, "final learning rate / lr", CLOSED_UNIT)
    max_grad_norm: float = setting(1.0, "gradient clipping", POSITIVE)
    max_length: int = setting(256, "tokens per example (prompt + completion)", at_least(8))
    precision: str = setting("fp32", "bf16: autocast (prefix weights stay fp32)", one_of("fp32", "bf16"))
    seed: int = setting(0, "shuffling and initialisation seed")
    eval_fraction: float = setting(0.1, "held out when no eval set is given",
                                   Check(lambda v: 0 <= v < 1, "in [0, 1)"))
    eval_every: int = setting(25, "steps between evaluations", POSITIVE)
    early_stop_patience: int | None = setting(None, "evals without improvement before stopping (null: never)",
                                              POSITIVE)
    checkpoint_every: int = setting(50, "steps between checkpoints", POSITIVE)
    log_every: int = setting(1, "steps between metric records", POSITIVE)
    chat: bool | None = setting(None, "apply the chat template to prompts (null: when the tokenizer has one)")
    system: str | None = setting(None, "system message for chat prompts")
    merge: bool = setting(True, "return the merged (plain K/V) prefix")
    progress: bool = setting(True, "this stage's progress bar (logging.progress: false turns every bar off)")


@dataclass
class WarmStartResult:
    prefix: Prefix                     # best prefix (merged when config.merge)
    best_eval_loss: float
    best_step: int
    final_eval_loss: float
    steps_done: int
    history: list[dict] = field(default_factory=list)
    truncated: int = 0


def split_dataset(ds, eval_fraction: float, seed: int):
    if len(ds) < 2 or eval_fraction <= 0:
        return ds, ds
    n_eval = max(1, int(round(len(ds) * eval_fraction)))
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _autocast(model, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    return torch.autocast(model.device.type, dtype=torch.bfloat16)


def completion_nll(model, prefix, batch: dict, precision: str = "fp32") -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over completion tokens (labels != -100), and how many there were."""
    device = model.device
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    with _autocast(model, precision):
        logits = forward(model, ids, mask, prefix).logits
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=-100, reduction="sum")
    return nll, int((targets != -100).sum())


@torch.no_grad()
def evaluate_loss(model, prefix, examples: list[SFTExample], pad_id: int, batch_size: int = 16,
                  precision: str = "fp32", dist=None) -> float:
    """Mean per-token NLL of completions (exp of it is the perplexity); sharded over processes with `dist`."""
    if dist is not None and dist.world_size > 1:
        examples = examples[dist.rank::dist.world_size]
    total, count = 0.0, 0
    for i in padding_starts(model, dist, len(examples), batch_size):  # FSDP: None, a batch that counts nothing
        batch = examples[i:i + batch_size] if i is not None else [SFTExample([pad_id], [-100])]
        nll, n = completion_nll(model, prefix, collate_sft(batch, pad_id), precision)
        total, count = total + nll.item(), count + n
    if dist is not None:
        total, count = dist.sum(total), dist.sum(count)
    return total / max(count, 1)


def _config_hash(config: WarmStartConfig, prefix: Prefix, train: list[SFTExample]) -> str:
    """What a checkpoint is only valid for: the settings, the starting prefix and the training data content."""
    h = hashlib.sha256(json.dumps({**asdict(config), "progress": None, "prefix": prefix.config_dict(),
                                   "n": len(train)}, sort_keys=True, default=str).encode())
    for ex in train:
        h.update(json.dumps([ex.input_ids, ex.labels]).encode())
    for name, t in sorted(prefix.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def warm_start(model, tokenizer, prefix: Prefix, dataset, config: WarmStartConfig | None = None, *,
               eval_dataset=None, output_dir: str | Path | None = None, resume: bool = True,
               dist=None, tensorboard: bool = True) -> WarmStartResult:
    """Train `prefix` (in place) on `dataset` rows of prompt/completion (or chat messages); see WarmStartConfig.

    With `dist` (several processes), each micro-batch is split across processes, the loss is normalised by the
    micro-batches' global token count and gradients are summed: the same update as one process.
    """
    cfg = config or WarmStartConfig()
    cfg.validate()  # again: fields may have been changed since construction
    dist = dist or Dist()
    is_main = dist.is_main
    torch.manual_seed(cfg.seed)
    device = model.device
    prefix.to(device).train()
    if prefix.num_parameters() == 0:
        raise ValueError("the prefix has no trainable parameters (length 0?)")
    ds = load_records(dataset)
    if eval_dataset is None:
        train_ds, eval_ds = split_dataset(ds, cfg.eval_fraction, cfg.seed)
    else:
        train_ds, eval_ds = ds, load_records(eval_dataset)
    train = tokenize_sft(train_ds, tokenizer, cfg.max_length, cfg.chat, cfg.system)
    evals = tokenize_sft(eval_ds, tokenizer, cfg.max_length, cfg.chat, cfg.system)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    opt = torch.optim.AdamW(prefix.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = Path(output_dir) if output_dir else None
    step, best_loss, best_step, history, evals_since_best = 0, math.inf, 0, [], 0
    best_state = {k: v.detach().clone() for k, v in prefix.state_dict().items()}
    cfg_hash = _config_hash(cfg, prefix, train)
    if out is not None and resume:
        ckpt = resume_checkpoint(out / "checkpoint", cfg_hash, "warm-start config or dataset")
        if ckpt is not None:
            tensors, meta = ckpt
            load_module_tensors(prefix, tensors, "prefix")
            load_optimizer_state(opt, tensors, meta["optimizer"])
            load_rng_state(tensors, meta["rng"])
            best_state = {k[len("best."):]: v.to(device) for k, v in tensors.items() if k.startswith("best.")}
            step, best_loss, best_step = meta["step"], meta["best_loss"], meta["best_step"]
            history, evals_since_best = meta["history"], meta["evals_since_best"]
    logger = (MetricLogger(out / "warmstart_metrics.jsonl", resume_step=step, tensorboard=tensorboard,
                           enabled=is_main) if out else None)

    def checkpoint():
        if out is None or not is_main:
            return
        t_opt, m_opt = optimizer_state(opt)
        t_rng, m_rng = rng_state()
        tensors = {**module_tensors(prefix, "prefix"), **t_opt, **t_rng,
                   **{f"best.{k}": v for k, v in best_state.items()}}
        save_checkpoint(out / "checkpoint", tensors, {
            "step": step, "best_loss": best_loss, "best_step": best_step, "history": history,
            "evals_since_best": evals_since_best, "optimizer": m_opt, "rng": m_rng, "config_hash": cfg_hash})

    micro_per_epoch = max(1, math.ceil(len(train) / cfg.batch_size))
    bar = tqdm(total=cfg.steps, initial=step, desc="warm start", disable=not (cfg.progress and is_main))
    stopped_early, t0 = False, time.perf_counter()
    while step < cfg.steps and not stopped_early:
        t_step = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.decay, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        micro = [step * cfg.grad_accum + j for j in range(cfg.grad_accum)]
        batches = []
        for m in micro:  # micro-batch m of the global stream: epoch m // per_epoch, a slice of that epoch's order
            order = _epoch_order(len(train), cfg.seed, m // micro_per_epoch)
            start = (m % micro_per_epoch) * cfg.batch_size
            batches.append(collate_sft([train[i] for i in order[start:start + cfg.batch_size]], pad_id))
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        if dist.world_size > 1:  # this process's share of every micro-batch
            batches = [local_rows(model, b, dist) for b in batches]  # FSDP: never empty (all labels ignored)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for b in batches:
            if len(b["input_ids"]) == 0:
                continue
            nll, _ = completion_nll(model, prefix, b, cfg.precision)
            (nll / n_tokens).backward()
            loss_sum += nll.item()
        dist.sum_grads(list(prefix.parameters()))
        loss_sum = dist.sum(loss_sum)
        grad_norm = torch.nn.utils.clip_grad_norm_(prefix.parameters(), cfg.max_grad_norm).item()
        assert_finite("warm-start loss or gradient", step + 1, loss_sum, grad_norm)
        opt.step()
        step += 1
        assert_finite("warm-start prefix", step, *prefix.parameters())
        record = {"loss": loss_sum / n_tokens, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens,
                  "epoch": micro[-1] / micro_per_epoch, "time/step": time.perf_counter() - t_step}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            eval_loss = evaluate_loss(model, prefix, evals, pad_id, precision=cfg.precision, dist=dist)
            assert_finite("warm-start eval loss", step, eval_loss)
            record.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50)))
            if eval_loss < best_loss:
                best_loss, best_step, evals_since_best = eval_loss, step, 0
                best_state = {k: v.detach().clone() for k, v in prefix.state_dict().items()}
            else:
                evals_since_best += 1
                if cfg.early_stop_patience is not None and evals_since_best >= cfg.early_stop_patience:
                    stopped_early = True
        history.append({"step": step, **record})
        if logger and (step % cfg.log_every == 0 or "eval_loss" in record):
            logger.log(step, record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", **({"eval": f"{record['eval_loss']:.3f}"}
                                                        if "eval_loss" in record else {}))
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopped_early:
            checkpoint()
    bar.close()
    final_eval = history[-1].get("eval_loss", math.nan) if history else math.nan
    prefix.load_state_dict(best_state)
    prefix.eval()
    result_prefix = prefix.merge(model) if cfg.merge else prefix
    if logger:
        logger.close()
        plot_metrics(out / "warmstart_metrics.jsonl", ["loss", "eval_loss", "lr"], out / "warmstart_curves.png",
                     title=f"warm start ({time.perf_counter() - t0:.0f}s)")
    return WarmStartResult(result_prefix, best_loss, best_step, final_eval, step, history)
