"""Stage 2, RL on a prefix-only policy: PPO's clipped surrogate with a choice of advantage estimator.

The policy is the frozen model + the prefix. The reference for the KL term is the same frozen model with
the prefix switched off ("base") or with the starting prefix ("initial", e.g. the warm-start prefix) --
no second copy of the model exists anywhere.

One step (the numbered calls in `ppo`):
  1. `rollout`: sample `group_size` completions for each of `batch_size / group_size` prompts, recording the
     policy's log-probs (the "old" policy) and, for GAE, the final hidden states the value head reads;
  2. `score` them with the reward (hygiene and running normalisation in `rlprefix.scorer.Scorer`);
  3. `reference_logprobs` (one forward of the frozen model with the reference prefix);
  4. `advantages`: per-token advantages from one of
       - `rloo`: REINFORCE leave-one-out baseline within each prompt's group (Ahmadian et al. 2024),
       - `grpo`: group mean baseline divided by the group's std (Shao et al. 2024),
       - `gae`:  a value head and generalised advantage estimation (Schulman et al. 2016),
     then whitened over the batch, so the update does not depend on the reward's scale;
  5. `ppo_update`: epochs of shuffled minibatches of the clipped surrogate (+ value loss for GAE, entropy
     bonus, KL to the reference as a loss term or a per-token reward);
  6. `step_metrics`, then the adaptive KL coefficient follows the batch's KL;
  7. every `eval_every` steps, the reward on held-out prompts;
  8. the record, metrics file, progress bar and checkpoints (`rlprefix.stage_run.StageRun`).
Details follow CleanRL's ppo and "The 37 implementation details of PPO"; each is a named config field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..data import load_records, require_columns
from ..distributed import Dist
from ..evaluate import evaluate_reward
from .. import engine
from ..generation import Rollout, encode_prompts
from ..guards import assert_finite
from ..prefix import Prefix
from ..dynamic_prefix import is_input_conditioned
from ..runtime import entropy_of, score_completions
from ..scorer import Scorer
from ..seeds import derive_seed
from ..sharding import is_sharded
from ..settings import (CLOSED_UNIT, NONNEG, POSITIVE, UNIT, ConfigError, Settings, one_of,
                       setting)
from ..stage_run import Laps, StageRun, config_hash

ADVANTAGES = ("rloo", "grpo", "gae")


@dataclass
class PPOConfig(Settings):
    section = "ppo"
    steps: int = setting(16, "RL iterations (one rollout batch + its update each)", NONNEG)
    batch_size: int = setting(32, "completions per rollout (= prompts per step x group_size)", POSITIVE)
    group_size: int = setting(4, "completions sampled per prompt (rloo/grpo need >= 2)", POSITIVE)
    minibatch_size: int = setting(8, "completions per gradient step", POSITIVE)
    epochs: int = setting(1, "passes over each rollout batch", POSITIVE)
    lr: float = setting(1e-2, "prefix learning rate (Adam)", POSITIVE)
    advantage: str = setting("rloo", "rloo | grpo | gae (see rlprefix.stages.ppo)")  # checked with group_size below
    value_lr: float = setting(1e-3, "value-head learning rate (gae only)", POSITIVE)
    max_new_tokens: int = setting(40, "tokens sampled per completion", POSITIVE)
    min_new_tokens: int = setting(0, "no end-of-sequence before this many tokens", NONNEG)
    temperature: float = setting(1.0, "the policy is softmax(logits / temperature)", POSITIVE)
    top_k: int = setting(0, "sampling filter, 0: off (logprobs stay those of the policy)", NONNEG)
    top_p: float = setting(1.0, "nucleus sampling filter", UNIT)
    gamma: float = setting(1.0, "gae: discount", UNIT)
    lam: float = setting(0.95, "gae: lambda", CLOSED_UNIT)
    clip_range: float = setting(0.2, "policy ratio clip", POSITIVE)
    clip_range_value: float | None = setting(0.2, "gae: value clip around the rollout values (null: none)", POSITIVE)
    vf_coef: float = setting(0.5, "gae: value-loss weight", NONNEG)
    ent_coef: float = setting(0.0, "entropy bonus weight", NONNEG)
    whiten_advantages: bool = setting(True, "scale-free updates: advantages to mean 0, std 1 over the batch")
    max_grad_norm: float = setting(1.0, "gradient clipping", POSITIVE)
    target_kl_stop: float | None = setting(0.1, "stop a step's update once minibatch approx-KL exceeds it", POSITIVE)
    kl_coef: float = setting(0.05, "beta: weight of the KL to the reference (in units of whitened advantage)",
                             NONNEG)
    kl_penalty: str = setting("loss", "loss: beta * k3 KL per token in the loss | reward: -beta * k1 KL "
                              "per-token reward", one_of("loss", "reward"))
    kl_target: float | None = setting(None, "adaptive beta (per-sequence KL target, Ziegler et al. 2019); "
                                      "null: fixed", POSITIVE)
    kl_horizon: int = setting(10000, "adaptive beta: horizon", POSITIVE)
    reference: str = setting("base", "base (no prefix) | initial (the prefix as it was when RL started)",
                             one_of("base", "initial"))
    reward_clip: float | None = setting(None, "clip scores to +-this (null: no clipping)", POSITIVE)
    reward_normalize: bool = setting(True, "running mean/std normalisation of scores (what GAE's values learn)")
    on_reward_error: str = setting("raise", "a reward that raises or returns NaN: stop, or score reward_penalty",
                                   one_of("raise", "penalty"))
    reward_penalty: float = setting(-1.0, "score of a sample whose reward failed (on_reward_error: penalty)")
    value_hidden: int = setting(256, "gae: value-head hidden width (0: linear)", NONNEG)
    seed: int = setting(0, "sampling and shuffling seed")
    chat: bool | None = setting(None, "apply the chat template to prompts (null: when the tokenizer has one)")
    system: str | None = setting(None, "system message for chat prompts")
    checkpoint_every: int = setting(10, "steps between checkpoints", POSITIVE)
    eval_every: int = setting(0, "steps between held-out evaluations (0: only at the end)", NONNEG)
    eval_max_new_tokens: int | None = setting(None, "tokens per evaluation completion (null: max_new_tokens)",
                                              POSITIVE)
    progress: bool = setting(True, "this stage's progress bar (logging.progress: false turns every bar off)")

    def check_fields_together(self) -> None:
        if self.advantage not in ADVANTAGES:
            raise ConfigError(f"ppo.advantage must be one of {', '.join(ADVANTAGES)}, got {self.advantage!r}")
        if self.batch_size % self.minibatch_size:
            raise ConfigError(f"ppo.batch_size: {self.batch_size} must be a multiple of ppo.minibatch_size "
                              f"({self.minibatch_size})")
        if self.batch_size % self.group_size:
            raise ConfigError(f"ppo.batch_size: {self.batch_size} must be a multiple of ppo.group_size "
                              f"({self.group_size})")
        if self.advantage in ("rloo", "grpo") and self.group_size < 2:
            raise ConfigError(f"ppo.group_size: advantage {self.advantage!r} compares completions of one prompt, "
                              f"so it needs group_size >= 2 (got {self.group_size})")

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"


class ValueHead(nn.Module):
    """V(s_t) from the final hidden state that predicts token t (gae only)."""

    def __init__(self, hidden_size: int, value_hidden: int = 256):
        super().__init__()
        if value_hidden:
            self.net = nn.Sequential(nn.Linear(hidden_size, value_hidden), nn.Tanh(), nn.Linear(value_hidden, 1))
        else:
            self.net = nn.Sequential(nn.Linear(hidden_size, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.float()).squeeze(-1)


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL/target - 1, -0.2, 0.2) * n/horizon) (Ziegler et al. 2019); fixed when target is None."""

    def __init__(self, init: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.value *= 1.0 + error * n / self.horizon


# ---- advantage estimators ------------------------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over completion tokens; positions past the end are masked."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, advantages + values


def group_advantages(scores: torch.Tensor, group_size: int, method: str) -> torch.Tensor:
    """Sequence-level advantages from groups of `group_size` consecutive completions of one prompt.

    rloo: A_i = r_i - mean_{j != i} r_j.  grpo: A_i = (r_i - mean_j r_j) / (std_j r_j + 1e-4).
    NaN scores ("no reward applies") take no part in a baseline and get advantage 0.
    """
    r = scores.view(-1, group_size)
    valid = torch.isfinite(r)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    n = valid.sum(1, keepdim=True).float()
    if method == "rloo":
        others = (n - 1).clamp(min=1)
        adv = r0 - (r0.sum(1, keepdim=True) - r0) / others
        adv = torch.where(n > 1, adv, torch.zeros_like(adv))
    elif method == "grpo":
        mean = r0.sum(1, keepdim=True) / n.clamp(min=1)
        var = (((r0 - mean) * valid) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)
        adv = (r0 - mean) / (var.sqrt() + 1e-4)
    else:
        raise ValueError(f"unknown group advantage {method!r}")
    return torch.where(valid, adv, torch.zeros_like(adv)).view(-1)


# ---- rollouts and the batch split over processes --------------------------------------------------------------
class BatchShard:
    """Which global rows of a rollout batch this process owns, and the prompts for a step.

    Rows are ordered prompt-major (row = prompt * group_size + j); a group may span processes, so group
    baselines are computed on the gathered global scores (`advantages`).
    """

    def __init__(self, cfg: PPOConfig, n_prompts: int, dist: Dist):
        if cfg.batch_size % dist.world_size:
            raise ValueError(f"ppo.batch_size {cfg.batch_size} must divide evenly over {dist.world_size} processes")
        self.cfg, self.dist, self.n_prompts = cfg, dist, n_prompts
        self.local = cfg.batch_size // dist.world_size
        self.first = dist.rank * self.local  # this process owns global rows [first, first + local)
        self.prompts_per_step = cfg.batch_size // cfg.group_size
        self.steps_per_epoch = max(1, n_prompts // self.prompts_per_step)

    def prompt_indices(self, step: int) -> list[int]:
        """Dataset rows for this process's completions at `step` (a seeded permutation per pass over the data)."""
        cfg = self.cfg
        epoch, slot = divmod(step, self.steps_per_epoch)
        gen = torch.Generator().manual_seed(derive_seed("ppo/prompts", cfg.seed, epoch))
        order = torch.randperm(self.n_prompts, generator=gen)
        prompts = [int(order[(slot * self.prompts_per_step + i) % self.n_prompts]) for i in range(self.prompts_per_step)]
        rows = [p for p in prompts for _ in range(cfg.group_size)]
        return rows[self.first:self.first + self.local]

    def row_seeds(self, step: int) -> list[int]:
        """A sampling seed per global row and step: rollouts do not depend on how rows are split over
        processes, and resuming needs no RNG state for sampling."""
        return [derive_seed("ppo/row", self.cfg.seed, step, self.first + i) for i in range(self.local)]

    def minibatches(self, step: int, epoch: int):
        """Local row indices of each minibatch of one permutation of the *global* batch (the same on every
        process): losses are normalised by global token counts, so summed gradients equal one process's.

        When a minibatch holds whole groups, whole groups are shuffled, so a minibatch's rows share prompts
        and the training forward runs each prompt once (`score_completions(share_prompts=True)`)."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(derive_seed("ppo/minibatches", cfg.seed, step, epoch))
        k = cfg.group_size if cfg.minibatch_size % cfg.group_size == 0 else 1
        groups = torch.randperm(cfg.batch_size // k, generator=gen)
        perm = (groups.unsqueeze(1) * k + torch.arange(k)).flatten()
        for start in range(0, cfg.batch_size, cfg.minibatch_size):
            rows = perm[start:start + cfg.minibatch_size]
            yield rows[(rows >= self.first) & (rows < self.first + self.local)] - self.first


@torch.no_grad()
def rollout(model, tokenizer, prefix: Prefix, prompts: list[str], cfg: PPOConfig, row_seeds: list[int]) -> Rollout:
    """Sample one completion per row with the current prefix, recording the policy's log-probs."""
    prefix.eval()
    ids, mask = encode_prompts(tokenizer, prompts, cfg.chat, cfg.system, device=model.device)
    if is_input_conditioned(prefix):  # each row its own mixture, on the engine's per-row path
        return engine.sample(model, tokenizer, ids, mask, prefix, max_new_tokens=cfg.max_new_tokens,
                             min_new_tokens=cfg.min_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                             top_p=cfg.top_p, return_hidden=cfg.uses_critic, row_seeds=row_seeds)
    kv = prefix.key_values(model) if prefix.length else None
    return engine.sample(model, tokenizer, ids, mask, kv=kv, max_new_tokens=cfg.max_new_tokens,
                  min_new_tokens=cfg.min_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                  return_hidden=cfg.uses_critic, row_seeds=row_seeds)


def score(scorer: Scorer, prompts: list[str], roll: Rollout, columns: dict, device) -> tuple:
    """The rollout's scores on `device` (NaN where no reward applies), the raw scores as the reward returned
    them (for logging) and the reward's metrics."""
    completion_ids = [ids[m.bool()].tolist() for ids, m in zip(roll.completion_ids, roll.completion_mask)]
    scores, metrics = scorer(prompts, roll.texts, completion_ids=completion_ids, **columns)
    return scores.to(device), scorer.last_raw, metrics


@dataclass
class Batch:
    """Everything the update needs from one rollout (local rows)."""
    roll: Rollout
    mask: torch.Tensor           # [B, T] completion tokens that take part in the loss
    old_logprobs: torch.Tensor   # [B, T]
    ref_logprobs: torch.Tensor   # [B, T]
    advantages: torch.Tensor     # [B, T]
    returns: torch.Tensor | None
    old_values: torch.Tensor | None


def advantages(roll: Rollout, scores: torch.Tensor, ref_logprobs: torch.Tensor, value_head: ValueHead | None,
               cfg: PPOConfig, kl_coef: float, shard: BatchShard, dist: Dist) -> Batch:
    """Per-token advantages for the update (rows whose score is NaN are masked out of the loss)."""
    finite = torch.isfinite(scores)
    mask = roll.completion_mask.float() * finite.float().unsqueeze(1)
    old_logprobs = roll.logprobs * mask
    kl_tok = (old_logprobs - ref_logprobs) * mask  # k1 estimator per token
    returns = old_values = None
    if cfg.uses_critic:
        # per-token rewards: -beta * KL everywhere (kl_penalty=reward), the task score on the last real token
        rewards = -kl_coef * kl_tok if cfg.kl_penalty == "reward" else torch.zeros_like(kl_tok)
        last = (roll.completion_mask.sum(1) - 1).clamp(min=0)
        rewards[torch.arange(len(scores), device=scores.device), last] += torch.nan_to_num(scores)
        with torch.no_grad():
            old_values = value_head(roll.hidden) * mask
        adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    else:
        seq_scores = scores
        if cfg.kl_penalty == "reward":  # sequence-level KL penalty folded into the score before the baseline
            seq_scores = scores - kl_coef * kl_tok.sum(1)
        global_scores = torch.tensor(dist.gather_floats(seq_scores.tolist()), dtype=torch.float32)
        adv = group_advantages(global_scores, cfg.group_size, cfg.advantage)[shard.first:shard.first + shard.local]
        adv = adv.to(mask.device).unsqueeze(1) * mask
    if cfg.whiten_advantages:
        adv = dist.masked_whiten(adv, mask)
    return Batch(roll, mask, old_logprobs, ref_logprobs * mask, adv, returns, old_values)


def reference_logprobs(model, roll: Rollout, ref_kv, temperature: float) -> torch.Tensor:
    """log p_ref of the sampled tokens: the frozen model with the reference prefix (or none)."""
    with torch.no_grad():
        return score_completions(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask,
                                 kv=ref_kv, temperature=temperature).logprobs


# ---- the update -----------------------------------------------------------------------------------------------
def ppo_update(model, prefix: Prefix, value_head: ValueHead | None, opt, param_groups, batch: Batch,
               shard: BatchShard, step: int, cfg: PPOConfig, kl_coef: float, dist: Dist) -> dict:
    """Epochs of shuffled minibatches of the clipped surrogate; returns mean statistics."""
    prefix.train()
    stats: dict[str, list[float]] = {k: [] for k in ("pg_loss", "vf_loss", "kl_loss", "entropy", "approx_kl",
                                                     "clipfrac", "ratio_max_dev")}
    roll, early_stopped = batch.roll, False
    for epoch in range(cfg.epochs):
        for mb in shard.minibatches(step, epoch):
            mb = mb.to(batch.mask.device)
            m = batch.mask[mb]
            if not len(mb) and is_sharded(model):  # FSDP: every process runs the forward and backward; this one
                mb, m = mb.new_zeros(1), m.new_zeros(1, m.shape[1])  # on a row whose weight is zero
            n_tokens = max(dist.sum(m.sum().item()), 1.0)

            def token_mean(x):  # sum over this process's tokens / tokens of the whole (global) minibatch
                return (x * m).sum() / n_tokens

            if len(mb):
                new = score_completions(model, roll.prompt_ids[mb], roll.prompt_mask[mb], roll.completion_ids[mb],
                                        roll.completion_mask[mb], prefix, temperature=cfg.temperature,
                                        output_hidden=cfg.uses_critic)
                logratio = (new.logprobs - batch.old_logprobs[mb]) * m
                entropy_tok = entropy_of(new.logits, cfg.temperature)
                ref_logratio = (batch.ref_logprobs[mb] - new.logprobs) * m
            else:  # this process owns no row of this minibatch: it contributes zero gradients
                logratio = entropy_tok = ref_logratio = m
            ratio = logratio.exp()
            mb_adv = batch.advantages[mb]
            # CleanRL's names: the clipped surrogate, the (clipped) value loss, the entropy bonus
            pg_loss1 = -mb_adv * ratio
            pg_loss2 = -mb_adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
            pg_loss = token_mean(torch.max(pg_loss1, pg_loss2))
            entropy_loss = token_mean(entropy_tok)
            # k3 estimator of KL(policy || reference): exp(ref - new) - (ref - new) - 1 >= 0
            kl_loss = token_mean(ref_logratio.exp() - ref_logratio - 1)
            v_loss = torch.zeros((), device=m.device)
            if cfg.uses_critic and len(mb):
                newvalue = value_head(new.hidden.detach())
                v_loss_unclipped = (newvalue - batch.returns[mb]) ** 2
                if cfg.clip_range_value is not None:
                    v_clipped = batch.old_values[mb] + (newvalue - batch.old_values[mb]).clamp(
                        -cfg.clip_range_value, cfg.clip_range_value)
                    v_loss = 0.5 * token_mean(torch.max(v_loss_unclipped, (v_clipped - batch.returns[mb]) ** 2))
                else:
                    v_loss = 0.5 * token_mean(v_loss_unclipped)
            loss = pg_loss - cfg.ent_coef * entropy_loss + cfg.vf_coef * v_loss
            if cfg.kl_penalty == "loss" and kl_coef:
                loss = loss + kl_coef * kl_loss
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                if len(mb):
                    loss.backward()
                dist.sum_grads([p for g in param_groups for p in g["params"]])
                for g in param_groups:
                    torch.nn.utils.clip_grad_norm_(g["params"], cfg.max_grad_norm)
                opt.step()
            with torch.no_grad():
                approx_kl = dist.sum(token_mean((ratio - 1) - logratio).item())
                stats["pg_loss"].append(dist.sum(pg_loss.item()))
                stats["vf_loss"].append(dist.sum(v_loss.item()))
                stats["kl_loss"].append(dist.sum(kl_loss.item()))
                stats["entropy"].append(dist.sum(entropy_loss.item()))
                stats["approx_kl"].append(approx_kl)
                stats["clipfrac"].append(dist.sum(token_mean(((ratio - 1).abs() > cfg.clip_range).float()).item()))
                dev = ((ratio - 1).abs() * m).max().item() if len(mb) else 0.0
                stats["ratio_max_dev"].append(dist.max(dev))
            if cfg.target_kl_stop is not None and approx_kl > cfg.target_kl_stop:
                early_stopped = True
                break
        if early_stopped:
            break
    out = {f"policy/{k}": (sum(v) / len(v) if v else float("nan")) for k, v in stats.items() if k != "ratio_max_dev"}
    out["policy/ratio_dev_first_minibatch"] = stats["ratio_max_dev"][0] if stats["ratio_max_dev"] else 0.0
    out["policy/early_stopped"] = float(early_stopped)
    return out


def step_metrics(batch: Batch, raw_scores: list[float], reward_metrics: dict, cfg: PPOConfig, dist: Dist) -> dict:
    """Reward, KL to the reference, explained variance (gae) and response length over the global batch."""
    mask, roll = batch.mask, batch.roll
    kl_seq = dist.mean(((batch.old_logprobs - batch.ref_logprobs) * mask).sum(1).mean().item())
    g_raw = [s for s in dist.gather_floats(raw_scores) if math.isfinite(s)]
    record = {
        "reward/mean": sum(g_raw) / max(len(g_raw), 1),   # the reward as the user wrote it (before normalisation)
        "reward/std": float(torch.tensor(g_raw).std()) if len(g_raw) > 1 else 0.0,
        **{k: dist.mean(v) for k, v in reward_metrics.items()},
        # the scorer's raw statistics are per process; over several processes a mean of stds is not the std
        "reward/raw_mean": sum(g_raw) / max(len(g_raw), 1),
        "reward/raw_std": float(torch.tensor(g_raw).std()) if len(g_raw) > 1 else 0.0,
        "kl": kl_seq,
        "response_length": dist.mean(roll.completion_mask.sum(1).float().mean().item()),
    }
    if cfg.uses_critic:
        var_ret = dist.masked_var(batch.returns, mask)
        record["value/explained_variance"] = (1.0 - dist.masked_var(batch.returns - batch.old_values, mask) / var_ret
                                              if var_ret > 0 else float("nan"))
    return record


@dataclass
class PPOResult:
    prefix: Prefix
    value_head: ValueHead | None
    history: list[dict] = field(default_factory=list)
    steps_done: int = 0
    kl_coef: float = 0.0


# beyond NOT_IN_HASH, what a PPO checkpoint does not depend on (a run may be resumed with these changed)
NOT_IN_PPO_HASH = {
    "steps": "only where the run stops: no schedule spans the steps, so a finished run can be extended",
    "eval_every": "held-out evaluations sample their own seeded streams and never touch the training state",
    "eval_max_new_tokens": "the same",
}


@dataclass
class _Setup:
    """What `ppo` builds before its loop. Its `state` / `load_state` are what a checkpoint holds beyond the
    prefix, value head, optimiser and RNG: the reference K/V, the KL coefficient and the reward normaliser."""
    ds: object                   # datasets.Dataset with a `prompt` column (+ reward columns)
    scorer: Scorer
    ref_kv: torch.Tensor | None  # the reference prefix's K/V (reference: initial), None for the base model
    value_head: ValueHead | None
    groups: list[dict]           # the optimiser's parameter groups
    opt: torch.optim.Optimizer | None
    kl_ctl: AdaptiveKLController
    shard: BatchShard
    dist: Dist

    def prompts_at(self, step: int) -> tuple[list[str], dict[str, list]]:
        """This process's prompts at `step` (each repeated group_size times) and their reward columns."""
        rows = self.ds.select(self.shard.prompt_indices(step))
        return list(rows["prompt"]), {c: list(rows[c]) for c in self.ds.column_names if c != "prompt"}

    def state(self) -> tuple[dict, dict]:
        tensors = {"ref_kv": self.ref_kv} if self.ref_kv is not None else {}
        return tensors, {"kl_coef": self.kl_ctl.value, "scorer": self.scorer.state_dict(),
                         "world_size": self.dist.world_size}

    def load_state(self, tensors: dict, meta: dict) -> None:
        if meta.get("world_size", 1) != self.dist.world_size:
            raise ValueError(f"checkpoint was written with {meta.get('world_size')} processes; resume with the "
                             f"same number (now {self.dist.world_size})")
        if self.ref_kv is not None:
            self.ref_kv.copy_(tensors["ref_kv"])
        self.kl_ctl.value = meta["kl_coef"]
        self.scorer.load_state_dict(meta["scorer"])


def _setup(model, prefix: Prefix, prompts, reward: Callable, cfg: PPOConfig, dist: Dist) -> _Setup:
    """Data, reward hygiene, reference, value head (gae) and optimiser."""
    ds = load_records(prompts)
    require_columns(ds, ["prompt"], "PPO")
    scorer = reward if isinstance(reward, Scorer) else Scorer(
        reward, on_error=cfg.on_reward_error, penalty=cfg.reward_penalty, clip=cfg.reward_clip,
        normalize=cfg.reward_normalize)
    if dist.world_size > 1:
        scorer.gather = dist.gather_floats  # reward normalisation uses global statistics
    prefix.to(model.device)
    ref_kv = prefix.key_values(model).detach().clone() if cfg.reference == "initial" and prefix.length else None
    torch.manual_seed(cfg.seed)  # before the value head, whose init must not depend on earlier work
    value_head = (ValueHead(model.config.get_text_config().hidden_size, cfg.value_hidden).to(model.device)
                  if cfg.uses_critic else None)
    groups = [{"params": list(value_head.parameters()), "lr": cfg.value_lr, "name": "value"}] if value_head else []
    if prefix.num_parameters():
        groups.insert(0, {"params": [p for p in prefix.parameters() if p.requires_grad], "lr": cfg.lr,
                          "name": "prefix"})
    opt = torch.optim.Adam(groups, eps=1e-5) if groups else None  # None: nothing to train (an empty prefix)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return _Setup(ds, scorer, ref_kv, value_head, groups, opt, kl_ctl, BatchShard(cfg, len(ds), dist), dist)


def _eval_due(cfg: PPOConfig, step: int) -> bool:
    """A held-out evaluation after `step` (every eval_every steps; the one after the last step is the caller's)."""
    return bool(cfg.eval_every) and step % cfg.eval_every == 0 and step < cfg.steps


def held_out_reward(model, tokenizer, prefix: Prefix, eval_prompts, reward, cfg: PPOConfig, dist: Dist) -> float:
    """Mean reward of the current prefix on `eval_prompts` (the raw reward, the stage's sampling settings)."""
    return evaluate_reward(model, tokenizer, prefix, eval_prompts, reward, chat=cfg.chat, system=cfg.system,
                           seed=cfg.seed, max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                           temperature=cfg.temperature, dist=dist).mean


def ppo(model, tokenizer, prefix: Prefix, prompts, reward: Callable, config: PPOConfig | None = None, *,
        eval_prompts=None, output_dir: str | Path | None = None, resume: bool = True,
        on_step: Callable[[int, dict], None] | None = None, dist: Dist | None = None,
        tensorboard: bool = True) -> PPOResult:
    """Optimise `prefix` (in place) against `reward(prompts, completions, **columns)`.

    `prompts`: a list of strings, a list of dicts / datasets.Dataset / file with a `prompt` column; any
    other column is passed to the reward as a keyword list. `eval_prompts`: scored every `eval_every` steps.
    `on_step(step, record)` runs after every step (steps counted from 1). `tensorboard`: TensorBoard events
    next to the JSONL metrics. `dist` (rlprefix.distributed.Dist) spreads rollouts over processes; gradients
    and statistics are then all-reduced.
    """
    # --- setup: data, reward hygiene, reference, value head (gae), optimiser, the run (resumed) ---
    cfg = config or PPOConfig()
    cfg.validate()  # again: fields may have been changed since construction
    if is_input_conditioned(prefix) and cfg.reference == "initial":
        raise ValueError("ppo.reference: initial keeps one fixed reference K/V, which an input-conditioned prefix "
                         "(kind dynamic) does not have; use reference: base (KL to the frozen model without prefix)")
    dist = dist or Dist()
    s = _setup(model, prefix, prompts, reward, cfg, dist)
    cfg_hash = config_hash(cfg, ignore=NOT_IN_PPO_HASH, prefix=prefix.config_dict(), n=len(s.ds))
    run = StageRun(output_dir, "ppo", cfg_hash, dist, steps=cfg.steps, checkpoint_every=cfg.checkpoint_every,
                   checkpoint="ppo_checkpoint", what="PPO config or prompt set", desc="rl", progress=cfg.progress,
                   tensorboard=tensorboard, on_step=on_step)
    run.resume({"prefix": prefix, "value_head": s.value_head}, s.opt, s, enabled=resume)

    # --- train ---
    while run.step < cfg.steps:
        step, laps = run.step, Laps()
        batch_prompts, columns = s.prompts_at(step)
        # 1. sample group_size completions per prompt with the current prefix
        roll = rollout(model, tokenizer, prefix, batch_prompts, cfg, s.shard.row_seeds(step))
        laps.lap("generate")
        # 2. score them (NaN for a row where no reward applies)
        scores, raw_scores, reward_metrics = score(s.scorer, batch_prompts, roll, columns, model.device)
        laps.lap("score")
        # 3. reference log-probs
        ref_lp = reference_logprobs(model, roll, s.ref_kv, cfg.temperature)
        # 4. per-token advantages
        batch = advantages(roll, scores, ref_lp, s.value_head, cfg, s.kl_ctl.value, s.shard, dist)
        laps.lap("reference")
        # 5. the clipped-surrogate update
        update_stats = ppo_update(model, prefix, s.value_head, s.opt, s.groups, batch, s.shard, step, cfg,
                                  s.kl_ctl.value, dist)
        assert_finite("PPO update (prefix or advantages)", step + 1, batch.advantages, *prefix.parameters())
        laps.lap("train")
        # 6. metrics, then the KL controller follows the batch's KL
        record = {**step_metrics(batch, raw_scores, reward_metrics, cfg, dist), "kl_coef": s.kl_ctl.value,
                  **update_stats, **laps.times}
        s.kl_ctl.update(record["kl"], cfg.batch_size)
        # 7. the held-out reward every eval_every steps
        if eval_prompts is not None and _eval_due(cfg, step + 1):
            record["eval/reward"] = held_out_reward(model, tokenizer, prefix, eval_prompts, s.scorer.reward, cfg,
                                                    dist)
        # 8. history, metrics, on_step, progress bar; checkpoint
        run.log(step + 1, record, show={"reward": f"{record['reward/mean']:.3f}", "kl": f"{record['kl']:.2f}"})
        run.maybe_checkpoint(step + 1)

    # --- cleanup ---
    prefix.eval()
    run.close(["reward/mean", "kl", "policy/entropy"] + (["value/explained_variance"] if cfg.uses_critic else []),
              title=f"RL ({cfg.advantage})")
    return PPOResult(prefix, s.value_head, run.history, run.step, s.kl_ctl.value)
