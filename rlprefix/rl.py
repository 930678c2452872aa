"""Stage 2, PPO on a prefix-only policy.

The policy is the frozen model + the prefix; a small value head reads the policy's final hidden states
(detached, so the value loss never moves the prefix). The reference for the KL penalty is the same
frozen model with the prefix switched off ("base") or with the starting prefix ("initial", e.g. the
warm-start prefix) -- no second copy of the model exists anywhere.

Per step: rollout (sample + record logprobs/values) -> score (reward) -> reference logprobs ->
per-token rewards (-kl_coef * KL, task reward on the last token) -> GAE -> epochs of shuffled
minibatches with the clipped surrogate, clipped value loss and entropy bonus -> adaptive KL update.
Details follow CleanRL's ppo and "The 37 implementation details of PPO"; each is a named config field.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (load_module_tensors, load_optimizer_state, load_rng_state,
                         module_tensors, optimizer_state, resume_checkpoint, rng_state, save_checkpoint)
from .data import load_records, require_columns
from .generation import encode_prompts, sample
from .metrics import MetricLogger, plot_metrics
from .prefix import Prefix
from .runtime import entropy_of, score_completions


@dataclass
class PPOConfig:
    steps: int = 40                     # PPO iterations (one rollout batch + its update each)
    batch_size: int = 32                # prompts (= completions) per rollout
    minibatch_size: int = 8
    epochs: int = 4                     # passes over each rollout batch
    lr: float = 3e-3                    # prefix learning rate
    value_lr: float = 1e-3              # value-head learning rate
    max_new_tokens: int = 40
    min_new_tokens: int = 0
    temperature: float = 1.0            # the policy is softmax(logits / temperature)
    top_k: int = 0                      # sampling filters (logprobs stay those of the policy)
    top_p: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95                   # GAE lambda
    clip_range: float = 0.2             # policy ratio clip
    clip_range_value: float | None = 0.2  # value clip around the rollout values (None: no value clipping)
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    whiten_advantages: bool = True
    max_grad_norm: float = 1.0
    target_kl_stop: float | None = 0.1  # stop this step's update once minibatch approx-KL exceeds it
    kl_coef: float = 0.05               # initial beta of the per-token KL penalty
    kl_target: float | None = None      # adaptive KL controller target (per-sequence KL); None = fixed beta
    kl_horizon: int = 10000
    reference: str = "base"             # base (no prefix) | initial (the prefix as it was when PPO started)
    reward_clip: float | None = None
    reward_normalize: bool = False
    on_reward_error: str = "raise"      # raise | penalty
    reward_penalty: float = -1.0
    value_hidden: int = 256             # 0: a linear value head
    seed: int = 0
    chat: bool | None = None
    system: str | None = None
    checkpoint_every: int = 10
    eval_every: int = 0                 # steps between held-out evaluations (0: only at the end)
    eval_max_new_tokens: int | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"ppo.batch_size: {self.batch_size} must be a multiple of ppo.minibatch_size "
                             f"({self.minibatch_size})")
        if self.reference not in ("base", "initial"):
            raise ValueError(f"ppo.reference must be 'base' or 'initial', got {self.reference!r}")


class ValueHead(nn.Module):
    """V(s_t) from the final hidden state that predicts token t."""

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


def _row_seed(seed: int, step: int, row: int) -> int:
    """A seed for one global batch row at one step: rollouts do not depend on how rows are split over
    processes, and resuming needs no RNG state for sampling."""
    return (seed * 1_000_003 + step) * 1_000_033 + row


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


@dataclass
class PPOResult:
    prefix: Prefix
    value_head: ValueHead
    history: list[dict] = field(default_factory=list)
    steps_done: int = 0
    kl_coef: float = 0.0


def _config_hash(cfg: PPOConfig, prefix: Prefix, n_prompts: int) -> str:
    blob = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "checkpoint_every", "steps")}
    blob.update(prefix=prefix.config_dict(), n=n_prompts)
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ppo(model, tokenizer, prefix: Prefix, prompts, reward: Callable, config: PPOConfig | None = None, *,
        eval_prompts=None, output_dir: str | Path | None = None, resume: bool = True,
        on_step: Callable[[int, dict], None] | None = None, dist=None) -> PPOResult:
    """Optimise `prefix` (in place) with PPO against `reward(prompts, completions, **columns)`.

    `prompts`: a list of strings, a list of dicts / datasets.Dataset / file with a `prompt` column; any
    other column is passed to the reward as a keyword list. `dist` (rlprefix.distributed.Dist) spreads
    rollouts over processes; gradients and statistics are then all-reduced.
    """
    from rewards import Scorer
    from .distributed import Dist
    from .evaluate import evaluate_reward

    cfg = config or PPOConfig()
    cfg.validate()
    dist = dist or Dist()
    device = model.device
    ds = load_records(prompts)
    require_columns(ds, ["prompt"], "PPO")
    columns = [c for c in ds.column_names if c != "prompt"]
    scorer = reward if isinstance(reward, Scorer) else Scorer(
        reward, on_error=cfg.on_reward_error, penalty=cfg.reward_penalty, clip=cfg.reward_clip,
        normalize=cfg.reward_normalize)

    if dist.world_size > 1:
        scorer.gather = dist.gather_floats  # reward normalisation uses global statistics
    prefix.to(device)
    ref_kv = prefix.key_values(model).detach().clone() if cfg.reference == "initial" and prefix.length else None
    torch.manual_seed(cfg.seed)  # before the value head, whose init must not depend on earlier work
    value_head = ValueHead(model.config.get_text_config().hidden_size, cfg.value_hidden).to(device)
    groups = [{"params": list(value_head.parameters()), "lr": cfg.value_lr, "name": "value"}]
    if prefix.num_parameters():
        groups.insert(0, {"params": [p for p in prefix.parameters() if p.requires_grad], "lr": cfg.lr,
                          "name": "prefix"})
    opt = torch.optim.Adam(groups, eps=1e-5)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    step, history = 0, []
    out = Path(output_dir) if output_dir else None
    cfg_hash = _config_hash(cfg, prefix, len(ds))
    if out is not None and resume:
        ckpt = resume_checkpoint(out / "ppo_checkpoint", cfg_hash, "PPO config or prompt set")
        if ckpt is not None:
            tensors, meta = ckpt
            if meta.get("world_size", 1) != dist.world_size:
                raise ValueError(f"checkpoint was written with {meta.get('world_size')} processes; resume with the "
                                 f"same number (now {dist.world_size})")
            load_module_tensors(prefix, tensors, "prefix")
            load_module_tensors(value_head, tensors, "value_head")
            if ref_kv is not None:
                ref_kv = tensors["ref_kv"].to(device)
            load_optimizer_state(opt, tensors, meta["optimizer"])
            load_rng_state(tensors, meta["rng"])
            kl_ctl.value = meta["kl_coef"]
            scorer.load_state_dict(meta["scorer"])
            step, history = meta["step"], meta["history"]
    logger = MetricLogger(out / "ppo_metrics.jsonl", resume_step=step, enabled=dist.is_main) if out else None

    def checkpoint():
        if out is None:
            return
        if not dist.is_main:
            return
        t_opt, m_opt = optimizer_state(opt)
        t_rng, m_rng = rng_state()
        tensors = {**module_tensors(prefix, "prefix"), **module_tensors(value_head, "value_head"), **t_opt, **t_rng}
        if ref_kv is not None:
            tensors["ref_kv"] = ref_kv
        save_checkpoint(out / "ppo_checkpoint", tensors, {
            "step": step, "history": history, "optimizer": m_opt, "rng": m_rng, "kl_coef": kl_ctl.value,
            "scorer": scorer.state_dict(), "config_hash": cfg_hash, "world_size": dist.world_size})

    local_batch = cfg.batch_size // dist.world_size
    if cfg.batch_size % dist.world_size:
        raise ValueError(f"ppo.batch_size {cfg.batch_size} must divide evenly over {dist.world_size} processes")
    first_row = dist.rank * local_batch  # this process owns global rows [first_row, first_row + local_batch)
    per_epoch = max(1, len(ds) // cfg.batch_size)
    bar = tqdm(total=cfg.steps, initial=step, desc="ppo", disable=not (cfg.progress and dist.is_main))
    while step < cfg.steps:
        t0 = time.perf_counter()
        # --- 1. prompts: a seeded permutation per pass over the data; each rank takes its slice ---
        epoch, slot = divmod(step, per_epoch)
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch)).tolist()
        idx = [order[(slot * cfg.batch_size + i) % len(ds)] for i in range(cfg.batch_size)]
        idx = idx[first_row:first_row + local_batch]
        rows = ds.select(idx)
        batch_prompts = list(rows["prompt"])
        batch_columns = {c: list(rows[c]) for c in columns}
        prompt_ids, prompt_mask = encode_prompts(tokenizer, batch_prompts, cfg.chat, cfg.system, device=device)

        # --- 2. rollout: sample with the prefix, recording logprobs (the "old" policy) ---
        prefix.eval()
        with torch.no_grad():
            kv = prefix.key_values(model) if prefix.length else None
            roll = sample(model, tokenizer, prompt_ids, prompt_mask, kv=kv, max_new_tokens=cfg.max_new_tokens,
                          min_new_tokens=cfg.min_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                          top_p=cfg.top_p, return_hidden=True,
                          row_seeds=[_row_seed(cfg.seed, step, first_row + i) for i in range(local_batch)])
        t_gen = time.perf_counter()

        # --- 3. score the completions (reward hygiene in Scorer) ---
        completion_ids = [ids[m.bool()].tolist() for ids, m in zip(roll.completion_ids, roll.completion_mask)]
        scores, reward_metrics = scorer(batch_prompts, roll.texts, completion_ids=completion_ids, **batch_columns)
        scores = scores.to(device)
        t_score = time.perf_counter()

        # --- 4. values (from the hidden states recorded while sampling) and reference logprobs ---
        # The sampled logprobs are the "old" policy: they equal a fresh forward's to float precision (the
        # first minibatch's ratio deviation is logged to prove it), so no extra policy forward is needed.
        mask = roll.completion_mask.float()
        with torch.no_grad():
            old_values = value_head(roll.hidden) * mask
            old_logprobs = roll.logprobs * mask
            ref = score_completions(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids,
                                    roll.completion_mask, kv=ref_kv, temperature=cfg.temperature)
            kl_tok = (old_logprobs - ref.logprobs) * mask            # k1 estimator per token
            del ref
        # --- 5. per-token rewards: -beta * KL everywhere, task score on the last real token ---
        rewards = -kl_ctl.value * kl_tok
        last = (roll.completion_mask.sum(1) - 1).clamp(min=0)
        rewards[torch.arange(rewards.shape[0], device=device), last] += scores
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = dist.masked_whiten(advantages, mask)
        t_ref = time.perf_counter()

        # --- 6. update: epochs of shuffled minibatches ---
        prefix.train()
        stats: dict[str, list[float]] = {k: [] for k in ("pg_loss", "vf_loss", "entropy", "approx_kl", "clipfrac",
                                                         "ratio_max_dev")}
        early_stopped = False
        for epoch_i in range(cfg.epochs):
            # one permutation of the *global* batch, the same on every process; each process takes the rows
            # of each minibatch that it owns, and losses are normalised by the minibatch's global token
            # count, so summed gradients equal those of a single process holding the whole batch.
            perm = torch.randperm(cfg.batch_size, generator=torch.Generator().manual_seed(
                _row_seed(cfg.seed, step, 10_000_019 + epoch_i)))
            for start in range(0, cfg.batch_size, cfg.minibatch_size):
                rows = perm[start:start + cfg.minibatch_size]
                mb = (rows[(rows >= first_row) & (rows < first_row + local_batch)] - first_row).to(device)
                m = mask[mb]
                n_tokens = dist.sum(m.sum().item())
                if len(mb):
                    new = score_completions(model, roll.prompt_ids[mb], roll.prompt_mask[mb],
                                            roll.completion_ids[mb], roll.completion_mask[mb], prefix,
                                            temperature=cfg.temperature, output_hidden=True)
                    values = value_head(new.hidden.detach())
                    logratio = (new.logprobs - old_logprobs[mb]) * m
                    entropy_tok = entropy_of(new.logits, cfg.temperature)
                else:  # this process owns no row of this minibatch: contribute zero gradients
                    values = logratio = entropy_tok = m
                ratio = logratio.exp()
                adv = advantages[mb]

                def token_sum(x):  # sum over this process's tokens / tokens of the whole minibatch
                    return (x * m).sum() / max(n_tokens, 1.0)

                pg_loss = token_sum(torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_range,
                                                                               1 + cfg.clip_range)))
                if cfg.clip_range_value is not None:
                    v_clipped = old_values[mb] + (values - old_values[mb]).clamp(-cfg.clip_range_value,
                                                                                 cfg.clip_range_value)
                    vf_loss = 0.5 * token_sum(torch.max((values - returns[mb]) ** 2, (v_clipped - returns[mb]) ** 2))
                else:
                    vf_loss = 0.5 * token_sum((values - returns[mb]) ** 2)
                entropy = token_sum(entropy_tok)
                loss = pg_loss - cfg.ent_coef * entropy + cfg.vf_coef * vf_loss
                opt.zero_grad(set_to_none=True)
                if len(mb):
                    loss.backward()
                dist.sum_grads([p for g in groups for p in g["params"]])
                for g in groups:
                    torch.nn.utils.clip_grad_norm_(g["params"], cfg.max_grad_norm)
                opt.step()
                with torch.no_grad():
                    approx_kl = dist.sum(token_sum((ratio - 1) - logratio).item())
                    stats["pg_loss"].append(dist.sum(pg_loss.item()))
                    stats["vf_loss"].append(dist.sum(vf_loss.item()))
                    stats["entropy"].append(dist.sum(entropy.item()))
                    stats["approx_kl"].append(approx_kl)
                    stats["clipfrac"].append(dist.sum(token_sum(((ratio - 1).abs() > cfg.clip_range).float()).item()))
                    dev = ((ratio - 1).abs() * m).max().item() if len(mb) else 0.0
                    stats["ratio_max_dev"].append(dist.max(dev))
                if cfg.target_kl_stop is not None and approx_kl > cfg.target_kl_stop:
                    early_stopped = True
                    break
            if early_stopped:
                break
        t_train = time.perf_counter()

        # --- 7. KL controller and metrics ---
        seq_kl = dist.mean(kl_tok.sum(1).mean().item())
        kl_ctl.update(seq_kl, cfg.batch_size)
        var_ret = dist.masked_var(returns, mask)
        explained_var = 1.0 - dist.masked_var(returns - old_values, mask) / var_ret if var_ret > 0 else float("nan")
        g_scores = dist.gather_floats(scores.tolist())
        step += 1
        record = {
            "reward/mean": sum(g_scores) / len(g_scores),
            "reward/std": float(torch.tensor(g_scores).std()) if len(g_scores) > 1 else 0.0,
            **{k: dist.mean(v) for k, v in reward_metrics.items()},
            "kl": seq_kl, "kl_coef": kl_ctl.value,
            **{f"policy/{k}": (sum(v) / len(v) if v else float("nan")) for k, v in stats.items()
               if k != "ratio_max_dev"},
            "policy/ratio_dev_first_minibatch": stats["ratio_max_dev"][0],
            "policy/early_stopped": float(early_stopped),
            "value/explained_variance": explained_var,
            "response_length": dist.mean(roll.completion_mask.sum(1).float().mean().item()),
            "time/generate": t_gen - t0, "time/score": t_score - t_gen, "time/reference": t_ref - t_score,
            "time/train": t_train - t_ref,
        }
        if eval_prompts is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            record["eval/reward"] = evaluate_reward(model, tokenizer, prefix, eval_prompts, scorer.reward,
                                                    chat=cfg.chat, system=cfg.system, seed=cfg.seed,
                                                    max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                                                    temperature=cfg.temperature, dist=dist).mean
        history.append({"step": step, **record})
        if logger:
            logger.log(step, record)
        if on_step:
            on_step(step, record)
        bar.set_postfix(reward=f"{record['reward/mean']:.3f}", kl=f"{seq_kl:.2f}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint()
    bar.close()
    prefix.eval()
    if logger:
        logger.close()
        plot_metrics(out / "ppo_metrics.jsonl", ["reward/mean", "kl", "policy/entropy", "value/explained_variance"],
                     out / "ppo_curves.png", title="PPO")
    return PPOResult(prefix, value_head, history, step, kl_ctl.value)
