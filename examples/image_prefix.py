"""An image prefix from Python: the frozen SmolLM2-135M-Instruct learns to describe coloured-shape scenes it cannot
see, through a prefix computed from each image (embedded small encoder -> mapper -> K/V in every layer). Warm start
on captions, RL on caption correctness (rewards receive images=), then captions for held-out compositions never
drawn in training, and the prefix saved and loaded back. A few minutes on 2 CPU cores.

    python examples/image_prefix.py [--form embedding]
"""
import argparse
import tempfile

from rewards import build_reward
from rlprefix import (PPOConfig, Prefix, WarmStartConfig, evaluate_reward, generate, load_model, load_prefix, ppo,
                      warm_start)
from rlprefix.images import caption_records, open_encoder

PROMPT = "Describe the image in a few words."

ap = argparse.ArgumentParser()
ap.add_argument("--form", default="kv", choices=["kv", "embedding"])
ap.add_argument("--ws-steps", type=int, default=100)
ap.add_argument("--rl-steps", type=int, default=8)
args = ap.parse_args()

model, tok = load_model("smollm2-135m-instruct")
encoder = open_encoder(None)                      # the embedded small CNN (trained once, ~12 s; not CLIP)
train = caption_records("builtin:shapes", PROMPT)                 # 48 compositions
heldout = caption_records("builtin:shapes:heldout", PROMPT)       # 12 compositions never drawn in training
reward = build_reward("caption_correctness")                      # reads `captions`; gets `images=` too

prefix = Prefix.from_text(model, tok, "A short caption of the picture:", 10, kind="image", form=args.form,
                          feature_dim=encoder.dim)
print(f"image prefix ({args.form}): {prefix.num_parameters():,} trainable parameters")
print("before:", evaluate_reward(model, tok, prefix, heldout, reward, max_new_tokens=16).mean)
warm_start(model, tok, prefix, train, WarmStartConfig(steps=args.ws_steps, eval_every=25))
print("after warm start:", evaluate_reward(model, tok, prefix, heldout, reward, max_new_tokens=16).mean)
ppo(model, tok, prefix, train, reward, PPOConfig(steps=args.rl_steps, batch_size=16, max_new_tokens=16,
                                                reference="initial"))  # lr: the image kind's 1e-4
print("after RL:", evaluate_reward(model, tok, prefix, heldout, reward, max_new_tokens=16).mean)

images = [r["images"] for r in heldout[:3]]
for row, text in zip(heldout[:3], generate(model, tok, [PROMPT] * 3, prefix, images=images, do_sample=False,
                                           max_new_tokens=16)):
    print(f"  {row['captions']!r:40s} -> {text!r}")
folder = tempfile.mkdtemp() + "/captioner"
prefix.save(folder)                                               # mapper + encoder reference; serve it as is
again = load_prefix(folder, model)
assert generate(model, tok, [PROMPT], again, images=images[:1], do_sample=False, max_new_tokens=16) == \
    generate(model, tok, [PROMPT], prefix, images=images[:1], do_sample=False, max_new_tokens=16)
print("saved to", folder, "- serve it: rlprefix serve --prefixes", folder.rsplit("/", 1)[0])
