"""The sentiment demonstration: `rlprefix run configs/sentiment.yaml` on the real default model (CPU), with the
before/after held-out reward, KL, samples, and the PPO reward per 1,000 sampled completions.

    python benchmarks/sentiment_demo.py [overrides...]      # e.g. ppo.steps=10
"""
from __future__ import annotations

import sys
import time

from common import ROOT, write_result
from rlprefix.config import load_config
from rlprefix.train.metrics import read_metrics
from rlprefix.recipe import run


def main():
    cfg = load_config(ROOT / "configs" / "sentiment.yaml", ["output_dir=runs/sentiment"] + sys.argv[1:])
    t = time.perf_counter()
    summary = run(cfg)
    wall = time.perf_counter() - t
    curve = read_metrics(ROOT / cfg.output_dir / "ppo" / "ppo_metrics.jsonl")
    per_k = [{"completions": r["step"] * cfg.ppo.batch_size, "reward": r["reward/mean"], "kl": r["kl"]} for r in curve]
    before, after = summary.get("before", {}), summary.get("after", {})
    warm = summary.get("after_warm_start", {})
    payload = {"config": "configs/sentiment.yaml", "overrides": sys.argv[1:], "wall_s": wall,
               "reward_before": before.get("reward_mean"), "reward_after": after.get("reward_mean"),
               "reward_after_warm_start": warm.get("reward_mean"), "kl_after_warm_start": warm.get("kl_to_base"),
               "reward_se": {k: v.get("reward_se") for k, v in (("before", before), ("after_warm_start", warm),
                                                                 ("after", after))},
               "kl_after": after.get("kl_to_base"), "n_eval": after.get("n"), "seconds": summary.get("seconds"),
               "warm_start": summary.get("warm_start"), "ppo": summary.get("ppo"), "compression": summary.get("compression"),
               "ppo_curve": per_k, "samples_before": before.get("samples"), "samples_after": after.get("samples")}
    write_result("sentiment_demo", payload)
    print(f"reward {payload['reward_before']:.3f} -> {payload['reward_after_warm_start']:.3f} (warm start) -> "
          f"{payload['reward_after']:.3f} in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
