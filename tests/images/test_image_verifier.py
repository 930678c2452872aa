"""The image verifier (rlprefix.images.verifier): a caption-free reward that names what it sees in each image and
scores the completion with caption_correctness against that; trained once, cached pickle-free, usable by dotted
path and in PPO on uncaptioned images."""
import json

import pytest
import torch

from rewards import build_reward
from rlprefix.images import caption_records
from rlprefix.images import verifier as vf
from rlprefix.images.data import digits_task, shapes_task
from rlprefix.train.ppo import PPOConfig, ppo
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A verifier trained for 400 steps (about 4 s): enough to name colour and position of training scenes."""
    path = tmp_path_factory.mktemp("verifier") / "v"
    vf.Verifier.load_or_train(path, steps=400)
    return str(path)


def test_image_verifier_is_trained_once_and_saved_without_pickle(folder, monkeypatch):
    meta = json.loads((vf.Path(folder) / vf.FILES[1]).read_text())
    assert meta["format"] == "rlprefix-image-verifier" and meta["seed"] == 1 and len(meta["sha256"]) == 16
    assert set(meta["heldout_composition_accuracy"]) == {"colour", "shape", "position"}
    monkeypatch.setattr(vf, "train_small_cnn", lambda **kw: pytest.fail("retrained a cached verifier"))
    a, b = vf.Verifier.load_or_train(folder), vf.Verifier.load_or_train(folder)
    scenes = [x.image for x in shapes_task("train", 6)]
    assert a.name(scenes, "shapes") == b.name(scenes, "shapes")
    assert not any(p.requires_grad for p in [*a.net.parameters(), *a.heads.parameters()])


def test_image_verifier_names_training_scenes_and_digits(folder):
    v = vf.Verifier.load_or_train(folder)
    scenes = shapes_task("train", 96, seed=3)
    named = v.name([x.image for x in scenes], "shapes")
    assert all(c.startswith("a ") for c in named)
    colour = sum(x.labels["colour"] in c.split()[1] for x, c in zip(scenes, named)) / len(scenes)
    position = sum(x.labels["position"] in c for x, c in zip(scenes, named)) / len(scenes)
    assert colour > 0.9 and position > 0.9, (colour, position)     # chance: 0.25 and 0.2
    digits = digits_task("heldout", 100)
    hits = sum(n == x.caption for x, n in zip(digits, v.name([x.image for x in digits], "digits")))
    assert hits > 50, hits                                          # chance: 10


def test_image_verifier_scores_what_it_sees_not_the_reference_caption(folder):
    reward = build_reward({"name": "rlprefix.images.verifier:ImageVerifier", "folder": folder})
    assert reward.__name__ == "image_verifier"
    scenes = [x.image for x in shapes_task("train", 4)]
    named = reward.verifier.name(scenes, "shapes")
    wrong = ["a purple blob"] * 4
    assert reward(completions=named, images=scenes, captions=wrong) == [1.0] * 4   # the captions column is not read
    colour = named[0].split()[1]
    other = next(c for c in ("red", "green", "blue", "yellow") if c != colour)
    # one of three attributes wrong: 2/3 named, minus 0.5 for naming a colour that is not there
    assert reward(completions=[named[0].replace(colour, other)], images=scenes[:1]) == [pytest.approx(2 / 3 - 0.5)]
    assert reward(completions=["nothing to see"], images=scenes[:1]) == [0.0]


def test_image_verifier_bad_input_names_the_problem(folder, tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        vf.ImageVerifier(task="faces", folder=folder)
    with pytest.raises(ValueError, match="needs the images"):
        vf.ImageVerifier(folder=folder)(completions=["a red circle"])
    (tmp_path / vf.FILES[1]).write_text(json.dumps({"format": "rlprefix-small-cnn"}))
    with pytest.raises(ValueError, match="not an rlprefix image verifier"):
        vf.Verifier.load_or_train(tmp_path)


def test_image_ppo_learns_from_uncaptioned_images_scored_by_the_verifier(folder, tmp_path_factory):
    """RL rows with no caption: the verifier reward gets each group's image (a group shares it) and scores every
    completion (no None: nothing in the rows is needed beyond the image)."""
    from rlprefix import Prefix
    from rlprefix.images.embedded import default_encoder

    cnn = tmp_path_factory.mktemp("encoder") / "cnn"
    default_encoder(cnn, steps=5)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    rows = [{"prompt": r["prompt"], "images": r["images"]} for r in caption_records("builtin:shapes", "Describe.", 8)]
    prefix = Prefix.for_model(model, 3, "image", form="kv", feature_dim=64, encoder=str(cnn), hidden=32, basis=4,
                              generator=torch.Generator().manual_seed(0))
    reward = vf.ImageVerifier(folder=folder)
    seen = []

    def spy(prompts, completions, **kw):
        scores = reward(prompts, completions, **kw)
        seen.append((kw, scores))
        return scores

    cfg = PPOConfig(steps=1, batch_size=8, group_size=4, minibatch_size=4, max_new_tokens=4, progress=False)
    res = ppo(model, tok, prefix, rows, spy, cfg)
    (columns, scores), = seen
    assert res.steps_done == 1 and "captions" not in columns and len(columns["images"]) == 8
    assert columns["images"][0].tobytes() == columns["images"][3].tobytes()
    assert len(scores) == 8 and all(0.0 <= s <= 1.0 for s in scores)
