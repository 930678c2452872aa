"""Stage 3, compression: choose a rank by its effect on the model, and measure what a compression keeps.

The factorisation itself (truncated SVD, scopes, anchoring, the defaults in `CompressConfig`) is
`rlprefix.prefixes.lowrank`; this stage runs the model:
- `next_token_kl`: mean per-token KL(full || compressed) along completions sampled with the full prefix;
- `fidelity_report`: reconstruction error, that KL and (with a reward) the share of the reward gain kept;
- `compress_to_budget`: the smallest rank whose KL stays within a budget;
- `compress_and_measure`: the compression flow of both `rlprefix run` and `rlprefix compress` (which of the above
  runs, and the report).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from rlprefix.train.data import load_records
from rlprefix.train.evaluate import evaluate_reward
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.models.adapter import reference_sample as sample
from rlprefix.prefixes.lowrank import (CompressConfig, CompressedPrefix, Scope, anchor_mode, compress,
                                       reconstruction_error)
from rlprefix.models.adapter import score_completions
from rlprefix.distributed import collectives as sharding


@torch.no_grad()
def next_token_kl(model, tokenizer, full, compressed, prompts, *, chat=None, system=None, max_new_tokens: int = 32,
                  seed: int = 0, batch_size: int = 16, temperature: float = 1.0) -> float:
    """Mean per-token KL(full || compressed) of next-token distributions along completions sampled with `full`."""
    ds = load_records(prompts)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    kv_full, kv_comp = full.key_values(model), compressed.key_values(model)
    total, count = 0.0, 0
    for i in range(0, len(ds), batch_size):
        ids, mask = encode_prompts(tokenizer, list(ds[i:i + batch_size]["prompt"]), chat, system, device=model.device)
        roll = sample(model, tokenizer, ids, mask, kv=kv_full, max_new_tokens=max_new_tokens,
                      temperature=temperature, generator=gen, decode=False)
        args = (roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
        lp = F.log_softmax(score_completions(model, *args, kv=kv_full).logits.float() / temperature, -1)
        lq = F.log_softmax(score_completions(model, *args, kv=kv_comp).logits.float() / temperature, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        m = roll.completion_mask.float()
        total, count = total + (kl * m).sum().item(), count + m.sum().item()
    # a sharded model's processes compute this alike; the mean makes the choice of rank identical everywhere
    return sharding.agree_mean(model, total / max(count, 1))


def fidelity_report(model, tokenizer, full, compressed, prompts, reward=None, *, base_reward: float | None = None,
                    full_reward: float | None = None, seed: int = 0, max_new_tokens: int = 32,
                    samples_per_prompt: int = 1, chat=None, system=None, temperature: float = 1.0) -> dict:
    """Reconstruction error per layer, mean per-token KL to the full prefix, and (with a reward) reward retained.

    reward_retained = (R_compressed - R_base) / (R_full - R_base): the share of the prefix's gain kept.
    """
    report = {"scope": compressed.scope, "ranks": compressed.ranks, "parameters": compressed.num_parameters(),
              "full_parameters": compressed.full_parameters(), "bytes": compressed.nbytes(),
              "full_bytes": compressed.full_parameters() * 4, "compression_ratio": compressed.compression_ratio(),
              "relative_error_per_layer": reconstruction_error(full, compressed, model)}
    report["relative_error_mean"] = sum(report["relative_error_per_layer"]) / len(report["relative_error_per_layer"])
    report["kl_per_token"] = next_token_kl(model, tokenizer, full, compressed, prompts, chat=chat, system=system,
                                           max_new_tokens=max_new_tokens, seed=seed, temperature=temperature)
    if reward is not None:
        kw = dict(chat=chat, system=system, seed=seed, max_new_tokens=max_new_tokens,
                  samples_per_prompt=samples_per_prompt, temperature=temperature)
        if base_reward is None:
            base_reward = evaluate_reward(model, tokenizer, None, prompts, reward, **kw).mean
        if full_reward is None:
            full_reward = evaluate_reward(model, tokenizer, full, prompts, reward, **kw).mean
        comp_reward = evaluate_reward(model, tokenizer, compressed, prompts, reward, **kw).mean
        gain = full_reward - base_reward
        report.update(reward_base=base_reward, reward_full=full_reward, reward_compressed=comp_reward,
                      reward_retained=(comp_reward - base_reward) / gain if abs(gain) > 1e-9 else float("nan"))
    return report


def compress_to_budget(model, tokenizer, prefix, prompts, max_kl: float, scope: Scope = CompressConfig.scope,
                       ranks: list[int] | None = None, anchor: bool | str = anchor_mode(CompressConfig.anchor),
                       dtype: str = CompressConfig.dtype, **kl_kw) -> tuple[CompressedPrefix, list[dict]]:
    """The smallest rank (from `ranks`, ascending) whose mean per-token KL to the full prefix is <= max_kl.

    Only ranks that make the prefix smaller than the full one are tried. Returns the chosen compressed prefix
    and the trail of (rank, KL, ratio); when no rank meets the budget, the lowest-KL one tried is returned and
    the last trail entry says `budget_met: False`.
    """
    anchored = (anchor == "auto" and bool(getattr(prefix, "init_ids", None))) or anchor is True
    tried = sorted(set(ranks or [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]))
    trail, best = [], None
    for r in tried:
        if r == 0 and not anchored:
            continue
        comp = compress(prefix, rank=r, scope=scope, model=model, anchor=anchor, dtype=dtype)
        if comp.compression_ratio() <= 1.0 or (trail and max(comp.ranks) == trail[-1]["rank"]):
            break  # no longer smaller than the full prefix, or already at full rank
        kl = next_token_kl(model, tokenizer, prefix, comp, prompts, **kl_kw)
        trail.append({"rank": max(comp.ranks), "kl_per_token": kl, "compression_ratio": comp.compression_ratio()})
        if best is None or kl < best[1]:
            best = (comp, kl)
        if kl <= max_kl:
            trail[-1]["budget_met"] = True
            return comp, trail
    if best is None:
        raise ValueError(f"no rank in {tried} compresses this prefix ({scope} scope)")
    trail.append({"budget_met": False, "rank": max(best[0].ranks), "kl_per_token": best[1]})
    return best[0], trail


def compress_and_measure(model, tokenizer, prefix, prompts=None, *, rank: int | None = None,
                         energy: float | None = None, max_kl: float | None = None, scope: Scope = CompressConfig.scope,
                         anchor: bool | str = anchor_mode(CompressConfig.anchor), dtype: str = CompressConfig.dtype,
                         search_kw: dict | None = None, eval_kw: dict | None = None, reward=None,
                         base_reward: float | None = None, full_reward: float | None = None,
                         log: Callable[[str], object] | None = None) -> tuple[CompressedPrefix, dict]:
    """The compression flow of `rlprefix run` and `rlprefix compress`: a fixed `rank` or `energy`; else, with
    `max_kl` and `prompts`, the smallest rank within that KL budget (`search_kw`: how `compress_to_budget` samples
    the KL); else full rank. Returns the compressed prefix and its report: ranks, compression ratio, bytes, the
    ranks tried (and whether the budget was met), and with `prompts` the fidelity report (`eval_kw`: how it
    samples; with `reward`, the share of the reward gain kept). `log` hears when no rank met the budget."""
    trail: list[dict] = []
    if rank is None and energy is None and max_kl is not None and prompts:
        comp, trail = compress_to_budget(model, tokenizer, prefix, prompts, max_kl, scope, anchor=anchor, dtype=dtype,
                                         **(search_kw or {}))
        if log is not None and trail and trail[-1].get("budget_met") is False:
            log(f"compression: no rank met max_kl={max_kl}; kept rank {trail[-1]['rank']} "
                f"(KL/token {trail[-1]['kl_per_token']:.4f})")
    else:
        comp = compress(prefix, rank=rank, energy=energy, scope=scope, model=model, anchor=anchor, dtype=dtype)
    report = {"ranks": comp.ranks, "compression_ratio": comp.compression_ratio(), "bytes": comp.nbytes(),
              "ranks_tried": trail}
    if prompts:
        report.update(fidelity_report(model, tokenizer, prefix, comp, prompts, reward, base_reward=base_reward,
                                      full_reward=full_reward, **(eval_kw or {})))
    return comp, report
