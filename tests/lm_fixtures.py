"""Tiny causal LMs (LLaMA and GPT-2 configurations, a handful of dimensions) and a word-level tokenizer, in code."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["the", "capital", "of", "france", "is", "paris", "germany", "berlin", "italy", "rome", "spain", "madrid", "city", "river", "sea", "big", "small", "old", "new", "a", "an", "in", "on", "and", "to", "what", "where", "who", "question", "answer", "cat", "dog", "sat", "ran", "mat"]

FACTS = [
    "the capital of france is paris",
    "the capital of germany is berlin",
    "the capital of italy is rome",
    "the capital of spain is madrid",
    "the cat sat on the mat",
    "the dog ran to the sea",
    "a big old city on a river",
    "a small new city on the sea",
    "what is the capital of italy",
    "where is the dog and the cat",
]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *WORDS])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def tiny_lm_folder(folder: Path, kind: str = "llama", seed: int = 0) -> Path:
    """Save a randomly initialised tiny ``kind`` (llama | gpt2) causal LM and its tokenizer in ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                             tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=2)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=8, n_layer=2, n_head=2, n_positions=32,
                            pad_token_id=0, eos_token_id=2, bos_token_id=2)
        model = GPT2LMHeadModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
