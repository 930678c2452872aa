"""`rlprefix sweep`: one short warm start per prefix length, the lowest validation perplexity chosen."""
import json
import math

import pytest

from rlprefix.cli import main
from rlprefix.sweep import check_lengths, choose_length, sweep_lengths
from test_config import tiny_run_config


def quiet(*a, **k):
    pass


def test_one_row_per_length_perplexity_and_the_argmin(tmp_path):
    path = tiny_run_config(tmp_path, warm_start={"eval_every": 2}, logging={"tensorboard": False})
    res = sweep_lengths(path, [3, 1, 2, 3], steps=2, out_dir=tmp_path / "sw", log=quiet)
    assert [r["length"] for r in res.rows] == [1, 2, 3]  # sorted, the repeat dropped
    for r in res.rows:
        assert r["perplexity"] == pytest.approx(math.exp(r["best_eval_loss"]), rel=1e-12)
        assert r["steps"] == 2 and r["parameters"] > 0
    best = min(r["perplexity"] for r in res.rows)
    assert res.chosen_length == min(r["length"] for r in res.rows if r["perplexity"] == best)
    saved = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert saved["chosen_length"] == res.chosen_length and saved["lengths"] == [1, 2, 3]
    assert [r["best_eval_loss"] for r in saved["rows"]] == [r["best_eval_loss"] for r in res.rows]
    md = (tmp_path / "sw" / "sweep.md").read_text()
    assert len([line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]) == 3
    assert f"| {res.chosen_length} (chosen) |" in md
    assert (tmp_path / "sw" / "sweep.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "sw" / "length_2" / "warm_start_metrics.jsonl").exists()
    # a length's warm start does not depend on what ran before it
    again = sweep_lengths(path, [2], steps=2, out_dir=tmp_path / "sw2", log=quiet)
    assert again.rows[0]["best_eval_loss"] == res.rows[1]["best_eval_loss"]
    # rerun into the same directory: the same settings resume (same numbers), changed ones start afresh
    same = sweep_lengths(path, [2], steps=2, out_dir=tmp_path / "sw", log=quiet)
    assert same.rows[0]["best_eval_loss"] == res.rows[1]["best_eval_loss"]
    changed = sweep_lengths(path, [2], steps=3, out_dir=tmp_path / "sw", log=quiet)
    assert changed.rows[0]["steps"] == 3


def test_ties_go_to_the_shorter_length():
    rows = [{"length": 20, "perplexity": 5.0}, {"length": 10, "perplexity": 5.0}, {"length": 5, "perplexity": 6.0}]
    assert choose_length(rows) == 10
    assert choose_length([{"length": 50, "perplexity": 4.0}, {"length": 5, "perplexity": 4.1}]) == 50


@pytest.mark.parametrize("lengths,message", [
    ([], "give at least one prefix length"),
    (None, "give at least one prefix length"),
    ([5, 0], r"0 is not a prefix length \(each must be an integer >= 1\)"),
    ([-3], "-3 is not a prefix length"),
    ([2.5], "2.5 is not a prefix length"),
    ([True], "True is not a prefix length"),
])
def test_bad_lengths_are_refused(lengths, message):
    with pytest.raises(ValueError, match=message):
        check_lengths(lengths)


def test_cli_sweep_and_its_errors(tmp_path, capsys):
    path = str(tiny_run_config(tmp_path, warm_start={"eval_every": 1}, logging={"tensorboard": False}))
    assert main(["sweep", path, "--lengths", "2", "4", "--steps", "1", "--out", str(tmp_path / "sw")]) == 0
    out = capsys.readouterr().out
    chosen = json.loads((tmp_path / "sw" / "sweep.json").read_text())["chosen_length"]
    assert f"chosen length: {chosen}" in out and "| length | trainable params |" in out
    assert f"rlprefix run {path} prefix.length={chosen}" in out
    for argv, message in [(["--lengths", "0"], "rlprefix: error: --lengths: 0 is not a prefix length"),
                          (["--lengths", "5", "-1"], "rlprefix: error: --lengths: -1 is not a prefix length"),
                          (["--lengths"], "expected at least one argument"),
                          (["--lengths", "ten"], "invalid int value: 'ten'"),
                          (["--lengths", "4", "--steps", "0"], "must be >= 1")]:
        assert main(["sweep", path, *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert main(["sweep", path, "prefix.from_dir=elsewhere", "--lengths", "3"]) == 2
    assert "prefix.from_dir: a sweep builds a fresh prefix" in capsys.readouterr().err
