"""Step 5 of a PPO step, the update: `epochs` passes of shuffled minibatches over one rollout batch, each a
gradient step on the clipped surrogate (+ the clipped value loss for GAE, the entropy bonus, and the KL to the
reference when it is a loss term), stopped once a minibatch's approximate KL to the rollout policy exceeds
`target_kl_stop`.

Every loss term is a mean over the tokens of the *global* minibatch: each process sums its own rows' tokens and
divides by the count over all processes, so the gradients summed over processes equal one process's.
`cfg` below is the stage's `rlprefix.train.ppo.PPOConfig` (that module imports this one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlprefix.distributed.collectives import is_sharded
from rlprefix.distributed.groups import Dist
from rlprefix.models.sampling import entropy_of
from rlprefix.prefixes.prefix import Prefix
from rlprefix.train.ppo_losses import (approx_kl, clip_fraction, clipped_surrogate_loss, clipped_value_loss, kl_k3,
                                       ppo_loss)
from rlprefix.train.ppo_rollout import Batch, BatchShard, policy_scores
from rlprefix.train.value_head import ValueHead


def ppo_update(model, prefix: Prefix, value_head: ValueHead | None, opt, param_groups, batch: Batch,
               shard: BatchShard, step: int, cfg, kl_coef: float, dist: Dist) -> dict:
    """Epochs of shuffled minibatches of the clipped surrogate; returns mean statistics."""
    prefix.train()
    stats = UpdateStats()
    loss_kl_coef = kl_coef if cfg.kl_penalty == "loss" else 0.0  # kl_penalty: reward put the KL in the rewards
    for epoch in range(cfg.epochs):
        for mb in shard.minibatches(step, epoch):
            rows = minibatch_rows(model, batch, mb, dist)
            terms = minibatch_losses(model, prefix, value_head, batch, rows, cfg)
            loss = ppo_loss(terms.pg_loss, terms.v_loss, terms.entropy, terms.kl, vf_coef=cfg.vf_coef,
                            ent_coef=cfg.ent_coef, kl_coef=loss_kl_coef)
            optimizer_step(opt, param_groups, loss, bool(len(rows.index)), cfg.max_grad_norm, dist)
            minibatch_kl = stats.add(rows, terms, cfg.clip_range, dist)
            if cfg.target_kl_stop is not None and minibatch_kl > cfg.target_kl_stop:
                return stats.summary(early_stopped=True)
    return stats.summary(early_stopped=False)


@dataclass
class MinibatchRows:
    """This process's rows of one minibatch, their loss mask and the token count of the global minibatch."""
    index: torch.Tensor   # local row indices (empty: this process owns no row of the minibatch)
    mask: torch.Tensor    # [rows, T]
    n_tokens: float

    def token_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over this process's tokens / tokens of the whole (global) minibatch."""
        return (x * self.mask).sum() / self.n_tokens


def minibatch_rows(model, batch: Batch, mb: torch.Tensor, dist: Dist) -> MinibatchRows:
    mb = mb.to(batch.mask.device)
    m = batch.mask[mb]
    if not len(mb) and is_sharded(model):  # FSDP: every process runs the forward and backward; this one
        mb, m = mb.new_zeros(1), m.new_zeros(1, m.shape[1])  # on a row whose weight is zero
    return MinibatchRows(mb, m, max(dist.sum(m.sum().item()), 1.0))


@dataclass
class MinibatchLosses:
    """One minibatch's loss terms (token means over the global minibatch) and the policy ratio they came from."""
    logratio: torch.Tensor   # log pi - log pi_old per token (masked)
    ratio: torch.Tensor      # pi / pi_old per token
    pg_loss: torch.Tensor    # the clipped surrogate
    entropy: torch.Tensor    # the policy's entropy (the loss subtracts ent_coef times it: the entropy bonus)
    kl: torch.Tensor         # k3 KL(policy || reference)
    v_loss: torch.Tensor     # 1/2 the (clipped) value loss; 0 without a critic


def minibatch_losses(model, prefix: Prefix, value_head: ValueHead | None, batch: Batch, rows: MinibatchRows,
                     cfg) -> MinibatchLosses:
    """The policy's forward on the minibatch's rows (none: terms that carry no gradient) and its loss terms."""
    mb, m = rows.index, rows.mask
    if len(mb):
        new = policy_scores(model, prefix, batch.roll, mb, cfg.temperature, cfg.uses_critic)
        logratio = (new.logprobs - batch.old_logprobs[mb]) * m
        entropy_tok = entropy_of(new.logits, cfg.temperature)
        ref_logratio = (batch.ref_logprobs[mb] - new.logprobs) * m
    else:  # this process owns no row of this minibatch: it contributes zero gradients
        logratio = entropy_tok = ref_logratio = m
    ratio = logratio.exp()
    pg_loss = rows.token_mean(clipped_surrogate_loss(batch.advantages[mb], ratio, cfg.clip_range))
    entropy = rows.token_mean(entropy_tok)
    kl = rows.token_mean(kl_k3(ref_logratio))
    v_loss = torch.zeros((), device=m.device)
    if cfg.uses_critic and len(mb):
        values = value_head(new.hidden.detach())
        v_loss = 0.5 * rows.token_mean(clipped_value_loss(values, batch.old_values[mb], batch.returns[mb],
                                                          cfg.clip_range_value))
    return MinibatchLosses(logratio, ratio, pg_loss, entropy, kl, v_loss)


def optimizer_step(opt, param_groups: list[dict], loss: torch.Tensor, has_rows: bool, max_grad_norm: float,
                   dist: Dist) -> None:
    """One step on `loss`: gradients summed over processes, clipped per parameter group (no optimiser: nothing
    to train). A process without rows in the minibatch adds zero gradients."""
    if opt is None:
        return
    opt.zero_grad(set_to_none=True)
    if has_rows:
        loss.backward()
    dist.sum_grads([p for g in param_groups for p in g["params"]])
    for g in param_groups:
        torch.nn.utils.clip_grad_norm_(g["params"], max_grad_norm)
    opt.step()


class UpdateStats:
    """Each minibatch's statistics, summed over processes; `summary` averages them over the update."""

    KEYS = ("pg_loss", "vf_loss", "kl_loss", "entropy", "approx_kl", "clipfrac")

    def __init__(self):
        self.values: dict[str, list[float]] = {k: [] for k in self.KEYS}
        self.ratio_max_dev: list[float] = []

    @torch.no_grad()
    def add(self, rows: MinibatchRows, terms: MinibatchLosses, clip_range: float, dist: Dist) -> float:
        """Record one minibatch; returns its approximate KL to the rollout policy (for early stopping)."""
        kl = dist.sum(rows.token_mean(approx_kl(terms.ratio, terms.logratio)).item())
        self.values["pg_loss"].append(dist.sum(terms.pg_loss.item()))
        self.values["vf_loss"].append(dist.sum(terms.v_loss.item()))
        self.values["kl_loss"].append(dist.sum(terms.kl.item()))
        self.values["entropy"].append(dist.sum(terms.entropy.item()))
        self.values["approx_kl"].append(kl)
        self.values["clipfrac"].append(dist.sum(rows.token_mean(clip_fraction(terms.ratio, clip_range)).item()))
        dev = ((terms.ratio - 1).abs() * rows.mask).max().item() if len(rows.index) else 0.0
        self.ratio_max_dev.append(dist.max(dev))
        return kl

    def summary(self, early_stopped: bool) -> dict:
        out = {f"policy/{k}": (sum(v) / len(v) if v else math.nan) for k, v in self.values.items()}
        out["policy/ratio_dev_first_minibatch"] = self.ratio_max_dev[0] if self.ratio_max_dev else 0.0
        out["policy/early_stopped"] = float(early_stopped)
        return out
