"""The image prefix (kind "image", issue #26): both forms ("kv": the mapper mixes a K/V basis; "embedding": mapped
input-embedding tokens) on tiny random models and a tiny image encoder: per-row K/V, the shared-prompt scoring
path, generate with images, save/load, the warm start, PPO with images= passed to rewards, evaluation, a `rlprefix
run` with kind image, refusals and bad input."""
import io
import json
import re

import pytest
import torch
import yaml
from PIL import Image

from rlprefix import Prefix, export_peft, generate, kv_spec, load_prefix
from rlprefix.config import load_config
from rlprefix.decoding.engine import sample
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.images import caption_records, image_features
from rlprefix.images.data import shapes_task
from rlprefix.images.embedded import default_encoder
from rlprefix.models.adapter import score_completions
from rlprefix.prefixes.dynamic import REFUSALS
from rlprefix.prefixes.image import ImagePrefix
from rlprefix.prefixes.lowrank import compress
from rlprefix.settings import ConfigError
from rlprefix.train.evaluate import evaluate_reward
from rlprefix.train.ppo import PPOConfig, ppo
from rlprefix.train.warm_start import WarmStartConfig, warm_start
from tiny import tiny_model, tiny_tokenizer

FORMS = ["kv", "embedding"]
PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """A tiny image encoder folder (a few training steps: deterministic, different features per image)."""
    folder = tmp_path_factory.mktemp("encoder") / "cnn"
    default_encoder(folder, steps=5)
    return str(folder)


@pytest.fixture(scope="module")
def scenes():
    return shapes_task("train", 8)


def image_prefix(model, cnn, form, length=3, seed=0, **kw):
    return Prefix.for_model(model, length, "image", form=form, feature_dim=64, encoder=cnn, hidden=32, basis=4,
                            generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("form", FORMS)
def test_image_prefix_gives_each_row_its_own_kv(form, cnn, scenes):
    model = tiny_model("llama")
    spec = kv_spec(model)
    prefix = image_prefix(model, cnn, form)
    assert isinstance(prefix, ImagePrefix) and prefix.kind == "image" and prefix.form == form
    feats = image_features(prefix, [s.image for s in scenes[:4]])
    assert feats.shape == (4, 64)
    kv = prefix.key_values(model, features=feats)
    assert kv.shape == (4, spec.num_layers, 2, 3, spec.kv_dim)
    assert not torch.allclose(kv[0], kv[1])                       # different images, different prefixes
    same = prefix.key_values(model, features=feats[[0, 0]])
    assert torch.allclose(same[0], same[1], atol=1e-5) and torch.allclose(same[0], kv[0], atol=1e-5)
    if form == "kv":  # base + the mapper's coefficients over the basis
        coef = prefix.coefficients(feats)
        assert torch.allclose(kv, prefix.base + torch.einsum("rb,blckd->rlckd", coef, prefix.basis), atol=1e-6)
    with pytest.raises(ValueError, match="needs one image per prompt|needs an image per row"):
        prefix.key_values(model)
    with pytest.raises(ValueError, match=r"takes image features \[rows, 64\]"):
        prefix.key_values(model, features=torch.zeros(2, 5))


@pytest.mark.parametrize("form", FORMS)
def test_image_prefix_scores_shared_prompts_exactly_and_trains_the_mapper(form, cnn, scenes):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prefix = image_prefix(model, cnn, form)
    feats = image_features(prefix, [s.image for s in scenes[:2]])
    bound = prefix.bind(torch.cat([feats, feats]))                  # one prompt, two images, each twice
    ids, mask = encode_prompts(tok, [PROMPT] * 4)
    roll = sample(model, tok, ids, mask, bound, max_new_tokens=4, row_seeds=[1, 2, 3, 4])
    m = roll.completion_mask
    shared = score_completions(model, ids, mask, roll.completion_ids, m, bound).logprobs
    alone = score_completions(model, ids, mask, roll.completion_ids, m, bound, share_prompts=False).logprobs
    assert torch.allclose(shared * m, alone * m, atol=1e-5)         # rows share a prompt only with the same image
    assert torch.allclose(roll.logprobs, shared * m, atol=1e-4)    # the engine's log-probs are the scorer's
    (shared * m).sum().backward()
    grads = {n: float(p.grad.abs().sum()) for n, p in prefix.named_parameters()}
    assert all(g > 0 for n, g in grads.items() if n.startswith("mapper")), grads


@pytest.mark.parametrize("form", FORMS)
def test_generate_with_images_and_save_load(form, cnn, scenes, tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prefix = image_prefix(model, cnn, form)
    prefix.fit_features(image_features(prefix, [s.image for s in scenes]))
    images = [s.image for s in scenes[:3]]
    out = generate(model, tok, [PROMPT] * 3, prefix, images=images, do_sample=False, max_new_tokens=6)
    # batching does not change a row: each image alone gives the same completion
    assert out == [generate(model, tok, [PROMPT], prefix, images=[im], do_sample=False, max_new_tokens=6)[0]
                   for im in images]
    prefix.save(tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["kind"] == "image" and manifest["config"]["form"] == form
    assert manifest["config"]["encoder"] == cnn and manifest["config"]["feature_dim"] == 64
    assert not list((tmp_path / "p").glob("*.bin")) and not list((tmp_path / "p").glob("*.pt"))
    loaded = load_prefix(tmp_path / "p", model)
    assert isinstance(loaded, ImagePrefix) and torch.equal(loaded.mean, prefix.mean)
    assert generate(model, tok, [PROMPT] * 3, loaded, images=images, do_sample=False, max_new_tokens=6) == out


def test_image_input_errors_name_the_problem(cnn, scenes, tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prefix = image_prefix(model, cnn, "kv")
    with pytest.raises(ValueError, match="an image prefix needs one image per prompt"):
        generate(model, tok, [PROMPT], prefix, max_new_tokens=2)          # text-only input to an image prefix
    text_only = Prefix.for_model(model, 3, "kv")
    with pytest.raises(ValueError, match="which takes no images"):
        generate(model, tok, [PROMPT], text_only, images=[scenes[0].image], max_new_tokens=2)
    with pytest.raises(ValueError, match="got 1 images for 2 prompts"):
        generate(model, tok, [PROMPT] * 2, prefix, images=[scenes[0].image], max_new_tokens=2)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match=r"image 1: cannot read the image"):
        generate(model, tok, [PROMPT] * 2, prefix, images=[scenes[0].image, str(broken)], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"image 0: image file '.*missing.png' not found"):
        generate(model, tok, [PROMPT], prefix, images=[str(tmp_path / "missing.png")], max_new_tokens=2)
    with pytest.raises(ValueError, match="image mode 'I;16' is not supported"):
        generate(model, tok, [PROMPT], prefix, images=[Image.new("I;16", (8, 8))], max_new_tokens=2)
    png = io.BytesIO()
    scenes[0].image.save(png, format="PNG")                             # bytes are an image too
    assert len(generate(model, tok, [PROMPT], prefix, images=[png.getvalue()], max_new_tokens=2)) == 1


def test_image_prefix_refuses_what_needs_one_fixed_kv(cnn, tmp_path):
    model = tiny_model("llama")
    prefix = image_prefix(model, cnn, "kv")
    with pytest.raises(ValueError, match=re.escape(REFUSALS["merge"])):
        prefix.merge(model)
    with pytest.raises(ValueError, match=re.escape(REFUSALS["peft"])):
        export_peft(prefix, model, tmp_path / "peft")
    with pytest.raises(ValueError, match=re.escape(REFUSALS["compress"])):
        compress(prefix, rank=1, model=model)
    with pytest.raises(ValueError, match="image prefixes steer decoder-only models"):
        image_prefix(tiny_model("t5"), cnn, "kv")


@pytest.mark.parametrize("form", FORMS)
def test_image_warm_start_learns_captions(form, cnn):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    rows = caption_records("builtin:shapes", PROMPT, n=16)
    prefix = image_prefix(model, cnn, form, length=4)
    cfg = WarmStartConfig(steps=20, batch_size=8, lr=3e-2, warmup_steps=2, eval_every=4, eval_fraction=0.25,
                          progress=False)
    res = warm_start(model, tok, prefix, rows, cfg)
    assert res.prefix is prefix and bool(prefix.mean.any())             # standardisation fitted on the images
    first = res.history[0]["loss"]
    assert res.best_eval_loss < first - 0.3, (first, res.best_eval_loss)
    with pytest.raises(ValueError, match="needs one image per prompt"):
        warm_start(model, tok, image_prefix(model, cnn, form), [{k: r[k] for k in ("prompt", "completion")}
                                                                 for r in rows], cfg)


@pytest.mark.parametrize("form", FORMS)
def test_image_ppo_passes_images_to_rewards_and_moves_the_mapper(form, cnn):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    rows = caption_records("builtin:shapes", PROMPT, n=8)
    prefix = image_prefix(model, cnn, form)
    before = {k: v.clone() for k, v in prefix.state_dict().items()}
    seen = []

    def reward(prompts, completions, images=None, captions=None, **kw):
        seen.append((len(completions), images, captions))
        return [float(len(c)) for c in completions]

    cfg = PPOConfig(steps=2, batch_size=8, group_size=4, minibatch_size=4, max_new_tokens=5, lr=1e-2, progress=False)
    res = ppo(model, tok, prefix, rows, reward, cfg)
    assert res.steps_done == 2 and len(seen) == 2
    n, images, captions = seen[0]
    assert n == 8 and len(images) == 8 and all(isinstance(im, Image.Image) for im in images)
    assert captions[0] == captions[3] and images[0].tobytes() == images[3].tobytes()  # a group shares its image
    moved = [k for k in before if not torch.equal(before[k], prefix.state_dict()[k])]
    assert any(k.startswith("mapper") for k in moved), moved
    res = evaluate_reward(model, tok, prefix, rows[:4], reward, max_new_tokens=4, seed=0)
    assert len(res.rewards) == 4 and len(seen[-1][1]) == 4


@pytest.mark.parametrize("form", FORMS)
def test_image_ppo_reference_initial_is_the_prefix_as_rl_began(form, cnn, tmp_path):
    """reference: initial keeps a frozen copy of the image prefix, bound to each step's images: the first step's KL
    to it is 0, it stays as it was while the policy moves, and a checkpoint holds it."""
    from rlprefix.files import load_tensors

    model, tok = tiny_model("llama"), tiny_tokenizer()
    rows = caption_records("builtin:shapes", PROMPT, n=8)
    prefix = image_prefix(model, cnn, form)
    prefix.fit_features(image_features(prefix, [r["images"] for r in rows]))  # as a warm start leaves it
    start = {k: v.clone() for k, v in prefix.state_dict().items()}
    cfg = PPOConfig(steps=2, batch_size=8, group_size=4, minibatch_size=4, max_new_tokens=5, lr=1e-2, progress=False,
                    reference="initial", checkpoint_every=1)
    res = ppo(model, tok, prefix, rows, lambda prompts, completions, **kw: [float(len(c)) for c in completions], cfg,
              output_dir=tmp_path)
    assert abs(res.history[0]["kl"]) < 1e-4 and res.history[1]["kl"] > 0
    saved = {k[4:]: v for k, v in load_tensors(next(tmp_path.rglob("*.safetensors"))).items() if k.startswith("ref.")}
    assert set(saved) == set(start) and all(torch.equal(saved[k], start[k]) for k in start)
    assert not all(torch.equal(v, start[k]) for k, v in prefix.state_dict().items())     # the policy moved


def test_image_ppo_takes_its_kinds_learning_rate_unless_one_is_set(cnn, monkeypatch):
    """ppo.lr: null (the default) gives a mapper its kind's learning rate (1e-4: at 1e-3 RL undid a warm start on
    the real model, docs/image-prefixes.md), plain K/V the kv rate (1e-2); a set lr is used as it is."""
    from rlprefix.train import ppo as ppo_module
    from rlprefix.train.ppo import LEARNING_RATES, learning_rate

    model, tok = tiny_model("llama"), tiny_tokenizer()
    image, kv = image_prefix(model, cnn, "kv"), Prefix.from_text(model, tok, "a b c", 3, kind="kv")
    assert PPOConfig().lr is None and LEARNING_RATES == {"default": 1e-2, "image": 1e-4}
    assert learning_rate(PPOConfig(), image) == 1e-4 and learning_rate(PPOConfig(), kv) == 1e-2
    assert learning_rate(PPOConfig(lr=3e-3), image) == 3e-3
    used = []
    real_adam = torch.optim.Adam
    monkeypatch.setattr(ppo_module.torch.optim, "Adam", lambda groups, **kw: used.append(groups) or real_adam(
        groups, **kw))
    rows = caption_records("builtin:shapes", PROMPT, n=4)
    cfg = PPOConfig(steps=1, batch_size=4, group_size=2, minibatch_size=4, max_new_tokens=3, progress=False)
    ppo(model, tok, image, rows, lambda prompts, completions, **kw: [float(len(c)) for c in completions], cfg)
    ppo(model, tok, kv, [r["prompt"] for r in rows], lambda prompts, completions, **kw: [1.0] * len(completions),
        cfg)
    assert [g[0]["lr"] for g in used] == [1e-4, 1e-2] and cfg.lr is None  # the caller's config is left as it was


def test_run_with_kind_image(tmp_path, cnn):
    from rlprefix.cli import main
    from test_config import tiny_run_config

    path = tiny_run_config(
        tmp_path, prefix={"kind": "image", "form": "kv", "encoder": cnn, "mlp_hidden": 16, "basis": 4},
        warm_start={"data": "builtin:shapes", "eval_data": "builtin:shapes:heldout"},
        ppo={"prompts": "builtin:shapes", "eval_prompts": "builtin:shapes:heldout", "steps": 2, "group_size": 2},
        compress={"enabled": False}, export={"formats": ["rlprefix"]})
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "reward": {"name": "caption_correctness"}}))
    assert main(["run", str(path)]) == 0
    out = tmp_path / "run"
    warm, trained = load_prefix(out / "prefix_warmstart"), load_prefix(out / "prefix_ppo")
    assert warm.kind == trained.kind == "image" and not torch.equal(warm.basis, trained.basis)
    summary = json.loads((out / "summary.json").read_text())
    assert {"before", "after_warm_start", "after", "ppo"} <= set(summary)
    assert summary["before"]["n"] == 12                                 # the held-out compositions, one sample each
    assert main(["run", str(path)]) == 0                                # rerun: every stage is already done


@pytest.mark.parametrize("over,message", [
    ({}, re.escape(f"compress.enabled: {REFUSALS['compress']}")),
    ({"compress": {"enabled": False}}, re.escape(f"export.formats: {REFUSALS['peft']}")),
    ({"prefix": {"kind": "image", "form": "pixels"}}, r"prefix.form"),
])
def test_image_yaml_errors(over, message):
    raw = {"warm_start": {"data": "builtin:shapes"}, "ppo": {"prompts": "builtin:shapes"}, "prefix": {"kind": "image"}}
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v}
    with pytest.raises(ConfigError, match=message):
        load_config(raw)


def test_image_run_refuses_unreadable_caption_data_before_loading_the_model(tmp_path, cnn):
    from rlprefix.cli import main
    from test_config import tiny_run_config

    bad = tmp_path / "captions.jsonl"
    bad.write_text(json.dumps({"image": "nowhere.png", "caption": "a red circle"}) + "\n")
    path = tiny_run_config(tmp_path, prefix={"kind": "image", "encoder": cnn}, warm_start={"data": str(bad)},
                           ppo={"prompts": "builtin:shapes"}, compress={"enabled": False},
                           export={"formats": ["rlprefix"]})
    assert main(["run", str(path)]) == 2
    assert not (tmp_path / "run" / "prefix_warmstart").exists()


def test_image_prefix_on_a_transformers_vision_encoder(tmp_path, scenes):
    """Any transformers vision encoder by folder (here a tiny random CLIP vision model): the prefix records the
    folder, a warm start trains through its features, and the saved prefix finds it again."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    folder = str(tmp_path / "clip")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prefix = Prefix.for_model(model, 3, "image", form="kv", feature_dim=32, encoder=folder, hidden=16, basis=2,
                              generator=torch.Generator().manual_seed(0))
    rows = caption_records("builtin:shapes", PROMPT, n=8)
    try:
        warm_start(model, tok, prefix, rows, WarmStartConfig(steps=2, batch_size=4, eval_every=2, progress=False))
    except ImportError as e:  # transformers 5.4 (the oldest tested) loads image processors only with torchvision
        if "Torchvision" not in str(e):
            raise
        pytest.skip("this transformers' image processors need torchvision, which the CPU torch file here lacks")
    images = [s.image for s in scenes[:2]]
    out = generate(model, tok, [PROMPT] * 2, prefix, images=images, do_sample=False, max_new_tokens=4)
    prefix.save(tmp_path / "p")
    again = load_prefix(tmp_path / "p", model)
    assert again.encoder == folder and again.feature_dim == 32
    assert generate(model, tok, [PROMPT] * 2, again, images=images, do_sample=False, max_new_tokens=4) == out
    wrong = Prefix.for_model(model, 3, "image", feature_dim=64, encoder=folder, hidden=16, basis=2)
    with pytest.raises(ValueError, match="takes 64-d features but its encoder .* gives 32-d ones"):
        generate(model, tok, [PROMPT], wrong, images=images[:1], max_new_tokens=2)
