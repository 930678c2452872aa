"""Issue #24, one definition of each rule: compression defaults, option defaults, the content hash, file names, data
suffixes, the perplexity clip, the checkpoint-validity policy and the stages' folder names are each decided in one
place, and what existing run directories hold (keys, hashes, file names) is unchanged."""
import ast
import dataclasses
import hashlib
import inspect
import json
import math
from pathlib import Path

import pytest
import torch

import rlprefix.files as files
import rlprefix.preflight as preflight
from rlprefix import Prefix, load_prefix
from rlprefix.cli import build_parser
from rlprefix.config import EXPORT_FORMATS, ExportSection, ModelSection, PPOSection, RunConfig, load_config
from rlprefix.freshness import config_key as freshness_config_key
from rlprefix.freshness import (Stages, check_checkpoints, check_resume, ppo_parts, stage_key, stage_keys, sweep_keys,
                                warm_start_checkpoint, warm_start_data, warm_start_parts)
from rlprefix.models.loading import DEFAULT_MODEL
from rlprefix.prefixes.lowrank import UNRECORDED_DTYPE, CompressConfig, CompressedPrefix, compress
from rlprefix.settings import ConfigError, ServeSettings, choices_of, default_of
from rlprefix.sweep import SETTINGS_FILE, _fresh_if_changed
from rlprefix.train import checkpoint, data
from rlprefix.train.compress import compress_and_measure, compress_to_budget
from rlprefix.train.general_text import MAX_NLL, forgetting_record, perplexity
from rlprefix.train.ppo import NOT_IN_PPO_HASH, PPOConfig
from rlprefix.train.stage_run import NOT_IN_HASH, PPO_FILES, WARM_START_FILES, config_hash
from rlprefix.train.warm_start import NOT_IN_WARM_START_HASH, WarmStartConfig
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
BASE = {"warm_start": {"data": "x"}, "ppo": {"prompts": "y"}}


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


# ---- 1. compression defaults: one set, read by Python, YAML and the CLI ----------------------------------------
def test_compression_defaults_agree_in_python_yaml_and_cli():
    want = CompressConfig()
    assert (want.scope, want.anchor, want.dtype) == ("matrix", True, "float16")  # what `rlprefix run` always used
    section = load_config(BASE).compress
    assert (section.scope, section.anchor, section.dtype) == (want.scope, want.anchor, want.dtype)
    args = build_parser().parse_args(["compress", "p", "--out", "o"])
    assert (args.scope, args.dtype_store, not args.no_anchor) == (want.scope, want.dtype, want.anchor)
    for fn in (compress, CompressedPrefix.from_prefix, compress_to_budget, compress_and_measure):
        d = _defaults(fn)
        assert (d["scope"], d["dtype"], d["anchor"]) == (want.scope, want.dtype, "auto"), fn.__name__
    comp = compress(Prefix.for_model(tiny_model("llama"), 4, "kv"), rank=1)  # the Python API, defaults only
    assert comp.scope == want.scope and comp.dtype_name == want.dtype
    # the allowed values too, and checked alike from Python and YAML
    parser = build_parser()
    assert tuple(_action(parser, "compress", "scope").choices) == choices_of(CompressConfig, "scope")
    assert tuple(_action(parser, "compress", "dtype_store").choices) == choices_of(CompressConfig, "dtype")
    for kwargs, message in (({"scope": "rows"}, "compress.scope: 'rows' is not one of"),
                            ({"dtype": "int8"}, "compress.dtype: 'int8' is not one of")):
        with pytest.raises(ConfigError, match=message):
            CompressConfig(**kwargs)
        with pytest.raises(ConfigError, match=message):
            load_config({**BASE, "compress": kwargs})


def test_a_manifest_without_a_factor_dtype_still_loads_as_float32(tmp_path):
    model = tiny_model("llama")
    compress(Prefix.for_model(model, 4, "kv"), rank=1, dtype="float32").save(tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / files.MANIFEST_FILE).read_text())
    del manifest["config"]["dtype"]  # as written before factors could be half precision
    (tmp_path / "c" / files.MANIFEST_FILE).write_text(json.dumps(manifest))
    assert load_prefix(tmp_path / "c", model).dtype_name == UNRECORDED_DTYPE == "float32"


# ---- 2. CLI options read the settings' definitions; the parser and the compression flow ------------------------
def _action(parser, command: str, dest: str):
    sub = parser._subparsers._group_actions[0]
    return next(a for a in sub.choices[command]._actions if a.dest == dest)


def test_cli_option_defaults_are_the_settings_defaults():
    p = build_parser()
    e = p.parse_args(["eval", "--prefix", "x", "--prompts", "y"])
    assert e.dtype == default_of(ModelSection, "dtype") and e.reward == default_of(RunConfig, "reward")["name"]
    assert (e.on_reward_error, e.reward_penalty) == (PPOConfig().on_reward_error, PPOConfig().reward_penalty)
    assert (e.samples, e.max_new_tokens) == (PPOSection().eval_samples_per_prompt, PPOConfig().max_new_tokens)
    s = p.parse_args(["serve", "--prefixes", "d"])
    assert (s.max_batch, s.batch_wait_ms) == (ServeSettings().max_batch, ServeSettings().batch_wait_ms)
    assert tuple(_action(p, "eval", "dtype").choices) == choices_of(ModelSection, "dtype")
    assert tuple(_action(p, "eval", "on_reward_error").choices) == ("raise", "penalty")
    assert tuple(_action(p, "export", "format").choices) == EXPORT_FORMATS == choices_of(ExportSection, "formats")
    assert DEFAULT_MODEL in _action(p, "generate", "model").help


def test_cli_follows_a_changed_definition(monkeypatch):
    """The parser reads the definitions when it is built: change one, and the option changes with it."""
    for cls, name, value in ((ServeSettings, "max_batch", 7), (ModelSection, "dtype", "bfloat16"),
                             (CompressConfig, "dtype", "bfloat16"), (PPOSection, "eval_samples_per_prompt", 5)):
        monkeypatch.setattr(next(f for f in dataclasses.fields(cls) if f.name == name), "default", value)
    p = build_parser()
    assert p.parse_args(["serve", "--prefixes", "d"]).max_batch == 7
    c = p.parse_args(["compress", "x", "--out", "o"])
    assert c.dtype == "bfloat16" and c.dtype_store == "bfloat16"
    assert p.parse_args(["eval", "--prefix", "x", "--prompts", "y"]).samples == 5


def test_cli_options_are_checked_as_their_settings():
    p = build_parser()
    for argv in (["serve", "--prefixes", "d", "--max-batch", "0"],
                 ["serve", "--prefixes", "d", "--batch-wait-ms", "-1"],
                 ["serve", "--prefixes", "d", "--batch-wait-ms", "nan"],
                 ["eval", "--prefix", "x", "--prompts", "y", "--samples", "0"]):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
    assert p.parse_args(["serve", "--prefixes", "d", "--batch-wait-ms", "0"]).batch_wait_ms == 0.0


def _functions(module: str):
    tree = ast.parse((ROOT / module).read_text())
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("module", ["rlprefix/cli.py", "rlprefix/recipe.py", "rlprefix/freshness.py"])
def test_no_function_over_60_lines(module):
    long = {f.name: f.end_lineno - f.lineno + 1 for f in _functions(module) if f.end_lineno - f.lineno + 1 > 60}
    assert not long, long


def test_the_compression_flow_is_written_once():
    """`rlprefix run` and `rlprefix compress` both call train.compress.compress_and_measure; neither chooses
    between a budget and a fixed rank, nor measures fidelity, itself."""
    for module in ("rlprefix/cli.py", "rlprefix/recipe.py"):
        called = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", None)
                  for n in ast.walk(ast.parse((ROOT / module).read_text())) if isinstance(n, ast.Call)}
        assert "compress_and_measure" in called and not called & {"compress", "compress_to_budget",
                                                                   "fidelity_report"}, module


# ---- 3. one content hash, the same digests as before ---------------------------------------------------------
def _old_hash(value, blobs=()):
    h = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode())
    for b in blobs:
        h.update(b)
    return h.hexdigest()[:16]


@dataclasses.dataclass
class _S:
    lr: float = 0.003
    steps: int = 6
    progress: bool = True
    checkpoint_every: int = 2
    log_every: int = 1
    name: str = "x"
    path: Path = Path("/data/a.jsonl")


def test_json_hash_gives_the_digests_run_directories_hold():
    values = [{"a": 1, "b": [1, 2]}, Path("/x/y"), None, "s", ("a", 1), ["m", 0, {"length": 3}, [None, "abc"]]]
    golden = ["e6f20bdc3757e5e7", "6762e88e164f8da1", "74234e98afe7498f", "0f4657778ae14ff7", "2657442bb4a48d62"]
    assert [files.json_hash(v) for v in values[:5]] == golden
    for v in values:
        assert files.json_hash(v) == _old_hash(v)
    assert files.json_hash({"k": 1}, [b"abc", b"def"]) == _old_hash({"k": 1}, [b"abc", b"def"])
    # checkpoint config hashes (what every saved checkpoint records)
    assert config_hash(_S(), prefix={"kind": "kv", "length": 3}, n=5, blobs=[b"abc", b"def"]) == "cbd9511e195e0a41"
    assert config_hash(_S(), ignore={"steps"}, prefix={"kind": "mlp"}, n=2) == "127b3438d989a9ad"
    assert config_hash(_S(lr=0.1, progress=False, checkpoint_every=9)) == config_hash(_S(lr=0.1)) == "bbd9eaa3511aceba"


STAGE_KEYS = [  # written by the code before issue #24; a run directory with these markers must not rerun a stage
    ({"warm_start": {"data": "reviews.jsonl"}, "ppo": {"prompts": "prompts.jsonl"}, "prefix": {"length": 4}},
     {"compress": "289c32de30000886", "eval_after": "d5e6eccbe27f5355", "eval_base": "20cd6d1277594850",
      "eval_warm_start": "79a077528d37482d", "ppo": "9806eeb49be7b44b", "prefix": "e855b99d2c24b26d",
      "warm_start": "57dfeac53e5277c2"}, "ca62ce781a06db4e"),
    ({"warm_start": {"data": "hub/name", "mix_ratio": 0.2, "forgetting_eval": 8, "eval_every": 5,
                     "mix_data": "general.txt"},
      "ppo": {"prompts": "hub/prompts", "eval_prompts": "prompts.jsonl"},
      "prefix": {"kind": "shared", "shared_dim": 3}, "compress": {"rank": 2, "max_kl": None}, "seed": 3},
     {"compress": "9483f08ed4abbf9e", "eval_after": "41e4367b776995a0", "eval_base": "20cd6d1277594850",
      "eval_warm_start": "fea78ecad945539d", "ppo": "bf6465c05f2b590a", "prefix": "857377c1b2d6580f",
      "warm_start": "2fcc6042cbddd8b2"}, "9d97e545d3dae722"),
    ({"warm_start": {"enabled": False}, "ppo": {"prompts": "prompts.jsonl", "steps": 5}, "prefix": {"kind": "dynamic"},
      "compress": {"enabled": False}, "export": {"formats": ["rlprefix"]}},
     {"compress": "c5326e0a55cbdba2", "eval_after": "b13ba876ad74ddc8", "eval_base": "20cd6d1277594850",
      "eval_warm_start": "c1a28814fe616a52", "ppo": "1f0e6a4b1fdffdfe", "prefix": "c9923b6892e06d39",
      "warm_start": "d7221a1bef5ed3fd"}, "ec5d13a06cf590dc"),
]


@pytest.mark.parametrize("raw,keys,config_key", STAGE_KEYS)
def test_stage_keys_are_those_existing_runs_hold(tmp_path, monkeypatch, raw, keys, config_key):
    """If this fails after a setting was added, leave the setting out of the key at its "as before" value (as
    freshness._WS_LATER does), so that finished stages of existing runs are not run again."""
    monkeypatch.chdir(tmp_path)
    Path("reviews.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    Path("prompts.jsonl").write_text('{"prompt": "a"}\n')
    Path("general.txt").write_text("one passage\nanother passage\n")
    cfg = load_config(raw)
    eval_kw = dict(chat=None, system=None, seed=7, max_new_tokens=40, temperature=1.0, samples_per_prompt=2)
    got = stage_keys(cfg, eval_kw)
    assert {k: v for k, v in got.items() if k != "data"} == keys
    assert freshness_config_key(cfg) == config_key  # the manifests' provenance config_hash


# ---- 4. file names, spelled once -------------------------------------------------------------------------------
# modules owned elsewhere that still spell a name of rlprefix.files themselves (issue #24: they import it next)
PENDING_NAMES: set[str] = set()


def test_file_names_are_spelled_only_in_files_py(tmp_path):
    names = {files.TENSORS_FILE, files.MANIFEST_FILE, files.STATE_TENSORS, files.STATE_JSON, files.PEFT_CONFIG_FILE,
             files.PEFT_TENSORS_FILE}
    assert files.ARTIFACT_FILES == names
    assert (checkpoint.STATE_JSON, checkpoint.STATE_TENSORS) == (files.STATE_JSON, files.STATE_TENSORS)
    checkpoint.save_checkpoint(tmp_path / "c", {"w": torch.zeros(1)}, {"step": 3})
    assert {p.name for p in (tmp_path / "c").iterdir()} == {files.STATE_JSON, files.STATE_TENSORS}
    spelled = []
    for path in sorted((ROOT / "rlprefix").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel == "rlprefix/files.py" or rel in PENDING_NAMES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                spelled.append(f"{rel}:{node.lineno} {node.value}")
    assert not spelled, spelled


# ---- 5. data-file suffixes, one list ---------------------------------------------------------------------------
def test_preflight_and_the_loader_know_the_same_data_files(tmp_path):
    assert preflight.DATA_SUFFIXES is data.DATA_SUFFIXES == tuple(data.DATA_BUILDERS)
    for suffix in data.DATA_SUFFIXES:  # a missing file of each kind is a local file to both, never a hub name
        missing = tmp_path / f"missing{suffix}"
        with pytest.raises(ConfigError, match="not found"):
            preflight.check_dataset(str(missing), "key", [["prompt"]])
        with pytest.raises(FileNotFoundError):
            data.load_records(str(missing))


# ---- 6. the perplexity clip ------------------------------------------------------------------------------------
def test_one_perplexity_clip():
    assert perplexity(2.0) == math.exp(2.0) and perplexity(1e6) == math.exp(MAX_NLL) == math.exp(50)
    rec = forgetting_record(60.0, 1.0)
    assert rec == {"general_ppl": perplexity(60.0), "general_ppl_base": perplexity(1.0),
                   "forgetting_ratio": perplexity(59.0)}


# ---- 7. which checkpoint may resume: the stage's own rule, read, not restated ------------------------------------
def test_resume_parts_name_exactly_what_the_stage_hashes():
    cfg = load_config({**BASE, "warm_start": {"data": "x", "mix_ratio": 0.1}})
    keys = stage_keys(cfg, {})
    ws = warm_start_parts(cfg.warm_start, keys["data"], keys["prefix"])
    for f in dataclasses.fields(WarmStartConfig):
        ignored = f.name in NOT_IN_HASH or f.name in NOT_IN_WARM_START_HASH
        assert (f"warm_start.{f.name}" in ws) == (not ignored or f.name == "mix_ratio"), f.name
    assert ws["warm_start.mix_data (content)"] == "builtin" and ws["warm_start.forgetting_eval (held out of the mix)"]
    ppo = ppo_parts(cfg, keys["data"], keys["warm_start"])
    for f in dataclasses.fields(PPOConfig):
        assert (f"ppo.{f.name}" in ppo) == (f.name not in NOT_IN_HASH and f.name not in NOT_IN_PPO_HASH), f.name


def test_the_run_refuses_what_the_stage_would_and_only_that(tmp_path):
    out = tmp_path / "run"
    markers = Stages(out, None)

    def check(**ws):
        cfg = load_config({**BASE, "warm_start": {"data": "x", **ws}})
        check_checkpoints(cfg, out, markers, stage_keys(cfg, {}))

    check()
    checkpoint.save_checkpoint(warm_start_checkpoint(out), {}, {"step": 1})
    check(forgetting_eval=8, checkpoint_every=7)  # neither shapes the checkpoint (no mixing): it resumes
    with pytest.raises(ConfigError, match=r"changed: warm_start.eval_every\)"):  # the stage hashes it
        check(eval_every=7)
    with pytest.raises(ConfigError, match=r"changed: .*warm_start.mix_data \(content\), warm_start.mix_ratio\)"):
        check(mix_ratio=0.2)


def test_resume_compares_only_the_parts_both_records_name(tmp_path):
    """Another rlprefix version may have recorded other parts; those are left to the stage's config_hash."""
    ckpt = tmp_path / "checkpoint"
    checkpoint.save_checkpoint(ckpt, {}, {"step": 2})
    files.atomic_write_json(tmp_path / "resume_key.json", {"parts": {"a": files.json_hash(1), "gone": "x"}})
    check_resume(tmp_path, ckpt, {"a": 1, "new": 3}, 5, "s.steps", "stage")
    with pytest.raises(ConfigError, match=r"changed: a\)"):
        check_resume(tmp_path, ckpt, {"a": 2, "new": 3}, 5, "s.steps", "stage")
    with pytest.raises(ConfigError, match="s.steps=1 is below the 2 steps"):
        check_resume(tmp_path, ckpt, {"a": 1}, 1, "s.steps", "stage")
    assert checkpoint.checkpoint_step(ckpt) == 2 and checkpoint.checkpoint_step(tmp_path / "none") is None


def test_a_sweep_keeps_a_checkpoint_exactly_when_the_stage_may_resume_it(tmp_path):
    cfg = load_config(BASE)
    section = dataclasses.replace(cfg.prefix, length=3)
    ws, data = WarmStartConfig(steps=4), warm_start_data(cfg.warm_start)
    run_dir, ckpt = tmp_path / "length_3", tmp_path / "length_3" / WARM_START_FILES.checkpoint
    key, earlier = sweep_keys(cfg, section, ws, data)
    # the key an earlier rlprefix recorded: every warm-start setting but progress, and the data
    assert earlier == _old_hash([cfg.model.name, cfg.seed, dataclasses.asdict(section),
                                 {k: v for k, v in dataclasses.asdict(ws).items() if k != "progress"}, ["name:x", None]])
    checkpoint.save_checkpoint(ckpt, {}, {"step": 1})
    files.atomic_write_json(run_dir / SETTINGS_FILE, {"key": earlier})
    _fresh_if_changed(run_dir, (key, earlier), print)
    assert ckpt.exists() and json.loads((run_dir / SETTINGS_FILE).read_text())["key"] == key
    _fresh_if_changed(run_dir, sweep_keys(cfg, section, dataclasses.replace(ws, checkpoint_every=3), data), print)
    assert ckpt.exists()  # the stage resumes it with another checkpoint_every: so does the sweep
    _fresh_if_changed(run_dir, sweep_keys(cfg, section, dataclasses.replace(ws, lr=0.5), data), print)
    assert not ckpt.exists()


# ---- 8. the stages' folder names, from one place ---------------------------------------------------------------
def test_stage_file_names_are_one_scheme_and_earlier_runs_migrate(tmp_path):
    assert (WARM_START_FILES.metrics, WARM_START_FILES.checkpoint) == ("warm_start_metrics.jsonl", "checkpoint")
    assert (PPO_FILES.metrics, PPO_FILES.curves, PPO_FILES.checkpoint) == ("ppo_metrics.jsonl", "ppo_curves.png",
                                                                           "checkpoint")
    # a run directory written by the previous release ("warmstart_*", "ppo_checkpoint") is renamed, never overwritten
    ws, ppo = tmp_path / "warm_start", tmp_path / "ppo"
    (ws / "checkpoint").mkdir(parents=True)
    (ws / "warmstart_metrics.jsonl").write_text("{}\n")
    (ppo / "ppo_checkpoint").mkdir(parents=True)
    (ppo / "ppo_checkpoint" / "state.json").write_text("{}")
    WARM_START_FILES.migrate(ws)
    PPO_FILES.migrate(ppo)
    assert (ws / "warm_start_metrics.jsonl").read_text() == "{}\n" and not (ws / "warmstart_metrics.jsonl").exists()
    assert (ppo / "checkpoint" / "state.json").exists() and not (ppo / "ppo_checkpoint").exists()
    (ppo / "ppo_checkpoint").mkdir()  # both present: nothing is moved over the current one
    PPO_FILES.migrate(ppo)
    assert (ppo / "ppo_checkpoint").exists() and (ppo / "checkpoint" / "state.json").exists()
