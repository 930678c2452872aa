"""What one PPO step learns from: the rows this process owns (`BatchShard`), the sampled completions (`rollout`),
their rewards (`score`), the log-probs of the sampled tokens under the reference and under the policy
(`reference_logprobs`, `policy_scores`), and the per-token advantages the update consumes (`advantages` -> `Batch`).

`cfg` below is the stage's `rlprefix.train.ppo.PPOConfig` (that module imports this one, so it is not imported here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlprefix.decoding import engine
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.distributed.groups import Dist
from rlprefix.models.adapter import score_completions
from rlprefix.models.sampling import Rollout, SequenceScores
from rlprefix.prefixes.dynamic import is_input_conditioned
from rlprefix.prefixes.prefix import Prefix
from rlprefix.seeds import derive_seed
from rlprefix.train.ppo_losses import gae, group_advantages, kl_k1
from rlprefix.train.scorer import Scorer
from rlprefix.train.value_head import ValueHead


class BatchShard:
    """Which global rows of a rollout batch this process owns, and the prompts for a step.

    Rows are ordered prompt-major (row = prompt * group_size + j); a group may span processes, so group
    baselines are computed on the gathered global scores (`advantages`).
    """

    def __init__(self, cfg, n_prompts: int, dist: Dist):
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


# ---- 1. rollout, 2. score -------------------------------------------------------------------------------------
@torch.no_grad()
def rollout(model, tokenizer, prefix: Prefix, prompts: list[str], cfg, row_seeds: list[int]) -> Rollout:
    """Sample one completion per row with the current prefix, recording the policy's log-probs."""
    prefix.eval()
    ids, mask = encode_prompts(tokenizer, prompts, cfg.chat, cfg.system, device=model.device)
    if is_input_conditioned(prefix):  # each row its own mixture, on the engine's per-row path
        return engine.sample(model, tokenizer, ids, mask, prefix, max_new_tokens=cfg.max_new_tokens,
                             min_new_tokens=cfg.min_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                             top_p=cfg.top_p, return_hidden=cfg.uses_critic, row_seeds=row_seeds)
    kv = prefix.key_values(model) if prefix.length else None
    return engine.sample(model, tokenizer, ids, mask, kv=kv, max_new_tokens=cfg.max_new_tokens,
                         min_new_tokens=cfg.min_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                         top_p=cfg.top_p, return_hidden=cfg.uses_critic, row_seeds=row_seeds)


def score(scorer: Scorer, prompts: list[str], roll: Rollout, columns: dict, device) -> tuple[torch.Tensor, dict]:
    """The rollout's scores on `device` (NaN where no reward applies) and the reward's metrics, among them the
    raw reward's mean and std over the global batch (`Scorer`)."""
    completion_ids = [ids[m.bool()].tolist() for ids, m in zip(roll.completion_ids, roll.completion_mask)]
    scores, metrics = scorer(prompts, roll.texts, completion_ids=completion_ids, **columns)
    return scores.to(device), metrics


# ---- log-probs of the sampled tokens --------------------------------------------------------------------------
def reference_logprobs(model, roll: Rollout, ref, temperature: float) -> torch.Tensor:
    """log p_ref of the sampled tokens: the frozen model with the reference prefix (its K/V, or a frozen
    input-conditioned prefix) or with none (None)."""
    kw = {"kv": ref} if ref is None or isinstance(ref, torch.Tensor) else {"prefix": ref}
    with torch.no_grad():
        return score_completions(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask,
                                 temperature=temperature, **kw).logprobs


def policy_scores(model, prefix: Prefix, roll: Rollout, rows: torch.Tensor, temperature: float,
                  output_hidden: bool) -> SequenceScores:
    """The policy's differentiable forward on rows `rows` of the rollout: log-probs, logits (and hidden states)."""
    if hasattr(prefix, "select"):  # an image prefix bound to the batch's images: this minibatch's rows
        prefix = prefix.select(rows)
    return score_completions(model, roll.prompt_ids[rows], roll.prompt_mask[rows], roll.completion_ids[rows],
                             roll.completion_mask[rows], prefix, temperature=temperature, output_hidden=output_hidden)


# ---- 4. advantages --------------------------------------------------------------------------------------------
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
               cfg, kl_coef: float, shard: BatchShard, dist: Dist) -> Batch:
    """Per-token advantages for the update (rows whose score is NaN are masked out of the loss), whitened over
    the global batch (`whiten_advantages`) so that the update does not depend on the reward's scale."""
    finite = torch.isfinite(scores)
    mask = roll.completion_mask.float() * finite.float().unsqueeze(1)
    old_logprobs = roll.logprobs * mask
    kl_tok = kl_k1(old_logprobs, ref_logprobs) * mask
    returns = old_values = None
    if cfg.uses_critic:
        adv, returns, old_values = _critic_advantages(roll, scores, kl_tok, mask, value_head, cfg, kl_coef)
    else:
        adv = _group_relative_advantages(scores, kl_tok, mask, cfg, kl_coef, shard, dist)
    if cfg.whiten_advantages:
        adv = dist.masked_whiten(adv, mask)
    return Batch(roll, mask, old_logprobs, ref_logprobs * mask, adv, returns, old_values)


def _critic_advantages(roll: Rollout, scores: torch.Tensor, kl_tok: torch.Tensor, mask: torch.Tensor,
                       value_head: ValueHead, cfg, kl_coef: float):
    """gae: per-token rewards (-beta * KL everywhere with kl_penalty: reward, the task score on the last real
    token) against the value head's values at rollout time; (advantages, returns, those values)."""
    rewards = -kl_coef * kl_tok if cfg.kl_penalty == "reward" else torch.zeros_like(kl_tok)
    last = (roll.completion_mask.sum(1) - 1).clamp(min=0)
    rewards[torch.arange(len(scores), device=scores.device), last] += torch.nan_to_num(scores)
    with torch.no_grad():
        old_values = value_head(roll.hidden) * mask
    adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    return adv, returns, old_values


def _group_relative_advantages(scores: torch.Tensor, kl_tok: torch.Tensor, mask: torch.Tensor, cfg, kl_coef: float,
                               shard: BatchShard, dist: Dist) -> torch.Tensor:
    """rloo / grpo: a completion's advantage against its group, on each of its tokens. The groups' scores are
    gathered from every process (a group may span processes)."""
    seq_scores = scores
    if cfg.kl_penalty == "reward":  # sequence-level KL penalty folded into the score before the baseline
        seq_scores = scores - kl_coef * kl_tok.sum(1)
    global_scores = torch.tensor(dist.gather_floats(seq_scores.tolist()), dtype=torch.float32)
    adv = group_advantages(global_scores, cfg.group_size, cfg.advantage)[shard.first:shard.first + shard.local]
    return adv.to(mask.device).unsqueeze(1) * mask
