"""Decoder-only causal LMs: running a frozen model with a prefix (caches, masks, positions, scores, the reference loop).

Conventions (the same as PEFT's prefix tuning, so exported prefixes give the same logits there):
- the attention mask gets `length` ones prepended for the prefix;
- real tokens take positions length, length+1, ... counted over non-padding tokens only, so a
  left-padded row sees exactly what it would see alone;
- prefix keys enter the cache as they are (no rotary embedding is applied to them).

The reference sampling loop (`sample`) is a hand-written decode loop rather than `model.generate`: PPO needs the
log-probs of the policy (softmax(logits / T)), not of the top-k/top-p-warped sampling distribution, and they must agree
with a later single forward pass over prompt + completion (`score_completions`). The rollout engine
(rlprefix/decoding/engine.py) is the fast path with the same contract.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from rlprefix.distributed import collectives
from rlprefix.models.family import ModelFamily, call, output_cache, prefix_kv
from rlprefix.models.sampling import DecodeRecord, ForwardOutput, Rollout, SequenceScores, cache_to_kv, distinct_rows, logprobs_of, model_dtype, next_tokens, row_generators, stop_and_pad
from rlprefix.models.spec import kv_spec


def build_cache(model, kv: torch.Tensor | None, batch_size: int) -> DynamicCache:
    """A fresh DynamicCache holding the prefix K/V ([layers, 2, P, kv_dim]) for `batch_size` rows.

    The K/V are expanded (a view, not a copy) across the batch; gradients flow back into `kv`. Per-row K/V
    ([batch, layers, 2, P, kv_dim], an input-conditioned prefix) give each row its own.
    """
    cache = DynamicCache()
    if kv is None or kv.shape[-2] == 0:
        return cache
    spec = kv_spec(model)
    rows = kv if kv.dim() == 5 else kv.unsqueeze(0)
    if rows.shape[1] != spec.num_layers or rows.shape[4] != spec.kv_dim or rows.shape[0] not in (1, batch_size):
        raise ValueError(f"prefix K/V has shape {tuple(kv.shape)}, the model needs "
                         f"[{spec.num_layers}, 2, length, {spec.kv_dim}] ({spec.describe()}), or one per row of "
                         f"the {batch_size}")
    rows = rows.to(device=model.device, dtype=model_dtype(model))
    length = rows.shape[3]
    for layer in range(spec.num_layers):
        k, v = (rows[:, layer, i].view(rows.shape[0], length, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
                .expand(batch_size, -1, -1, -1) for i in (0, 1))
        cache.update(k, v, layer)
    return cache


@torch.no_grad()
def text_kv(model, ids: list[int]) -> torch.Tensor:
    """The frozen model's own K/V for a token sequence, as [layers, 2, len, kv_dim] (float32, CPU)."""
    out = call(model, None, input_ids=torch.tensor([ids], device=model.device), use_cache=True)
    return cache_to_kv(output_cache(out), kv_spec(model)).float().cpu()


def embeds_kv(model, embeds: torch.Tensor) -> torch.Tensor:
    """The frozen model's K/V [layers, 2, len, kv_dim] for input embeddings [len, hidden] (a 'prompt' prefix;
    differentiable: prompt tuning trains the embeddings through it); per row [rows, layers, 2, len, kv_dim] for
    [rows, len, hidden] (an image prefix's mapped tokens)."""
    rows = embeds if embeds.dim() == 3 else embeds.unsqueeze(0)
    out = call(model, None, inputs_embeds=rows.to(model_dtype(model)), use_cache=True)
    cache, spec = output_cache(out), kv_spec(model)
    if embeds.dim() == 2:
        return cache_to_kv(cache, spec)
    return torch.stack([cache_to_kv(cache, spec, r) for r in range(rows.shape[0])])


def position_ids(attention_mask: torch.Tensor, offset: int) -> torch.Tensor:
    """Positions counted over real tokens only, starting at `offset` (the prefix length)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0) + offset


def forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix=None, *,
            kv: torch.Tensor | None = None, logits_to_keep: int = 0, output_hidden: bool = False,
            route_mask: torch.Tensor | None = None) -> ForwardOutput:
    """One forward pass over full sequences with the prefix attached (pass `kv` to reuse computed K/V).
    `route_mask`: the prompt tokens an input-conditioned prefix routes on (default: every real token)."""
    if kv is None:
        kv = prefix_kv(model, prefix, input_ids, attention_mask if route_mask is None else route_mask)
    length = 0 if kv is None else kv.shape[-2]
    batch = input_ids.shape[0]
    cache = build_cache(model, kv, batch)
    full_mask = torch.cat([attention_mask.new_ones(batch, length), attention_mask], dim=1)
    out = call(model, cache, input_ids=input_ids, attention_mask=full_mask,
               position_ids=position_ids(attention_mask, length), use_cache=True, output_hidden_states=output_hidden,
               logits_to_keep=logits_to_keep)
    hidden = None
    if output_hidden:
        hidden = out.hidden_states[-1]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
    return ForwardOutput(out.logits, hidden)


def score_completions(model, prompt_ids, prompt_mask, completion_ids, completion_mask, prefix=None, *,
                      kv=None, temperature: float = 1.0, output_hidden: bool = False,
                      share_prompts: bool = True) -> SequenceScores:
    """Log-probs of completion tokens given left-padded prompts.

    Only the logits of the completion positions are materialised (`logits_to_keep`). With `share_prompts`,
    rows that carry the same prompt (k completions per prompt, as in group-based RL) run the prompt once: the
    unique prompts fill a cache, which is then indexed out to every row for the completion forward. That is
    the same computation (logits agree to float rounding; gradients reach the prefix through both parts)
    at the cost of U*Tp + B*Tc tokens instead of B*(Tp+Tc).
    """
    rows = prompt_ids.shape[0]
    key = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)
    if kv is None and getattr(prefix, "input_conditioned", False):
        # each row's own K/V (a dynamic prefix's mixture, an image prefix's image): rows share a prompt's forward
        # only when their K/V are the same too
        kv = prefix_kv(model, prefix, prompt_ids, prompt_mask)
        key = torch.cat([key, distinct_rows(kv.detach().flatten(1))[1].unsqueeze(1).to(key)], dim=1)
    if share_prompts:
        first, inverse = distinct_rows(key)
        # a sharded model runs the same forwards on every process: all share prompts (2 forwards) or none do
        if collectives.agree_any(model, len(first) < rows):
            return _score_shared(model, prompt_ids, prompt_mask, completion_ids, completion_mask, prefix,
                                 kv[first] if kv is not None and kv.dim() == 5 else kv, temperature, output_hidden,
                                 first, inverse)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    tc = completion_ids.shape[1]
    route = torch.cat([prompt_mask, torch.zeros_like(completion_mask)], dim=1)  # an input-conditioned prefix: the prompt
    out = forward(model, input_ids, mask, prefix, kv=kv, logits_to_keep=tc + 1, output_hidden=output_hidden,
                  route_mask=route)
    logits = out.logits[:, :-1]
    hidden = out.hidden[:, :-1] if out.hidden is not None else None
    return SequenceScores(logprobs_of(logits, completion_ids, temperature), logits, hidden)


def _score_shared(model, prompt_ids, prompt_mask, completion_ids, completion_mask, prefix, kv, temperature,
                  output_hidden, first: torch.Tensor, inverse: torch.Tensor) -> SequenceScores:
    """score_completions with the prompt computed once per unique prompt (rows `first`, row r uses inverse[r])."""
    p_ids, p_mask = prompt_ids[first], prompt_mask[first]
    if kv is None:  # an input-conditioned prefix: one K/V per unique prompt, indexed out with the prompt's cache
        kv = prefix_kv(model, prefix, p_ids, p_mask)
    length = 0 if kv is None else kv.shape[-2]
    cache = build_cache(model, kv, len(first))
    # 1. the unique prompts, keeping the logit (and hidden state) of their last position: it predicts token 1
    head = call(model, cache, input_ids=p_ids, attention_mask=torch.cat([p_mask.new_ones(len(first), length), p_mask], 1),
                position_ids=position_ids(p_mask, length), use_cache=True, logits_to_keep=1,
                output_hidden_states=output_hidden)
    cache = output_cache(head)
    cache.reorder_cache(inverse)  # index_select per layer: every row gets its prompt's K/V (differentiable)
    # 2. every row's completion against its prompt's cache
    full = torch.cat([prompt_mask, completion_mask], dim=1)
    tp = prompt_ids.shape[1]
    tail = call(model, cache, input_ids=completion_ids,
                attention_mask=torch.cat([full.new_ones(len(full), length), full], 1),
                position_ids=position_ids(full, length)[:, tp:], use_cache=True, output_hidden_states=output_hidden)
    logits = torch.cat([head.logits[inverse], tail.logits[:, :-1]], dim=1)
    hidden = None
    if output_hidden:
        hidden = torch.cat([head.hidden_states[-1][:, -1:][inverse], tail.hidden_states[-1][:, :-1]], dim=1)
    return SequenceScores(logprobs_of(logits, completion_ids, temperature), logits, hidden)


@collectives.decode_loop
@torch.no_grad()
def sample(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prefix=None, *,
           max_new_tokens: int = 64, min_new_tokens: int = 0, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, do_sample: bool = True, generator: torch.Generator | None = None,
           kv: torch.Tensor | None = None, decode: bool = True, return_hidden: bool = False,
           row_seeds: list[int] | None = None) -> Rollout:
    """The reference loop: completions for a batch of left-padded prompts, the prefix shared across the batch
    (`temperature` > 0 is checked by the caller, `rlprefix.models.adapter.reference_sample`).

    Randomness comes from `generator`, or, with `row_seeds`, from one generator per row: then each row's
    sample depends only on its own seed, not on which other rows share the batch (or the process).
    """
    device = model.device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    batch = prompt_ids.shape[0]
    if kv is None:
        kv = prefix_kv(model, prefix)
    length = 0 if kv is None else kv.shape[2]
    cache = build_cache(model, kv, batch)
    stop, pad = stop_and_pad(model, tokenizer, device)

    attn = torch.cat([prompt_mask.new_ones(batch, length), prompt_mask], dim=1)
    pos = position_ids(prompt_mask, length)
    inputs = prompt_ids
    row_gens = row_generators(row_seeds, batch)
    record = DecodeRecord(batch, stop, pad)
    for step in range(max_new_tokens):
        out = call(model, cache, input_ids=inputs, attention_mask=attn, position_ids=pos, use_cache=True,
                   logits_to_keep=1, output_hidden_states=return_hidden)
        cache = output_cache(out)
        logits = out.logits[:, -1].float()
        nxt = next_tokens(logits, stop, step < min_new_tokens, do_sample, temperature, top_k, top_p, row_gens,
                          generator)
        nxt = record.add(nxt, logprobs_of(logits, nxt, temperature),
                         out.hidden_states[-1][:, -1] if return_hidden else None)
        if collectives.agree_all(model, bool(record.done.all())):  # sharded: until every process's rows are finished
            break
        inputs = nxt.unsqueeze(1)
        attn = torch.cat([attn, attn.new_ones(batch, 1)], dim=1)
        pos = pos[:, -1:] + 1
    return record.rollout(tokenizer, prompt_ids, prompt_mask, decode)


class DecoderOnly(ModelFamily):
    """A decoder-only causal LM: every feature of rlprefix."""

    name = "decoder-only"
    peft_task_type = "CAUSAL_LM"
    peft_submodules = 1
    unsupported = frozenset()

    def build_cache(self, model, kv, batch_size: int):
        return build_cache(model, kv, batch_size)

    def text_kv(self, model, ids: list[int]):
        return text_kv(model, ids)

    def embeds_kv(self, model, embeds):
        return embeds_kv(model, embeds)

    def sft_logits(self, model, batch: dict, prefix):
        """Logits over a supervised batch; an input-conditioned prefix routes on the prompt tokens (no label)."""
        mask = batch["attention_mask"]
        return forward(model, batch["input_ids"], mask, prefix, route_mask=mask * (batch["labels"] == -100)).logits

    def score_completions(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, prefix=None, **kw):
        return score_completions(model, prompt_ids, prompt_mask, completion_ids, completion_mask, prefix, **kw)

    def sample(self, model, tokenizer, prompt_ids, prompt_mask, prefix=None, **kw):
        return sample(model, tokenizer, prompt_ids, prompt_mask, prefix, **kw)

    def generate_inputs(self, model, input_ids, attention_mask, length: int, fill: int) -> dict:
        """[`length` placeholders | prompt]: the cache holds the placeholders' K/V (the prefix), so `generate` feeds
        the prompt only, its positions counted from `length`; the mask covers the prefix with ones."""
        batch = input_ids.shape[0]
        return {"input_ids": torch.cat([input_ids.new_full((batch, length), fill), input_ids], 1),
                "attention_mask": torch.cat([attention_mask.new_ones(batch, length), attention_mask], 1)}


FAMILY = DecoderOnly()
