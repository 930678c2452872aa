"""embedding_classifier: a logistic-regression head on the embedded MiniLM, fit on labelled examples when built."""
import pytest

from rewards import REGISTRY, build_reward

EXAMPLES = {"casual": ["lol this place is awesome", "yeah it was ok i guess", "omg the coffee is sooo good",
                       "ngl the pizza kinda slaps"],
            "formal": ["The establishment offers a commendable selection of beverages.",
                       "The museum presents a comprehensive overview of regional history.",
                       "Service was prompt and the staff conducted themselves professionally.",
                       "The hotel room was clean, adequately furnished and well maintained."]}
TEXTS = ["wow the tea shop is so cozy, loved it", "The exhibition is thoughtfully curated and informative.",
         "lol this place is awesome"]


def test_scores_the_target_label_deterministically():
    assert "embedding_classifier" in REGISTRY
    casual = build_reward({"name": "embedding_classifier", "examples": EXAMPLES, "target": "casual"},
                          {"model": object(), "device": "cpu"})  # a run's context: the LM is not the encoder
    new, formal, seen = casual(["p"] * 3, TEXTS)
    assert new > 0.55 and formal < 0.35 and seen > 0.65, (new, formal, seen)
    assert casual(["p"] * 3, TEXTS) == [new, formal, seen]  # the same classifier scores the same texts alike
    again = build_reward({"name": "embedding_classifier", "examples": EXAMPLES, "target": "casual"})
    assert again(["p"] * 3, TEXTS) == pytest.approx([new, formal, seen], abs=1e-6)  # built again: the same fit
    other = build_reward({"name": "embedding_classifier", "examples": EXAMPLES, "target": "formal"})
    assert [a + b for a, b in zip(other(None, TEXTS), (new, formal, seen))] == pytest.approx([1.0] * 3, abs=1e-6)


def test_refuses_bad_examples():
    with pytest.raises(ValueError, match="needs examples for >= 2 labels"):
        build_reward("embedding_classifier", examples={"casual": ["hi"]}, target="casual")
    with pytest.raises(ValueError, match="target 'rude' is not a label"):
        build_reward("embedding_classifier", examples=EXAMPLES, target="rude")
