"""Reward-driven prefix tuning from Python with your own reward function.

The reward follows TRL's contract: reward(prompts, completions, **columns) -> list[float]. Here it
rewards answers that name the season a prompt asks about (from the `season` column) in about 15 words.
Runs on CPU in about two minutes (measured with the RL defaults: mean reward 0.427 -> 0.706, KL 7.3 nats):

    python examples/custom_reward.py
"""
import torch

import rlprefix
from rlprefix.train.evaluate import evaluate_reward
from rlprefix.train.ppo import PPOConfig


def season_reward(prompts, completions, season, **kw):
    """0.5 if the completion names the season, plus up to 0.5 for being close to 15 words."""
    return [0.5 * float(s.lower() in c.lower()) + 0.5 * max(0.0, 1 - abs(len(c.split()) - 15) / 15)
            for c, s in zip(completions, season)]


def main():
    torch.manual_seed(0)
    model, tokenizer = rlprefix.load_model()  # the embedded SmolLM2-135M-Instruct
    prompts = [{"prompt": f"Describe a walk in the park in {s}.", "season": s}
               for s in ("spring", "summer", "autumn", "winter")] * 4
    prefix = rlprefix.Prefix.from_text(model, tokenizer, "Answer in one short sentence.", length=8, kind="kv")

    before = evaluate_reward(model, tokenizer, None, prompts[:4], season_reward, samples_per_prompt=4)
    result = rlprefix.ppo(model, tokenizer, prefix, prompts, season_reward,
                          PPOConfig(steps=6, batch_size=16, max_new_tokens=40))  # defaults: rloo, 4 per prompt
    after = evaluate_reward(model, tokenizer, result.prefix, prompts[:4], season_reward, samples_per_prompt=4)
    print(f"mean reward: base {before.mean:.3f} -> with prefix {after.mean:.3f} (KL {after.kl:.2f} nats/seq)")
    for p, c in zip(after.prompts[::4], after.completions[::4]):
        print(f"- {p}\n  {c.strip()}")
    result.prefix.save("runs/season_prefix", {"reward": ["season_reward"], "model": "smollm2-135m-instruct"})


if __name__ == "__main__":
    main()
