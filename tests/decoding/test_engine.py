"""The rollout engine against the reference decode loop: exactness, per-row prefixes, seeds, ensembling, errors."""
import pytest
import torch

from rlprefix import Prefix, generate
from rlprefix.decoding.bank import PrefixBank
from rlprefix.decoding import static_cache
from rlprefix.decoding.engine import sample
from rlprefix.models.sampling import uniforms, seed_halves
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.models.adapter import reference_sample as reference
from rlprefix.models.adapter import score_completions
from tiny import tiny_model

PROMPTS = ["hello world", "Write a one-sentence review of a coffee shop.", "good", "The film was wonderful"]


def prefix_of(model, length, seed):
    return Prefix.for_model(model, length, "kv", generator=torch.Generator().manual_seed(seed)) if length else None


@pytest.fixture
def sharp(arch):
    return tiny_model(arch, sharpen=3.0)


def test_greedy_matches_reference(sharp, tokenizer):
    """Greedy decoding: the same tokens, log-probs and hidden states as the reference loop (fp32)."""
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    assert (mask == 0).any()  # left padding, mixed lengths
    for prefix in (None, prefix_of(sharp, 5, 1)):
        kw = dict(max_new_tokens=12, min_new_tokens=2, temperature=0.8, do_sample=False, return_hidden=True)
        a = reference(sharp, tokenizer, ids, mask, prefix, **kw)
        b = sample(sharp, tokenizer, ids, mask, prefix, **kw)
        assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
        assert (a.logprobs - b.logprobs).abs().max() < 1e-5
        assert (a.hidden - b.hidden).abs().max() < 1e-5
        assert a.texts == b.texts


def test_forced_reference_samples_give_the_same_logprobs(sharp, tokenizer):
    """Sampling: the engine's RNG differs from the reference's, so the engine is fed the reference's sampled tokens
    (teacher forcing) and must record the same policy log-probs and completion mask."""
    ids, mask = encode_prompts(tokenizer, PROMPTS * 2)
    prefix = prefix_of(sharp, 4, 2)
    kw = dict(max_new_tokens=16, temperature=0.7, top_k=40, top_p=0.9)
    a = reference(sharp, tokenizer, ids, mask, prefix, generator=torch.Generator().manual_seed(0), **kw)
    b = sample(sharp, tokenizer, ids, mask, prefix, force_tokens=a.completion_ids, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert (a.logprobs - b.logprobs).abs().max() < 1e-5


def test_sampled_logprobs_equal_recomputed(sharp, tokenizer):
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    prefix = prefix_of(sharp, 5, 3)
    r = sample(sharp, tokenizer, ids, mask, prefix, max_new_tokens=16, temperature=0.7, top_k=50,
               row_seeds=[1, 2, 3, 4])
    s = score_completions(sharp, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, prefix,
                          temperature=0.7)
    m = r.completion_mask.bool()
    assert m.sum() > 10 and (s.logprobs[m] - r.logprobs[m]).abs().max() < 1e-4


def test_mixed_prefix_row_equals_that_row_alone(sharp, tokenizer):
    """Prefixes of lengths 3 and 7 and rows without one in one batch: each row gives the same hidden states
    (hence logits), log-probs and sample as alone with its prefix."""
    pa, pb = prefix_of(sharp, 3, 4), prefix_of(sharp, 7, 5)
    bank = PrefixBank(sharp, {"a": pa, "b": pb})
    rows = [("a", PROMPTS[0]), (None, PROMPTS[1]), ("b", PROMPTS[2]), ("b", PROMPTS[1]), ("a", PROMPTS[3]),
            (None, PROMPTS[2])]
    ids, mask = encode_prompts(tokenizer, [p for _, p in rows])
    index = torch.tensor([bank.index(n) if n else -1 for n, _ in rows])
    seeds = [100 + i for i in range(len(rows))]
    kw = dict(max_new_tokens=10, temperature=0.9, top_p=0.95, return_hidden=True, stop_check_every=3)
    mixed = sample(sharp, tokenizer, ids, mask, bank=bank, prefix_index=index, row_seeds=seeds, **kw)
    for i, (name, prompt) in enumerate(rows):
        one_ids, one_mask = encode_prompts(tokenizer, [prompt])
        alone = sample(sharp, tokenizer, one_ids, one_mask, {"a": pa, "b": pb, None: None}[name],
                       row_seeds=[seeds[i]], **kw)
        n = int(alone.completion_mask.sum())
        assert torch.equal(mixed.completion_ids[i, :n], alone.completion_ids[0, :n])
        assert int(mixed.completion_mask[i].sum()) == n
        assert (mixed.logprobs[i, :n] - alone.logprobs[0, :n]).abs().max() < 1e-5
        assert (mixed.hidden[i, :n] - alone.hidden[0, :n]).abs().max() < 1e-5


def test_seeds_do_not_depend_on_batch_composition(tokenizer):
    model = tiny_model("llama", sharpen=3.0)
    prefix = prefix_of(model, 4, 6)
    kw = dict(max_new_tokens=12, temperature=1.0)
    ids, mask = encode_prompts(tokenizer, PROMPTS[:3])
    a = sample(model, tokenizer, ids, mask, prefix, row_seeds=[7, 8, 9], **kw)
    again = sample(model, tokenizer, ids, mask, prefix, row_seeds=[7, 8, 9], **kw)
    assert torch.equal(a.completion_ids, again.completion_ids)
    ids2, mask2 = encode_prompts(tokenizer, [PROMPTS[2], PROMPTS[3], PROMPTS[0]])  # other neighbours and padding
    b = sample(model, tokenizer, ids2, mask2, prefix, row_seeds=[9, 5, 7], **kw)
    for i, j in ((0, 2), (2, 0)):
        n = int(a.completion_mask[i].sum())
        assert torch.equal(a.completion_ids[i, :n], b.completion_ids[j, :n])
    other = sample(model, tokenizer, ids, mask, prefix, row_seeds=[1, 2, 3], **kw)
    assert not torch.equal(a.completion_ids, other.completion_ids)


def test_counter_based_uniforms():
    seeds = seed_halves(list(range(4000)) + [2**64 - 1, -5], "cpu")
    u0, u1 = uniforms(seeds, torch.tensor(0)), uniforms(seeds, torch.tensor(1))
    assert ((u0 > 0) & (u0 < 1)).all() and abs(u0.mean().item() - 0.5) < 0.02 and abs(u0.std().item() - 0.2887) < 0.02
    assert (u0 != u1).float().mean() > 0.99
    assert torch.equal(uniforms(seeds[10:11], torch.tensor(1)), u1[10:11])  # a row's draw ignores its neighbours


def test_ensemble_of_copies_equals_the_prefix_alone(sharp, tokenizer):
    prefix = prefix_of(sharp, 5, 7)
    kw = dict(max_new_tokens=10, temperature=0.8, top_k=30, seed=3)
    assert generate(sharp, tokenizer, PROMPTS, ensemble=[prefix] * 3, **kw) == generate(sharp, tokenizer, PROMPTS,
                                                                                         prefix, **kw)
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    bank = PrefixBank(sharp, [prefix, prefix, prefix])
    ens = sample(sharp, tokenizer, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), bank=bank,
                 prefix_index=torch.arange(3).repeat(len(PROMPTS)), groups=3, row_seeds=[1, 2, 3, 4],
                 max_new_tokens=10)
    one = sample(sharp, tokenizer, ids, mask, prefix, row_seeds=[1, 2, 3, 4], max_new_tokens=10)
    assert torch.equal(ens.completion_ids, one.completion_ids) and ens.prompt_ids.shape == one.prompt_ids.shape
    assert (ens.logprobs - one.logprobs).abs().max() < 1e-5


def test_ensemble_of_different_prefixes_averages_probabilities(tokenizer):
    model = tiny_model("llama", sharpen=3.0)
    p1, p2 = prefix_of(model, 3, 8), prefix_of(model, 6, 9)
    ids, mask = encode_prompts(tokenizer, PROMPTS[:2])
    ens = sample(model, tokenizer, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0),
                 bank=PrefixBank(model, [p1, p2]), prefix_index=torch.tensor([0, 1, 0, 1]), groups=2,
                 row_seeds=[1, 2], max_new_tokens=1)
    probs = [sample(model, tokenizer, ids, mask, p, force_tokens=ens.completion_ids, max_new_tokens=1).logprobs.exp()
             for p in (p1, p2)]
    assert torch.allclose(ens.logprobs.exp(), (probs[0] + probs[1]) / 2, atol=1e-6)


def test_list_of_prefixes_per_prompt(sharp, tokenizer):
    """generate() with one prefix (or None) per prompt equals generating each prompt alone."""
    pa, pb = prefix_of(sharp, 3, 10), prefix_of(sharp, 6, 11)
    per_prompt = [pa, None, pb, pa]
    mixed = generate(sharp, tokenizer, PROMPTS, per_prompt, seed=5, max_new_tokens=8)
    for i, p in enumerate(per_prompt):
        alone = generate(sharp, tokenizer, PROMPTS, p, seed=5, max_new_tokens=8)
        assert mixed[i] == alone[i]


def test_eos_stops_rows(tokenizer):
    model = tiny_model("llama")
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size), requires_grad=False)
    model.lm_head.bias.data[1] = 50.0  # EOS dominates: every row stops after one token
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    r = sample(model, tokenizer, ids, mask, max_new_tokens=8, row_seeds=[0, 1, 2, 3])
    assert r.completion_ids.shape[1] == 1 and r.completion_mask.sum() == len(PROMPTS)
    r = sample(model, tokenizer, ids, mask, max_new_tokens=8, min_new_tokens=3, row_seeds=[0, 1, 2, 3])
    assert (r.completion_mask.sum(1) == 4).all()


def test_bad_input_fails_clearly(tokenizer):
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    ok, foreign = prefix_of(llama, 3, 1), prefix_of(gpt2, 3, 1)
    with pytest.raises(ValueError, match="2 prefixes for 4 prompts"):
        generate(llama, tokenizer, PROMPTS, [ok, None])
    with pytest.raises(ValueError, match=r"prefix prefixes\[2\] was made for gpt2.*the model is llama"):
        generate(llama, tokenizer, PROMPTS, [ok, None, foreign, ok])
    with pytest.raises(ValueError, match=r"prefix other was made for gpt2"):
        PrefixBank(llama, {"good": ok, "other": foreign})
    with pytest.raises(ValueError, match=r"prefix \[1\] has K/V of shape"):
        PrefixBank(llama, [ok, torch.zeros(2, 2, 3, 5)])
    with pytest.raises(KeyError, match="no prefix named 'x'"):
        PrefixBank(llama, {"good": ok}).index("x")
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    with pytest.raises(ValueError, match=r"prefix_index values must be in \[-1, 0\]"):
        sample(llama, tokenizer, ids, mask, bank=PrefixBank(llama, [ok]), prefix_index=torch.tensor([0, 1, 0, 0]))
    with pytest.raises(ValueError, match="row_seeds has 2 seeds for 4 rows"):
        sample(llama, tokenizer, ids, mask, row_seeds=[1, 2])


def test_evaluate_reward_scores_several_prefixes_in_one_pass(tokenizer):
    from rlprefix import evaluate_reward

    model = tiny_model("llama", sharpen=3.0)
    pa, pb = prefix_of(model, 3, 12), prefix_of(model, 5, 13)

    def length_reward(prompts, completions, **k):
        return [float(len(c)) for c in completions]

    kw = dict(max_new_tokens=8, seed=1, samples_per_prompt=2, batch_size=6)
    together = evaluate_reward(model, tokenizer, {"base": None, "a": pa, "b": pb}, PROMPTS, length_reward, **kw)
    for name, p in (("base", None), ("a", pa), ("b", pb)):
        alone = evaluate_reward(model, tokenizer, p, PROMPTS, length_reward, **kw)
        assert together[name].completions == alone.completions and together[name].rewards == alone.rewards
        assert abs(together[name].kl - alone.kl) < 1e-5
    assert together["base"].kl == 0.0 and together["a"].kl != 0.0
    as_list = evaluate_reward(model, tokenizer, [None, pa], PROMPTS, length_reward, **kw)
    assert [r.completions for r in as_list] == [together["base"].completions, together["a"].completions]


@pytest.mark.real_model
def test_engine_on_the_real_model(real_model):
    """SmolLM2-135M (GQA, 30 layers): greedy tokens identical, forced sampled tokens give the reference's log-probs,
    and a row of a mixed-prefix batch equals that row alone."""
    model, tok = real_model
    pa = Prefix.from_text(model, tok, "Write a warm, friendly and positive reply.", length=10, kind="kv")
    pb = Prefix.from_text(model, tok, "Answer like a pirate.", kind="kv")
    ids, mask = encode_prompts(tok, ["Write a one-sentence review of a motel.", "Describe a cave."])
    a = reference(model, tok, ids, mask, pa, max_new_tokens=10, do_sample=False)
    b = sample(model, tok, ids, mask, pa, max_new_tokens=10, do_sample=False)
    assert torch.equal(a.completion_ids, b.completion_ids) and (a.logprobs - b.logprobs).abs().max() < 1e-5
    a = reference(model, tok, ids, mask, pa, max_new_tokens=10, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b = sample(model, tok, ids, mask, pa, max_new_tokens=10, top_p=0.9, force_tokens=a.completion_ids)
    assert (a.logprobs - b.logprobs).abs().max() < 1e-5
    bank = PrefixBank(model, {"warm": pa, "pirate": pb})
    mixed = sample(model, tok, ids.repeat(2, 1), mask.repeat(2, 1), bank=bank, prefix_index=torch.tensor([0, 1, -1, 1]),
                   row_seeds=[1, 2, 3, 4], max_new_tokens=10)
    alone = sample(model, tok, ids[1:], mask[1:], pb, row_seeds=[2], max_new_tokens=10)
    n = int(alone.completion_mask.sum())
    assert torch.equal(mixed.completion_ids[1, :n], alone.completion_ids[0, :n])
    # other batch shapes round fp32 matmuls differently over 30 layers: 1e-5 relative (seen: 1.3e-5 on -8.75)
    assert torch.allclose(mixed.logprobs[1, :n], alone.logprobs[0, :n], atol=1e-5, rtol=1e-5)


def test_cuda_graph_path_bookkeeping_on_cpu(tokenizer, monkeypatch):
    """The compiled path's bucketing (3 rows padded to 4, cache length rounded to 64) and pooled cache reuse give
    the same result as the plain path; the compiled step itself is replaced by the eager one (no GPU here)."""
    import rlprefix.decoding.engine as eng

    model = tiny_model("llama", sharpen=3.0)
    pa, pb = prefix_of(model, 3, 14), prefix_of(model, 6, 15)
    bank = PrefixBank(model, [pa, pb])
    ids, mask = encode_prompts(tokenizer, PROMPTS[:3])
    kw = dict(bank=bank, prefix_index=torch.tensor([1, -1, 0]), row_seeds=[4, 5, 6], max_new_tokens=9,
              return_hidden=True)
    plain = sample(model, tokenizer, ids, mask, compile=False, **kw)
    monkeypatch.setattr(eng, "compiled_step", lambda m: eng.model_step)
    for _ in range(2):  # the second call reuses (and resets) the pooled cache
        bucketed = sample(model, tokenizer, ids, mask, compile=True, **kw)
        assert torch.equal(plain.completion_ids, bucketed.completion_ids)
        assert (plain.logprobs - bucketed.logprobs).abs().max() < 1e-5
        assert (plain.hidden - bucketed.hidden).abs().max() < 1e-5
    assert list(static_cache._CACHES[model]) == [(4, 64)]


def test_step_hook_sees_each_token_and_can_stop_rows(tokenizer):
    """on_step sees every step's tokens as they are chosen; rows it stops get no more tokens (mask 0), the other rows'
    tokens and log-probs are those of a run without the hook, also after the stopped rows left the batch (eager path)
    and with ensembles; a hook that stops nothing changes nothing."""
    model = tiny_model("llama", sharpen=3.0)
    pa, pb = prefix_of(model, 3, 16), prefix_of(model, 6, 17)
    bank = PrefixBank(model, [pa, pb])
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    kw = dict(bank=bank, prefix_index=torch.tensor([0, 1, -1, 1]), row_seeds=[21, 22, 23, 24], max_new_tokens=14,
              temperature=1.2, return_hidden=True, stop_check_every=5)
    plain = sample(model, tokenizer, ids, mask, **kw)
    assert (plain.completion_mask.sum(1) > 8).all()  # long enough for the stops below to cut something

    seen = []
    quiet = sample(model, tokenizer, ids, mask, **kw,
                   on_step=lambda t, tok, alive: seen.append((tok.tolist(), alive.tolist())))
    assert torch.equal(quiet.completion_ids, plain.completion_ids) and torch.equal(quiet.logprobs, plain.logprobs)
    assert [s[0] for s in seen] == plain.completion_ids.T.tolist()[:len(seen)]
    assert [s[1] for s in seen] == plain.completion_mask.T.tolist()[:len(seen)]

    stop_at = {1: 2, 3: 5}  # row -> the step after which it is stopped

    def hook(t, tok, alive):
        rows = [stop_at.get(b) == t for b in range(len(PROMPTS))]
        return rows if any(rows) else None

    cut = sample(model, tokenizer, ids, mask, on_step=hook, **kw)
    for b in range(len(PROMPTS)):
        n = int(plain.completion_mask[b].sum())
        if b in stop_at:
            n = stop_at[b] + 1
            assert cut.completion_mask[b, n:].sum() == 0
        assert int(cut.completion_mask[b].sum()) == n
        assert torch.equal(cut.completion_ids[b, :n], plain.completion_ids[b, :n])
        assert (cut.logprobs[b, :n] - plain.logprobs[b, :n]).abs().max() < 1e-5
        assert (cut.hidden[b, :n] - plain.hidden[b, :n]).abs().max() < 1e-5

    calls = []
    stop_all = sample(model, tokenizer, ids, mask, on_step=lambda t, tok, alive: calls.append(t) or [True] * 4, **kw)
    assert calls == [0] and stop_all.completion_ids.shape[1] == 1  # everything stopped: the loop ends at once

    ens = dict(bank=PrefixBank(model, [pa, pa]), prefix_index=torch.tensor([0, 1] * 4), groups=2,
               row_seeds=[1, 2, 3, 4], max_new_tokens=10)
    ids2, mask2 = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    a = sample(model, tokenizer, ids2, mask2, **ens)
    b = sample(model, tokenizer, ids2, mask2, **ens,
               on_step=lambda t, tok, alive: [False, True, False, False] if t == 1 else None)
    keep = [0, 2, 3]
    assert torch.equal(a.completion_ids[keep], b.completion_ids[keep]) and b.completion_mask[1].sum() == 2
    with pytest.raises(ValueError, match="rows to stop"):
        sample(model, tokenizer, ids, mask, on_step=lambda t, tok, alive: [True], **kw)


def test_step_hook_on_the_cuda_graph_path_on_cpu(tokenizer, monkeypatch):
    """Under the compiled path (bucketed batch, eager step swapped in) stopped rows idle in their lanes: the same
    result as the eager path with the same hook."""
    import rlprefix.decoding.engine as eng

    model = tiny_model("llama", sharpen=3.0)
    ids, mask = encode_prompts(tokenizer, PROMPTS[:3])
    kw = dict(row_seeds=[4, 5, 6], max_new_tokens=9, on_step=lambda t, tok, alive: [t == 2, False, False])
    plain = sample(model, tokenizer, ids, mask, compile=False, **kw)
    monkeypatch.setattr(eng, "compiled_step", lambda m: eng.model_step)
    bucketed = sample(model, tokenizer, ids, mask, compile=True, **kw)
    assert torch.equal(plain.completion_ids, bucketed.completion_ids)
    assert torch.equal(plain.completion_mask, bucketed.completion_mask) and plain.completion_mask[0].sum() == 3
