"""Does RL on a prefix learn? rlprefix's default RL config vs TRL GRPO + a PEFT prefix (and + LoRA), per sampled
completion, on tasks written for this benchmark (not the project's example data), judged by one evaluator
that neither side wrote.

Tasks (real default model, SmolLM2-135M-Instruct, chat template, no warm start):
  sentiment      VADER compound of a one-sentence review                       (range -1..1)
  sentiment_x10  the same reward times 10                                       (a user's reward has any scale)
  similarity     MiniLM cosine similarity to a fixed reference sentence         (range about 0..1)
  format         composite: 12 words +-6 (weight 1) + ends with '!' (weight 0.5) (range about -1..1.5)
  colour         1 if the text names a colour, else 0 (sparse: mostly 0 from the bare model)  (0 or 1)
  casual         a learned model: P(casual) from a logistic head on MiniLM embeddings, fit on 24 written
                 examples when built (`embedding_classifier`; deterministic, offline)  (range 0..1)
  sentiment_brief  VADER + 0.5 x length(5 words, tolerance 10): positive and short        (range -1.5..1.5)
Training and held-out prompts are disjoint (different topics).

Methods, each trained on the same number of sampled completions (--budget) with the same prompts:
  rlprefix       `PPOConfig()` defaults except steps (= budget / batch_size); a kv prefix of 16 tokens
                 initialised from a neutral sentence; reference = the bare model
  trl-prefix     TRL GRPOTrainer + PEFT PrefixTuningConfig(16 tokens), learning rate from --trl-lrs
                 (every lr on seed 0, the best per task chosen there and run on the other seeds; the table
                 reports the mean over seeds at that lr), gradient checkpointing off (prefix tuning needs it off)
  trl-lora       TRL GRPOTrainer + LoRA r16 all-linear, learning rate(s) from --lora-lrs

Evaluator (the same for every method): the trained adapter as a PEFT adapter (rlprefix via `export_peft`),
loaded with `PeftModel.from_pretrained`, sampled with transformers' `generate` at T=1 (top_k=0) with fixed
seeds on the held-out prompts. A prefix-tuning adapter is sampled through transformers' own `generate` with its
K/V in the cache (`rlprefix.generate_kwargs`): PEFT 0.21's `generate` ignores prefix adapters on transformers
>= 5.24 (docs/compatibility.md). Before scoring, the evaluator checks that the adapter reaches `generate` (first-step
logits differ from the bare model's beyond float noise) and refuses to score one that does not (except a LoRA
adapter whose B matrices are still exactly zero, which is the bare model and is scored as such); reward gain over
the bare model sampled the same way, KL to the bare model on the sampled tokens, wall-clock training time. Each (task, method, lr, seed) runs in its own process and is
stored in benchmarks/results/learning_vs_trl.json as it finishes, so the benchmark can be run in parts:

    python benchmarks/learning_vs_trl.py                                   # everything (hours on 2 CPU cores)
    python benchmarks/learning_vs_trl.py --tasks sentiment --methods rlprefix --seeds 0
    python benchmarks/learning_vs_trl.py --report                          # table + PNG from what is stored

Sample efficiency (issue #27): `--study sample_efficiency` runs every cell of the study: each task x {base,
rlprefix (PPOConfig() defaults as they are), rlprefix-prev (the defaults of 2026-12-05, pinned below; not run
while they equal today's), trl-prefix (lr in {1e-3, 3e-3, 1e-2}), trl-lora (lr in {1e-5, 1e-4, 1e-3})} x seeds
{0, 1}, 512 sampled completions per run, with the held-out reward of adapter snapshots taken in the same run at
64, 128, 256 and 512 completions (the evaluator above, on each snapshot). TRL's learning rates are swept on seed
0; the other seeds run at the lr with the largest area under the seed-0 curve. Study runs are stored under
`<task>/<method>/lr=<lr>/seed=<seed>/curve` beside the older runs; cells already stored are skipped (resumable),
so the study can be stopped and started again:

    python benchmarks/learning_vs_trl.py --study sample_efficiency --dry-run   # the cells, what is stored, time
    python benchmarks/learning_vs_trl.py --study sample_efficiency             # everything (many CPU hours)
    python benchmarks/learning_vs_trl.py --study sample_efficiency --tasks colour --seeds 0   # a part
    python benchmarks/learning_vs_trl.py --study sample_efficiency --report    # tables + curves PNG

Areas (gain over the bare model, the curve piecewise linear from (0, 0) through the snapshots): per completion,
the mean gain over the first 512 sampled completions; per second, the mean gain over the first T seconds of
training, T = the slowest compared run on that task, a run that finished earlier keeping its last adapter.
Curves: learning_vs_trl_curves.png (held-out reward vs completions and vs training seconds).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS, ROOT, machine, md_table, package_versions, write_result

TRAIN_TOPICS = ["a city park", "a train journey", "a bakery", "a rainy weekend", "a museum", "a laptop", "a beach",
                "a hiking trail", "a concert", "a library", "a coffee machine", "a bicycle", "a hotel room",
                "a football match", "a garden", "a video game", "a street market", "a ferry ride", "a dentist visit",
                "a new phone", "a ski resort", "a bookshop", "a pizza place", "a zoo", "a cooking class",
                "a camping trip", "a yoga class", "a shopping mall", "a taxi ride", "a theme park", "a podcast",
                "a winter coat"]
HELDOUT_TOPICS = ["an airport", "a swimming pool", "a farmers' market", "a jazz club", "a science fair",
                  "a boat tour", "a tea shop", "a cinema", "a desk lamp", "a road trip", "a bowling alley",
                  "a vegetable soup", "a running shoe", "a botanical garden", "a night bus", "a board game"]
TEMPLATES = {
    "review": "Write a one-sentence review of {}.",
    "describe": "Describe {} in one sentence.",
}
TASKS = {
    "sentiment": {"template": "review", "reward": {"name": "sentiment"}},
    "sentiment_x10": {"template": "review", "reward": {"name": "sentiment"}, "scale": 10.0},
    "similarity": {"template": "describe",
                   "reward": {"name": "similarity", "reference": "It is calm, quiet and peaceful here."}},
    "format": {"template": "describe", "reward": {"name": "composite", "components": [
        {"name": "length", "target": 12, "tolerance": 6, "weight": 1.0},
        {"name": "regex", "patterns": {r"!\s*$": 1.0}, "weight": 0.5}]}},
    # written for #27: a sparse 0/1 reward, a learned-model reward, a length-penalised one
    "colour": {"template": "describe", "reward": {"name": "regex", "flags": "i", "patterns": {
        r"\b(red|orange|yellow|green|blue|purple|violet|pink|brown|black|white|grey|gray|golden|silver)\b": 1.0}}},
    "casual": {"template": "review", "reward": {"name": "embedding_classifier", "target": "casual", "examples": {
        "casual": ["honestly this place is awesome, loved it!", "yeah it was fine i guess, nothing crazy",
                   "omg the coffee here is sooo good", "lol the bus was late again but whatever",
                   "super chill spot, def coming back", "ngl the pizza kinda slaps",
                   "tbh i didn't expect much but wow", "gonna be real, the room was tiny haha",
                   "this game is so much fun, can't stop playing", "meh, it's ok but kinda pricey",
                   "dude the view was unreal", "pretty cool place, my kids loved it"],
        "formal": ["The establishment offers a commendable selection of beverages.",
                   "The museum presents a comprehensive overview of regional history.",
                   "Service was prompt, and the staff conducted themselves professionally.",
                   "The hotel room was clean, adequately furnished and well maintained.",
                   "The concert demonstrated considerable technical proficiency.",
                   "This device performs reliably under typical operating conditions.",
                   "The journey was punctual and the carriages were comfortable.",
                   "The park provides well-maintained facilities for visitors of all ages.",
                   "Overall, the experience met the expectations set by its reputation.",
                   "The menu is varied, although prices are somewhat above average.",
                   "The exhibition is thoughtfully curated and informative.",
                   "The facility is accessible and conveniently located near public transport."]}}},
    "sentiment_brief": {"template": "review", "reward": {"name": "composite", "components": [
        {"name": "sentiment", "weight": 1.0},
        {"name": "length", "target": 5, "tolerance": 10, "weight": 0.5}]}},
}
INIT_TEXT = "Here is my answer."
PREFIX_LENGTH = 16  # positions of both prefix peers (rlprefix's and TRL + PEFT's); --prefix-length: rlprefix only
# issue #27: the cells of the sample-efficiency study (see the docstring)
STUDY = {"checkpoints": [64, 128, 256, 512],
         "lrs": {"trl-prefix": [1e-3, 3e-3, 1e-2], "trl-lora": [1e-5, 1e-4, 1e-3]}}
LORA_LR = 1e-4  # trl-lora's rate outside the study (the headline table's)
CURVE = "/curve"  # key suffix of a run with held-out snapshots


def run_key(task: str, method: str, lr, seed: int, suffix: str = "", curve: bool = True) -> str:
    """The one spelling of a stored run's key: `<task>/<method>/lr=<lr>/seed=<seed><suffix>[/curve]` (suffix: --tag
    and "-fp32", see run_suffix; /curve: a run with held-out snapshots). The base model's key has no /curve."""
    return f"{task}/{method}/lr={lr}/seed={seed}{suffix}{CURVE if curve else ''}"


# rlprefix's PPOConfig() defaults on 2026-12-05 (every field that decides learning), run as "rlprefix-prev"
PREVIOUS_DEFAULTS = {
    "batch_size": 32, "group_size": 4, "minibatch_size": 8, "epochs": 1, "lr": 1e-2, "advantage": "rloo",
    "value_lr": 1e-3, "min_new_tokens": 0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "gamma": 1.0, "lam": 0.95,
    "clip_range": 0.2, "clip_range_value": 0.2, "vf_coef": 0.5, "ent_coef": 0.0, "whiten_advantages": True,
    "max_grad_norm": 1.0, "target_kl_stop": 0.1, "kl_coef": 0.05, "kl_penalty": "loss", "kl_target": None,
    "kl_horizon": 10000, "reference": "base", "reward_clip": None, "reward_normalize": True,
    "on_reward_error": "raise", "reward_penalty": -1.0, "value_hidden": 256}
# assumed where no run has recorded them yet (the dry run says which figures are assumed)
GUESS = {"eval_s": 60.0, "overhead_s": 30.0}


def prompts(task: str, split: str) -> list[str]:
    topics = TRAIN_TOPICS if split == "train" else HELDOUT_TOPICS
    return [TEMPLATES[TASKS[task]["template"]].format(t) for t in topics]


# Each run is a child process that imports only its own method's stack (rlprefix, or TRL + PEFT) inside the
# function that uses it; the parent only schedules children and writes the report.
def build_task_reward(task: str, model=None, tok=None):
    from rewards import build_reward

    spec = TASKS[task]
    base = build_reward(spec["reward"], {"model": model, "tokenizer": tok, "device": "cpu"})
    scale = spec.get("scale", 1.0)
    if scale == 1.0:
        return base

    def scaled(prompts, completions, **kw):
        return [None if v is None else scale * v for v in base(prompts=prompts, completions=completions, **kw)]

    scaled.__name__ = f"{task}"
    return scaled


# ---- training (one process per run) --------------------------------------------------------------------------
class Snapshots:
    """Adapter copies at given counts of sampled completions (the first step that reaches each count), with the
    training seconds so far; the time spent writing them is not training time."""

    def __init__(self, counts: list[int], root: Path, t0: float):
        self.todo, self.root, self.t0, self.paused, self.taken = sorted(counts), root, t0, 0.0, []

    def after_step(self, completions: int, save) -> None:
        if not self.todo or completions < self.todo[0]:
            return
        t = time.perf_counter()
        while self.todo and completions >= self.todo[0]:
            self.todo.pop(0)
        path = self.root / f"completions={completions}"
        save(path)
        self.taken.append({"completions": completions, "train_seconds": t - self.t0 - self.paused, "dir": str(path)})
        self.paused += time.perf_counter() - t


def train_rlprefix(args, model, tok, reward, adapter_dir: Path, snaps: Snapshots) -> dict:
    from rlprefix import PPOConfig, Prefix, export_peft, ppo
    from rlprefix.train.ppo import learning_rate

    cfg = PPOConfig(seed=args.seed, max_new_tokens=args.tokens, progress=False)
    overrides = dict(PREVIOUS_DEFAULTS) if args.method == "rlprefix-prev" else {}
    for kv in args.set or []:  # ablations: --set key=value on PPOConfig
        k, _, v = kv.partition("=")
        overrides[k] = type(getattr(cfg, k))(json.loads(v)) if getattr(cfg, k) is not None else json.loads(v)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if "steps" not in overrides:
        cfg.steps = max(1, args.budget // cfg.batch_size)
    prefix = Prefix.from_text(model, tok, INIT_TEXT, args.prefix_length, "kv")
    cfg.lr = learning_rate(cfg, prefix)  # ppo.lr: null is the kind's lr: the run records the value it used

    def on_step(step, record):
        snaps.after_step(step * cfg.batch_size, lambda path: export_peft(prefix, model, path))

    res = ppo(model, tok, prefix, prompts(args.task, "train"), reward, cfg, on_step=on_step)
    export_peft(res.prefix, model, adapter_dir)
    return {"completions": cfg.steps * cfg.batch_size, "train_curve": [h["reward/mean"] for h in res.history],
            "config": {k: getattr(cfg, k) for k in ("advantage", "lr", "batch_size", "group_size", "kl_coef",
                                                    "epochs", "steps")},
            "ppo_config": {k: getattr(cfg, k) for k in PREVIOUS_DEFAULTS}, "prefix_length": args.prefix_length,
            # per step: did the KL early stop cut the update, and how far each update moved (the trust region's work)
            "update_stats": {k: [h.get(f"policy/{k}") for h in res.history]
                             for k in ("early_stopped", "approx_kl", "clipfrac")}}


def train_trl(args, model, tok, reward, adapter_dir: Path, adapter: str, snaps: Snapshots) -> dict:
    from datasets import Dataset
    from peft import LoraConfig, PrefixTuningConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model.requires_grad_(False)
    batch, k = 16, 4  # completions per step and per prompt (GRPO's group)
    steps = max(1, args.budget // batch)
    train = prompts(args.task, "train")
    rng = random.Random(args.seed)
    order = []
    while len(order) < steps * batch // k:
        order += rng.sample(train, len(train))
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in order]})
    if adapter == "prefix":
        peft_cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_LENGTH)
    else:
        peft_cfg = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear")
    curve = []

    class Log(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                curve.append(logs["reward"])

        def on_step_end(self, _args, state, control, model=None, **kw):
            snaps.after_step(state.global_step * batch, lambda path: model.save_pretrained(str(path)))

    def reward_fn(prompts, completions, **kw):  # TRL passes chat messages; the reward reads the text
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        plain = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        return reward(prompts=plain, completions=texts)

    reward_fn.__name__ = args.task
    # GRPOConfig's own defaults otherwise, bf16 included (TRL turns it on unless fp16 is set): every stored TRL run
    # trained under bf16 autocast. On a CPU without AVX512-BF16 its matmuls take torch's generic gemm, 17-21x slower
    # (casual, sentiment, sentiment_brief at lr 1e-3: 2,750-3,400 s of training against 150-170 s for the other
    # tasks' cells on a CPU with it)
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, num_generations=k,
                     max_completion_length=args.tokens, max_steps=steps, logging_steps=1, report_to=[],
                     use_cpu=True, gradient_checkpointing=False, save_strategy="no", learning_rate=args.lr,
                     temperature=1.0, top_k=0, top_p=1.0, disable_tqdm=True, seed=args.seed, shuffle_dataset=False,
                     bf16=False if args.trl_fp32 else None)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_fn], args=cfg, train_dataset=ds, processing_class=tok,
                          peft_config=peft_cfg, callbacks=[Log()])
    trainer.train()
    trainer.model.save_pretrained(str(adapter_dir))
    return {"completions": steps * batch, "train_curve": curve,
            "config": {"lr": args.lr, "beta": cfg.beta, "batch": batch, "k": k, "steps": steps,
                       "lr_scheduler": str(cfg.lr_scheduler_type), "bf16": cfg.bf16}}


# ---- the independent evaluator -------------------------------------------------------------------------------
NOISE = 1e-4  # first-step logits within this of the bare model's: the adapter does not reach generate


class Refused(SystemExit):
    """The evaluator will not score this adapter (uncaught, the process exits with the reason, as before)."""


def adapter_sampler(model, adapter_dir: Path | None):
    """(generate(enc, **kw) -> (full sequences, prompt width), the PEFT model or None). A prefix-tuning adapter goes
    through transformers' generate with its K/V in the cache; any other adapter through `PeftModel.generate`."""
    from peft import PeftModel

    from rlprefix import generate_kwargs
    from rlprefix.prefixes.peft import load_peft_kv

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir)) if adapter_dir else None
    is_prefix = adapter_dir is not None and json.loads((adapter_dir / "adapter_config.json").read_text()).get(
        "peft_type") == "PREFIX_TUNING"
    kv = load_peft_kv(adapter_dir, model) if is_prefix else None

    def generate(enc, **kw):
        if kv is None:
            return (peft_model or model).generate(**enc, **kw), enc["input_ids"].shape[1]
        gkw = generate_kwargs(kv, model, enc["input_ids"], enc["attention_mask"])  # PEFT leaves `model` as it was
        return model.generate(**gkw, **kw), gkw["input_ids"].shape[1]
    return generate, peft_model


def identity_adapter(adapter_dir: Path) -> bool:
    """A LoRA adapter whose B matrices are all exactly zero (as initialised: e.g. every reward so far tied within its
    group, so no gradient) is the bare model: sampling it as the bare model is right, not a route that ignores it."""
    from safetensors.torch import load_file

    if json.loads((adapter_dir / "adapter_config.json").read_text()).get("peft_type") != "LORA":
        return False
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return any("lora_B" in k for k in tensors) and all(not t.any() for k, t in tensors.items() if "lora_B" in k)


@torch.no_grad()
def evaluate(model, tok, reward, task: str, adapter_dir: Path | None, tokens: int, samples: int = 4) -> dict:
    """The adapter (or none) + transformers generate at T=1, fixed seeds; reward and KL to the bare model."""
    held = prompts(task, "heldout")
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in held]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    first_step = dict(do_sample=False, max_new_tokens=1, output_logits=True, return_dict_in_generate=True,
                      pad_token_id=tok.pad_token_id)
    # the bare model's first step, before PEFT wraps the model (LoRA injects its layers in place)
    bare_logits = model.generate(**enc, **first_step).logits[0] if adapter_dir is not None else None
    generate, peft_model = adapter_sampler(model, adapter_dir)
    change = None
    if adapter_dir is not None:
        first = generate(enc, **first_step)[0].logits[0]
        change = float((first - bare_logits).abs().max())
        if change < NOISE and not identity_adapter(adapter_dir):
            raise Refused(f"evaluator: the adapter in {adapter_dir} changes nothing in generate (first-step "
                             f"logits within {change:.1e} of the bare model's); refusing to score it")
    rewards, kls = [], []
    for s in range(samples):
        torch.manual_seed(1000 + s)
        out, width = generate(enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=tokens,
                              pad_token_id=tok.pad_token_id, output_scores=False, return_dict_in_generate=True)
        comp = out.sequences[:, width:]
        seq = torch.cat([enc["input_ids"], comp], 1)
        completions = tok.batch_decode(comp, skip_special_tokens=True)
        values = reward(prompts=held, completions=completions)
        rewards += [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if peft_model is not None:  # KL(policy || base) on the sampled tokens (PEFT's forward applies any adapter)
            attn = (seq != tok.pad_token_id).long()
            attn[:, :enc["input_ids"].shape[1]] = enc["attention_mask"]
            cmask = attn[:, enc["input_ids"].shape[1]:].float()

            def token_logprobs(m):
                logits = m(input_ids=seq, attention_mask=attn).logits[:, enc["input_ids"].shape[1] - 1:-1].float()
                return torch.log_softmax(logits, -1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)

            lp_policy = token_logprobs(peft_model)
            with peft_model.disable_adapter():
                lp_base = token_logprobs(peft_model)
            kls += ((lp_policy - lp_base) * cmask).sum(1).tolist()
    if peft_model is not None:
        peft_model.unload() if hasattr(peft_model, "unload") else None
    n = len(rewards)
    mean = sum(rewards) / n
    sd = (sum((r - mean) ** 2 for r in rewards) / max(n - 1, 1)) ** 0.5
    return {"reward": mean, "reward_se": sd / n ** 0.5, "n": n, "kl": sum(kls) / len(kls) if kls else 0.0,
            "first_step_logit_change": change, "example": completions[0],
            **({"identity_adapter": True} if change is not None and change < NOISE else {})}


def evaluate_snapshots(tok, reward, args, taken: list[dict]) -> list[dict]:
    """The evaluator on each snapshot, each on a freshly loaded model; a refused snapshot is kept as refused."""
    from rlprefix import load_model

    points = []
    for snap in taken:
        model, tok = load_model()  # a clean copy each time (LoRA is injected in place)
        point = {k: v for k, v in snap.items() if k != "dir"}
        try:
            point.update(evaluate(model, tok, reward, args.task, Path(snap["dir"]), args.tokens))
        except Refused as e:
            point["refused"] = str(e)
        points.append(point)
    return points


def child(args) -> None:
    from rlprefix import load_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = load_model()
    reward = build_task_reward(args.task, model, tok)
    if args.method == "base":
        t0 = time.perf_counter()
        result = evaluate(model, tok, reward, args.task, None, args.tokens)
        print("RESULT " + json.dumps({**result, "eval_seconds": time.perf_counter() - t0, "evaluations": 1}),
              flush=True)
        return
    adapter_dir = Path(tempfile.mkdtemp()) / "adapter"
    try:
        info = train_and_evaluate(args, model, tok, reward, adapter_dir)
    finally:  # adapters and snapshots (a LoRA snapshot is ~20 MB; the study takes hundreds)
        shutil.rmtree(adapter_dir.parent, ignore_errors=True)
    print("RESULT " + json.dumps(info), flush=True)


def train_and_evaluate(args, model, tok, reward, adapter_dir: Path) -> dict:
    from rlprefix import load_model

    t0 = time.perf_counter()
    snaps = Snapshots(args.checkpoints or [], adapter_dir.parent / "snapshots", t0)
    if args.method.startswith("rlprefix"):
        info = train_rlprefix(args, model, tok, reward, adapter_dir, snaps)
    else:
        info = train_trl(args, model, tok, reward, adapter_dir, args.method.split("-")[1], snaps)
    info["train_seconds"] = time.perf_counter() - t0 - snaps.paused
    t1 = time.perf_counter()
    if args.checkpoints:
        info["curve"] = evaluate_snapshots(tok, reward, args, snaps.taken)
        last = info["curve"][-1]
        if "refused" in last:
            raise SystemExit(last["refused"])
        info.update({k: v for k, v in last.items() if k not in ("completions", "train_seconds")})
    else:
        model, tok = load_model()  # a clean copy for the evaluator (TRL wraps the model it trained)
        info.update(evaluate(model, tok, reward, args.task, adapter_dir, args.tokens))
    info["eval_seconds"] = time.perf_counter() - t1
    info["evaluations"] = len(info.get("curve", [None]))
    return info


# ---- orchestration and report --------------------------------------------------------------------------------
def out_path(name: str) -> Path:
    return RESULTS / f"{name}.json"


def load_results(name: str) -> dict:
    return json.loads(out_path(name).read_text()) if out_path(name).exists() else {}


def store(new: dict, args) -> dict:
    """Add the `new` runs to what the file holds now (another invocation may have added runs meanwhile) and write it
    atomically; stored runs are replaced only by a run of the same key (--rerun). Returns every run."""
    old = load_results(args.name)
    runs = {**old.get("runs", {}), **new}
    settings = old.get("settings") or {}
    if not args.study:  # the tasks of the first table (the study's are in its own settings)
        settings = {"budget": args.budget, "tokens": args.tokens, "init_text": INIT_TEXT, "tasks": {
            t: spec for t, spec in TASKS.items() if any(r["task"] == t and "curve" not in r for r in runs.values())}}
    table, best = report(runs)
    study = old.get("sample_efficiency")
    if args.study or study or any("curve" in r for r in runs.values()):
        study = study_payload(runs, args if args.study else None, (study or {}).get("settings"))
    write_result(args.name, {"settings": settings, "runs": runs, "summary": best, "table_md": table,
                             **({"sample_efficiency": study} if study else {})})
    return runs


def report(runs: dict) -> tuple[str, list[dict]]:
    """One row per task and method: the mean over seeds of held-out gain over the base (TRL: best lr). Runs of the
    sample-efficiency study (with a curve) have their own report (`curve_report`)."""
    rows = []
    runs = {k: r for k, r in runs.items() if "curve" not in r}
    for task in TASKS:
        base = [r for k, r in runs.items() if r["task"] == task and r["method"] == "base"]
        if not base:
            continue
        b = base[0]["reward"]
        methods = sorted({r["method"] for r in runs.values() if r["method"] != "base"})
        for method in methods:
            by_lr: dict[str, list[dict]] = {}
            for r in runs.values():
                if r["task"] == task and r["method"] == method and "reward" in r:
                    by_lr.setdefault(str(r.get("lr", "default")), []).append(r)
            if not by_lr:
                continue
            # the learning rate is chosen on seed 0 (the sweep runs every lr on seed 0, further seeds at the chosen
            # one); the row then reports every seed run at that lr, so a lucky seed-0 lr is not double-counted
            def sweep_score(kv):
                s0 = [r["reward"] for r in kv[1] if r["seed"] == 0] or [r["reward"] for r in kv[1]]
                return sum(s0) / len(s0)

            lr, rs = max(by_lr.items(), key=sweep_score)
            gain = sum(r["reward"] - b for r in rs) / len(rs)
            se = max(r["reward_se"] for r in rs)
            secs = sum(r["train_seconds"] / r["completions"] for r in rs) / len(rs)
            rows.append({"task": task, "method": method, "lr": lr, "seeds": len(rs), "base": b,
                         "heldout_reward": b + gain, "gain": gain, "se": se,
                         "kl": sum(r["kl"] for r in rs) / len(rs), "s_per_completion": secs,
                         "completions": rs[0]["completions"]})
    cols = [("task", "task"), ("method", "method"), ("lr", "lr"), ("seeds", "seeds"), ("completions", "completions"),
            ("base", "base reward"), ("heldout_reward", "held-out reward"), ("gain", "gain"),
            ("se", "s.e."), ("kl", "KL to base"), ("s_per_completion", "train s/completion")]
    return md_table(rows, cols), rows


def plot(runs: dict, name: str) -> None:
    import matplotlib  # the report only
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: r for k, r in runs.items() if "curve" not in r}
    tasks = [t for t in TASKS if any(r["task"] == t and "train_curve" in r for r in runs.values())]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for key, r in sorted(runs.items()):
            if r["task"] != task or "train_curve" not in r:
                continue
            per_step = r["completions"] / max(len(r["train_curve"]), 1)
            xs = [per_step * (i + 1) for i in range(len(r["train_curve"]))]
            line, = ax.plot(xs, r["train_curve"], label=f"{r['method']} lr={r.get('lr') or 'default'} s{r['seed']}")
            ax.scatter([r["completions"]], [r["reward"]], marker="*", s=80, color=line.get_color())
        ax.set_title(task)
        ax.set_xlabel("completions sampled")
        ax.set_ylabel("reward (line: train batch, star: held-out)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)


# ---- sample efficiency (#27): areas under held-out curves --------------------------------------------------------
def area(xs: list[float], ys: list[float], horizon: float) -> float:
    """The mean of y over [0, horizon], y piecewise linear from (0, 0) through the points (xs, ys) and held at its
    last value past the last point (cut at horizon)."""
    pts = [(0.0, 0.0)] + sorted(zip(map(float, xs), map(float, ys)))
    total = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 >= horizon:
            break
        if x1 > horizon:
            x1, y1 = horizon, y0 + (y1 - y0) * (horizon - x0) / (x1 - x0)
        total += (x1 - x0) * (y0 + y1) / 2
    if pts[-1][0] < horizon:
        total += (horizon - pts[-1][0]) * pts[-1][1]
    return total / horizon


def complete(r: dict) -> bool:
    return bool(r.get("curve")) and all("reward" in p for p in r["curve"])


def auc_completions(r: dict, base: float) -> float:
    """Gain over the base per sampled completion: the mean gain over the run's budget of completions."""
    pts = r["curve"]
    return area([p["completions"] for p in pts], [p["reward"] - base for p in pts], r.get("budget") or
                pts[-1]["completions"])


def auc_seconds(r: dict, base: float, horizon: float) -> float:
    """Gain over the base per second of training: the mean gain over the first `horizon` seconds."""
    pts = r["curve"]
    return area([p["train_seconds"] for p in pts], [p["reward"] - base for p in pts], horizon)


def base_reward(runs: dict, task: str) -> float | None:
    return next((r["reward"] for r in runs.values() if r["task"] == task and r["method"] == "base"), None)


def curve_runs(runs: dict, task: str, method: str) -> dict[str, list[dict]]:
    """The study's runs of one task and method by learning rate (str), complete curves only."""
    by_lr: dict[str, list[dict]] = {}
    for r in runs.values():
        if r["task"] == task and r["method"] == method and complete(r):
            by_lr.setdefault(str(r["lr"]), []).append(r)
    return by_lr


def choose_lr(by_lr: dict[str, list[dict]], base: float) -> tuple[str, list[dict]]:
    """The lr with the largest area per completion on seed 0 (any seed where none ran seed 0) and its runs."""
    def score(kv):
        s0 = [r for r in kv[1] if r["seed"] == 0] or kv[1]
        return sum(auc_completions(r, base) for r in s0) / len(s0)
    return max(by_lr.items(), key=score)


METHOD_ORDER = ["rlprefix", "rlprefix-prev", "trl-prefix", "trl-lora"]


def task_choices(runs: dict, task: str, base: float) -> list[tuple[str, str, list[dict]]]:
    methods = sorted({r["method"] for r in runs.values() if r["task"] == task and "curve" in r},
                     key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))
    return [(m, *choose_lr(by_lr, base)) for m in methods if (by_lr := curve_runs(runs, task, m))]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def curve_report(runs: dict) -> tuple[list[dict], list[dict]]:
    """(one row per task and method at its chosen lr, one row per task, method and lr of the seed-0 sweep)."""
    rows, sweep = [], []
    for task in TASKS:
        b = base_reward(runs, task)
        choices = task_choices(runs, task, b) if b is not None else []
        if not choices:
            continue
        horizon = max(mean(r["train_seconds"] for r in rs) for _, _, rs in choices)
        for method, lr, rs in choices:
            at = [p["completions"] for p in rs[0]["curve"]]
            per_point = [mean(r["curve"][i]["reward"] for r in rs) for i in range(len(at))]
            rows.append({"task": task, "method": method, "lr": lr, "seeds": len(rs), "base": b,
                         "at": "/".join(map(str, at)), "rewards": " / ".join(f"{v:.3g}" for v in per_point),
                         "auc_completion": mean(auc_completions(r, b) for r in rs),
                         "auc_second": mean(auc_seconds(r, b, horizon) for r in rs), "horizon_s": horizon,
                         "train_s": mean(r["train_seconds"] for r in rs), "kl": mean(r["kl"] for r in rs)})
        sweep += sweep_rows(runs, task, b)
    return rows, sweep


def sweep_rows(runs: dict, task: str, base: float) -> list[dict]:
    out = []
    for r in sorted((r for r in runs.values() if r["task"] == task and "curve" in r and r["seed"] == 0),
                    key=lambda r: (r["method"], r["lr"] or 0)):
        refused = [p["completions"] for p in r["curve"] if "refused" in p]
        out.append({"task": task, "method": r["method"], "lr": str(r["lr"]),
                    "auc_completion": auc_completions(r, base) if complete(r) else None,
                    "final": r["reward"], "note": f"refused at {refused}" if refused else ""})
    return out


CURVE_COLS = [("task", "task"), ("method", "method"), ("lr", "lr"), ("seeds", "seeds"), ("base", "base reward"),
              ("at", "at completions"), ("rewards", "held-out reward (mean over seeds)"),
              ("auc_completion", "gain per completion (area)"), ("auc_second", "gain per second (area)"),
              ("horizon_s", "T (s)"), ("train_s", "train s"), ("kl", "KL to base (last)")]
SWEEP_COLS = [("task", "task"), ("method", "method"), ("lr", "lr"), ("auc_completion", "gain per completion, seed 0"),
              ("final", "held-out reward, last"), ("note", "note")]


# the decision rule for a changed default (#27): every task and both seeds, on the issue's measure, the mean held-out
# reward at these snapshots, paired with the defaults' run of the same task and seed (same prompts, same evaluator)
PAIRED_AT = (128, 256)


def paired_rows(runs: dict) -> tuple[list[dict], list[dict]]:
    """Ablations (`--tag`, method "rlprefix-<tag>") against the defaults' run of the same task and seed: the
    difference of the mean held-out reward at PAIRED_AT in standard errors of that difference (the two snapshots'
    s.e. combined as independent); win > +1 s.e., loss < -1 s.e., tie otherwise. Returns (one row per task and seed,
    one row per variant: wins / ties / losses and whether it may become a default: no loss, every task any variant
    was paired on, and at least 2 seeds on each)."""
    rows = []
    for key, r in sorted(runs.items()):
        if not (r["method"].startswith("rlprefix-") and r["method"] != "rlprefix-prev" and complete(r)):
            continue
        ref = runs.get(run_key(r["task"], "rlprefix", None, r["seed"]))
        if ref is None or not complete(ref):
            continue
        a = {p["completions"]: p for p in ref["curve"]}
        b = {p["completions"]: p for p in r["curve"]}
        at = [n for n in PAIRED_AT if n in a and n in b]
        if not at:
            continue
        ma, mb = mean(a[n]["reward"] for n in at), mean(b[n]["reward"] for n in at)
        se = math.sqrt(sum(a[n]["reward_se"] ** 2 + b[n]["reward_se"] ** 2 for n in at)) / len(at)
        z = (mb - ma) / se if se > 0 else 0.0
        rows.append({"variant": r["method"][len("rlprefix-"):], "task": r["task"], "seed": r["seed"],
                     "defaults": ma, "variant_reward": mb, "diff": mb - ma, "z": z,
                     "verdict": "win" if z > 1 else "loss" if z < -1 else "tie",
                     "train_s": f"{ref['train_seconds']:.0f} -> {r['train_seconds']:.0f}"})
    screened = {row["task"] for row in rows}  # every task some variant was paired on: a candidate needs them all
    verdicts = []
    for v in sorted({row["variant"] for row in rows}):
        mine = [row for row in rows if row["variant"] == v]
        seeds = {t: {row["seed"] for row in mine if row["task"] == t} for t in {row["task"] for row in mine}}
        count = {x: sum(row["verdict"] == x for row in mine) for x in ("win", "tie", "loss")}
        verdicts.append({"variant": v, "tasks": len(seeds), "cells": len(mine), **count,
                         "mean_diff": mean(row["diff"] for row in mine),
                         "candidate": "no: a loss" if count["loss"]
                         else f"not yet: {len(seeds)} of {len(screened)} tasks" if len(seeds) < len(screened)
                         else "not yet: one seed somewhere" if any(len(s) < 2 for s in seeds.values())
                         else "yes"})
    return rows, verdicts


PAIRED_COLS = [("variant", "variant"), ("task", "task"), ("seed", "seed"), ("defaults", "defaults"),
               ("variant_reward", "variant"), ("diff", "difference"), ("z", "in s.e."), ("verdict", "verdict"),
               ("train_s", "train s")]
VERDICT_COLS = [("variant", "variant"), ("tasks", "tasks"), ("cells", "task x seed"), ("win", "wins"),
                ("tie", "ties"), ("loss", "losses"), ("mean_diff", "mean difference"), ("candidate", "default?")]


def study_payload(runs: dict, args, settings: dict | None) -> dict:
    rows, sweep = curve_report(runs)
    paired, verdicts = paired_rows(runs)
    if args is not None:
        settings = {"budget": args.budget, "tokens": args.tokens, "checkpoints": args.checkpoints,
                    "init_text": INIT_TEXT, "tasks": {t: TASKS[t] for t in TASKS}, "lrs": study_lrs(args),
                    "previous_defaults": PREVIOUS_DEFAULTS}
    return {"settings": settings, "summary": rows, "sweep": sweep, "table_md": md_table(rows, CURVE_COLS),
            "sweep_md": md_table(sweep, SWEEP_COLS), "paired": paired, "verdicts": verdicts,
            "paired_md": md_table(paired, PAIRED_COLS) + "\n" + md_table(verdicts, VERDICT_COLS)}


def plot_curves(runs: dict, name: str) -> None:
    """Held-out reward vs sampled completions (top) and vs training seconds (bottom), per task, chosen lr."""
    import matplotlib  # the report only
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [(t, b) for t in TASKS if (b := base_reward(runs, t)) is not None and task_choices(runs, t, b)]
    if not tasks:
        return
    fig, axes = plt.subplots(2, len(tasks), figsize=(4 * len(tasks), 6.4), squeeze=False)
    for col, (task, b) in enumerate(tasks):
        for method, lr, rs in task_choices(runs, task, b):
            n = len(rs[0]["curve"])
            ys = [mean(r["curve"][i]["reward"] for r in rs) for i in range(n)]
            label = f"{method} lr={lr if lr != 'None' else 'default'} ({len(rs)} seeds)"
            for row, field in enumerate(("completions", "train_seconds")):
                xs = [0.0] + [mean(r["curve"][i][field] for r in rs) for i in range(n)]
                axes[row][col].plot(xs, [b] + ys, marker="o", label=label)
        for row, xlabel in enumerate(("completions sampled", "training seconds")):
            ax = axes[row][col]
            ax.axhline(b, color="grey", linestyle="--", linewidth=1, label="base")
            ax.set_title(task)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out reward")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}_curves.png", dpi=110)


# ---- the cells and their runs --------------------------------------------------------------------------------
def study_lrs(args) -> dict:
    return {"trl-prefix": args.trl_lrs, "trl-lora": args.lora_lrs}


def current_defaults() -> dict:
    from rlprefix import PPOConfig  # the parent process only
    from rlprefix.train.ppo import learning_rate

    cfg = PPOConfig()
    cfg.lr = learning_rate(cfg, None)  # null: the lr of a kv prefix, the kind every rlprefix run here trains
    return {k: getattr(cfg, k) for k in PREVIOUS_DEFAULTS}


def best_stored_lr(runs: dict, task: str, method: str, lrs: list[float], require_all: bool,
                   suffix: str = "") -> float | None:
    """The swept lr with the largest seed-0 area per completion; None while the sweep (or the base) is missing."""
    b = base_reward(runs, task)
    found = {lr: runs.get(run_key(task, method, lr, 0, suffix)) for lr in lrs}
    found = {lr: r for lr, r in found.items() if r is not None and complete(r)}
    if b is None or not found or (require_all and len(found) < len(lrs)):
        return None
    return max(found, key=lambda lr: auc_completions(found[lr], b))


def study_cells(args, runs: dict, require_all: bool = True) -> list[dict]:
    """Every cell of the study, in run order: {task, method, lr, seed, key, status}; status: stored | stored, older
    defaults (an rlprefix run whose PPOConfig defaults have changed since: kept; --rerun replaces it) | run | same
    as rlprefix (the previous defaults are today's) | lr pending (seed 0's sweep not complete yet)."""
    now = current_defaults()
    same = now == PREVIOUS_DEFAULTS
    cells = []
    for task in args.tasks:
        for method in args.methods:
            lrs, suffix = study_lrs(args).get(method, [None]), run_suffix(args, method)
            for seed in ([0] if method == "base" else args.seeds):
                for lr in (lrs if seed == 0 or len(lrs) == 1 else
                           [best_stored_lr(runs, task, method, lrs, require_all, suffix)]):
                    key = run_key(task, method, lr, seed, "" if method == "base" else suffix, method != "base")
                    older = method == "rlprefix" and runs.get(key, {}).get("ppo_config", now) != now
                    status = ("stored, other settings" if key in runs and older and not args.rerun else
                              "stored" if key in runs and not args.rerun else "same as rlprefix"
                              if method == "rlprefix-prev" and same else "lr pending" if lr is None and
                              len(lrs) > 1 else "run")
                    cells.append({"task": task, "method": method, "lr": lr, "seed": seed, "key": key,
                                  "status": status})
    return cells


def run_suffix(args, method: str) -> str:
    """The run key's and method's suffix: --tag, plus "-fp32" on a TRL peer run with --trl-fp32 (derived from the
    flag, so a float32 run can never land under a bf16 run's key; a hand-given --tag=-fp32 is not doubled)."""
    fp32 = "-fp32" if args.trl_fp32 and method.startswith("trl-") and not args.tag.endswith("-fp32") else ""
    return args.tag + fp32


def run_cell(args, cell: dict, checkpoints: list[int] | None) -> dict | None:
    """One child process; its record (None if it failed: the cell stays to do)."""
    task, method, lr, seed = cell["task"], cell["method"], cell["lr"], cell["seed"]
    cmd = [sys.executable, __file__, "--method", method, "--task", task, "--seed", str(seed),
           "--budget", str(args.budget), "--tokens", str(args.tokens), "--threads", str(args.threads)]
    cmd += (["--lr", str(lr)] if lr else []) + (["--set", *args.set] if args.set else [])
    cmd += ["--prefix-length", str(args.prefix_length)] + (["--trl-fp32"] if args.trl_fp32 else [])
    cmd += ["--checkpoints", *map(str, checkpoints)] if checkpoints and method != "base" else []
    print(f"[{time.strftime('%H:%M:%S')}] {cell['key']}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        print(f"  failed:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    r = {"task": task, "method": method + run_suffix(args, method), "seed": seed, "lr": lr,
         "commit": machine()["commit"],
         "packages": package_versions(), "tokens": args.tokens, "wall_seconds": time.perf_counter() - t0,
         **({"budget": args.budget, "checkpoints": checkpoints, "study": args.study}
            if checkpoints and method != "base" else {}), **json.loads(line[7:])}
    print(f"  reward {r['reward']:.3f} +- {r['reward_se']:.3f}, KL {r['kl']:.2f}"
          + (f", {r['train_seconds']:.0f} s" if "train_seconds" in r else "")
          + ("".join(f"\n    {p['completions']:>4} completions {p['train_seconds']:6.0f} s: "
                     + (f"{p['reward']:.3f}" if "reward" in p else "refused") for p in r.get("curve", []))),
          flush=True)
    return r


def timings(runs: dict) -> dict:
    """Seconds from the stored runs: training per completion by (method, task) and by method, one evaluation,
    and a child's overhead (loading, imports); GUESS where no run recorded them."""
    per: dict = {}
    for r in runs.values():
        if r.get("train_seconds") and r.get("completions"):
            m = "rlprefix" if r["method"].startswith("rlprefix") else r["method"]
            for k in ((m, r["task"]), m):
                per.setdefault(k, []).append(r["train_seconds"] / r["completions"])
    evals = [r["eval_seconds"] / r["evaluations"] for r in runs.values() if r.get("evaluations")]
    over = [r["wall_seconds"] - r.get("train_seconds", 0) - r["eval_seconds"] for r in runs.values()
            if "wall_seconds" in r and "eval_seconds" in r]
    return {"train": {k: mean(v) for k, v in per.items()},
            "eval_s": mean(evals) if evals else None, "overhead_s": mean(over) if over else None}


def cell_seconds(cell: dict, args, t: dict) -> float:
    evals = 1 if cell["method"] == "base" else len(args.checkpoints)
    seconds = evals * (t["eval_s"] or GUESS["eval_s"]) + (t["overhead_s"] or GUESS["overhead_s"])
    if cell["method"] != "base":
        m = "rlprefix" if cell["method"].startswith("rlprefix") else cell["method"]
        per = t["train"].get((m, cell["task"])) or t["train"].get(m) or mean(
            v for k, v in t["train"].items() if isinstance(k, str)) if t["train"] else 1.0
        seconds += args.budget * per
    return seconds


def dry_run(args, runs: dict) -> None:
    cells, t = study_cells(args, runs), timings(runs)
    todo = [c for c in cells if c["status"] in ("run", "lr pending")]
    for c in cells:
        est = f"~{cell_seconds(c, args, t) / 60:5.1f} min" if c in todo else ""
        print(f"{c['key']:<52} {c['status']:<22} {est}")
    counts = {s: sum(c["status"] == s for c in cells)
              for s in ("stored", "stored, other settings", "run", "lr pending", "same as rlprefix")}
    total = sum(cell_seconds(c, args, t) for c in todo)
    assumed = [k for k in ("eval_s", "overhead_s") if t[k] is None]
    print(f"\n{len(cells)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items()) +
          f"\nestimated time of the {len(todo)} to run: {total / 3600:.1f} h at {args.threads} threads "
          f"(training s/completion from the stored runs; one evaluation {t['eval_s'] or GUESS['eval_s']:.0f} s, "
          f"a child's overhead {t['overhead_s'] or GUESS['overhead_s']:.0f} s"
          + (f"; assumed, not yet recorded: {', '.join(assumed)}" if assumed else "") + ")")


def run_study(args) -> dict:
    """Every cell not stored, in order; seed 0 of each swept method before the other seeds, which then take the lr
    that won seed 0's sweep (among the lrs that ran, if some failed)."""
    runs = load_results(args.name).get("runs", {})
    for task in args.tasks:
        for phase in (0, 1):  # 0: base, every lr on seed 0, and single-lr methods; 1: swept methods' other seeds
            sub = argparse.Namespace(**{**vars(args), "tasks": [task]})
            for cell in study_cells(sub, runs, require_all=False):
                swept = len(study_lrs(args).get(cell["method"], [None])) > 1
                if cell["status"] != "run" or (phase == 1) != (swept and cell["seed"] != 0):
                    continue
                r = run_cell(args, cell, args.checkpoints)
                if r is not None:
                    runs = store({cell["key"]: r}, args)
    return runs


def run_classic(args) -> dict:
    runs = load_results(args.name).get("runs", {})
    for task in args.tasks:
        for method in args.methods:
            lrs = study_lrs(args).get(method, [None])
            for seed in ([0] if method == "base" else args.seeds):
                for lr in lrs:
                    key = run_key(task, method, lr, seed, run_suffix(args, method),
                                  curve=bool(args.checkpoints) and method != "base")
                    if key in runs and not args.rerun:
                        continue
                    cell = {"task": task, "method": method, "lr": lr, "seed": seed, "key": key}
                    r = run_cell(args, cell, args.checkpoints)
                    if r is not None:
                        runs = store({key: r}, args)
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--methods", nargs="+", help="default: base rlprefix trl-prefix trl-lora (the study: "
                                                 "base rlprefix rlprefix-prev trl-prefix trl-lora)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--budget", type=int, help="sampled completions per training run (default 256; the study: "
                                               "the last checkpoint)")
    ap.add_argument("--checkpoints", nargs="+", type=int, help="held-out snapshots at these counts of sampled "
                                                               "completions (the study: 64 128 256 512)")
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens (training and evaluation)")
    ap.add_argument("--trl-lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--lora-lrs", "--lora-lr", nargs="+", type=float, dest="lora_lrs",
                    help=f"trl-lora's learning rates (default {LORA_LR:g}; the study: "
                         f"{' '.join(f'{x:g}' for x in STUDY['lrs']['trl-lora'])})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", help="rlprefix ablation: PPOConfig overrides key=json_value")
    ap.add_argument("--prefix-length", type=int, default=PREFIX_LENGTH,
                    help=f"rlprefix's prefix positions (ablation; default {PREFIX_LENGTH}, TRL + PEFT prefix's too)")
    ap.add_argument("--trl-fp32", action="store_true",
                    help="TRL peers train in float32 (bf16=False; TRL's default is bf16 autocast, 17-21x slower on a "
                         "CPU without AVX512-BF16); their keys and method names get \"-fp32\"")
    ap.add_argument("--tag", default="", help="suffix for the run key (ablations)")
    ap.add_argument("--study", choices=["sample_efficiency"], help="issue #27: every cell, resumable")
    ap.add_argument("--dry-run", action="store_true", help="with --study: list the cells and estimate the time")
    ap.add_argument("--name", default="learning_vs_trl", help="results file benchmarks/results/<name>.json")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--rerun", action="store_true", help="run again the runs already stored (default: skip them)")
    # child mode
    ap.add_argument("--method")
    ap.add_argument("--task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float)
    args = ap.parse_args()
    if args.study:
        args.checkpoints = args.checkpoints or STUDY["checkpoints"]
        args.methods = args.methods or ["base", "rlprefix", "rlprefix-prev", "trl-prefix", "trl-lora"]
    args.budget = args.budget or (max(args.checkpoints) if args.checkpoints else 256)
    args.lora_lrs = args.lora_lrs or (STUDY["lrs"]["trl-lora"] if args.study else [LORA_LR])
    if args.method and args.task:
        return child(args)
    args.methods = args.methods or ["base", "rlprefix", "trl-prefix", "trl-lora"]
    if args.dry_run:
        return dry_run(args, load_results(args.name).get("runs", {}))
    if args.report:
        runs = load_results(args.name).get("runs", {})
    else:
        runs = run_study(args) if args.study else run_classic(args)
    runs = store({}, args)
    plot(runs, args.name)
    plot_curves(runs, args.name)
    print(report(runs)[0])
    rows, sweep = curve_report(runs)
    if rows:
        print(md_table(rows, CURVE_COLS) + "\n" + md_table(sweep, SWEEP_COLS))
    paired, verdicts = paired_rows(runs)
    if paired:
        print(md_table(paired, PAIRED_COLS) + "\n" + md_table(verdicts, VERDICT_COLS))


if __name__ == "__main__":
    main()
