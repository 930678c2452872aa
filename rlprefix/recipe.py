"""`rlprefix run`: setup -> initial prefix -> base eval -> warm start -> PPO -> eval -> compress -> export -> summary.

Every stage writes into OUTPUT_DIR and leaves a marker in OUTPUT_DIR/stages/ when it finishes (`stage`);
rerunning the same command skips finished stages and resumes an interrupted one from its checkpoint (what may be
reused, and the stage keys it is decided by, are rlprefix.freshness's).
"""
from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from rewards import build_reward

from rlprefix.prefixes.artifacts import load_prefix
from rlprefix.config import PPOSection, RunConfig, dump_config, stage_config
from rlprefix.distributed.groups import Dist
from rlprefix.train.evaluate import evaluate_reward
from rlprefix.prefixes.dynamic import is_input_conditioned
from rlprefix.freshness import (MARKERS_DIR, PPO_DIR, WARM_START_DIR, Stages, check_checkpoints, config_key, stage_keys)
from rlprefix.guards import assert_finite
from rlprefix.images import caption_records, open_encoder
from rlprefix.files import atomic_write_json, atomic_write_text, recover_artifact_dir
from rlprefix.lock import OutputLock
from rlprefix.prefixes.lowrank import anchor_mode
from rlprefix.models.loading import load_model
from rlprefix.prefixes.peft import export_peft
from rlprefix.preflight import (COMPRESSION_REPORT, CONFIG_FILE, CONFIG_HEADER, EXPORT_DIRS, PREFIX_DIRS, config_target,
                                preflight, remove_unowned)
from rlprefix.prefixes.prefix import Prefix
from rlprefix.train.scorer import Scorer
from rlprefix.seeds import derive_seed
from rlprefix.distributed.collectives import is_sharded
from rlprefix.train import ppo as ppo_stage, warm_start as warm_start_stage
from rlprefix.train.compress import compress_and_measure
from rlprefix.train.ppo import PPOConfig
from rlprefix.train.warm_start import WarmStartConfig
from rlprefix.summary import write_summary


def run(cfg: RunConfig, log=print, *, overwrite: bool = False) -> dict:
    """Run every enabled stage of `cfg`; returns the summary (also written to summary.json / summary.md).

    The output directory is locked for the whole run (a second run into it is refused), and every input
    is checked before the model is loaded. A path the run writes that holds something rlprefix did not write
    (preflight.run_outputs) is refused before anything is written, unless `overwrite` (then it is removed)."""
    dist = Dist.from_env()
    out = Path(cfg.output_dir)
    preflight(cfg, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out) if dist.is_main else contextlib.nullcontext():
        if overwrite and dist.is_main:
            remove_unowned(cfg, log)
        return _run(cfg, log, dist, out)


def _run(cfg: RunConfig, log, dist, out: Path) -> dict:
    """The steps of a run, in order; each returns what the next needs."""
    r = setup(cfg, log, dist, out)
    prefix = initial_prefix(r)
    eval_base(r)
    prefix = stage_warm_start(r, prefix)
    prefix = stage_ppo(r, rl_parameterisation(prefix, r.model, cfg.ppo))
    eval_after(r, prefix)
    final = stage_compress(r, prefix)
    export(r, prefix, final)
    return summarise(r)


# ---- what every step shares, and the one helper that runs a stage ---------------------------------------------
@dataclass
class Run:
    """What the steps of a run share: its config and directory, the model, the reward, every stage's key, and
    what the run has found so far (the summary, seconds per stage)."""
    cfg: RunConfig
    out: Path
    dist: Dist
    log: Callable[[str], Any]
    keys: dict                   # stage name -> key (freshness.stage_keys), plus the data's content hashes
    markers: Stages
    model: Any
    tok: Any
    raw_reward: Callable         # what PPO wraps in its own Scorer (clip, normalisation)
    reward: Scorer               # what evaluations score: the raw reward with the run's error policy
    ppo_cfg: PPOConfig
    data: dict                   # each stage's data as the stage takes it: the config's path, or image-caption rows
    eval_prompts: Any            # held-out prompts (default: the RL prompts); None: no evaluations
    eval_kw: dict                # sampling settings of every held-out evaluation
    summary: dict
    seconds: dict = field(default_factory=dict)


def stage(r: Run, name: str, key: str, compute: Callable[[], dict], reload: Callable[[], Any] | None = None):
    """One stage of the run, skipped when its marker says it finished with this `key`.

    Otherwise `compute()` runs it, saves what it made and returns what the marker records; the marker (with the
    stage's seconds) is written once every process is done. `reload()` then reads the stage's result back from
    what was saved, so a stage gives the same whether it ran now or in an earlier run.
    Returns (the marker's information, the result)."""
    marker = r.markers.done(name, key)
    if marker is None:
        t = time.perf_counter()
        info = compute()
        marker = r.markers.finish(name, key, {**info, "seconds": time.perf_counter() - t})
    if "seconds" in marker:
        r.seconds[name] = marker["seconds"]
    info = {k: v for k, v in marker.items() if k != "key"}
    return info, (reload() if reload else None)


def rl_parameterisation(prefix, model, ppo: PPOSection):
    """The one place that decides what is merged to plain K/V (outputs unchanged). RL trains plain K/V when
    `ppo.merge_prefix` (an `mlp` prefix from the warm start is merged first), else the prefix as it is; a low-rank
    prefix is always merged (its factors are not trained). Without RL, what is evaluated, compressed and exported
    is plain K/V. What RL returns is merged too (`plain_kv`)."""
    merge = ppo.merge_prefix if ppo.enabled else True
    return plain_kv(prefix, model) if merge or prefix.kind == "lowrank" else prefix


def plain_kv(prefix, model):
    """`prefix` as plain per-layer K/V, the same outputs."""
    return prefix if prefix.kind == "kv" or is_input_conditioned(prefix) else prefix.merge(model)


def new_prefix(section, model, tok, seed: int) -> Prefix:
    """A fresh prefix as the config's `prefix` section describes it (text or random init, any kind)."""
    kw = dict(mlp_hidden=section.mlp_hidden, shared_dim=section.shared_dim)
    if section.kind == "dynamic":
        kw = dict(bank_size=section.bank_size)
    if section.kind == "image":  # the encoder's feature size (the embedded CNN is trained at first use)
        kw = dict(form=section.form, encoder=section.encoder, basis=section.basis, hidden=section.mlp_hidden,
                  feature_dim=open_encoder(section.encoder).dim)
    if section.init == "text":
        return Prefix.from_text(model, tok, section.init_text, section.length, section.kind, **kw)
    return Prefix.for_model(model, section.length, section.kind, generator=torch.Generator().manual_seed(seed), **kw)


def resolve_device(name: str) -> str:
    """`model.device`: "auto" is cuda when there is one, else cpu; anything else as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def reward_names(cfg: RunConfig) -> list[str]:
    return [c.get("name") for c in cfg.reward.get("components", [])] or [cfg.reward["name"]]


def artifact_meta(r: Run) -> dict:
    """Provenance recorded in the manifests of the run's final artifacts."""
    return {"config_hash": config_key(r.cfg), "reward": reward_names(r.cfg), "model": r.cfg.model.name,
            "final_metrics": {k: r.summary.get("after", {}).get(k) for k in ("reward_mean", "kl_to_base")}}


# ---- setup: keys, the output directory, the model, the reward --------------------------------------------------
def setup(cfg: RunConfig, log, dist: Dist, out: Path) -> Run:
    """Stage keys; (main process) repair, resume checks and config.yaml of the output directory; the model and
    the reward."""
    ppo_cfg: PPOConfig = stage_config(cfg.ppo, PPOConfig)
    ppo_cfg.progress = cfg.logging.progress and cfg.ppo.progress
    eval_kw = dict(chat=ppo_cfg.chat, system=ppo_cfg.system, seed=derive_seed("run/eval", cfg.seed),
                   max_new_tokens=ppo_cfg.eval_max_new_tokens or ppo_cfg.max_new_tokens,
                   temperature=ppo_cfg.temperature, samples_per_prompt=cfg.ppo.eval_samples_per_prompt)
    keys, markers = stage_keys(cfg, eval_kw), Stages(out, dist)
    if dist.is_main:
        _recover_swaps(out)
        check_checkpoints(cfg, out, markers, keys)
        _write_config(out, cfg, log)
    dist.barrier()
    torch.manual_seed(cfg.seed)
    t = time.perf_counter()
    device = resolve_device(cfg.model.device)
    if dist.world_size > 1 and device == "cuda":
        device = f"cuda:{dist.rank % torch.cuda.device_count()}"
    model, tok = load_model(cfg.model.name, cfg.model.dtype, device, distributed=cfg.distributed, dist=dist)
    seconds = {"load_model": time.perf_counter() - t}
    held = " (sharded over processes, FSDP)" if is_sharded(model) else ""
    log(f"model {cfg.model.name} on {device}{held}: loaded in {seconds['load_model']:.1f}s")
    raw_reward = build_reward(cfg.reward, {"model": model, "tokenizer": tok, "device": device})
    reward = Scorer(raw_reward, on_error=cfg.ppo.on_reward_error, penalty=cfg.ppo.reward_penalty)
    summary = {"model": cfg.model.name, "reward": cfg.reward, "output_dir": str(out)}
    data = stage_data(cfg)
    return Run(cfg, out, dist, log, keys, markers, model, tok, raw_reward, reward, ppo_cfg, data, data["eval"],
               eval_kw, summary, seconds)


def stage_data(cfg: RunConfig) -> dict:
    """Each stage's data: the config's sources as they are, or, for an image prefix, image-caption specs
    (builtin:shapes, builtin:digits, a JSONL of {image, caption}) read as rows with the prefix's image prompt."""
    sources = {"ws_data": cfg.warm_start.data, "ws_eval": cfg.warm_start.eval_data, "prompts": cfg.ppo.prompts,
               "eval": cfg.ppo.eval_prompts or cfg.ppo.prompts}
    if cfg.prefix.kind != "image":
        return sources
    return {k: caption_records(v, cfg.prefix.image_prompt) if v else None for k, v in sources.items()}


def _recover_swaps(out: Path) -> None:
    """Finish any artifact swap a crash interrupted (see files.recover_artifact_dir), then remove the temporary
    files and directories a crash left behind (safe: this process holds the output directory's lock)."""
    for d in (out, out / WARM_START_DIR, out / PPO_DIR, out / MARKERS_DIR):
        names = {p.name.split(".")[1] for p in d.glob(".*.*")} if d.is_dir() else set()
        for name in names:
            if name:
                recover_artifact_dir(d / name)
        for tmp in d.glob(".*.tmp") if d.is_dir() else []:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _write_config(out: Path, cfg: RunConfig, log) -> None:
    """config.yaml, unless the user keeps a config.yaml of their own there (then config.rlprefix.yaml)."""
    path = config_target(out)
    if path != out / CONFIG_FILE:
        log(f"{out / CONFIG_FILE} was not written by rlprefix; keeping it and writing the run's config to {path}")
    atomic_write_text(path, CONFIG_HEADER + dump_config(cfg))


# ---- the steps of a run, in order ------------------------------------------------------------------------------
def initial_prefix(r: Run):
    """The starting prefix: a saved one (prefix.from_dir), the K/V of init_text, or random."""
    p = r.cfg.prefix
    if p.from_dir:
        prefix = load_prefix(p.from_dir, r.model)
        r.log(f"prefix loaded from {p.from_dir} ({prefix.kind}, length {prefix.length})")
        return prefix
    return new_prefix(p, r.model, r.tok, r.cfg.seed)


def held_out_eval(r: Run, name: str, prefix) -> dict | None:
    """Reward (and KL to the base model) of `prefix` (None: the base model) on the held-out prompts, as a stage;
    None when there are no held-out prompts."""
    if not r.eval_prompts:
        return None
    info, _ = stage(r, name, r.keys[name], lambda: evaluate_reward(
        r.model, r.tok, prefix, r.eval_prompts, r.reward, dist=r.dist, **r.eval_kw).as_dict(r.cfg.logging.samples))
    return {k: v for k, v in info.items() if k != "seconds"}


def eval_base(r: Run) -> None:
    """The frozen model without prefix on the held-out prompts: what every gain is measured from."""
    before = held_out_eval(r, "eval_base", None)
    if before:
        r.summary["before"] = before
        r.log(f"base model: mean reward {before['reward_mean']:.3f} on {before['n']} held-out samples")


def stage_warm_start(r: Run, prefix):
    """Stage 1, the supervised warm start; its best prefix is saved as prefix_warmstart. With RL after it, the
    held-out reward of the warm start alone, so the summary shows what RL adds on top."""
    cfg = r.cfg
    if not cfg.warm_start.enabled:
        return prefix

    def compute() -> dict:
        ws_cfg: WarmStartConfig = stage_config(cfg.warm_start, WarmStartConfig)
        ws_cfg.progress = cfg.logging.progress and cfg.warm_start.progress
        res = warm_start_stage.warm_start(r.model, r.tok, prefix, r.data["ws_data"], ws_cfg,
                                          eval_dataset=r.data["ws_eval"], output_dir=r.out / WARM_START_DIR,
                                          dist=r.dist, tensorboard=cfg.logging.tensorboard)
        assert_finite("warm-start prefix", res.steps_done,
                      *(res.prefix.parameters() if is_input_conditioned(res.prefix) else [res.prefix.key_values(r.model)]))
        if r.dist.is_main:
            res.prefix.save(r.out / PREFIX_DIRS["warm_start"], {"stage": "warm_start", "best_eval_loss": res.best_eval_loss,
                                                         "model": cfg.model.name})
        info = {"best_eval_loss": res.best_eval_loss, "best_step": res.best_step, "steps": res.steps_done}
        if res.forgetting:  # general-text perplexity of the best prefix with / without it (train.general_text)
            info["forgetting"] = {**res.forgetting, "data": cfg.warm_start.mix_data}
        if res.mixed:
            info["mixed"] = {"examples": res.mixed, "ratio": cfg.warm_start.mix_ratio, "data": cfg.warm_start.mix_data}
        return info

    info, prefix = stage(r, "warm_start", r.keys["warm_start"], compute,
                         lambda: load_prefix(r.out / PREFIX_DIRS["warm_start"], r.model))
    r.summary["warm_start"] = info
    r.log(f"warm start: best eval loss {info['best_eval_loss']:.3f} (step {info['best_step']})"
          + (f", general-text perplexity x{info['forgetting']['forgetting_ratio']:.3f} with the prefix"
             if "forgetting" in info else ""))
    if cfg.ppo.enabled:
        mid = held_out_eval(r, "eval_warm_start", prefix)
        if mid:
            r.summary["after_warm_start"] = mid
            r.log(f"after warm start: mean reward {mid['reward_mean']:.3f} +- {mid['reward_se']:.3f}")
    return prefix


def stage_ppo(r: Run, prefix):
    """Stage 2, RL; the trained prefix, as plain K/V, is saved as prefix_ppo."""
    cfg = r.cfg
    if not cfg.ppo.enabled:
        return prefix

    def compute() -> dict:
        res = ppo_stage.ppo(r.model, r.tok, prefix, r.data["prompts"], r.raw_reward, r.ppo_cfg,
                            eval_prompts=r.eval_prompts, output_dir=r.out / PPO_DIR, dist=r.dist,
                            tensorboard=cfg.logging.tensorboard)
        trained = plain_kv(res.prefix, r.model)
        assert_finite("PPO prefix", res.steps_done,
                      *(trained.parameters() if is_input_conditioned(trained) else [trained.key_values(r.model)]))
        last = res.history[-1] if res.history else {}
        if r.dist.is_main:
            trained.save(r.out / PREFIX_DIRS["ppo"], {"stage": "ppo", "reward": reward_names(cfg), "model": cfg.model.name,
                                                "final_reward": last.get("reward/mean")})
        return {"steps": res.steps_done, "final_train_reward": last.get("reward/mean"), "final_kl": last.get("kl"),
                "kl_coef": res.kl_coef}

    r.summary["ppo"], prefix = stage(r, "ppo", r.keys["ppo"], compute,
                                     lambda: load_prefix(r.out / PREFIX_DIRS["ppo"], r.model))
    return prefix


def eval_after(r: Run, prefix) -> None:
    """The final (uncompressed) prefix on the held-out prompts."""
    after = held_out_eval(r, "eval_after", prefix)
    if after:
        r.summary["after"] = after
        r.log(f"with prefix: mean reward {after['reward_mean']:.3f}, KL to base {after['kl_to_base']:.2f} nats/seq")


def stage_compress(r: Run, prefix):
    """Stage 3, low-rank compression, saved as prefix_compressed; returns what the exports use (the compressed
    prefix, or `prefix` without this stage)."""
    if not r.cfg.compress.enabled:
        return prefix
    info, final = stage(r, "compress", r.keys["compress"], lambda: compress_and_report(r, prefix),
                        lambda: load_prefix(r.out / PREFIX_DIRS["compress"], r.model))
    r.summary["compression"] = {k: v for k, v in info["report"].items() if k != "relative_error_per_layer"}
    return final


def compress_and_report(r: Run, prefix) -> dict:
    """The compression flow shared with `rlprefix compress` (train.compress.compress_and_measure): the KL budget
    searched with the run's chat settings and seed, the fidelity report sampled as the held-out evaluations (reward
    retained too, when both evaluations ran); both saved (main process)."""
    c, summary = r.cfg.compress, r.summary
    use_reward = c.eval_reward and "before" in summary and "after" in summary
    search_kw = dict(chat=r.ppo_cfg.chat, system=r.ppo_cfg.system, seed=r.cfg.seed,
                     max_new_tokens=r.eval_kw["max_new_tokens"])
    comp, report = compress_and_measure(
        r.model, r.tok, prefix, r.eval_prompts, rank=c.rank, energy=c.energy, max_kl=c.max_kl, scope=c.scope,
        anchor=anchor_mode(c.anchor), dtype=c.dtype, search_kw=search_kw, eval_kw=r.eval_kw,
        reward=r.reward if use_reward else None, base_reward=summary.get("before", {}).get("reward_mean"),
        full_reward=summary.get("after", {}).get("reward_mean"), log=r.log)
    if r.dist.is_main:
        fidelity = {k: v for k, v in report.items() if k != "relative_error_per_layer"}
        comp.save(r.out / PREFIX_DIRS["compress"], {**artifact_meta(r), "fidelity": fidelity})
        atomic_write_json(r.out / COMPRESSION_REPORT, report)
    return {"report": report}


def export(r: Run, prefix, final) -> None:
    """The export formats asked for (main process): the rlprefix artifact, a PEFT prefix-tuning adapter."""
    if not r.dist.is_main:
        return
    out, compressed, exports = r.out, r.cfg.compress.enabled, {}
    if "rlprefix" in r.cfg.export.formats:
        if not compressed:
            prefix.save(out / EXPORT_DIRS["rlprefix"], artifact_meta(r))
        exports["rlprefix"] = str(out / (PREFIX_DIRS["compress"] if compressed else EXPORT_DIRS["rlprefix"]))
    if "peft" in r.cfg.export.formats:
        exports["peft"] = str(export_peft(final, r.model, out / EXPORT_DIRS["peft"]))
    r.summary["exports"] = exports


def summarise(r: Run) -> dict:
    """summary.json and summary.md (main process); returns the summary."""
    if r.dist.is_main:
        r.summary["seconds"] = r.seconds
        r.log(f"summary: {write_summary(r.out, r.summary)}")
    return r.summary
