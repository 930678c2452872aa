"""The prefix bank: several prefixes for one model stacked on its device, and which prefix each row of a batch carries
(`prefix_index[b]`, -1 = the bare model) however the caller gave them: one prefix, a K/V tensor, a list with one per
prompt, an ensemble, or an input-conditioned prefix (each row its own mixture)."""
from __future__ import annotations

import torch

from rlprefix.models.family import prefix_kv
from rlprefix.models.sampling import model_dtype
from rlprefix.models.spec import kv_spec
from rlprefix.prefixes.dynamic import is_input_conditioned, refusal


class PrefixBank:
    """Several prefixes for one model, stacked (zero-padded to the longest) on the model's device.

    `prefixes` is a dict name -> prefix, or a list (names are then "[0]", "[1]", ...). An entry may be a
    `Prefix`, a `CompressedPrefix`, a K/V tensor [layers, 2, length, kv_dim], or None (the bare model).
    """

    @torch.no_grad()
    def __init__(self, model, prefixes):
        items = prefixes.items() if isinstance(prefixes, dict) else ((f"[{i}]", p) for i, p in enumerate(prefixes))
        self.spec = kv_spec(model)
        self.names: list[str] = []
        kvs = []
        for name, p in items:
            self.names.append(str(name))
            kvs.append(checked_kv(model, self.spec, str(name), p))
        if not self.names:
            raise ValueError("a PrefixBank needs at least one prefix")
        self.lengths = [0 if kv is None else kv.shape[2] for kv in kvs]
        self.max_length = max(self.lengths)
        spec = self.spec
        self.kv = torch.zeros(len(kvs), spec.num_layers, 2, self.max_length, spec.kv_dim, device=model.device,
                              dtype=model_dtype(model))
        for i, kv in enumerate(kvs):
            if kv is not None:
                self.kv[i, :, :, :kv.shape[2]] = kv.detach().to(self.kv)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(str(name))
        except ValueError:
            raise KeyError(f"no prefix named {name!r} in the bank (it has {self.names})") from None


def checked_kv(model, spec, name: str, prefix) -> torch.Tensor | None:
    """The entry's K/V, or a ValueError naming the entry when it was made for another architecture."""
    if prefix is None:
        return None
    if is_input_conditioned(prefix):
        raise ValueError(refusal("bank", f"prefix {name}"))
    own = getattr(prefix, "spec", None)
    if own is not None and own != spec:
        raise ValueError(f"prefix {name} was made for {own.describe()}; the model is {spec.describe()}")
    kv = prefix_kv(model, prefix)
    if kv is None or kv.shape[2] == 0:
        return None
    if kv.dim() != 4 or kv.shape[0] != spec.num_layers or kv.shape[1] != 2 or kv.shape[3] != spec.kv_dim:
        raise ValueError(f"prefix {name} has K/V of shape {tuple(kv.shape)}; the model needs "
                         f"[{spec.num_layers}, 2, length, {spec.kv_dim}] ({spec.describe()})")
    return kv


@torch.no_grad()
def dynamic_bank(model, prefix, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """(PrefixBank with one entry per row, index 0..rows-1): an input-conditioned prefix's mixture for each
    prompt, routed on its real tokens, exactly as the warm start routes on the prompt tokens."""
    kv = prefix.key_values(model, prompt_ids, prompt_mask)
    index = torch.arange(kv.shape[0], dtype=torch.long, device=model.device)
    return PrefixBank(model, list(kv.unbind(0))), index


def resolve_prefixes(model, prefix, kv, bank, prefix_index, rows: int, prompt_ids=None, prompt_mask=None):
    """(bank or None, index LongTensor [rows] on the device) from whichever way the prefixes were given."""
    device = model.device
    given = [x is not None for x in (prefix, kv, bank)]
    if sum(given) > 1:
        raise ValueError("pass one of prefix, kv, or bank + prefix_index")
    if bank is None:
        if prefix_index is not None:
            raise ValueError("prefix_index needs a bank")
        if kv is None and is_input_conditioned(prefix):  # each row its own mixture: the per-row path
            return dynamic_bank(model, prefix, prompt_ids, prompt_mask)
        if kv is None:
            kv = prefix_kv(model, prefix)
        if kv is None or kv.shape[2] == 0:
            return None, torch.full((rows,), -1, dtype=torch.long, device=device)
        return PrefixBank(model, [kv]), torch.zeros(rows, dtype=torch.long, device=device)
    if prefix_index is None:
        raise ValueError("a bank needs prefix_index (LongTensor [rows], -1 = no prefix)")
    index = torch.as_tensor(prefix_index, dtype=torch.long).to(device)
    if index.shape != (rows,):
        raise ValueError(f"prefix_index has shape {tuple(index.shape)}; the batch has {rows} rows")
    if bool(((index < -1) | (index >= len(bank))).any()):
        raise ValueError(f"prefix_index values must be in [-1, {len(bank) - 1}]")
    return bank, index


def plan_rows(model, prefix, ensemble, n: int):
    """(bank, per-row index over n * groups rows, groups) for one prefix, a list of them, or an ensemble."""
    if ensemble is not None:
        bank = PrefixBank(model, {f"ensemble[{j}]": p for j, p in enumerate(ensemble)})
        index = torch.arange(len(ensemble)).repeat(n)
        return bank, index, len(ensemble)
    entries = list(prefix) if isinstance(prefix, (list, tuple)) else [prefix] * n
    unique: dict[int, int] = {}
    names: dict[str, object] = {}
    index = []
    for i, p in enumerate(entries):
        if p is None:
            index.append(-1)
            continue
        if id(p) not in unique:
            unique[id(p)] = len(names)
            names[f"prefixes[{i}]" if isinstance(prefix, (list, tuple)) else "prefix"] = p
        index.append(unique[id(p)])
    if not names:
        return None, torch.full((n,), -1, dtype=torch.long), 1
    return PrefixBank(model, names), torch.tensor(index, dtype=torch.long), 1
