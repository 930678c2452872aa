"""Group RL samples k completions per prompt; the engine's prefill and `score_completions` run each distinct
prompt once. These tests pin that the shortcut computes the same thing as running every row in full."""
import torch

from rlprefix import Prefix, PPOConfig
from rlprefix.distributed.groups import Dist
from rlprefix.decoding.engine import sample
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.models.adapter import reference_sample as reference
from rlprefix.train.ppo import BatchShard
from rlprefix.models.adapter import score_completions
from tiny import tiny_model

PROMPTS = ["hello world", "The film was wonderful", "good"]


def grouped(tokenizer, k=3):
    return encode_prompts(tokenizer, [p for p in PROMPTS for _ in range(k)])


def test_shared_prefill_matches_the_reference_loop(arch, tokenizer):
    model = tiny_model(arch, sharpen=3.0)
    ids, mask = grouped(tokenizer)
    assert (mask == 0).any()  # left padding inside the shared prompts
    for prefix in (None, Prefix.for_model(model, 4, "kv", generator=torch.Generator().manual_seed(0))):
        kw = dict(max_new_tokens=10, temperature=0.8, do_sample=False, return_hidden=True)
        a, b = reference(model, tokenizer, ids, mask, prefix, **kw), sample(model, tokenizer, ids, mask, prefix, **kw)
        assert torch.equal(a.completion_ids, b.completion_ids)
        assert (a.logprobs - b.logprobs).abs().max() < 1e-5 and (a.hidden - b.hidden).abs().max() < 1e-5


def test_shared_scoring_equals_full_scoring_with_gradients(arch, tokenizer):
    model = tiny_model(arch, sharpen=3.0)
    ids, mask = grouped(tokenizer)
    prefix = Prefix.for_model(model, 4, "mlp", generator=torch.Generator().manual_seed(1))
    r = sample(model, tokenizer, ids, mask, prefix, max_new_tokens=8, row_seeds=list(range(len(ids))))
    for row, end in ((1, 5), (4, 2)):  # rows that stopped early: right padding in the completions
        r.completion_mask[row, end:] = 0
        r.completion_ids[row, end:] = tokenizer.pad_token_id
    out = {}
    for share in (False, True):
        prefix.zero_grad()
        s = score_completions(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, prefix,
                              temperature=0.9, output_hidden=True, share_prompts=share)
        (s.logprobs * r.completion_mask).sum().backward()
        out[share] = (s.logprobs * r.completion_mask, s.hidden, [p.grad.clone() for p in prefix.parameters()])
    assert (out[True][0] - out[False][0]).abs().max() < 1e-5
    assert (out[True][1] - out[False][1]).abs().max() < 1e-5
    for g_shared, g_full in zip(out[True][2], out[False][2]):
        assert g_full.abs().max() > 0 and (g_shared - g_full).abs().max() < 1e-5 * (1 + g_full.abs().max())


def test_minibatches_hold_whole_groups():
    cfg = PPOConfig(batch_size=32, group_size=4, minibatch_size=8)
    shard = BatchShard(cfg, 100, Dist())
    mbs = [mb.tolist() for mb in shard.minibatches(step=3, epoch=0)]
    assert sorted(r for mb in mbs for r in mb) == list(range(32))  # a permutation of the batch
    for mb in mbs:
        assert len({r // 4 for r in mb}) == 2  # two whole prompts per minibatch of 8
    other = [mb.tolist() for mb in shard.minibatches(step=4, epoch=0)]
    assert other != mbs  # shuffled per step
    odd = BatchShard(PPOConfig(batch_size=12, group_size=4, minibatch_size=6), 100, Dist())
    assert sorted(r for mb in odd.minibatches(0, 0) for r in mb.tolist()) == list(range(12))
