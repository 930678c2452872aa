"""bfloat16 on a CPU without a bf16 matmul path (no AVX512-BF16 / AMX) is ~30x slower than float32: loading a model
in bfloat16 there, or a bf16 warm start, logs one line saying so; float32, or a CPU with the path, logs nothing."""
import logging

import pytest
import torch
from tiny import save_tiny, tiny_model, tiny_tokenizer

import rlprefix
from rlprefix.cli import main
from rlprefix.models import spec
from rlprefix.train.warm_start import WarmStartConfig, warm_start


@pytest.mark.parametrize("slow,dtype,warned", [(True, "bfloat16", True), (True, "float32", False),
                                               (False, "bfloat16", False)])
def test_load_model_warns_of_slow_cpu_bfloat16(tmp_path, monkeypatch, caplog, slow, dtype, warned):
    monkeypatch.setattr(spec, "cpu_bf16_is_slow", lambda: slow)
    path = save_tiny(tmp_path / "tiny")
    with caplog.at_level(logging.WARNING, logger="rlprefix"):
        model, _ = rlprefix.load_model(path, dtype=dtype)
    assert model.dtype == getattr(torch, dtype)
    lines = [r.getMessage() for r in caplog.records if "30x slower" in r.getMessage()]
    assert len(lines) == int(warned)
    if warned:
        assert "model.dtype: float32" in lines[0]


def test_the_warning_is_about_cpus_only():
    assert spec.slow_dtype_warning(torch.float32, "cpu") is None
    assert spec.slow_dtype_warning(torch.bfloat16, "meta") is None
    assert isinstance(spec.cpu_bf16_is_slow(), bool)


def test_a_bf16_warm_start_warns_once_where_cpu_bf16_is_slow(monkeypatch, caplog):
    monkeypatch.setattr(spec, "cpu_bf16_is_slow", lambda: True)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    data = [{"prompt": f"review {w}", "completion": f"{w} is good"} for w in ["film", "food", "phone", "park"]]
    for precision, expected in (("fp32", 0), ("bf16", 1)):
        caplog.clear()
        prefix = rlprefix.Prefix.for_model(model, 4, "kv", generator=torch.Generator().manual_seed(0))
        with caplog.at_level(logging.WARNING, logger="rlprefix"):
            warm_start(model, tok, prefix, data, WarmStartConfig(steps=2, batch_size=2, eval_fraction=0.25,
                                                                 precision=precision, progress=False))
        assert sum("30x slower" in r.getMessage() for r in caplog.records) == expected


def test_the_cli_prints_the_warning_as_one_rlprefix_line(tmp_path, monkeypatch, capsys):
    """The CLI's form for every library warning: `rlprefix: warning: ...`, once, on stderr (stdout stays data)."""
    monkeypatch.setattr(spec, "cpu_bf16_is_slow", lambda: True)
    path = save_tiny(tmp_path / "tiny")
    assert main(["generate", "--model", str(path), "--dtype", "bfloat16", "--prompt", "hi", "--greedy",
                 "--max-new-tokens", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    warned = [line for line in err.splitlines() if "30x slower" in line]
    assert len(warned) == 1 and warned[0].startswith("rlprefix: warning: ") and "30x slower" not in out
    assert main(["generate", "--model", str(path), "--prompt", "hi", "--greedy", "--max-new-tokens", "2"]) == 0
    assert "rlprefix: warning" not in capsys.readouterr().err  # float32: nothing; the handler left with the call
