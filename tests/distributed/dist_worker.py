"""Worker for tests/distributed/test_distributed.py: one PPO or warm-start run, launched 1x plainly or 2x by accelerate.

Writes, per rank, the prefix after every step (as a hash) and the final prefix, into OUT/rank{r}/.
"""
import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny.py
from tiny import tiny_model, tiny_tokenizer  # noqa: E402

from rlprefix import PPOConfig, Prefix, WarmStartConfig, ppo, warm_start  # noqa: E402
from rlprefix.distributed.groups import Dist  # noqa: E402
from rlprefix.files import atomic_save_tensors, atomic_write_json  # noqa: E402

PROMPTS = ["hello world", "a calm park with friendly people", "review film", "the food"] * 4
DATA = [{"prompt": f"review {w}", "completion": f"{w} is good great love"} for w in
        ["film", "food", "phone", "hotel", "park", "room", "staff", "actors"]]


def token_reward(prompts, completions, completion_ids, **kw):
    return [sum(t == 75 for t in ids) / max(1, len(ids)) + 0.01 * len(ids) for ids in completion_ids]


def main(stage: str, out: str):
    torch.set_num_threads(1)
    dist = Dist.from_env()
    model, tok = tiny_model("llama", sharpen=4.0), tiny_tokenizer()
    prefix = Prefix.for_model(model, 4, "kv" if stage == "ppo" else "mlp", mlp_hidden=16,
                              generator=torch.Generator().manual_seed(3))
    hashes = []
    rank_dir = Path(out) / f"rank{dist.rank}"
    if stage == "ppo":
        def on_step(step, record):
            hashes.append(hashlib.sha256(prefix.kv.detach().numpy().tobytes()).hexdigest())

        res = ppo(model, tok, prefix, PROMPTS, token_reward,
                  PPOConfig(steps=3, batch_size=8, minibatch_size=4, epochs=2, max_new_tokens=6, lr=3e-2,
                            progress=False, reward_normalize=True),
                  output_dir=rank_dir / "artifacts", on_step=on_step, dist=dist)
        final = res.prefix.state_dict()
        history = res.history
    else:
        res = warm_start(model, tok, prefix, DATA, WarmStartConfig(steps=4, batch_size=4, grad_accum=2, lr=1e-2,
                                                                   eval_every=2, progress=False, merge=False),
                         output_dir=rank_dir / "artifacts", dist=dist)
        final = res.prefix.state_dict()
        history = res.history
    scratch = Path(out) / f"result{dist.rank}"
    atomic_save_tensors(scratch / "prefix.safetensors", final)
    atomic_write_json(scratch / "info.json", {"hashes": hashes, "world_size": dist.world_size,
                                              "history": [{k: v for k, v in h.items() if not k.startswith("time")}
                                                          for h in history]})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
