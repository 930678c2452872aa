"""Issue #28: `rlprefix run` never replaces a file in output_dir that rlprefix did not write (unless --overwrite),
and a data file that is not UTF-8 JSON records is refused before the model loads, naming the file and the line."""
import json
from pathlib import Path

import pytest

from rlprefix.cli import main
from rlprefix.config import load_config
from rlprefix.files import replaceable_artifact_dir
from rlprefix.freshness import stage_keys
from rlprefix.preflight import MARKER_NAMES, run_outputs, unowned_outputs
from rlprefix.summary import is_own_summary, render_summary
from rlprefix.train.data import check_records_file
from test_config import REVIEWS, tiny_run_config, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(warm_start={"steps": 2, "eval_every": 2}, ppo={"steps": 1, "checkpoint_every": 1},
             compress={"enabled": False}, export={"formats": ["rlprefix", "peft"]})


@pytest.fixture
def loads(monkeypatch):
    """Counts model loads (the recipe's and the subcommands'), so a test can say an error came before one."""
    import rlprefix.models.loading as modeling
    import rlprefix.recipe as recipe

    loaded = []
    for module in (modeling, recipe):
        real = module.load_model
        monkeypatch.setattr(module, "load_model", lambda *a, _real=real, **k: loaded.append(1) or _real(*a, **k))
    return loaded


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err.splitlines()[-1] if err else ""


# ---- 1. the output directory ---------------------------------------------------------------------------------
def test_a_run_refuses_to_replace_user_files_unless_told_to(tmp_path, capsys, loads):
    cfg = tiny_run_config(tmp_path, **SMALL)
    run = tmp_path / "run"
    (run / "prefix_ppo").mkdir(parents=True)
    mine = {"summary.json": '{"my": "results"}\n', "summary.md": "# my notes\n", "notes.txt": "keep",
            "prefix_ppo/thesis.txt": "years of work"}
    for name, text in mine.items():
        (run / name).write_text(text)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))

    code, err = _cli(capsys, "run", cfg)
    assert code == 2 and err.startswith("rlprefix: error: output_dir: ") and "--overwrite" in err, err
    assert str(run / "prefix_ppo") in err and "did not write" in err  # the first path the run would write
    assert not loads  # refused before the model loads, and before anything is written
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert all((run / name).read_text() == text for name, text in mine.items())

    (run / "prefix_ppo" / "thesis.txt").unlink()  # now the summary files are the first
    code, err = _cli(capsys, "run", cfg)
    assert code == 2 and str(run / "summary.json") in err and "1 more" in err, err
    assert (run / "summary.md").read_text() == "# my notes\n" and not loads

    (run / "prefix_ppo" / "thesis.txt").write_text("years of work")
    assert main(["run", str(cfg), "--overwrite"]) == 0  # replaces exactly those paths
    assert is_own_summary(run / "summary.json") and is_own_summary(run / "summary.md")
    assert sorted(p.name for p in (run / "prefix_ppo").iterdir()) == ["manifest.json", "prefix.safetensors"]
    assert (run / "notes.txt").read_text() == "keep"  # what the run does not write is left alone
    assert unowned_outputs(load_config(cfg)) == []

    # a rerun of the same output_dir resumes (its own summary, config and artifacts are rlprefix's) ...
    assert main(["run", str(cfg), "ppo.steps=2"]) == 0
    assert json.loads((run / "summary.json").read_text())["ppo"]["steps"] == 2
    # ... but a summary.md the user edited is theirs now
    (run / "summary.md").write_text((run / "summary.md").read_text().replace("# rlprefix run", "# my run"))
    code, err = _cli(capsys, "run", cfg, "ppo.steps=2")
    assert code == 2 and str(run / "summary.md") in err and "# my run" in (run / "summary.md").read_text()


def test_every_path_a_run_writes_is_in_the_one_list(tmp_path):
    """run_outputs is where the recipe writes: after a run, every file in output_dir is one of its paths (or inside
    one of its artifact folders), and each of them is recognised as rlprefix's."""
    cfg_path = tiny_run_config(tmp_path, warm_start={"steps": 2, "eval_every": 2}, ppo={"steps": 1},
                               export={"formats": ["rlprefix", "peft"]})
    assert main(["run", str(cfg_path)]) == 0
    cfg = load_config(cfg_path)
    listed = run_outputs(cfg)
    artifacts = [p for p, own in listed if own is replaceable_artifact_dir]
    files = {p for p, own in listed}
    stray = [p for p in Path(cfg.output_dir).rglob("*") if p.is_file() and p not in files
             and not any(a in p.parents for a in artifacts)]
    assert not stray, stray
    assert unowned_outputs(cfg) == []
    assert set(MARKER_NAMES) == set(stage_keys(cfg, {})) - {"data", "prefix"}
    assert {p.name for p in (Path(cfg.output_dir) / "stages").iterdir()} <= {f"{n}.json" for n in MARKER_NAMES}


def test_summaries_of_an_earlier_rlprefix_are_recognised(tmp_path):
    """A run directory written before summaries were marked still resumes; a user's look-alike does not pass."""
    summary = {"model": "m", "reward": {"name": "length"}, "output_dir": str(tmp_path), "seconds": {}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "summary.md").write_text(render_summary(summary))
    assert is_own_summary(tmp_path / "summary.json") and is_own_summary(tmp_path / "summary.md")
    (tmp_path / "summary.json").write_text(json.dumps({"model": "m"}))
    assert not is_own_summary(tmp_path / "summary.json") and not is_own_summary(tmp_path / "summary.md")


def test_a_user_file_where_the_run_writes_a_folder_is_refused(tmp_path, capsys, loads):
    cfg = tiny_run_config(tmp_path, **SMALL)
    run = tmp_path / "run"
    run.mkdir()
    (run / "ppo").write_text("not a folder")
    (run / "config.yaml").write_text("# my own config\n")  # kept as before: the run's goes to config.rlprefix.yaml
    code, err = _cli(capsys, "run", cfg)
    assert code == 2 and f"{run / 'ppo'} is a file that rlprefix did not write" in err and not loads, err
    assert [p for p, _ in run_outputs(load_config(cfg))][1] == run / "config.rlprefix.yaml"
    (run / "config.rlprefix.yaml").write_text("mine too\n")
    code, err = _cli(capsys, "run", cfg)
    assert code == 2 and str(run / "config.rlprefix.yaml") in err


# ---- 2. data files ---------------------------------------------------------------------------------------------
def _bad_files(tmp_path) -> dict:
    good = "".join(json.dumps(r) + "\n" for r in REVIEWS[:2])
    files = {
        "not_json.jsonl": (good + "prompt,completion\n").encode(),
        "latin1.jsonl": good.encode() + '{"prompt": "caf\xe9"}\n'.encode("latin-1"),
        "list.jsonl": (good + '["a", "b"]\n').encode(),
        "no_completion.jsonl": (good + '\n{"prompt": "x"}\n').encode(),
        "null_prompt.jsonl": (good + '{"prompt": null, "completion": "x"}\n').encode(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: str(tmp_path / name) for name in files}


@pytest.mark.parametrize("name,key,message", [
    ("not_json.jsonl", "ppo.prompts", "line 3: not JSON: Expecting value (column 1)"),
    ("latin1.jsonl", "ppo.prompts", "line 3: not UTF-8 at byte {latin1} (0xe9)"),
    ("list.jsonl", "warm_start.data", "line 3: not a JSON object but a list"),
    ("no_completion.jsonl", "warm_start.data", "line 4: missing required key 'completion'"),
    ("no_completion.jsonl", "ppo.eval_prompts", None),  # prompts need only 'prompt'
    ("null_prompt.jsonl", "ppo.prompts", "line 3: 'prompt' is null, not a string"),
])
def test_bad_data_files_are_refused_before_the_model_naming_file_and_line(tmp_path, capsys, loads, name, key,
                                                                           message):
    cfg = tiny_run_config(tmp_path, **SMALL)
    path = _bad_files(tmp_path)[name]
    if message is None:
        assert check_records_file(path, [["prompt"]]) == 3
        return
    latin1 = Path(path).read_bytes().find(b"\xe9")  # the offset of the byte in the file (latin1.jsonl)
    code, err = _cli(capsys, "run", cfg, f"{key}={path}")
    assert code == 2 and err.startswith(f"rlprefix: error: {key}: {path} {message.format(latin1=latin1)}"), err
    assert not loads and not (tmp_path / "run").exists()


def test_eval_and_compress_prompt_files_get_the_same_check(tmp_path, capsys, loads):
    cfg = tiny_run_config(tmp_path, **SMALL)
    assert main(["run", str(cfg)]) == 0
    loads.clear()
    bad = _bad_files(tmp_path)
    prefix = tmp_path / "run" / "prefix_ppo"
    code, err = _cli(capsys, "eval", "--prefix", prefix, "--prompts", bad["latin1.jsonl"], "--reward", "length",
                     "--reward-option", "target=3", "--max-new-tokens", "2")
    assert code == 2 and f"--prompts: {bad['latin1.jsonl']} line 3: not UTF-8 at byte" in err and not loads, err
    code, err = _cli(capsys, "compress", prefix, "--out", tmp_path / "c", "--rank", "1", "--prompts",
                     bad["not_json.jsonl"])
    assert code == 2 and f"{bad['not_json.jsonl']} line 3: not JSON" in err and not loads, err


def test_general_text_files_need_text_on_every_line(tmp_path, capsys, loads):
    cfg = tiny_run_config(tmp_path, **SMALL)
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": "one passage"}, {"txt": "typo"}, {"text": "x"}])
    code, err = _cli(capsys, "run", cfg, f"warm_start.mix_data={general}", "warm_start.mix_ratio=0.2")
    assert code == 2 and f"warm_start.mix_data: {general} line 2: missing required key 'text'" in err and not loads


def test_the_record_check_reads_what_the_loader_reads(tmp_path):
    """JSON arrays (line numbers of their items), blank lines and a byte-order mark are fine, as for the loader;
    every example data file passes."""
    arr = tmp_path / "a.json"
    arr.write_text('[\n  {"prompt": "a"},\n\n  {"prompt": "b"}\n]\n')
    assert check_records_file(arr, [["prompt"]]) == 2
    arr.write_text('[\n  {"prompt": "a"},\n\n  {"text": "b"}\n]\n')
    with pytest.raises(ValueError, match=r"a.json line 4: missing required key 'prompt'"):
        check_records_file(arr, [["prompt"]])
    arr.write_text('[\n  {"prompt": "a"},\n]\n')
    with pytest.raises(ValueError, match=r"a.json line 3: not JSON"):
        check_records_file(arr, [["prompt"]])
    bom = tmp_path / "b.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"messages": [{"role": "user", "content": "a"}]}\n\n')
    assert check_records_file(bom, [["prompt", "completion"], ["messages"]]) == 1
    for path in sorted((ROOT / "examples" / "data").glob("*.jsonl")):
        needs = [["prompt"]] if "prompts" in path.name else [["prompt", "completion"], ["messages"]]
        assert check_records_file(path, needs) > 0, path
