"""Every artifact the server loads is validated in one place (`rlprefix.prefixes.artifacts`): a damaged manifest, PEFT
config or tensor file is refused with one line naming its folder, at start and at reload, and the other prefixes load;
a request for a model that is not served is a 404, never a 500, even while such a folder sits in the directory."""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlprefix import Prefix, compress, export_peft, kv_spec
from rlprefix.files import ArtifactError
from rlprefix.serve.app import build_server, create_app
from rlprefix.serve.store import PrefixStore, load_served
from test_serve_security import Live
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _kv(model, length: int = 3, seed: int = 1) -> Prefix:
    return Prefix(kv_spec(model), length, "kv", init_std=1.0, generator=torch.Generator().manual_seed(seed))


def _edit_json(path: Path, field: str, value) -> None:
    """Set `field` (dotted: "model.num_layers") of the JSON file at `path`."""
    obj = json.loads(path.read_text())
    *parents, last = field.split(".")
    at = obj
    for p in parents:
        at = at[p]
    at[last] = value
    path.write_text(json.dumps(obj))


def bad_manifest(model, folder: Path, field: str, value) -> Path:
    """A kv prefix whose manifest has `field` set to `value` ("lowrank." fields: a compressed prefix)."""
    if field.startswith("lowrank."):
        compress(_kv(model, 4), rank=2, anchor=False).save(folder)
        field = field.removeprefix("lowrank.")
    else:
        _kv(model).save(folder)
    _edit_json(folder / "manifest.json", field, value)
    return folder


def bad_peft(model, folder: Path, field: str | None = None, value=None, fill: float | None = None) -> Path:
    """A PEFT adapter with `field` of its config set to `value`, or its prompt_embeddings[0, 0] set to `fill`."""
    export_peft(_kv(model), model, folder)
    if field is not None:
        _edit_json(folder / "adapter_config.json", field, value)
    if fill is not None:
        tensors = load_file(folder / "adapter_model.safetensors")
        tensors["prompt_embeddings"][0, 0] = fill
        save_file(tensors, folder / "adapter_model.safetensors")
    return folder


MANIFESTS = [
    ("tensors", {"kv": 5}), ("tensors", [["kv", [2, 2, 3, 16]]]), ("tensors", {"kv": [2, "2", 3, 16]}),
    ("tensors", {"kv": [2, -2, 3, 16]}), ("tensors", "kv"), ("length", "3"), ("length", True), ("length", -1),
    ("format_version", True), ("kind", 3), ("kind", "mlp"), ("dtype", None), ("rlprefix_version", 1),
    ("num_layers", "2"), ("model", []), ("model.num_layers", "2"), ("model.num_kv_heads", 0),
    ("model.fingerprint", 5), ("model.encoder_decoder", "no"), ("config", "kv"), ("config.kind", "mlp"),
    ("config.length", "3"), ("config.init_ids", ["a"]), ("config.init_ids", [10 ** 6]), ("config.init_ids", 7),
    ("config.mlp_hidden", 0), ("config.mlp_input_dim", "16"), ("provenance", []),
    ("lowrank.config.scope", "diagonal"), ("lowrank.config.shapes", [[4, 2]]), ("lowrank.config.ranks", [1] * 4),
    ("lowrank.config.ranks", "2"), ("lowrank.config.anchor_ids", [-1]), ("lowrank.config.dtype", 16),
]
PEFT_CONFIGS = [
    ("peft_type", "LORA"), ("peft_type", 5), ("num_virtual_tokens", "3"), ("num_virtual_tokens", 99),
    ("num_layers", "2"), ("prefix_projection", "no"), ("prefix_projection", True), ("token_dim", -4),
    ("inference_mode", "yes"), ("base_model_name_or_path", 3),
]


def _one_line_naming(e: pytest.ExceptionInfo, folder: Path) -> None:
    message = str(e.value)
    assert str(folder) in message and "\n" not in message, message


@pytest.mark.parametrize("field, value", MANIFESTS)
def test_every_manifest_field_is_checked(model, tmp_path, field, value):
    folder = bad_manifest(model, tmp_path / "p", field, value)
    with pytest.raises(ArtifactError) as e:
        load_served(folder, model)
    _one_line_naming(e, folder)


@pytest.mark.parametrize("field, value, fill", [(f, v, None) for f, v in PEFT_CONFIGS]
                         + [(None, None, math.nan), (None, None, math.inf), (None, None, -math.inf)])
def test_every_peft_adapter_field_and_tensor_is_checked(model, tmp_path, field, value, fill):
    folder = bad_peft(model, tmp_path / "p", field, value, fill)
    with pytest.raises(ArtifactError) as e:
        load_served(folder, model)
    _one_line_naming(e, folder)
    if fill is not None:
        assert "non-finite" in str(e.value)


def test_kv_that_overflows_the_models_dtype_is_refused(tmp_path):
    """Finite in float32, infinite once cast to the float16 model the server runs: refused, not served as NaN."""
    model = tiny_model("llama").half()
    prefix = _kv(model)
    with torch.no_grad():
        prefix.kv[0, 0, 0, 0] = 1e6
    prefix.save(tmp_path / "p")
    with pytest.raises(ArtifactError, match="non-finite values .* in float16") as e:
        load_served(tmp_path / "p", model)
    _one_line_naming(e, tmp_path / "p")


def test_store_refuses_bad_folders_and_loads_the_rest(model, tmp_path):
    root = tmp_path / "served"
    _kv(model).save(root / "good")
    export_peft(_kv(model, 2, 2), model, root / "goodpeft")
    for i, (field, value) in enumerate(MANIFESTS):
        bad_manifest(model, root / f"m{i}", field, value)
    for i, (field, value) in enumerate(PEFT_CONFIGS):
        bad_peft(model, root / f"c{i}", field, value)
    bad_peft(model, root / "nan", fill=math.nan)
    (root / "empty").mkdir()
    report = PrefixStore(model, root).scan()
    assert sorted(report["loaded"]) == ["good", "goodpeft"]
    assert len(report["refused"]) == len(MANIFESTS) + len(PEFT_CONFIGS) + 2
    assert all("\n" not in reason for reason in report["refused"].values())


def _refusals(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"refusing prefix {name!r}")]


def test_server_refuses_bad_folders_at_start_and_reload_and_404s_unknown_models(model, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rlprefix")
    root, tok = tmp_path / "served", tiny_tokenizer()
    _kv(model).save(root / "alpha")
    bad = {"tensors_int": bad_manifest(model, root / "tensors_int", "tensors", {"kv": 5}),
           "tensors_list": bad_manifest(model, root / "tensors_list", "tensors", [["kv", [2, 2, 3, 16]]]),
           "peft_nan": bad_peft(model, root / "peft_nan", fill=math.nan)}
    live = Live(create_app(build_server(model, tok, "tiny", root)))
    try:
        for name, folder in bad.items():  # at start: one line each, naming the folder
            lines = _refusals(caplog, name)
            assert len(lines) == 1 and str(folder) in lines[0] and "\n" not in lines[0], lines
        status, _, body = live.request("GET", "/v1/models")
        assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["base", "alpha"]
        for name in ("nope", "tensors_int", "peft_nan", "nope"):  # unknown names rescan (at most once a second)
            status, _, body = live.request("POST", "/v1/completions", json.dumps(
                {"model": name, "prompt": "hi", "max_tokens": 2}).encode())
            assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found", body
            assert live.request("GET", f"/v1/models/{name}")[0] == 404
            time.sleep(0.6)
        assert all(len(_refusals(caplog, name)) == 1 for name in bad)  # unchanged folders: no new line
        # reload: a new prefix and a new bad folder, a removed prefix
        _kv(model, 4, 2).save(root / "beta")
        bad_peft(model, root / "peft_type", "num_virtual_tokens", "3")
        shutil.rmtree(root / "alpha")
        status, _, body = live.request("POST", "/v1/prefixes/reload", b"{}")
        report = json.loads(body)
        assert status == 200 and report["loaded"] == ["beta"] and report["removed"] == ["alpha"]
        assert list(report["refused"]) == ["peft_type"] and "num_virtual_tokens" in report["refused"]["peft_type"]
        assert report["models"] == ["base", "beta"] and len(_refusals(caplog, "peft_type")) == 1
        status, _, body = live.request("POST", "/v1/completions", json.dumps(
            {"model": "beta", "prompt": "hi", "max_tokens": 2}).encode())
        assert status == 200 and json.loads(body)["model"] == "beta"
        time.sleep(1.1)
        bad_manifest(model, root / "late", "config.init_ids", ["x"])  # appears between reloads
        for name in ("alpha", "late", "other"):
            assert live.request("POST", "/v1/completions", json.dumps(
                {"model": name, "prompt": "hi", "max_tokens": 2}).encode())[0] == 404
        assert len(_refusals(caplog, "late")) == 1
    finally:
        live.close()
