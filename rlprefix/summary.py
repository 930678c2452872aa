"""summary.md: a short human-readable report of a run, from its summary (summary.json)."""
from __future__ import annotations

import json


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
        ws = s["warm_start"]
        lines += ["", f"- warm start: best eval loss {ws['best_eval_loss']:.3f} at step {ws['best_step']}"]
        if ws.get("mixed"):
            m = ws["mixed"]
            lines.append(f"- general text mixed into the warm start: {m['examples']} passages "
                         f"(mix_ratio {m['ratio']:g}, `{m['data']}`)")
        if ws.get("forgetting"):
            f = ws["forgetting"]
            lines.append(f"- forgetting (general-text perplexity, {f.get('passages')} held-out passages of "
                         f"`{f.get('data')}`): {f['general_ppl']:.2f} with the warm-start prefix vs "
                         f"{f['general_ppl_base']:.2f} without, ratio {f['forgetting_ratio']:.3f}")
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
