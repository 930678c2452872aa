"""Stage 2, RL on a prefix-only policy: PPO's clipped surrogate with a choice of advantage estimator.

The policy is the frozen model + the prefix. The reference for the KL term is the same frozen model with
the prefix switched off ("base") or with the starting prefix ("initial", e.g. the warm-start prefix) --
no second copy of the model exists anywhere.

One step (the numbered calls in `ppo`, the loop at the end of this module):
  1. `rollout`: sample `group_size` completions for each of `batch_size / group_size` prompts, recording the
     policy's log-probs (the "old" policy) and, for GAE, the final hidden states the value head reads;
  2. `score` them with the reward (hygiene and running normalisation in `rlprefix.train.scorer.Scorer`);
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
  8. the record, metrics file, progress bar and checkpoints (`rlprefix.train.stage_run.StageRun`).
Details follow CleanRL's ppo and "The 37 implementation details of PPO"; each is a named config field.

Where the parts live: the maths (advantage estimators, losses, KL estimators, the adaptive KL coefficient) in
`rlprefix.train.ppo_losses`; steps 1-4 and the split of a batch over processes in `rlprefix.train.ppo_rollout`;
step 5 in `rlprefix.train.ppo_update`; the critic in `rlprefix.train.value_head`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from rlprefix.distributed.groups import Dist
from rlprefix.guards import assert_finite
from rlprefix.images.conditions import NEEDS_IMAGES, image_features, is_image_prefix
from rlprefix.prefixes.dynamic import is_input_conditioned
from rlprefix.prefixes.prefix import Prefix
from rlprefix.settings import CLOSED_UNIT, NONNEG, POSITIVE, UNIT, ConfigError, Settings, one_of, setting
from rlprefix.train.data import load_records, require_columns
from rlprefix.train.evaluate import evaluate_reward
from rlprefix.train.ppo_losses import AdaptiveKLController, gae, group_advantages, kl_k1
from rlprefix.train.ppo_rollout import Batch, BatchShard, advantages, reference_logprobs, rollout, score
from rlprefix.train.ppo_update import ppo_update
from rlprefix.train.scorer import GLOBAL_METRICS, Scorer
from rlprefix.train.stage_run import PPO_FILES, Laps, StageRun, config_hash
from rlprefix.train.value_head import ValueHead

# the stage's API; gae, group_advantages, BatchShard and ValueHead are re-exported from the modules that hold them
__all__ = ["PPOConfig", "PPOResult", "ppo", "NOT_IN_PPO_HASH", "ADVANTAGES", "gae", "group_advantages",
           "BatchShard", "ValueHead", "AdaptiveKLController", "rollout", "score", "reference_logprobs",
           "advantages", "ppo_update", "step_metrics", "held_out_reward", "LEARNING_RATES", "learning_rate"]

ADVANTAGES = ("rloo", "grpo", "gae")
# `ppo.lr: null` (the default) takes the learning rate of the prefix's kind: what one Adam step may move differs by
# orders of magnitude between plain K/V (each value moves only itself) and a mapper network (every weight moves
# every row's K/V). kv 1e-2: docs/how-it-works.md (both seeds, every task of benchmarks/learning_vs_trl.py). image
# 1e-4: a warm-started kv image prefix at lr 1e-3 fell from 0.90 to 0.17 training reward in 7 steps (KL 10 after
# the first update), at 1e-4 and 3e-5 it kept it (docs/image-prefixes.md). Kinds not listed take "default".
LEARNING_RATES = {"default": 1e-2, "image": 1e-4}


def learning_rate(cfg: "PPOConfig", prefix) -> float:
    """The prefix's learning rate: `cfg.lr` where set, else its kind's entry of LEARNING_RATES."""
    if cfg.lr is not None:
        return cfg.lr
    return LEARNING_RATES.get(getattr(prefix, "kind", None), LEARNING_RATES["default"])


@dataclass
class PPOConfig(Settings):
    """The `ppo:` section of a run config; each setting's help text is its documentation (`--help` lists them)."""
    section = "ppo"
    steps: int = setting(16, "RL iterations (one rollout batch + its update each)", NONNEG)
    batch_size: int = setting(32, "completions per rollout (= prompts per step x group_size)", POSITIVE)
    group_size: int = setting(4, "completions sampled per prompt (rloo/grpo need >= 2)", POSITIVE)
    minibatch_size: int = setting(8, "completions per gradient step", POSITIVE)
    epochs: int = setting(1, "passes over each rollout batch", POSITIVE)
    lr: float | None = setting(None, "prefix learning rate (Adam); null: the prefix kind's own ("
                               + ", ".join(f"{k} {v:g}" for k, v in LEARNING_RATES.items()) + ")", POSITIVE)
    advantage: str = setting("rloo", "rloo | grpo | gae (see rlprefix.train.ppo)")  # checked with group_size below
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
    # reference: initial for an input-conditioned prefix (dynamic, image): a frozen copy of the prefix as RL began
    # (its K/V are per row, so the reference is the small prefix itself, never a second model)
    ref_prefix: torch.nn.Module | None
    value_head: ValueHead | None
    groups: list[dict]           # the optimiser's parameter groups
    opt: torch.optim.Optimizer | None
    kl_ctl: AdaptiveKLController
    shard: BatchShard
    dist: Dist
    features: torch.Tensor | None = None  # an image prefix: every prompt's image feature (its encoder's), once

    def prompts_at(self, step: int) -> tuple[list[str], dict[str, list]]:
        """This process's prompts at `step` (each repeated group_size times) and their reward columns."""
        rows = self.ds.select(self.shard.prompt_indices(step))
        return list(rows["prompt"]), {c: list(rows[c]) for c in self.ds.column_names if c != "prompt"}

    def policy_at(self, prefix, step: int):
        """What samples and trains at `step`: the prefix, bound to the step's images for an image prefix."""
        if self.features is None:
            return prefix
        return prefix.bind(self.features[self.shard.prompt_indices(step)])

    def state(self) -> tuple[dict, dict]:
        tensors = {"ref_kv": self.ref_kv} if self.ref_kv is not None else {}
        if self.ref_prefix is not None:
            tensors.update({f"ref.{k}": v for k, v in self.ref_prefix.state_dict().items()})
        return tensors, {"kl_coef": self.kl_ctl.value, "scorer": self.scorer.state_dict(),
                         "world_size": self.dist.world_size}

    def load_state(self, tensors: dict, meta: dict) -> None:
        if meta.get("world_size", 1) != self.dist.world_size:
            raise ValueError(f"checkpoint was written with {meta.get('world_size')} processes; resume with the "
                             f"same number (now {self.dist.world_size})")
        if self.ref_kv is not None:
            self.ref_kv.copy_(tensors["ref_kv"])
        if self.ref_prefix is not None:
            self.ref_prefix.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ref.")})
        self.kl_ctl.value = meta["kl_coef"]
        self.scorer.load_state_dict(meta["scorer"])

    def reference_for(self, policy):
        """What the reference log-probs are scored with: the reference K/V, or the frozen copy of an
        input-conditioned prefix (an image prefix's bound to the same rows' images); None: the base model."""
        if self.ref_prefix is None:
            return self.ref_kv
        return self.ref_prefix.bind(policy.features) if is_image_prefix(policy) else self.ref_prefix


def _setup(model, prefix: Prefix, prompts, reward: Callable, cfg: PPOConfig, dist: Dist) -> _Setup:
    """Data, reward hygiene, reference, value head (gae) and optimiser."""
    ds = load_records(prompts)
    require_columns(ds, ["prompt"], "PPO")
    features = None
    if is_image_prefix(prefix):  # every prompt's image through the prefix's encoder, once; rewards get images=
        if "image" in ds.column_names and "images" not in ds.column_names:
            ds = ds.rename_column("image", "images")
        if "images" not in ds.column_names:
            raise ValueError(f"PPO: {NEEDS_IMAGES} (the prompts have columns {ds.column_names})")
        features = image_features(prefix, ds["images"])
        if not bool(prefix.mean.any()):
            prefix.fit_features(features)
    scorer = reward if isinstance(reward, Scorer) else Scorer(
        reward, on_error=cfg.on_reward_error, penalty=cfg.reward_penalty, clip=cfg.reward_clip,
        normalize=cfg.reward_normalize)
    if dist.world_size > 1:
        scorer.gather = dist.gather_floats  # the raw reward's statistics and normalisation use the global batch
    prefix.to(model.device)
    initial = cfg.reference == "initial" and prefix.length
    ref_prefix = _frozen_copy(prefix) if initial and is_input_conditioned(prefix) else None
    ref_kv = prefix.key_values(model).detach().clone() if initial and ref_prefix is None else None
    torch.manual_seed(cfg.seed)  # before the value head, whose init must not depend on earlier work
    value_head = (ValueHead(model.config.get_text_config().hidden_size, cfg.value_hidden).to(model.device)
                  if cfg.uses_critic else None)
    groups = [{"params": list(value_head.parameters()), "lr": cfg.value_lr, "name": "value"}] if value_head else []
    if prefix.num_parameters():
        groups.insert(0, {"params": [p for p in prefix.parameters() if p.requires_grad], "lr": cfg.lr,
                          "name": "prefix"})
    opt = torch.optim.Adam(groups, eps=1e-5) if groups else None  # None: nothing to train (an empty prefix)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return _Setup(ds, scorer, ref_kv, ref_prefix, value_head, groups, opt, kl_ctl, BatchShard(cfg, len(ds), dist), dist,
                  features)


def _frozen_copy(prefix):
    """The prefix as it is now, frozen: the reference of an input-conditioned prefix (reference: initial)."""
    ref = copy.deepcopy(prefix).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _stage_run(s: _Setup, prefix: Prefix, cfg: PPOConfig, output_dir, resume: bool, on_step, tensorboard: bool
               ) -> StageRun:
    """The run's record, metrics and checkpoints in `output_dir`, resumed from its checkpoint when there is one."""
    cfg_hash = config_hash(cfg, ignore=NOT_IN_PPO_HASH, prefix=prefix.config_dict(), n=len(s.ds))
    run = StageRun(output_dir, PPO_FILES, cfg_hash, s.dist, steps=cfg.steps, checkpoint_every=cfg.checkpoint_every,
                   what="PPO config or prompt set", desc="rl", progress=cfg.progress,
                   tensorboard=tensorboard, on_step=on_step)
    run.resume({"prefix": prefix, "value_head": s.value_head}, s.opt, s, enabled=resume)
    return run


def _eval_due(cfg: PPOConfig, step: int) -> bool:
    """A held-out evaluation after `step` (every eval_every steps; the one after the last step is the caller's)."""
    return bool(cfg.eval_every) and step % cfg.eval_every == 0 and step < cfg.steps


def held_out_reward(model, tokenizer, prefix: Prefix, eval_prompts, reward, cfg: PPOConfig, dist: Dist) -> float:
    """Mean reward of the current prefix on `eval_prompts` (the raw reward, the stage's sampling settings)."""
    return evaluate_reward(model, tokenizer, prefix, eval_prompts, reward, chat=cfg.chat, system=cfg.system,
                           seed=cfg.seed, max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                           temperature=cfg.temperature, dist=dist).mean


def step_metrics(batch: Batch, reward_metrics: dict, cfg: PPOConfig, dist: Dist) -> dict:
    """Reward, KL to the reference, explained variance (gae) and response length over the global batch."""
    mask, roll = batch.mask, batch.roll
    kl_seq = dist.mean((kl_k1(batch.old_logprobs, batch.ref_logprobs) * mask).sum(1).mean().item())
    record = {
        # the reward as the user wrote it (before clipping and normalisation), over the global batch (Scorer)
        "reward/mean": reward_metrics["reward/raw_mean"],
        "reward/std": reward_metrics["reward/raw_std"],
        # the others are per process: their mean over processes
        **{k: v if k in GLOBAL_METRICS else dist.mean(v) for k, v in reward_metrics.items()},
        "kl": kl_seq,
        "response_length": dist.mean(roll.completion_mask.sum(1).float().mean().item()),
    }
    if cfg.uses_critic:
        var_ret = dist.masked_var(batch.returns, mask)
        record["value/explained_variance"] = (1.0 - dist.masked_var(batch.returns - batch.old_values, mask) / var_ret
                                              if var_ret > 0 else float("nan"))
    return record


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
    cfg = config or PPOConfig()
    cfg.validate()  # again: fields may have been changed since construction
    if cfg.lr is None:  # the kind's learning rate, resolved once: records, checkpoints and the optimiser agree
        cfg = replace(cfg, lr=learning_rate(cfg, prefix))
    dist = dist or Dist()
    # 0. setup: data, reward hygiene, reference, value head (gae), optimiser; the run, resumed from its checkpoint
    s = _setup(model, prefix, prompts, reward, cfg, dist)
    run = _stage_run(s, prefix, cfg, output_dir, resume, on_step, tensorboard)
    while run.step < cfg.steps:
        step, laps = run.step, Laps()
        batch_prompts, columns = s.prompts_at(step)
        policy = s.policy_at(prefix, step)  # an image prefix: bound to this step's images
        # 1. sample group_size completions per prompt with the current prefix
        roll = rollout(model, tokenizer, policy, batch_prompts, cfg, s.shard.row_seeds(step))
        laps.lap("generate")
        # 2. score them (NaN for a row where no reward applies)
        scores, reward_metrics = score(s.scorer, batch_prompts, roll, columns, model.device)
        laps.lap("score")
        # 3. reference log-probs, 4. per-token advantages
        ref_lp = reference_logprobs(model, roll, s.reference_for(policy), cfg.temperature)
        batch = advantages(roll, scores, ref_lp, s.value_head, cfg, s.kl_ctl.value, s.shard, dist)
        laps.lap("reference")
        # 5. the clipped-surrogate update
        update_stats = ppo_update(model, policy, s.value_head, s.opt, s.groups, batch, s.shard, step, cfg,
                                  s.kl_ctl.value, dist)
        assert_finite("PPO update (prefix or advantages)", step + 1, batch.advantages, *prefix.parameters())
        laps.lap("train")
        # 6. metrics, then the KL controller follows the batch's KL
        record = {**step_metrics(batch, reward_metrics, cfg, dist), "kl_coef": s.kl_ctl.value, **update_stats,
                  **laps.times}
        s.kl_ctl.update(record["kl"], cfg.batch_size)
        # 7. the held-out reward every eval_every steps
        if eval_prompts is not None and _eval_due(cfg, step + 1):
            record["eval/reward"] = held_out_reward(model, tokenizer, prefix, eval_prompts, s.scorer.reward, cfg,
                                                    dist)
        # 8. history, metrics, on_step, progress bar; checkpoint
        run.log(step + 1, record, show={"reward": f"{record['reward/mean']:.3f}", "kl": f"{record['kl']:.2f}"})
        run.maybe_checkpoint(step + 1)
    # 9. cleanup: the curves and the summary
    prefix.eval()
    run.close(["reward/mean", "kl", "policy/entropy"] + (["value/explained_variance"] if cfg.uses_critic else []),
              title=f"RL ({cfg.advantage})")
    return PPOResult(prefix, s.value_head, run.history, run.step, s.kl_ctl.value)
