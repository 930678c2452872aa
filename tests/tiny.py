"""Tiny random models of real architectures and a byte-level tokenizer: a fast, hermetic test bed."""
from __future__ import annotations

import functools

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, BartConfig, GPT2Config, LlamaConfig,
                          PreTrainedTokenizerFast, Qwen2Config, T5Config)

CORPUS = [
    "The film was wonderful and the actors were great.", "I hated the food, it was cold and bland.",
    "Write a one-sentence review of a coffee shop.", "This phone is fast, bright and lovely.",
    "The hotel room was dirty and the staff were rude.", "A calm, beautiful park with friendly people.",
    "positive review", "negative review", "hello world", "good great love happy nice excellent",
] * 4
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@functools.lru_cache(maxsize=None)
def _tokenizer_object():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|pad|>", "<|eos|>", "<|user|>", "<|assistant|>",
                                                                   "<|system|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def tiny_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_object()), eos_token="<|eos|>",
                                  pad_token="<|pad|>", padding_side="left")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(arch: str, vocab_size: int = 320):
    if arch == "gpt2":  # multi-head attention, learned absolute positions, tied embeddings
        return GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=256, vocab_size=vocab_size,
                          bos_token_id=1, eos_token_id=1, pad_token_id=0,
                          initializer_range=0.1)
    if arch == "llama":  # grouped-query attention (4 query heads, 2 kv heads), RoPE, untied embeddings
        return LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                           intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=256,
                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                          initializer_range=0.1)
    if arch == "llama-mqa":  # multi-query attention: one kv head
        return LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, hidden_size=32,
                           intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=256,
                           tie_word_embeddings=True, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                          initializer_range=0.1)
    if arch == "qwen2":  # GQA with qkv bias
        return Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                           intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=256,
                           bos_token_id=1, eos_token_id=1, pad_token_id=0,
                          initializer_range=0.1)
    if arch in ("t5", "t5-even"):  # encoder-decoder, relative position bias; d_kv * heads (24) != d_model (32),
        # 3 decoder layers over 2 encoder layers ("t5-even": 3 and 3, like released T5 checkpoints)
        return T5Config(vocab_size=vocab_size, d_model=32, d_kv=6, d_ff=64, num_layers=3 if arch == "t5-even" else 2,
                        num_decoder_layers=3,
                        num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0, initializer_factor=1.0)
    if arch == "bart":  # encoder-decoder, learned positions; 2 decoder layers (PEFT's layout then ties them)
        return BartConfig(vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                          decoder_start_token_id=1, forced_eos_token_id=None, init_std=0.1)
    raise ValueError(arch)


SEQ2SEQ_ARCHS = ("t5", "t5-even", "bart")


def tiny_model(arch: str = "llama", seed: int = 0, sharpen: float = 1.0):
    """`sharpen` scales the output logits, so the random model has peaked next-token distributions like a
    trained LM (a near-uniform model gives RL nothing to steer)."""
    from rlprefix.models.loading import freeze

    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if arch in SEQ2SEQ_ARCHS else AutoModelForCausalLM
    model = auto.from_config(tiny_config(arch), dtype=torch.float32)
    model.generation_config.eos_token_id = 1
    if sharpen != 1.0:
        with torch.no_grad():
            if arch == "gpt2":
                model.transformer.ln_f.weight.mul_(sharpen)  # tied head: scale the final norm instead
            elif arch.startswith("t5"):
                model.decoder.final_layer_norm.weight.mul_(sharpen)
            elif arch == "bart":  # post-norm: the last decoder layer's norm is the final one
                model.model.decoder.layers[-1].final_layer_norm.weight.mul_(sharpen)
            else:
                model.get_output_embeddings().weight.mul_(sharpen)
    return freeze(model)


def save_tiny(path, arch: str = "llama", seed: int = 0) -> str:
    """A tiny model + tokenizer on disk, loadable by `rlprefix.load_model(path)`."""
    model = tiny_model(arch, seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def peft_calls(test):
    """For tests that call PEFT's own forward or generate: PEFT passes `past_key_values`, which transformers >= 5.24
    deprecates (and ignores in generate, where `cache` is set too). Third-party noise, ignored by message for these
    tests only; rlprefix's own calls stay under the suite's error filter."""
    import pytest

    for message in ("`past_key_values` is deprecated", "Both `past_key_values` and `cache` are set"):
        test = pytest.mark.filterwarnings(f"ignore:{message}:FutureWarning")(test)
    return test
