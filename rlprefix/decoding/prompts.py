"""Prompts in, token ids out: the chat template (when the tokenizer has one) and left-padded batches."""
from __future__ import annotations

import torch


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


