"""Run every CPU benchmark in sequence (nothing else should run meanwhile: timings are ratios within a run)
and render benchmarks/results/RESULTS.md, which the README quotes.

    python benchmarks/run_all.py            # ~1 h on 2 cores
    python benchmarks/learning_vs_trl.py    # not in the list: hours on 2 cores (it can be run in parts)
    python benchmarks/run_all.py --render   # only re-render RESULTS.md from the JSON files
"""
from __future__ import annotations

import json
import subprocess
import sys

from common import RESULTS, ROOT, md_table
from rlprefix.files import atomic_write_text

STEPS = [
    ["benchmarks/warmstart_vs_peft.py"],
    ["benchmarks/prefix_kinds.py"],
    ["benchmarks/forgetting.py"],
    ["benchmarks/dynamic_prefix.py"],
    ["benchmarks/ppo_vs_trl.py", "--batch", "16", "--tokens", "32", "--steps", "4"],
    ["benchmarks/rollout_engine.py", "--prompts", "16", "--tokens", "16", "--repeats", "2", "--mixed-tokens", "8"],
    ["benchmarks/serve_load.py"],
    ["benchmarks/sentiment_demo.py"],
    ["benchmarks/compression_table.py", "runs/sentiment/prefix_ppo"],
    ["benchmarks/distributed_overhead.py"],
    ["benchmarks/fsdp_overhead.py"],
]


def rows_table(cols):
    """Body of a result stored without a ready table: its rows in the given columns."""
    return lambda r: md_table(r["rows"], cols)


def demo_body(d) -> str:
    warm = f" -> {d['reward_after_warm_start']:.3f} (warm start)" if d.get("reward_after_warm_start") else ""
    out = [f"`{d['command']}` (= `rlprefix run configs/sentiment.yaml`), {d['wall_s'] / 60:.1f} min: mean VADER "
           f"compound on {d['n_eval']} held-out samples **{d['reward_before']:.3f}{warm} -> {d['reward_after']:.3f}"
           f"**, KL to the base model {d['kl_after']:.1f} nats per completion.", ""]
    if d.get("ppo_curve"):
        out += ["| completions sampled | PPO batch reward | KL to reference |", "|---|---|---|"]
        out += [f"| {c['completions']} | {c['reward']:.3f} | {c['kl']:.2f} |" for c in d["ppo_curve"]]
    for title, key in (("Before (base model)", "samples_before"), ("After (with prefix)", "samples_after")):
        if d.get(key):
            out += ["", f"{title}:", ""] + [f"- ({x['reward']:+.2f}) {x['completion'].strip()}" for x in d[key]]
    return "\n".join(out)


def engine_body(d) -> str:
    gen = md_table(d["generation"], [("method", "method"), ("tokens_per_s", "tokens/s"),
                                     ("x_reference_wall", "x reference loop")])
    mixed = md_table(d["mixed_prefixes"], [("method", "method"), ("tokens_per_s", "tokens/s"),
                                           ("x_separate_wall", "x separate batches")])
    return gen + "\n" + mixed


# One entry per result file: (file name or glob, title, one line of settings, body). Each renders as a section
# "## title", the settings line with the command that produced it, then its table.
SECTIONS = [
    ("warmstart_vs_peft", lambda r: "Warm start: rlprefix vs PEFT prefix tuning (MLP reparameterisation)",
     lambda s: f"SmolLM2-135M-Instruct, {s['steps']} steps, batch {s['batch_size']}, lr {s['lr']}, prefix length "
               f"{s['length']}, MLP hidden {s['hidden']}, same micro-batches and schedule", None),
    ("prefix_kinds", lambda r: "Prefix parameterisations: kv vs mlp vs shared (same warm start)",
     lambda s: f"{s['model']}, prefix length {s['length']}, init {s['init']}, {s['steps']} steps, batch "
               f"{s['batch_size']}, lr {s['lr']}, same micro-batches and eval split", None),
    ("forgetting", lambda r: "Forgetting: general text mixed into the warm start",
     lambda s: f"{s['model']}, {s['kind']} prefix of length {s['length']} from text, the quickstart's warm-start "
               f"data, {s['steps']} steps, batch {s['batch_size']}, lr {s['lr']}; general text `{s['mix_data']}`, "
               f"{s['passages']} held-out passages", None),
    ("dynamic_prefix*", lambda r: "Input-conditioned (dynamic) prefix vs static kv prefixes" +
     (" (centred router)" if "centred" in r["command"] else ""),
     lambda s: f"{s['model']}, two styles told apart by the prompt ({s['train_rows']} training / {s['eval_rows']} "
               f"held-out rows), {s['steps']} steps, batch {s['batch_size']}, lr {s['lr']}", None),
    ("learning_vs_trl", lambda r: "Learning: held-out reward gain vs TRL GRPOTrainer (PEFT prefix, LoRA)",
     lambda s: f"real SmolLM2-135M, {s['budget']} sampled completions per run, {s['tokens']} new tokens, tasks "
               f"{', '.join(s['tasks'])}; one evaluator for all (PEFT adapter + transformers generate); rows from "
               "several invocations (`--report` re-renders); curves in learning_vs_trl.png", None),
    ("ppo_vs_trl_*", lambda r: f"RL step throughput vs TRL GRPOTrainer ({r['settings']['device']}, "
                               f"{r['settings']['model_shape'] or 'real SmolLM2-135M'})",
     lambda s: f"{s['batch']} completions x {s['tokens']} new tokens per step, steady state over {s['steps'] - 1} "
               "steps", None),
    ("rollout_engine_cpu", lambda r: "Rollout engine: generation throughput and mixed-prefix batches (CPU)",
     lambda s: f"{s['prompts']} prompts x {s['tokens']} tokens, best of {s['repeats']}; {s['mixed_rows']} rows x "
               f"{s['mixed_tokens']} tokens for 8 mixed prefixes", engine_body),
    ("serve_load_cpu", lambda r: "Serving under load: mixed prefixes in one running batch (CPU)",
     lambda s: "", rows_table([("mode", "mode"), ("clients", "clients"), ("requests_per_s", "req/s"),
                               ("p50_s", "p50 s"), ("p95_s", "p95 s")])),
    ("sentiment_demo", lambda r: "Sentiment demonstration (real default model, CPU)", None, demo_body),
    ("compression_table", lambda r: "Compression of the demonstration prefix",
     lambda s: "KL/token between next-token distributions of the full and compressed prefix along the full "
               "prefix's samples", lambda r: f"Base reward {r['base_reward']:.3f}, full prefix {r['full_reward']:.3f}."
                                             f"\n\n{r['table_md']}"),
    ("distributed_overhead", lambda r: "Data-parallel overhead (CPU, gloo)",
     lambda s: "PPO on the real default model, same global batch. Multi-GPU scaling was not measured: no "
               "multi-GPU machine was available", None),
    ("fsdp_overhead", lambda r: "Sharded base (FSDP2) vs replicated: per-step cost and memory (CPU, gloo)",
     lambda s: f"PPO on the real default model, same global batch, {s['threads']} threads in all. Memory columns: "
               "the largest value over a run's processes", None),
]


def section(r: dict, title, settings, body) -> list[str]:
    out = [f"## {title(r)}", ""]
    if settings is not None:
        line = settings(r.get("settings") or {})
        out += [(line + "; " if line else "") + f"`{r['command']}`", ""]
    return out + [(body(r) if body else r["table_md"]).rstrip(), ""]


def render() -> str:
    out = ["# Benchmark results", "", "Generated by `python benchmarks/run_all.py --render` from "
           "`benchmarks/results/*.json`; each section names the command that produced it.", ""]
    m = None
    for pattern, *parts in SECTIONS:
        for path in sorted(RESULTS.glob(f"{pattern}.json")):
            r = json.loads(path.read_text())
            m = m or r["machine"]
            out += section(r, *parts)
    if m:
        out += [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, threads {m['torch_threads']}, "
                f"GPU: {m['cuda'] or 'none'}; commit {m['commit']} (each JSON file records its own)."]
    text = "\n".join(out) + "\n"
    atomic_write_text(RESULTS / "RESULTS.md", text)
    return text


def main():
    if "--render" not in sys.argv:
        for step in STEPS:
            print("$ python " + " ".join(step), flush=True)
            subprocess.run([sys.executable] + step, cwd=ROOT, check=True)
    print(render())


if __name__ == "__main__":
    main()
