"""Export a prefix as a PEFT prefix-tuning adapter (adapter_config.json + adapter_model.safetensors).

PEFT lays the prefix out as `prompt_embeddings` [P, L*2*n_kv*head_dim], viewed as [P, 2L, n_kv, head_dim]
with row 2l = layer l's key and 2l+1 its value; rlprefix's [L, 2, P, kv_dim] maps onto it by a permute.
An encoder-decoder model's prefix is exported the same way with task SEQ_2_SEQ_LM and two transformer submodules:
rlprefix keeps it in PEFT's slot order (see rlprefix.seq2seq for how PEFT reads it).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .artifacts import ModelMismatchError
from .io import ArtifactError, load_tensors, read_json, write_artifact_dir
from .modeling import kv_spec

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_TENSORS_FILE = "adapter_model.safetensors"


def kv_to_peft(kv: torch.Tensor) -> torch.Tensor:
    """[L, 2, P, kv_dim] -> PEFT's prompt_embeddings [P, L*2*kv_dim]."""
    layers, two, length, kv_dim = kv.shape
    return kv.permute(2, 0, 1, 3).reshape(length, layers * two * kv_dim)


def peft_to_kv(emb: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Inverse of `kv_to_peft`."""
    length = emb.shape[0]
    return emb.view(length, num_layers, 2, -1).permute(1, 2, 0, 3).contiguous()


def peft_adapter_config(model, length: int) -> dict:
    spec = kv_spec(model)
    return {
        "peft_type": "PREFIX_TUNING", "task_type": "SEQ_2_SEQ_LM" if spec.encoder_decoder else "CAUSAL_LM",
        "num_virtual_tokens": length, "num_layers": spec.num_layers, "token_dim": spec.kv_dim,
        "num_attention_heads": spec.num_kv_heads, "num_transformer_submodules": 2 if spec.encoder_decoder else 1, "prefix_projection": False, "encoder_hidden_size": spec.kv_dim,
        "inference_mode": True, "base_model_name_or_path": getattr(model.config, "name_or_path", None),
        "revision": None, "auto_mapping": None, "modules_to_save": None,
    }


@torch.no_grad()
def export_peft(prefix, model, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `prefix` (any kind, or a CompressedPrefix) as a PEFT adapter that `PeftModel.from_pretrained` loads.

    Only a previous adapter (or rlprefix artifact, or an empty directory) at `out_dir` is replaced, unless
    `overwrite`. An input-conditioned prefix (kind dynamic) is refused: PEFT cannot express it."""
    if getattr(prefix, "input_conditioned", False):
        raise ValueError("PEFT prefix tuning cannot express an input-conditioned prefix (kind dynamic): a PEFT adapter "
                         "holds one fixed prefix for every input, this prefix mixes a bank per prompt; export it in "
                         "the rlprefix format instead")
    kv = prefix.key_values(model).detach().float().cpu()
    dtype = next(model.parameters()).dtype
    return write_artifact_dir(out_dir, {
        "adapter_model.safetensors": {"prompt_embeddings": kv_to_peft(kv).to(dtype)},
        "adapter_config.json": peft_adapter_config(model, kv.shape[2]),
    }, overwrite=overwrite)


def load_peft_kv(path: str | Path, model) -> torch.Tensor:
    """Read a PEFT prefix-tuning adapter directory (JSON + safetensors only) as [L, 2, P, kv_dim] for `model`.

    PEFT adapters carry no architecture fingerprint, so the check is on the layout: layer count and the
    width of `prompt_embeddings` must match the model's KV geometry.
    """
    path = Path(path)
    cfg = read_json(path / PEFT_CONFIG_FILE)
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise ArtifactError(f"{path} is a {cfg.get('peft_type')!r} PEFT adapter, not PREFIX_TUNING")
    if cfg.get("prefix_projection"):
        raise ArtifactError(f"{path} uses prefix_projection (an MLP encoder); only plain prompt_embeddings are read")
    emb = load_tensors(path / PEFT_TENSORS_FILE).get("prompt_embeddings")
    if emb is None or emb.dim() != 2:
        raise ArtifactError(f"{path / PEFT_TENSORS_FILE} holds no 2-D 'prompt_embeddings' tensor")
    spec = kv_spec(model)
    want = spec.num_layers * 2 * spec.kv_dim
    if cfg.get("num_layers", spec.num_layers) != spec.num_layers or emb.shape[1] != want:
        raise ModelMismatchError(f"{path} was made for a different model: adapter has {cfg.get('num_layers')} layers "
                                 f"and prompt_embeddings width {emb.shape[1]}, the model [{spec.describe()}] needs "
                                 f"{spec.num_layers} layers and width {want}")
    return peft_to_kv(emb.float(), spec.num_layers)
