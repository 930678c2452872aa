"""`rlprefix run`: config -> model + prefix -> warm start -> PPO -> compression -> export -> summary.

Every stage writes into OUTPUT_DIR and leaves a marker in OUTPUT_DIR/stages/ when it finishes; rerunning
the same command skips finished stages and resumes an interrupted one from its checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rewards import Scorer, build_reward

from . import rl, warmstart
from .artifacts import load_prefix
from .config import RunConfig, dump_config, stage_config
from .distributed import Dist
from .freshness import check_resume, content_hash
from .guards import assert_finite
from .evaluate import evaluate_reward
from .io import atomic_write_json, atomic_write_text, read_json, recover_artifact_dir
from .lock import OutputLock
from .lowrank import compress, compress_to_budget, fidelity_report
from .modeling import load_model
from .peft_export import export_peft
from .preflight import preflight
from .prefix import Prefix
from .sharding import is_sharded
from .rl import PPOConfig
from .warmstart import WarmStartConfig

CONFIG_HEADER = "# written by `rlprefix run`: the configuration of the run in this directory\n"


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class Stages:
    """Markers of finished stages (JSON), keyed to the part of the config each stage depends on."""

    def __init__(self, out: Path, dist):
        self.dir, self.dist = out / "stages", dist

    def done(self, name: str, key: str) -> dict | None:
        path = self.dir / f"{name}.json"
        if not path.exists():
            return None
        marker = read_json(path)
        return marker if marker.get("key") == key else None

    def finish(self, name: str, key: str, info: dict) -> dict:
        marker = {"key": key, **info}
        if self.dist.is_main:
            atomic_write_json(self.dir / f"{name}.json", marker)
        self.dist.barrier()  # other processes may read what the main process wrote for this stage
        return marker


def rl_parameterisation(prefix, model, merge: bool):
    """The one place that decides what RL trains: plain K/V (merge=True; an `mlp` or low-rank prefix is merged,
    outputs unchanged) or the prefix as it is. A low-rank prefix is always merged (its factors are not trained)."""
    if prefix.kind == "lowrank" or (merge and prefix.kind not in ("kv",)):
        return prefix.merge(model)
    return prefix


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run(cfg: RunConfig, log=print) -> dict:
    """Run every enabled stage of `cfg`; returns the summary (also written to summary.json / summary.md).

    The output directory is locked for the whole run (a second run into it is refused), and every input
    is checked before the model is loaded."""
    dist = Dist.from_env()
    out = Path(cfg.output_dir)
    preflight(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out) if dist.is_main else contextlib.nullcontext():
        return _run(cfg, log, dist, out)


def _recover_swaps(out: Path) -> None:
    """Finish any artifact swap a crash interrupted (see io.recover_artifact_dir), then remove the temporary
    files and directories a crash left behind (safe: this process holds the output directory's lock)."""
    for d in (out, out / "warm_start", out / "ppo", out / "stages"):
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
    path = out / "config.yaml"
    if path.is_file() and not path.read_text(errors="replace").startswith(CONFIG_HEADER):
        path = out / "config.rlprefix.yaml"
        log(f"{out / 'config.yaml'} was not written by rlprefix; keeping it and writing the run's config to {path}")
    atomic_write_text(path, CONFIG_HEADER + dump_config(cfg))


def _check_checkpoints(cfg: RunConfig, out: Path, stages: "Stages", keys: dict, hashes: dict) -> None:
    """An unfinished stage may only resume a checkpoint written with the same settings and data
    (`hashes`: the content hash of each data source, computed once by the caller)."""
    skip = {"progress", "enabled", "steps", "checkpoint_every", "eval_every", "eval_prompts",
            "eval_samples_per_prompt", "eval_max_new_tokens", "log_every", "data", "eval_data", "prompts"}
    if cfg.warm_start.enabled and stages.done("warm_start", keys["ws"]) is None:
        parts = {f"warm_start.{k}": v for k, v in asdict(cfg.warm_start).items() if k not in skip - {"steps"}}
        parts.update({"warm_start.data (content)": hashes["ws_data"],
                      "warm_start.eval_data (content)": hashes["ws_eval"],
                      "starting prefix": keys["prefix"]})
        check_resume(out / "warm_start", out / "warm_start" / "checkpoint", parts, cfg.warm_start.steps,
                     "warm_start.steps", "warm start")
    if cfg.ppo.enabled and stages.done("ppo", keys["ppo"]) is None:
        parts = {f"ppo.{k}": v for k, v in asdict(cfg.ppo).items() if k not in skip}
        parts.update({"reward": cfg.reward, "ppo.prompts (content)": hashes["prompts"],
                      "starting prefix (warm start)": keys["ws"] if cfg.warm_start.enabled else keys["prefix"]})
        check_resume(out / "ppo", out / "ppo" / "ppo_checkpoint", parts, cfg.ppo.steps, "ppo.steps", "PPO")


def _run(cfg: RunConfig, log, dist, out: Path) -> dict:

    stages = Stages(out, dist)
    eval_prompts = cfg.ppo.eval_prompts or cfg.ppo.prompts
    hashes = {"ws_data": content_hash(cfg.warm_start.data), "ws_eval": content_hash(cfg.warm_start.eval_data),
              "prompts": content_hash(cfg.ppo.prompts)}
    eval_hash = hashes["prompts"] if eval_prompts == cfg.ppo.prompts else content_hash(eval_prompts)
    prefix_key = _key(asdict(cfg.prefix), cfg.model.name, cfg.seed, content_hash(cfg.prefix.from_dir))
    ws_key = _key(prefix_key, asdict(cfg.warm_start), hashes["ws_data"], hashes["ws_eval"])
    ppo_key = _key(ws_key if cfg.warm_start.enabled else prefix_key, asdict(cfg.ppo), cfg.reward, hashes["prompts"])
    if dist.is_main:
        _recover_swaps(out)
        _check_checkpoints(cfg, out, stages, {"prefix": prefix_key, "ws": ws_key, "ppo": ppo_key}, hashes)
        _write_config(out, cfg, log)
    dist.barrier()
    timings: dict[str, float] = {}
    torch.manual_seed(cfg.seed)

    t = time.perf_counter()
    device = _device(cfg.model.device)
    if dist.world_size > 1 and device == "cuda":
        device = f"cuda:{dist.rank % torch.cuda.device_count()}"
    model, tok = load_model(cfg.model.name, cfg.model.dtype, device, distributed=cfg.distributed, dist=dist)
    timings["load_model"] = time.perf_counter() - t
    held = " (sharded over processes, FSDP)" if is_sharded(model) else ""
    log(f"model {cfg.model.name} on {device}{held}: loaded in {timings['load_model']:.1f}s")
    raw_reward = build_reward(cfg.reward, {"model": model, "tokenizer": tok, "device": device})
    # evaluations score raw rewards with the run's error policy; PPO wraps raw_reward with its own clip/normalise
    reward = Scorer(raw_reward, on_error=cfg.ppo.on_reward_error, penalty=cfg.ppo.reward_penalty)
    reward_names = [c.get("name") for c in cfg.reward.get("components", [])] or [cfg.reward["name"]]
    ppo_cfg: PPOConfig = stage_config(cfg.ppo, PPOConfig)
    ppo_cfg.progress = cfg.logging.progress and cfg.ppo.progress
    eval_kw = dict(chat=ppo_cfg.chat, system=ppo_cfg.system, seed=cfg.seed + 12345,
                   max_new_tokens=ppo_cfg.eval_max_new_tokens or ppo_cfg.max_new_tokens,
                   temperature=ppo_cfg.temperature, samples_per_prompt=cfg.ppo.eval_samples_per_prompt)

    # --- the starting prefix ---
    if cfg.prefix.from_dir:
        prefix = load_prefix(cfg.prefix.from_dir, model)
        log(f"prefix loaded from {cfg.prefix.from_dir} ({prefix.kind}, length {prefix.length})")
    elif cfg.prefix.init == "text":
        prefix = Prefix.from_text(model, tok, cfg.prefix.init_text, cfg.prefix.length, cfg.prefix.kind,
                                  mlp_hidden=cfg.prefix.mlp_hidden)
    else:
        prefix = Prefix.for_model(model, cfg.prefix.length, cfg.prefix.kind, mlp_hidden=cfg.prefix.mlp_hidden,
                                  generator=torch.Generator().manual_seed(cfg.seed))

    def held_out_eval(name: str, key: str, with_prefix) -> dict | None:
        """Reward (and KL) on the held-out prompts, cached in a stage marker."""
        marker = stages.done(name, key) if eval_prompts else None
        if eval_prompts and marker is None:
            t = time.perf_counter()
            res = evaluate_reward(model, tok, with_prefix, eval_prompts, reward, dist=dist, **eval_kw)
            marker = stages.finish(name, key, res.as_dict(cfg.logging.samples))
            timings[name] = time.perf_counter() - t
        return {k: v for k, v in marker.items() if k != "key"} if marker else None

    # --- baseline: the frozen model without prefix on the held-out prompts ---
    summary: dict = {"model": cfg.model.name, "reward": cfg.reward, "output_dir": str(out)}
    base_key = _key(cfg.model.name, cfg.reward, eval_prompts, eval_kw, eval_hash, cfg.ppo.on_reward_error,
                    cfg.ppo.reward_penalty)
    before = held_out_eval("eval_base", base_key, None)
    if before:
        summary["before"] = before
        log(f"base model: mean reward {before['reward_mean']:.3f} on {before['n']} held-out samples")

    # --- stage 1: warm start ---
    if cfg.warm_start.enabled:
        marker = stages.done("warm_start", ws_key)
        if marker is None:
            t = time.perf_counter()
            ws_cfg: WarmStartConfig = stage_config(cfg.warm_start, WarmStartConfig)
            ws_cfg.progress = cfg.logging.progress and cfg.warm_start.progress
            res = warmstart.warm_start(model, tok, prefix, cfg.warm_start.data, ws_cfg,
                                       eval_dataset=cfg.warm_start.eval_data, output_dir=out / "warm_start",
                                       dist=dist, tensorboard=cfg.logging.tensorboard)
            prefix = res.prefix
            assert_finite("warm-start prefix", res.steps_done, prefix.key_values(model))
            if dist.is_main:
                prefix.save(out / "prefix_warmstart", {"stage": "warm_start", "best_eval_loss": res.best_eval_loss,
                                                       "model": cfg.model.name})
            timings["warm_start"] = time.perf_counter() - t
            marker = stages.finish("warm_start", ws_key, {
                "best_eval_loss": res.best_eval_loss, "best_step": res.best_step, "steps": res.steps_done,
                "seconds": timings["warm_start"]})
        else:
            prefix = load_prefix(out / "prefix_warmstart", model)
            timings["warm_start"] = marker.get("seconds", 0.0)
        summary["warm_start"] = {k: v for k, v in marker.items() if k != "key"}
        log(f"warm start: best eval loss {marker['best_eval_loss']:.3f} (step {marker['best_step']})")
        if cfg.ppo.enabled:  # what the warm start alone gives, so the summary shows what RL adds on top
            mid = held_out_eval("eval_warm_start", _key(ws_key, base_key), prefix)
            if mid:
                summary["after_warm_start"] = mid
                log(f"after warm start: mean reward {mid['reward_mean']:.3f} +- {mid['reward_se']:.3f}")
    prefix = rl_parameterisation(prefix, model, cfg.ppo.merge_prefix if cfg.ppo.enabled else True)

    # --- stage 2: PPO ---
    if cfg.ppo.enabled:
        marker = stages.done("ppo", ppo_key)
        if marker is None:
            t = time.perf_counter()
            res = rl.ppo(model, tok, prefix, cfg.ppo.prompts, raw_reward, ppo_cfg, eval_prompts=eval_prompts,
                      output_dir=out / "ppo", dist=dist, tensorboard=cfg.logging.tensorboard)
            prefix = res.prefix.merge(model) if res.prefix.kind != "kv" else res.prefix
            assert_finite("PPO prefix", res.steps_done, prefix.key_values(model))
            if dist.is_main:
                prefix.save(out / "prefix_ppo", {"stage": "ppo", "reward": reward_names, "model": cfg.model.name,
                                                 "final_reward": res.history[-1]["reward/mean"] if res.history else None})
            timings["ppo"] = time.perf_counter() - t
            last = res.history[-1] if res.history else {}
            marker = stages.finish("ppo", ppo_key, {"steps": res.steps_done, "final_train_reward": last.get("reward/mean"),
                                                    "final_kl": last.get("kl"), "kl_coef": res.kl_coef,
                                                    "seconds": timings["ppo"]})
        else:
            prefix = load_prefix(out / "prefix_ppo", model)
            timings["ppo"] = marker.get("seconds", 0.0)
        summary["ppo"] = {k: v for k, v in marker.items() if k != "key"}

    # --- after: the final prefix on the held-out prompts ---
    final_key = _key(ppo_key, cfg.ppo.enabled, ws_key, cfg.warm_start.enabled, base_key)
    after = held_out_eval("eval_after", final_key, prefix)
    if after:
        summary["after"] = after
        log(f"with prefix: mean reward {after['reward_mean']:.3f}, KL to base {after['kl_to_base']:.2f} nats/seq")

    # --- stage 3: compression + export ---
    meta = {"config_hash": _key(cfg.to_dict()), "reward": reward_names, "model": cfg.model.name,
            "final_metrics": {k: summary.get("after", {}).get(k) for k in ("reward_mean", "kl_to_base")}}
    final = prefix
    comp_key = _key(final_key, asdict(cfg.compress))
    if cfg.compress.enabled:
        marker = stages.done("compress", comp_key)
        if marker is None:
            t = time.perf_counter()
            c = cfg.compress
            fid_prompts = eval_prompts or cfg.ppo.prompts
            if c.rank is None and c.energy is None and c.max_kl is not None and fid_prompts:
                comp, trail = compress_to_budget(model, tok, prefix, fid_prompts, c.max_kl, c.scope,
                                                 anchor="auto" if c.anchor else False, dtype=c.dtype,
                                                 chat=ppo_cfg.chat, system=ppo_cfg.system, seed=cfg.seed,
                                                 max_new_tokens=eval_kw["max_new_tokens"])
                if trail and trail[-1].get("budget_met") is False:
                    log(f"compression: no rank met max_kl={c.max_kl}; kept rank {trail[-1]['rank']} "
                        f"(KL/token {trail[-1]['kl_per_token']:.4f})")
            else:
                comp = compress(prefix, rank=c.rank, energy=c.energy, scope=c.scope, model=model,
                                anchor="auto" if c.anchor else False, dtype=c.dtype)
                trail = []
            report = {"ranks_tried": trail}
            if fid_prompts:
                use_reward = c.eval_reward and "before" in summary and "after" in summary
                report.update(fidelity_report(
                    model, tok, prefix, comp, fid_prompts, reward if use_reward else None,
                    base_reward=summary.get("before", {}).get("reward_mean"),
                    full_reward=summary.get("after", {}).get("reward_mean"), **eval_kw))
            else:
                report.update(ranks=comp.ranks, compression_ratio=comp.compression_ratio())
            if dist.is_main:
                comp.save(out / "prefix_compressed", {**meta, "fidelity": {k: v for k, v in report.items()
                                                                            if k != "relative_error_per_layer"}})
                atomic_write_json(out / "compression_report.json", report)
            timings["compress"] = time.perf_counter() - t
            marker = stages.finish("compress", comp_key, {"report": report, "seconds": timings["compress"]})
        else:
            timings["compress"] = marker.get("seconds", 0.0)
        summary["compression"] = {k: v for k, v in marker["report"].items() if k != "relative_error_per_layer"}
        final = load_prefix(out / "prefix_compressed", model)

    if dist.is_main:
        exports = {}
        if "rlprefix" in cfg.export.formats:
            if not cfg.compress.enabled:
                prefix.save(out / "export_rlprefix", meta)
            exports["rlprefix"] = str(out / ("prefix_compressed" if cfg.compress.enabled else "export_rlprefix"))
        if "peft" in cfg.export.formats:
            exports["peft"] = str(export_peft(final, model, out / "export_peft"))
        summary["exports"] = exports
        summary["seconds"] = timings
        atomic_write_json(out / "summary.json", summary)
        atomic_write_text(out / "summary.md", render_summary(summary))
        log(f"summary: {out / 'summary.md'}")
    return summary


def render_summary(s: dict) -> str:
    """A short human-readable report of a run."""
    lines = [f"# rlprefix run: {s.get('output_dir')}", "", f"- model: `{s.get('model')}`",
             f"- reward: `{json.dumps(s.get('reward'))}`"]
    b, a = s.get("before"), s.get("after")
    rows = [("base model", b), ("after warm start", s.get("after_warm_start")),
            ("after RL" if "ppo" in s else "with prefix", a)]
    rows = [(name, r) for name, r in rows if r]
    if len(rows) > 1:
        lines += ["", "Held-out reward (mean +- standard error, the sampling noise of the evaluation):", "",
                  "| | mean reward | s.e. | gain over the row above | KL to base (nats/seq) |", "|---|---|---|---|---|"]
        prev = None
        for name, r in rows:
            se = r.get("reward_se", r["reward_std"] / max(r.get("n", 1), 1) ** 0.5)
            # the gain's noise: both evaluations' standard errors combined (conservative: they share seeds)
            gain = "" if prev is None else f"{r['reward_mean'] - prev[0]:+.3f} +- {(se ** 2 + prev[1] ** 2) ** 0.5:.3f}"
            lines.append(f"| {name} | {r['reward_mean']:.3f} | {se:.3f} | {gain} | {r.get('kl_to_base', 0.0):.2f} |")
            prev = (r["reward_mean"], se)
    if "warm_start" in s:
        lines += ["", f"- warm start: best eval loss {s['warm_start']['best_eval_loss']:.3f} "
                      f"at step {s['warm_start']['best_step']}"]
    if "ppo" in s:
        p = s["ppo"]
        lines += [f"- RL: {p['steps']} steps, last training reward {p.get('final_train_reward') or 0:.3f}, "
                  f"KL {p.get('final_kl') or 0:.2f} (curves: `ppo/ppo_curves.png`)"]
    c = s.get("compression")
    if c:
        line = (f"- compression ({c.get('scope', '')}): ranks {sorted(set(c.get('ranks', [])))}, "
                f"{c.get('compression_ratio', 0):.1f}x smaller")
        if "kl_per_token" in c:
            line += f", KL/token {c['kl_per_token']:.4f}"
        if c.get("reward_retained") is not None:
            line += f", reward gain retained {100 * c['reward_retained']:.0f}%"
        lines.append(line)
    if "seconds" in s:
        lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in s["seconds"].items()]
    for title, block in (("Samples before (base model)", b), ("Samples after (with prefix)", a)):
        if block and block.get("samples"):
            lines += ["", f"## {title}", ""]
            lines += [f"- ({x['reward']:+.2f}) **{x['prompt']}** {x['completion'].strip()}" for x in block["samples"]]
    if "exports" in s:
        lines += ["", "## Exports", ""] + [f"- {k}: `{v}`" for k, v in s["exports"].items()]
    return "\n".join(lines) + "\n"
