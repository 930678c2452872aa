"""summary.md: a short human-readable report of a run, from its summary (summary.json); and how a later run tells
the two files rlprefix wrote from a user's files of the same names (`is_own_summary`)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rlprefix.files import ArtifactError, atomic_write_json, atomic_write_text, read_json

SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"
# summary.json carries WRITTEN_BY; summary.md ends with a seal: an HTML comment (not shown) holding the digest of the
# text above it, so an edited summary.md is the user's. A summary.json of an rlprefix from before the field holds
# LEGACY_KEYS, and its summary.md the title render_summary writes.
WRITTEN_BY = {"written_by": "rlprefix run"}
SEAL = "<!-- written by rlprefix run; sha256 {} -->\n"
LEGACY_KEYS = {"model", "reward", "output_dir", "seconds"}
TITLE = "# rlprefix run: "


def write_summary(out: Path, s: dict) -> Path:
    """summary.json and summary.md of summary `s` into directory `out`, both marked as rlprefix's; returns summary.md."""
    atomic_write_json(out / SUMMARY_JSON, {**s, **WRITTEN_BY})
    md = render_summary(s)
    atomic_write_text(out / SUMMARY_MD, md + SEAL.format(_digest(md)))
    return out / SUMMARY_MD


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _json_summary(path: Path) -> str | None:
    """'sealed' (carries WRITTEN_BY), 'legacy' (an earlier rlprefix's) or None (not rlprefix's)."""
    try:
        obj = read_json(path) if path.is_file() else None
    except ArtifactError:
        return None
    if obj is None:
        return None
    if all(obj.get(k) == v for k, v in WRITTEN_BY.items()):
        return "sealed"
    return "legacy" if LEGACY_KEYS <= set(obj) and not set(WRITTEN_BY) & set(obj) else None


def is_own_summary(path: Path) -> bool:
    """Whether `path` (OUTPUT_DIR/summary.json or summary.md) is as rlprefix wrote it, so a run may replace it."""
    path = Path(path)
    if path.name == SUMMARY_JSON:
        return _json_summary(path) is not None
    if not path.is_file():
        return False
    text = path.read_bytes().decode("utf-8", errors="replace")
    body, _, seal = text[:-1].rpartition("\n")
    if text.endswith("\n") and seal + "\n" == SEAL.format(_digest(body + "\n")):
        return True
    earlier = text.startswith(TITLE) and SEAL.split(";")[0] not in text  # an earlier rlprefix's, never sealed
    return earlier and _json_summary(path.with_name(SUMMARY_JSON)) == "legacy"


def render_summary(s: dict) -> str:
    """A short human-readable report of a run."""
    lines = [f"{TITLE}{s.get('output_dir')}", "", f"- model: `{s.get('model')}`",
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
