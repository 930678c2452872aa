"""PEFT export sampled through `PeftModel.generate`, not only forward logits: where the installed PEFT/transformers pair
applies prefix adapters in generate, its greedy tokens equal rlprefix's; where it ignores them (PEFT 0.21 with
transformers >= 5.24), the probe says so, the export still writes the adapter and warns in one line, and
`generate_kwargs` is the route that works."""
import logging

import pytest
import torch
from tiny import tiny_model, peft_calls

import rlprefix
from rlprefix import Prefix
from rlprefix.decoding.engine import sample
from rlprefix.decoding.plain_generate import new_tokens
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.prefixes.peft_generate import ignored_warning, peft_generate_applies_prefix, versions

peft = pytest.importorskip("peft")
PROMPTS = ["hello world", "The film was wonderful and the actors"]


@peft_calls  # PEFT's own generate/forward inject `past_key_values` (the very thing measured here)
def test_peft_generate_with_an_exported_prefix(tmp_path, tokenizer, caplog):
    model = tiny_model("llama", sharpen=3.0)
    prefix = Prefix.for_model(model, 5, "kv", init_std=1.0, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="rlprefix"):
        rlprefix.export_peft(prefix, model, tmp_path / "peft")
    printed = [r.getMessage() for r in caplog.records]
    ids, mask = encode_prompts(tokenizer, PROMPTS, chat=False)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=1)
    ours = sample(model, tokenizer, ids, mask, prefix, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    pm = peft.PeftModel.from_pretrained(model, tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = pm.generate(input_ids=ids, attention_mask=mask, **gen)[:, ids.shape[1]:]
    base_kw = rlprefix.generate_kwargs(None, model, ids, mask)
    bare = new_tokens(model.generate(**base_kw, **gen), base_kw)
    applies = peft_generate_applies_prefix()
    assert applies is not None
    full = mask.all(1)  # the unpadded row: PEFT 0.18 ignores position ids in generate, so padded rows drift
    assert bool(full.any())
    if applies:
        assert torch.equal(theirs[full], ours.completion_ids[full]) and ignored_warning() is None
        assert not any("PEFT's generate ignores" in line for line in printed)
    else:  # PEFT samples the bare model: what the probe detected and the warning says
        assert torch.equal(theirs[full], bare[full])
        assert not torch.equal(theirs, ours.completion_ids)
        assert ignored_warning().startswith(f"with {versions()}, PEFT's generate ignores")
        assert "rlprefix.generate_kwargs" in ignored_warning()
        assert printed == [ignored_warning()]  # the export still wrote the adapter, and said so in one line
        assert (tmp_path / "peft" / "adapter_model.safetensors").exists()
    kw = rlprefix.generate_kwargs(prefix, model, ids, mask)  # the route that works either way
    assert torch.equal(new_tokens(model.generate(**kw, **gen), kw), ours.completion_ids)
