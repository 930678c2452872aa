"""Issue 12: never lose a user's data, never trust a stale result, one clear line for every bad input."""
import json
import math
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rlprefix.io as rio
from rewards import Composite, RewardError, Scorer
from rlprefix import ArtifactError, Prefix, load_prefix
from rlprefix.checkpoint import load_checkpoint, save_checkpoint
from rlprefix.evaluate import evaluate_reward
from rlprefix.guards import NonFiniteError, assert_finite
from rlprefix.lock import OutputLock
from rlprefix.peft_export import export_peft
from rlprefix.warmstart import WarmStartConfig, warm_start
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
def test_non_finite_warm_start_stops_at_the_first_bad_step(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    rows = [{"prompt": "hello", "completion": "good great"}] * 4
    prefix = Prefix.for_model(model, 3, "mlp", mlp_hidden=16)
    cfg = WarmStartConfig(steps=4, batch_size=2, lr=math.inf, warmup_steps=0, eval_every=2, progress=False,
                          checkpoint_every=1)
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
