"""Issue 12: never lose a user's data, never trust a stale result, one clear line for every bad input."""
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlprefix.files as rio
from rewards import Composite, RewardError
from rlprefix import ArtifactError, Prefix, load_prefix
from rlprefix.cli import main
from rlprefix.train.checkpoint import load_checkpoint, save_checkpoint
from rlprefix.train.evaluate import evaluate_reward
from rlprefix.guards import NonFiniteError, assert_finite
from rlprefix.lock import OutputLock
from rlprefix.prefixes.peft import export_peft
from rlprefix.train.scorer import Scorer
from rlprefix.train.warm_start import WarmStartConfig, warm_start
from test_config import REVIEWS, tiny_run_config, write_jsonl
from tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


# ---- 1. artifact writes replace only a previous artifact -------------------------------------------------
def test_save_and_export_refuse_to_replace_user_files(llama, tmp_path):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "thesis.txt").write_text("years of work")
    prefix = Prefix.for_model(llama, 3, "kv")
    with pytest.raises(ArtifactError, match="did not write"):
        prefix.save(victim)
    with pytest.raises(ArtifactError, match="did not write"):
        export_peft(prefix, llama, victim)
    assert (victim / "thesis.txt").read_text() == "years of work" and (victim / "sub").is_dir()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(ArtifactError, match="not a directory"):
        prefix.save(a_file)
    assert a_file.read_text() == "keep me"
    # a previous artifact (or an empty dir) is replaced; overwrite=True forces the rest
    prefix.save(tmp_path / "p")
    Prefix.for_model(llama, 3, "kv").save(tmp_path / "p")
    export_peft(prefix, llama, tmp_path / "peft")
    export_peft(prefix, llama, tmp_path / "peft")
    (tmp_path / "empty").mkdir()
    prefix.save(tmp_path / "empty")
    prefix.save(a_file, overwrite=True)
    assert torch.equal(load_prefix(a_file).kv, prefix.kv)


# ---- 5. a crash between the renames of a swap is recovered ----------------------------------------------
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("point", ["tmp_written", "new_ready", "old_moved", "swapped"])
def test_crash_at_each_point_of_a_swap_leaves_a_complete_checkpoint(tmp_path, point):
    path = tmp_path / "ckpt"
    save_checkpoint(path, {"w": torch.zeros(3)}, {"step": 1})
    pid = os.fork()
    if pid == 0:  # the child dies at `point` of the second save, as a SIGKILL would leave it
        try:
            rio.fault_hook = lambda p: os._exit(0) if p == point else None
            save_checkpoint(path, {"w": torch.ones(3)}, {"step": 2})
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    tensors, meta = load_checkpoint(path)  # recovers: the newest complete copy
    assert meta["step"] == (1 if point == "tmp_written" or point == "new_ready" else 2)
    assert torch.equal(tensors["w"], torch.full((3,), float(meta["step"] - 1)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .old/.new/.tmp left over


# ---- 7. permissions follow the umask ----------------------------------------------------------------------
@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_artifacts_honour_the_umask(llama, tmp_path):
    old = os.umask(0o022)
    try:
        Prefix.for_model(llama, 2, "kv").save(tmp_path / "p")
        rio.atomic_write_json(tmp_path / "s.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o755
    for f in (tmp_path / "p" / "manifest.json", tmp_path / "p" / "prefix.safetensors", tmp_path / "s.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# ---- 4. one run per output directory ----------------------------------------------------------------------
def test_second_holder_of_an_output_dir_is_refused_naming_the_pid(tmp_path):
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import lock; "
            "l = lock.OutputLock(sys.argv[2]).__enter__(); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(ROOT / "rlprefix"), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"in use by another rlprefix run \(pid {holder.pid}\)"):
            OutputLock(tmp_path).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with OutputLock(tmp_path):  # released when its holder died
        pass


# ---- 3. non-finite training stops, naming the step ---------------------------------------------------------
def test_non_finite_warm_start_stops_at_the_first_bad_step(tmp_path, monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    rows = [{"prompt": "hello", "completion": "good great"}] * 4
    prefix = Prefix.for_model(model, 3, "mlp", mlp_hidden=16)
    cfg = WarmStartConfig(steps=4, batch_size=2, warmup_steps=0, eval_every=2, progress=False, checkpoint_every=1)
    # lr=inf is refused by the config now, so the schedule is made to return it (training blows up at step 1)
    monkeypatch.setattr("rlprefix.train.warm_start.lr_at", lambda *a, **k: math.inf)
    with pytest.raises(NonFiniteError, match="at step 1"):
        warm_start(model, tok, prefix, rows, cfg, output_dir=tmp_path)
    assert not (tmp_path / "checkpoint").exists()  # nothing non-finite was saved
    with pytest.raises(NonFiniteError, match="PPO loss became non-finite .* at step 7"):
        assert_finite("PPO loss", 7, 1.0, torch.tensor([0.0, math.nan]))


def test_a_non_finite_prefix_is_refused_on_load(llama, tmp_path):
    p = Prefix.for_model(llama, 2, "kv")
    with torch.no_grad():
        p.kv[0, 0, 0, 0] = math.nan
    p.save(tmp_path / "p")
    with pytest.raises(ArtifactError, match="non-finite"):
        load_prefix(tmp_path / "p")


# ---- 6. rewards that are not numbers ----------------------------------------------------------------------
@pytest.mark.parametrize("out,shown", [({"a": 1.0, "b": 2.0}, "dict"), ("1234", "str '1234'"),
                                       (["good", 1.0], "str 'good'"), ([[1.0], [2.0]], "list")])
def test_non_number_rewards_are_rejected_naming_the_reward(out, shown):
    def my_reward(prompts, completions, **kw):
        return out

    for policy in ("raise", "penalty"):  # a broken contract is never papered over
        with pytest.raises(RewardError, match=f"reward 'my_reward' returned {shown}"):
            Scorer(my_reward, on_error=policy)(["p", "q"], ["x", "y"])


def test_none_means_no_reward_applies_as_in_trl():
    def maths(prompts, completions, **kw):
        return [1.0, None, None]

    def style(prompts, completions, **kw):
        return [0.5, 2.0, None]

    r, metrics = Scorer(maths)(["a"] * 3, ["x"] * 3)
    assert r[0] == 1.0 and torch.isnan(r[1:]).all() and metrics["reward/none"] == 2
    assert metrics["reward/raw_mean"] == 1.0
    comp = Composite([("maths", maths, 1.0), ("style", style, 2.0)])
    assert comp(["a"] * 3, ["x"] * 3) == [2.0, 4.0, None]


def test_evaluation_ignores_none_rows_and_honours_the_penalty_policy():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts = ["hello", "good", "review"]

    def half(prompts, completions, **kw):
        return [None if p == "good" else 1.0 for p in prompts]

    res = evaluate_reward(model, tok, None, prompts, half, max_new_tokens=2)
    assert res.mean == 1.0 and res.std == 0.0

    def broken(prompts, completions, **kw):
        raise ZeroDivisionError("oops")

    with pytest.raises(RewardError, match="raised ZeroDivisionError"):
        evaluate_reward(model, tok, None, prompts, broken, max_new_tokens=2)
    res = evaluate_reward(model, tok, None, prompts, broken, max_new_tokens=2, on_error="penalty", penalty=-2.0)
    assert res.mean == -2.0
    with pytest.raises(ValueError, match="needs column"):
        evaluate_reward(model, tok, None, [{"text": "x"}], half, max_new_tokens=2)


# ---- 2. stale results, config.yaml, non-finite stage, model recorded: one small run ------------------------
def _cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_runs_never_reuse_stale_results_nor_clobber_user_files(tmp_path, capsys, monkeypatch):
    import yaml

    path = tiny_run_config(tmp_path, compress={"enabled": False}, warm_start={"steps": 2},
                           ppo={"steps": 2}, export={"formats": ["rlprefix"]})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("# my notes\nseed: 3\n")
    assert main(["run", str(path)]) == 0
    assert (run / "config.yaml").read_text() == "# my notes\nseed: 3\n"  # the user's file is kept
    assert yaml.safe_load((run / "config.rlprefix.yaml").read_text())["ppo"]["steps"] == 2

    # the prompts edited in place: PPO's checkpoint is not resumed on other data
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": "brand new prompt"}] * 3)
    code, err = _cli(capsys, "run", str(path))
    assert code == 2 and "changed: ppo.prompts (content)" in err and str(run / "ppo") in err  # PPO used them too
    write_jsonl(prompts, [{"prompt": r["prompt"]} for r in REVIEWS])
    # a crash between the two renames of a swap, and a stray temporary file: repaired at the next start
    os.replace(run / "prefix_ppo", run / ".prefix_ppo.old")
    (run / ".summary.json.x1y2.tmp").write_text("{")
    code, err = _cli(capsys, "run", str(path), "ppo.steps=1")
    assert code == 2 and "ppo.steps=1 is below the 2 steps" in err, err
    assert (run / "prefix_ppo" / "manifest.json").exists() and not list(run.glob(".*.tmp"))

    # a generate without --model finds the model the prefix was trained on
    assert main(["generate", "--prefix", str(run / "prefix_ppo"), "--prompt", "hi", "--max-new-tokens", "2",
                 "--json"]) == 0

    # a non-finite PPO result is never saved nor marked finished; the last good prefix stays
    import rlprefix.train.ppo as rl_mod

    good = load_prefix(run / "prefix_ppo").kv.clone()
    real = rl_mod.ppo

    def diverges(model, tok, prefix, *a, **k):
        res = real(model, tok, prefix, *a, **k)
        with torch.no_grad():
            res.prefix.kv.fill_(math.nan)
        return res

    monkeypatch.setattr(rl_mod, "ppo", diverges)
    code, err = _cli(capsys, "run", str(path), "ppo.steps=3")
    assert code == 2 and "PPO prefix became non-finite" in err and "step 3" in err, err
    assert torch.equal(load_prefix(run / "prefix_ppo").kv, good)
    assert json.loads((run / "stages" / "ppo.json").read_text())["steps"] == 2


# ---- one line for every bad input --------------------------------------------------------------------------
def test_every_bad_input_is_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch):
    import rlprefix.models.loading as modeling

    path = tiny_run_config(tmp_path)
    model_dir = str(tmp_path / "model")
    cfg = str(path)
    Prefix.for_model(tiny_model("llama"), 2, "kv").save(tmp_path / "pre", {"model": model_dir})
    manifest = json.loads((tmp_path / "pre" / "manifest.json").read_text())

    def variant(name, change):
        d = tmp_path / name
        d.mkdir()
        (d / "prefix.safetensors").write_bytes((tmp_path / "pre" / "prefix.safetensors").read_bytes())
        m = json.loads(json.dumps(manifest))
        change(m)
        (d / "manifest.json").write_text(json.dumps(m))
        return str(d)

    no_model = variant("no_model", lambda m: m.pop("model"))
    unknown = variant("unknown", lambda m: m["config"].update(colour="red"))
    length = variant("length", lambda m: (m.update(length=5), m["config"].update(length=5)))
    (tmp_path / "dup.yaml").write_text(path.read_text() + "seed: 1\nseed: 2\n")
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "cols.jsonl", [{"text": "x"}])
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "thesis.txt").write_text("keep")

    loaded = []
    real_load = modeling.load_model
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: loaded.append(1) or real_load(*a, **k))
    before_model = [  # found before any model is loaded
        ["run", str(tmp_path)],
        ["run", str(tmp_path / "dup.yaml")],
        ["run", cfg, f"output_dir={tmp_path / 'a_file'}"],
        ["run", cfg, "reward.name=sentimnt"],
        ["run", cfg, f"ppo.prompts={tmp_path / 'missing.jsonl'}"],
        ["run", cfg, f"ppo.prompts={tmp_path / 'cols.jsonl'}"],
        ["run", cfg, f"warm_start.data={tmp_path / 'empty.jsonl'}"],
        ["run", cfg, "ppo.lr=.inf"],
        ["eval", "--prefix", str(tmp_path / "pre"), "--prompts", "x.jsonl", "--samples", "0"],
        ["eval", "--prefix", str(tmp_path / "pre"), "--prompts", str(tmp_path / "cols.jsonl"), "--reward", "length",
         "--reward-option", "target=3", "--max-new-tokens", "2"],  # no 'prompt': checked as `run` checks it
        ["serve", "--prefixes", str(tmp_path), "--max-batch", "0"],  # no slot: requests would wait forever
        ["serve", "--prefixes", str(tmp_path), "--batch-wait-ms", "-1"],
        ["serve", "--prefixes", str(tmp_path), "--max-body-bytes", "0"],  # every request would get 413
        ["serve", "--prefixes", str(tmp_path), "--drain-timeout", "-1"],
        ["serve", "--prefixes", str(tmp_path), "--drain-timeout", "nan"],
        ["info", no_model],
    ]
    after_model = [
        ["generate", "--prefix", unknown, "--prompt", "hi"],
        ["generate", "--prefix", length, "--prompt", "hi"],
        ["export", str(tmp_path / "pre"), "--out", str(tmp_path / "victim")],
    ]
    capsys.readouterr()
    for argv in before_model + after_model:
        code, err = _cli(capsys, *argv)
        assert code == 2, (argv, err)
        last = err.splitlines()[-1]  # (progress bars of `datasets` may come before it)
        assert last.startswith("rlprefix: error: ") and err.count("rlprefix: error") == 1, (argv, err)
        assert "Traceback" not in err, (argv, err)
        if argv in before_model:
            assert not loaded, argv
    assert (tmp_path / "victim" / "thesis.txt").read_text() == "keep"
    code, err = _cli(capsys, "info", length)
    assert code == 0
