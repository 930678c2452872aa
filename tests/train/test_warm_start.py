"""Warm start: loss goes down, completion-only labels, merge keeps eval loss, exact resume, clear errors."""
import logging
from pathlib import Path

import pytest
import torch

from rlprefix import Prefix
from rlprefix.train.data import collate_sft, load_records, tokenize_sft
from rlprefix.train.warm_start import WarmStartConfig, evaluate_loss, warm_start
from tiny import tiny_model, tiny_tokenizer

DATA = [{"prompt": f"review {w}", "completion": f"{w} is good great love"} for w in
        ["film", "food", "phone", "hotel", "park", "room", "staff", "actors"]]


def cfg(**kw):
    base = dict(steps=30, batch_size=4, lr=1e-2, warmup_steps=3, eval_every=10, eval_fraction=0.25,
                progress=False, seed=0)
    return WarmStartConfig(**{**base, **kw})


def test_loss_decreases(arch):
    model, tok = tiny_model(arch), tiny_tokenizer()
    prefix = Prefix.for_model(model, 8, "mlp", mlp_hidden=64, generator=torch.Generator().manual_seed(0))
    res = warm_start(model, tok, prefix, DATA, cfg(merge=False, steps=40))
    first, last = res.history[0]["loss"], res.history[-1]["loss"]
    assert last < 0.85 * first
    assert res.best_eval_loss <= res.history[9]["eval_loss"]


def test_only_completion_tokens_carry_labels():
    tok = tiny_tokenizer()
    ds = load_records([{"prompt": "review film", "completion": "good"}])
    (ex,) = tokenize_sft(ds, tok, max_length=64)
    rendered = tok.apply_chat_template([{"role": "user", "content": "review film"}], tokenize=False,
                                       add_generation_prompt=True)
    prompt_len = len(tok(rendered, add_special_tokens=False)["input_ids"])
    completion = tok("good" + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert ex.labels == [-100] * prompt_len + completion
    assert ex.input_ids[prompt_len:] == completion
    chat = load_records([{"messages": [{"role": "user", "content": "review film"},
                                       {"role": "assistant", "content": "good"}]}])
    assert tokenize_sft(chat, tok, max_length=64)[0].labels == ex.labels


def test_merge_keeps_eval_loss():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prefix = Prefix.for_model(model, 4, "mlp", mlp_hidden=32)
    res = warm_start(model, tok, prefix, DATA, cfg(steps=10, merge=False))
    examples = tokenize_sft(load_records(DATA), tok)
    before = evaluate_loss(model, res.prefix, examples, tok.pad_token_id)
    after = evaluate_loss(model, res.prefix.merge(), examples, tok.pad_token_id)
    assert after == pytest.approx(before, abs=1e-5)


def test_resume_equals_uninterrupted(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    config = cfg(steps=8, checkpoint_every=3, eval_every=4, grad_accum=2)

    def fresh():
        return Prefix.for_model(model, 4, "mlp", mlp_hidden=32, generator=torch.Generator().manual_seed(7))

    full = warm_start(model, tok, fresh(), DATA, config, output_dir=tmp_path / "a")

    def dies_after_step_5(step, record):  # the last checkpoint before it is step 3's
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        warm_start(model, tok, fresh(), DATA, config, output_dir=tmp_path / "b", on_step=dies_after_step_5)
    resumed = warm_start(model, tok, fresh(), DATA, config, output_dir=tmp_path / "b")
    for k, v in full.prefix.state_dict().items():
        assert torch.equal(v, resumed.prefix.state_dict()[k]), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    lines = (tmp_path / "b" / "warm_start_metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8  # no duplicated steps after the resume
    assert (tmp_path / "b" / "warm_start_curves.png").stat().st_size > 1000


def test_clear_errors(tmp_path, caplog):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prefix = Prefix.for_model(model, 4, "mlp", mlp_hidden=32)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        warm_start(model, tok, prefix, [], cfg())
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        warm_start(model, tok, prefix, str(empty), cfg())
    with pytest.raises(ValueError, match=r"needs column\(s\) \['completion'\]"):
        warm_start(model, tok, prefix, [{"prompt": "a"}, {"prompt": "b"}], cfg())
    long_prompt = [{"prompt": "hello world " * 40, "completion": "good"}] * 2
    with pytest.raises(ValueError, match="example 0: the prompt alone is .* nothing of the completion fits"):
        warm_start(model, tok, prefix, long_prompt, cfg(max_length=32))
    with caplog.at_level(logging.WARNING, logger="rlprefix"):
        tokenize_sft(load_records([{"prompt": "a", "completion": "good great " * 30}]), tok, max_length=24)
    assert [r.getMessage() for r in caplog.records if "max_length" in r.getMessage()] == [
        "1 of 1 examples were longer than max_length=24 and lost completion tokens from the end"]
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_example_data_loads():
    root = Path(__file__).resolve().parents[2] / "examples" / "data"
    ds = load_records(str(root / "reviews.jsonl"))
    assert len(ds) >= 50 and set(ds.column_names) == {"prompt", "completion"}
    batch = collate_sft(tokenize_sft(ds.select(range(4)), tiny_tokenizer()), 0)
    assert batch["input_ids"].shape == batch["labels"].shape
