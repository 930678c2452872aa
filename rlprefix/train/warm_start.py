"""Stage 1, supervised warm start: train the prefix (P_theta and its MLP) on prompt/completion pairs with
the base model frozen, keep the best prefix by eval loss, then merge it to plain per-layer K/V.

One readable loop: AdamW, warm-up + decay, gradient clipping and accumulation, optional bf16 autocast,
periodic eval (loss, perplexity, and forgetting: general-text perplexity with the prefix vs without), early
stopping, and checkpoints that resume bit-for-bit. General text can be mixed into the training examples against
forgetting (`mix_ratio`; see rlprefix.train.general_text for how and how its loss is taken).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from rlprefix.train.data import ConditionedExample, SFTExample, collate_sft, load_records, tokenize_sft
from rlprefix.distributed.groups import Dist
from rlprefix.prefixes.dynamic import is_input_conditioned
from rlprefix.images.conditions import NEEDS_IMAGES, image_column, image_features, is_image_prefix
from rlprefix.train.general_text import BUILTIN, forgetting_record, perplexity, load_passages, mix_in, split_passages, text_examples
from rlprefix.guards import assert_finite
from rlprefix.prefixes.prefix import Prefix
from rlprefix.train.schedule import lr_at
from rlprefix.seeds import derive_seed
from rlprefix.distributed.collectives import local_rows, padding_starts
from rlprefix.settings import CLOSED_UNIT, NONNEG, POSITIVE, Check, ConfigError, Settings, at_least, one_of, setting
from rlprefix.train.stage_run import WARM_START_FILES, Laps, StageRun, config_hash
from rlprefix.models import family_of, sft_logits
from rlprefix.models.sampling import pad_token_id
from rlprefix.models.spec import slow_dtype_warning

log = logging.getLogger("rlprefix.train.warm_start")


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
    mix_data: str | None = setting(BUILTIN, "general text mixed in and used to measure forgetting: builtin (a "
                                   "sample shipped with rlprefix), a .txt file (one passage per line) or a JSONL/"
                                   "CSV/Parquet file with a text column (null: none)",
                                   Check(lambda v: bool(v.strip()), "a non-empty name or path", "is empty"))
    mix_ratio: float = setting(0.0, "fraction of the training examples that are general-text passages, trained as "
                               "plain text with the prefix (0: no mixing; 0.05 is a sensible start)",
                               Check(lambda v: 0 <= v < 1, "in [0, 1)"))
    forgetting_eval: int = setting(32, "general-text passages held out to measure forgetting at every evaluation "
                                   "(perplexity with the prefix / without; 0: not measured)", NONNEG)

    def check_fields_together(self) -> None:
        if self.mix_ratio > 0 and self.mix_data is None:
            raise ConfigError(f"{self.key('mix_ratio')}: {self.mix_ratio} needs {self.key('mix_data')} (builtin or a "
                              f"text file); it is null")


# Settings a checkpoint does not depend on beyond `NOT_IN_HASH`: the mixed-in passages are part of the training
# examples, which are hashed as content (so a warm start without mixing keeps the hash it had before these
# settings existed), and the forgetting measure changes no training step.
NOT_IN_WARM_START_HASH = {
    "mix_data": "its passages in the training data are hashed as content",
    "mix_ratio": "the mixed training data is hashed as content",
    "forgetting_eval": "a measurement at evaluation time only; the prefix trained does not depend on it",
}


@dataclass
class WarmStartResult:
    prefix: Prefix                     # best prefix (merged when config.merge)
    best_eval_loss: float
    best_step: int
    final_eval_loss: float
    steps_done: int
    history: list[dict] = field(default_factory=list)
    truncated: int = 0
    forgetting: dict | None = None     # general_ppl, general_ppl_base, forgetting_ratio of the best prefix
    mixed: int = 0                     # general-text examples among the training examples


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
    """Summed next-token NLL over completion tokens (labels != -100), and how many there were. An
    input-conditioned prefix routes on the prompt tokens (real tokens without a label), as at generation."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if "condition" in batch:  # an image prefix: each row's image feature
        prefix = prefix.bind(batch.pop("condition"))
    with _autocast(model, precision):
        logits = sft_logits(model, batch, prefix)
    targets = batch["labels"][:, 1:]
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


def _content(train: list[SFTExample], prefix: Prefix):
    """The bytes a warm-start checkpoint depends on beyond its settings: the training data, the starting prefix."""
    for ex in train:
        yield json.dumps(list(astuple(ex))).encode()  # [input_ids, labels] (+ source_ids for encoder-decoder)
    for name, t in sorted(prefix.state_dict().items()):
        yield name.encode()
        yield t.detach().float().cpu().numpy().tobytes()


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(derive_seed("warm_start/order", seed, epoch))
    return torch.randperm(n, generator=g).tolist()


@dataclass
class _Data:
    """The tokenised training and held-out examples, and how training walks them."""
    train: list[SFTExample]
    evals: list[SFTExample]
    pad_id: int
    cfg: WarmStartConfig
    general: list[SFTExample] = field(default_factory=list)  # held-out general text (the forgetting measure)
    mixed: int = 0                                            # general-text examples at the end of `train`
    general_base_nll: float | None = None                     # the bare model's NLL on `general`

    @property
    def micro_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.train) / self.cfg.batch_size))

    def batches(self, step: int, dist, model) -> tuple[list[dict], int, float]:
        """Step `step`'s micro-batches (this process's share of each), the completion tokens of all of them (the
        loss is normalised by the global count) and the epoch reached. Micro-batch m of the global stream is a
        slice of epoch m // micro_per_epoch's order, so the batches depend only on the step."""
        cfg, per_epoch = self.cfg, self.micro_per_epoch
        micro = [step * cfg.grad_accum + j for j in range(cfg.grad_accum)]
        batches = []
        for m in micro:
            order = _epoch_order(len(self.train), cfg.seed, m // per_epoch)
            start = (m % per_epoch) * cfg.batch_size
            batches.append(collate_sft([self.train[i] for i in order[start:start + cfg.batch_size]], self.pad_id))
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        if dist.world_size > 1:
            batches = [local_rows(model, b, dist) for b in batches]  # FSDP: never empty (all labels ignored)
        return batches, n_tokens, micro[-1] / per_epoch


class _Best:
    """The best prefix so far by held-out loss, and early stopping; a checkpoint holds both."""

    def __init__(self, prefix: Prefix, patience: int | None):
        self.prefix, self.patience = prefix, patience
        self.loss, self.step, self.evals_since, self.stopped = math.inf, 0, 0, False
        self.weights = {k: v.detach().clone() for k, v in prefix.state_dict().items()}

    def update(self, step: int, eval_loss: float) -> None:
        if eval_loss < self.loss:
            self.loss, self.step, self.evals_since = eval_loss, step, 0
            self.weights = {k: v.detach().clone() for k, v in self.prefix.state_dict().items()}
        else:
            self.evals_since += 1
            self.stopped = self.patience is not None and self.evals_since >= self.patience

    def state(self) -> tuple[dict, dict]:
        return ({f"best.{k}": v for k, v in self.weights.items()},
                {"best_loss": self.loss, "best_step": self.step, "evals_since_best": self.evals_since})

    def load_state(self, tensors: dict, meta: dict) -> None:
        device = self.prefix.device
        self.weights = {k[len("best."):]: v.to(device) for k, v in tensors.items() if k.startswith("best.")}
        self.loss, self.step, self.evals_since = meta["best_loss"], meta["best_step"], meta["evals_since_best"]


def _setup(model, tokenizer, prefix: Prefix, dataset, eval_dataset, cfg: WarmStartConfig) -> _Data:
    """Seed, prefix on the model's device, the data split (when no eval set is given) and tokenised."""
    torch.manual_seed(cfg.seed)
    prefix.to(model.device).train()
    if cfg.precision == "bf16" and (warning := slow_dtype_warning(torch.bfloat16, model.device)):
        log.warning(warning)
    if prefix.num_parameters() == 0:
        raise ValueError("the prefix has no trainable parameters (length 0?)")
    ds = load_records(dataset)
    if eval_dataset is None:
        train_ds, eval_ds = split_dataset(ds, cfg.eval_fraction, cfg.seed)
    else:
        train_ds, eval_ds = ds, load_records(eval_dataset)
    family = family_of(model)
    start = family.decoder_start_id(model)  # an encoder-decoder model's examples are (source, target) pairs
    train = tokenize_sft(train_ds, tokenizer, cfg.max_length, cfg.chat, cfg.system, start)
    evals = tokenize_sft(eval_ds, tokenizer, cfg.max_length, cfg.chat, cfg.system, start)
    pad_id = pad_token_id(tokenizer, model)
    general, n_task = [], len(train)
    if cfg.mix_ratio > 0:  # general text is plain language-model text
        family.require("general_text", model, hint=f"set warm_start.mix_ratio: {cfg.mix_ratio} to 0")
    if is_image_prefix(prefix):  # each example carries its image's feature; general text has no image
        train, evals = _with_images(prefix, train, train_ds, cfg), _with_images(prefix, evals, eval_ds, cfg)
    elif family.supports("general_text") and cfg.mix_data is not None and (cfg.mix_ratio > 0 or cfg.forgetting_eval > 0):
        pool, held_out = split_passages(load_passages(cfg.mix_data), cfg.forgetting_eval, cfg.seed)
        train = mix_in(train, text_examples(pool, tokenizer, cfg.max_length), cfg.mix_ratio, cfg.seed)
        general = text_examples(held_out, tokenizer, cfg.max_length)
    # a dynamic prefix's router centre: the training prompts
    if is_input_conditioned(prefix) and not is_image_prefix(prefix) and not bool(prefix.centre.any()):
        prefix.fit_centre(model, _prompt_batches(train[:n_task], pad_id))
    return _Data(train, evals, pad_id, cfg, general, len(train) - n_task)


def _with_images(prefix, examples: list[SFTExample], ds, cfg: WarmStartConfig) -> list[ConditionedExample]:
    """The examples with their images' features (the prefix's encoder); the feature standardisation is fitted on the
    first set given (the training examples) while it is unset."""
    if cfg.mix_ratio > 0:
        raise ValueError(f"an image prefix trains on image-caption pairs only: general text has no image (set "
                         f"warm_start.mix_ratio: {cfg.mix_ratio} to 0)")
    images = image_column({c: ds[c] for c in ds.column_names if c in ("images", "image")})
    if images is None:
        raise ValueError(f"warm start: {NEEDS_IMAGES} (the data has columns {ds.column_names})")
    feats = image_features(prefix, images)
    if not bool(prefix.mean.any()):
        prefix.fit_features(feats)
    return [ConditionedExample(e.input_ids, e.labels, f) for e, f in zip(examples, feats.tolist())]


def _prompt_batches(examples: list[SFTExample], pad_id: int, size: int = 16):
    """(input_ids, prompt mask) batches of the examples, the prompt being the real tokens without a label."""
    for i in range(0, len(examples), size):
        b = collate_sft(examples[i:i + size], pad_id)
        yield b["input_ids"], b["attention_mask"] * (b["labels"] == -100)


def set_learning_rate(opt: torch.optim.Optimizer, step: int, cfg: WarmStartConfig) -> float:
    """Step `step`'s learning rate (linear warm-up, then `decay`) on every parameter group; returns it."""
    lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.decay, cfg.min_lr_ratio)
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def accumulate_gradients(model, prefix: Prefix, opt: torch.optim.Optimizer, batches: list[dict], n_tokens: int,
                         cfg: WarmStartConfig, dist, step: int) -> tuple[float, float]:
    """Fresh gradients of the completion NLL per (global) token over the micro-batches, summed over processes
    and clipped; returns the summed NLL and the gradient norm before clipping (both checked finite at `step`)."""
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
    assert_finite("warm-start loss or gradient", step, loss_sum, grad_norm)
    return loss_sum, grad_norm


def optimizer_step(opt: torch.optim.Optimizer, prefix: Prefix, step: int) -> None:
    """The AdamW step; the prefix is checked finite after it (a bad learning rate stops the run at `step`)."""
    opt.step()
    assert_finite("warm-start prefix", step, *prefix.parameters())


def _eval_due(cfg: WarmStartConfig, step: int) -> bool:
    """An evaluation after `step`: every eval_every steps and after the last one."""
    return step % cfg.eval_every == 0 or step == cfg.steps


def _held_out(model, prefix: Prefix, data: _Data, cfg: WarmStartConfig, dist, step: int) -> dict:
    """Held-out task loss and perplexity; with held-out general text, the forgetting measure too."""
    eval_loss = evaluate_loss(model, prefix, data.evals, data.pad_id, precision=cfg.precision, dist=dist)
    assert_finite("warm-start eval loss", step, eval_loss)
    record = {"eval_loss": eval_loss, "eval_ppl": perplexity(eval_loss)}
    if data.general:
        if data.general_base_nll is None:  # the frozen model alone: once per run
            data.general_base_nll = evaluate_loss(model, None, data.general, data.pad_id, precision=cfg.precision,
                                                  dist=dist)
        nll = evaluate_loss(model, prefix, data.general, data.pad_id, precision=cfg.precision, dist=dist)
        record.update(forgetting_record(nll, data.general_base_nll))
    return record


def _forgetting_at(history: list[dict], step: int, passages: int) -> dict | None:
    """The forgetting measure recorded at `step` (the best prefix's evaluation), if it was measured."""
    keys = ("general_ppl", "general_ppl_base", "forgetting_ratio")
    rec = next((h for h in history if h.get("step") == step and "forgetting_ratio" in h), None)
    return {**{k: rec[k] for k in keys}, "passages": passages} if rec else None


def _stage_run(data: _Data, prefix: Prefix, opt, best: _Best, cfg: WarmStartConfig, output_dir, resume: bool,
               on_step, tensorboard: bool, dist) -> StageRun:
    """The run's record, metrics and checkpoints in `output_dir`, resumed from its checkpoint when there is one."""
    # every setting counts but NOT_IN_HASH: `steps` shapes the learning-rate schedule, evaluations pick the best
    cfg_hash = config_hash(cfg, ignore=NOT_IN_WARM_START_HASH, prefix=prefix.config_dict(), n=len(data.train),
                           blobs=_content(data.train, prefix))
    run = StageRun(output_dir, WARM_START_FILES, cfg_hash, dist, steps=cfg.steps, checkpoint_every=cfg.checkpoint_every,
                   what="warm-start config or dataset", desc="warm start", progress=cfg.progress,
                   tensorboard=tensorboard, on_step=on_step)
    run.resume({"prefix": prefix}, opt, best, enabled=resume)
    return run


def warm_start(model, tokenizer, prefix: Prefix, dataset, config: WarmStartConfig | None = None, *,
               eval_dataset=None, output_dir: str | Path | None = None, resume: bool = True,
               on_step: Callable[[int, dict], None] | None = None, dist=None,
               tensorboard: bool = True) -> WarmStartResult:
    """Train `prefix` (in place) on `dataset` rows of prompt/completion (or chat messages); see WarmStartConfig.

    With `dist` (several processes), each micro-batch is split across processes, the loss is normalised by the
    micro-batches' global token count and gradients are summed: the same update as one process.
    `on_step(step, record)` runs after every step (steps counted from 1), as in `ppo`.
    """
    cfg = config or WarmStartConfig()
    cfg.validate()  # again: fields may have been changed since construction
    dist = dist or Dist()
    # 0. setup: data, optimiser, best-prefix keeper, the run (resumed from its checkpoint)
    data = _setup(model, tokenizer, prefix, dataset, eval_dataset, cfg)
    opt = torch.optim.AdamW(prefix.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best = _Best(prefix, cfg.early_stop_patience)
    run = _stage_run(data, prefix, opt, best, cfg, output_dir, resume, on_step, tensorboard, dist)
    while run.step < cfg.steps and not best.stopped:
        step, laps = run.step, Laps()
        # 1. this step's learning rate (warm-up, then decay)
        lr = set_learning_rate(opt, step, cfg)
        # 2. this step's micro-batches
        batches, n_tokens, epoch = data.batches(step, dist, model)
        # 3. gradients of the completion NLL, accumulated over micro-batches and summed over processes
        loss_sum, grad_norm = accumulate_gradients(model, prefix, opt, batches, n_tokens, cfg, dist, step + 1)
        # 4. the optimiser step
        optimizer_step(opt, prefix, step + 1)
        laps.lap("step")
        record = {"loss": loss_sum / n_tokens, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens, "epoch": epoch,
                  **laps.times}
        # 5. the held-out loss every eval_every steps; keep the best prefix, stop when patience runs out
        if _eval_due(cfg, step + 1):
            record.update(_held_out(model, prefix, data, cfg, dist, step + 1))
            best.update(step + 1, record["eval_loss"])
        # 6. history, metrics (every log_every steps and every evaluation), on_step, progress bar; checkpoint
        run.log(step + 1, record, write=(step + 1) % cfg.log_every == 0 or "eval_loss" in record,
                show={"loss": f"{record['loss']:.3f}",
                      **({"eval": f"{record['eval_loss']:.3f}"} if "eval_loss" in record else {})})
        run.maybe_checkpoint(step + 1, force=best.stopped)

    # 7. cleanup: the best prefix, merged to plain K/V when config.merge
    final_eval = run.history[-1].get("eval_loss", math.nan) if run.history else math.nan
    prefix.load_state_dict(best.weights)
    prefix.eval()
    result_prefix = prefix.merge(model) if cfg.merge and not is_input_conditioned(prefix) else prefix
    run.close(["loss", "eval_loss", "lr"], title=f"warm start ({run.seconds:.0f}s)")
    return WarmStartResult(result_prefix, best.loss, best.step, final_eval, run.step, run.history,
                           forgetting=_forgetting_at(run.history, best.step, len(data.general)),
                           mixed=data.mixed)
