"""A prefix in plain transformers (`rlprefix.generate_kwargs`): transformers' own `model.generate` gives the same
greedy tokens as rlprefix's engine, batched with left padding, on decoder-only and encoder-decoder models; and no
rlprefix call raises transformers' cache-argument deprecation warning."""
import warnings

import pytest
import torch
from tiny import tiny_model

import rlprefix
from rlprefix import Prefix
from rlprefix.decoding.engine import sample
from rlprefix.decoding.plain_generate import new_tokens
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.models.family import cache_keyword

PROMPTS = ["hello world", "The film was wonderful and the actors", "good"]


def prefix_of(model, length=5, seed=1):
    return Prefix.for_model(model, length, "kv", init_std=1.0, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "llama-mqa", "qwen2", "t5", "t5-even", "bart"])
def test_transformers_generate_matches_rlprefix(arch, tokenizer):
    model = tiny_model(arch, sharpen=3.0)
    ids, mask = encode_prompts(tokenizer, PROMPTS, chat=False)
    assert bool((mask[:, 0] == 0).any())  # left padding is exercised
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=1)
    prefix = prefix_of(model)
    ours = sample(model, tokenizer, ids, mask, prefix, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    kw = rlprefix.generate_kwargs(prefix, model, ids, mask, tokenizer=tokenizer)
    assert cache_keyword(model) in kw
    theirs = new_tokens(model.generate(**kw, **gen), kw)
    assert torch.equal(theirs, ours.completion_ids)
    # the prefix reaches the model: without it transformers' first-step scores differ beyond float noise
    scored = dict(gen, max_new_tokens=1, min_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    with_prefix = model.generate(**rlprefix.generate_kwargs(prefix, model, ids, mask), **scored).logits[0]
    bare = model.generate(**rlprefix.generate_kwargs(None, model, ids, mask), **scored).logits[0]
    assert (with_prefix - bare).abs().max() > 1e-2


def test_generate_kwargs_takes_a_kv_tensor_and_builds_a_fresh_cache(tokenizer):
    model = tiny_model("llama", sharpen=3.0)
    prefix = prefix_of(model)
    ids, mask = encode_prompts(tokenizer, PROMPTS, chat=False)
    a = rlprefix.generate_kwargs(prefix.key_values(), model, ids, mask)
    b = rlprefix.generate_kwargs(prefix, model, ids, mask)
    assert a[cache_keyword(model)] is not b[cache_keyword(model)]
    assert a["attention_mask"].shape == (len(PROMPTS), 5 + ids.shape[1]) and bool(a["attention_mask"][:, :5].all())
    out_a = model.generate(**a, max_new_tokens=4, do_sample=False, pad_token_id=0)
    out_b = model.generate(**b, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out_a, out_b)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_rlprefix_calls_raise_no_cache_deprecation_warning(arch, tokenizer):
    """Every forward rlprefix makes (scoring, the reference loop, the engine, text K/V) passes the cache under the
    keyword the installed transformers takes: no `past_key_values` -> `cache` deprecation, whatever the version."""
    model = tiny_model(arch)
    ids, mask = encode_prompts(tokenizer, PROMPTS, chat=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prefix = Prefix.from_text(model, tokenizer, "a calm park", 4, "kv")
        roll = rlprefix.reference_sample(model, tokenizer, ids, mask, prefix, max_new_tokens=3)
        sample(model, tokenizer, ids, mask, prefix, max_new_tokens=3)
        rlprefix.models.score_completions(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids,
                                          roll.completion_mask, prefix)
        rlprefix.generate(model, tokenizer, PROMPTS, prefix, max_new_tokens=3)
    cache_warnings = [str(w.message) for w in caught if "past_key_values" in str(w.message) or
                      "cache" in str(w.message).lower() and issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not cache_warnings, cache_warnings
