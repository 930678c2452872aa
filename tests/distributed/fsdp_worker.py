"""Worker for tests/distributed/test_fsdp.py: one run on the tiny model, 1 process (replicated) or N processes (FSDP).

    fsdp_worker.py STAGE OUT STRATEGY      STAGE: ppo | ppo_gae | ppo_resident | warm_start | eval | load

(ppo_resident: ppo with `fsdp_decode: resident`.)

Writes OUT/result{rank}/prefix.safetensors (the final prefix) and info.json (per-step prefix hashes, history,
the bytes of the base parameters this process holds).
"""
import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny.py
from dist_worker import DATA, PROMPTS  # noqa: E402
from tiny import save_tiny, tiny_model, tiny_tokenizer  # noqa: E402

from rlprefix import PPOConfig, Prefix, WarmStartConfig, ppo, warm_start  # noqa: E402
from rlprefix.distributed.groups import Dist  # noqa: E402
from rlprefix.train.evaluate import evaluate_reward  # noqa: E402
from rlprefix.files import atomic_save_tensors, atomic_write_json  # noqa: E402
from rlprefix.models.loading import load_model  # noqa: E402
from rlprefix.distributed.fsdp import count_all_gathers, shard
from rlprefix.distributed.collectives import fsdp_modules, is_sharded, local_parameter_bytes  # noqa: E402


def token_reward(prompts, completions, completion_ids=None, **kw):
    """dist_worker's reward; evaluations (which pass no token ids) score the text instead."""
    if completion_ids is None:
        return [c.count("o") / max(1, len(c)) + 0.01 * len(c) for c in completions]
    return [sum(t == 75 for t in ids) / max(1, len(ids)) + 0.01 * len(ids) for ids in completion_ids]


def gathered_copies_freed(model) -> bool:
    """FSDP keeps no all-gathered parameter between forwards (private FSDP2 state, checked in tests only)."""
    for m in fsdp_modules(model):
        for group in m._get_fsdp_state()._fsdp_param_groups:
            for fp in group.fsdp_params:
                up = getattr(fp, "_unsharded_param", None)
                if up is not None and up.untyped_storage().size() != 0:
                    return False
    return True


def load_check(out: Path, dist: Dist) -> dict:
    """load_model(..., distributed='fsdp') from disk, both loading paths, tied and untied heads: the logits of
    the sharded model equal those of the whole model on every process."""
    info = {}
    tok = tiny_tokenizer()
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    for arch in ("llama", "llama-mqa", "gpt2"):
        path = out / f"model-{arch}"
        if dist.is_main:
            save_tiny(path, arch)
        dist.barrier()
        whole, _ = load_model(str(path), distributed="replicate")
        want = whole(input_ids=ids).logits
        for method in ("slices", "broadcast"):
            from rlprefix.distributed.fsdp import load_sharded

            model = load_sharded(str(path), torch.float32, "cpu", dist, method=method)
            got = model(input_ids=ids).logits
            # a prompt-tuning prefix reads the embedding table directly (gathered for the call)
            embeds = [Prefix.from_text(m, tok, "good review", 3, "prompt").embeds for m in (model, whole)]
            info[f"{arch}/{method}"] = {"max_abs_diff": (got - want).abs().max().item(),
                                        "embeds_diff": (embeds[0] - embeds[1]).abs().max().item(),
                                        "local_bytes": local_parameter_bytes(model),
                                        "full_bytes": local_parameter_bytes(whole),
                                        "eos": model.generation_config.eos_token_id,
                                        "freed": gathered_copies_freed(model)}
    return info


def main(stage: str, out: str, strategy: str):
    torch.set_num_threads(1)
    decode = "resident" if stage == "ppo_resident" else "reshard"
    dist = Dist.from_env()
    out = Path(out)
    rank_dir = out / f"rank{dist.rank}"
    if stage == "load":
        atomic_write_json(out / f"result{dist.rank}" / "info.json", {"load": load_check(out, dist)})
        return
    model, tok = tiny_model("llama", sharpen=4.0), tiny_tokenizer()
    full_bytes = local_parameter_bytes(model)
    all_gathers = [0]
    if strategy == "fsdp":
        shard(model, dist, decode=decode)
        assert is_sharded(model)
        all_gathers = count_all_gathers()
    prefix = Prefix.for_model(model, 4, "mlp" if stage == "warm_start" else "kv", mlp_hidden=16,
                              generator=torch.Generator().manual_seed(3))
    hashes, history = [], []
    if stage.startswith("ppo"):
        def on_step(step, record):
            hashes.append(hashlib.sha256(prefix.kv.detach().numpy().tobytes()).hexdigest())

        gae = stage == "ppo_gae"
        res = ppo(model, tok, prefix, PROMPTS, token_reward,
                  PPOConfig(steps=3, batch_size=8, minibatch_size=4, epochs=2, max_new_tokens=6, lr=3e-2,
                            progress=False, advantage="gae" if gae else "rloo", group_size=1 if gae else 4,
                            eval_every=2),
                  eval_prompts=PROMPTS[:3], output_dir=rank_dir / "artifacts", on_step=on_step, dist=dist)
        final, history = res.prefix.state_dict(), res.history
        if gae:
            final.update({f"value_head.{k}": v for k, v in res.value_head.state_dict().items()})
    elif stage == "warm_start":
        # batch_size 3 over 7 training rows: a 1-row micro-batch leaves one process without rows
        res = warm_start(model, tok, prefix, DATA, WarmStartConfig(steps=4, batch_size=3, grad_accum=2, lr=1e-2,
                                                                   eval_every=2, progress=False, merge=False),
                         output_dir=rank_dir / "artifacts", dist=dist)
        final, history = res.prefix.state_dict(), res.history
    elif stage == "eval":
        # 5 rows over 2 processes, 1 row per batch and prefix: one process runs a batch more than the other
        # and a reward that runs the (sharded) model itself, as `fluency` does: it must run in step too
        from rewards.builtin import Fluency

        fluency = Fluency(model, tok)

        def reward(prompts, completions, **kw):
            return [a + 0.1 * b for a, b in zip(token_reward(prompts, completions), fluency.score(prompts, completions))]

        results = evaluate_reward(model, tok, [None, prefix], PROMPTS[:5], reward, batch_size=2,
                                  max_new_tokens=5, dist=dist)
        final = prefix.state_dict()
        history = [{"mean": r.mean, "kl": r.kl, "rewards": r.rewards} for r in results]
    else:
        raise SystemExit(f"unknown stage {stage}")
    scratch = out / f"result{dist.rank}"
    atomic_save_tensors(scratch / "prefix.safetensors", {k: v.contiguous() for k, v in final.items()})
    atomic_write_json(scratch / "info.json", {
        "hashes": hashes, "world_size": dist.world_size, "local_bytes": local_parameter_bytes(model),
        "full_bytes": full_bytes, "all_gathers": all_gathers[0], "freed": gathered_copies_freed(model) if is_sharded(model) else None,
        "history": [{k: v for k, v in h.items() if not k.startswith("time")} for h in history]})


if __name__ == "__main__":
    main(*sys.argv[1:])
