"""Config validation, overrides, and whole runs end to end on a tiny model (with resume)."""
import json

import pytest
import torch
import yaml

from rlprefix import load_prefix
from rlprefix.cli import main
from rlprefix.settings import ConfigError
from rlprefix.config import load_config
from tiny import save_tiny

REVIEWS = [{"prompt": f"review {w}", "completion": f"{w} is good great love"} for w in
           ["film", "food", "phone", "hotel", "park", "room", "staff", "actors"]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_run_config(tmp_path, arch="llama", **over):
    model_dir = save_tiny(tmp_path / "model", arch)
    data = write_jsonl(tmp_path / "reviews.jsonl", REVIEWS)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in REVIEWS])
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name": model_dir},
        "prefix": {"length": 4, "kind": "mlp", "init": "text", "init_text": "good review", "mlp_hidden": 32},
        "reward": {"name": "keywords", "words": ["good", "great"]},
        "warm_start": {"data": data, "steps": 6, "batch_size": 4, "eval_every": 3, "checkpoint_every": 2},
        "ppo": {"prompts": prompts, "steps": 3, "batch_size": 4, "minibatch_size": 2, "epochs": 1,
                "max_new_tokens": 6, "checkpoint_every": 1, "eval_samples_per_prompt": 1},
        "compress": {"max_kl": 10.0},
        "logging": {"progress": False, "tensorboard": False},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_config({"warm_start": {"data": "x"}, "ppo": {"prompts": "y"}},
                      ["ppo.steps=50", "reward.name=similarity", "ppo.kl_target=6", "compress.rank=null"])
    assert cfg.ppo.steps == 50 and cfg.reward["name"] == "similarity"
    assert cfg.ppo.kl_target == 6.0 and isinstance(cfg.ppo.kl_target, float)
    assert cfg.prefix.length == 10 and cfg.compress.rank is None


@pytest.mark.parametrize("raw,message", [
    ({"ppo": {"step": 5}}, r"unknown config key 'ppo.step'; did you mean ppo.steps\?"),
    ({"promt": 1}, r"unknown config key 'promt'"),
    ({"ppo": {"lr": "fast"}}, r"ppo.lr: 'fast' is not float"),
    ({"ppo": {"lr": -1}}, r"ppo.lr: -1.0 is out of range \(must be > 0\)"),
    ({"prefix": {"kind": "lora"}}, r"prefix.kind: 'lora' is not one of 'mlp', 'kv', 'prompt'"),
    ({"ppo": {"batch_size": 6, "minibatch_size": 4}}, r"ppo.batch_size: 6 must be a multiple"),
    ({"warm_start": {"data": None}}, r"warm_start.data: required"),
    ({"ppo": {"reference": "sft"}}, r"ppo.reference: 'sft' is not one of base, initial"),
    ({"export": {"formats": ["onnx"]}}, r"export.formats: \['onnx'\] not allowed"),
    ({"ppo": "fast"}, r"ppo: expected a mapping"),
])
def test_validation_errors_name_the_key(raw, message):
    base = {"warm_start": {"data": "x"}, "ppo": {"prompts": "y"}}
    for k, v in raw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    with pytest.raises(ConfigError, match=message):
        load_config(base)


def test_broken_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    assert main(["run", str(tmp_path / "none.yaml")]) == 2


def test_repo_configs_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"quickstart.yaml", "sentiment.yaml"} <= set(names) and len(names) >= 4
    for p in root.glob("*.yaml"):
        cfg = load_config(p)
        for path in (cfg.warm_start.data if cfg.warm_start.enabled else None, cfg.ppo.prompts, cfg.ppo.eval_prompts):
            assert path is None or Path(path).exists() or path.startswith("builtin:"), (p.name, path)


def test_end_to_end_run_and_resume(tmp_path, monkeypatch, capsys):
    path = tiny_run_config(tmp_path)
    assert main(["run", str(path)]) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "summary.json", "summary.md", "warm_start/warm_start_metrics.jsonl",
                 "warm_start/warm_start_curves.png", "ppo/ppo_metrics.jsonl", "ppo/ppo_curves.png",
                 "prefix_warmstart/manifest.json", "prefix_ppo/manifest.json", "prefix_compressed/manifest.json",
                 "export_peft/adapter_config.json", "compression_report.json"):
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run / "ppo" / "ppo_metrics.jsonl").read_text().splitlines()]
    assert summary["ppo"]["steps"] == 3 == len(metrics)
    assert summary["ppo"]["final_train_reward"] == pytest.approx(metrics[-1]["reward/mean"])
    assert summary["before"]["n"] == summary["after"]["n"] == summary["after_warm_start"]["n"] == 8
    assert summary["after_warm_start"]["reward_se"] >= 0
    assert "| after warm start |" in (run / "summary.md").read_text()
    assert summary["compression"]["compression_ratio"] >= 1.0
    assert "| base model |" in (run / "summary.md").read_text()
    # the stages' folders and files are where the one definition of their names says (freshness, stage_run)
    from rlprefix.files import STATE_JSON
    from rlprefix.freshness import PPO_DIR, WARM_START_DIR, ppo_checkpoint, warm_start_checkpoint
    from rlprefix.train.stage_run import PPO_FILES, WARM_START_FILES

    assert (warm_start_checkpoint(run) / STATE_JSON).exists() and (ppo_checkpoint(run) / STATE_JSON).exists()
    assert (run / WARM_START_DIR / WARM_START_FILES.metrics).exists() and (run / PPO_DIR / PPO_FILES.curves).exists()
    final = load_prefix(run / "prefix_ppo").kv.clone()

    # a second run with the same config skips every finished stage
    import rlprefix.train.warm_start as ws
    import rlprefix.train.ppo as ppo_mod

    def boom(*a, **k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(ws, "warm_start", boom)
    monkeypatch.setattr(ppo_mod, "ppo", boom)
    assert main(["run", str(path)]) == 0
    assert torch.equal(load_prefix(run / "prefix_ppo").kv, final)


def test_interrupted_ppo_resumes_to_the_same_prefix(tmp_path, monkeypatch):
    path = tiny_run_config(tmp_path)
    assert main(["run", str(path), f"output_dir={tmp_path / 'full'}"]) == 0
    import rlprefix.train.ppo as ppo_mod

    real, calls = ppo_mod.rollout, {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # inside PPO step 3 (after the checkpoint of step 2)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ppo_mod, "rollout", dies)
    with pytest.raises(KeyboardInterrupt):
        main(["run", str(path), f"output_dir={tmp_path / 'cut'}"])
    monkeypatch.setattr(ppo_mod, "rollout", real)
    assert (tmp_path / "cut" / "stages" / "warm_start.json").exists()
    assert not (tmp_path / "cut" / "stages" / "ppo.json").exists()
    assert main(["run", str(path), f"output_dir={tmp_path / 'cut'}"]) == 0
    a = load_prefix(tmp_path / "full" / "prefix_ppo").kv
    b = load_prefix(tmp_path / "cut" / "prefix_ppo").kv
    assert torch.equal(a, b)


def test_cli_info_generate_export_compress(tmp_path, capsys):
    path = tiny_run_config(tmp_path, ppo={"enabled": False}, compress={"enabled": False},
                           warm_start={"steps": 2})
    assert main(["run", str(path)]) == 0
    run = tmp_path / "run"
    model_dir = str(tmp_path / "model")
    assert main(["info", str(run / "prefix_warmstart")]) == 0
    assert "kind kv, length 4" in capsys.readouterr().out
    assert main(["generate", "--prefix", str(run / "prefix_warmstart"), "--model", model_dir, "--prompt", "hello",
                 "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["prompt"] == "hello"
    assert main(["compress", str(run / "prefix_warmstart"), "--out", str(tmp_path / "c"), "--rank", "2",
                 "--model", model_dir]) == 0
    assert main(["info", str(tmp_path / "c")]) == 0
    assert "low rank (matrix, anchored on 4 token ids): ranks [2]" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "c"), "--format", "peft", "--out", str(tmp_path / "p"),
                 "--model", model_dir]) == 0
    assert (tmp_path / "p" / "adapter_model.safetensors").exists()
    assert main(["info", str(tmp_path / "nothing")]) == 2


# ---- every setting is defined once (help + check on the field) and checked the same from Python and YAML ------
@pytest.mark.parametrize("cls,section,kwargs,message", [
    ("PPOConfig", "ppo", {"lr": -1}, r"ppo.lr: -1.0 is out of range \(must be > 0\)"),
    ("PPOConfig", "ppo", {"lr": float("nan")}, r"ppo.lr: nan is not a finite number"),
    ("PPOConfig", "ppo", {"kl_coef": float("inf")}, r"ppo.kl_coef: inf is not a finite number"),
    ("WarmStartConfig", "warm_start", {"batch_size": 0}, r"warm_start.batch_size: 0 is out of range \(must be > 0\)"),
    ("WarmStartConfig", "warm_start", {"decay": "step"}, r"warm_start.decay: 'step' is not one of cosine"),
])
def test_settings_are_checked_the_same_from_python_and_yaml(cls, section, kwargs, message):
    import rlprefix

    with pytest.raises(ConfigError, match=message):
        getattr(rlprefix, cls)(**kwargs)
    raw = {"warm_start": {"data": "x"}, "ppo": {"prompts": "y"}}
    raw[section].update(kwargs)
    with pytest.raises(ConfigError, match=message):
        load_config(raw)
    key, value = next(iter(kwargs.items()))
    with pytest.raises(ConfigError, match=message):  # the same as a CLI override (YAML text)
        load_config({"warm_start": {"data": "x"}, "ppo": {"prompts": "y"}}, [f"{section}.{key}={value}"])


def test_a_changed_setting_is_checked_again_by_the_stage():
    from rlprefix import PPOConfig, ppo

    cfg = PPOConfig()
    cfg.lr = -1.0
    with pytest.raises(ConfigError, match="ppo.lr"):
        ppo(None, None, None, ["x"], lambda *a, **k: [0.0], cfg)


def test_yaml_exponent_without_a_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("warm_start: {data: x, lr: 1e-3}\nppo: {prompts: y, lr: 3e-2, kl_target: 6}\n")
    cfg = load_config(path)
    assert cfg.warm_start.lr == 1e-3 and cfg.ppo.lr == 3e-2 and isinstance(cfg.ppo.kl_target, float)
    with pytest.raises(ConfigError, match=r"ppo.lr: 'nan' is not a finite number|ppo.lr: nan is not a finite"):
        load_config({"warm_start": {"data": "x"}, "ppo": {"prompts": "y", "lr": "nan"}})


def test_run_help_lists_every_key_with_default_and_help(capsys):
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for section in ("model", "prefix", "reward", "warm_start", "ppo", "compress", "export", "logging"):
        assert f"\n{section}:" in out
    assert "  lr: null  # prefix learning rate (Adam); null: the prefix kind's own (default 0.01, image 0.0001) [> 0]" in out
    assert "  batch_size: 8  # examples per micro-batch [> 0]" in out
    assert '  kind: "mlp"  # the parameterisation trained in the warm start' in out


def test_readme_config_mentions_only_real_keys():
    """The README's config example is loaded like a config: an unknown key there fails this test."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Configs", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    assert blocks
    for block in blocks:
        load_config(yaml.safe_load(block))


def test_stage_progress_keys_are_not_overwritten(tmp_path, monkeypatch):
    """ppo.progress / warm_start.progress: false turn that stage's bar off even with logging.progress: true;
    logging.tensorboard reaches the metric loggers; ppo.eval_prompts reach ppo() (for ppo.eval_every)."""
    from rlprefix.recipe import run

    seen = {}

    def fake_ws(*a, tensorboard, **k):
        seen["ws"] = (a[4].progress, tensorboard)
        raise KeyboardInterrupt

    monkeypatch.setattr("rlprefix.train.warm_start.warm_start", fake_ws)
    path = tiny_run_config(tmp_path, warm_start={"progress": False}, logging={"progress": True, "tensorboard": False})
    with pytest.raises(KeyboardInterrupt):
        run(load_config(path), log=lambda *_: None)
    assert seen["ws"] == (False, False)

    def fake_ppo(*a, eval_prompts, tensorboard, **k):
        seen["ppo"] = (a[5].progress, eval_prompts, tensorboard)
        raise KeyboardInterrupt

    monkeypatch.setattr("rlprefix.train.ppo.ppo", fake_ppo)
    path = tiny_run_config(tmp_path, warm_start={"enabled": False}, ppo={"progress": False, "eval_every": 1},
                           logging={"progress": True, "tensorboard": True})
    with pytest.raises(KeyboardInterrupt):
        run(load_config(path), log=lambda *_: None)
    assert seen["ppo"][0] is False and seen["ppo"][1].endswith("prompts.jsonl") and seen["ppo"][2] is True
