"""General text against forgetting (issue #16 item 5): the built-in sample, the mix ratio, determinism, config
errors, the forgetting measure against a hand computation, and the summary of a run."""
import json

import pytest
import torch
import torch.nn.functional as F

from rlprefix import Prefix
from rlprefix.settings import ConfigError
from rlprefix.config import load_config
from rlprefix.train.data import SFTExample
from rlprefix.train.general_text import BUILTIN, builtin_path, load_passages, mix_count, mix_in, split_passages, text_examples
from rlprefix.preflight import preflight
from rlprefix.models.decoder_only import forward
from rlprefix.train.warm_start import WarmStartConfig, warm_start
from tiny import tiny_model, tiny_tokenizer

DATA = [{"prompt": f"review {w}", "completion": f"{w} is good great love"} for w in
        ["film", "food", "phone", "hotel", "park", "room", "staff", "actors", "music", "book", "shop", "bus"]]
BASE = {"warm_start": {"data": "x"}, "ppo": {"prompts": "y"}}


def cfg(**kw):
    base = dict(steps=6, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=3, eval_fraction=0.25, progress=False,
                seed=0, merge=False)
    return WarmStartConfig(**{**base, **kw})


def test_builtin_sample_ships_with_the_package():
    passages = load_passages(BUILTIN)
    assert builtin_path().is_file() and len(passages) >= 250
    assert len(set(passages)) == len(passages)  # no repeats
    assert (builtin_path().parent / "README.md").read_text().count("licence") >= 1


def test_general_text_is_plain_lm_text():
    tok = tiny_tokenizer()
    (ex,) = text_examples(["hello world, the film was great"], tok, max_length=64)
    assert ex.labels == ex.input_ids  # every token a target (the first has no context; the shift skips it)
    assert text_examples(["hello world " * 40], tok, max_length=8)[0].input_ids.__len__() == 8


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.5])
def test_mix_ratio_gives_the_expected_fraction_of_examples(ratio):
    task = [SFTExample([1, 2], [-100, 2])] * 57
    pool = [SFTExample([3, i], [3, i]) for i in range(10)]
    mixed = mix_in(task, pool, ratio, seed=0)
    n_general = len(mixed) - len(task)
    assert n_general == mix_count(57, ratio) == round(57 * ratio / (1 - ratio))
    assert abs(n_general / len(mixed) - ratio) <= 1 / len(mixed)
    assert mixed[:57] == task
    if n_general <= len(pool):  # each passage once before any repeats
        assert len({tuple(e.input_ids) for e in mixed[57:]}) == n_general
    assert mix_count(57, 0.0) == 0 and mix_count(3, 0.01) == 1  # never rounds a requested mix away


def test_mixing_is_deterministic_with_the_seed():
    task = [SFTExample([1, 2], [-100, 2])] * 40
    pool = [SFTExample([3, i], [3, i]) for i in range(30)]
    a, b, c = mix_in(task, pool, 0.2, seed=0), mix_in(task, pool, 0.2, seed=0), mix_in(task, pool, 0.2, seed=1)
    assert a == b and a != c
    passages = load_passages(BUILTIN)
    assert split_passages(passages, 8, 0) == split_passages(passages, 8, 0)
    pool_p, held = split_passages(passages, 8, 0)
    assert len(held) == 8 and not set(held) & set(pool_p) and len(pool_p) + 8 == len(passages)


def test_warm_start_mixes_and_is_reproducible():
    model, tok = tiny_model("llama"), tiny_tokenizer()

    def run(**kw):
        prefix = Prefix.for_model(model, 4, "kv", generator=torch.Generator().manual_seed(0))
        return warm_start(model, tok, prefix, DATA, cfg(**kw))

    a, b = run(mix_ratio=0.25), run(mix_ratio=0.25)
    assert a.mixed == mix_count(9, 0.25) == 3  # 12 rows, 3 held out for the task eval
    assert torch.equal(a.prefix.kv, b.prefix.kv)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    plain = run()
    assert plain.mixed == 0 and not torch.equal(plain.prefix.kv, a.prefix.kv)
    assert plain.forgetting is not None  # measured without mixing too (forgetting_eval > 0)
    assert run(forgetting_eval=0).forgetting is None


def test_forgetting_ratio_equals_a_hand_computation():
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    prefix = Prefix.for_model(model, 4, "kv", generator=torch.Generator().manual_seed(0))
    res = warm_start(model, tok, prefix, DATA, cfg(steps=4, eval_every=4, forgetting_eval=6, lr=5e-2))
    rec = res.history[-1]
    _, held = split_passages(load_passages(BUILTIN), 6, seed=0)
    examples = text_examples(held, tok, 256)

    def mean_nll(p):
        total, count = 0.0, 0
        with torch.no_grad():
            for ex in examples:  # one passage at a time: no padding involved
                ids = torch.tensor([ex.input_ids])
                logits = forward(model, ids, torch.ones_like(ids), p).logits[0, :-1]
                total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                count += ids.shape[1] - 1
        return total / count

    with_p, without = mean_nll(res.prefix), mean_nll(None)
    assert rec["general_ppl"] == pytest.approx(torch.tensor(with_p).exp().item(), rel=1e-4)
    assert rec["general_ppl_base"] == pytest.approx(torch.tensor(without).exp().item(), rel=1e-4)
    assert rec["forgetting_ratio"] == pytest.approx(torch.tensor(with_p - without).exp().item(), rel=1e-4)
    assert res.forgetting == {"general_ppl": rec["general_ppl"], "general_ppl_base": rec["general_ppl_base"],
                              "forgetting_ratio": rec["forgetting_ratio"], "passages": 6}
    assert rec["forgetting_ratio"] != 1.0  # the trained prefix changes general text


@pytest.mark.parametrize("over,message", [
    ({"mix_ratio": 1.0}, r"warm_start.mix_ratio: 1.0 is out of range \(must be in \[0, 1\)\)"),
    ({"mix_ratio": -0.05}, r"warm_start.mix_ratio: -0.05 is out of range"),
    ({"mix_ratio": "lots"}, r"warm_start.mix_ratio: 'lots' is not float"),
    ({"mix_ratio": 0.05, "mix_data": None}, r"warm_start.mix_ratio: 0.05 needs warm_start.mix_data"),
    ({"mix_data": ""}, r"warm_start.mix_data: '' is empty"),
    ({"forgetting_eval": -1}, r"warm_start.forgetting_eval: -1 is out of range \(must be >= 0\)"),
    ({"mix_rate": 0.05}, r"unknown config key 'warm_start.mix_rate'; did you mean warm_start.mix_ratio\?"),
])
def test_bad_values_are_config_errors_naming_the_key(over, message):
    with pytest.raises(ConfigError, match=message):
        load_config({**BASE, "warm_start": {**BASE["warm_start"], **over}})
    if "mix_rate" not in over:  # the same check from Python
        with pytest.raises(ConfigError, match=message):
            WarmStartConfig(**over)


def test_yaml_defaults_and_missing_file(tmp_path):
    c = load_config({**BASE, "warm_start": {"data": "x", "mix_ratio": 0.05}})
    assert c.warm_start.mix_data == "builtin" and c.warm_start.mix_ratio == 0.05
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DATA))
    bad = load_config({"warm_start": {"data": str(data), "mix_ratio": 0.05, "mix_data": str(tmp_path / "none.txt")},
                       "ppo": {"enabled": False}, "reward": {"name": "length"}, "output_dir": str(tmp_path / "o")})
    with pytest.raises(ConfigError, match=r"warm_start.mix_data: general-text file not found: .*none.txt"):
        preflight(bad)
    one = tmp_path / "one.txt"
    one.write_text("only one line\n")
    bad.warm_start.mix_data = str(one)
    with pytest.raises(ConfigError, match=r"warm_start.mix_data: .* has 1 passage\(s\); at least 2"):
        preflight(bad)


def test_run_reports_forgetting_in_metrics_and_summary(tmp_path):
    from rlprefix.cli import main
    from test_config import tiny_run_config

    general = tmp_path / "general.txt"
    general.write_text("\n".join(load_passages(BUILTIN)[:40]) + "\n")
    path = tiny_run_config(tmp_path, ppo={"enabled": False}, compress={"enabled": False},
                           export={"formats": ["rlprefix"]},
                           warm_start={"mix_ratio": 0.2, "mix_data": "general.txt", "forgetting_eval": 5})
    assert main(["run", str(path)]) == 0
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    f = summary["warm_start"]["forgetting"]
    assert f["passages"] == 5 and f["data"] == str(general.resolve())
    assert f["forgetting_ratio"] == pytest.approx(f["general_ppl"] / f["general_ppl_base"], rel=1e-6)
    assert summary["warm_start"]["mixed"] == {"examples": 2, "ratio": 0.2, "data": str(general.resolve())}
    md = (out / "summary.md").read_text()
    assert "forgetting (general-text perplexity" in md and f"ratio {f['forgetting_ratio']:.3f}" in md
    assert "general text mixed into the warm start: 2 passages" in md
    records = [json.loads(line) for line in (out / "warm_start" / "warm_start_metrics.jsonl").read_text().splitlines()]
    assert any("forgetting_ratio" in r for r in records)
