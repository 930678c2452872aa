"""RL step throughput: rlprefix PPO vs TRL 1.x GRPOTrainer with a PEFT prefix and with LoRA.

Same model, prompts (chat-templated), reward (VADER sentiment), completions per step and fixed completion
length (min_new_tokens = max_new_tokens). rlprefix runs twice: with one gradient step per batch, like TRL
GRPO's default, and with PPOConfig's default update schedule (several minibatches and epochs per batch). Each
method runs in its own process; we report steady-state completions per second of a whole training step (generation + scoring + reference + update, first step
excluded) and the process's peak resident memory. TRL runs with gradient checkpointing off (prefix tuning
crashes with it on) and beta=0.04, so like rlprefix it computes a KL reference (the adapter switched off).

    python benchmarks/ppo_vs_trl.py [--batch 16 --tokens 32 --steps 4]
    python benchmarks/ppo_vs_trl.py --device cuda --model-shape smollm2-135m   # on a GPU, random init
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

from common import ROOT, md_table, write_result

METHODS = ("rlprefix", "rlprefix-defaults", "trl-prefix", "trl-lora")
PROMPTS = str(ROOT / "examples" / "data" / "review_prompts.jsonl")
SHAPES = {  # real architectures, random init (for GPU runs where the real weights cannot travel)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=1e5),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True, rope_theta=1.3e5),
}


# Each method runs in a child process that imports only its own stack (rlprefix, or TRL + PEFT) inside the
# function that uses it, so its peak memory (ru_maxrss) measures that stack alone.
def load(args):
    from rlprefix import load_model

    if args.model_shape:
        from transformers import AutoModelForCausalLM, LlamaConfig

        from rlprefix.models.loading import freeze

        _, tok = load_model()  # tokenizer of the default model
        torch.manual_seed(0)
        cfg = LlamaConfig(**SHAPES[args.model_shape], max_position_embeddings=2048)
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(args.device)
        return freeze(model), tok
    return load_model(device=args.device)


def run_rlprefix(args) -> list[float]:
    from rewards import build_reward
    from rlprefix import PPOConfig, Prefix, ppo

    model, tok = load(args)
    prefix = Prefix.from_text(model, tok, "Write a warm, friendly and positive reply.", 16, "kv")
    times = []
    # "rlprefix": one gradient step per batch, like TRL's GRPO (num_iterations=1); "rlprefix-defaults":
    # PPOConfig's own update schedule (its epochs over minibatches), what a user gets without settings.
    matched = dict(minibatch_size=args.batch, epochs=1) if args.method == "rlprefix" else {}
    cfg = PPOConfig(steps=args.steps, batch_size=args.batch, max_new_tokens=args.tokens,
                    min_new_tokens=args.tokens, progress=False, **matched)
    last = [time.perf_counter()]

    def on_step(step, record):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    ppo(model, tok, prefix, PROMPTS, build_reward("sentiment"), cfg, on_step=on_step)
    return times


def run_trl(args, adapter: str) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig, PrefixTuningConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards import build_reward
    from rlprefix.train.data import load_records

    model, tok = load(args)
    model.requires_grad_(False)
    prompts = [[{"role": "user", "content": p}] for p in load_records(PROMPTS)["prompt"]]
    ds = Dataset.from_dict({"prompt": (prompts * 8)[: args.batch * (args.steps + 1)]})
    if adapter == "prefix":
        peft_cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16, prefix_projection=True,
                                      encoder_hidden_size=512)
    else:
        peft_cfg = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear")
    times, last = [], [0.0]

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            last[0] = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - last[0])

    on_gpu = args.device.startswith("cuda")
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch,
                     num_generations=min(8, args.batch), max_completion_length=args.tokens,
                     generation_kwargs={"min_new_tokens": args.tokens}, max_steps=args.steps, logging_steps=1,
                     report_to=[], use_cpu=not on_gpu, bf16=on_gpu, gradient_checkpointing=False,
                     save_strategy="no", beta=0.04, learning_rate=1e-3, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=[build_reward("sentiment")], args=cfg, train_dataset=ds,
                          processing_class=tok, peft_config=peft_cfg, callbacks=[Timer()])
    trainer.train()
    return times


def child(args) -> None:
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = run_trl(args, args.method.split("-")[1]) if args.method.startswith("trl") else run_rlprefix(args)
    steady = times[1:] or times
    out = {"method": args.method, "step_s": sum(steady) / len(steady), "steps_timed": len(steady),
           "completions_per_s": args.batch / (sum(steady) / len(steady)),
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if args.device.startswith("cuda"):
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=METHODS)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-shape", choices=sorted(SHAPES), default=None)
    args = ap.parse_args()
    if args.method:
        return child(args)
    rows = []
    for method in METHODS:
        cmd = [sys.executable, __file__, "--method", method] + [f"--{k.replace('_', '-')}={v}" for k, v in
                                                                vars(args).items() if k != "method" and v is not None]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            rows.append({"method": method, "error": (proc.stderr or proc.stdout)[-800:]})
            print(f"{method} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[7:]))
        print(rows[-1], flush=True)
    base = next((r for r in rows if r["method"] == "trl-prefix" and "error" not in r), None)
    for r in rows:
        if base and "error" not in r:
            r["speedup_vs_trl_prefix"] = r["completions_per_s"] / base["completions_per_s"]
            r["memory_vs_trl_prefix"] = r["peak_rss_gib"] / base["peak_rss_gib"]
    cols = [("method", "method"), ("completions_per_s", "completions/s"), ("speedup_vs_trl_prefix", "x TRL GRPO+prefix"),
            ("peak_rss_gib", "peak RSS GiB"), ("memory_vs_trl_prefix", "memory x TRL+prefix")]
    table = md_table(rows, cols)
    print(table)
    write_result(f"ppo_vs_trl_{args.device.split(':')[0]}_{args.model_shape or 'smollm2-135m-real'}",
                 {"settings": vars(args), "rows": rows, "table_md": table})


if __name__ == "__main__":
    main()
