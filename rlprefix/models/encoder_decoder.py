"""Encoder-decoder models (T5, BART and relatives): the prefix on the decoder's self-attention, laid out as PEFT does.

What PEFT (0.21.2, read from `PeftModelForSeq2SeqLM.forward` and `PeftModel.get_prompt`, and checked against it in
tests/models/test_encoder_decoder.py) does for prefix tuning on a seq2seq model (`task_type="SEQ_2_SEQ_LM"`, which sets
`num_transformer_submodules = 2`):

- one table `prompt_embeddings` [P, L*2*H*D] (L = the adapter's `num_layers`), viewed as [P, 2L, H, D]: row 2s is
  slot s's key and row 2s+1 its value, the same layout as for a decoder-only model;
- with two submodules the table is concatenated with itself along that axis (4L rows) and split into L chunks of
  four rows, chunk l = (self-attention K, V, cross-attention K, V) of decoder layer l. Chunk l is rows 4l..4l+3
  mod 2L, so **decoder layer l's self-attention reads slot 2l mod L**;
- the chunks become an `EncoderDecoderCache`, whose cross-attention cache PEFT then replaces by an empty one (so
  that it is recomputed from the encoder output): **cross-attention gets no prefix**;
- `past_key_values` only reach the decoder: **the encoder gets no prefix** (peft#410, peft#491);
- the decoder's attention mask gets P ones prepended, and decoder tokens take positions P, P+1, ... (BART's learned
  positions start after the cache; T5's relative bias is computed from the cache position).

So PEFT's form is `[x ; PREFIX_dec ; y]`, a prefix on the decoder's self-attention only, not the paper's
`[PREFIX_enc ; x ; PREFIX_dec ; y]` (Li & Liang 2021 also prefix the encoder and cross-attention). rlprefix does
what PEFT does, so that an exported adapter gives identical logits. A consequence of PEFT's layout: with an even
number of decoder layers, layers l and l + L/2 read the same slot and the odd slots are never read (they get no
gradient and are exported unchanged); with an odd number every layer reads a slot of its own. rlprefix keeps the
prefix in PEFT's slot order ([L, 2, P, kv_dim], slot s = PEFT's rows 2s, 2s+1), so the export is the same permute
as for a decoder-only model.

Text initialisation (`Prefix.from_text`, the pipeline's default `prefix.init: text`): the decoder's self-attention
K/V for a text depend on the source it cross-attends to, so `text_kv` fixes one, the **neutral source**: the encoder
run on the single token EOS (`config.eos_token_id`: T5's `</s>`, BART's `</s>`), about the least a source can say.
The text is the decoder's input on its own (no decoder start token before it, as decoder-only text K/V have no BOS),
so it takes positions 0..P-1 and the decoder's real tokens P, P+1, ... follow it. Each decoder layer's K/V go to the
slot it reads (2l mod L). With an odd number of decoder layers a "kv" prefix so made acts exactly as if the text
preceded the decoder's input with the neutral source (with another source the text would have had other K/V from
the first cross-attention on); with an even number, layers l and l + L/2 share a slot, which gets the lower layer's
K/V (layer l + L/2 then starts from layer l's K/V of the text: an approximation, a starting point for training),
and the unread slots are zero.

Sources are right-padded here whatever the caller passed (BART's learned encoder positions count from the first
column), and sampling is the reference loop: the encoder once, then the decoder token by token.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from rlprefix.models import sampling
from rlprefix.models.family import ModelFamily, call, output_cache, prefix_kv
from rlprefix.models.sampling import Rollout, SequenceScores, pad_token_id
from rlprefix.models.spec import kv_spec


def peft_slots(num_layers: int) -> list[int]:
    """The slot each decoder layer's self-attention reads in PEFT's seq2seq layout: 2l mod L."""
    return [(2 * layer) % num_layers for layer in range(num_layers)]


def config_token_id(model, name: str) -> int:
    """A token id from the model's config (or its generation config), the first one when it holds a list."""
    for cfg in (model.config, getattr(model, "generation_config", None)):
        token = getattr(cfg, name, None)
        if isinstance(token, (list, tuple)):
            token = token[0] if token else None
        if token is not None:
            return int(token)
    raise ValueError(f"the {model.config.model_type!r} model has no {name} in its config")


def decoder_start_id(model) -> int:
    return config_token_id(model, "decoder_start_token_id")


def build_cache(model, kv: torch.Tensor | None, batch_size: int) -> EncoderDecoderCache:
    """An EncoderDecoderCache: the prefix K/V ([L, 2, P, kv_dim], PEFT's slot order) in the self-attention cache
    (layer l gets slot 2l mod L, expanded across the batch as a view), an empty cross-attention cache."""
    self_cache = DynamicCache()
    if kv is not None and kv.shape[2]:
        spec = kv_spec(model)
        if kv.dim() != 4 or kv.shape[0] != spec.num_layers or kv.shape[1] != 2 or kv.shape[3] != spec.kv_dim:
            raise ValueError(f"prefix K/V has shape {tuple(kv.shape)}, the model needs "
                             f"[{spec.num_layers}, 2, length, {spec.kv_dim}] ({spec.describe()})")
        kv = kv.to(device=model.device, dtype=sampling.model_dtype(model))
        length = kv.shape[2]
        for layer, slot in enumerate(peft_slots(spec.num_layers)):
            k, v = (kv[slot, i].view(length, spec.num_kv_heads, spec.head_dim).transpose(0, 1)
                    .unsqueeze(0).expand(batch_size, -1, -1, -1) for i in (0, 1))
            self_cache.update(k, v, layer)
    return EncoderDecoderCache(self_cache, DynamicCache())


def neutral_source_id(model) -> int:
    """The token of the neutral source that text K/V are computed with: the model's EOS."""
    return config_token_id(model, "eos_token_id")


def to_slots(per_layer: torch.Tensor) -> torch.Tensor:
    """Per-decoder-layer K/V [L, 2, P, kv_dim] -> PEFT's slot order: slot 2l mod L gets layer l's K/V; a slot two
    layers read gets the lower one's, a slot no layer reads is zero."""
    slots = torch.zeros_like(per_layer)
    for layer, slot in reversed(list(enumerate(peft_slots(per_layer.shape[0])))):  # lower layers written last
        slots[slot] = per_layer[layer]
    return slots


@torch.no_grad()
def decoder_text_kv(model, ids: list[int]) -> torch.Tensor:
    """The decoder's self-attention K/V per decoder layer ([L, 2, len, kv_dim], float32, CPU) for decoder input `ids`
    with the neutral source (the encoder on [EOS])."""
    device = model.device
    source = torch.tensor([[neutral_source_id(model)]], device=device)
    mask = torch.ones_like(source)
    out = call(model, None, encoder_outputs=model.get_encoder()(input_ids=source, attention_mask=mask), attention_mask=mask,
                decoder_input_ids=torch.tensor([ids], device=device), use_cache=True)
    return sampling.cache_to_kv(output_cache(out).self_attention_cache, kv_spec(model)).float().cpu()


def text_kv(model, ids: list[int]) -> torch.Tensor:
    """A prefix's K/V ([L, 2, len, kv_dim] in PEFT's slot order, float32, CPU) from the words `ids`: the decoder's
    own K/V for them with the neutral source (see the module docstring)."""
    return to_slots(decoder_text_kv(model, ids))


def right_padded(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's real tokens moved to the front (a no-op on right-padded rows)."""
    order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)
    return ids.gather(1, order), mask.gather(1, order)


def encode(model, input_ids, attention_mask, share: bool = True):
    """(encoder outputs, right-padded source mask). The encoder carries no prefix, so with `share` rows with the same
    source (k completions per prompt, as in group-based RL) run it once and the result is indexed out to all."""
    device = model.device
    ids, mask = right_padded(input_ids.to(device), attention_mask.to(device))
    first, inverse = sampling.distinct_rows(torch.cat([ids, mask], dim=1)) if share else (None, None)
    if first is None or len(first) == len(ids):
        return model.get_encoder()(input_ids=ids, attention_mask=mask), mask
    hidden = model.get_encoder()(input_ids=ids[first], attention_mask=mask[first]).last_hidden_state
    return BaseModelOutput(last_hidden_state=hidden[inverse]), mask


def forward(model, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None, prefix=None, *,
            kv=None, output_hidden: bool = False, share_sources: bool = True) -> sampling.ForwardOutput:
    """Source + decoder inputs -> the decoder's logits, with the prefix on the decoder's self-attention."""
    if kv is None:
        kv = prefix_kv(model, prefix)
    length = 0 if kv is None else kv.shape[2]
    encoded, mask = encode(model, input_ids, attention_mask, share_sources)
    decoder_input_ids = decoder_input_ids.to(model.device)
    batch = decoder_input_ids.shape[0]
    if decoder_attention_mask is None:
        decoder_attention_mask = torch.ones_like(decoder_input_ids)
    dmask = torch.cat([decoder_attention_mask.new_ones(batch, length), decoder_attention_mask.to(model.device)], 1)
    out = call(model, build_cache(model, kv, batch), encoder_outputs=encoded, attention_mask=mask,
               decoder_input_ids=decoder_input_ids, decoder_attention_mask=dmask, use_cache=True,
                output_hidden_states=output_hidden)
    return sampling.ForwardOutput(out.logits, out.decoder_hidden_states[-1] if output_hidden else None)


def score_completions(model, prompt_ids, prompt_mask, completion_ids, completion_mask, prefix=None, *, kv=None,
                      temperature: float = 1.0, output_hidden: bool = False,
                      share_prompts: bool = True) -> SequenceScores:
    """Log-probs of decoder tokens (the completion) given sources: one forward, decoder inputs = start + completion
    shifted right. Rows are right-padded after their end, so the causal decoder never sees that padding. With
    `share_prompts` the encoder runs once per distinct source."""
    completion_ids = completion_ids.to(model.device)
    start = completion_ids.new_full((completion_ids.shape[0], 1), decoder_start_id(model))
    decoder_ids = torch.cat([start, completion_ids[:, :-1]], dim=1)
    cmask = completion_mask.to(model.device)
    decoder_mask = torch.cat([torch.ones_like(cmask[:, :1]), cmask[:, :-1]], dim=1)
    out = forward(model, prompt_ids, prompt_mask, decoder_ids, decoder_mask, prefix, kv=kv,
                  output_hidden=output_hidden, share_sources=share_prompts)
    return SequenceScores(sampling.logprobs_of(out.logits, completion_ids, temperature), out.logits, out.hidden)


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prefix=None, *, kv=None,
           bank=None, prefix_index: torch.Tensor | None = None, groups: int = 1, row_seeds: list[int] | None = None,
           decode: bool = True, **kw) -> Rollout:
    """The reference loop and `decoding.engine.sample` for an encoder-decoder model (same keywords, same Rollout; sources come
    back right-padded). Per-row prefixes (`bank` + `prefix_index`) run as one batch per prefix."""
    if groups != 1:
        FAMILY.require("ensemble", model)
    if bank is None or prefix_index is None:
        if kv is None:
            kv = prefix_kv(model, prefix)
        return _sample(model, tokenizer, prompt_ids, prompt_mask, kv, row_seeds, decode, **kw)
    rows = prompt_ids.shape[0]
    parts = []
    for i in prefix_index.unique().tolist():
        sel = (prefix_index == i).nonzero().flatten()
        sub_kv = None if i < 0 or not bank.lengths[i] else bank.kv[i][:, :, :bank.lengths[i]]
        seeds = [row_seeds[j] for j in sel.tolist()] if row_seeds is not None else None
        sub_kw = dict(kw)
        if sub_kw.get("force_tokens") is not None:
            sub_kw["force_tokens"] = sub_kw["force_tokens"][sel.to(sub_kw["force_tokens"].device)]
        parts.append((sel, _sample(model, tokenizer, prompt_ids[sel], prompt_mask[sel], sub_kv, seeds, decode,
                                   **sub_kw)))
    return _merge(parts, rows, tokenizer, decode)


def _sample(model, tokenizer, prompt_ids, prompt_mask, kv, row_seeds, decode, *, max_new_tokens: int = 64,
            min_new_tokens: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
            do_sample: bool = True, generator: torch.Generator | None = None, return_hidden: bool = False,
            force_tokens: torch.Tensor | None = None) -> Rollout:
    """The reference loop: run the encoder once, then the decoder one token at a time against the prefix cache.
    (`temperature` > 0 is checked by the callers, `models.reference_sample` and `decoding.engine.sample`.)"""
    device = model.device
    ids, mask = right_padded(prompt_ids.to(device), prompt_mask.to(device))
    batch = ids.shape[0]
    length = 0 if kv is None else kv.shape[2]
    encoded, _ = encode(model, ids, mask)
    cache = build_cache(model, kv, batch)
    stop, pad = sampling.stop_and_pad(model, tokenizer, device)
    row_gens = sampling.row_generators(row_seeds, batch)
    if force_tokens is not None:
        max_new_tokens = min(max_new_tokens, force_tokens.shape[1])
    inputs = torch.full((batch, 1), decoder_start_id(model), dtype=torch.long, device=device)
    dmask = torch.ones(batch, length + 1, dtype=torch.long, device=device)
    record = sampling.DecodeRecord(batch, stop, pad)
    for step in range(max_new_tokens):
        out = call(model, cache, encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=inputs,
                   decoder_attention_mask=dmask, use_cache=True,
                    output_hidden_states=return_hidden)
        cache = output_cache(out)
        logits = out.logits[:, -1].float()
        if force_tokens is not None:
            nxt = force_tokens[:, step].to(device)
        else:
            nxt = sampling.next_tokens(logits, stop, step < min_new_tokens, do_sample, temperature, top_k, top_p,
                                         row_gens, generator)
        nxt = record.add(nxt, sampling.logprobs_of(logits, nxt, temperature),
                         out.decoder_hidden_states[-1][:, -1] if return_hidden else None)
        if bool(record.done.all()):
            break
        inputs = nxt.unsqueeze(1)
        dmask = torch.cat([dmask, dmask.new_ones(batch, 1)], dim=1)
    return record.rollout(tokenizer, ids, mask, decode)


def _merge(parts, rows: int, tokenizer, decode: bool) -> Rollout:
    """One Rollout from per-prefix sub-batches (`parts`: (row indices, Rollout)), in the original row order."""
    def gather(name, fill):
        tensors = [getattr(r, name) for _, r in parts]
        if tensors[0] is None:
            return None
        width = max(t.shape[1] for t in tensors)
        out = tensors[0].new_full((rows, width, *tensors[0].shape[2:]), fill)
        for (sel, _), t in zip(parts, tensors):
            out[sel.to(out.device), :t.shape[1]] = t
        return out

    pad = pad_token_id(tokenizer)
    texts = [""] * rows
    if decode:
        for sel, r in parts:
            for j, text in zip(sel.tolist(), r.texts):
                texts[j] = text
    return Rollout(gather("prompt_ids", pad), gather("prompt_mask", 0), gather("completion_ids", pad),
                   gather("completion_mask", 0), gather("logprobs", 0.0), texts, gather("hidden", 0.0))


class EncoderDecoder(ModelFamily):
    """An encoder-decoder model (T5, BART, ...): the prefix on the decoder's self-attention, in PEFT's layout."""

    name = "encoder-decoder"
    peft_task_type = "SEQ_2_SEQ_LM"
    peft_submodules = 2
    auto_class = "seq2seq"
    # the engine's static cache, the server's running batch, FSDP and 'prompt' prefixes are decoder-only code; the
    # engine falls back to the reference loop here (one batch per prefix)
    unsupported = frozenset({"prompt_prefix", "fsdp", "engine", "ensemble", "on_step", "serve", "general_text",
                             "image_prefix"})

    def build_cache(self, model, kv, batch_size: int):
        return build_cache(model, kv, batch_size)

    def text_kv(self, model, ids: list[int]):
        return text_kv(model, ids)

    def sft_logits(self, model, batch: dict, prefix):
        """Logits over a supervised batch: `source_ids` to the encoder, `input_ids` are the decoder's inputs."""
        return forward(model, batch["source_ids"], batch["source_mask"], batch["input_ids"], batch["attention_mask"],
                       prefix).logits

    def score_completions(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, prefix=None, **kw):
        return score_completions(model, prompt_ids, prompt_mask, completion_ids, completion_mask, prefix, **kw)

    def sample(self, model, tokenizer, prompt_ids, prompt_mask, prefix=None, **kw):
        return sample(model, tokenizer, prompt_ids, prompt_mask, prefix, **kw)

    def generate_inputs(self, model, input_ids, attention_mask, length: int, fill: int) -> dict:
        """The source right-padded (as everywhere here); decoder inputs of `length` + 1 start tokens: the cache holds
        the first `length` (the prefix), and `generate` prepends the start token to decoder inputs lacking it."""
        ids, mask = right_padded(input_ids, attention_mask)
        decoder = ids.new_full((ids.shape[0], length + 1), decoder_start_id(model))
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder,
                "decoder_attention_mask": torch.ones_like(decoder)}

    def decoder_start_id(self, model) -> int | None:
        return decoder_start_id(model)


FAMILY = EncoderDecoder()
