"""Rewards: built-in orderings, TRL contract, registry, composite weights, hygiene."""
import math

import pytest
import torch

from rewards import REGISTRY, Composite, RewardError, build_reward, load_callable
from rlprefix.train.scorer import Scorer
from tiny import tiny_model, tiny_tokenizer


def my_reward(prompts, completions, bonus=0.0, **kw):
    """A user reward reachable by dotted path (tests: tests/rewards/test_rewards.py on sys.path)."""
    return [len(c) + bonus for c in completions]


def test_builtins_are_registered():
    assert {"sentiment", "similarity", "keywords", "regex", "length", "fluency", "classifier",
            "composite"} <= set(REGISTRY)


def test_sentiment_orders_and_flips():
    pos = build_reward("sentiment")
    love, hate, neutral = pos(prompts=["p"] * 3, completions=["I love it", "I hate it", "It is a table."])
    assert love > neutral > hate and love > 0.5 and hate < -0.5
    neg = build_reward({"name": "sentiment", "target": "negative"})
    assert neg(["p"], ["I love it"])[0] == pytest.approx(-love)


def test_similarity_to_itself_is_one_and_column_references():
    sim = build_reward("similarity", reference="The weather is sunny and warm today.")
    same, near, far = sim(["p"] * 3, ["The weather is sunny and warm today.", "It is a warm, sunny day.",
                                      "Quarterly tax filings are due."])
    assert same == pytest.approx(1.0, abs=1e-4) and near > far
    by_col = build_reward("similarity")
    a, b = by_col(["p", "p"], ["a red apple", "a red apple"], reference=["a red apple", "stock markets fell"])
    assert a == pytest.approx(1.0, abs=1e-4) and b < 0.5
    with pytest.raises(ValueError, match="needs reference= or a dataset column 'reference'"):
        by_col(["p"], ["x"])


def test_keywords_regex_length():
    kw = build_reward("keywords", words={"great": 1.0, "bad": -2.0})
    assert kw(None, ["great great stuff", "bad but great", "nothing"]) == [1.0, -1.0, 0.0]
    rx = build_reward("regex", patterns={r"^\w": 0.5, r"\.$": 0.5})
    assert rx(None, ["Done.", " no"]) == [1.0, 0.0]
    ln = build_reward("length", target=4, tolerance=2)
    assert ln(None, ["one two three four", "one two three", "one", "a b c d e f g h i j"]) == [1.0, 0.5, -0.5, -1.0]
    tok_len = build_reward("length", target=3, unit="tokens", tokenizer=tiny_tokenizer())
    assert len(tok_len(None, ["hello"])) == 1
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_reward("length", target=3, unit="tokens")


def test_fluency_prefers_the_models_own_text():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    from rlprefix.decoding.prompts import encode_prompts
    from rlprefix.models.adapter import reference_sample as sample

    ids, mask = encode_prompts(tok, ["hello world"] * 4)
    greedy = sample(model, tok, ids, mask, max_new_tokens=6, do_sample=False).texts[0]
    flu = build_reward("fluency", context={"model": model, "tokenizer": tok})
    own, other = flu(["hello world"] * 2, [greedy, "zq xv kk pf"])
    assert own > other


def test_fluency_equals_rlprefix_scoring_of_the_same_tokens():
    """The reward runs plain transformers; it must agree with rlprefix's own scorer (left-padded batch)."""
    from rlprefix.decoding.prompts import encode_prompts
    from rlprefix.models.adapter import score_completions

    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts, completions = ["hello world", "The film was wonderful and long"], ["good day", "not bad at all"]
    got = build_reward("fluency", context={"model": model, "tokenizer": tok})(prompts, completions)
    ids, mask = encode_prompts(tok, prompts)
    tok.padding_side = "right"
    enc = tok(completions, add_special_tokens=False, padding=True, return_tensors="pt")
    lp = score_completions(model, ids, mask, enc["input_ids"], enc["attention_mask"]).logprobs
    m = enc["attention_mask"]
    want = ((lp * m).sum(1) / m.sum(1)).tolist()
    assert got == pytest.approx(want, abs=1e-5)


def test_classifier_scores_a_label(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=2, id2label={0: "NEG", 1: "POS"}, label2id={"NEG": 0, "POS": 1})
    BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    pos = build_reward("classifier", model=str(tmp_path), label="pos")
    neg = build_reward("classifier", model=str(tmp_path), label=0)
    texts = ["good film", "bad film"]
    for p, n in zip(pos(None, texts), neg(None, texts)):
        assert p + n == pytest.approx(1.0, abs=1e-5) and 0 < p < 1
    with pytest.raises(ValueError, match="has no label 'neutral'"):
        build_reward("classifier", model=str(tmp_path), label="neutral")


def test_dotted_path_and_bad_paths():
    fn = build_reward("test_rewards:my_reward")
    assert fn(["p"], ["abc"]) == [3]
    with_opts = build_reward({"name": "test_rewards:my_reward", "bonus": 1.5})
    assert with_opts(["p"], ["abc"]) == [4.5]
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        load_callable("no_such_module:fn")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        build_reward("test_rewards:nope")
    with pytest.raises(ValueError, match="did you mean 'sentiment'"):
        build_reward("sentimnt")


def test_composite_weights_add_up():
    comp = build_reward("composite", components=[
        {"name": "keywords", "words": ["great"], "weight": 2.0},
        {"name": "length", "target": 2, "tolerance": 2, "weight": -0.5, "label": "len"}])
    assert isinstance(comp, Composite)
    out = comp(["p", "p"], ["great stuff", "meh"])
    assert out == [2.0 * 1 - 0.5 * 1.0, 2.0 * 0 - 0.5 * 0.5]
    assert comp.last_components == {"keywords": [1.0, 0.0], "len": [1.0, 0.5]}


def test_scorer_hygiene():
    def nan_reward(prompts, completions, **kw):
        return [1.0, math.nan]

    def broken(prompts, completions, **kw):
        raise KeyError("label")

    with pytest.raises(RewardError, match=r"reward 'nan_reward' returned nan at sample 1 \(prompt 'b', completion 'y'\)"):
        Scorer(nan_reward)(["a", "b"], ["x", "y"])
    with pytest.raises(RewardError, match="reward 'broken' raised KeyError"):
        Scorer(broken)(["a"], ["x"])
    r, metrics = Scorer(nan_reward, on_error="penalty", penalty=-3.0)(["a", "b"], ["x", "y"])
    assert r.tolist() == [1.0, -3.0] and metrics["reward/invalid"] == 1
    clipped, _ = Scorer(lambda prompts, completions, **k: [5.0, -5.0], clip=2.0)(["a", "b"], ["x", "y"])
    assert clipped.tolist() == [2.0, -2.0]
    norm = Scorer(lambda prompts, completions, **k: [1.0, 2.0, 3.0], normalize=True)
    out, _ = norm(["a"] * 3, ["x"] * 3)
    assert out.tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    state = norm.state_dict()
    again = Scorer(lambda prompts, completions, **k: [1.0, 2.0, 3.0], normalize=True)
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_trl_accepts_and_calls_a_builtin(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    calls = []
    sentiment = build_reward("sentiment")

    def recording(prompts, completions, **kw):
        calls.append((prompts, completions, sorted(kw)))
        return sentiment(prompts=prompts, completions=completions, **kw)

    recording.__name__ = "sentiment"
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.requires_grad_(True)
    args = trl.GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, num_generations=2,
                          max_completion_length=4, report_to=[], use_cpu=True, gradient_checkpointing=False,
                          logging_steps=1, save_strategy="no", bf16=False)
    ds = Dataset.from_dict({"prompt": ["hello world", "a calm park"], "reference": ["x", "y"]})
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[sentiment, recording], args=args, train_dataset=ds,
                              processing_class=tok)
    trainer.train()
    assert calls, "TRL never called the reward"
    prompts, completions, kwargs = calls[0]
    assert len(prompts) == len(completions) and "completion_ids" in kwargs and "reference" in kwargs


def test_similarity_builds_with_the_run_context():
    """A run injects the frozen LM as `model`; the similarity reward's encoder must not take it (it did)."""
    from rewards import build_reward

    reward = build_reward({"name": "similarity", "reference": "a calm day"}, {"model": object(), "device": "cpu"})
    same, other = reward(prompts=["p", "p"], completions=["a calm day", "loud traffic jam"])
    assert same > 0.99 and other < same
