"""Image-conditioned prefixes (issue #26): can a frozen language model describe an image it cannot see, through a
prefix computed from the image? Held-out reward of three methods, each after the warm start and after RL:

- `text-only`: the prompt alone (stage none: the frozen model as it is), then a kv prefix trained on the same captions
  without the image (warm_start), then RL on it: the model learns the caption format but cannot see the image, so it
  stays near chance on what the caption names;
- `embedding`: an image prefix of form "embedding" (ClipCap/Frozen: mapped tokens as input embeddings);
- `kv`: an image prefix of form "kv" (the mapper's coefficients over a learned K/V basis in every layer).

Data: `builtin:shapes` (coloured shapes at positions; the held-out split holds 12 colour/shape/position compositions
never drawn in training) and `builtin:digits` (scikit-learn's handwritten digits, every fifth held out). The encoder
is the embedded small CNN (`rlprefix.images.embedded`), trained on the training splits only. The reward and the
evaluator is `caption_correctness` (rewards/images.py: share of the reference's attributes named, minus wrong
names), which neither side of the comparison was tuned on beyond its definition; held-out images only, the same
sampling seed for every method, `samples` completions per image, the standard error over completions. RL keeps the
warm-start prefix as its KL reference (`reference: initial`) for every method.

RL runs from the same warm-start prefix on one or both of two kinds of data (`--rl-data`), at the same number of
sampled completions:
- `captioned`: the training images with their reference captions, scored by `caption_correctness`;
- `unlabelled`: images without captions, scored by the image verifier (`rlprefix.images.verifier`: another small CNN,
  another seed, names what it sees). For shapes the pool holds fresh draws of every composition, the 12 held-out
  ones included (never their captions, never the evaluation's draws: semi-supervised, said so in the results); for
  digits, the training images. `--pool train` draws shapes from the training compositions only, to tell whether a
  gain needs the held-out compositions at all. Evaluation stays with the reference captions.

    python benchmarks/cross_modal.py [--tasks shapes digits] [--ws-steps 150] [--rl-steps 20] [--pool all|train]
        [--seed 0] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time

import torch

from common import md_table, write_result
from rewards import build_reward
from rlprefix import PPOConfig, Prefix, WarmStartConfig, evaluate_reward, load_model, ppo, warm_start
from rlprefix.images import load_image_captions, open_encoder
from rlprefix.images.data import shapes_task
from rlprefix.images.verifier import ImageVerifier

PROMPT = "Describe the image in a few words."
INIT_TEXT = "A short caption of the picture:"


def data(task: str, n_train: int, n_heldout: int):
    train = load_image_captions(f"builtin:{task}", n=n_train)
    held = load_image_captions(f"builtin:{task}:heldout", n=n_heldout)
    sft = [{"prompt": PROMPT, "completion": x.caption, "images": x.image} for x in train]
    rl = [{"prompt": PROMPT, "captions": x.caption, "images": x.image} for x in train]
    ev = [{"prompt": PROMPT, "captions": x.caption, "images": x.image} for x in held]
    return sft, rl, ev, seen(task, n_heldout)


def seen(task: str, n: int) -> list[dict] | None:
    """Fresh draws (seed 3) of the training compositions, for shapes: the reward there against the held-out reward
    tells fitting the training compositions apart from learning to name what is in the image."""
    if task != "shapes":
        return None
    return [{"prompt": PROMPT, "captions": x.caption, "images": x.image} for x in shapes_task("train", n, seed=3)]


def unlabelled(task: str, n: int, pool: str = "all") -> list[dict]:
    """RL rows without captions: fresh draws (seed 7; evaluation draws with seed 0) of every shapes composition
    (`pool="all"`, a fifth of them held-out compositions) or of the training compositions only (`pool="train"`), or
    the training digits."""
    if task == "shapes" and pool == "all":
        pool = shapes_task("train", n - n // 5, seed=7) + shapes_task("heldout", n // 5, seed=7)
    elif task == "shapes":
        pool = shapes_task("train", n, seed=7)
    else:
        pool = load_image_captions("builtin:digits", n=n)
    return [{"prompt": PROMPT, "images": x.image} for x in pool]


def blind(rows: list[dict]) -> list[dict]:
    """The rows without their image (text-only methods)."""
    return [{k: v for k, v in r.items() if k != "images"} for r in rows]


def new_prefix(model, tok, method: str, length: int, dim: int, seed: int):
    if method == "text-only":
        return Prefix.from_text(model, tok, INIT_TEXT, length, kind="kv")
    return Prefix.from_text(model, tok, INIT_TEXT, length, kind="image", form=method, feature_dim=dim,
                            generator=torch.Generator().manual_seed(seed))


def held_out(model, tok, prefix, ev, reward, args, seen_rows=None) -> dict:
    """Held-out reward (and, when `seen_rows` is given, the score on fresh draws of training compositions)."""
    def score(rows):
        return evaluate_reward(model, tok, prefix, rows, reward, seed=0, max_new_tokens=args.max_new_tokens,
                               samples_per_prompt=args.samples)

    res = score(ev)
    out = {"heldout": res.mean, "se": res.se, "kl_to_base": res.kl, "n": len(res.rewards),
           "example": res.completions[0] if res.completions else None}
    if seen_rows:
        res = score(seen_rows)
        out.update(seen=res.mean, seen_se=res.se)
    return out


def run_method(model, tok, task: str, method: str, rows, reward, dim: int, args) -> list[dict]:
    sft, rl, ev, seen_rows = rows if method != "text-only" else [blind(r) for r in rows[:2]] + list(rows[2:])
    out = []
    if method == "text-only":
        out.append({"task": task, "method": method, "stage": "none", "params": 0,
                    **held_out(model, tok, None, ev, reward, args, seen_rows)})
    prefix = new_prefix(model, tok, method, args.length, dim, args.seed)
    ws_cfg = WarmStartConfig(steps=args.ws_steps, batch_size=8, eval_every=max(args.ws_steps // 4, 1),
                             warmup_steps=min(20, args.ws_steps // 5), progress=False, merge=True,
                             seed=args.seed)
    t = time.perf_counter()
    res = warm_start(model, tok, prefix, sft, ws_cfg, output_dir=tempfile.mkdtemp())
    ws_time = time.perf_counter() - t
    prefix = res.prefix
    out.append({"task": task, "method": method, "stage": "warm_start", "seed": args.seed,
                "params": prefix.num_parameters(),
                "best_eval_loss": res.best_eval_loss, "seconds_per_step": ws_time / max(args.ws_steps, 1),
                **held_out(model, tok, prefix, ev, reward, args, seen_rows)})
    ppo_cfg = PPOConfig(steps=args.rl_steps, batch_size=16, group_size=4, minibatch_size=8,
                        max_new_tokens=args.max_new_tokens, lr=args.rl_lr,
                        reference="initial", progress=False, seed=args.seed)
    for rl_data in (args.rl_data if method != "text-only" else ["captioned"]):  # text-only cannot see to verify
        policy = copy.deepcopy(prefix)  # each kind of RL data from the same warm start
        rl_rows, rl_reward = ((rl, reward) if rl_data == "captioned" else
                              (unlabelled(task, args.train, args.pool), ImageVerifier(task)))
        t = time.perf_counter()
        ppo(model, tok, policy, rl_rows, rl_reward, ppo_cfg, output_dir=tempfile.mkdtemp())
        rl_time = time.perf_counter() - t
        out.append({"task": task, "method": method, "stage": "rl", "rl_data": rl_data, "seed": args.seed,
                    **({"pool": args.pool} if rl_data == "unlabelled" else {}),
                    "rl_reward": rl_reward.name, "params": policy.num_parameters(),
                    "seconds_per_step": rl_time / max(args.rl_steps, 1), "completions": args.rl_steps * 16,
                    **held_out(model, tok, policy, ev, reward, args, seen_rows)})
    for r in out:
        print(f"{task:7s} {method:10s} {r['stage']:10s} {r.get('rl_data', ''):10s} held-out {r['heldout']:.3f} "
              f"+- {r['se']:.3f}  seen {r.get('seen', float('nan')):.3f}  e.g. {r['example']!r}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", nargs="+", default=["shapes", "digits"], choices=["shapes", "digits"])
    ap.add_argument("--methods", nargs="+", default=["text-only", "embedding", "kv"])
    ap.add_argument("--length", type=int, default=10)
    ap.add_argument("--ws-steps", type=int, default=150)
    ap.add_argument("--rl-steps", type=int, default=20)
    ap.add_argument("--rl-lr", type=float, default=None, help="default: each prefix kind's own (ppo.LEARNING_RATES: "
                    "image 1e-4, the text-only kv prefix 1e-2)")
    ap.add_argument("--rl-data", nargs="+", default=["captioned", "unlabelled"], choices=["captioned", "unlabelled"],
                    help="RL on captioned training images (caption_correctness) and/or on uncaptioned images scored "
                    "by the image verifier, each from the same warm start")
    ap.add_argument("--pool", default="all", choices=["all", "train"],
                    help="shapes' unlabelled RL pool: draws of every composition, held-out ones included (all), or "
                    "of the training compositions only (train)")
    ap.add_argument("--seed", type=int, default=0, help="prefix initialisation, warm-start shuffling and RL sampling "
                    "seed (the evaluation's sampling seed and images stay fixed)")
    ap.add_argument("--train", type=int, default=240, help="training images per task")
    ap.add_argument("--heldout", type=int, default=60, help="held-out images per task")
    ap.add_argument("--samples", type=int, default=2, help="completions per held-out image")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--name", default="cross_modal")
    ap.add_argument("--quick", action="store_true", help="a few steps, to check the script runs")
    args = ap.parse_args()
    if args.quick:
        args.ws_steps, args.rl_steps, args.train, args.heldout, args.samples = 4, 1, 16, 8, 1
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model)
    reward = build_reward("caption_correctness")
    dim = open_encoder(None).dim
    rows = []
    t0 = time.perf_counter()
    for task in args.tasks:
        task_rows = data(task, args.train, args.heldout)
        for method in args.methods:
            rows += run_method(model, tok, task, method, task_rows, reward, dim, args)
            write_result(args.name, {"settings": vars(args), "prompt": PROMPT, "encoder": "rlprefix-small-cnn",
                                     "rows": rows, "seconds": time.perf_counter() - t0})
    print(md_table(rows, [("task", "task"), ("method", "method"), ("stage", "stage"), ("rl_data", "RL data"),
                          ("heldout", "held-out reward"), ("se", "se"),
                          ("seen", "seen compositions"), ("params", "trainable"), ("seconds_per_step", "s/step")]))
    if any(math.isnan(r["heldout"]) for r in rows):
        print("warning: a method had no scored completion")


if __name__ == "__main__":
    main()
