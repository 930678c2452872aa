"""The sampling rules defined once: the pad token (padding, finished rows, collated batches) and the inverse-CDF
sampler that both the reference loops and the rollout engine draw with."""
from pathlib import Path

import torch
from tiny import tiny_model, tiny_tokenizer

from rlprefix.models.sampling import choose, eos_ids, inverse_cdf, next_tokens, pad_token_id, row_generators

ROOT = Path(__file__).resolve().parents[2]


def test_one_pad_rule():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    assert pad_token_id(tok, model) == tok.pad_token_id
    tok.pad_token = None
    model.generation_config.eos_token_id = [7, 1]
    assert pad_token_id(tok, model) == min(eos_ids(model, tok)) == 1  # the smallest end-of-sequence id
    tok.eos_token = None
    model.generation_config.eos_token_id = None
    assert pad_token_id(tok, model) == 0  # nothing to fall back on


def test_the_rule_and_the_sampler_are_written_once():
    """No other module restates a pad fallback or an inverse-CDF draw."""
    sources = {p: p.read_text() for p in (ROOT / "rlprefix").rglob("*.py")}
    assert [p.name for p, s in sources.items() if "searchsorted" in s] == ["sampling.py"]
    assert not [p for p, s in sources.items() if "pad_token_id if" in s or "pad_token_id is not None else" in s]


def test_both_samplers_draw_through_inverse_cdf():
    logits = torch.randn(4, 11)
    u = torch.tensor([0.1, 0.5, 0.9, 0.99])
    probs = torch.softmax(logits, -1)
    assert torch.equal(choose(torch.log_softmax(logits, -1), u, 0, 1.0), inverse_cdf(probs, u))
    gens = row_generators([3, 4, 5, 6], 4)
    draws = torch.cat([torch.rand(1, generator=g) for g in row_generators([3, 4, 5, 6], 4)])
    stop = torch.tensor([1])
    assert torch.equal(next_tokens(logits.clone(), stop, False, True, 1.0, 0, 1.0, gens, None),
                       inverse_cdf(probs, draws))
