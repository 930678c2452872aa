"""The model-family adapter: one family per model, picked from its config (or a prefix's KVSpec); what each family
supports and how it refuses the rest; the cache argument passed under the keyword the installed transformers takes."""
import inspect

import pytest
import torch
from tiny import tiny_model

import rlprefix
from rlprefix.models import family_of, kv_spec
from rlprefix.models.decoder_only import DecoderOnly
from rlprefix.models.encoder_decoder import EncoderDecoder
from rlprefix.models.family import FEATURES, cache_keyword, call, output_cache


@pytest.mark.parametrize("arch,family", [("gpt2", DecoderOnly), ("llama", DecoderOnly), ("qwen2", DecoderOnly),
                                         ("t5", EncoderDecoder), ("bart", EncoderDecoder)])
def test_one_family_per_model_from_model_config_or_spec(arch, family):
    model = tiny_model(arch)
    assert isinstance(family_of(model), family)
    assert family_of(model) is family_of(model.config) is family_of(kv_spec(model))
    assert family_of(model).name == kv_spec(model).family


def test_what_each_family_supports_and_how_it_refuses():
    dec, s2s = family_of(tiny_model("llama")), family_of(tiny_model("t5"))
    assert all(dec.supports(f) for f in FEATURES)
    assert (dec.peft_task_type, dec.peft_submodules, s2s.peft_task_type, s2s.peft_submodules) == (
        "CAUSAL_LM", 1, "SEQ_2_SEQ_LM", 2)
    assert not s2s.supports("serve") and not s2s.supports("prompt_prefix") and s2s.supports.__self__ is s2s
    with pytest.raises(ValueError, match=r"rlprefix serve \(continuous batching\) is not supported on encoder-decoder "
                                         r"models \(T5ForConditionalGeneration is an encoder-decoder model\); why"):
        s2s.require("serve", tiny_model("t5"), hint="why")
    with pytest.raises(ValueError, match="a 'prompt' prefix"):
        rlprefix.Prefix.for_model(tiny_model("t5"), 3, "prompt")
    with pytest.raises(KeyError, match="unknown feature"):
        dec.supports("nope")


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_the_cache_goes_under_the_keyword_the_forward_takes(arch):
    model = tiny_model(arch)
    params = inspect.signature(type(model).forward).parameters
    assert cache_keyword(model) == ("cache" if "cache" in params else "past_key_values")
    assert cache_keyword(model) in params
    ids = torch.tensor([[5, 6, 7]])
    inputs = dict(input_ids=ids, use_cache=True) if arch == "llama" else dict(
        input_ids=ids, decoder_input_ids=torch.tensor([[0]]), use_cache=True)
    out = call(model, None, **inputs)
    assert output_cache(out) is not None and output_cache(out).get_seq_length() > 0
