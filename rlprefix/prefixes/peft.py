"""Export a prefix as a PEFT prefix-tuning adapter (adapter_config.json + adapter_model.safetensors).

PEFT lays the prefix out as `prompt_embeddings` [P, L*2*n_kv*head_dim], viewed as [P, 2L, n_kv, head_dim]
with row 2l = layer l's key and 2l+1 its value; rlprefix's [L, 2, P, kv_dim] maps onto it by a permute.
An encoder-decoder model's prefix is exported the same way with task SEQ_2_SEQ_LM and two transformer submodules:
rlprefix keeps it in PEFT's slot order (see rlprefix/models/encoder_decoder.py for how PEFT reads it).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from rlprefix.files import PEFT_CONFIG_FILE, PEFT_TENSORS_FILE, load_tensors, read_json, write_artifact_dir
from rlprefix.models import family_of
from rlprefix.models.spec import ModelMismatchError, kv_spec
from rlprefix.prefixes.artifacts import validate_peft_adapter
from rlprefix.prefixes.dynamic import REFUSALS
from rlprefix.prefixes.peft_generate import ignored_warning
from rlprefix.prefixes.layout import kv_to_rows, rows_to_kv

log = logging.getLogger("rlprefix.prefixes.peft")


def kv_to_peft(kv: torch.Tensor) -> torch.Tensor:
    """[L, 2, P, kv_dim] -> PEFT's prompt_embeddings [P, L*2*kv_dim]."""
    return kv_to_rows(kv)


def peft_to_kv(emb: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Inverse of `kv_to_peft`."""
    return rows_to_kv(emb, num_layers).contiguous()


def peft_adapter_config(model, length: int) -> dict:
    spec, family = kv_spec(model), family_of(model)
    return {
        "peft_type": "PREFIX_TUNING", "task_type": family.peft_task_type,
        "num_virtual_tokens": length, "num_layers": spec.num_layers, "token_dim": spec.kv_dim,
        "num_attention_heads": spec.num_kv_heads, "num_transformer_submodules": family.peft_submodules,
        "prefix_projection": False, "encoder_hidden_size": spec.kv_dim,
        "inference_mode": True, "base_model_name_or_path": getattr(model.config, "name_or_path", None),
        "revision": None, "auto_mapping": None, "modules_to_save": None,
    }


@torch.no_grad()
def export_peft(prefix, model, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `prefix` (any kind, or a CompressedPrefix) as a PEFT adapter that `PeftModel.from_pretrained` loads.

    Only a previous adapter (or rlprefix artifact, or an empty directory) at `out_dir` is replaced, unless
    `overwrite`. An input-conditioned prefix (kind dynamic) is refused: PEFT cannot express it. Where the installed
    PEFT ignores prefix adapters in `generate` (measured: rlprefix.prefixes.peft_generate), the adapter is still
    written and one warning line on stderr says so and names the route that works (`rlprefix.generate_kwargs`)."""
    if getattr(prefix, "input_conditioned", False):
        raise ValueError(REFUSALS["peft"])
    kv = prefix.key_values(model).detach().float().cpu()
    dtype = next(model.parameters()).dtype
    out = write_artifact_dir(out_dir, {
        PEFT_TENSORS_FILE: {"prompt_embeddings": kv_to_peft(kv).to(dtype)},
        PEFT_CONFIG_FILE: peft_adapter_config(model, kv.shape[2]),
    }, overwrite=overwrite)
    warning = ignored_warning()
    if warning:
        log.warning(warning)
    return out


def load_peft_kv(path: str | Path, model) -> torch.Tensor:
    """Read a PEFT prefix-tuning adapter directory (JSON + safetensors only) as [L, 2, P, kv_dim] for `model`.

    Its files are checked by `artifacts.validate_peft_adapter` (every config field's type, finite tensors). PEFT
    adapters carry no architecture fingerprint, so the check against the model is on the layout: layer count and
    the width of `prompt_embeddings` must match the model's KV geometry.
    """
    path = Path(path)
    cfg = read_json(path / PEFT_CONFIG_FILE)
    tensors = load_tensors(path / PEFT_TENSORS_FILE)
    emb = validate_peft_adapter(cfg, tensors, path / PEFT_CONFIG_FILE, path / PEFT_TENSORS_FILE)
    spec = kv_spec(model)
    want = spec.num_layers * 2 * spec.kv_dim
    if cfg.get("num_layers", spec.num_layers) != spec.num_layers or emb.shape[1] != want:
        raise ModelMismatchError(f"{path} was made for a different model: adapter has {cfg.get('num_layers')} layers "
                                 f"and prompt_embeddings width {emb.shape[1]}, the model [{spec.describe()}] needs "
                                 f"{spec.num_layers} layers and width {want}")
    return peft_to_kv(emb.float(), spec.num_layers)
