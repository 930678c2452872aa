"""Batched sampling with a prefix, recording the log-probability of every sampled token.

A hand-written decode loop rather than `model.generate`: PPO needs the log-probs of the policy
(softmax(logits / T)), not of the top-k/top-p-warped sampling distribution, and it needs them to
agree with a later single forward pass over prompt + completion (see `runtime.score_completions`).
"""
from __future__ import annotations

import torch

from . import seq2seq, sharding
from .modeling import is_encoder_decoder
from .primitives import (DecodeRecord, Rollout, eos_ids, filter_logits, logprobs_of, next_tokens, prefix_kv,
                         row_generators, stop_and_pad)
from .runtime import build_cache, position_ids

# Rollout, eos_ids and filter_logits are defined in rlprefix.primitives (shared with rlprefix.seq2seq) and are
# part of this module's interface as before
__all__ = ["Rollout", "render_prompts", "encode_prompts", "chat_used", "eos_ids", "filter_logits", "sample",
           "generate"]


def render_prompts(tokenizer, prompts: list[str], chat: bool | None = None, system: str | None = None) -> list[str]:
    """Apply the tokenizer's chat template to user prompts (when it has one and `chat` is not False)."""
    if chat is None:
        chat = getattr(tokenizer, "chat_template", None) is not None
    if not chat:
        return list(prompts)
    rendered = []
    for p in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered


def encode_prompts(tokenizer, prompts: list[str], chat: bool | None = None, system: str | None = None,
                   max_length: int | None = None, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise (rendered) prompts into left-padded ids and mask."""
    if not prompts:
        raise ValueError("no prompts to encode")
    texts = render_prompts(tokenizer, prompts, chat, system)
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat_used(tokenizer, chat),
                    truncation=max_length is not None, max_length=max_length)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def chat_used(tokenizer, chat: bool | None) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat


@sharding.decode_loop
@torch.no_grad()
def sample(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prefix=None, *,
           max_new_tokens: int = 64, min_new_tokens: int = 0, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, do_sample: bool = True, generator: torch.Generator | None = None,
           kv: torch.Tensor | None = None, decode: bool = True, return_hidden: bool = False,
           row_seeds: list[int] | None = None) -> Rollout:
    """Sample completions for a batch of left-padded prompts, with the prefix shared across the batch.

    Randomness comes from `generator`, or, with `row_seeds`, from one generator per row: then each row's
    sample depends only on its own seed, not on which other rows share the batch (or the process).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
    if is_encoder_decoder(model):
        return seq2seq.sample(model, tokenizer, prompt_ids, prompt_mask, prefix, max_new_tokens=max_new_tokens,
                              min_new_tokens=min_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              do_sample=do_sample, generator=generator, kv=kv, decode=decode,
                              return_hidden=return_hidden, row_seeds=row_seeds)
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
        out = model(input_ids=inputs, attention_mask=attn, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1, output_hidden_states=return_hidden)
        cache = out.past_key_values
        logits = out.logits[:, -1].float()
        nxt = next_tokens(logits, stop, step < min_new_tokens, do_sample, temperature, top_k, top_p, row_gens,
                          generator)
        nxt = record.add(nxt, logprobs_of(logits, nxt, temperature),
                         out.hidden_states[-1][:, -1] if return_hidden else None)
        if sharding.agree_all(model, bool(record.done.all())):  # sharded: until every process's rows are finished
            break
        inputs = nxt.unsqueeze(1)
        attn = torch.cat([attn, attn.new_ones(batch, 1)], dim=1)
        pos = pos[:, -1:] + 1
    return record.rollout(tokenizer, prompt_ids, prompt_mask, decode)


def generate(model, tokenizer, prompts: list[str], prefix=None, *, chat: bool | None = None,
             system: str | None = None, batch_size: int = 32, seed: int | None = None, **sample_kw) -> list[str]:
    """Convenience: completions (text) for a list of prompts, with or without a prefix."""
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    kv = prefix_kv(model, prefix)
    texts: list[str] = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tokenizer, prompts[i:i + batch_size], chat, system, device=model.device)
        texts += sample(model, tokenizer, ids, mask, kv=kv, generator=generator, **sample_kw).texts
    return texts
