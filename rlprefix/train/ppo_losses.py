"""PPO's maths, named as in the papers: the advantage estimators, the clipped losses, the KL estimators and the
adaptive KL coefficient.

Pure functions of tensors: no model, no process group. The losses are per token; the update takes their token
mean over the global minibatch (`rlprefix.train.ppo_update`).
"""
from __future__ import annotations

import torch


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


# ---- the losses (per token) ----------------------------------------------------------------------------------
def clipped_surrogate_loss(advantages: torch.Tensor, ratio: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO's clipped surrogate objective as a loss (Schulman et al. 2017, eq. 7), with r = pi / pi_old:
    max(-A r, -A clip(r, 1 - eps, 1 + eps))."""
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.max(pg_loss1, pg_loss2)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_range_value: float | None) -> torch.Tensor:
    """The value head's squared error (V - R)^2; with `clip_range_value`, the larger of it and the error of V
    clipped to within clip_range_value of the rollout's values (CleanRL's clipped value loss). The update
    weights its token mean by 1/2."""
    v_loss_unclipped = (values - returns) ** 2
    if clip_range_value is None:
        return v_loss_unclipped
    v_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    return torch.max(v_loss_unclipped, (v_clipped - returns) ** 2)


def ppo_loss(pg_loss: torch.Tensor, v_loss: torch.Tensor, entropy: torch.Tensor, kl: torch.Tensor, *,
             vf_coef: float, ent_coef: float, kl_coef: float) -> torch.Tensor:
    """pg_loss - ent_coef * entropy (the entropy bonus) + vf_coef * v_loss, + kl_coef * kl when the KL to the
    reference is a loss term (kl_coef 0: it is not)."""
    loss = pg_loss - ent_coef * entropy + vf_coef * v_loss
    if kl_coef:
        loss = loss + kl_coef * kl
    return loss


# ---- KL estimators (Schulman, "Approximating KL divergence", 2020) ---------------------------------------------
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(policy || reference) per sampled token: log pi - log pi_ref (unbiased, may be < 0)."""
    return logprobs - ref_logprobs


def kl_k3(ref_logratio: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(policy || reference) per sampled token, x = log pi_ref - log pi: exp(x) - x - 1 >= 0."""
    return ref_logratio.exp() - ref_logratio - 1


def approx_kl(ratio: torch.Tensor, logratio: torch.Tensor) -> torch.Tensor:
    """CleanRL's approx_kl per token, k3 of KL(pi_old || pi) with r = pi / pi_old: (r - 1) - log r."""
    return (ratio - 1) - logratio


def clip_fraction(ratio: torch.Tensor, clip_range: float) -> torch.Tensor:
    """1 where the ratio is outside the clip range (the surrogate's gradient is cut there), else 0."""
    return ((ratio - 1).abs() > clip_range).float()


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL/target - 1, -0.2, 0.2) * n/horizon) (Ziegler et al. 2019); fixed when target is None."""

    def __init__(self, init: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.value *= 1.0 + error * n / self.horizon
