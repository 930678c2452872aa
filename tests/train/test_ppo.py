"""PPO on a prefix-only policy: ratio 1 at the start, frozen base, learning a toy reward, KL, exact resume."""
import pytest
import torch

from rewards import RewardError
from rlprefix import Prefix
from rlprefix.decoding.prompts import encode_prompts
from rlprefix.models.adapter import reference_sample as sample
from rlprefix.train.ppo import PPOConfig, gae, group_advantages, ppo
from tiny import tiny_model, tiny_tokenizer

PROMPTS = ["hello world", "a calm park with friendly people", "review film", "the food"] * 4


# classic PPO as rlprefix 0.1 ran it: a value head, GAE, raw scores and the KL as a per-token reward
GAE_V1 = dict(advantage="gae", kl_penalty="reward", reward_normalize=False, group_size=1)


def cfg(**kw):
    base = dict(steps=3, batch_size=8, minibatch_size=4, epochs=2, max_new_tokens=6, lr=3e-2, progress=False,
                kl_coef=0.01)
    return PPOConfig(**{**base, **kw})


def token_reward(token):
    def reward(prompts, completions, completion_ids, **kw):
        return [sum(t == token for t in ids) / max(1, len(ids)) for ids in completion_ids]
    return reward


def common_token(model, tok, rank=5):
    ids, mask = encode_prompts(tok, PROMPTS)
    r = sample(model, tok, ids, mask, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    return int(torch.bincount(r.completion_ids.flatten(), minlength=model.config.vocab_size).argsort(
        descending=True)[rank])


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0]])  # the last position is masked out
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    d2 = 1.0 - 0.1
    d1 = 0.0 + 0.1 - 0.2
    d0 = 0.0 + 0.2 - 0.5
    expect = torch.tensor([[d0 + 0.5 * (d1 + 0.5 * d2), d1 + 0.5 * d2, d2, 0.0]])
    assert torch.allclose(adv, expect) and torch.allclose(ret, (expect + values) * mask)


@pytest.mark.parametrize("advantage", ["rloo", "gae"])
def test_first_ratio_is_one_and_base_is_untouched(arch, advantage):
    model, tok = tiny_model(arch), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = Prefix.for_model(model, 4, "mlp")
    p0 = {k: v.clone() for k, v in prefix.state_dict().items()}
    res = ppo(model, tok, prefix, PROMPTS, token_reward(5), cfg(**GAE_V1 if advantage == "gae" else {}))
    for h in res.history:  # mixed prompt lengths -> left padding in every batch
        assert h["policy/ratio_dev_first_minibatch"] < 1e-4
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(p0[k], v) for k, v in prefix.state_dict().items())
    if advantage == "gae":
        assert any(p.abs().sum() > 0 for p in res.value_head.net[-1].parameters())
    else:
        assert res.value_head is None  # critic-free: no value head is built or trained


# the target token's rank is luck: with rlprefix.seeds.derive_seed's streams these learn for seeds 0-3 (gpt2 grpo:
# 7 of seeds 0-7), the ranks pinned before it did not
@pytest.mark.parametrize("arch,kind,lr,rank,advantage", [("llama", "kv", 3e-2, 2, "gae"), ("gpt2", "kv", 3e-2, 4, "gae"),
                                                          ("llama", "kv", 3e-2, 2, "rloo"),
                                                          ("gpt2", "mlp", 1e-2, 2, "grpo")])
def test_toy_reward_rises(arch, kind, lr, rank, advantage):
    model, tok = tiny_model(arch, sharpen=6.0), tiny_tokenizer()
    target = common_token(model, tok, rank)
    prefix = Prefix.for_model(model, 8, kind, generator=torch.Generator().manual_seed(0))
    res = ppo(model, tok, prefix, PROMPTS, token_reward(target),
              cfg(steps=40, batch_size=16, minibatch_size=8, epochs=4, max_new_tokens=8, lr=lr, **(GAE_V1 if advantage == "gae" else {"advantage": advantage})))
    rewards = [h["reward/mean"] for h in res.history]
    start, end = rewards[0], sum(rewards[-5:]) / 5  # step 1 is sampled before any update
    assert end > 0.3 and end > 3 * start, rewards


def test_kl_is_zero_when_prefix_is_off_for_both():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    res = ppo(model, tok, Prefix.for_model(model, 0, "kv"), PROMPTS, token_reward(5), cfg(reference="base"))
    assert all(abs(h["kl"]) < 1e-5 for h in res.history)  # float noise of incremental vs full forward only


def test_reference_initial_starts_at_zero_kl():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prefix = Prefix.for_model(model, 4, "kv")
    res = ppo(model, tok, prefix, PROMPTS, token_reward(5), cfg(steps=1, reference="initial"))
    assert abs(res.history[0]["kl"]) < 1e-5


@pytest.mark.parametrize("advantage", ["rloo", "gae"])
def test_resume_continues_identically(tmp_path, advantage):
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    config = cfg(steps=4, checkpoint_every=2, **(GAE_V1 if advantage == "gae" else {}))

    def fresh():
        return Prefix.for_model(model, 4, "kv", generator=torch.Generator().manual_seed(1))

    full = ppo(model, tok, fresh(), PROMPTS, token_reward(5), config, output_dir=tmp_path / "a")
    calls = {"n": 0}

    def dies_on_step_3(prompts, completions, completion_ids, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return token_reward(5)(prompts, completions, completion_ids)

    with pytest.raises(KeyboardInterrupt):
        ppo(model, tok, fresh(), PROMPTS, dies_on_step_3, config, output_dir=tmp_path / "b")
    resumed = ppo(model, tok, fresh(), PROMPTS, token_reward(5), config, output_dir=tmp_path / "b")
    for k, v in full.prefix.state_dict().items():
        assert torch.equal(v, resumed.prefix.state_dict()[k])
    for k, v in (full.value_head.state_dict().items() if full.value_head else []):
        assert torch.equal(v, resumed.value_head.state_dict()[k])
    assert [h["reward/mean"] for h in full.history] == [h["reward/mean"] for h in resumed.history]
    assert [h["kl_coef"] for h in full.history] == [h["kl_coef"] for h in resumed.history]
    assert len((tmp_path / "b" / "ppo_metrics.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "b" / "ppo_curves.png").exists()


def test_a_failing_reward_names_itself_and_keeps_the_checkpoint(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ppo(model, tok, Prefix.for_model(model, 4, "kv"), PROMPTS, token_reward(5), cfg(steps=2, checkpoint_every=1),
        output_dir=tmp_path)
    saved = (tmp_path / "checkpoint" / "state.safetensors").read_bytes()

    def nan_reward(prompts, completions, **kw):
        return [float("nan")] * len(completions)

    with pytest.raises(RewardError, match="reward 'nan_reward' returned nan at sample 0"):
        ppo(model, tok, Prefix.for_model(model, 4, "kv"), PROMPTS, nan_reward, cfg(steps=2), output_dir=tmp_path / "c")
    assert (tmp_path / "checkpoint" / "state.safetensors").read_bytes() == saved
    with pytest.raises(ValueError, match="different PPO config"):
        ppo(model, tok, Prefix.for_model(model, 4, "kv"), PROMPTS, token_reward(5), cfg(steps=3, lr=1.0),
            output_dir=tmp_path)


def test_adaptive_kl_moves_beta():
    model, tok = tiny_model("gpt2", sharpen=6.0), tiny_tokenizer()
    res = ppo(model, tok, Prefix.for_model(model, 4, "kv"), PROMPTS, token_reward(5),
              cfg(steps=3, kl_target=0.001, kl_horizon=100, lr=0.1))
    coefs = [h["kl_coef"] for h in res.history]
    assert coefs[-1] > 0.01  # KL far above target -> beta grows


def test_bad_config_and_prompts():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="multiple of ppo.minibatch_size"):
        ppo(model, tok, Prefix.for_model(model, 4, "kv"), PROMPTS, token_reward(5), cfg(batch_size=6))
    with pytest.raises(ValueError, match="is empty"):
        ppo(model, tok, Prefix.for_model(model, 4, "kv"), [], token_reward(5), cfg())
    with pytest.raises(ValueError, match=r"needs column\(s\) \['prompt'\]"):
        ppo(model, tok, Prefix.for_model(model, 4, "kv"), [{"text": "x"}], token_reward(5), cfg())


def test_group_advantages_match_hand_computation():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    rloo = group_advantages(scores, 4, "rloo")
    expect = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2, 0, 0, 0, 0])
    assert torch.allclose(rloo, expect)
    grpo = group_advantages(scores, 4, "grpo")
    g = scores[:4]
    assert torch.allclose(grpo[:4], (g - g.mean()) / (g.std() + 1e-4)) and torch.all(grpo[4:] == 0)
    # a row where no reward applies (NaN) takes no part in its group's baseline and gets advantage 0
    with_nan = torch.tensor([1.0, float("nan"), 3.0, 5.0])
    out = group_advantages(with_nan, 4, "rloo")
    assert out[1] == 0 and torch.allclose(out[[0, 2, 3]], torch.tensor([1 - 4.0, 3 - 3.0, 5 - 2.0]))


def test_reward_scale_does_not_change_learning():
    """x0.1 and x10 of the same reward give the same learning with the defaults (advantages are whitened)."""
    model, tok = tiny_model("llama", sharpen=6.0), tiny_tokenizer()
    target = common_token(model, tok, 2)
    curves = {}
    for scale in (0.1, 1.0, 10.0):
        base = token_reward(target)

        def scaled(prompts, completions, completion_ids, _s=scale, **kw):
            return [_s * v for v in base(prompts, completions, completion_ids)]

        prefix = Prefix.for_model(model, 8, "kv", generator=torch.Generator().manual_seed(0))
        res = ppo(model, tok, prefix, PROMPTS, scaled,
                  PPOConfig(steps=12, batch_size=16, minibatch_size=8, lr=3e-2, max_new_tokens=8, progress=False))
        curves[scale] = [h["reward/mean"] / scale for h in res.history]
    for scale in (0.1, 10.0):
        assert curves[scale] == pytest.approx(curves[1.0], abs=0.05), curves
    assert sum(curves[1.0][-3:]) / 3 > 2 * curves[1.0][0], curves


def test_bad_estimator_settings():
    with pytest.raises(ValueError, match="advantage must be one of"):
        PPOConfig(advantage="a2c").validate()
    with pytest.raises(ValueError, match="group_size >= 2"):
        PPOConfig(group_size=1, advantage="rloo").validate()
    with pytest.raises(ValueError, match="multiple of ppo.group_size"):
        PPOConfig(batch_size=32, group_size=3).validate()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ppo.lr"):
            PPOConfig(lr=bad).validate()


def test_rows_without_a_reward_are_left_out(tmp_path):
    """TRL's convention: None = this reward does not apply; such rows take no part in the loss or the mean."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    base = token_reward(5)

    def partial(prompts, completions, completion_ids, **kw):
        values = base(prompts, completions, completion_ids)
        return [None if i % 2 else v for i, v in enumerate(values)]

    res = ppo(model, tok, Prefix.for_model(model, 4, "kv"), PROMPTS, partial, cfg(steps=2))
    for h in res.history:
        assert h["reward/none"] == 4 and torch.isfinite(torch.tensor(h["reward/mean"]))
        assert h["policy/ratio_dev_first_minibatch"] < 1e-4


def test_logged_raw_reward_is_the_mean_of_the_steps_raw_rewards():
    """reward/raw_mean (and reward/mean) is the mean of what the reward returned for that step's rollout, before
    clipping and normalisation, over the rows it applies to; reward/raw_std is their std."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    returned = []

    def lengthy(prompts, completions, completion_ids, **kw):
        values = [None if i % 4 == 3 else 3.0 + len(ids) + i % 3 for i, ids in enumerate(completion_ids)]
        returned.append(values)
        return values

    res = ppo(model, tok, Prefix.for_model(model, 4, "kv"), PROMPTS, lengthy, cfg(steps=3, reward_clip=1.0))
    assert len(returned) == len(res.history) == 3  # one reward call per step's rollout
    for h, values in zip(res.history, returned):
        raw = [v for v in values if v is not None]
        assert h["reward/raw_mean"] == sum(raw) / len(raw) == h["reward/mean"]
        assert h["reward/raw_std"] == pytest.approx(torch.tensor(raw).std().item()) == h["reward/std"]
        assert h["reward/raw_mean"] > 1.0 and h["reward/none"] == 2  # not the clipped (to 1) or normalised scores
